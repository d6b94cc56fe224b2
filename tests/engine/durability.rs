//! Durable state across a `kill -9`: a real `knots serve` process (SmolLM2, the committed
//! adapters) with a state database serves an experiment, then takes run-time adapter
//! registrations and feedback scores concurrently and is killed with SIGKILL mid-stream. A
//! restart on the same database must have every write the API acknowledged — each acknowledged
//! registration is served, each acknowledged score refuses a second one, the stored feedback
//! count is exactly the scored requests — and SQLite must find the database intact.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use super::process::{ServerProcess, client, get_json};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

async fn post(client: &reqwest::Client, url: &str, path: &str, body: Value) -> (u16, Value) {
    match client.post(format!("{url}{path}")).json(&body).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.json().await.unwrap_or(Value::Null))
        }
        // The server was killed while this request was in flight: not acknowledged.
        Err(_) => (0, Value::Null),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let spare = dir.path().join("spare");
    copy_dir(&root.join("models/adapters/shout"), &spare.join("shout"));
    let db = dir.path().join("state.db");
    let config = dir.path().join("serve.toml");
    std::fs::write(
        &config,
        r#"
        [[experiments]]
        name = "ab"
        arms = [{ name = "merged", model = "sentiment-lm+news-lm" }, { name = "single", model = "sentiment-lm" }]
        "#,
    )
    .unwrap();
    let args: Vec<String> = [
        "--model",
        "smollm2-135m-instruct",
        "--adapters",
        "models/adapters",
        "--config",
        &config.to_string_lossy(),
        "--state-db",
        &db.to_string_lossy(),
        "--adapter-root",
        &spare.to_string_lossy(),
    ]
    .map(String::from)
    .to_vec();

    let server = ServerProcess::start(&args).await;
    let url = server.url.clone();
    let client = client();
    let mut served = Vec::new();
    for i in 0..24 {
        let body =
            json!({"model": "exp:ab", "prompt": "Hi", "max_tokens": 1, "user": format!("u{i}")});
        let (status, v) = post(&client, &url, "/v1/completions", body).await;
        assert_eq!(status, 200, "{v}");
        served.push(v["id"].as_str().unwrap().to_string());
    }

    // Registrations and scores, eight in flight at a time, until the kill.
    let acked_names = Arc::new(Mutex::new(BTreeSet::new()));
    let acked_scores = Arc::new(Mutex::new(BTreeSet::new()));
    let mut writers = Vec::new();
    for w in 0..8 {
        let (client, url) = (client.clone(), url.clone());
        let (names, scores) = (acked_names.clone(), acked_scores.clone());
        let spare = spare.join("shout");
        let ids: Vec<String> = served.iter().skip(w).step_by(8).cloned().collect();
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let name = format!("reg-{w}-{i}");
                let body = json!({"name": name, "path": spare});
                match post(&client, &url, "/v1/adapters", body).await.0 {
                    200 => names.lock().unwrap().insert(name),
                    0 => return,
                    other => panic!("registering {name}: {other}"),
                };
                if let Some(id) = ids.get(i) {
                    let body = json!({"request_id": id, "score": 1.0});
                    match post(&client, &url, "/v1/experiments/ab/feedback", body)
                        .await
                        .0
                    {
                        200 => scores.lock().unwrap().insert(id.clone()),
                        0 => return,
                        other => panic!("scoring {id}: {other}"),
                    };
                }
            }
        }));
    }
    // Kill while both kinds of write are in flight: each writer alternates a registration and
    // a score, eight scores each, so after ~24 registrations about half the scores are done.
    while acked_names.lock().unwrap().len() < 24 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill();
    for w in writers {
        w.await.unwrap();
    }
    let names = acked_names.lock().unwrap().clone();
    let scores = acked_scores.lock().unwrap().clone();
    eprintln!(
        "acknowledged before the kill: {} registrations, {} scores",
        names.len(),
        scores.len()
    );
    assert!(
        names.len() >= 4 && !scores.is_empty(),
        "writes were acknowledged before the kill ({} registrations, {} scores)",
        names.len(),
        scores.len()
    );

    let server = ServerProcess::start(&args).await;
    let url = server.url.clone();
    let listed: Value = get_json(&client, &format!("{url}/v1/adapters")).await;
    let present: BTreeSet<String> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap().to_string())
        .collect();
    let lost: Vec<&String> = names.difference(&present).collect();
    assert!(lost.is_empty(), "acknowledged registrations lost: {lost:?}");
    let one = names.iter().next().unwrap();
    let body = json!({"model": one, "prompt": "Hi", "max_tokens": 1});
    assert_eq!(
        post(&client, &url, "/v1/completions", body).await.0,
        200,
        "{one} serves"
    );

    let mut scored = 0;
    for id in &served {
        let body = json!({"request_id": id, "score": 0.0});
        match post(&client, &url, "/v1/experiments/ab/feedback", body)
            .await
            .0
        {
            409 => scored += 1,
            200 => assert!(!scores.contains(id), "acknowledged score of {id} lost"),
            other => panic!("feedback for {id} after the restart: {other}"),
        }
    }
    assert!(scored >= scores.len());
    let stats: Value = get_json(&client, &format!("{url}/v1/experiments/ab")).await;
    let arms = stats["arms"].as_array().unwrap();
    let count = |field: &str| {
        arms.iter()
            .map(|a| a.pointer(field).unwrap().as_u64().unwrap())
            .sum::<u64>()
    };
    assert_eq!(count("/requests"), served.len() as u64, "{stats}");
    assert_eq!(
        count("/feedback/count"),
        served.len() as u64,
        "every request scored once now"
    );
    drop(server);

    let conn = rusqlite::Connection::open(&db).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}
