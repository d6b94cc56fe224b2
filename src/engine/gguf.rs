//! GGUF files (llama.cpp): metadata to a [`LlamaConfig`], tensors renamed to the Hugging Face
//! layout, and the tokenizer arrays.
//!
//! With [`WeightFormat::Native`] the projection weights keep their quantized blocks (types without
//! a fast kernel on the device are re-quantized to Q8_0, whose error is below the source's; on
//! CPUs with the packed kernels of `qmatmul` that includes Q4_1); norms are dequantized to f32,
//! and so is the embedding table unless it is tied to the output head and that head is packed:
//! the head's blocks then serve the lookups too. With [`WeightFormat::F32`] everything is f32.
//!
//! llama.cpp's converter permutes the rows of `q_proj` and `k_proj` for its rotary layout; this
//! undoes it so adapters trained on the Hugging Face layout apply unchanged: within each head,
//! GGUF row `2·i + j` holds Hugging Face row `j·(head_dim/2) + i`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};

use super::error::{EngineError, Result};
use super::llama::LlamaConfig;
use super::qmatmul;
use super::weights::{WeightFormat, WeightStore};

/// A GGUF file's header, with the path it came from.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| EngineError::io(path, e))?;
        let content = Content::read(&mut BufReader::new(file))
            .map_err(|e| EngineError::format("GGUF", path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn bad(&self, message: impl ToString) -> EngineError {
        EngineError::format("GGUF metadata", &self.path, message)
    }

    pub fn meta_u32(&self, key: &str) -> Result<Option<u32>> {
        self.meta(key)
            .map(|v| v.to_u32().or_else(|_| v.to_i32().map(|x| x as u32)))
            .transpose()
            .map_err(|e| self.bad(format!("{key}: {e}")))
    }

    fn need_u32(&self, key: &str) -> Result<usize> {
        self.meta_u32(key)?
            .map(|v| v as usize)
            .ok_or_else(|| self.bad(format!("{key} is missing")))
    }

    fn meta_f32(&self, key: &str) -> Result<Option<f32>> {
        self.meta(key)
            .map(Value::to_f32)
            .transpose()
            .map_err(|e| self.bad(format!("{key}: {e}")))
    }

    pub fn meta_bool(&self, key: &str) -> Option<bool> {
        self.meta(key).and_then(|v| v.to_bool().ok())
    }

    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.meta(key)
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
    }

    /// A metadata array of strings.
    pub fn meta_strings(&self, key: &str) -> Result<Vec<String>> {
        let arr = self
            .meta(key)
            .ok_or_else(|| self.bad(format!("{key} is missing")))?;
        let arr = arr.to_vec().map_err(|e| self.bad(format!("{key}: {e}")))?;
        arr.iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|e| self.bad(format!("{key}: {e}")))
            })
            .collect()
    }

    /// A metadata array of integers (empty when absent).
    pub fn meta_ints(&self, key: &str) -> Result<Vec<i64>> {
        let Some(arr) = self.meta(key) else {
            return Ok(Vec::new());
        };
        let arr = arr.to_vec().map_err(|e| self.bad(format!("{key}: {e}")))?;
        arr.iter()
            .map(|v| {
                v.to_i32()
                    .map(i64::from)
                    .or_else(|_| v.to_u32().map(i64::from))
                    .map_err(|e| self.bad(format!("{key}: {e}")))
            })
            .collect()
    }

    /// The model configuration, from `llama.*` metadata.
    pub fn llama_config(&self) -> Result<LlamaConfig> {
        let arch = self.meta_str("general.architecture").unwrap_or("llama");
        if arch != "llama" {
            return Err(EngineError::Unsupported {
                message: format!("GGUF architecture {arch:?} (only llama is supported)"),
            });
        }
        let hidden = self.need_u32("llama.embedding_length")?;
        let heads = self.need_u32("llama.attention.head_count")?;
        let vocab = match self.content.tensor_infos.get("token_embd.weight") {
            Some(info) => info.shape.dims()[0],
            None => {
                return Err(EngineError::MissingWeight {
                    name: "token_embd.weight".into(),
                });
            }
        };
        Ok(LlamaConfig {
            hidden_size: hidden,
            intermediate_size: self.need_u32("llama.feed_forward_length")?,
            num_hidden_layers: self.need_u32("llama.block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: Some(
                self.meta_u32("llama.attention.head_count_kv")?
                    .map_or(heads, |v| v as usize),
            ),
            head_dim: self
                .meta_u32("llama.attention.key_length")?
                .map(|v| v as usize),
            rms_norm_eps: f64::from(
                self.meta_f32("llama.attention.layer_norm_rms_epsilon")?
                    .unwrap_or(1e-5),
            ),
            rope_theta: Some(f64::from(
                self.meta_f32("llama.rope.freq_base")?.unwrap_or(10_000.0),
            )),
            rope_parameters: None,
            max_position_embeddings: self
                .meta_u32("llama.context_length")?
                .map_or(2048, |v| v as usize),
            vocab_size: vocab,
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            attention_bias: false,
            mlp_bias: false,
        })
    }

    /// Every tensor the model uses, un-permuted and under its Hugging Face name: projections
    /// quantized or f32 as `format` says, everything else f32.
    pub fn load_weights(
        &self,
        cfg: &LlamaConfig,
        device: &Device,
        format: WeightFormat,
    ) -> Result<WeightStore> {
        let file = File::open(&self.path).map_err(|e| EngineError::io(&self.path, e))?;
        let mut reader = BufReader::new(file);
        let mut store = WeightStore::new(HashMap::new(), device.clone());
        let tied = !self.content.tensor_infos.contains_key("output.weight");
        for name in self.content.tensor_infos.keys() {
            let Some(hf) = hf_name(name) else { continue };
            let q = self
                .content
                .tensor(&mut reader, name, &Device::Cpu)
                .map_err(|e| {
                    EngineError::format("GGUF tensor", &self.path, format!("{name}: {e}"))
                })?;
            let heads = if name.ends_with("attn_q.weight") {
                Some(cfg.num_attention_heads)
            } else if name.ends_with("attn_k.weight") {
                Some(cfg.kv_heads())
            } else {
                None
            };
            let projection = hf.ends_with("_proj.weight") || hf == "lm_head.weight";
            let embedding = hf == "model.embed_tokens.weight";
            if format == WeightFormat::Native
                && (projection || (embedding && tied))
                && let Some(kept) = keep_quantized(&q, heads, device)?
            {
                let as_name = if embedding { "lm_head.weight" } else { &hf };
                // A packed head serves the embedding lookups too (`Llama`'s `Embeddings`).
                let packed = qmatmul::packs_tensor(&kept);
                store.insert_quantized(as_name, Arc::new(kept));
                if projection || packed {
                    continue;
                }
            }
            let mut t = q.dequantize(&Device::Cpu)?;
            if let Some(heads) = heads {
                t = unpermute(&t, heads)?;
            }
            store.insert(hf, t.to_device(device)?);
        }
        Ok(store)
    }
}

