//! Selecting the `n`-th smallest magnitude of many values without sorting or copying them: the
//! trim thresholds of TIES, over an adapter's whole representation.

use crate::wide::wide_fn;

/// The `rank`-th smallest (0-based) `|x|` over all values of `parts`, in the order of
/// `f32::total_cmp`.
///
/// The bit patterns of non-negative floats sort like their values, so one counting pass over
/// the top bits of `|x|` (exponent and eight mantissa bits: 65536 buckets, each 0.4% wide, a
/// table that stays in L2) finds the bucket that holds the answer, and only that bucket is
/// selected in; the values are read in place, never copied whole. The buckets are narrow so that
/// few values share the threshold's: a one-pass TIES merge (`ties::ties_merge_counted`) merges
/// those entries twice.
pub(crate) fn nth_magnitude(parts: &[&[f32]], rank: usize) -> f32 {
    let mut counts = empty_counts();
    for part in parts {
        count_buckets(part, &mut counts);
    }
    nth_magnitude_counted(parts, rank, &counts)
}

/// [`nth_magnitude`] with the bucket counts of `parts` already known (from [`Histogram`]s).
pub(crate) fn nth_magnitude_counted(parts: &[&[f32]], rank: usize, counts: &[u32]) -> f32 {
    let (bucket, within) = locate(counts, rank);
    let mut inside: Vec<u32> = Vec::with_capacity(counts[bucket as usize] as usize);
    for part in parts {
        collect_bucket(part, bucket, &mut inside);
    }
    let (_, nth, _) = inside.select_nth_unstable(within);
    f32::from_bits(*nth)
}

/// The bucket that holds the `rank`-th smallest magnitude of values with bucket counts `counts`,
/// and that magnitude's rank among the bucket's own values.
pub(crate) fn locate(counts: &[u32], rank: usize) -> (u32, usize) {
    let mut before = 0;
    for (b, &count) in counts.iter().enumerate() {
        if before + count as usize > rank {
            return (b as u32, rank - before);
        }
        before += count as usize;
    }
    (0, 0)
}

/// The smallest magnitude in `bucket`: every value of the bucket is at least this, every value of
/// a lower bucket below it.
pub(crate) fn bucket_floor(bucket: u32) -> f32 {
    f32::from_bits(bucket << SHIFT)
}

/// A zeroed table of every bucket's count.
pub(crate) fn empty_counts() -> Vec<u32> {
    vec![0u32; BUCKETS]
}

/// How many values of a slice fall in each bucket of [`nth_magnitude`], kept for the buckets
/// that hold any (a few thousand of the 65536 for one module's values): counted once where the
/// values are made, then added up for a selection instead of a pass over the values.
#[derive(Debug, Clone, Default)]
pub(crate) struct Histogram {
    buckets: Vec<(u16, u32)>,
}

impl Histogram {
    pub fn of(values: &[f32]) -> Self {
        let mut counts = empty_counts();
        count_buckets(values, &mut counts);
        let buckets = (counts.iter().enumerate())
            .filter(|(_, c)| **c > 0)
            .map(|(b, &c)| (b as u16, c))
            .collect();
        Self { buckets }
    }

    /// Adds these counts to a table from [`empty_counts`].
    pub fn add_to(&self, counts: &mut [u32]) {
        for &(b, c) in &self.buckets {
            counts[b as usize] += c;
        }
    }

    pub fn bytes(&self) -> usize {
        self.buckets.len() * std::mem::size_of::<(u16, u32)>()
    }
}

/// `|x|`'s bits are `x`'s without the sign bit; [`nth_magnitude`]'s buckets are their top bits.
const MAGNITUDE: u32 = 0x7fff_ffff;
const SHIFT: u32 = 15;
/// Buckets: every value of `|x|`'s bits above [`SHIFT`].
const BUCKETS: usize = 1 << (31 - SHIFT);

/// Calls `hit(i, bits)` with the index and `|x|` bits of every value of `values` in bucket
/// `bucket`. Few values are, so sixteen at a time are first tested together, with vector
/// compares.
#[inline(always)]
fn each_in_bucket(values: &[f32], bucket: u32, mut hit: impl FnMut(usize, u32)) {
    for (c, chunk) in values.chunks(16).enumerate() {
        let mut any = false;
        for &x in chunk {
            any |= (x.to_bits() & MAGNITUDE) >> SHIFT == bucket;
        }
        if any {
            for (i, &x) in chunk.iter().enumerate() {
                let bits = x.to_bits() & MAGNITUDE;
                if bits >> SHIFT == bucket {
                    hit(c * 16 + i, bits);
                }
            }
        }
    }
}

wide_fn! {
    /// Appends to `inside` the `|x|` bits of every value of `values` in bucket `bucket`.
    fn collect_bucket(values: &[f32], bucket: u32, inside: &mut Vec<u32>) {
        each_in_bucket(values, bucket, |_, bits| inside.push(bits));
    }
}

wide_fn! {
    /// Appends to `inside` the position (`offset` plus the index in `values`) and `|x|` bits of
    /// every value of `values` in bucket `bucket`.
    pub(crate) fn collect_bucket_at(
        values: &[f32],
        offset: usize,
        bucket: u32,
        inside: &mut Vec<(u32, u32)>,
    ) {
        each_in_bucket(values, bucket, |i, bits| inside.push(((offset + i) as u32, bits)));
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn histograms_give_the_counted_selection() {
        let mut next = crate::merge::test_values(3);
        let a: Vec<f32> = (0..3000).map(|_| next()).collect();
        let b: Vec<f32> = (0..1000).map(|_| next() * 1e-3).collect();
        let mut counts = empty_counts();
        Histogram::of(&a).add_to(&mut counts);
        Histogram::of(&b).add_to(&mut counts);
        for rank in [0, 999, 1000, 2500, 3999] {
            assert_eq!(
                nth_magnitude_counted(&[&a, &b], rank, &counts),
                nth_magnitude(&[&a, &b], rank)
            );
        }
    }
}
