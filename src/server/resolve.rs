//! From a request's `model` (and `merge` field) to what serves it: a base model and, for an
//! adapter or a set, the delta to apply — merged through the cache when needed. Names the
//! caller may not see are reported exactly like names that do not exist.

use std::sync::Arc;

use super::auth::Caller;
use super::cache::Outcome;
use super::spec::{MergeField, ModelSpec};
use super::state::AppState;
use crate::adapters::Registered;
use crate::error::ApiError;
use crate::merge::{MergeKey, MergeParams, MergedDelta, Method};

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

/// Resolves `model` for `caller`. `user` makes experiment arms sticky.
pub async fn resolve(
    state: &AppState,
    caller: &Caller,
    model: &str,
    merge: &MergeField,
    user: Option<&str>,
) -> Result<Target, ApiError> {
    let spec: ModelSpec = model.parse()?;
    match spec {
        ModelSpec::Experiment(name) => {
            let exp = state
                .experiments
                .get(&name)
                .filter(|e| caller.can_see(&e.owner));
            let exp = exp.ok_or_else(|| ApiError::not_found(format!("model {model:?}")))?;
            let arm = exp.pick(user);
            let mut target = resolve_spec(state, caller, &arm.spec, &MergeField::default()).await?;
            target.arm = Some((exp.name.clone(), arm.name.clone()));
            Ok(target)
        }
        spec => resolve_spec(state, caller, &spec, merge).await,
    }
}

async fn resolve_spec(
    state: &AppState,
    caller: &Caller,
    spec: &ModelSpec,
    merge: &MergeField,
) -> Result<Target, ApiError> {
    match spec {
        ModelSpec::Name(name) if state.base(name).is_some() => {
            if !merge.is_empty() {
                return Err(ApiError::bad(
                    "merge",
                    "merge parameters apply to adapters, not to a base model",
                ));
            }
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
            Ok(Target {
                base: adapter.base.clone(),
                delta: Some(adapter.delta.clone()),
                adapters: vec![adapter],
                merge: None,
                arm: None,
            })
        }
        ModelSpec::Name(name) => {
            merge_set(state, caller, &[(name.clone(), 1.0)], None, merge).await
        }
        ModelSpec::Set { members, method } => {
            merge_set(state, caller, members, *method, merge).await
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
            merge_set(state, caller, &members, method, &bundle.merge).await
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
