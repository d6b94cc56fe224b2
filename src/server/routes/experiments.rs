//! Experiments: create, list, report (per-arm statistics and each arm against the control),
//! lifecycle changes (weights, pause, resume, stop), feedback, and the side-by-side compare call.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use serde::Deserialize;
use serde_json::{Value, json};

use super::generate::answer;
use crate::adapters::Owner;
use crate::server::ab_stats::{self, Summary, quantile};
use crate::server::auth::{Caller, Role};
use crate::server::backend::Prompt;
use crate::server::error::ApiError;
use crate::server::experiments::{Change, ChangeError, Experiment, ExperimentConfig};
use crate::server::metrics;
use crate::server::state::AppState;
use crate::server::store::{ArmSamples, Refusal};
use crate::server::wire::{ApiJson, Endpoint, GenerationRequest};

/// The experiment `name` if `caller` may see it (else the same 404 as a missing one).
fn visible(state: &AppState, caller: &Caller, name: &str) -> Result<Arc<Experiment>, ApiError> {
    state
        .experiments
        .get(name)
        .filter(|e| caller.can_see(&e.owner))
        .ok_or_else(|| ApiError::not_found(format!("experiment {name:?}")))
}

/// The experiment `name` if `caller` may change it: an admin, or a user of its tenant.
fn manageable(state: &AppState, caller: &Caller, name: &str) -> Result<Arc<Experiment>, ApiError> {
    let e = visible(state, caller, name)?;
    let owns = matches!((&e.owner, &caller.tenant), (Owner::Tenant(t), Some(mine)) if t == mine);
    if caller.role == Role::Admin || (caller.role == Role::User && owns) {
        Ok(e)
    } else {
        Err(ApiError::Forbidden(
            "only an admin or the experiment's tenant may change it",
        ))
    }
}

/// Definition and lifecycle, without statistics.
fn outline(e: &Experiment) -> Value {
    let life = e.lifecycle();
    let arms: Vec<Value> = e
        .arms
        .iter()
        .map(|a| {
            json!({"name": a.name, "model": a.model, "weight": life.weights.get(&a.name),
                   "paused": life.paused_arms.contains(&a.name),
                   "merge": (!a.merge.is_empty()).then_some(&a.merge)})
        })
        .collect();
    json!({"name": e.name, "model": format!("exp:{}", e.name), "status": life.status,
           "control": e.control, "guardrails": e.guardrails, "arms": arms})
}

/// The full report: per-arm statistics and each arm against the control.
fn report(state: &AppState, e: &Experiment) -> Result<Value, ApiError> {
    let samples = state.experiments.samples(&e.name)?;
    let empty = ArmSamples::default();
    let of = |arm: &str| samples.get(arm).unwrap_or(&empty);
    let control = Summary::of(&of(&e.control).scores);
    let mut body = outline(e);
    for arm in body["arms"].as_array_mut().into_iter().flatten() {
        let name = arm["name"].as_str().unwrap_or_default().to_string();
        let s = of(&name);
        let feedback = Summary::of(&s.scores);
        let vs_control = match (&control, &feedback) {
            (Some(c), Some(f)) if name != e.control => ab_stats::compare(c, f, 0.05).map(|c| {
                json!({"difference": c.difference,
                    "ci95": [c.interval.0, c.interval.1], "p_value": c.p_value,
                    "significant": c.p_value <= 0.05})
            }),
            _ => None,
        };
        let stats = json!({
            "requests": s.requests, "errors": s.errors,
            "error_rate": (s.requests > 0).then(|| s.errors as f64 / s.requests as f64),
            "latency_p50_seconds": quantile(&s.seconds, 0.5),
            "latency_p95_seconds": quantile(&s.seconds, 0.95),
            "completion_tokens": s.completion_tokens,
            "feedback": {"count": s.scores.len(), "mean": feedback.map(|f| f.mean),
                         "ci95": feedback.filter(|f| f.n > 1).map(|f| { let (lo, hi) = f.interval95(); [lo, hi] })},
            "vs_control": vs_control,
        });
        if let (Some(arm), Some(stats)) = (arm.as_object_mut(), stats.as_object()) {
            arm.extend(stats.clone());
        }
    }
    body["statistics_method"] = json!(ab_stats::METHOD);
    body["events"] = json!(state.experiments.events(&e.name)?);
    Ok(body)
}

