//! TIES on per-adapter representations (dense updates, or KnOTS-aligned coordinates): trim per
//! adapter globally across all modules, weight, elect a sign per entry, disjoint mean, scale by λ.
//!
//! Two passes over the modules: first each adapter's trim threshold over its whole flattened
//! representation (a selection, not a sort), then the merge module by module. Where every
//! module's magnitude histogram is known (KnOTS' cached alignments), one pass does: see
//! [`ties_merge_counted`]. The rare entry whose values cancel exactly takes the sign of the sum
//! of all elected signs, known only at the end; such entries are patched afterwards.

use std::borrow::Cow;

use rayon::prelude::*;

use super::Progress;
use super::magnitude::{self, Histogram};
use crate::wide::wide_fn;

/// Per-adapter representations of every module, produced on demand.
pub(crate) trait RepSource: Sync {
    fn module_count(&self) -> usize;
    /// The length of each adapter's representation of module `m`.
    fn module_len(&self, m: usize) -> usize;
    /// Adapter `i`'s representation of module `m`, or `None` when it does not update `m` (zeros).
    fn rep(&self, i: usize, m: usize) -> Option<Cow<'_, [f32]>>;
    /// The magnitude histogram of [`rep`](Self::rep)`(i, m)` when it is known without a pass
    /// over the values (counted when the representation was made).
    fn histogram(&self, _i: usize, _m: usize) -> Option<&Histogram> {
        None
    }
    /// Whether [`histogram`](Self::histogram) is known for every representation.
    fn has_histograms(&self) -> bool {
        false
    }
}

/// TIES settings: the kept fraction, λ and the per-adapter weights (in plan order).
pub(crate) struct Ties {
    pub density: f64,
    pub lambda: f64,
    pub weights: Vec<f64>,
}

/// Merges every module of `src`; returns one merged vector per module, already scaled by λ.
pub(crate) fn ties_merge(
    src: &impl RepSource,
    ties: &Ties,
    progress: &dyn Progress,
) -> Vec<Vec<f32>> {
    if let Some((_, merged)) = ties_merge_counted(src, ties, progress) {
        return merged;
    }
    let thresholds = trim_thresholds(src, ties.weights.len(), ties.density, progress);
    ties_merge_trimmed(src, ties, &thresholds, progress)
}

/// Every adapter's trim threshold ([`trim_threshold`]) for the `n` adapters of `src`.
pub(crate) fn trim_thresholds(
    src: &impl RepSource,
    n: usize,
    density: f64,
    progress: &dyn Progress,
) -> Vec<f32> {
    progress.start("trimming", n as u64);
    (0..n)
        .into_par_iter()
        .map(|i| {
            let t = trim_threshold(src, i, density);
            progress.advance(1);
            t
        })
        .collect()
}

/// [`ties_merge`] with each adapter's trim threshold already known (from [`trim_thresholds`]
/// at `ties.density`).
pub(crate) fn ties_merge_trimmed(
    src: &impl RepSource,
    ties: &Ties,
    thresholds: &[f32],
    progress: &dyn Progress,
) -> Vec<Vec<f32>> {
    let n = ties.weights.len();
    assert_eq!(thresholds.len(), n, "one trim threshold per adapter");

    progress.start("merging", src.module_count() as u64);
    let weights: Vec<f32> = ties.weights.iter().map(|&w| w as f32).collect();
    let none = vec![None; n];
    let modules: Vec<MergedModule> = (0..src.module_count())
        .into_par_iter()
        .map(|m| {
            let reps: Vec<_> = (0..n).map(|i| src.rep(i, m)).collect();
            let (merged, _) = merge_entries(&reps, thresholds, &weights, src.module_len(m), &none);
            progress.advance(1);
            merged
        })
        .collect();
    finish(modules, ties.lambda)
}

