//! `knots train`: trains one LoRA adapter per suite task and writes each as a PEFT adapter with
//! `training.json` (settings, loss curve, validation accuracy, wall time) and, for encoders,
//! `knots_task.json` (labels and label texts, so the server builds the task's head).

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::json;

use super::data::SuiteArgs;
use super::progress::{log_step, loss_bar};
use crate::adapters::{ExportInfo, TASK_FILE, write_peft};
use crate::engine::{self, Encoder, TextModel, parse_device};
use crate::eval::TaskData;
use crate::labels::CausalTask;
use crate::train::{
    Classification, LoraFactors, StepReport, TrainConfig, TrainRecord, train_causal,
    train_classifier,
};

/// The file beside a trained adapter that records how it was trained.
pub const TRAINING_FILE: &str = "training.json";

#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub suite: SuiteArgs,
    /// Train causal-LM adapters (prompt → label word) instead of encoder classifiers.
    #[arg(long)]
    pub causal: bool,
    /// Base model [default: all-minilm-l6-v2, or smollm2-135m-instruct with --causal].
    #[arg(long, env = "KNOTS_MODEL")]
    pub model: Option<String>,
    /// Where adapters go: `<out-dir>/<task>` (encoders) or `<out-dir>/<task>-lm` (--causal).
    #[arg(long, env = "KNOTS_OUT_DIR", default_value = "models/adapters")]
    pub out_dir: PathBuf,
    /// Passes over the training split [default: 1].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Stop after this many optimiser steps.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Use at most this many training examples per task (a seeded sample).
    #[arg(long)]
    pub max_train: Option<usize>,
    /// Measure validation accuracy on at most this many examples per task.
    #[arg(long)]
    pub max_val: Option<usize>,
    #[arg(long)]
    pub learning_rate: Option<f64>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Examples per forward/backward pass within a batch (less memory, same gradients)
    /// [default: the batch size for encoders, 1 for --causal].
    #[arg(long)]
    pub micro_batch_size: Option<usize>,
    /// LoRA rank [default: 16 for encoders, 8 for --causal].
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA alpha [default: 16].
    #[arg(long)]
    pub alpha: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "KNOTS_DEVICE", default_value = "cpu")]
    pub device: String,
}

impl TrainArgs {
    fn config(&self) -> TrainConfig {
        let mut cfg = if self.causal {
            TrainConfig::causal_default()
        } else {
            TrainConfig::encoder_default()
        };
        cfg.epochs = self.epochs.unwrap_or(cfg.epochs);
        cfg.max_steps = self.max_steps;
        cfg.learning_rate = self.learning_rate.unwrap_or(cfg.learning_rate);
        cfg.batch_size = self.batch_size.unwrap_or(cfg.batch_size);
        cfg.micro_batch_size =
            self.micro_batch_size
                .unwrap_or(if self.causal { 1 } else { cfg.batch_size });
        cfg.rank = self.rank.unwrap_or(cfg.rank);
        cfg.alpha = self.alpha.unwrap_or(cfg.alpha);
        cfg.seed = self.seed;
        cfg
    }

    fn model_id(&self) -> &str {
        match (&self.model, self.causal) {
            (Some(m), _) => m,
            (None, false) => "all-minilm-l6-v2",
            (None, true) => "smollm2-135m-instruct",
        }
    }
}

enum Base {
    Encoder(Encoder),
    Causal(TextModel),
}

