//! Llama-layout decoder (SmolLM2, TinyLlama, Llama-2/3 style configs): RMSNorm, rotary
//! attention with grouped KV heads, SwiGLU MLP, optional tied embeddings, and a KV cache.
//!
//! Every projection is a [`LoraLinear`], so a request's delta reaches all of them through the
//! one code path; the model itself is immutable and shared by concurrent requests.
//!
//! Two forwards share the blocks: [`Llama::forward`] runs one sequence with a tensor KV cache and
//! ops that have gradients when the delta is trainable (training, evaluation, reference checks);
//! [`Llama::step`] is the serving engine's batched forward over many sequences, each with its own
//! delta and paged cache (see `kv`).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::error::{EngineError, Result};
use super::host;
use super::kv::{KvPool, KvPrecision, KvShape, SeqCache};
use super::linear::{Deltas, LinearRegistry, LoadedDelta, LoraLinear, needs_gradients, row_groups};
use super::ops;
use super::paged::{Heads, PagedStep};
use super::panels::PanelMatrix;
use super::qmatmul::PackedMatrix;
use super::rope::{Rope, RopeScaling, RowAngles, causal_mask, rope_rows};
use super::weights::{WeightStore, tensor_bytes};

mod host_step;

fn default_eps() -> f64 {
    1e-6
}

fn default_context() -> usize {
    2048
}

/// The fields of a Hugging Face Llama `config.json` the model uses.
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// transformers ≥ 5 nests `rope_theta` and the scaling here; older configs use
    /// `rope_scaling`.
    #[serde(default, alias = "rope_scaling")]
    pub rope_parameters: Option<RopeScaling>,
    #[serde(default = "default_context")]
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
}

impl LlamaConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    pub fn rope_theta(&self) -> f64 {
        let nested = self.rope_parameters.as_ref().and_then(|p| p.rope_theta);
        self.rope_theta.or(nested).unwrap_or(10_000.0)
    }

    fn validate(&self) -> Result<()> {
        let (h, kv) = (self.num_attention_heads, self.kv_heads());
        if h == 0 || kv == 0 || h % kv != 0 || !self.head_dim().is_multiple_of(2) {
            return Err(EngineError::Unsupported {
                message: format!(
                    "{h} attention heads, {kv} KV heads, head_dim {}",
                    self.head_dim()
                ),
            });
        }
        Ok(())
    }
}

/// Keys and values of the positions seen so far, one entry per layer.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[derive(Debug)]
struct Attention {
    q: LoraLinear,
    k: LoraLinear,
    v: LoraLinear,
    o: LoraLinear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        ctx: &mut Step<'_>,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let split = |y: Tensor, heads: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = ctx.rope.apply(
            &split(self.q.forward(x, ctx.delta)?, self.heads)?,
            ctx.offset,
            ctx.grad,
        )?;
        let k = ctx.rope.apply(
            &split(self.k.forward(x, ctx.delta)?, self.kv_heads)?,
            ctx.offset,
            ctx.grad,
        )?;
        let v = split(self.v.forward(x, ctx.delta)?, self.kv_heads)?;
        let (k, v) = match cache.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        *cache = Some((k.clone(), v.clone()));
        // Grouped heads: query head j uses KV head j / n_rep, so fold the n_rep query heads of a
        // group into the sequence axis instead of copying K and V n_rep times.
        let n_rep = self.heads / self.kv_heads;
        let total = k.dim(2)?;
        let q = q.reshape((b, self.kv_heads, n_rep * t, self.head_dim))?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mut scores = (q.matmul(&k.t()?)? * scale)?;
        if t > 1 {
            let mask = ctx.mask(t)?.to_dtype(scores.dtype())?;
            scores = scores
                .reshape((b, self.kv_heads, n_rep, t, total))?
                .broadcast_add(&mask)?
                .reshape((b, self.kv_heads, n_rep * t, total))?;
        }
        let probs = ops::softmax_last(&scores, ctx.grad)?;
        let out = probs
            .matmul(&v)?
            .reshape((b, self.heads, t, self.head_dim))?
            .transpose(1, 2)?
            .reshape((b, t, self.heads * self.head_dim))?;
        self.o.forward(&out, ctx.delta)
    }
}

/// What every layer of a batched step shares.
struct BatchCtx<'a> {
    deltas: Deltas<'a>,
    angles: RowAngles,
    eps: f32,
    device: &'a Device,
    /// The step's plan when its caches are device tensors.
    paged: Option<PagedStep>,
}

