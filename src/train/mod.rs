//! `knots train`: LoRA fine-tuning on candle autograd, so every adapter the project ships (and
//! the benchmark evaluates) is trained by knots itself.
//!
//! Encoders follow the KnOTS paper's vision protocol: a frozen label-text head (the base
//! encoder's normalised embeddings of each class's label text, logits = scale · cosine) and LoRA
//! on the attention projections; only the LoRA factors train. Causal LMs learn to answer an
//! instruction-style prompt with the class's label word.
//!
//! Step in the data flow: suite splits (`eval::load_suite`) → [`train_classifier`] /
//! [`train_causal`] → [`LoraFactors::to_delta`] → `adapters::write_peft` with a
//! [`TrainRecord`].

mod causal;
mod classify;
mod fit;
mod lora;
mod record;

use crate::adapters::AdapterError;
use crate::engine::EngineError;

pub use causal::{causal_loss, train_causal};
pub use classify::{Classification, accuracy, classification_loss, label_head, train_classifier};
pub use fit::batch_gradients;
pub use lora::LoraFactors;
pub use record::{StepReport, TrainConfig, TrainRecord};

/// Errors of training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("model: {0}")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error("{0}")]
    Invalid(String),
}
