//! Dense deltas with many exact zeros, packed as sixteen-wide masks and their nonzero values.
//!
//! TIES, DARE and DARE-TIES merges keep only a fraction of each adapter's entries (TIES: 20% by
//! default), so a merged `ΔW` is dense in shape but mostly zeros. A batched decode step reads
//! every byte of it for the few rows that use it, so its size is its cost. [`MaskedMatrix`]
//! keeps each output row as one 16-bit mask per sixteen inputs plus the nonzero values in order:
//! `0.125 + 4·d` bytes per entry at density `d` instead of 4, and every kept value exact (f32).
//!
//! A product walks one output row at a time and dots it with each input row in the dense kernel's
//! order ([`host::dot`]: eight lanes, each summing its products in input order, then the lanes in
//! order), so the result is the dense product's, to the bit. On AVX-512 the row is never written
//! out: each mask's values are loaded and put in their sixteen places in a register by one
//! permutation, whose indices come from a 256-entry table per mask byte (`vexpandps`, the
//! instruction made for this, costs several times more on some CPUs), and multiplied with up to
//! four input rows while they sit there. Four rows are a tile; the next tile's values are asked
//! for while one is multiplied (see `prefetch`).

use super::host;

/// Inputs per mask.
const LANES: usize = 16;

/// Above this fraction of nonzero entries the packed form saves too little to pay for its
/// unpacking; the matrix stays dense.
pub const MAX_DENSITY: f64 = 0.75;

/// A `rows × cols` matrix as per-row masks and packed nonzero values.
#[derive(Debug, Clone)]
pub struct MaskedMatrix {
    rows: usize,
    cols: usize,
    /// `rows × cols.div_ceil(LANES)` masks: bit `i` of mask `c` is input `c·LANES + i`.
    masks: Vec<u16>,
    /// Where each row's values start in `values` (`rows + 1` entries).
    starts: Vec<usize>,
    /// The nonzero values in row order, then [`LANES`] zeros, so that sixteen values read from
    /// any row's position stay inside.
    values: Vec<f32>,
}

impl MaskedMatrix {
    /// Packs `w: rows × cols` (row-major), or `None` when more than [`MAX_DENSITY`] of it is
    /// nonzero (or the shape does not match).
    pub fn pack(w: &[f32], rows: usize, cols: usize) -> Option<Self> {
        if w.len() != rows * cols || cols == 0 {
            return None;
        }
        let nonzero = w.iter().filter(|v| **v != 0.0).count();
        if nonzero as f64 > MAX_DENSITY * w.len() as f64 {
            return None;
        }
        let chunks = cols.div_ceil(LANES);
        let mut masks = Vec::with_capacity(rows * chunks);
        let mut starts = Vec::with_capacity(rows + 1);
        let mut values = Vec::with_capacity(nonzero);
        for row in w.chunks_exact(cols) {
            starts.push(values.len());
            for chunk in row.chunks(LANES) {
                let mut mask = 0u16;
                for (i, &v) in chunk.iter().enumerate() {
                    if v != 0.0 {
                        mask |= 1 << i;
                        values.push(v);
                    }
                }
                masks.push(mask);
            }
        }
        starts.push(values.len());
        values.extend([0.0; LANES]);
        Some(Self {
            rows,
            cols,
            masks,
            starts,
            values,
        })
    }

    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The matrix with its zeros back, row-major.
    pub fn to_dense(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols).enumerate() {
            self.unpack_row(r, row);
        }
        out
    }

    /// Writes row `r` into `dst` (`cols` long).
    #[inline(always)]
    fn unpack_row(&self, r: usize, dst: &mut [f32]) {
        let (masks, values) = self.row(r);
        unpack_scalar(masks, values, dst);
    }

    /// `acc[k · n + j]` = the `k`-th row of `rows` of `x: (·, cols)` dotted with output row
    /// `first + j` (`j < n`): the dense kernel's sums ([`host::dot_rows`]), to the bit, each
    /// output row unpacked as it is needed.
    pub fn products(&self, first: usize, n: usize, x: &[f32], rows: &[u32], acc: &mut [f32]) {
        assert!(
            first + n <= self.rows,
            "outputs {first}+{n} of {}",
            self.rows
        );
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("popcnt")
            && self.cols.is_multiple_of(LANES)
        {
            let outputs: Vec<(&[u16], &[f32])> = (first..first + n).map(|o| self.row(o)).collect();
            // SAFETY: the CPU has AVX-512F and POPCNT; each output's `values` holds its masks'
            // set bits and sixteen more values (as `pack` built them), and `masks` covers `cols`
            // inputs, a multiple of 16.
            unsafe { avx512::products(&outputs, x, rows, acc) };
            return;
        }
        let mut scratch = vec![0f32; self.cols];
        for j in 0..n {
            self.unpack_row(first + j, &mut scratch);
            host::dot_rows(&mut acc[j..], n, x, rows, &scratch);
        }
    }

    /// Row `r`'s masks and packed values, followed by [`LANES`] more values (the next rows' or
    /// the padding).
    fn row(&self, r: usize) -> (&[u16], &[f32]) {
        let chunks = self.cols.div_ceil(LANES);
        (
            &self.masks[r * chunks..(r + 1) * chunks],
            &self.values[self.starts[r]..self.starts[r + 1] + LANES],
        )
    }
}

