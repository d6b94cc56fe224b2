//! A fleet on loopback: three `knots serve` replicas (SmolLM2, small merge caches, one shared
//! merge store directory, one PostgreSQL state database) behind a test-only router that models
//! the Gateway API inference extension's endpoint picker as its protocol documents it — it is a
//! model of the picker, not the picker. Before each request the router scrapes every replica's
//! `/metrics` and scores it: LoRA affinity from `knots_lora_requests_info` (1.0 when the
//! requested `model` string is running there, 0.8 when it is waiting there, 0.6 when the replica
//! has room for another adapter under `max_lora`, else 0) plus a queue score from
//! `knots_engine_waiting_requests` (1 for the shortest queue down to 0 for the longest).
//!
//! Asserted: a request the router sends to a replica for affinity finds its set in that
//! replica's merge cache; a new set is computed once across the fleet and fetched by the other
//! replicas; killing a replica mid-load loses no acknowledged registration and the others keep
//! serving every request routed after the kill.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::process::{ServerProcess, client, smollm2_args};
use super::scale_out::metric;
use super::shared_state::PgServer;

/// What the router reads from one replica.
#[derive(Debug, Default)]
struct Scraped {
    waiting: f64,
    running_sets: Vec<String>,
    waiting_sets: Vec<String>,
    max_lora: usize,
}

fn label<'a>(line: &'a str, name: &str) -> &'a str {
    line.split_once(&format!("{name}=\""))
        .and_then(|(_, rest)| rest.split_once('"'))
        .map_or("", |(value, _)| value)
}