impl Attention {
    /// Batched attention over device caches (see [`PagedStep`]): `x: (rows, hidden)` holds the
    /// new tokens of the step's sequences in order; their keys and values are written to each
    /// sequence's cache in `layer`, then each row attends to its own sequence. Host caches take
    /// `host_step` instead.
    fn step(&self, x: &Tensor, layer: usize, ctx: &BatchCtx<'_>) -> Result<Tensor> {
        let [q, k, v]: [Tensor; 3] =
            LoraLinear::forward_rows_shared(&[&self.q, &self.k, &self.v], x, ctx.deltas)?
                .try_into()
                .map_err(|_| EngineError::EmptyInput { what: "q, k, v" })?;
        let q = rope_rows(&q, self.heads, &ctx.angles)?;
        let k = rope_rows(&k, self.kv_heads, &ctx.angles)?;
        let paged = ctx.paged.as_ref().ok_or(EngineError::Unsupported {
            message: "a tensor step over host caches (see `host_step`)".into(),
        })?;
        let out = paged.attend(layer, self.heads(), &q, &k, &v)?;
        self.o.forward_rows(&out, ctx.deltas)
    }
}

impl Attention {
    fn heads(&self) -> Heads {
        Heads {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        }
    }
}

#[derive(Debug)]
struct Block {
    input_norm: Tensor,
    attn: Attention,
    post_norm: Tensor,
    gate: LoraLinear,
    up: LoraLinear,
    down: LoraLinear,
}

impl Block {
    fn forward(
        &self,
        x: &Tensor,
        ctx: &mut Step<'_>,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let h = ops::rms_norm(x, &self.input_norm, ctx.eps, ctx.grad)?;
        let x = (x + self.attn.forward(&h, ctx, cache)?)?;
        let h = ops::rms_norm(&x, &self.post_norm, ctx.eps, ctx.grad)?;
        let gated =
            (self.gate.forward(&h, ctx.delta)?.silu()? * self.up.forward(&h, ctx.delta)?)?;
        Ok((x + self.down.forward(&gated, ctx.delta)?)?)
    }
}

impl Block {
    /// One layer of a batched step over device caches (host caches: `host_step`).
    fn step(&self, x: &Tensor, layer: usize, ctx: &BatchCtx<'_>) -> Result<Tensor> {
        let h = ops::rms_norm(x, &self.input_norm, ctx.eps, false)?;
        let x = (x + self.attn.step(&h, layer, ctx)?)?;
        let h = ops::rms_norm(&x, &self.post_norm, ctx.eps, false)?;
        let [gate, up]: [Tensor; 2] =
            LoraLinear::forward_rows_shared(&[&self.gate, &self.up], &h, ctx.deltas)?
                .try_into()
                .map_err(|_| EngineError::EmptyInput { what: "gate, up" })?;
        let gated = match host::with_slices(&[&gate, &up], |s| host::silu_mul(s[0], s[1])) {
            Some(g) => Tensor::from_vec(g, gate.dims(), ctx.device)?,
            None => (gate.silu()? * up)?,
        };
        Ok((x + self.down.forward_rows(&gated, ctx.deltas)?)?)
    }
}

/// One sequence's part of a batched [`Llama::step`].
pub struct StepSeq<'a> {
    /// The sequence's cache; the new tokens take positions `cache.len()..`, and the blocks for
    /// them must already be there (`KvPool::grow`).
    pub cache: &'a mut SeqCache,
    /// New tokens: a prompt chunk or the last sampled token.
    pub tokens: &'a [u32],
    pub delta: Option<&'a LoadedDelta>,
    /// Whether the step returns logits for this sequence's last new token.
    pub logits: bool,
}

/// Per-forward state shared by the layers.
struct Step<'a> {
    delta: Option<&'a LoadedDelta>,
    rope: &'a Rope,
    offset: usize,
    eps: f32,
    /// Use ops with gradients (the delta is trainable).
    grad: bool,
    mask: Option<Tensor>,
    device: &'a Device,
}

impl Step<'_> {
    fn mask(&mut self, t: usize) -> Result<Tensor> {
        if self.mask.is_none() {
            self.mask = Some(causal_mask(t, self.offset, self.device)?);
        }
        self.mask
            .clone()
            .ok_or(EngineError::EmptyInput { what: "mask" })
    }
}

