//! Host-side kernels of the serving step on the CPU: the parts of a batched forward that are too
//! small or too irregular for one tensor op each (per-group dense deltas, per-row attention,
//! softmax), and the worker pool and buffers they share.
//!
//! They run on candle's own worker pool, the one its matmuls use, so a step never has two thread
//! pools competing for the same cores (on a 2-core machine a second spinning pool halves the
//! speed of both).

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{Storage, Tensor};

use super::prefetch::Lines;

/// Calls `f` with `t`'s values when it is a contiguous f32 tensor in host memory; `None` for any
/// other tensor (GPU, other dtype, strided view), where callers use tensor ops instead.
pub fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    host_values(&storage, layout).map(f)
}

/// [`with_slice`] for several distinct tensors at once: `None` unless every one is a contiguous
/// f32 tensor in host memory.
pub fn with_slices<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Option<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let slices: Option<Vec<&[f32]>> = guards
        .iter()
        .map(|(storage, layout)| host_values(storage, layout))
        .collect();
    slices.map(|s| f(&s))
}

/// The values a contiguous f32 host tensor's layout covers in its storage.
fn host_values<'s>(storage: &'s Storage, layout: &candle_core::Layout) -> Option<&'s [f32]> {
    let Storage::Cpu(cpu) = storage else {
        return None;
    };
    let (start, end) = layout.contiguous_offsets()?;
    cpu.as_slice::<f32>().ok()?.get(start..end)
}

pub(crate) use crate::wide::wide_fn;

/// Threads of candle's worker pool, the calling thread included (read once: candle counts the
/// CPUs from `/proc/cpuinfo` on every call).
pub fn threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| candle_core::utils::get_num_threads().max(1))
}

/// Runs `f(i)` for every `i` in `0..items`, spread over candle's worker pool.
pub fn par_for(items: usize, f: impl Fn(usize) + Sync) {
    match items {
        0 => {}
        1 => f(0),
        _ => candle_core::utils::barrier_pool().execute_chunked(items, |range| range.for_each(&f)),
    }
}

/// Runs `f(part, i)` for every item `i` in `0..counts[part]` of every part, the items of all
/// parts spread over the pool together (several products that read the same input).
pub fn par_for_parts(counts: &[usize], f: impl Fn(usize, usize) + Sync) {
    par_for(counts.iter().sum(), |item| {
        let (part, i) = part_of(counts, item);
        f(part, i);
    });
}

/// The part and the index within it of item `item` of parts of `counts` items laid end to end.
pub fn part_of(counts: &[usize], mut item: usize) -> (usize, usize) {
    for (part, &count) in counts.iter().enumerate() {
        if item < count {
            return (part, item);
        }
        item -= count;
    }
    panic!("item past the last part");
}

/// An item of one of two lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Either {
    First(usize),
    Second(usize),
}

/// Runs `f` on every item of two lists, of `first` and `second` items, over the pool, each list
/// in its order. About a quarter of the threads (one of two) take the second list's items first
/// and the others the first list's; a thread whose list is done goes on with the other's. Meant
/// for a compute-bound first list and a second list bound by memory (the base product's groups
/// and the deltas streaming beside them): a streaming thread draws most of the machine's memory
/// bandwidth on its own, so one thread streams while the others compute, instead of every thread
/// waiting on memory at once.
pub fn par_lists(first: usize, second: usize, f: impl Fn(Either) + Sync) {
    let threads = threads();
    // The first list in runs of adjacent items, about an eighth of a thread's share each and
    // shorter near the list's end (adjacent groups are adjacent weights: one run is one stream
    // for the hardware prefetcher); the second list's items, long streams each, one at a time.
    let run = first.div_ceil(threads * 8).max(1);
    let next = [AtomicUsize::new(0), AtomicUsize::new(0)];
    let take = |second_list: bool| {
        let (cursor, len) = match second_list {
            false => (&next[0], first),
            true => (&next[1], second),
        };
        let step = |start: usize| match second_list {
            false => guided_run(run, len - start, threads),
            true => 1,
        };
        while let Some(items) = claim(cursor, len, step) {
            for i in items {
                f(if second_list {
                    Either::Second(i)
                } else {
                    Either::First(i)
                });
            }
        }
    };
    let streaming = threads.div_ceil(4);
    par_for(threads, |role| {
        let streams = role < streaming;
        take(streams);
        take(!streams);
    });
}

