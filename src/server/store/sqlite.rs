//! The embedded SQLite database (WAL journal, one connection behind a mutex: a statement holds
//! it for microseconds, never across an `.await`). The schema version is `PRAGMA user_version`.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::Connection;
use rusqlite::types::{ToSqlOutput, ValueRef};

use super::{Database, Row, StoreError, Value};

/// Schema steps, applied in order; a database's `user_version` counts the steps it has.
pub(super) const MIGRATIONS: &[&str] = &[
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
    // 3: adapters registered by URI, and the content digest each registration loaded.
    "ALTER TABLE adapter_changes ADD COLUMN digest TEXT;",
];

pub struct Sqlite {
    conn: Mutex<Connection>,
}

impl Sqlite {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_error = |e: rusqlite::Error| StoreError::Open {
            path: path.to_path_buf(),
            reason: e.to_string(),
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
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(x) => ValueRef::Integer(*x),
            Value::Real(x) => ValueRef::Real(*x),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
        }))
    }
}

fn value(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(x) => Value::Int(x),
        ValueRef::Real(x) => Value::Real(x),
        ValueRef::Text(t) | ValueRef::Blob(t) => {
            Value::Text(String::from_utf8_lossy(t).into_owned())
        }
    }
}

impl Database for Sqlite {
    fn execute(&self, sql: &str, params: Vec<Value>) -> Result<u64, StoreError> {
        let conn = self.conn();
        let n = conn
            .prepare(sql)?
            .execute(rusqlite::params_from_iter(params.iter()))?;
        Ok(n as u64)
    }

    fn query(&self, sql: &str, params: Vec<Value>) -> Result<Vec<Row>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(sql)?;
        let columns = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(
                (0..columns)
                    .map(|i| r.get_ref(i).map(value))
                    .collect::<Result<_, _>>()?,
            );
        }
        Ok(out)
    }
}
