//! Statistics for the scaling experiment: which k-of-n task combinations to merge, and the mean
//! with a 95% confidence interval over them.
//!
//! The interval is Student's t: mean ± t(0.975, n−1)·s/√n with the sample standard deviation s.
//! The combinations are few (often 5–20), where a bootstrap interval is too narrow; t is the
//! usual choice for a mean over a handful of independent draws.
//!
//! Step in the data flow: after each combination's merged model has been scored.

use std::collections::BTreeSet;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::EvalError;

/// A mean with its 95% confidence interval.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct MeanCi {
    pub mean: f64,
    pub lo: f64,
    pub hi: f64,
    /// Number of values; with one value the interval has zero width.
    pub n: usize,
}

/// Mean and Student-t 95% interval of `values`.
pub fn mean_ci95(values: &[f64]) -> Result<MeanCi, EvalError> {
    let n = values.len();
    if n == 0 {
        return Err(EvalError::metric("confidence interval", "no values"));
    }
    if values.iter().any(|v| !v.is_finite()) {
        return Err(EvalError::metric(
            "confidence interval",
            "a value is not finite",
        ));
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return Ok(MeanCi {
            mean,
            lo: mean,
            hi: mean,
            n,
        });
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let half = t975(n - 1) * (var / n as f64).sqrt();
    Ok(MeanCi {
        mean,
        lo: mean - half,
        hi: mean + half,
        n,
    })
}

/// Two-sided 95% quantile of Student's t with `df` degrees of freedom (`df >= 1`): a table up
/// to 30, then the Cornish–Fisher expansion (error below 1e-4 there).
pub fn t975(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010,
        2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739,
        2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
    ];
    if let Some(&t) = TABLE.get(df.max(1) - 1) {
        return t;
    }
    let z = 1.959_963_984_540_054_f64;
    let v = df as f64;
    z + (z.powi(3) + z) / (4.0 * v)
        + (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / (96.0 * v * v)
        + (3.0 * z.powi(7) + 19.0 * z.powi(5) + 17.0 * z.powi(3) - 15.0 * z) / (384.0 * v.powi(3))
}

/// Number of k-subsets of n items (saturating).
pub fn binomial(n: usize, k: usize) -> u128 {
    if k > n {
        return 0;
    }
    let k = k.min(n - k);
    (0..k).fold(1u128, |acc, i| {
        acc.saturating_mul((n - i) as u128) / (i as u128 + 1)
    })
}

/// Up to `count` distinct k-of-n combinations (each sorted ascending): all of them, in
/// lexicographic order, when there are at most `count`; otherwise `count` drawn uniformly from a
/// ChaCha8 stream seeded by `seed`, in the order drawn.
pub fn combinations(n: usize, k: usize, count: usize, seed: u64) -> Vec<Vec<usize>> {
    if k == 0 || k > n || count == 0 {
        return Vec::new();
    }
    if binomial(n, k) <= count as u128 {
        return all_combinations(n, k);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let mut pick = rand::seq::index::sample(&mut rng, n, k).into_vec();
        pick.sort_unstable();
        if seen.insert(pick.clone()) {
            out.push(pick);
        }
    }
    out
}

fn all_combinations(n: usize, k: usize) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    let mut current: Vec<usize> = (0..k).collect();
    loop {
        out.push(current.clone());
        // Advance the rightmost index that can still move.
        let Some(i) = (0..k).rev().find(|&i| current[i] < n - k + i) else {
            return out;
        };
        current[i] += 1;
        for j in i + 1..k {
            current[j] = current[j - 1] + 1;
        }
    }
}
