//! The engine's own metrics, recorded through the `metrics` facade (the server installs the
//! Prometheus exporter and sets the histogram buckets by these names).

use std::time::Duration;

use metrics::histogram;

/// Tokens run per engine step (decode tokens plus prefill chunks).
pub const STEP_TOKENS: &str = "knots_engine_step_tokens";
/// Seconds from submission to the first generated token.
pub const TIME_TO_FIRST_TOKEN: &str = "knots_time_to_first_token_seconds";
/// Seconds between consecutive generated tokens of one sequence.
pub const INTER_TOKEN_LATENCY: &str = "knots_inter_token_latency_seconds";

pub(crate) fn step_tokens(n: usize) {
    histogram!(STEP_TOKENS).record(n as f64);
}

pub(crate) fn first_token(elapsed: Duration) {
    histogram!(TIME_TO_FIRST_TOKEN).record(elapsed.as_secs_f64());
}

pub(crate) fn inter_token(elapsed: Duration) {
    histogram!(INTER_TOKEN_LATENCY).record(elapsed.as_secs_f64());
}
