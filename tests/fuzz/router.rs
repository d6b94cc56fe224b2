//! The whole router in process (`knots::server::app` with `tower::ServiceExt::oneshot`) against
//! an instant backend: requests to every route with fuzzed bodies, paths, keys and content
//! types, and adapter life cycles (fuzzed adapter files registered at run time, then used for
//! generation, embeddings, classification and merges, then deleted). No answer may be a 5xx:
//! the server's panic catcher turns a handler panic into a 500, so a 500 is a crash found.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, header};
use knots::adapters::Registry;
use knots::merge::MergedDelta;
use knots::server::auth::Keys;
use knots::server::backend::*;
use knots::server::bundles::{Bundle, BundleConfig};
use knots::server::experiments::{Experiment, ExperimentConfig, Experiments};
use knots::server::metrics::Compat;
use knots::server::state::{AppState, Limits, StateParts};
use knots::server::store::Store;
use knots::server::{app, attach_base};
use proptest::prelude::*;
use proptest::test_runner::TestCaseResult;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::request_json::{generation, model, other_body};
use super::safetensors::{AdapterFiles, adapter_files};
use super::strategies::{
    Gen, json_str, merge_field_json, model_string, mutate, name, pick_str, served_model,
};
use super::{Bytes, Tally, fuzz, scratch_dir};
use crate::common::{lora_config, random_matrix, write_adapter};

const BODY_LIMIT: usize = 16 << 10;

/// Answers at once: up to three words per generation, constant embeddings, label scores.
struct InstantBackend;

impl Backend for InstantBackend {
    fn bases(&self) -> Vec<BaseInfo> {
        crate::server::test_bases()
    }

    fn generate(&self, job: GenerateJob) -> Result<GenStream, BackendError> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let n = job.sampling.max_tokens.min(3);
        for i in 0..n {
            let logprob = job.sampling.logprobs.map(|k| TokenLogprobs {
                token: format!("w{i}"),
                logprob: -0.5,
                top: (0..k).map(|j| (format!("alt{j}"), -1.0)).collect(),
            });
            let _ = tx.send(GenEvent::Text(Piece {
                text: format!("w{i} "),
                logprob,
            }));
        }
        let _ = tx.send(GenEvent::Done(Finished {
            prompt_tokens: 1,
            completion_tokens: n,
            finish_reason: FinishReason::Length,
        }));
        Ok(rx)
    }

    fn embed(
        &self,
        _base: &str,
        inputs: &[String],
        _delta: Option<&Arc<MergedDelta>>,
        _deadline: Instant,
    ) -> Result<(Vec<Vec<f32>>, usize), BackendError> {
        Ok((
            inputs.iter().map(|_| vec![1.0, 0.0]).collect(),
            inputs.len(),
        ))
    }

    fn classify(
        &self,
        _base: &str,
        inputs: &[String],
        heads: &[TaskHead],
        _delta: Option<&Arc<MergedDelta>>,
        _deadline: Instant,
    ) -> Result<Vec<Vec<LabelScore>>, BackendError> {
        Ok(inputs
            .iter()
            .map(|_| {
                heads
                    .iter()
                    .flat_map(|h| {
                        h.labels.iter().map(|l| LabelScore {
                            task: h.task.clone(),
                            label: l.clone(),
                            score: 0.5,
                        })
                    })
                    .collect()
            })
            .collect())
    }
}

/// A served router over fixture adapters, and the root adapters are registered from.
pub(super) struct Env {
    rt: tokio::runtime::Runtime,
    app: Router,
    pub(super) spare: PathBuf,
    next: AtomicUsize,
    requests: AtomicUsize,
    tally: Tally,
    _dir: tempfile::TempDir,
}

