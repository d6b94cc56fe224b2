//! `knots generate`, `knots embed`, `knots classify`: one-off runs of the model engine, with an
//! optional adapter set merged on the fly (the same delta path the server uses).

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;

use super::merge::MergeFlags;
use crate::adapters::LoraAdapter;
use crate::engine::{
    self, BLOCK_POSITIONS, DEFAULT_TEXT_SCALE, Encoder, Head, Message, SamplingParams, Scope,
    SeqCache, StepSeq, TextModel, WeightFormat, classify, generate, parse_device,
};
use crate::merge::{self, MergeInput, MergedDelta, Silent};

/// Model, device and adapter set shared by the three commands.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Manifest id (models/manifest.toml, fetched if missing), local directory, GGUF file or hub repo id.
    #[arg(long, env = "KNOTS_MODEL")]
    pub model: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "KNOTS_DEVICE", default_value = "cpu")]
    pub device: String,
    /// PEFT adapter directories to apply (one: its own update; several: merged).
    #[arg(long = "adapter", env = "KNOTS_ADAPTERS", value_delimiter = ',')]
    pub adapters: Vec<PathBuf>,
    /// Merge settings for several adapters (or, with --method, to force a merge of one).
    #[command(flatten)]
    pub merge: MergeFlags,
}

impl ModelArgs {
    fn resolve(&self) -> anyhow::Result<(engine::ModelPath, candle_core::Device)> {
        let device = parse_device(&self.device)?;
        let path = engine::resolve(&self.model, &engine::models_dir())?;
        Ok((path, device))
    }

    /// The adapters, and their delta (merged when there are several or `--method` is given).
    fn delta(&self) -> anyhow::Result<(Vec<LoraAdapter>, Option<Arc<MergedDelta>>)> {
        let adapters = self
            .adapters
            .iter()
            .map(|d| LoraAdapter::load(d).with_context(|| format!("adapter {}", d.display())))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let delta = match (&adapters[..], self.merge.method) {
            ([], _) => None,
            ([one], None) => Some(one.delta()),
            (many, _) => {
                let params = self.merge.params()?;
                let inputs: Vec<MergeInput<'_>> = many.iter().map(MergeInput::new).collect();
                let device = self.merge.device()?;
                Some(merge::merge_on(
                    &inputs,
                    &params,
                    &Silent,
                    None,
                    device.as_ref(),
                )?)
            }
        };
        Ok((adapters, delta.map(Arc::new)))
    }
}

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt.
    #[arg(long, env = "KNOTS_PROMPT")]
    pub prompt: String,
    /// Apply the model's chat template to the prompt as one user message.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, env = "KNOTS_MAX_TOKENS", default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, env = "KNOTS_TEMPERATURE", default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, env = "KNOTS_TOP_P", default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, env = "KNOTS_TOP_K")]
    pub top_k: Option<usize>,
    /// Sampling seed.
    #[arg(long, env = "KNOTS_SEED")]
    pub seed: Option<u64>,
    /// Stop sequences (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print prompt/decode speed to stderr.
    #[arg(long)]
    pub stats: bool,
}