/// Patches the entries whose kept values cancel exactly with the sign of the sum of all elected
/// signs, and scales by λ.
fn finish(mut modules: Vec<MergedModule>, lambda: f64) -> Vec<Vec<f32>> {
    let sign_sum: i64 = modules.iter().map(|m| m.sign_sum).sum();
    let lambda = lambda as f32;
    for module in &mut modules {
        for &(j, pos_mean, neg_mean) in &module.undecided {
            // The reference keeps positive values only when the elected sign is > 0.
            module.values[j] = if sign_sum > 0 { pos_mean } else { neg_mean };
        }
        module.values.iter_mut().for_each(|x| *x *= lambda);
    }
    modules.into_iter().map(|m| m.values).collect()
}

/// Per adapter, the positions (within the module) and `|x|` bits of its values in one magnitude
/// bucket.
type BucketValues = Vec<Vec<(u32, u32)>>;

/// Where an adapter's trim threshold is, from the magnitude histograms alone.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// Known without looking at values: 0 keeps everything (density 1, or a threshold among the
    /// zeros of modules the adapter does not update).
    Known(f32),
    /// The `within`-th smallest (0-based) magnitude of the values in `bucket`.
    InBucket { bucket: u32, within: usize },
}

impl Cut {
    /// A threshold at or below the exact one that keeps nothing more than the bucket's values
    /// beside the exactly kept ones.
    fn floor(self) -> f32 {
        match self {
            Cut::Known(t) => t,
            Cut::InBucket { bucket, .. } => magnitude::bucket_floor(bucket),
        }
    }
}

/// Every adapter's [`Cut`] as [`trim_threshold`] defines the threshold; `None` unless every
/// representation's histogram is known.
fn cuts(src: &impl RepSource, n: usize, density: f64) -> Option<Vec<Cut>> {
    if !src.has_histograms() {
        return None;
    }
    let Some(rank) = trim_rank(src, density) else {
        return Some(vec![Cut::Known(0.0); n]);
    };
    (0..n)
        .map(|i| {
            let mut counts = magnitude::empty_counts();
            let mut zeros = 0;
            for m in 0..src.module_count() {
                match src.histogram(i, m) {
                    Some(h) => h.add_to(&mut counts),
                    None if src.rep(i, m).is_none() => zeros += src.module_len(m),
                    None => return None,
                }
            }
            Some(match rank.checked_sub(zeros) {
                Some(rank) => {
                    let (bucket, within) = magnitude::locate(&counts, rank);
                    Cut::InBucket { bucket, within }
                }
                None => Cut::Known(0.0),
            })
        })
        .collect()
}

/// [`ties_merge`] in one pass over the representations, when every one's magnitude histogram is
/// known (`None` otherwise); also returns each adapter's trim threshold.
///
/// The histograms say which bucket holds each threshold. The merge runs with each threshold at
/// its bucket's floor, which keeps the exactly kept values and that bucket's values below the
/// threshold, and collects the bucket's values with their positions on the way (few, and read
/// while in L1). The exact thresholds are then selected among those, and only the entries where
/// a value below its threshold was kept are merged again. The result is the two-pass merge's to
/// the bit: each entry's sums run over the adapters in the same order either way.
pub(crate) fn ties_merge_counted(
    src: &impl RepSource,
    ties: &Ties,
    progress: &dyn Progress,
) -> Option<(Vec<f32>, Vec<Vec<f32>>)> {
    let n = ties.weights.len();
    let cuts = cuts(src, n, ties.density)?;
    let floors: Vec<f32> = cuts.iter().map(|c| c.floor()).collect();
    let buckets: Vec<Option<u32>> = (cuts.iter())
        .map(|c| match c {
            Cut::InBucket { bucket, .. } => Some(*bucket),
            Cut::Known(_) => None,
        })
        .collect();
    let weights: Vec<f32> = ties.weights.iter().map(|&w| w as f32).collect();

    progress.start("merging", src.module_count() as u64);
    let first: Vec<(MergedModule, BucketValues)> = (0..src.module_count())
        .into_par_iter()
        .map(|m| {
            let reps: Vec<_> = (0..n).map(|i| src.rep(i, m)).collect();
            let merged = merge_entries(&reps, &floors, &weights, src.module_len(m), &buckets);
            progress.advance(1);
            merged
        })
        .collect();

    let thresholds: Vec<f32> = (cuts.iter().enumerate())
        .map(|(i, cut)| match *cut {
            Cut::Known(t) => t,
            Cut::InBucket { within, .. } => {
                let mut bits: Vec<u32> = (first.iter())
                    .flat_map(|(_, inside)| inside[i].iter().map(|&(_, b)| b))
                    .collect();
                let (_, nth, _) = bits.select_nth_unstable(within);
                f32::from_bits(*nth)
            }
        })
        .collect();

    let modules: Vec<MergedModule> = (first.into_par_iter().enumerate())
        .map(|(m, (mut merged, inside))| {
            let mut redo: Vec<usize> = (inside.iter().zip(&thresholds))
                .flat_map(|(values, t)| {
                    let t = t.to_bits();
                    values.iter().filter(move |v| v.1 < t).map(|v| v.0 as usize)
                })
                .collect();
            if !redo.is_empty() {
                redo.sort_unstable();
                redo.dedup();
                let reps: Vec<_> = (0..n).map(|i| src.rep(i, m)).collect();
                let exact = present(&reps, &thresholds, &weights);
                let provisional = present(&reps, &floors, &weights);
                merged.redo(&redo, &provisional, &exact);
            }
            merged
        })
        .collect();
    Some((thresholds, finish(modules, ties.lambda)))
}

