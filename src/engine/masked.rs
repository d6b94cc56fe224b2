//! Dense deltas with many exact zeros, packed as sixteen-wide masks and their nonzero values.
//!
//! TIES, DARE and DARE-TIES merges keep only a fraction of each adapter's entries (TIES: 20% by
//! default), so a merged `ΔW` is dense in shape but mostly zeros. A batched decode step reads
//! every byte of it for the few rows that use it, so its size is its cost. [`MaskedMatrix`]
//! keeps it in groups of sixteen adjacent outputs: for each input, one 16-bit mask of the
//! group's outputs that have a nonzero weight there, then those weights in order. That is
//! `0.125 + 4·d` bytes per entry at density `d` instead of 4, and every kept value exact (f32).
//!
//! A product walks a group's inputs in order. On AVX-512 each input's weights are put in their
//! sixteen output lanes of one register by one permutation, whose indices each lane counts from
//! the mask's set bits below it (`vpopcntd`; a 256-entry table per mask byte on CPUs without it;
//! `vexpandps`, the instruction made for this, costs more on some CPUs), and multiplied with up
//! to four input rows' values at that input while they sit there: one multiply-add per row,
//! into sixteen outputs at once, with no horizontal sums. Each row sums
//! its even inputs and its odd inputs in two chains, in input order, and adds the two at the end
//! ([`reference_sums`] is the same order without SIMD), so a row's result does not depend on
//! which other rows are in the product.

/// Outputs per group (one per lane of a 512-bit register).
pub const GROUP: usize = 16;

/// Above this fraction of nonzero entries the packed form saves too little to pay for its
/// unpacking; the matrix stays dense.
pub const MAX_DENSITY: f64 = 0.75;

/// A `rows × cols` matrix as per-group masks and packed nonzero values.
#[derive(Debug, Clone)]
pub struct MaskedMatrix {
    rows: usize,
    cols: usize,
    /// `groups × cols` masks: bit `l` of mask `g·cols + i` is entry `(g·GROUP + l, i)`.
    masks: Vec<u16>,
    /// Where each group's values start in `values` (`groups + 1` entries).
    starts: Vec<usize>,
    /// The nonzero values, group by group, input by input, lane by lane; then [`GROUP`] zeros,
    /// so that sixteen values read from any group's position stay inside.
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
        let groups = rows.div_ceil(GROUP);
        let mut masks = Vec::with_capacity(groups * cols);
        let mut starts = Vec::with_capacity(groups + 1);
        let mut values = Vec::with_capacity(nonzero + GROUP);
        for g in 0..groups {
            starts.push(values.len());
            let lanes = g * GROUP..((g + 1) * GROUP).min(rows);
            for i in 0..cols {
                let mut mask = 0u16;
                for (l, r) in lanes.clone().enumerate() {
                    let v = w[r * cols + i];
                    if v != 0.0 {
                        mask |= 1 << l;
                        values.push(v);
                    }
                }
                masks.push(mask);
            }
        }
        starts.push(values.len());
        values.extend([0.0; GROUP]);
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
        for g in 0..self.rows.div_ceil(GROUP) {
            let (masks, values) = self.group(g);
            let mut at = 0;
            for (i, &mask) in masks.iter().enumerate() {
                for (l, w) in unpack_scalar(mask, values, &mut at).into_iter().enumerate() {
                    if let Some(v) = out.get_mut((g * GROUP + l) * self.cols + i) {
                        *v = w;
                    }
                }
            }
        }
        out
    }

    /// `acc[k · n + j]` = the `k`-th row of `rows` of `x: (·, cols)` dotted with output row
    /// `first + j` (`j < n`), summed as [`reference_sums`] sums.
    pub fn products(&self, first: usize, n: usize, x: &[f32], rows: &[u32], acc: &mut [f32]) {
        assert!(
            first + n <= self.rows,
            "outputs {first}+{n} of {}",
            self.rows
        );
        assert!(acc.len() >= rows.len() * n, "{} sums", acc.len());
        let xs: Vec<&[f32]> = (rows.iter())
            .map(|&r| &x[r as usize * self.cols..(r as usize + 1) * self.cols])
            .collect();
        for g in first / GROUP..(first + n).div_ceil(GROUP) {
            let (masks, values) = self.group(g);
            // This group's outputs that are wanted, as lanes and as columns of `acc`.
            let lanes =
                first.max(g * GROUP) - g * GROUP..(first + n).min((g + 1) * GROUP) - g * GROUP;
            let column = g * GROUP + lanes.start - first;
            for (b, block) in xs.chunks(ROWS).enumerate() {
                let sums = group_sums(masks, values, block);
                for (k, lane_sums) in sums.iter().take(block.len()).enumerate() {
                    let at = (b * ROWS + k) * n + column;
                    acc[at..at + lanes.len()].copy_from_slice(&lane_sums[lanes.clone()]);
                }
            }
        }
    }

    /// Group `g`'s masks and packed values, followed by [`GROUP`] more values (the next
    /// group's or the padding).
    fn group(&self, g: usize) -> (&[u16], &[f32]) {
        (
            &self.masks[g * self.cols..(g + 1) * self.cols],
            &self.values[self.starts[g]..self.starts[g + 1] + GROUP],
        )
    }
}

