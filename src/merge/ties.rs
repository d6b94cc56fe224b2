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
use crate::wide::wide_fn;

/// Per-adapter representations of every module, produced on demand.
pub(crate) trait RepSource: Sync {
    fn module_count(&self) -> usize;
    /// The length of each adapter's representation of module `m`.
    fn module_len(&self, m: usize) -> usize;
    /// Adapter `i`'s representation of module `m`, or `None` when it does not update `m` (zeros).
    fn rep(&self, i: usize, m: usize) -> Option<Cow<'_, [f32]>>;
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
    let n = ties.weights.len();
    progress.start("trimming", n as u64);
    let thresholds: Vec<f32> = (0..n)
        .into_par_iter()
        .map(|i| {
            let t = trim_threshold(src, i, ties.density);
            progress.advance(1);
            t
        })
        .collect();

    progress.start("merging", src.module_count() as u64);
    let weights: Vec<f32> = ties.weights.iter().map(|&w| w as f32).collect();
    let mut modules: Vec<MergedModule> = (0..src.module_count())
        .into_par_iter()
        .map(|m| {
            let reps: Vec<_> = (0..n).map(|i| src.rep(i, m)).collect();
            let merged = merge_entries(&reps, &thresholds, &weights, src.module_len(m));
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
    let mut zeros = 0;
    for m in 0..src.module_count() {
        match src.rep(i, m) {
            Some(rep) => parts.push(rep),
            None => zeros += src.module_len(m),
        }
    }
    if rank < zeros {
        return 0.0;
    }
    let parts: Vec<&[f32]> = parts.iter().map(|p| p.as_ref()).collect();
    nth_magnitude(&parts, rank - zeros)
}

/// The `rank`-th smallest (0-based) `|x|` over all values of `parts`, in the order of
/// `f32::total_cmp`.
///
/// The bit patterns of non-negative floats sort like their values, so one counting pass over
/// the top bits of `|x|` (exponent and five mantissa bits: 8192 buckets, a table that stays in
/// L1) finds the bucket that holds the answer, and only that bucket is selected in; the values
/// are read in place, never copied whole.
fn nth_magnitude(parts: &[&[f32]], rank: usize) -> f32 {
    let mut counts = vec![0u32; 1 << (31 - SHIFT)];
    for part in parts {
        count_buckets(part, &mut counts);
    }
    let mut before = 0;
    let mut bucket = 0;
    for (b, &count) in counts.iter().enumerate() {
        if before + count as usize > rank {
            bucket = b as u32;
            break;
        }
        before += count as usize;
    }
    let mut inside: Vec<u32> = Vec::with_capacity(counts[bucket as usize] as usize);
    for part in parts {
        collect_bucket(part, bucket, &mut inside);
    }
    let (_, nth, _) = inside.select_nth_unstable(rank - before);
    f32::from_bits(*nth)
}

/// `|x|`'s bits are `x`'s without the sign bit; [`nth_magnitude`]'s buckets are their top bits.
const MAGNITUDE: u32 = 0x7fff_ffff;
const SHIFT: u32 = 18;

wide_fn! {
    /// Appends to `inside` the `|x|` bits of every value of `values` in bucket `bucket`. Few
    /// values are, so sixteen at a time are first tested together, with vector compares.
    fn collect_bucket(values: &[f32], bucket: u32, inside: &mut Vec<u32>) {
        for chunk in values.chunks(16) {
            let mut hit = false;
            for &x in chunk {
                hit |= (x.to_bits() & MAGNITUDE) >> SHIFT == bucket;
            }
            if hit {
                for &x in chunk {
                    let bits = x.to_bits() & MAGNITUDE;
                    if bits >> SHIFT == bucket {
                        inside.push(bits);
                    }
                }
            }
        }
    }
}

/// Adds to `counts[b]` how many values of `values` have `|x|`'s top bits `b` (see
/// [`nth_magnitude`]).
fn count_buckets(values: &[f32], counts: &mut [u32]) {
    for &x in values {
        let b = ((x.to_bits() & MAGNITUDE) >> SHIFT) as usize;
        if let Some(c) = counts.get_mut(b) {
            *c += 1;
        }
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
    fn the_bucketed_selection_agrees_with_sorting() {
        let mut state = 7u32;
        let values: Vec<f32> = (0..5000)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                // Spread over many octaves, with repeats and zeros.
                let x = (state % 1000) as f32 * 10f32.powi((state % 9) as i32 - 6);
                if i % 7 == 0 { 0.0 } else { x }
            })
            .collect();
        let mut sorted = values.clone();
        sorted.sort_by(f32::total_cmp);
        for rank in [0, 1, 713, 714, 2500, 4998, 4999] {
            assert_eq!(nth_magnitude(&[&values], rank), sorted[rank], "rank {rank}");
            let (a, b) = values.split_at(1234);
            let negated: Vec<f32> = b.iter().map(|x| -x).collect();
            assert_eq!(
                nth_magnitude(&[a, &negated], rank),
                sorted[rank],
                "rank {rank}"
            );
        }
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
