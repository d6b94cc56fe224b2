//! Low-rank deltas packed in host memory as one stream, in the order the batched product reads
//! them.
//!
//! A decode step applies each adapter set's factors to the step's few rows that use it (two rows
//! per set when sixteen clients share eight sets), so a factor's bytes are read once per step for
//! a handful of multiply-adds each: the product runs at the speed memory delivers the factors.
//! [`LowRankPanels`] keeps `a: rank × in` and `b: out × rank` of one layer in one allocation, laid
//! out so that the product walks it front to back:
//!
//! - **`a`'s panel**: `a`'s rows in groups of up to four; within a group, sixteen columns of
//!   each row in turn, then the next sixteen. One 64-byte line is sixteen columns of one row, so
//!   each loaded line is multiplied at once with the same sixteen inputs of every batch row, and
//!   the four rows' sums grow side by side in registers (`4 × rows` independent chains).
//! - **`b`'s panel**: the outputs in tiles of sixteen to sixty-four; within a tile, each hidden
//!   index `j` in turn, with its sixty-four values of `b`'s column `j`. A tile's outputs stay in
//!   registers while every `h_j · b_j` is added to them.
//!
//! Columns are padded to a multiple of sixteen with zeros (`a`'s inputs, `b`'s outputs), so every
//! load is a whole vector. One stream instead of one per factor row lets the product ask for the
//! lines a fixed distance ahead of the one it reads ([`AHEAD`]); the kernel then streams at the
//! machine's memory bandwidth instead of waiting at the start of each short row.
//!
//! The AVX-512 and AVX2 kernels and [`reference`] compute the same sums in the same order (fused
//! multiply-adds from zero, the sixteen lanes of a hidden value summed by halves), so a row's
//! result is the same bits whatever other rows share its block and on either path.

use super::host;

/// Batch rows multiplied together in one pass over the panels.
pub const ROWS: usize = 4;

/// Values per vector (and per 64-byte line).
const LANES: usize = 16;

/// Rows of `a` whose sums grow side by side (one group of `a`'s panel).
const GROUP: usize = 4;

/// Outputs per tile of `b`'s panel (four vectors).
const TILE: usize = 64;

/// Values asked for ahead of the one being read (6 KiB), and asked for at the start of a product.
/// Measured over the factors of seven adapter sets (40 MB): 33 GB/s without asking ahead, 39 GB/s
/// at 4 KiB, 43–44 GB/s at 6–8 KiB, the single-thread bandwidth of the machine it was tuned on.
const AHEAD: usize = 1536;

/// One layer's low-rank delta `(x · aᵀ) · bᵀ`, packed for [`Self::products`].
#[derive(Debug, Clone)]
pub struct LowRankPanels {
    rank: usize,
    in_dim: usize,
    out_dim: usize,
    /// `a`'s panel, then `b`'s from `b_at` on, both from `start` on (a 64-byte boundary when the
    /// allocation allows; a clone may lose it, which costs speed, not results).
    data: Vec<f32>,
    start: usize,
    b_at: usize,
}

impl LowRankPanels {
    /// Packs `a: rank × in_dim` and `b: out_dim × rank` (row-major), or `None` when their lengths
    /// do not match those shapes.
    pub fn pack(a: &[f32], b: &[f32], rank: usize, in_dim: usize, out_dim: usize) -> Option<Self> {
        if a.len() != rank * in_dim || b.len() != out_dim * rank {
            return None;
        }
        let (in_pad, out_pad) = (padded(in_dim), padded_outputs(out_dim));
        let b_at = rank * in_pad;
        let mut data = vec![0f32; b_at + rank * out_pad + LANES];
        let start = data.as_ptr().align_offset(64).min(LANES);
        let panel = &mut data[start..];
        for (g, rows) in groups(rank) {
            let group = &mut panel[g * in_pad..(g + rows) * in_pad];
            for (i, &v) in a[g * in_dim..(g + rows) * in_dim].iter().enumerate() {
                let (jj, col) = (i / in_dim, i % in_dim);
                group[a_at(rows, jj, col)] = v;
            }
        }
        let b_panel = &mut panel[b_at..];
        for (o, width) in tiles(out_dim) {
            let vectors = width.div_ceil(LANES);
            let tile = &mut b_panel[o * rank..];
            for j in 0..rank {
                for k in 0..width {
                    tile[tile_at(vectors, j, k)] = b[(o + k) * rank + j];
                }
            }
        }
        Some(Self {
            rank,
            in_dim,
            out_dim,
            data,
            start,
            b_at,
        })
    }

