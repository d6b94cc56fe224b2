//! `knots serve`: load the base models and adapters, then serve the API until SIGTERM.

use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::Context;

use crate::adapters::Registry;
use crate::server::auth::Keys;
use crate::server::backend::Backend;
use crate::server::config::{ServeArgs, ServeConfig};
use crate::server::engine_backend::EngineBackend;
use crate::server::experiments::Experiments;
use crate::server::state::{AppState, StateParts};
use crate::server::store::Store;
use crate::server::{adapter_admin, attach_base, serve, shutdown_signal};

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = ServeConfig::resolve(args).map_err(anyhow::Error::msg)?;
    tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(start(config))
}

async fn start(config: ServeConfig) -> anyhow::Result<()> {
    let (address, grace) = (
        format!("{}:{}", config.host, config.port),
        config.shutdown_grace,
    );
    let state = build_state(config).await?;
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .with_context(|| format!("binding {address}"))?;
    tracing::info!(%address, "serving");
    serve(listener, state, shutdown_signal(), grace).await?;
    tracing::info!("stopped");
    Ok(())
}

/// The server's state from its configuration: models loaded, adapters registered (stored
/// run-time changes applied), keys, bundles and experiments.
pub async fn build_state(config: ServeConfig) -> anyhow::Result<AppState> {
    let (models, device, engine) = (config.models.clone(), config.device.clone(), config.engine);
    let merge_device = config.merge_device.clone();
    let backend = tokio::task::spawn_blocking(move || {
        let mut backend = EngineBackend::load(&models, &device, engine)?;
        if let Some(spec) = &merge_device {
            backend.set_merge_device(spec)?;
        }
        Ok::<_, crate::engine::EngineError>(backend)
    })
    .await??;
    let backend: Arc<dyn Backend> = Arc::new(backend);
    let bases = backend.bases();
    let registry = match &config.adapters {
        Some(dir) => Registry::load_dir(dir, &|a| attach_base(&bases, a))?,
        None => Registry::default(),
    };
    let store = Arc::new(match &config.state_db {
        Some(path) => Store::open(path)?,
        None => Store::in_memory()?,
    });
    let restored = adapter_admin::restore(&registry, &store, &bases, &config.adapter_roots)?;
    let keys = match &config.api_keys {
        Some(path) => Keys::load(path).map_err(anyhow::Error::msg)?,
        None => {
            tracing::warn!(
                "no --api-keys file: the server is open to every caller, with admin rights"
            );
            Keys::open()
        }
    };
    tracing::info!(
        adapters = registry.len(),
        restored,
        state_db = %config.state_db.as_deref().map_or(":memory:".into(), |p| p.display().to_string()),
        bundles = config.bundles.len(),
        experiments = config.experiments.len(),
        "registry loaded"
    );
    Ok(AppState::new(StateParts {
        backend,
        registry,
        keys,
        bundles: config.bundles,
        experiments: Experiments::load(config.experiments, store.clone())?,
        store,
        limits: config.limits,
        merge_cache_bytes: config.merge_cache_bytes,
        alignment_cache_bytes: config.alignment_cache_bytes,
        adapter_roots: config.adapter_roots,
        metrics_compat: config.metrics_compat,
    }))
}
