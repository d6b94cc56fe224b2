//! `POST /v1/embeddings` and `POST /v1/classify` on encoder models.

use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::headers;
use crate::adapters::Registered;
use crate::error::ApiError;
use crate::server::auth::Caller;
use crate::server::backend::{BaseKind, LabelScore, TaskHead};
use crate::server::metrics;
use crate::server::resolve::{Target, resolve};
use crate::server::spec::MergeField;
use crate::server::state::AppState;
use crate::server::wire::{ApiJson, ClassifyRequest, EmbeddingsRequest, request_id};

/// Inputs of an encoder request, checked against the limits.
fn inputs(
    state: &AppState,
    input: crate::server::wire::OneOrMany,
) -> Result<Vec<String>, ApiError> {
    let inputs = input.into_vec();
    if inputs.is_empty() || inputs.len() > state.limits.max_batch {
        return Err(ApiError::bad(
            "input",
            format!(
                "give 1 to {} inputs, got {}",
                state.limits.max_batch,
                inputs.len()
            ),
        ));
    }
    Ok(inputs)
}

/// What an encoder request needs while it runs: its slot, its target and its in-flight mark.
struct EncoderCall {
    target: Target,
    _permit: tokio::sync::OwnedSemaphorePermit,
    _running: crate::server::inflight::Running,
}

impl EncoderCall {
    async fn start(
        state: &AppState,
        caller: &Caller,
        model: &str,
        merge: Option<&MergeField>,
        user: Option<&str>,
    ) -> Result<Self, ApiError> {
        let permit = state.admit()?;
        let target = encoder_target(state, caller, model, merge, user).await?;
        let running = state.inflight.start(vec![model.to_string()]);
        Ok(Self {
            target,
            _permit: permit,
            _running: running,
        })
    }

    /// Runs `work(backend, base, delta)` on a blocking thread under the request timeout.
    async fn run<T: Send + 'static>(
        &self,
        state: &AppState,
        work: impl FnOnce(
            &dyn crate::server::backend::Backend,
            &str,
            Option<&std::sync::Arc<crate::merge::MergedDelta>>,
            Instant,
        ) -> Result<T, crate::server::backend::BackendError>
        + Send
        + 'static,
    ) -> Result<T, ApiError> {
        let backend = state.backend.clone();
        let (base, delta) = (self.target.base.clone(), self.target.delta.clone());
        let deadline = Instant::now() + state.limits.request_timeout;
        blocking(state, move || {
            work(backend.as_ref(), &base, delta.as_ref(), deadline)
        })
        .await
    }
}

async fn encoder_target(
    state: &AppState,
    caller: &Caller,
    model: &str,
    req_merge: Option<&MergeField>,
    user: Option<&str>,
) -> Result<Target, ApiError> {
    let target = resolve(
        state,
        caller,
        model,
        &req_merge.cloned().unwrap_or_default(),
        user,
    )
    .await?;
    match state.base(&target.base).map(|b| b.kind) {
        Some(BaseKind::Encoder) => Ok(target),
        _ => Err(ApiError::bad(
            "model",
            format!(
                "{model} is served by a generation model; use /v1/completions or /v1/chat/completions"
            ),
        )),
    }
}

pub async fn embeddings(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<EmbeddingsRequest>,
) -> Result<Response, ApiError> {
    if let Some(f) = req.encoding_format.as_deref().filter(|f| *f != "float") {
        return Err(ApiError::bad(
            "encoding_format",
            format!("only \"float\" is supported, got {f:?}"),
        ));
    }
    let inputs = inputs(&state, req.input)?;
    let call = EncoderCall::start(
        &state,
        &caller,
        &req.model,
        req.merge.as_ref(),
        req.user.as_deref(),
    )
    .await?;
    let (vectors, tokens) = call
        .run(&state, move |backend, base, delta, deadline| {
            backend.embed(base, &inputs, delta, deadline)
        })
        .await?;
    metrics::tokens("prompt", tokens);
    let data: Vec<_> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| json!({"object": "embedding", "index": i, "embedding": v}))
        .collect();
    let body = json!({"object": "list", "data": data, "model": req.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}});
    Ok((headers(&call.target, &request_id("emb")), Json(body)).into_response())
}