fn fixture(dir: &Path, seed: u64, base: &str, task: Option<&str>) {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let m = |rng: &mut _, r, c| random_matrix(rng, r, c, 0.5);
    let (a, b, a2, b2) = (
        m(&mut rng, 2, 6),
        m(&mut rng, 6, 2),
        m(&mut rng, 2, 6),
        m(&mut rng, 6, 2),
    );
    let mut config = lora_config(2, 4.0, &["q", "v"]);
    config["base_model_name_or_path"] = json!(base);
    write_adapter(
        dir,
        &config,
        &[("layers.0.q", &a, &b), ("layers.0.v", &a2, &b2)],
    );
    if let Some(task) = task {
        let labels = ["negative", "positive"];
        std::fs::write(
            dir.join("knots_task.json"),
            json!({"task": task, "labels": labels}).to_string(),
        )
        .unwrap();
    }
}

impl Env {
    pub(super) fn new() -> Self {
        let dir = scratch_dir();
        let root = dir.path().join("adapters");
        fixture(&root.join("math"), 1, "org/gen-base", None);
        fixture(&root.join("code"), 2, "org/gen-base", None);
        fixture(
            &root.join("sentiment"),
            3,
            "org/enc-base",
            Some("sentiment"),
        );
        fixture(&root.join("topic"), 4, "org/enc-base", Some("topic"));
        fixture(&root.join("acme/secret"), 5, "org/gen-base", None);
        let spare = dir.path().join("spare");
        fixture(&spare.join("extra"), 6, "org/gen-base", None);
        let keys_file = dir.path().join("keys.toml");
        std::fs::write(&keys_file, crate::server::TEST_KEYS).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let app = rt.block_on(async {
            let backend = Arc::new(InstantBackend);
            let bases = backend.bases();
            let registry = Registry::load_dir(&root, &|a| attach_base(&bases, a)).unwrap();
            let bundle = |name: &str, model: &str, tenant: Option<&str>| {
                Bundle::from_config(BundleConfig {
                    name: name.into(),
                    model: model.into(),
                    tenant: tenant.map(String::from),
                    merge: serde_json::from_value(json!({"density": 0.5})).unwrap(),
                })
                .unwrap()
            };
            let exp: ExperimentConfig = serde_json::from_value(json!({
                "name": "ab", "arms": [{"name": "merged", "model": "math+code", "weight": 1.0},
                                        {"name": "single", "model": "math", "weight": 1.0}]
            }))
            .unwrap();
            let store = Arc::new(Store::in_memory().unwrap());
            let experiments =
                Experiments::load(vec![Experiment::from_config(exp).unwrap()], store.clone())
                    .unwrap();
            let state = AppState::new(StateParts {
                backend,
                registry,
                keys: Keys::load(&keys_file).unwrap(),
                bundles: vec![
                    bundle("stem", "math+code@ties", None),
                    bundle("acme-only", "secret+math", Some("acme")),
                ],
                experiments,
                store,
                limits: Limits {
                    request_timeout: Duration::from_secs(20),
                    body_limit_bytes: BODY_LIMIT,
                    ..Limits::default()
                },
                merge_cache_bytes: 16 << 20,
                alignment_cache_bytes: 16 << 20,
                merge_store: None,
                adapter_roots: vec![spare.clone()],
                adapter_cache: knots::adapters::AdapterCache::new(
                    std::env::temp_dir().join("knots-test-adapter-cache"),
                ),
                metrics_compat: Compat::None,
            });
            app(state)
        });
        Self {
            rt,
            app,
            spare,
            next: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            tally: Tally::default(),
            _dir: dir,
        }
    }

