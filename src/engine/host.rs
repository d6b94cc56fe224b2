//! Host-side kernels of the serving step on the CPU: the parts of a batched forward that are too
//! small or too irregular for one tensor op each (per-group low-rank deltas, per-row attention
//! over paged caches).
//!
//! They run on candle's own worker pool, the one its matmuls use, so a step never has two thread
//! pools competing for the same cores (on a 2-core machine a second spinning pool halves the
//! speed of both).

use candle_core::{Storage, Tensor};

/// Calls `f` with `t`'s values when it is a contiguous f32 tensor in host memory; `None` for any
/// other tensor (GPU, other dtype, strided view), where callers use tensor ops instead.
pub fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    with_slices(&[t], |s| f(s[0]))
}

/// [`with_slice`] for several distinct tensors at once: `None` unless every one is a contiguous
/// f32 tensor in host memory.
pub fn with_slices<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Option<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            return None;
        };
        let (start, end) = layout.contiguous_offsets()?;
        slices.push(cpu.as_slice::<f32>().ok()?.get(start..end)?);
    }
    Some(f(&slices))
}

/// Calls `f` compiled for AVX-512 when this CPU has it, so the loops inlined into it use 512-bit
/// vectors (the crate itself targets baseline x86-64). Results are the same either way: the
/// kernels fix their summation order and no multiply-add is fused.
#[inline(always)]
pub fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, the only feature `wide_avx512` is compiled for.
        return unsafe { wide_avx512(f) };
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn wide_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Runs `f(i)` for every `i` in `0..items`, spread over candle's worker pool.
pub fn par_for(items: usize, f: impl Fn(usize) + Sync) {
    match items {
        0 => {}
        1 => f(0),
        _ => candle_core::utils::barrier_pool().execute_chunked(items, |range| range.for_each(&f)),
    }
}

/// Runs `f(i, chunk)` for every `width`-long chunk of `out` (the last may be shorter), spread
/// over candle's worker pool. Chunks are disjoint, so `f` may write its chunk freely.
pub fn par_chunks(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if width == 0 || out.is_empty() {
        return;
    }
    let len = out.len();
    let base = SendPtr(out.as_mut_ptr());
    par_for(len.div_ceil(width), |i| {
        let start = i * width;
        let n = width.min(len - start);
        // SAFETY: `out` is borrowed mutably for the whole call and item `i` covers
        // `start..start + n` only, which no other item overlaps, so each chunk has exactly one
        // writer; the pool returns only after every item has run.
        let chunk = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), n) };
        f(i, chunk);
    });
}

/// Buffers that the pool's workers fill at positions no two of them share.
pub struct Scatter<'a> {
    bufs: Vec<(SendPtr, usize)>,
    _borrow: std::marker::PhantomData<&'a mut [f32]>,
}

impl<'a> Scatter<'a> {
    pub fn new(bufs: &'a mut [Vec<f32>]) -> Self {
        Self {
            bufs: bufs
                .iter_mut()
                .map(|b| (SendPtr(b.as_mut_ptr()), b.len()))
                .collect(),
            _borrow: std::marker::PhantomData,
        }
    }

    /// Writes `values` at `at..at + values.len()` of buffer `buf` (panics when out of bounds).
    ///
    /// # Safety
    /// While this `Scatter` lives, no two calls, from any threads, may write the same position
    /// of the same buffer.
    pub unsafe fn write_slice(&self, buf: usize, at: usize, values: &[f32]) {
        let (ptr, len) = self.bufs[buf];
        assert!(
            at + values.len() <= len,
            "scatter write {at}+{} of {len}",
            values.len()
        );
        // SAFETY: in bounds (checked), the buffer is mutably borrowed for `'a`, and the caller
        // guarantees these positions have no other writer.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), ptr.get().add(at), values.len()) };
    }
}

/// A raw pointer the pool's workers may share (see [`par_chunks`]).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);

// SAFETY: the pointer is only dereferenced at positions with one writer each while the owning
// slice is mutably borrowed (`par_chunks`, `Scatter`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Dot product with eight independent accumulators (vectorised by the compiler).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `y += a · x`.
#[inline(always)]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}