/// The next run of a list's items for one thread: `run` items while many are left, then an even
/// share of what is left, so that the threads finish together (a fixed run left one thread
/// waiting up to a whole run at the end of every pass: for the 49,152-row head on 16 rows,
/// about half a millisecond).
fn guided_run(run: usize, left: usize, threads: usize) -> usize {
    run.min(left.div_ceil(2 * threads)).max(1)
}

/// Takes the next `step(start)` items of a list of `len` from `cursor`, or `None` when none are
/// left.
fn claim(
    cursor: &AtomicUsize,
    len: usize,
    step: impl Fn(usize) -> usize,
) -> Option<std::ops::Range<usize>> {
    let mut start = cursor.load(Ordering::Relaxed);
    loop {
        if start >= len {
            return None;
        }
        let end = len.min(start + step(start));
        match cursor.compare_exchange_weak(start, end, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return Some(start..end),
            Err(now) => start = now,
        }
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
    /// The first `lens[i]` positions of buffer `i` (within its capacity).
    fn over(bufs: &'a mut [Vec<f32>], lens: &[usize]) -> Self {
        Self {
            bufs: (bufs.iter_mut().zip(lens))
                .map(|(b, &n)| {
                    assert!(n <= b.capacity(), "scatter over {n} of {}", b.capacity());
                    (SendPtr(b.as_mut_ptr()), n)
                })
                .collect(),
            _borrow: std::marker::PhantomData,
        }
    }

    /// Positions `at..at + len` of buffer `buf` to write in place (panics when out of bounds).
    ///
    /// # Safety
    /// While the slice lives, no other call, from any thread, may write or hand out any of
    /// these positions.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, buf: usize, at: usize, len: usize) -> &mut [f32] {
        let (ptr, n) = self.bufs[buf];
        assert!(at + len <= n, "scatter slice {at}+{len} of {n}");
        // SAFETY: in bounds (checked), the buffer is mutably borrowed for `'a`, and the caller
        // guarantees these positions have no other user.
        unsafe { std::slice::from_raw_parts_mut(ptr.get().add(at), len) }
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

    /// [`Self::write_slice`] for a length known when compiling: a few vector stores where a
    /// slice of unknown length is a call to `memcpy` (a product's tiles are millions of short
    /// writes per step).
    ///
    /// # Safety
    /// As [`Self::write_slice`].
    #[inline(always)]
    pub unsafe fn write_array<const N: usize>(&self, buf: usize, at: usize, values: &[f32; N]) {
        let (ptr, len) = self.bufs[buf];
        assert!(at + N <= len, "scatter write {at}+{N} of {len}");
        // SAFETY: as in `write_slice`.
        unsafe {
            ptr.get()
                .add(at)
                .cast::<[f32; N]>()
                .write_unaligned(*values)
        };
    }
}

/// Buffers of `lens` floats that `fill` writes through a [`Scatter`], not zeroed first (a
/// batched step's projection outputs are megabytes per step, every value of which the product
/// writes anyway).
///
/// # Safety
/// `fill` writes every position of every buffer, or panics.
pub unsafe fn scattered(lens: &[usize], fill: impl FnOnce(&Scatter<'_>)) -> Vec<Vec<f32>> {
    let mut bufs: Vec<Vec<f32>> = lens.iter().map(|&n| Vec::with_capacity(n)).collect();
    fill(&Scatter::over(&mut bufs, lens));
    for (b, &n) in bufs.iter_mut().zip(lens) {
        // SAFETY: the capacity is `n`, and `fill` returned, having written all `n` values (the
        // caller's guarantee); had it panicked the buffers would be dropped empty.
        unsafe { b.set_len(n) };
    }
    bufs
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

wide_fn! {
    /// `y += x` (the same sums as `axpy(y, 1.0, x)`, on the widest vectors the CPU has).
    pub fn add_assign(y: &mut [f32], x: &[f32]) {
        y.iter_mut().zip(x).for_each(|(y, x)| *y += x);
    }
}

wide_fn! {
    /// `acc[k · stride] = x_r · w` for the `k`-th row `r` of `rows`, `x: (·, w.len())`, with
    /// [`dot`].
    pub fn dot_rows(acc: &mut [f32], stride: usize, x: &[f32], rows: &[u32], w: &[f32]) {
        let in_dim = w.len();
        for (k, &r) in rows.iter().enumerate() {
            let r = r as usize;
            acc[k * stride] = dot(&x[r * in_dim..(r + 1) * in_dim], w);
        }
    }
}

/// Softmax of `x` in place, with [`exp`] (vectorized) and the sum in sixteen lanes.
#[inline(always)]
pub fn softmax(x: &mut [f32]) {
    let max = max_lanes(x);
    x.iter_mut().for_each(|v| *v = exp(*v - max));
    let sum = sum_lanes(x);
    x.iter_mut().for_each(|v| *v /= sum);
}

/// The largest value of `x` that is not NaN (−∞ when there is none), as `f32::max` folds it,
/// kept in sixteen lanes so the loop vectorizes (`f32::max` itself is a scalar loop).
#[inline(always)]
fn max_lanes(x: &[f32]) -> f32 {
    let pick = |m: f32, v: f32| if v > m { v } else { m };
    let mut acc = [f32::NEG_INFINITY; LANES];
    let (chunks, tail) = x.as_chunks::<LANES>();
    for chunk in chunks {
        for i in 0..LANES {
            acc[i] = pick(acc[i], chunk[i]);
        }
    }
    tail.iter()
        .chain(&acc)
        .fold(f32::NEG_INFINITY, |m, &v| pick(m, v))
}

/// Lanes of the sixteen-lane sums: one 512-bit register of f32.
const LANES: usize = 16;

/// `Σ a·b` in sixteen lanes (lane `i` sums the products at `i mod 16`), the lanes then summed
/// by halves, then the tail past the last full sixteen. The AVX-512 path (taken where the CPU has
/// it) adds in exactly this order; the compiler's own vectorizer splits such reductions into
/// two-lane pieces.
#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { lanes_avx512::dot(a, b) };
    }
    let mut acc = [0f32; LANES];
    let ((a16, a_tail), (b16, b_tail)) = (a.as_chunks::<LANES>(), b.as_chunks::<LANES>());
    for (x, y) in a16.iter().zip(b16) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(x, y)| x * y).sum();
    halves(acc) + tail
}

