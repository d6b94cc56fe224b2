//! PostgreSQL, for replicas that share their state (`--state-db postgres://user@host/db`). One
//! connection owned by a dedicated thread (the synchronous client runs its own I/O and must not
//! run on the server's async workers); statements are sent to it and their results awaited, as
//! the SQLite mutex is, and each statement is prepared once per connection. A lost connection is
//! opened again on the next statement. The schema version is a row of `knots_schema`; migrations
//! run under an advisory lock, so replicas starting together apply each step once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::mpsc::{Sender, sync_channel};

use postgres::types::{ToSql, Type};
use postgres::{Client, NoTls, Statement};

use super::{Database, Row, StoreError, Value};

/// Schema steps, applied in order: the SQLite steps with PostgreSQL's types.
const MIGRATIONS: &[&str] = &[
    // 1: run-time adapter changes and experiment requests.
    "CREATE TABLE adapter_changes (
         name TEXT PRIMARY KEY,
         path TEXT,
         changed_at BIGINT NOT NULL
     );
     CREATE TABLE served (
         request_id TEXT PRIMARY KEY,
         experiment TEXT NOT NULL,
         arm TEXT NOT NULL,
         key_id TEXT,
         served_at BIGINT NOT NULL,
         ok BIGINT,
         seconds DOUBLE PRECISION,
         tokens BIGINT,
         score DOUBLE PRECISION
     );
     CREATE INDEX served_by_arm ON served (experiment, arm);",
    // 2: experiments created or changed over the API, and their events.
    "CREATE TABLE experiments (
         name TEXT PRIMARY KEY,
         config TEXT NOT NULL,
         lifecycle TEXT NOT NULL,
         changed_at BIGINT NOT NULL
     );
     CREATE TABLE experiment_events (
         id BIGSERIAL PRIMARY KEY,
         experiment TEXT NOT NULL,
         at BIGINT NOT NULL,
         kind TEXT NOT NULL,
         detail TEXT NOT NULL
     );",
    // 3: adapters registered by URI, and the content digest each registration loaded.
    "ALTER TABLE adapter_changes ADD COLUMN digest TEXT;",
];

/// Any key for `pg_advisory_xact_lock`, the same in every replica.
const MIGRATION_LOCK: i64 = 0x6b6e_6f74_735f_6462;

/// The connection thread's state: the client and the statements prepared on it (each statement
/// is prepared once per connection, not per call).
struct Connection {
    client: Client,
    statements: HashMap<String, Statement>,
}

type Job = Box<dyn FnOnce(&mut Option<Connection>) + Send>;

pub struct Postgres {
    jobs: Mutex<Sender<Job>>,
}

fn pg_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Postgres(e.to_string())
}

impl Postgres {
    pub fn connect(url: &str) -> Result<Self, StoreError> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let url = url.to_string();
        std::thread::Builder::new()
            .name("knots-postgres".into())
            .spawn(move || {
                let mut conn: Option<Connection> = None;
                for job in rx {
                    if conn.as_ref().is_none_or(|c| c.client.is_closed()) {
                        conn = Client::connect(&url, NoTls)
                            .inspect_err(
                                |e| tracing::warn!(error = %e, "state database connection failed"),
                            )
                            .ok()
                            .map(|client| Connection {
                                client,
                                statements: HashMap::new(),
                            });
                    }
                    job(&mut conn);
                }
            })
            .map_err(pg_error)?;
        let db = Self {
            jobs: Mutex::new(tx),
        };
        db.run(migrate)?;
        Ok(db)
    }

    /// Runs `f` on the connection thread and waits for its result.
    fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let (tx, rx) = sync_channel(1);
        let job: Job = Box::new(move |client| {
            let result = match client {
                Some(c) => f(c),
                None => Err(StoreError::Postgres("not connected".into())),
            };
            let _ = tx.send(result);
        });
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .map_err(|_| StoreError::Postgres("the connection thread stopped".into()))?;
        rx.recv()
            .map_err(|_| StoreError::Postgres("the connection thread stopped".into()))?
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let mut tx = conn.client.transaction().map_err(pg_error)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(pg_error)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS knots_schema (version BIGINT NOT NULL)")
        .map_err(pg_error)?;
    let version: i64 = match tx
        .query_opt("SELECT version FROM knots_schema", &[])
        .map_err(pg_error)?
    {
        Some(row) => row.get(0),
        None => {
            tx.execute("INSERT INTO knots_schema (version) VALUES (0)", &[])
                .map_err(pg_error)?;
            0
        }
    };
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    if version > MIGRATIONS.len() {
        return Err(StoreError::TooNew {
            path: "postgres".into(),
            found: version,
            known: MIGRATIONS.len(),
        });
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(version) {
        tx.batch_execute(step).map_err(pg_error)?;
        tx.execute("UPDATE knots_schema SET version = $1", &[&((i + 1) as i64)])
            .map_err(pg_error)?;
    }
    tx.commit().map_err(pg_error)
}

