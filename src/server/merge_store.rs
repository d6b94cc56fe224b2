//! The shared merge store: a second level below the in-process merge cache, in an object store
//! (`--merge-store file:///dir` or `s3://bucket/prefix`), so a fleet of replicas computes a set
//! once and every other replica fetches it.
//!
//! Content-addressed: a merge's address is the SHA-256 of the delta format version, the base
//! model's digest (SHA-256 over its weight files) and the merge key's canonical form (adapter
//! content digests, weights, method, parameters). Two objects per merge, `merges/<address>.
//! safetensors` (the delta) then `merges/<address>.json` (a manifest with the payload's SHA-256
//! and the canonical key); the manifest is written last, so a reader never sees a payload that
//! is still being written. Writes are idempotent (an address that exists is not written again);
//! a fetch checks the manifest's format, key and digest before it trusts the payload. The
//! caller treats every failure as a miss and computes.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::backend::BaseInfo;
use crate::merge::{DELTA_FORMAT_VERSION, MergeKey, MergedDelta};
use crate::objects::{ObjectDir, ObjectsError};

#[derive(Debug, thiserror::Error)]
pub enum MergeStoreError {
    #[error(transparent)]
    Objects(#[from] ObjectsError),
    #[error("stored merge {address} is unusable: {reason}")]
    Corrupt { address: String, reason: String },
    #[error("reading base weights {path}: {source}")]
    Base {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("merge store task failed: {0}")]
    Task(String),
}

/// What the store records beside each payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    key: String,
    base_digest: String,
    sha256: String,
    bytes: u64,
    /// Time the merge took where it was computed.
    merge_ms: f64,
}

/// A merge found in the store.
pub struct Fetched {
    pub delta: MergedDelta,
    pub fetch_ms: f64,
}

pub struct MergeStore {
    dir: ObjectDir,
    /// Base id → SHA-256 over its weight files.
    base_digests: HashMap<String, String>,
}

impl MergeStore {
    /// Opens the store at `uri` for `bases`, hashing their weight files (blocking: a few
    /// hundred MB/s).
    pub fn open(uri: &str, bases: &[BaseInfo]) -> Result<Self, MergeStoreError> {
        let dir = ObjectDir::open(uri)?.join("merges");
        let base_digests = bases
            .iter()
            .map(|b| Ok((b.id.clone(), base_digest(b)?)))
            .collect::<Result<_, MergeStoreError>>()?;
        Ok(Self { dir, base_digests })
    }

    pub fn uri(&self) -> &str {
        self.dir.uri()
    }

    fn base_digest(&self, key: &MergeKey) -> String {
        self.base_digests
            .get(&key.base)
            .cloned()
            .unwrap_or_else(|| key.base.clone())
    }

    /// The content address of `key`'s merge.
    pub fn address(&self, key: &MergeKey) -> String {
        let mut h = Sha256::new();
        h.update(format!("knots-merge/{DELTA_FORMAT_VERSION}\n").as_bytes());
        h.update(format!("{}\n", self.base_digest(key)).as_bytes());
        h.update(key.canonical().as_bytes());
        hex(&h.finalize())
    }

    /// The stored merge of `key`, `None` when the store has none.
    pub async fn fetch(&self, key: &MergeKey) -> Result<Option<Fetched>, MergeStoreError> {
        let started = Instant::now();
        let address = self.address(key);
        let Some(manifest) = self.dir.get(&format!("{address}.json")).await? else {
            return Ok(None);
        };
        let corrupt = |reason: String| MergeStoreError::Corrupt {
            address: address.clone(),
            reason,
        };
        let manifest: Manifest =
            serde_json::from_slice(&manifest).map_err(|e| corrupt(format!("manifest: {e}")))?;
        let expected = Manifest {
            format: DELTA_FORMAT_VERSION,
            key: key.canonical(),
            base_digest: self.base_digest(key),
            ..manifest.clone()
        };
        if manifest != expected {
            return Err(corrupt("the manifest names another merge".into()));
        }
        let payload = self
            .dir
            .get(&format!("{address}.safetensors"))
            .await?
            .ok_or_else(|| corrupt("the manifest has no payload".into()))?;
        let delta = tokio::task::spawn_blocking(move || {
            // The digest and the decoding each read the whole payload: side by side.
            let (digest, decoded) = rayon::join(
                || hex(&Sha256::digest(&payload)),
                || MergedDelta::decode(&payload),
            );
            if payload.len() as u64 != manifest.bytes || digest != manifest.sha256 {
                return Err("the payload does not match its digest".to_string());
            }
            decoded.map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| MergeStoreError::Task(e.to_string()))?
        .map_err(corrupt)?;
        Ok(Some(Fetched {
            delta,
            fetch_ms: started.elapsed().as_secs_f64() * 1e3,
        }))
    }

    /// Stores `key`'s merge unless the store has it; whether it was written.
    pub async fn save(
        &self,
        key: &MergeKey,
        delta: std::sync::Arc<MergedDelta>,
        merge_ms: f64,
    ) -> Result<bool, MergeStoreError> {
        let address = self.address(key);
        let manifest_name = format!("{address}.json");
        if self.dir.exists(&manifest_name).await? {
            return Ok(false);
        }
        let payload = tokio::task::spawn_blocking(move || delta.encode())
            .await
            .map_err(|e| MergeStoreError::Task(e.to_string()))?
            .map_err(|e| MergeStoreError::Corrupt {
                address: address.clone(),
                reason: e.to_string(),
            })?;
        let manifest = Manifest {
            format: DELTA_FORMAT_VERSION,
            key: key.canonical(),
            base_digest: self.base_digest(key),
            sha256: hex(&Sha256::digest(&payload)),
            bytes: payload.len() as u64,
            merge_ms,
        };
        let manifest = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| MergeStoreError::Task(e.to_string()))?;
        self.dir
            .put(&format!("{address}.safetensors"), payload)
            .await?;
        self.dir.put(&manifest_name, manifest).await?;
        Ok(true)
    }
}

