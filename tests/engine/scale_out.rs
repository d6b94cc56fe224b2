//! Replicas sharing work: real `knots serve` processes (SmolLM2, the committed adapters) over a
//! shared merge store, as a directory and on a real S3-compatible server (moto, started on
//! loopback), and adapters registered by URI from that server and from a hub cache.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use super::process::{ServerProcess, client, free_port, post_json, smollm2_args};

/// A completion's text and its `x-knots-merge` header.
async fn complete(url: &str, model: &str) -> (String, String) {
    let r = client()
        .post(format!("{url}/v1/completions"))
        .json(&json!({"model": model, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{model}");
    let header = r.headers()["x-knots-merge"].to_str().unwrap().to_string();
    let body: Value = r.json().await.unwrap();
    (
        body["choices"][0]["text"].as_str().unwrap().to_string(),
        header,
    )
}

/// The value of the series `series` (name and labels as rendered) in `/metrics`, 0 if absent.
pub async fn metric(url: &str, series: &str) -> f64 {
    let text = client()
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Waits until the server has written `n` merges to its store (writes happen after the answer).
pub async fn await_writes(url: &str, n: f64) {
    for _ in 0..300 {
        if metric(url, "knots_merge_store_writes_total{outcome=\"written\"}").await >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{url} did not write {n} merges to the store");
}

fn serve_args(extra: &[&str]) -> Vec<String> {
    smollm2_args(&[&["--state-db", ":memory:"], extra].concat())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_share_merges_through_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", dir.path().join("merges").display());
    let args = serve_args(&["--merge-store", &store]);
    let a = ServerProcess::start(&args).await;
    let b = ServerProcess::start(&args).await;
    let set = "sentiment-lm+news-lm@ties";
    let (text_a, header_a) = complete(&a.url, set).await;
    assert!(header_a.contains("outcome=miss"), "{header_a}");
    await_writes(&a.url, 1.0).await;
    let (text_b, header_b) = complete(&b.url, set).await;
    assert!(header_b.contains("outcome=fetched"), "{header_b}");
    assert_eq!(
        text_a, text_b,
        "a fetched merge serves exactly what the computed one does"
    );
    assert_eq!(
        metric(
            &b.url,
            "knots_merge_store_requests_total{outcome=\"fetched\"}"
        )
        .await,
        1.0
    );

    // A damaged payload is refused and counted; the replica computes the merge instead.
    let other = "sentiment-lm+language-lm@knots-ties";
    let (text_a, _) = complete(&a.url, other).await;
    await_writes(&a.url, 2.0).await;
    for entry in std::fs::read_dir(dir.path().join("merges/merges")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let mut bytes = std::fs::read(&path).unwrap();
            let last = bytes.len() - 1;
            bytes[last] ^= 0x55;
            std::fs::write(&path, bytes).unwrap();
        }
    }
    let (text_b, header_b) = complete(&b.url, other).await;
    assert!(header_b.contains("outcome=miss"), "{header_b}");
    assert_eq!(text_a, text_b);
    assert_eq!(
        metric(
            &b.url,
            "knots_merge_store_requests_total{outcome=\"failed\"}"
        )
        .await,
        1.0
    );
}

/// A moto S3 server on a free loopback port, killed when dropped.
pub struct S3Server {
    child: Child,
    pub endpoint: String,
}

impl S3Server {
    pub async fn start() -> Self {
        let port = free_port();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m moto.server (pip install 'moto[server]')");
        let server = Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        for _ in 0..200 {
            if client().get(&server.endpoint).send().await.is_ok() {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("moto did not start");
    }

    /// Creates a bucket or writes an object. moto checks no signature, but refuses to overwrite
    /// an object for a request without credentials: any well-formed header will do.
    pub async fn put(&self, path: &str, body: Vec<u8>) {
        let credentials = "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request, \
                           SignedHeaders=host, Signature=0";
        let r = client()
            .put(format!("{}/{path}", self.endpoint))
            .header("authorization", credentials)
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "PUT {path}: {}", r.status());
    }

    /// The `AWS_*` variables that point a server at this one.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn register(url: &str, body: Value) -> (u16, Value) {
    register_at(url, "/v1/adapters", body).await
}

async fn register_at(url: &str, path: &str, body: Value) -> (u16, Value) {
    let (status, answer, _) = post_json(url, path, body).await;
    (status, answer)
}

fn adapter_files(name: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/adapters")
        .join(name);
    ["adapter_config.json", "adapter_model.safetensors"]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(dir.join(f)).unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn merges_and_adapters_come_from_s3_and_the_hub() {
    let s3 = S3Server::start().await;
    s3.put("knots", Vec::new()).await;
    for (file, bytes) in adapter_files("shout") {
        s3.put(&format!("knots/adapters/loud/{file}"), bytes).await;
    }
    // A hub cache holding one adapter repo, as the hub client lays it out.
    let hub = tempfile::tempdir().unwrap();
    let repo = hub.path().join("models--acme--news-adapter");
    let snapshot = repo.join("snapshots/0123456789abcdef");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123456789abcdef").unwrap();
    for (file, bytes) in adapter_files("news-lm") {
        std::fs::write(snapshot.join(file), bytes).unwrap();
    }
    let cache = tempfile::tempdir().unwrap();
    let mut env = s3.env();
    env.push(("HF_HUB_CACHE", hub.path().display().to_string()));
    env.push(("HF_HUB_OFFLINE", "1".into()));
    let cache_dir = cache.path().display().to_string();
    let args = serve_args(&[
        "--merge-store",
        "s3://knots/fleet",
        "--adapter-cache",
        &cache_dir,
    ]);
    let a = ServerProcess::start_with_env(&args, &env).await;
    let b = ServerProcess::start_with_env(&args, &env).await;

    // Merges: computed on one replica, fetched from S3 by the other.
    let set = "sentiment-lm+language-lm@ta";
    let (text_a, header_a) = complete(&a.url, set).await;
    assert!(header_a.contains("outcome=miss"), "{header_a}");
    await_writes(&a.url, 1.0).await;
    let (text_b, header_b) = complete(&b.url, set).await;
    assert!(header_b.contains("outcome=fetched"), "{header_b}");
    assert_eq!(text_a, text_b);

    // Adapters by URI: from S3 and from the hub cache, digest-checked.
    let (status, listed) = register(
        &a.url,
        json!({"name": "loud", "uri": "s3://knots/adapters/loud", "digest": "00"}),
    )
    .await;
    assert_eq!(status, 400, "{listed}");
    assert_eq!(listed["error"]["param"], "digest");
    let (status, body) = register(
        &a.url,
        json!({"name": "loud", "uri": "s3://knots/adapters/loud"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let digest = body["sha256"].as_str().unwrap().to_string();
    let (status, body) = register(
        &b.url,
        json!({"name": "loud", "uri": "s3://knots/adapters/loud", "digest": &digest}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (loud_a, _) = complete(&a.url, "loud").await;
    let (loud_b, _) = complete(&b.url, "loud").await;
    assert_eq!(loud_a, loud_b);
    // New content under the same URI: a reload fetches it again.
    for (file, bytes) in adapter_files("news-lm") {
        s3.put(&format!("knots/adapters/loud/{file}"), bytes).await;
    }
    let (status, body) = register_at(&a.url, "/v1/adapters/reload", json!({"name": "loud"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["changed"], true, "{body}");
    assert_ne!(body["adapter"]["sha256"], json!(digest));
    let (status, body) = register(
        &a.url,
        json!({"name": "hub-news", "uri": "hf://acme/news-adapter"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = register(
        &a.url,
        json!({"name": "missing", "uri": "hf://acme/absent"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("HF_HUB_OFFLINE"),
        "{body}"
    );
    let (status, body) = register(
        &a.url,
        json!({"name": "nobucket", "uri": "s3://knots/adapters/none"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    // The hub adapter serves what the same files do from the local directory.
    let (hub_text, _) = complete(&a.url, "hub-news").await;
    let (dir_text, _) = complete(&a.url, "news-lm").await;
    assert_eq!(hub_text, dir_text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_port_serves_metrics_without_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, crate::server::TEST_KEYS).unwrap();
    let port = free_port();
    let keys = keys.display().to_string();
    let port = port.to_string();
    let server =
        ServerProcess::start(&serve_args(&["--api-keys", &keys, "--metrics-port", &port])).await;
    let get = |url: String| async move { client().get(url).send().await.unwrap() };
    assert_eq!(get(format!("{}/metrics", server.url)).await.status(), 401);
    let open = get(format!("http://127.0.0.1:{port}/metrics")).await;
    assert_eq!(open.status(), 200);
    assert!(
        open.text()
            .await
            .unwrap()
            .contains("knots_lora_requests_info{")
    );
    assert_eq!(
        get(format!("http://127.0.0.1:{port}/ready")).await.status(),
        200
    );
    assert_eq!(
        get(format!("http://127.0.0.1:{port}/v1/models"))
            .await
            .status(),
        404
    );
}
