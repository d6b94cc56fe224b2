use clap::Parser;

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