/// The trim threshold `t_i`: the `(D − ⌊D·d⌋)`-th smallest `|x|` over adapter `i`'s whole
/// representation (length `D`); entries with `|x| ≥ t_i` are kept. `0` keeps everything.
pub(crate) fn trim_threshold(src: &impl RepSource, i: usize, density: f64) -> f32 {
    let Some(rank) = trim_rank(src, density) else {
        return 0.0;
    };
    let mut parts = Vec::new();
    let mut histograms = Vec::new();
    let mut zeros = 0;
    for m in 0..src.module_count() {
        match src.rep(i, m) {
            Some(rep) => {
                parts.push(rep);
                histograms.push(src.histogram(i, m));
            }
            None => zeros += src.module_len(m),
        }
    }
    // The zeros of modules the adapter does not update are the smallest magnitudes.
    let Some(rank) = rank.checked_sub(zeros) else {
        return 0.0;
    };
    let parts: Vec<&[f32]> = parts.iter().map(|p| p.as_ref()).collect();
    match histograms.into_iter().collect::<Option<Vec<_>>>() {
        Some(histograms) => {
            let mut counts = magnitude::empty_counts();
            histograms.iter().for_each(|h| h.add_to(&mut counts));
            magnitude::nth_magnitude_counted(&parts, rank, &counts)
        }
        None => magnitude::nth_magnitude(&parts, rank),
    }
}

/// The 0-based rank of the trim threshold among the `D` entries of one adapter's whole
/// representation (the `(D − ⌊D·d⌋)`-th smallest `|x|`), or `None` when `density` keeps every
/// entry.
fn trim_rank(src: &impl RepSource, density: f64) -> Option<usize> {
    let total: usize = (0..src.module_count()).map(|m| src.module_len(m)).sum();
    let keep = (total as f64 * density).floor() as usize;
    (keep < total).then(|| total - keep - 1)
}

/// A disjoint mean: `sum` over `max(1, count)`.
fn mean(sum: f32, count: u32) -> f32 {
    sum / count.max(1) as f32
}

struct MergedModule {
    values: Vec<f32>,
    /// Σ sign(Σ_i x_i) over this module's entries.
    sign_sum: i64,
    /// Entries whose sum is exactly zero with nonzero terms: (index, mean of the positive
    /// values, mean of the negative values).
    undecided: Vec<(usize, f32, f32)>,
}

/// Each present representation (adapters that update the module, in order) with its threshold
/// and weight.
fn present<'r>(
    reps: &'r [Option<Cow<'_, [f32]>>],
    thresholds: &[f32],
    weights: &[f32],
) -> Vec<(&'r [f32], f32, f32)> {
    reps.iter()
        .zip(thresholds.iter().zip(weights))
        .filter_map(|(rep, (&t, &w))| rep.as_deref().map(|r| (r, t, w)))
        .collect()
}

