//! Next-token choice: greedy at temperature 0, otherwise temperature, top-k and top-p (nucleus)
//! filtering, in that order as transformers applies them, drawn from a seeded ChaCha RNG so a
//! request with a seed is reproducible.
//!
//! Before that choice the request's logit processors adjust the scores, as OpenAI's API defines
//! them: `logit_bias` adds a per-token bias, and the frequency and presence penalties subtract
//! `count·frequency + [count > 0]·presence` for every token generated so far. Log-probabilities,
//! when asked for, are the log-softmax of these adjusted scores (before temperature, top-k and
//! top-p): the model's distribution under the request's processors.

use std::collections::HashMap;

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
    /// Subtracted once per earlier occurrence of a token in the generated text, in `[-2, 2]`.
    pub frequency_penalty: f32,
    /// Subtracted from every token already generated, in `[-2, 2]`.
    pub presence_penalty: f32,
    /// Added to a token's score, in `[-100, 100]`.
    pub logit_bias: Vec<(u32, f32)>,
    /// Report each chosen token's log-probability and this many most likely alternatives.
    pub logprobs: Option<usize>,
}

/// The most alternatives [`SamplingParams::logprobs`] may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: None,
            seed: None,
            max_tokens: 128,
            stop: Vec::new(),
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
            logprobs: None,
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
        for (name, value) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return bad(name, "must be in [-2, 2]");
            }
        }
        if self
            .logit_bias
            .iter()
            .any(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return bad("logit_bias", "biases must be in [-100, 100]");
        }
        if self.logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
            return bad("top_logprobs", "at most 20 alternatives");
        }
        Ok(())
    }

    /// Checks the token ids of `logit_bias` against the vocabulary size.
    pub fn validate_vocab(&self, vocab: usize) -> Result<()> {
        match self.logit_bias.iter().find(|(id, _)| *id as usize >= vocab) {
            Some((id, _)) => Err(EngineError::InvalidParam {
                name: "logit_bias",
                message: format!("token id {id} is outside the vocabulary of {vocab} tokens"),
            }),
            None => Ok(()),
        }
    }
}

/// A chosen token's log-probability and the most likely alternatives (best first).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Chooses tokens for one request.
#[derive(Debug)]
pub struct Sampler {
    temperature: f32,
    top_p: f32,
    top_k: Option<usize>,
    rng: ChaCha8Rng,
    frequency_penalty: f32,
    presence_penalty: f32,
    logit_bias: Vec<(u32, f32)>,
    logprobs: Option<usize>,
    /// How often each token was chosen so far (only kept when a penalty is set).
    counts: HashMap<u32, u32>,
    /// Adjusted scores, reused across steps.
    scratch: Vec<f32>,
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
            frequency_penalty: params.frequency_penalty,
            presence_penalty: params.presence_penalty,
            logit_bias: params.logit_bias.clone(),
            logprobs: params.logprobs,
            counts: HashMap::new(),
            scratch: Vec::new(),
        }
    }

    /// The next token id for `logits` (one score per vocabulary entry), with its
    /// log-probabilities when the request asked for them.
    pub fn sample(&mut self, logits: &[f32]) -> (u32, Option<TokenLogprob>) {
        let penalised = self.frequency_penalty != 0.0 || self.presence_penalty != 0.0;
        let scores = if penalised || !self.logit_bias.is_empty() {
            self.adjust(logits);
            std::mem::take(&mut self.scratch)
        } else {
            Vec::new()
        };
        let view = if scores.is_empty() { logits } else { &scores };
        let id = self.choose(view);
        let logprob = self.logprobs.map(|k| token_logprob(view, id, k));
        if penalised {
            *self.counts.entry(id).or_default() += 1;
        }
        self.scratch = scores;
        (id, logprob)
    }

    /// `logits` with the bias and penalties applied, into `scratch`.
    fn adjust(&mut self, logits: &[f32]) {
        self.scratch.clear();
        self.scratch.extend_from_slice(logits);
        for &(id, bias) in &self.logit_bias {
            if let Some(s) = self.scratch.get_mut(id as usize) {
                *s += bias;
            }
        }
        for (&id, &count) in &self.counts {
            if let Some(s) = self.scratch.get_mut(id as usize) {
                *s -= count as f32 * self.frequency_penalty + self.presence_penalty;
            }
        }
    }

    /// A token drawn from `softmax(logits / temperature)`, restricted to the top k and then to
    /// the nucleus. Without a nucleus the draw walks the candidates in vocabulary order, so no
    /// sort is needed; with one, only the best candidates are sorted, as many as it takes to
    /// reach `top_p` of the mass.
    fn choose(&mut self, logits: &[f32]) -> u32 {
        if self.temperature == 0.0 {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // Each token's unnormalised probability, computed once for the sums and the draw.
        let weights: Vec<f32> = logits
            .iter()
            .map(|&l| ((l - max) / self.temperature).exp())
            .collect();
        let weight = |id: u32| weights[id as usize];
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        if let Some(k) = self.top_k.filter(|&k| k < order.len()) {
            order.select_nth_unstable_by(k, by_logit);
            order.truncate(k);
        }
        let total: f32 = order.iter().map(|&id| weight(id)).sum();
        let (keep, mass) = if self.top_p >= 1.0 {
            (order.len(), total)
        } else {
            let keep = nucleus_prefix(&mut order, by_logit, |id| weight(id) / total, self.top_p);
            (keep, order[..keep].iter().map(|&id| weight(id)).sum())
        };
        let kept = &order[..keep];
        let mut draw = self.rng.random::<f32>() * mass;
        for &id in kept {
            let w = weight(id);
            if draw < w {
                return id;
            }
            draw -= w;
        }
        // Rounding left a sliver of the draw: the last candidate with any weight takes it.
        kept.iter()
            .rev()
            .copied()
            .find(|&id| weight(id) > 0.0)
            .unwrap_or(kept[0])
    }
}

