//! Prometheus metrics. One recorder per process (the exporter is global), rendered at
//! `GET /metrics` together with the engines' state read at scrape time. Names follow Prometheus
//! conventions; `knots:lora_requests_info` mirrors vLLM's `vllm:lora_requests_info` so
//! adapter-affinity routers can read which adapter sets are running and waiting.

use std::sync::OnceLock;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::cache::Outcome;
use crate::engine::{EngineStats, telemetry};
use crate::merge::AlignmentStats;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the recorder on first use and returns the handle that renders it.
pub fn handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ];
            let step_buckets = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
            let token_buckets = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(telemetry::STEP_TOKENS.into()),
                        &step_buckets,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(telemetry::INTER_TOKEN_LATENCY.into()),
                        &token_buckets,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(telemetry::TIME_TO_FIRST_TOKEN.into()),
                        &token_buckets,
                    )
                })
                .unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(handle) => handle,
                // Another recorder is installed (an embedding program's): render an empty one.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

pub fn request(route: &'static str, status: u16, seconds: f64) {
    counter!("knots_requests_total", "route" => route, "status" => status.to_string()).increment(1);
    histogram!("knots_request_duration_seconds", "route" => route).record(seconds);
}

pub fn tokens(kind: &'static str, n: usize) {
    counter!("knots_tokens_total", "kind" => kind).increment(n as u64);
}

pub fn merge_done(method: &'static str, seconds: f64) {
    counter!("knots_merges_total", "method" => method).increment(1);
    histogram!("knots_merge_duration_seconds", "method" => method).record(seconds);
}

pub fn cache_outcome(outcome: Outcome) {
    counter!("knots_merge_cache_requests_total", "outcome" => outcome.as_str()).increment(1);
}

pub fn cache_bytes(bytes: u64) {
    gauge!("knots_merge_cache_bytes").set(bytes as f64);
}

/// The alignment cache's totals since start (hits and misses per module looked up).
pub fn alignment_cache(stats: AlignmentStats) {
    counter!("knots_alignment_cache_requests_total", "outcome" => "hit").absolute(stats.hits);
    counter!("knots_alignment_cache_requests_total", "outcome" => "miss").absolute(stats.misses);
    gauge!("knots_alignment_cache_bytes").set(stats.bytes as f64);
}

pub fn cache_eviction() {
    counter!("knots_merge_cache_evictions_total").increment(1);
}

/// Per-arm experiment counters.
pub fn arm(experiment: &str, arm: &str, ok: bool, seconds: f64, tokens: usize) {
    let labels = [
        ("experiment", experiment.to_string()),
        ("arm", arm.to_string()),
    ];
    counter!("knots_experiment_requests_total", &labels).increment(1);
    if !ok {
        counter!("knots_experiment_errors_total", &labels).increment(1);
    }
    histogram!("knots_experiment_duration_seconds", &labels).record(seconds);
    counter!("knots_experiment_tokens_total", &labels).increment(tokens as u64);
}

/// The metrics text: the recorder's series, the engines' gauges, and one
/// `knots:lora_requests_info` series. `encoder_running` lists the adapter sets of running
/// encoder requests.
pub fn render(engines: &[(String, EngineStats)], encoder_running: &[String]) -> String {
    for (base, stats) in engines {
        let base = [("base", base.clone())];
        gauge!("knots_engine_waiting_requests", &base).set(stats.waiting as f64);
        gauge!("knots_engine_running_requests", &base).set(stats.running as f64);
        gauge!("knots_engine_kv_cache_usage", &base).set(stats.kv_usage);
    }
    let mut running: Vec<String> = encoder_running.to_vec();
    let mut waiting = Vec::new();
    for (_, stats) in engines {
        running.extend(stats.running_labels.iter().cloned());
        waiting.extend(stats.waiting_labels.iter().cloned());
    }
    running.sort();
    running.dedup();
    waiting.sort();
    waiting.dedup();
    let max_lora = engines.iter().map(|(_, s)| s.max_batch).max().unwrap_or(0);
    let mut text = handle().render();
    text.push_str(&lora_requests_info(&running, &waiting, max_lora));
    text
}

/// vLLM's form: exactly one series whose labels list the `model` strings of running and waiting
/// requests and whose value is the time of the scrape.
fn lora_requests_info(running: &[String], waiting: &[String], max_lora: usize) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let escape = |s: String| s.replace('\\', "\\\\").replace('"', "\\\"");
    format!(
        "# TYPE knots:lora_requests_info gauge\nknots:lora_requests_info{{running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\",max_lora=\"{max_lora}\"}} {now}\n",
        escape(running.join(",")),
        escape(waiting.join(",")),
    )
}