/// Merges one module's entries; with `buckets[i]` set, also collects the positions and `|x|`
/// bits of adapter `i`'s values in that magnitude bucket (one list per adapter).
fn merge_entries(
    reps: &[Option<Cow<'_, [f32]>>],
    thresholds: &[f32],
    weights: &[f32],
    len: usize,
    buckets: &[Option<u32>],
) -> (MergedModule, BucketValues) {
    // Entries are taken a block at a time, so the running sums stay in L1 while every adapter's
    // part of the block is added to them.
    let present = present(reps, thresholds, weights);
    // Beside each present representation: its adapter and the bucket to collect from it.
    let collect: Vec<(usize, Option<u32>)> = (0..reps.len())
        .filter(|&i| reps[i].is_some())
        .map(|i| (i, buckets[i]))
        .collect();
    let mut inside: BucketValues = vec![Vec::new(); reps.len()];
    let mut values = vec![0.0f32; len];
    let mut sign_sum = 0i64;
    let mut undecided = Vec::new();
    for (b, out) in values.chunks_mut(BLOCK).enumerate() {
        let start = b * BLOCK;
        let n = out.len();
        // Per entry: the sum, and the sums and counts of the positive and negative kept values,
        // accumulated adapter by adapter (the same order, so the same sums, as entry by entry).
        let mut block = Block::new();
        for (&(rep, t, w), &(i, bucket)) in present.iter().zip(&collect) {
            let part = &rep[start..start + n];
            add_kept(part, t, w, block.sums(n));
            if let Some(bucket) = bucket {
                magnitude::collect_bucket_at(part, start, bucket, &mut inside[i]);
            }
        }
        let sums = block.sums(n);
        let (signs, cancelled) = elect(&sums, out);
        sign_sum += signs;
        if cancelled {
            let Block {
                total,
                pos,
                neg,
                pos_n,
                neg_n,
            } = &block;
            for j in 0..n {
                if total[j] == 0.0 && pos_n[j] + neg_n[j] > 0 {
                    undecided.push((start + j, mean(pos[j], pos_n[j]), mean(neg[j], neg_n[j])));
                }
            }
        }
    }
    (
        MergedModule {
            values,
            sign_sum,
            undecided,
        },
        inside,
    )
}

/// One entry's sums over the present adapters, in order: as [`add_kept`] makes them.
fn entry_sums(present: &[(&[f32], f32, f32)], j: usize) -> (f32, f32, f32, u32, u32) {
    let (mut total, mut pos, mut neg, mut pos_n, mut neg_n) = (0f32, 0f32, 0f32, 0u32, 0u32);
    for &(rep, t, w) in present {
        let x = rep[j];
        let kept = if x.abs() >= t { w * x } else { 0.0 };
        total += kept;
        pos += kept.max(0.0);
        neg += kept.min(0.0);
        pos_n += u32::from(kept > 0.0);
        neg_n += u32::from(kept < 0.0);
    }
    (total, pos, neg, pos_n, neg_n)
}

impl MergedModule {
    /// Merges entries `redo` (sorted) again with the exact thresholds (`present`), where they
    /// were merged with `provisional` ones: their values, their part of the sign sum and their
    /// place among the undecided entries.
    fn redo(
        &mut self,
        redo: &[usize],
        provisional: &[(&[f32], f32, f32)],
        present: &[(&[f32], f32, f32)],
    ) {
        let sign = |total: f32| i64::from(total > 0.0) - i64::from(total < 0.0);
        self.undecided.retain(|u| redo.binary_search(&u.0).is_err());
        for &j in redo {
            let (old, ..) = entry_sums(provisional, j);
            let (total, pos, neg, pos_n, neg_n) = entry_sums(present, j);
            self.sign_sum += sign(total) - sign(old);
            let (positive, negative) = (mean(pos, pos_n), mean(neg, neg_n));
            self.values[j] = match sign(total) {
                1 => positive,
                -1 => negative,
                _ => 0.0,
            };
            if total == 0.0 && pos_n + neg_n > 0 {
                self.undecided.push((j, positive, negative));
            }
        }
    }
}

/// Entries per block of [`merge_entries`].
const BLOCK: usize = 1024;

/// The running sums of one block of entries (see [`BlockSums`]), zero at first.
struct Block {
    total: [f32; BLOCK],
    pos: [f32; BLOCK],
    neg: [f32; BLOCK],
    pos_n: [u32; BLOCK],
    neg_n: [u32; BLOCK],
}

impl Block {
    fn new() -> Self {
        Self {
            total: [0.0; BLOCK],
            pos: [0.0; BLOCK],
            neg: [0.0; BLOCK],
            pos_n: [0; BLOCK],
            neg_n: [0; BLOCK],
        }
    }

    /// The first `n` entries' sums.
    fn sums(&mut self, n: usize) -> BlockSums<'_> {
        BlockSums {
            total: &mut self.total[..n],
            pos: &mut self.pos[..n],
            neg: &mut self.neg[..n],
            pos_n: &mut self.pos_n[..n],
            neg_n: &mut self.neg_n[..n],
        }
    }
}

