//! Errors of reading, validating and writing PEFT adapters. Every variant names the file and,
//! where there is one, the tensor key, so a user can find the problem without a debugger.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: unsupported adapter option: {option}")]
    Unsupported { path: PathBuf, option: String },
    #[error("{path}: not a readable safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("{path}: tensor {key}: dtype {dtype} is not supported (use F32, F16 or BF16)")]
    Dtype {
        path: PathBuf,
        key: String,
        dtype: String,
    },
    #[error("{path}: tensor {key}: {reason}")]
    BadTensor {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("{path}: tensor {key} is not a LoRA factor or a saved module of this config")]
    UnexpectedKey { path: PathBuf, key: String },
    #[error("{path}: module {module} has {present} but no {missing}")]
    MissingFactor {
        path: PathBuf,
        module: String,
        present: &'static str,
        missing: &'static str,
    },
    #[error("{path}: module {module}: rank {found} disagrees with the config's r = {expected}")]
    RankMismatch {
        path: PathBuf,
        module: String,
        expected: usize,
        found: usize,
    },
    #[error("{path}: module {module} is not in the config's target_modules")]
    Untargeted { path: PathBuf, module: String },
    #[error("{path}: tensor {key} holds a non-finite value ({value}) at index {index}")]
    NonFinite {
        path: PathBuf,
        key: String,
        index: usize,
        value: f32,
    },
    #[error("{path}: holds no LoRA factors")]
    Empty { path: PathBuf },
    #[error("{path}: already exists and is not empty (choose another --out)")]
    OutputExists { path: PathBuf },
    #[error("cannot export: {reason}")]
    Export { reason: String },
    #[error("adapter source {uri}: {reason}")]
    Source { uri: String, reason: String },
}

impl AdapterError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}