    /// `(out_dim, in_dim)`, the shape of the `ΔW` this delta stands for.
    pub fn shape(&self) -> (usize, usize) {
        (self.out_dim, self.in_dim)
    }

    /// The number of hidden values (`a`'s rows).
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Values one product reads (the panels, padding included).
    pub fn values_read(&self) -> usize {
        self.data.len() - LANES
    }

    /// `a: rank × in_dim` and `b: out_dim × rank` as they were packed, row-major.
    pub fn factors(&self) -> (Vec<f32>, Vec<f32>) {
        let (in_pad, rank) = (padded(self.in_dim), self.rank);
        let mut a = vec![0f32; rank * self.in_dim];
        for (g, rows) in groups(rank) {
            let group = &self.panel()[g * in_pad..];
            for (i, v) in a[g * self.in_dim..(g + rows) * self.in_dim]
                .iter_mut()
                .enumerate()
            {
                let (jj, col) = (i / self.in_dim, i % self.in_dim);
                *v = group[a_at(rows, jj, col)];
            }
        }
        let mut b = vec![0f32; self.out_dim * rank];
        for (o, width) in tiles(self.out_dim) {
            let vectors = width.div_ceil(LANES);
            let tile = &self.panel()[self.b_at + o * rank..];
            for j in 0..rank {
                for k in 0..width {
                    b[(o + k) * rank + j] = tile[tile_at(vectors, j, k)];
                }
            }
        }
        (a, b)
    }

    /// `out[k] = (xs[k] · aᵀ) · bᵀ` for 1 to [`ROWS`] rows (`xs[k]`: `in_dim` values, `out[k]`:
    /// `out_dim`), reading the panels once for all of them.
    pub fn products(&self, xs: &[&[f32]], out: &mut [&mut [f32]]) {
        assert!(
            (1..=ROWS).contains(&xs.len()) && xs.len() == out.len(),
            "{} input rows, {} output rows",
            xs.len(),
            out.len()
        );
        assert!(
            xs.iter().all(|x| x.len() == self.in_dim)
                && out.iter().all(|o| o.len() == self.out_dim),
            "rows of {} → {} values",
            self.in_dim,
            self.out_dim
        );
        // SAFETY (both): the CPU has the kernel's features; the rows' lengths are checked above.
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return unsafe { avx512::products(self, xs, out) };
        } else if avx2::available() {
            return unsafe { avx2::products(self, xs, out) };
        }
        reference(self, xs, out);
    }

    /// The packed values, from the aligned start on.
    fn panel(&self) -> &[f32] {
        &self.data[self.start..]
    }
}

/// `n` rounded up to whole vectors.
fn padded(n: usize) -> usize {
    n.next_multiple_of(LANES)
}

/// Values per row of `b`'s panel: each tile's outputs rounded up to whole vectors.
fn padded_outputs(out_dim: usize) -> usize {
    tiles(out_dim).map(|(_, w)| padded(w)).sum()
}

/// Where row `jj` of a group of `rows` rows of `a` keeps its column `col`, from the group's start:
/// sixteen columns of each row in turn.
fn a_at(rows: usize, jj: usize, col: usize) -> usize {
    ((col / LANES) * rows + jj) * LANES + col % LANES
}

