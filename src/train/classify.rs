//! Encoder classification with a frozen label-text head: logits = scale · cos(text, label text),
//! cross-entropy over the task's classes; only the LoRA factors train.

use candle_core::Tensor;

use super::TrainError;
use super::fit::Run;
use super::lora::LoraFactors;
use super::record::{StepReport, TrainConfig, TrainRecord};
use crate::engine::{Encoder, Head, LoadedDelta, head_logits, mean_pool};
use crate::labels::Example;

/// Texts scored per forward pass when measuring accuracy.
const EVAL_BATCH: usize = 64;

/// One classification task to train on.
pub struct Classification<'a> {
    pub task: &'a str,
    pub labels: &'a [String],
    /// One per label: what the frozen head embeds.
    pub label_texts: &'a [String],
    pub train: &'a [Example],
    pub val: &'a [Example],
}

/// The task's frozen head: the base encoder's normalised embeddings of the label texts.
pub fn label_head(
    encoder: &Encoder,
    data: &Classification<'_>,
    scale: f32,
) -> Result<Head, TrainError> {
    if data.labels.len() != data.label_texts.len() || data.labels.is_empty() {
        return Err(TrainError::Invalid(format!(
            "task {}: {} labels but {} label texts",
            data.task,
            data.labels.len(),
            data.label_texts.len()
        )));
    }
    let mut head = Head::from_label_texts(data.task, data.label_texts.to_vec(), scale, encoder)?;
    head.labels = data.labels.to_vec();
    Ok(head)
}

/// Mean cross-entropy of `texts` against `labels` under `delta`, given the head's label
/// embeddings `(classes, hidden)`. Differentiable in the delta's factors.
pub fn classification_loss(
    encoder: &Encoder,
    delta: &LoadedDelta,
    label_embeddings: &Tensor,
    scale: f32,
    texts: &[&str],
    labels: &[u32],
) -> Result<Tensor, TrainError> {
    let batch = encoder.model.batch(&encoder.encode(texts)?)?;
    let hidden = encoder.model.hidden(&batch, Some(delta))?;
    let pooled = mean_pool(&hidden, &batch)?;
    let logits = (pooled.matmul(&label_embeddings.t()?)? * f64::from(scale))?;
    let target = Tensor::new(labels, encoder.model.device())?;
    Ok(candle_nn::loss::cross_entropy(&logits, &target)?)
}

/// Fraction of `examples` whose best-scoring label under `head` is the gold one.
pub fn accuracy(
    encoder: &Encoder,
    head: &Head,
    delta: Option<&LoadedDelta>,
    examples: &[Example],
) -> Result<f64, TrainError> {
    if examples.is_empty() {
        return Ok(0.0);
    }
    let mut correct = 0usize;
    for chunk in examples.chunks(EVAL_BATCH) {
        let texts: Vec<&str> = chunk.iter().map(|e| e.text.as_str()).collect();
        let logits = head_logits(encoder, &[head], &texts, delta)?.remove(0);
        correct += logits
            .iter()
            .zip(chunk)
            .filter(|(row, e)| crate::engine::argmax(row) as usize == e.label)
            .count();
    }
    Ok(correct as f64 / examples.len() as f64)
}

/// Trains LoRA factors on `data` and measures validation accuracy before and after.
pub fn train_classifier(
    encoder: &Encoder,
    base_model: &str,
    data: &Classification<'_>,
    cfg: &TrainConfig,
    on_step: &mut dyn FnMut(StepReport),
) -> Result<(LoraFactors, TrainRecord), TrainError> {
    let head = label_head(encoder, data, cfg.head_scale)?;
    let texts: Vec<&str> = data.label_texts.iter().map(String::as_str).collect();
    let label_embeddings = encoder.embed(&texts, None)?.detach();
    let run = Run {
        task: data.task,
        kind: "encoder-label-text-head",
        base_model,
        train_examples: data.train.len(),
        val_examples: data.val.len(),
        cfg,
        registry: encoder.model.registry(),
        device: encoder.model.device(),
    };
    let loss = |delta: &LoadedDelta, batch: &[usize]| {
        let texts: Vec<&str> = batch.iter().map(|&i| data.train[i].text.as_str()).collect();
        let labels: Vec<u32> = batch.iter().map(|&i| data.train[i].label as u32).collect();
        classification_loss(
            encoder,
            delta,
            &label_embeddings,
            cfg.head_scale,
            &texts,
            &labels,
        )
    };
    let accuracy = |delta: Option<&LoadedDelta>| accuracy(encoder, &head, delta, data.val);
    run.fit(loss, accuracy, on_step)
}
