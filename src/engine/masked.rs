//! Dense deltas with many exact zeros, packed as sixteen-wide masks and their nonzero values.
//!
//! TIES, DARE and DARE-TIES merges keep only a fraction of each adapter's entries (TIES: 20% by
//! default), so a merged `ΔW` is dense in shape but mostly zeros. A batched decode step reads
//! every byte of it for the few rows that use it, so its size is its cost. [`MaskedMatrix`]
//! keeps each output row as one 16-bit mask per sixteen inputs plus the nonzero values in order:
//! `0.125 + 4·d` bytes per entry at density `d` instead of 4, and every kept value exact (f32).
//!
//! A product unpacks one output row at a time into a scratch row (one masked expand-load per
//! sixteen inputs on AVX-512) and dots it with each input row with [`host::dot`], the dense
//! kernel's dot: the result is the dense product's, to the bit.

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
        let chunks = self.cols.div_ceil(LANES);
        let masks = &self.masks[r * chunks..(r + 1) * chunks];
        let values = &self.values[self.starts[r]..self.starts[r + 1]];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") && self.cols.is_multiple_of(LANES) {
            // SAFETY: the CPU has AVX-512F; `values` holds exactly the set bits of `masks`, as
            // `pack` built them (the fields never change after), and `unpack_avx512` checks
            // `dst`'s length.
            unsafe { unpack_avx512(masks, values, dst) };
            return;
        }
        unpack_scalar(masks, values, dst);
    }

    /// Adds `x_r · Wᵀ` to row `r` of `out: (·, rows)` for every `r` in `rows`, with
    /// `x: (·, cols)`: the same kernel and the same sums as [`host::add_dense`], each output row
    /// unpacked as it is needed.
    pub fn add_rows(&self, out: &mut [f32], x: &[f32], rows: &[u32]) {
        host::add_by_outputs(out, x, rows, self.cols, self.rows, |o, scratch| {
            self.unpack_row(o, scratch);
            None
        });
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

/// [`unpack_scalar`] with one masked expand-load per mask (`dst.len() == masks.len() · LANES`).
///
/// # Safety
/// The CPU has AVX-512F and `values` holds at least as many values as `masks` has set bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn unpack_avx512(masks: &[u16], values: &[f32], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    assert_eq!(dst.len(), masks.len() * LANES, "unpack row length");
    debug_assert_eq!(
        masks.iter().map(|m| m.count_ones() as usize).sum::<usize>(),
        values.len(),
        "unpack value count"
    );
    let mut at = 0;
    for (c, &mask) in masks.iter().enumerate() {
        // SAFETY: `values[at..]` holds at least `mask.count_ones()` values (the caller's
        // guarantee) and `dst[c·LANES..]` holds `LANES` floats (the length was checked).
        unsafe {
            let v = _mm512_maskz_expandloadu_ps(mask, values.as_ptr().add(at));
            _mm512_storeu_ps(dst.as_mut_ptr().add(c * LANES), v);
        }
        at += mask.count_ones() as usize;
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
            let packed_bytes = m.masks.len() * 2 + m.starts.len() * 8 + m.values.len() * 4;
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

    /// The packed product equals the dense kernel's to the bit, on chosen rows only.
    #[test]
    fn packed_product_equals_the_dense_product() {
        let (out_dim, in_dim) = (40, 48);
        let w = sparse(out_dim, in_dim);
        let m = MaskedMatrix::pack(&w, out_dim, in_dim).expect("sparse enough");
        let x: Vec<f32> = (0..4 * in_dim).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut dense = vec![1f32; 4 * out_dim];
        let mut packed = dense.clone();
        host::add_dense(&mut dense, &x, &[3, 0, 2], &w, in_dim, out_dim);
        m.add_rows(&mut packed, &x, &[3, 0, 2]);
        assert_eq!(packed, dense);
        assert!(
            packed[out_dim..2 * out_dim].iter().all(|v| *v == 1.0),
            "row 1 untouched"
        );
        assert!(packed[..out_dim].iter().any(|v| *v != 1.0), "row 0 updated");
    }
}
