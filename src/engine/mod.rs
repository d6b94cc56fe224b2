//! The model engine: loads base models (Hugging Face directories, GGUF files, hub repos), runs
//! them on candle with every linear layer LoRA-aware, and applies a request's
//! [`MergedDelta`](crate::merge::MergedDelta) on the fly without copying the shared base weights.
//!
//! Step in the data flow: `Arc<MergedDelta>` from the merge cache → [`LoadedDelta`] (converted
//! once per delta) → [`generate`] for text, [`Encoder::embed`] / [`classify`] for encoders.
//! Serving runs through [`Engine`]: one loop per generation model that batches every running
//! sequence, whatever its delta, into one forward per step (see `scheduler`). Other forward
//! passes are synchronous; async callers run them in `spawn_blocking`.

mod bert;
mod chat;
mod delta_pass;
mod device;
mod encode_engine;
mod error;
mod generate;
mod gguf;
mod heads;
mod host;
mod kv;
mod linear;
mod llama;
mod low_rank;
mod masked;
mod models;
mod ops;
mod paged;
mod panels;
mod prefetch;
mod qmatmul;
mod rope;
mod sampling;
mod scheduler;
mod source;
pub mod telemetry;
mod tokenizer;
mod weights;

pub use bert::{
    Batch, Bert, BertConfig, Packed, cls_rows, l2_normalise, mean_pool, mean_pool_packed,
};
pub use chat::{CHATML, ChatTemplate, Message};
pub use device::{bind_to_thread, parse_device};
pub use encode_engine::{EncodeJob, EncoderEngine};
pub use error::EngineError;
pub use generate::{Decoder, FinishReason, Generation, TokenEvent, generate};
pub use gguf::{GgufFile, unpermute};
pub use heads::{
    DEFAULT_TEXT_SCALE, Features, Head, Scope, Scored, classify, head_logits, needs_pooled, rank,
};
pub use kv::{BLOCK_POSITIONS, KvPool, KvShape, SeqCache};
pub use linear::{
    Deltas, LinearRegistry, LoadedDelta, LoraLinear, RowGroup, dense_modules, needs_gradients,
    row_groups,
};
pub use llama::{KvCache, Llama, LlamaConfig, StepSeq};
pub use models::{Encoder, TextModel};
pub use sampling::{MAX_TOP_LOGPROBS, Sampler, SamplingParams, TokenLogprob, argmax};
pub use scheduler::{Done, Engine, EngineLimits, EngineStats, Job, Sink};
pub use source::{ManifestModel, ModelPath, manifest, models_dir, resolve};
pub use tokenizer::TextTokenizer;
pub use weights::{WeightFormat, WeightStore};
