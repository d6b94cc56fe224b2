//! Quantized matrix products for GGUF base weights on x86 CPUs with AVX-512 VNNI or AVX2.
//!
//! A [`PackedMatrix`] holds an `O × I` weight in blocks of 32 inputs. Every supported GGUF type
//! is the same affine form per block, `w = d·q + m` with unsigned bytes `q`:
//!
//! | GGUF type | `q` | `d` | `m` |
//! |---|---|---|---|
//! | Q4_1 | 4-bit nibble | `d` | `m` |
//! | Q4_0 | 4-bit nibble | `d` | `-8·d` |
//! | Q8_0 | signed byte + 128 | `d` | `-128·d` |
//!
//! so the weights keep their exact values (no re-quantization) and their size in memory: `d` and
//! `m` stay the half floats the file holds, and an offset that is a fixed multiple of `d` (Q4_0,
//! Q8_0) is not stored at all. A decode step streams every weight once per token, so each byte
//! kept here is a byte of memory traffic per token: f32 scales and offsets made Q4_1 20% and Q8_0
//! 18% larger than in the file.
//!
//! Each activation row is quantized per block to signed bytes `x ≈ e·p` (as llama.cpp's Q8
//! activations), and a block contributes `Σ w·x = d·e·Σ q·p + m·e·Σ p`.
//!
//! Weight rows are stored interleaved in groups of sixteen: one 512-bit register holds four
//! consecutive inputs of sixteen rows, one row per 32-bit lane. A block is then eight `vpdpbusd`
//! against four broadcast activation bytes each, summed in integers, and one scaling for all
//! sixteen rows; the sixteen results are sixteen adjacent outputs, stored without any horizontal
//! reduction. Each group's weights are read once per call and multiplied with up to eight
//! activation rows while they sit in registers, so a batched decode step of many sequences costs
//! little more memory traffic than one sequence. The kernel asks for the weights a few kilobytes
//! ahead of the block in hand, which the hardware prefetcher alone does not do early enough.
//!
//! CPUs with AVX2 but not AVX-512 VNNI run the same layout as two halves of eight rows, with
//! `vpmaddubsw` and `vpmaddwd` in place of `vpdpbusd` ([`PackedMatrix::group_avx2`]), to the same
//! integer sums and the same results.

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

use super::error::{EngineError, Result};
use super::host;

/// Inputs per block.
const BLOCK: usize = 32;
/// Weight rows interleaved in one group: one per 32-bit lane of a 512-bit register.
const GROUP: usize = 16;
/// Four-input steps per block (one `vpdpbusd` each).
const QUADS: usize = BLOCK / 4;
/// Below this many activation rows the VNNI kernel splits each row's sums over two chains.
const SPLIT: usize = 4;
/// How far ahead of the block in hand the VNNI kernel asks for weights (see
/// [`PackedMatrix::fetch_ahead`]): 4 KiB, about one group of a 576-input matrix.
const AHEAD_BYTES: usize = 4096;

/// Which packed kernel this CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AVX-512 with VNNI: sixteen rows per register, `vpdpbusd` for four products at once.
    Vnni,
    /// AVX2 with FMA and F16C: each sixteen rows as two eight-row halves, and the products by
    /// `vpmaddubsw` and `vpmaddwd` (see [`PackedMatrix::group_avx2`]).
    Avx2,
    /// Neither: no packed kernel ([`available`] is false and candle's quantized matmul runs).
    None,
}

/// The packed kernel for this CPU (the standard library caches the feature detection).
pub fn kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512vnni") {
            return Kernel::Vnni;
        }
        if has!("avx2") && has!("fma") && has!("f16c") {
            return Kernel::Avx2;
        }
    }
    Kernel::None
}

/// Whether this CPU runs the packed kernels (AVX-512 with VNNI, or AVX2 with FMA and F16C);
/// other CPUs keep candle's quantized matmul.
pub fn available() -> bool {
    kernel() != Kernel::None
}

/// Whether [`PackedMatrix::from_qtensor`] takes this block type as it is.
pub fn packs(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0)
}

/// Whether `q` becomes a [`PackedMatrix`] when loaded: a host tensor of a type [`packs`] takes,
/// on a CPU with a packed kernel.
pub fn packs_tensor(q: &QTensor) -> bool {
    q.device().is_cpu() && available() && packs(q.dtype())
}

/// How the unsigned bytes of a block are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Width {
    /// Two 4-bit values per byte. Within a group, byte `4s + i` of lane `r` holds input
    /// `4s + i` (low nibble) and `16 + 4s + i` (high nibble) of row `r`, for `s` in `0..4`: as
    /// in GGUF, where byte `j` holds inputs `j` and `j + 16`.
    Nibbles,
    /// One byte per input; byte `4s + i` of lane `r` holds input `4s + i` of row `r`.
    Bytes,
}

impl Width {
    /// Bytes of one block of one row.
    fn block_bytes(self) -> usize {
        match self {
            Width::Nibbles => BLOCK / 2,
            Width::Bytes => BLOCK,
        }
    }
}

/// An `O × I` weight as per-block bytes, scales and offsets (see the module docs), in groups of
/// [`GROUP`] rows; rows past `O` (padding of the last group) are zero.
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    rows: usize,
    cols: usize,
    /// Blocks per row.
    blocks: usize,
    width: Width,
    /// `[group][block][lane-interleaved bytes]`, `GROUP · block_bytes` per group and block.
    qs: Vec<u8>,
    /// `d`, `[group][block][lane]`.
    scale: Vec<f16>,
    offset: Offsets,
}