/// Where a tile of `vectors` vectors of outputs keeps hidden index `j`'s value for its output
/// `k`, from the tile's start: each hidden index's outputs in turn.
fn tile_at(vectors: usize, j: usize, k: usize) -> usize {
    j * vectors * LANES + k
}

/// `a`'s row groups: `(first row, rows)`, [`GROUP`] rows each but the last.
fn groups(rank: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..rank)
        .step_by(GROUP)
        .map(move |g| (g, GROUP.min(rank - g)))
}

/// Output tiles: `(first output, outputs)`, [`TILE`] each but the last.
fn tiles(out_dim: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..out_dim)
        .step_by(TILE)
        .map(move |o| (o, TILE.min(out_dim - o)))
}

/// [`LowRankPanels::products`] without SIMD, and the order of its sums: each hidden value
/// `h_kj` is sixteen lanes of fused multiply-adds from zero over `a`'s row `j` (lane `l` takes
/// inputs `l`, `l + 16`, … with zeros past the end), folded by [`host::halves`]; each output is
/// a fused multiply-add chain from zero over `j` in order.
fn reference(p: &LowRankPanels, xs: &[&[f32]], out: &mut [&mut [f32]]) {
    let (in_pad, rank) = (padded(p.in_dim), p.rank);
    let panel = p.panel();
    let h: Vec<Vec<f32>> = (xs.iter())
        .map(|x| {
            let mut h = vec![0f32; rank];
            for (g, rows) in groups(rank) {
                let group = &panel[g * in_pad..];
                for (jj, h) in h[g..g + rows].iter_mut().enumerate() {
                    let mut lanes = [0f32; LANES];
                    for c in 0..in_pad / LANES {
                        for (l, lane) in lanes.iter_mut().enumerate() {
                            let xv = x.get(c * LANES + l).copied().unwrap_or(0.0);
                            *lane = xv.mul_add(group[a_at(rows, jj, c * LANES + l)], *lane);
                        }
                    }
                    *h = host::halves(lanes);
                }
            }
            h
        })
        .collect();
    for (o, width) in tiles(p.out_dim) {
        let vectors = width.div_ceil(LANES);
        let tile = &panel[p.b_at + o * rank..];
        for (h, out) in h.iter().zip(out.iter_mut()) {
            for (k, y) in out[o..o + width].iter_mut().enumerate() {
                *y = (0..rank).fold(0.0, |acc, j| {
                    h[j].mul_add(tile[tile_at(vectors, j, k)], acc)
                });
            }
        }
    }
}

