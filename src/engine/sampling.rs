//! Next-token choice: greedy at temperature 0, otherwise temperature, top-k and top-p (nucleus)
//! filtering, in that order as transformers applies them, drawn from a seeded ChaCha RNG so a
//! request with a seed is reproducible.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::error::{EngineError, Result};

/// Sampling parameters of one generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// Nucleus mass in `(0, 1]`; 1 keeps everything.
    pub top_p: f32,
    /// Keep only the `k` most likely tokens; `None` keeps all.
    pub top_k: Option<usize>,
    /// RNG seed; `None` draws one from the OS.
    pub seed: Option<u64>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Generation ends when the text contains one of these; it is not part of the output.
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: None,
            seed: None,
            max_tokens: 128,
            stop: Vec::new(),
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        let bad = |name, message: &str| {
            Err(EngineError::InvalidParam {
                name,
                message: message.to_string(),
            })
        };
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad("temperature", "must be a finite number ≥ 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "must be in (0, 1]");
        }
        if self.top_k == Some(0) {
            return bad("top_k", "must be ≥ 1");
        }
        if self.max_tokens == 0 {
            return bad("max_tokens", "must be ≥ 1");
        }
        if self.stop.iter().any(String::is_empty) {
            return bad("stop", "stop sequences must not be empty");
        }
        Ok(())
    }
}

/// Chooses tokens for one request.
#[derive(Debug)]
pub struct Sampler {
    temperature: f32,
    top_p: f32,
    top_k: Option<usize>,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: &SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_os_rng(),
        };
        Self {
            temperature: params.temperature,
            top_p: params.top_p,
            top_k: params.top_k,
            rng,
        }
    }

    /// The next token id for `logits` (one score per vocabulary entry).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature == 0.0 {
            return argmax(logits);
        }
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        if let Some(k) = self.top_k.filter(|&k| k < order.len()) {
            order.select_nth_unstable_by(k, by_logit);
            order.truncate(k);
        }
        order.sort_unstable_by(by_logit);
        let max = order.first().map_or(0.0, |&i| logits[i as usize]);
        let mut probs: Vec<f32> = order
            .iter()
            .map(|&i| ((logits[i as usize] - max) / self.temperature).exp())
            .collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        let keep = nucleus(&probs, self.top_p);
        let mass: f32 = probs[..keep].iter().sum();
        let mut draw = self.rng.random::<f32>() * mass;
        for (p, &id) in probs[..keep].iter().zip(&order) {
            if draw < *p {
                return id;
            }
            draw -= p;
        }
        order[keep - 1]
    }
}

/// How many of the descending `probs` the nucleus keeps: the shortest prefix whose mass reaches
/// `top_p` (at least one).
fn nucleus(probs: &[f32], top_p: f32) -> usize {
    if top_p >= 1.0 {
        return probs.len().max(1);
    }
    let mut sum = 0.0;
    for (i, p) in probs.iter().enumerate() {
        sum += p;
        if sum >= top_p {
            return i + 1;
        }
    }
    probs.len().max(1)
}

/// Index of the largest value (the first one on ties).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: Option<usize>, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(&params(0.0, None, 1.0, 1));
        assert_eq!(s.sample(&[0.1, 3.0, 2.9, -1.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(&params(1.5, Some(1), 1.0, 7));
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.1, 2.0, 2.5, -1.0]), 2);
        }
    }

    #[test]
    fn nucleus_keeps_the_smallest_prefix() {
        assert_eq!(nucleus(&[0.5, 0.3, 0.2], 0.7), 2);
        assert_eq!(nucleus(&[0.5, 0.3, 0.2], 0.5), 1);
        assert_eq!(nucleus(&[0.5, 0.3, 0.2], 1.0), 3);
    }

    #[test]
    fn same_seed_same_tokens_and_all_tokens_reachable() {
        let logits = [1.0, 1.0, 1.0, 1.0];
        let draw = |seed| {
            let mut s = Sampler::new(&params(1.0, None, 1.0, seed));
            (0..64).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
        let seen: std::collections::BTreeSet<u32> = draw(3).into_iter().collect();
        assert_eq!(seen.len(), 4);
    }

    #[test]
    fn invalid_params_are_rejected() {
        let p = SamplingParams {
            top_p: 0.0,
            ..SamplingParams::default()
        };
        assert!(matches!(
            p.validate(),
            Err(EngineError::InvalidParam { name: "top_p", .. })
        ));
    }
}
