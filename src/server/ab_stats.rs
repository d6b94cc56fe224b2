//! Statistics of experiment arms: summaries with 95% intervals, latency quantiles, and an
//! always-valid comparison of an arm's mean feedback with the control's.
//!
//! Feedback may be read at any time, so a fixed-horizon t-test would find differences that are
//! not there as often as it is looked at. The comparison is the mixture sequential probability
//! ratio test (mSPRT; Johari, Pekelis and Walsh, "Always valid inference", 2017) with a normal
//! mixture over the difference θ = mean(arm) − mean(control). With the observed difference θ̂,
//! its variance V = s²_arm/n_arm + s²_control/n_control and the mixing variance τ²:
//!
//! ```text
//! Λ = sqrt(V / (V + τ²)) · exp(θ̂² τ² / (2 V (V + τ²)))
//! p = min(1, 1/Λ)                       always valid: P(p ≤ α at any look | θ = 0) ≤ α
//! θ̂ ± sqrt((V (V + τ²) / τ²) · (2 ln(1/α) + ln((V + τ²) / V)))    a 1 − α confidence sequence
//! ```
//!
//! τ² is the pooled variance of the scores: the test is tuned to differences of about one
//! standard deviation, and only logarithmically sensitive to that choice. The p-value taken at
//! the current look only (not the running minimum over past looks) is larger, so still valid.

/// z for a two-sided 95% normal interval.
const Z95: f64 = 1.959_963_984_540_054;

/// The name of the comparison method, reported with its results.
pub const METHOD: &str = "mSPRT (normal mixture, tau^2 = pooled variance): always-valid p-value and 95% confidence sequence";

/// Count, mean and sample standard deviation of some scores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub n: u64,
    pub mean: f64,
    pub sd: f64,
}

impl Summary {
    pub fn of(values: &[f64]) -> Option<Self> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let var = if n > 1 {
            values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64
        } else {
            0.0
        };
        Some(Self {
            n: n as u64,
            mean,
            sd: var.sqrt(),
        })
    }

    /// The normal 95% interval of the mean.
    pub fn interval95(&self) -> (f64, f64) {
        let half = Z95 * self.sd / (self.n as f64).sqrt();
        (self.mean - half, self.mean + half)
    }
}

/// The `q` quantile (0..=1) of `values`, by linear interpolation between order statistics.
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let at = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * (at - lo as f64))
}

/// An arm's mean against the control's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    /// mean(arm) − mean(control).
    pub difference: f64,
    /// The 95% confidence sequence of the difference.
    pub interval: (f64, f64),
    /// The always-valid p-value of "no difference".
    pub p_value: f64,
}

/// The mSPRT comparison of `arm` with `control` at level `alpha`; `None` until each has two
/// scores.
pub fn compare(control: &Summary, arm: &Summary, alpha: f64) -> Option<Comparison> {
    if control.n < 2 || arm.n < 2 {
        return None;
    }
    let (n0, n1) = (control.n as f64, arm.n as f64);
    let var0 = control.sd.powi(2);
    let var1 = arm.sd.powi(2);
    let pooled = ((n0 - 1.0) * var0 + (n1 - 1.0) * var1) / (n0 + n1 - 2.0);
    // Degenerate scores (all equal): a tiny floor keeps the formulas finite.
    let floor = 1e-12;
    let tau2 = pooled.max(floor);
    let v = (var0 / n0 + var1 / n1).max(floor);
    let diff = arm.mean - control.mean;
    let log_lambda = 0.5 * (v / (v + tau2)).ln() + diff * diff * tau2 / (2.0 * v * (v + tau2));
    let p_value = (-log_lambda).exp().min(1.0);
    let half = (v * (v + tau2) / tau2 * (2.0 * (1.0 / alpha).ln() + ((v + tau2) / v).ln())).sqrt();
    Some(Comparison {
        difference: diff,
        interval: (diff - half, diff + half),
        p_value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn summaries_and_quantiles() {
        let s = Summary::of(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!((s.n, s.mean), (4, 2.5));
        assert!((s.sd - 1.290_994_448_7).abs() < 1e-9);
        let (lo, hi) = s.interval95();
        assert!((hi - lo - 2.0 * Z95 * s.sd / 2.0).abs() < 1e-12);
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), Some(2.0));
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.95), Some(4.8));
        assert_eq!(quantile(&[], 0.5), None);
        assert!(Summary::of(&[]).is_none());
    }

    /// Bernoulli feedback streams of two arms, compared at every `look` scores per arm.
    fn run(rng: &mut ChaCha8Rng, p_control: f64, p_arm: f64, n: usize, look: usize) -> bool {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for i in 1..=n {
            a.push(f64::from(rng.random::<f64>() < p_control));
            b.push(f64::from(rng.random::<f64>() < p_arm));
            if i % look == 0 {
                let c = compare(&Summary::of(&a).unwrap(), &Summary::of(&b).unwrap(), 0.05);
                if c.is_some_and(|c| c.p_value <= 0.05) {
                    return true;
                }
            }
        }
        false
    }

    #[test]
    fn a_real_difference_is_found() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let found = (0..20)
            .filter(|_| run(&mut rng, 0.5, 0.6, 2000, 100))
            .count();
        eprintln!("0.5 vs 0.6: found in {found} of 20 runs");
        assert!(found >= 18, "found in {found} of 20 runs");
    }

    #[test]
    fn an_a_a_stream_looked_at_often_stays_within_the_level() {
        // 200 A/A runs, each looked at 20 times: a fixed-horizon test would reject far more
        // often than 5% under such peeking; the always-valid p-value may not.
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let false_positives = (0..200)
            .filter(|_| run(&mut rng, 0.5, 0.5, 1000, 50))
            .count();
        eprintln!("A/A: {false_positives} of 200 runs rejected at 5% under 20 looks each");
        assert!(
            false_positives <= 10,
            "{false_positives} of 200 A/A runs rejected at 5%"
        );
    }

    #[test]
    fn the_interval_covers_the_difference_and_shrinks() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let draw = |rng: &mut ChaCha8Rng, mean: f64, n: usize| -> Vec<f64> {
            (0..n).map(|_| mean + rng.random::<f64>() - 0.5).collect()
        };
        let small = compare(
            &Summary::of(&draw(&mut rng, 1.0, 100)).unwrap(),
            &Summary::of(&draw(&mut rng, 1.2, 100)).unwrap(),
            0.05,
        )
        .unwrap();
        let large = compare(
            &Summary::of(&draw(&mut rng, 1.0, 5000)).unwrap(),
            &Summary::of(&draw(&mut rng, 1.2, 5000)).unwrap(),
            0.05,
        )
        .unwrap();
        for c in [small, large] {
            assert!(c.interval.0 < 0.2 && 0.2 < c.interval.1, "{c:?}");
        }
        assert!(large.interval.1 - large.interval.0 < small.interval.1 - small.interval.0);
        assert!(large.p_value < 1e-6);
    }
}
