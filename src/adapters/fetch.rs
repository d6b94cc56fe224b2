//! Adapters kept outside the server, named by URI: a local directory (a path or `file:///dir`),
//! `s3://bucket/prefix` through the object store, or `hf://org/name[@revision]` through the
//! Hugging Face hub client. Remote adapters are fetched on first use into a local cache
//! directory (one sub-directory per URI, written beside its place and renamed into it, so a
//! failed fetch leaves nothing half-written) and later uses read the cached copy. The caller
//! checks the loaded adapter's content digest against the one it expects.

use std::path::{Path, PathBuf};

use hf_hub::{Repo, RepoType};
use sha2::{Digest, Sha256};

use super::{AdapterError, CONFIG_FILE, TASK_FILE, WEIGHTS_FILE};
use crate::objects::ObjectDir;

/// Where an adapter's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdapterUri {
    Local(PathBuf),
    /// `s3://bucket/prefix`: the adapter's files directly under the prefix.
    S3(String),
    Hub {
        repo: String,
        revision: String,
    },
}

impl AdapterUri {
    pub fn parse(uri: &str) -> Result<Self, AdapterError> {
        let invalid = |reason: &str| AdapterError::Source {
            uri: uri.to_string(),
            reason: reason.to_string(),
        };
        if uri.starts_with("s3://") {
            return Ok(Self::S3(uri.trim_end_matches('/').to_string()));
        }
        if let Some(rest) = uri.strip_prefix("hf://") {
            let (repo, revision) = rest.split_once('@').unwrap_or((rest, "main"));
            let part_ok = |s: &str| {
                !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            };
            let repo_ok = matches!(repo.split_once('/'), Some((o, n)) if part_ok(o) && part_ok(n));
            if !repo_ok || revision.is_empty() {
                return Err(invalid("expected hf://org/name or hf://org/name@revision"));
            }
            return Ok(Self::Hub {
                repo: repo.to_string(),
                revision: revision.to_string(),
            });
        }
        if uri.contains("://") && !uri.starts_with("file://") {
            return Err(invalid(
                "expected a path, file:///dir, s3://bucket/prefix or hf://org/name",
            ));
        }
        let path = uri.strip_prefix("file://").unwrap_or(uri);
        if path.is_empty() {
            return Err(invalid("no path"));
        }
        Ok(Self::Local(PathBuf::from(path)))
    }
}

/// The local directory remote adapters are fetched into.
#[derive(Debug, Clone)]
pub struct AdapterCache {
    dir: PathBuf,
}

impl AdapterCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory holding `uri`'s files: a local one as is; a remote one's cached copy,
    /// fetched first when there is none (or when `refresh`, replacing the copy).
    pub async fn local_dir(
        &self,
        uri: &AdapterUri,
        refresh: bool,
    ) -> Result<PathBuf, AdapterError> {
        let name = match uri {
            AdapterUri::Local(path) => return Ok(path.clone()),
            AdapterUri::S3(s3) => s3.clone(),
            AdapterUri::Hub { repo, revision } => format!("hf://{repo}@{revision}"),
        };
        let target = self.dir.join(cache_name(&name));
        if target.join(CONFIG_FILE).is_file() && !refresh {
            return Ok(target);
        }
        let staging = self
            .dir
            .join(format!(".{}.{}.tmp", cache_name(&name), std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).map_err(AdapterError::io(&staging))?;
        let fetched = match uri {
            AdapterUri::S3(s3) => fetch_s3(s3, &staging).await,
            AdapterUri::Hub { repo, revision } => fetch_hub(repo, revision, &staging).await,
            AdapterUri::Local(_) => Ok(()),
        };
        let placed = fetched.and_then(|()| {
            if target.exists() {
                std::fs::remove_dir_all(&target).map_err(AdapterError::io(&target))?;
            }
            std::fs::rename(&staging, &target).map_err(AdapterError::io(&target))
        });
        if placed.is_err() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        placed?;
        tracing::info!(uri = %name, dir = %target.display(), "adapter fetched");
        Ok(target)
    }
}