/// Streams the generated text to stdout.
pub fn run_generate(args: &GenerateArgs) -> anyhow::Result<()> {
    let (path, device) = args.model.resolve()?;
    let (_, delta) = args.model.delta()?;
    let model = TextModel::load_serving(&path, &device, WeightFormat::F32)?;
    let loaded = delta.map(|d| model.load_delta(&d)).transpose()?;
    let prompt = if args.chat {
        model.encode_chat(&[Message::user(args.prompt.clone())])?
    } else {
        model.encode_plain(&args.prompt)?
    };
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        max_tokens: args.max_tokens,
        stop: args.stop.clone(),
        ..SamplingParams::default()
    };
    let mut out = std::io::stdout().lock();
    let gen_out = generate(
        &model.model,
        &model.tokenizer,
        &prompt,
        &params,
        loaded.as_deref(),
        |ev| {
            // A closed stdout (e.g. `| head`) cancels generation.
            match out.write_all(ev.text.as_bytes()).and_then(|()| out.flush()) {
                Ok(()) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(()),
            }
        },
    )?;
    let _ = writeln!(out);
    if args.stats {
        let n = gen_out.ids.len();
        eprintln!(
            "prompt {} tokens in {:.3} s ({:.1} tok/s); generated {n} tokens in {:.3} s ({:.1} tok/s); finish {:?}",
            gen_out.prompt_tokens,
            gen_out.prefill_secs,
            gen_out.prompt_tokens as f64 / gen_out.prefill_secs.max(1e-9),
            gen_out.decode_secs,
            n.saturating_sub(1) as f64 / gen_out.decode_secs.max(1e-9),
            gen_out.finish
        );
    }
    Ok(())
}

#[derive(Debug, Clone, Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt, tokenized without special tokens.
    #[arg(
        long,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    pub prompt: Option<String>,
    /// The prompt as token ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Vec<u32>,
    /// Weights: native (a GGUF file's quantized blocks), f32, or bf16 (generation models).
    #[arg(long, env = "KNOTS_DTYPE", default_value = "native")]
    pub dtype: WeightFormat,
    /// Greedy tokens generated after the prompt (an end-of-sequence token does not stop them).
    #[arg(long, default_value_t = 64)]
    pub greedy: usize,
}

/// Writes `{"prompt_ids", "logits", "greedy_ids", "prefill_secs", "decode_secs",
/// "decode_tokens_per_sec"}` to stdout: the logits (f32) of the prompt's last position, then
/// `greedy` argmax tokens, one decode step each.
pub fn run_logits(args: &LogitsArgs) -> anyhow::Result<()> {
    let (path, device) = args.model.resolve()?;
    let (_, delta) = args.model.delta()?;
    let model = TextModel::load_serving(&path, &device, args.dtype)?;
    let loaded = delta.map(|d| model.load_delta(&d)).transpose()?;
    let prompt = match &args.prompt {
        Some(text) => model.encode_plain(text)?,
        None => args.prompt_ids.clone(),
    };
    let llama = &model.model;
    let positions = prompt.len() + args.greedy;
    let shape = llama.kv_shape();
    let mut pool = llama.kv_pool(positions.div_ceil(BLOCK_POSITIONS) * shape.block_bytes());
    let mut cache = pool
        .reserve(positions)
        .context("the prompt and --greedy do not fit the cache")?;
    let mut run = |tokens: &[u32], cache: &mut SeqCache| -> anyhow::Result<Vec<f32>> {
        pool.grow(cache, cache.len() + tokens.len())?;
        let seq = StepSeq {
            cache,
            tokens,
            delta: loaded.as_deref(),
            logits: true,
        };
        Ok(llama.step(&mut [seq])?.flatten_all()?.to_vec1::<f32>()?)
    };
    let started = Instant::now();
    let first = run(&prompt, &mut cache)?;
    let prefill_secs = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut greedy = Vec::with_capacity(args.greedy);
    let mut logits = first.clone();
    for i in 0..args.greedy {
        let id = engine::argmax(&logits);
        greedy.push(id);
        if i + 1 < args.greedy {
            logits = run(&[id], &mut cache)?;
        }
    }
    let decode_secs = started.elapsed().as_secs_f64();
    let steps = args.greedy.saturating_sub(1);
    let out = serde_json::json!({
        "prompt_ids": prompt,
        "logits": first,
        "greedy_ids": greedy,
        "prefill_secs": prefill_secs,
        "decode_secs": decode_secs,
        "decode_tokens_per_sec": steps as f64 / decode_secs.max(1e-9),
    });
    println!("{out}");
    Ok(())
}

#[derive(Debug, Clone, Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Texts to embed (one JSON array of floats per line on stdout).
    #[arg(required = true)]
    pub texts: Vec<String>,
}

