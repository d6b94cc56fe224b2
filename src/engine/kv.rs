//! The serving engine's KV cache and the attention that reads it.
//!
//! Keys and values live in fixed-size blocks of [`BLOCK_POSITIONS`] positions (every layer's keys
//! and values of those positions in one allocation, each KV head's rows of a layer adjacent, so
//! that one head's attention reads a contiguous run per block). Within a run, values are stored
//! position by position and keys dimension by dimension, so that a query's scores against a
//! block's sixteen keys are sixteen lanes of one vector sum, and its weighted values sixteen of
//! its dimensions at a time: no horizontal sums (see [`lanes`]). Host blocks hold f32 or f16
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

use half::f16;
use half::slice::HalfFloatSliceExt;

use candle_core::{DType, Device, Tensor};

use super::error::{EngineError, Result};
use super::host;
use super::prefetch::Lines;

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

/// One query row of an attention call: the sequence it belongs to and its position (the row
/// attends to keys `0..=position`).
#[derive(Debug, Clone, Copy)]
pub struct QueryRow<'a> {
    pub cache: &'a SeqCache,
    pub position: usize,
}

/// Causal attention of `q: rows × (heads·head_dim)` over each row's own cached keys and values in
/// `layer`; the result has the same layout. Grouped KV heads: query head `h` reads KV head
/// `h / (heads / kv_heads)`.
pub fn attend(layer: usize, heads: usize, q: &[f32], rows: &[QueryRow<'_>]) -> Vec<f32> {
    let Some(first) = rows.first() else {
        return Vec::new();
    };
    let shape = first.cache.shape;
    let hd = shape.head_dim;
    let n_rep = (heads / shape.kv_heads.max(1)).max(1);
    let mut out = vec![0f32; rows.len() * heads * hd];
    // One item per (row, KV head) when there are enough of them: the query heads that share a
    // KV head are adjacent in `q` and in the output, and each key and value row is read once for
    // all of them. A few rows (a single decode row) take one item per query head instead, so
    // they still spread over the workers. Either way each head's sums run in the same order.
    let per = if rows.len() * (heads / n_rep) >= 8 {
        n_rep
    } else {
        1
    };
    host::par_chunks(&mut out, per * hd, |i, group_out| {
        let (row, h0) = (&rows[i * per / heads], i * per % heads);
        let kv_head = h0 / n_rep;
        let qs = &q[i * per * hd..(i + 1) * per * hd];
        match &row.cache.blocks {
            Blocks::F32(blocks) => attend_rows(group_out, qs, row, blocks, layer, kv_head),
            Blocks::F16(blocks) => attend_rows(group_out, qs, row, blocks, layer, kv_head),
        }
    });
    out
}

/// The query heads `qs` (adjacent, `head_dim` each, sharing `kv_head`) of one row of [`attend`],
/// whose cache's blocks are `blocks`, into `out`: scaled scores a block of positions at a time, a
/// softmax per head, then the values weighted by it. Each head's sums run in one fixed order,
/// whatever other heads share the call and whichever kernel ([`lanes`]) this CPU runs.
fn attend_rows<T: lanes::Value>(
    out: &mut [f32],
    qs: &[f32],
    row: &QueryRow<'_>,
    blocks_of: &[Box<[T]>],
    layer: usize,
    kv_head: usize,
) {
    let shape = row.cache.shape;
    let hd = shape.head_dim;
    let run = |values: bool, block: usize| {
        let at = shape.run(layer, values, kv_head);
        &blocks_of[block][at..at + BLOCK_POSITIONS * hd]
    };
    let positions = row.position + 1;
    let blocks = positions.div_ceil(BLOCK_POSITIONS);
    let width = blocks * BLOCK_POSITIONS;
    let scale = 1.0 / (hd as f32).sqrt();
    let kernels = lanes::Kernels::detect();
    let mut scores = vec![0f32; qs.len() / hd * width];
    for block in 0..blocks {
        if block + 1 < blocks {
            Lines::of(run(false, block + 1)).fetch_all();
        }
        let keys = run(false, block);
        for (q, s) in qs.chunks_exact(hd).zip(scores.chunks_exact_mut(width)) {
            let at = block * BLOCK_POSITIONS;
            kernels.block_scores(&mut s[at..at + BLOCK_POSITIONS], q, keys, scale);
        }
    }
    let values: Vec<&[T]> = (0..blocks).map(|block| run(true, block)).collect();
    Lines::of(values[0]).fetch_all();
    for (s, o) in scores.chunks_exact_mut(width).zip(out.chunks_exact_mut(hd)) {
        let weights = &mut s[..positions];
        host::softmax(weights);
        kernels.weighted_values(o, weights, &values);
    }
}

/// The two sums of the attention of one head over a sequence's blocks, on sixteen lanes (one
/// block's positions, or sixteen of a head's dimensions), in a portable form and an AVX-512 one
/// that computes the same values: the same products, added in the same order, none fused. The
/// cache's values are f32 or f16 ([`Value`]); either is widened to f32 exactly as it is read.
mod lanes {
    use half::f16;

    use super::BLOCK_POSITIONS;

    /// Lanes: one block's positions.
    const LANES: usize = BLOCK_POSITIONS;

    /// A value type of the cache.
    pub trait Value: Copy {
        /// Whether this is f16 (the AVX-512 kernels widen it with `vcvtph2ps`).
        const HALF: bool;
        fn widen(self) -> f32;
    }

    impl Value for f32 {
        const HALF: bool = false;
        #[inline(always)]
        fn widen(self) -> f32 {
            self
        }
    }

    impl Value for f16 {
        const HALF: bool = true;
        #[inline(always)]
        fn widen(self) -> f32 {
            self.to_f32()
        }
    }

    /// The kernels this CPU runs.
    #[derive(Clone, Copy)]
    pub enum Kernels {
        Portable,
        #[cfg(target_arch = "x86_64")]
        Avx512,
    }

    impl Kernels {
        pub fn detect() -> Self {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Kernels::Avx512;
            }
            Kernels::Portable
        }

        /// `out[j] = scale · (q · key_j)` for a block's positions `j`, `keys` dimension-major
        /// ([`LANES`] values per dimension): four partial sums over the dimensions `d mod 4`,
        /// added pairwise at the end.
        pub fn block_scores<T: Value>(self, out: &mut [f32], q: &[f32], keys: &[T], scale: f32) {
            assert!(out.len() == LANES && keys.len() >= q.len() * LANES);
            match self {
                Kernels::Portable => portable_scores(out, q, keys, scale),
                // SAFETY: the CPU has AVX-512F; the lengths are checked above.
                #[cfg(target_arch = "x86_64")]
                Kernels::Avx512 => unsafe { avx512::block_scores(out, q, keys, scale) },
            }
        }

        /// `out = Σ_j weights[j] · value_j` over the positions `j` of `weights`, block `b`'s
        /// values (position-major, `out.len()` each) in `values[b]`: sixteen outputs at a time,
        /// four partial sums over the positions `j mod 4`, added pairwise at the end.
        pub fn weighted_values<T: Value>(self, out: &mut [f32], weights: &[f32], values: &[&[T]]) {
            let hd = out.len();
            assert!(values.len() * LANES >= weights.len());
            assert!(values.iter().all(|v| v.len() >= LANES * hd));
            match self {
                // SAFETY: the CPU has AVX-512F; every block holds `LANES` rows of `hd` values.
                #[cfg(target_arch = "x86_64")]
                Kernels::Avx512 if hd.is_multiple_of(LANES) => unsafe {
                    avx512::weighted_values(out, weights, values)
                },
                _ => portable_values(out, weights, values),
            }
        }
    }

    fn portable_scores<T: Value>(out: &mut [f32], q: &[f32], keys: &[T], scale: f32) {
        let mut acc = [[0f32; LANES]; 4];
        for (d, (&x, key)) in q.iter().zip(keys.chunks_exact(LANES)).enumerate() {
            for l in 0..LANES {
                acc[d % 4][l] += x * key[l].widen();
            }
        }
        for (l, o) in out.iter_mut().enumerate() {
            *o = ((acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l])) * scale;
        }
    }

    fn portable_values<T: Value>(out: &mut [f32], weights: &[f32], values: &[&[T]]) {
        let hd = out.len();
        for (c, o) in out.chunks_mut(LANES).enumerate() {
            let mut acc = [[0f32; LANES]; 4];
            for (j, &w) in weights.iter().enumerate() {
                let row = &values[j / LANES][(j % LANES) * hd + c * LANES..][..o.len()];
                for (a, x) in acc[j % 4].iter_mut().zip(row) {
                    *a += w * x.widen();
                }
            }
            for (l, o) in o.iter_mut().enumerate() {
                *o = (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]);
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod avx512 {
        use std::arch::x86_64::*;

        use super::{LANES, Value};

        /// Sixteen values from `p` on, widened to f32.
        ///
        /// # Safety
        /// The CPU has AVX-512F; sixteen values from `p` on are readable.
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn load<T: Value>(p: *const T) -> __m512 {
            // SAFETY: the caller's guarantee.
            unsafe {
                if T::HALF {
                    _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
                } else {
                    _mm512_loadu_ps(p.cast())
                }
            }
        }

        /// `acc[k] += x · v`, one product then one sum (none fused).
        #[target_feature(enable = "avx512f")]
        #[inline]
        fn add_product(acc: &mut __m512, x: f32, v: __m512) {
            *acc = _mm512_add_ps(*acc, _mm512_mul_ps(_mm512_set1_ps(x), v));
        }

        /// `(acc[0] + acc[1]) + (acc[2] + acc[3])`.
        #[target_feature(enable = "avx512f")]
        #[inline]
        fn pairwise(acc: &[__m512; 4]) -> __m512 {
            _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]))
        }

        /// See [`super::Kernels::block_scores`].
        ///
        /// # Safety
        /// The CPU has AVX-512F; `out` has [`LANES`] values and `keys` at least `q.len()` rows
        /// of them.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn block_scores<T: Value>(out: &mut [f32], q: &[f32], keys: &[T], scale: f32) {
            let mut acc = [_mm512_setzero_ps(); 4];
            // SAFETY: `d < q.len()`: a row of `keys` (the caller's guarantee).
            let key = |d: usize| unsafe { load(keys.as_ptr().add(d * LANES)) };
            let (quads, rest) = q.as_chunks::<4>();
            for (i, quad) in quads.iter().enumerate() {
                for k in 0..4 {
                    add_product(&mut acc[k], quad[k], key(i * 4 + k));
                }
            }
            for (k, &x) in rest.iter().enumerate() {
                add_product(&mut acc[k], x, key(quads.len() * 4 + k));
            }
            let scores = _mm512_mul_ps(pairwise(&acc), _mm512_set1_ps(scale));
            // SAFETY: `out` has `LANES` values.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), scores) };
        }

        /// See [`super::Kernels::weighted_values`].
        ///
        /// # Safety
        /// The CPU has AVX-512F; `out.len()` is a multiple of [`LANES`], and `values` has a
        /// block of [`LANES`] rows of `out.len()` values for every [`LANES`] weights.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn weighted_values<T: Value>(out: &mut [f32], weights: &[f32], values: &[&[T]]) {
            let hd = out.len();
            for c in (0..hd).step_by(LANES) {
                let mut acc = [_mm512_setzero_ps(); 4];
                for (block, w) in weights.chunks(LANES).enumerate() {
                    let base = values[block].as_ptr();
                    // SAFETY: `slot < LANES` rows of `hd` values, `c + LANES ≤ hd`.
                    let row = |slot: usize| unsafe { load(base.add(slot * hd + c)) };
                    let (quads, rest) = w.as_chunks::<4>();
                    for (i, quad) in quads.iter().enumerate() {
                        for k in 0..4 {
                            add_product(&mut acc[k], quad[k], row(i * 4 + k));
                        }
                    }
                    for (k, &x) in rest.iter().enumerate() {
                        add_product(&mut acc[k], x, row(quads.len() * 4 + k));
                    }
                }
                // SAFETY: `c + LANES ≤ hd = out.len()`.
                unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(c), pairwise(&acc)) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> KvShape {
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

    /// Attention of four rows (six query heads over two KV heads of `hd` values, each row at its
    /// own position over its own sequence of 20) with a cache of `precision`: all four rows
    /// together, then each row alone.
    fn four_rows(precision: KvPrecision, hd: usize) -> (Vec<f32>, Vec<Vec<f32>>) {
        let shape = KvShape {
            layers: 1,
            kv_heads: 2,
            head_dim: hd,
        };
        let heads = 6;
        let mut pool = KvPool::host(shape, 16 * shape.block_bytes(), precision);
        let mut seqs: Vec<SeqCache> = (0..4).map(|_| pool.reserve(20).unwrap()).collect();
        for (s, seq) in seqs.iter_mut().enumerate() {
            pool.grow(seq, 20).unwrap();
            for p in 0..20 {
                let k: Vec<f32> = (0..2 * hd)
                    .map(|i| ((s * 31 + p * 7 + i) as f32 * 0.3).sin())
                    .collect();
                let v: Vec<f32> = (0..2 * hd)
                    .map(|i| ((s * 17 + p * 5 + i) as f32 * 0.2).cos())
                    .collect();
                seq.write(0, p, &k, &v);
            }
            seq.advance(20);
        }
        let rows: Vec<QueryRow<'_>> = seqs
            .iter()
            .enumerate()
            .map(|(s, cache)| QueryRow {
                cache,
                position: 10 + s,
            })
            .collect();
        let q: Vec<f32> = (0..rows.len() * heads * hd)
            .map(|i| (i as f32 * 0.09).cos())
            .collect();
        let together = attend(0, heads, &q, &rows);
        let alone = (rows.iter().enumerate())
            .map(|(r, row)| {
                let part = r * heads * hd..(r + 1) * heads * hd;
                attend(0, heads, &q[part], std::slice::from_ref(row))
            })
            .collect();
        (together, alone)
    }

    /// Grouped heads: with enough rows one item serves every query head of a KV head; each row
    /// still gets exactly what it gets alone (one item per query head), with either precision,
    /// on head sizes that do and do not fill the kernels' lanes.
    #[test]
    fn grouped_head_attention_equals_each_row_alone() {
        for precision in [KvPrecision::F32, KvPrecision::F16] {
            for hd in [4, 16] {
                let (together, alone) = four_rows(precision, hd);
                for (r, alone) in alone.iter().enumerate() {
                    let part = &together[r * alone.len()..(r + 1) * alone.len()];
                    assert_eq!(alone, part, "{precision:?}, head size {hd}, row {r}");
                }
            }
        }
    }

    /// An f16 cache holds twice the blocks of an f32 one in the same budget, and attends within
    /// f16 rounding of it.
    #[test]
    fn an_f16_cache_is_half_the_bytes_and_close_to_f32() {
        let shape = shape();
        let blocks = |precision| {
            let mut pool = KvPool::host(shape, 4 * shape.block_bytes(), precision);
            (0..64)
                .take_while(|_| pool.reserve(BLOCK_POSITIONS).is_some())
                .count()
        };
        assert_eq!(blocks(KvPrecision::F32), 4);
        assert_eq!(blocks(KvPrecision::F16), 8);
        let (exact, _) = four_rows(KvPrecision::F32, 16);
        let (half, _) = four_rows(KvPrecision::F16, 16);
        let worst = (exact.iter().zip(&half))
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst > 0.0 && worst < 5e-3, "largest difference {worst}");
    }

    /// The AVX-512 kernels compute what the portable ones do, to the bit, on a head size that
    /// fills their lanes and on one that does not, over full and partial blocks.
    #[test]
    fn attention_kernels_agree_on_every_path() {
        let kernels = lanes::Kernels::detect();
        for hd in [64, 20] {
            let q: Vec<f32> = (0..hd).map(|i| (i as f32 * 0.37).sin()).collect();
            let keys: Vec<f32> = (0..hd * BLOCK_POSITIONS)
                .map(|i| (i as f32 * 0.11).cos())
                .collect();
            let (mut fast, mut portable) = ([0f32; BLOCK_POSITIONS], [0f32; BLOCK_POSITIONS]);
            kernels.block_scores(&mut fast, &q, &keys, 0.125);
            lanes::Kernels::Portable.block_scores(&mut portable, &q, &keys, 0.125);
            assert_eq!(fast, portable, "scores, head size {hd}");
            let half_keys: Vec<f16> = keys.iter().map(|&x| f16::from_f32(x)).collect();
            kernels.block_scores(&mut fast, &q, &half_keys, 0.125);
            lanes::Kernels::Portable.block_scores(&mut portable, &q, &half_keys, 0.125);
            assert_eq!(fast, portable, "f16 scores, head size {hd}");
            let blocks: Vec<Vec<f32>> = (0..3)
                .map(|b| {
                    (0..hd * BLOCK_POSITIONS)
                        .map(|i| ((b * 1000 + i) as f32 * 0.07).sin())
                        .collect()
                })
                .collect();
            let values: Vec<&[f32]> = blocks.iter().map(Vec::as_slice).collect();
            for positions in [1, 5, 16, 37] {
                let weights: Vec<f32> = (0..positions).map(|j| 1.0 / (j + 2) as f32).collect();
                let (mut fast, mut portable) = (vec![0f32; hd], vec![0f32; hd]);
                kernels.weighted_values(&mut fast, &weights, &values);
                lanes::Kernels::Portable.weighted_values(&mut portable, &weights, &values);
                assert_eq!(
                    fast, portable,
                    "values, head size {hd}, {positions} positions"
                );
                let half: Vec<Vec<f16>> = (blocks.iter())
                    .map(|b| b.iter().map(|&x| f16::from_f32(x)).collect())
                    .collect();
                let half: Vec<&[f16]> = half.iter().map(Vec::as_slice).collect();
                let (mut fast_half, mut portable_half) = (vec![0f32; hd], vec![0f32; hd]);
                kernels.weighted_values(&mut fast_half, &weights, &half);
                lanes::Kernels::Portable.weighted_values(&mut portable_half, &weights, &half);
                assert_eq!(fast_half, portable_half, "f16 values, head size {hd}");
                let want: Vec<f32> = (0..hd)
                    .map(|d| {
                        (0..positions)
                            .map(|j| weights[j] * values[j / 16][(j % 16) * hd + d])
                            .sum()
                    })
                    .collect();
                for (got, want) in fast.iter().zip(&want) {
                    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn attention_matches_a_direct_computation() {
        let mut pool = KvPool::new(shape(), 8 * shape().block_bytes());
        let mut seq = pool.reserve(20).unwrap();
        pool.grow(&mut seq, 20).unwrap();
        let key = |p: usize| [p as f32 * 0.1, 1.0, -0.5, 0.2];
        let value = |p: usize| [1.0, p as f32, 0.0, -(p as f32)];
        for p in 0..20 {
            seq.write(1, p, &key(p), &value(p));
        }
        seq.advance(20);
        let q = [0.3f32, -0.2, 0.5, 1.0];
        let out = attend(
            1,
            1,
            &q,
            &[QueryRow {
                cache: &seq,
                position: 18,
            }],
        );
        let scores: Vec<f32> = (0..=18)
            .map(|p| key(p).iter().zip(&q).map(|(k, q)| k * q).sum::<f32>() / 2.0)
            .collect();
        let max = scores.iter().copied().fold(f32::MIN, f32::max);
        let weights: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f32 = weights.iter().sum();
        for (d, got) in out.iter().enumerate() {
            let want: f32 = (0..=18).map(|p| weights[p] / total * value(p)[d]).sum();
            assert!((got - want).abs() < 1e-5, "dim {d}: {got} vs {want}");
        }
    }
}
