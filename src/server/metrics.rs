//! Prometheus metrics. One recorder per process (the exporter is global), rendered at
//! `GET /metrics` together with the engines' state read at scrape time. Every family is named
//! `knots_…` (no colons: Prometheus keeps those for recording rules) and has HELP and TYPE lines,
//! so `promtool check metrics` passes. `knots_lora_requests_info` has the form of vLLM's
//! `vllm:lora_requests_info` that adapter-affinity routers (the Gateway API inference extension's
//! endpoint picker) read: exactly one series, its value the scrape's Unix time, labels listing the
//! `model` strings of running and waiting requests. With [`Compat::Vllm`] the scrape also carries
//! vLLM's own names for the queue, running, KV-cache and LoRA series, so a picker configured for
//! vLLM works unchanged.

use std::fmt::Write as _;
use std::sync::OnceLock;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::cache::Outcome;
use super::inflight::{InFlight, Phase};
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
            let handle = match builder.install_recorder() {
                Ok(handle) => handle,
                // Another recorder is installed (an embedding program's): render an empty one.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            };
            describe();
            handle
        })
        .clone()
}

/// Extra metric names a scrape carries for routers built for another engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Compat {
    /// `knots_…` names only.
    #[default]
    None,
    /// Also vLLM's `vllm:` names for queue depth, running requests, KV-cache use and LoRA info.
    Vllm,
}

impl std::str::FromStr for Compat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "vllm" => Ok(Self::Vllm),
            other => Err(format!(
                "unknown metrics compatibility {other:?} (none, vllm)"
            )),
        }
    }
}

/// HELP text of every family the recorder exports.
fn describe() {
    describe_counter!("knots_requests_total", "HTTP requests by route and status.");
    describe_histogram!(
        "knots_request_duration_seconds",
        Unit::Seconds,
        "Time to answer an HTTP request (streamed responses: to the end of the stream's setup)."
    );
    describe_counter!(
        "knots_tokens_total",
        "Prompt and completion tokens processed."
    );
    describe_counter!("knots_merges_total", "Merges computed, by method.");
    describe_histogram!(
        "knots_merge_duration_seconds",
        Unit::Seconds,
        "Time to compute one merge, by method."
    );
    describe_counter!(
        "knots_merge_cache_requests_total",
        "Merge cache lookups by outcome (hit, miss, coalesced)."
    );
    describe_gauge!(
        "knots_merge_cache_bytes",
        Unit::Bytes,
        "Bytes the merge cache holds, converted copies included."
    );
    describe_counter!(
        "knots_merge_cache_evictions_total",
        "Merges evicted from the cache to stay within its budget."
    );
    describe_counter!(
        "knots_merge_store_requests_total",
        "Shared merge store lookups by outcome (fetched, absent, failed: computed instead)."
    );
    describe_histogram!(
        "knots_merge_store_fetch_seconds",
        Unit::Seconds,
        "Time to fetch, verify and decode one merge from the shared store."
    );
    describe_counter!(
        "knots_merge_store_writes_total",
        "Shared merge store writes by outcome (written, present, failed)."
    );
    describe_counter!(
        "knots_alignment_cache_requests_total",
        "Alignment cache lookups per module, by outcome."
    );
    describe_counter!(
        "knots_trim_cache_requests_total",
        "KnOTS-TIES trim threshold lookups per merge, by outcome."
    );
    describe_gauge!(
        "knots_alignment_cache_bytes",
        Unit::Bytes,
        "Bytes the alignment cache holds."
    );
    describe_counter!(
        "knots_experiment_requests_total",
        "Requests served by an experiment arm."
    );
    describe_counter!(
        "knots_experiment_errors_total",
        "Failed requests of an experiment arm."
    );
    describe_histogram!(
        "knots_experiment_duration_seconds",
        Unit::Seconds,
        "Time to serve a request of an experiment arm."
    );
    describe_counter!(
        "knots_experiment_tokens_total",
        "Completion tokens of an experiment arm."
    );
    describe_gauge!(
        "knots_experiment_feedback_mean",
        "Mean feedback score of an experiment arm."
    );
    describe_gauge!(
        "knots_engine_waiting_requests",
        "Generation requests waiting in a base model's engine queue."
    );
    describe_gauge!(
        "knots_engine_running_requests",
        "Sequences a base model's engine is running."
    );
    describe_gauge!(
        "knots_engine_kv_cache_usage_ratio",
        "Reserved share of a base model's KV cache, 0 to 1."
    );
    describe_gauge!(
        "knots_engine_weight_bytes",
        Unit::Bytes,
        "Bytes a base model's weights hold in memory as kept (packed, quantized, or f32 and panels)."
    );
    describe_histogram!(
        telemetry::STEP_TOKENS,
        "Tokens run per engine step (decode tokens plus prefill chunks)."
    );
    describe_histogram!(
        telemetry::TIME_TO_FIRST_TOKEN,
        Unit::Seconds,
        "Time from submission to a sequence's first generated token."
    );
    describe_histogram!(
        telemetry::INTER_TOKEN_LATENCY,
        Unit::Seconds,
        "Time between consecutive generated tokens of a sequence."
    );
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

/// A shared merge store lookup; `seconds` for one that fetched.
pub fn merge_store_fetch(outcome: &'static str, seconds: Option<f64>) {
    counter!("knots_merge_store_requests_total", "outcome" => outcome).increment(1);
    if let Some(s) = seconds {
        histogram!("knots_merge_store_fetch_seconds").record(s);
    }
}

pub fn merge_store_write(outcome: &'static str) {
    counter!("knots_merge_store_writes_total", "outcome" => outcome).increment(1);
}

pub fn cache_bytes(bytes: u64) {
    gauge!("knots_merge_cache_bytes").set(bytes as f64);
}

/// The alignment cache's totals since start (hits and misses per module looked up).
pub fn alignment_cache(stats: AlignmentStats) {
    counter!("knots_alignment_cache_requests_total", "outcome" => "hit").absolute(stats.hits);
    counter!("knots_alignment_cache_requests_total", "outcome" => "miss").absolute(stats.misses);
    gauge!("knots_alignment_cache_bytes").set(stats.bytes as f64);
    counter!("knots_trim_cache_requests_total", "outcome" => "hit").absolute(stats.trim_hits);
    counter!("knots_trim_cache_requests_total", "outcome" => "miss").absolute(stats.trim_misses);
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

/// The mean feedback score of an experiment arm, after each score.
pub fn feedback_mean(experiment: &str, arm: &str, mean: f64) {
    let labels = [
        ("experiment", experiment.to_string()),
        ("arm", arm.to_string()),
    ];
    gauge!("knots_experiment_feedback_mean", &labels).set(mean);
}

/// The metrics text: the recorder's series, the engines' gauges, one `knots_lora_requests_info`
/// series, and with `compat` the other engine's names. `inflight` adds the `model` strings of
/// running encoder requests, and of requests being resolved and merged as waiting.
pub fn render(engines: &[(String, EngineStats)], inflight: &InFlight, compat: Compat) -> String {
    for (base, stats) in engines {
        let base = [("base", base.clone())];
        gauge!("knots_engine_waiting_requests", &base).set(stats.waiting as f64);
        gauge!("knots_engine_running_requests", &base).set(stats.running as f64);
        gauge!("knots_engine_kv_cache_usage_ratio", &base).set(stats.kv_usage);
        if let Some(bytes) = stats.weight_bytes {
            gauge!("knots_engine_weight_bytes", &base).set(bytes as f64);
        }
    }
    let mut running = inflight.sets(Phase::Running);
    let mut waiting = inflight.sets(Phase::Waiting);
    for (_, stats) in engines {
        running.extend(stats.running_labels.iter().cloned());
        waiting.extend(stats.waiting_labels.iter().cloned());
    }
    running.sort();
    running.dedup();
    waiting.sort();
    waiting.dedup();
    let max_lora = engines.iter().map(|(_, s)| s.max_batch).max().unwrap_or(0);
    let info = LoraInfo {
        running: &running,
        waiting: &waiting,
        max_lora,
        now: unix_time(),
    };
    let mut text = handle().render();
    text.push_str(&info.family("knots_lora_requests_info"));
    if compat == Compat::Vllm {
        text.push_str(&vllm_families(engines));
        text.push_str(&info.family("vllm:lora_requests_info"));
    }
    text
}

fn unix_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Which request `model` strings are running and waiting.
struct LoraInfo<'a> {
    running: &'a [String],
    waiting: &'a [String],
    max_lora: usize,
    now: f64,
}

impl LoraInfo<'_> {
    /// vLLM's form: exactly one series whose labels list the `model` strings of running and
    /// waiting requests (comma-separated, as clients sent them) and whose value is the time of
    /// the scrape.
    fn family(&self, name: &str) -> String {
        let escape = |s: String| {
            s.replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n")
        };
        format!(
            "# HELP {name} Running and waiting adapter sets (request model strings); the value is the scrape time.\n\
             # TYPE {name} gauge\n\
             {name}{{running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\",max_lora=\"{}\"}} {}\n",
            escape(self.running.join(",")),
            escape(self.waiting.join(",")),
            self.max_lora,
            self.now,
        )
    }
}

