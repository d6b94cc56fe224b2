//! The merge cache: `MergeKey` → merged delta, weighed in bytes. Concurrent requests for the
//! same uncached set share one merge (`try_get_with`); the merge itself runs on a blocking
//! thread, never on an async worker. Beside it, the alignment cache keeps each set's SVD work
//! per module, so a merge that changes only λ, density, p or the method within a family skips it.
//!
//! An entry weighs every copy of its delta: the host factors or dense matrices and the copy the
//! backend converted for its model. Eviction frees both: after each merge the cache applies its
//! pending evictions and asks the backend to drop conversions of deltas nobody holds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use moka::future::Cache;

use super::backend::Backend;
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
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Coalesced => "coalesced",
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
}

/// Merges computed at once: the machine's cores.
fn merge_slots() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

impl MergeCache {
    /// A cache of up to `max_bytes` of merged deltas (with `backend`'s converted copies) and
    /// `alignment_bytes` of alignments.
    pub fn new(max_bytes: u64, alignment_bytes: u64, backend: Arc<dyn Backend>) -> Self {
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
        let computed = Arc::new(AtomicBool::new(false));
        let flag = computed.clone();
        let merge_key = key.clone();
        let alignments = self.alignments.clone();
        let merging = self.merging.clone();
        let device = self.backend.merge_device();
        let entry = self
            .cache
            .try_get_with(key, async move {
                flag.store(true, Ordering::SeqCst);
                let _slot = merging
                    .acquire_owned()
                    .await
                    .map_err(|e| ApiError::internal(format!("merge slots closed: {e}")))?;
                tokio::task::spawn_blocking(move || {
                    let merged =
                        run_merge(merge_key, &members, &params, &alignments, device.as_ref());
                    release_free_memory();
                    merged
                })
                .await
                .map_err(|e| ApiError::internal(format!("merge task failed: {e}")))?
            })
            .await
            .map_err(|e: Arc<ApiError>| clone_error(&e))?;
        if computed.load(Ordering::SeqCst) {
            self.release_evicted().await;
        }
        let outcome = if computed.load(Ordering::SeqCst) {
            Outcome::Miss
        } else if present {
            Outcome::Hit
        } else {
            Outcome::Coalesced
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
