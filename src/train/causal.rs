//! Causal-LM adapters: the model learns to answer a task's instruction-style prompt (rendered
//! with the chat template) with the class's label word. The loss is the cross-entropy of the
//! label word's first token at the answer position; accuracy ranks only the task's label words.

use candle_core::Tensor;

use super::TrainError;
use super::fit::Run;
use super::lora::LoraFactors;
use super::record::{StepReport, TrainConfig, TrainRecord};
use crate::engine::{KvCache, LoadedDelta, Message, TextModel};
use crate::eval::Example;

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
    fn prompt_ids(&self, model: &TextModel, text: &str) -> Result<Vec<u32>, TrainError> {
        let content = self.prompt.replace("{text}", text);
        Ok(model.encode_chat(&[Message {
            role: "user".into(),
            content,
        }])?)
    }
}

/// The first token of each label word as the assistant's answer; they must differ.
pub fn answer_tokens(model: &TextModel, label_words: &[String]) -> Result<Vec<u32>, TrainError> {
    let mut firsts = Vec::with_capacity(label_words.len());
    for word in label_words {
        let ids = model.tokenizer.encode(word, false)?;
        let first = *ids
            .first()
            .ok_or_else(|| TrainError::Invalid(format!("label word {word:?} has no tokens")))?;
        if firsts.contains(&first) {
            return Err(TrainError::Invalid(format!(
                "label word {word:?} starts with the same token as another label word"
            )));
        }
        firsts.push(first);
    }
    Ok(firsts)
}

/// Logits of the answer position for one prompt.
fn answer_logits(
    model: &TextModel,
    ids: &[u32],
    delta: Option<&LoadedDelta>,
) -> Result<Tensor, TrainError> {
    Ok(model.model.forward(ids, &mut KvCache::default(), delta)?)
}

/// Mean cross-entropy of the gold label words' first tokens over `examples`.
pub fn causal_loss(
    model: &TextModel,
    delta: &LoadedDelta,
    task: &CausalTask<'_>,
    answers: &[u32],
    examples: &[&Example],
) -> Result<Tensor, TrainError> {
    let mut rows = Vec::with_capacity(examples.len());
    let mut targets = Vec::with_capacity(examples.len());
    for e in examples {
        let ids = task.prompt_ids(model, &e.text)?;
        rows.push(answer_logits(model, &ids, Some(delta))?);
        targets.push(answers[e.label]);
    }
    let logits = Tensor::stack(&rows, 0)?;
    let targets = Tensor::new(targets.as_slice(), model.model.device())?;
    Ok(candle_nn::loss::cross_entropy(&logits, &targets)?)
}

/// Fraction of `examples` where the gold label word's first token outscores the other label
/// words' at the answer position.
pub fn label_word_accuracy(
    model: &TextModel,
    task: &CausalTask<'_>,
    answers: &[u32],
    delta: Option<&LoadedDelta>,
    examples: &[Example],
) -> Result<f64, TrainError> {
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

/// Trains LoRA factors so the model answers `task`'s prompts with the right label word.
pub fn train_causal(
    model: &TextModel,
    base_model: &str,
    task: &CausalTask<'_>,
    cfg: &TrainConfig,
    on_step: &mut dyn FnMut(StepReport),
) -> Result<(LoraFactors, TrainRecord), TrainError> {
    let answers = answer_tokens(model, task.label_words)?;
    let run = Run {
        task: task.task,
        kind: "causal-label-word",
        base_model,
        train_examples: task.train.len(),
        val_examples: task.val.len(),
        cfg,
        registry: model.model.registry(),
        device: model.model.device(),
    };
    let loss = |delta: &LoadedDelta, batch: &[usize]| {
        let examples: Vec<&Example> = batch.iter().map(|&i| &task.train[i]).collect();
        causal_loss(model, delta, task, &answers, &examples)
    };
    let accuracy =
        |delta: Option<&LoadedDelta>| label_word_accuracy(model, task, &answers, delta, task.val);
    run.fit(loss, accuracy, on_step)
}
