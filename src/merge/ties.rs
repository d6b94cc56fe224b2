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
    let mut magnitudes = Vec::new();
    let mut zeros = 0;
    for m in 0..src.module_count() {
        match src.rep(i, m) {
            Some(rep) => magnitudes.extend(rep.iter().map(|x| x.abs())),
            None => zeros += src.module_len(m),
        }
    }
    if rank < zeros {
        return 0.0;
    }
    nth_magnitude(&magnitudes, rank - zeros)
}

/// The `rank`-th smallest (0-based) of `magnitudes` (all ≥ 0), in the order of `f32::total_cmp`.
///
/// The bit patterns of non-negative floats sort like their values, so one counting pass over
/// the top 16 bits finds the bucket that holds the answer, and only that bucket is selected in.
fn nth_magnitude(magnitudes: &[f32], rank: usize) -> f32 {
    const SHIFT: u32 = 16;
    let mut counts = vec![0usize; 1 << (32 - SHIFT)];
    for &x in magnitudes {
        counts[(x.to_bits() >> SHIFT) as usize] += 1;
    }
    let mut before = 0;
    let mut bucket = 0;
    for (b, &count) in counts.iter().enumerate() {
        if before + count > rank {
            bucket = b;
            break;
        }
        before += count;
    }
    let mut inside: Vec<u32> = magnitudes
        .iter()
        .map(|x| x.to_bits())
        .filter(|bits| (bits >> SHIFT) as usize == bucket)
        .collect();
    let (_, nth, _) = inside.select_nth_unstable(rank - before);
    f32::from_bits(*nth)
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
    // Per entry: the sum, and the sums and counts of the positive and negative kept values,
    // accumulated adapter by adapter (the same order, so the same sums, as entry by entry).
    let mut total = vec![0.0f32; len];
    let (mut pos, mut neg) = (vec![0.0f32; len], vec![0.0f32; len]);
    let (mut pos_n, mut neg_n) = (vec![0u32; len], vec![0u32; len]);
    let present = reps
        .iter()
        .zip(thresholds.iter().zip(weights))
        .filter_map(|(rep, (&t, &w))| rep.as_deref().map(|r| (r, t, w)));
    for (rep, t, w) in present {
        let entries = rep
            .iter()
            .zip(total.iter_mut())
            .zip(pos.iter_mut().zip(neg.iter_mut()))
            .zip(pos_n.iter_mut().zip(neg_n.iter_mut()));
        for (((&x, total), (pos, neg)), (pos_n, neg_n)) in entries {
            let kept = if x.abs() >= t { w * x } else { 0.0 };
            *total += kept;
            *pos += kept.max(0.0);
            *neg += kept.min(0.0);
            *pos_n += u32::from(kept > 0.0);
            *neg_n += u32::from(kept < 0.0);
        }
    }
    // Disjoint mean: the sum over max(1, count).
    let mean = |sum: f32, count: u32| sum / count.max(1) as f32;
    let mut values = vec![0.0f32; len];
    let mut sign_sum = 0i64;
    let mut undecided = Vec::new();
    for (j, out) in values.iter_mut().enumerate() {
        if total[j] > 0.0 {
            sign_sum += 1;
            *out = mean(pos[j], pos_n[j]);
        } else if total[j] < 0.0 {
            sign_sum -= 1;
            *out = mean(neg[j], neg_n[j]);
        } else if pos_n[j] + neg_n[j] > 0 {
            undecided.push((j, mean(pos[j], pos_n[j]), mean(neg[j], neg_n[j])));
        }
    }
    MergedModule {
        values,
        sign_sum,
        undecided,
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
            assert_eq!(nth_magnitude(&values, rank), sorted[rank], "rank {rank}");
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