pub fn run_embed(args: &EmbedArgs) -> anyhow::Result<()> {
    let (path, device) = args.model.resolve()?;
    let (_, delta) = args.model.delta()?;
    let encoder = Encoder::load_serving(&path, &device)?;
    let loaded = delta.map(|d| encoder.load_delta(&d)).transpose()?;
    let texts: Vec<&str> = args.texts.iter().map(String::as_str).collect();
    let rows = encoder.embed(&texts, loaded.as_deref())?.to_vec2::<f32>()?;
    for row in rows {
        println!("{}", serde_json::to_string(&row)?);
    }
    Ok(())
}

#[derive(Debug, Clone, Args)]
pub struct ClassifyArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Label-text head `task=label1,label2,…` (repeatable). Adapters with a saved classifier
    /// add a head each, named after the adapter directory.
    #[arg(long = "labels")]
    pub labels: Vec<String>,
    /// Names for the classes of adapter heads, `task=neg,pos` (repeatable).
    #[arg(long = "head-labels")]
    pub head_labels: Vec<String>,
    /// A task name, or `joint` for the union of every task's labels.
    #[arg(long, default_value = "joint")]
    pub task: String,
    #[arg(long, default_value_t = 3)]
    pub top_k: usize,
    /// Texts to classify (one JSON line each on stdout).
    #[arg(required = true)]
    pub texts: Vec<String>,
}

fn parse_task_labels(spec: &str) -> anyhow::Result<(String, Vec<String>)> {
    let Some((task, labels)) = spec.split_once('=') else {
        bail!("expected task=label1,label2 but got {spec:?}");
    };
    let labels: Vec<String> = labels
        .split(',')
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    if task.is_empty() || labels.is_empty() {
        bail!("expected task=label1,label2 but got {spec:?}");
    }
    Ok((task.to_string(), labels))
}

pub fn run_classify(args: &ClassifyArgs) -> anyhow::Result<()> {
    let (path, device) = args.model.resolve()?;
    let (adapters, delta) = args.model.delta()?;
    let encoder = Encoder::load_serving(&path, &device)?;
    let loaded = delta.map(|d| encoder.load_delta(&d)).transpose()?;
    let names: Vec<(String, Vec<String>)> = args
        .head_labels
        .iter()
        .map(|s| parse_task_labels(s))
        .collect::<anyhow::Result<_>>()?;
    let mut heads = Vec::new();
    for adapter in adapters.iter().filter(|a| !a.saved_modules.is_empty()) {
        let labels = names
            .iter()
            .find(|(t, _)| *t == adapter.name)
            .map(|(_, l)| l.clone());
        heads.push(Head::from_saved(
            &adapter.name,
            &adapter.saved_modules,
            labels,
            &encoder,
        )?);
    }
    for spec in &args.labels {
        let (task, labels) = parse_task_labels(spec)?;
        heads.push(Head::from_label_texts(
            &task,
            labels,
            DEFAULT_TEXT_SCALE,
            &encoder,
        )?);
    }
    if heads.is_empty() {
        bail!("no heads: pass --labels task=a,b or an --adapter with a saved classifier");
    }
    let scope = if args.task == "joint" {
        Scope::Joint
    } else {
        Scope::Task(args.task.clone())
    };
    let texts: Vec<&str> = args.texts.iter().map(String::as_str).collect();
    let ranked = classify(
        &encoder,
        &heads,
        &scope,
        &texts,
        loaded.as_deref(),
        args.top_k,
    )?;
    for (text, top) in texts.iter().zip(ranked) {
        let top: Vec<_> = top
            .iter()
            .map(|s| serde_json::json!({"task": s.task, "label": s.label, "score": s.score, "logit": s.logit}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"text": text, "label": top.first().map(|t| t["label"].clone()), "top": top})
        );
    }
    Ok(())
}