/// Input rows multiplied side by side.
const ROWS: usize = 4;

/// One group's sums for up to [`ROWS`] input rows (each `masks.len()` long): `sums[k][l]` is row
/// `k` dotted with the group's output `l`.
fn group_sums(masks: &[u16], values: &[f32], xs: &[&[f32]]) -> [[f32; GROUP]; ROWS] {
    #[cfg(target_arch = "x86_64")]
    if let Some(places) = avx512::Places::available() {
        // SAFETY: the CPU has the features `places` needs; `values` holds the masks' set bits
        // and sixteen more values (as `pack` built them); every row is `masks.len()` long.
        return unsafe { avx512::group_sums(places, masks, values, xs) };
    }
    reference_sums(masks, values, xs)
}

/// [`group_sums`] without SIMD, and the order of its sums: each row's even inputs in one chain
/// of fused multiply-adds and its odd inputs in another, both in input order from zero, then
/// even plus odd. Every input is multiplied, zeros included, as the vector kernel does.
fn reference_sums(masks: &[u16], values: &[f32], xs: &[&[f32]]) -> [[f32; GROUP]; ROWS] {
    let mut chains = [[[0f32; GROUP]; 2]; ROWS];
    let mut at = 0;
    for (i, &mask) in masks.iter().enumerate() {
        let w = unpack_scalar(mask, values, &mut at);
        for (chain, x) in chains.iter_mut().zip(xs) {
            let sum = &mut chain[i % 2];
            for (s, w) in sum.iter_mut().zip(w) {
                *s = w.mul_add(x[i], *s);
            }
        }
    }
    chains.map(|[even, odd]| std::array::from_fn(|l| even[l] + odd[l]))
}

/// One input's sixteen weights of a group: mask bit `l` takes the next value from
/// `values[*at..]` (`*at` moves past the ones taken).
fn unpack_scalar(mask: u16, values: &[f32], at: &mut usize) -> [f32; GROUP] {
    std::array::from_fn(|l| {
        if mask & (1 << l) != 0 {
            *at += 1;
            values[*at - 1]
        } else {
            0.0
        }
    })
}

