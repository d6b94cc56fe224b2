//! f32 matrix products `x · Wᵀ` against a weight packed once into column panels: at load for a
//! model built for serving, else at its first product.
//!
//! A general matrix-multiply library packs its right-hand operand into cache-sized panels on
//! every call; for a model's weights, which never change, that is the same work each time (a
//! sixth of an encoder forward on two cores). [`PanelMatrix`] keeps an `O × I` weight as panels
//! of [`NR`] outputs: panel `p` holds, for each input `i`, the weights of outputs
//! `p·NR .. p·NR + NR` at input `i`, adjacent (outputs past `O` are zero). A product reads the
//! activation rows as they are, row-major.
//!
//! The AVX-512 kernel keeps an `MR × NR` block of outputs in 24 registers: per input it loads
//! the panel's two vectors, broadcasts one activation of each of the `MR` rows and issues two
//! fused multiply-adds per row. Each output is one chain of multiply-adds in input order, so a
//! row's result does not depend on which other rows share the call (a batch gives every text the
//! bits it gets alone). CPUs with AVX2 but not AVX-512 run a copy with the same sums, six rows ×
//! half a panel at a time (half as many registers, of half the width); others a portable loop
//! with the same layout.
//!
//! A call splits its output into blocks of rows × panels and spreads them over candle's worker
//! pool (the one every other kernel of a step uses).

use super::host;

/// Outputs per panel: two 512-bit vectors.
pub const NR: usize = 32;
/// Activation rows per kernel call.
const MR: usize = 12;
/// Rows per work item at most: eight kernel calls, whose activations stay in the core's L2 cache
/// while the item's panels stream past them.
const MC: usize = 8 * MR;
/// Work items a call aims for per worker thread: the pool hands them out as workers come free,
/// so more items leave less of a tail.
const ITEMS_PER_THREAD: usize = 6;

/// An `O × I` f32 weight in panels of [`NR`] outputs (see the module docs).
#[derive(Debug, Clone)]
pub struct PanelMatrix {
    outputs: usize,
    inputs: usize,
    /// `[panel][input][NR]`.
    values: Vec<f32>,
}

impl PanelMatrix {
    /// Packs `w: outputs × inputs`, row-major.
    pub fn pack(w: &[f32], outputs: usize, inputs: usize) -> Self {
        assert_eq!(w.len(), outputs * inputs, "panel matrix shape");
        let panels = outputs.div_ceil(NR);
        let mut values = vec![0f32; panels * inputs * NR];
        for (o, row) in w.chunks_exact(inputs.max(1)).enumerate() {
            let (panel, lane) = (o / NR, o % NR);
            let base = panel * inputs * NR + lane;
            for (i, &v) in row.iter().enumerate() {
                values[base + i * NR] = v;
            }
        }
        Self {
            outputs,
            inputs,
            values,
        }
    }

