//! Run-time adapter administration shared by the admin routes and start-up: which directories
//! adapters may be registered from, loading one, and replaying the stored registrations and
//! deletions onto the registry a restart loaded from `--adapters`.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use super::attach_base;
use super::backend::BaseInfo;
use super::error::ApiError;
use super::store::{AdapterChange, Store, StoreError};
use crate::adapters::{AdapterError, LoraAdapter, Registered, Registry};

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

/// Applies the stored run-time changes to `registry`: deletions, and registrations whose
/// directory is still inside an adapter root and still loads (others are logged and skipped).
/// Returns how many changes were applied.
pub fn restore(
    registry: &Registry,
    store: &Store,
    bases: &[BaseInfo],
    roots: &[PathBuf],
) -> Result<usize, StoreError> {
    let mut applied = 0;
    for change in store.adapter_changes()? {
        match change {
            AdapterChange::Deleted { name } => {
                applied += usize::from(registry.remove(&name).is_some());
            }
            AdapterChange::Registered { name, path } => {
                let loaded =
                    allowed_dir(roots, &path).and_then(|dir| load(bases, &dir, name.clone()));
                match loaded {
                    Ok(entry) => {
                        registry.insert(entry);
                        applied += 1;
                    }
                    Err(e) => tracing::warn!(
                        adapter = %name, path = %path.display(), error = %e,
                        "a registered adapter no longer loads; skipped"
                    ),
                }
            }
        }
    }
    Ok(applied)
}
