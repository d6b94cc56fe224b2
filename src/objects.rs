//! Object stores named by URI, for the shared merge store and for adapters kept outside the
//! server: `file:///dir` (or a plain directory path) and `s3://bucket/prefix` on AWS or any
//! S3-compatible server. S3 credentials, region and endpoint come from the standard `AWS_*`
//! environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
//! `AWS_ENDPOINT_URL`, and `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint).

use std::sync::Arc;

use futures_util::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

#[derive(Debug, thiserror::Error)]
pub enum ObjectsError {
    #[error("invalid store {uri:?}: {reason}")]
    Uri { uri: String, reason: String },
    #[error("{uri}: {source}")]
    Store {
        uri: String,
        #[source]
        source: object_store::Error,
    },
}

/// A directory-like prefix of an object store.
#[derive(Debug, Clone)]
pub struct ObjectDir {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    uri: String,
}

impl ObjectDir {
    /// Opens `uri`: `s3://bucket[/prefix]`, `file:///absolute/dir` or a directory path (created
    /// when missing).
    pub fn open(uri: &str) -> Result<Self, ObjectsError> {
        let invalid = |reason: &str| ObjectsError::Uri {
            uri: uri.to_string(),
            reason: reason.to_string(),
        };
        let (store, prefix): (Arc<dyn ObjectStore>, &str) =
            if let Some(rest) = uri.strip_prefix("s3://") {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(invalid("no bucket name"));
                }
                let s3 = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .build()
                    .map_err(|e| invalid(&e.to_string()))?;
                (Arc::new(s3), prefix)
            } else if uri.contains("://") && !uri.starts_with("file://") {
                return Err(invalid(
                    "expected s3://bucket/prefix, file:///dir or a path",
                ));
            } else {
                let dir = uri.strip_prefix("file://").unwrap_or(uri);
                if dir.is_empty() {
                    return Err(invalid("no directory"));
                }
                std::fs::create_dir_all(dir).map_err(|e| invalid(&e.to_string()))?;
                let local =
                    LocalFileSystem::new_with_prefix(dir).map_err(|e| invalid(&e.to_string()))?;
                (Arc::new(local), "")
            };
        Ok(Self {
            store,
            prefix: Path::from(prefix),
            uri: uri.to_string(),
        })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// A sub-directory of this one.
    pub fn join(&self, name: &str) -> Self {
        Self {
            store: self.store.clone(),
            prefix: self.path(name),
            uri: format!("{}/{name}", self.uri.trim_end_matches('/')),
        }
    }

    fn path(&self, name: &str) -> Path {
        name.split('/')
            .filter(|p| !p.is_empty())
            .fold(self.prefix.clone(), |path, part| path.join(part))
    }

    fn error(&self, source: object_store::Error) -> ObjectsError {
        ObjectsError::Store {
            uri: self.uri.clone(),
            source,
        }
    }

    /// The object `name`, or `None` when there is none.
    pub async fn get(&self, name: &str) -> Result<Option<Vec<u8>>, ObjectsError> {
        match self.store.get(&self.path(name)).await {
            Ok(found) => {
                let bytes = found.bytes().await.map_err(|e| self.error(e))?;
                Ok(Some(bytes.to_vec()))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(e)),
        }
    }

    /// Whether the object `name` exists.
    pub async fn exists(&self, name: &str) -> Result<bool, ObjectsError> {
        match self.store.head(&self.path(name)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.error(e)),
        }
    }

    /// Writes the object `name` whole (readers see the old object or the new one, never part).
    pub async fn put(&self, name: &str, bytes: Vec<u8>) -> Result<(), ObjectsError> {
        self.store
            .put(&self.path(name), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| self.error(e))
    }

    /// The names of every object below this directory, relative to it.
    pub async fn list(&self) -> Result<Vec<String>, ObjectsError> {
        let metas: Vec<_> = self
            .store
            .list(Some(&self.prefix))
            .try_collect()
            .await
            .map_err(|e| self.error(e))?;
        let prefix: Vec<_> = self.prefix.parts().collect();
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let parts: Vec<_> = m.location.parts().collect();
                parts.starts_with(&prefix).then(|| {
                    parts[prefix.len()..]
                        .iter()
                        .map(|p| p.as_ref())
                        .collect::<Vec<_>>()
                        .join("/")
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_directory_store_round_trips_and_lists() {
        let dir = tempfile::tempdir().unwrap();
        let uri = format!("file://{}", dir.path().join("store").display());
        let store = ObjectDir::open(&uri).unwrap();
        assert_eq!(store.get("a/b.json").await.unwrap(), None);
        assert!(!store.exists("a/b.json").await.unwrap());
        store.put("a/b.json", b"{}".to_vec()).await.unwrap();
        store.put("a/c/d.bin", vec![1, 2]).await.unwrap();
        assert!(store.exists("a/b.json").await.unwrap());
        assert_eq!(store.get("a/b.json").await.unwrap(), Some(b"{}".to_vec()));
        let mut names = store.join("a").list().await.unwrap();
        names.sort();
        assert_eq!(names, ["b.json", "c/d.bin"]);
    }

    #[test]
    fn unknown_schemes_and_empty_names_are_refused() {
        for uri in ["gs://bucket/x", "s3://", "file://", ""] {
            assert!(ObjectDir::open(uri).is_err(), "{uri}");
        }
    }
}
