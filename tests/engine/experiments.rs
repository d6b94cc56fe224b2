//! A/B experiments over a real port with the real MiniLM, in a `knots serve` process with a
//! state database: an experiment created over the API assigns users stickily, across a SIGKILL
//! and restart too, with its lifecycle kept; traffic follows the weights within a binomial
//! tolerance; a feedback stream where one arm is truly better is found significant by the
//! always-valid comparison while an A/A stream is not; a latency guardrail pauses an arm; the
//! arms are scored offline on a suite task; a stop routes traffic to the winner.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

use super::process::{ServerProcess, client};

struct Api {
    url: String,
    client: reqwest::Client,
}

impl Api {
    async fn post(&self, path: &str, body: Value) -> (u16, reqwest::header::HeaderMap, Value) {
        let r = self
            .client
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        let (status, headers) = (r.status().as_u16(), r.headers().clone());
        (status, headers, r.json().await.unwrap_or(Value::Null))
    }

    async fn report(&self, name: &str) -> Value {
        let url = format!("{}/v1/experiments/{name}", self.url);
        self.client
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Embeds one text for `user` under `exp:<name>`: the arm and the request id.
    async fn assign(&self, name: &str, user: &str) -> (String, String) {
        let body = json!({"model": format!("exp:{name}"), "input": "a short text", "user": user});
        let (status, headers, v) = self.post("/v1/embeddings", body).await;
        assert_eq!(status, 200, "{v}");
        let header = |h: &str| headers[h].to_str().unwrap().to_string();
        let arm = header("x-knots-arm");
        let arm = arm.strip_prefix(&format!("{name}/")).unwrap().to_string();
        (arm, header("x-request-id"))
    }

    async fn create(&self, config: Value) {
        let (status, _, v) = self.post("/v1/experiments", config).await;
        assert_eq!(status, 200, "{v}");
    }
}

fn arm(report: &Value, name: &str) -> Value {
    report["arms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == name)
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn experiments_on_a_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let args: Vec<String> = [
        "--model",
        "all-minilm-l6-v2",
        "--adapters",
        "models/adapters",
        "--state-db",
        &db.to_string_lossy(),
    ]
    .map(String::from)
    .to_vec();
    let server = ServerProcess::start(&args).await;
    let api = Api {
        url: server.url.clone(),
        client: client(),
    };
    let arms = json!([{"name": "single", "model": "sentiment", "weight": 3},
                      {"name": "merged", "model": "sentiment+news@knots-ties", "weight": 1}]);
    api.create(json!({"name": "sticky", "arms": arms})).await;

    // Weights: 3:1 over 2000 users, within four standard deviations.
    let mut first = BTreeMap::new();
    let users: Vec<String> = (0..2000).map(|i| format!("user{i}")).collect();
    for chunk in users.chunks(16) {
        let got =
            futures_util::future::join_all(chunk.iter().map(|u| api.assign("sticky", u))).await;
        for (u, (arm, _)) in chunk.iter().zip(got) {
            first.insert(u.clone(), arm);
        }
    }
    let single = first.values().filter(|a| *a == "single").count() as f64;
    let sd = (2000.0f64 * 0.75 * 0.25).sqrt();
    assert!(
        (single - 1500.0).abs() <= 4.0 * sd,
        "{single} of 2000 on the arm of weight 3:1"
    );

    // A ramp-up, then SIGKILL and a restart: the same users get the same arms under the
    // stored weights.
    let (status, _, _) = api
        .post(
            "/v1/experiments/sticky/weights",
            json!({"weights": {"merged": 3}}),
        )
        .await;
    assert_eq!(status, 200);
    let mut ramped = BTreeMap::new();
    for u in users.iter().take(40) {
        ramped.insert(u.clone(), api.assign("sticky", u).await.0);
    }
    server.kill();
    let server = ServerProcess::start(&args).await;
    let api = Api {
        url: server.url.clone(),
        client: client(),
    };
    let report = api.report("sticky").await;
    assert_eq!(arm(&report, "merged")["weight"], 3.0, "{report}");
    for (u, before) in &ramped {
        assert_eq!(
            &api.assign("sticky", u).await.0,
            before,
            "{u} after the restart"
        );
    }

    // One arm truly better (Bernoulli 0.75 against 0.45): significant. A/A (0.6 both): not.
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for (name, p_single, p_merged, significant) in
        [("better", 0.45, 0.75, true), ("same", 0.6, 0.6, false)]
    {
        let arms = json!([{"name": "single", "model": "sentiment"},
                          {"name": "merged", "model": "sentiment+news@knots-ties"}]);
        api.create(json!({"name": name, "arms": arms, "control": "single"}))
            .await;
        for i in 0..400 {
            let (arm, id) = api.assign(name, &format!("{name}{i}")).await;
            let p = if arm == "single" { p_single } else { p_merged };
            let score = f64::from(rng.random::<f64>() < p);
            let (status, _, v) = api
                .post(
                    &format!("/v1/experiments/{name}/feedback"),
                    json!({"request_id": id, "score": score}),
                )
                .await;
            assert_eq!(status, 200, "{v}");
        }
        let report = api.report(name).await;
        let vs = &arm(&report, "merged")["vs_control"];
        assert_eq!(vs["significant"], significant, "{name}: {vs}");
        assert!(
            report["statistics_method"]
                .as_str()
                .unwrap()
                .starts_with("mSPRT")
        );
        let (lo, hi) = (
            vs["ci95"][0].as_f64().unwrap(),
            vs["ci95"][1].as_f64().unwrap(),
        );
        assert!(
            lo < p_merged - p_single && p_merged - p_single < hi,
            "{name}: {vs}"
        );
    }

    // A guardrail: an arm slower than half the control's p95 is paused, and says why.
    let arms = json!([{"name": "control", "model": "sentiment"},
                      {"name": "guarded", "model": "sentiment+news@ta"}]);
    let guardrails = json!({"max_p95_latency_ratio": 0.5, "min_requests": 20});
    api.create(json!({"name": "guarded", "arms": arms, "guardrails": guardrails}))
        .await;
    for i in 0..120 {
        api.assign("guarded", &format!("g{i}")).await;
    }
    let report = api.report("guarded").await;
    assert_eq!(arm(&report, "guarded")["paused"], true, "{report}");
    let events = report["events"].as_array().unwrap();
    assert!(
        events.iter().any(|e| e["kind"] == "guardrail paused arm"),
        "{events:?}"
    );
    for i in 0..20 {
        assert_eq!(
            api.assign("guarded", &format!("later{i}")).await.0,
            "control"
        );
    }

    // Offline comparison on the suite's sentiment task, with the benchmark's code.
    let (status, _, v) = api
        .post(
            "/v1/experiments/better/evaluate",
            json!({"task": "sentiment", "examples": 60}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    for a in v["arms"].as_array().unwrap() {
        assert_eq!(a["metric"], "classification_accuracy", "{v}");
        let acc = a["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc) && a["standard_error"].as_f64().unwrap() > 0.0);
    }
    let single = v["arms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "single")
        .unwrap();
    assert!(
        single["accuracy"].as_f64().unwrap() > 0.6,
        "the sentiment adapter on its task: {v}"
    );
    let (status, _, v) = api
        .post("/v1/experiments/better/evaluate", json!({"task": "nope"}))
        .await;
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (400, Some("task")),
        "{v}"
    );

    // Stop with a winner: traffic goes to it, and the results stay readable.
    let (status, _, _) = api
        .post("/v1/experiments/better/stop", json!({"winner": "merged"}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(api.assign("better", "anyone").await.0, "merged");
    let report = api.report("better").await;
    assert_eq!(report["status"]["state"], "stopped");
    assert!(arm(&report, "single")["requests"].as_u64().unwrap() > 100);
}
