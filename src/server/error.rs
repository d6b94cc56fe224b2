//! The one mapping from errors to HTTP status and OpenAI error body
//! (`{"error": {"message", "type", "param", "code"}}`). 5xx causes are logged; the client gets a
//! plain message.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::adapters::AdapterError;
use crate::merge::MergeError;
use crate::server::backend::BackendError;
use crate::server::spec::SpecError;
use crate::server::store::StoreError;

/// Every way a request can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<String>,
    },
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{what} already exists")]
    Conflict { what: String },
    #[error("request body too large")]
    PayloadTooLarge,
    #[error("the body must be JSON sent with content-type: application/json (got {found})")]
    UnsupportedMediaType { found: String },
    #[error("server overloaded, retry later")]
    Overloaded,
    #[error("request timed out")]
    Timeout,
    #[error("server is shutting down")]
    ShuttingDown,
    #[error("internal error")]
    Internal { cause: String },
}

impl ApiError {
    pub fn bad(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
            param: Some(param.into()),
        }
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        Self::NotFound { what: what.into() }
    }

    pub fn internal(cause: impl std::fmt::Display) -> Self {
        Self::Internal {
            cause: cause.to_string(),
        }
    }

    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            Self::BadRequest { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_value",
            ),
            Self::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid_api_key",
            ),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "permission_error", "forbidden"),
            Self::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found_error", "not_found"),
            Self::Conflict { .. } => (StatusCode::CONFLICT, "invalid_request_error", "conflict"),
            Self::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "body_too_large",
            ),
            Self::UnsupportedMediaType { .. } => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "unsupported_media_type",
            ),
            Self::Overloaded => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "overloaded",
            ),
            Self::Timeout => (StatusCode::GATEWAY_TIMEOUT, "timeout_error", "timeout"),
            Self::ShuttingDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "shutting_down",
            ),
            Self::Internal { .. } => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal_error",
            ),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    /// The OpenAI error body.
    pub fn body(&self) -> serde_json::Value {
        let (_, kind, code) = self.parts();
        let param = match self {
            Self::BadRequest { param, .. } => param.clone(),
            _ => None,
        };
        json!({"error": {"message": self.to_string(), "type": kind, "param": param, "code": code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal { cause } = &self {
            tracing::error!(%cause, "request failed");
        }
        let mut response = (self.status(), Json(self.body())).into_response();
        if matches!(self, Self::Overloaded | Self::ShuttingDown) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<SpecError> for ApiError {
    fn from(e: SpecError) -> Self {
        Self::BadRequest {
            message: e.to_string(),
            param: Some(e.field.to_string()),
        }
    }
}

impl From<MergeError> for ApiError {
    fn from(e: MergeError) -> Self {
        match e {
            MergeError::InvalidParam { field, .. } => Self::bad(merge_param(field), e.to_string()),
            MergeError::NoAdapters
            | MergeError::DuplicateAdapter { .. }
            | MergeError::ShapeMismatch { .. } => Self::bad("model", e.to_string()),
            MergeError::ZeroRank => Self::bad("rank", e.to_string()),
            MergeError::Svd { .. } | MergeError::Device { .. } => Self::internal(e),
        }
    }
}

/// The request field a merge parameter comes from.
fn merge_param(field: &str) -> String {
    match field {
        "weights" => "model".to_string(),
        other => format!("merge.{other}"),
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self::internal(e)
    }
}

impl From<AdapterError> for ApiError {
    fn from(e: AdapterError) -> Self {
        match e {
            AdapterError::Io { .. }
            | AdapterError::OutputExists { .. }
            | AdapterError::Export { .. } => Self::internal(e),
            AdapterError::Source { .. } => Self::bad("uri", e.to_string()),
            other => Self::bad("adapter", other.to_string()),
        }
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::InvalidInput { param, message } => Self::BadRequest {
                message,
                param: Some(param.to_string()),
            },
            BackendError::Cancelled => Self::internal("generation cancelled"),
            BackendError::Overloaded(_) => Self::Overloaded,
            BackendError::Timeout => Self::Timeout,
            BackendError::Failed(cause) => Self::Internal { cause },
        }
    }
}
