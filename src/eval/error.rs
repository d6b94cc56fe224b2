//! Errors of the evaluation stage: a suite file that does not parse or validate, a cached source
//! that is missing or malformed, or metric inputs that do not fit together.

use std::path::PathBuf;

use crate::merge::MergeError;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{}: {reason}", file.display())]
    Io { file: PathBuf, reason: String },
    #[error("{}: {reason}", file.display())]
    Suite { file: PathBuf, reason: String },
    #[error("task {task}: {}: {reason}", file.display())]
    Source {
        task: String,
        file: PathBuf,
        reason: String,
    },
    #[error("task {task}: {reason}")]
    Task { task: String, reason: String },
    #[error("{what}: {reason}")]
    Metric { what: &'static str, reason: String },
    #[error(transparent)]
    Merge(#[from] MergeError),
}

impl EvalError {
    pub(crate) fn io(file: impl Into<PathBuf>, err: impl std::fmt::Display) -> Self {
        Self::Io {
            file: file.into(),
            reason: err.to_string(),
        }
    }

    pub(crate) fn source(task: &str, file: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Source {
            task: task.to_owned(),
            file: file.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn task(task: &str, reason: impl Into<String>) -> Self {
        Self::Task {
            task: task.to_owned(),
            reason: reason.into(),
        }
    }

    pub(crate) fn metric(what: &'static str, reason: impl Into<String>) -> Self {
        Self::Metric {
            what,
            reason: reason.into(),
        }
    }
}
