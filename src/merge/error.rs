//! Errors of the merge stage: invalid parameters or an adapter set that cannot be merged.

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MergeError {
    #[error("invalid {field}: {reason}")]
    InvalidParam { field: &'static str, reason: String },
    #[error("a merge needs at least one adapter")]
    NoAdapters,
    #[error("adapter {adapter} appears twice in the set")]
    DuplicateAdapter { adapter: String },
    #[error(
        "module {module}: adapter {adapter} has shape {found:?} but adapter {other} has {expected:?}"
    )]
    ShapeMismatch {
        module: String,
        adapter: String,
        found: (usize, usize),
        other: String,
        expected: (usize, usize),
    },
    #[error("module {module}: the SVD did not converge")]
    Svd { module: String },
    #[error("rank must be at least 1")]
    ZeroRank,
    #[error("merge on the device: {message}")]
    Device { message: String },
}

impl From<candle_core::Error> for MergeError {
    fn from(e: candle_core::Error) -> Self {
        Self::Device {
            message: e.to_string(),
        }
    }
}

impl MergeError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidParam {
            field,
            reason: reason.into(),
        }
    }
}
