//! The durable state of a server: adapters registered or deleted at run time, experiments
//! created or changed over the API with their events, and every request an experiment served —
//! which arm, for which key, how it ended, and its feedback score. Each write commits before the
//! API acknowledges it, so a restart (or a `kill -9`) loses nothing the API confirmed; a restart
//! reads the adapter changes back and experiment statistics come from the stored requests.
//!
//! Two databases hold it with the same tables and statements: an embedded SQLite file
//! (`--state-db PATH`, the default, WAL journal; `sqlite.rs`) for one server, and PostgreSQL
//! (`--state-db postgres://…`; `postgres.rs`) for replicas that share their state. Statements are
//! written once with `?N` parameters and values of four kinds ([`Value`]).
//!
//! Each database records its schema version; `MIGRATIONS` (per database) lists every step in
//! order, and opening a database applies the ones it has not seen, in one transaction each.

mod postgres;
mod sqlite;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What went wrong with the state database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("state database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("state database: {0}")]
    Postgres(String),
    #[error("state database {path} has schema version {found}, newer than this knots ({known})")]
    TooNew {
        path: PathBuf,
        found: usize,
        known: usize,
    },
}

/// A stored run-time change to the adapter registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdapterChange {
    /// `source`: the directory or URI it was registered from; `digest`: the SHA-256 of the
    /// content it had then.
    Registered {
        name: String,
        source: String,
        digest: Option<String>,
    },
    Deleted {
        name: String,
    },
}

/// Why feedback for a request id was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not served by this experiment, or served to another key: reported alike, so a key cannot
    /// probe other keys' request ids.
    Unknown,
    /// Already scored once.
    Scored,
}

/// What one experiment arm's finished requests recorded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ArmSamples {
    pub requests: u64,
    pub errors: u64,
    /// Latency of each finished request, in seconds.
    pub seconds: Vec<f64>,
    pub completion_tokens: u64,
    /// Each feedback score.
    pub scores: Vec<f64>,
}

/// An experiment as stored: its definition and its lifecycle, both JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredExperiment {
    pub name: String,
    pub config: String,
    pub lifecycle: String,
}

/// Something that happened to an experiment (created, weights changed, paused by a guardrail…).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Event {
    pub at: i64,
    pub kind: String,
    pub detail: String,
}

/// A statement parameter or a column value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Self::Text(s.to_string())
    }
}

impl From<i64> for Value {
    fn from(x: i64) -> Self {
        Self::Int(x)
    }
}

impl From<f64> for Value {
    fn from(x: f64) -> Self {
        Self::Real(x)
    }
}

impl From<Option<&str>> for Value {
    fn from(s: Option<&str>) -> Self {
        s.map_or(Self::Null, Self::from)
    }
}

impl Value {
    fn text(&self) -> Option<String> {
        match self {
            Self::Text(s) => Some(s.clone()),
            _ => None,
        }
    }

    fn int(&self) -> Option<i64> {
        match self {
            Self::Int(x) => Some(*x),
            Self::Real(x) => Some(*x as i64),
            _ => None,
        }
    }

    fn real(&self) -> Option<f64> {
        match self {
            Self::Real(x) => Some(*x),
            Self::Int(x) => Some(*x as f64),
            _ => None,
        }
    }
}

type Row = Vec<Value>;

/// What both databases do: run one statement, or one query for its rows.
trait Database: Send + Sync {
    fn execute(&self, sql: &str, params: Vec<Value>) -> Result<u64, StoreError>;
    fn query(&self, sql: &str, params: Vec<Value>) -> Result<Vec<Row>, StoreError>;
}

