//! Causal-LM adapters: the model learns to answer a task's instruction-style prompt (rendered
//! with the chat template) with the class's label word. The loss is the cross-entropy of the
//! label word's first token at the answer position; accuracy ranks only the task's label words.

use candle_core::Tensor;

use super::TrainError;
use super::fit::Run;
use super::lora::LoraFactors;
use super::record::{StepReport, TrainConfig, TrainRecord};
use crate::engine::{LoadedDelta, TextModel};
use crate::labels::{CausalTask, Example, answer_logits, answer_tokens, label_word_accuracy};

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
    let accuracy = |delta: Option<&LoadedDelta>| {
        Ok(label_word_accuracy(model, task, &answers, delta, task.val)?)
    };
    run.fit(loss, accuracy, on_step)
}
