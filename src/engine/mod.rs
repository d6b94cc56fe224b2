//! The model engine: loads base models (Hugging Face directories, GGUF files, hub repos), runs
//! them on candle with every linear layer LoRA-aware, and applies a request's
//! [`MergedDelta`](crate::merge::MergedDelta) on the fly without copying the shared base weights.
//!
//! Step in the data flow: `Arc<MergedDelta>` from the merge cache → [`LoadedDelta`] (converted
//! once per delta) → [`generate`] for text, [`Encoder::embed`] / [`classify`] for encoders.
//! Forward passes are synchronous; async callers run them in `spawn_blocking`.

mod bert;
mod chat;
mod device;
mod error;
mod generate;
mod gguf;
mod heads;
mod linear;
mod llama;
mod models;
mod ops;
mod rope;
mod sampling;
mod source;
mod tokenizer;
mod weights;

pub use bert::{Batch, Bert, BertConfig, l2_normalise, mean_pool};
pub use chat::{CHATML, ChatTemplate, Message};
pub use device::parse_device;
pub use error::EngineError;
pub use generate::{FinishReason, Generation, TokenEvent, generate};
pub use gguf::{GgufFile, unpermute};
pub use heads::{DEFAULT_TEXT_SCALE, Head, Scope, Scored, classify, head_logits};
pub use linear::{LinearRegistry, LoadedDelta, LoraLinear, dense_modules, needs_gradients};
pub use llama::{KvCache, Llama, LlamaConfig};
pub use models::{Encoder, TextModel};
pub use sampling::{Sampler, SamplingParams, argmax};
pub use source::{ManifestModel, ModelPath, hub_cache, manifest, models_dir, resolve};
pub use tokenizer::TextTokenizer;
pub use weights::WeightStore;
