//! The durable state of a server, in an embedded SQLite database (`--state-db`, WAL journal):
//! adapters registered or deleted at run time, and every request an experiment served — which
//! arm, for which key, how it ended, and its feedback score. Each write commits before the API
//! acknowledges it, so a restart (or a `kill -9`) loses nothing the API confirmed; a restart
//! reads the adapter changes back and experiment statistics come from the stored requests.
//!
//! The schema is versioned with `PRAGMA user_version`; [`MIGRATIONS`] lists every step in order,
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

/// Totals of one experiment arm, from its stored requests.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ArmTotals {
    pub requests: u64,
    pub errors: u64,
    pub total_seconds: f64,
    pub completion_tokens: u64,
    pub feedback_count: u64,
    pub feedback_sum: f64,
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

    /// Per-arm totals of `experiment`'s stored requests.
    pub fn arm_totals(&self, experiment: &str) -> Result<BTreeMap<String, ArmTotals>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT arm, COUNT(ok), COALESCE(SUM(ok = 0), 0), COALESCE(SUM(seconds), 0),
                    COALESCE(SUM(tokens), 0), COUNT(score), COALESCE(SUM(score), 0)
             FROM served WHERE experiment = ?1 GROUP BY arm",
        )?;
        let rows = stmt.query_map([experiment], |r| {
            Ok((
                r.get::<_, String>(0)?,
                ArmTotals {
                    requests: r.get::<_, i64>(1)? as u64,
                    errors: r.get::<_, i64>(2)? as u64,
                    total_seconds: r.get(3)?,
                    completion_tokens: r.get::<_, i64>(4)? as u64,
                    feedback_count: r.get::<_, i64>(5)? as u64,
                    feedback_sum: r.get(6)?,
                },
            ))
        })?;
        Ok(rows.collect::<Result<BTreeMap<_, _>, _>>()?)
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
        let totals = store.arm_totals("e").unwrap();
        assert_eq!(
            totals["arm0"],
            ArmTotals {
                requests: 1,
                errors: 0,
                total_seconds: 0.5,
                completion_tokens: 7,
                feedback_count: 1,
                feedback_sum: 0.75,
            }
        );
        assert_eq!((totals["arm1"].requests, totals["arm1"].errors), (1, 1));
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