/// The token embedding table: f32 rows, or the packed blocks of the tied output head, whose
/// rows are dequantized as tokens look them up. A GGUF file's quantized table then takes its
/// size in the file once, for both uses, instead of a second copy in f32 (49,152 × 576 floats,
/// 113 MB, for SmolLM2-135M); the rows equal the f32 table's (see [`PackedMatrix::row_into`]).
#[derive(Debug)]
enum Embeddings {
    Dense(Tensor),
    /// The rows of a tied head's packed blocks.
    Packed(Arc<PackedMatrix>),
    /// The rows of a tied head's column panels (an f32 model built for serving).
    Panels(Arc<PanelMatrix>),
}

impl Embeddings {
    /// The rows of `ids`, `(ids.len(), hidden)`.
    fn rows(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            Embeddings::Dense(t) => Ok(t.index_select(&Tensor::new(ids, device)?, 0)?),
            Embeddings::Packed(p) => gather(ids, p.shape(), |r, out| p.row_into(r, out), device),
            Embeddings::Panels(p) => gather(ids, p.shape(), |r, out| p.row_into(r, out), device),
        }
    }

    /// The element type of the hidden states.
    fn dtype(&self) -> DType {
        match self {
            Embeddings::Dense(t) => t.dtype(),
            Embeddings::Packed(_) | Embeddings::Panels(_) => DType::F32,
        }
    }
}

/// The rows of `ids` from a `vocab × hidden` table that writes row `r` with `row_into`.
fn gather(
    ids: &[u32],
    (vocab, hidden): (usize, usize),
    row_into: impl Fn(usize, &mut [f32]),
    device: &Device,
) -> Result<Tensor> {
    let mut values = vec![0f32; ids.len() * hidden];
    for (&id, row) in ids.iter().zip(values.chunks_exact_mut(hidden)) {
        if id as usize >= vocab {
            return Err(EngineError::InvalidParam {
                name: "prompt",
                message: format!("token {id} is past the vocabulary of {vocab}"),
            });
        }
        row_into(id as usize, row);
    }
    Ok(Tensor::from_vec(values, (ids.len(), hidden), device)?)
}

/// A Llama-layout causal language model.
#[derive(Debug)]
pub struct Llama {
    cfg: LlamaConfig,
    embed: Embeddings,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: LoraLinear,
    /// Whether `lm_head` is the f32 table itself (tied, and not kept quantized).
    shares_table: bool,
    rope: Rope,
    registry: LinearRegistry,
    device: Device,
}

