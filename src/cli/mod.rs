//! The command line: `knots <command>`. Every flag can also be set by an environment variable.

pub mod data;
pub mod eval;
pub mod infer;
pub mod merge;
mod progress;
pub mod serve;
pub mod train;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "knots",
    version,
    about = "Serve, merge and evaluate sets of LoRA adapters (KnOTS, TIES, DARE, task arithmetic)"
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
    /// Generate text with a base model and an optional adapter set (streams to stdout).
    Generate(infer::GenerateArgs),
    /// Print the logits of a prompt's last position and a greedy continuation as JSON, through the
    /// serving engine's batched forward (reference checks such as scripts/gpu_check.sh).
    Logits(infer::LogitsArgs),
    /// Print sentence embeddings, one JSON array per line.
    Embed(infer::EmbedArgs),
    /// Classify texts with adapter heads or label-text heads.
    Classify(infer::ClassifyArgs),
    /// Train LoRA adapters on the benchmark's tasks (writes PEFT adapters with training records).
    Train(train::TrainArgs),
    /// Run the benchmark: merge the task adapters with every method, evaluate per task and jointly.
    Eval(eval::EvalArgs),
    /// Serve the OpenAI-compatible API; every request can name an adapter set to merge.
    Serve(crate::server::config::ServeArgs),
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
        Command::Generate(args) => infer::run_generate(&args),
        Command::Logits(args) => infer::run_logits(&args),
        Command::Embed(args) => infer::run_embed(&args),
        Command::Classify(args) => infer::run_classify(&args),
        Command::Serve(args) => serve::run(args),
        Command::Eval(args) => {
            match &args.experiment {
                Some(name) => print!("{}", eval::run_experiment(&args, name)?),
                None => print!("{}", eval::run(&args)?),
            }
            Ok(())
        }
        Command::Train(args) => train::run(&args),
    }
}