/// Running per-entry sums of one block: the sum of the kept values, and the sums and counts of
/// the positive and the negative ones.
struct BlockSums<'a> {
    total: &'a mut [f32],
    pos: &'a mut [f32],
    neg: &'a mut [f32],
    pos_n: &'a mut [u32],
    neg_n: &'a mut [u32],
}

wide_fn! {
    /// The elected sign's disjoint mean (the sum over max(1, count)) of every entry of a block
    /// into `out` (zero where the sum is zero); returns Σ sign(sum) and whether any entry's kept
    /// values cancel exactly (left zero here, see [`ties_merge`]).
    fn elect(sums: &BlockSums<'_>, out: &mut [f32]) -> (i64, bool) {
        let n = out.len().min(sums.total.len());
        let (total, pos, neg) = (&sums.total[..n], &sums.pos[..n], &sums.neg[..n]);
        let (pos_n, neg_n) = (&sums.pos_n[..n], &sums.neg_n[..n]);
        let out = &mut out[..n];
        let mut signs = 0i32;
        let mut cancelled = false;
        for j in 0..n {
            let up = total[j] > 0.0;
            let down = total[j] < 0.0;
            let positive = pos[j] / pos_n[j].max(1) as f32;
            let negative = neg[j] / neg_n[j].max(1) as f32;
            out[j] = if up { positive } else if down { negative } else { 0.0 };
            signs += i32::from(up) - i32::from(down);
            cancelled |= !up && !down && pos_n[j] + neg_n[j] > 0;
        }
        (i64::from(signs), cancelled)
    }
}

