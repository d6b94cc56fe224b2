//! Run-time adapter administration shared by the admin routes and start-up: which directories
//! adapters may be registered from, fetching remote ones (S3, the hub) into the local adapter
//! cache, loading one with its digest checked, and replaying the stored registrations and
//! deletions onto the registry a restart loaded from `--adapters`.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::attach_base;
use super::backend::BaseInfo;
use super::error::ApiError;
use super::store::{AdapterChange, Store, StoreError};
use crate::adapters::{AdapterCache, AdapterError, AdapterUri, LoraAdapter, Registered, Registry};

/// `path` canonicalised, if it is a directory inside one of `roots`.
pub fn allowed_dir(roots: &[PathBuf], path: &Path) -> Result<PathBuf, ApiError> {
    let not_allowed = || ApiError::bad("path", "not a directory inside the server's adapter roots");
    let dir = std::fs::canonicalize(path).map_err(|_| not_allowed())?;
    let inside = roots
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .any(|root| dir.starts_with(&root));
    if inside && dir.is_dir() {
        Ok(dir)
    } else {
        Err(not_allowed())
    }
}

/// Loads the adapter in `dir` as `name`, attached to its served base. A directory without the
/// adapter's files (or with a directory in a file's place) is the caller's error, naming `path`.
pub fn load(bases: &[BaseInfo], dir: &Path, name: String) -> Result<Registered, ApiError> {
    let adapter = LoraAdapter::load_named(dir, name.clone()).map_err(|e| match &e {
        AdapterError::Io { source, .. }
            if matches!(source.kind(), ErrorKind::NotFound | ErrorKind::IsADirectory) =>
        {
            ApiError::bad("path", e.to_string())
        }
        _ => ApiError::from(e),
    })?;
    let base = attach_base(bases, &adapter).map_err(|reason| ApiError::bad("path", reason))?;
    Ok(Registered::new(name, base, adapter))
}

/// Where a registration's files come from: a directory inside the adapter roots, or a remote
/// URI fetched through `cache`. `expected`, when given, is the SHA-256 the content must have;
/// a cached remote copy that does not match is fetched again once. Returns the entry and the
/// source string to store (the canonical directory, or the URI).
pub async fn fetch_and_load(
    bases: &Arc<Vec<BaseInfo>>,
    roots: &[PathBuf],
    cache: &AdapterCache,
    source: &str,
    name: String,
    expected: Option<&str>,
) -> Result<(Registered, String), ApiError> {
    let uri = AdapterUri::parse(source)?;
    if let AdapterUri::Local(path) = &uri {
        let dir = allowed_dir(roots, path)?;
        let entry = load_blocking(bases, dir.clone(), name).await?;
        check_digest(&entry, expected)?;
        return Ok((entry, dir.to_string_lossy().into_owned()));
    }
    let mut refresh = false;
    loop {
        let dir = cache.local_dir(&uri, refresh).await?;
        let entry = load_blocking(bases, dir, name.clone()).await?;
        match check_digest(&entry, expected) {
            Err(_) if !refresh => refresh = true,
            checked => return checked.map(|()| (entry, source.to_string())),
        }
    }
}

async fn load_blocking(
    bases: &Arc<Vec<BaseInfo>>,
    dir: PathBuf,
    name: String,
) -> Result<Registered, ApiError> {
    let bases = bases.clone();
    tokio::task::spawn_blocking(move || load(&bases, &dir, name))
        .await
        .map_err(|e| ApiError::internal(format!("adapter load failed: {e}")))?
}

fn check_digest(entry: &Registered, expected: Option<&str>) -> Result<(), ApiError> {
    let found = entry.adapter.digest.to_string();
    match expected {
        Some(want) if !want.eq_ignore_ascii_case(&found) => Err(ApiError::bad(
            "digest",
            format!("adapter content has SHA-256 {found}, expected {want}"),
        )),
        _ => Ok(()),
    }
}

/// Applies the stored run-time changes to `registry`: deletions, and registrations that still
/// load with the content they had (a directory still inside an adapter root, a remote URI from
/// the local cache or fetched again); others are logged and skipped. Returns how many changes
/// were applied.
pub async fn restore(
    registry: &Registry,
    store: &Store,
    bases: &Arc<Vec<BaseInfo>>,
    roots: &[PathBuf],
    cache: &AdapterCache,
) -> Result<usize, StoreError> {
    let mut applied = 0;
    for change in store.adapter_changes()? {
        match change {
            AdapterChange::Deleted { name } => {
                applied += usize::from(registry.remove(&name).is_some());
            }
            AdapterChange::Registered {
                name,
                source,
                digest,
            } => {
                let loaded = fetch_and_load(
                    bases,
                    roots,
                    cache,
                    &source,
                    name.clone(),
                    digest.as_deref(),
                )
                .await;
                match loaded {
                    Ok((entry, _)) => {
                        registry.insert(entry);
                        applied += 1;
                    }
                    Err(e) => tracing::warn!(
                        adapter = %name, %source, error = %e,
                        "a registered adapter no longer loads as registered; skipped"
                    ),
                }
            }
        }
    }
    Ok(applied)
}
