//! Attention over a device KV cache ([`kv::Slab`]) for a batched step of the serving engine.
//!
//! A [`PagedStep`] is worked out once per step, before the layers: the slab row of every new
//! token (one scatter per layer writes them all), and what each query row reads. Sequences with
//! one new token (decode rows, most of a busy step) attend together: their positions are
//! gathered into a `(sequences, width)` grid padded to the longest one, masked, and go through
//! one batched product per layer, so a step of 64 decoding sequences costs a handful of kernel
//! launches per layer instead of a dozen per sequence. Sequences with several new tokens
//! (prompt chunks) attend one by one with a causal mask. The outputs come back in row order.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::error::Result;
use super::kv::{SeqCache, Slab};
use super::ops;
use super::rope::causal_mask;

/// Head layout of one attention layer.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl Heads {
    /// Query heads per KV head.
    fn n_rep(&self) -> usize {
        self.heads / self.kv_heads
    }

    fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }
}

/// What every layer of a step on a device cache shares.
pub struct PagedStep {
    slab: Arc<Slab>,
    /// `(rows, kv_dim)` u32: each new row's slab row, repeated across the row.
    write: Tensor,
    decode: Option<DecodeRows>,
    chunks: Vec<ChunkRows>,
    /// `(rows,)` u32: where each row's output is in `[decode rows; chunk rows]`, or `None` when
    /// that is already row order.
    order: Option<Tensor>,
}

/// The step's sequences with one new token, attending together.
struct DecodeRows {
    /// `(count,)` u32: their rows in the step, or `None` when they are all its rows.
    rows: Option<Tensor>,
    count: usize,
    /// Positions of the longest of them, its new one included.
    width: usize,
    /// `(count·width,)` u32: slab rows, sequence by sequence (padding reads position 0).
    gather: Tensor,
    /// `(count, 1, 1, width)`: 0 on a sequence's own positions, −∞ on padding.
    mask: Tensor,
}

/// A sequence with several new tokens (a prompt chunk) at rows `rows` of the step.
struct ChunkRows {
    rows: Range<usize>,
    /// `(positions,)` u32: the slab rows of all its positions, the new ones included.
    gather: Tensor,
    /// `(new, positions)` causal mask.
    mask: Tensor,
}

impl PagedStep {
    /// The plan of a step whose sequences (with their new rows `spans`, in order) live in a
    /// device slab, or `None` for host caches. `dtype` is the activations' type.
    pub fn new(
        caches: &[(&SeqCache, Range<usize>)],
        device: &Device,
        dtype: DType,
    ) -> Result<Option<Self>> {
        let Some(slab) = caches.first().and_then(|(c, _)| c.slab()).cloned() else {
            return Ok(None);
        };
        let rows = caches.last().map_or(0, |(_, span)| span.end);
        let mut write = Vec::with_capacity(rows);
        for (cache, span) in caches {
            write.extend((0..span.len()).map(|i| cache.slab_row(cache.len() + i)));
        }
        let write = Tensor::from_vec(write, (rows, 1), device)?
            .broadcast_as((rows, slab.kv_dim()))?
            .contiguous()?;

        let decoding: Vec<&(&SeqCache, Range<usize>)> =
            caches.iter().filter(|(_, span)| span.len() == 1).collect();
        let decode = if decoding.is_empty() {
            None
        } else {
            Some(DecodeRows::new(&decoding, rows, device, dtype)?)
        };
        let mut chunks = Vec::new();
        for (cache, span) in caches.iter().filter(|(_, span)| span.len() > 1) {
            let start = cache.len();
            let gather: Vec<u32> = (0..start + span.len()).map(|p| cache.slab_row(p)).collect();
            chunks.push(ChunkRows {
                rows: span.clone(),
                gather: Tensor::new(gather.as_slice(), device)?,
                mask: causal_mask(span.len(), start, device)?.to_dtype(dtype)?,
            });
        }
        let order = if decode.is_some() && !chunks.is_empty() {
            let mut order = vec![0u32; rows];
            let (mut decoded, mut chunked) = (0u32, decoding.len() as u32);
            for (_, span) in caches {
                for r in span.clone() {
                    let at = if span.len() == 1 {
                        &mut decoded
                    } else {
                        &mut chunked
                    };
                    order[r] = *at;
                    *at += 1;
                }
            }
            Some(Tensor::from_vec(order, rows, device)?)
        } else {
            None
        };
        Ok(Some(Self {
            slab,
            write,
            decode,
            chunks,
            order,
        }))
    }