impl Llama {
    /// Builds the model from Hugging Face-named weights (`model.layers.N…`).
    pub fn new(cfg: LlamaConfig, mut store: WeightStore) -> Result<Self> {
        cfg.validate()?;
        let device = store.device().clone();
        let (hid, hd) = (cfg.hidden_size, cfg.head_dim());
        // A GGUF file's tied table may be kept only as the head's packed blocks (see `gguf`).
        let table = "model.embed_tokens.weight";
        let dense = match store.contains(table) {
            true => Some(store.get(table, &[cfg.vocab_size, hid])?),
            false => None,
        };
        let head_is_table = cfg.tie_word_embeddings || !store.contains("lm_head.weight");
        let shares_table = dense.is_some()
            && head_is_table
            && store
                .get_quantized("lm_head.weight", &[cfg.vocab_size, hid])?
                .is_none();
        if let Some(embed) = &dense
            && head_is_table
        {
            store.insert("lm_head.weight", embed.clone());
        }
        let mut reg = LinearRegistry::default();
        reg.set_dtype(dense.as_ref().map_or(DType::F32, Tensor::dtype));
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let (ab, mb) = (cfg.attention_bias, cfg.mlp_bias);
            let (qo, kvo) = (cfg.num_attention_heads * hd, cfg.kv_heads() * hd);
            let attn = Attention {
                q: reg.linear(&store, &format!("{p}.self_attn.q_proj"), (qo, hid), ab)?,
                k: reg.linear(&store, &format!("{p}.self_attn.k_proj"), (kvo, hid), ab)?,
                v: reg.linear(&store, &format!("{p}.self_attn.v_proj"), (kvo, hid), ab)?,
                o: reg.linear(&store, &format!("{p}.self_attn.o_proj"), (hid, qo), ab)?,
                heads: cfg.num_attention_heads,
                kv_heads: cfg.kv_heads(),
                head_dim: hd,
            };
            let inter = cfg.intermediate_size;
            blocks.push(Block {
                input_norm: store.get(&format!("{p}.input_layernorm.weight"), &[hid])?,
                attn,
                post_norm: store.get(&format!("{p}.post_attention_layernorm.weight"), &[hid])?,
                gate: reg.linear(&store, &format!("{p}.mlp.gate_proj"), (inter, hid), mb)?,
                up: reg.linear(&store, &format!("{p}.mlp.up_proj"), (inter, hid), mb)?,
                down: reg.linear(&store, &format!("{p}.mlp.down_proj"), (hid, inter), mb)?,
            });
        }
        let lm_head = reg.linear(&store, "lm_head", (cfg.vocab_size, hid), false)?;
        // A head kept only as panels (built for serving) that is the table serves the lookups,
        // and the table's own copy goes with the store.
        let embed = match (dense, lm_head.packed(), lm_head.panels_only()) {
            (Some(_), _, Some(p)) if head_is_table => Embeddings::Panels(p.clone()),
            (Some(t), _, _) => Embeddings::Dense(t),
            (None, Some(p), _) if cfg.tie_word_embeddings => Embeddings::Packed(p.clone()),
            (None, _, _) => {
                return Err(EngineError::MissingWeight {
                    name: table.to_string(),
                });
            }
        };
        let rope = Rope::new(
            hd,
            cfg.rope_theta(),
            cfg.rope_parameters.as_ref(),
            cfg.max_position_embeddings,
            &device,
        )?;
        Ok(Self {
            norm: store.get("model.norm.weight", &[hid])?,
            embed,
            blocks,
            lm_head,
            shares_table,
            rope,
            registry: reg,
            device,
            cfg,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The linear layers, for resolving and converting deltas.
    pub fn registry(&self) -> &LinearRegistry {
        &self.registry
    }

    /// Bytes the model's weights hold in memory now: every projection as it is kept (packed,
    /// quantized, only f32 panels when built for serving, or the f32 tensor and the panels once
    /// its first products have packed them), the embedding table (once where the head is the
    /// table or serves it), and the norms.
    pub fn weight_bytes(&self) -> usize {
        let table = match &self.embed {
            Embeddings::Dense(t) if !self.shares_table => tensor_bytes(t),
            _ => 0,
        };
        let blocks: usize = (self.blocks.iter())
            .map(|b| {
                let a = &b.attn;
                [&a.q, &a.k, &a.v, &a.o, &b.gate, &b.up, &b.down]
                    .iter()
                    .map(|l| l.weight_bytes())
                    .sum::<usize>()
                    + tensor_bytes(&b.input_norm)
                    + tensor_bytes(&b.post_norm)
            })
            .sum();
        table + blocks + self.lm_head.weight_bytes() + tensor_bytes(&self.norm)
    }

    /// Maximum number of positions (prompt plus generated tokens).
    pub fn context_length(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    /// Runs `ids` (one sequence) after the cached positions and returns the logits of the last
    /// position, `[vocab]`.
    pub fn forward(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        delta: Option<&LoadedDelta>,
    ) -> Result<Tensor> {
        if ids.is_empty() {
            return Err(EngineError::EmptyInput { what: "token ids" });
        }
        let offset = cache.len;
        if offset + ids.len() > self.context_length() {
            return Err(EngineError::PromptTooLong {
                prompt_tokens: offset + ids.len(),
                context: self.context_length(),
            });
        }
        cache.layers.resize(self.blocks.len(), None);
        let mut x = self.embed.rows(ids, &self.device)?.unsqueeze(0)?;
        let mut step = Step {
            delta,
            rope: &self.rope,
            offset,
            eps: self.cfg.rms_norm_eps as f32,
            grad: needs_gradients(delta),
            mask: None,
            device: &self.device,
        };
        for (block, layer_cache) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            x = block.forward(&x, &mut step, layer_cache)?;
        }
        cache.len += ids.len();
        let last = x.narrow(1, ids.len() - 1, 1)?;
        let h = ops::rms_norm(&last, &self.norm, step.eps, step.grad)?;
        Ok(self
            .lm_head
            .forward(&h, delta)?
            .flatten_all()?
            .to_dtype(DType::F32)?)
    }

    /// Sizes of this model's paged KV cache entries.
    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            layers: self.blocks.len(),
            kv_heads: self.cfg.kv_heads(),
            head_dim: self.cfg.head_dim(),
        }
    }

