//! Quantized matrix products for GGUF base weights on x86 CPUs with AVX-512 VNNI.
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
//! so the weights keep their exact values (no re-quantization) and 4-bit types keep their 4-bit
//! size in memory. Each activation row is quantized per block to signed bytes `x ≈ e·p` (as
//! llama.cpp's Q8 activations), and a block contributes
//! `Σ w·x = d·e·Σ q·p + m·e·Σ p`: one `vpdpbusd` (unsigned × signed bytes) per two blocks, the
//! second term a short float dot product over blocks.
//!
//! Work is split over the output rows on candle's worker pool; each weight row is read once per
//! call and multiplied with up to eight activation rows (two weight rows at a time; four
//! when there are fewer activation rows) while it sits in registers, so a batched
//! decode step of many sequences costs little more memory traffic than one sequence.

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

use super::error::{EngineError, Result};
use super::host;

/// Inputs per block.
const BLOCK: usize = 32;
/// 32-bit lanes of one block's products in a 512-bit register.
const LANES: usize = 8;
/// Weight rows per work item of the pool.
const ROWS_PER_ITEM: usize = 16;

/// Whether this CPU runs the packed kernels (AVX-512 with VNNI); other CPUs keep candle's
/// quantized matmul.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether [`PackedMatrix::from_qtensor`] takes this block type as it is.
pub fn packs(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0)
}

/// How the unsigned bytes of a block are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Width {
    /// Two 4-bit values per byte: byte `j` holds input `j` (low nibble) and `j + 16` (high), as
    /// in GGUF.
    Nibbles,
    /// One byte per input.
    Bytes,
}

impl Width {
    fn block_bytes(self) -> usize {
        match self {
            Width::Nibbles => BLOCK / 2,
            Width::Bytes => BLOCK,
        }
    }
}

/// An `O × I` weight as per-block bytes, scales and offsets (see the module docs).
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    rows: usize,
    cols: usize,
    /// Blocks per row, padded to an even number with zero blocks.
    blocks: usize,
    width: Width,
    qs: Vec<u8>,
    scale: Vec<f32>,
    offset: Vec<f32>,
}

impl PackedMatrix {
    /// Packs a Q4_0, Q4_1 or Q8_0 tensor of shape `(O, I)`.
    pub fn from_qtensor(q: &QTensor) -> Result<Self> {
        let (rows, cols) = q.shape().dims2()?;
        let bad = |message: String| EngineError::Unsupported { message };
        if cols % BLOCK != 0 {
            return Err(bad(format!("{cols} inputs is not a multiple of {BLOCK}")));
        }
        let dtype = q.dtype();
        let (width, src_bytes) = match dtype {
            GgmlDType::Q4_0 => (Width::Nibbles, 18),
            GgmlDType::Q4_1 => (Width::Nibbles, 20),
            GgmlDType::Q8_0 => (Width::Bytes, 34),
            other => return Err(bad(format!("no packed kernel for {other:?}"))),
        };
        let data = q.data()?;
        let src_blocks = cols / BLOCK;
        if data.len() != rows * src_blocks * src_bytes {
            return Err(bad(format!("{dtype:?} data of {} bytes", data.len())));
        }
        let blocks = src_blocks.next_multiple_of(2);
        let bb = width.block_bytes();
        let mut m = Self {
            rows,
            cols,
            blocks,
            width,
            qs: vec![0; rows * blocks * bb],
            scale: vec![0.0; rows * blocks],
            offset: vec![0.0; rows * blocks],
        };
        let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
        for (i, src) in data.chunks_exact(src_bytes).enumerate() {
            let at = (i / src_blocks) * blocks + i % src_blocks;
            let d = half(&src[0..2]);
            let (offset, qs) = match dtype {
                GgmlDType::Q4_0 => (-8.0 * d, &src[2..]),
                GgmlDType::Q4_1 => (half(&src[2..4]), &src[4..]),
                _ => (-128.0 * d, &src[2..]),
            };
            m.scale[at] = d;
            m.offset[at] = offset;
            let dst = &mut m.qs[at * bb..(at + 1) * bb];
            match width {
                Width::Nibbles => dst.copy_from_slice(qs),
                Width::Bytes => dst
                    .iter_mut()
                    .zip(qs)
                    .for_each(|(d, &s)| *d = (s as i8 as i16 + 128) as u8),
            }
        }
        Ok(m)
    }

