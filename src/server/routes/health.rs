//! Liveness, readiness and metrics.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::json;

use crate::server::auth::{Caller, Role};
use crate::server::error::ApiError;
use crate::server::metrics;
use crate::server::state::AppState;

/// The process is up.
pub async fn health() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// The server takes traffic: models are loaded and it is not shutting down.
pub async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    if state.is_shutting_down() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "shutting_down"})),
        )
    } else {
        (
            StatusCode::OK,
            Json(
                json!({"status": "ready", "bases": state.bases.len(), "adapters": state.registry.len()}),
            ),
        )
    }
}

/// Prometheus text format. With keys configured it needs an admin or metrics key: the series
/// name every tenant's adapters and experiments.
pub async fn prometheus(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<impl IntoResponse, ApiError> {
    if !matches!(caller.role, Role::Admin | Role::Metrics) {
        return Err(ApiError::Forbidden(
            "/metrics needs an admin or metrics key",
        ));
    }
    Ok(render(&state))
}

/// The metrics text without a key, for the `--metrics-port` listener: routers and Prometheus
/// that cannot send a bearer token scrape it on a port the cluster network keeps private.
pub async fn prometheus_open(State(state): State<AppState>) -> impl IntoResponse {
    render(&state)
}

fn render(state: &AppState) -> impl IntoResponse + use<> {
    let engines = state.backend.engine_stats();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        metrics::render(&engines, &state.inflight, state.metrics_compat),
    )
}