/// A low-rank delta applied to some rows of a batch: `a_t: in_dim × rank` and
/// `b_t: rank × out_dim`, row-major.
pub struct LowRankRows<'a> {
    pub rows: &'a [u32],
    pub a_t: &'a [f32],
    pub b_t: &'a [f32],
}

/// Adds the low-rank update `(x_r · aᵀ) · bᵀ` of each group to each of its rows `r` of
/// `out: (·, out_dim)`, with `x: (·, in_dim)`, all groups in one pass over the pool. A row
/// belongs to one group at most.
pub fn add_low_rank(
    out: &mut [f32],
    x: &[f32],
    groups: &[LowRankRows<'_>],
    in_dim: usize,
    out_dim: usize,
) {
    if in_dim == 0 || out_dim == 0 || groups.is_empty() {
        return;
    }
    let mut owner = vec![usize::MAX; out.len() / out_dim];
    for (g, group) in groups.iter().enumerate() {
        for &r in group.rows {
            owner[r as usize] = g;
        }
    }
    par_chunks(out, out_dim, |r, dst| {
        let Some(g) = groups.get(owner[r]) else {
            return;
        };
        let rank = g.a_t.len() / in_dim;
        if rank == 0 {
            return;
        }
        wide(|| {
            let mut h = vec![0f32; rank];
            let xr = &x[r * in_dim..(r + 1) * in_dim];
            for (&xi, a_row) in xr.iter().zip(g.a_t.chunks_exact(rank)) {
                axpy(&mut h, xi, a_row);
            }
            for (&hj, b_row) in h.iter().zip(g.b_t.chunks_exact(out_dim)) {
                axpy(dst, hj, b_row);
            }
        });
    });
}

/// Adds the dense update `x_r · ΔWᵀ` to row `r` of `out: (·, out_dim)` for every `r` in `rows`,
/// with `x: (·, in_dim)` and `w_t = ΔWᵀ: in_dim × out_dim`, row-major. Work is split over
/// columns, so `ΔW` is read once for all the rows; each row's sums run in the same order
/// whatever the other rows are.
pub fn add_dense(
    out: &mut [f32],
    x: &[f32],
    rows: &[u32],
    w_t: &[f32],
    in_dim: usize,
    out_dim: usize,
) {
    if in_dim == 0 || out_dim == 0 || rows.is_empty() {
        return;
    }
    // Columns per work item: at least eight items per call, whole cache lines.
    let width = (out_dim / 8).next_multiple_of(16).clamp(16, 256);
    let items = out_dim.div_ceil(width);
    let mut update = vec![0f32; rows.len() * out_dim];
    let scatter = Scatter::new(std::slice::from_mut(&mut update));
    par_for(items, |item| {
        let c0 = item * width;
        let n = width.min(out_dim - c0);
        let mut acc = vec![0f32; rows.len() * n];
        wide(|| {
            for (i, w_row) in w_t.chunks_exact(out_dim).enumerate() {
                let w = &w_row[c0..c0 + n];
                for (&r, a) in rows.iter().zip(acc.chunks_exact_mut(n)) {
                    axpy(a, x[r as usize * in_dim + i], w);
                }
            }
        });
        for (k, a) in acc.chunks_exact(n).enumerate() {
            // SAFETY: columns `c0..c0 + n` of every row belong to this item alone.
            unsafe { scatter.write_slice(0, k * out_dim + c0, a) };
        }
    });
    drop(scatter);
    for (&r, u) in rows.iter().zip(update.chunks_exact(out_dim)) {
        let r = r as usize;
        axpy(&mut out[r * out_dim..(r + 1) * out_dim], 1.0, u);
    }
}

/// `erf(x)` by Abramowitz and Stegun's formula 7.1.26 (absolute error below 1.5e-7).
#[inline(always)]
fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152_1,
        1.061_405_4,
    ];
    let z = x.abs();
    let t = 1.0 / (1.0 + P * z);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    (1.0 - poly * (-z * z).exp()).copysign(x)
}