wide_fn! {
    /// Adds one adapter's kept values `w · x` (`|x| ≥ t`) of a block to its running sums.
    fn add_kept(rep: &[f32], t: f32, w: f32, sums: BlockSums<'_>) {
        let BlockSums { total, pos, neg, pos_n, neg_n } = sums;
        // One length for every slice, so the loop runs without bounds checks.
        let n = rep.len().min(total.len());
        let (rep, total, pos, neg) = (&rep[..n], &mut total[..n], &mut pos[..n], &mut neg[..n]);
        let (pos_n, neg_n) = (&mut pos_n[..n], &mut neg_n[..n]);
        for j in 0..n {
            let x = rep[j];
            let kept = if x.abs() >= t { w * x } else { 0.0 };
            total[j] += kept;
            pos[j] += kept.max(0.0);
            neg[j] += kept.min(0.0);
            pos_n[j] += u32::from(kept > 0.0);
            neg_n[j] += u32::from(kept < 0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::Silent;

    /// Representations given directly: `reps[m][i]`.
    struct Fixed(Vec<Vec<Option<Vec<f32>>>>);

    impl RepSource for Fixed {
        fn module_count(&self) -> usize {
            self.0.len()
        }
        fn module_len(&self, m: usize) -> usize {
            self.0[m].iter().flatten().map(Vec::len).next().unwrap_or(0)
        }
        fn rep(&self, i: usize, m: usize) -> Option<Cow<'_, [f32]>> {
            self.0[m][i].as_deref().map(Cow::Borrowed)
        }
    }

    /// [`Fixed`] with every representation's histogram counted up front.
    struct Counted(Fixed, Vec<Vec<Option<Histogram>>>);

    impl Counted {
        fn new(fixed: Fixed) -> Self {
            let histograms = (fixed.0.iter())
                .map(|m| m.iter().map(|r| r.as_deref().map(Histogram::of)).collect())
                .collect();
            Self(fixed, histograms)
        }
    }

    impl RepSource for Counted {
        fn module_count(&self) -> usize {
            self.0.module_count()
        }
        fn module_len(&self, m: usize) -> usize {
            self.0.module_len(m)
        }
        fn rep(&self, i: usize, m: usize) -> Option<Cow<'_, [f32]>> {
            self.0.rep(i, m)
        }
        fn histogram(&self, i: usize, m: usize) -> Option<&Histogram> {
            self.1[m][i].as_ref()
        }
        fn has_histograms(&self) -> bool {
            true
        }
    }

    /// Values with many repeats (ties at the thresholds, exact cancellations) and zeros, from a
    /// fixed pseudo-random sequence.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let r = (state >> 33) as u32;
                match r % 7 {
                    0 => 0.0,
                    1 => 0.25 * if r & 8 == 0 { 1.0 } else { -1.0 },
                    _ => (r % 20011) as f32 / 7919.0 - 1.26,
                }
            })
            .collect()
    }

    /// The one-pass merge gives the two-pass merge's thresholds and values to the bit: adapters
    /// missing modules, equal weights and unequal ones, densities from nothing kept to all.
    #[test]
    fn the_counted_merge_equals_the_two_pass_merge() {
        let lens = [3000, 1024, 517];
        let modules: Vec<Vec<Option<Vec<f32>>>> = (lens.iter().enumerate())
            .map(|(m, &len)| {
                (0..4)
                    .map(|i| (i + m != 4).then(|| values(len, (10 * m + i) as u64)))
                    .collect()
            })
            .collect();
        let counted = Counted::new(Fixed(modules));
        for density in [0.0, 0.05, 0.2, 0.5, 0.9, 1.0] {
            for weights in [[1.0, 1.0, 1.0, 1.0], [0.5, 2.0, 1.0, 0.3]] {
                let ties = Ties {
                    density,
                    lambda: 0.7,
                    weights: weights.to_vec(),
                };
                let thresholds = trim_thresholds(&counted.0, 4, density, &Silent);
                let two_pass = ties_merge_trimmed(&counted.0, &ties, &thresholds, &Silent);
                let (found, one_pass) =
                    ties_merge_counted(&counted, &ties, &Silent).expect("histograms known");
                assert_eq!(found, thresholds, "density {density}");
                let same = (one_pass.iter().flatten().zip(two_pass.iter().flatten()))
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "density {density}, weights {weights:?}");
            }
        }
        assert!(ties_merge_counted(&counted.0, &run_settings(), &Silent).is_none());
    }

    /// Entries merged again after the exact thresholds change the global sign sum (the first
    /// case: it falls from 1 to 0, so the cancelled entry takes the negative mean) and leave the
    /// undecided entries (the second: entry 0 cancels only with the value below the threshold).
    /// Adapter 0's values share one magnitude bucket, its threshold 1.01 (density 0.5).
    #[test]
    fn entries_merged_again_fix_the_sign_sum_and_the_undecided() {
        let cases = [
            ([1.02, 1.0, 1.01, -1.02], [-1.02, 0.0, 0.0, 0.0]),
            ([1.0, 1.02, 1.01, 1.03], [-1.0, 0.0, 0.0, 0.0]),
        ];
        let want = [[-1.02f32, 0.0, 1.01, -1.02], [-1.0, 1.02, 1.01, 1.03]];
        for ((a, b), want) in cases.iter().zip(want) {
            let fixed = Fixed(vec![vec![Some(a.to_vec()), Some(b.to_vec())]]);
            let (thresholds, merged) =
                ties_merge_counted(&Counted::new(fixed), &run_settings_for(2), &Silent).unwrap();
            assert_eq!(thresholds[0], 1.01);
            assert_eq!(merged, vec![want.to_vec()], "{a:?} {b:?}");
        }
    }

    fn run_settings_for(n: usize) -> Ties {
        Ties {
            density: 0.5,
            lambda: 1.0,
            weights: vec![1.0; n],
        }
    }

    fn run_settings() -> Ties {
        Ties {
            density: 0.5,
            lambda: 1.0,
            weights: vec![1.0; 4],
        }
    }

    fn run(src: &Fixed, density: f64, lambda: f64, weights: &[f64]) -> Vec<Vec<f32>> {
        ties_merge(
            src,
            &Ties {
                density,
                lambda,
                weights: weights.to_vec(),
            },
            &Silent,
        )
    }

    #[test]
    fn threshold_is_global_across_modules() {
        // One adapter, large values in module 0 only: D = 4, density 0.25 keeps ⌊1⌋ + 1 = 2.
        let src = Fixed(vec![
            vec![Some(vec![5.0, 4.0])],
            vec![Some(vec![1.0, -2.0])],
        ]);
        assert_eq!(trim_threshold(&src, 0, 0.25), 4.0);
        assert_eq!(
            run(&src, 0.25, 1.0, &[1.0]),
            vec![vec![5.0, 4.0], vec![0.0, 0.0]]
        );
        assert_eq!(trim_threshold(&src, 0, 0.5), 2.0);
    }

    #[test]
    fn ties_at_the_threshold_are_kept_and_density_one_keeps_all() {
        let src = Fixed(vec![vec![Some(vec![1.0, 1.0, 1.0, 0.5])]]);
        assert_eq!(run(&src, 0.25, 1.0, &[1.0]), vec![vec![1.0, 1.0, 1.0, 0.0]]);
        assert_eq!(trim_threshold(&src, 0, 1.0), 0.0);
    }

    #[test]
    fn missing_modules_count_as_zeros() {
        // Adapter 0 lacks module 1 (two zeros): D = 4, density 0.5 → the 2nd smallest |x| = 0.
        let src = Fixed(vec![
            vec![Some(vec![3.0, 1.0]), Some(vec![1.0, 1.0])],
            vec![None, Some(vec![2.0, 2.0])],
        ]);
        assert_eq!(trim_threshold(&src, 0, 0.5), 0.0);
        assert_eq!(trim_threshold(&src, 1, 0.5), 1.0);
    }

    #[test]
    fn sign_election_and_disjoint_mean() {
        // Entry 0: +3 and -1 → sign +, mean of {3} = 3. Entry 1: +1, -4, -2 → sign −, mean -3.
        let src = Fixed(vec![vec![
            Some(vec![3.0, 1.0]),
            Some(vec![-1.0, -4.0]),
            Some(vec![0.0, -2.0]),
        ]]);
        assert_eq!(run(&src, 1.0, 0.5, &[1.0, 1.0, 1.0]), vec![vec![1.5, -1.5]]);
    }

    #[test]
    fn weights_apply_after_the_trim() {
        let src = Fixed(vec![vec![Some(vec![1.0]), Some(vec![-1.0])]]);
        // Weighted: +2 and -1 → sign +, value 2.
        assert_eq!(run(&src, 1.0, 1.0, &[2.0, 1.0]), vec![vec![2.0]]);
    }

    #[test]
    fn exact_cancellation_takes_the_majority_sign() {
        // Entry 0 cancels exactly; entries 1 and 2 elect +, so entry 0 takes the positive mean.
        let src = Fixed(vec![vec![
            Some(vec![1.0, 1.0, 2.0]),
            Some(vec![-1.0, 0.0, 0.0]),
        ]]);
        assert_eq!(run(&src, 1.0, 1.0, &[1.0, 1.0]), vec![vec![1.0, 1.0, 2.0]]);
        // Majority negative: the negative mean.
        let src = Fixed(vec![vec![
            Some(vec![1.0, -1.0, -2.0]),
            Some(vec![-1.0, 0.0, 0.0]),
        ]]);
        assert_eq!(
            run(&src, 1.0, 1.0, &[1.0, 1.0]),
            vec![vec![-1.0, -1.0, -2.0]]
        );
    }
}
