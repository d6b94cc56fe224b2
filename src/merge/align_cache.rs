//! The alignment cache: the SVD work of a set, per module — KnOTS' shared basis and aligned
//! coordinates, or Core Space's bases and core matrices — keyed by the member adapters' content
//! digests and the module, and weighed in bytes. A merge that changes only λ, the weights,
//! density, DARE's p and seed, isotropize or the method within a family reuses it.
//!
//! Beside it, KnOTS-TIES' trim thresholds per set and density: a merge that changes only λ or
//! the weights (which apply after the trim) skips the selection too. An entry counts only with
//! the very alignments it was computed from (held weakly): once one of them has been evicted
//! and computed again, the thresholds are computed again with it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use moka::sync::Cache;

use super::MergeError;
use super::align::Alignment;
use super::core::CoreBasis;
use crate::adapters::AdapterDigest;

/// Which alignment a family of methods needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Family {
    Knots,
    /// Core Space with singular-vector bases (TIES).
    CoreSingular,
    /// Core Space with any orthonormal bases (TA, TSV-M, Iso-C, Iso-CTS).
    Core,
}

/// A module's alignment, as either family computes it.
#[derive(Debug)]
pub(crate) enum Aligned {
    Knots(Alignment),
    Core(CoreBasis),
}

impl Aligned {
    /// The KnOTS alignment. The cache key holds the family, so a KnOTS key finds only these.
    pub fn knots(&self) -> &Alignment {
        match self {
            Self::Knots(a) => a,
            Self::Core(_) => unreachable!("a KnOTS key holds a KnOTS alignment"),
        }
    }

    /// The Core Space basis (see [`Aligned::knots`]).
    pub fn core(&self) -> &CoreBasis {
        match self {
            Self::Core(c) => c,
            Self::Knots(_) => unreachable!("a Core Space key holds a core basis"),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Self::Knots(a) => a.bytes(),
            Self::Core(c) => c.bytes(),
        }
    }
}

/// The members of one module, in plan order, by content digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct AlignKey {
    pub family: Family,
    pub module: String,
    pub members: Vec<AdapterDigest>,
}

/// A set of module alignments (every module's [`AlignKey`], hashed) and a TIES density.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct TrimKey {
    pub set: [u8; 32],
    pub density: u64,
}

/// Trim thresholds and the alignments they were computed from.
struct Trims {
    from: Vec<Weak<Aligned>>,
    thresholds: Arc<Vec<f32>>,
}

/// Threshold sets kept at most (a few floats each).
const TRIM_ENTRIES: u64 = 4096;

/// Counters since the cache was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AlignmentStats {
    pub hits: u64,
    pub misses: u64,
    pub bytes: u64,
    pub entries: u64,
    /// KnOTS-TIES merges that found their trim thresholds (see the module docs).
    pub trim_hits: u64,
    pub trim_misses: u64,
}

/// A byte-bounded cache of module alignments, shared by every merge that is given it.
pub struct AlignmentCache {
    entries: Cache<AlignKey, Arc<Aligned>>,
    trims: Cache<TrimKey, Arc<Trims>>,
    hits: AtomicU64,
    misses: AtomicU64,
    trim_hits: AtomicU64,
    trim_misses: AtomicU64,
}

impl AlignmentCache {
    pub fn new(max_bytes: u64) -> Self {
        let entries = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k: &AlignKey, v: &Arc<Aligned>| u32::try_from(v.bytes()).unwrap_or(u32::MAX))
            .build();
        Self {
            entries,
            trims: Cache::new(TRIM_ENTRIES),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            trim_hits: AtomicU64::new(0),
            trim_misses: AtomicU64::new(0),
        }
    }

    /// The cached alignment under `key`, or `compute`'s, stored for next time.
    pub(crate) fn get_or_compute(
        &self,
        key: AlignKey,
        compute: impl FnOnce() -> Result<Aligned, MergeError>,
    ) -> Result<Arc<Aligned>, MergeError> {
        if let Some(found) = self.entries.get(&key) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(found);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let computed = Arc::new(compute()?);
        self.entries.insert(key, computed.clone());
        Ok(computed)
    }

    /// The trim thresholds under `key` when they were computed from exactly `aligned`, else
    /// `compute`'s, stored for next time, with what else `compute` made (a merge that found the
    /// thresholds on the way).
    pub(crate) fn trims_or_compute<R>(
        &self,
        key: TrimKey,
        aligned: &[Arc<Aligned>],
        compute: impl FnOnce() -> (Vec<f32>, Option<R>),
    ) -> (Arc<Vec<f32>>, Option<R>) {
        if let Some(found) = self.trims.get(&key) {
            let same = found.from.len() == aligned.len()
                && (found.from.iter().zip(aligned))
                    .all(|(w, a)| std::ptr::eq(w.as_ptr(), Arc::as_ptr(a)) && w.strong_count() > 0);
            if same {
                self.trim_hits.fetch_add(1, Ordering::Relaxed);
                return (found.thresholds.clone(), None);
            }
        }
        self.trim_misses.fetch_add(1, Ordering::Relaxed);
        let (thresholds, made) = compute();
        let thresholds = Arc::new(thresholds);
        let from = aligned.iter().map(Arc::downgrade).collect();
        self.trims.insert(
            key,
            Arc::new(Trims {
                from,
                thresholds: thresholds.clone(),
            }),
        );
        (thresholds, made)
    }

    pub fn stats(&self) -> AlignmentStats {
        self.entries.run_pending_tasks();
        AlignmentStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            bytes: self.entries.weighted_size(),
            entries: self.entries.entry_count(),
            trim_hits: self.trim_hits.load(Ordering::Relaxed),
            trim_misses: self.trim_misses.load(Ordering::Relaxed),
        }
    }
}

impl std::fmt::Debug for AlignmentCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignmentCache")
            .field("stats", &self.stats())
            .finish()
    }
}