/// `Σ x` in the order of [`dot_lanes`].
#[inline(always)]
fn sum_lanes(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { lanes_avx512::sum(x) };
    }
    let mut acc = [0f32; LANES];
    let (chunks, tail) = x.as_chunks::<LANES>();
    for chunk in chunks {
        for i in 0..LANES {
            acc[i] += chunk[i];
        }
    }
    halves(acc) + tail.iter().sum::<f32>()
}

/// The sum of sixteen lanes by halves: `a[i] + a[i + 8]`, then `+ 4`, `+ 2`, `+ 1`.
#[inline(always)]
pub fn halves(mut a: [f32; LANES]) -> f32 {
    for i in 0..8 {
        a[i] += a[i + 8];
    }
    for i in 0..4 {
        a[i] += a[i + 4];
    }
    for i in 0..2 {
        a[i] += a[i + 2];
    }
    a[0] + a[1]
}

/// The AVX-512 paths of [`dot_lanes`] and [`sum_lanes`], in their order of additions.
#[cfg(target_arch = "x86_64")]
pub mod lanes_avx512 {
    use std::arch::x86_64::*;

    use super::LANES;

    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let full = n - n % LANES;
        let mut acc = _mm512_setzero_ps();
        for i in (0..full).step_by(LANES) {
            // SAFETY: `i + 16 ≤ n`, within both slices.
            let (x, y) = unsafe {
                (
                    _mm512_loadu_ps(a.as_ptr().add(i)),
                    _mm512_loadu_ps(b.as_ptr().add(i)),
                )
            };
            acc = _mm512_add_ps(acc, _mm512_mul_ps(x, y));
        }
        let tail: f32 = a[full..n].iter().zip(&b[full..n]).map(|(x, y)| x * y).sum();
        halves(acc) + tail
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn sum(x: &[f32]) -> f32 {
        let full = x.len() - x.len() % LANES;
        let mut acc = _mm512_setzero_ps();
        for i in (0..full).step_by(LANES) {
            // SAFETY: `i + 16 ≤ x.len()`.
            acc = _mm512_add_ps(acc, unsafe { _mm512_loadu_ps(x.as_ptr().add(i)) });
        }
        halves(acc) + x[full..].iter().sum::<f32>()
    }

