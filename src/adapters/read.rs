//! Reading a PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`)
//! into validated f32 factors.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{
    AdapterConfig, AdapterDigest, AdapterError, LoraAdapter, LoraModule, SavedTensor, TaskInfo,
};
use crate::matrix::Matrix;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Optional task description beside an adapter.
pub const TASK_FILE: &str = "knots_task.json";
/// The prefix PEFT puts in front of every module path it saves.
pub const PEFT_PREFIX: &str = "base_model.model.";

pub(super) fn load(dir: &Path, name: String) -> Result<LoraAdapter, AdapterError> {
    let config_path = dir.join(CONFIG_FILE);
    let config_bytes = std::fs::read(&config_path).map_err(AdapterError::io(&config_path))?;
    let config = parse_config(&config_path, &config_bytes)?;

    let weights_path = dir.join(WEIGHTS_FILE);
    let weights_bytes = std::fs::read(&weights_path).map_err(AdapterError::io(&weights_path))?;
    let tensors = read_tensors(&weights_path, &weights_bytes)?;
    let (modules, saved_modules) = sort_tensors(&weights_path, &config, tensors)?;

    let task = read_task(&dir.join(TASK_FILE))?;
    let mut hasher = Sha256::new();
    for bytes in [&config_bytes, &weights_bytes] {
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    Ok(LoraAdapter {
        name,
        path: dir.to_path_buf(),
        config,
        modules,
        saved_modules,
        task,
        digest: AdapterDigest(hasher.finalize().into()),
    })
}

fn read_task(path: &Path) -> Result<Option<TaskInfo>, AdapterError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| AdapterError::Json {
                    path: path.to_path_buf(),
                    source,
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(AdapterError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn parse_config(path: &Path, bytes: &[u8]) -> Result<AdapterConfig, AdapterError> {
    let json_err = |source| AdapterError::Json {
        path: path.to_path_buf(),
        source,
    };
    let value: Value = serde_json::from_slice(bytes).map_err(json_err)?;
    let peft_type = value
        .get("peft_type")
        .and_then(Value::as_str)
        .unwrap_or("<missing>");
    if !peft_type.eq_ignore_ascii_case("LORA") {
        let option = format!("peft_type {peft_type:?} (only LORA is supported)");
        return Err(AdapterError::Unsupported {
            path: path.to_path_buf(),
            option,
        });
    }
    let config: AdapterConfig = serde_json::from_value(value).map_err(json_err)?;
    if let Some(option) = config.unsupported_option() {
        return Err(AdapterError::Unsupported {
            path: path.to_path_buf(),
            option,
        });
    }
    if config.r == 0 {
        let option = "r = 0".to_string();
        return Err(AdapterError::Unsupported {
            path: path.to_path_buf(),
            option,
        });
    }
    Ok(config)
}

/// One tensor of the file, converted to f32, with its shape.
struct RawTensor {
    key: String,
    shape: Vec<usize>,
    data: Vec<f32>,
}

fn read_tensors(path: &Path, bytes: &[u8]) -> Result<Vec<RawTensor>, AdapterError> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| AdapterError::Safetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut out = Vec::with_capacity(file.len());
    for (key, view) in file.tensors() {
        let data = to_f32(view.dtype(), view.data()).ok_or_else(|| AdapterError::Dtype {
            path: path.to_path_buf(),
            key: key.clone(),
            dtype: format!("{:?}", view.dtype()),
        })?;
        if let Some(index) = data.iter().position(|x| !x.is_finite()) {
            let value = data[index];
            return Err(AdapterError::NonFinite {
                path: path.to_path_buf(),
                key,
                index,
                value,
            });
        }
        out.push(RawTensor {
            key,
            shape: view.shape().to_vec(),
            data,
        });
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    let values = match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    };
    Some(values)
}

/// What a tensor key names once the PEFT prefix is removed.
enum KeyKind {
    Factor { module: String, which: Factor },
    Saved(String),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Factor {
    A,
    B,
}

fn classify_key(key: &str, config: &AdapterConfig) -> Option<KeyKind> {
    let rest = key.strip_prefix(PEFT_PREFIX).unwrap_or(key);
    let parts: Vec<&str> = rest.split('.').collect();
    // `<module>.lora_A.weight`, or `<module>.lora_A.<adapter name>.weight` (older PEFT).
    let factor_at = parts.iter().rposition(|p| *p == "lora_A" || *p == "lora_B");
    if let Some(i) = factor_at
        && i > 0
        && parts.last() == Some(&"weight")
        && (parts.len() == i + 2 || parts.len() == i + 3)
    {
        let which = if parts[i] == "lora_A" {
            Factor::A
        } else {
            Factor::B
        };
        return Some(KeyKind::Factor {
            module: parts[..i].join("."),
            which,
        });
    }
    let saved = config.modules_to_save.as_deref().unwrap_or_default();
    let name = rest.replace(".modules_to_save.default.", ".");
    let module = name.rsplit_once('.').map(|(m, _)| m)?;
    saved
        .iter()
        .any(|s| module == s || module.ends_with(&format!(".{s}")))
        .then_some(KeyKind::Saved(name))
}

type Modules = (BTreeMap<String, LoraModule>, BTreeMap<String, SavedTensor>);

fn sort_tensors(
    path: &Path,
    config: &AdapterConfig,
    tensors: Vec<RawTensor>,
) -> Result<Modules, AdapterError> {
    let mut factors: BTreeMap<String, [Option<RawTensor>; 2]> = BTreeMap::new();
    let mut saved = BTreeMap::new();
    for tensor in tensors {
        match classify_key(&tensor.key, config) {
            Some(KeyKind::Factor { module, which }) => {
                let slot = &mut factors.entry(module).or_default()[which as usize];
                if slot.is_some() {
                    let reason = "names a factor that another key already gave".to_string();
                    return Err(AdapterError::BadTensor {
                        path: path.into(),
                        key: tensor.key,
                        reason,
                    });
                }
                *slot = Some(tensor);
            }
            Some(KeyKind::Saved(name)) => {
                saved.insert(
                    name,
                    SavedTensor {
                        shape: tensor.shape,
                        data: tensor.data,
                    },
                );
            }
            None => {
                return Err(AdapterError::UnexpectedKey {
                    path: path.into(),
                    key: tensor.key,
                });
            }
        }
    }
    if factors.is_empty() {
        return Err(AdapterError::Empty { path: path.into() });
    }
    let mut modules = BTreeMap::new();
    for (module, [a, b]) in factors {
        let lora = build_module(path, config, &module, a, b)?;
        modules.insert(module, lora);
    }
    Ok((modules, saved))
}

fn build_module(
    path: &Path,
    config: &AdapterConfig,
    module: &str,
    a: Option<RawTensor>,
    b: Option<RawTensor>,
) -> Result<LoraModule, AdapterError> {
    let missing = |present, missing| AdapterError::MissingFactor {
        path: path.into(),
        module: module.into(),
        present,
        missing,
    };
    let (a, b) = match (a, b) {
        (Some(a), Some(b)) => (a, b),
        (Some(_), None) => return Err(missing("lora_A", "lora_B")),
        (None, _) => return Err(missing("lora_B", "lora_A")),
    };
    if !config.target_modules.matches(module) {
        return Err(AdapterError::Untargeted {
            path: path.into(),
            module: module.into(),
        });
    }
    let a = into_matrix(path, a)?;
    let b = into_matrix(path, b)?;
    if a.rows() != b.cols() {
        return Err(AdapterError::BadTensor {
            path: path.into(),
            key: format!("{module}.lora_B.weight"),
            reason: format!("shape {:?} does not fit lora_A {:?}", b.shape(), a.shape()),
        });
    }
    let expected = config.rank_for(module);
    if a.rows() != expected {
        let found = a.rows();
        return Err(AdapterError::RankMismatch {
            path: path.into(),
            module: module.into(),
            expected,
            found,
        });
    }
    // The update is applied in f32: its scale, and lora_B times it, must be finite there.
    let scale = config.scale_for(module);
    let largest = b.as_slice().iter().fold(0f32, |m, x| m.max(x.abs()));
    if !(scale as f32).is_finite() || f64::from(largest) * scale.abs() > f64::from(f32::MAX) {
        return Err(AdapterError::BadTensor {
            path: path.into(),
            key: format!("{module}.lora_B.weight"),
            reason: format!("scaled by lora_alpha / r = {scale:e}, it overflows f32"),
        });
    }
    Ok(LoraModule { a, b, scale })
}

fn into_matrix(path: &Path, t: RawTensor) -> Result<Matrix, AdapterError> {
    match t.shape[..] {
        [rows, cols] if rows > 0 && cols > 0 => Ok(Matrix::from_vec(rows, cols, t.data).map_err(
            |e| AdapterError::BadTensor {
                path: path.into(),
                key: t.key.clone(),
                reason: e.to_string(),
            },
        )?),
        _ => Err(AdapterError::BadTensor {
            path: path.into(),
            key: t.key,
            reason: format!("shape {:?} is not a non-empty matrix", t.shape),
        }),
    }
}
