//! The durable state of a server, in an embedded SQLite database (`--state-db`, WAL journal):
//! adapters registered or deleted at run time, experiments created or changed over the API with
//! their events, and every request an experiment served — which arm, for which key, how it
//! ended, and its feedback score. Each write commits before the API
//! acknowledges it, so a restart (or a `kill -9`) loses nothing the API confirmed; a restart
//! reads the adapter changes back and experiment statistics come from the stored requests.
//!
//! The schema is versioned with `PRAGMA user_version`; `MIGRATIONS` lists every step in order,
//! and opening a database applies the ones it has not seen, in one transaction each.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};

/// Schema steps, applied in order; a database's `user_version` counts the steps it has.
const MIGRATIONS: &[&str] = &[
    // 1: run-time adapter changes and experiment requests.
    "CREATE TABLE adapter_changes (
         name TEXT PRIMARY KEY,
         path TEXT,                      -- NULL: deleted
         changed_at INTEGER NOT NULL
     );
     CREATE TABLE served (
         request_id TEXT PRIMARY KEY,
         experiment TEXT NOT NULL,
         arm TEXT NOT NULL,
         key_id TEXT,                    -- fingerprint of the key served; NULL on an open server
         served_at INTEGER NOT NULL,
         ok INTEGER,                     -- NULL while running
         seconds REAL,
         tokens INTEGER,
         score REAL                      -- NULL until feedback
     );
     CREATE INDEX served_by_arm ON served (experiment, arm);",
    // 2: experiments created or changed over the API, and their events.
    "CREATE TABLE experiments (
         name TEXT PRIMARY KEY,
         config TEXT NOT NULL,           -- JSON: arms, control, guardrails, tenant
         lifecycle TEXT NOT NULL,        -- JSON: weights, paused arms, status
         changed_at INTEGER NOT NULL
     );
     CREATE TABLE experiment_events (
         id INTEGER PRIMARY KEY,
         experiment TEXT NOT NULL,
         at INTEGER NOT NULL,
         kind TEXT NOT NULL,
         detail TEXT NOT NULL
     );",
];

