//! The serving engine's KV cache and the attention that reads it.
//!
//! Keys and values live in fixed-size blocks of [`BLOCK_POSITIONS`] positions (every layer's keys
//! and values of those positions in one allocation, each KV head's rows of a layer adjacent, so
//! that one head's attention reads a contiguous run per block). Within a run, values are stored
//! position by position and keys dimension by dimension, so that a query's scores against a
//! block's sixteen keys are sixteen lanes of one vector sum, and its weighted values sixteen of
//! its dimensions at a time: no horizontal sums (see [`attention`]). Host blocks hold f32 or f16
//! values ([`KvPrecision`]): attention over a step's cache is bound by reading it, and f16 halves
//! that.
//!
//! A sequence owns a list of blocks; a [`KvPool`] hands them out under a byte budget, takes them
//! back the moment a sequence ends and reuses them, so the cache never grows by concatenation
//! and a step allocates nothing. A sequence reserves the blocks of its whole possible length
//! (prompt plus `max_tokens`, capped by the context) when it is admitted, so a running sequence
//! can never run out of cache; blocks are handed over as positions are filled.
//!
//! On the CPU the cache is host memory: attention runs here, one task per query row and KV head
//! (per query head when the rows are few), each row reading the keys of its own sequence only.
//! Query rows of any mix of sequences, prefill chunks and decode steps, go through the same
//! code, and each row's result does not depend on the other rows of the batch.
//!
//! On a GPU ([`KvPool::on_device`]) the blocks are rows of one device [`Slab`] per pool instead:
//! per layer, a keys tensor and a values tensor of `(blocks·BLOCK_POSITIONS, kv_heads·head_dim)`,
//! allocated for the whole budget when the first sequence is handed blocks. A sequence holds
//! block numbers; position `p` of it is slab row `block[p / BLOCK_POSITIONS]·BLOCK_POSITIONS +
//! p % BLOCK_POSITIONS`. A step writes every new row's keys and values with one scatter per
//! layer and reads them back with one gather, so the decode rows of all sequences attend in one
//! batched product per layer (`Llama::step`); the pool's budget and reservations work the same
//! way.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;

use super::error::{EngineError, Result};

mod attention;
pub use attention::{QueryRow, attend};

/// Positions per block.
pub const BLOCK_POSITIONS: usize = 16;

/// Sizes of one model's cache entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl KvShape {
    /// Floats of one position's keys (or values) in one layer.
    fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    fn block_values(&self) -> usize {
        self.layers * 2 * BLOCK_POSITIONS * self.kv_dim()
    }

    /// Bytes of one block of f32 values.
    pub fn block_bytes(&self) -> usize {
        self.block_values() * std::mem::size_of::<f32>()
    }

    /// Offset in a block of the run of `(layer, keys or values, KV head)`: [`BLOCK_POSITIONS`]
    /// positions of `head_dim` values. Values are position-major (one position's `head_dim`
    /// values adjacent); keys are dimension-major (one dimension's [`BLOCK_POSITIONS`] values
    /// adjacent), so the scores of a block's positions are sixteen-lane sums over dimensions.
    fn run(&self, layer: usize, values: bool, head: usize) -> usize {
        let run = (layer * 2 + usize::from(values)) * self.kv_heads + head;
        run * BLOCK_POSITIONS * self.head_dim
    }
}

/// How host blocks hold keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvPrecision {
    /// As computed: what an f32 model's own forward attends over, to the bit.
    F32,
    /// Rounded to f16 (half the bytes of f32, as llama.cpp keeps its cache by default): for
    /// quantized weights, whose projections round far more than this. Attention widens each
    /// value to f32 as it reads it, exactly.
    F16,
}

/// Blocks of host memory, of one precision.
#[derive(Debug)]
enum Blocks {
    F32(Vec<Box<[f32]>>),
    F16(Vec<Box<[f16]>>),
}

impl Blocks {
    fn new(precision: KvPrecision, capacity: usize) -> Self {
        match precision {
            KvPrecision::F32 => Blocks::F32(Vec::with_capacity(capacity)),
            KvPrecision::F16 => Blocks::F16(Vec::with_capacity(capacity)),
        }
    }

    fn len(&self) -> usize {
        match self {
            Blocks::F32(b) => b.len(),
            Blocks::F16(b) => b.len(),
        }
    }