/// SHA-256 over the base's weight files (length-prefixed, in order); the id alone for a base
/// with no files (a test backend).
fn base_digest(base: &BaseInfo) -> Result<String, MergeStoreError> {
    let mut h = Sha256::new();
    if base.weights.is_empty() {
        h.update(base.id.as_bytes());
    }
    let mut buffer = vec![0u8; 1 << 20];
    for path in &base.weights {
        let io = |source| MergeStoreError::Base {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        h.update(file.metadata().map_err(io)?.len().to_le_bytes());
        loop {
            let n = file.read(&mut buffer).map_err(io)?;
            if n == 0 {
                break;
            }
            h.update(&buffer[..n]);
        }
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::AdapterDigest;
    use crate::matrix::Matrix;
    use crate::merge::{MergeOptions, MergeParams, Method, ModuleDelta};
    use crate::server::backend::BaseKind;

    fn base(id: &str, weights: Vec<PathBuf>) -> BaseInfo {
        BaseInfo {
            id: id.into(),
            kind: BaseKind::Generator,
            context_length: 8,
            aliases: Vec::new(),
            weights,
        }
    }

    fn key(lambda: f64) -> MergeKey {
        let options = MergeOptions {
            lambda: Some(lambda),
            ..Default::default()
        };
        let params = MergeParams::new(Method::Ta, options).unwrap();
        let members = [("a".to_string(), AdapterDigest([7; 32]), 1.0)];
        MergeKey::new("gen", members, &params).unwrap()
    }

    fn delta() -> std::sync::Arc<MergedDelta> {
        let mut d = MergedDelta::default();
        d.modules.insert(
            "m".into(),
            ModuleDelta::Dense(Matrix::from_fn(2, 3, |i, j| (i + j) as f32)),
        );
        std::sync::Arc::new(d)
    }

    #[tokio::test]
    async fn stores_fetches_and_refuses_tampered_payloads() {
        let dir = tempfile::tempdir().unwrap();
        let weights = dir.path().join("w.gguf");
        std::fs::write(&weights, b"weights").unwrap();
        let uri = dir.path().join("store").display().to_string();
        let store = MergeStore::open(&uri, &[base("gen", vec![weights.clone()])]).unwrap();
        assert!(store.fetch(&key(1.0)).await.unwrap().is_none());
        assert!(store.save(&key(1.0), delta(), 5.0).await.unwrap());
        assert!(
            !store.save(&key(1.0), delta(), 5.0).await.unwrap(),
            "idempotent"
        );
        let found = store.fetch(&key(1.0)).await.unwrap().unwrap();
        assert_eq!(found.delta, *delta());
        assert!(store.fetch(&key(0.5)).await.unwrap().is_none());

        // Other base weights under the same id: another address.
        std::fs::write(&weights, b"other weights").unwrap();
        let other = MergeStore::open(&uri, &[base("gen", vec![weights])]).unwrap();
        assert_ne!(other.address(&key(1.0)), store.address(&key(1.0)));
        assert!(other.fetch(&key(1.0)).await.unwrap().is_none());

        // One flipped byte in the payload: refused, not served.
        let payload = dir
            .path()
            .join("store/merges")
            .join(format!("{}.safetensors", store.address(&key(1.0))));
        let mut bytes = std::fs::read(&payload).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        std::fs::write(&payload, bytes).unwrap();
        let err = store.fetch(&key(1.0)).await.err().unwrap().to_string();
        assert!(err.contains("does not match its digest"), "{err}");
    }
}