    /// `(outputs, inputs)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.outputs, self.inputs)
    }

    /// Row `r` of the weight (output `r`'s weights over every input) into `out`.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let (panel, lane) = (r / NR, r % NR);
        let panel = &self.values[panel * self.inputs * NR..][..self.inputs * NR];
        for (v, at) in out.iter_mut().zip(panel.iter().skip(lane).step_by(NR)) {
            *v = *at;
        }
    }

    /// Bytes of the packed values.
    pub fn bytes(&self) -> usize {
        self.values.len() * std::mem::size_of::<f32>()
    }

    /// `x · Wᵀ (+ bias)` of each matrix `W` (with its optional bias of `outputs` values) for
    /// `x: rows × inputs` (row-major): `rows × outputs` each, row-major; the bias starts each
    /// output's sum. Matrices that read the same inputs (q, k and v) share one pass over the
    /// pool: the work items of all of them are handed out together.
    pub fn matmul_shared(
        ms: &[(&PanelMatrix, Option<&[f32]>)],
        x: &[f32],
        rows: usize,
    ) -> Vec<Vec<f32>> {
        let plans: Vec<Plan> = ms
            .iter()
            .map(|&(m, bias)| Plan::new(m, bias, x, rows, ms.len()))
            .collect();
        let mut outs: Vec<Vec<f32>> = plans
            .iter()
            .map(|p| Vec::with_capacity(rows * p.matrix.outputs))
            .collect();
        let dsts: Vec<Output> = outs
            .iter_mut()
            .zip(&plans)
            .map(|(out, p)| Output {
                ptr: out.as_mut_ptr(),
                rows,
                cols: p.matrix.outputs,
            })
            .collect();
        let counts: Vec<usize> = plans.iter().map(Plan::items).collect();
        host::par_for_parts(&counts, |which, item| {
            plans[which].run(item, x, rows, &dsts[which]);
        });
        for (out, p) in outs.iter_mut().zip(&plans) {
            // SAFETY: the plan's items cover every row block × every panel, and each tile
            // writes all of its rows × its panel's valid outputs, so all `rows × outputs`
            // values are written.
            unsafe { out.set_len(rows * p.matrix.outputs) };
        }
        outs
    }

    /// Outputs of `rows` × the outputs of `panels`, into `dst`; `start` holds each output's
    /// initial value (its bias), [`NR`] per panel.
    fn block(
        &self,
        x: &[f32],
        start: &[f32],
        rows: std::ops::Range<usize>,
        panels: std::ops::Range<usize>,
        dst: &Output,
    ) {
        let k = self.inputs;
        for p in panels {
            let panel = &self.values[p * k * NR..(p + 1) * k * NR];
            let init: &[f32; NR] = start[p * NR..(p + 1) * NR].try_into().expect("NR values");
            let cols = p * NR..((p + 1) * NR).min(self.outputs);
            let mut r = rows.start;
            while r < rows.end {
                let m = MR.min(rows.end - r);
                let lhs = &x[r * k..(r + m) * k];
                // SAFETY: rows `r..r + m` × `cols` lie inside `dst` (`rows` and the panels
                // come from `matmul_shared`'s plan) and belong to this work item only.
                unsafe { tile(lhs, m, panel, init, dst, r, cols.clone()) };
                r += m;
            }
        }
    }
}

/// How one product is cut into work items: row blocks of (nearly) equal size, a multiple of
/// the kernel's rows, times as many panel groups as it takes to give every worker several items.
struct Plan<'a> {
    matrix: &'a PanelMatrix,
    /// Each output's initial value (its bias, else zero), [`NR`] per panel.
    start: Vec<f32>,
    block_rows: usize,
    row_blocks: usize,
    /// Panels per group.
    group: usize,
    panel_groups: usize,
}

impl<'a> Plan<'a> {
    /// The plan of `matrix` over `x: rows × inputs`, one of `shared` products in a call.
    fn new(
        matrix: &'a PanelMatrix,
        bias: Option<&[f32]>,
        x: &[f32],
        rows: usize,
        shared: usize,
    ) -> Self {
        let (n, k) = (matrix.outputs, matrix.inputs);
        assert!(x.len() >= rows * k, "panel matmul input too short");
        assert!(
            bias.is_none_or(|b| b.len() == n),
            "panel matmul bias length"
        );
        let panels = n.div_ceil(NR);
        let mut start = vec![0f32; panels * NR];
        if let Some(b) = bias {
            start[..n].copy_from_slice(b);
        }
        let row_blocks = rows.div_ceil(MC).max(1);
        let block_rows = rows.div_ceil(row_blocks).next_multiple_of(MR).max(MR);
        let row_blocks = rows.div_ceil(block_rows);
        let wanted = (ITEMS_PER_THREAD * host::threads()).div_ceil(shared.max(1));
        let group = panels.div_ceil(wanted.div_ceil(row_blocks.max(1)).clamp(1, panels.max(1)));
        Self {
            matrix,
            start,
            block_rows,
            row_blocks,
            group: group.max(1),
            panel_groups: panels.div_ceil(group.max(1)),
        }
    }