    /// Moves the last block of `from` (of the same precision) here, or a new one of `values`
    /// zeros when it has none.
    fn push_from(&mut self, from: &mut Blocks, values: usize) {
        match (self, from) {
            (Blocks::F32(to), Blocks::F32(from)) => {
                to.push(from.pop().unwrap_or_else(|| vec![0.0; values].into()))
            }
            (Blocks::F16(to), Blocks::F16(from)) => {
                to.push(from.pop().unwrap_or_else(|| vec![f16::ZERO; values].into()))
            }
            _ => unreachable!("a pool's blocks share one precision"),
        }
    }

    /// Moves every block of `from` (of the same precision) here, keeping `keep` at most.
    fn take_back(&mut self, from: Blocks, keep: usize) {
        match (self, from) {
            (Blocks::F32(to), Blocks::F32(from)) => {
                to.extend(from);
                to.truncate(keep);
            }
            (Blocks::F16(to), Blocks::F16(from)) => {
                to.extend(from);
                to.truncate(keep);
            }
            _ => unreachable!("a pool's blocks share one precision"),
        }
    }
}

/// A device pool's keys and values: per layer, `(rows, kv_heads·head_dim)` keys and values,
/// `BLOCK_POSITIONS` rows per block.
#[derive(Debug)]
pub struct Slab {
    layers: Vec<(Tensor, Tensor)>,
}

