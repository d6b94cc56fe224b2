//! `knots serve` configuration: one typed tree from flags, environment variables and an optional
//! TOML file (flags and variables win over the file), validated before the server starts.
//!
//! ```toml
//! models = ["smollm2-135m-instruct", "all-minilm-l6-v2"]
//! adapters = "models/adapters"
//! port = 8000
//! merge_cache_bytes = 2147483648
//! alignment_cache_bytes = 536870912
//! state_db = "knots-state.db"
//! merge_store = "s3://merges/knots"
//!
//! [[bundles]]
//! name = "support"
//! model = "sentiment+topic@knots-ties"
//!
//! [[experiments]]
//! name = "merged-vs-single"
//! arms = [{ name = "merged", model = "sentiment+topic" }, { name = "single", model = "sentiment" }]
//! ```

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use crate::engine::{EngineLimits, WeightFormat};
use crate::server::bundles::{Bundle, BundleConfig};
use crate::server::engine_backend::EngineOptions;
use crate::server::experiments::{Experiment, ExperimentConfig};
use crate::server::metrics::Compat;
use crate::server::state::Limits;

/// `knots serve` flags. Every flag has an environment variable; unset values come from the
/// `--config` file, then from the defaults shown.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// Base model to serve (repeatable): a manifest id, a local directory, a GGUF file or a hub
    /// repo id [default: smollm2-135m-instruct].
    #[arg(long = "model", env = "KNOTS_MODELS", value_delimiter = ',')]
    pub models: Vec<String>,
    /// Directory of PEFT adapters: `<name>/` shared, `<tenant>/<name>/` owned by a tenant.
    #[arg(long, env = "KNOTS_ADAPTERS")]
    pub adapters: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1].
    #[arg(long, env = "KNOTS_HOST")]
    pub host: Option<String>,
    /// Port to listen on [default: 8000].
    #[arg(long, env = "KNOTS_PORT")]
    pub port: Option<u16>,
    /// TOML file with any of these settings plus `[[bundles]]` and `[[experiments]]`.
    #[arg(long, env = "KNOTS_CONFIG")]
    pub config: Option<PathBuf>,
    /// API keys file (TOML `[[keys]]` with key, tenant, role); without it the server is open.
    #[arg(long, env = "KNOTS_API_KEYS")]
    pub api_keys: Option<PathBuf>,
    /// Bytes of merged deltas kept in the cache [default: 2 GiB].
    #[arg(long, env = "KNOTS_MERGE_CACHE_BYTES")]
    pub merge_cache_bytes: Option<u64>,
    /// Bytes of per-module alignments (KnOTS and Core Space SVD work) kept so a re-merge of the
    /// same adapters skips them [default: 512 MiB].
    #[arg(long, env = "KNOTS_ALIGNMENT_CACHE_BYTES")]
    pub alignment_cache_bytes: Option<u64>,
    /// Requests doing server-side work at once (merges, encoder forwards); more get 429
    /// [default: 64].
    #[arg(long, env = "KNOTS_MAX_CONCURRENCY")]
    pub max_concurrency: Option<usize>,
    /// Adapters in one merged set [default: 16].
    #[arg(long, env = "KNOTS_MAX_SET_SIZE")]
    pub max_set_size: Option<usize>,
    /// Seconds a request may run [default: 120].
    #[arg(long, env = "KNOTS_REQUEST_TIMEOUT")]
    pub request_timeout: Option<u64>,
    /// Largest request body in bytes [default: 1 MiB].
    #[arg(long, env = "KNOTS_BODY_LIMIT")]
    pub body_limit: Option<usize>,
    /// Seconds in-flight requests get to finish after SIGTERM [default: 30].
    #[arg(long, env = "KNOTS_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<u64>,
    /// `max_tokens` when a request gives none [default: 256].
    #[arg(long, env = "KNOTS_DEFAULT_MAX_TOKENS")]
    pub default_max_tokens: Option<usize>,
    /// Directories adapters may be registered from at run time (repeatable) [default: --adapters].
    #[arg(
        long = "adapter-root",
        env = "KNOTS_ADAPTER_ROOTS",
        value_delimiter = ','
    )]
    pub adapter_roots: Vec<PathBuf>,
    /// Device for the models: cpu or cuda:N [default: cpu].
    #[arg(long, env = "KNOTS_DEVICE")]
    pub device: Option<String>,
    /// Where TIES, DARE-TIES and DARE merges run their tensor work: cpu or cuda:N
    /// [default: --device].
    #[arg(long, env = "KNOTS_MERGE_DEVICE")]
    pub merge_device: Option<String>,
    /// Base projection weights: `native` keeps a GGUF model's quantized blocks, `f32`
    /// dequantizes them [default: native].
    #[arg(long, env = "KNOTS_DTYPE")]
    pub dtype: Option<String>,
    /// Generation requests that may wait per model; beyond it, 429 [default: 512].
    #[arg(long, env = "KNOTS_MAX_QUEUE")]
    pub max_queue: Option<usize>,
    /// Sequences a model's engine runs at once [default: 32].
    #[arg(long, env = "KNOTS_MAX_BATCH")]
    pub max_batch: Option<usize>,
    /// Tokens one engine step runs: decode tokens plus prompt chunks [default: 256].
    #[arg(long, env = "KNOTS_MAX_STEP_TOKENS")]
    pub max_step_tokens: Option<usize>,
    /// Bytes of KV cache per generation model [default: 1 GiB].
    #[arg(long, env = "KNOTS_KV_CACHE_BYTES")]
    pub kv_cache_bytes: Option<usize>,
    /// Also export another engine's metric names for routers built for it: `none` or `vllm`
    /// [default: none].
    #[arg(long, env = "KNOTS_METRICS_COMPAT")]
    pub metrics_compat: Option<String>,
    /// Durable state (run-time adapter changes, experiments, their requests and feedback): a
    /// SQLite file, `:memory:` (keeps nothing), or `postgres://user@host/db` shared by replicas
    /// [default: knots-state.db].
    #[arg(long, env = "KNOTS_STATE_DB")]
    pub state_db: Option<PathBuf>,
    /// Shared store of computed merges below the in-process cache, for replicas to share:
    /// `file:///dir` (or a directory path) or `s3://bucket/prefix` (credentials and endpoint from
    /// the AWS_* environment variables) [default: none].
    #[arg(long, env = "KNOTS_MERGE_STORE")]
    pub merge_store: Option<String>,
    /// Local directory adapters registered by URI (s3://, hf://) are fetched into
    /// [default: knots-adapter-cache].
    #[arg(long, env = "KNOTS_ADAPTER_CACHE")]
    pub adapter_cache: Option<PathBuf>,
    /// A second port serving /metrics, /health and /ready without an API key, for routers and
    /// Prometheus on a private network [default: none].
    #[arg(long, env = "KNOTS_METRICS_PORT")]
    pub metrics_port: Option<u16>,
}