/// The offsets `m` of a [`PackedMatrix`]'s blocks.
#[derive(Debug, Clone)]
enum Offsets {
    /// `m = k·d` for every block (Q4_0: `k = −8`; Q8_0: `k = −128`), so none is stored.
    Scaled(f32),
    /// `m` per block and row, `[group][block][lane]` as the scales (Q4_1).
    Stored(Vec<f16>),
}

impl PackedMatrix {
    /// Packs a Q4_0, Q4_1 or Q8_0 tensor of shape `(O, I)`.
    pub fn from_qtensor(q: &QTensor) -> Result<Self> {
        let (rows, cols) = q.shape().dims2()?;
        Self::from_blocks(q.dtype(), rows, cols, &q.data()?)
    }

    /// Packs `rows × cols` weights given as the file's blocks of type `dtype`, row by row.
    fn from_blocks(dtype: GgmlDType, rows: usize, cols: usize, data: &[u8]) -> Result<Self> {
        let bad = |message: String| EngineError::Unsupported { message };
        if !cols.is_multiple_of(BLOCK) {
            return Err(bad(format!("{cols} inputs is not a multiple of {BLOCK}")));
        }
        // Bytes per block in the file, and the offset as a multiple of the scale where it is one
        // (`None`: stored after the scale).
        let (width, src_bytes, offset_per_scale) = match dtype {
            GgmlDType::Q4_0 => (Width::Nibbles, 18, Some(-8.0)),
            GgmlDType::Q4_1 => (Width::Nibbles, 20, None),
            GgmlDType::Q8_0 => (Width::Bytes, 34, Some(-128.0)),
            other => return Err(bad(format!("no packed kernel for {other:?}"))),
        };
        let blocks = cols / BLOCK;
        if data.len() != rows * blocks * src_bytes {
            return Err(bad(format!("{dtype:?} data of {} bytes", data.len())));
        }
        let groups = rows.div_ceil(GROUP);
        let bb = width.block_bytes();
        let lanes = groups * blocks * GROUP;
        let mut m = Self {
            rows,
            cols,
            blocks,
            width,
            qs: vec![0; lanes * bb],
            scale: vec![f16::ZERO; lanes],
            offset: match offset_per_scale {
                Some(k) => Offsets::Scaled(k),
                None => Offsets::Stored(vec![f16::ZERO; lanes]),
            },
        };
        let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]);
        for (i, src) in data.chunks_exact(src_bytes).enumerate() {
            let (row, block) = (i / blocks, i % blocks);
            let (group, lane) = (row / GROUP, row % GROUP);
            let at = (group * blocks + block) * GROUP;
            m.scale[at + lane] = half(&src[0..2]);
            let qs = match &mut m.offset {
                Offsets::Stored(offset) => {
                    offset[at + lane] = half(&src[2..4]);
                    &src[4..]
                }
                Offsets::Scaled(_) => &src[2..],
            };
            // Four bytes per lane per register: byte `4s + i` of the block goes to register `s`.
            let dst = &mut m.qs[at * bb..(at + GROUP) * bb];
            for (j, &byte) in qs.iter().enumerate() {
                let (s, i) = (j / 4, j % 4);
                dst[s * GROUP * 4 + lane * 4 + i] = match width {
                    Width::Nibbles => byte,
                    Width::Bytes => (byte as i8 as i16 + 128) as u8,
                };
            }
        }
        Ok(m)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        let offsets = match &self.offset {
            Offsets::Stored(m) => m.len(),
            Offsets::Scaled(_) => 0,
        };
        self.qs.len() + 2 * (self.scale.len() + offsets)
    }

    fn groups(&self) -> usize {
        self.rows.div_ceil(GROUP)
    }

    /// The unsigned value of input `i` of block `b` of row `r`.
    fn unsigned(&self, r: usize, b: usize, i: usize) -> u8 {
        let bb = self.width.block_bytes();
        let at = ((r / GROUP) * self.blocks + b) * GROUP * bb;
        let lane = r % GROUP;
        match self.width {
            Width::Bytes => self.qs[at + (i / 4) * GROUP * 4 + lane * 4 + i % 4],
            Width::Nibbles => {
                let j = i % 16;
                let byte = self.qs[at + (j / 4) * GROUP * 4 + lane * 4 + j % 4];
                if i < 16 { byte & 0x0F } else { byte >> 4 }
            }
        }
    }

    /// Scale and offset of block `b` of row `r`.
    fn affine(&self, r: usize, b: usize) -> (f32, f32) {
        let at = ((r / GROUP) * self.blocks + b) * GROUP + r % GROUP;
        let d = self.scale[at].to_f32();
        let m = match &self.offset {
            Offsets::Scaled(k) => k * d,
            Offsets::Stored(m) => m[at].to_f32(),
        };
        (d, m)
    }

    /// `(O, I)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Row `r`'s weights as f32 into `out` (`I` values): `d·q + m`, which for every packed type
    /// is exactly the value the file's own dequantization gives (`d·q` and `m` are exact in f32,
    /// and so is their sum where `m` is a multiple of `d`), so a table looked up here equals the
    /// dequantized table.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        assert!(
            r < self.rows && out.len() == self.cols,
            "row {r} into {}",
            out.len()
        );
        let bb = self.width.block_bytes();
        let lane = r % GROUP;
        for (b, out) in out.chunks_exact_mut(BLOCK).enumerate() {
            let (d, m) = self.affine(r, b);
            let at = ((r / GROUP) * self.blocks + b) * GROUP * bb + lane * 4;
            // Byte `4s + i` of the block's lane is at `at + s·GROUP·4 + i`.
            let byte = |j: usize| self.qs[at + (j / 4) * GROUP * 4 + j % 4];
            match self.width {
                Width::Bytes => {
                    for (j, v) in out.iter_mut().enumerate() {
                        *v = d * byte(j) as f32 + m;
                    }
                }
                Width::Nibbles => {
                    let (low, high) = out.split_at_mut(BLOCK / 2);
                    for (j, (lo, hi)) in low.iter_mut().zip(high).enumerate() {
                        let q = byte(j);
                        *lo = d * (q & 0x0F) as f32 + m;
                        *hi = d * (q >> 4) as f32 + m;
                    }
                }
            }
        }
    }

    /// `x: (rows, I)` row-major to `(rows, O)` row-major, `x · Wᵀ`.
    #[cfg(test)]
    fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        Self::matmul_with(&[self], x, rows, 0, &|_| {})
            .pop()
            .unwrap_or_default()
    }

    /// `x · Wᵀ` for several matrices that read the same input (q, k and v; gate and up), and
    /// `extra` more jobs: the input is quantized once, and all the matrices' groups share one
    /// pass over the worker pool with `run_extra(j)` for every `j < extra`, each once, run by
    /// one thread while the others compute the groups ([`host::par_lists`]; see `delta_pass`:
    /// deltas streaming from memory beside the compute-bound groups). Every matrix must have
    /// `x`'s width as its input size.
    pub fn matmul_with(
        ms: &[&PackedMatrix],
        x: &[f32],
        rows: usize,
        extra: usize,
        run_extra: &(dyn Fn(usize) + Sync),
    ) -> Vec<Vec<f32>> {
        let Some(first) = ms.first() else {
            (0..extra).for_each(run_extra);
            return Vec::new();
        };
        debug_assert!(ms.iter().all(|m| m.cols == first.cols));
        let acts = Activations::quantize(x, rows, first.cols);
        // Every matrix's groups one after another; each work item is one group and writes its
        // own columns of its matrix's output.
        let counts: Vec<usize> = ms.iter().map(|m| m.groups()).collect();
        let lens: Vec<usize> = ms.iter().map(|m| rows * m.rows).collect();
        let kernel = kernel();
        // SAFETY: the groups of a matrix cover its rows (the last one its remaining lanes), and
        // every group writes its lanes of every activation row.
        unsafe {
            host::scattered(&lens, |scatter| {
                let run = |item: host::Either| match item {
                    host::Either::First(item) => {
                        let (which, group) = host::part_of(&counts, item);
                        Self::fill_group(ms[which], which, group, &acts, rows, kernel, scatter);
                    }
                    host::Either::Second(j) => run_extra(j),
                };
                host::par_lists(counts.iter().sum(), extra, run);
            })
        }
    }

    /// Group `group` of `m` (matrix `which` of a [`Self::matmul_with`]) for every activation
    /// row: its lanes of output `which`.
    fn fill_group(
        m: &PackedMatrix,
        which: usize,
        group: usize,
        acts: &Activations,
        rows: usize,
        kernel: Kernel,
        scatter: &host::Scatter<'_>,
    ) {
        let lanes = GROUP.min(m.rows - group * GROUP);
        let mut tile = [[0f32; GROUP]; 8];
        let mut t0 = 0;
        while t0 < rows {
            let n = (rows - t0).min(8);
            m.group_product(group, acts, t0, &mut tile[..n], kernel);
            for (t, values) in tile[..n].iter().enumerate() {
                let at = (t0 + t) * m.rows + group * GROUP;
                // SAFETY: the rows of `group` belong to this item alone, so these columns of
                // output `which` have no other writer.
                unsafe {
                    if lanes == GROUP {
                        scatter.write_array(which, at, values);
                    } else {
                        scatter.write_slice(which, at, &values[..lanes]);
                    }
                }
            }
            t0 += n;
        }
    }

    /// `out[t][lane]` = row `group·GROUP + lane` · activation row `t0 + t`, for `out.len()` (at
    /// most eight) activation rows, on `kernel` ([`kernel`]).
    fn group_product(
        &self,
        group: usize,
        acts: &Activations,
        t0: usize,
        out: &mut [[f32; GROUP]],
        kernel: Kernel,
    ) {
        #[cfg(target_arch = "x86_64")]
        if kernel != Kernel::None {
            // Fixed tile sizes let the compiler keep every accumulator in a register (AVX2 has
            // half as many registers, of half the width: four rows at most).
            let widest = if kernel == Kernel::Vnni { 8 } else { 4 };
            let mut t = 0;
            while t < out.len() {
                let n = match (out.len() - t).min(widest) {
                    8 => 8,
                    4..=7 => 4,
                    2 | 3 => 2,
                    _ => 1,
                };
                let o = &mut out[t..t + n];
                // The group's first tile asks for the weights ahead; the others find its own
                // in cache.
                let ahead = t0 + t == 0;
                let t1 = t0 + t;
                // SAFETY: the CPU has the features the kernel is compiled for (`kernel`),
                // `group` is a group of `self`, and activation rows `t1 .. t1 + n` exist.
                unsafe {
                    match (kernel, n) {
                        (Kernel::Vnni, 8) => self.group_vnni::<8>(group, acts, t1, o, ahead),
                        (Kernel::Vnni, 4) => self.group_vnni::<4>(group, acts, t1, o, ahead),
                        (Kernel::Vnni, 2) => self.group_vnni::<2>(group, acts, t1, o, ahead),
                        (Kernel::Vnni, _) => self.group_vnni::<1>(group, acts, t1, o, ahead),
                        (_, 4) => self.group_avx2::<4>(group, acts, t1, o, ahead),
                        (_, 2) => self.group_avx2::<2>(group, acts, t1, o, ahead),
                        _ => self.group_avx2::<1>(group, acts, t1, o, ahead),
                    }
                }
                t += n;
            }
            return;
        }
        let _ = kernel;
        self.group_scalar(group, acts, t0, out);
    }

    /// [`Self::group_product`] without SIMD (CPUs without a packed kernel, and the kernels'
    /// reference in tests).
    fn group_scalar(&self, group: usize, acts: &Activations, t0: usize, out: &mut [[f32; GROUP]]) {
        for (t, values) in out.iter_mut().enumerate() {
            let x = acts.row(t0 + t);
            for (lane, v) in values.iter_mut().enumerate() {
                let r = group * GROUP + lane;
                if r >= self.rows {
                    *v = 0.0;
                    continue;
                }
                let mut sum = 0.0;
                for b in 0..self.blocks {
                    let dp: i32 = (0..BLOCK)
                        .map(|i| self.unsigned(r, b, i) as i32 * x.qs[b * BLOCK + i] as i32)
                        .sum();
                    let (d, m) = self.affine(r, b);
                    sum += d * x.scale[b] * dp as f32 + m * x.scaled_sum[b];
                }
                *v = sum;
            }
        }
    }

    /// [`Self::group_product`] for exactly `N` activation rows.
    ///
    /// Each step `s` of a block issues one `vpdpbusd` per activation row, so the `N` rows are
    /// `N` independent dependency chains that keep the multiply units busy (one chain of eight
    /// dependent `vpdpbusd` per row would wait on their latency), and the per-row sums and
    /// accumulators stay in registers.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn group_vnni<const N: usize>(
        &self,
        group: usize,
        acts: &Activations,
        t0: usize,
        out: &mut [[f32; GROUP]],
        ahead: bool,
    ) {
        use std::arch::x86_64::*;
        let bb = self.width.block_bytes();
        let low = _mm512_set1_epi8(0x0F);
        // Row `t`'s quantized bytes as 32-bit words (four inputs each), its scales and sums.
        let rows: [ActRow<'_>; N] = std::array::from_fn(|t| acts.row(t0 + t));
        let words: [*const i32; N] = std::array::from_fn(|t| rows[t].qs.as_ptr().cast());
        let scales: [*const f32; N] = std::array::from_fn(|t| rows[t].scale.as_ptr());
        let sums: [*const f32; N] = std::array::from_fn(|t| rows[t].scaled_sum.as_ptr());
        let mut acc = [_mm512_setzero_ps(); N];
        for b in 0..self.blocks {
            let at = (group * self.blocks + b) * GROUP;
            let q = self.qs[at * bb..(at + GROUP) * bb].as_ptr();
            if ahead {
                // SAFETY: a prefetch never faults, whatever the address.
                unsafe { self.fetch_ahead(at, q) };
            }
            // With few rows, odd steps go to a second set of sums (below `SPLIT` rows), so
            // there are still at least two chains; integer sums are exact in any order.
            let mut dp = [[_mm512_setzero_si512(); N]; 2];
            // SAFETY (all loads): the group's block holds `GROUP · bb` bytes and `GROUP`
            // scales and offsets; every activation row holds `blocks · BLOCK` bytes, i.e.
            // `blocks · QUADS` words, and `blocks` scales and sums.
            let mut step = |s: usize, w: __m512i| {
                let dp = &mut dp[if N < SPLIT { s % 2 } else { 0 }];
                for t in 0..N {
                    let four =
                        _mm512_set1_epi32(unsafe { words[t].add(b * QUADS + s).read_unaligned() });
                    dp[t] = _mm512_dpbusd_epi32(dp[t], w, four);
                }
            };
            match self.width {
                Width::Bytes => {
                    for s in 0..QUADS {
                        step(s, unsafe { _mm512_loadu_si512(q.add(s * 64).cast()) });
                    }
                }
                Width::Nibbles => {
                    for s in 0..QUADS / 2 {
                        let v = unsafe { _mm512_loadu_si512(q.add(s * 64).cast()) };
                        step(s, _mm512_and_si512(v, low));
                        step(
                            s + QUADS / 2,
                            _mm512_and_si512(_mm512_srli_epi16(v, 4), low),
                        );
                    }
                }
            }
            let half = |v: &[f16]| {
                _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(v.as_ptr().add(at).cast()) })
            };
            let d = half(&self.scale);
            let m = match &self.offset {
                // `k·d` rounds as the scalar path's `k * d` does (one f32 product).
                Offsets::Scaled(k) => _mm512_mul_ps(d, _mm512_set1_ps(*k)),
                Offsets::Stored(m) => half(m),
            };
            for t in 0..N {
                let e = _mm512_set1_ps(unsafe { *scales[t].add(b) });
                let scaled = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(_mm512_add_epi32(dp[0][t], dp[1][t])),
                    _mm512_mul_ps(d, e),
                    acc[t],
                );
                let sum = _mm512_set1_ps(unsafe { *sums[t].add(b) });
                acc[t] = _mm512_fmadd_ps(m, sum, scaled);
            }
        }
        for (t, o) in out.iter_mut().enumerate().take(N) {
            // SAFETY: `o` holds exactly `GROUP` floats.
            unsafe { _mm512_storeu_ps(o.as_mut_ptr(), acc[t]) };
        }
    }

    /// [`Self::group_product`] for exactly `N` activation rows on AVX2, with the VNNI kernel's
    /// results to the bit.
    ///
    /// A 256-bit register holds four inputs of eight rows, so a group is two halves, each
    /// taken over all blocks in turn (the second finds the group's weights in cache). Without
    /// `vpdpbusd`, `vpmaddubsw` multiplies unsigned weight bytes by signed activation bytes and
    /// adds adjacent pairs into 16 bits, and `vpmaddwd` by ones adds those pairs into the
    /// 32-bit sums. 4-bit weights are at most 15 and activations at most 127 in magnitude, so a
    /// whole block's sixteen pairs per lane sum in 16 bits without saturating (16·15·127 <
    /// 2¹⁵), and one `vpmaddwd` per block and row suffices. Byte weights (`q` up to 255) would
    /// saturate the pairs: they are taken as `q − 128`, multiplied as `|q − 128|` by the
    /// activations with that sign, and `128·Σp` is added back, so every block's integer sum is
    /// the VNNI kernel's, and the floating-point steps after it are the same operations.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn group_avx2<const N: usize>(
        &self,
        group: usize,
        acts: &Activations,
        t0: usize,
        out: &mut [[f32; GROUP]],
        ahead: bool,
    ) {
        use std::arch::x86_64::*;
        let bb = self.width.block_bytes();
        let low = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let flip = _mm256_set1_epi8(i8::MIN);
        // Rows `t0 ..` of the activations lie `blocks` blocks apart: their bytes through one
        // pointer per row (index arithmetic from a shared base in the inner loop cost a third of
        // the kernel's time), their scales and sums through one base pointer per array.
        let blocks = self.blocks;
        let row = acts.row(t0);
        let words: *const i32 = row.qs.as_ptr().cast();
        let (scales, sums, scaled_sums) = (
            row.scale.as_ptr(),
            row.sum.as_ptr(),
            row.scaled_sum.as_ptr(),
        );
        assert!(
            acts.scale.len() >= (t0 + N) * blocks,
            "activation rows {t0}+{N}"
        );
        // SAFETY (all loads): as in `group_vnni`; activation rows `t0 .. t0 + N` exist, each
        // `blocks · QUADS` words and `blocks` scales and sums; half `h` of a block's 64-byte step
        // is its bytes `32h .. 32h + 32`, and of its `GROUP` scales and offsets the
        // `8h .. 8h + 8`th.
        let row_words: [*const i32; N] =
            std::array::from_fn(|t| words.wrapping_add(t * blocks * QUADS));
        let word = |t: usize, b: usize, s: usize| unsafe {
            _mm256_set1_epi32(row_words[t].add(b * QUADS + s).read_unaligned())
        };
        let at_row = |p: *const f32, t: usize, b: usize| unsafe { *p.add(t * blocks + b) };
        for h in 0..2 {
            let mut acc = [_mm256_setzero_ps(); N];
            for b in 0..self.blocks {
                let at = (group * self.blocks + b) * GROUP;
                let q = self.qs[at * bb..(at + GROUP) * bb].as_ptr();
                if ahead && h == 0 {
                    // SAFETY: a prefetch never faults, whatever the address.
                    unsafe { self.fetch_ahead(at, q) };
                }
                let load = |s: usize| unsafe { _mm256_loadu_si256(q.add(s * 64 + h * 32).cast()) };
                let mut dp = [_mm256_setzero_si256(); N];
                match self.width {
                    Width::Nibbles => {
                        let mut pairs = [_mm256_setzero_si256(); N];
                        for s in 0..QUADS / 2 {
                            let v = load(s);
                            let lo = _mm256_and_si256(v, low);
                            let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                            for (t, pairs) in pairs.iter_mut().enumerate() {
                                let p = _mm256_add_epi16(
                                    _mm256_maddubs_epi16(lo, word(t, b, s)),
                                    _mm256_maddubs_epi16(hi, word(t, b, s + QUADS / 2)),
                                );
                                *pairs = _mm256_add_epi16(*pairs, p);
                            }
                        }
                        for (dp, pairs) in dp.iter_mut().zip(pairs) {
                            *dp = _mm256_madd_epi16(pairs, ones);
                        }
                    }
                    Width::Bytes => {
                        for s in 0..QUADS {
                            let w = _mm256_xor_si256(load(s), flip);
                            let magnitude = _mm256_abs_epi8(w);
                            for (t, dp) in dp.iter_mut().enumerate() {
                                let signed = _mm256_sign_epi8(word(t, b, s), w);
                                let p = _mm256_maddubs_epi16(magnitude, signed);
                                *dp = _mm256_add_epi32(*dp, _mm256_madd_epi16(p, ones));
                            }
                        }
                        for (t, dp) in dp.iter_mut().enumerate() {
                            // SAFETY: as above.
                            let sum = unsafe { *sums.add(t * blocks + b) };
                            *dp = _mm256_add_epi32(*dp, _mm256_set1_epi32(128 * sum));
                        }
                    }
                }
                let half = |v: &[f16]| {
                    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(v.as_ptr().add(at + 8 * h).cast()) })
                };
                let d = half(&self.scale);
                let m = match &self.offset {
                    Offsets::Scaled(k) => _mm256_mul_ps(d, _mm256_set1_ps(*k)),
                    Offsets::Stored(m) => half(m),
                };
                for t in 0..N {
                    let e = _mm256_set1_ps(at_row(scales, t, b));
                    let scaled =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(dp[t]), _mm256_mul_ps(d, e), acc[t]);
                    let sum = _mm256_set1_ps(at_row(scaled_sums, t, b));
                    acc[t] = _mm256_fmadd_ps(m, sum, scaled);
                }
            }
            for (t, o) in out.iter_mut().enumerate().take(N) {
                // SAFETY: `o` holds `GROUP` floats, of which these are the `h`th eight.
                unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(8 * h), acc[t]) };
            }
        }
    }

    /// Asks for the lines of the block [`AHEAD_BYTES`] of bytes after block `at` (whose bytes
    /// start at `q`), and for its scales and offsets: the next groups' weights, in the order the
    /// worker will most likely read them (its share of a pass is a run of adjacent groups). The
    /// hardware prefetcher alone leaves a streamed group waiting on memory for a third of its
    /// time; past the matrix's end this asks for lines that are never read.
    ///
    /// # Safety
    /// The CPU has SSE (every x86-64 does); nothing is read.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn fetch_ahead(&self, at: usize, q: *const u8) {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let bytes = GROUP * self.width.block_bytes();
        let blocks = AHEAD_BYTES / bytes;
        let ahead = q.wrapping_add(blocks * bytes);
        // SAFETY: a prefetch is only a hint; it never faults.
        unsafe {
            for line in (0..bytes).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast());
            }
            let lanes = at + blocks * GROUP;
            _mm_prefetch::<_MM_HINT_T0>(self.scale.as_ptr().wrapping_add(lanes).cast());
            if let Offsets::Stored(m) = &self.offset {
                _mm_prefetch::<_MM_HINT_T0>(m.as_ptr().wrapping_add(lanes).cast());
            }
        }
    }
}