/// GELU in its exact form, `x·Φ(x) = x/2·(1 + erf(x/√2))`, of every value, over candle's worker
/// pool.
pub fn gelu_erf(x: &[f32]) -> Vec<f32> {
    const CHUNK: usize = 4096;
    let mut out = vec![0f32; x.len()];
    par_chunks(&mut out, CHUNK, |i, chunk| {
        wide(|| {
            for (o, &v) in chunk.iter_mut().zip(&x[i * CHUNK..]) {
                *o = 0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
            }
        })
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn low_rank_update_matches_the_matrix_product_on_chosen_rows() {
        let (in_dim, rank, out_dim) = (5, 2, 3);
        let x: Vec<f32> = (0..3 * in_dim).map(|i| i as f32 * 0.1 - 0.4).collect();
        let a_t: Vec<f32> = (0..in_dim * rank).map(|i| (i as f32).sin()).collect();
        let b_t: Vec<f32> = (0..rank * out_dim).map(|i| (i as f32).cos()).collect();
        let mut out = vec![1f32; 3 * out_dim];
        let group = LowRankRows {
            rows: &[2, 0],
            a_t: &a_t,
            b_t: &b_t,
        };
        add_low_rank(&mut out, &x, &[group], in_dim, out_dim);
        for r in 0..3 {
            for o in 0..out_dim {
                let mut expected = 1.0;
                if r != 1 {
                    for j in 0..rank {
                        let h: f32 = (0..in_dim)
                            .map(|i| x[r * in_dim + i] * a_t[i * rank + j])
                            .sum();
                        expected += h * b_t[j * out_dim + o];
                    }
                }
                assert!(
                    (out[r * out_dim + o] - expected).abs() < 1e-5,
                    "row {r} col {o}"
                );
            }
        }
    }

    #[test]
    fn dense_update_matches_the_matrix_product_on_chosen_rows() {
        let (in_dim, out_dim) = (7, 300); // several column items, a short last one
        let x: Vec<f32> = (0..4 * in_dim).map(|i| i as f32 * 0.1 - 0.9).collect();
        let w_t: Vec<f32> = (0..in_dim * out_dim).map(|i| (i as f32).sin()).collect();
        let mut out = vec![1f32; 4 * out_dim];
        add_dense(&mut out, &x, &[3, 0, 2], &w_t, in_dim, out_dim);
        for r in 0..4 {
            for o in 0..out_dim {
                let mut expected = 1.0;
                if r != 1 {
                    expected += (0..in_dim)
                        .map(|i| x[r * in_dim + i] * w_t[i * out_dim + o])
                        .sum::<f32>();
                }
                let got = out[r * out_dim + o];
                assert!(
                    (got - expected).abs() < 1e-5,
                    "row {r} col {o}: {got} vs {expected}"
                );
            }
        }
    }

    #[test]
    fn gelu_matches_candles_exact_gelu() {
        let x: Vec<f32> = (0..20001).map(|i| (i as f32 - 10000.0) / 1000.0).collect();
        let exact = Tensor::new(x.as_slice(), &Device::Cpu)
            .and_then(|t| t.gelu_erf())
            .and_then(|t| t.to_vec1::<f32>())
            .expect("gelu");
        for ((v, mine), e) in x.iter().zip(gelu_erf(&x)).zip(exact) {
            assert!(
                (mine - e).abs() <= 1e-6 * (1.0 + v.abs()),
                "gelu({v}): {mine} vs {e}"
            );
        }
    }

    #[test]
    fn par_chunks_visits_every_chunk_once() {
        let mut out = vec![0f32; 1001];
        par_chunks(&mut out, 10, |i, chunk| {
            chunk.iter_mut().for_each(|v| *v += i as f32)
        });
        for (j, v) in out.iter().enumerate() {
            assert_eq!(*v, (j / 10) as f32);
        }
    }

    #[test]
    fn slices_only_contiguous_host_f32() {
        let t = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .and_then(|t| t.reshape((2, 3)))
            .expect("tensor");
        assert_eq!(
            with_slice(&t, |s| s.to_vec()),
            Some(vec![0., 1., 2., 3., 4., 5.])
        );
        let strided = t.t().expect("transpose");
        assert_eq!(with_slice(&strided, |s| s.len()), None);
        let row = t.narrow(0, 1, 1).expect("narrow");
        assert_eq!(with_slice(&row, |s| s.to_vec()), Some(vec![3., 4., 5.]));
    }
}