impl Slab {
    fn new(shape: KvShape, blocks: usize, device: &Device, dtype: DType) -> Result<Self> {
        let dims = (blocks * BLOCK_POSITIONS, shape.kv_dim());
        let layers = (0..shape.layers)
            .map(|_| {
                Ok((
                    Tensor::zeros(dims, dtype, device)?,
                    Tensor::zeros(dims, dtype, device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    /// Values per row: `kv_heads·head_dim`.
    pub(crate) fn kv_dim(&self) -> usize {
        self.layers.first().map_or(0, |(k, _)| k.dims()[1])
    }

    fn layer(&self, layer: usize) -> Result<&(Tensor, Tensor)> {
        self.layers.get(layer).ok_or(EngineError::EmptyInput {
            what: "KV cache layer",
        })
    }

    /// Writes keys and values `k`, `v: (n, kv_dim)` to slab rows `rows: (n, kv_dim)` (each row's
    /// slab row repeated across it, u32) of `layer`.
    pub(crate) fn write(&self, layer: usize, rows: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
        let (keys, values) = self.layer(layer)?;
        keys.scatter_set(rows, &k.to_dtype(keys.dtype())?.contiguous()?, 0)?;
        values.scatter_set(rows, &v.to_dtype(values.dtype())?.contiguous()?, 0)?;
        Ok(())
    }

    /// Keys and values of slab rows `rows: (m,)` (u32) of `layer`, `(m, kv_dim)` each.
    pub(crate) fn read(&self, layer: usize, rows: &Tensor) -> Result<(Tensor, Tensor)> {
        let (keys, values) = self.layer(layer)?;
        Ok((keys.index_select(rows, 0)?, values.index_select(rows, 0)?))
    }
}

/// One sequence's cache: its blocks, the positions filled, and the blocks it has reserved.
#[derive(Debug)]
pub struct SeqCache {
    shape: KvShape,
    blocks: Blocks,
    /// A device pool's cache: the pool's slab and this sequence's block numbers in it.
    slab: Option<(Arc<Slab>, Vec<u32>)>,
    len: usize,
    reserved: usize,
}

impl SeqCache {
    /// Positions filled.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the blocks handed over so far can hold.
    pub fn allocated(&self) -> usize {
        match &self.slab {
            Some((_, blocks)) => blocks.len() * BLOCK_POSITIONS,
            None => self.blocks.len() * BLOCK_POSITIONS,
        }
    }

    /// The device slab this cache lives in (see [`KvPool::on_device`]); `None` for host blocks.
    pub fn slab(&self) -> Option<&Arc<Slab>> {
        self.slab.as_ref().map(|(slab, _)| slab)
    }

    /// The slab row of `position` (a device cache whose blocks are there).
    pub(crate) fn slab_row(&self, position: usize) -> u32 {
        let blocks = self.slab.as_ref().map_or(&[][..], |(_, b)| b.as_slice());
        blocks[position / BLOCK_POSITIONS] * BLOCK_POSITIONS as u32
            + (position % BLOCK_POSITIONS) as u32
    }

    /// Positions this sequence may hold in all.
    pub fn capacity(&self) -> usize {
        self.reserved * BLOCK_POSITIONS
    }

    /// Writes the keys and values of `position` in `layer`; the block must be there.
    pub(crate) fn write(&mut self, layer: usize, position: usize, k: &[f32], v: &[f32]) {
        let (block, slot) = (position / BLOCK_POSITIONS, position % BLOCK_POSITIONS);
        let at = Slot {
            shape: self.shape,
            layer,
            slot,
        };
        match &mut self.blocks {
            Blocks::F32(b) => at.write(&mut b[block], k, v, <[f32]>::copy_from_slice),
            Blocks::F16(b) => at.write(&mut b[block], k, v, |to, from| {
                to.convert_from_f32_slice(from)
            }),
        }
    }

    /// Marks `n` more positions as filled (after a forward wrote them in every layer).
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

/// Where one position's keys and values go in a block.
struct Slot {
    shape: KvShape,
    layer: usize,
    slot: usize,
}

impl Slot {
    /// Writes every KV head's keys `k` and values `v`, converted by `cast(to, from)` (a whole
    /// slice at a time: f16 conversion is vectorized).
    fn write<T: Copy + Default>(
        &self,
        data: &mut [T],
        k: &[f32],
        v: &[f32],
        cast: impl Fn(&mut [T], &[f32]),
    ) {
        let (shape, hd) = (self.shape, self.shape.head_dim);
        let mut key = vec![T::default(); hd];
        for (head, (k, v)) in k.chunks_exact(hd).zip(v.chunks_exact(hd)).enumerate() {
            cast(&mut key, k);
            let keys = shape.run(self.layer, false, head) + self.slot;
            for (d, &x) in key.iter().enumerate() {
                data[keys + d * BLOCK_POSITIONS] = x;
            }
            let at = shape.run(self.layer, true, head) + self.slot * hd;
            cast(&mut data[at..at + hd], v);
        }
    }
}

/// Every block of one model's cache, bounded by a byte budget.
#[derive(Debug)]
pub struct KvPool {
    shape: KvShape,
    /// Blocks the budget allows.
    capacity: usize,
    /// Blocks reserved by live sequences.
    reserved: usize,
    /// How host blocks hold keys and values.
    precision: KvPrecision,
    /// Blocks given back, ready for reuse.
    free: Blocks,
    /// Where a device cache lives and its element type; `None` for host blocks.
    tensors: Option<(Device, DType)>,
    /// The device cache, made when the first sequence is handed blocks.
    slab: Option<Arc<Slab>>,
    /// Slab blocks given back, and the next never handed out.
    free_ids: Vec<u32>,
    next_id: u32,
}

impl KvPool {
    /// A pool of host blocks of f32 values.
    pub fn new(shape: KvShape, budget_bytes: usize) -> Self {
        Self::host(shape, budget_bytes, KvPrecision::F32)
    }

    /// A pool of host blocks of `precision` values, as many as `budget_bytes` holds.
    pub fn host(shape: KvShape, budget_bytes: usize, precision: KvPrecision) -> Self {
        let value_bytes = match precision {
            KvPrecision::F32 => std::mem::size_of::<f32>(),
            KvPrecision::F16 => std::mem::size_of::<f16>(),
        };
        Self {
            shape,
            capacity: budget_bytes / (shape.block_values() * value_bytes).max(1),
            reserved: 0,
            precision,
            free: Blocks::new(precision, 0),
            tensors: None,
            slab: None,
            free_ids: Vec::new(),
            next_id: 0,
        }
    }

    /// A pool whose caches are `dtype` tensors on `device` (a GPU; on the CPU it serves tests of
    /// the device path). The budget counts f32 positions, as for host blocks.
    pub fn on_device(shape: KvShape, budget_bytes: usize, device: &Device, dtype: DType) -> Self {
        Self {
            tensors: Some((device.clone(), dtype)),
            ..Self::new(shape, budget_bytes)
        }
    }

    pub fn shape(&self) -> KvShape {
        self.shape
    }

    fn blocks_for(positions: usize) -> usize {
        positions.div_ceil(BLOCK_POSITIONS)
    }

    /// Positions the whole budget holds.
    pub fn positions(&self) -> usize {
        self.capacity * BLOCK_POSITIONS
    }

    /// Whether `positions` could ever fit (in an otherwise empty pool).
    pub fn fits(&self, positions: usize) -> bool {
        Self::blocks_for(positions) <= self.capacity
    }

    /// A cache for a sequence of at most `positions`, or `None` while the pool lacks room.
    pub fn reserve(&mut self, positions: usize) -> Option<SeqCache> {
        let blocks = Self::blocks_for(positions.max(1));
        if self.reserved + blocks > self.capacity {
            return None;
        }
        self.reserved += blocks;
        Some(SeqCache {
            shape: self.shape,
            blocks: Blocks::new(
                self.precision,
                if self.tensors.is_some() { 0 } else { blocks },
            ),
            slab: None,
            len: 0,
            reserved: blocks,
        })
    }

    /// Hands `seq` the blocks it needs to hold `positions` (within its reservation).
    pub fn grow(&mut self, seq: &mut SeqCache, positions: usize) -> Result<()> {
        if positions > seq.capacity() {
            return Err(EngineError::PromptTooLong {
                prompt_tokens: positions,
                context: seq.capacity(),
            });
        }
        if let Some((device, dtype)) = &self.tensors {
            let slab = match &self.slab {
                Some(slab) => slab.clone(),
                None => {
                    let slab = Arc::new(Slab::new(self.shape, self.capacity, device, *dtype)?);
                    self.slab = Some(slab.clone());
                    slab
                }
            };
            let (_, ids) = seq.slab.get_or_insert_with(|| (slab, Vec::new()));
            while ids.len() * BLOCK_POSITIONS < positions {
                // Reservations keep the blocks handed out within the slab's `capacity`.
                let id = self.free_ids.pop().unwrap_or_else(|| {
                    self.next_id += 1;
                    self.next_id - 1
                });
                ids.push(id);
            }
            return Ok(());
        }
        while seq.blocks.len() * BLOCK_POSITIONS < positions {
            seq.blocks
                .push_from(&mut self.free, self.shape.block_values());
        }
        Ok(())
    }

    /// Takes back every block of a finished sequence.
    pub fn release(&mut self, seq: SeqCache) {
        self.reserved = self.reserved.saturating_sub(seq.reserved);
        if let Some((_, ids)) = seq.slab {
            self.free_ids.extend(ids);
        }
        // Keep no more spare blocks than the budget has room for.
        let spare = self.capacity.saturating_sub(self.reserved);
        self.free.take_back(seq.blocks, spare);
    }

    /// Reserved share of the budget, in `0..=1`.
    pub fn usage(&self) -> f64 {
        if self.capacity == 0 {
            return 1.0;
        }
        self.reserved as f64 / self.capacity as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two layers of one KV head of four values.
    pub(super) fn shape() -> KvShape {
        KvShape {
            layers: 2,
            kv_heads: 1,
            head_dim: 4,
        }
    }

    #[test]
    fn reservations_are_bounded_and_released() {
        let mut pool = KvPool::new(shape(), 3 * shape().block_bytes());
        let a = pool.reserve(2 * BLOCK_POSITIONS).unwrap();
        assert!(pool.reserve(2 * BLOCK_POSITIONS).is_none());
        assert!(!pool.fits(4 * BLOCK_POSITIONS));
        assert!((pool.usage() - 2.0 / 3.0).abs() < 1e-9);
        pool.release(a);
        assert_eq!(pool.usage(), 0.0);
        assert!(pool.reserve(3 * BLOCK_POSITIONS).is_some());
    }

    #[test]
    fn growing_past_the_reservation_is_an_error() {
        let mut pool = KvPool::new(shape(), 8 * shape().block_bytes());
        let mut seq = pool.reserve(5).unwrap();
        pool.grow(&mut seq, BLOCK_POSITIONS).unwrap();
        assert!(pool.grow(&mut seq, BLOCK_POSITIONS + 1).is_err());
    }

    /// An f16 pool holds twice the blocks of an f32 one in the same budget.
    #[test]
    fn an_f16_pool_holds_twice_the_blocks() {
        let shape = shape();
        let blocks = |precision| {
            let mut pool = KvPool::host(shape, 4 * shape.block_bytes(), precision);
            (0..64)
                .take_while(|_| pool.reserve(BLOCK_POSITIONS).is_some())
                .count()
        };
        assert_eq!(blocks(KvPrecision::F32), 4);
        assert_eq!(blocks(KvPrecision::F16), 8);
    }
}