/// The files an adapter directory holds: required, then optional.
const FILES: [(&str, bool); 3] = [
    (CONFIG_FILE, true),
    (WEIGHTS_FILE, true),
    (TASK_FILE, false),
];

/// A cache directory name for a URI: readable tail plus a hash of the whole.
fn cache_name(uri: &str) -> String {
    let hash = Sha256::digest(uri.as_bytes());
    let tail: String = uri
        .rsplit(['/', '@'])
        .next()
        .unwrap_or("")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .take(40)
        .collect();
    let hex: String = hash.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("{tail}-{hex}")
}

async fn fetch_s3(uri: &str, into: &Path) -> Result<(), AdapterError> {
    let source = |reason: String| AdapterError::Source {
        uri: uri.to_string(),
        reason,
    };
    let dir = ObjectDir::open(uri).map_err(|e| source(e.to_string()))?;
    for (name, required) in FILES {
        match dir.get(name).await.map_err(|e| source(e.to_string()))? {
            Some(bytes) => std::fs::write(into.join(name), bytes)
                .map_err(AdapterError::io(&into.join(name)))?,
            None if required => return Err(source(format!("no {name} under it"))),
            None => {}
        }
    }
    Ok(())
}

/// From the local hub cache, else (unless `HF_HUB_OFFLINE`) downloaded through it.
async fn fetch_hub(repo: &str, revision: &str, into: &Path) -> Result<(), AdapterError> {
    let source = |reason: String| AdapterError::Source {
        uri: format!("hf://{repo}@{revision}"),
        reason,
    };
    let repo = Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string());
    let cached = crate::hub::hub_cache().repo(repo.clone());
    let online = if crate::hub::hub_offline() {
        None
    } else {
        let api = hf_hub::api::tokio::ApiBuilder::from_cache(crate::hub::hub_cache())
            .build()
            .map_err(|e| source(e.to_string()))?;
        Some(api.repo(repo))
    };
    for (name, required) in FILES {
        let found = match (cached.get(name), &online) {
            (Some(path), _) => Some(path),
            (None, Some(api)) => api.get(name).await.ok(),
            (None, None) => None,
        };
        match found {
            Some(path) => {
                std::fs::copy(&path, into.join(name))
                    .map_err(AdapterError::io(&into.join(name)))?;
            }
            None if required => {
                let why = if online.is_some() {
                    "not found on the hub"
                } else {
                    "not in the local hub cache and HF_HUB_OFFLINE is set"
                };
                return Err(source(format!("{name}: {why}")));
            }
            None => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form_and_refuses_others() {
        assert_eq!(
            AdapterUri::parse("s3://b/adapters/x/").unwrap(),
            AdapterUri::S3("s3://b/adapters/x".into())
        );
        assert_eq!(
            AdapterUri::parse("hf://org/name@v2").unwrap(),
            AdapterUri::Hub {
                repo: "org/name".into(),
                revision: "v2".into()
            }
        );
        assert_eq!(
            AdapterUri::parse("file:///a/b").unwrap(),
            AdapterUri::Local("/a/b".into())
        );
        assert_eq!(
            AdapterUri::parse("rel/dir").unwrap(),
            AdapterUri::Local("rel/dir".into())
        );
        for bad in [
            "hf://noslash",
            "hf://a/b/c",
            "hf://org/name@",
            "gs://x/y",
            "file://",
            "",
        ] {
            assert!(AdapterUri::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cache_names_are_distinct_and_safe() {
        let a = cache_name("s3://bucket/adapters/news");
        let b = cache_name("s3://other/adapters/news");
        assert_ne!(a, b);
        assert!(a.starts_with("news-"), "{a}");
        assert!(!cache_name("hf://org/x@../..").contains('/'));
    }
}
