//! The merge cache: `MergeKey` → merged delta, weighed in bytes. Concurrent requests for the
//! same uncached set share one merge (`try_get_with`); the merge itself runs on a blocking
//! thread, never on an async worker. Beside it, the alignment cache keeps each set's SVD work
//! per module, so a merge that changes only λ, density, p or the method within a family skips it.
//!
//! An entry weighs every copy of its delta: the host factors or dense matrices and the copy the
//! backend converted for its model. Eviction frees both: after each merge the cache applies its
//! pending evictions and asks the backend to drop conversions of deltas nobody holds.

use std::sync::Arc;
use std::time::Instant;

use moka::future::Cache;

use super::backend::Backend;
use super::merge_store::MergeStore;
use super::metrics;
use crate::adapters::Registered;
use crate::merge::{self, AlignmentCache, MergeInput, MergeKey, MergeParams, MergedDelta, Silent};
use crate::server::error::ApiError;

/// A finished merge as the cache holds it.
#[derive(Debug)]
pub struct CachedMerge {
    pub key: MergeKey,
    pub delta: Arc<MergedDelta>,
    pub merge_ms: f64,
}

/// How a request got its merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    /// Another request was already merging this set; this one waited for it.
    Coalesced,
    /// Not in this process, found in the shared merge store.
    Fetched,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Coalesced => "coalesced",
            Self::Fetched => "fetched",
        }
    }
}

#[derive(Clone)]
pub struct MergeCache {
    cache: Cache<MergeKey, Arc<CachedMerge>>,
    alignments: Arc<AlignmentCache>,
    backend: Arc<dyn Backend>,
    /// Merges computed at once: they are CPU-bound (more than the cores only adds their
    /// transient memory, a dense update per adapter for TIES and DARE, not speed).
    merging: Arc<tokio::sync::Semaphore>,
    /// The shared store below this cache, when configured.
    store: Option<Arc<MergeStore>>,
}

/// Merges computed at once: the machine's cores.
fn merge_slots() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

impl MergeCache {
    /// A cache of up to `max_bytes` of merged deltas (with `backend`'s converted copies) and
    /// `alignment_bytes` of alignments.
    pub fn new(
        max_bytes: u64,
        alignment_bytes: u64,
        backend: Arc<dyn Backend>,
        store: Option<Arc<MergeStore>>,
    ) -> Self {
        let weigh = backend.clone();
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(move |_k: &MergeKey, v: &Arc<CachedMerge>| {
                let bytes = v.delta.bytes() + weigh.converted_bytes(&v.delta);
                u32::try_from(bytes).unwrap_or(u32::MAX)
            })
            .eviction_listener(|_k, _v, cause| {
                if cause.was_evicted() {
                    metrics::cache_eviction();
                }
            })
            .build();
        Self {
            cache,
            alignments: Arc::new(AlignmentCache::new(alignment_bytes)),
            backend,
            merging: Arc::new(tokio::sync::Semaphore::new(merge_slots())),
            store,
        }
    }

    /// The merge of `members` with `params` under `key`, computed at most once however many
    /// requests ask for it at the same time.
    pub async fn get_or_merge(
        &self,
        key: MergeKey,
        members: Vec<(Arc<Registered>, f64)>,
        params: MergeParams,
    ) -> Result<(Arc<CachedMerge>, Outcome), ApiError> {
        let present = self.cache.contains_key(&key);
        let how = Arc::new(std::sync::Mutex::new(None));
        let found = how.clone();
        let merge_key = key.clone();
        let alignments = self.alignments.clone();
        let merging = self.merging.clone();
        let store = self.store.clone();
        let device = self.backend.merge_device();
        let entry = self
            .cache
            .try_get_with(key, async move {
                if let Some(fetched) = fetch_stored(store.as_deref(), &merge_key).await {
                    *lock(&found) = Some(Outcome::Fetched);
                    return Ok(fetched);
                }
                *lock(&found) = Some(Outcome::Miss);
                let _slot = merging
                    .acquire_owned()
                    .await
                    .map_err(|e| ApiError::internal(format!("merge slots closed: {e}")))?;
                let merged = tokio::task::spawn_blocking(move || {
                    if let Some(device) = &device {
                        crate::engine::bind_to_thread(device).map_err(ApiError::internal)?;
                    }
                    let merged =
                        run_merge(merge_key, &members, &params, &alignments, device.as_ref());
                    release_free_memory();
                    merged
                })
                .await
                .map_err(|e| ApiError::internal(format!("merge task failed: {e}")))??;
                if let Some(store) = store {
                    tokio::spawn(save_stored(store, merged.clone()));
                }
                Ok(merged)
            })
            .await
            .map_err(|e: Arc<ApiError>| clone_error(&e))?;
        let produced = *lock(&how);
        if produced.is_some() {
            self.release_evicted().await;
        }
        let outcome = match produced {
            Some(outcome) => outcome,
            None if present => Outcome::Hit,
            None => Outcome::Coalesced,
        };
        metrics::cache_outcome(outcome);
        metrics::cache_bytes(self.weighted_bytes());
        Ok((entry, outcome))
    }

