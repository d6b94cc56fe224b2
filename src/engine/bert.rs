//! BERT encoder (all-MiniLM-L6-v2 and other BERT checkpoints): embeddings, post-norm attention
//! blocks with a padding mask, exact-erf GELU, mean pooling + L2 normalisation as
//! sentence-transformers does, and the `[CLS]` pooler a sequence-classification head reads.

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::error::{EngineError, Result};
use super::host;
use super::linear::{Deltas, LinearRegistry, LoadedDelta, LoraLinear};
use super::ops;
use super::weights::{WeightStore, tensor_bytes};

/// Masked attention logits; large enough to vanish under softmax, finite so no row is NaN.
const MASKED: f64 = -1e9;

fn default_ln_eps() -> f64 {
    1e-12
}

/// The fields of a BERT `config.json` the model uses.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub type_vocab_size: usize,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub hidden_act: Option<String>,
}

#[derive(Debug)]
struct Norm {
    gamma: Tensor,
    beta: Tensor,
}

impl Norm {
    fn load(store: &WeightStore, path: &str, dim: usize) -> Result<Self> {
        Ok(Self {
            gamma: store.get(&format!("{path}.weight"), &[dim])?,
            beta: store.get(&format!("{path}.bias"), &[dim])?,
        })
    }

    fn bytes(&self) -> usize {
        tensor_bytes(&self.gamma) + tensor_bytes(&self.beta)
    }

    fn forward(&self, x: &Tensor, eps: f32, grad: bool) -> Result<Tensor> {
        ops::layer_norm(x, &self.gamma, &self.beta, eps, grad)
    }
}

#[derive(Debug)]
struct Layer {
    query: LoraLinear,
    key: LoraLinear,
    value: LoraLinear,
    attn_out: LoraLinear,
    attn_norm: Norm,
    intermediate: LoraLinear,
    output: LoraLinear,
    out_norm: Norm,
}

/// A BERT encoder.
#[derive(Debug)]
pub struct Bert {
    cfg: BertConfig,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    emb_norm: Norm,
    layers: Vec<Layer>,
    pooler: Option<LoraLinear>,
    registry: LinearRegistry,
    device: Device,
}

/// Padded ids and their attention mask.
#[derive(Debug)]
pub struct Batch {
    pub ids: Tensor,
    /// `(batch, seq)` with 1 for real tokens, 0 for padding (f32).
    pub mask: Tensor,
    /// Real (unpadded) tokens of each text.
    pub lens: Vec<usize>,
}

/// Texts laid end to end, one row per real token and no padding: how inference runs a batch
/// (linear layers and norms work row by row, attention within each text's rows).
#[derive(Debug)]
pub struct Packed {
    /// `(tokens,)`.
    ids: Tensor,
    /// Each token's position in its text, `(tokens,)`.
    positions: Tensor,
    /// `(first row, tokens)` of each text.
    segments: Vec<(usize, usize)>,
}

impl Packed {
    /// Rows of every text together.
    pub fn tokens(&self) -> usize {
        self.segments.iter().map(|s| s.1).sum()
    }

    /// The rows of text `i`.
    pub fn rows(&self, i: usize) -> std::ops::Range<usize> {
        let (start, len) = self.segments[i];
        start..start + len
    }

    /// Texts in the batch.
    pub fn texts(&self) -> usize {
        self.segments.len()
    }
}