/// Activation rows quantized per block: `x ≈ scale · qs`, with `sum = Σ qs` and
/// `scaled_sum = scale · sum`.
struct Activations {
    blocks: usize,
    qs: Vec<i8>,
    scale: Vec<f32>,
    sum: Vec<i32>,
    scaled_sum: Vec<f32>,
}

/// One row of [`Activations`].
struct ActRow<'a> {
    qs: &'a [i8],
    scale: &'a [f32],
    sum: &'a [i32],
    scaled_sum: &'a [f32],
}

impl Activations {
    /// Quantizes `x: (rows, cols)`.
    fn quantize(x: &[f32], rows: usize, cols: usize) -> Self {
        let blocks = cols / BLOCK;
        let mut a = Self {
            blocks,
            qs: vec![0; rows * blocks * BLOCK],
            scale: vec![0.0; rows * blocks],
            sum: vec![0; rows * blocks],
            scaled_sum: vec![0.0; rows * blocks],
        };
        let simd = kernel();
        let values = x[..rows * cols].chunks_exact(BLOCK);
        for (at, (chunk, qs)) in values.zip(a.qs.chunks_exact_mut(BLOCK)).enumerate() {
            let (d, sum) = quantize_block_on(simd, chunk, qs);
            a.scale[at] = d;
            a.sum[at] = sum;
            a.scaled_sum[at] = d * sum as f32;
        }
        a
    }