/// Unpacks one row: mask `c` places the next set-bit-count values at inputs `c·LANES + i`.
fn unpack_scalar(masks: &[u16], values: &[f32], dst: &mut [f32]) {
    let mut at = 0;
    for (&mask, chunk) in masks.iter().zip(dst.chunks_mut(LANES)) {
        for (i, d) in chunk.iter_mut().enumerate() {
            *d = if mask & (1 << i) != 0 {
                at += 1;
                values[at - 1]
            } else {
                0.0
            };
        }
    }
}

/// The AVX-512 product of [`MaskedMatrix::products`].
///
/// `host::dot` sums each product in one of eight lanes, each lane in input order: a chain of
/// dependent additions per output and input row. The chains of four outputs and up to four input
/// rows run side by side (one 256-bit register each), so the additions' latency overlaps.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::LANES;
    use crate::engine::prefetch::Lines;

    /// Outputs (packed rows) multiplied side by side.
    const OUTS: usize = 4;
    /// Input rows multiplied side by side.
    const ROWS: usize = 4;

    /// For each mask byte, the index among the byte's set bits of every set bit (0 where unset).
    static PLACES: [[i32; 8]; 256] = places();

    const fn places() -> [[i32; 8]; 256] {
        let mut table = [[0i32; 8]; 256];
        let mut byte = 0;
        while byte < 256 {
            let mut seen = 0;
            let mut bit = 0;
            while bit < 8 {
                if byte & (1 << bit) != 0 {
                    table[byte][bit] = seen;
                    seen += 1;
                }
                bit += 1;
            }
            byte += 1;
        }
        table
    }

    /// The values of `tile` (outputs `tile·OUTS..`), to ask for while the tile before it is
    /// multiplied (see `prefetch`); none past the last tile.
    fn tile_values(outputs: &[(&[u16], &[f32])], tile: usize) -> Lines {
        let (first, end) = (tile * OUTS, ((tile + 1) * OUTS).min(outputs.len()));
        if first >= end {
            return Lines::NONE;
        }
        let last = outputs[end - 1].1;
        // The rows' values are consecutive pieces of one array; the last one's padding is left.
        Lines::spanning(outputs[first].1, &last[..last.len() - LANES])
    }

    /// `acc[k · n + j]` = `host::dot(x_r, w_j)` for the `k`-th row `r` of `rows` and the `j`-th of
    /// the `n` packed rows `outputs` (masks and values, all `cols = masks.len() · 16` long).
    ///
    /// # Safety
    /// The CPU has AVX-512F and POPCNT, and each output's values are at least as many as its
    /// masks' set bits plus 16.
    #[target_feature(enable = "avx512f,popcnt")]
    pub unsafe fn products(outputs: &[(&[u16], &[f32])], x: &[f32], rows: &[u32], acc: &mut [f32]) {
        let n = outputs.len();
        let Some(cols) = outputs.first().map(|o| o.0.len() * LANES) else {
            return;
        };
        let (no_masks, no_values) = (vec![0u16; cols / LANES], [0f32; LANES]);
        let empty = (&no_masks[..], &no_values[..]);
        for (b, block) in rows.chunks(ROWS).enumerate() {
            let xs: Vec<&[f32]> = block
                .iter()
                .map(|&r| &x[r as usize * cols..(r as usize + 1) * cols])
                .collect();
            tile_values(outputs, 0).fetch_all();
            for (t, tile) in outputs.chunks(OUTS).enumerate() {
                // Short tiles are padded with an empty row, whose sums are dropped.
                let mut four = [empty; OUTS];
                four[..tile.len()].copy_from_slice(tile);
                let ahead = tile_values(outputs, t + 1);
                // SAFETY: the caller's guarantees; every row of `xs` is `cols` long.
                let sums = unsafe {
                    match xs.len() {
                        1 => tile_sums::<1>(&four, &xs, ahead),
                        2 => tile_sums::<2>(&four, &xs, ahead),
                        3 => tile_sums::<3>(&four, &xs, ahead),
                        _ => tile_sums::<4>(&four, &xs, ahead),
                    }
                };
                for (k, row) in sums.iter().take(block.len()).enumerate() {
                    for (j, sum) in row.iter().take(tile.len()).enumerate() {
                        acc[(b * ROWS + k) * n + t * OUTS + j] = *sum;
                    }
                }
            }
        }
    }

    /// One packed row's sixteen inputs at chunk `c` in a register, its values from `values[*at..]`
    /// (`*at` moves past them). The sixteen values are read with a plain load: a masked load
    /// costs three times as much on some CPUs (Zen 4).
    ///
    /// # Safety
    /// AVX-512F and POPCNT; `values[*at..]` holds at least 16 values, the first
    /// `mask.count_ones()` of them this chunk's.
    #[target_feature(enable = "avx512f,popcnt")]
    #[inline]
    unsafe fn unpack(mask: u16, values: &[f32], at: &mut usize) -> __m512 {
        let (low, high) = ((mask & 0xff) as usize, (mask >> 8) as usize);
        let count = mask.count_ones() as usize;
        debug_assert!(*at + LANES <= values.len());
        // SAFETY: the table rows are eight i32; `values[at..at + 16]` is in bounds (the caller's
        // guarantee).
        let w = unsafe {
            let first = _mm256_loadu_si256(PLACES[low].as_ptr().cast());
            let second = _mm256_add_epi32(
                _mm256_loadu_si256(PLACES[high].as_ptr().cast()),
                _mm256_set1_epi32(low.count_ones() as i32),
            );
            let places = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(first), second);
            let loaded = _mm512_loadu_ps(values.as_ptr().add(*at));
            _mm512_maskz_permutexvar_ps(mask, places, loaded)
        };
        *at += count;
        w
    }

    /// The products of [`OUTS`] packed rows with `R` input rows: `sums[k][j] = x_k · w_j` (rows
    /// past `R` are zero), asking for the lines of `ahead` along the way.
    ///
    /// # Safety
    /// As [`products`]; `xs` holds `R` rows of `cols` inputs.
    #[target_feature(enable = "avx512f,popcnt")]
    unsafe fn tile_sums<const R: usize>(
        outputs: &[(&[u16], &[f32]); OUTS],
        xs: &[&[f32]],
        ahead: Lines,
    ) -> [[f32; OUTS]; ROWS] {
        let chunks = outputs[0].0.len();
        assert!(xs.len() == R && xs.iter().all(|x| x.len() == chunks * LANES));
        assert!(outputs.iter().all(|o| o.0.len() == chunks));
        let mut acc = [[_mm256_setzero_ps(); OUTS]; R];
        let mut at = [0usize; OUTS];
        for c in 0..chunks {
            ahead.fetch(c, chunks);
            let mut w = [_mm512_setzero_ps(); OUTS];
            for j in 0..OUTS {
                // SAFETY: the caller's guarantee on each output's values.
                w[j] = unsafe { unpack(outputs[j].0[c], outputs[j].1, &mut at[j]) };
            }
            for k in 0..R {
                // SAFETY: inputs `c·16..c·16 + 16` are within every row (asserted above).
                let x = unsafe { _mm512_loadu_ps(xs[k].as_ptr().add(c * LANES)) };
                for j in 0..OUTS {
                    let p = _mm512_mul_ps(x, w[j]);
                    let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(p)));
                    // `host::dot`'s eight lanes: inputs 16c..16c+8, then 16c+8..16c+16.
                    acc[k][j] =
                        _mm256_add_ps(_mm256_add_ps(acc[k][j], _mm512_castps512_ps256(p)), high);
                }
            }
        }
        let mut sums = [[0f32; OUTS]; ROWS];
        for (row, lanes_of) in sums.iter_mut().zip(acc) {
            for (out, sum) in row.iter_mut().zip(lanes_of) {
                let mut lanes = [0f32; 8];
                // SAFETY: eight floats.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
                // As `host::dot` ends: the lanes in order, then its (here empty) tail.
                let tail: f32 = [0f32; 0].iter().sum();
                *out = lanes.iter().sum::<f32>() + tail;
            }
        }
        sums
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `rows × cols` matrix with about a third of its entries nonzero.
    fn sparse(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| {
                if (i * 7919) % 3 == 0 {
                    (i as f32 * 0.37).sin()
                } else {
                    0.0
                }
            })
            .collect()
    }

    #[test]
    fn packing_keeps_every_value_and_position() {
        for cols in [16, 37, 64] {
            let w = sparse(5, cols);
            let m = MaskedMatrix::pack(&w, 5, cols).expect("sparse enough");
            assert_eq!(m.to_dense(), w, "cols {cols}");
            // Without the fixed padding after the values.
            let values = m.values.len() - LANES;
            let packed_bytes = m.masks.len() * 2 + m.starts.len() * 8 + values * 4;
            assert!(
                packed_bytes < w.len() * 4 * 6 / 10,
                "cols {cols}: {packed_bytes} bytes"
            );
            let chunks = cols.div_ceil(LANES);
            let mut scalar = vec![0f32; 5 * cols];
            for (r, row) in scalar.chunks_exact_mut(cols).enumerate() {
                let values = &m.values[m.starts[r]..m.starts[r + 1]];
                unpack_scalar(&m.masks[r * chunks..(r + 1) * chunks], values, row);
            }
            assert_eq!(scalar, w, "scalar unpacking, cols {cols}");
        }
    }

    #[test]
    fn dense_matrices_stay_dense() {
        let w: Vec<f32> = (0..64).map(|i| i as f32 + 1.0).collect();
        assert!(MaskedMatrix::pack(&w, 4, 16).is_none());
        assert!(MaskedMatrix::pack(&w, 4, 15).is_none(), "shape mismatch");
    }

    /// The packed product equals the dense kernel's to the bit: one row of the matrix full, one
    /// empty, the rest sparse; one input row, and more rows than one register block holds; all
    /// outputs, and a range of them.
    #[test]
    fn packed_product_equals_the_dense_product() {
        let (out_dim, in_dim) = (40, 48);
        let mut w = sparse(out_dim, in_dim);
        w[..in_dim]
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = 0.5 - i as f32 * 0.01);
        w[in_dim..2 * in_dim].fill(0.0);
        let m = MaskedMatrix::pack(&w, out_dim, in_dim).expect("sparse enough");
        let x: Vec<f32> = (0..8 * in_dim).map(|i| (i as f32 * 0.11).cos()).collect();
        for rows in [&[3u32, 0, 2][..], &[5], &[7, 0, 2, 6, 5, 1]] {
            for (first, n) in [(0, out_dim), (1, 13)] {
                let mut dense = vec![0f32; rows.len() * n];
                for j in 0..n {
                    let o = first + j;
                    host::dot_rows(
                        &mut dense[j..],
                        n,
                        &x,
                        rows,
                        &w[o * in_dim..(o + 1) * in_dim],
                    );
                }
                let mut packed = vec![f32::NAN; rows.len() * n];
                m.products(first, n, &x, rows, &mut packed);
                assert_eq!(packed, dense, "rows {rows:?}, outputs {first}+{n}");
                assert!(dense.iter().any(|v| *v != 0.0));
            }
        }
    }
}