    /// `(O, I)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.qs.len() + 4 * (self.scale.len() + self.offset.len())
    }

    /// Row `r`'s weights as f32 (for checks).
    #[cfg(test)]
    fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.cols);
        for b in 0..self.cols / BLOCK {
            let at = r * self.blocks + b;
            let (d, m) = (self.scale[at], self.offset[at]);
            out.extend((0..BLOCK).map(|i| d * unsigned(&self.qs, self.width, at, i) as f32 + m));
        }
        out
    }

    /// `x: (rows, I)` row-major to `(rows, O)` row-major, `x · Wᵀ`.
    #[cfg(test)]
    fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        Self::matmul_shared(&[self], x, rows)
            .pop()
            .unwrap_or_default()
    }

    /// `x · Wᵀ` for several matrices that read the same input (q, k and v; gate and up): the
    /// input is quantized once and all their rows share one pass over the worker pool. Every
    /// matrix must have `x`'s width as its input size.
    pub fn matmul_shared(ms: &[&PackedMatrix], x: &[f32], rows: usize) -> Vec<Vec<f32>> {
        let Some(first) = ms.first() else {
            return Vec::new();
        };
        debug_assert!(
            ms.iter()
                .all(|m| m.cols == first.cols && m.blocks == first.blocks)
        );
        let acts = Activations::quantize(x, rows, first.cols, first.blocks);
        let act_rows: Vec<ActRow<'_>> = (0..rows).map(|r| acts.row(r)).collect();
        // The matrices' rows one after another, in items of `ROWS_PER_ITEM`; each item writes
        // its own columns of the outputs.
        let starts: Vec<usize> = ms
            .iter()
            .scan(0, |at, m| {
                let start = *at;
                *at += m.rows;
                Some(start)
            })
            .collect();
        let total: usize = ms.iter().map(|m| m.rows).sum();
        let mut outs: Vec<Vec<f32>> = ms.iter().map(|m| vec![0f32; rows * m.rows]).collect();
        let scatter = host::Scatter::new(&mut outs);
        let vnni = available();
        host::par_for(total.div_ceil(ROWS_PER_ITEM), |item| {
            let first = item * ROWS_PER_ITEM;
            let owners: Vec<(usize, usize)> = (first..total.min(first + ROWS_PER_ITEM))
                .map(|g| {
                    let which = starts.partition_point(|&s| s <= g) - 1;
                    (which, g - starts[which])
                })
                .collect();
            let ws: Vec<Row<'_>> = owners.iter().map(|&(m, j)| ms[m].row(j)).collect();
            let mut tile = vec![0f32; ws.len() * rows];
            dot_block(&ws, &act_rows, &mut tile, rows, vnni);
            for (&(m, j), values) in owners.iter().zip(tile.chunks_exact(rows)) {
                for (r, v) in values.iter().enumerate() {
                    // SAFETY: weight row `j` of matrix `m` belongs to this item alone, so
                    // column `j` of output `m` has no other writer.
                    unsafe { scatter.write(m, r * ms[m].rows + j, *v) };
                }
            }
        });
        drop(scatter);
        outs
    }

    /// Row `j`'s blocks.
    fn row(&self, j: usize) -> Row<'_> {
        let blocks = j * self.blocks..(j + 1) * self.blocks;
        let bb = self.width.block_bytes();
        Row {
            qs: &self.qs[blocks.start * bb..blocks.end * bb],
            scale: &self.scale[blocks.clone()],
            offset: &self.offset[blocks],
            width: self.width,
        }
    }
}

/// The unsigned value of input `i` of block `b` in `qs`.
fn unsigned(qs: &[u8], width: Width, b: usize, i: usize) -> u8 {
    match width {
        Width::Bytes => qs[b * BLOCK + i],
        Width::Nibbles => {
            let byte = qs[b * BLOCK / 2 + i % 16];
            if i < 16 { byte & 0x0F } else { byte >> 4 }
        }
    }
}

/// One weight row's blocks.
struct Row<'a> {
    qs: &'a [u8],
    scale: &'a [f32],
    offset: &'a [f32],
    width: Width,
}

impl Row<'_> {
    /// The same product without SIMD (CPUs without VNNI, and the kernels' reference in tests).
    fn dot_scalar(&self, x: &ActRow<'_>) -> f32 {
        let mut sum = 0.0;
        for b in 0..self.scale.len() {
            let mut dp = 0i32;
            for i in 0..BLOCK {
                let q = unsigned(self.qs, self.width, b, i);
                dp += q as i32 * x.qs[b * BLOCK + i] as i32;
            }
            sum += self.scale[b] * x.scale[b] * dp as f32;
        }
        sum + host::dot(self.offset, x.scaled_sum)
    }
}

