//! From a request's parsed `model` and `merge` field to what serves it: a base model and, for an
//! adapter or a set, the delta to apply — merged through the cache when needed, after the base
//! model's kind is checked against the route. Names the caller may not see are reported exactly
//! like names that do not exist.

use std::sync::Arc;

use super::auth::Caller;
use super::backend::BaseKind;
use super::cache::Outcome;
use super::call::ModelRequest;
use super::spec::{MergeField, ModelSpec};
use super::state::AppState;
use crate::adapters::Registered;
use crate::merge::{MergeKey, MergeParams, MergedDelta, Method};
use crate::server::error::ApiError;

/// How the merged delta of a request was obtained.
#[derive(Debug, Clone)]
pub struct MergeInfo {
    pub key_id: String,
    pub outcome: Outcome,
    pub merge_ms: f64,
}

/// What serves a request.
#[derive(Debug, Clone)]
pub struct Target {
    pub base: String,
    pub delta: Option<Arc<MergedDelta>>,
    /// The adapters involved, by registry name.
    pub adapters: Vec<Arc<Registered>>,
    pub merge: Option<MergeInfo>,
    /// `(experiment, arm)` when an experiment chose the model.
    pub arm: Option<(String, String)>,
}

impl Target {
    /// The `x-knots-merge` header value.
    pub fn merge_header(&self) -> String {
        match (&self.merge, self.adapters.as_slice()) {
            (Some(m), _) => format!(
                "key={}; outcome={}; ms={:.1}",
                m.key_id,
                m.outcome.as_str(),
                m.merge_ms
            ),
            (None, [one]) => format!("adapter={}", one.name),
            _ => "base".to_string(),
        }
    }

    pub fn adapter_names(&self) -> Vec<String> {
        self.adapters.iter().map(|a| a.name.clone()).collect()
    }
}

/// What a resolution is for: the request's `model` as sent, and the kind of base model its
/// route serves (`None`: any).
#[derive(Clone, Copy)]
struct Route<'a> {
    model: &'a str,
    kind: Option<BaseKind>,
}

impl Route<'_> {
    /// Refuses a base model of the wrong kind for the route, before any merge is computed.
    fn check(&self, state: &AppState, base: &str) -> Result<(), ApiError> {
        let Some(want) = self.kind else {
            return Ok(());
        };
        match state.base(base).map(|b| b.kind) {
            Some(kind) if kind == want => Ok(()),
            Some(BaseKind::Encoder) => Err(ApiError::bad(
                "model",
                format!(
                    "{} is served by an encoder; use /v1/embeddings or /v1/classify",
                    self.model
                ),
            )),
            Some(BaseKind::Generator) => Err(ApiError::bad(
                "model",
                format!(
                    "{} is served by a generation model; use /v1/completions or /v1/chat/completions",
                    self.model
                ),
            )),
            None => Err(ApiError::bad(
                "model",
                format!("the base model {base} of {} is not served", self.model),
            )),
        }
    }
}

/// Resolves `req` for `caller` on a route serving `kind`. `user` makes experiment arms sticky.
pub async fn resolve(
    state: &AppState,
    caller: &Caller,
    req: &ModelRequest,
    user: Option<&str>,
    kind: Option<BaseKind>,
) -> Result<Target, ApiError> {
    let route = Route {
        model: &req.model,
        kind,
    };
    match &req.spec {
        ModelSpec::Experiment(name) => {
            let exp = state
                .experiments
                .get(name)
                .filter(|e| caller.can_see(&e.owner));
            let exp = exp.ok_or_else(|| ApiError::not_found(format!("model {:?}", req.model)))?;
            if !req.merge.is_empty() {
                return Err(ApiError::bad(
                    "merge",
                    "an experiment's arms fix their models; merge cannot be given",
                ));
            }
            let arm = exp.pick(user);
            // Arms name adapters as the experiment's owner sees them, whoever calls.
            let owner = Caller::owner(&exp.owner);
            let mut target = resolve_spec(state, &owner, &arm.spec, &arm.merge, route).await?;
            target.arm = Some((exp.name.clone(), arm.name.clone()));
            Ok(target)
        }
        spec => resolve_spec(state, caller, spec, &req.merge, route).await,
    }
}

