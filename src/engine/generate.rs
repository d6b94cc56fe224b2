//! The generation loop: prefill the prompt into a KV cache, then sample one token at a time,
//! delivering each token and its new text to a callback (the server's stream) until EOS, a stop
//! sequence, `max_tokens`, the end of the context, or the consumer asking to stop.

use std::ops::ControlFlow;
use std::time::Instant;

use super::error::{EngineError, Result};
use super::kv::{BLOCK_POSITIONS, SeqCache};
use super::linear::LoadedDelta;
use super::llama::{Llama, StepSeq};
use super::sampling::{Sampler, SamplingParams, TokenLogprob};
use super::tokenizer::TextTokenizer;

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token.
    Eos,
    /// A stop sequence appeared in the text.
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// The model's context is full.
    ContextFull,
    /// The callback returned `Break` (the client went away).
    Cancelled,
}

/// One generated token and the text it completes.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent<'a> {
    /// The token, or `None` for the last event, which flushes text held back while it could
    /// still have been the start of a stop sequence.
    pub id: Option<u32>,
    /// New text made final by this token (may be empty while a UTF-8 character or a possible
    /// stop sequence is incomplete).
    pub text: &'a str,
}

/// The result of one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated ids, including a final EOS id.
    pub ids: Vec<u32>,
    /// Generated text without EOS and without the stop sequence.
    pub text: String,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

/// Generates from `prompt` (token ids) with `delta` applied in every linear layer: one sequence
/// through the serving engine's batched forward, on a cache sized for it.
pub fn generate(
    model: &Llama,
    tokenizer: &TextTokenizer,
    prompt: &[u32],
    params: &SamplingParams,
    delta: Option<&LoadedDelta>,
    mut on_token: impl FnMut(TokenEvent<'_>) -> ControlFlow<()>,
) -> Result<Generation> {
    params.validate()?;
    let context = model.context_length();
    check_prompt(prompt, context)?;
    let positions = (prompt.len() + params.max_tokens).min(context);
    let shape = model.kv_shape();
    let mut pool = model.kv_pool(positions.div_ceil(BLOCK_POSITIONS) * shape.block_bytes());
    let mut cache = pool.reserve(positions).ok_or(EngineError::CacheTooSmall {
        positions,
        capacity: 0,
    })?;
    let mut run = |tokens: &[u32], cache: &mut SeqCache| -> Result<Vec<f32>> {
        pool.grow(cache, cache.len() + tokens.len())?;
        let seq = StepSeq {
            cache,
            tokens,
            delta,
            logits: true,
        };
        Ok(model.step(&mut [seq])?.flatten_all()?.to_vec1::<f32>()?)
    };
    let start = Instant::now();
    let mut logits = run(prompt, &mut cache)?;
    let prefill_secs = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut decoder = Decoder::new(params);
    let finish = loop {
        let step = decoder.accept(&logits, tokenizer, cache.len() < context)?;
        if step.finish != Some(FinishReason::Eos) {
            let event = TokenEvent {
                id: Some(step.id),
                text: step.fresh,
            };
            if on_token(event).is_break() {
                break FinishReason::Cancelled;
            }
        }
        if let Some(finish) = step.finish {
            break finish;
        }
        let id = step.id;
        logits = run(&[id], &mut cache)?;
    };
    if finish != FinishReason::Cancelled {
        let rest = decoder.flush();
        if !rest.is_empty() {
            let _ = on_token(TokenEvent {
                id: None,
                text: rest,
            });
        }
    }
    let (ids, text) = decoder.finish();
    Ok(Generation {
        ids,
        text,
        finish,
        prompt_tokens: prompt.len(),
        prefill_secs,
        decode_secs: start.elapsed().as_secs_f64(),
    })
}

/// A prompt the model can continue: not empty and shorter than the context.
pub fn check_prompt(prompt: &[u32], context: usize) -> Result<()> {
    if prompt.is_empty() {
        return Err(EngineError::EmptyInput { what: "prompt" });
    }
    if prompt.len() >= context {
        return Err(EngineError::PromptTooLong {
            prompt_tokens: prompt.len(),
            context,
        });
    }
    Ok(())
}

/// The decoding state of one sequence: sampler, generated ids, text and stop detection.
#[derive(Debug)]
pub struct Decoder {
    sampler: Sampler,
    text: TextTracker,
    ids: Vec<u32>,
    max_tokens: usize,
}

/// What one sampled token did.
#[derive(Debug)]
pub struct Accepted<'a> {
    pub id: u32,
    /// Text made final by this token.
    pub fresh: &'a str,
    /// Set when generation ends with this token.
    pub finish: Option<FinishReason>,
    /// The token's log-probabilities, when the request asked for them.
    pub logprob: Option<TokenLogprob>,
}

