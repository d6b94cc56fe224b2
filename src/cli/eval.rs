//! `knots eval`: the benchmark. Loads the suite's test and validation splits and each task's
//! adapters, searches every method's merge parameters on validation, and writes the results as
//! markdown, JSON and an SVG chart: per-task, joint and scaling results of the encoder
//! adapters, and the label-word accuracy of merged causal-LM adapters.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;

use super::data::SuiteArgs;
use super::progress::Bar;
use crate::adapters::LoraAdapter;
use candle_core::Device;

use crate::engine::{self, Encoder, TextModel, WeightFormat, parse_device};
use crate::eval::{
    Bench, BenchSettings, LabelWordBench, LabelWordReport, LabelWordSettings, LabelWordTask,
    Report, TaskData, TaskDef, svg,
};
use crate::merge::Method;
use crate::server::config::{ServeArgs, ServeConfig};

/// The two benchmarks `knots eval` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Benchmark {
    /// Encoder adapters with label-text heads: per-task, joint and scaling results.
    Encoder,
    /// Causal-LM adapters (`<task>-lm`): label-word accuracy of their merges.
    LabelWords,
}

#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// Directory holding one encoder adapter per task, `<dir>/<task>` (`knots train` writes them).
    #[arg(long, env = "KNOTS_ADAPTERS", default_value = "models/adapters")]
    pub adapters: PathBuf,
    /// The encoder the adapters were trained on.
    #[arg(long, env = "KNOTS_MODEL", default_value = "all-minilm-l6-v2")]
    pub model: String,
    #[command(flatten)]
    pub suite: SuiteArgs,
    /// Merge methods to compare [default: ta, ties, dare-ties, knots-ties, knots-dare-ties,
    /// core-ties, core-dare-ties, core-tsv, core-iso-c, core-iso-cts].
    #[arg(long = "method", value_delimiter = ',')]
    pub methods: Vec<Method>,
    /// The paper's full protocol: every test example, 0.1-step grids, 3 DARE seeds, scaling at
    /// every k (many hours on 2 CPU cores).
    #[arg(long, conflicts_with = "quick")]
    pub paper: bool,
    /// Test examples per task [default: 200; 48 with --quick; all with --paper].
    #[arg(long)]
    pub test_per_task: Option<usize>,
    /// Where report.md, report.json and scaling.svg go.
    #[arg(long, default_value = "target/eval")]
    pub out: PathBuf,
    /// The causal LM of the label-word benchmark, run on every selected task with a causal
    /// adapter `<adapters>/<task>-lm` (at least 2 needed).
    #[arg(long, env = "KNOTS_LM_MODEL", default_value = "smollm2-135m-instruct")]
    pub lm_model: String,
    /// Benchmarks to run (repeatable or comma-separated) [default: both].
    #[arg(long = "bench", value_delimiter = ',')]
    pub benches: Vec<Benchmark>,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "KNOTS_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Instead of the benchmark, score every arm of this experiment on the first `--task`
    /// (`--test-per-task` examples, default 100), as `POST /v1/experiments/{name}/evaluate` does.
    #[arg(long, requires = "serve_config")]
    pub experiment: Option<String>,
    /// The `knots serve` config file whose models, adapters, experiments and state database the
    /// experiment comes from.
    #[arg(long)]
    pub serve_config: Option<PathBuf>,
}

/// Scores the arms of `--experiment` with the server's own evaluation; returns its JSON.
pub fn run_experiment(args: &EvalArgs, name: &str) -> anyhow::Result<String> {
    let task = args
        .suite
        .tasks
        .first()
        .ok_or_else(|| anyhow::anyhow!("give the task to score the arms on with --task"))?
        .clone();
    let serve_args = ServeArgs {
        config: args.serve_config.clone(),
        device: Some(args.device.clone()),
        ..ServeArgs::default()
    };
    let config = ServeConfig::resolve(serve_args).map_err(anyhow::Error::msg)?;
    let examples = args.test_per_task.unwrap_or(100);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let state = super::serve::build_state(config).await?;
        let e = state
            .experiments
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("no experiment {name:?} in the config or state"))?;
        let report = crate::server::evaluate::evaluate(&state, &e, &task, examples)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(serde_json::to_string_pretty(&report)? + "\n")
    })
}

