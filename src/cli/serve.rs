//! `knots serve`: load the base models and adapters, then serve the API until SIGTERM.

use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::Context;

use crate::adapters::{AdapterCache, Registry};
use crate::server::auth::Keys;
use crate::server::backend::Backend;
use crate::server::config::{ServeArgs, ServeConfig};
use crate::server::engine_backend::EngineBackend;
use crate::server::experiments::Experiments;
use crate::server::merge_store::MergeStore;
use crate::server::state::{AppState, StateParts};
use crate::server::store::{self, Store};
use crate::server::{adapter_admin, attach_base, metrics_app, serve, shutdown_signal, sync};

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = ServeConfig::resolve(args).map_err(anyhow::Error::msg)?;
    tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let runtime = runtime(&config.device)?;
    runtime.block_on(start(config))
}

/// The async runtime; on a GPU, each of its threads (workers and the blocking pool, where merges
/// and delta uploads run) makes the device's context current when it starts.
fn runtime(device: &str) -> anyhow::Result<tokio::runtime::Runtime> {
    let device = crate::engine::parse_device(device)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(move || {
            if let Err(error) = crate::engine::bind_to_thread(&device) {
                tracing::error!(%error, "async runtime thread");
            }
        })
        .build()
        .context("starting the async runtime")
}

async fn start(config: ServeConfig) -> anyhow::Result<()> {
    let (address, grace) = (
        format!("{}:{}", config.host, config.port),
        config.shutdown_grace,
    );
    let metrics_address = config
        .metrics_port
        .map(|port| format!("{}:{port}", config.host));
    // Replicas sharing a PostgreSQL state database take each other's changes.
    let shared_state = config
        .state_db
        .as_ref()
        .and_then(|p| p.to_str())
        .is_some_and(store::is_postgres);
    let state = build_state(config).await?;
    if shared_state {
        tokio::spawn(sync::run(state.clone()));
    }
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .with_context(|| format!("binding {address}"))?;
    if let Some(address) = metrics_address {
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .with_context(|| format!("binding the metrics port {address}"))?;
        tracing::info!(%address, "serving metrics without a key");
        let app = metrics_app(state.clone());
        tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::error!(%error, "the metrics listener stopped");
            }
        });
    }
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
        // The files' read buffers and the f32 copies packing went through are not needed again.
        crate::allocator::return_free_pages();
        Ok::<_, crate::engine::EngineError>(backend)
    })
    .await??;
    let backend: Arc<dyn Backend> = Arc::new(backend);
    let bases = backend.bases();
    let registry = match &config.adapters {
        Some(dir) => Registry::load_dir(dir, &|a| attach_base(&bases, a))?,
        None => Registry::default(),
    };
    let merge_store = match config.merge_store.clone() {
        Some(uri) => {
            let bases = bases.clone();
            let store =
                tokio::task::spawn_blocking(move || MergeStore::open(&uri, &bases)).await??;
            tracing::info!(uri = store.uri(), "shared merge store");
            Some(Arc::new(store))
        }
        None => None,
    };
    let store = Arc::new(match &config.state_db {
        Some(path) => Store::open_spec(path)?,
        None => Store::in_memory()?,
    });
    let adapter_cache = AdapterCache::new(&config.adapter_cache);
    let bases = Arc::new(bases);
    let restored = adapter_admin::restore(
        &registry,
        &store,
        &bases,
        &config.adapter_roots,
        &adapter_cache,
    )
    .await?;
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
        merge_store,
        adapter_roots: config.adapter_roots,
        adapter_cache,
        metrics_compat: config.metrics_compat,
    }))
}