/// Quantized types with a fast kernel on `device` (the packed kernels, or candle's quantized
/// matmul); other block types are re-quantized to Q8_0.
fn has_fast_kernel(dtype: GgmlDType, device: &Device) -> bool {
    use GgmlDType as D;
    (device.is_cpu() && qmatmul::available() && qmatmul::packs(dtype))
        || matches!(
            dtype,
            D::Q4_0 | D::Q8_0 | D::Q2K | D::Q3K | D::Q4K | D::Q5K | D::Q6K | D::Q8K
        )
}

/// `q` kept quantized on `device` (rows un-permuted for `heads` when given), or `None` for float
/// types, which are better served as f32.
fn keep_quantized(q: &QTensor, heads: Option<usize>, device: &Device) -> Result<Option<QTensor>> {
    let dtype = q.dtype();
    if matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
        return Ok(None);
    }
    let (rows, cols) = q.shape().dims2()?;
    if !has_fast_kernel(dtype, device) || cols % dtype.block_size() != 0 {
        let mut t = q.dequantize(&Device::Cpu)?;
        if let Some(heads) = heads {
            t = unpermute(&t, heads)?;
        }
        let requantized = QTensor::quantize(&t, GgmlDType::Q8_0)?;
        return Ok(Some(on_device(&requantized, device)?));
    }
    let Some(heads) = heads else {
        return Ok(Some(on_device(q, device)?));
    };
    let data = q.data()?;
    let row_bytes = data.len() / rows;
    let order = unpermuted_rows(rows, heads)?;
    let mut bytes = Vec::with_capacity(data.len());
    for src in order {
        bytes.extend_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
    }
    let storage = QStorage::from_data(Cow::Owned(bytes), device, dtype)?;
    Ok(Some(QTensor::new(storage, (rows, cols))?))
}

/// A CPU quantized tensor moved to `device` (the same tensor on the CPU).
fn on_device(q: &QTensor, device: &Device) -> Result<QTensor> {
    let storage = QStorage::from_data(q.data()?, device, q.dtype())?;
    Ok(QTensor::new(storage, q.shape().clone())?)
}

/// For each Hugging Face row, the GGUF row that holds it (see the module docs).
fn unpermuted_rows(rows: usize, heads: usize) -> Result<Vec<usize>> {
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(EngineError::Unsupported {
            message: format!("cannot un-permute {rows} rows into {heads} heads"),
        });
    }
    let head_dim = rows / heads;
    let half = head_dim / 2;
    Ok((0..rows)
        .map(|r| {
            let (h, within) = (r / head_dim, r % head_dim);
            let (j, i) = (within / half, within % half);
            h * head_dim + 2 * i + j
        })
        .collect())
}

/// llama.cpp tensor names to Hugging Face names (`None` for tensors the model does not use).
fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, param) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{param}"))
}

/// Inverse of llama.cpp's rotary row permutation for a `(heads·head_dim) × in` weight (or a
/// bias vector): `reshape(heads, head_dim/2, 2, in).swapaxes(1, 2).reshape(rows, in)`.
pub fn unpermute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    let cols: usize = dims[1..].iter().product();
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(EngineError::Unsupported {
            message: format!("cannot un-permute {rows} rows into {heads} heads"),
        });
    }
    let half = rows / heads / 2;
    let t = w
        .reshape((heads, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?;
    Ok(t)
}