    /// A paged KV cache pool for [`Llama::step`] within `budget_bytes`: host blocks and per-row
    /// host attention for f32 on the CPU (f16 blocks when the projections are quantized, f32
    /// ones otherwise), device tensors and tensor-op attention otherwise.
    pub fn kv_pool(&self, budget_bytes: usize) -> KvPool {
        if self.device.is_cpu() && self.embed.dtype() == DType::F32 {
            let quantized = self.blocks.iter().any(|b| b.attn.q.is_quantized());
            let precision = if quantized {
                KvPrecision::F16
            } else {
                KvPrecision::F32
            };
            KvPool::host(self.kv_shape(), budget_bytes, precision)
        } else {
            KvPool::on_device(
                self.kv_shape(),
                budget_bytes,
                &self.device,
                self.embed.dtype(),
            )
        }
    }

    /// One batched forward of the serving engine: the new tokens of every sequence (prefill
    /// chunks and decode tokens alike) as rows of one batch. Base projections run once over all
    /// rows; each distinct delta over its own rows. Returns `(k, vocab)` logits for the `k`
    /// sequences that ask for them, in order; every cache advances by its new tokens.
    pub fn step(&self, seqs: &mut [StepSeq<'_>]) -> Result<Tensor> {
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut spans = Vec::with_capacity(seqs.len());
        for s in seqs.iter() {
            let start = s.cache.len();
            let end = start + s.tokens.len();
            if s.tokens.is_empty() {
                return Err(EngineError::EmptyInput { what: "token ids" });
            }
            if end > self.context_length() || end > s.cache.allocated() {
                return Err(EngineError::PromptTooLong {
                    prompt_tokens: end,
                    context: self.context_length().min(s.cache.allocated()),
                });
            }
            spans.push(ids.len()..ids.len() + s.tokens.len());
            ids.extend_from_slice(s.tokens);
            positions.extend((start..end).map(|p| p as u32));
        }
        let rows = ids.len();
        let groups = row_groups(
            seqs.iter().map(|s| s.delta).zip(spans.iter().cloned()),
            rows,
            &self.device,
        )?;
        let caches: Vec<(&SeqCache, std::ops::Range<usize>)> = seqs
            .iter()
            .zip(&spans)
            .map(|(s, span)| (&*s.cache, span.clone()))
            .collect();
        let paged = PagedStep::new(&caches, &self.device, self.embed.dtype())?;
        let ctx = BatchCtx {
            paged,
            deltas: Deltas::Grouped(&groups),
            angles: self
                .rope
                .rows(&Tensor::new(positions.as_slice(), &self.device)?)?,
            eps: self.cfg.rms_norm_eps as f32,
            device: &self.device,
        };
        let mut x = self.embed.rows(&ids, &self.device)?;
        if ctx.paged.is_some() {
            for (layer, block) in self.blocks.iter().enumerate() {
                x = block.step(&x, layer, &ctx)?;
            }
        } else {
            let hidden = x.dim(1)?;
            let mut values = x.flatten_all()?.to_vec1::<f32>()?;
            let mut normed = Vec::new();
            for (layer, block) in self.blocks.iter().enumerate() {
                block.step_host(&mut values, &mut normed, layer, &ctx, seqs)?;
            }
            x = Tensor::from_vec(values, (rows, hidden), &self.device)?;
        }
        for s in seqs.iter_mut() {
            s.cache.advance(s.tokens.len());
        }
        let wanted: Vec<(Option<&LoadedDelta>, usize)> = seqs
            .iter()
            .zip(&spans)
            .filter(|(s, _)| s.logits)
            .map(|(s, span)| (s.delta, span.end - 1))
            .collect();
        if wanted.is_empty() {
            return Ok(Tensor::zeros(
                (0, self.cfg.vocab_size),
                candle_core::DType::F32,
                &self.device,
            )?);
        }
        let last: Vec<u32> = wanted.iter().map(|(_, r)| *r as u32).collect();
        let h = x.index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?;
        let h = ops::rms_norm(&h, &self.norm, ctx.eps, false)?;
        let head_groups = row_groups(
            wanted.iter().enumerate().map(|(i, (d, _))| (*d, i..i + 1)),
            wanted.len(),
            &self.device,
        )?;
        Ok(self
            .lm_head
            .forward_rows(&h, Deltas::Grouped(&head_groups))?
            .to_dtype(DType::F32)?)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};
    use std::sync::Arc;

    use super::*;
    use crate::engine::qmatmul;
    use crate::matrix::Matrix;
    use crate::merge::{MergedDelta, ModuleDelta};
    use candle_core::quantized::{GgmlDType, QTensor};

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 997) as f32 / 498.0 - 1.0) * 0.3)
            .collect()
    }

    /// A two-layer model with grouped heads and random weights.
    fn tiny() -> Llama {
        tiny_as(DType::F32)
    }

    fn tiny_as(dtype: DType) -> Llama {
        let (cfg, tensors) = tiny_parts();
        let mut store = WeightStore::new(tensors, Device::Cpu);
        store.cast(dtype).expect("cast");
        Llama::new(cfg, store).expect("model")
    }

    /// [`tiny`]'s configuration and f32 weights.
    fn tiny_parts() -> (LlamaConfig, HashMap<String, Tensor>) {
        let cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
            "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 40,
            "max_position_embeddings": 64, "tie_word_embeddings": true
        }))
        .expect("config");
        let mut tensors = HashMap::new();
        let mut seed = 0;
        let mut add = |name: String, shape: &[usize]| {
            seed += 1;
            let n = shape.iter().product();
            let t = Tensor::from_vec(values(n, seed), shape, &Device::Cpu).expect("tensor");
            tensors.insert(name, t);
        };
        add("model.embed_tokens.weight".into(), &[40, 32]);
        add("model.norm.weight".into(), &[32]);
        for l in 0..2 {
            let p = format!("model.layers.{l}");
            for (m, shape) in [
                ("self_attn.q_proj", [32, 32]),
                ("self_attn.k_proj", [16, 32]),
                ("self_attn.v_proj", [16, 32]),
                ("self_attn.o_proj", [32, 32]),
                ("mlp.gate_proj", [48, 32]),
                ("mlp.up_proj", [48, 32]),
                ("mlp.down_proj", [32, 48]),
            ] {
                add(format!("{p}.{m}.weight"), &shape);
            }
            add(format!("{p}.input_layernorm.weight"), &[32]);
            add(format!("{p}.post_attention_layernorm.weight"), &[32]);
        }
        (cfg, tensors)
    }

    /// An f32 model's weight bytes are its parameters' (the tied table counted once), and after
    /// its first products also the column panels they packed: one more copy of every
    /// projection and of the head, each padded to whole panels of 32 outputs.
    #[test]
    fn weight_bytes_count_a_tied_table_once_and_the_packed_panels() {
        let layer = 32 * 32 * 2 + 16 * 32 * 2 + 48 * 32 * 3 + 2 * 32;
        let parameters = 40 * 32 + 32 + 2 * layer;
        let (model, delta, budget) = tiny_with_delta();
        assert_eq!(model.weight_bytes(), 4 * parameters);
        run(&model, model.kv_pool(budget), &delta);
        // Outputs padded to panels of 32: q, o 32; k, v 32; gate, up 64; down 32; head 64.
        let panels = 2 * (32 * 32 * 4 + 64 * 32 * 2 + 32 * 48) + 64 * 32;
        assert_eq!(model.weight_bytes(), 4 * (parameters + panels));
    }

    /// An f32 model built for serving keeps only the column panels (the tied table's lookups
    /// served by the head's), gives the logits of the model built for any use to the bit, and
    /// refuses gradients, which need the row-major weights.
    #[test]
    fn a_model_built_for_serving_keeps_only_panels() {
        let (cfg, tensors) = tiny_parts();
        let build = |serving: bool| {
            let mut store = WeightStore::new(tensors.clone(), Device::Cpu);
            if serving {
                store.set_serving();
            }
            let model = Llama::new(cfg.clone(), store).expect("model");
            let delta = (model.registry())
                .load_delta(&delta(), &Device::Cpu)
                .expect("delta");
            (model, delta)
        };
        let ((any, any_delta), (serving, serving_delta)) = (build(false), build(true));
        assert!(matches!(serving.embed, Embeddings::Panels(_)));
        let budget = 8 * any.kv_shape().block_bytes();
        let want = run(&any, any.kv_pool(budget), &any_delta);
        assert_eq!(run(&serving, serving.kv_pool(budget), &serving_delta), want);
        // The panels of the test above, and the norms.
        let panels = 2 * (32 * 32 * 4 + 64 * 32 * 2 + 32 * 48) + 64 * 32;
        assert_eq!(serving.weight_bytes(), 4 * (panels + 32 + 2 * 2 * 32));

        let zeros = |shape| Tensor::zeros(shape, DType::F32, &Device::Cpu).expect("zeros");
        let factors = [(
            "model.layers.0.self_attn.q_proj".to_string(),
            zeros((2, 32)),
            zeros((32, 2)),
        )];
        let trainable = (serving.registry())
            .trainable_delta(&factors, 1.0)
            .expect("trainable delta");
        let refused = serving
            .forward(&[1, 2], &mut KvCache::default(), Some(&trainable))
            .expect_err("gradients need the row-major weights");
        assert!(
            matches!(&refused, EngineError::Unsupported { message } if message.contains("serving")),
            "{refused}"
        );
    }

    /// A tied table kept only as the packed head's blocks (as a GGUF file's on a CPU with the
    /// packed kernels) gives the same logits, to the bit, as the same blocks dequantized into an
    /// f32 table beside the packed head; without a packed kernel the model asks for the table.
    #[test]
    fn a_packed_tied_head_serves_the_embedding_lookups() {
        let (cfg, mut tensors) = tiny_parts();
        let table = tensors.remove("model.embed_tokens.weight").expect("table");
        let q = Arc::new(QTensor::quantize(&table, GgmlDType::Q8_0).expect("quantize"));
        let dequantized = q.dequantize(&Device::Cpu).expect("dequantize");
        let model = |table: Option<&Tensor>| {
            let mut store = WeightStore::new(tensors.clone(), Device::Cpu);
            if let Some(t) = table {
                store.insert("model.embed_tokens.weight", t.clone());
            }
            store.insert_quantized("lm_head.weight", q.clone());
            Llama::new(cfg.clone(), store)
        };
        let without = model(None);
        if !qmatmul::packs_tensor(&q) {
            let err = without.expect_err("no table to look up");
            assert!(matches!(err, EngineError::MissingWeight { .. }), "{err}");
            return;
        }
        let (with, without) = (
            model(Some(&dequantized)).expect("model"),
            without.expect("model"),
        );
        assert!(matches!(with.embed, Embeddings::Dense(_)));
        assert!(matches!(without.embed, Embeddings::Packed(_)));
        let delta = (with.registry())
            .load_delta(&delta(), &Device::Cpu)
            .expect("delta");
        let budget = 8 * with.kv_shape().block_bytes();
        let want = run(&with, with.kv_pool(budget), &delta);
        let got = run(&without, without.kv_pool(budget), &delta);
        assert_eq!(want, got);
        let table = 40 * 32 * 4;
        assert_eq!(with.weight_bytes(), without.weight_bytes() + table);
        let packed_head = without.lm_head.weight_bytes();
        assert!(
            packed_head > 0 && packed_head < table / 3,
            "{packed_head} bytes"
        );
        let past = without
            .embed
            .rows(&[3, 40], &Device::Cpu)
            .expect_err("past the vocabulary");
        assert!(matches!(past, EngineError::InvalidParam { .. }), "{past}");
    }

    /// Logits of three sequences (two adapter sets and the base) over a prefill step and three
    /// decode steps, with the caches of `pool`.
    fn run(model: &Llama, mut pool: KvPool, delta: &LoadedDelta) -> Vec<Vec<f32>> {
        run_in(model, &mut pool, delta)
    }

    /// [`run`] in a pool that outlives it: the caches go back to `pool` at the end.
    fn run_in(model: &Llama, pool: &mut KvPool, delta: &LoadedDelta) -> Vec<Vec<f32>> {
        let prompts: [&[u32]; 3] = [&[1, 5, 9, 2, 7], &[3], &[4, 4, 8]];
        let mut caches: Vec<SeqCache> = (0..3).map(|_| pool.reserve(16).expect("room")).collect();
        let mut out = Vec::new();
        let mut next: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
        for _ in 0..4 {
            let mut seqs = Vec::new();
            for ((cache, tokens), i) in caches.iter_mut().zip(&next).zip(0..) {
                pool.grow(cache, cache.len() + tokens.len()).expect("grow");
                seqs.push(StepSeq {
                    cache,
                    tokens,
                    delta: (i != 2).then_some(delta),
                    logits: true,
                });
            }
            let logits = model.step(&mut seqs).expect("step");
            let logits = logits.to_vec2::<f32>().expect("logits");
            next = logits
                .iter()
                .map(|row| vec![crate::engine::argmax(row)])
                .collect();
            out.extend(logits);
        }
        caches.into_iter().for_each(|c| pool.release(c));
        out
    }

    fn delta() -> Arc<MergedDelta> {
        let modules = BTreeMap::from([(
            "model.layers.1.self_attn.v_proj".to_string(),
            ModuleDelta::LowRank {
                b: Matrix::from_vec(16, 2, values(32, 50)).expect("b"),
                a: Matrix::from_vec(2, 32, values(64, 51)).expect("a"),
            },
        )]);
        Arc::new(MergedDelta { modules })
    }

    /// The tiny f32 model, [`delta`] loaded for it, and a KV budget of eight blocks.
    fn tiny_with_delta() -> (Llama, Arc<LoadedDelta>, usize) {
        let model = tiny();
        let delta = model
            .registry()
            .load_delta(&delta(), &Device::Cpu)
            .expect("delta");
        let budget = 8 * model.kv_shape().block_bytes();
        (model, delta, budget)
    }

    /// A bf16 model (weights, activations, delta and KV cache in bf16) stays close to the f32
    /// one: within 3% of the logits' range on a prefill step of three sequences.
    #[test]
    fn a_bf16_model_follows_the_f32_model() {
        let (full, half) = (tiny(), tiny_as(DType::BF16));
        let budget = 8 * full.kv_shape().block_bytes();
        let d32 = full
            .registry()
            .load_delta(&delta(), &Device::Cpu)
            .expect("delta");
        let d16 = half
            .registry()
            .load_delta(&delta(), &Device::Cpu)
            .expect("delta");
        let want = run(&full, full.kv_pool(budget), &d32);
        let got = run(&half, half.kv_pool(budget), &d16);
        // The prefill step's rows (later steps feed each model's own argmax).
        let (want, got) = (&want[..3], &got[..3]);
        let range = want.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
        for (a, b) in want.iter().flatten().zip(got.iter().flatten()) {
            assert!((a - b).abs() <= 0.03 * range, "{a} vs {b} (range {range})");
        }
    }

    /// An f16 host cache (what a model with quantized projections gets) stays within f16
    /// rounding of the f32 one: within 0.5% of the logits' range on a prefill step of three
    /// sequences.
    #[test]
    fn an_f16_cache_follows_the_f32_cache() {
        let (model, delta, budget) = tiny_with_delta();
        let want = run(&model, model.kv_pool(budget), &delta);
        let half = KvPool::host(model.kv_shape(), budget, KvPrecision::F16);
        let got = run(&model, half, &delta);
        let (want, got) = (&want[..3], &got[..3]);
        let range = want.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
        for (a, b) in want.iter().flatten().zip(got.iter().flatten()) {
            assert!((a - b).abs() <= 0.005 * range, "{a} vs {b} (range {range})");
        }
        assert_ne!(want, got, "the f16 cache rounds");
    }

    /// The device path (tensor KV cache, tensor-op attention) gives what the host path gives.
    #[test]
    fn tensor_cache_attention_matches_the_host_path() {
        let (model, delta, budget) = tiny_with_delta();
        let host = run(&model, model.kv_pool(budget), &delta);
        let pool = KvPool::on_device(model.kv_shape(), budget, &Device::Cpu, DType::F32);
        let tensors = run(&model, pool, &delta);
        for (a, b) in host.iter().flatten().zip(tensors.iter().flatten()) {
            assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{a} vs {b}");
        }
    }

    /// Slab blocks given back hold the last sequence's keys and values; sequences handed them
    /// again (in another order) read only their own positions: the same logits, to the bit.
    #[test]
    fn reused_slab_blocks_give_the_same_results() {
        let (model, delta, budget) = tiny_with_delta();
        let mut pool = KvPool::on_device(model.kv_shape(), budget, &Device::Cpu, DType::F32);
        let first = run_in(&model, &mut pool, &delta);
        let again = run_in(&model, &mut pool, &delta);
        assert_eq!(pool.usage(), 0.0, "every block given back");
        assert_eq!(first, again);
    }
}
