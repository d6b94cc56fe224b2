//! The HTTP API on a real port, against a deterministic test backend (the model engine has its
//! own tests): every route, streaming, the merge cache's single flight, tenants, experiments,
//! limits, shutdown and a matrix of bad requests.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use knots::adapters::Registry;
use knots::merge::MergedDelta;
use knots::server::auth::Keys;
use knots::server::backend::*;
use knots::server::bundles::{Bundle, BundleConfig};
use knots::server::experiments::{Experiment, ExperimentConfig, Experiments};
use knots::server::metrics::Compat;
use knots::server::state::{AppState, Limits, StateParts};
use knots::server::store::Store;
use knots::server::{attach_base, serve};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{lora_config, random_matrix, write_adapter};

/// Generates `max_tokens` words named after the prompt and the delta, so tests can tell which
/// update served a request. Prompts containing `slow` take 50 ms a token; `panic!` panics. Like a
/// full engine queue, it refuses a generation while `max_running` are running.
#[derive(Default)]
pub struct TestBackend {
    cancelled: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    max_running: usize,
    seen: Mutex<Vec<Option<f64>>>,
}

/// Counts a running generation until dropped.
struct RunningGuard(Arc<AtomicUsize>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn fingerprint(delta: Option<&Arc<MergedDelta>>) -> Option<f64> {
    delta.map(|d| {
        d.modules
            .values()
            .map(|m| m.to_dense().frobenius())
            .sum::<f64>()
    })
}

/// The bases the test backends serve: a generator `gen` and an encoder `enc`.
pub fn test_bases() -> Vec<BaseInfo> {
    vec![
        BaseInfo {
            id: "gen".into(),
            kind: BaseKind::Generator,
            context_length: 64,
            aliases: vec!["org/gen-base".into()],
            weights: Vec::new(),
        },
        BaseInfo {
            id: "enc".into(),
            kind: BaseKind::Encoder,
            context_length: 64,
            aliases: vec!["org/enc-base".into()],
            weights: Vec::new(),
        },
    ]
}

impl Backend for TestBackend {
    fn bases(&self) -> Vec<BaseInfo> {
        test_bases()
    }

    fn generate(&self, job: GenerateJob) -> Result<GenStream, BackendError> {
        let prompt = match &job.prompt {
            Prompt::Text(t) => t.clone(),
            Prompt::Chat(m) => m
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        };
        assert!(
            !prompt.contains("panic!"),
            "the test backend was asked to panic"
        );
        let prompt_tokens = prompt.split_whitespace().count();
        if prompt_tokens > 64 {
            return Err(BackendError::InvalidInput {
                param: "prompt",
                message: format!("{prompt_tokens} tokens exceed the context of 64"),
            });
        }
        if self.running.fetch_add(1, Ordering::SeqCst) >= self.max_running {
            self.running.fetch_sub(1, Ordering::SeqCst);
            return Err(BackendError::Overloaded("queue full".into()));
        }
        let guard = RunningGuard(self.running.clone());
        let fp = fingerprint(job.delta.as_ref());
        self.seen.lock().unwrap().push(fp);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let counter = self.cancelled.clone();
        let sampling = job.sampling.clone();
        std::thread::spawn(move || {
            let _guard = guard;
            let mut text = String::new();
            for i in 0..sampling.max_tokens {
                if prompt.contains("slow") {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let piece = match (i, fp) {
                    (0, Some(f)) => format!("delta{f:.6} "),
                    (0, None) => "base ".to_string(),
                    _ => format!("w{i} "),
                };
                text.push_str(&piece);
                if sampling.stop.iter().any(|s| text.contains(s.as_str())) {
                    let _ = tx.send(GenEvent::Done(Finished {
                        prompt_tokens,
                        completion_tokens: i + 1,
                        finish_reason: FinishReason::Stop,
                    }));
                    return;
                }
                let logprob = sampling.logprobs.map(|k| TokenLogprobs {
                    token: piece.clone(),
                    logprob: -0.5,
                    top: (0..k)
                        .map(|j| (format!("alt{j}"), -1.0 - j as f32))
                        .collect(),
                });
                if tx
                    .send(GenEvent::Text(Piece {
                        text: piece,
                        logprob,
                    }))
                    .is_err()
                {
                    counter.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            }
            let _ = tx.send(GenEvent::Done(Finished {
                prompt_tokens,
                completion_tokens: sampling.max_tokens,
                finish_reason: FinishReason::Length,
            }));
        });
        Ok(rx)
    }

    fn embed(
        &self,
        _base: &str,
        inputs: &[String],
        delta: Option<&Arc<MergedDelta>>,
        _deadline: std::time::Instant,
    ) -> Result<(Vec<Vec<f32>>, usize), BackendError> {
        let fp = fingerprint(delta).unwrap_or(0.0) as f32;
        let vectors = inputs
            .iter()
            .map(|t| vec![t.len() as f32, fp, 1.0])
            .collect();
        Ok((
            vectors,
            inputs.iter().map(|t| t.split_whitespace().count()).sum(),
        ))
    }

    fn classify(
        &self,
        _base: &str,
        inputs: &[String],
        heads: &[TaskHead],
        _delta: Option<&Arc<MergedDelta>>,
        _deadline: std::time::Instant,
    ) -> Result<Vec<Vec<LabelScore>>, BackendError> {
        Ok(inputs
            .iter()
            .map(|text| {
                heads
                    .iter()
                    .flat_map(|h| h.labels.iter().map(move |l| (h, l)))
                    .map(|(h, l)| LabelScore {
                        task: h.task.clone(),
                        label: l.clone(),
                        score: if text.contains(l.as_str()) { 1.0 } else { 0.0 },
                    })
                    .collect()
            })
            .collect())
    }
}

/// The test servers' keys file: two tenants' users, an operator and a metrics scraper.
pub const TEST_KEYS: &str = r#"
[[keys]]
key = "sk-acme-user"
tenant = "acme"
role = "user"
[[keys]]
key = "sk-globex-user"
tenant = "globex"
role = "user"
[[keys]]
key = "sk-operator"
tenant = "ops"
role = "admin"
[[keys]]
key = "sk-scraper"
tenant = "ops"
role = "metrics"
"#;

/// A running server on a random port.
pub struct TestServer {
    pub url: String,
    pub backend: Arc<TestBackend>,
    pub state: AppState,
    pub dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub handle: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    pub async fn stop(mut self) -> std::io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.handle.await.unwrap()
    }
}

fn adapter(dir: &Path, seed: u64, base: &str, task: Option<(&str, &[&str])>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (a, b) = (
        random_matrix(&mut rng, 2, 6, 0.5),
        random_matrix(&mut rng, 6, 2, 0.5),
    );
    let (a2, b2) = (
        random_matrix(&mut rng, 2, 6, 0.5),
        random_matrix(&mut rng, 6, 2, 0.5),
    );
    let mut config = lora_config(2, 4.0, &["q", "v"]);
    config["base_model_name_or_path"] = json!(base);
    write_adapter(
        dir,
        &config,
        &[("layers.0.q", &a, &b), ("layers.0.v", &a2, &b2)],
    );
    if let Some((name, labels)) = task {
        std::fs::write(
            dir.join("knots_task.json"),
            json!({"task": name, "labels": labels}).to_string(),
        )
        .unwrap();
    }
}

/// Adapters: shared `math`, `code`, `poetry` on gen; `sentiment`, `topic` on enc; `acme/secret`
/// and `globex/secret` owned by tenants.
pub async fn start(limits: Limits) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("adapters");
    for (i, name) in ["math", "code", "poetry"].iter().enumerate() {
        adapter(&root.join(name), i as u64 + 1, "org/gen-base", None);
    }
    adapter(
        &root.join("sentiment"),
        10,
        "org/enc-base",
        Some(("sentiment", &["negative", "positive"])),
    );
    adapter(
        &root.join("topic"),
        11,
        "org/enc-base",
        Some(("topic", &["sport", "politics", "positive"])),
    );
    adapter(&root.join("acme/secret"), 20, "org/gen-base", None);
    adapter(&root.join("globex/secret"), 21, "org/gen-base", None);
    adapter(&dir.path().join("spare/extra"), 30, "org/gen-base", None);

    let backend = Arc::new(TestBackend {
        max_running: limits.max_concurrency,
        ..TestBackend::default()
    });
    let bases = backend.bases();
    let registry = Registry::load_dir(&root, &|a| attach_base(&bases, a)).unwrap();
    let keys_file = dir.path().join("keys.toml");
    std::fs::write(&keys_file, TEST_KEYS).unwrap();
    let keys = Keys::load(&keys_file).unwrap();
    let bundles = vec![
        Bundle::from_config(BundleConfig {
            name: "stem".into(),
            model: "math+code@ties".into(),
            tenant: None,
            merge: serde_json::from_value(json!({"density": 0.5})).unwrap(),
        })
        .unwrap(),
        Bundle::from_config(BundleConfig {
            name: "acme-only".into(),
            model: "secret+math".into(),
            tenant: Some("acme".into()),
            merge: Default::default(),
        })
        .unwrap(),
    ];
    let exp: ExperimentConfig = serde_json::from_value(json!({
        "name": "ab", "arms": [{"name": "merged", "model": "math+code", "weight": 1.0}, {"name": "single", "model": "math", "weight": 1.0}]
    })).unwrap();
    let store = Arc::new(Store::in_memory().unwrap());
    let state = AppState::new(StateParts {
        backend: backend.clone(),
        registry,
        keys,
        bundles,
        experiments: Experiments::load(vec![Experiment::from_config(exp).unwrap()], store.clone())
            .unwrap(),
        store,
        limits,
        merge_cache_bytes: 64 << 20,
        alignment_cache_bytes: 64 << 20,
        merge_store: None,
        adapter_roots: vec![dir.path().join("spare")],
        adapter_cache: knots::adapters::AdapterCache::new(
            std::env::temp_dir().join("knots-test-adapter-cache"),
        ),
        metrics_compat: Compat::Vllm,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(serve(
        listener,
        state.clone(),
        async move {
            let _ = rx.await;
        },
        Duration::from_secs(5),
    ));
    TestServer {
        url,
        backend,
        state,
        dir,
        stop: Some(tx),
        handle,
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

pub async fn post(
    s: &TestServer,
    path: &str,
    key: &str,
    body: Value,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let r = client()
        .post(format!("{}{path}", s.url))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let (status, headers) = (r.status(), r.headers().clone());
    let text = r.text().await.unwrap();
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

pub async fn get(s: &TestServer, path: &str, key: &str) -> (StatusCode, Value) {
    let r = client()
        .get(format!("{}{path}", s.url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

const OP: &str = "sk-operator";
const ACME: &str = "sk-acme-user";

fn text_of(body: &Value) -> &str {
    body["choices"][0]["text"]
        .as_str()
        .or_else(|| body["choices"][0]["message"]["content"].as_str())
        .unwrap_or("")
}

#[tokio::test]
async fn completions_for_base_adapter_and_merged_set() {
    let s = start(Limits::default()).await;
    let (st, h, base) = post(
        &s,
        "/v1/completions",
        OP,
        json!({"model": "gen", "prompt": "hello there", "max_tokens": 3}),
    )
    .await;
    assert_eq!(st, 200, "{base}");
    assert_eq!(text_of(&base), "base w1 w2 ");
    assert_eq!(
        base["usage"],
        json!({"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5})
    );
    assert_eq!(h["x-knots-merge"], "base");

    let (_, h, one) = post(
        &s,
        "/v1/completions",
        OP,
        json!({"model": "math", "prompt": "hi", "max_tokens": 2}),
    )
    .await;
    assert_eq!(h["x-knots-merge"], "adapter=math");
    assert!(text_of(&one).starts_with("delta"));

    let body =
        json!({"model": "math+code", "prompt": "hi", "max_tokens": 2, "merge": {"density": 0.5}});
    let (st, h, merged) = post(&s, "/v1/completions", OP, body.clone()).await;
    assert_eq!(st, 200, "{merged}");
    let header = h["x-knots-merge"].to_str().unwrap().to_string();
    assert!(header.contains("outcome=miss"), "{header}");
    assert_ne!(
        text_of(&merged),
        text_of(&one),
        "the merged set serves another delta"
    );
    let (_, h, again) = post(&s, "/v1/completions", OP, body).await;
    assert!(h["x-knots-merge"].to_str().unwrap().contains("outcome=hit"));
    assert_eq!(text_of(&again), text_of(&merged));
    // Order and an explicit default weight name the same merge.
    let (_, h, _) = post(
        &s,
        "/v1/completions",
        OP,
        json!({"model": "code:1+math", "prompt": "hi", "max_tokens": 1, "merge": {"density": 0.5}}),
    )
    .await;
    assert!(h["x-knots-merge"].to_str().unwrap().contains("outcome=hit"));
    let (st, _, stop) = post(
        &s,
        "/v1/completions",
        OP,
        json!({"model": "gen", "prompt": "x", "max_tokens": 9, "stop": ["w2"]}),
    )
    .await;
    assert_eq!(
        (st, stop["choices"][0]["finish_reason"].as_str()),
        (StatusCode::OK, Some("stop"))
    );
    s.stop().await.unwrap();
}

/// Reads an SSE body into its `data:` payloads.
pub async fn sse(r: reqwest::Response) -> Vec<String> {
    let text = r.text().await.unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn chat_streams_as_sse_ending_in_done() {
    let s = start(Limits::default()).await;
    let body = json!({"model": "math+code@knots-ties", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                      "stream": true, "stream_options": {"include_usage": true}});
    let r = client()
        .post(format!("{}/v1/chat/completions", s.url))
        .bearer_auth(OP)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = sse(r).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(text.starts_with("delta") && text.ends_with("w3 "), "{text}");
    let finish = chunks
        .iter()
        .find_map(|c| c["choices"][0]["finish_reason"].as_str());
    assert_eq!(finish, Some("length"));
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 4);
    s.stop().await.unwrap();
}

#[tokio::test]
async fn several_choices_stream_interleaved_with_their_logprobs() {
    let s = start(Limits::default()).await;
    let body = json!({"model": "math", "prompt": "hi", "max_tokens": 3, "n": 2, "logprobs": 2,
                      "stream": true, "stream_options": {"include_usage": true}});
    let r = client()
        .post(format!("{}/v1/completions", s.url))
        .bearer_auth(OP)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let events = sse(r).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    for index in 0..2 {
        let mine: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c["choices"].as_array()?.first())
            .filter(|c| c["index"] == index)
            .collect();
        let text: String = mine.iter().filter_map(|c| c["text"].as_str()).collect();
        assert!(
            text.starts_with("delta") && text.ends_with(" w1 w2 "),
            "choice {index}: {text:?}"
        );
        let tokens: Vec<&Value> = mine
            .iter()
            .filter(|c| !c["logprobs"].is_null())
            .map(|c| &c["logprobs"])
            .collect();
        assert_eq!(tokens.len(), 3, "one logprobs entry per token");
        let offsets: Vec<u64> = tokens
            .iter()
            .map(|t| t["text_offset"][0].as_u64().unwrap())
            .collect();
        assert_eq!(offsets[0], 0);
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
        assert!(
            tokens
                .iter()
                .all(|t| t["top_logprobs"][0].as_object().unwrap().len() == 2)
        );
        let finishes = mine
            .iter()
            .filter(|c| c["finish_reason"] == "length")
            .count();
        assert_eq!(finishes, 1, "one last chunk per choice");
    }
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 6);
    assert_eq!(chunks.last().unwrap()["usage"]["prompt_tokens"], 1);

    // Chat, not streamed: n choices with chat's logprobs objects.
    let body = json!({"model": "math", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                      "n": 3, "logprobs": true, "top_logprobs": 1});
    let (st, _, v) = post(&s, "/v1/chat/completions", OP, body).await;
    assert_eq!(st, 200, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        let content = c["logprobs"]["content"].as_array().unwrap();
        assert_eq!(content.len(), 2);
        assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 1);
        assert!(content[0]["token"].as_str().unwrap().starts_with("delta"));
    }
    assert_eq!(v["usage"]["completion_tokens"], 6);
    let (_, _, plain) = post(
        &s,
        "/v1/completions",
        OP,
        json!({"model": "math", "prompt": "hi", "max_tokens": 2}),
    )
    .await;
    assert!(plain["choices"][0]["logprobs"].is_null(), "not asked for");
    s.stop().await.unwrap();
}

#[tokio::test]
async fn embeddings_and_classification() {
    let s = start(Limits::default()).await;
    let (st, _, e) = post(
        &s,
        "/v1/embeddings",
        OP,
        json!({"model": "sentiment", "input": ["a b", "c"]}),
    )
    .await;
    assert_eq!(st, 200, "{e}");
    assert_eq!(e["data"].as_array().unwrap().len(), 2);
    assert_eq!(e["usage"]["prompt_tokens"], 3);
    // The official clients ask for base64 by default: the same values as little-endian f32s.
    let (st, _, b) = post(
        &s,
        "/v1/embeddings",
        OP,
        json!({"model": "sentiment", "input": ["a b", "c"], "encoding_format": "base64"}),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    for (packed, plain) in b["data"]
        .as_array()
        .unwrap()
        .iter()
        .zip(e["data"].as_array().unwrap())
    {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(packed["embedding"].as_str().expect("a base64 string"))
            .unwrap();
        let values: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        // A float's JSON text is the shortest that reads back as the same f32.
        let want: Vec<f32> = plain["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(values, want);
    }
    let (st, _, bad) = post(
        &s,
        "/v1/embeddings",
        OP,
        json!({"model": "sentiment", "input": "a", "encoding_format": "hex"}),
    )
    .await;
    assert_eq!(st, 400, "{bad}");
    let (st, _, c) = post(
        &s,
        "/v1/classify",
        OP,
        json!({"model": "sentiment+topic", "input": "a positive match", "top_k": 3}),
    )
    .await;
    assert_eq!(st, 200, "{c}");
    assert_eq!(c["data"][0]["label"], "positive");
    assert_eq!(c["data"][0]["top_k"].as_array().unwrap().len(), 3);
    // The same label text in two tasks stays two labels.
    let top: Vec<_> = c["data"][0]["top_k"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["score"] == 1.0)
        .map(|x| x["task"].clone())
        .collect();
    assert_eq!(top.len(), 2);
    let (_, _, one) = post(
        &s,
        "/v1/classify",
        OP,
        json!({"model": "sentiment+topic", "input": "sport", "task": "topic"}),
    )
    .await;
    assert!(
        one["data"][0]["top_k"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["task"] == "topic")
    );
    let (st, _, wrong) = post(
        &s,
        "/v1/embeddings",
        OP,
        json!({"model": "gen", "input": "x"}),
    )
    .await;
    assert_eq!(
        (st, wrong["error"]["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("model"))
    );
    s.stop().await.unwrap();
}

#[tokio::test]
async fn tenants_see_only_their_own_and_shared_names() {
    let s = start(Limits::default()).await;
    let ids = |v: &Value| {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let (_, acme) = get(&s, "/v1/models", ACME).await;
    let acme = ids(&acme);
    assert!(
        acme.contains(&"acme/secret".to_string())
            && acme.contains(&"math".to_string())
            && acme.contains(&"bundle:acme-only".to_string())
    );
    assert!(!acme.iter().any(|m| m.starts_with("globex")), "{acme:?}");
    // A bare name resolves to the caller's own adapter first.
    let (st, h, _) = post(
        &s,
        "/v1/completions",
        ACME,
        json!({"model": "secret", "prompt": "x", "max_tokens": 1}),
    )
    .await;
    assert_eq!(
        (st, h["x-knots-merge"].to_str().unwrap()),
        (StatusCode::OK, "adapter=acme/secret")
    );
    // Another tenant's adapter does not exist for acme: same 404 as a name nobody has.
    let (st1, _, hidden) = post(
        &s,
        "/v1/completions",
        ACME,
        json!({"model": "globex/secret", "prompt": "x"}),
    )
    .await;
    let (st2, _, missing) = post(
        &s,
        "/v1/completions",
        ACME,
        json!({"model": "globex/nothing", "prompt": "x"}),
    )
    .await;
    assert_eq!((st1, st2), (StatusCode::NOT_FOUND, StatusCode::NOT_FOUND));
    assert_eq!(hidden["error"]["type"], missing["error"]["type"]);
    let (st, _, _) = post(
        &s,
        "/v1/completions",
        "sk-globex-user",
        json!({"model": "bundle:acme-only", "prompt": "x"}),
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _, _) = post(
        &s,
        "/v1/completions",
        "wrong-key",
        json!({"model": "gen", "prompt": "x"}),
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _, _) = post(&s, "/v1/merges", ACME, json!({"model": "math+code"})).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "users cannot administer");
    s.stop().await.unwrap();
}

#[tokio::test]
async fn bundles_resolve_as_their_owner_whoever_calls() {
    let s = start(Limits::default()).await;
    let body = |m: &str| json!({"model": m, "prompt": "x", "max_tokens": 2});
    // acme's bundle names acme's `secret`: served to acme, and to the operator (another tenant).
    let mut headers = Vec::new();
    for key in [ACME, OP] {
        let (st, h, v) = post(&s, "/v1/completions", key, body("bundle:acme-only")).await;
        assert_eq!(st, StatusCode::OK, "{key}: {v}");
        assert!(
            v["choices"][0]["text"]
                .as_str()
                .unwrap()
                .starts_with("delta")
        );
        headers.push(h["x-knots-merge"].to_str().unwrap().to_string());
    }
    let key_id = |h: &str| h.split(';').next().unwrap().to_string();
    assert_eq!(key_id(&headers[0]), key_id(&headers[1]), "the same merge");
    // It is the merge of acme/secret and math, as acme names them.
    let (_, h, _) = post(&s, "/v1/completions", ACME, body("secret+math")).await;
    assert_eq!(
        key_id(h["x-knots-merge"].to_str().unwrap()),
        key_id(&headers[0])
    );
    // A shared bundle serves every tenant, with its stored parameters.
    let (st, h, _) = post(&s, "/v1/completions", "sk-globex-user", body("bundle:stem")).await;
    assert_eq!(st, StatusCode::OK);
    assert!(h["x-knots-merge"].to_str().unwrap().contains("outcome="));
    s.stop().await.unwrap();
}

#[tokio::test]
async fn metrics_need_an_admin_or_metrics_key_and_health_stays_open() {
    let s = start(Limits::default()).await;
    for (key, status) in [("", 401), (ACME, 403), (OP, 200), ("sk-scraper", 200)] {
        let mut req = client().get(format!("{}/metrics", s.url));
        if !key.is_empty() {
            req = req.bearer_auth(key);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), status, "/metrics with {key:?}");
    }
    let (st, _) = get(&s, "/v1/models", "sk-scraper").await;
    assert_eq!(st, StatusCode::FORBIDDEN, "a metrics key scrapes only");
    for path in ["/health", "/ready"] {
        let r = client()
            .get(format!("{}{path}", s.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path} needs no key");
    }
    s.stop().await.unwrap();
}

#[tokio::test]
async fn warming_a_merge_is_admitted_like_any_request() {
    let s = start(Limits {
        max_concurrency: 0,
        ..Limits::default()
    })
    .await;
    let (st, h, _) = post(&s, "/v1/merges", OP, json!({"model": "math+code"})).await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS);
    assert!(h.contains_key("retry-after"));
    s.state.cache.sync().await;
    assert_eq!(s.state.cache.len(), 0, "nothing was merged");
    s.stop().await.unwrap();
}

#[tokio::test]
async fn adapter_and_merge_administration() {
    let s = start(Limits::default()).await;
    let (st, _, warm) = post(
        &s,
        "/v1/merges",
        OP,
        json!({"model": "math+poetry", "merge": {"method": "ta"}}),
    )
    .await;
    assert_eq!(
        (st, warm["outcome"].as_str()),
        (StatusCode::OK, Some("miss")),
        "{warm}"
    );
    let (_, merges) = get(&s, "/v1/merges", OP).await;
    assert!(
        merges["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == warm["id"] && m["bytes"].as_u64() > Some(0))
    );

    let spare = s.dir.path().join("spare/extra");
    let (st, _, reg) = post(
        &s,
        "/v1/adapters",
        OP,
        json!({"name": "extra", "path": spare}),
    )
    .await;
    assert_eq!(
        (st, reg["base"].as_str()),
        (StatusCode::OK, Some("gen")),
        "{reg}"
    );
    let (st, _, _) = post(
        &s,
        "/v1/adapters",
        OP,
        json!({"name": "extra", "path": spare}),
    )
    .await;
    assert_eq!(st, StatusCode::CONFLICT);
    let outside = s.dir.path().join("adapters/math");
    let (st, _, out) = post(
        &s,
        "/v1/adapters",
        OP,
        json!({"name": "sneaky", "path": outside}),
    )
    .await;
    assert_eq!(
        (st, out["error"]["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("path"))
    );
    let (st, _, _) = post(
        &s,
        "/v1/completions",
        OP,
        json!({"model": "extra+math", "prompt": "x", "max_tokens": 1}),
    )
    .await;
    assert_eq!(st, 200);

    // Reloading changed contents drops the merges that used the adapter.
    adapter(
        &s.dir.path().join("adapters/poetry"),
        99,
        "org/gen-base",
        None,
    );
    let (st, _, reload) = post(&s, "/v1/adapters/reload", OP, json!({"name": "poetry"})).await;
    assert_eq!(
        (
            st,
            reload["changed"].as_bool(),
            reload["evicted_merges"].as_u64()
        ),
        (StatusCode::OK, Some(true), Some(1)),
        "{reload}"
    );
    let r = client()
        .delete(format!("{}/v1/adapters/extra", s.url))
        .bearer_auth(OP)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (st, _, _) = post(
        &s,
        "/v1/completions",
        OP,
        json!({"model": "extra", "prompt": "x"}),
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (_, _, warm) = post(&s, "/v1/merges", OP, json!({"model": "math+code@ta"})).await;
    let r = client()
        .delete(format!(
            "{}/v1/merges/{}",
            s.url,
            warm["id"].as_str().unwrap()
        ))
        .bearer_auth(OP)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    s.stop().await.unwrap();
}

#[tokio::test]
async fn experiments_assign_sticky_arms_and_collect_feedback() {
    let s = start(Limits {
        max_concurrency: 64,
        ..Limits::default()
    })
    .await;
    let body =
        |user: &str| json!({"model": "exp:ab", "prompt": "x", "max_tokens": 1, "user": user});
    let (_, h1, r1) = post(&s, "/v1/completions", OP, body("alice")).await;
    let arm = h1["x-knots-arm"].to_str().unwrap().to_string();
    for _ in 0..3 {
        let (_, h, _) = post(&s, "/v1/completions", OP, body("alice")).await;
        assert_eq!(h["x-knots-arm"].to_str().unwrap(), arm);
    }
    let arms: std::collections::BTreeSet<String> = futures_util::future::join_all(
        (0..24).map(|i| post(&s, "/v1/completions", OP, body(&format!("u{i}")))),
    )
    .await
    .into_iter()
    .map(|(_, h, _)| h["x-knots-arm"].to_str().unwrap().to_string())
    .collect();
    assert_eq!(arms.len(), 2, "both arms get traffic");
    let (st, _, fb) = post(
        &s,
        "/v1/experiments/ab/feedback",
        OP,
        json!({"request_id": r1["id"], "score": 0.75}),
    )
    .await;
    assert_eq!(st, 200, "{fb}");
    assert_eq!(format!("ab/{}", fb["arm"].as_str().unwrap()), arm);
    // Once per response, and only by the key that received it.
    let again = json!({"request_id": r1["id"], "score": 0.1});
    let (st, _, _) = post(&s, "/v1/experiments/ab/feedback", OP, again.clone()).await;
    assert_eq!(st, StatusCode::CONFLICT, "scored twice");
    let (_, _, r2) = post(&s, "/v1/completions", OP, body("bob")).await;
    let other = json!({"request_id": r2["id"], "score": 0.1});
    let (st, _, _) = post(&s, "/v1/experiments/ab/feedback", ACME, other).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "another key's response");
    let (_, stats) = get(&s, "/v1/experiments/ab", OP).await;
    let total: u64 = stats["arms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 29);
    assert!(
        stats["arms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["feedback"]["mean"] == 0.75)
    );
    let (st, _, cmp) = post(
        &s,
        "/v1/experiments/ab/compare",
        OP,
        json!({"prompt": "x", "max_tokens": 2}),
    )
    .await;
    assert_eq!(st, 200, "{cmp}");
    let answers = cmp["answers"].as_array().unwrap();
    assert_eq!(answers.len(), 2);
    assert_ne!(answers[0]["text"], answers[1]["text"]);
    s.stop().await.unwrap();
}

#[tokio::test]
async fn sixteen_concurrent_requests_for_one_uncached_set_merge_once() {
    let s = start(Limits {
        max_concurrency: 32,
        ..Limits::default()
    })
    .await;
    let body = json!({"model": "math+code+poetry", "prompt": "x", "max_tokens": 1, "merge": {"method": "knots-dare-ties", "dare_p": 0.3, "seed": 4242}});
    let before = merges_counted(&s, "knots-dare-ties").await;
    let replies = futures_util::future::join_all(
        (0..16).map(|_| post(&s, "/v1/completions", OP, body.clone())),
    )
    .await;
    let outcomes: Vec<String> = replies
        .iter()
        .map(|(st, h, b)| {
            assert_eq!(*st, 200, "{b}");
            h["x-knots-merge"].to_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| o.contains("outcome=miss"))
            .count(),
        1,
        "{outcomes:?}"
    );
    assert_eq!(merges_counted(&s, "knots-dare-ties").await - before, 1.0);
    s.stop().await.unwrap();
}

/// `knots_merges_total{method=...}` from /metrics.
async fn merges_counted(s: &TestServer, method: &str) -> f64 {
    let (_, text) = get(s, "/metrics", OP).await;
    let needle = format!("knots_merges_total{{method=\"{method}\"}} ");
    text.as_str()
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(&needle))
        .map_or(0.0, |v| v.parse().unwrap())
}

#[tokio::test]
async fn metrics_expose_requests_cache_and_adapter_gauge() {
    let s = start(Limits::default()).await;
    post(
        &s,
        "/v1/completions",
        OP,
        json!({"model": "math+code", "prompt": "x", "max_tokens": 1}),
    )
    .await;
    let (st, text) = get(&s, "/metrics", OP).await;
    let text = text.as_str().unwrap().to_string();
    assert_eq!(st, 200);
    for needle in [
        "knots_requests_total{route=\"/v1/completions\",status=\"200\"}",
        "knots_request_duration_seconds_bucket",
        "knots_merge_cache_requests_total{outcome=\"miss\"}",
        "knots_tokens_total{kind=\"completion\"}",
        "knots_lora_requests_info{",
        "knots_merge_cache_bytes",
    ] {
        assert!(text.contains(needle), "missing {needle}");
    }
    check_exposition(&text);
    s.stop().await.unwrap();
}

/// The text format's contract: every sample's family has HELP and TYPE lines, names are
/// `knots_…` (or vLLM's `vllm:` names, which this server exports for compatibility), and each
/// LoRA info family is exactly one series whose value is the scrape time.
fn check_exposition(text: &str) {
    let declared = |kind: &str, family: &str| {
        text.lines()
            .any(|l| l.starts_with(&format!("# {kind} {family} ")))
    };
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = line.split(['{', ' ']).next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| declared("TYPE", f)))
            .unwrap_or(name);
        assert!(
            family.starts_with("knots_") || family.starts_with("vllm:"),
            "{family}"
        );
        assert!(
            !family.starts_with("knots_") || !family.contains(':'),
            "{family}"
        );
        assert!(declared("HELP", family), "no HELP for {family}");
        assert!(declared("TYPE", family), "no TYPE for {family}");
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for family in ["knots_lora_requests_info", "vllm:lora_requests_info"] {
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(&format!("{family}{{")))
            .collect();
        assert_eq!(series.len(), 1, "{family}: {series:?}");
        let value: f64 = series[0].rsplit(' ').next().unwrap().parse().unwrap();
        assert!(
            (value - now).abs() < 60.0,
            "{family} carries the scrape time"
        );
        for label in [
            "running_lora_adapters=",
            "waiting_lora_adapters=",
            "max_lora=",
        ] {
            assert!(series[0].contains(label), "{label} in {}", series[0]);
        }
    }
}

/// Core Space methods by name and through the `merge` field; a second λ reuses the alignment.
#[tokio::test]
async fn core_space_merges_and_the_alignment_cache() {
    let s = start(Limits::default()).await;
    let hits = |text: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with("knots_alignment_cache_requests_total{outcome=\"hit\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    let bodies = [
        json!({"model": "math+code@core-iso-cts", "prompt": "x", "max_tokens": 1}),
        json!({"model": "math+code", "prompt": "x", "max_tokens": 1,
               "merge": {"method": "core-tsv", "isotropize": true, "lambda": 0.5}}),
        json!({"model": "math+code", "prompt": "x", "max_tokens": 1,
               "merge": {"method": "core-iso-cts", "common_fraction": 0.5, "lambda": 0.7}}),
    ];
    for body in bodies {
        let (st, h, out) = post(&s, "/v1/completions", OP, body).await;
        assert_eq!(st, 200, "{out}");
        assert!(
            h["x-knots-merge"]
                .to_str()
                .unwrap()
                .contains("outcome=miss")
        );
    }
    let (_, text) = get(&s, "/metrics", OP).await;
    assert!(
        hits(text.as_str().unwrap()) >= 2.0,
        "the later merges reuse the alignment"
    );
    for (merge, param) in [
        (
            json!({"method": "knots-ties", "isotropize": true}),
            "merge.isotropize",
        ),
        (
            json!({"method": "core-iso-c", "isotropize": false}),
            "merge.isotropize",
        ),
        (
            json!({"method": "core-iso-cts", "common_fraction": 2}),
            "merge.common_fraction",
        ),
    ] {
        let body = json!({"model": "math+code", "prompt": "x", "max_tokens": 1, "merge": merge});
        let (st, _, err) = post(&s, "/v1/completions", OP, body).await;
        assert_eq!(
            (st, err["error"]["param"].as_str()),
            (StatusCode::BAD_REQUEST, Some(param))
        );
    }
    s.stop().await.unwrap();
}

#[tokio::test]
async fn overload_gives_429_and_disconnect_stops_generation() {
    let s = start(Limits {
        max_concurrency: 1,
        ..Limits::default()
    })
    .await;
    let body = json!({"model": "gen", "prompt": "slow", "max_tokens": 200, "stream": true});
    let mut r = client()
        .post(format!("{}/v1/completions", s.url))
        .bearer_auth(OP)
        .json(&body)
        .send()
        .await
        .unwrap();
    let first = r.chunk().await.unwrap();
    assert!(first.is_some());
    let (st, h, err) = post(
        &s,
        "/v1/completions",
        OP,
        json!({"model": "gen", "prompt": "x", "max_tokens": 1}),
    )
    .await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{err}");
    assert_eq!(h["retry-after"], "1");
    drop(r);
    for _ in 0..100 {
        if s.backend.cancelled.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        s.backend.cancelled.load(Ordering::SeqCst),
        1,
        "generation stopped after the client left"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (st, _, _) = post(
        &s,
        "/v1/completions",
        OP,
        json!({"model": "gen", "prompt": "x", "max_tokens": 1}),
    )
    .await;
    assert_eq!(st, 200, "the slot is free again");
    s.stop().await.unwrap();
}

#[tokio::test]
async fn a_panic_is_a_500_for_that_request_only() {
    let s = start(Limits::default()).await;
    let (st, _, err) = post(
        &s,
        "/v1/completions",
        OP,
        json!({"model": "gen", "prompt": "panic!", "max_tokens": 1}),
    )
    .await;
    assert_eq!(
        (st, err["error"]["type"].as_str()),
        (StatusCode::INTERNAL_SERVER_ERROR, Some("server_error"))
    );
    let (st, _) = get(&s, "/health", OP).await;
    assert_eq!(st, 200);
    s.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests() {
    let s = start(Limits::default()).await;
    let url = s.url.clone();
    let slow = tokio::spawn(async move {
        let r = client()
            .post(format!("{url}/v1/completions"))
            .bearer_auth(OP)
            .json(&json!({"model": "gen", "prompt": "slow", "max_tokens": 10}))
            .send()
            .await
            .unwrap();
        (r.status(), r.json::<Value>().await.unwrap())
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let state = s.state.clone();
    let url = s.url.clone();
    let stopped = tokio::spawn(s.stop());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(state.is_shutting_down());
    let (st, body) = slow.await.unwrap();
    assert_eq!(
        (st, body["usage"]["completion_tokens"].as_u64()),
        (StatusCode::OK, Some(10))
    );
    stopped.await.unwrap().unwrap();
    assert!(
        client().get(format!("{url}/health")).send().await.is_err(),
        "no longer accepting"
    );
}
