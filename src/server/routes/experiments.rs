//! Experiments: list, per-arm statistics, feedback, and the side-by-side compare call.

use axum::Json;
use axum::extract::{Path, State};
use serde::Deserialize;
use serde_json::{Value, json};

use super::generate::answer;
use crate::server::auth::Caller;
use crate::server::backend::Prompt;
use crate::server::error::ApiError;
use crate::server::experiments::Experiment;
use crate::server::state::AppState;
use crate::server::store::Refusal;
use crate::server::wire::{ApiJson, Endpoint, GenerationRequest};

fn visible<'a>(
    state: &'a AppState,
    caller: &Caller,
    name: &str,
) -> Result<&'a Experiment, ApiError> {
    state
        .experiments
        .get(name)
        .filter(|e| caller.can_see(&e.owner))
        .ok_or_else(|| ApiError::not_found(format!("experiment {name:?}")))
}

fn summary(state: &AppState, e: &Experiment) -> Result<Value, ApiError> {
    let stats = state.experiments.totals(&e.name)?;
    let arms: Vec<_> = e
        .arms
        .iter()
        .map(|a| {
            let s = stats.get(&a.name).cloned().unwrap_or_default();
            let mean = |sum: f64, n: u64| if n > 0 { Some(sum / n as f64) } else { None };
            json!({"name": a.name, "model": a.model, "weight": a.weight, "requests": s.requests, "errors": s.errors,
                   "mean_latency_seconds": mean(s.total_seconds, s.requests), "completion_tokens": s.completion_tokens,
                   "feedback_count": s.feedback_count, "mean_feedback": mean(s.feedback_sum, s.feedback_count)})
        })
        .collect();
    Ok(json!({"name": e.name, "model": format!("exp:{}", e.name), "arms": arms}))
}

pub async fn list(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let data = state
        .experiments
        .list
        .iter()
        .filter(|e| caller.can_see(&e.owner))
        .map(|e| summary(&state, e))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(json!({"object": "list", "data": data})))
}

pub async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(summary(&state, visible(&state, &caller, &name)?)?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Feedback {
    pub request_id: String,
    pub score: f64,
}

pub async fn feedback(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    ApiJson(fb): ApiJson<Feedback>,
) -> Result<Json<Value>, ApiError> {
    visible(&state, &caller, &name)?;
    if !fb.score.is_finite() {
        return Err(ApiError::bad("score", "must be a finite number"));
    }
    let arm = state
        .experiments
        .feedback(&fb.request_id, &name, caller.key_id.as_deref(), fb.score)?
        .map_err(|refusal| match refusal {
            Refusal::Unknown => ApiError::not_found(format!(
                "request {:?} of experiment {name:?} for this key",
                fb.request_id
            )),
            Refusal::Scored => ApiError::Conflict {
                what: format!("feedback for request {:?}", fb.request_id),
            },
        })?;
    Ok(Json(
        json!({"experiment": name, "arm": arm, "recorded": true}),
    ))
}

pub async fn compare(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<GenerationRequest>,
) -> Result<Json<Value>, ApiError> {
    let exp = visible(&state, &caller, &name)?;
    if req.model.is_some() {
        return Err(ApiError::bad(
            "model",
            "the arms name the models; leave model out",
        ));
    }
    let (prompt, endpoint) = if req.messages.is_some() {
        (Prompt::Chat(req.messages()?), Endpoint::Chat)
    } else {
        (Prompt::Text(req.prompt()?), Endpoint::Completion)
    };
    let sampling = req.sampling(state.limits.default_max_tokens, endpoint)?;
    if req.choices()? != 1 || sampling.logprobs.is_some() {
        return Err(ApiError::bad(
            if sampling.logprobs.is_some() {
                "logprobs"
            } else {
                "n"
            },
            "a comparison gives one answer per arm, without log-probabilities",
        ));
    }
    let mut answers = Vec::new();
    for arm in &exp.arms {
        let (text, finished, target) = answer(
            &state,
            &caller,
            &arm.model,
            prompt.clone(),
            sampling.clone(),
        )
        .await?;
        answers.push(json!({"arm": arm.name, "model": arm.model, "text": text, "finish_reason": finished.finish_reason,
                            "usage": crate::server::wire::Usage::new(finished.prompt_tokens, finished.completion_tokens),
                            "merge": target.merge_header()}));
    }
    Ok(Json(json!({"experiment": name, "answers": answers})))
}
