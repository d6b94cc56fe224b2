//! OpenAI wire types and the JSON extractor that turns every malformed body into a 400 naming
//! the offending field (413 when too large, 415 when not sent as JSON).

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::backend::{ChatMessage, FinishReason, Sampling};
use super::spec::MergeField;
use super::state::AppState;
use crate::engine::MAX_TOP_LOGPROBS;
use crate::server::error::ApiError;

/// The most tokens one request's `logit_bias` may name (as OpenAI).
pub const MAX_LOGIT_BIAS: usize = 300;

/// A JSON body, parsed with the path of the first bad field kept for the error.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let content_type = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        if !content_type.as_deref().is_some_and(is_json) {
            return Err(ApiError::UnsupportedMediaType {
                found: content_type.unwrap_or_else(|| "none".into()),
            });
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge
            } else {
                ApiError::bad("body", e.body_text())
            }
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// A JSON body parsed into `T`; an error names the path of the first bad field (`body` when
/// the whole body is wrong).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let param = if matches!(path.as_str(), "" | "." | "?") {
            "body".to_string()
        } else {
            path
        };
        ApiError::bad(param, format!("invalid JSON body: {}", e.inner()))
    })
}

/// Whether a `Content-Type` names JSON: `application/json` or `application/<x>+json`, with any
/// parameters (`; charset=utf-8`).
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || essence
            .strip_prefix("application/")
            .is_some_and(|sub| sub.ends_with("+json"))
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
    /// Completions: how many alternatives to report per token (0-5). Chat: whether to report
    /// log-probabilities (with `top_logprobs` alternatives).
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<i64>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    /// Token id (as a string) → bias in [-100, 100].
    pub logit_bias: Option<BTreeMap<String, f64>>,
    // Fields knots does not implement: a request that needs them is refused, naming the field.
    pub response_format: Option<Value>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
}

/// Which generation endpoint a request came to: some fields differ between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completion,
    Chat,
}

/// The most choices (`n`) one request may ask for.
pub const MAX_CHOICES: usize = 16;

/// The most alternatives per token a completion request's `logprobs` may ask for (as OpenAI).
pub const MAX_COMPLETION_LOGPROBS: usize = 5;

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

impl GenerationRequest {
    /// How many choices to generate (`n`, 1 to [`MAX_CHOICES`]).
    pub fn choices(&self) -> Result<usize, ApiError> {
        match self.n {
            None => Ok(1),
            Some(n) if (1..=MAX_CHOICES as i64).contains(&n) => Ok(n as usize),
            Some(n) => Err(ApiError::bad(
                "n",
                format!("must be in [1, {MAX_CHOICES}], got {n}"),
            )),
        }
    }

    /// Refuses fields that would change the answer in ways knots does not implement, naming the
    /// field; their neutral values (`echo: false`, `best_of: 1`, an empty `tools`, …) pass.
    pub fn refuse_unsupported(&self) -> Result<(), ApiError> {
        let refuse = |field: &str, why: &str| Err(ApiError::bad(field, why.to_string()));
        if let Some(format) = &self.response_format
            && !(format.is_null() || format == &serde_json::json!({"type": "text"}))
        {
            return refuse(
                "response_format",
                "only {\"type\": \"text\"} is supported (no JSON mode or schemas)",
            );
        }
        for (field, value) in [("tools", &self.tools), ("functions", &self.functions)] {
            if value
                .as_ref()
                .is_some_and(|v| !(v.is_null() || v.as_array().is_some_and(Vec::is_empty)))
            {
                return refuse(field, "tool and function calling are not supported");
            }
        }
        for (field, value) in [
            ("tool_choice", &self.tool_choice),
            ("function_call", &self.function_call),
        ] {
            if value
                .as_ref()
                .is_some_and(|v| !(v.is_null() || v == "none" || v == "auto"))
            {
                return refuse(field, "tool and function calling are not supported");
            }
        }
        if self.echo == Some(true) {
            return refuse("echo", "echoing the prompt is not supported");
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return refuse("suffix", "insertion (suffix) is not supported");
        }
        if self.best_of.is_some_and(|b| b != 1) {
            return refuse(
                "best_of",
                "only best_of = 1 is supported; use n for choices",
            );
        }
        Ok(())
    }

