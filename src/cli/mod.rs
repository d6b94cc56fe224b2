//! The command line: `knots <command>`. Every flag can also be set by an environment variable.

pub mod data;
pub mod merge;
mod progress;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "knots",
    version,
    about = "Merge LoRA adapters with KnOTS, TIES, DARE or task arithmetic"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Merge PEFT LoRA adapters and write the result as a PEFT adapter or a dense delta.
    Merge(merge::MergeArgs),
    /// Show the benchmark's task suite and the split sizes of the fetched data.
    Data(data::DataArgs),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Merge(args) => {
            let summary = merge::run(&args)?;
            print!("{summary}");
            Ok(())
        }
        Command::Data(args) => {
            print!("{}", data::run(&args)?);
            Ok(())
        }
    }
}
