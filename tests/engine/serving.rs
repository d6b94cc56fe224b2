//! The serving engine on the real SmolLM2: a real `knots serve` stack on a random port, f32
//! weights, the committed adapters. Concurrent greedy requests over different adapter sets share
//! batched forwards, and each must give exactly the text it gives alone. Also: the quantized
//! base path against the f32 path.

use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use knots::adapters::Registry;
use knots::engine::{EngineLimits, TextModel, WeightFormat, argmax};
use knots::server::auth::Keys;
use knots::server::engine_backend::{EngineBackend, EngineOptions};
use knots::server::experiments::Experiments;
use knots::server::metrics::Compat;
use knots::server::state::{AppState, Limits, StateParts};
use knots::server::store::Store;
use knots::server::{attach_base, serve};
use serde_json::{Value, json};

use super::{model_path, models_dir, smollm2};

/// Eight sets: the base, single adapters, a KnOTS-TIES set, a task-arithmetic set and a dense
/// TIES set.
const SETS: [&str; 8] = [
    "smollm2-135m-instruct",
    "sentiment-lm",
    "news-lm",
    "shout",
    "language-lm",
    "sentiment-lm+news-lm",
    "news-lm+language-lm@ta",
    "shout+sentiment-lm@ties",
];

const PROMPTS: [&str; 4] = [
    "Is the sentiment of this text positive or negative?\nText: I loved the film.\nAnswer:",
    "The capital of France is",
    "Which language is this text written in?\nText: Der Hund schläft.\nLanguage:",
    "Write one sentence about the sea.",
];

async fn start_server(
    models: &[&str],
    limits: EngineLimits,
) -> (String, tokio::sync::oneshot::Sender<()>) {
    start_configured(models, limits, |_| {}).await
}

/// A real server on the committed adapters, open (no keys) unless `configure` changes its parts.
pub async fn start_configured(
    models: &[&str],
    limits: EngineLimits,
    configure: impl FnOnce(&mut StateParts),
) -> (String, tokio::sync::oneshot::Sender<()>) {
    let options = EngineOptions {
        format: WeightFormat::F32,
        limits,
    };
    let models: Vec<String> = models.iter().map(|m| m.to_string()).collect();
    let backend = tokio::task::spawn_blocking(move || EngineBackend::load(&models, "cpu", options))
        .await
        .unwrap()
        .unwrap();
    let backend: Arc<EngineBackend> = Arc::new(backend);
    let bases = knots::server::backend::Backend::bases(backend.as_ref());
    let registry =
        Registry::load_dir(&models_dir().join("adapters"), &|a| attach_base(&bases, a)).unwrap();
    let store = Arc::new(Store::in_memory().unwrap());
    let mut parts = StateParts {
        backend,
        registry,
        keys: Keys::open(),
        bundles: Vec::new(),
        experiments: Experiments::load(Vec::new(), store.clone()).unwrap(),
        store,
        limits: Limits::default(),
        merge_cache_bytes: 1 << 30,
        alignment_cache_bytes: 64 << 20,
        merge_store: None,
        adapter_roots: Vec::new(),
        adapter_cache: knots::adapters::AdapterCache::new(
            std::env::temp_dir().join("knots-test-adapter-cache"),
        ),
        metrics_compat: Compat::None,
    };
    configure(&mut parts);
    let state = AppState::new(parts);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(
        listener,
        state,
        async move {
            let _ = rx.await;
        },
        Duration::from_secs(5),
    ));
    (url, tx)
}

async fn complete(url: &str, model: &str, prompt: &str) -> Value {
    let body = json!({"model": model, "prompt": prompt, "max_tokens": 10, "temperature": 0});
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{model}");
    r.json().await.unwrap()
}

