use clap::Parser;

/// mimalloc keeps freed pages for reuse: a merge or a serving step that allocates the buffers the
/// previous one freed does not fault fresh zeroed pages in (a re-merge at a new λ or density
/// takes about half the time it takes with the system allocator).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = knots::cli::Cli::parse();
    match knots::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
