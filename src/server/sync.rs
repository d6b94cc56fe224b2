//! Replicas that share one state database (PostgreSQL) agree on it: every [`INTERVAL`] a server
//! reads the stored adapter changes and experiments and applies what another replica changed —
//! an adapter registered elsewhere is loaded here (fetched through the adapter cache when it
//! came from a URI) with the digest it was registered with, one deleted elsewhere is dropped
//! with its merges, and experiments created or changed elsewhere take their stored lifecycle.
//! Feedback needs no step of its own: it is checked and stored in the shared database.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::adapter_admin;
use super::state::AppState;
use super::store::AdapterChange;

/// How often a replica reads what the others stored.
pub const INTERVAL: Duration = Duration::from_secs(2);

/// Runs the sync loop until the server shuts down.
pub async fn run(state: AppState) {
    let mut seen = Seen::default();
    loop {
        tokio::time::sleep(INTERVAL).await;
        if state.is_shutting_down() {
            return;
        }
        if let Err(error) = once(&state, &mut seen).await {
            tracing::warn!(%error, "state sync failed; retrying");
        }
    }
}

/// How long a registration that did not load here waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(60);

/// What the loop has done: the last change applied per adapter name, and when a change last
/// failed to load.
#[derive(Default)]
pub struct Seen {
    applied: HashMap<String, AdapterChange>,
    failed: HashMap<String, (AdapterChange, Instant)>,
}

/// One pass.
pub async fn once(state: &AppState, seen: &mut Seen) -> Result<(), super::store::StoreError> {
    let changes = {
        let store = state.store.clone();
        tokio::task::spawn_blocking(move || store.adapter_changes())
            .await
            .map_err(|e| super::store::StoreError::Postgres(e.to_string()))??
    };
    for change in changes {
        let name = match &change {
            AdapterChange::Registered { name, .. } | AdapterChange::Deleted { name } => {
                name.clone()
            }
        };
        if seen.applied.get(&name) == Some(&change) {
            continue;
        }
        let retry_later = seen
            .failed
            .get(&name)
            .is_some_and(|(c, at)| *c == change && at.elapsed() < RETRY_AFTER);
        if retry_later {
            continue;
        }
        if apply(state, &change).await {
            seen.failed.remove(&name);
            seen.applied.insert(name, change);
        } else {
            seen.failed.insert(name, (change, Instant::now()));
        }
    }
    let experiments = state.experiments.clone();
    let changed = tokio::task::spawn_blocking(move || experiments.refresh())
        .await
        .map_err(|e| super::store::StoreError::Postgres(e.to_string()))??;
    if changed > 0 {
        tracing::info!(changed, "experiments changed by another replica");
    }
    Ok(())
}

/// Brings the registry in line with one stored change; whether it is done (a registration that
/// does not load is tried again after [`RETRY_AFTER`]).
async fn apply(state: &AppState, change: &AdapterChange) -> bool {
    match change {
        AdapterChange::Deleted { name } => {
            if state.registry.remove(name).is_some() {
                let evicted = state.cache.evict_adapter(name).await;
                tracing::info!(adapter = %name, evicted, "adapter deleted by another replica");
            }
            true
        }
        AdapterChange::Registered {
            name,
            source,
            digest,
        } => {
            let current = state.registry.get(name);
            if current.is_some_and(|r| Some(r.adapter.digest.to_string()) == *digest) {
                return true;
            }
            let loaded = adapter_admin::fetch_and_load(
                &state.bases,
                &state.adapter_roots,
                &state.adapter_cache,
                source,
                name.clone(),
                digest.as_deref(),
            )
            .await;
            match loaded {
                Ok((entry, _)) => {
                    state.registry.insert(entry);
                    state.cache.evict_adapter(name).await;
                    tracing::info!(adapter = %name, %source, "adapter registered by another replica");
                    true
                }
                Err(error) => {
                    tracing::warn!(adapter = %name, %source, %error, "an adapter registered by another replica does not load here");
                    false
                }
            }
        }
    }
}
