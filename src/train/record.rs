//! Training settings and the record written beside a trained adapter (`training.json`).

use serde::Serialize;

/// Hyperparameters of one training run.
#[derive(Debug, Clone, Serialize)]
pub struct TrainConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Module name suffixes that get LoRA factors (PEFT's `target_modules`).
    pub targets: Vec<String>,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub batch_size: usize,
    /// Examples per forward/backward pass; a step sums the gradients of its micro-batches, so
    /// only one micro-batch's graph is alive at a time.
    pub micro_batch_size: usize,
    /// Passes over the training split (the last one may stop early at `max_steps`).
    pub epochs: usize,
    pub max_steps: Option<usize>,
    pub seed: u64,
    /// Logit scale of label-text heads (encoders only).
    pub head_scale: f32,
}

impl TrainConfig {
    /// The paper's encoder setting: rank 16, alpha 16 on query, key, value and attention output.
    pub fn encoder_default() -> Self {
        Self {
            rank: 16,
            alpha: 16.0,
            targets: ["query", "key", "value", "attention.output.dense"]
                .map(String::from)
                .to_vec(),
            learning_rate: 1e-3,
            weight_decay: 0.0,
            batch_size: 16,
            micro_batch_size: 16,
            epochs: 1,
            max_steps: None,
            seed: 0,
            head_scale: crate::engine::DEFAULT_TEXT_SCALE,
        }
    }

    /// Causal LMs: LoRA on the attention projections.
    pub fn causal_default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            targets: ["q_proj", "k_proj", "v_proj", "o_proj"]
                .map(String::from)
                .to_vec(),
            learning_rate: 1e-3,
            batch_size: 8,
            micro_batch_size: 1,
            ..Self::encoder_default()
        }
    }

    /// Optimiser steps for `examples` training examples.
    pub fn steps(&self, examples: usize) -> usize {
        let per_epoch = examples.div_ceil(self.batch_size.max(1));
        let total = per_epoch * self.epochs;
        self.max_steps.map_or(total, |m| m.min(total))
    }

    pub(crate) fn validate(&self) -> Result<(), super::TrainError> {
        let bad = |m: &str| Err(super::TrainError::Invalid(m.to_string()));
        if self.rank == 0 || self.batch_size == 0 || self.micro_batch_size == 0 || self.epochs == 0
        {
            return bad("rank, batch size, micro-batch size and epochs must be at least 1");
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad("the learning rate must be a positive number");
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad("lora alpha must be a positive number");
        }
        Ok(())
    }
}

/// Progress of one optimiser step.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    pub step: usize,
    pub steps: usize,
    pub loss: f32,
}

/// What `knots train` writes as `training.json`.
#[derive(Debug, Clone, Serialize)]
pub struct TrainRecord {
    pub knots_version: &'static str,
    pub task: String,
    pub kind: &'static str,
    pub base_model: String,
    pub train_examples: usize,
    pub val_examples: usize,
    pub steps: usize,
    pub config: TrainConfig,
    /// Mean loss of each optimiser step.
    pub loss_curve: Vec<f32>,
    /// Accuracy on the validation split after training, and of the base model before.
    pub val_accuracy: f64,
    pub base_val_accuracy: f64,
    pub wall_seconds: f64,
}
