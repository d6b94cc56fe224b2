//! TIES on per-adapter representations (dense updates, or KnOTS-aligned coordinates): trim per
//! adapter globally across all modules, weight, elect a sign per entry, disjoint mean, scale by λ.
//!
//! Two passes over the modules: first each adapter's trim threshold over its whole flattened
//! representation (a selection, not a sort), then the merge module by module. The rare entry
//! whose values cancel exactly takes the sign of the sum of all elected signs, known only at the
//! end; such entries are patched afterwards.

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
    let mut modules: Vec<MergedModule> = (0..src.module_count())
        .into_par_iter()
        .map(|m| {
            let reps: Vec<_> = (0..n).map(|i| src.rep(i, m)).collect();
            let merged = merge_entries(&reps, thresholds, &weights, src.module_len(m));
            progress.advance(1);
            merged
        })
        .collect();

    let sign_sum: i64 = modules.iter().map(|m| m.sign_sum).sum();
    let lambda = ties.lambda as f32;
    for module in &mut modules {
        for &(j, pos_mean, neg_mean) in &module.undecided {
            // The reference keeps positive values only when the elected sign is > 0.
            module.values[j] = if sign_sum > 0 { pos_mean } else { neg_mean };
        }
        module.values.iter_mut().for_each(|x| *x *= lambda);
    }
    modules.into_iter().map(|m| m.values).collect()
}

/// The trim threshold `t_i`: the `(D − ⌊D·d⌋)`-th smallest `|x|` over adapter `i`'s whole
/// representation (length `D`); entries with `|x| ≥ t_i` are kept. `0` keeps everything.
pub(crate) fn trim_threshold(src: &impl RepSource, i: usize, density: f64) -> f32 {
    let total: usize = (0..src.module_count()).map(|m| src.module_len(m)).sum();
    let keep = (total as f64 * density).floor() as usize;
    if keep >= total {
        return 0.0;
    }
    let rank = total - keep - 1;
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
    if rank < zeros {
        return 0.0;
    }
    let parts: Vec<&[f32]> = parts.iter().map(|p| p.as_ref()).collect();
    match histograms.into_iter().collect::<Option<Vec<_>>>() {
        Some(histograms) => {
            let mut counts = magnitude::empty_counts();
            histograms.iter().for_each(|h| h.add_to(&mut counts));
            magnitude::nth_magnitude_counted(&parts, rank - zeros, &counts)
        }
        None => magnitude::nth_magnitude(&parts, rank - zeros),
    }
}

struct MergedModule {
    values: Vec<f32>,
    /// Σ sign(Σ_i x_i) over this module's entries.
    sign_sum: i64,
    /// Entries whose sum is exactly zero with nonzero terms: (index, mean of the positive
    /// values, mean of the negative values).
    undecided: Vec<(usize, f32, f32)>,
}

fn merge_entries(
    reps: &[Option<Cow<'_, [f32]>>],
    thresholds: &[f32],
    weights: &[f32],
    len: usize,
) -> MergedModule {
    // Entries are taken a block at a time, so the running sums stay in L1 while every adapter's
    // part of the block is added to them.
    let present: Vec<(&[f32], f32, f32)> = reps
        .iter()
        .zip(thresholds.iter().zip(weights))
        .filter_map(|(rep, (&t, &w))| rep.as_deref().map(|r| (r, t, w)))
        .collect();
    let mean = |sum: f32, count: u32| sum / count.max(1) as f32;
    let mut values = vec![0.0f32; len];
    let mut sign_sum = 0i64;
    let mut undecided = Vec::new();
    for (b, out) in values.chunks_mut(BLOCK).enumerate() {
        let start = b * BLOCK;
        let n = out.len();
        // Per entry: the sum, and the sums and counts of the positive and negative kept values,
        // accumulated adapter by adapter (the same order, so the same sums, as entry by entry).
        let mut block = Block::new();
        for &(rep, t, w) in &present {
            add_kept(&rep[start..start + n], t, w, block.sums(n));
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
    MergedModule {
        values,
        sign_sum,
        undecided,
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