/// The AVX-512 kernel of [`LowRankPanels::products`].
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::super::host::lanes_avx512::halves;
    use super::{AHEAD, GROUP, LANES, LowRankPanels, groups, padded, tiles};

    /// [`super::LowRankPanels::products`] on AVX-512.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `xs` and `out` hold 1 to [`super::ROWS`] rows of `p`'s input and output
    /// widths.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn products(p: &LowRankPanels, xs: &[&[f32]], out: &mut [&mut [f32]]) {
        // SAFETY: the caller's guarantees.
        unsafe {
            match xs.len() {
                1 => rows::<1>(p, xs, out),
                2 => rows::<2>(p, xs, out),
                3 => rows::<3>(p, xs, out),
                _ => rows::<4>(p, xs, out),
            }
        }
    }

    /// Asks for the line holding `at`.
    #[inline(always)]
    fn ask(at: *const f32) {
        // SAFETY: a prefetch is a hint; it never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(at.cast()) };
    }

    /// The product for exactly `R` rows.
    ///
    /// # Safety
    /// As [`products`], with `R` rows.
    #[target_feature(enable = "avx512f")]
    unsafe fn rows<const R: usize>(p: &LowRankPanels, xs: &[&[f32]], out: &mut [&mut [f32]]) {
        let panel = p.panel();
        let at = panel.as_ptr();
        (0..AHEAD)
            .step_by(LANES)
            .for_each(|k| ask(at.wrapping_add(k)));
        let x: [*const f32; R] = std::array::from_fn(|k| xs[k].as_ptr());
        let (in_dim, rank) = (p.in_dim, p.rank);
        let in_pad = padded(in_dim);
        // The last input vector's lanes inside the row.
        let tail = match in_dim % LANES {
            0 => !0,
            n => (1u16 << n) - 1,
        };
        let mut h = vec![0f32; R * rank];
        for (g, size) in groups(rank) {
            // SAFETY: group `g` of `a`'s panel is `size × in_pad` values from `g · in_pad`.
            let a = unsafe { at.add(g * in_pad) };
            let cols = (in_pad / LANES, tail);
            // SAFETY: as above; `x`'s rows are `in_dim` long (the caller's guarantee).
            let sums: [[f32; GROUP]; R] = unsafe {
                match size {
                    4 => hidden::<R, 4>(&x, a, cols),
                    3 => hidden::<R, 3>(&x, a, cols),
                    2 => hidden::<R, 2>(&x, a, cols),
                    _ => hidden::<R, 1>(&x, a, cols),
                }
            };
            for (k, sums) in sums.iter().enumerate() {
                h[k * rank + g..k * rank + g + size].copy_from_slice(&sums[..size]);
            }
        }
        let out: [*mut f32; R] = std::array::from_fn(|k| out[k].as_mut_ptr());
        for (o, width) in tiles(p.out_dim) {
            // SAFETY: the tile is `rank × width` values rounded up to whole vectors, from
            // `b_at + o · rank`; the outputs `o..o + width` are inside every row.
            unsafe {
                let b = at.add(p.b_at + o * rank);
                match width.div_ceil(LANES) {
                    4 => tile::<R, 4>(&out, o, width, b, rank, &h),
                    3 => tile::<R, 3>(&out, o, width, b, rank, &h),
                    2 => tile::<R, 2>(&out, o, width, b, rank, &h),
                    _ => tile::<R, 1>(&out, o, width, b, rank, &h),
                }
            }
        }
    }

    /// The hidden values of `G` rows of `a` (one group, at `a`) for the `R` input rows: `R · G`
    /// sums side by side over `cols.0` vectors of inputs, the last one's lanes past the row's
    /// end (`cols.1` clear) read as zero.
    ///
    /// # Safety
    /// AVX-512F; `a` holds `cols.0 · G` vectors; every row of `x` holds `cols.0` vectors but
    /// for the lanes clear in `cols.1` of the last.
    #[inline(always)]
    unsafe fn hidden<const R: usize, const G: usize>(
        x: &[*const f32; R],
        a: *const f32,
        (vectors, tail): (usize, u16),
    ) -> [[f32; GROUP]; R] {
        // SAFETY: the caller's guarantees.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); G]; R];
            for c in 0..vectors {
                let mask = if c + 1 == vectors { tail } else { !0 };
                let xv: [__m512; R] =
                    std::array::from_fn(|k| _mm512_maskz_loadu_ps(mask, x[k].add(c * LANES)));
                for jj in 0..G {
                    let line = a.add((c * G + jj) * LANES);
                    ask(line.wrapping_add(AHEAD));
                    let av = _mm512_loadu_ps(line);
                    for (acc, xv) in acc.iter_mut().zip(&xv) {
                        acc[jj] = _mm512_fmadd_ps(*xv, av, acc[jj]);
                    }
                }
            }
            acc.map(|row| std::array::from_fn(|jj| if jj < G { halves(row[jj]) } else { 0.0 }))
        }
    }

    /// Outputs `o..o + width` of the `R` rows, in `V` vectors, from the tile at `b` and the
    /// hidden values `h` (`R × rank`).
    ///
    /// # Safety
    /// AVX-512F; `b` holds `rank · V` vectors; outputs `o..o + width` are inside every row of
    /// `out`, and `V` vectors cover `width`.
    #[inline(always)]
    unsafe fn tile<const R: usize, const V: usize>(
        out: &[*mut f32; R],
        o: usize,
        width: usize,
        b: *const f32,
        rank: usize,
        h: &[f32],
    ) {
        // SAFETY: the caller's guarantees.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); V]; R];
            for j in 0..rank {
                let row = b.add(j * V * LANES);
                let bv: [__m512; V] = std::array::from_fn(|v| {
                    ask(row.wrapping_add(v * LANES + AHEAD));
                    _mm512_loadu_ps(row.add(v * LANES))
                });
                for (k, acc) in acc.iter_mut().enumerate() {
                    let hv = _mm512_set1_ps(*h.get_unchecked(k * rank + j));
                    for (acc, bv) in acc.iter_mut().zip(&bv) {
                        *acc = _mm512_fmadd_ps(hv, *bv, *acc);
                    }
                }
            }
            for (k, acc) in acc.iter().enumerate() {
                for (v, acc) in acc.iter().enumerate() {
                    let mask = match width - v * LANES {
                        LANES.. => !0u16,
                        n => (1u16 << n) - 1,
                    };
                    _mm512_mask_storeu_ps(out[k].add(o + v * LANES), mask, *acc);
                }
            }
        }
    }
}

