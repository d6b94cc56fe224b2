//! `knots data`: shows the benchmark's task suite (`--list`, from the suite file alone) and what
//! the fetched cache yields (`--stats`: classes and split sizes), so users can check the data
//! before training or evaluating.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use clap::{ArgGroup, Args};

use crate::eval::{SourceDef, Suite, TaskData, TaskDef, load_task};

#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("mode").required(true).args(["list", "stats"])))]
pub struct DataArgs {
    /// List the tasks, their sources and classes (reads only the suite file).
    #[arg(long)]
    pub list: bool,
    /// Load every task from the cache and print its classes and split sizes.
    #[arg(long)]
    pub stats: bool,
    /// With --stats: also print the first N test examples of each task.
    #[arg(long, env = "KNOTS_EXAMPLES", default_value_t = 0)]
    pub examples: usize,
    #[command(flatten)]
    pub suite: SuiteArgs,
}

/// The task suite a command works on (`knots data`, `train` and `eval`).
#[derive(Debug, Clone, Args)]
pub struct SuiteArgs {
    /// Only these tasks (repeatable, or comma-separated) [default: every task of the suite].
    #[arg(long = "task", env = "KNOTS_TASKS", value_delimiter = ',')]
    pub tasks: Vec<String>,
    /// The suite definition.
    #[arg(long, env = "KNOTS_SUITE", default_value = "data/suite.toml")]
    pub suite: PathBuf,
    /// The data cache `make data` fills.
    #[arg(long, env = "KNOTS_DATA_CACHE", default_value = "data/cache")]
    pub cache: PathBuf,
    /// Use the small quick splits (as CI does); `knots eval` also searches coarse grids and runs
    /// a short scaling study.
    #[arg(long, env = "KNOTS_QUICK")]
    pub quick: bool,
}

impl SuiteArgs {
    pub fn load_suite(&self) -> anyhow::Result<Suite> {
        Ok(Suite::load(&self.suite)?)
    }

    /// The definitions of the selected tasks, in the order given.
    pub fn selected<'a>(&self, suite: &'a Suite) -> anyhow::Result<Vec<&'a TaskDef>> {
        if self.tasks.is_empty() {
            return Ok(suite.tasks.iter().collect());
        }
        self.tasks
            .iter()
            .map(|n| {
                suite.task(n).ok_or_else(|| {
                    let known: Vec<&str> = suite.tasks.iter().map(|t| t.name.as_str()).collect();
                    anyhow::anyhow!("unknown task {n:?}; the suite has {}", known.join(", "))
                })
            })
            .collect()
    }

    /// One task's splits from the cache.
    pub fn load(&self, suite: &Suite, def: &TaskDef) -> anyhow::Result<TaskData> {
        load_task(suite, def, &self.cache, self.quick)
            .with_context(|| format!("task {} (run `make data` first)", def.name))
    }
}

/// Runs `knots data` and returns what it prints.
pub fn run(args: &DataArgs) -> anyhow::Result<String> {
    let suite = args.suite.load_suite()?;
    let tasks = args.suite.selected(&suite)?;
    if args.list {
        Ok(list(&tasks))
    } else {
        stats(&suite, &tasks, args)
    }
}

fn source_name(task: &TaskDef) -> String {
    match &task.source {
        SourceDef::Vader { files, .. } => format!("vader: {}", files.join(", ")),
        SourceDef::Folders { root } => format!("folders: {root}"),
        SourceDef::Bigbench { file, .. } => format!("bigbench: {file}"),
        SourceDef::Fortunes => "fortunes".to_owned(),
    }
}

fn list(tasks: &[&TaskDef]) -> String {
    let mut out = String::new();
    for task in tasks {
        let _ = writeln!(
            out,
            "{} ({} classes; {})\n  {}",
            task.name,
            task.classes.len(),
            source_name(task),
            task.description
        );
        for class in &task.classes {
            let _ = writeln!(
                out,
                "  - {}: label text {:?}, label word {:?}",
                class.name, class.label_text, class.label_word
            );
        }
    }
    out
}

fn stats(suite: &Suite, tasks: &[&TaskDef], args: &DataArgs) -> anyhow::Result<String> {
    let caps = suite.caps(args.suite.quick);
    let mut out = format!(
        "per-class caps: train {}, val {}, test {}{}\n",
        caps.train,
        caps.val,
        caps.test,
        if args.suite.quick { " (quick)" } else { "" }
    );
    let _ = writeln!(out, "| task | class | available | train | val | test |");
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    let mut totals = (0, 0, 0);
    for task in tasks {
        let data = args.suite.load(suite, task)?;
        for (c, class) in data.classes.iter().enumerate() {
            let (tr, va, te) = data.class_counts(c);
            let avail = data.available.get(c).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "| {} | {class} | {avail} | {tr} | {va} | {te} |",
                data.name
            );
        }
        let s = &data.splits;
        let (tr, va, te) = (s.train.len(), s.val.len(), s.test.len());
        let _ = writeln!(
            out,
            "| **{}** | {} classes | dropped: {} short, {} long, {} ambiguous | **{tr}** | **{va}** | **{te}** |",
            data.name,
            data.classes.len(),
            data.dropped_short,
            data.dropped_long,
            data.dropped_ambiguous
        );
        totals = (totals.0 + tr, totals.1 + va, totals.2 + te);
        for e in s.test.iter().take(args.examples) {
            let class = data.classes.get(e.label).map_or("?", String::as_str);
            let _ = writeln!(out, "|   | {class} | {:?} | | | |", e.text);
        }
    }
    let _ = writeln!(
        out,
        "{} tasks: {} train, {} val, {} test examples",
        tasks.len(),
        totals.0,
        totals.1,
        totals.2
    );
    Ok(out)
}
