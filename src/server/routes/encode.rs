//! `POST /v1/embeddings` and `POST /v1/classify` on encoder models.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::headers;
use crate::adapters::Registered;
use crate::merge::MergedDelta;
use crate::server::auth::Caller;
use crate::server::backend::{Backend, BackendError, BaseKind, LabelScore, TaskHead};
use crate::server::call::{Admitted, ModelRequest, admit};
use crate::server::error::ApiError;
use crate::server::metrics;
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

/// Admits an encoder request (`model` and `merge` parsed together first).
async fn admit_encoder(
    state: &AppState,
    caller: &Caller,
    model: &str,
    merge: Option<MergeField>,
    user: Option<&str>,
) -> Result<Admitted, ApiError> {
    let req = ModelRequest::parse(model, merge)?;
    admit(state, caller, &req, user, Some(BaseKind::Encoder)).await
}

/// Runs `work` for the request `id`; a request an experiment arm serves is stored before it runs
/// and its outcome after.
async fn run<T: Send + 'static>(
    state: &AppState,
    caller: &Caller,
    call: &Admitted,
    id: &str,
    work: impl FnOnce(&dyn Backend, &str, Option<&Arc<MergedDelta>>, Instant) -> Result<T, BackendError>
    + Send
    + 'static,
) -> Result<T, ApiError> {
    let Some((exp, arm)) = &call.target.arm else {
        return run_blocking(state, call, work).await;
    };
    state
        .experiments
        .remember(id, exp, arm, caller.key_id.as_deref())?;
    let result = run_blocking(state, call, work).await;
    let seconds = call.started.elapsed().as_secs_f64();
    metrics::arm(exp, arm, result.is_ok(), seconds, 0);
    if let Err(e) = state
        .experiments
        .finished(exp, id, result.is_ok(), seconds, 0)
    {
        tracing::error!(request = %id, error = %e, "recording an experiment outcome failed");
    }
    result
}

/// Runs `work(backend, base, delta, deadline)` on a blocking thread, answering 504 at the
/// request's deadline (the encoder engine drops the job's remaining texts then too).
async fn run_blocking<T: Send + 'static>(
    state: &AppState,
    call: &Admitted,
    work: impl FnOnce(&dyn Backend, &str, Option<&Arc<MergedDelta>>, Instant) -> Result<T, BackendError>
    + Send
    + 'static,
) -> Result<T, ApiError> {
    let backend = state.backend.clone();
    let (base, delta) = (call.target.base.clone(), call.target.delta.clone());
    let deadline = call.deadline;
    let task = tokio::task::spawn_blocking(move || {
        work(backend.as_ref(), &base, delta.as_ref(), deadline)
    });
    match tokio::time::timeout_at(deadline.into(), task).await {
        Err(_) => Err(ApiError::Timeout),
        Ok(Err(e)) => Err(ApiError::internal(format!("encoder task failed: {e}"))),
        Ok(Ok(result)) => result.map_err(ApiError::from),
    }
}

pub async fn embeddings(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<EmbeddingsRequest>,
) -> Result<Response, ApiError> {
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(f) => {
            return Err(ApiError::bad(
                "encoding_format",
                format!("must be \"float\" or \"base64\", got {f:?}"),
            ));
        }
    };
    let inputs = inputs(&state, req.input)?;
    let call = admit_encoder(&state, &caller, &req.model, req.merge, req.user.as_deref()).await?;
    let id = request_id("emb");
    let (vectors, tokens) = run(
        &state,
        &caller,
        &call,
        &id,
        move |backend, base, delta, deadline| backend.embed(base, &inputs, delta, deadline),
    )
    .await?;
    metrics::tokens("prompt", tokens);
    let data: Vec<_> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                json!(base64_f32(v))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let body = json!({"object": "list", "data": data, "model": req.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}});
    Ok((headers(&call.target, &id), Json(body)).into_response())
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
    let call = admit_encoder(&state, &caller, &req.model, req.merge, req.user.as_deref()).await?;
    let heads = heads(&call.target.adapters, req.task.as_deref())?;
    let id = request_id("cls");
    let scores = run(
        &state,
        &caller,
        &call,
        &id,
        move |backend, base, delta, deadline| {
            backend.classify(base, &inputs, &heads, delta, deadline)
        },
    )
    .await?;
    let results: Vec<_> = scores.into_iter().map(|s| ranked(s, top_k)).collect();
    let body = json!({"object": "list", "model": req.model, "task": req.task.as_deref().unwrap_or("joint"), "data": results});
    Ok((headers(&call.target, &id), Json(body)).into_response())
}

/// The heads of the tasks asked for: one named task, or every task of the set (`joint`).
pub fn heads(
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

/// An adapter's head: its saved classifier (a non-empty matrix) if it has one, else label-text
/// embeddings.
fn head_of(a: &Registered) -> Option<TaskHead> {
    let info = a.adapter.task.as_ref();
    let weight = a.adapter.saved_modules.iter().find(|(k, w)| {
        (k.ends_with("classifier.weight") || k.ends_with("score.weight"))
            && matches!(w.shape[..], [n, h] if n > 0 && h > 0)
    });
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

/// A vector as OpenAI's `encoding_format: "base64"` sends it: the little-endian bytes of its
/// f32 values, in standard base64 (the official clients ask for this by default).
fn base64_f32(values: &[f32]) -> String {
    use base64::Engine;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
