//! KnOTS alignment of one module: the thin SVD of `M = [τ_1 | … | τ_n]` computed from the LoRA
//! factors, never from `M`.
//!
//! `M = B_cat · blockdiag(c_i·A_i)`. With thin QRs `B_cat = Q_B·R_B` and `(c_i·A_i)ᵀ = Q_i·R_i`,
//! `M = Q_B · C · blockdiag(Q_i)ᵀ` with the small core `C = R_B · blockdiag(R_iᵀ)`. The SVD
//! `C = U_c·S·V_cᵀ` gives `U = Q_B·U_c` and `V_iᵀ = V_cᵀ[:, block i]·Q_iᵀ`: the SVD of `M` up
//! to the sign of each component, at O(O·(Σr)² + Σr·r·I) instead of an SVD of `O × nI`.
//!
//! The QRs come from Cholesky factors of the Gram matrices where those are well conditioned
//! (`Q` is then never formed: `Q·X = B_cat·(R_B⁻¹·X)`), else from Householder reflections
//! (duplicated or rank-deficient adapters); see `frame`.

use faer::{Mat, MatRef};

use super::MergeError;
use super::frame::Frame;
use super::magnitude::Histogram;
use crate::matrix::Matrix;

/// Singular values at or below this are dropped (the reference's absolute cut).
pub const SVD_CUT: f64 = 1e-5;

/// The factors of one adapter's update of one module: `τ = scale · b · a`.
#[derive(Debug, Clone, Copy)]
pub struct Factors<'a> {
    pub b: &'a Matrix,
    pub a: &'a Matrix,
    pub scale: f64,
}

/// The shared basis of a module and each adapter's coordinates in it.
#[derive(Debug, Clone)]
pub struct Alignment {
    /// `U`, `O × k`: the left singular vectors kept.
    pub u: Matrix,
    /// The `k` kept singular values, largest first.
    pub s: Vec<f64>,
    /// Per adapter (in input order), `rep_i = diag(s)·V_iᵀ` (`k × I`), so `τ_i = U·rep_i`.
    pub reps: Vec<Matrix>,
    /// The magnitude histogram of each `rep_i`, counted while it is in cache (TIES' trim reads
    /// these instead of counting every value again on every merge).
    pub(crate) histograms: Vec<Histogram>,
}

impl Alignment {
    pub fn rank(&self) -> usize {
        self.s.len()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.u.bytes()
            + self.reps.iter().map(Matrix::bytes).sum::<usize>()
            + self.histograms.iter().map(Histogram::bytes).sum::<usize>()
    }
}

/// Aligns the updates of one module. All factors must share `O` (rows of `b`) and `I`.
pub fn align(module: &str, factors: &[Factors<'_>]) -> Result<Alignment, MergeError> {
    align_with_cut(module, factors, SVD_CUT)
}

/// [`align`], keeping the components with singular value above `cut`.
pub fn align_with_cut(
    module: &str,
    factors: &[Factors<'_>],
    cut: f64,
) -> Result<Alignment, MergeError> {
    let rows = factors[0].b.rows();
    let total_rank: usize = factors.iter().map(|f| f.a.rows()).sum();
    let mut b_cat = Mat::<f64>::zeros(rows, total_rank);
    let mut offset = 0;
    for f in factors {
        b_cat
            .subcols_mut(offset, f.a.rows())
            .copy_from(to_f64(f.b.as_faer(), 1.0));
        offset += f.a.rows();
    }
    let left = Frame::triangular(b_cat.as_ref());
    let r_b = &left.coords;

    // Per adapter: (c_i·A_i)ᵀ = Q_i·R_i, and the core's column block R_B[:, block i]·R_iᵀ.
    let mut rights = Vec::with_capacity(factors.len());
    let mut core_blocks = Vec::with_capacity(factors.len());
    let mut offset = 0;
    for f in factors {
        let a_t = to_f64(f.a.as_faer().transpose(), f.scale);
        let frame = Frame::triangular(a_t.as_ref());
        core_blocks.push(r_b.subcols(offset, f.a.rows()) * frame.coords.transpose());
        rights.push((a_t, frame));
        offset += f.a.rows();
    }
    let core_cols: usize = core_blocks.iter().map(|c| c.ncols()).sum();
    let mut core = Mat::<f64>::zeros(r_b.nrows(), core_cols);
    let mut offset = 0;
    for block in &core_blocks {
        core.subcols_mut(offset, block.ncols()).copy_from(block);
        offset += block.ncols();
    }

    let svd = core.thin_svd().map_err(|_| MergeError::Svd {
        module: module.to_string(),
    })?;
    let s_all = svd.S().column_vector();
    let kept: Vec<usize> = (0..s_all.nrows()).filter(|&j| s_all[j] > cut).collect();
    let s: Vec<f64> = kept.iter().map(|&j| s_all[j]).collect();
    let u_c = Mat::<f64>::from_fn(svd.U().nrows(), kept.len(), |i, j| svd.U()[(i, kept[j])]);
    let u = Matrix::from_faer(left.basis_times(b_cat.as_ref(), u_c.as_ref()).as_ref());

    let mut reps = Vec::with_capacity(factors.len());
    let mut histograms = Vec::with_capacity(factors.len());
    let mut row = 0;
    for (a_t, frame) in &rights {
        let v_c = svd.V().subrows(row, frame.coords.nrows());
        // rep_i = diag(s)·V_c[block i, kept]ᵀ·Q_iᵀ  (k × I)
        let sv = Mat::<f64>::from_fn(kept.len(), v_c.nrows(), |i, j| s[i] * v_c[(j, kept[i])]);
        // Computed transposed (I × k, column-major) so its columns are rep_i's rows.
        let rep_t = frame.basis_times(a_t.as_ref(), sv.transpose());
        let rep = Matrix::from_faer(rep_t.transpose());
        histograms.push(Histogram::of(rep.as_slice()));
        reps.push(rep);
        row += frame.coords.nrows();
    }
    Ok(Alignment {
        u,
        s,
        reps,
        histograms,
    })
}

fn to_f64(m: MatRef<'_, f32>, scale: f64) -> Mat<f64> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| scale * f64::from(m[(i, j)]))
}

/// The dense `M = [τ_1 | … | τ_n]` in f64, for tests that compare against a dense SVD.
pub fn dense_concat(factors: &[Factors<'_>]) -> Mat<f64> {
    let rows = factors[0].b.rows();
    let cols = factors[0].a.cols();
    let mut m = Mat::<f64>::zeros(rows, cols * factors.len());
    for (f, factor) in factors.iter().enumerate() {
        let b: MatRef<'_, f32> = factor.b.as_faer();
        let a: MatRef<'_, f32> = factor.a.as_faer();
        for i in 0..rows {
            for j in 0..cols {
                let dot: f64 = (0..a.nrows())
                    .map(|k| f64::from(b[(i, k)]) * f64::from(a[(k, j)]))
                    .sum();
                m[(i, f * cols + j)] = factor.scale * dot;
            }
        }
    }
    m
}