/// Engine steps run so far, from `/metrics` (the recorder is global to the process).
async fn step_count(url: &str) -> f64 {
    let metrics = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metrics
        .lines()
        .find(|l| l.starts_with("knots_engine_step_tokens_count"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
}

fn text(v: &Value) -> String {
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_sets_give_exactly_what_each_gives_alone() {
    let (url, stop) = start_server(
        &["smollm2-135m-instruct", "all-minilm-l6-v2"],
        EngineLimits::default(),
    )
    .await;
    let cases: Vec<(&str, &str)> = SETS
        .iter()
        .enumerate()
        .map(|(i, set)| (*set, PROMPTS[i % PROMPTS.len()]))
        .collect();
    let mut alone = Vec::new();
    for (set, prompt) in &cases {
        alone.push(text(&complete(&url, set, prompt).await));
    }
    let steps_before = step_count(&url).await;
    let together = futures_util::future::join_all(
        cases
            .iter()
            .map(|(set, prompt)| complete(&url, set, prompt)),
    )
    .await;
    for ((set, _), (alone, together)) in cases.iter().zip(alone.iter().zip(&together)) {
        assert_eq!(&text(together), alone, "{set}: batched differs from alone");
    }
    let distinct: std::collections::BTreeSet<&String> = alone.iter().collect();
    assert!(distinct.len() >= 4, "sets must really differ: {alone:?}");
    let steps = step_count(&url).await;
    let batched_tokens: f64 = together
        .iter()
        .map(|v| v["usage"]["completion_tokens"].as_f64().unwrap())
        .sum();
    assert!(
        steps - steps_before < batched_tokens,
        "concurrent requests share steps ({} steps for {batched_tokens} tokens)",
        steps - steps_before
    );
    embeddings_in_a_mixed_batch_equal_alone(&url).await;
    sampling_controls(&url).await;
    let _ = stop.send(());
    a_full_queue_answers_429_and_a_request_beyond_the_cache_400().await;
}

/// MiniLM sets (the base, single adapters, a merged set) requested one at a time, then all at
/// once so the encoder engine batches them into shared, padded forwards: every embedding equals
/// its alone result within 1e-5.
async fn embeddings_in_a_mixed_batch_equal_alone(url: &str) {
    const ENCODER_SETS: [&str; 4] = [
        "all-minilm-l6-v2",
        "sentiment",
        "news+intent",
        "nli+fact_check@knots-ties",
    ];
    let inputs = [
        vec![
            "A short one.",
            "The film was wonderful from start to finish.",
        ],
        vec![
            "A short one.",
            "Stocks fell sharply on Monday after the central bank raised rates.",
        ],
        vec![
            "Book a table for two tonight.",
            "Play some jazz.",
            "Is it raining?",
        ],
        vec!["The moon is made of cheese, a scientist claimed in a long interview."],
    ];
    let client = reqwest::Client::new();
    let embed = |set: &'static str, texts: Vec<&'static str>| {
        let client = client.clone();
        async move {
            let v: Value = client
                .post(format!("{url}/v1/embeddings"))
                .json(&json!({"model": set, "input": texts}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["data"]
                .as_array()
                .unwrap_or_else(|| panic!("{set}: {v}"))
                .iter()
                .map(|d| {
                    d["embedding"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap() as f32)
                        .collect::<Vec<f32>>()
                })
                .collect::<Vec<_>>()
        }
    };
    let mut alone = Vec::new();
    for (set, texts) in ENCODER_SETS.iter().zip(&inputs) {
        alone.push(embed(set, texts.clone()).await);
    }
    let together = futures_util::future::join_all(
        ENCODER_SETS
            .iter()
            .zip(&inputs)
            .map(|(set, texts)| embed(set, texts.clone())),
    )
    .await;
    for (set, (alone, together)) in ENCODER_SETS.iter().zip(alone.iter().zip(&together)) {
        assert_eq!(alone.len(), together.len(), "{set}");
        for (a, t) in alone.iter().zip(together) {
            assert!(
                super::max_abs_diff(a, t) <= 1e-5,
                "{set}: batched embedding differs"
            );
        }
    }
    // The same text under the base and under an adapter.
    assert!(
        super::max_abs_diff(&alone[0][0], &alone[1][0]) > 1e-3,
        "sets must differ"
    );
}

async fn post(url: &str, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{url}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Log-probabilities, logit bias, penalties and `n` on the real model.
async fn sampling_controls(url: &str) {
    let model = "sentiment-lm+news-lm";
    let prompt = "The capital of France is";
    let greedy = json!({"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0});
    let with = |extra: Value| {
        let mut body = greedy.clone();
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let (_, plain) = post(url, "/v1/completions", greedy.clone()).await;

    // Greedy picks the most likely token: its log-probability is the best of the alternatives,
    // and the tokens spell the text.
    let (st, v) = post(url, "/v1/completions", with(json!({"logprobs": 3}))).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        text(&v),
        text(&plain),
        "asking for logprobs changes nothing"
    );
    let lp = &v["choices"][0]["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(
        tokens.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(tokens.concat(), text(&v));
    for (i, chosen) in lp["token_logprobs"].as_array().unwrap().iter().enumerate() {
        let chosen = chosen.as_f64().unwrap();
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert_eq!(top.len(), 3, "{lp}");
        let best = top
            .values()
            .map(|x| x.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!(chosen <= 0.0 && (chosen - best).abs() < 1e-5, "{lp}");
    }
    let chat = json!({"model": model, "messages": [{"role": "user", "content": "Say hi"}],
                      "max_tokens": 4, "temperature": 0, "logprobs": true, "top_logprobs": 2});
    let (st, v) = post(url, "/v1/chat/completions", chat).await;
    assert_eq!(st, 200, "{v}");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert!(!content.is_empty());
    assert!(
        content
            .iter()
            .all(|t| t["top_logprobs"].as_array().unwrap().len() == 2
                && t["logprob"].as_f64().unwrap() <= 0.0
                && t["bytes"].is_array())
    );

    // A bias of +100 makes one token the greedy choice every time; -100 bans the first token.
    let yes = super::smollm2().tokenizer.encode(" yes", false).unwrap();
    assert_eq!(yes.len(), 1, "one token");
    let bias = json!({"logit_bias": {yes[0].to_string(): 100}, "max_tokens": 3});
    let (st, v) = post(url, "/v1/completions", with(bias)).await;
    assert_eq!((st, text(&v).as_str()), (200, " yes yes yes"), "{v}");
    let first = super::smollm2()
        .tokenizer
        .encode(&tokens[0..1].concat(), false)
        .unwrap();
    let ban = json!({"logit_bias": {first[0].to_string(): -100}});
    let (_, v) = post(url, "/v1/completions", with(ban)).await;
    assert!(
        !text(&v).starts_with(tokens[0]),
        "banned {:?}: {v}",
        tokens[0]
    );
    let outside = json!({"logit_bias": {"1000000000": 1}});
    let (st, v) = post(url, "/v1/completions", with(outside)).await;
    assert_eq!(
        (st, v["error"]["param"].as_str()),
        (400, Some("logit_bias")),
        "{v}"
    );

    // A repetitive continuation changes under a frequency penalty.
    let repeat = json!({"model": model, "prompt": "1, 1, 1, 1, 1, 1, 1,", "max_tokens": 12, "temperature": 0});
    let (_, free) = post(url, "/v1/completions", repeat.clone()).await;
    let mut penalised = repeat.clone();
    penalised["frequency_penalty"] = json!(2.0);
    let (st, v) = post(url, "/v1/completions", penalised).await;
    assert_eq!(st, 200);
    assert_ne!(
        text(&v),
        text(&free),
        "a frequency penalty of 2 changes the repeats"
    );

    // n choices: indexed, counted, reproducible with a seed, and different from each other.
    let n = with(json!({"n": 3, "temperature": 1.0, "seed": 11, "max_tokens": 8}));
    let (st, a) = post(url, "/v1/completions", n.clone()).await;
    assert_eq!(st, 200, "{a}");
    let choices = a["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    let texts: std::collections::BTreeSet<&str> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            assert_eq!(c["index"], i);
            c["text"].as_str().unwrap()
        })
        .collect();
    assert!(texts.len() >= 2, "seeded choices differ: {texts:?}");
    assert!(a["usage"]["completion_tokens"].as_u64().unwrap() > 8);
    let (_, b) = post(url, "/v1/completions", n).await;
    assert_eq!(
        a["choices"], b["choices"],
        "the same seed gives the same choices"
    );
}

async fn a_full_queue_answers_429_and_a_request_beyond_the_cache_400() {
    // One running sequence, one waiting: a third request is refused with Retry-After.
    let limits = EngineLimits {
        max_queue: 1,
        max_batch: 1,
        step_tokens: 64,
        kv_cache_bytes: 64 << 20,
    };
    let (url, stop) = start_server(&["smollm2-135m-instruct"], limits).await;
    let client = reqwest::Client::new();
    let body = json!({"model": "smollm2-135m-instruct", "prompt": "Count: 1, 2, 3,", "max_tokens": 60, "temperature": 0});
    let send = || {
        client
            .post(format!("{url}/v1/completions"))
            .json(&body)
            .send()
    };
    let (a, b) = (send(), send());
    let first = tokio::spawn(a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = tokio::spawn(b);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let third = send().await.unwrap();
    assert_eq!(third.status(), 429);
    assert!(third.headers().contains_key("retry-after"));
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    assert_eq!(
        second.await.unwrap().unwrap().status(),
        200,
        "queued, then served"
    );
    // Beyond the context, up to a trillion: refused at once, naming max_tokens.
    for max_tokens in [100_000u64, 1_000_000_000_000] {
        let too_long = client
            .post(format!("{url}/v1/completions"))
            .json(
                &json!({"model": "smollm2-135m-instruct", "prompt": "x", "max_tokens": max_tokens}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(too_long.status(), 400, "max_tokens {max_tokens}");
        let error: serde_json::Value = too_long.json().await.unwrap();
        assert_eq!(error["error"]["param"], "max_tokens", "{error}");
    }
    let _ = stop.send(());
}

/// The quantized base against f32, teacher-forced over 31 positions. With the packed kernels the
/// weights are the file's Q4_1 values exactly (f32 dequantizes the same blocks; elsewhere they are
/// re-quantized to Q8_0), and the quantized matmul quantizes activations to 8 bits per 32-value
/// block (as llama.cpp does), so logits move by noise of up to about 1 on the winning token (logits of
/// 10–28 here) and up to about 3 in the far tail of the 49k vocabulary. Bounds: the winning
/// token's logit within 1.5, every logit within 4, the same top-1 token wherever f32's top two
/// are more than 0.25 apart, and at least 90% of all positions.
#[test]
fn quantized_base_agrees_with_f32() {
    let quantized = TextModel::load_as(
        &model_path("smollm2-135m-instruct"),
        &Device::Cpu,
        WeightFormat::Native,
    )
    .unwrap();
    let f32_model = smollm2();
    let text = "The quick brown fox jumps over the lazy dog because it was tired of running. \
                Paris is the capital of France, and Berlin is the capital of Germany.";
    let prompt = f32_model.encode_plain(text).unwrap();
    let logits = |m: &TextModel, end: usize| -> Vec<f32> {
        let mut cache = knots::engine::KvCache::default();
        let out = m.model.forward(&prompt[..end], &mut cache, None).unwrap();
        out.to_vec1().unwrap()
    };
    let mut agree = 0;
    for end in 1..=prompt.len() {
        let (q, f) = (logits(&quantized, end), logits(f32_model, end));
        let best = argmax(&f) as usize;
        let mut sorted = f.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        assert!((q[best] - f[best]).abs() < 1.5, "winning logit at {end}");
        assert!(super::max_abs_diff(&q, &f) < 4.0, "logits at {end}");
        if argmax(&q) as usize == best {
            agree += 1;
        } else {
            assert!(sorted[0] - sorted[1] <= 0.25, "top-1 at {end}");
        }
    }
    assert!(
        agree * 10 >= prompt.len() * 9,
        "{agree} of {}",
        prompt.len()
    );
}