    #[inline]
    fn row(&self, r: usize) -> ActRow<'_> {
        let blocks = r * self.blocks..(r + 1) * self.blocks;
        ActRow {
            qs: &self.qs[blocks.start * BLOCK..blocks.end * BLOCK],
            scale: &self.scale[blocks.clone()],
            sum: &self.sum[blocks.clone()],
            scaled_sum: &self.scaled_sum[blocks],
        }
    }
}

/// Quantizes one block to `qs ≈ v / d`, rounding half away from zero (as `f32::round`);
/// returns `(d, Σ qs)`.
fn quantize_block(v: &[f32], qs: &mut [i8]) -> (f32, i32) {
    let amax = v.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (q, v) in qs.iter_mut().zip(v) {
        let y = v * inv;
        *q = (y + 0.5f32.copysign(y)) as i8;
        sum += *q as i32;
    }
    (d, sum)
}

/// [`quantize_block`], in vector registers when `kernel` has them.
fn quantize_block_on(kernel: Kernel, v: &[f32], qs: &mut [i8]) -> (f32, i32) {
    // SAFETY (both): the CPU has the kernel's features (`kernel`); the blocks hold `BLOCK`
    // values.
    #[cfg(target_arch = "x86_64")]
    match kernel {
        Kernel::Vnni => return unsafe { quantize_block_avx512(v, qs) },
        Kernel::Avx2 => return unsafe { quantize_block_avx2(v, qs) },
        Kernel::None => {}
    }
    let _ = kernel;
    quantize_block(v, qs)
}

