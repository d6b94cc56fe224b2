//! Attention over the KV cache: each query row over its own sequence's blocks.
//!
//! A row's query heads that share a KV head are one work item (one per query head when the rows
//! are few), so each key and value is read once for all of them. Per block of sixteen positions,
//! a head's scores are one sixteen-lane sum over its dimensions (the keys are stored dimension by
//! dimension), then a softmax, then its weighted values sixteen dimensions at a time, kept in
//! registers over every position ([`lanes`]). With sixteen rows attention is bound by reading
//! the cache, which is why a quantized model's cache holds f16.

use super::{BLOCK_POSITIONS, Blocks, SeqCache};
use crate::engine::host;
use crate::engine::prefetch::Lines;

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
    let kernels = lanes::Kernels::detect();
    host::par_chunks(&mut out, per * hd, |i, group_out| {
        let (row, h0) = (&rows[i * per / heads], i * per % heads);
        let kv_head = h0 / n_rep;
        let qs = &q[i * per * hd..(i + 1) * per * hd];
        match &row.cache.blocks {
            Blocks::F32(blocks) => attend_rows(kernels, group_out, qs, row, blocks, layer, kv_head),
            Blocks::F16(blocks) => attend_rows(kernels, group_out, qs, row, blocks, layer, kv_head),
        }
    });
    out
}

/// The query heads `qs` (adjacent, `head_dim` each, sharing `kv_head`) of one row of [`attend`],
/// whose cache's blocks are `cache_blocks`, into `out`: scaled scores a block of positions at a
/// time, a softmax per head, then the values weighted by it. Each head's sums run in one fixed
/// order, whatever other heads share the call and whichever `kernels` this CPU runs.
fn attend_rows<T: lanes::Value>(
    kernels: lanes::Kernels,
    out: &mut [f32],
    qs: &[f32],
    row: &QueryRow<'_>,
    cache_blocks: &[Box<[T]>],
    layer: usize,
    kv_head: usize,
) {
    let shape = row.cache.shape;
    let hd = shape.head_dim;
    let run = |values: bool, block: usize| {
        let at = shape.run(layer, values, kv_head);
        &cache_blocks[block][at..at + BLOCK_POSITIONS * hd]
    };
    let positions = row.position + 1;
    let blocks = positions.div_ceil(BLOCK_POSITIONS);
    let width = blocks * BLOCK_POSITIONS;
    let scale = 1.0 / (hd as f32).sqrt();
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
    softmax_heads(&mut scores, width, positions);
    for (s, o) in scores.chunks_exact(width).zip(out.chunks_exact_mut(hd)) {
        kernels.weighted_values(o, &s[..positions], &values);
    }
}

host::wide_fn! {
    /// The softmax of each head's first `positions` scores (`width` scores per head).
    fn softmax_heads(scores: &mut [f32], width: usize, positions: usize) {
        for s in scores.chunks_exact_mut(width) {
            host::softmax(&mut s[..positions]);
        }
    }
}