    /// Writes the step's keys and values `k`, `v: (rows, kv_dim)` to `layer`, then attends with
    /// `q: (rows, heads·head_dim)`; returns `(rows, heads·head_dim)`.
    pub fn attend(
        &self,
        layer: usize,
        heads: Heads,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        self.slab.write(layer, &self.write, k, v)?;
        let mut outs = Vec::with_capacity(1 + self.chunks.len());
        if let Some(decode) = &self.decode {
            outs.push(self.attend_decode(layer, heads, q, decode)?);
        }
        for chunk in &self.chunks {
            outs.push(self.attend_chunk(layer, heads, q, chunk)?);
        }
        let out = if outs.len() == 1 {
            outs.remove(0)
        } else {
            Tensor::cat(&outs, 0)?
        };
        Ok(match &self.order {
            Some(order) => out.index_select(order, 0)?,
            None => out,
        })
    }

    /// One batched product over every decode row: `(count, kv_heads, n_rep, hd)` queries
    /// against `(count, kv_heads, width, hd)` keys.
    fn attend_decode(&self, layer: usize, h: Heads, q: &Tensor, d: &DecodeRows) -> Result<Tensor> {
        let q = match &d.rows {
            Some(rows) => q.index_select(rows, 0)?,
            None => q.clone(),
        };
        let q = q.reshape((d.count, h.kv_heads, h.n_rep(), h.head_dim))?;
        let (keys, values) = self.slab.read(layer, &d.gather)?;
        let by_head = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((d.count, d.width, h.kv_heads, h.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (keys, values) = (by_head(keys)?, by_head(values)?);
        let scores = (q.matmul(&keys.t()?)? * h.scale())?.broadcast_add(&d.mask)?;
        let probs = ops::softmax_last(&scores, false)?;
        Ok(probs
            .matmul(&values)?
            .reshape((d.count, h.heads * h.head_dim))?)
    }

    /// One prompt chunk against its sequence's positions, causally masked (grouped heads folded
    /// into the query axis).
    fn attend_chunk(&self, layer: usize, h: Heads, q: &Tensor, c: &ChunkRows) -> Result<Tensor> {
        let n = c.rows.len();
        let total = c.gather.dim(0)?;
        let (keys, values) = self.slab.read(layer, &c.gather)?;
        let by_head = |t: &Tensor, rows: usize, heads: usize| -> Result<Tensor> {
            Ok(t.reshape((rows, heads, h.head_dim))?
                .transpose(0, 1)?
                .contiguous()?)
        };
        let keys = by_head(&keys, total, h.kv_heads)?;
        let values = by_head(&values, total, h.kv_heads)?;
        let qs = by_head(&q.narrow(0, c.rows.start, n)?, n, h.heads)?.reshape((
            h.kv_heads,
            h.n_rep() * n,
            h.head_dim,
        ))?;
        let scores = (qs.matmul(&keys.t()?)? * h.scale())?
            .reshape((h.kv_heads, h.n_rep(), n, total))?
            .broadcast_add(&c.mask)?
            .reshape((h.kv_heads, h.n_rep() * n, total))?;
        let probs = ops::softmax_last(&scores, false)?;
        Ok(probs
            .matmul(&values)?
            .reshape((h.heads, n, h.head_dim))?
            .transpose(0, 1)?
            .reshape((n, h.heads * h.head_dim))?)
    }
}

impl DecodeRows {
    fn new(
        decoding: &[&(&SeqCache, Range<usize>)],
        rows: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let count = decoding.len();
        let width = decoding.iter().map(|(c, _)| c.len() + 1).max().unwrap_or(1);
        let mut gather = Vec::with_capacity(count * width);
        let mut mask = Vec::with_capacity(count * width);
        for (cache, _) in decoding {
            let own = cache.len() + 1;
            gather.extend((0..width).map(|p| cache.slab_row(if p < own { p } else { 0 })));
            mask.extend((0..width).map(|p| if p < own { 0f32 } else { f32::NEG_INFINITY }));
        }
        let in_order = count == rows;
        let row_ids: Vec<u32> = decoding.iter().map(|(_, s)| s.start as u32).collect();
        Ok(Self {
            rows: if in_order {
                None
            } else {
                Some(Tensor::from_vec(row_ids, count, device)?)
            },
            count,
            width,
            gather: Tensor::from_vec(gather, count * width, device)?,
            mask: Tensor::from_vec(mask, (count, 1, 1, width), device)?.to_dtype(dtype)?,
        })
    }
}
