//! The adapter registry: registry names → loaded adapters, with their owner (a tenant, or shared)
//! and the base model they attach to. Names are keys, never joined into file paths.
//!
//! On disk (`--adapters DIR`): `DIR/<name>/` is a shared adapter named `<name>`, and
//! `DIR/<tenant>/<name>/` an adapter owned by `<tenant>`, named `<tenant>/<name>`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use super::{AdapterError, CONFIG_FILE, LoraAdapter};
use crate::merge::MergedDelta;

/// Who may see an adapter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Owner {
    Shared,
    Tenant(String),
}

/// An adapter as the server knows it.
#[derive(Debug)]
pub struct Registered {
    /// The registry name: `name` or `tenant/name`.
    pub name: String,
    pub owner: Owner,
    /// The id of the served base model this adapter applies to.
    pub base: String,
    pub adapter: Arc<LoraAdapter>,
    /// The adapter's own update, built once so one-adapter requests copy nothing.
    pub delta: Arc<MergedDelta>,
}

impl Registered {
    pub fn new(name: String, base: String, adapter: LoraAdapter) -> Self {
        let delta = Arc::new(adapter.delta());
        Self {
            owner: owner_of(&name),
            name,
            base,
            adapter: Arc::new(adapter),
            delta,
        }
    }
}

/// Whether `name` is a valid registry name: `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`, optionally
/// prefixed by a tenant of the same form and a `/`; never containing `..`.
pub fn valid_name(name: &str) -> bool {
    let part = |p: &str| {
        let mut chars = p.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
            && p.len() <= 128
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    };
    !name.contains("..")
        && match name.split_once('/') {
            Some((tenant, rest)) => part(tenant) && part(rest),
            None => part(name),
        }
}

/// The owner implied by a registry name.
pub fn owner_of(name: &str) -> Owner {
    match name.split_once('/') {
        Some((tenant, _)) => Owner::Tenant(tenant.to_string()),
        None => Owner::Shared,
    }
}

/// Adapters by registry name. std `RwLock`: held only to read or swap map entries, never across
/// I/O or an `.await`.
#[derive(Debug, Default)]
pub struct Registry {
    entries: RwLock<BTreeMap<String, Arc<Registered>>>,
}

impl Registry {
    /// Loads every adapter under `dir` (see the module docs). `base_for` picks the served base
    /// an adapter attaches to, or explains why none fits.
    pub fn load_dir(
        dir: &Path,
        base_for: &dyn Fn(&LoraAdapter) -> Result<String, String>,
    ) -> Result<Self, AdapterError> {
        let registry = Self::default();
        for (name, path) in discover(dir)? {
            let adapter = LoraAdapter::load_named(&path, name.clone())?;
            let base = base_for(&adapter).map_err(|reason| AdapterError::Unsupported {
                path: path.clone(),
                option: reason,
            })?;
            registry.insert(Registered::new(name, base, adapter));
        }
        Ok(registry)
    }

    pub fn get(&self, name: &str) -> Option<Arc<Registered>> {
        self.entries.read().ok()?.get(name).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Registered>> {
        self.entries
            .read()
            .map(|e| e.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Adds or replaces an adapter; returns the one it replaced.
    pub fn insert(&self, entry: Registered) -> Option<Arc<Registered>> {
        let mut entries = self
            .entries
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        entries.insert(entry.name.clone(), Arc::new(entry))
    }

    pub fn remove(&self, name: &str) -> Option<Arc<Registered>> {
        let mut entries = self
            .entries
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        entries.remove(name)
    }

    pub fn len(&self) -> usize {
        self.entries.read().map(|e| e.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `(registry name, directory)` of every adapter under `dir`, one or two levels deep.
fn discover(dir: &Path) -> Result<Vec<(String, std::path::PathBuf)>, AdapterError> {
    let mut found = Vec::new();
    for entry in read_dirs(dir)? {
        let name = entry
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if entry.join(CONFIG_FILE).is_file() {
            found.push((name, entry));
            continue;
        }
        for inner in read_dirs(&entry)? {
            let inner_name = inner
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if inner.join(CONFIG_FILE).is_file() {
                found.push((format!("{name}/{inner_name}"), inner));
            }
        }
    }
    if let Some((bad, path)) = found.iter().find(|(name, _)| !valid_name(name)) {
        let option = format!("directory name {bad:?} is not a valid adapter name");
        return Err(AdapterError::Unsupported {
            path: path.clone(),
            option,
        });
    }
    found.sort();
    Ok(found)
}

fn read_dirs(dir: &Path) -> Result<Vec<std::path::PathBuf>, AdapterError> {
    let entries = std::fs::read_dir(dir).map_err(AdapterError::io(dir))?;
    let mut dirs: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    dirs.sort();
    Ok(dirs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_grammar() {
        for good in ["sql", "Task_0", "a.b-c", "acme/sql", "x"] {
            assert!(valid_name(good), "{good}");
        }
        let long = "a".repeat(129);
        for bad in [
            "",
            ".x",
            "..",
            "a..b",
            "../etc",
            "a/b/c",
            "/a",
            "a/",
            "a b",
            "a\0",
            "%2e%2e",
            long.as_str(),
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert_eq!(owner_of("acme/sql"), Owner::Tenant("acme".into()));
        assert_eq!(owner_of("sql"), Owner::Shared);
    }
}
