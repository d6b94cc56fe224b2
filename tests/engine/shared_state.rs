//! Shared state on a real PostgreSQL server the test starts (Debian's `postgresql` package):
//! the store's guarantees hold across two connections, and two `knots serve` replicas on one
//! database agree on registrations, experiments and feedback.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use knots::server::store::{AdapterChange, Refusal, Store};
use serde_json::json;

use super::process::{ServerProcess, client, free_port, post_json, smollm2_args};

/// A PostgreSQL server in a temporary directory on a free loopback port (trust auth, user
/// `knots`), stopped when dropped. Run as the `postgres` user when the tests run as root.
pub struct PgServer {
    child: Child,
    _dir: tempfile::TempDir,
    pub url: String,
}

fn pg_bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries (apt-get install postgresql)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .collect();
    versions.sort();
    versions.pop().expect("a PostgreSQL version").join(name)
}

fn as_postgres_user(program: PathBuf) -> Command {
    // SAFETY: geteuid reads the process's effective user id; it has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl PgServer {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::process::Command::new("chmod")
            .args(["0777"])
            .arg(dir.path())
            .status()
            .unwrap();
        let init = as_postgres_user(pg_bin("initdb"))
            .args(["-A", "trust", "-U", "knots", "--no-sync", "-D"])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(init.success(), "initdb failed");
        let port = free_port();
        let child = as_postgres_user(pg_bin("postgres"))
            .arg("-D")
            .arg(&data)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-c",
                "fsync=off",
                "-k",
            ])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = Self {
            child,
            _dir: dir,
            url: format!("postgres://knots@127.0.0.1:{port}/postgres"),
        };
        for _ in 0..300 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                // Accepting connections is not yet accepting logins: try one.
                let url = server.url.clone();
                let ok = tokio::task::spawn_blocking(move || Store::connect(&url).is_ok())
                    .await
                    .unwrap();
                if ok {
                    return server;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("PostgreSQL did not start");
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // SIGTERM through the runuser parent reaches postgres (smart shutdown); then reap.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_connections_share_one_store() {
    let pg = PgServer::start().await;
    let url = pg.url.clone();
    tokio::task::spawn_blocking(move || {
        let a = Arc::new(Store::connect(&url).unwrap());
        let b = Arc::new(Store::connect(&url).unwrap());
        a.adapter_registered("x", "s3://bucket/x", "d1").unwrap();
        b.adapter_deleted("y").unwrap();
        let changes = b.adapter_changes().unwrap();
        assert!(changes.contains(&AdapterChange::Registered {
            name: "x".into(),
            source: "s3://bucket/x".into(),
            digest: Some("d1".into()),
        }));
        assert!(changes.contains(&AdapterChange::Deleted { name: "y".into() }));

        // Served on one replica, scored on the other, exactly once even when both try at once.
        for i in 0..20 {
            let id = format!("r{i}");
            a.served(&id, "e", "arm0", Some("k")).unwrap();
            a.finished(&id, i % 4 != 0, 0.25, 3).unwrap();
            let both: Vec<_> = [a.clone(), b.clone()]
                .into_iter()
                .map(|s| {
                    let id = id.clone();
                    std::thread::spawn(move || s.feedback(&id, "e", Some("k"), 1.0).unwrap())
                })
                .collect();
            let results: Vec<_> = both.into_iter().map(|t| t.join().unwrap()).collect();
            assert_eq!(
                results.iter().filter(|r| r.is_ok()).count(),
                1,
                "{results:?}"
            );
            assert!(results.contains(&Err(Refusal::Scored)));
        }
        assert_eq!(
            b.feedback("r0", "e", Some("other"), 1.0).unwrap(),
            Err(Refusal::Unknown)
        );
        let samples = b.arm_samples("e").unwrap();
        assert_eq!((samples["arm0"].requests, samples["arm0"].errors), (20, 5));
        assert_eq!(samples["arm0"].scores.len(), 20);
        assert_eq!(a.feedback_mean("e", "arm0").unwrap(), Some(1.0));
        a.event("e", "created", "{}").unwrap();
        assert_eq!(b.events("e").unwrap()[0].kind, "created");
    })
    .await
    .unwrap();
}

/// Polls `check` until it holds (the replicas sync every two seconds).
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what} never happened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_on_one_database_agree() {
    let pg = PgServer::start().await;
    let args = smollm2_args(&["--state-db", &pg.url]);
    let a = ServerProcess::start(&args).await;
    let b = ServerProcess::start(&args).await;
    let prompt = |model: &str| json!({"model": model, "prompt": "Hello", "max_tokens": 2});

    // Registered on A: served by B.
    let (status, v, _) = post_json(
        &a.url,
        "/v1/adapters",
        json!({"name": "loud", "path": "models/adapters/shout"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    eventually("B serving A's adapter", async || {
        post_json(&b.url, "/v1/completions", prompt("loud")).await.0 == 200
    })
    .await;

    // An experiment created on A routes on B; a request served by A is scored through B, once.
    let experiment = json!({"name": "ab", "arms": [
        {"name": "merged", "model": "sentiment-lm+news-lm"},
        {"name": "single", "model": "sentiment-lm"}]});
    let (status, v, _) = post_json(&a.url, "/v1/experiments", experiment).await;
    assert_eq!(status, 200, "{v}");
    eventually("B routing A's experiment", async || {
        post_json(&b.url, "/v1/completions", prompt("exp:ab"))
            .await
            .0
            == 200
    })
    .await;
    let (status, _, headers) = post_json(&a.url, "/v1/completions", prompt("exp:ab")).await;
    assert_eq!(status, 200);
    let id = headers["x-request-id"].to_str().unwrap().to_string();
    let score = json!({"request_id": id, "score": 1.0});
    let (status, v, _) = post_json(&b.url, "/v1/experiments/ab/feedback", score.clone()).await;
    assert_eq!(status, 200, "{v}");
    let (status, _, _) = post_json(&a.url, "/v1/experiments/ab/feedback", score).await;
    assert_eq!(status, 409);

    // Weights changed on B reach A; a deletion on B reaches A.
    let (status, v, _) = post_json(
        &b.url,
        "/v1/experiments/ab/weights",
        json!({"weights": {"merged": 0.0, "single": 1.0}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    eventually("A taking B's weights", async || {
        for _ in 0..8 {
            let (_, _, h) = post_json(&a.url, "/v1/completions", prompt("exp:ab")).await;
            if h["x-knots-arm"] != "ab/single" {
                return false;
            }
        }
        true
    })
    .await;
    let deleted = client()
        .delete(format!("{}/v1/adapters/loud", b.url))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    eventually("A dropping the adapter B deleted", async || {
        post_json(&a.url, "/v1/completions", prompt("loud")).await.0 == 404
    })
    .await;
}