    /// Sends `req` and checks the answer: never a 5xx, an error body on JSON errors, a JSON
    /// body on plain successes. Returns the status and the body.
    pub(super) fn send(&self, req: &Call) -> Result<(u16, Vec<u8>), TestCaseError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut builder = Request::builder()
            .method(req.method.as_str())
            .uri(&req.path);
        if let Some(ct) = &req.content_type {
            builder = builder.header(header::CONTENT_TYPE, ct);
        }
        if let Some(key) = &req.auth {
            builder = builder.header(header::AUTHORIZATION, key);
        }
        let Ok(request) = builder.body(Body::from(req.body.0.clone())) else {
            // Not a request a client could send (an invalid URI).
            return Ok((0, Vec::new()));
        };
        let (status, content_type, body) = self
            .rt
            .block_on(async {
                let exchange = async {
                    let response = self.app.clone().oneshot(request).await.unwrap();
                    let status = response.status().as_u16();
                    if let Some(merge) = response.headers().get("x-knots-merge") {
                        let kind = merge.to_str().unwrap_or("").split('=').next().unwrap_or("");
                        self.tally.add(format!("served by {kind}"));
                    }
                    let ct = response
                        .headers()
                        .get(header::CONTENT_TYPE)
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
                    let body = axum::body::to_bytes(response.into_body(), usize::MAX).await;
                    (status, ct, body.map(|b| b.to_vec()))
                };
                tokio::time::timeout(Duration::from_secs(60), exchange).await
            })
            .map_err(|_| TestCaseError::fail(format!("no answer within 60 s: {req:?}")))?;
        let body = body.map_err(|e| TestCaseError::fail(format!("body failed: {e} ({req:?})")))?;
        let text = String::from_utf8_lossy(&body);
        self.tally.add(format!("{status}"));
        prop_assert!(status < 500, "{status} {text} for {req:?}");
        let json = content_type
            .as_deref()
            .is_some_and(|c| c.starts_with("application/json"));
        if json {
            let v: Value = serde_json::from_slice(&body)
                .map_err(|e| TestCaseError::fail(format!("{e}: {text} for {req:?}")))?;
            if status >= 400 {
                prop_assert!(v["error"]["message"].is_string(), "{text} for {req:?}");
            }
            if status == 400 {
                let param = v["error"]["param"].as_str().unwrap_or("-");
                let param = param.split(['.', '[']).next().unwrap_or_default();
                if [
                    "model", "merge", "body", "adapter", "path", "messages", "prompt", "input",
                ]
                .contains(&param)
                {
                    self.tally.add(format!("400 {param}"));
                }
            }
        } else if status == 200
            && content_type
                .as_deref()
                .is_some_and(|c| c.starts_with("text/event-stream"))
        {
            prop_assert!(text.contains("data: "), "{text} for {req:?}");
        }
        Ok((status, body))
    }
}

/// One HTTP request.
#[derive(Debug, Clone)]
pub(super) struct Call {
    method: String,
    path: String,
    auth: Option<String>,
    content_type: Option<String>,
    body: Bytes,
}

fn auth() -> Gen<Option<String>> {
    let bad = pick_str(&[
        "Bearer nope",
        "Basic c2s6",
        "Bearer ",
        "bearer sk-operator",
        "Bearer  sk-operator",
        "sk-operator",
    ]);
    prop_oneof![
        12 => Just(Some("Bearer sk-operator".to_string())),
        4 => Just(Some("Bearer sk-acme-user".to_string())),
        1 => Just(Some("Bearer sk-globex-user".to_string())),
        1 => Just(Some("Bearer sk-scraper".to_string())),
        1 => Just(None),
        1 => bad.prop_map(Some),
    ]
    .boxed()
}

fn content_type() -> Gen<Option<String>> {
    let other = pick_str(&[
        "application/json; charset=utf-8",
        "APPLICATION/JSON",
        "application/merge-patch+json",
        "text/plain",
        "application/x-www-form-urlencoded",
        "",
        "json",
    ]);
    prop_oneof![
        12 => Just(Some("application/json".to_string())),
        1 => other.prop_map(Some),
        1 => Just(None),
    ]
    .boxed()
}

/// A path segment: served names, fuzzed names, and percent-encoded ones.
fn segment() -> Gen<String> {
    let odd = pick_str(&[
        "%2e%2e",
        "..",
        "%00",
        "%ff",
        "a%2fb",
        "%",
        "a%2",
        "%E2%82%AC",
        "0123456789ab",
        "extra",
    ]);
    prop_oneof![
        4 => name().prop_map(|n| percent(&n)),
        1 => odd,
    ]
    .boxed()
}

fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `model` strings that name what is served most of the time.
fn served() -> Gen<String> {
    prop_oneof![
        4 => served_model().prop_map(|m| json_str(&m)),
        1 => model(),
    ]
    .boxed()
}

/// `(method, path, body)` of one request.
type Route = (String, String, Vec<u8>);

