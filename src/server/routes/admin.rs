//! Adapter and merge administration: list, register, delete and reload adapters; list, warm and
//! evict merges. Changing or removing an adapter drops every cached merge that used it.

use std::path::PathBuf;

use axum::Json;
use axum::extract::{Path, State};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::adapters::{AdapterUri, Owner, Registered, owner_of, valid_name};
use crate::server::adapter_admin;
use crate::server::auth::Caller;
use crate::server::call::{ModelRequest, admit};
use crate::server::error::ApiError;
use crate::server::spec::MergeField;
use crate::server::state::AppState;
use crate::server::store::AdapterChange;

fn describe(a: &Registered) -> Value {
    let ranks: std::collections::BTreeSet<usize> =
        a.adapter.modules.values().map(|m| m.rank()).collect();
    json!({
        "name": a.name, "base": a.base, "sha256": a.adapter.digest.to_string(),
        "owner": match &a.owner { Owner::Shared => None, Owner::Tenant(t) => Some(t) },
        "modules": a.adapter.modules.len(), "ranks": ranks, "bytes": a.delta.bytes(),
        "task": a.adapter.task.as_ref().and_then(|t| t.task.clone()).unwrap_or_else(|| a.name.clone()),
    })
}

pub async fn list_adapters(State(state): State<AppState>, caller: Caller) -> Json<Value> {
    let data: Vec<_> = state
        .registry
        .list()
        .iter()
        .filter(|a| caller.can_see(&a.owner))
        .map(|a| describe(a))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub name: String,
    /// A directory inside one of the server's adapter roots.
    pub path: Option<PathBuf>,
    /// Or a URI: `s3://bucket/prefix`, `hf://org/name[@revision]`, `file:///dir`.
    pub uri: Option<String>,
    /// The SHA-256 the adapter's content must have (as `GET /v1/adapters` reports it).
    pub digest: Option<String>,
}

/// Checks that `caller` is an admin and `name` a valid adapter name.
fn manageable(caller: &Caller, name: &str) -> Result<(), ApiError> {
    caller.require_admin()?;
    if !valid_name(name) {
        return Err(ApiError::bad(
            "name",
            format!(
                "{:?} is not a valid adapter name",
                name.escape_default().to_string()
            ),
        ));
    }
    Ok(())
}

pub async fn register(
    State(state): State<AppState>,
    caller: Caller,
    crate::server::wire::ApiJson(req): crate::server::wire::ApiJson<RegisterRequest>,
) -> Result<Json<Value>, ApiError> {
    manageable(&caller, &req.name)?;
    if state.registry.get(&req.name).is_some() {
        return Err(ApiError::Conflict {
            what: format!("adapter {:?}", req.name),
        });
    }
    let source = match (&req.path, &req.uri) {
        (Some(path), None) => path.to_string_lossy().into_owned(),
        (None, Some(uri)) => uri.clone(),
        _ => return Err(ApiError::bad("path", "give exactly one of path and uri")),
    };
    let (entry, source) = adapter_admin::fetch_and_load(
        &state.bases,
        &state.adapter_roots,
        &state.adapter_cache,
        &source,
        req.name.clone(),
        req.digest.as_deref(),
    )
    .await?;
    let body = describe(&entry);
    // Stored before it is served or acknowledged, so a restart registers it again.
    let digest = entry.adapter.digest.to_string();
    state
        .store
        .adapter_registered(&req.name, &source, &digest)?;
    state.registry.insert(entry);
    Ok(Json(body))
}

/// Loads an adapter on a blocking thread.
async fn load(state: &AppState, dir: PathBuf, name: String) -> Result<Registered, ApiError> {
    let bases = state.bases.clone();
    tokio::task::spawn_blocking(move || adapter_admin::load(&bases, &dir, name))
        .await
        .map_err(|e| ApiError::internal(format!("adapter load failed: {e}")))?
}

