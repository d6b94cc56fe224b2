//! Where a model comes from: a manifest id (`models/manifest.toml`, fetched into
//! `models/cache/` when missing), a local GGUF file, a local Hugging Face directory, or a Hugging
//! Face repo id through hf-hub (local cache first; `HF_HUB_OFFLINE=1` never goes online).

use std::path::{Path, PathBuf};
use std::process::Command;

use hf_hub::Repo;

use crate::hub::{hub_cache, hub_offline};
use serde::Deserialize;

use super::error::{EngineError, Result};

/// A model on local disk, ready to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelPath {
    /// A `.gguf` file.
    Gguf(PathBuf),
    /// A directory with `config.json`, safetensors weights and `tokenizer.json`.
    HfDir(PathBuf),
}

impl ModelPath {
    /// The files that hold the weights: the GGUF file, or a directory's `config.json` and its
    /// safetensors files in name order.
    pub fn weight_files(&self) -> Vec<PathBuf> {
        match self {
            Self::Gguf(file) => vec![file.clone()],
            Self::HfDir(dir) => {
                let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                    .collect();
                files.sort();
                files.insert(0, dir.join("config.json"));
                files
            }
        }
    }
}

/// One entry of `models/manifest.toml`.
#[derive(Debug, Clone, Deserialize)]
pub struct ManifestModel {
    pub id: String,
    pub arch: String,
    pub hf_repo: Option<String>,
    /// File or directory to load, relative to `models/cache/<id>/`.
    pub entry: String,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    model: Vec<ManifestModel>,
}

/// Where the manifest and cache live: `$KNOTS_MODELS_DIR`, else `./models`.
pub fn models_dir() -> PathBuf {
    std::env::var_os("KNOTS_MODELS_DIR").map_or_else(|| PathBuf::from("models"), PathBuf::from)
}

/// Reads `<models_dir>/manifest.toml` (an empty list when there is none).
pub fn manifest(models_dir: &Path) -> Result<Vec<ManifestModel>> {
    let path = models_dir.join("manifest.toml");
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))?;
    let m: Manifest =
        toml::from_str(&text).map_err(|e| EngineError::format("manifest", &path, e))?;
    Ok(m.model)
}

/// Resolves `spec` (manifest id, path, or `org/name` repo id) to files on disk.
pub fn resolve(spec: &str, models_dir: &Path) -> Result<ModelPath> {
    if let Some(entry) = manifest(models_dir)?.into_iter().find(|m| m.id == spec) {
        return manifest_model(&entry, models_dir);
    }
    let path = Path::new(spec);
    if path.exists() {
        return local(path);
    }
    if is_repo_id(spec) {
        return hub(spec);
    }
    Err(EngineError::ModelNotFound {
        spec: spec.to_string(),
        message: "not a manifest id, an existing path, or an org/name repo id".into(),
    })
}

fn local(path: &Path) -> Result<ModelPath> {
    if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        return Ok(ModelPath::Gguf(path.to_path_buf()));
    }
    if path.is_dir() && path.join("config.json").is_file() {
        return Ok(ModelPath::HfDir(path.to_path_buf()));
    }
    Err(EngineError::ModelNotFound {
        spec: path.display().to_string(),
        message: "expected a .gguf file or a directory with config.json".into(),
    })
}

fn manifest_model(entry: &ManifestModel, models_dir: &Path) -> Result<ModelPath> {
    let path = models_dir.join("cache").join(&entry.id).join(&entry.entry);
    if !path.exists() {
        fetch(&entry.id, models_dir)?;
    }
    local(&path)
}

/// Runs `models/fetch.py <id>`.
fn fetch(id: &str, models_dir: &Path) -> Result<()> {
    let script = models_dir.join("fetch.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(id)
        .output()
        .map_err(|e| EngineError::io(&script, e))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(EngineError::ModelNotFound {
        spec: id.to_string(),
        message: stderr.lines().last().unwrap_or("fetch failed").to_string(),
    })
}

fn is_repo_id(spec: &str) -> bool {
    let ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    matches!(spec.split_once('/'), Some((org, name)) if ok(org) && ok(name) && !name.contains('/'))
}

/// Files a model directory needs, then the optional ones.
const REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];
const OPTIONAL: [&str; 3] = [
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
];

/// A repo from the hub cache, downloading what is missing unless offline.
fn hub(repo_id: &str) -> Result<ModelPath> {
    let cache = hub_cache().repo(Repo::model(repo_id.to_string()));
    let cached = |f: &str| cache.get(f);
    let weights_cached = cached("model.safetensors").is_some() || index_complete(&cache);
    if let (Some(config), true, true) = (
        cached("config.json"),
        cached("tokenizer.json").is_some(),
        weights_cached,
    ) {
        let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
        return Ok(ModelPath::HfDir(dir));
    }
    if hub_offline() {
        return Err(EngineError::ModelNotFound {
            spec: repo_id.to_string(),
            message: "not in the local hub cache and HF_HUB_OFFLINE is set".into(),
        });
    }
    download(repo_id)
}

/// Whether the cache holds a sharded index and every shard it names.
fn index_complete(cache: &hf_hub::CacheRepo) -> bool {
    let Some(index) = cache.get("model.safetensors.index.json") else {
        return false;
    };
    shard_names(&index)
        .is_some_and(|names| !names.is_empty() && names.iter().all(|n| cache.get(n).is_some()))
}

fn shard_names(index: &Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(index).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let mut names: Vec<String> = json
        .get("weight_map")?
        .as_object()?
        .values()
        .filter_map(|v| v.as_str().map(String::from))
        // Shards are plain file names next to the index, never paths.
        .filter(|n| Path::new(n).file_name().is_some_and(|f| f == n.as_str()))
        .collect();
    names.sort();
    names.dedup();
    Some(names)
}

fn download(repo_id: &str) -> Result<ModelPath> {
    let not_found = |message: String| EngineError::ModelNotFound {
        spec: repo_id.to_string(),
        message,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| not_found(format!("cannot start a runtime: {e}")))?;
    runtime.block_on(async {
        let api = hf_hub::api::tokio::ApiBuilder::from_cache(hub_cache())
            .with_progress(false)
            .build()
            .map_err(|e| not_found(e.to_string()))?;
        let repo = api.model(repo_id.to_string());
        let mut config = None;
        for f in REQUIRED {
            let path = repo
                .get(f)
                .await
                .map_err(|e| not_found(format!("{f}: {e}")))?;
            config.get_or_insert(path);
        }
        for f in OPTIONAL {
            let _ = repo.get(f).await;
        }
        if repo.get("model.safetensors").await.is_err() {
            let index = repo
                .get("model.safetensors.index.json")
                .await
                .map_err(|e| not_found(format!("no model.safetensors and no index: {e}")))?;
            for shard in shard_names(&index).unwrap_or_default() {
                repo.get(&shard)
                    .await
                    .map_err(|e| not_found(format!("{shard}: {e}")))?;
            }
        }
        let dir = config
            .and_then(|c| c.parent().map(Path::to_path_buf))
            .unwrap_or_default();
        Ok(ModelPath::HfDir(dir))
    })
}