/// A request to any route: that route's fields (sometimes damaged), a key, a content type, and
/// now and then a body over the limit.
fn call() -> Gen<Call> {
    let gen_body = mutate(generation(served())).prop_map(|b| b.0).boxed();
    let other = mutate(other_body(served())).prop_map(|b| b.0).boxed();
    let post =
        |path: &'static str| move |body: Vec<u8>| -> Route { ("POST".into(), path.into(), body) };
    let register_path = prop_oneof![
        3 => Just("extra".to_string()),
        1 => pick_str(&["", "..", "../adapters/math", "/", "/etc", "extra/", "missing"]),
    ];
    let register = (name(), register_path).prop_map(|(n, p)| {
        let path = format!("{{spare}}/{p}");
        format!("{{\"name\":{},\"path\":{}}}", json_str(&n), json_str(&path)).into_bytes()
    });
    let reload = name().prop_map(|n| format!("{{\"name\":{}}}", json_str(&n)).into_bytes());
    let warm = (model_string(), prop::option::of(merge_field_json())).prop_map(|(m, merge)| {
        match merge {
            Some(merge) => format!("{{\"model\":{},\"merge\":{merge}}}", json_str(&m)),
            None => format!("{{\"model\":{}}}", json_str(&m)),
        }
        .into_bytes()
    });
    let generate = (
        pick_str(&["/v1/completions", "/v1/chat/completions"]),
        gen_body.clone(),
    )
        .prop_map(|(p, b)| ("POST".to_string(), p, b));
    let encode = (pick_str(&["/v1/embeddings", "/v1/classify"]), other.clone())
        .prop_map(|(p, b)| ("POST".to_string(), p, b));
    let feedback = (segment(), other.clone()).prop_map(|(s, b)| -> Route {
        ("POST".into(), format!("/v1/experiments/{s}/feedback"), b)
    });
    let experiment = prop_oneof![3 => Just("ab".to_string()), 1 => segment()];
    let compare = (experiment, gen_body)
        .prop_map(|(s, b)| -> Route { ("POST".into(), format!("/v1/experiments/{s}/compare"), b) });
    let delete = |prefix: &'static str| {
        segment().prop_map(move |s| -> Route { ("DELETE".into(), format!("{prefix}{s}"), vec![]) })
    };
    let listing = pick_str(&[
        "/v1/models",
        "/v1/adapters",
        "/v1/merges",
        "/v1/experiments",
        "/v1/experiments/ab",
        "/health",
        "/ready",
        "/metrics",
    ]);
    let get = (
        listing,
        pick_str(&["GET", "GET", "GET", "POST", "DELETE", "PUT"]),
    )
        .prop_map(|(p, m)| -> Route { (m, p, vec![]) });
    let anywhere = (segment(), pick_str(&["GET", "POST", "PATCH"]), other)
        .prop_map(|(s, m, b)| -> Route { (m, format!("/v1/{s}"), b) });
    let route = prop_oneof![
        6 => generate,
        4 => encode,
        1 => register.prop_map(post("/v1/adapters")),
        1 => reload.prop_map(post("/v1/adapters/reload")),
        1 => warm.prop_map(post("/v1/merges")),
        1 => feedback,
        1 => compare,
        1 => delete("/v1/merges/"),
        1 => delete("/v1/adapters/fz-"),
        2 => get,
        1 => anywhere,
    ];
    (
        route,
        auth(),
        content_type(),
        prop::option::weighted(0.01, BODY_LIMIT..BODY_LIMIT + 64),
    )
        .prop_map(|((method, path, mut body), auth, content_type, pad)| {
            if let Some(n) = pad {
                body.resize(n + 1, b' ');
            }
            Call {
                method,
                path,
                auth,
                content_type,
                body: Bytes(body),
            }
        })
        .boxed()
}

/// What a registered adapter is used for.
#[derive(Debug, Clone)]
enum Use {
    Classify(Option<String>),
    Embed,
    Complete,
    MergeWith(String),
}

