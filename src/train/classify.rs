//! Encoder classification with a frozen label-text head: logits = scale · cos(text, label text),
//! cross-entropy over the task's classes; only the LoRA factors train.

use std::time::Instant;

use candle_core::Tensor;
use candle_nn::Optimizer;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::TrainError;
use super::lora::LoraFactors;
use super::record::{StepReport, TrainConfig, TrainRecord};
use crate::engine::{Encoder, Head, LoadedDelta, head_logits, mean_pool};
use crate::eval::Example;

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
    cfg.validate()?;
    if data.train.is_empty() {
        return Err(TrainError::Invalid(format!(
            "task {}: no training examples",
            data.task
        )));
    }
    let started = Instant::now();
    let device = encoder.model.device();
    let head = label_head(encoder, data, cfg.head_scale)?;
    let texts: Vec<&str> = data.label_texts.iter().map(String::as_str).collect();
    let label_embeddings = encoder.embed(&texts, None)?.detach();
    let base_val_accuracy = accuracy(encoder, &head, None, data.val)?;

    let registry = encoder.model.registry();
    let factors = LoraFactors::new(
        registry,
        &cfg.targets,
        cfg.rank,
        cfg.alpha,
        cfg.seed,
        device,
    )?;
    let mut optimizer = adamw(&factors, cfg)?;
    let steps = cfg.steps(data.train.len());
    let mut loss_curve = Vec::with_capacity(steps);
    for (step, batch) in batches(data.train.len(), cfg, steps)
        .into_iter()
        .enumerate()
    {
        let texts: Vec<&str> = batch.iter().map(|&i| data.train[i].text.as_str()).collect();
        let labels: Vec<u32> = batch.iter().map(|&i| data.train[i].label as u32).collect();
        let delta = factors.trainable(registry)?;
        let loss = classification_loss(
            encoder,
            &delta,
            &label_embeddings,
            cfg.head_scale,
            &texts,
            &labels,
        )?;
        optimizer.backward_step(&loss)?;
        let loss = loss.to_scalar::<f32>()?;
        loss_curve.push(loss);
        on_step(StepReport {
            step: step + 1,
            steps,
            loss,
        });
    }
    let trained = registry.convert(&factors.to_delta()?, device)?;
    let val_accuracy = accuracy(encoder, &head, Some(&trained), data.val)?;
    let record = TrainRecord {
        knots_version: env!("CARGO_PKG_VERSION"),
        task: data.task.to_string(),
        kind: "encoder-label-text-head",
        base_model: base_model.to_string(),
        train_examples: data.train.len(),
        val_examples: data.val.len(),
        steps,
        config: cfg.clone(),
        loss_curve,
        val_accuracy,
        base_val_accuracy,
        wall_seconds: started.elapsed().as_secs_f64(),
    };
    Ok((factors, record))
}

pub(super) fn adamw(
    factors: &LoraFactors,
    cfg: &TrainConfig,
) -> Result<candle_nn::AdamW, TrainError> {
    let params = candle_nn::ParamsAdamW {
        lr: cfg.learning_rate,
        weight_decay: cfg.weight_decay,
        ..Default::default()
    };
    Ok(candle_nn::AdamW::new(factors.vars(), params)?)
}

/// Example indices of each step: seeded shuffles of the training split, one per epoch.
pub(super) fn batches(examples: usize, cfg: &TrainConfig, steps: usize) -> Vec<Vec<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(1));
    let mut out = Vec::with_capacity(steps);
    while out.len() < steps {
        let mut order: Vec<usize> = (0..examples).collect();
        order.shuffle(&mut rng);
        out.extend(order.chunks(cfg.batch_size).map(<[usize]>::to_vec));
    }
    out.truncate(steps);
    out
}