    /// `super::halves` on a register.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub fn halves(v: __m512) -> f32 {
        let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        let eight = _mm256_add_ps(_mm512_castps512_ps256(v), high);
        let four = _mm_add_ps(
            _mm256_castps256_ps128(eight),
            _mm256_extractf128_ps::<1>(eight),
        );
        let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
        _mm_cvtss_f32(_mm_add_ss(two, _mm_shuffle_ps::<1>(two, two)))
    }
}

/// Helpers of the AVX2 kernels (`low_rank`, `panels`): a sixteen-lane vector there is two
/// registers of eight.
#[cfg(target_arch = "x86_64")]
pub mod lanes_avx2 {
    use std::arch::x86_64::*;

    /// The mask of the first `n` lanes of eight (all of them from `n = 8` on), for masked loads
    /// and stores.
    #[inline(always)]
    pub fn first(n: usize) -> __m256i {
        // SAFETY: inlined into AVX2 kernels only, which have the feature.
        unsafe {
            _mm256_cmpgt_epi32(
                _mm256_set1_epi32(n.min(8) as i32),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            )
        }
    }

    /// `super::halves` of a sixteen-lane sum held as its low and high eight lanes.
    #[inline(always)]
    pub fn halves(low: __m256, high: __m256) -> f32 {
        // SAFETY: inlined into AVX2 kernels only, which have the feature.
        unsafe {
            let eight = _mm256_add_ps(low, high);
            let four = _mm_add_ps(
                _mm256_castps256_ps128(eight),
                _mm256_extractf128_ps::<1>(eight),
            );
            let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
            _mm_cvtss_f32(_mm_add_ss(two, _mm_shuffle_ps::<1>(two, two)))
        }
    }
}

/// `e^x` in plain arithmetic, so the loops calling it vectorize (libm's `expf` is a call per
/// value): `e^x = 2^n·e^r` with `n = round(x·log₂e)` and `|r| ≤ ln2/2`, `e^r` by its Taylor
/// polynomial to degree 7 (truncation below 1e-8 relative, so within a few f32 ulps). Inputs
/// are clamped to `[-87, 88]`, where `2^n` stays a normal float.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer without a rounding instruction.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    // `t` is `ROUND + n` exactly, so its low mantissa bits are `n` as an integer: read there
    // rather than by a float-to-integer conversion, which does not vectorize.
    let n_bits = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    p * f32::from_bits(((n_bits + 127) as u32) << 23)
}

/// Bidirectional attention within segments of rows: `q`, `k`, `v` are `(rows, hidden)`
/// row-major (`hidden = heads · head_dim`), and each row of a segment `(start, len)` attends over
/// that segment's rows only. Texts laid end to end are one segment each; padded texts are the
/// segments `(b · width, lens[b])`. Rows in no segment (padding) are zero in the result. One work
/// item per query row (all its heads).
pub fn attend_segments(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    hidden: usize,
    segments: &[(usize, usize)],
    heads: usize,
) -> Vec<f32> {
    let hd = hidden / heads.max(1);
    let rows = q.len() / hidden.max(1);
    let mut owner: Vec<Option<(usize, usize)>> = vec![None; rows];
    for &(start, len) in segments {
        let end = (start + len).min(rows);
        if start < end {
            owner[start..end].fill(Some((start, end - start)));
        }
    }
    let mut out = vec![0f32; q.len()];
    par_chunks(&mut out, hidden.max(1), |row, o| {
        let Some((start, len)) = owner[row] else {
            return;
        };
        let keys = start * hidden..(start + len) * hidden;
        let q = &q[row * hidden..(row + 1) * hidden];
        attend_row(o, q, &k[keys.clone()], &v[keys], len, hd);
    });
    out
}

wide_fn! {
    /// One query row `q` (every head) of [`attend_segments`] over the first `len` rows of `k`
    /// and `v`, into `o`.
    fn attend_row(o: &mut [f32], q: &[f32], k: &[f32], v: &[f32], len: usize, hd: usize) {
        let h = q.len();
        for (head, oh) in o.chunks_exact_mut(hd).enumerate() {
            let at = |j: usize| j * h + head * hd..j * h + (head + 1) * hd;
            let qh = &q[head * hd..(head + 1) * hd];
            attend_heads(oh, qh, hd, len, |j| &k[at(j)], |j| &v[at(j)]);
        }
    }
}

