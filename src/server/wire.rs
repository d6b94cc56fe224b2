//! OpenAI wire types and the JSON extractor that turns every malformed body into a 400 naming
//! the offending field (or 413 when too large).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::backend::{ChatMessage, FinishReason, Sampling};
use super::spec::MergeField;
use super::state::AppState;
use crate::error::ApiError;

/// A JSON body, parsed with the path of the first bad field kept for the error.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge
            } else {
                ApiError::bad("body", e.body_text())
            }
        })?;
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        serde_path_to_error::deserialize(de)
            .map(ApiJson)
            .map_err(|e| {
                let path = e.path().to_string();
                let param = if matches!(path.as_str(), "" | "." | "?") {
                    "body".to_string()
                } else {
                    path
                };
                ApiError::bad(param, format!("invalid JSON body: {}", e.inner()))
            })
    }
}

/// A string or a list of strings (`prompt`, `stop`, `input`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// The body of `/v1/completions` (`prompt`), `/v1/chat/completions` (`messages`) and the
/// experiments' compare call (either). One type without `flatten`, so a bad field is named.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationRequest {
    pub model: Option<String>,
    pub prompt: Option<OneOrMany>,
    pub messages: Option<Vec<WireMessage>>,
    pub max_tokens: Option<i64>,
    /// The chat API's newer name for `max_tokens`.
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub n: Option<i64>,
    pub seed: Option<u64>,
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub user: Option<String>,
    pub merge: Option<MergeField>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

impl GenerationRequest {
    /// Validated sampling settings; `default_max` when no `max_tokens` is given.
    pub fn sampling(&self, default_max: usize) -> Result<Sampling, ApiError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::bad(
                "n",
                format!("only n = 1 is supported, got {n}"),
            ));
        }
        let max = self.max_completion_tokens.or(self.max_tokens);
        let max_tokens = match max {
            None => default_max,
            Some(m) if m >= 1 => m as usize,
            Some(m) => {
                return Err(ApiError::bad(
                    "max_tokens",
                    format!("must be at least 1, got {m}"),
                ));
            }
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad(
                "temperature",
                format!("must be in [0, 2], got {temperature}"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad(
                "top_p",
                format!("must be in (0, 1], got {top_p}"),
            ));
        }
        let top_k = match self.top_k {
            None | Some(0) | Some(-1) => None,
            Some(k) if k > 0 => Some(k as usize),
            Some(k) => return Err(ApiError::bad("top_k", format!("must be positive, got {k}"))),
        };
        let stop = self
            .stop
            .clone()
            .map(OneOrMany::into_vec)
            .unwrap_or_default();
        if stop.len() > 4 || stop.iter().any(String::is_empty) {
            return Err(ApiError::bad("stop", "at most 4 non-empty stop sequences"));
        }
        Ok(Sampling {
            max_tokens,
            max_tokens_given: max.is_some(),
            temperature,
            top_p,
            top_k,
            seed: self.seed,
            stop,
        })
    }

    pub fn merge_field(&self) -> MergeField {
        self.merge.clone().unwrap_or_default()
    }
}

/// A chat message's `content`: a string, or a list of parts of which text parts are used.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WireMessage {
    pub role: String,
    pub content: Content,
}

impl GenerationRequest {
    /// `model`, which the generation endpoints require.
    pub fn model(&self) -> Result<String, ApiError> {
        self.model
            .clone()
            .ok_or_else(|| ApiError::bad("model", "is required"))
    }

    /// The one `prompt` of a completion request.
    pub fn prompt(&self) -> Result<String, ApiError> {
        if self.messages.is_some() {
            return Err(ApiError::bad(
                "messages",
                "belongs to /v1/chat/completions; give prompt",
            ));
        }
        match self.prompt.clone().map(OneOrMany::into_vec).as_deref() {
            Some([one]) => Ok(one.clone()),
            Some(_) => Err(ApiError::bad("prompt", "exactly one prompt per request")),
            None => Err(ApiError::bad("prompt", "is required")),
        }
    }

    /// The validated chat `messages`.
    pub fn messages(&self) -> Result<Vec<ChatMessage>, ApiError> {
        if self.prompt.is_some() {
            return Err(ApiError::bad(
                "prompt",
                "belongs to /v1/completions; give messages",
            ));
        }
        let messages = self.messages.as_deref().unwrap_or_default();
        if messages.is_empty() {
            return Err(ApiError::bad("messages", "must not be empty"));
        }
        messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                if !matches!(
                    m.role.as_str(),
                    "system" | "user" | "assistant" | "developer"
                ) {
                    return Err(ApiError::bad(
                        format!("messages[{i}].role"),
                        format!("unknown role {:?}", m.role),
                    ));
                }
                let content = match &m.content {
                    Content::Text(t) => t.clone(),
                    Content::Parts(parts) => {
                        if let Some(p) = parts.iter().find(|p| p.kind != "text") {
                            return Err(ApiError::bad(
                                format!("messages[{i}].content"),
                                format!("unsupported part type {:?}", p.kind),
                            ));
                        }
                        parts
                            .iter()
                            .filter_map(|p| p.text.clone())
                            .collect::<Vec<_>>()
                            .join("")
                    }
                };
                let role = if m.role == "developer" {
                    "system".to_string()
                } else {
                    m.role.clone()
                };
                Ok(ChatMessage { role, content })
            })
            .collect()
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

pub fn finish_str(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

#[derive(Debug, Deserialize)]
pub struct EmbeddingsRequest {
    pub model: String,
    pub input: OneOrMany,
    pub merge: Option<MergeField>,
    pub encoding_format: Option<String>,
    pub user: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ClassifyRequest {
    pub model: String,
    pub input: OneOrMany,
    /// A task (adapter) name, or `"joint"` for the union of every task's labels.
    pub task: Option<String>,
    pub top_k: Option<i64>,
    pub merge: Option<MergeField>,
    pub user: Option<String>,
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A fresh request id with the given prefix (`cmpl`, `chatcmpl`, …).
pub fn request_id(prefix: &str) -> String {
    format!(
        "{prefix}-{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}