/// `out[r·stride + t] = w_r · x_t` for the weight rows `ws` and activation rows `xs`; `vnni` is
/// [`available`].
fn dot_block(ws: &[Row<'_>], xs: &[ActRow<'_>], out: &mut [f32], stride: usize, vnni: bool) {
    #[cfg(target_arch = "x86_64")]
    if vnni {
        // Fixed block sizes let the compiler keep every accumulator in a register: up to 16
        // 512-bit accumulators (weight rows × activation rows).
        let mut t0 = 0;
        while t0 < xs.len() {
            let n = match xs.len() - t0 {
                8.. => 8,
                4..=7 => 4,
                2 | 3 => 2,
                _ => 1,
            };
            let tile = &xs[t0..t0 + n];
            let mut r0 = 0;
            while r0 < ws.len() {
                let wide = if n == 8 { 2 } else { 4 };
                let r = if ws.len() - r0 >= wide { wide } else { 1 };
                let (w, o) = (&ws[r0..r0 + r], &mut out[r0 * stride + t0..]);
                // SAFETY: the CPU has the features the kernel is compiled for (`available`),
                // every slice holds whole pairs of blocks (`blocks` is even on both sides), and
                // `o` holds `(r - 1)·stride + n` values.
                unsafe {
                    match (r, n) {
                        (2, 8) => dot_block_vnni::<2, 8>(w, tile, o, stride),
                        (4, 4) => dot_block_vnni::<4, 4>(w, tile, o, stride),
                        (4, 2) => dot_block_vnni::<4, 2>(w, tile, o, stride),
                        (4, _) => dot_block_vnni::<4, 1>(w, tile, o, stride),
                        (_, 8) => dot_block_vnni::<1, 8>(w, tile, o, stride),
                        (_, 4) => dot_block_vnni::<1, 4>(w, tile, o, stride),
                        (_, 2) => dot_block_vnni::<1, 2>(w, tile, o, stride),
                        _ => dot_block_vnni::<1, 1>(w, tile, o, stride),
                    }
                }
                r0 += r;
            }
            t0 += n;
        }
        return;
    }
    let _ = vnni;
    for (r, w) in ws.iter().enumerate() {
        for (t, x) in xs.iter().enumerate() {
            out[r * stride + t] = w.dot_scalar(x);
        }
    }
}

/// [`dot_block`] for exactly `R` weight rows and `N` activation rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn dot_block_vnni<const R: usize, const N: usize>(
    ws: &[Row<'_>],
    xs: &[ActRow<'_>],
    out: &mut [f32],
    stride: usize,
) {
    use std::arch::x86_64::*;
    let (ws, xs) = (&ws[..R], &xs[..N]);
    let pairs = ws[0].scale.len() / 2;
    let spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    let low = _mm256_set1_epi8(0x0F);
    let mut acc = [[_mm512_setzero_ps(); N]; R];
    for p in 0..pairs {
        let mut w = [_mm512_setzero_si512(); R];
        let mut d = [_mm512_setzero_ps(); R];
        for r in 0..R {
            let row = &ws[r];
            // SAFETY (all loads): pair `p` lies inside every row's slices, whose lengths are
            // whole pairs of blocks.
            w[r] = match row.width {
                Width::Bytes => unsafe {
                    _mm512_loadu_si512(row.qs.as_ptr().add(p * 2 * BLOCK).cast())
                },
                Width::Nibbles => {
                    let v = unsafe {
                        _mm256_loadu_si256(row.qs.as_ptr().add(p * BLOCK).cast::<__m256i>())
                    };
                    let lo = _mm256_and_si256(v, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                    // [lo₀ lo₁ hi₀ hi₁] → [lo₀ hi₀ lo₁ hi₁]: block 0's 32 inputs, then block 1's.
                    let both = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                    _mm512_shuffle_i64x2(both, both, 0b11_01_10_00)
                }
            };
            // The weight scales of the pair, each over its block's eight lanes; the
            // activations' scales come spread that way already.
            let pair = unsafe { pair_ps(row.scale, p) };
            d[r] = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(pair));
        }
        for t in 0..N {
            let x = &xs[t];
            let xv = unsafe { _mm512_loadu_si512(x.qs.as_ptr().add(p * 2 * BLOCK).cast()) };
            let e = unsafe { _mm512_loadu_ps(x.spread.as_ptr().add(p * 16)) };
            for r in 0..R {
                let dp = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[r], xv);
                let scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(dp), e);
                acc[r][t] = _mm512_fmadd_ps(scaled, d[r], acc[r][t]);
            }
        }
    }
    for r in 0..R {
        for t in 0..N {
            // The offset term `Σ m·e·Σp` over blocks, sixteen at a time.
            let (m, ss) = (ws[r].offset, xs[t].scaled_sum);
            let mut off = _mm512_setzero_ps();
            for at in (0..m.len()).step_by(16) {
                let mask: __mmask16 = if m.len() - at >= 16 {
                    0xFFFF
                } else {
                    (1u16 << (m.len() - at)) - 1
                };
                // SAFETY: the mask covers elements `at..m.len()` only (`ss` is as long as `m`).
                let (mv, sv) = unsafe {
                    (
                        _mm512_maskz_loadu_ps(mask, m.as_ptr().add(at)),
                        _mm512_maskz_loadu_ps(mask, ss.as_ptr().add(at)),
                    )
                };
                off = _mm512_fmadd_ps(mv, sv, off);
            }
            out[r * stride + t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][t], off));
        }
    }
}

