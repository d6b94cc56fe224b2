//! The one path from a request to model work. A request's `model` and `merge` field are parsed
//! together into a [`ModelRequest`] before anything runs; then [`admit`] takes an admission slot
//! (429 when all are taken), resolves what serves the request under the request's deadline —
//! checking the base model's kind before any merge is computed — and, for encoder work, marks the
//! set as running for the metrics (generation is reported by its engine).

use std::time::Instant;

use tokio::sync::OwnedSemaphorePermit;

use super::auth::Caller;
use super::backend::BaseKind;
use super::inflight::{Phase, Running};
use super::resolve::{Target, resolve};
use super::spec::{MergeField, ModelSpec};
use super::state::AppState;
use crate::merge::{MergeParams, Method};
use crate::server::error::ApiError;

/// A request's `model` string and `merge` field, syntactically valid and consistent.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRequest {
    /// As the client sent it (reported in responses and metrics).
    pub model: String,
    pub spec: ModelSpec,
    pub merge: MergeField,
}

impl ModelRequest {
    /// Parses `model` and checks `merge` against it: a known method, the same method when both
    /// name one, and parameters in range for it. Whether names exist is decided at resolution.
    pub fn parse(model: &str, merge: Option<MergeField>) -> Result<Self, ApiError> {
        let spec: ModelSpec = model.parse()?;
        let merge = merge.unwrap_or_default();
        let named = merge.method()?;
        if let ModelSpec::Set {
            method: Some(a), ..
        } = &spec
            && let Some(b) = named
            && *a != b
        {
            return Err(ApiError::bad(
                "merge.method",
                format!("model names {a} but merge.method is {b}"),
            ));
        }
        if !merge.is_empty() {
            MergeParams::new(method_of(&spec, named), merge.options())?;
        }
        Ok(Self {
            model: model.to_string(),
            spec,
            merge,
        })
    }

    /// The merge method this request asks for (the default when neither `model` nor `merge`
    /// names one).
    pub fn method(&self) -> Result<Method, ApiError> {
        Ok(method_of(&self.spec, self.merge.method()?))
    }
}

fn method_of(spec: &ModelSpec, named: Option<Method>) -> Method {
    let in_model = match spec {
        ModelSpec::Set { method, .. } => *method,
        _ => None,
    };
    in_model.or(named).unwrap_or(MergeParams::DEFAULT_METHOD)
}

/// A request admitted to model work: what serves it, its deadline, its slot and its mark.
pub struct Admitted {
    pub target: Target,
    pub started: Instant,
    /// When the request's time is up, merge and prefill included.
    pub deadline: Instant,
    slot: Option<OwnedSemaphorePermit>,
    _running: Option<Running>,
}

impl Admitted {
    /// Frees the admission slot once the work is queued with an engine that bounds its own queue.
    pub fn release_slot(&mut self) {
        self.slot = None;
    }
}

/// Admits `req` for `caller`: a slot, then its target under the deadline. `kind` is the kind
/// of base model the route serves (`None` accepts any, as warming a merge does); `user` makes
/// experiment arms sticky.
pub async fn admit(
    state: &AppState,
    caller: &Caller,
    req: &ModelRequest,
    user: Option<&str>,
    kind: Option<BaseKind>,
) -> Result<Admitted, ApiError> {
    let started = Instant::now();
    let deadline = started + state.limits.request_timeout;
    let slot = state.admit()?;
    let waiting = state.inflight.start(Phase::Waiting, req.model.clone());
    let resolving = resolve(state, caller, req, user, kind);
    let target = tokio::time::timeout_at(deadline.into(), resolving)
        .await
        .map_err(|_| ApiError::Timeout)??;
    drop(waiting);
    let running = (kind == Some(BaseKind::Encoder))
        .then(|| state.inflight.start(Phase::Running, req.model.clone()));
    Ok(Admitted {
        target,
        started,
        deadline,
        slot: Some(slot),
        _running: running,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_and_merge_are_checked_together() {
        let merge = |method: &str, density: Option<f64>| MergeField {
            method: Some(method.into()),
            density,
            ..MergeField::default()
        };
        assert!(ModelRequest::parse("a+b@ties", Some(merge("ties", Some(0.3)))).is_ok());
        let conflict = ModelRequest::parse("a+b@ties", Some(merge("ta", None))).unwrap_err();
        assert!(
            matches!(conflict, ApiError::BadRequest { param: Some(p), .. } if p == "merge.method")
        );
        let range = ModelRequest::parse("a+b", Some(merge("ties", Some(1.5)))).unwrap_err();
        assert!(
            matches!(range, ApiError::BadRequest { param: Some(p), .. } if p.starts_with("merge."))
        );
        let unknown = ModelRequest::parse("a+b", Some(merge("nope", None))).unwrap_err();
        assert!(
            matches!(unknown, ApiError::BadRequest { param: Some(p), .. } if p == "merge.method")
        );
        let bad_model = ModelRequest::parse("a+", None).unwrap_err();
        assert!(matches!(bad_model, ApiError::BadRequest { param: Some(p), .. } if p == "model"));
        assert_eq!(
            ModelRequest::parse("a+b", None).unwrap().method().unwrap(),
            MergeParams::DEFAULT_METHOD
        );
    }
}
