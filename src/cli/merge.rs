//! `knots merge`: read PEFT adapters, merge them, write a PEFT adapter or a dense delta.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use rayon::prelude::*;
use serde_json::json;

use super::progress::Bar;
use crate::adapters::{ExportInfo, LoraAdapter, RECORD_FILE, write_delta, write_peft};
use crate::merge::{self, MergeInput, MergeOptions, MergeParams, MergedDelta, Method, truncate};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors).
    Peft,
    /// delta.safetensors: the dense merged update of every module, keyed `<module>.weight`.
    Delta,
}

/// The merge settings shared by `merge`, `generate`, `embed` and `classify`.
#[derive(Debug, Clone, Default, Args)]
pub struct MergeFlags {
    /// Merge method: ta, ties, dare, dare-ties, knots-ta, knots-ties, knots-dare-ties, core-ta,
    /// core-ties, core-dare-ties, core-tsv, core-iso-c, core-iso-cts [default: knots-ties].
    #[arg(long, env = "KNOTS_METHOD")]
    pub method: Option<Method>,
    /// Fraction of entries TIES keeps per adapter, in (0, 1] [default: 0.2, or 1 for dare-*].
    #[arg(long, env = "KNOTS_DENSITY")]
    pub density: Option<f64>,
    /// Scaling coefficient λ of the merged update [default: 1].
    #[arg(long, env = "KNOTS_LAMBDA")]
    pub lambda: Option<f64>,
    /// DARE drop probability, in [0, 1) [default: 0.1].
    #[arg(long, env = "KNOTS_DARE_P")]
    pub dare_p: Option<f64>,
    /// DARE seed [default: 0].
    #[arg(long, env = "KNOTS_MERGE_SEED")]
    pub merge_seed: Option<u64>,
    /// Flatten the merged spectrum (core-* methods; always on for core-iso-c and core-iso-cts).
    #[arg(long, env = "KNOTS_ISOTROPIZE")]
    pub isotropize: bool,
    /// Iso-CTS: fraction of the core dimension kept as the common subspace, in [0, 1]
    /// [default: 0.8].
    #[arg(long, env = "KNOTS_COMMON_FRACTION")]
    pub common_fraction: Option<f64>,
    /// Where ties, dare-ties and dare run their O(n·O·I) tensor work: cpu (the host
    /// implementation) or cuda:N; the result is the same within f32 rounding [default: cpu].
    #[arg(long, env = "KNOTS_MERGE_DEVICE")]
    pub merge_device: Option<String>,
}

impl MergeFlags {
    /// The device of `--merge-device`; `None` for the host implementation.
    pub fn device(&self) -> anyhow::Result<Option<candle_core::Device>> {
        match self.merge_device.as_deref() {
            None | Some("cpu") => Ok(None),
            Some(spec) => Ok(Some(crate::engine::parse_device(spec)?)),
        }
    }

    /// The validated parameters, with the method defaulting to knots-ties.
    pub fn params(&self) -> Result<MergeParams, merge::MergeError> {
        let options = MergeOptions {
            lambda: self.lambda,
            density: self.density,
            dare_p: self.dare_p,
            seed: self.merge_seed,
            isotropize: self.isotropize.then_some(true),
            common_fraction: self.common_fraction,
        };
        MergeParams::new(self.method.unwrap_or(MergeParams::DEFAULT_METHOD), options)
    }
}

#[derive(Debug, Clone, Args)]
pub struct MergeArgs {
    /// PEFT adapter directories to merge.
    #[arg(required = true)]
    pub adapters: Vec<PathBuf>,
    /// Output directory (must not exist, or be empty).
    #[arg(long, env = "KNOTS_OUT")]
    pub out: PathBuf,
    #[command(flatten)]
    pub merge: MergeFlags,
    /// Per-adapter weights, in the order the adapters are given [default: all 1].
    #[arg(long, env = "KNOTS_WEIGHTS", value_delimiter = ',')]
    pub weights: Option<Vec<f64>>,
    /// Output format.
    #[arg(long, env = "KNOTS_FORMAT", value_enum, default_value = "peft")]
    pub format: Format,
    /// Rank of the exported PEFT adapter: required for dense results (ties, dare, dare-ties),
    /// optional for low-rank ones. The result is cut by a truncated SVD and the error reported.
    #[arg(long, env = "KNOTS_RANK")]
    pub rank: Option<usize>,
}

/// What a merge did, printed by the CLI.
#[derive(Debug, Clone)]
pub struct MergeSummary {
    pub params: MergeParams,
    pub adapters: Vec<String>,
    /// `(rank, modules with that rank)`; rank `None` for dense modules.
    pub ranks: Vec<(Option<usize>, usize)>,
    pub bytes: u64,
    pub seconds: f64,
    /// The merge alone, without reading and writing.
    pub merge_seconds: f64,
    pub truncation_error: Option<f64>,
    pub out: PathBuf,
    pub format: Format,
}