async fn resolve_spec(
    state: &AppState,
    caller: &Caller,
    spec: &ModelSpec,
    merge: &MergeField,
    route: Route<'_>,
) -> Result<Target, ApiError> {
    match spec {
        ModelSpec::Name(name) if state.base(name).is_some() => {
            if !merge.is_empty() {
                return Err(ApiError::bad(
                    "merge",
                    "merge parameters apply to adapters, not to a base model",
                ));
            }
            route.check(state, name)?;
            Ok(Target {
                base: name.clone(),
                delta: None,
                adapters: Vec::new(),
                merge: None,
                arm: None,
            })
        }
        ModelSpec::Name(name) if merge.is_empty() => {
            let adapter = lookup(state, caller, name)?;
            route.check(state, &adapter.base)?;
            Ok(Target {
                base: adapter.base.clone(),
                delta: Some(adapter.delta.clone()),
                adapters: vec![adapter],
                merge: None,
                arm: None,
            })
        }
        ModelSpec::Name(name) => {
            merge_set(state, caller, &[(name.clone(), 1.0)], None, merge, route).await
        }
        ModelSpec::Set { members, method } => {
            merge_set(state, caller, members, *method, merge, route).await
        }
        ModelSpec::Bundle(name) => {
            let bundle = state
                .bundles
                .iter()
                .find(|b| &b.name == name && caller.can_see(&b.owner));
            let bundle =
                bundle.ok_or_else(|| ApiError::not_found(format!("model \"bundle:{name}\"")))?;
            if !merge.is_empty() {
                return Err(ApiError::bad(
                    "merge",
                    "a bundle has stored merge parameters; merge cannot be given",
                ));
            }
            let (members, method) = match &bundle.spec {
                ModelSpec::Name(n) => (vec![(n.clone(), 1.0)], None),
                ModelSpec::Set { members, method } => (members.clone(), *method),
                _ => {
                    return Err(ApiError::internal(format!(
                        "bundle {name} has an invalid model"
                    )));
                }
            };
            // Members are the bundle owner's adapters, whoever calls.
            let owner = Caller::owner(&bundle.owner);
            merge_set(state, &owner, &members, method, &bundle.merge, route).await
        }
        ModelSpec::Experiment(_) => Err(ApiError::bad(
            "model",
            "an experiment arm cannot be an experiment",
        )),
    }
}

/// The adapter `name` as `caller` sees it: `tenant/name` first for a bare name, then shared.
fn lookup(state: &AppState, caller: &Caller, name: &str) -> Result<Arc<Registered>, ApiError> {
    let own = match (&caller.tenant, name.contains('/')) {
        (Some(t), false) => state.registry.get(&format!("{t}/{name}")),
        _ => None,
    };
    own.or_else(|| state.registry.get(name))
        .filter(|a| caller.can_see(&a.owner))
        .ok_or_else(|| ApiError::not_found(format!("model {name:?}")))
}

async fn merge_set(
    state: &AppState,
    caller: &Caller,
    members: &[(String, f64)],
    method: Option<Method>,
    merge: &MergeField,
    route: Route<'_>,
) -> Result<Target, ApiError> {
    if members.len() > state.limits.max_set_size {
        let reason = format!(
            "a set may merge at most {} adapters, got {}",
            state.limits.max_set_size,
            members.len()
        );
        return Err(ApiError::bad("model", reason));
    }
    let method = match (method, merge.method()?) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::bad(
                "merge.method",
                format!("model names {a} but merge.method is {b}"),
            ));
        }
        (a, b) => a.or(b).unwrap_or(MergeParams::DEFAULT_METHOD),
    };
    let params = MergeParams::new(method, merge.options())?;
    let resolved = members
        .iter()
        .map(|(name, w)| lookup(state, caller, name).map(|a| (a, *w)))
        .collect::<Result<Vec<_>, _>>()?;
    let base = resolved[0].0.base.clone();
    if let Some((other, _)) = resolved.iter().find(|(a, _)| a.base != base) {
        let reason = format!(
            "adapters of different base models: {} ({}) and {} ({base})",
            other.name, other.base, resolved[0].0.name
        );
        return Err(ApiError::bad("model", reason));
    }
    route.check(state, &base)?;
    let key = MergeKey::new(
        &base,
        resolved
            .iter()
            .map(|(a, w)| (a.name.clone(), a.adapter.digest, *w)),
        &params,
    )?;
    let key_id = key.id();
    let adapters = resolved.iter().map(|(a, _)| a.clone()).collect();
    let (entry, outcome) = state.cache.get_or_merge(key, resolved, params).await?;
    Ok(Target {
        base,
        delta: Some(entry.delta.clone()),
        adapters,
        merge: Some(MergeInfo {
            key_id,
            outcome,
            merge_ms: entry.merge_ms,
        }),
        arm: None,
    })
}
