//! Base weights held once in memory, keyed by Hugging Face names: f32 candle tensors, plus, for
//! GGUF files loaded with their quantization kept, the quantized projection weights.
//!
//! Loaded from a safetensors file, a sharded safetensors directory (with its index) or a GGUF
//! file (see `gguf`); every model reads its parameters from here and shares them across requests.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};

use super::error::{EngineError, Result};

/// Named f32 tensors and quantized weights on one device.
#[derive(Debug, Clone)]
pub struct WeightStore {
    tensors: HashMap<String, Tensor>,
    quantized: HashMap<String, Arc<QTensor>>,
    device: Device,
    /// Whether the model is built for serving only (see [`Self::set_serving`]).
    serving: bool,
}

impl WeightStore {
    pub fn new(tensors: HashMap<String, Tensor>, device: Device) -> Self {
        Self {
            tensors,
            quantized: HashMap::new(),
            device,
            serving: false,
        }
    }

    /// Builds the model from this store for serving only: linear layers keep an f32 host weight
    /// only as column panels, packed at load (see `panels`), without the row-major copy that
    /// tensor ops and gradients need. Quantized, bf16 and device weights are kept as they are.
    pub fn set_serving(&mut self) {
        self.serving = true;
    }

    /// Whether [`Self::set_serving`] was called.
    pub fn serving(&self) -> bool {
        self.serving
    }

    /// Adds a quantized weight; linear layers prefer it to an f32 tensor of the same name.
    pub fn insert_quantized(&mut self, name: impl Into<String>, tensor: Arc<QTensor>) {
        self.quantized.insert(name.into(), tensor);
    }

    /// The quantized weight `name`, checked to have `shape`, if the store keeps one.
    pub fn get_quantized(&self, name: &str, shape: &[usize]) -> Result<Option<Arc<QTensor>>> {
        let Some(q) = self.quantized.get(name) else {
            return Ok(None);
        };
        if q.shape().dims() != shape {
            return Err(EngineError::WeightShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: q.shape().dims().to_vec(),
            });
        }
        Ok(Some(q.clone()))
    }

    /// Reads `model.safetensors`, or every shard listed in `model.safetensors.index.json`.
    pub fn from_safetensors_dir(dir: &Path, device: &Device) -> Result<Self> {
        let files = safetensors_files(dir)?;
        let mut tensors = HashMap::new();
        for file in &files {
            let loaded = candle_core::safetensors::load(file, &Device::Cpu)
                .map_err(|e| EngineError::format("safetensors", file, e))?;
            for (name, tensor) in loaded {
                if matches!(
                    tensor.dtype(),
                    DType::F32 | DType::F16 | DType::BF16 | DType::F64
                ) {
                    tensors.insert(name, tensor.to_dtype(DType::F32)?.to_device(device)?);
                }
            }
        }
        Ok(Self::new(tensors, device.clone()))
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Converts every tensor (not the quantized weights) to `dtype`.
    pub fn cast(&mut self, dtype: DType) -> Result<()> {
        for t in self.tensors.values_mut() {
            *t = t.to_dtype(dtype)?;
        }
        Ok(())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Every tensor with its name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The tensor `name`, checked to have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.get_any(name)?;
        if t.dims() != shape {
            return Err(EngineError::WeightShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: t.dims().to_vec(),
            });
        }
        Ok(t)
    }

    /// The tensor `name` whatever its shape.
    pub fn get_any(&self, name: &str) -> Result<Tensor> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| EngineError::MissingWeight {
                name: name.to_string(),
            })
    }

    /// Adds or replaces a tensor (used for heads that come with an adapter).
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) {
        self.tensors.insert(name.into(), tensor);
    }
}

/// The safetensors files of a Hugging Face model directory.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(EngineError::ModelNotFound {
            spec: dir.display().to_string(),
            message: "no model.safetensors or model.safetensors.index.json".into(),
        });
    }
    let text = std::fs::read_to_string(&index).map_err(|e| EngineError::io(&index, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| EngineError::format("index", &index, e))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| EngineError::format("index", &index, "no weight_map object"))?;
    let mut files: Vec<PathBuf> = map
        .values()
        .filter_map(|v| v.as_str())
        // Shard names are plain file names next to the index, never paths.
        .filter(|f| Path::new(f).file_name().is_some_and(|n| n == *f))
        .map(|f| dir.join(f))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// How a model's base projection weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// As the file stores them: a GGUF model keeps its quantized blocks for the projections
    /// (candle's quantized matmul); safetensors weights are f32.
    #[default]
    Native,
    /// Every weight dequantized to f32 (what the reference-parity tests use).
    F32,
    /// Every weight in bfloat16, activations, deltas and the KV cache too (generation models;
    /// meant for GPUs, where the matmuls run at bf16 rates; logits come out in f32).
    Bf16,
}

impl std::str::FromStr for WeightFormat {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "native" | "auto" => Ok(Self::Native),
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            other => Err(EngineError::InvalidParam {
                name: "dtype",
                message: format!("{other:?} is not a weight format (native, f32 or bf16)"),
            }),
        }
    }
}

/// Bytes a tensor's values occupy.
pub fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}