    pub fn entries(&self) -> Vec<Arc<CachedMerge>> {
        self.cache.iter().map(|(_, v)| v).collect()
    }

    /// Removes the entry whose key id is `id`; whether one was there.
    pub async fn evict(&self, id: &str) -> bool {
        self.evict_where(|k| k.id() == id).await > 0
    }

    /// Drops every merge that includes the adapter `name` (its contents changed or it is gone).
    pub async fn evict_adapter(&self, name: &str) -> usize {
        self.evict_where(|k| k.contains(name)).await
    }

    /// Removes every entry whose key matches; how many there were.
    async fn evict_where(&self, matches: impl Fn(&MergeKey) -> bool) -> usize {
        let found: Vec<MergeKey> = self
            .cache
            .iter()
            .filter(|(k, _)| matches(k))
            .map(|(k, _)| (*k).clone())
            .collect();
        for key in &found {
            self.cache.invalidate(key).await;
        }
        self.release_evicted().await;
        metrics::cache_bytes(self.weighted_bytes());
        found.len()
    }

    /// Applies pending evictions, then frees the backend's conversions of evicted deltas that no
    /// running request holds (those go when the request ends, at the next call).
    async fn release_evicted(&self) {
        self.cache.run_pending_tasks().await;
        self.backend.release_unused();
    }

    pub fn weighted_bytes(&self) -> u64 {
        self.cache.weighted_size()
    }

    pub fn len(&self) -> u64 {
        self.cache.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies pending inserts and evictions (so sizes and counts are current).
    pub async fn sync(&self) {
        self.cache.run_pending_tasks().await;
    }
}

fn run_merge(
    key: MergeKey,
    members: &[(Arc<Registered>, f64)],
    params: &MergeParams,
    alignments: &AlignmentCache,
    device: Option<&candle_core::Device>,
) -> Result<Arc<CachedMerge>, ApiError> {
    let started = Instant::now();
    let inputs: Vec<MergeInput<'_>> = members
        .iter()
        .map(|(r, weight)| MergeInput {
            adapter: &r.adapter,
            weight: *weight,
        })
        .collect();
    let delta = merge::merge_on(&inputs, params, &Silent, Some(alignments), device)?;
    let seconds = started.elapsed().as_secs_f64();
    metrics::merge_done(params.method.as_str(), seconds);
    metrics::alignment_cache(alignments.stats());
    tracing::info!(key = %key, id = %key.id(), ms = seconds * 1e3, bytes = delta.bytes(), "merged");
    Ok(Arc::new(CachedMerge {
        key,
        delta: Arc::new(delta),
        merge_ms: seconds * 1e3,
    }))
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The merge of `key` from the shared store, if there is one and it has it. A failed or refused
/// fetch is logged and counted; the caller then computes the merge.
async fn fetch_stored(store: Option<&MergeStore>, key: &MergeKey) -> Option<Arc<CachedMerge>> {
    let store = store?;
    match store.fetch(key).await {
        Ok(Some(fetched)) => {
            metrics::merge_store_fetch("fetched", Some(fetched.fetch_ms / 1e3));
            tracing::info!(key = %key, ms = fetched.fetch_ms, "fetched from the merge store");
            Some(Arc::new(CachedMerge {
                key: key.clone(),
                delta: Arc::new(fetched.delta),
                merge_ms: fetched.fetch_ms,
            }))
        }
        Ok(None) => {
            metrics::merge_store_fetch("absent", None);
            None
        }
        Err(e) => {
            metrics::merge_store_fetch("failed", None);
            tracing::warn!(key = %key, error = %e, "merge store fetch failed; computing");
            None
        }
    }
}

/// Writes a computed merge to the shared store (in the background: the request does not wait).
async fn save_stored(store: Arc<MergeStore>, merged: Arc<CachedMerge>) {
    let outcome = match store
        .save(&merged.key, merged.delta.clone(), merged.merge_ms)
        .await
    {
        Ok(true) => "written",
        Ok(false) => "present",
        Err(e) => {
            tracing::warn!(key = %merged.key, error = %e, "merge store write failed");
            "failed"
        }
    };
    metrics::merge_store_write(outcome);
}

/// Returns the heap's free pages to the operating system. A merge's transient buffers (dense
/// updates per adapter, SVD work) are large and freed at once; glibc keeps such freed memory in
/// its per-thread arenas, so without this the resident size grows with every burst of merges on
/// new blocking threads even though the cache stays within its budget.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own heap structures; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `try_get_with` shares one error among all waiters; each gets its own copy.
fn clone_error(e: &ApiError) -> ApiError {
    match e {
        ApiError::BadRequest { message, param } => ApiError::BadRequest {
            message: message.clone(),
            param: param.clone(),
        },
        ApiError::Internal { cause } => ApiError::Internal {
            cause: cause.clone(),
        },
        other => ApiError::internal(other),
    }
}