/// The AVX-512 kernel of [`group_sums`].
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{GROUP, ROWS};

    /// Values asked for ahead of the one being unpacked (4 KiB): a group's values are one
    /// stream, and the hardware prefetcher alone falls behind it.
    const AHEAD: usize = 1024;

    /// How a mask becomes the permutation that puts its values in their lanes.
    #[derive(Clone, Copy)]
    pub enum Places {
        /// Each lane counts the mask's set bits below it (`vpopcntd`): three instructions.
        Counted,
        /// From a table per mask byte, for CPUs without `vpopcntd`: two loads and three
        /// instructions.
        Table,
    }

    impl Places {
        /// The way this CPU can, or `None` without AVX-512F and POPCNT (detected once).
        pub fn available() -> Option<Self> {
            static DETECTED: std::sync::OnceLock<Option<Places>> = std::sync::OnceLock::new();
            *DETECTED.get_or_init(|| {
                if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("popcnt")) {
                    None
                } else if is_x86_feature_detected!("avx512vpopcntdq") {
                    Some(Places::Counted)
                } else {
                    Some(Places::Table)
                }
            })
        }
    }

    /// For each mask byte, the index among the byte's set bits of every set bit (0 where unset).
    static TABLE: [[i32; 8]; 256] = table();

    const fn table() -> [[i32; 8]; 256] {
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

    /// Lane `l`'s value's index among the loaded ones: the set bits of `mask` below bit `l`.
    ///
    /// # Safety
    /// AVX-512F and AVX-512 VPOPCNTDQ (`COUNTED`) or POPCNT (the table).
    #[inline(always)]
    unsafe fn places<const COUNTED: bool>(mask: u16) -> __m512i {
        if COUNTED {
            // SAFETY: the caller's guarantee.
            return unsafe {
                let below = _mm512_set_epi32(
                    0x7fff, 0x3fff, 0x1fff, 0xfff, 0x7ff, 0x3ff, 0x1ff, 0xff, 0x7f, 0x3f, 0x1f,
                    0xf, 0x7, 0x3, 0x1, 0,
                );
                _mm512_popcnt_epi32(_mm512_and_si512(_mm512_set1_epi32(mask as i32), below))
            };
        }
        let (low, high) = ((mask & 0xff) as usize, (mask >> 8) as usize);
        // SAFETY: each table row is eight i32.
        unsafe {
            let first = _mm256_loadu_si256(TABLE[low].as_ptr().cast());
            let second = _mm256_add_epi32(
                _mm256_loadu_si256(TABLE[high].as_ptr().cast()),
                _mm256_set1_epi32(low.count_ones() as i32),
            );
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(first), second)
        }
    }

    /// One input's sixteen weights in their lanes, from `values[*at..]` (`*at` moves past
    /// them). The sixteen values are read with a plain load: a masked load costs three times as
    /// much on some CPUs (Zen 4).
    ///
    /// # Safety
    /// As [`places`]; `values[*at..]` holds at least 16 values.
    #[inline(always)]
    unsafe fn unpack<const COUNTED: bool>(mask: u16, values: &[f32], at: &mut usize) -> __m512 {
        debug_assert!(*at + GROUP <= values.len());
        // SAFETY: the caller's guarantees; a prefetch never faults.
        let w = unsafe {
            _mm_prefetch::<_MM_HINT_T0>(values.as_ptr().wrapping_add(*at + AHEAD).cast());
            let loaded = _mm512_loadu_ps(values.as_ptr().add(*at));
            _mm512_maskz_permutexvar_ps(mask, places::<COUNTED>(mask), loaded)
        };
        *at += mask.count_ones() as usize;
        w
    }

    /// [`super::reference_sums`] for exactly `R` rows, the even and odd chains of each row in
    /// registers.
    ///
    /// # Safety
    /// As [`unpack`]; `values` holds the masks' set bits and sixteen more values; `xs` holds
    /// `R` rows of `masks.len()` values.
    #[inline(always)]
    unsafe fn sums<const R: usize, const COUNTED: bool>(
        masks: &[u16],
        values: &[f32],
        xs: &[&[f32]],
    ) -> [[f32; GROUP]; ROWS] {
        let cols = masks.len();
        assert!(xs.len() == R && xs.iter().all(|x| x.len() == cols));
        let x: [*const f32; R] = std::array::from_fn(|k| xs[k].as_ptr());
        // SAFETY: the caller's guarantee (AVX-512F).
        let (mut even, mut odd) = unsafe { ([_mm512_setzero_ps(); R], [_mm512_setzero_ps(); R]) };
        let mut at = 0;
        let mut i = 0;
        while i + 2 <= cols {
            // SAFETY: the caller's guarantees; inputs `i` and `i + 1` are within every row.
            unsafe {
                let w0 = unpack::<COUNTED>(*masks.get_unchecked(i), values, &mut at);
                let w1 = unpack::<COUNTED>(*masks.get_unchecked(i + 1), values, &mut at);
                for k in 0..R {
                    even[k] = _mm512_fmadd_ps(w0, _mm512_set1_ps(*x[k].add(i)), even[k]);
                    odd[k] = _mm512_fmadd_ps(w1, _mm512_set1_ps(*x[k].add(i + 1)), odd[k]);
                }
            }
            i += 2;
        }
        if i < cols {
            // SAFETY: as above, for the last (even) input.
            unsafe {
                let w = unpack::<COUNTED>(masks[i], values, &mut at);
                for k in 0..R {
                    even[k] = _mm512_fmadd_ps(w, _mm512_set1_ps(*x[k].add(i)), even[k]);
                }
            }
        }
        let mut sums = [[0f32; GROUP]; ROWS];
        for k in 0..R {
            // SAFETY: sixteen floats.
            unsafe { _mm512_storeu_ps(sums[k].as_mut_ptr(), _mm512_add_ps(even[k], odd[k])) };
        }
        sums
    }

    /// [`sums`] with mask places counted.
    ///
    /// # Safety
    /// As [`sums`], on a CPU with AVX-512F, POPCNT and AVX-512 VPOPCNTDQ.
    #[target_feature(enable = "avx512f,popcnt,avx512vpopcntdq")]
    unsafe fn counted<const R: usize>(m: &[u16], v: &[f32], xs: &[&[f32]]) -> [[f32; GROUP]; ROWS] {
        // SAFETY: the caller's guarantees.
        unsafe { sums::<R, true>(m, v, xs) }
    }

    /// [`sums`] with mask places from the table.
    ///
    /// # Safety
    /// As [`sums`], on a CPU with AVX-512F and POPCNT.
    #[target_feature(enable = "avx512f,popcnt")]
    unsafe fn tabled<const R: usize>(m: &[u16], v: &[f32], xs: &[&[f32]]) -> [[f32; GROUP]; ROWS] {
        // SAFETY: the caller's guarantees.
        unsafe { sums::<R, false>(m, v, xs) }
    }

    /// [`super::group_sums`] for 1 to [`ROWS`] rows.
    ///
    /// # Safety
    /// The CPU has what `places` needs ([`Places::available`]); `values` holds the masks' set
    /// bits and sixteen more values; `xs` holds 1 to [`ROWS`] rows of `masks.len()` values.
    pub unsafe fn group_sums(
        places: Places,
        m: &[u16],
        v: &[f32],
        xs: &[&[f32]],
    ) -> [[f32; GROUP]; ROWS] {
        // SAFETY: the caller's guarantees.
        unsafe {
            match (places, xs.len()) {
                (Places::Counted, 1) => counted::<1>(m, v, xs),
                (Places::Counted, 2) => counted::<2>(m, v, xs),
                (Places::Counted, 3) => counted::<3>(m, v, xs),
                (Places::Counted, _) => counted::<4>(m, v, xs),
                (Places::Table, 1) => tabled::<1>(m, v, xs),
                (Places::Table, 2) => tabled::<2>(m, v, xs),
                (Places::Table, 3) => tabled::<3>(m, v, xs),
                (Places::Table, _) => tabled::<4>(m, v, xs),
            }
        }
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
        for (rows, cols) in [(5, 16), (17, 37), (33, 64)] {
            let w = sparse(rows, cols);
            let m = MaskedMatrix::pack(&w, rows, cols).expect("sparse enough");
            assert_eq!(m.to_dense(), w, "{rows} × {cols}");
            // Without the fixed padding after the values.
            let values = m.values.len() - GROUP;
            assert_eq!(values, w.iter().filter(|v| **v != 0.0).count());
            let packed_bytes = m.masks.len() * 2 + m.starts.len() * 8 + values * 4;
            assert!(
                packed_bytes < w.len() * 4 * 6 / 10,
                "{rows} × {cols}: {packed_bytes} bytes"
            );
        }
    }

    #[test]
    fn dense_matrices_stay_dense() {
        let w: Vec<f32> = (0..64).map(|i| i as f32 + 1.0).collect();
        assert!(MaskedMatrix::pack(&w, 4, 16).is_none());
        assert!(MaskedMatrix::pack(&w, 4, 15).is_none(), "shape mismatch");
    }

    /// `x_r · w_o` in f64.
    fn exact(x: &[f32], r: usize, w: &[f32], o: usize, cols: usize) -> f64 {
        (0..cols)
            .map(|i| x[r * cols + i] as f64 * w[o * cols + i] as f64)
            .sum()
    }

    /// Every product equals the order [`reference_sums`] fixes, to the bit, and the exact
    /// product within f32 rounding; a row's sums are the same alone and beside other rows
    /// (fewer than one register block holds, and more); any range of outputs, inside a group or
    /// across groups. One row of the matrix is full, one empty, the rest sparse, and the last
    /// group is short; the input count is odd, so the even chain takes the last input.
    #[test]
    fn products_follow_one_order_whatever_the_batch() {
        let (out_dim, in_dim) = (40, 47);
        let mut w = sparse(out_dim, in_dim);
        w[..in_dim]
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = 0.5 - i as f32 * 0.01);
        w[in_dim..2 * in_dim].fill(0.0);
        let m = MaskedMatrix::pack(&w, out_dim, in_dim).expect("sparse enough");
        let x: Vec<f32> = (0..8 * in_dim).map(|i| (i as f32 * 0.11).cos()).collect();
        let alone = |r: u32| {
            let mut y = vec![f32::NAN; out_dim];
            m.products(0, out_dim, &x, &[r], &mut y);
            y
        };
        for rows in [&[3u32, 0, 2][..], &[5], &[7, 0, 2, 6, 5, 1]] {
            for (first, n) in [(0, out_dim), (1, 13), (14, 20), (32, 8)] {
                let mut packed = vec![f32::NAN; rows.len() * n];
                m.products(first, n, &x, rows, &mut packed);
                for (k, &r) in rows.iter().enumerate() {
                    let got = &packed[k * n..(k + 1) * n];
                    assert_eq!(got, &alone(r)[first..first + n], "row {r} of {rows:?}");
                    for (j, &v) in got.iter().enumerate() {
                        let want = exact(&x, r as usize, &w, first + j, in_dim);
                        assert!(
                            (v as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{v} vs {want}"
                        );
                    }
                }
            }
        }
        let xs: Vec<&[f32]> = [6usize, 1]
            .iter()
            .map(|&r| &x[r * in_dim..(r + 1) * in_dim])
            .collect();
        for g in 0..out_dim.div_ceil(GROUP) {
            let (masks, values) = m.group(g);
            let want = reference_sums(masks, values, &xs);
            let got = group_sums(masks, values, &xs);
            assert_eq!(got[..2], want[..2], "group {g}");
            #[cfg(target_arch = "x86_64")]
            if avx512::Places::available().is_some() {
                // SAFETY: AVX-512F and POPCNT are present; the group is as `pack` built it.
                let tabled =
                    unsafe { avx512::group_sums(avx512::Places::Table, masks, values, &xs) };
                assert_eq!(tabled[..2], want[..2], "group {g}, places from the table");
            }
        }
        let y = alone(0);
        assert!(y[0] != 0.0 && y[1] == 0.0, "the full row and the empty one");
        assert!(y.iter().filter(|v| **v != 0.0).count() > out_dim / 2);
    }
}