/// Attention of the query heads `qs` (`hd` values each, adjacent) that read the same
/// `positions` key and value rows, into `out` (same layout): scaled dot products, a softmax per
/// head, then the values weighted in order of position. Inlined into `wide_fn!` bodies.
#[inline(always)]
pub fn attend_heads<'a>(
    out: &mut [f32],
    qs: &[f32],
    hd: usize,
    positions: usize,
    key: impl Fn(usize) -> &'a [f32],
    value: impl Fn(usize) -> &'a [f32],
) {
    // Each position's key and value are a few lines somewhere in the cache: ask for the keys a
    // few positions ahead, and for each value while its key is read (see `prefetch`).
    const AHEAD: usize = 4;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut scores = vec![0f32; qs.len() / hd * positions];
    for j in 0..AHEAD.min(positions) {
        Lines::of(key(j)).fetch_all();
    }
    for j in 0..positions {
        if j + AHEAD < positions {
            Lines::of(key(j + AHEAD)).fetch_all();
        }
        Lines::of(value(j)).fetch_all();
        let k = key(j);
        for (h, qh) in qs.chunks_exact(hd).enumerate() {
            scores[h * positions + j] = dot_lanes(qh, k) * scale;
        }
    }
    for head_scores in scores.chunks_exact_mut(positions) {
        softmax(head_scores);
    }
    for j in 0..positions {
        let v = value(j);
        for (h, oh) in out.chunks_exact_mut(hd).enumerate() {
            axpy(oh, scores[h * positions + j], v);
        }
    }
}

/// `erf(x)` as an odd rational function of `x` on `[-4, 4]` (outside it `erf` is ±1 in f32),
/// the minimax form common to XLA and Eigen (error of a few f32 ulps). No `exp`, no branch: the
/// loops calling it vectorize.
#[inline(always)]
fn erf(x: f32) -> f32 {
    const ALPHA: [f32; 7] = [
        -2.726_142_3e-10,
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.954_600_1e-3,
        -1.609_603_3e-2,
    ];
    const BETA: [f32; 5] = [
        -1.456_607_2e-5,
        -2.133_740_6e-4,
        -1.682_827e-3,
        -7.373_329_2e-3,
        -1.426_474e-2,
    ];
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = ALPHA.iter().skip(1).fold(ALPHA[0], |p, &a| p * x2 + a);
    let q = BETA.iter().skip(1).fold(BETA[0], |q, &b| q * x2 + b);
    x * p / q
}

/// GELU in its exact form, `x·Φ(x) = x/2·(1 + erf(x/√2))`, of every value, over candle's worker
/// pool.
pub fn gelu_erf(x: &[f32]) -> Vec<f32> {
    const CHUNK: usize = 4096;
    let mut out = vec![0f32; x.len()];
    par_chunks(&mut out, CHUNK, |i, chunk| {
        gelu_erf_into(chunk, &x[i * CHUNK..])
    });
    out
}

