//! Resident memory under a stream of distinct merged sets stays within the configured budgets:
//! a real `knots serve` process (SmolLM2, the committed adapters), 60 sets of 2–3 adapters with
//! random weights over four methods (dense TIES and DARE-TIES, low-rank KnOTS-TIES and task
//! arithmetic), so the merge cache evicts over and over. Resident growth after warm-up must stay
//! within 1.25× the merge and alignment cache budgets together: every copy of a merged delta
//! (host and converted) counts against the budget, and eviction frees all of them. Before any
//! request, the process holds little beyond its weights; with `--dtype f32` it holds each weight
//! once, after its first request too.

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

use super::process::{ServerProcess, client, get_json};

const MERGE_BUDGET: u64 = 300 << 20;
const ALIGNMENT_BUDGET: u64 = 32 << 20;

/// What a started server may hold beyond its weights (the binary, the tokenizer, the adapters,
/// thread stacks). An f32 copy of the tied embedding table (113 MB), or the load's freed buffers
/// left with the allocator (65 MB), does not fit.
const STARTUP_EXTRA: u64 = 144 << 20;

/// The base model's `knots_engine_weight_bytes`.
async fn weight_bytes(client: &reqwest::Client, url: &str) -> u64 {
    let r = client.get(format!("{url}/metrics")).send().await.unwrap();
    let text = r.text().await.unwrap();
    (text.lines())
        .find_map(|l| l.strip_prefix("knots_engine_weight_bytes{"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no weight-bytes series in {text}")) as u64
}

/// A `knots serve` process on SmolLM2, with no durable state and a 64 MiB KV cache, and `extra`.
async fn start_smollm2(extra: &[&str]) -> ServerProcess {
    let kv = (64u64 << 20).to_string();
    let base = ["--model", "smollm2-135m-instruct", "--state-db", ":memory:"];
    let args: Vec<String> = (base.iter().chain(["--kv-cache-bytes", kv.as_str()].iter()))
        .chain(extra)
        .map(|a| a.to_string())
        .collect();
    ServerProcess::start(&args).await
}

/// Asserts that `server` holds less than its weights plus [`STARTUP_EXTRA`] (`when`: after
/// what); returns its weight bytes.
async fn assert_little_beyond_weights(server: &ServerProcess, when: &str) -> u64 {
    let resident = server.resident_bytes();
    let weights = weight_bytes(&client(), &server.url).await;
    eprintln!("resident {when} {resident} bytes, of which weights {weights}");
    assert!(
        resident < weights + STARTUP_EXTRA,
        "{resident} bytes resident {when}, for {weights} bytes of weights"
    );
    weights
}

async fn complete(client: &reqwest::Client, url: &str, model: &str) {
    let body = json!({"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0});
    let r = client
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{model}: {}", r.text().await.unwrap());
}

#[tokio::test]
async fn resident_memory_stays_within_the_cache_budgets() {
    let merge_budget = MERGE_BUDGET.to_string();
    let alignment_budget = ALIGNMENT_BUDGET.to_string();
    let server = start_smollm2(&[
        "--adapters",
        "models/adapters",
        "--merge-cache-bytes",
        &merge_budget,
        "--alignment-cache-bytes",
        &alignment_budget,
    ])
    .await;
    let (url, client) = (server.url.clone(), client());
    assert_little_beyond_weights(&server, "after start-up").await;

    let names = ["sentiment-lm", "news-lm", "language-lm", "shout"];
    let methods = ["ties", "dare-ties", "knots-ties", "ta"];
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut set = |i: usize| {
        let k = rng.random_range(2..=3);
        let members: Vec<String> = names
            .choose_multiple(&mut rng, k)
            .map(|n| format!("{n}:{:.4}", rng.random_range(0.3..1.0)))
            .collect();
        format!("{}@{}", members.join("+"), methods[i % methods.len()])
    };
    // Warm-up: the model, the KV cache, the allocator's working set.
    for i in 0..8 {
        complete(&client, &url, &set(i)).await;
    }
    let warm = server.resident_bytes();
    for i in 0..60 {
        complete(&client, &url, &set(i)).await;
    }
    let end = server.resident_bytes();
    let merges: Value = get_json(&client, &format!("{url}/v1/merges")).await;
    let budget = MERGE_BUDGET + ALIGNMENT_BUDGET;
    let growth = end.saturating_sub(warm);
    eprintln!(
        "resident {warm} → {end} bytes: growth {growth} for budgets of {budget} ({:.2}×); cache {} bytes",
        growth as f64 / budget as f64,
        merges["bytes"]
    );
    assert!(merges["bytes"].as_u64().unwrap() <= MERGE_BUDGET);
    assert!(
        growth as f64 <= 1.25 * budget as f64,
        "resident memory grew by {growth} bytes, more than 1.25× the budgets of {budget}"
    );
}

/// A server on f32 weights holds each of them once: its panels, packed at load, and not also
/// the row-major tensor (538 MB more for SmolLM2 once the first products had packed the panels
/// beside it).
#[tokio::test]
async fn an_f32_server_holds_each_weight_once() {
    let server = start_smollm2(&["--dtype", "f32"]).await;
    complete(&client(), &server.url, "smollm2-135m-instruct").await;
    let weights = assert_little_beyond_weights(&server, "after a request").await;
    assert!(weights > 500_000_000, "{weights} bytes of f32 weights");
}