/// The AVX2 kernel of [`LowRankPanels::products`], with the AVX-512 kernel's sums to the bit: a
/// sixteen-lane vector is two registers of eight, and with half the registers, the batch rows
/// take turns over each group of `a` and each tile of `b` (the turns after the first find them
/// in cache).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::host::lanes_avx2::{first, halves};
    use super::{AHEAD, GROUP, LANES, LowRankPanels, groups, padded, tiles};

    /// Lanes of a 256-bit register.
    const HALF: usize = LANES / 2;

    /// Whether this CPU has AVX2 and FMA.
    pub fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// Asks for the line holding `at`.
    #[inline(always)]
    fn ask(at: *const f32) {
        // SAFETY: a prefetch is a hint; it never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(at.cast()) };
    }

    /// [`super::LowRankPanels::products`] on AVX2.
    ///
    /// # Safety
    /// [`available`]; `xs` and `out` hold 1 to [`super::ROWS`] rows of `p`'s input and output
    /// widths.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn products(p: &LowRankPanels, xs: &[&[f32]], out: &mut [&mut [f32]]) {
        let panel = p.panel();
        let at = panel.as_ptr();
        (0..AHEAD)
            .step_by(LANES)
            .for_each(|k| ask(at.wrapping_add(k)));
        let (in_dim, rank) = (p.in_dim, p.rank);
        let in_pad = padded(in_dim);
        let mut h = vec![0f32; xs.len() * rank];
        for (g, size) in groups(rank) {
            for (k, x) in xs.iter().enumerate() {
                // SAFETY: group `g` of `a`'s panel is `size × in_pad` values from `g · in_pad`;
                // `x` is `in_dim` long (the caller's guarantee).
                let sums = unsafe {
                    let a = at.add(g * in_pad);
                    match size {
                        4 => hidden::<4>(x, a, in_dim, k == 0),
                        3 => hidden::<3>(x, a, in_dim, k == 0),
                        2 => hidden::<2>(x, a, in_dim, k == 0),
                        _ => hidden::<1>(x, a, in_dim, k == 0),
                    }
                };
                h[k * rank + g..k * rank + g + size].copy_from_slice(&sums[..size]);
            }
        }
        for (o, width) in tiles(p.out_dim) {
            for (k, out) in out.iter_mut().enumerate() {
                let h = &h[k * rank..(k + 1) * rank];
                // SAFETY: the tile is `rank × width` values rounded up to whole vectors, from
                // `b_at + o · rank`; the outputs `o..o + width` are inside every row.
                unsafe {
                    let b = at.add(p.b_at + o * rank);
                    let out = &mut out[o..o + width];
                    match width.div_ceil(LANES) {
                        4 => tile::<4>(out, b, h, k == 0),
                        3 => tile::<3>(out, b, h, k == 0),
                        2 => tile::<2>(out, b, h, k == 0),
                        _ => tile::<1>(out, b, h, k == 0),
                    }
                }
            }
        }
    }

    /// The hidden values of `G` rows of `a` (one group, at `a`) for one input row `x`: each a
    /// sixteen-lane sum over the padded inputs (lanes past `x`'s end read as zero), folded by
    /// halves. `ahead`: ask for the lines ahead (the first row's turn).
    ///
    /// # Safety
    /// AVX2 and FMA; `a` holds `G` rows of `in_dim` padded to whole sixteen-lane vectors.
    #[inline(always)]
    unsafe fn hidden<const G: usize>(
        x: &[f32],
        a: *const f32,
        in_dim: usize,
        ahead: bool,
    ) -> [f32; GROUP] {
        // SAFETY: the caller's guarantees; the masked loads read only `x`'s values.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; G];
            for c in 0..in_dim.div_ceil(LANES) {
                let xv: [__m256; 2] = std::array::from_fn(|half| {
                    let from = c * LANES + half * HALF;
                    let lanes = first(in_dim.saturating_sub(from));
                    _mm256_maskload_ps(x.as_ptr().wrapping_add(from), lanes)
                });
                for (jj, acc) in acc.iter_mut().enumerate() {
                    let line = a.add((c * G + jj) * LANES);
                    if ahead {
                        ask(line.wrapping_add(AHEAD));
                    }
                    for (half, acc) in acc.iter_mut().enumerate() {
                        let av = _mm256_loadu_ps(line.add(half * HALF));
                        *acc = _mm256_fmadd_ps(xv[half], av, *acc);
                    }
                }
            }
            std::array::from_fn(|jj| {
                if jj < G {
                    halves(acc[jj][0], acc[jj][1])
                } else {
                    0.0
                }
            })
        }
    }

    /// One row's outputs `out` (at most `V` vectors) from the tile at `b` and the row's hidden
    /// values `h`. `ahead`: ask for the lines ahead (the first row's turn).
    ///
    /// # Safety
    /// AVX2 and FMA; `b` holds `h.len() · V` sixteen-lane vectors, and `V` vectors cover
    /// `out`.
    #[inline(always)]
    unsafe fn tile<const V: usize>(out: &mut [f32], b: *const f32, h: &[f32], ahead: bool) {
        // SAFETY: the caller's guarantees; the masked stores write only `out`'s values.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; V];
            for (j, &hj) in h.iter().enumerate() {
                let row = b.add(j * V * LANES);
                let hv = _mm256_set1_ps(hj);
                for (v, acc) in acc.iter_mut().enumerate() {
                    if ahead {
                        ask(row.wrapping_add(v * LANES + AHEAD));
                    }
                    for (half, acc) in acc.iter_mut().enumerate() {
                        let bv = _mm256_loadu_ps(row.add(v * LANES + half * HALF));
                        *acc = _mm256_fmadd_ps(hv, bv, *acc);
                    }
                }
            }
            for (v, acc) in acc.iter().enumerate() {
                for (half, acc) in acc.iter().enumerate() {
                    let from = v * LANES + half * HALF;
                    let lanes = first(out.len().saturating_sub(from));
                    _mm256_maskstore_ps(out.as_mut_ptr().wrapping_add(from), lanes, *acc);
                }
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// `n` values in [-1, 1] that differ with `seed` (also the delta pass's test data).
    pub(in crate::engine) fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed * 7919) as f32) * 0.37).sin())
            .collect()
    }

    /// `(x · aᵀ) · bᵀ` in f64.
    fn exact(x: &[f32], a: &[f32], b: &[f32], rank: usize, out_dim: usize) -> Vec<f64> {
        let in_dim = x.len();
        let h: Vec<f64> = (0..rank)
            .map(|j| {
                (0..in_dim)
                    .map(|i| x[i] as f64 * a[j * in_dim + i] as f64)
                    .sum()
            })
            .collect();
        (0..out_dim)
            .map(|o| (0..rank).map(|j| h[j] * b[o * rank + j] as f64).sum())
            .collect()
    }

    /// A product of rows into outputs.
    type Kernel<'a> = dyn Fn(&[&[f32]], &mut [&mut [f32]]) + 'a;

    /// Shapes whose inputs and outputs fill whole vectors and tiles and ones that do not, with
    /// ranks that fill whole groups and ones that do not.
    const SHAPES: [(usize, usize, usize); 6] = [
        (8, 64, 192),
        (3, 20, 37),
        (16, 48, 130),
        (24, 576, 192),
        (1, 17, 5),
        (7, 33, 80),
    ];

    #[test]
    fn packing_keeps_both_factors() {
        for (rank, in_dim, out_dim) in SHAPES {
            let (a, b) = (values(rank * in_dim, 1), values(out_dim * rank, 2));
            let p = LowRankPanels::pack(&a, &b, rank, in_dim, out_dim).expect("shapes match");
            assert_eq!((p.shape(), p.rank()), ((out_dim, in_dim), rank));
            assert_eq!(p.factors(), (a, b), "rank {rank}, {in_dim} → {out_dim}");
        }
        assert!(LowRankPanels::pack(&[0.0; 6], &[0.0; 4], 2, 3, 3).is_none());
    }

    /// Every shape, 1 to 4 rows: within f32 rounding of the exact product, the same bits on the
    /// vector kernel as in the reference order, and a row's bits the same alone as in a block.
    #[test]
    fn products_are_close_and_follow_the_reference_order() {
        for (rank, in_dim, out_dim) in SHAPES {
            let (a, b) = (values(rank * in_dim, 3), values(out_dim * rank, 4));
            let p = LowRankPanels::pack(&a, &b, rank, in_dim, out_dim).expect("shapes match");
            let x = values(ROWS * in_dim, 5);
            let xs: Vec<&[f32]> = x.chunks_exact(in_dim).collect();
            let run = |rows: &[&[f32]], kernel: &Kernel<'_>| {
                let mut out = vec![vec![f32::NAN; out_dim]; rows.len()];
                kernel(
                    rows,
                    &mut out.iter_mut().map(Vec::as_mut_slice).collect::<Vec<_>>(),
                );
                out
            };
            let kernel = |xs: &[&[f32]], out: &mut [&mut [f32]]| p.products(xs, out);
            let slow = |xs: &[&[f32]], out: &mut [&mut [f32]]| reference(&p, xs, out);
            let together = run(&xs, &kernel);
            assert_eq!(
                together,
                run(&xs, &slow),
                "rank {rank}, {in_dim} → {out_dim}"
            );
            for (k, x) in xs.iter().enumerate() {
                let want = exact(x, &a, &b, rank, out_dim);
                for (g, w) in together[k].iter().zip(&want) {
                    assert!((*g as f64 - w).abs() < 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
                }
                assert_eq!(run(&[x], &kernel)[0], together[k], "row {k} alone");
                assert_eq!(run(&[xs[3], x], &kernel)[1], together[k], "row {k} second");
            }
        }
    }

    #[test]
    #[should_panic(expected = "rows of 20")]
    fn rows_of_the_wrong_width_are_refused() {
        let p = LowRankPanels::pack(&values(60, 1), &values(111, 2), 3, 20, 37).expect("packs");
        let x = values(19, 3);
        p.products(&[&x], &mut [&mut [0.0; 37]]);
    }
}