wide_fn! {
    /// [`gelu_erf`] of the first `out.len()` values of `x`, into `out`.
    fn gelu_erf_into(out: &mut [f32], x: &[f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = 0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

/// RMS normalisation of each `weight.len()`-long row of `x`, scaled by `weight`:
/// `v / √(mean(v²) + eps) · w`, as candle's `rms_norm` writes it, with the sum of squares in
/// sixteen lanes ([`dot_lanes`]) instead of one long chain.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let mut out = Vec::new();
    rms_norm_to(&mut out, x, weight, eps);
    out
}

/// [`rms_norm`] into `out`, which takes `x`'s length; a buffer of that length already is used as
/// it is (a step's layers normalize into one buffer rather than allocating and zeroing their
/// own).
pub fn rms_norm_to(out: &mut Vec<f32>, x: &[f32], weight: &[f32], eps: f32) {
    if out.len() != x.len() {
        out.clear();
        out.resize(x.len(), 0.0);
    }
    if weight.is_empty() {
        out.fill(0.0);
    } else {
        rms_norm_into(out, x, weight, eps);
    }
}

wide_fn! {
    /// [`rms_norm`] into `out` (as long as `x`).
    fn rms_norm_into(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
        let dim = weight.len();
        for (o, v) in out.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
            let m = (dot_lanes(v, v) / dim as f32 + eps).sqrt();
            for ((o, &v), &w) in o.iter_mut().zip(v).zip(weight) {
                *o = v / m * w;
            }
        }
    }
}

/// Rotary embedding ("rotate half") of `x: rows × (heads·head_dim)` in place, row `i` by the
/// angles `cos`/`sin: rows × head_dim/2` of its position, with candle's `rope` expressions.
/// `false` (and `x` untouched) when the sizes do not fit together.
pub fn rope_rows(x: &mut [f32], cos: &[f32], sin: &[f32], rows: usize, heads: usize) -> bool {
    let half = x.len() / (rows * heads * 2).max(1);
    let fits = half > 0
        && x.len() == rows * heads * 2 * half
        && cos.len() == rows * half
        && sin.len() == cos.len();
    if fits {
        rope_rows_into(x, cos, sin, half);
    }
    fits
}

wide_fn! {
    /// [`rope_rows`] with `half = head_dim / 2`.
    fn rope_rows_into(x: &mut [f32], cos: &[f32], sin: &[f32], half: usize) {
        let rows = cos.len() / half;
        let width = x.len() / rows.max(1);
        for (row, (c, s)) in x
            .chunks_exact_mut(width)
            .zip(cos.chunks_exact(half).zip(sin.chunks_exact(half)))
        {
            for head in row.chunks_exact_mut(2 * half) {
                let (x1, x2) = head.split_at_mut(half);
                for j in 0..half {
                    let (a, b) = (x1[j], x2[j]);
                    x1[j] = a * c[j] - b * s[j];
                    x2[j] = a * s[j] + b * c[j];
                }
            }
        }
    }
}

/// `silu(gate) · up` element-wise (SwiGLU), spread over the pool; `silu(v) = v / (1 + e^(−v))`
/// with [`exp`], so the loop vectorizes (within a few ulps of candle's `silu`).
pub fn silu_mul(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut out = gate[..gate.len().min(up.len())].to_vec();
    silu_mul_in_place(&mut out, up);
    out
}

/// [`silu_mul`] into `gate` itself (the first `up.len()` values, where `up` is shorter): a
/// decode step's gate projection is not needed after it, so no buffer is allocated and zeroed.
pub fn silu_mul_in_place(gate: &mut [f32], up: &[f32]) {
    const CHUNK: usize = 2048;
    let n = gate.len().min(up.len());
    par_chunks(&mut gate[..n], CHUNK, |i, chunk| {
        silu_mul_into(chunk, &up[i * CHUNK..])
    });
}

wide_fn! {
    /// [`silu_mul`] of the first `gate.len()` values, in place.
    fn silu_mul_into(gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = *g / (1.0 + exp(-*g)) * u;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * seed).sin() * 3.0).collect()
    }

    /// Within a few ulps of candle's op (only the order of the sum of squares differs), for rows
    /// with and without a tail past the last sixteen values.
    #[test]
    fn rms_norm_follows_candles() {
        for dim in [64, 37] {
            let (x, w) = (values(5 * dim, 0.37), values(dim, 0.11));
            let ours = rms_norm(&x, &w, 1e-5);
            let xt = Tensor::from_vec(x, (5, dim), &candle_core::Device::Cpu).unwrap();
            let wt = Tensor::from_vec(w, dim, &candle_core::Device::Cpu).unwrap();
            let theirs: Vec<f32> = candle_nn::ops::rms_norm(&xt, &wt, 1e-5)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (a, b) in ours.iter().zip(&theirs) {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                    "dim {dim}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn lane_max_is_the_max_without_nans() {
        let mut x = values(37, 0.53);
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(max_lanes(&x), max);
        x[3] = f32::NAN;
        x[30] = 9.0;
        assert_eq!(max_lanes(&x), 9.0);
        assert_eq!(max_lanes(&[]), f32::NEG_INFINITY);
        assert_eq!(max_lanes(&[f32::NAN]), f32::NEG_INFINITY);
    }

    /// The same values as candle's rotary embedding, to the bit; sizes that do not fit leave
    /// the input alone.
    #[test]
    fn rope_rows_equal_candles() {
        let (rows, heads, half) = (3, 2, 4);
        let x = values(rows * heads * 2 * half, 0.29);
        let (cos, sin) = (values(rows * half, 0.7), values(rows * half, 1.3));
        let mut ours = x.clone();
        assert!(rope_rows(&mut ours, &cos, &sin, rows, heads));
        let cpu = candle_core::Device::Cpu;
        let xt = Tensor::from_vec(x.clone(), (1, rows, heads, 2 * half), &cpu).unwrap();
        let ct = Tensor::from_vec(cos.clone(), (rows, half), &cpu).unwrap();
        let st = Tensor::from_vec(sin.clone(), (rows, half), &cpu).unwrap();
        let theirs: Vec<f32> = candle_nn::rotary_emb::rope_thd(&xt, &ct, &st)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(ours, theirs);
        let mut odd = x.clone();
        assert!(!rope_rows(&mut odd, &cos[1..], &sin, rows, heads));
        assert_eq!(odd, x);
    }

    #[test]
    fn every_item_of_every_part_runs_once() {
        use std::sync::Mutex;
        let counts = [3, 0, 5, 0, 0, 2];
        let seen = Mutex::new(Vec::new());
        par_for_parts(&counts, |part, item| {
            seen.lock().unwrap().push((part, item))
        });
        let mut seen = seen.into_inner().unwrap();
        seen.sort();
        let want: Vec<(usize, usize)> = (counts.iter().enumerate())
            .flat_map(|(part, &n)| (0..n).map(move |item| (part, item)))
            .collect();
        assert_eq!(seen, want);
    }
    use candle_core::Device;

    /// [`exp`] is within 4 ulps of libm's over the whole clamped range, and softmax rows sum to
    /// one with every length's tail handled.
    #[test]
    fn exp_and_softmax_follow_libm() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let (got, want) = (exp(x), x.exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 4.0 * f32::EPSILON, "relative error {worst}");
        assert_eq!(exp(-1000.0), exp(-87.0), "clamped below");
        for len in [1usize, 7, 16, 33] {
            let mut x: Vec<f32> = (0..len).map(|i| (i as f32 * 0.7).sin() * 5.0).collect();
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let total: f32 = x.iter().map(|v| (v - max).exp()).sum();
            let want: Vec<f32> = x.iter().map(|v| (v - max).exp() / total).collect();
            softmax(&mut x);
            for (a, b) in x.iter().zip(&want) {
                assert!((a - b).abs() < 1e-6, "{a} vs {b}");
            }
        }
    }

    /// The sixteen-lane dot product and sum give the same bits on every path and length.
    #[test]
    fn lane_sums_are_the_same_on_every_path() {
        for len in [0usize, 3, 16, 64, 75] {
            let a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..len).map(|i| (i as f32 * 0.91).cos()).collect();
            let mut acc = [0f32; LANES];
            let mut sum = [0f32; LANES];
            let full = len - len % LANES;
            for i in 0..full {
                acc[i % LANES] += a[i] * b[i];
                sum[i % LANES] += a[i];
            }
            let tail: f32 = (full..len).map(|i| a[i] * b[i]).sum();
            let want = halves(acc) + tail;
            assert_eq!(dot_lanes(&a, &b).to_bits(), want.to_bits(), "dot, {len}");
            let want = halves(sum) + a[full..].iter().sum::<f32>();
            assert_eq!(sum_lanes(&a).to_bits(), want.to_bits(), "sum, {len}");
            assert!((dot_lanes(&a, &b) - dot(&a, &b)).abs() < 1e-4);
        }
    }

    /// Every item of both lists runs once, whatever their lengths, and each list's items are
    /// taken in order by each thread.
    #[test]
    fn two_lists_run_every_item_once() {
        use std::sync::Mutex;
        for (a, b) in [(0, 3), (4, 0), (7, 5), (1, 9), (60, 12), (0, 0)] {
            let seen = Mutex::new(Vec::new());
            par_lists(a, b, |e| seen.lock().expect("lock").push(e));
            let mut seen = seen.into_inner().expect("lock");
            seen.sort_by_key(|e| match e {
                Either::First(i) => (0, *i),
                Either::Second(j) => (1, *j),
            });
            let want: Vec<Either> = ((0..a).map(Either::First))
                .chain((0..b).map(Either::Second))
                .collect();
            assert_eq!(seen, want, "{a}, {b}");
        }
        assert_eq!(part_of(&[2, 0, 3], 2), (2, 0));
        assert_eq!(part_of(&[2, 0, 3], 1), (0, 1));
    }

    /// Claimed runs cover a list exactly once, in order, never longer than the run, and shrink
    /// to single items at its end, so no thread is left with a long run when the others are
    /// done.
    #[test]
    fn runs_shrink_toward_the_end_of_a_list() {
        for (len, run, threads) in [(3072, 192, 2), (60, 4, 2), (7, 1, 2), (100, 7, 3)] {
            let cursor = AtomicUsize::new(0);
            let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
            while let Some(items) = claim(&cursor, len, |s| guided_run(run, len - s, threads)) {
                assert_eq!(items.start, runs.iter().map(|r| r.len()).sum::<usize>());
                runs.push(items);
            }
            assert_eq!(runs.iter().map(|r| r.len()).sum::<usize>(), len);
            assert!(runs.iter().all(|r| (1..=run).contains(&r.len())));
            assert!(
                runs.windows(2).all(|w| w[1].len() <= w[0].len()),
                "{runs:?}"
            );
            assert_eq!(runs.last().map(|r| r.len()), Some(1));
            // The last `threads` runs together hold little more than one run's share.
            let tail: usize = runs.iter().rev().take(threads).map(|r| r.len()).sum();
            assert!(tail <= threads, "{len}: the tail {tail}");
        }
        assert_eq!(claim(&AtomicUsize::new(5), 5, |_| 1), None);
    }

    /// Each real row equals softmax(q·kᵀ/√d)·v over its own text's real positions; padded rows
    /// are zero.
    #[test]
    fn padded_attention_reads_only_each_texts_real_tokens() {
        let (width, heads, hd) = (4, 2, 3);
        let lens = [3, 1];
        let h = heads * hd;
        let n = lens.len() * width * h;
        let q: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let k: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.23).sin()).collect();
        // Huge values at padded positions would show if they were read.
        for (b, &len) in lens.iter().enumerate() {
            for p in len..width {
                v[(b * width + p) * h..(b * width + p + 1) * h].fill(1e6);
            }
        }
        let segments: Vec<(usize, usize)> = lens
            .iter()
            .enumerate()
            .map(|(b, &len)| (b * width, len))
            .collect();
        let out = attend_segments(&q, &k, &v, h, &segments, heads);
        for (b, &len) in lens.iter().enumerate() {
            for i in 0..width {
                let row = b * width + i;
                for head in 0..heads {
                    let col = |r: usize, c: usize| r * h + head * hd + c;
                    let logits: Vec<f64> = (0..len)
                        .map(|j| {
                            let r = b * width + j;
                            (0..hd)
                                .map(|c| (q[col(row, c)] * k[col(r, c)]) as f64)
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let max = logits.iter().copied().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                    let total: f64 = e.iter().sum();
                    for c in 0..hd {
                        let expected = if i < len {
                            (0..len)
                                .map(|j| e[j] / total * v[col(b * width + j, c)] as f64)
                                .sum::<f64>()
                        } else {
                            0.0
                        };
                        let got = out[col(row, c)] as f64;
                        assert!(
                            (got - expected).abs() < 1e-5,
                            "text {b} row {i}: {got} vs {expected}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn silu_mul_matches_candles_silu_times_up() {
        let gate: Vec<f32> = (0..5000).map(|i| (i as f32 * 0.013).sin() * 6.0).collect();
        let up: Vec<f32> = (0..5000).map(|i| (i as f32 * 0.007).cos()).collect();
        let g = Tensor::new(gate.as_slice(), &Device::Cpu).unwrap();
        let u = Tensor::new(up.as_slice(), &Device::Cpu).unwrap();
        let want: Vec<f32> = (g.silu().unwrap() * u).unwrap().to_vec1().unwrap();
        for (got, want) in silu_mul(&gate, &up).iter().zip(&want) {
            assert!(
                (got - want).abs() <= 4.0 * f32::EPSILON * want.abs().max(1e-6),
                "{got} vs {want}"
            );
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
