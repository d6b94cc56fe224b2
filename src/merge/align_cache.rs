//! The alignment cache: the SVD work of a set, per module — KnOTS' shared basis and aligned
//! coordinates, or Core Space's bases and core matrices — keyed by the member adapters' content
//! digests and the module, and weighed in bytes. A merge that changes only λ, the weights,
//! density, DARE's p and seed, isotropize or the method within a family reuses it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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
            Self::Knots(a) => a.u.bytes() + a.reps.iter().map(|r| r.bytes()).sum::<usize>(),
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

/// Counters since the cache was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AlignmentStats {
    pub hits: u64,
    pub misses: u64,
    pub bytes: u64,
    pub entries: u64,
}

/// A byte-bounded cache of module alignments, shared by every merge that is given it.
pub struct AlignmentCache {
    entries: Cache<AlignKey, Arc<Aligned>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl AlignmentCache {
    pub fn new(max_bytes: u64) -> Self {
        let entries = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k: &AlignKey, v: &Arc<Aligned>| u32::try_from(v.bytes()).unwrap_or(u32::MAX))
            .build();
        Self {
            entries,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
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

    pub fn stats(&self) -> AlignmentStats {
        self.entries.run_pending_tasks();
        AlignmentStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            bytes: self.entries.weighted_size(),
            entries: self.entries.entry_count(),
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