/// Runs the selected benchmarks; returns the markdown report.
pub fn run(args: &EvalArgs) -> anyhow::Result<String> {
    let suite = args.suite.load_suite()?;
    let defs = args.suite.selected(&suite)?;
    if defs.len() < 2 {
        bail!(
            "the benchmark merges tasks: give at least 2 (got {})",
            defs.len()
        );
    }
    let tasks = defs
        .iter()
        .map(|d| args.suite.load(&suite, d))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let settings = args.settings(tasks.len());
    let device = parse_device(&args.device)?;
    let runs = |b: Benchmark| args.benches.is_empty() || args.benches.contains(&b);
    let bar = Bar::new();
    let mut markdown = String::new();
    let mut json = serde_json::Map::new();
    let mut scaling = None;
    if runs(Benchmark::Encoder) {
        let report = encoder_bench(args, &defs, &tasks, &settings, &device, &bar)?;
        let examples: usize = tasks
            .iter()
            .map(|t| t.splits.test.len().min(settings.test_per_task))
            .sum();
        markdown += &format!(
            "{}\nRun: {} tasks, {examples} test examples, {:.0} s{}.\n",
            report.to_markdown(),
            tasks.len(),
            report.seconds,
            if args.suite.quick { ", --quick" } else { "" }
        );
        scaling = Some(svg::scaling_svg(&report.scaling));
        json.insert("encoder".into(), serde_json::to_value(&report)?);
    }
    if runs(Benchmark::LabelWords)
        && let Some(report) = label_words(args, &defs, &tasks, &settings.methods, &device, &bar)?
    {
        markdown += &format!(
            "\n{}\nRun: {} tasks, {:.0} s.\n",
            report.to_markdown(),
            report.tasks.len(),
            report.seconds
        );
        json.insert("label_words".into(), serde_json::to_value(&report)?);
    }
    bar.finish();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let write = |name: &str, text: &str| {
        let path = args.out.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("report.md", &markdown)?;
    write("report.json", &serde_json::to_string_pretty(&json)?)?;
    if let Some(svg) = scaling {
        write("scaling.svg", &svg)?;
    }
    Ok(markdown)
}

impl EvalArgs {
    fn settings(&self, tasks: usize) -> BenchSettings {
        let mut settings = if self.suite.quick {
            BenchSettings::quick(tasks)
        } else if self.paper {
            BenchSettings::paper(tasks)
        } else {
            BenchSettings::standard(tasks)
        };
        if let Some(n) = self.test_per_task {
            settings.test_per_task = n;
        }
        if !self.methods.is_empty() {
            settings.methods = self.methods.clone();
        }
        settings
    }
}

/// The encoder benchmark: every task's adapter `<adapters>/<task>` with its label-text head.
fn encoder_bench(
    args: &EvalArgs,
    defs: &[&TaskDef],
    tasks: &[TaskData],
    settings: &BenchSettings,
    device: &Device,
    progress: &Bar,
) -> anyhow::Result<Report> {
    let adapters = defs
        .iter()
        .map(|d| {
            let dir = args.adapters.join(&d.name);
            LoraAdapter::load(&dir).with_context(|| {
                format!(
                    "adapter for task {} (train it with `knots train --task {}`)",
                    d.name, d.name
                )
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let label_texts: Vec<Vec<String>> = defs
        .iter()
        .map(|d| d.classes.iter().map(|c| c.label_text.clone()).collect())
        .collect();
    let encoder = Encoder::load_serving(
        &engine::resolve(&args.model, &engine::models_dir())?,
        device,
    )?;
    let bench = Bench::new(&encoder, tasks, &adapters, &label_texts, progress)?;
    Ok(bench.run(settings)?)
}

/// The label-word benchmark over the selected tasks that have a causal adapter; `None` (with a
/// note on stderr) when fewer than two do.
fn label_words(
    args: &EvalArgs,
    defs: &[&TaskDef],
    tasks: &[TaskData],
    methods: &[Method],
    device: &Device,
    progress: &Bar,
) -> anyhow::Result<Option<LabelWordReport>> {
    let mut adapters = Vec::new();
    for (def, data) in defs.iter().zip(tasks) {
        let dir = args.adapters.join(format!("{}-lm", def.name));
        if dir.is_dir() {
            let adapter = LoraAdapter::load(&dir)
                .with_context(|| format!("causal adapter {}", dir.display()))?;
            adapters.push((def, data, adapter));
        }
    }
    if adapters.len() < 2 {
        eprintln!(
            "label-word benchmark skipped: {} of the selected tasks have a causal adapter \
             (<task>-lm) in {}; 2 are needed",
            adapters.len(),
            args.adapters.display()
        );
        return Ok(None);
    }
    let lm_tasks: Vec<LabelWordTask<'_>> = adapters
        .iter()
        .map(|(def, data, adapter)| LabelWordTask {
            name: &def.name,
            prompt: &def.prompt,
            label_words: def.classes.iter().map(|c| c.label_word.clone()).collect(),
            val: &data.splits.val,
            test: &data.splits.test,
            adapter,
        })
        .collect();
    let model = TextModel::load_serving(
        &engine::resolve(&args.lm_model, &engine::models_dir())?,
        device,
        WeightFormat::F32,
    )?;
    let settings = if args.suite.quick {
        LabelWordSettings::quick(methods.to_vec())
    } else {
        LabelWordSettings::standard(methods.to_vec())
    };
    let bench = LabelWordBench::new(&model, &lm_tasks, progress)?;
    Ok(Some(bench.run(&args.lm_model, &settings)?))
}