/// What went wrong with the state database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("state database: {0}")]
    Sql(#[from] rusqlite::Error),
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
    Registered { name: String, path: PathBuf },
    Deleted { name: String },
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

/// The state database. Writes are short transactions on one connection.
pub struct Store {
    // std Mutex: held for one statement or transaction, never across an .await.
    conn: Mutex<Connection>,
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

impl Store {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_error = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(open_error)?;
        // WAL: readers never block the writer; NORMAL sync survives a killed process (only a
        // power loss can drop the last commits).
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_error)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_error)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_error)?;
        Self::migrated(conn, path)
    }

    /// A database in memory: nothing survives the process (tests, `--state-db :memory:`).
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::migrated(Connection::open_in_memory()?, Path::new(":memory:"))
    }

    fn migrated(mut conn: Connection, path: &Path) -> Result<Self, StoreError> {
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let version = usize::try_from(version).unwrap_or(usize::MAX);
        if version > MIGRATIONS.len() {
            return Err(StoreError::TooNew {
                path: path.to_path_buf(),
                found: version,
                known: MIGRATIONS.len(),
            });
        }
        for (i, step) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = conn.transaction()?;
            tx.execute_batch(step)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that adapter `name` was registered from `path`.
    pub fn adapter_registered(&self, name: &str, path: &Path) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO adapter_changes (name, path, changed_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET path = excluded.path, changed_at = excluded.changed_at",
            params![name, path.to_string_lossy(), now()],
        )?;
        Ok(())
    }

    /// Records that adapter `name` was deleted.
    pub fn adapter_deleted(&self, name: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO adapter_changes (name, path, changed_at) VALUES (?1, NULL, ?2)
             ON CONFLICT (name) DO UPDATE SET path = NULL, changed_at = excluded.changed_at",
            params![name, now()],
        )?;
        Ok(())
    }

    /// Every stored adapter change, oldest first.
    pub fn adapter_changes(&self) -> Result<Vec<AdapterChange>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT name, path FROM adapter_changes ORDER BY changed_at, rowid")?;
        let rows = stmt.query_map([], |r| {
            let name: String = r.get(0)?;
            let path: Option<String> = r.get(1)?;
            Ok(match path {
                Some(p) => AdapterChange::Registered {
                    name,
                    path: PathBuf::from(p),
                },
                None => AdapterChange::Deleted { name },
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Records that `arm` of `experiment` serves `request_id` for the key `key_id`.
    pub fn served(
        &self,
        request_id: &str,
        experiment: &str,
        arm: &str,
        key_id: Option<&str>,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO served (request_id, experiment, arm, key_id, served_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![request_id, experiment, arm, key_id, now()],
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
        self.conn().execute(
            "UPDATE served SET ok = ?2, seconds = ?3, tokens = ?4 WHERE request_id = ?1",
            params![request_id, ok, seconds, tokens as i64],
        )?;
        Ok(())
    }

    /// Stores the one score of `request_id`, given by the key `key_id`: the arm that served it,
    /// when `experiment` served it to that key and it has no score yet.
    pub fn feedback(
        &self,
        request_id: &str,
        experiment: &str,
        key_id: Option<&str>,
        score: f64,
    ) -> Result<Result<String, Refusal>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let row: Option<(String, Option<String>, Option<f64>)> = tx
            .query_row(
                "SELECT arm, key_id, score FROM served WHERE request_id = ?1 AND experiment = ?2",
                params![request_id, experiment],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let arm = match row {
            Some((arm, key, None)) if key.as_deref() == key_id => arm,
            Some((_, key, Some(_))) if key.as_deref() == key_id => return Ok(Err(Refusal::Scored)),
            _ => return Ok(Err(Refusal::Unknown)),
        };
        tx.execute(
            "UPDATE served SET score = ?2 WHERE request_id = ?1",
            params![request_id, score],
        )?;
        tx.commit()?;
        Ok(Ok(arm))
    }

    /// Per-arm samples of `experiment`'s finished requests and scores.
    pub fn arm_samples(
        &self,
        experiment: &str,
    ) -> Result<BTreeMap<String, ArmSamples>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT arm, ok, seconds, tokens, score FROM served
             WHERE experiment = ?1 AND ok IS NOT NULL",
        )?;
        let mut rows = stmt.query([experiment])?;
        let mut out: BTreeMap<String, ArmSamples> = BTreeMap::new();
        while let Some(r) = rows.next()? {
            let s = out.entry(r.get::<_, String>(0)?).or_default();
            s.requests += 1;
            s.errors += u64::from(!r.get::<_, bool>(1)?);
            s.seconds.push(r.get::<_, Option<f64>>(2)?.unwrap_or(0.0));
            s.completion_tokens += r.get::<_, Option<i64>>(3)?.unwrap_or(0) as u64;
            if let Some(score) = r.get::<_, Option<f64>>(4)? {
                s.scores.push(score);
            }
        }
        Ok(out)
    }

    /// The mean feedback score of one arm, if it has any.
    pub fn feedback_mean(&self, experiment: &str, arm: &str) -> Result<Option<f64>, StoreError> {
        Ok(self.conn().query_row(
            "SELECT AVG(score) FROM served WHERE experiment = ?1 AND arm = ?2 AND score IS NOT NULL",
            params![experiment, arm],
            |r| r.get(0),
        )?)
    }

    /// Stores an experiment's definition and lifecycle (replacing what was there).
    pub fn put_experiment(&self, e: &StoredExperiment) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO experiments (name, config, lifecycle, changed_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (name) DO UPDATE SET config = excluded.config,
                 lifecycle = excluded.lifecycle, changed_at = excluded.changed_at",
            params![e.name, e.config, e.lifecycle, now()],
        )?;
        Ok(())
    }

    /// Every stored experiment.
    pub fn experiments(&self) -> Result<Vec<StoredExperiment>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT name, config, lifecycle FROM experiments ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok(StoredExperiment {
                name: r.get(0)?,
                config: r.get(1)?,
                lifecycle: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Records an event of `experiment`.
    pub fn event(&self, experiment: &str, kind: &str, detail: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO experiment_events (experiment, at, kind, detail) VALUES (?1, ?2, ?3, ?4)",
            params![experiment, now(), kind, detail],
        )?;
        Ok(())
    }

    /// The events of `experiment`, oldest first.
    pub fn events(&self, experiment: &str) -> Result<Vec<Event>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT at, kind, detail FROM experiment_events WHERE experiment = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map([experiment], |r| {
            Ok(Event {
                at: r.get(0)?,
                kind: r.get(1)?,
                detail: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_changes_keep_the_latest_per_name() {
        let store = Store::in_memory().unwrap();
        store.adapter_registered("a", Path::new("/x/a")).unwrap();
        store.adapter_registered("b", Path::new("/x/b")).unwrap();
        store.adapter_deleted("a").unwrap();
        let changes = store.adapter_changes().unwrap();
        assert_eq!(changes.len(), 2);
        assert!(changes.contains(&AdapterChange::Deleted { name: "a".into() }));
        assert!(changes.contains(&AdapterChange::Registered {
            name: "b".into(),
            path: "/x/b".into()
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
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", MIGRATIONS.len() as i64 + 1)
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