    fn items(&self) -> usize {
        self.row_blocks * self.panel_groups
    }

    /// Work item `item` of this plan, into `dst`.
    fn run(&self, item: usize, x: &[f32], rows: usize, dst: &Output) {
        let (rb, pg) = (item / self.panel_groups, item % self.panel_groups);
        let rows = rb * self.block_rows..((rb + 1) * self.block_rows).min(rows);
        let panels = self.matrix.outputs.div_ceil(NR);
        let group = pg * self.group..((pg + 1) * self.group).min(panels);
        self.matrix.block(x, &self.start, rows, group, dst);
    }
}

/// The product's output, written by the pool's workers at disjoint blocks.
struct Output {
    ptr: *mut f32,
    rows: usize,
    cols: usize,
}

// SAFETY: workers write disjoint blocks only (see `PanelMatrix::matmul_shared`), while it holds
// the buffer mutably borrowed and waits for them.
unsafe impl Sync for Output {}

/// One `m × cols` tile (`m ≤ MR`, `cols` one panel's valid outputs): rows `row..row + m` of
/// `dst` at `cols`, from `lhs: m × k` and `panel: k × NR` (`k` inputs), each sum starting from
/// `init`.
///
/// # Safety
/// The tile must lie inside `dst`, and no other thread may write it during the call.
unsafe fn tile(
    lhs: &[f32],
    m: usize,
    panel: &[f32],
    init: &[f32; NR],
    dst: &Output,
    row: usize,
    cols: std::ops::Range<usize>,
) {
    debug_assert!(row + m <= dst.rows && cols.end <= dst.cols);
    let k = panel.len() / NR;
    // SAFETY: the caller's contract; row `row + i` of `dst` starts at `(row + i) · cols`.
    let out = unsafe { dst.ptr.add(row * dst.cols + cols.start) };
    let width = cols.len();
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F; `lhs` holds `m × k` values and `panel` `k × NR`
        // (asserted by the slices' construction), and `out` addresses `m` rows of `width`
        // writable outputs `dst.cols` apart.
        unsafe { avx512::tile(lhs, m, panel, init, out, dst.cols, width) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: as above, with AVX2 and FMA.
        unsafe { avx2::tile(lhs, m, panel, init, out, dst.cols, width) };
        return;
    }
    let mut acc = [*init; MR];
    for (i, row) in lhs.chunks_exact(k.max(1)).take(m).enumerate() {
        for (&a, w) in row.iter().zip(panel.chunks_exact(NR)) {
            for (c, &b) in acc[i].iter_mut().zip(w) {
                *c += a * b;
            }
        }
    }
    for (i, values) in acc.iter().take(m).enumerate() {
        // SAFETY: row `i < m` of the tile, `width ≤ NR` outputs, inside `dst` (contract); the
        // destination may be uninitialized, so it is written through the pointer.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), out.add(i * dst.cols), width) };
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{MR, NR};

    /// The AVX-512 tile: `MR` rows at most, dispatched to a kernel with the row count fixed so
    /// the accumulators stay in registers.
    ///
    /// # Safety
    /// AVX-512F; `lhs: m × k`, `panel: k × NR`; `out` addresses `m` rows of `width ≤ NR`
    /// writable values, `stride` apart.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile(
        lhs: &[f32],
        m: usize,
        panel: &[f32],
        init: &[f32; NR],
        out: *mut f32,
        stride: usize,
        width: usize,
    ) {
        let k = panel.len() / NR;
        assert!(lhs.len() >= m * k && m <= MR && width <= NR);
        macro_rules! rows {
            ($($m:literal)*) => {
                match m {
                    $($m => unsafe { kernel::<$m>(lhs.as_ptr(), k, panel.as_ptr(), init, out, stride, width) },)*
                    _ => {}
                }
            };
        }
        rows!(1 2 3 4 5 6 7 8 9 10 11 12);
    }

    /// `M` rows × one panel: 2·`M` accumulators, one fused multiply-add chain per output in
    /// input order after its initial value.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn kernel<const M: usize>(
        lhs: *const f32,
        k: usize,
        panel: *const f32,
        init: &[f32; NR],
        out: *mut f32,
        stride: usize,
        width: usize,
    ) {
        // SAFETY: `init` holds NR = 32 values.
        let start = unsafe {
            [
                _mm512_loadu_ps(init.as_ptr()),
                _mm512_loadu_ps(init.as_ptr().add(16)),
            ]
        };
        let mut acc = [start; M];
        for p in 0..k {
            // SAFETY: `p < k`: the panel holds `k × NR` values and each of the `M` rows `k`.
            unsafe {
                let b0 = _mm512_loadu_ps(panel.add(p * NR));
                let b1 = _mm512_loadu_ps(panel.add(p * NR + 16));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let a = _mm512_set1_ps(*lhs.add(i * k + p));
                    acc[0] = _mm512_fmadd_ps(a, b0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(a, b1, acc[1]);
                }
            }
        }
        let low = mask(width);
        let high = mask(width.saturating_sub(16));
        for (i, acc) in acc.iter().enumerate() {
            // SAFETY: row `i < M` of the tile; the masks cover its `width` values only.
            unsafe {
                let row = out.add(i * stride);
                _mm512_mask_storeu_ps(row, low, acc[0]);
                _mm512_mask_storeu_ps(row.add(16), high, acc[1]);
            }
        }
    }

    /// The first `n` (at most 16) lanes.
    fn mask(n: usize) -> __mmask16 {
        if n >= 16 { u16::MAX } else { (1u16 << n) - 1 }
    }
}

