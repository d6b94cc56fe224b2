//! The shared state of a running server and its limits.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::auth::Keys;
use super::backend::{Backend, BaseInfo};
use super::bundles::Bundle;
use super::cache::MergeCache;
use super::experiments::Experiments;
use super::inflight::InFlight;
use super::merge_store::MergeStore;
use super::metrics::Compat;
use super::store::Store;
use crate::adapters::{AdapterCache, Registry};
use crate::server::error::ApiError;

/// Limits, validated at start-up.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Encoder requests in flight at once; more get 429 (generation queues in its engine).
    pub max_concurrency: usize,
    /// Adapters in one merged set.
    pub max_set_size: usize,
    pub request_timeout: Duration,
    pub body_limit_bytes: usize,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    /// Inputs in one embeddings or classify request.
    pub max_batch: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrency: 64,
            max_set_size: 16,
            request_timeout: Duration::from_secs(120),
            body_limit_bytes: 1 << 20,
            default_max_tokens: 256,
            max_batch: 64,
        }
    }
}

/// Everything a handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub backend: Arc<dyn Backend>,
    pub bases: Arc<Vec<BaseInfo>>,
    pub registry: Arc<Registry>,
    pub cache: MergeCache,
    pub keys: Arc<Keys>,
    pub bundles: Arc<Vec<Bundle>>,
    pub experiments: Arc<Experiments>,
    /// Durable state: run-time adapter changes and experiment requests.
    pub store: Arc<Store>,
    pub limits: Arc<Limits>,
    /// Directories adapters may be registered from at run time.
    pub adapter_roots: Arc<Vec<PathBuf>>,
    /// Where adapters registered by URI are fetched to.
    pub adapter_cache: Arc<AdapterCache>,
    pub inflight: Arc<InFlight>,
    /// Extra metric names for routers built for another engine.
    pub metrics_compat: Compat,
    permits: Arc<Semaphore>,
    shutting_down: Arc<AtomicBool>,
}

/// The parts a server is built from.
pub struct StateParts {
    pub backend: Arc<dyn Backend>,
    pub registry: Registry,
    pub keys: Keys,
    pub bundles: Vec<Bundle>,
    /// Loaded with [`Experiments::load`] over the same store.
    pub experiments: Experiments,
    pub store: Arc<Store>,
    pub limits: Limits,
    pub merge_cache_bytes: u64,
    pub alignment_cache_bytes: u64,
    /// The shared merge store below the cache, if configured.
    pub merge_store: Option<Arc<MergeStore>>,
    pub adapter_roots: Vec<PathBuf>,
    pub adapter_cache: AdapterCache,
    pub metrics_compat: Compat,
}

impl AppState {
    pub fn new(parts: StateParts) -> Self {
        // Install the metrics recorder before the first request records anything.
        super::metrics::handle();
        let bases = parts.backend.bases();
        let cache = MergeCache::new(
            parts.merge_cache_bytes,
            parts.alignment_cache_bytes,
            parts.backend.clone(),
            parts.merge_store,
        );
        Self {
            backend: parts.backend,
            bases: Arc::new(bases),
            registry: Arc::new(parts.registry),
            cache,
            keys: Arc::new(parts.keys),
            bundles: Arc::new(parts.bundles),
            experiments: Arc::new(parts.experiments),
            store: parts.store,
            permits: Arc::new(Semaphore::new(parts.limits.max_concurrency)),
            inflight: Arc::new(InFlight::default()),
            metrics_compat: parts.metrics_compat,
            limits: Arc::new(parts.limits),
            adapter_roots: Arc::new(parts.adapter_roots),
            adapter_cache: Arc::new(parts.adapter_cache),
            shutting_down: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A slot for model work, or 429 when all are taken (503 while shutting down).
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        if self.is_shutting_down() {
            return Err(ApiError::ShuttingDown);
        }
        self.permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::Overloaded)
    }

    pub fn base(&self, id: &str) -> Option<&BaseInfo> {
        self.bases.iter().find(|b| b.id == id)
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}
