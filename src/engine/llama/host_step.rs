//! The batched step over host KV caches (f32 models on the CPU, the serving default): the
//! hidden state stays one `Vec<f32>` from the embedding to the last norm. Norms, the rotary
//! embedding and the residual adds run in place on it, the projections read and write plain
//! slices ([`LoraLinear::forward_host`]), and keys and values go from the projection's output
//! straight into each sequence's cache, with no tensor built, copied or dispatched per op. The
//! sums are the tensor path's: the same kernels run in the same order, and a residual add is
//! the same single rounding either way.

use super::{Attention, BatchCtx, Block, StepSeq};
use crate::engine::error::{EngineError, Result};
use crate::engine::host;
use crate::engine::kv::{self, QueryRow};
use crate::engine::linear::LoraLinear;
use crate::engine::ops;
use crate::engine::rope::rope_in_place;

/// `[a, b, …]` of a projection group's outputs, or an error naming what was missing.
fn outputs<const N: usize>(ys: Vec<Vec<f32>>, what: &'static str) -> Result<[Vec<f32>; N]> {
    ys.try_into().map_err(|_| EngineError::EmptyInput { what })
}

impl Block {
    /// One layer of the step on `x: (rows, hidden)`, in place; `h` is the step's buffer for the
    /// normalized rows (its contents on entry do not matter).
    pub(super) fn step_host(
        &self,
        x: &mut [f32],
        h: &mut Vec<f32>,
        layer: usize,
        ctx: &BatchCtx<'_>,
        seqs: &mut [StepSeq<'_>],
    ) -> Result<()> {
        let rows = seqs.iter().map(|s| s.tokens.len()).sum();
        ops::rms_norm_rows_to(h, x, &self.input_norm, ctx.eps, ctx.device)?;
        let attended = self.attn.step_host(h, rows, layer, ctx, seqs)?;
        host::add_assign(x, &attended);
        ops::rms_norm_rows_to(h, x, &self.post_norm, ctx.eps, ctx.device)?;
        let [mut gate, up] = outputs(
            LoraLinear::forward_host(&[&self.gate, &self.up], h, rows, ctx.deltas, ctx.device)?,
            "gate, up",
        )?;
        host::silu_mul_in_place(&mut gate, &up);
        let [down] = outputs(
            LoraLinear::forward_host(&[&self.down], &gate, rows, ctx.deltas, ctx.device)?,
            "down",
        )?;
        host::add_assign(x, &down);
        Ok(())
    }
}

impl Attention {
    /// Attention of the step's rows `h: (rows, hidden)` (the new tokens of `seqs`, in order):
    /// their keys and values are written to each sequence's cache in `layer`, then each row
    /// attends to its own sequence; returns the output projection.
    fn step_host(
        &self,
        h: &[f32],
        rows: usize,
        layer: usize,
        ctx: &BatchCtx<'_>,
        seqs: &mut [StepSeq<'_>],
    ) -> Result<Vec<f32>> {
        let [mut q, mut k, v] = outputs(
            LoraLinear::forward_host(
                &[&self.q, &self.k, &self.v],
                h,
                rows,
                ctx.deltas,
                ctx.device,
            )?,
            "q, k, v",
        )?;
        rope_in_place(&mut q, rows, self.heads, &ctx.angles, ctx.device)?;
        rope_in_place(&mut k, rows, self.kv_heads, &ctx.angles, ctx.device)?;
        let kv_dim = self.kv_heads * self.head_dim;
        let mut row = 0;
        for s in seqs.iter_mut() {
            let start = s.cache.len();
            for i in 0..s.tokens.len() {
                let at = row * kv_dim..(row + 1) * kv_dim;
                s.cache
                    .write(layer, start + i, &k[at.clone()], &v[at.clone()]);
                row += 1;
            }
        }
        let queries: Vec<QueryRow<'_>> = seqs
            .iter()
            .flat_map(|s| {
                let start = s.cache.len();
                (0..s.tokens.len()).map(move |i| QueryRow {
                    cache: &*s.cache,
                    position: start + i,
                })
            })
            .collect();
        let attended = kv::attend(layer, self.heads, &q, &queries);
        let [out] = outputs(
            LoraLinear::forward_host(&[&self.o], &attended, rows, ctx.deltas, ctx.device)?,
            "o",
        )?;
        Ok(out)
    }
}