/// The AVX-512 kernel's sums on AVX2: with sixteen registers of eight lanes, a tile is taken
/// as up to six rows × half a panel (sixteen outputs, two registers) at a time, each output still
/// one fused multiply-add chain in input order after its initial value.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::host::lanes_avx2::first;
    use super::{MR, NR};

    /// Rows of one kernel call.
    const ROWS: usize = 6;
    /// Outputs of one kernel call: half a panel.
    const HALF: usize = NR / 2;

    /// Whether this CPU has AVX2 and FMA.
    pub fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// See `super::avx512::tile`.
    ///
    /// # Safety
    /// AVX2 and FMA; `lhs: m × k`, `panel: k × NR`; `out` addresses `m` rows of `width ≤ NR`
    /// writable values, `stride` apart.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile(
        lhs: &[f32],
        m: usize,
        panel: &[f32],
        init: &[f32; NR],
        out: *mut f32,
        stride: usize,
        width: usize,
    ) {
        let k = panel.len() / NR;
        assert!(lhs.len() >= m * k && m <= MR && width <= NR);
        for r in (0..m).step_by(ROWS) {
            for h in (0..width).step_by(HALF) {
                let n = (width - h).min(HALF);
                // SAFETY: rows `r..` of `lhs` and `out`, outputs `h..h + n` of the panel and
                // the tile (the caller's guarantees).
                unsafe {
                    let (a, b, o) = (
                        lhs.as_ptr().add(r * k),
                        panel.as_ptr().add(h),
                        out.add(r * stride + h),
                    );
                    let init = init.as_ptr().add(h);
                    match (m - r).min(ROWS) {
                        6 => kernel::<6>(a, k, b, init, o, stride, n),
                        5 => kernel::<5>(a, k, b, init, o, stride, n),
                        4 => kernel::<4>(a, k, b, init, o, stride, n),
                        3 => kernel::<3>(a, k, b, init, o, stride, n),
                        2 => kernel::<2>(a, k, b, init, o, stride, n),
                        _ => kernel::<1>(a, k, b, init, o, stride, n),
                    }
                }
            }
        }
    }

    /// `M` rows × sixteen outputs of a panel (`panel` at the first, rows `NR` apart): 2·`M`
    /// accumulators from `init`, written for the first `width` outputs.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn kernel<const M: usize>(
        lhs: *const f32,
        k: usize,
        panel: *const f32,
        init: *const f32,
        out: *mut f32,
        stride: usize,
        width: usize,
    ) {
        // SAFETY (all): the caller's guarantees; sixteen initial values, `k` panel rows of
        // `NR`, `M` activation rows of `k`, and `M` output rows of `width` values.
        unsafe {
            let start = [_mm256_loadu_ps(init), _mm256_loadu_ps(init.add(8))];
            let mut acc = [start; M];
            for p in 0..k {
                let b0 = _mm256_loadu_ps(panel.add(p * NR));
                let b1 = _mm256_loadu_ps(panel.add(p * NR + 8));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let a = _mm256_set1_ps(*lhs.add(i * k + p));
                    acc[0] = _mm256_fmadd_ps(a, b0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(a, b1, acc[1]);
                }
            }
            let (low, high) = (first(width), first(width.saturating_sub(8)));
            for (i, acc) in acc.iter().enumerate() {
                let row = out.add(i * stride);
                _mm256_maskstore_ps(row, low, acc[0]);
                _mm256_maskstore_ps(row.add(8), high, acc[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn product(m: &PanelMatrix, x: &[f32], rows: usize, bias: Option<&[f32]>) -> Vec<f32> {
        PanelMatrix::matmul_shared(&[(m, bias)], x, rows).remove(0)
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
                (h % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn reference(x: &[f32], w: &[f32], rows: usize, n: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0f64; rows * n];
        for r in 0..rows {
            for o in 0..n {
                out[r * n + o] = (0..k)
                    .map(|i| x[r * k + i] as f64 * w[o * k + i] as f64)
                    .sum();
            }
        }
        out
    }

    #[test]
    fn products_with_a_bias_match_a_double_precision_reference() {
        // Tails everywhere: outputs not a multiple of a panel, rows not a multiple of the
        // kernel's or of a work item's.
        for (rows, n, k) in [(1, 7, 5), (13, 45, 33), (110, 96, 64), (200, 70, 129)] {
            let x = values(rows * k, 1);
            let w = values(n * k, 2);
            let bias = values(n, 9);
            let got = product(&PanelMatrix::pack(&w, n, k), &x, rows, Some(&bias));
            let mut want = reference(&x, &w, rows, n, k);
            for (i, v) in want.iter_mut().enumerate() {
                *v += bias[i % n] as f64;
            }
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (*g as f64 - w).abs() <= 1e-5 * (k as f64),
                    "{rows}×{n}×{k}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn shared_products_equal_each_alone() {
        let (rows, k) = (50, 40);
        let x = values(rows * k, 6);
        let ms: Vec<PanelMatrix> = [64, 20, 96]
            .iter()
            .map(|&n| PanelMatrix::pack(&values(n * k, n as u32), n, k))
            .collect();
        let bias = values(20, 8);
        let biases = [None, Some(bias.as_slice()), None];
        let shared: Vec<(&PanelMatrix, Option<&[f32]>)> = ms.iter().zip(biases).collect();
        let together = PanelMatrix::matmul_shared(&shared, &x, rows);
        for ((m, b), y) in shared.iter().zip(&together) {
            assert_eq!(*y, product(m, &x, rows, *b));
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_and_in_a_batch() {
        let (rows, n, k) = (37, 64, 48);
        let x = values(rows * k, 3);
        let m = PanelMatrix::pack(&values(n * k, 4), n, k);
        let all = product(&m, &x, rows, None);
        for r in [0, 11, 12, 36] {
            let alone = product(&m, &x[r * k..(r + 1) * k], 1, None);
            assert_eq!(alone, all[r * n..(r + 1) * n], "row {r}");
        }
    }

    #[test]
    fn no_rows_give_an_empty_product() {
        let m = PanelMatrix::pack(&values(12, 5), 3, 4);
        assert!(product(&m, &[], 0, None).is_empty());
        assert_eq!(m.shape(), (3, 4));
    }
}