/// How the rows of a forward pass are laid out, for attention.
enum Rows<'a> {
    Padded(Padding<'a>),
    Packed(&'a Packed),
}

impl Bert {
    /// Builds the encoder; weight names may or may not carry a `bert.` prefix.
    pub fn new(cfg: BertConfig, store: &WeightStore) -> Result<Self> {
        if !matches!(cfg.hidden_act.as_deref(), None | Some("gelu")) {
            return Err(EngineError::Unsupported {
                message: format!("BERT activation {:?}", cfg.hidden_act),
            });
        }
        let root = if store.contains("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let h = cfg.hidden_size;
        let mut reg = LinearRegistry::default();
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("{root}encoder.layer.{i}");
            let inter = cfg.intermediate_size;
            layers.push(Layer {
                query: reg.linear(store, &format!("{p}.attention.self.query"), (h, h), true)?,
                key: reg.linear(store, &format!("{p}.attention.self.key"), (h, h), true)?,
                value: reg.linear(store, &format!("{p}.attention.self.value"), (h, h), true)?,
                attn_out: reg.linear(
                    store,
                    &format!("{p}.attention.output.dense"),
                    (h, h),
                    true,
                )?,
                attn_norm: Norm::load(store, &format!("{p}.attention.output.LayerNorm"), h)?,
                intermediate: reg.linear(
                    store,
                    &format!("{p}.intermediate.dense"),
                    (inter, h),
                    true,
                )?,
                output: reg.linear(store, &format!("{p}.output.dense"), (h, inter), true)?,
                out_norm: Norm::load(store, &format!("{p}.output.LayerNorm"), h)?,
            });
        }
        let pooler_path = format!("{root}pooler.dense");
        let pooler = if store.contains(&format!("{pooler_path}.weight")) {
            Some(reg.linear(store, &pooler_path, (h, h), true)?)
        } else {
            None
        };
        let e = format!("{root}embeddings");
        Ok(Self {
            word: store.get(&format!("{e}.word_embeddings.weight"), &[cfg.vocab_size, h])?,
            position: store.get(
                &format!("{e}.position_embeddings.weight"),
                &[cfg.max_position_embeddings, h],
            )?,
            token_type: store.get_any(&format!("{e}.token_type_embeddings.weight"))?,
            emb_norm: Norm::load(store, &format!("{e}.LayerNorm"), h)?,
            layers,
            pooler,
            registry: reg,
            device: store.device().clone(),
            cfg,
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn registry(&self) -> &LinearRegistry {
        &self.registry
    }

    /// Bytes the encoder's weights hold in memory now: the embedding tables, every projection
    /// as it is kept (only its panels when built for serving; else the tensor, and the panels
    /// once its first products have packed them) and the norms.
    pub fn weight_bytes(&self) -> usize {
        let tables = [&self.word, &self.position, &self.token_type];
        let layers: usize = (self.layers.iter())
            .map(|l| {
                [
                    &l.query,
                    &l.key,
                    &l.value,
                    &l.attn_out,
                    &l.intermediate,
                    &l.output,
                ]
                .iter()
                .map(|p| p.weight_bytes())
                .sum::<usize>()
                    + l.attn_norm.bytes()
                    + l.out_norm.bytes()
            })
            .sum();
        tables.into_iter().map(tensor_bytes).sum::<usize>()
            + self.emb_norm.bytes()
            + layers
            + self.pooler.as_ref().map_or(0, LoraLinear::weight_bytes)
    }

    /// Pads `seqs` (with id 0) into one batch.
    pub fn batch(&self, seqs: &[Vec<u32>]) -> Result<Batch> {
        let len = seqs.iter().map(Vec::len).max().unwrap_or(0);
        if len == 0 {
            return Err(EngineError::EmptyInput { what: "sequences" });
        }
        if len > self.cfg.max_position_embeddings {
            return Err(EngineError::PromptTooLong {
                prompt_tokens: len,
                context: self.cfg.max_position_embeddings,
            });
        }
        let mut ids = Vec::with_capacity(seqs.len() * len);
        let mut mask = Vec::with_capacity(seqs.len() * len);
        for s in seqs {
            ids.extend(
                s.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, len - s.len())),
            );
            mask.extend((0..len).map(|i| if i < s.len() { 1f32 } else { 0.0 }));
        }
        Ok(Batch {
            ids: Tensor::from_vec(ids, (seqs.len(), len), &self.device)?,
            mask: Tensor::from_vec(mask, (seqs.len(), len), &self.device)?,
            lens: seqs.iter().map(Vec::len).collect(),
        })
    }

    /// Lays `seqs` end to end (see [`Packed`]).
    pub fn pack(&self, seqs: &[Vec<u32>]) -> Result<Packed> {
        if seqs.is_empty() || seqs.iter().any(Vec::is_empty) {
            return Err(EngineError::EmptyInput { what: "sequences" });
        }
        let context = self.cfg.max_position_embeddings;
        if let Some(long) = seqs.iter().find(|s| s.len() > context) {
            return Err(EngineError::PromptTooLong {
                prompt_tokens: long.len(),
                context,
            });
        }
        let mut segments = Vec::with_capacity(seqs.len());
        let mut start = 0;
        for s in seqs {
            segments.push((start, s.len()));
            start += s.len();
        }
        let ids: Vec<u32> = seqs.iter().flatten().copied().collect();
        let positions: Vec<u32> = seqs.iter().flat_map(|s| 0..s.len() as u32).collect();
        Ok(Packed {
            ids: Tensor::from_vec(ids, start, &self.device)?,
            positions: Tensor::from_vec(positions, start, &self.device)?,
            segments,
        })
    }

    /// Last hidden states `(tokens, hidden)` of packed texts, rows taking their deltas from
    /// `deltas` (text `i`'s rows are [`Packed::rows`]). No gradients: training runs padded
    /// batches through [`Bert::hidden`].
    pub fn hidden_packed(&self, packed: &Packed, deltas: Deltas<'_>) -> Result<Tensor> {
        let words = self.word.index_select(&packed.ids, 0)?;
        let pos = self.position.index_select(&packed.positions, 0)?;
        let tt = self.token_type.narrow(0, 0, 1)?;
        let x = words.broadcast_add(&pos)?.broadcast_add(&tt)?;
        let eps = self.cfg.layer_norm_eps as f32;
        let mut x = self.emb_norm.forward(&x, eps, false)?;
        for layer in &self.layers {
            x = self.layer(layer, &x, &Rows::Packed(packed), deltas)?;
        }
        Ok(x)
    }

    /// Sentence embeddings of packed texts: mean over each text's rows, L2-normalised,
    /// `(texts, hidden)`.
    pub fn embed_packed(&self, packed: &Packed, deltas: Deltas<'_>) -> Result<Tensor> {
        mean_pool_packed(&self.hidden_packed(packed, deltas)?, packed)
    }

    /// Last hidden states `(batch, seq, hidden)`.
    pub fn hidden(&self, batch: &Batch, delta: Option<&LoadedDelta>) -> Result<Tensor> {
        self.hidden_with(batch, Deltas::Uniform(delta))
    }

    /// Last hidden states with a delta per row group; a row is one token position, sequence
    /// `i`'s rows being `i·seq..(i + 1)·seq`.
    pub fn hidden_with(&self, batch: &Batch, deltas: Deltas<'_>) -> Result<Tensor> {
        let (b, t) = batch.ids.dims2()?;
        let eps = self.cfg.layer_norm_eps as f32;
        let words = self
            .word
            .index_select(&batch.ids.flatten_all()?, 0)?
            .reshape((b, t, ()))?;
        let pos = self.position.narrow(0, 0, t)?;
        let tt = self.token_type.narrow(0, 0, 1)?;
        let x = words.broadcast_add(&pos)?.broadcast_add(&tt)?;
        let mut x = self.emb_norm.forward(&x, eps, deltas.need_gradients())?;
        // (batch, 1, 1, seq): 0 where attended, MASKED at padding.
        let bias = ((batch.mask.ones_like()? - &batch.mask)? * MASKED)?.reshape((b, 1, 1, t))?;
        let rows = Rows::Padded(Padding {
            bias,
            lens: &batch.lens,
        });
        for layer in &self.layers {
            x = self.layer(layer, &x, &rows, deltas)?;
        }
        Ok(x)
    }

    fn layer(&self, l: &Layer, x: &Tensor, rows: &Rows<'_>, deltas: Deltas<'_>) -> Result<Tensor> {
        let qkv = LoraLinear::forward_shared(&[&l.query, &l.key, &l.value], x, deltas)?;
        let [q, k, v] = <[Tensor; 3]>::try_from(qkv).map_err(|_| EngineError::EmptyInput {
            what: "query, key and value",
        })?;
        let grad = deltas.need_gradients();
        let ctx = match rows {
            Rows::Padded(pad) => self.attention(&q, &k, &v, pad, grad)?,
            Rows::Packed(packed) => self.attention_packed(&q, &k, &v, packed)?,
        };
        let eps = self.cfg.layer_norm_eps as f32;
        let x = l
            .attn_norm
            .forward(&(l.attn_out.forward_with(&ctx, deltas)? + x)?, eps, grad)?;
        let inner = ops::gelu_erf(&l.intermediate.forward_with(&x, deltas)?, grad)?;
        l.out_norm
            .forward(&(l.output.forward_with(&inner, deltas)? + x)?, eps, grad)
    }

    /// Self-attention of `q`, `k`, `v: (texts, width, hidden)` over each text's real tokens: on
    /// the host when the tensors are there and no gradients are needed, else with tensor ops
    /// (padded keys masked by `pad.bias`).
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        pad: &Padding<'_>,
        grad: bool,
    ) -> Result<Tensor> {
        let (b, t, h) = q.dims3()?;
        let heads = self.cfg.num_attention_heads;
        let segments: Vec<(usize, usize)> = (pad.lens.iter().enumerate())
            .map(|(i, &len)| (i * t, len.min(t)))
            .collect();
        if !grad
            && let Some(ctx) = host::with_slices(&[q, k, v], |s| {
                host::attend_segments(s[0], s[1], s[2], h, &segments, heads)
            })
        {
            return Ok(Tensor::from_vec(ctx, (b, t, h), q.device())?);
        }
        self.attention_ops(q, k, v, Some(&pad.bias), grad)
    }

    /// Self-attention of packed `q`, `k`, `v: (tokens, hidden)`, each text over its own rows: on
    /// the host, or text by text with tensor ops (tensors on a GPU).
    fn attention_packed(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        packed: &Packed,
    ) -> Result<Tensor> {
        let (tokens, h) = q.dims2()?;
        let heads = self.cfg.num_attention_heads;
        if let Some(ctx) = host::with_slices(&[q, k, v], |s| {
            host::attend_segments(s[0], s[1], s[2], h, &packed.segments, heads)
        }) {
            return Ok(Tensor::from_vec(ctx, (tokens, h), q.device())?);
        }
        let texts = (0..packed.texts())
            .map(|i| {
                let (start, len) = packed.segments[i];
                let one = |y: &Tensor| y.narrow(0, start, len)?.unsqueeze(0);
                let ctx = self.attention_ops(&one(q)?, &one(k)?, &one(v)?, None, false)?;
                Ok(ctx.squeeze(0)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&texts, 0)?)
    }

    /// Attention of `q`, `k`, `v: (texts, width, hidden)` with tensor ops, padded keys masked by
    /// `bias` (`(texts, 1, 1, width)`) when there is padding.
    fn attention_ops(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: Option<&Tensor>,
        grad: bool,
    ) -> Result<Tensor> {
        let (b, t, h) = q.dims3()?;
        let heads = self.cfg.num_attention_heads;
        let hd = h / heads;
        let split = |y: &Tensor| -> Result<Tensor> {
            Ok(y.reshape((b, t, heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (q, k, v) = (split(q)?, split(k)?, split(v)?);
        let mut scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        if let Some(bias) = bias {
            scores = scores.broadcast_add(bias)?;
        }
        let probs = ops::softmax_last(&scores, grad)?;
        Ok(probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?)
    }

    /// Sentence embeddings: mean over real tokens, L2-normalised, `(batch, hidden)`.
    pub fn embed(&self, batch: &Batch, delta: Option<&LoadedDelta>) -> Result<Tensor> {
        mean_pool(&self.hidden(batch, delta)?, batch)
    }

    /// BERT's pooler output `tanh(dense(h[CLS]))`, `(batch, hidden)`.
    pub fn pooled(&self, batch: &Batch, delta: Option<&LoadedDelta>) -> Result<Tensor> {
        self.pool_cls(&self.hidden(batch, delta)?, delta)
    }

    /// The pooler applied to hidden states from [`Bert::hidden`].
    pub fn pool_cls(&self, hidden: &Tensor, delta: Option<&LoadedDelta>) -> Result<Tensor> {
        self.pool_cls_with(hidden, Deltas::Uniform(delta))
    }

    /// The pooler with a delta per row group (row `i` is sequence `i`'s `[CLS]`).
    pub fn pool_cls_with(&self, hidden: &Tensor, deltas: Deltas<'_>) -> Result<Tensor> {
        self.pool_rows(&hidden.narrow(1, 0, 1)?.squeeze(1)?, deltas)
    }

    /// The pooler over `[CLS]` rows `(texts, hidden)` (see [`cls_rows`]), row `i` taking its
    /// delta from `deltas`.
    pub fn pool_rows(&self, cls: &Tensor, deltas: Deltas<'_>) -> Result<Tensor> {
        let pooler = self
            .pooler
            .as_ref()
            .ok_or_else(|| EngineError::MissingWeight {
                name: "pooler.dense.weight".into(),
            })?;
        Ok(pooler.forward_with(cls, deltas)?.tanh()?)
    }
}

/// What attention needs to know of a batch's padding.
struct Padding<'a> {
    /// `(texts, 1, 1, width)`: 0 where attended, [`MASKED`] at padding.
    bias: Tensor,
    /// Real tokens of each text.
    lens: &'a [usize],
}

/// Mean of `hidden` over the real tokens of `batch`, L2-normalised (sentence-transformers'
/// Pooling(mean) + Normalize).
pub fn mean_pool(hidden: &Tensor, batch: &Batch) -> Result<Tensor> {
    let mask = batch.mask.unsqueeze(2)?;
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
    let counts = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
    l2_normalise(&summed.broadcast_div(&counts)?)
}

/// Mean of each packed text's rows of `hidden: (tokens, hidden)`, L2-normalised,
/// `(texts, hidden)`.
pub fn mean_pool_packed(hidden: &Tensor, packed: &Packed) -> Result<Tensor> {
    let means = (0..packed.texts())
        .map(|i| {
            let (start, len) = packed.segments[i];
            Ok(hidden.narrow(0, start, len)?.mean_keepdim(0)?)
        })
        .collect::<Result<Vec<_>>>()?;
    l2_normalise(&Tensor::cat(&means, 0)?)
}

/// The first row (`[CLS]`) of each packed text of `hidden: (tokens, hidden)`, `(texts, hidden)`.
pub fn cls_rows(hidden: &Tensor, packed: &Packed) -> Result<Tensor> {
    let starts: Vec<u32> = packed.segments.iter().map(|s| s.0 as u32).collect();
    let starts = Tensor::from_vec(starts, packed.texts(), hidden.device())?;
    Ok(hidden.index_select(&starts, 0)?)
}

/// Rows scaled to unit length (rows of zeros stay zero).
pub fn l2_normalise(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    Ok(x.broadcast_div(&norm)?.to_dtype(DType::F32)?)
}
