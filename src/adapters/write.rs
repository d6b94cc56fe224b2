//! Writing merge results: a PEFT LoRA adapter that PEFT, vLLM, LoRAX or TGI load as an ordinary
//! adapter, or `delta.safetensors` with the dense update of every module. Output directories are
//! written beside their destination and renamed into place, so a failed export leaves nothing
//! half-written.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde_json::{Value, json};

use super::{AdapterError, CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE};
use crate::matrix::Matrix;
use crate::merge::{MergedDelta, ModuleDelta};

/// The dense-delta export's file name.
pub const DELTA_FILE: &str = "delta.safetensors";
/// Provenance of an export: method, parameters, inputs and their digests.
pub const RECORD_FILE: &str = "knots_merge.json";

/// What an export records besides the tensors.
#[derive(Debug, Clone, Default)]
pub struct ExportInfo {
    pub base_model_name_or_path: Option<String>,
    pub task_type: Option<String>,
    /// Whether the base stores these weights as `in × out` (GPT-2 `Conv1D`); the factors keep
    /// the `O × r`, `r × I` layout either way.
    pub fan_in_fan_out: bool,
    /// JSON files written next to the tensors, `(file name, content)`: `knots_merge.json` for a
    /// merge, `training.json` and `knots_task.json` for a trained adapter.
    pub records: Vec<(&'static str, Value)>,
}

/// Writes `delta` as a PEFT LoRA adapter (`r = lora_alpha = k`, so the scale is 1). Every
/// module must be low-rank; modules of rank 0 are left out (their update is zero).
pub fn write_peft(delta: &MergedDelta, out: &Path, info: &ExportInfo) -> Result<(), AdapterError> {
    let mut tensors = Vec::new();
    let mut ranks = BTreeMap::new();
    for (module, m) in &delta.modules {
        let ModuleDelta::LowRank { b, a } = m else {
            let reason = format!("module {module} is dense; a PEFT adapter needs low-rank factors");
            return Err(AdapterError::Export { reason });
        };
        if a.rows() == 0 {
            continue;
        }
        ranks.insert(module.clone(), a.rows());
        tensors.push((format!("{PEFT_PREFIX}{module}.lora_A.weight"), a));
        tensors.push((format!("{PEFT_PREFIX}{module}.lora_B.weight"), b));
    }
    if ranks.is_empty() {
        let reason = "the merged update is zero in every module".to_string();
        return Err(AdapterError::Export { reason });
    }
    let config = peft_config(&ranks, info);
    write_atomically(out, |dir| {
        write_json(&dir.join(CONFIG_FILE), &config)?;
        write_tensors(&dir.join(WEIGHTS_FILE), &tensors)?;
        write_records(dir, info)
    })
}

/// Writes the dense `O × I` update of every module to `delta.safetensors` under
/// `<module>.weight`.
pub fn write_delta(delta: &MergedDelta, out: &Path, info: &ExportInfo) -> Result<(), AdapterError> {
    let dense: Vec<(String, Matrix)> = delta
        .modules
        .iter()
        .map(|(module, m)| (format!("{module}.weight"), m.to_dense()))
        .collect();
    let tensors: Vec<(String, &Matrix)> = dense.iter().map(|(k, m)| (k.clone(), m)).collect();
    write_atomically(out, |dir| {
        write_tensors(&dir.join(DELTA_FILE), &tensors)?;
        write_records(dir, info)
    })
}

/// The most common rank becomes `r`; other modules get `rank_pattern`/`alpha_pattern` entries
/// (escaped full paths, which PEFT matches as regular expressions). `lora_alpha` equals the
/// rank everywhere, so every module's scale is 1 and the factors are stored as computed.
fn peft_config(ranks: &BTreeMap<String, usize>, info: &ExportInfo) -> Value {
    let mut counts: HashMap<usize, usize> = HashMap::new();
    ranks
        .values()
        .for_each(|&k| *counts.entry(k).or_default() += 1);
    let r = counts
        .iter()
        .max_by_key(|&(&k, &count)| (count, k))
        .map(|(&k, _)| k)
        .unwrap_or(1);
    let pattern: BTreeMap<String, usize> = ranks
        .iter()
        .filter(|&(_, &k)| k != r)
        .map(|(module, &k)| (regex::escape(module), k))
        .collect();
    json!({
        "peft_type": "LORA",
        "task_type": info.task_type,
        "base_model_name_or_path": info.base_model_name_or_path,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": pattern,
        "target_modules": ranks.keys().collect::<Vec<_>>(),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": info.fan_in_fan_out,
        "use_rslora": false,
        "use_dora": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
    })
}

fn write_json(path: &Path, value: &Value) -> Result<(), AdapterError> {
    let text = serde_json::to_string_pretty(value).map_err(|source| AdapterError::Json {
        path: path.into(),
        source,
    })?;
    std::fs::write(path, text + "\n").map_err(AdapterError::io(path))
}

fn write_tensors(path: &Path, tensors: &[(String, &Matrix)]) -> Result<(), AdapterError> {
    let bytes: Vec<Vec<u8>> = tensors
        .par_iter()
        .map(|(_, m)| le_bytes(m.as_slice()))
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((key, m), data)| {
            let view = TensorView::new(Dtype::F32, vec![m.rows(), m.cols()], data);
            view.map(|v| (key.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| AdapterError::Safetensors {
            path: path.into(),
            reason: e.to_string(),
        })?;
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::serialize_to_file(views, metadata, path).map_err(|e| AdapterError::Safetensors {
        path: path.into(),
        reason: e.to_string(),
    })
}

/// Little-endian bytes of `values`.
fn le_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; values.len() * 4];
    for (chunk, x) in out.chunks_exact_mut(4).zip(values) {
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    out
}

/// Runs `fill` on a fresh sibling directory of `out`, then renames it to `out`. `out` may exist
/// only as an empty directory; on any error the sibling is removed.
fn write_records(dir: &Path, info: &ExportInfo) -> Result<(), AdapterError> {
    info.records
        .iter()
        .try_for_each(|(name, value)| write_json(&dir.join(name), value))
}

fn write_atomically(
    out: &Path,
    fill: impl FnOnce(&Path) -> Result<(), AdapterError>,
) -> Result<(), AdapterError> {
    let out_exists = out.exists();
    if out_exists
        && std::fs::read_dir(out)
            .map_err(AdapterError::io(out))?
            .next()
            .is_some()
    {
        return Err(AdapterError::OutputExists { path: out.into() });
    }
    let staging = staging_dir(out);
    if let Some(parent) = staging.parent() {
        std::fs::create_dir_all(parent).map_err(AdapterError::io(parent))?;
    }
    std::fs::create_dir(&staging).map_err(AdapterError::io(&staging))?;
    let result = fill(&staging).and_then(|()| {
        if out_exists {
            std::fs::remove_dir(out).map_err(AdapterError::io(out))?;
        }
        std::fs::rename(&staging, out).map_err(AdapterError::io(out))
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

fn staging_dir(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    out.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}