/// The `--config` file: the same settings, plus bundles and experiments.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    models: Vec<String>,
    adapters: Option<PathBuf>,
    host: Option<String>,
    port: Option<u16>,
    api_keys: Option<PathBuf>,
    merge_cache_bytes: Option<u64>,
    alignment_cache_bytes: Option<u64>,
    max_concurrency: Option<usize>,
    max_set_size: Option<usize>,
    request_timeout: Option<u64>,
    body_limit: Option<usize>,
    shutdown_grace: Option<u64>,
    default_max_tokens: Option<usize>,
    #[serde(default)]
    adapter_roots: Vec<PathBuf>,
    device: Option<String>,
    merge_device: Option<String>,
    dtype: Option<String>,
    max_queue: Option<usize>,
    max_batch: Option<usize>,
    max_step_tokens: Option<usize>,
    kv_cache_bytes: Option<usize>,
    state_db: Option<PathBuf>,
    merge_store: Option<String>,
    adapter_cache: Option<PathBuf>,
    metrics_port: Option<u16>,
    metrics_compat: Option<String>,
    #[serde(default)]
    bundles: Vec<BundleConfig>,
    #[serde(default)]
    experiments: Vec<ExperimentConfig>,
}

/// The validated configuration a server starts from.
#[derive(Debug)]
pub struct ServeConfig {
    pub models: Vec<String>,
    pub adapters: Option<PathBuf>,
    pub host: String,
    pub port: u16,
    pub api_keys: Option<PathBuf>,
    pub merge_cache_bytes: u64,
    pub alignment_cache_bytes: u64,
    pub limits: Limits,
    pub shutdown_grace: Duration,
    pub adapter_roots: Vec<PathBuf>,
    pub device: String,
    /// `--merge-device`; `None`: the models' device.
    pub merge_device: Option<String>,
    pub engine: EngineOptions,
    pub bundles: Vec<Bundle>,
    pub experiments: Vec<Experiment>,
    /// `None`: in memory only.
    pub state_db: Option<PathBuf>,
    /// URI of the shared merge store, if any.
    pub merge_store: Option<String>,
    /// Where remote adapters are fetched to.
    pub adapter_cache: PathBuf,
    pub metrics_port: Option<u16>,
    pub metrics_compat: Compat,
}

pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// Where adapters registered by URI are fetched to unless `--adapter-cache` says otherwise.
pub const DEFAULT_ADAPTER_CACHE: &str = "knots-adapter-cache";

/// Where durable state lives unless `--state-db` says otherwise.
pub const DEFAULT_STATE_DB: &str = "knots-state.db";

impl ServeConfig {
    /// Merges flags over the file over the defaults, and validates the result.
    pub fn resolve(args: ServeArgs) -> Result<Self, String> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                toml::from_str::<ConfigFile>(&text)
                    .map_err(|e| format!("{}: {e}", path.display()))?
            }
            None => ConfigFile::default(),
        };
        let defaults = Limits::default();
        let engine = engine_options(&args, &file)?;
        let models = first_nonempty(args.models, file.models)
            .unwrap_or_else(|| vec![DEFAULT_MODEL.to_string()]);
        let adapters = args.adapters.or(file.adapters);
        let limits = Limits {
            max_concurrency: positive(
                "max_concurrency",
                args.max_concurrency.or(file.max_concurrency),
                defaults.max_concurrency,
            )?,
            max_set_size: positive(
                "max_set_size",
                args.max_set_size.or(file.max_set_size),
                defaults.max_set_size,
            )?,
            request_timeout: Duration::from_secs(positive(
                "request_timeout",
                args.request_timeout.or(file.request_timeout),
                120,
            )?),
            body_limit_bytes: positive(
                "body_limit",
                args.body_limit.or(file.body_limit),
                defaults.body_limit_bytes,
            )?,
            default_max_tokens: positive(
                "default_max_tokens",
                args.default_max_tokens.or(file.default_max_tokens),
                defaults.default_max_tokens,
            )?,
            max_batch: defaults.max_batch,
        };
        let adapter_roots = first_nonempty(args.adapter_roots, file.adapter_roots)
            .unwrap_or_else(|| adapters.iter().cloned().collect());
        let bundles = file
            .bundles
            .into_iter()
            .map(Bundle::from_config)
            .collect::<Result<Vec<_>, _>>()?;
        let experiments = file
            .experiments
            .into_iter()
            .map(Experiment::from_config)
            .collect::<Result<Vec<_>, _>>()?;
        unique("bundle", bundles.iter().map(|b| b.name.as_str()))?;
        unique("experiment", experiments.iter().map(|e| e.name.as_str()))?;
        Ok(Self {
            models,
            adapters,
            host: args
                .host
                .or(file.host)
                .unwrap_or_else(|| "127.0.0.1".to_string()),
            port: args.port.or(file.port).unwrap_or(8000),
            api_keys: args.api_keys.or(file.api_keys),
            merge_cache_bytes: positive(
                "merge_cache_bytes",
                args.merge_cache_bytes.or(file.merge_cache_bytes),
                2 << 30,
            )?,
            alignment_cache_bytes: positive(
                "alignment_cache_bytes",
                args.alignment_cache_bytes.or(file.alignment_cache_bytes),
                512 << 20,
            )?,
            limits,
            shutdown_grace: Duration::from_secs(
                args.shutdown_grace.or(file.shutdown_grace).unwrap_or(30),
            ),
            adapter_roots,
            device: args
                .device
                .or(file.device)
                .unwrap_or_else(|| "cpu".to_string()),
            merge_device: args.merge_device.or(file.merge_device),
            engine,
            bundles,
            experiments,
            metrics_compat: match args.metrics_compat.or(file.metrics_compat) {
                Some(s) => s.parse()?,
                None => Compat::None,
            },
            state_db: match args.state_db.or(file.state_db) {
                Some(p) if p.as_os_str() == ":memory:" => None,
                Some(p) => Some(p),
                None => Some(PathBuf::from(DEFAULT_STATE_DB)),
            },
            merge_store: args.merge_store.or(file.merge_store),
            adapter_cache: args
                .adapter_cache
                .or(file.adapter_cache)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_ADAPTER_CACHE)),
            metrics_port: args.metrics_port.or(file.metrics_port),
        })
    }
}