impl Decoder {
    pub fn new(params: &SamplingParams) -> Self {
        Self {
            sampler: Sampler::new(params),
            text: TextTracker::new(params.stop.clone()),
            ids: Vec::new(),
            max_tokens: params.max_tokens,
        }
    }

    /// Samples the next token from `logits`; `room` says whether the context can take it.
    pub fn accept(
        &mut self,
        logits: &[f32],
        tokenizer: &TextTokenizer,
        room: bool,
    ) -> Result<Accepted<'_>> {
        let (id, logprob) = self.sampler.sample(logits);
        self.ids.push(id);
        if tokenizer.eos_ids.contains(&id) {
            return Ok(Accepted {
                id,
                fresh: "",
                finish: Some(FinishReason::Eos),
                logprob: None,
            });
        }
        let step = self.text.push(tokenizer, &self.ids)?;
        let finish = if step.stopped {
            Some(FinishReason::Stop)
        } else if self.ids.len() >= self.max_tokens {
            Some(FinishReason::Length)
        } else if !room {
            Some(FinishReason::ContextFull)
        } else {
            None
        };
        Ok(Accepted {
            id,
            fresh: step.fresh,
            finish,
            logprob,
        })
    }

    /// Generated tokens, not counting a final end-of-sequence token.
    pub fn completion_tokens(&self, tokenizer: &TextTokenizer) -> usize {
        match self.ids.last() {
            Some(id) if tokenizer.eos_ids.contains(id) => self.ids.len() - 1,
            _ => self.ids.len(),
        }
    }

    /// Text held back (a possible stop-sequence start) that is final now that generation ended.
    pub fn flush(&mut self) -> &str {
        self.text.flush()
    }

    /// The generated ids (with a final EOS) and text (without EOS or stop sequence).
    pub fn finish(self) -> (Vec<u32>, String) {
        (self.ids, self.text.finish())
    }
}

/// Decoded text so far, what was already delivered, and stop-sequence detection.
#[derive(Debug)]
struct TextTracker {
    stop: Vec<String>,
    text: String,
    delivered: usize,
    stopped_at: Option<usize>,
}

struct Step<'a> {
    fresh: &'a str,
    stopped: bool,
}

impl TextTracker {
    fn new(stop: Vec<String>) -> Self {
        Self {
            stop,
            text: String::new(),
            delivered: 0,
            stopped_at: None,
        }
    }

    /// Re-decodes all generated ids (a token may complete a character begun by an earlier one)
    /// and returns the newly final text.
    fn push(&mut self, tokenizer: &TextTokenizer, ids: &[u32]) -> Result<Step<'_>> {
        self.text = tokenizer.decode(ids)?;
        let first_stop = self
            .stop
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min();
        let end = match first_stop {
            Some(at) => {
                self.stopped_at = Some(at);
                at
            }
            None => self.safe_end(),
        };
        let end = end.max(self.delivered);
        let start = self.delivered;
        self.delivered = end;
        Ok(Step {
            fresh: &self.text[start..end],
            stopped: first_stop.is_some(),
        })
    }

    /// Text that cannot change any more: not ending in an incomplete character, and not ending
    /// in what could be the start of a stop sequence.
    fn safe_end(&self) -> usize {
        let base = self.text.trim_end_matches('\u{FFFD}').len();
        let held = self
            .stop
            .iter()
            .flat_map(|s| s.char_indices().skip(1).map(move |(i, _)| &s[..i]))
            .filter(|prefix| self.text[..base].ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        base - held
    }

    /// Text held back so far that is final now that generation ended.
    fn flush(&mut self) -> &str {
        let end = self
            .stopped_at
            .unwrap_or(self.text.len())
            .max(self.delivered);
        let start = self.delivered;
        self.delivered = end;
        &self.text[start..end]
    }

    fn finish(mut self) -> String {
        if let Some(at) = self.stopped_at {
            self.text.truncate(at);
        }
        self.text
    }
}