pub async fn delete_adapter(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    manageable(&caller, &name)?;
    if state.registry.get(&name).is_none() {
        return Err(ApiError::not_found(format!("adapter {name:?}")));
    }
    // Stored first: a restart must not bring a deleted adapter back.
    state.store.adapter_deleted(&name)?;
    state.registry.remove(&name);
    let evicted = state.cache.evict_adapter(&name).await;
    Ok(Json(json!({"deleted": name, "evicted_merges": evicted})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadRequest {
    pub name: String,
}

pub async fn reload(
    State(state): State<AppState>,
    caller: Caller,
    crate::server::wire::ApiJson(req): crate::server::wire::ApiJson<ReloadRequest>,
) -> Result<Json<Value>, ApiError> {
    manageable(&caller, &req.name)?;
    let old = state
        .registry
        .get(&req.name)
        .ok_or_else(|| ApiError::not_found(format!("adapter {:?}", req.name)))?;
    // A run-time registration from a URI is fetched again; any other re-reads its directory.
    let source = state
        .store
        .adapter_changes()?
        .into_iter()
        .find_map(|c| match c {
            AdapterChange::Registered { name, source, .. } if name == req.name => Some(source),
            _ => None,
        });
    let dir = match source.as_deref().map(AdapterUri::parse).transpose()? {
        Some(uri @ (AdapterUri::S3(_) | AdapterUri::Hub { .. })) => {
            state.adapter_cache.local_dir(&uri, true).await?
        }
        _ => old.adapter.path.clone(),
    };
    let entry = load(&state, dir, req.name.clone()).await?;
    let changed = entry.adapter.digest != old.adapter.digest;
    let body = describe(&entry);
    if let (Some(source), true) = (&source, changed) {
        // The new content is what a restart or another replica must load now.
        let digest = entry.adapter.digest.to_string();
        state.store.adapter_registered(&req.name, source, &digest)?;
    }
    state.registry.insert(entry);
    let evicted = if changed {
        state.cache.evict_adapter(&req.name).await
    } else {
        0
    };
    Ok(Json(
        json!({"adapter": body, "changed": changed, "evicted_merges": evicted}),
    ))
}

pub async fn list_merges(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    state.cache.sync().await;
    let data: Vec<_> = state
        .cache
        .entries()
        .iter()
        .filter(|e| e.key.members.iter().all(|m| caller.can_see(&owner_of(&m.name))))
        .map(|e| {
            let adapters: Vec<_> = e.key.members.iter().map(|m| json!({"name": m.name, "weight": m.weight()})).collect();
            json!({"id": e.key.id(), "key": e.key.to_string(), "base": e.key.base, "method": e.key.method.as_str(),
                   "adapters": adapters, "bytes": e.delta.bytes(), "merge_ms": e.merge_ms})
        })
        .collect();
    Ok(Json(
        json!({"object": "list", "data": data, "bytes": state.cache.weighted_bytes()}),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmRequest {
    pub model: String,
    #[serde(default)]
    pub merge: Option<MergeField>,
}

/// Merges a set ahead of traffic.
pub async fn warm(
    State(state): State<AppState>,
    caller: Caller,
    crate::server::wire::ApiJson(req): crate::server::wire::ApiJson<WarmRequest>,
) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    let model = ModelRequest::parse(&req.model, req.merge)?;
    // Admitted like any request: a slot (or 429) and the request deadline for the merge.
    let admitted = admit(&state, &caller, &model, None, None).await?;
    let target = admitted.target;
    let merge = target
        .merge
        .as_ref()
        .ok_or_else(|| ApiError::bad("model", "names no adapter set to merge"))?;
    Ok(Json(
        json!({"id": merge.key_id, "outcome": merge.outcome.as_str(), "merge_ms": merge.merge_ms,
                   "bytes": target.delta.as_ref().map_or(0, |d| d.bytes())}),
    ))
}

pub async fn evict(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    let visible = state.cache.entries().iter().any(|e| {
        e.key.id() == id
            && e.key
                .members
                .iter()
                .all(|m| caller.can_see(&owner_of(&m.name)))
    });
    if !visible || !state.cache.evict(&id).await {
        return Err(ApiError::not_found(format!("merge {id:?}")));
    }
    Ok(Json(json!({"evicted": id})))
}