/// Runs `knots merge`. The golden tests call this same function.
pub fn run(args: &MergeArgs) -> anyhow::Result<MergeSummary> {
    let adapters = args
        .adapters
        .par_iter()
        .map(|dir| LoraAdapter::load(dir))
        .collect::<Result<Vec<_>, _>>()?;
    let weights = match &args.weights {
        Some(w) if w.len() != adapters.len() => {
            bail!(
                "invalid --weights: {} weights for {} adapters",
                w.len(),
                adapters.len()
            )
        }
        Some(w) => w.clone(),
        None => vec![1.0; adapters.len()],
    };
    let params = args.merge.params()?;
    if args.format == Format::Delta && args.rank.is_some() {
        bail!("--rank applies to --format peft only: a dense delta is written at full rank");
    }
    if args.format == Format::Peft && args.rank.is_none() && !params.method.is_low_rank() {
        bail!(
            "{} gives a dense result: pass --rank R to export it as a PEFT adapter, or --format delta",
            params.method
        );
    }
    let inputs: Vec<MergeInput<'_>> = adapters
        .iter()
        .zip(&weights)
        .map(|(adapter, &weight)| MergeInput { adapter, weight })
        .collect();

    let device = args.merge.device()?;
    let started = Instant::now();
    let bar = Bar::new();
    let merged = merge::merge_on(&inputs, &params, &bar, None, device.as_ref());
    bar.finish();
    let merge_seconds = started.elapsed().as_secs_f64();
    let mut delta = merged?;
    let mut truncation_error = None;
    if let (Format::Peft, Some(rank)) = (args.format, args.rank) {
        let truncated = truncate(&delta, rank)?;
        truncation_error = Some(truncated.relative_error);
        delta = truncated.delta;
    }
    let info = export_info(&adapters, &weights, &params, &delta, truncation_error);
    match args.format {
        Format::Peft => write_peft(&delta, &args.out, &info),
        Format::Delta => write_delta(&delta, &args.out, &info),
    }
    .with_context(|| format!("writing {}", args.out.display()))?;

    Ok(MergeSummary {
        params,
        adapters: adapters.iter().map(|a| a.name.clone()).collect(),
        ranks: rank_histogram(&delta),
        bytes: dir_bytes(&args.out),
        seconds: started.elapsed().as_secs_f64(),
        merge_seconds,
        truncation_error,
        out: args.out.clone(),
        format: args.format,
    })
}

fn export_info(
    adapters: &[LoraAdapter],
    weights: &[f64],
    params: &MergeParams,
    delta: &MergedDelta,
    truncation_error: Option<f64>,
) -> ExportInfo {
    let inputs: Vec<_> = adapters
        .iter()
        .zip(weights)
        .map(|(a, w)| json!({"name": a.name, "path": a.path, "sha256": a.digest.to_string(), "weight": w}))
        .collect();
    let ranks: serde_json::Map<_, _> = delta
        .modules
        .iter()
        .map(|(path, m)| (path.clone(), json!(m.rank())))
        .collect();
    let record = json!({
        "knots_version": env!("CARGO_PKG_VERSION"),
        "method": params.method.as_str(),
        "lambda": params.lambda,
        "density": params.density,
        "dare_p": params.dare_p,
        "seed": params.seed,
        "isotropize": params.isotropize,
        "common_fraction": (params.method == Method::CoreIsoCts).then_some(params.common_fraction),
        "adapters": inputs,
        "rank_per_module": ranks,
        "truncation_relative_error": truncation_error,
    });
    ExportInfo {
        base_model_name_or_path: adapters
            .iter()
            .find_map(|a| a.config.base_model_name_or_path.clone()),
        task_type: adapters.iter().find_map(|a| a.config.task_type.clone()),
        fan_in_fan_out: adapters.iter().any(|a| a.config.fan_in_fan_out),
        records: vec![(RECORD_FILE, record)],
    }
}

fn rank_histogram(delta: &MergedDelta) -> Vec<(Option<usize>, usize)> {
    let mut counts = std::collections::BTreeMap::new();
    delta
        .modules
        .values()
        .for_each(|m| *counts.entry(m.rank()).or_insert(0) += 1);
    counts.into_iter().collect()
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

impl fmt::Display for MergeSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.params;
        write!(
            f,
            "merged {} adapters ({}) with {}: lambda {}",
            self.adapters.len(),
            self.adapters.join(", "),
            p.method,
            p.lambda
        )?;
        if p.method.uses_ties() {
            write!(f, ", density {}", p.density)?;
        }
        if p.method.uses_dare() {
            write!(f, ", dare_p {}, seed {}", p.dare_p, p.seed)?;
        }
        if p.isotropize {
            write!(f, ", isotropic")?;
        }
        if p.method == Method::CoreIsoCts {
            write!(f, ", common fraction {}", p.common_fraction)?;
        }
        writeln!(f)?;
        let ranks: Vec<String> = self
            .ranks
            .iter()
            .map(|(rank, n)| match rank {
                Some(k) => format!("k = {k} in {n} modules"),
                None => format!("dense in {n} modules"),
            })
            .collect();
        writeln!(f, "modules: {}", ranks.join("; "))?;
        writeln!(f, "merge took {:.3} s", self.merge_seconds)?;
        if let Some(err) = self.truncation_error {
            writeln!(f, "truncated SVD relative error: {err:.3e}")?;
        }
        let format = match self.format {
            Format::Peft => "PEFT adapter",
            Format::Delta => "dense delta",
        };
        writeln!(
            f,
            "wrote {format} to {} ({} bytes) in {:.3} s",
            self.out.display(),
            self.bytes,
            self.seconds
        )
    }
}
