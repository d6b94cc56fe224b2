//! The generation loop: prefill the prompt into a KV cache, then sample one token at a time,
//! delivering each token and its new text to a callback (the server's stream) until EOS, a stop
//! sequence, `max_tokens`, the end of the context, or the consumer asking to stop.

use std::ops::ControlFlow;
use std::time::Instant;

use super::error::{EngineError, Result};
use super::linear::LoadedDelta;
use super::llama::{KvCache, Llama};
use super::sampling::{Sampler, SamplingParams};
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

/// Generates from `prompt` (token ids) with `delta` applied in every linear layer.
pub fn generate(
    model: &Llama,
    tokenizer: &TextTokenizer,
    prompt: &[u32],
    params: &SamplingParams,
    delta: Option<&LoadedDelta>,
    mut on_token: impl FnMut(TokenEvent<'_>) -> ControlFlow<()>,
) -> Result<Generation> {
    params.validate()?;
    if prompt.is_empty() {
        return Err(EngineError::EmptyInput { what: "prompt" });
    }
    let context = model.context_length();
    if prompt.len() >= context {
        return Err(EngineError::PromptTooLong {
            prompt_tokens: prompt.len(),
            context,
        });
    }
    let mut sampler = Sampler::new(params);
    let mut cache = KvCache::default();
    let start = Instant::now();
    let mut logits = model.forward(prompt, &mut cache, delta)?.to_vec1::<f32>()?;
    let prefill_secs = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut text = TextTracker::new(&params.stop);
    let mut ids = Vec::new();
    let finish = loop {
        let id = sampler.sample(&logits);
        ids.push(id);
        if tokenizer.eos_ids.contains(&id) {
            break FinishReason::Eos;
        }
        let step = text.push(tokenizer, &ids[..])?;
        if on_token(TokenEvent {
            id: Some(id),
            text: step.fresh,
        })
        .is_break()
        {
            break FinishReason::Cancelled;
        }
        if step.stopped {
            break FinishReason::Stop;
        }
        if ids.len() >= params.max_tokens {
            break FinishReason::Length;
        }
        if cache.len() >= context {
            break FinishReason::ContextFull;
        }
        logits = model.forward(&[id], &mut cache, delta)?.to_vec1::<f32>()?;
    };
    if finish != FinishReason::Cancelled {
        let rest = text.flush();
        if !rest.is_empty() {
            let _ = on_token(TokenEvent {
                id: None,
                text: rest,
            });
        }
    }
    Ok(Generation {
        ids,
        text: text.finish(),
        finish,
        prompt_tokens: prompt.len(),
        prefill_secs,
        decode_secs: start.elapsed().as_secs_f64(),
    })
}

/// Decoded text so far, what was already delivered, and stop-sequence detection.
struct TextTracker<'s> {
    stop: &'s [String],
    text: String,
    delivered: usize,
    stopped_at: Option<usize>,
}

struct Step<'a> {
    fresh: &'a str,
    stopped: bool,
}

impl<'s> TextTracker<'s> {
    fn new(stop: &'s [String]) -> Self {
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