/// A gauge family computed from an engine's state: name, help, value.
type EngineGauge = (&'static str, &'static str, fn(&EngineStats) -> f64);

/// vLLM's names for the engine gauges, one series per base model (`model_name`).
fn vllm_families(engines: &[(String, EngineStats)]) -> String {
    let families: [EngineGauge; 4] = [
        (
            "vllm:num_requests_waiting",
            "Requests waiting to be processed.",
            |s| s.waiting as f64,
        ),
        ("vllm:num_requests_running", "Requests running.", |s| {
            s.running as f64
        }),
        (
            "vllm:gpu_cache_usage_perc",
            "KV-cache usage, 1 means full.",
            |s| s.kv_usage,
        ),
        (
            "vllm:kv_cache_usage_perc",
            "KV-cache usage, 1 means full.",
            |s| s.kv_usage,
        ),
    ];
    let mut text = String::new();
    for (name, help, value) in families {
        let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (base, stats) in engines {
            let _ = writeln!(text, "{name}{{model_name=\"{base}\"}} {}", value(stats));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_info_is_one_escaped_series() {
        let running = vec!["a+b@knots-ties".to_string(), "bundle:x".to_string()];
        let waiting = vec!["q\"uote".to_string()];
        let info = LoraInfo {
            running: &running,
            waiting: &waiting,
            max_lora: 32,
            now: 1.5e9,
        };
        let text = info.family("knots_lora_requests_info");
        let series: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            series,
            [
                "knots_lora_requests_info{running_lora_adapters=\"a+b@knots-ties,bundle:x\",waiting_lora_adapters=\"q\\\"uote\",max_lora=\"32\"} 1500000000"
            ]
        );
        assert!(text.contains("# TYPE knots_lora_requests_info gauge"));
    }

    #[test]
    fn compat_names_parse() {
        assert_eq!("vllm".parse::<Compat>(), Ok(Compat::Vllm));
        assert!("other".parse::<Compat>().is_err());
    }
}