fn list(value: &str) -> Vec<String> {
    value
        .split(',')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

async fn scrape(url: &str) -> Option<Scraped> {
    let r = client()
        .get(format!("{url}/metrics"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    let text = r.text().await.ok()?;
    let mut s = Scraped::default();
    for line in text.lines() {
        if line.starts_with("knots_lora_requests_info{") {
            s.running_sets = list(label(line, "running_lora_adapters"));
            s.waiting_sets = list(label(line, "waiting_lora_adapters"));
            s.max_lora = label(line, "max_lora").parse().unwrap_or(0);
        } else if line.starts_with("knots_engine_waiting_requests{")
            && let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok())
        {
            s.waiting += v;
        }
    }
    Some(s)
}

/// The picker's LoRA affinity tiers.
fn affinity(s: &Scraped, model: &str) -> f64 {
    if s.running_sets.iter().any(|m| m == model) {
        1.0
    } else if s.waiting_sets.iter().any(|m| m == model) {
        0.8
    } else if s.running_sets.len() + s.waiting_sets.len() < s.max_lora {
        0.6
    } else {
        0.0
    }
}

/// The chosen replica and whether affinity chose it (the set was running or waiting there).
fn pick(scraped: &[(usize, Scraped)], model: &str, turn: usize) -> (usize, bool) {
    let queues: Vec<f64> = scraped.iter().map(|(_, s)| s.waiting).collect();
    let (lo, hi) = queues
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &q| (lo.min(q), hi.max(q)));
    let scored: Vec<(usize, f64, f64)> = scraped
        .iter()
        .map(|(i, s)| {
            let queue = if hi > lo {
                (hi - s.waiting) / (hi - lo)
            } else {
                1.0
            };
            (*i, affinity(s, model), affinity(s, model) + queue)
        })
        .collect();
    let best = scored.iter().map(|x| x.2).fold(f64::MIN, f64::max);
    let ties: Vec<&(usize, f64, f64)> = scored.iter().filter(|x| x.2 == best).collect();
    let chosen = ties[turn % ties.len()];
    (chosen.0, chosen.1 >= 0.8)
}

/// One routed request's record.
#[derive(Debug, Clone)]
struct Routed {
    replica: usize,
    by_affinity: bool,
    outcome: String,
    ok: bool,
    started: Instant,
}

struct Fleet {
    urls: Vec<String>,
    alive: Mutex<Vec<bool>>,
}

impl Fleet {
    async fn route(&self, model: &str, turn: usize) -> Routed {
        let alive: Vec<usize> = {
            let alive = self.alive.lock().unwrap();
            (0..self.urls.len()).filter(|&i| alive[i]).collect()
        };
        let mut scraped = Vec::new();
        for i in alive {
            if let Some(s) = scrape(&self.urls[i]).await {
                scraped.push((i, s));
            }
        }
        assert!(!scraped.is_empty(), "no replica answers");
        let (replica, by_affinity) = pick(&scraped, model, turn);
        let started = Instant::now();
        let body = json!({"model": model, "prompt": "Write one short sentence.", "max_tokens": 12, "stream": true});
        let sent = client()
            .post(format!("{}/v1/completions", self.urls[replica]))
            .json(&body)
            .send()
            .await;
        let (ok, outcome) = match sent {
            Ok(r) if r.status() == 200 => {
                let header = r.headers()["x-knots-merge"]
                    .to_str()
                    .unwrap_or("")
                    .to_string();
                let outcome = header
                    .split("; ")
                    .find_map(|p| p.strip_prefix("outcome="))
                    .unwrap_or("")
                    .to_string();
                // The stream must end properly: a killed replica cuts it.
                let text = r.text().await.unwrap_or_default();
                (text.contains("data: [DONE]"), outcome)
            }
            _ => (false, String::new()),
        };
        Routed {
            replica,
            by_affinity,
            outcome,
            ok,
            started,
        }
    }
}

async fn total(urls: &[String], series: &str) -> f64 {
    let mut sum = 0.0;
    for url in urls {
        sum += metric(url, series).await;
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 6)]
async fn a_fleet_routes_by_affinity_shares_merges_and_survives_a_kill() {
    let pg = PgServer::start().await;
    let store = tempfile::tempdir().unwrap();
    let store_uri = format!("file://{}", store.path().display());
    let args = smollm2_args(&[
        "--state-db",
        &pg.url,
        "--merge-store",
        &store_uri,
        "--merge-cache-bytes",
        "67108864",
    ]);
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(Some(ServerProcess::start(&args).await));
    }
    let fleet = Arc::new(Fleet {
        urls: replicas
            .iter()
            .map(|r| r.as_ref().unwrap().url.clone())
            .collect(),
        alive: Mutex::new(vec![true; 3]),
    });
    let urls = fleet.urls.clone();

    // 1. A new set: computed once across the fleet, fetched by the other replicas.
    let new_set = "sentiment-lm+news-lm+language-lm@knots-ties";
    let first = fleet.route(new_set, 0).await;
    assert!(first.ok && first.outcome == "miss", "{first:?}");
    for _ in 0..300 {
        if total(&urls, "knots_merge_store_writes_total{outcome=\"written\"}").await >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (i, url) in urls.iter().enumerate().filter(|(i, _)| *i != first.replica) {
        let r = client()
            .post(format!("{url}/v1/completions"))
            .json(&json!({"model": new_set, "prompt": "Hi", "max_tokens": 1}))
            .send()
            .await
            .unwrap();
        let header = r.headers()["x-knots-merge"].to_str().unwrap().to_string();
        assert!(header.contains("outcome=fetched"), "replica {i}: {header}");
    }
    assert_eq!(
        total(&urls, "knots_merges_total{method=\"knots-ties\"}").await,
        1.0
    );

    // 2. Load: six clients over four sets through the router; replica 0 is killed halfway, and
    //    registrations go to the replicas meanwhile.
    let sets = [
        "sentiment-lm+news-lm@core-ties",
        "news-lm+language-lm@ta",
        "sentiment-lm:0.7+shout:0.3@knots-ties",
        new_set,
    ];
    let records = Arc::new(Mutex::new(Vec::<Routed>::new()));
    let load_for = Duration::from_secs(24);
    let began = Instant::now();
    let mut clients = Vec::new();
    for c in 0..6 {
        let (fleet, records) = (fleet.clone(), records.clone());
        clients.push(tokio::spawn(async move {
            let mut turn = c;
            while began.elapsed() < load_for {
                let model = sets[turn % sets.len()];
                let routed = fleet.route(model, turn).await;
                records.lock().unwrap().push(routed);
                turn += 7;
            }
        }));
    }
    let acked = Arc::new(Mutex::new(BTreeSet::<String>::new()));
    let registrar = {
        let (fleet, acked) = (fleet.clone(), acked.clone());
        tokio::spawn(async move {
            for i in 0..16 {
                let replica = i % 3;
                let name = format!("loud-{i}");
                let body = json!({"name": name, "path": "models/adapters/shout"});
                let sent = client()
                    .post(format!("{}/v1/adapters", fleet.urls[replica]))
                    .json(&body)
                    .send()
                    .await;
                if sent.is_ok_and(|r| r.status() == 200) {
                    acked.lock().unwrap().insert(name);
                }
                tokio::time::sleep(load_for / 20).await;
            }
        })
    };
    tokio::time::sleep(load_for / 2).await;
    fleet.alive.lock().unwrap()[0] = false;
    replicas[0].take().unwrap().kill();
    let killed_at = Instant::now();
    for c in clients {
        c.await.unwrap();
    }
    registrar.await.unwrap();

    let records = records.lock().unwrap().clone();
    let after_kill: Vec<&Routed> = records.iter().filter(|r| r.started > killed_at).collect();
    assert!(!after_kill.is_empty());
    assert!(
        after_kill.iter().all(|r| r.ok && r.replica != 0),
        "requests routed after the kill must all succeed on the survivors: {:?}",
        after_kill.iter().filter(|r| !r.ok).collect::<Vec<_>>()
    );
    let affinity: Vec<&Routed> = records.iter().filter(|r| r.by_affinity && r.ok).collect();
    assert!(
        affinity
            .iter()
            .all(|r| r.outcome == "hit" || r.outcome == "coalesced"),
        "a replica running a set holds its merge: {affinity:?}"
    );
    let ok = records.iter().filter(|r| r.ok).count();
    let served_from_cache = records
        .iter()
        .filter(|r| r.ok && (r.outcome == "hit" || r.outcome == "coalesced"))
        .count();
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    for r in records.iter().filter(|r| r.ok) {
        *outcomes.entry(r.outcome.as_str()).or_default() += 1;
    }
    println!(
        "fleet: {} requests, {ok} ok, {} routed by affinity, {} routed after the kill; \
         served from the replica's own cache {served_from_cache}/{ok} ({:.1}%); outcomes {outcomes:?}",
        records.len(),
        affinity.len(),
        after_kill.len(),
        100.0 * served_from_cache as f64 / ok as f64,
    );

    // 3. No acknowledged registration is lost: the survivors serve every one.
    let survivors = &urls[1..];
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 8, "{acked:?}");
    for url in survivors {
        for _ in 0..50 {
            let listed: Value = client()
                .get(format!("{url}/v1/adapters"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let names: BTreeSet<String> = listed["data"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|a| a["name"].as_str().map(String::from))
                .collect();
            if acked.is_subset(&names) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for name in &acked {
            let r = client()
                .post(format!("{url}/v1/completions"))
                .json(&json!({"model": name, "prompt": "Hi", "max_tokens": 1}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{name} on {url}");
        }
    }
}