fn uses() -> Gen<Vec<Use>> {
    let task = prop::option::of(pick_str(&["joint", "t", "sentiment", "missing"]));
    let with = pick_str(&[
        "+math",
        "+sentiment",
        ":0.5+code@ties",
        "+topic@knots-ties",
        ":-1+sentiment@core-iso-cts",
        "+math:1e300@ta",
    ]);
    let one = prop_oneof![
        3 => task.prop_map(Use::Classify),
        1 => Just(Use::Embed),
        1 => Just(Use::Complete),
        2 => with.prop_map(Use::MergeWith),
    ];
    prop::collection::vec(one, 1..4).boxed()
}

#[derive(Debug, Clone)]
enum Exchange {
    One(Call),
    Adapter {
        files: AdapterFiles,
        encoder: bool,
        uses: Vec<Use>,
    },
}

fn exchange() -> Gen<Exchange> {
    prop_oneof![
        4 => call().prop_map(Exchange::One),
        1 => (adapter_files(), any::<bool>(), uses())
            .prop_map(|(files, encoder, uses)| Exchange::Adapter { files, encoder, uses }),
    ]
    .boxed()
}

pub(super) fn post(path: &str, body: Value) -> Call {
    Call {
        method: "POST".into(),
        path: path.into(),
        auth: Some("Bearer sk-operator".into()),
        content_type: Some("application/json".into()),
        body: Bytes(body.to_string().into_bytes()),
    }
}

fn case(env: &Env, exchange: Exchange) -> TestCaseResult {
    match exchange {
        Exchange::One(mut call) => {
            // Registration paths point into the spare root.
            let spare = env.spare.display().to_string();
            let body = String::from_utf8_lossy(&call.body.0)
                .replace("{spare}", &spare.replace('\\', "\\\\"));
            call.body = Bytes(body.into_bytes());
            env.send(&call).map(drop)
        }
        Exchange::Adapter {
            files,
            encoder,
            uses,
        } => {
            let name = format!("fz{}", env.next.fetch_add(1, Ordering::Relaxed));
            let dir = env.spare.join(&name);
            let mut files = files;
            if encoder {
                // Near-valid configs name the generator; attach this one to the encoder with a
                // saved classification head.
                files.config = files.config.replace(
                    "\"base_model_name_or_path\":\"org/gen-base\"",
                    concat!(
                        r#""base_model_name_or_path":"org/enc-base","#,
                        r#""modules_to_save":["classifier","score"]"#,
                    ),
                );
            }
            files
                .write(&dir)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let result = lifecycle(env, &name, &dir, &uses);
            let _ = std::fs::remove_dir_all(&dir);
            result
        }
    }
}

/// Registers the adapter in `dir` as `name`; if it loads, uses it and deletes it.
fn lifecycle(env: &Env, name: &str, dir: &Path, uses: &[Use]) -> TestCaseResult {
    let (status, _) = env.send(&post("/v1/adapters", json!({"name": name, "path": dir})))?;
    if status != 200 {
        env.tally.add("adapter refused");
        return Ok(());
    }
    env.tally.add("adapter registered");
    for u in uses {
        let (path, body) = match u {
            Use::Classify(task) => (
                "/v1/classify",
                json!({"model": name, "input": ["positive", "a"], "task": task}),
            ),
            Use::Embed => ("/v1/embeddings", json!({"model": name, "input": "hello"})),
            Use::Complete => (
                "/v1/completions",
                json!({"model": name, "prompt": "hi", "max_tokens": 2, "logprobs": 2}),
            ),
            Use::MergeWith(rest) => ("/v1/merges", json!({"model": format!("{name}{rest}")})),
        };
        env.send(&post(path, body))?;
    }
    let delete = Call {
        method: "DELETE".into(),
        body: Bytes(vec![]),
        ..post(&format!("/v1/adapters/{name}"), json!({}))
    };
    let (status, _) = env.send(&delete)?;
    prop_assert_eq!(status, 200);
    Ok(())
}

#[test]
fn router_never_answers_5xx() {
    let env = Env::new();
    fuzz("router", 5_000, 100, exchange(), |x| case(&env, x));
    println!(
        "fuzz router: {} requests",
        env.requests.load(Ordering::Relaxed)
    );
    env.tally.print("router");
}