/// The engine settings: flags over the file over the defaults.
fn engine_options(args: &ServeArgs, file: &ConfigFile) -> Result<EngineOptions, String> {
    let d = EngineLimits::default();
    let format: WeightFormat = match args.dtype.as_ref().or(file.dtype.as_ref()) {
        Some(s) => s.parse().map_err(|e| format!("invalid dtype: {e}"))?,
        None => WeightFormat::default(),
    };
    let limits = EngineLimits {
        max_queue: positive("max_queue", args.max_queue.or(file.max_queue), d.max_queue)?,
        max_batch: positive("max_batch", args.max_batch.or(file.max_batch), d.max_batch)?,
        step_tokens: positive(
            "max_step_tokens",
            args.max_step_tokens.or(file.max_step_tokens),
            d.step_tokens,
        )?,
        kv_cache_bytes: positive(
            "kv_cache_bytes",
            args.kv_cache_bytes.or(file.kv_cache_bytes),
            d.kv_cache_bytes,
        )?,
    };
    if limits.step_tokens < limits.max_batch {
        return Err(format!(
            "invalid max_step_tokens: {} is below max_batch {} (every running sequence needs a token per step)",
            limits.step_tokens, limits.max_batch
        ));
    }
    Ok(EngineOptions { format, limits })
}

fn first_nonempty<T>(a: Vec<T>, b: Vec<T>) -> Option<Vec<T>> {
    [a, b].into_iter().find(|v| !v.is_empty())
}

fn positive<T: PartialOrd + Default + std::fmt::Display>(
    name: &str,
    value: Option<T>,
    default: T,
) -> Result<T, String> {
    let v = value.unwrap_or(default);
    if v > T::default() {
        Ok(v)
    } else {
        Err(format!("invalid {name}: must be positive, got {v}"))
    }
}

fn unique<'a>(what: &str, names: impl Iterator<Item = &'a str>) -> Result<(), String> {
    let mut seen = std::collections::BTreeSet::new();
    for n in names {
        if !seen.insert(n) {
            return Err(format!("{what} {n} is configured twice"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_defaults_fill_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("knots.toml");
        std::fs::write(
            &path,
            "port = 9000\nmax_concurrency = 4\n[[bundles]]\nname = \"b\"\nmodel = \"x+y\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            max_concurrency: Some(2),
            ..Default::default()
        };
        let c = ServeConfig::resolve(args).unwrap();
        assert_eq!(
            (c.port, c.limits.max_concurrency, c.host.as_str()),
            (9000, 2, "127.0.0.1")
        );
        assert_eq!(c.models, vec![DEFAULT_MODEL.to_string()]);
        assert_eq!(c.bundles.len(), 1);
    }

    #[test]
    fn bad_values_are_named() {
        let err = ServeConfig::resolve(ServeArgs {
            max_concurrency: Some(0),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.contains("max_concurrency"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "prot = 1\n").unwrap();
        let err = ServeConfig::resolve(ServeArgs {
            config: Some(path),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.contains("prot"), "{err}");
    }
}