/// Runs `knots train`, printing one summary line per trained adapter as it is written.
pub fn run(args: &TrainArgs) -> anyhow::Result<()> {
    let suite = args.suite.load_suite()?;
    let tasks = args.suite.selected(&suite)?;
    let cfg = args.config();
    let model_id = args.model_id();
    let device = parse_device(&args.device)?;
    let path = engine::resolve(model_id, &engine::models_dir())?;
    let base = if args.causal {
        Base::Causal(TextModel::load(&path, &device)?)
    } else {
        Base::Encoder(Encoder::load(&path, &device)?)
    };
    let upstream = engine::manifest(&engine::models_dir())?
        .into_iter()
        .find(|m| m.id == model_id)
        .and_then(|m| m.hf_repo)
        .unwrap_or_else(|| model_id.to_string());
    for def in tasks {
        let mut data = args.suite.load(&suite, def)?;
        sample_train(&mut data, args.max_train, args.seed);
        if let Some(max) = args.max_val {
            data.splits.val.truncate(max);
        }
        let (name, task_type) = if args.causal {
            (format!("{}-lm", def.name), "CAUSAL_LM")
        } else {
            (def.name.clone(), "FEATURE_EXTRACTION")
        };
        let bar = loss_bar(&def.name, cfg.steps(data.splits.train.len()));
        let mut on_step = |s: StepReport| {
            bar.set_position(s.step as u64);
            bar.set_message(format!("{:.4}", s.loss));
            if log_step(s.step, s.steps) {
                eprintln!(
                    "{}: step {}/{} loss {:.4}",
                    def.name, s.step, s.steps, s.loss
                );
            }
        };
        let labels = def
            .class_names()
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        let (factors, record, task_file) = match &base {
            Base::Encoder(encoder) => {
                let label_texts: Vec<String> =
                    def.classes.iter().map(|c| c.label_text.clone()).collect();
                let task = Classification {
                    task: &def.name,
                    labels: &labels,
                    label_texts: &label_texts,
                    train: &data.splits.train,
                    val: &data.splits.val,
                };
                let (f, r) = train_classifier(encoder, model_id, &task, &cfg, &mut on_step)?;
                let info = json!({"task": def.name, "labels": labels, "label_texts": label_texts});
                (f, r, Some(info))
            }
            Base::Causal(model) => {
                let words: Vec<String> = def.classes.iter().map(|c| c.label_word.clone()).collect();
                let task = CausalTask {
                    task: &def.name,
                    prompt: &def.prompt,
                    label_words: &words,
                    train: &data.splits.train,
                    val: &data.splits.val,
                };
                let (f, r) = train_causal(model, model_id, &task, &cfg, &mut on_step)?;
                (f, r, None)
            }
        };
        bar.finish_and_clear();
        let out = args.out_dir.join(&name);
        write_adapter(&factors, &record, task_file, &upstream, task_type, &out)?;
        println!(
            "{name}: {} steps, loss {:.3} → {:.3}, val accuracy {:.3} (base {:.3}), {:.0} s → {}",
            record.steps,
            record.loss_curve.first().copied().unwrap_or(f32::NAN),
            tail_mean(&record.loss_curve),
            record.val_accuracy,
            record.base_val_accuracy,
            record.wall_seconds,
            out.display()
        );
    }
    Ok(())
}

/// Keeps a seeded sample of at most `max` training examples.
fn sample_train(data: &mut TaskData, max: Option<usize>, seed: u64) {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    if let Some(max) = max
        && data.splits.train.len() > max
    {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        data.splits.train.shuffle(&mut rng);
        data.splits.train.truncate(max);
    }
}

/// Mean of the last tenth of the loss curve (less noisy than the last step).
fn tail_mean(curve: &[f32]) -> f32 {
    let n = (curve.len() / 10).max(1).min(curve.len());
    if n == 0 {
        return f32::NAN;
    }
    curve[curve.len() - n..].iter().sum::<f32>() / n as f32
}

fn write_adapter(
    factors: &LoraFactors,
    record: &TrainRecord,
    task_file: Option<serde_json::Value>,
    upstream: &str,
    task_type: &str,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    let mut records = vec![(TRAINING_FILE, serde_json::to_value(record)?)];
    if let Some(info) = task_file {
        records.push((TASK_FILE, info));
    }
    let info = ExportInfo {
        base_model_name_or_path: Some(upstream.to_string()),
        task_type: Some(task_type.to_string()),
        fan_in_fan_out: false,
        records,
    };
    if record.loss_curve.iter().any(|l| !l.is_finite()) {
        bail!(
            "task {}: the loss diverged (not finite); try a lower --learning-rate",
            record.task
        );
    }
    write_peft(&factors.to_delta()?, out, &info)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}
