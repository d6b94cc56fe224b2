//! Every route once against the real models (SmolLM2 and MiniLM, the committed adapters) on a real
//! port, with API keys, tenants, a bundle and an experiment configured: embeddings, classify per
//! task and joint, models, keys and tenants, bundles, experiments (arms, feedback, statistics,
//! compare), adapter and merge administration, and metrics.

use std::path::Path;

use knots::engine::EngineLimits;
use knots::server::auth::Keys;
use knots::server::bundles::{Bundle, BundleConfig};
use knots::server::experiments::{Experiment, ExperimentConfig, Experiments};
use reqwest::Method;
use serde_json::{Value, json};

use super::serving::start_configured;

const ADMIN: &str = "sk-admin-key";
const ACME: &str = "sk-acme-user";
const SCRAPER: &str = "sk-scraper-key";

struct Api {
    url: String,
    client: reqwest::Client,
}

impl Api {
    async fn call(
        &self,
        method: Method,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.client.request(method, format!("{}{path}", self.url));
        if !key.is_empty() {
            req = req.bearer_auth(key);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn post(&self, path: &str, key: &str, body: Value) -> (u16, Value) {
        self.call(Method::POST, path, key, Some(body)).await
    }

    async fn get(&self, path: &str, key: &str) -> (u16, Value) {
        self.call(Method::GET, path, key, None).await
    }

    async fn delete(&self, path: &str, key: &str) -> (u16, Value) {
        self.call(Method::DELETE, path, key, None).await
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_route_on_the_real_models() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(
        &keys,
        format!(
            "[[keys]]\nkey = \"{ADMIN}\"\ntenant = \"ops\"\nrole = \"admin\"\n\
             [[keys]]\nkey = \"{ACME}\"\ntenant = \"acme\"\nrole = \"user\"\n\
             [[keys]]\nkey = \"{SCRAPER}\"\ntenant = \"ops\"\nrole = \"metrics\"\n"
        ),
    )
    .unwrap();
    let spare = dir.path().join("spare");
    let adapters = super::models_dir().join("adapters");
    copy_dir(&adapters.join("shout"), &spare.join("shout"));
    let keys = Keys::load(&keys).unwrap();
    let bundle = Bundle::from_config(BundleConfig {
        name: "support".into(),
        model: "sentiment-lm+news-lm@ties".into(),
        tenant: Some("acme".into()),
        merge: serde_json::from_value(json!({"density": 0.5})).unwrap(),
    })
    .unwrap();
    let experiment: ExperimentConfig = serde_json::from_value(json!({
        "name": "ab", "arms": [{"name": "merged", "model": "sentiment-lm+news-lm"},
                               {"name": "single", "model": "sentiment-lm"}]
    }))
    .unwrap();
    let roots = vec![spare.clone()];
    let (url, stop) = start_configured(
        &["smollm2-135m-instruct", "all-minilm-l6-v2"],
        EngineLimits::default(),
        move |parts| {
            parts.keys = keys;
            parts.bundles = vec![bundle];
            parts.experiments = Experiments::load(
                vec![Experiment::from_config(experiment).unwrap()],
                parts.store.clone(),
            )
            .unwrap();
            parts.adapter_roots = roots;
        },
    )
    .await;
    let api = Api {
        url,
        client: reqwest::Client::new(),
    };

    // Keys: none is a 401; a metrics key scrapes only.
    let (st, _) = api.get("/v1/models", "").await;
    assert_eq!(st, 401);
    let (st, _) = api.get("/v1/models", SCRAPER).await;
    assert_eq!(st, 403);
    let (st, models) = api.get("/v1/models", ACME).await;
    assert_eq!(st, 200);
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    for id in [
        "smollm2-135m-instruct",
        "all-minilm-l6-v2",
        "sentiment",
        "bundle:support",
        "exp:ab",
    ] {
        assert!(ids.contains(&id), "{id} in {ids:?}");
    }

    // Embeddings: normalised vectors of MiniLM's width.
    let (st, v) = api
        .post(
            "/v1/embeddings",
            ACME,
            json!({"model": "sentiment+news", "input": ["a", "b c"]}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    for d in v["data"].as_array().unwrap() {
        let e: Vec<f64> = d["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let norm: f64 = e.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert_eq!(e.len(), 384);
        assert!((norm - 1.0).abs() < 1e-4);
    }

    // Classify: one task's labels, then the joint label space of a merged set.
    let text = "What a wonderful, delightful film; I loved every minute.";
    let (st, v) = api
        .post(
            "/v1/classify",
            ACME,
            json!({"model": "sentiment", "input": text, "task": "sentiment"}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["data"][0]["label"], "positive", "{v}");
    let (st, v) = api
        .post(
            "/v1/classify",
            ACME,
            json!({"model": "sentiment+news@knots-ties", "input": [text], "task": "joint", "top_k": 20}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let tasks: std::collections::BTreeSet<&str> = v["data"][0]["top_k"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["task"].as_str().unwrap())
        .collect();
    assert_eq!(tasks.len(), 2, "joint classification spans both tasks: {v}");

    // A tenant's bundle, served to its tenant with its stored method.
    let body =
        json!({"model": "bundle:support", "prompt": "Hello", "max_tokens": 2, "temperature": 0});
    let (st, v) = api.post("/v1/completions", ACME, body).await;
    assert_eq!(st, 200, "{v}");

    // Experiment: sticky arm, feedback once, statistics, compare.
    let body = json!({"model": "exp:ab", "prompt": "Hello", "max_tokens": 2, "user": "alice"});
    let (st, served) = api.post("/v1/completions", ACME, body).await;
    assert_eq!(st, 200, "{served}");
    let feedback = json!({"request_id": served["id"], "score": 1.0});
    let (st, fb) = api
        .post("/v1/experiments/ab/feedback", ACME, feedback.clone())
        .await;
    assert_eq!(st, 200, "{fb}");
    let (st, _) = api
        .post("/v1/experiments/ab/feedback", ACME, feedback)
        .await;
    assert_eq!(st, 409);
    let (st, stats) = api.get("/v1/experiments/ab", ACME).await;
    assert_eq!(st, 200);
    let arm = stats["arms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == fb["arm"])
        .unwrap();
    assert_eq!(
        (arm["requests"].as_u64(), arm["feedback"]["count"].as_u64()),
        (Some(1), Some(1))
    );
    let (st, list) = api.get("/v1/experiments", ACME).await;
    assert_eq!((st, list["data"].as_array().unwrap().len()), (200, 1));
    let (st, cmp) = api
        .post(
            "/v1/experiments/ab/compare",
            ACME,
            json!({"prompt": "Hello", "max_tokens": 2, "temperature": 0}),
        )
        .await;
    assert_eq!(st, 200, "{cmp}");
    assert_eq!(cmp["answers"].as_array().unwrap().len(), 2);

    let (st, v) = api
        .post(
            "/v1/experiments/ab/evaluate",
            ACME,
            json!({"task": "sentiment", "examples": 8}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    for a in v["arms"].as_array().unwrap() {
        assert_eq!(a["metric"], "label_word_accuracy", "{v}");
        assert!((0.0..=1.0).contains(&a["accuracy"].as_f64().unwrap()));
    }

    // Adapter administration: register from an adapter root, serve it, reload, delete.
    let (st, _) = api
        .post(
            "/v1/adapters",
            ACME,
            json!({"name": "loud", "path": spare.join("shout")}),
        )
        .await;
    assert_eq!(st, 403, "users cannot administer");
    let (st, v) = api
        .post(
            "/v1/adapters",
            ADMIN,
            json!({"name": "loud", "path": spare.join("shout")}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, listed) = api.get("/v1/adapters", ADMIN).await;
    assert_eq!(st, 200);
    assert!(
        listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["name"] == "loud")
    );
    let body = json!({"model": "loud", "prompt": "Hello", "max_tokens": 2, "temperature": 0});
    let (st, v) = api.post("/v1/completions", ACME, body.clone()).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = api
        .post("/v1/adapters/reload", ADMIN, json!({"name": "loud"}))
        .await;
    assert_eq!((st, v["changed"].as_bool()), (200, Some(false)), "{v}");

    // Merge administration: warm, list, evict.
    let (st, warm) = api
        .post(
            "/v1/merges",
            ADMIN,
            json!({"model": "loud+sentiment-lm@ta"}),
        )
        .await;
    assert_eq!(st, 200, "{warm}");
    let (st, merges) = api.get("/v1/merges", ADMIN).await;
    assert_eq!(st, 200);
    assert!(
        merges["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == warm["id"])
    );
    let (st, _) = api
        .delete(
            &format!("/v1/merges/{}", warm["id"].as_str().unwrap()),
            ADMIN,
        )
        .await;
    assert_eq!(st, 200);
    let (st, v) = api.delete("/v1/adapters/loud", ADMIN).await;
    assert_eq!(st, 200, "{v}");
    let (st, _) = api.post("/v1/completions", ACME, body).await;
    assert_eq!(st, 404, "deleted");

    // Metrics: admin and metrics keys only; the real engine's series are there.
    let (st, _) = api.get("/metrics", ACME).await;
    assert_eq!(st, 403);
    let (st, metrics) = api.get("/metrics", SCRAPER).await;
    assert_eq!(st, 200);
    let metrics = metrics.as_str().unwrap();
    for family in [
        "knots_requests_total",
        "knots_engine_running_requests",
        "knots_merge_cache_requests_total",
        "knots_experiment_requests_total",
    ] {
        assert!(metrics.contains(family), "{family} missing");
    }
    // Each base's weights, kept once: SmolLM2's in f32 (538 MB, only as panels) and MiniLM's
    // (91 MB), not again as the row-major tensors that only training needs.
    let weights = |base: &str| {
        let series = format!("knots_engine_weight_bytes{{base=\"{base}\"}} ");
        (metrics.lines())
            .find_map(|l| l.strip_prefix(&series)?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no weight-bytes series for {base}"))
    };
    let smollm2 = weights("smollm2-135m-instruct");
    assert!(
        (5.3e8..5.5e8).contains(&smollm2),
        "{smollm2} bytes of SmolLM2"
    );
    let minilm = weights("all-minilm-l6-v2");
    assert!((8.5e7..9.5e7).contains(&minilm), "{minilm} bytes of MiniLM");
    let (st, _) = api.get("/health", "").await;
    assert_eq!(st, 200);
    let (st, _) = api.get("/ready", "").await;
    assert_eq!(st, 200);
    let _ = stop.send(());
}