/// [`quantize_block`] in four 256-bit registers, with the same result.
///
/// # Safety
/// The CPU must have AVX2; `v` and `qs` must hold [`BLOCK`] values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_block_avx2(v: &[f32], qs: &mut [i8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    debug_assert!(v.len() == BLOCK && qs.len() == BLOCK);
    // SAFETY: `v` holds 32 floats (four registers).
    let x: [__m256; 4] = std::array::from_fn(|k| unsafe { _mm256_loadu_ps(v.as_ptr().add(8 * k)) });
    let sign = _mm256_set1_ps(-0.0);
    let abs = x.map(|x| _mm256_andnot_ps(sign, x));
    let max = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
    let max = _mm_max_ps(_mm256_castps256_ps128(max), _mm256_extractf128_ps(max, 1));
    let max = _mm_max_ps(max, _mm_movehl_ps(max, max));
    let amax = _mm_cvtss_f32(_mm_max_ss(max, _mm_shuffle_ps(max, max, 1)));
    let d = amax / 127.0;
    let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    let half = _mm256_set1_ps(0.5);
    let q = x.map(|x| {
        let y = _mm256_mul_ps(x, inv);
        let signed_half = _mm256_or_ps(_mm256_and_ps(y, sign), half);
        _mm256_cvttps_epi32(_mm256_add_ps(y, signed_half))
    });
    // Packing interleaves the 128-bit lanes; the permutation puts the bytes back in order.
    let bytes = _mm256_packs_epi16(
        _mm256_packs_epi32(q[0], q[1]),
        _mm256_packs_epi32(q[2], q[3]),
    );
    let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // SAFETY: `qs` holds 32 bytes.
    unsafe { _mm256_storeu_si256(qs.as_mut_ptr().cast(), bytes) };
    let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    let sum = _mm_add_epi32(
        _mm256_castsi256_si128(sum),
        _mm256_extracti128_si256(sum, 1),
    );
    let sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b01_00_11_10));
    let sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b10_11_00_01));
    (d, _mm_cvtsi128_si32(sum))
}

