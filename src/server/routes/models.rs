//! `GET /v1/models`: the bases, adapters, bundles and experiments the caller can use.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use crate::server::auth::Caller;
use crate::server::state::AppState;
use crate::server::wire::unix_now;

fn model(id: &str, kind: &str, base: Option<&str>, extra: Value) -> Value {
    let mut v = json!({"id": id, "object": "model", "created": unix_now(), "owned_by": "knots", "kind": kind, "root": base.unwrap_or(id), "parent": base});
    if let (Some(obj), Value::Object(more)) = (v.as_object_mut(), extra) {
        obj.extend(more);
    }
    v
}

pub async fn list(State(state): State<AppState>, caller: Caller) -> Json<Value> {
    let mut data = Vec::new();
    for b in state.bases.iter() {
        data.push(model(
            &b.id,
            "base",
            None,
            json!({"task": b.kind, "max_model_len": b.context_length}),
        ));
    }
    for a in state
        .registry
        .list()
        .into_iter()
        .filter(|a| caller.can_see(&a.owner))
    {
        data.push(model(
            &a.name,
            "adapter",
            Some(&a.base),
            json!({"sha256": a.adapter.digest.to_string()}),
        ));
    }
    for b in state.bundles.iter().filter(|b| caller.can_see(&b.owner)) {
        data.push(model(
            &format!("bundle:{}", b.name),
            "bundle",
            None,
            json!({}),
        ));
    }
    for e in state
        .experiments
        .all()
        .iter()
        .filter(|e| caller.can_see(&e.owner))
    {
        let life = e.lifecycle();
        let arms: Vec<_> = e
            .arms
            .iter()
            .map(|a| json!({"name": a.name, "model": a.model, "weight": life.weights.get(&a.name)}))
            .collect();
        data.push(model(
            &format!("exp:{}", e.name),
            "experiment",
            None,
            json!({"arms": arms}),
        ));
    }
    Json(json!({"object": "list", "data": data}))
}