/// The state database.
pub struct Store {
    db: Box<dyn Database>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Whether `spec` names a PostgreSQL database rather than a file.
pub fn is_postgres(spec: &str) -> bool {
    spec.starts_with("postgres://") || spec.starts_with("postgresql://")
}

impl Store {
    /// Opens (creating if needed) the SQLite database at `path` and brings its schema up to
    /// date.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Ok(Self {
            db: Box::new(sqlite::Sqlite::open(path)?),
        })
    }

    /// A database in memory: nothing survives the process (tests, `--state-db :memory:`).
    pub fn in_memory() -> Result<Self, StoreError> {
        Ok(Self {
            db: Box::new(sqlite::Sqlite::in_memory()?),
        })
    }

    /// Connects to the PostgreSQL database at `url` and brings its schema up to date (replicas
    /// starting together migrate one at a time).
    pub fn connect(url: &str) -> Result<Self, StoreError> {
        Ok(Self {
            db: Box::new(postgres::Postgres::connect(url)?),
        })
    }

    /// `--state-db`: a `postgres://` URL, or a SQLite file.
    pub fn open_spec(spec: &Path) -> Result<Self, StoreError> {
        match spec.to_str() {
            Some(url) if is_postgres(url) => Self::connect(url),
            _ => Self::open(spec),
        }
    }

    fn query(&self, sql: &str, params: Vec<Value>) -> Result<Vec<Row>, StoreError> {
        self.db.query(sql, params)
    }

    fn execute(&self, sql: &str, params: Vec<Value>) -> Result<u64, StoreError> {
        self.db.execute(sql, params)
    }

    /// Records that adapter `name` was registered from `source` with content `digest`.
    pub fn adapter_registered(
        &self,
        name: &str,
        source: &str,
        digest: &str,
    ) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO adapter_changes (name, path, digest, changed_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (name) DO UPDATE SET path = excluded.path, digest = excluded.digest,
                 changed_at = excluded.changed_at",
            vec![name.into(), source.into(), digest.into(), now().into()],
        )?;
        Ok(())
    }

    /// Records that adapter `name` was deleted.
    pub fn adapter_deleted(&self, name: &str) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO adapter_changes (name, path, digest, changed_at) VALUES (?1, NULL, NULL, ?2)
             ON CONFLICT (name) DO UPDATE SET path = NULL, digest = NULL,
                 changed_at = excluded.changed_at",
            vec![name.into(), now().into()],
        )?;
        Ok(())
    }

    /// Every stored adapter change (the latest per name), oldest first.
    pub fn adapter_changes(&self) -> Result<Vec<AdapterChange>, StoreError> {
        let rows = self.query(
            "SELECT name, path, digest FROM adapter_changes ORDER BY changed_at, name",
            vec![],
        )?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let name = r[0].text()?;
                Some(match r[1].text() {
                    Some(source) => AdapterChange::Registered {
                        name,
                        source,
                        digest: r[2].text(),
                    },
                    None => AdapterChange::Deleted { name },
                })
            })
            .collect())
    }

    /// Records that `arm` of `experiment` serves `request_id` for the key `key_id`.
    pub fn served(
        &self,
        request_id: &str,
        experiment: &str,
        arm: &str,
        key_id: Option<&str>,
    ) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO served (request_id, experiment, arm, key_id, served_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            vec![
                request_id.into(),
                experiment.into(),
                arm.into(),
                key_id.into(),
                now().into(),
            ],
        )?;
        Ok(())
    }

    /// Records how the request `request_id` ended.
    pub fn finished(
        &self,
        request_id: &str,
        ok: bool,
        seconds: f64,
        tokens: usize,
    ) -> Result<(), StoreError> {
        self.execute(
            "UPDATE served SET ok = ?2, seconds = ?3, tokens = ?4 WHERE request_id = ?1",
            vec![
                request_id.into(),
                i64::from(ok).into(),
                seconds.into(),
                (tokens as i64).into(),
            ],
        )?;
        Ok(())
    }

    /// Stores the one score of `request_id`, given by the key `key_id`: the arm that served it,
    /// when `experiment` served it to that key and it has no score yet. One conditional update,
    /// so two replicas taking a score for the same request at once cannot both store it.
    pub fn feedback(
        &self,
        request_id: &str,
        experiment: &str,
        key_id: Option<&str>,
        score: f64,
    ) -> Result<Result<String, Refusal>, StoreError> {
        let params = || -> Vec<Value> { vec![request_id.into(), experiment.into(), key_id.into()] };
        let mut update = params();
        update.push(score.into());
        let stored = self.query(
            "UPDATE served SET score = ?4
             WHERE request_id = ?1 AND experiment = ?2 AND key_id IS NOT DISTINCT FROM ?3
                 AND score IS NULL
             RETURNING arm",
            update,
        )?;
        if let Some(arm) = stored.first().and_then(|r| r[0].text()) {
            return Ok(Ok(arm));
        }
        let scored = self.query(
            "SELECT 1 FROM served
             WHERE request_id = ?1 AND experiment = ?2 AND key_id IS NOT DISTINCT FROM ?3",
            params(),
        )?;
        Ok(Err(if scored.is_empty() {
            Refusal::Unknown
        } else {
            Refusal::Scored
        }))
    }

    /// Per-arm samples of `experiment`'s finished requests and scores.
    pub fn arm_samples(
        &self,
        experiment: &str,
    ) -> Result<BTreeMap<String, ArmSamples>, StoreError> {
        let rows = self.query(
            "SELECT arm, ok, seconds, tokens, score FROM served
             WHERE experiment = ?1 AND ok IS NOT NULL",
            vec![experiment.into()],
        )?;
        let mut out: BTreeMap<String, ArmSamples> = BTreeMap::new();
        for r in rows {
            let Some(arm) = r[0].text() else { continue };
            let s = out.entry(arm).or_default();
            s.requests += 1;
            s.errors += u64::from(r[1].int() == Some(0));
            s.seconds.push(r[2].real().unwrap_or(0.0));
            s.completion_tokens += r[3].int().unwrap_or(0) as u64;
            if let Some(score) = r[4].real() {
                s.scores.push(score);
            }
        }
        Ok(out)
    }

    /// The mean feedback score of one arm, if it has any.
    pub fn feedback_mean(&self, experiment: &str, arm: &str) -> Result<Option<f64>, StoreError> {
        let rows = self.query(
            "SELECT AVG(score) FROM served WHERE experiment = ?1 AND arm = ?2 AND score IS NOT NULL",
            vec![experiment.into(), arm.into()],
        )?;
        Ok(rows.first().and_then(|r| r[0].real()))
    }

    /// Stores an experiment's definition and lifecycle (replacing what was there).
    pub fn put_experiment(&self, e: &StoredExperiment) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO experiments (name, config, lifecycle, changed_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (name) DO UPDATE SET config = excluded.config,
                 lifecycle = excluded.lifecycle, changed_at = excluded.changed_at",
            vec![
                e.name.as_str().into(),
                e.config.as_str().into(),
                e.lifecycle.as_str().into(),
                now().into(),
            ],
        )?;
        Ok(())
    }

    /// Every stored experiment.
    pub fn experiments(&self) -> Result<Vec<StoredExperiment>, StoreError> {
        let rows = self.query(
            "SELECT name, config, lifecycle FROM experiments ORDER BY name",
            vec![],
        )?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some(StoredExperiment {
                    name: r[0].text()?,
                    config: r[1].text()?,
                    lifecycle: r[2].text()?,
                })
            })
            .collect())
    }

    /// Records an event of `experiment`.
    pub fn event(&self, experiment: &str, kind: &str, detail: &str) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO experiment_events (experiment, at, kind, detail) VALUES (?1, ?2, ?3, ?4)",
            vec![experiment.into(), now().into(), kind.into(), detail.into()],
        )?;
        Ok(())
    }

    /// The events of `experiment`, oldest first.
    pub fn events(&self, experiment: &str) -> Result<Vec<Event>, StoreError> {
        let rows = self.query(
            "SELECT at, kind, detail FROM experiment_events WHERE experiment = ?1 ORDER BY id",
            vec![experiment.into()],
        )?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some(Event {
                    at: r[0].int()?,
                    kind: r[1].text()?,
                    detail: r[2].text()?,
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_changes_keep_the_latest_per_name() {
        let store = Store::in_memory().unwrap();
        store.adapter_registered("a", "/x/a", "d1").unwrap();
        store
            .adapter_registered("b", "s3://bucket/b", "d2")
            .unwrap();
        store.adapter_deleted("a").unwrap();
        let changes = store.adapter_changes().unwrap();
        assert_eq!(changes.len(), 2);
        assert!(changes.contains(&AdapterChange::Deleted { name: "a".into() }));
        assert!(changes.contains(&AdapterChange::Registered {
            name: "b".into(),
            source: "s3://bucket/b".into(),
            digest: Some("d2".into()),
        }));
    }

    #[test]
    fn feedback_is_taken_once_by_the_key_that_was_served() {
        let store = Store::in_memory().unwrap();
        store.served("r1", "e", "arm0", Some("k1")).unwrap();
        store.served("r2", "e", "arm1", Some("k1")).unwrap();
        store.finished("r1", true, 0.5, 7).unwrap();
        store.finished("r2", false, 1.5, 0).unwrap();
        let give = |id, exp, key| store.feedback(id, exp, key, 0.75).unwrap();
        assert_eq!(give("r1", "e", Some("k2")), Err(Refusal::Unknown));
        assert_eq!(give("r1", "other", Some("k1")), Err(Refusal::Unknown));
        assert_eq!(give("r1", "e", Some("k1")), Ok("arm0".to_string()));
        assert_eq!(give("r1", "e", Some("k1")), Err(Refusal::Scored));
        assert_eq!(give("nope", "e", Some("k1")), Err(Refusal::Unknown));
        let samples = store.arm_samples("e").unwrap();
        assert_eq!(
            samples["arm0"],
            ArmSamples {
                requests: 1,
                errors: 0,
                seconds: vec![0.5],
                completion_tokens: 7,
                scores: vec![0.75],
            }
        );
        assert_eq!((samples["arm1"].requests, samples["arm1"].errors), (1, 1));
        assert_eq!(store.feedback_mean("e", "arm0").unwrap(), Some(0.75));
        assert_eq!(store.feedback_mean("e", "arm1").unwrap(), None);
    }

    #[test]
    fn a_database_survives_reopening_and_refuses_a_newer_schema() {
        let dir = tempfile_dir();
        let path = dir.join("state.db");
        {
            let store = Store::open(&path).unwrap();
            store.served("r1", "e", "arm0", None).unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.feedback("r1", "e", None, 1.0).unwrap(),
            Ok("arm0".into())
        );
        drop(store);
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", sqlite::MIGRATIONS.len() as i64 + 1)
            .unwrap();
        drop(conn);
        assert!(matches!(Store::open(&path), Err(StoreError::TooNew { .. })));
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "knots-store-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
