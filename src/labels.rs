//! Labelled examples and label-word scoring of a causal LM: what training (fitting an adapter)
//! and evaluation (scoring a merge) share. Depends only on the model engine.

use candle_core::Tensor;

use crate::engine::{EngineError, KvCache, LoadedDelta, Message, TextModel};

/// One labelled example: a cleaned text and its class index within its task.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Example {
    pub text: String,
    pub label: usize,
}

/// One task in its instruction-style form.
pub struct CausalTask<'a> {
    pub task: &'a str,
    /// `{text}` is replaced by the example.
    pub prompt: &'a str,
    pub label_words: &'a [String],
    pub train: &'a [Example],
    pub val: &'a [Example],
}

impl CausalTask<'_> {
    pub fn prompt_ids(&self, model: &TextModel, text: &str) -> Result<Vec<u32>, EngineError> {
        let content = self.prompt.replace("{text}", text);
        model.encode_chat(&[Message {
            role: "user".into(),
            content,
        }])
    }
}

/// The first token of each label word as the assistant's answer; they must differ.
pub fn answer_tokens(model: &TextModel, label_words: &[String]) -> Result<Vec<u32>, EngineError> {
    let mut firsts = Vec::with_capacity(label_words.len());
    for word in label_words {
        let ids = model.tokenizer.encode(word, false)?;
        let first = *ids
            .first()
            .ok_or_else(|| invalid_words(format!("label word {word:?} has no tokens")))?;
        if firsts.contains(&first) {
            return Err(invalid_words(format!(
                "label word {word:?} starts with the same token as another label word"
            )));
        }
        firsts.push(first);
    }
    Ok(firsts)
}

/// Logits of the answer position for one prompt.
pub fn answer_logits(
    model: &TextModel,
    ids: &[u32],
    delta: Option<&LoadedDelta>,
) -> Result<Tensor, EngineError> {
    model.model.forward(ids, &mut KvCache::default(), delta)
}

/// Fraction of `examples` where the gold label word's first token outscores the other label
/// words' at the answer position.
pub fn label_word_accuracy(
    model: &TextModel,
    task: &CausalTask<'_>,
    answers: &[u32],
    delta: Option<&LoadedDelta>,
    examples: &[Example],
) -> Result<f64, EngineError> {
    if examples.is_empty() {
        return Ok(0.0);
    }
    let mut correct = 0usize;
    for e in examples {
        let ids = task.prompt_ids(model, &e.text)?;
        let logits: Vec<f32> = answer_logits(model, &ids, delta)?.to_vec1()?;
        let scores: Vec<f32> = answers.iter().map(|&t| logits[t as usize]).collect();
        if crate::engine::argmax(&scores) as usize == e.label {
            correct += 1;
        }
    }
    Ok(correct as f64 / examples.len() as f64)
}

fn invalid_words(message: String) -> EngineError {
    EngineError::InvalidParam {
        name: "label_words",
        message,
    }
}