/// Elements `2p` and `2p + 1` of `v` in the low half of a vector (the upper half is zero).
///
/// # Safety
/// `v` must hold at least `2p + 2` elements, and the CPU must have SSE2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn pair_ps(v: &[f32], p: usize) -> std::arch::x86_64::__m128 {
    use std::arch::x86_64::*;
    unsafe { _mm_castsi128_ps(_mm_loadl_epi64(v.as_ptr().add(2 * p).cast())) }
}

/// Activation rows quantized per block: `x ≈ scale · qs`, with `scaled_sum = scale · Σ qs`;
/// `spread` repeats each block's scale eight times (one per 32-bit lane of the block's products
/// in the kernel).
struct Activations {
    blocks: usize,
    qs: Vec<i8>,
    scale: Vec<f32>,
    scaled_sum: Vec<f32>,
    spread: Vec<f32>,
}

/// One row of [`Activations`].
struct ActRow<'a> {
    qs: &'a [i8],
    scale: &'a [f32],
    scaled_sum: &'a [f32],
    spread: &'a [f32],
}

impl Activations {
    /// Quantizes `x: (rows, cols)`; blocks past `cols` (padding) are zero.
    fn quantize(x: &[f32], rows: usize, cols: usize, blocks: usize) -> Self {
        let mut a = Self {
            blocks,
            qs: vec![0; rows * blocks * BLOCK],
            scale: vec![0.0; rows * blocks],
            scaled_sum: vec![0.0; rows * blocks],
            spread: vec![0.0; rows * blocks * LANES],
        };
        for r in 0..rows {
            let row = &x[r * cols..(r + 1) * cols];
            for (b, chunk) in row.chunks_exact(BLOCK).enumerate() {
                let at = r * blocks + b;
                let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                let mut sum = 0i32;
                for (q, v) in a.qs[at * BLOCK..(at + 1) * BLOCK].iter_mut().zip(chunk) {
                    // Rounds half away from zero, as `f32::round`, without a libm call.
                    let y = v * inv;
                    *q = (y + 0.5f32.copysign(y)) as i8;
                    sum += *q as i32;
                }
                a.scale[at] = d;
                a.scaled_sum[at] = d * sum as f32;
                a.spread[at * LANES..(at + 1) * LANES].fill(d);
            }
        }
        a
    }

    fn row(&self, r: usize) -> ActRow<'_> {
        let blocks = r * self.blocks..(r + 1) * self.blocks;
        ActRow {
            qs: &self.qs[blocks.start * BLOCK..blocks.end * BLOCK],
            scale: &self.scale[blocks.clone()],
            scaled_sum: &self.scaled_sum[blocks.clone()],
            spread: &self.spread[blocks.start * LANES..blocks.end * LANES],
        }
    }
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
    /// stores them, activations as quantized) up to float rounding, for every packed type and for
    /// row counts around the tile and item sizes.
    #[test]
    fn packed_product_matches_the_dequantized_product() {
        let (n, k) = (37, 96); // three blocks per row: the padding block is exercised
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&weights(n, k), dtype).expect("quantize");
            let packed = PackedMatrix::from_qtensor(&q).expect("pack");
            let w = q.dequantize(&Device::Cpu).expect("dequantize");
            let w = w.to_vec2::<f32>().expect("values");
            for (r, row) in w.iter().enumerate() {
                let mine = packed.dequantize_row(r);
                for (a, b) in mine.iter().zip(row) {
                    assert!((a - b).abs() < 1e-6, "{dtype:?} row {r}: {a} vs {b}");
                }
            }
            for m in [1, 3, 4, 9, 17] {
                let x = inputs(m, k);
                let acts = Activations::quantize(&x, m, k, packed.blocks);
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
                        let scalar = packed.row(j).dot_scalar(&acts.row(r));
                        assert!((g - scalar).abs() <= 1e-4 * (1.0 + exact.abs()));
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
        let both = PackedMatrix::matmul_shared(&[&a, &b], &x, 5);
        assert_eq!(both, vec![a.matmul(&x, 5), b.matmul(&x, 5)]);
    }

    #[test]
    fn other_types_and_ragged_inputs_are_refused() {
        let q = QTensor::quantize(&weights(4, 256), GgmlDType::Q4K).expect("quantize");
        assert!(PackedMatrix::from_qtensor(&q).is_err());
        assert!(packs(GgmlDType::Q4_1) && !packs(GgmlDType::Q6K));
    }
}