    /// The alternatives per token to report, or `None` when log-probabilities are not asked for.
    fn logprobs(&self, endpoint: Endpoint) -> Result<Option<usize>, ApiError> {
        let value = self.logprobs.as_ref().filter(|v| !v.is_null());
        match endpoint {
            Endpoint::Completion => {
                if self.top_logprobs.is_some() {
                    return Err(ApiError::bad(
                        "top_logprobs",
                        "belongs to /v1/chat/completions; completions take logprobs: <int>",
                    ));
                }
                match value.map(Value::as_i64) {
                    None => Ok(None),
                    Some(Some(k)) if (0..=MAX_COMPLETION_LOGPROBS as i64).contains(&k) => {
                        Ok(Some(k as usize))
                    }
                    Some(_) => Err(ApiError::bad(
                        "logprobs",
                        format!("must be an integer in [0, {MAX_COMPLETION_LOGPROBS}]"),
                    )),
                }
            }
            Endpoint::Chat => {
                let wanted = match value.map(Value::as_bool) {
                    None => false,
                    Some(Some(b)) => b,
                    Some(None) => return Err(ApiError::bad("logprobs", "must be a boolean")),
                };
                let top = match self.top_logprobs {
                    None => 0,
                    Some(k) if (0..=MAX_TOP_LOGPROBS as i64).contains(&k) => k as usize,
                    Some(k) => {
                        return Err(ApiError::bad(
                            "top_logprobs",
                            format!("must be in [0, {MAX_TOP_LOGPROBS}], got {k}"),
                        ));
                    }
                };
                if self.top_logprobs.is_some() && !wanted {
                    return Err(ApiError::bad("top_logprobs", "needs logprobs: true"));
                }
                Ok(wanted.then_some(top))
            }
        }
    }

    /// `logit_bias` as token ids and biases in [-100, 100] (ids are checked against the
    /// vocabulary by the engine).
    fn logit_bias(&self) -> Result<Vec<(u32, f64)>, ApiError> {
        let Some(map) = &self.logit_bias else {
            return Ok(Vec::new());
        };
        if map.len() > MAX_LOGIT_BIAS {
            return Err(ApiError::bad(
                "logit_bias",
                format!("at most {MAX_LOGIT_BIAS} tokens"),
            ));
        }
        map.iter()
            .map(|(token, &bias)| {
                let id = token.parse::<u32>().map_err(|_| {
                    ApiError::bad("logit_bias", format!("keys are token ids, got {token:?}"))
                })?;
                if !(-100.0..=100.0).contains(&bias) {
                    return Err(ApiError::bad(
                        "logit_bias",
                        format!("the bias of token {id} must be in [-100, 100], got {bias}"),
                    ));
                }
                Ok((id, bias))
            })
            .collect()
    }

    /// Validated sampling settings for `endpoint`; `default_max` when no `max_tokens` is given.
    pub fn sampling(&self, default_max: usize, endpoint: Endpoint) -> Result<Sampling, ApiError> {
        self.refuse_unsupported()?;
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
        let penalty = |field: &str, value: Option<f64>| match value.unwrap_or(0.0) {
            p if (-2.0..=2.0).contains(&p) => Ok(p),
            p => Err(ApiError::bad(field, format!("must be in [-2, 2], got {p}"))),
        };
        Ok(Sampling {
            frequency_penalty: penalty("frequency_penalty", self.frequency_penalty)?,
            presence_penalty: penalty("presence_penalty", self.presence_penalty)?,
            logit_bias: self.logit_bias()?,
            logprobs: self.logprobs(endpoint)?,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        for ok in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/merge-patch+json",
        ] {
            assert!(is_json(ok), "{ok}");
        }
        for bad in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "",
            "json",
            "text/json+xml",
        ] {
            assert!(!is_json(bad), "{bad}");
        }
    }
}
