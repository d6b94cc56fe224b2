//! `EngineError`: every way loading a model or running a forward pass can fail.

use std::path::PathBuf;

/// Errors of the model engine (loading, tokenizing, forward passes, generation).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid {what} in {path}: {message}")]
    Format {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("model weight {name} is missing")]
    MissingWeight { name: String },
    #[error("model weight {name} has shape {actual:?}, expected {expected:?}")]
    WeightShape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("unsupported model: {message}")]
    Unsupported { message: String },
    #[error("cannot resolve model {spec:?}: {message}")]
    ModelNotFound { spec: String, message: String },
    #[error("delta module {module} does not match any linear layer of the model")]
    UnknownModule { module: String },
    #[error("delta module {module} has shape {actual:?}, but the model's weight is {expected:?}")]
    DeltaShape {
        module: String,
        expected: (usize, usize),
        actual: (usize, usize),
    },
    #[error("tokenizer: {message}")]
    Tokenizer { message: String },
    #[error("chat template: {message}")]
    Template { message: String },
    #[error("prompt has {prompt_tokens} tokens, the model's context holds {context}")]
    PromptTooLong {
        prompt_tokens: usize,
        context: usize,
    },
    #[error("empty input: {what}")]
    EmptyInput { what: &'static str },
    #[error("invalid parameter {name}: {message}")]
    InvalidParam { name: &'static str, message: String },
    #[error("classification head: {message}")]
    Head { message: String },
    #[error("device {spec:?}: {message}")]
    Device { spec: String, message: String },
    #[error(
        "a sequence of up to {positions} positions does not fit in the KV cache ({capacity} positions); lower max_tokens or raise --kv-cache-bytes"
    )]
    CacheTooSmall { positions: usize, capacity: usize },
    #[error("the engine's waiting queue is full ({limit} requests)")]
    QueueFull { limit: usize },
    #[error("the request's deadline passed")]
    Timeout,
    #[error("the engine loop has stopped")]
    Stopped,
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl EngineError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn format(
        what: &'static str,
        path: impl Into<PathBuf>,
        message: impl ToString,
    ) -> Self {
        Self::Format {
            what,
            path: path.into(),
            message: message.to_string(),
        }
    }

    pub(crate) fn tokenizer(message: impl ToString) -> Self {
        Self::Tokenizer {
            message: message.to_string(),
        }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