/// Sorts the best candidates of `order` to its front (best first), as many as the nucleus needs,
/// and returns the nucleus size: the shortest prefix whose probability reaches `top_p` (at least
/// one). The prefix sorted grows eightfold until it holds the nucleus, so a peaked distribution
/// sorts a few dozen candidates instead of the vocabulary.
fn nucleus_prefix(
    order: &mut [u32],
    by_logit: impl Fn(&u32, &u32) -> std::cmp::Ordering + Copy,
    prob: impl Fn(u32) -> f32,
    top_p: f32,
) -> usize {
    let mut want = order.len().min(64);
    loop {
        if want < order.len() {
            order.select_nth_unstable_by(want, by_logit);
        }
        order[..want].sort_unstable_by(by_logit);
        let probs: Vec<f32> = order[..want].iter().map(|&id| prob(id)).collect();
        let keep = nucleus(&probs, top_p);
        if keep < want || want == order.len() || probs.iter().sum::<f32>() >= top_p {
            return keep;
        }
        want = (want * 8).min(order.len());
    }
}

/// The log-softmax of `logits` at `id`, and the `k` best alternatives.
fn token_logprob(logits: &[f32], id: u32, k: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let norm = max + sum.ln() as f32;
    let mut top: Vec<(u32, f32)> = Vec::new();
    if k > 0 {
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        if k < order.len() {
            order.select_nth_unstable_by(k, by_logit);
            order.truncate(k);
        }
        order.sort_unstable_by(by_logit);
        top = order
            .into_iter()
            .map(|i| (i, logits[i as usize] - norm))
            .collect();
    }
    TokenLogprob {
        id,
        logprob: logits[id as usize] - norm,
        top,
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

crate::wide::wide_fn! {
    /// Index of the largest value (the first one on ties; NaNs are never the largest, and an
    /// input of NaNs only gives 0). The maximum is found sixteen lanes at a time, then its first
    /// position.
    pub fn argmax(values: &[f32]) -> u32 {
        const LANES: usize = 16;
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let chunks = values.chunks_exact(LANES);
        let mut max = f32::NEG_INFINITY;
        for &v in chunks.remainder() {
            max = if v > max { v } else { max };
        }
        for chunk in chunks {
            for i in 0..LANES {
                lanes[i] = if chunk[i] > lanes[i] { chunk[i] } else { lanes[i] };
            }
        }
        for v in lanes {
            max = if v > max { v } else { max };
        }
        values.iter().position(|&v| v == max).unwrap_or(0) as u32
    }
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
        assert_eq!(s.sample(&[0.1, 3.0, 2.9, -1.0]).0, 1);
    }

    #[test]
    fn argmax_takes_the_first_largest_in_every_lane() {
        for len in [1usize, 5, 16, 17, 40, 1000] {
            for at in [0, len / 3, len - 1] {
                let mut v: Vec<f32> = (0..len).map(|i| (i % 7) as f32 * 0.1 - 1.0).collect();
                v[at] = 2.0;
                assert_eq!(argmax(&v), at as u32, "len {len}, at {at}");
                if at + 1 < len {
                    v[len - 1] = 2.0;
                    assert_eq!(argmax(&v), at as u32, "ties go to the first");
                }
            }
        }
        assert_eq!(argmax(&[f32::NAN, 1.0, 3.0, f32::NAN]), 2);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(&params(1.5, Some(1), 1.0, 7));
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.1, 2.0, 2.5, -1.0]).0, 2);
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
            (0..64).map(|_| s.sample(&logits).0).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
        let seen: std::collections::BTreeSet<u32> = draw(3).into_iter().collect();
        assert_eq!(seen.len(), 4);
    }

    /// The nucleus from a partly sorted vocabulary is the one a full sort gives, for peaked and
    /// flat distributions (the flat one needs the prefix to grow past its first size).
    #[test]
    fn nucleus_prefix_matches_a_full_sort() {
        for (spread, top_p) in [(8.0f32, 0.9f32), (0.01, 0.9), (2.0, 0.5), (1.0, 0.999)] {
            let logits: Vec<f32> = (0..5000u32)
                .map(|i| spread * (((i * 7919) % 1000) as f32 / 1000.0 - 0.5))
                .collect();
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let total: f32 = logits.iter().map(|l| (l - max).exp()).sum();
            let prob = |id: u32| (logits[id as usize] - max).exp() / total;
            let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
            let mut full: Vec<u32> = (0..5000).collect();
            full.sort_unstable_by(by_logit);
            let probs: Vec<f32> = full.iter().map(|&id| prob(id)).collect();
            let want = nucleus(&probs, top_p);
            let mut order: Vec<u32> = (0..5000).collect();
            let keep = nucleus_prefix(&mut order, by_logit, prob, top_p);
            assert_eq!(keep, want, "spread {spread}, top_p {top_p}");
            let kept: Vec<f32> = order[..keep]
                .iter()
                .map(|&id| logits[id as usize])
                .collect();
            let expected: Vec<f32> = full[..want].iter().map(|&id| logits[id as usize]).collect();
            assert_eq!(kept, expected);
        }
    }

    /// Sampled tokens follow the tempered distribution: on three tokens with probabilities
    /// 0.6, 0.3 and 0.1, the observed shares over 20 000 draws are within 0.02.
    #[test]
    fn draws_follow_the_distribution() {
        let logits = [0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln()];
        let mut s = Sampler::new(&params(1.0, None, 1.0, 11));
        let mut counts = [0usize; 3];
        for _ in 0..20_000 {
            counts[s.sample(&logits).0 as usize] += 1;
        }
        for (count, p) in counts.iter().zip([0.6, 0.3, 0.1]) {
            let share = *count as f64 / 20_000.0;
            assert!((share - p).abs() < 0.02, "{counts:?}");
        }
        // With a nucleus of 0.85, the 0.1 token is never drawn.
        let mut s = Sampler::new(&params(1.0, None, 0.85, 11));
        assert!((0..2000).all(|_| s.sample(&logits).0 != 2));
    }

    #[test]
    fn logit_bias_steers_the_choice() {
        let mut s = Sampler::new(&SamplingParams {
            logit_bias: vec![(3, 10.0)],
            ..params(0.0, None, 1.0, 1)
        });
        assert_eq!(s.sample(&[0.1, 3.0, 2.9, -1.0]).0, 3);
        let mut s = Sampler::new(&SamplingParams {
            logit_bias: vec![(1, -100.0)],
            ..params(0.0, None, 1.0, 1)
        });
        assert_eq!(s.sample(&[0.1, 3.0, 2.9, -1.0]).0, 2);
    }

    #[test]
    fn penalties_count_what_was_generated() {
        // Greedy on flat scores repeats token 0 without penalties; a presence penalty walks the
        // vocabulary, a frequency penalty grows with each repeat.
        let logits = [1.0, 0.9, 0.8, 0.7];
        let run = |frequency, presence| {
            let mut s = Sampler::new(&SamplingParams {
                frequency_penalty: frequency,
                presence_penalty: presence,
                ..params(0.0, None, 1.0, 1)
            });
            (0..4).map(|_| s.sample(&logits).0).collect::<Vec<_>>()
        };
        assert_eq!(run(0.0, 0.0), vec![0, 0, 0, 0]);
        assert_eq!(run(0.0, 0.5), vec![0, 1, 2, 3]);
        // Each pick lowers that token by 0.15: 1.0, then 0.9, then 0.85, then 0.8 lead.
        assert_eq!(run(0.15, 0.0), vec![0, 1, 0, 2]);
    }

    #[test]
    fn logprobs_are_the_log_softmax_and_the_best_alternatives() {
        let logits = [0.0f32, 1.0, 2.0, 3.0];
        let mut s = Sampler::new(&SamplingParams {
            logprobs: Some(2),
            ..params(0.0, None, 1.0, 1)
        });
        let (id, lp) = s.sample(&logits);
        let lp = lp.expect("asked for");
        let norm = logits.iter().map(|l| l.exp()).sum::<f32>().ln();
        assert_eq!(id, 3);
        assert!((lp.logprob - (3.0 - norm)).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![3, 2]);
        assert!((lp.top[1].1 - (2.0 - norm)).abs() < 1e-6);
        let total: f32 = logits.iter().map(|l| (l - norm).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
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
        let p = SamplingParams {
            presence_penalty: 2.5,
            ..SamplingParams::default()
        };
        assert!(matches!(
            p.validate(),
            Err(EngineError::InvalidParam {
                name: "presence_penalty",
                ..
            })
        ));
        let p = SamplingParams {
            logit_bias: vec![(7, 1.0)],
            ..SamplingParams::default()
        };
        assert!(p.validate_vocab(8).is_ok());
        assert!(matches!(
            p.validate_vocab(7),
            Err(EngineError::InvalidParam {
                name: "logit_bias",
                ..
            })
        ));
    }
}