pub async fn classify(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<ClassifyRequest>,
) -> Result<Response, ApiError> {
    let inputs = inputs(&state, req.input)?;
    let top_k = match req.top_k {
        None => 5,
        Some(k) if (1..=100).contains(&k) => k as usize,
        Some(k) => {
            return Err(ApiError::bad(
                "top_k",
                format!("must be in 1..=100, got {k}"),
            ));
        }
    };
    let call = EncoderCall::start(
        &state,
        &caller,
        &req.model,
        req.merge.as_ref(),
        req.user.as_deref(),
    )
    .await?;
    let heads = heads(&call.target.adapters, req.task.as_deref())?;
    let scores = call
        .run(&state, move |backend, base, delta, deadline| {
            backend.classify(base, &inputs, &heads, delta, deadline)
        })
        .await?;
    let results: Vec<_> = scores.into_iter().map(|s| ranked(s, top_k)).collect();
    let body = json!({"object": "list", "model": req.model, "task": req.task.as_deref().unwrap_or("joint"), "data": results});
    Ok((headers(&call.target, &request_id("cls")), Json(body)).into_response())
}

/// The heads of the tasks asked for: one named task, or every task of the set (`joint`).
fn heads(
    adapters: &[std::sync::Arc<Registered>],
    task: Option<&str>,
) -> Result<Vec<TaskHead>, ApiError> {
    let all: Vec<TaskHead> = adapters.iter().filter_map(|a| head_of(a)).collect();
    if all.is_empty() {
        return Err(ApiError::bad(
            "model",
            "no adapter of this model has a classification head (knots_task.json or a saved classifier)",
        ));
    }
    match task {
        None | Some("joint") => Ok(all),
        Some(name) => {
            let one: Vec<TaskHead> = all.into_iter().filter(|h| h.task == name).collect();
            if one.is_empty() {
                return Err(ApiError::bad(
                    "task",
                    format!("the model has no task {name:?}"),
                ));
            }
            Ok(one)
        }
    }
}

/// An adapter's head: its saved classifier if it has one, else label-text embeddings.
fn head_of(a: &Registered) -> Option<TaskHead> {
    let info = a.adapter.task.as_ref();
    let weight = a
        .adapter
        .saved_modules
        .iter()
        .find(|(k, _)| k.ends_with("classifier.weight") || k.ends_with("score.weight"));
    let classifier = weight.map(|(k, w)| {
        let bias_key = k.replace(".weight", ".bias");
        let bias = a
            .adapter
            .saved_modules
            .get(&bias_key)
            .map(|b| b.data.clone())
            .unwrap_or_else(|| vec![0.0; w.shape[0]]);
        (w.data.clone(), bias)
    });
    let labels: Vec<String> = match (info, &classifier) {
        (Some(i), _) => i.labels.clone(),
        (None, Some((_, bias))) => (0..bias.len()).map(|i| format!("LABEL_{i}")).collect(),
        (None, None) => return None,
    };
    let label_texts = info
        .and_then(|i| i.label_texts.clone())
        .unwrap_or_else(|| labels.clone());
    let task = info
        .and_then(|i| i.task.clone())
        .unwrap_or_else(|| a.name.clone());
    Some(TaskHead {
        task,
        labels,
        label_texts,
        classifier,
    })
}

fn ranked(mut scores: Vec<LabelScore>, top_k: usize) -> serde_json::Value {
    scores.sort_by(|a, b| b.score.total_cmp(&a.score));
    scores.truncate(top_k);
    let best = scores.first().cloned();
    json!({"label": best.as_ref().map(|b| &b.label), "task": best.as_ref().map(|b| &b.task), "score": best.map(|b| b.score), "top_k": scores})
}

/// Runs encoder work on a blocking thread under the request timeout.
async fn blocking<T: Send + 'static>(
    state: &AppState,
    work: impl FnOnce() -> Result<T, crate::server::backend::BackendError> + Send + 'static,
) -> Result<T, ApiError> {
    let task = tokio::task::spawn_blocking(work);
    match tokio::time::timeout(state.limits.request_timeout, task).await {
        Err(_) => Err(ApiError::Timeout),
        Ok(Err(e)) => Err(ApiError::internal(format!("encoder task failed: {e}"))),
        Ok(Ok(result)) => result.map_err(ApiError::from),
    }
}