/// `?N` placeholders as PostgreSQL's `$N`.
fn dollar_params(sql: &str) -> String {
    sql.replace('?', "$")
}

/// A parameter as the Rust type the statement's parameter type takes.
fn param(v: &Value, ty: &Type) -> Box<dyn ToSql + Sync + Send> {
    match v {
        Value::Int(x) if *ty == Type::INT4 => Box::new(Some(*x as i32)),
        Value::Int(x) if *ty == Type::FLOAT8 => Box::new(Some(*x as f64)),
        Value::Int(x) => Box::new(Some(*x)),
        Value::Real(x) => Box::new(Some(*x)),
        Value::Text(s) => Box::new(Some(s.clone())),
        Value::Null if *ty == Type::INT8 => Box::new(None::<i64>),
        Value::Null if *ty == Type::INT4 => Box::new(None::<i32>),
        Value::Null if *ty == Type::FLOAT8 => Box::new(None::<f64>),
        Value::Null => Box::new(None::<String>),
    }
}

fn column(row: &postgres::Row, i: usize) -> Result<Value, postgres::Error> {
    let ty = row.columns()[i].type_();
    Ok(if *ty == Type::INT8 {
        row.try_get::<_, Option<i64>>(i)?
            .map_or(Value::Null, Value::Int)
    } else if *ty == Type::INT4 {
        row.try_get::<_, Option<i32>>(i)?
            .map_or(Value::Null, |x| Value::Int(x.into()))
    } else if *ty == Type::FLOAT8 {
        row.try_get::<_, Option<f64>>(i)?
            .map_or(Value::Null, Value::Real)
    } else {
        row.try_get::<_, Option<String>>(i)?
            .map_or(Value::Null, Value::Text)
    })
}

/// `sql` prepared on this connection (once), with `params` bound to its parameter types.
fn bound(
    conn: &mut Connection,
    sql: &str,
    params: &[Value],
) -> Result<(Statement, Vec<Box<dyn ToSql + Sync + Send>>), StoreError> {
    let stmt = match conn.statements.get(sql) {
        Some(stmt) => stmt.clone(),
        None => {
            let stmt = conn.client.prepare(&dollar_params(sql)).map_err(pg_error)?;
            conn.statements.insert(sql.to_string(), stmt.clone());
            stmt
        }
    };
    let values = params
        .iter()
        .zip(stmt.params())
        .map(|(v, ty)| param(v, ty))
        .collect();
    Ok((stmt, values))
}

fn refs(values: &[Box<dyn ToSql + Sync + Send>]) -> Vec<&(dyn ToSql + Sync)> {
    values
        .iter()
        .map(|b| b.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

impl Database for Postgres {
    fn execute(&self, sql: &str, params: Vec<Value>) -> Result<u64, StoreError> {
        let sql = sql.to_string();
        self.run(move |conn| {
            let (stmt, values) = bound(conn, &sql, &params)?;
            conn.client.execute(&stmt, &refs(&values)).map_err(pg_error)
        })
    }

    fn query(&self, sql: &str, params: Vec<Value>) -> Result<Vec<Row>, StoreError> {
        let sql = sql.to_string();
        self.run(move |conn| {
            let (stmt, values) = bound(conn, &sql, &params)?;
            let rows = conn.client.query(&stmt, &refs(&values)).map_err(pg_error)?;
            rows.iter()
                .map(|r| {
                    (0..r.len())
                        .map(|i| column(r, i))
                        .collect::<Result<Row, _>>()
                })
                .collect::<Result<Vec<Row>, _>>()
                .map_err(pg_error)
        })
    }
}