/// The two sums of the attention of one head over a sequence's blocks, on sixteen lanes (one
/// block's positions, or sixteen of a head's dimensions), in a portable form and an AVX-512 one
/// that computes the same values: the same products, added in the same order, none fused. The
/// cache's values are f32 or f16 (`Value`); either is widened to f32 exactly as it is read.
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
        Avx2,
        #[cfg(target_arch = "x86_64")]
        Avx512,
    }

    impl Kernels {
        pub fn detect() -> Self {
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                if has!("avx512f") {
                    return Kernels::Avx512;
                }
                if has!("avx2") && has!("f16c") {
                    return Kernels::Avx2;
                }
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
                // SAFETY: the CPU has AVX2 and F16C; the lengths are checked above.
                #[cfg(target_arch = "x86_64")]
                Kernels::Avx2 => unsafe { avx2::block_scores(out, q, keys, scale) },
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
                // SAFETY: as above, with AVX2 and F16C.
                #[cfg(target_arch = "x86_64")]
                Kernels::Avx2 if hd.is_multiple_of(LANES) => unsafe {
                    avx2::weighted_values(out, weights, values)
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

    /// The AVX-512 kernels' sums on AVX2: a sixteen-lane vector is two registers of eight, and
    /// every lane sees the same products and sums in the same order.
    #[cfg(target_arch = "x86_64")]
    mod avx2 {
        use std::arch::x86_64::*;

        use super::{LANES, Value};

        /// Sixteen lanes as two registers.
        type Wide = [__m256; 2];

        /// Sixteen values from `p` on, widened to f32.
        ///
        /// # Safety
        /// The CPU has AVX2 and F16C; sixteen values from `p` on are readable.
        #[target_feature(enable = "avx2,f16c")]
        #[inline]
        unsafe fn load<T: Value>(p: *const T) -> Wide {
            // SAFETY: the caller's guarantee.
            std::array::from_fn(|h| unsafe {
                if T::HALF {
                    _mm256_cvtph_ps(_mm_loadu_si128(p.cast::<u16>().add(8 * h).cast()))
                } else {
                    _mm256_loadu_ps(p.cast::<f32>().add(8 * h))
                }
            })
        }

        /// `acc[i mod 4] += xs[i] · v(i)` for every `i` of `xs`, in order, one product then
        /// one sum (none fused).
        #[target_feature(enable = "avx2,f16c")]
        #[inline]
        fn add_products(acc: &mut [Wide; 4], xs: &[f32], v: impl Fn(usize) -> Wide) {
            for (i, &x) in xs.iter().enumerate() {
                let (x, v) = (_mm256_set1_ps(x), v(i));
                for (a, v) in acc[i % 4].iter_mut().zip(v) {
                    *a = _mm256_add_ps(*a, _mm256_mul_ps(x, v));
                }
            }
        }

        /// `(acc[0] + acc[1]) + (acc[2] + acc[3])`.
        #[target_feature(enable = "avx2,f16c")]
        #[inline]
        fn pairwise(acc: &[Wide; 4]) -> Wide {
            std::array::from_fn(|h| {
                let (a, b) = (
                    _mm256_add_ps(acc[0][h], acc[1][h]),
                    _mm256_add_ps(acc[2][h], acc[3][h]),
                );
                _mm256_add_ps(a, b)
            })
        }

        /// See [`super::Kernels::block_scores`].
        ///
        /// # Safety
        /// The CPU has AVX2 and F16C; `out` has [`LANES`] values and `keys` at least `q.len()`
        /// rows of them.
        #[target_feature(enable = "avx2,f16c")]
        pub unsafe fn block_scores<T: Value>(out: &mut [f32], q: &[f32], keys: &[T], scale: f32) {
            let mut acc = [[_mm256_setzero_ps(); 2]; 4];
            // SAFETY: `d < q.len()`: a row of `keys` (the caller's guarantee).
            add_products(&mut acc, q, |d| unsafe {
                load(keys.as_ptr().add(d * LANES))
            });
            for (h, sum) in pairwise(&acc).into_iter().enumerate() {
                let scores = _mm256_mul_ps(sum, _mm256_set1_ps(scale));
                // SAFETY: `out` has `LANES` values.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(8 * h), scores) };
            }
        }

        /// See [`super::Kernels::weighted_values`].
        ///
        /// # Safety
        /// The CPU has AVX2 and F16C; `out.len()` is a multiple of [`LANES`], and `values` has
        /// a block of [`LANES`] rows of `out.len()` values for every [`LANES`] weights.
        #[target_feature(enable = "avx2,f16c")]
        pub unsafe fn weighted_values<T: Value>(out: &mut [f32], weights: &[f32], values: &[&[T]]) {
            let hd = out.len();
            for c in (0..hd).step_by(LANES) {
                let mut acc = [[_mm256_setzero_ps(); 2]; 4];
                for (block, w) in weights.chunks(LANES).enumerate() {
                    let base = values[block].as_ptr();
                    // SAFETY: `slot < LANES` rows of `hd` values, `c + LANES ≤ hd`.
                    add_products(&mut acc, w, |slot| unsafe { load(base.add(slot * hd + c)) });
                }
                for (h, sum) in pairwise(&acc).into_iter().enumerate() {
                    // SAFETY: `c + LANES ≤ hd = out.len()`.
                    unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(c + 8 * h), sum) };
                }
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

        /// `acc[i mod 4] += xs[i] · v(i)` for every `i` of `xs`, in order.
        #[target_feature(enable = "avx512f")]
        #[inline]
        fn add_products(acc: &mut [__m512; 4], xs: &[f32], v: impl Fn(usize) -> __m512) {
            let (quads, rest) = xs.as_chunks::<4>();
            for (i, quad) in quads.iter().enumerate() {
                for k in 0..4 {
                    add_product(&mut acc[k], quad[k], v(i * 4 + k));
                }
            }
            for (k, &x) in rest.iter().enumerate() {
                add_product(&mut acc[k], x, v(quads.len() * 4 + k));
            }
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
            add_products(&mut acc, q, |d| unsafe {
                load(keys.as_ptr().add(d * LANES))
            });
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
                    add_products(&mut acc, w, |slot| unsafe { load(base.add(slot * hd + c)) });
                }
                // SAFETY: `c + LANES ≤ hd = out.len()`.
                unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(c), pairwise(&acc)) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::super::tests::shape;
    use super::super::{KvPool, KvPrecision, KvShape, SeqCache};
    use super::*;

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

    /// An f16 cache attends within f16 rounding of an f32 one.
    #[test]
    fn an_f16_cache_attends_close_to_f32() {
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