/// [`quantize_block`] in two 512-bit registers, with the same result.
///
/// # Safety
/// The CPU must have AVX-512F; `v` and `qs` must hold [`BLOCK`] values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_block_avx512(v: &[f32], qs: &mut [i8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    debug_assert!(v.len() == BLOCK && qs.len() == BLOCK);
    // SAFETY: `v` holds 32 floats (two registers).
    let (a, b) = unsafe {
        (
            _mm512_loadu_ps(v.as_ptr()),
            _mm512_loadu_ps(v.as_ptr().add(16)),
        )
    };
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    let d = amax / 127.0;
    let inv = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    let sign = _mm512_set1_epi32(i32::MIN);
    let half = _mm512_set1_ps(0.5);
    let round = |x: __m512| {
        let y = _mm512_mul_ps(x, inv);
        let signed_half = _mm512_castsi512_ps(_mm512_or_si512(
            _mm512_and_si512(_mm512_castps_si512(y), sign),
            _mm512_castps_si512(half),
        ));
        _mm512_cvttps_epi32(_mm512_add_ps(y, signed_half))
    };
    let (qa, qb) = (round(a), round(b));
    // SAFETY: `qs` holds 32 bytes (two 16-byte stores).
    unsafe {
        _mm_storeu_si128(qs.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(qa));
        _mm_storeu_si128(qs.as_mut_ptr().add(16).cast(), _mm512_cvtepi32_epi8(qb));
    }
    (d, _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn weights(rows: usize, cols: usize) -> Tensor {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3)
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).expect("tensor")
    }

    fn inputs(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| ((i * 104729 % 997) as f32 / 498.0 - 1.0) * 2.0)
            .collect()
    }

    /// The packed product equals the exact product of the block values (weights as the file
    /// stores them, activations as quantized) up to float rounding, and the scalar kernel, for
    /// every packed type and for row counts around the tile sizes.
    #[test]
    fn packed_product_matches_the_dequantized_product() {
        let (n, k) = (37, 96); // a partial last group of rows, an odd number of blocks
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&weights(n, k), dtype).expect("quantize");
            let packed = PackedMatrix::from_qtensor(&q).expect("pack");
            let w = q.dequantize(&Device::Cpu).expect("dequantize");
            let w = w.to_vec2::<f32>().expect("values");
            for (r, row) in w.iter().enumerate() {
                let mut mine = vec![f32::NAN; k];
                packed.row_into(r, &mut mine);
                assert_eq!(&mine, row, "{dtype:?} row {r}");
            }
            for m in [1, 3, 4, 9, 17, 23] {
                let x = inputs(m, k);
                let acts = Activations::quantize(&x, m, k);
                let mut scalar = vec![[0f32; GROUP]; m];
                let groups: Vec<Vec<[f32; GROUP]>> = (0..packed.groups())
                    .map(|g| {
                        packed.group_scalar(g, &acts, 0, &mut scalar);
                        scalar.clone()
                    })
                    .collect();
                let got = packed.matmul(&x, m);
                for r in 0..m {
                    let xq: Vec<f32> = (0..k)
                        .map(|i| {
                            let at = r * packed.blocks + i / BLOCK;
                            acts.scale[at] * acts.qs[r * packed.blocks * BLOCK + i] as f32
                        })
                        .collect();
                    for j in 0..n {
                        let exact: f32 = w[j].iter().zip(&xq).map(|(a, b)| a * b).sum();
                        let g = got[r * n + j];
                        assert!(
                            (g - exact).abs() <= 1e-4 * (1.0 + exact.abs()),
                            "{dtype:?} m={m} ({r},{j}): {g} vs {exact}"
                        );
                        let scalar = groups[j / GROUP][r][j % GROUP];
                        assert!((g - scalar).abs() <= 1e-4 * (1.0 + exact.abs()));
                    }
                }
            }
        }
    }

    /// The largest products the kernels meet do not saturate their integer sums: 4-bit weights
    /// of 15 and byte weights of −128 and 127 (`q` of 0 and 255) against activations of ±127,
    /// with every sign pattern, give the scalar kernel's result.
    #[test]
    fn extreme_weights_and_activations_do_not_saturate() {
        let (rows, cols) = (20, 64);
        let d = f16::from_f32(0.01).to_le_bytes();
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let mut data = Vec::new();
            for r in 0..rows * cols / BLOCK {
                data.extend_from_slice(&d);
                match dtype {
                    GgmlDType::Q8_0 => {
                        data.extend(
                            (0..BLOCK).map(|i| if (r + i / 3) % 2 == 0 { 0x80 } else { 0x7F }),
                        );
                    }
                    GgmlDType::Q4_1 => {
                        data.extend_from_slice(&d);
                        data.extend([0xFF; BLOCK / 2]);
                    }
                    _ => data.extend([0xFF; BLOCK / 2]),
                }
            }
            let m = PackedMatrix::from_blocks(dtype, rows, cols, &data).expect("pack");
            for n in [1, 2, 5] {
                let x: Vec<f32> = (0..n * cols)
                    .map(|i| {
                        if (i / (1 + i % 5)) % 2 == 0 {
                            1.0
                        } else {
                            -1.0
                        }
                    })
                    .collect();
                let acts = Activations::quantize(&x, n, cols);
                assert!(acts.qs.iter().all(|q| q.abs() == 127));
                let got = m.matmul(&x, n);
                let mut want = vec![[0f32; GROUP]; n];
                for g in 0..m.groups() {
                    m.group_scalar(g, &acts, 0, &mut want);
                    for (t, want) in want.iter().enumerate() {
                        for (lane, &w) in want.iter().enumerate().take(rows - g * GROUP) {
                            let v = got[t * rows + g * GROUP + lane];
                            assert!(
                                (v - w).abs() <= 1e-5 * (1.0 + w.abs()),
                                "{dtype:?} {v} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Matrices sharing an input give what each gives alone.
    #[test]
    fn shared_input_products_equal_separate_ones() {
        let k = 64;
        let a = QTensor::quantize(&weights(24, k), GgmlDType::Q4_1).expect("quantize");
        let b = QTensor::quantize(&weights(40, k), GgmlDType::Q8_0).expect("quantize");
        let (a, b) = (
            PackedMatrix::from_qtensor(&a).expect("pack"),
            PackedMatrix::from_qtensor(&b).expect("pack"),
        );
        let x = inputs(5, k);
        let both = PackedMatrix::matmul_with(&[&a, &b], &x, 5, 0, &|_| {});
        assert_eq!(both, vec![a.matmul(&x, 5), b.matmul(&x, 5)]);
        // Extra jobs in the same pass each run once and leave the products as they are.
        let runs: Vec<std::sync::atomic::AtomicUsize> =
            (0..7).map(|_| Default::default()).collect();
        let with_jobs = PackedMatrix::matmul_with(&[&a, &b], &x, 5, runs.len(), &|j| {
            runs[j].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        });
        assert_eq!(with_jobs, both);
        assert!(
            runs.iter()
                .all(|r| r.load(std::sync::atomic::Ordering::Relaxed) == 1)
        );
    }

    /// The vector quantizer gives the scalar one's bytes, scale and sum.
    #[test]
    fn block_quantizers_agree() {
        if !available() {
            return;
        }
        let mut x = inputs(40, BLOCK);
        // Exact halves (scale 1): rounded away from zero by both.
        x[..6].copy_from_slice(&[127.0, 2.5, -2.5, 0.5, -0.5, -126.5]);
        x[6..BLOCK].fill(0.0);
        for (i, v) in x.chunks_exact(BLOCK).enumerate() {
            let factor = if i == 0 { 1.0 } else { i as f32 * 0.3 - 4.0 };
            let v: Vec<f32> = v.iter().map(|a| a * factor).collect();
            let (mut q1, mut q2) = ([0i8; BLOCK], [0i8; BLOCK]);
            let plain = quantize_block(&v, &mut q1);
            let wide = quantize_block_on(kernel(), &v, &mut q2);
            assert_eq!((plain, q1), (wide, q2), "block {i}");
        }
        let mut q = [0i8; BLOCK];
        quantize_block(&x[..BLOCK], &mut q);
        assert_eq!(q[..6], [127, 3, -3, 1, -1, -127]);
    }

    /// A packed matrix holds what the file holds, no more: half-float scales, and offsets only
    /// where they are not a fixed multiple of the scale (rows padded to a whole group aside).
    #[test]
    fn packed_matrices_are_the_size_of_the_file() {
        for (dtype, bytes) in [
            (GgmlDType::Q4_0, 18),
            (GgmlDType::Q4_1, 20),
            (GgmlDType::Q8_0, 34),
        ] {
            let q = QTensor::quantize(&weights(48, 96), dtype).expect("quantize");
            let packed = PackedMatrix::from_qtensor(&q).expect("pack");
            assert_eq!(packed.bytes(), q.data().expect("data").len(), "{dtype:?}");
            assert_eq!(packed.bytes(), 48 * 3 * bytes, "{dtype:?}");
        }
    }

    #[test]
    fn other_types_and_ragged_inputs_are_refused() {
        let q = QTensor::quantize(&weights(4, 256), GgmlDType::Q4K).expect("quantize");
        assert!(PackedMatrix::from_qtensor(&q).is_err());
        assert!(packs(GgmlDType::Q4_1) && !packs(GgmlDType::Q6K));
    }
}
