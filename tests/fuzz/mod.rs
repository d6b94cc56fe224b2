//! Structured fuzzing of everything a client or an adapter file controls: the `model` grammar,
//! the request bodies, `adapter_config.json`, safetensors files and the whole router in
//! process. Generators are proptest strategies built from each format's real pieces (names,
//! `+`, `:weight`, `@method`, the real JSON field names, tensor keys, dtypes and offsets) with
//! bad values mixed in, plus some fully random input; every case asserts that nothing panics
//! and, where cheap, a property of the result (errors name a field, parsed specs round-trip,
//! loaded adapters are consistent, the router never answers 5xx).
//!
//! Case counts: `KNOTS_FUZZ_CASES=N` runs `N` cases of each target (`N / 100` of the router
//! target, whose cases are whole HTTP exchanges); `KNOTS_FUZZ_CASES_<TARGET>` sets one target
//! (`MODEL_STRING`, `REQUEST_JSON`, `ADAPTER_CONFIG`, `SAFETENSORS`, `ROUTER`). Without either,
//! a small budget runs (the CI's). `KNOTS_FUZZ_SEED` fixes the seed; a failure prints the seed
//! and the shrunk input. `make fuzz` runs the release build with over a million cases.

mod adapter_config;
mod model_string;
mod regressions;
mod request_json;
mod router;
mod safetensors;
mod strategies;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngSeed, TestCaseResult, TestRunner};

/// How many cases `target` runs: its own variable, else `KNOTS_FUZZ_CASES / divisor`, else
/// `default`.
fn cases(target: &str, default: u32, divisor: u32) -> u32 {
    let read = |var: &str| {
        std::env::var(var).ok().map(|v| {
            v.trim()
                .parse::<u32>()
                .unwrap_or_else(|_| panic!("{var}={v:?} is not a case count"))
        })
    };
    if let Some(n) = read(&format!("KNOTS_FUZZ_CASES_{}", target.to_uppercase())) {
        return n;
    }
    match read("KNOTS_FUZZ_CASES") {
        Some(n) => (n / divisor).max(1),
        None => default,
    }
}

/// Runs `test` on `cases(target, default, divisor)` inputs drawn from `strategy`, failing with
/// the seed and the shrunk input when a case panics or breaks a property. Prints the count.
fn fuzz<S: Strategy>(
    target: &str,
    default: u32,
    divisor: u32,
    strategy: S,
    test: impl Fn(S::Value) -> TestCaseResult,
) {
    let cases = cases(target, default, divisor);
    let seed = match std::env::var("KNOTS_FUZZ_SEED") {
        Ok(s) => s.trim().parse().expect("KNOTS_FUZZ_SEED is not a u64"),
        Err(_) => rand::random::<u64>(),
    };
    let config = Config {
        cases,
        // Failures are reported with their seed; nothing is written into the source tree.
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        max_shrink_time: 120_000,
        max_shrink_iters: 50_000,
        ..Config::default()
    };
    let started = Instant::now();
    let result = TestRunner::new(config).run(&strategy, test);
    let secs = started.elapsed().as_secs_f64();
    if let Err(e) = result {
        panic!("fuzz {target}: failed (KNOTS_FUZZ_SEED={seed}) after {secs:.1} s: {e}");
    }
    println!("fuzz {target}: {cases} cases, 0 failures, {secs:.1} s (seed {seed})");
}

/// Counts of case outcomes (how deep the inputs got), printed after a target's run.
#[derive(Default)]
pub struct Tally(Mutex<BTreeMap<String, u64>>);

impl Tally {
    pub fn add(&self, outcome: impl Into<String>) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry(outcome.into()).or_default() += 1;
    }

    pub fn print(&self, target: &str) {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let parts: Vec<String> = map.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("fuzz {target} outcomes: {}", parts.join(", "));
    }
}

/// Bytes shown as an escaped byte string in failure reports.
#[derive(Clone)]
pub struct Bytes(pub Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "b\"{}\"", self.0.escape_ascii())
    }
}

/// A temporary directory for files written on every case: in `/dev/shm` where there is one
/// (rewriting files on a disk file system costs a flush each), else the system's.
pub fn scratch_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    let mut builder = tempfile::Builder::new();
    builder.prefix("knots-fuzz");
    if shm.is_dir()
        && let Ok(dir) = builder.tempdir_in(shm)
    {
        return dir;
    }
    builder.tempdir().expect("a temporary directory")
}
