//! The HTTP server: OpenAI-compatible routes where every request can name an adapter set, plus
//! classification, administration, experiments, health and metrics.
//!
//! Step in the data flow: JSON → typed request → tenant check → registry → merge cache →
//! backend (model engine) → JSON or SSE. Handlers never touch a tensor.

pub mod ab_stats;
pub mod adapter_admin;
pub mod auth;
pub mod backend;
pub mod bundles;
pub mod cache;
pub mod call;
pub mod config;
pub mod engine_backend;
pub mod error;
pub mod evaluate;
pub mod experiments;
pub mod inflight;
pub mod merge_store;
pub mod metrics;
pub mod resolve;
pub mod routes;
pub mod spec;
pub mod state;
pub mod store;
pub mod sync;
pub mod wire;

use std::future::Future;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;

use crate::adapters::LoraAdapter;
use crate::server::error::ApiError;
use backend::BaseInfo;
use state::AppState;

/// The router of the whole API.
pub fn app(state: AppState) -> Router {
    let body_limit = state.limits.body_limit_bytes;
    Router::new()
        .route("/v1/completions", post(routes::generate::completions))
        .route("/v1/chat/completions", post(routes::generate::chat))
        .route("/v1/embeddings", post(routes::encode::embeddings))
        .route("/v1/classify", post(routes::encode::classify))
        .route("/v1/models", get(routes::models::list))
        .route(
            "/v1/adapters",
            get(routes::admin::list_adapters).post(routes::admin::register),
        )
        .route("/v1/adapters/reload", post(routes::admin::reload))
        .route(
            "/v1/adapters/{*name}",
            delete(routes::admin::delete_adapter),
        )
        .route(
            "/v1/merges",
            get(routes::admin::list_merges).post(routes::admin::warm),
        )
        .route("/v1/merges/{id}", delete(routes::admin::evict))
        .route(
            "/v1/experiments",
            get(routes::experiments::list).post(routes::experiments::create),
        )
        .route("/v1/experiments/{name}", get(routes::experiments::show))
        .route(
            "/v1/experiments/{name}/weights",
            post(routes::experiments::weights),
        )
        .route(
            "/v1/experiments/{name}/pause",
            post(routes::experiments::pause),
        )
        .route(
            "/v1/experiments/{name}/resume",
            post(routes::experiments::resume),
        )
        .route(
            "/v1/experiments/{name}/stop",
            post(routes::experiments::stop),
        )
        .route(
            "/v1/experiments/{name}/evaluate",
            post(routes::experiments::evaluate),
        )
        .route(
            "/v1/experiments/{name}/feedback",
            post(routes::experiments::feedback),
        )
        .route(
            "/v1/experiments/{name}/compare",
            post(routes::experiments::compare),
        )
        .route("/health", get(routes::health::health))
        .route("/ready", get(routes::health::ready))
        .route("/metrics", get(routes::health::prometheus))
        .fallback(|| async { ApiError::not_found("route") })
        .layer(middleware::from_fn(observe))
        .layer(CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                ApiError::internal("a request handler panicked").into_response()
            },
        ))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// The router of the `--metrics-port` listener: metrics, liveness and readiness, no key.
pub fn metrics_app(state: AppState) -> Router {
    Router::new()
        .route("/health", get(routes::health::health))
        .route("/ready", get(routes::health::ready))
        .route("/metrics", get(routes::health::prometheus_open))
        .fallback(|| async { ApiError::not_found("route") })
        .with_state(state)
}

/// Request metrics and a log line per request.
async fn observe(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let route: &'static str = route_label(&route);
    let started = Instant::now();
    let method = req.method().clone();
    let response = next.run(req).await;
    let status = response.status();
    metrics::request(route, status.as_u16(), started.elapsed().as_secs_f64());
    let merge = response
        .headers()
        .get(routes::MERGE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    tracing::info!(%method, route, status = status.as_u16(), ms = started.elapsed().as_secs_f64() * 1e3, merge, "request");
    response
}

/// Every route `app` serves, as `(method, path)`; the OpenAPI document is checked against it.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/classify"),
    ("GET", "/v1/models"),
    ("GET", "/v1/adapters"),
    ("POST", "/v1/adapters"),
    ("POST", "/v1/adapters/reload"),
    ("DELETE", "/v1/adapters/{*name}"),
    ("GET", "/v1/merges"),
    ("POST", "/v1/merges"),
    ("DELETE", "/v1/merges/{id}"),
    ("GET", "/v1/experiments"),
    ("POST", "/v1/experiments"),
    ("POST", "/v1/experiments/{name}/weights"),
    ("POST", "/v1/experiments/{name}/pause"),
    ("POST", "/v1/experiments/{name}/resume"),
    ("POST", "/v1/experiments/{name}/stop"),
    ("POST", "/v1/experiments/{name}/evaluate"),
    ("GET", "/v1/experiments/{name}"),
    ("POST", "/v1/experiments/{name}/feedback"),
    ("POST", "/v1/experiments/{name}/compare"),
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
];

/// A static label per known route (metrics labels must not grow with user input).
fn route_label(route: &str) -> &'static str {
    ROUTES
        .iter()
        .map(|(_, path)| *path)
        .find(|p| *p == route)
        .unwrap_or("unmatched")
}

/// The served base an adapter attaches to: the one its `base_model_name_or_path` names (by id or
/// alias), or the only base of the right kind when it names none that is served.
pub fn attach_base(bases: &[BaseInfo], adapter: &LoraAdapter) -> Result<String, String> {
    let named = adapter
        .config
        .base_model_name_or_path
        .as_deref()
        .unwrap_or("");
    let matches = |b: &&BaseInfo| {
        b.id == named
            || b.aliases.iter().any(|a| {
                a == named
                    || named.ends_with(&format!("/{a}"))
                    || a.ends_with(named) && !named.is_empty()
            })
    };
    if let Some(base) = bases.iter().find(matches) {
        return Ok(base.id.clone());
    }
    match bases {
        [only] => Ok(only.id.clone()),
        _ => Err(format!(
            "adapter {} names base {named:?}, which is not served (served: {})",
            adapter.name,
            bases
                .iter()
                .map(|b| b.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Serves `app(state)` on `listener` until `shutdown` resolves; then stops accepting, lets
/// in-flight requests finish for up to `grace`, and returns.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let flag = state.clone();
    let server = axum::serve(listener, app(state)).with_graceful_shutdown(async move {
        shutdown.await;
        flag.begin_shutdown();
        tracing::info!(
            grace_seconds = grace.as_secs_f64(),
            "shutting down: finishing in-flight requests"
        );
        let _ = stop_tx.send(true);
    });
    let mut stop = stop_rx;
    tokio::select! {
        result = server => result,
        _ = async {
            let _ = stop.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!("grace period over: dropping the remaining requests");
            Ok(())
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