pub async fn list(State(state): State<AppState>, caller: Caller) -> Json<Value> {
    let data: Vec<Value> = state
        .experiments
        .all()
        .iter()
        .filter(|e| caller.can_see(&e.owner))
        .map(|e| outline(e))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

pub async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let e = visible(&state, &caller, &name)?;
    Ok(Json(report(&state, &e)?))
}

fn change_error(e: ChangeError) -> ApiError {
    match e {
        ChangeError::Invalid { field, reason } => ApiError::bad(field, reason),
        ChangeError::Exists(name) => ApiError::Conflict {
            what: format!("experiment {name:?}"),
        },
        ChangeError::Store(e) => e.into(),
    }
}

/// Creates an experiment: an admin for any tenant (or shared), a user for its own tenant.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(mut config): ApiJson<ExperimentConfig>,
) -> Result<Json<Value>, ApiError> {
    match caller.role {
        Role::Admin => {}
        Role::User => match (&config.tenant, &caller.tenant) {
            (None, Some(mine)) => config.tenant = Some(mine.clone()),
            (Some(t), Some(mine)) if t == mine => {}
            _ => {
                return Err(ApiError::Forbidden(
                    "a user may create experiments of its own tenant only",
                ));
            }
        },
        Role::Metrics => {
            return Err(ApiError::Forbidden(
                "a metrics key may only scrape /metrics",
            ));
        }
    }
    let e = state.experiments.create(config).map_err(change_error)?;
    Ok(Json(outline(&e)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightsRequest {
    pub weights: BTreeMap<String, f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArmRequest {
    /// One arm; the whole experiment when absent.
    #[serde(default)]
    pub arm: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    #[serde(default)]
    pub winner: Option<String>,
}

async fn apply(
    state: &AppState,
    caller: &Caller,
    name: &str,
    change: Change,
) -> Result<Json<Value>, ApiError> {
    let e = manageable(state, caller, name)?;
    state.experiments.change(&e, change).map_err(change_error)?;
    Ok(Json(outline(&e)))
}

/// Sets arm weights (a ramp-up).
pub async fn weights(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<WeightsRequest>,
) -> Result<Json<Value>, ApiError> {
    apply(&state, &caller, &name, Change::Weights(req.weights)).await
}

/// Pauses one arm, or the whole experiment (traffic goes to the control).
pub async fn pause(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<ArmRequest>,
) -> Result<Json<Value>, ApiError> {
    apply(&state, &caller, &name, Change::Pause { arm: req.arm }).await
}

pub async fn resume(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<ArmRequest>,
) -> Result<Json<Value>, ApiError> {
    apply(&state, &caller, &name, Change::Resume { arm: req.arm }).await
}

/// Stops the experiment, recording a winner (traffic goes to it, or to the control).
pub async fn stop(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<StopRequest>,
) -> Result<Json<Value>, ApiError> {
    apply(&state, &caller, &name, Change::Stop { winner: req.winner }).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateRequest {
    /// A task of the benchmark suite.
    pub task: String,
    /// Test examples to score per arm.
    #[serde(default = "default_examples")]
    pub examples: usize,
}

fn default_examples() -> usize {
    100
}

/// Scores every arm on a labelled task of the benchmark suite.
pub async fn evaluate(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<EvaluateRequest>,
) -> Result<Json<Value>, ApiError> {
    let e = visible(&state, &caller, &name)?;
    Ok(Json(
        crate::server::evaluate::evaluate(&state, &e, &req.task, req.examples).await?,
    ))
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
    if let Some(mean) = state.experiments.feedback_mean(&name, &arm)? {
        metrics::feedback_mean(&name, &arm, mean);
    }
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
