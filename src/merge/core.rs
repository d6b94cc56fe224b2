//! Core Space merging (Panariello et al., NeurIPS 2025) and the isotropic merges that run in it
//! (TSV-M; Iso-C and Iso-CTS, Marczak et al., ICML 2025).
//!
//! For one module with adapters i = 1..T (`B_i`: O × r_i, already multiplied by its scale c_i;
//! `A_i`: r_i × I), two separate SVDs give the core bases:
//! `B_cat = [B_1 | … | B_T] = U·S_B·W_Bᵀ` and `A_cat = [A_1; …; A_T] = W_A·S_A·Vᵀ`.
//! Each update in the core is `M_i = Uᵀ·B_i·A_i·V` (k_B × k_A, k ≤ R = Σ r_i), and
//! `U·M_i·Vᵀ = B_i·A_i` exactly. A method merges the small `M_i` into `M*`; the module's update is
//! `λ·U·M*·Vᵀ`, stored as the factors `b = λ·U·M*` and `a = Vᵀ`, so its rank is at most R.
//!
//! Both SVDs come from Gram matrices, `B_catᵀ·B_cat = W_B·S_B²·W_Bᵀ`, so `U = B_cat·W_B·S_B⁻¹`
//! and `Uᵀ·B_cat = S_B·W_Bᵀ`: every `M_i` is a product of two small blocks, and the only work
//! at the module's full size is two Gram products and two basis products.

use faer::{Mat, MatRef, Side};

use super::align::Factors;
use super::frame::Frame;
use super::{MergeError, ModuleDelta};
use crate::matrix::Matrix;

/// Singular values at or below this fraction of the largest are treated as zero. Directions the
/// factors do not span (a duplicated or rank-deficient adapter) are left out of the core instead
/// of being filled with arbitrary vectors, so every method stays well defined.
pub const CORE_CUT: f64 = 1e-6;

/// The core space of one module and every adapter's update in it.
#[derive(Debug, Clone)]
pub struct CoreBasis {
    /// `U`, `O × k_B`, orthonormal columns.
    pub u: Matrix,
    /// `Vᵀ`, `k_A × I`, orthonormal rows.
    pub vt: Matrix,
    /// `Uᵀ·B_cat = S_B·W_Bᵀ`, `k_B × R`.
    left: Mat<f64>,
    /// `(A_cat·V)ᵀ = S_A·W_Aᵀ`, `k_A × R`.
    right: Mat<f64>,
    /// Each adapter's columns of `left` and `right`: `(offset, r_i)`, in input order.
    blocks: Vec<(usize, usize)>,
}

/// One adapter's core matrix in factored form, `M_i = l·rᵀ` (rank ≤ r_i), weight included.
#[derive(Debug, Clone)]
pub struct CoreFactors {
    /// `k_B × r_i`.
    pub l: Mat<f64>,
    /// `k_A × r_i`.
    pub r: Mat<f64>,
}

impl CoreFactors {
    pub fn dense(&self) -> Mat<f64> {
        &self.l * self.r.transpose()
    }
}

impl CoreBasis {
    pub fn bytes(&self) -> usize {
        let small = (self.left.nrows() + self.right.nrows()) * self.left.ncols() * 8;
        self.u.bytes() + self.vt.bytes() + small
    }

    /// `(k_B, k_A)`, the shape of every core matrix.
    pub fn shape(&self) -> (usize, usize) {
        (self.left.nrows(), self.right.nrows())
    }

    /// Adapter `i`'s core matrix times `weight`, factored.
    pub fn factors(&self, i: usize, weight: f64) -> CoreFactors {
        let (offset, r) = self.blocks[i];
        let l = self.left.subcols(offset, r);
        CoreFactors {
            l: Mat::from_fn(l.nrows(), r, |a, b| weight * l[(a, b)]),
            r: self.right.subcols(offset, r).to_owned(),
        }
    }

    /// `λ·U·M*·Vᵀ` as the factors `b = λ·U·M*`, `a = Vᵀ`.
    pub fn expand(&self, merged: MatRef<'_, f64>, lambda: f64) -> ModuleDelta {
        let core = Matrix::from_fn(merged.nrows(), merged.ncols(), |i, j| {
            (lambda * merged[(i, j)]) as f32
        });
        ModuleDelta::LowRank {
            b: self.u.matmul(&core),
            a: self.vt.clone(),
        }
    }
}

/// Which bases a core needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bases {
    /// The singular vectors of `B_cat` and `A_catᵀ` (TIES depends on the basis itself).
    Singular,
    /// Any orthonormal bases of the same spaces: TA, TSV-M, Iso-C and Iso-CTS give the same
    /// result in every one, and a Cholesky factor of the Gram matrix is far cheaper than its
    /// eigendecomposition.
    Any,
}

/// The core bases of one module and the core matrices of its adapters.
pub fn core_basis(
    module: &str,
    factors: &[Factors<'_>],
    bases: Bases,
) -> Result<CoreBasis, MergeError> {
    let rows = factors[0].b.rows();
    let cols = factors[0].a.cols();
    let total: usize = factors.iter().map(|f| f.a.rows()).sum();
    let mut b_cat = Mat::<f64>::zeros(rows, total);
    let mut a_cat_t = Mat::<f64>::zeros(cols, total);
    let mut blocks = Vec::with_capacity(factors.len());
    let mut offset = 0;
    for f in factors {
        let (b, a) = (f.b.as_faer(), f.a.as_faer());
        for k in 0..f.a.rows() {
            for i in 0..rows {
                b_cat[(i, offset + k)] = f.scale * f64::from(b[(i, k)]);
            }
            for j in 0..cols {
                a_cat_t[(j, offset + k)] = f64::from(a[(k, j)]);
            }
        }
        blocks.push((offset, f.a.rows()));
        offset += f.a.rows();
    }
    let failed = || MergeError::Svd {
        module: module.to_string(),
    };
    let frame = |x: MatRef<'_, f64>| match bases {
        Bases::Singular => Principal::of(x).map(|p| p.frame()),
        Bases::Any => Frame::cholesky(x).or_else(|| Principal::of(x).map(|p| p.frame())),
    };
    let left = frame(b_cat.as_ref()).ok_or_else(failed)?;
    let right = frame(a_cat_t.as_ref()).ok_or_else(failed)?;
    Ok(CoreBasis {
        u: Matrix::from_faer(left.basis(b_cat.as_ref()).as_ref()),
        vt: Matrix::from_faer(right.basis(a_cat_t.as_ref()).transpose()),
        left: left.coords,
        right: right.coords,
        blocks,
    })
}

/// The right singular vectors and singular values of a tall `n × R` matrix `X`, from the
/// eigendecomposition of `XᵀX`, largest first, above [`CORE_CUT`].
struct Principal {
    /// `W`, `R × k`.
    w: Mat<f64>,
    s: Vec<f64>,
}

impl Principal {
    /// `None` when the eigendecomposition fails (it does not on finite input).
    fn of(x: MatRef<'_, f64>) -> Option<Self> {
        if x.ncols() == 0 || x.nrows() == 0 {
            let (w, s) = (Mat::zeros(x.ncols(), 0), Vec::new());
            return Some(Self { w, s });
        }
        let gram = x.transpose() * x;
        let eigen = gram.self_adjoint_eigen(Side::Lower).ok()?;
        let values = eigen.S().column_vector();
        // Eigenvalues come smallest first.
        let order: Vec<usize> = (0..values.nrows()).rev().collect();
        let largest = order.first().map_or(0.0, |&j| values[j].max(0.0).sqrt());
        let kept: Vec<usize> = order
            .into_iter()
            .filter(|&j| {
                let s = values[j].max(0.0).sqrt();
                s > 0.0 && s > largest * CORE_CUT
            })
            .collect();
        let s = kept.iter().map(|&j| values[j].sqrt()).collect();
        let w = Mat::from_fn(x.ncols(), kept.len(), |i, j| eigen.U()[(i, kept[j])]);
        Some(Self { w, s })
    }

    /// `X·W·S⁻¹`, the left singular vectors (`n × k`).
    fn basis(&self, x: MatRef<'_, f64>) -> Mat<f64> {
        x * self.inverse_scaled()
    }

    /// `W·S⁻¹`.
    fn inverse_scaled(&self) -> Mat<f64> {
        Mat::from_fn(self.w.nrows(), self.w.ncols(), |i, j| {
            self.w[(i, j)] / self.s[j]
        })
    }

    /// The left singular vectors as a frame: `U = X·W·S⁻¹`, `Uᵀ·X = S·Wᵀ`.
    fn frame(&self) -> Frame {
        Frame::from_transform(
            self.inverse_scaled(),
            Mat::from_fn(self.w.ncols(), self.w.nrows(), |i, j| {
                self.s[i] * self.w[(j, i)]
            }),
        )
    }
}

/// `Σ_i M_i = [l_1 … l_T]·[r_1 … r_T]ᵀ`.
pub fn sum(cores: &[CoreFactors], shape: (usize, usize)) -> Mat<f64> {
    concat(cores.iter().map(|c| &c.l), shape.0)
        * concat(cores.iter().map(|c| &c.r), shape.1).transpose()
}

/// Matrices with `rows` rows side by side.
fn concat<'a>(blocks: impl Iterator<Item = &'a Mat<f64>> + Clone, rows: usize) -> Mat<f64> {
    let cols = blocks.clone().map(|b| b.ncols()).sum();
    let mut out = Mat::<f64>::zeros(rows, cols);
    let mut offset = 0;
    for b in blocks {
        out.subcols_mut(offset, b.ncols()).copy_from(b);
        offset += b.ncols();
    }
    out
}

/// A thin SVD `M = Y·diag(σ)·Zᵀ` keeping the components above [`CORE_CUT`] of the largest
/// (from the Gram matrix of the shorter side: these matrices are small and far from the
/// precision limit, and an eigendecomposition is a few times cheaper than an SVD).
struct Thin {
    y: Mat<f64>,
    s: Vec<f64>,
    z: Mat<f64>,
}

fn thin(m: MatRef<'_, f64>) -> Thin {
    if m.nrows() < m.ncols() {
        let t = thin(m.transpose());
        return Thin {
            y: t.z,
            s: t.s,
            z: t.y,
        };
    }
    // Tall: MᵀM = Z·diag(σ²)·Zᵀ and Y = M·Z·diag(σ)⁻¹, as for the core bases.
    match Principal::of(m) {
        Some(p) => Thin {
            y: p.basis(m),
            s: p.s,
            z: p.w,
        },
        _ => Thin {
            y: Mat::zeros(m.nrows(), 0),
            s: Vec::new(),
            z: Mat::zeros(m.ncols(), 0),
        },
    }
}

/// The thin SVD of a low-rank `l·rᵀ` from its factors: thin QRs `l = Q_l·T_l`, `r = Q_r·T_r`,
/// and the SVD of the small `T_l·T_rᵀ`.
fn thin_factored(l: MatRef<'_, f64>, r: MatRef<'_, f64>) -> Thin {
    if l.ncols() == 0 || l.nrows() == 0 || r.nrows() == 0 {
        return thin(Mat::<f64>::zeros(l.nrows(), r.nrows()).as_ref());
    }
    let (ql, qr) = (l.qr(), r.qr());
    let small = thin((ql.thin_R() * qr.thin_R().transpose()).as_ref());
    Thin {
        y: ql.compute_thin_Q() * &small.y,
        s: small.s,
        z: qr.compute_thin_Q() * &small.z,
    }
}

/// The nearest matrix with orthonormal columns, `Y·Zᵀ` for `X = Y·Σ·Zᵀ`, over the directions
/// `X` spans (a rank-deficient `X` gives a partial isometry, not arbitrary vectors).
fn polar(x: MatRef<'_, f64>) -> Mat<f64> {
    let t = thin(x);
    &t.y * t.z.transpose()
}

/// `mean(σ)·Y·Zᵀ`: the spectrum of `M` flattened to its mean over all `min(rows, cols)` values.
pub fn isotropize(m: MatRef<'_, f64>) -> Mat<f64> {
    let slots = m.nrows().min(m.ncols());
    let t = thin(m);
    if slots == 0 || t.s.is_empty() {
        return m.to_owned();
    }
    let mean = t.s.iter().sum::<f64>() / slots as f64;
    let y = Mat::from_fn(t.y.nrows(), t.y.ncols(), |i, j| mean * t.y[(i, j)]);
    &y * t.z.transpose()
}

/// Singular triplets placed side by side: `P_c`, `s_c`, `Q_c`.
struct Stack {
    left: Vec<Mat<f64>>,
    values: Vec<f64>,
    right: Vec<Mat<f64>>,
}

impl Stack {
    fn new() -> Self {
        Self {
            left: Vec::new(),
            values: Vec::new(),
            right: Vec::new(),
        }
    }

    /// Appends the first `k` components of `t` (fewer when it has fewer).
    fn push(&mut self, t: &Thin, k: usize) {
        let k = k.min(t.s.len());
        self.left.push(t.y.subcols(0, k).to_owned());
        self.right.push(t.z.subcols(0, k).to_owned());
        self.values.extend_from_slice(&t.s[..k]);
    }

    /// `polar(P_c)·diag(s)·polar(Q_c)ᵀ` with `s` the stacked values, or all of them `flat`.
    fn orthogonalized(&self, shape: (usize, usize), flat: Option<f64>) -> Mat<f64> {
        let p = polar(concat(self.left.iter(), shape.0).as_ref());
        let q = polar(concat(self.right.iter(), shape.1).as_ref());
        let s = Mat::from_fn(self.values.len(), self.values.len(), |i, j| {
            if i == j {
                flat.unwrap_or(self.values[i])
            } else {
                0.0
            }
        });
        &p * &s * q.transpose()
    }
}

/// TSV-M: the top `k = ⌊R/T⌋` singular triplets of every `M_i` side by side (fewer for an
/// adapter of lower rank), both bases replaced by their polar factors, the values kept.
pub fn tsv(cores: &[CoreFactors], shape: (usize, usize)) -> Mat<f64> {
    let per_task = shape.0.min(shape.1) / cores.len().max(1);
    let mut stack = Stack::new();
    for m in cores {
        stack.push(&thin_factored(m.l.as_ref(), m.r.as_ref()), per_task);
    }
    stack.orthogonalized(shape, None)
}

/// The common and per-task sizes of Iso-CTS: `c = ⌊R·f⌋`, then `c = R − round((R − c)/T)·T`
/// (half to even, as Python rounds) so the task-specific part divides evenly, `d = (R − c)/T`.
/// Where rounding up would leave no room, the task part rounds down instead.
pub fn iso_cts_sizes(slots: usize, tasks: usize, fraction: f64) -> (usize, usize) {
    let tasks = tasks.max(1);
    let common = (slots as f64 * fraction).floor() as usize;
    let per_task = round_half_even((slots - common) as f64 / tasks as f64).min(slots / tasks);
    (slots - per_task * tasks, per_task)
}

fn round_half_even(x: f64) -> usize {
    let floor = x.floor();
    let rounded = match (x - floor).partial_cmp(&0.5) {
        Some(std::cmp::Ordering::Less) => floor,
        Some(std::cmp::Ordering::Greater) => floor + 1.0,
        _ if floor % 2.0 == 0.0 => floor,
        _ => floor + 1.0,
    };
    rounded.max(0.0) as usize
}

/// Iso-CTS: the top `c` directions of `Σ M_i` (common space), then for each adapter the top `d`
/// directions of `(I − C·Cᵀ)·M_i`; task blocks first, common block last, both bases replaced by
/// their polar factors and every singular value set to the mean of the `R` stacked ones.
pub fn iso_cts(cores: &[CoreFactors], shape: (usize, usize), fraction: f64) -> Mat<f64> {
    let slots = shape.0.min(shape.1);
    let (common, per_task) = iso_cts_sizes(slots, cores.len(), fraction);
    let total = thin(sum(cores, shape).as_ref());
    let c = total.y.subcols(0, common.min(total.s.len()));
    let mut stack = Stack::new();
    for m in cores {
        // (I − C·Cᵀ)·l·rᵀ: the projection acts on the left factor only.
        let projection = c * (c.transpose() * &m.l);
        let projected = &m.l - &projection;
        stack.push(&thin_factored(projected.as_ref(), m.r.as_ref()), per_task);
    }
    stack.push(&total, common);
    let mean = stack.values.iter().sum::<f64>() / slots.max(1) as f64;
    stack.orthogonalized(shape, Some(mean))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_cts_sizes_follow_the_reference() {
        // R = 32, T = 4, f = 0.8: c = 25, (32 − 25)/4 = 1.75 → 2, so c = 24 and d = 2.
        assert_eq!(iso_cts_sizes(32, 4, 0.8), (24, 2));
        // f = 0: all task-specific.
        assert_eq!(iso_cts_sizes(32, 4, 0.0), (0, 8));
        // 10/4 = 2.5 rounds to 2 (half to even): c = 2.
        assert_eq!(iso_cts_sizes(10, 4, 0.0), (2, 2));
        // 6/4 = 1.5 rounds to 2, which would need 8 > 6 slots: d = 1.
        assert_eq!(iso_cts_sizes(6, 4, 0.0), (2, 1));
        assert_eq!(iso_cts_sizes(8, 4, 1.0), (8, 0));
    }

    fn random(rows: usize, cols: usize, seed: u64) -> Mat<f64> {
        let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        Mat::from_fn(rows, cols, |_, _| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 10_000) as f64 / 10_000.0 - 0.5
        })
    }

    fn singular_values(m: MatRef<'_, f64>) -> Vec<f64> {
        thin(m).s
    }

    #[test]
    fn isotropize_flattens_and_keeps_the_directions() {
        let m = random(6, 6, 3);
        let flat = isotropize(m.as_ref());
        let s = singular_values(flat.as_ref());
        let mean = singular_values(m.as_ref()).iter().sum::<f64>() / 6.0;
        assert_eq!(s.len(), 6);
        assert!(s.iter().all(|x| (x - mean).abs() < 1e-9), "{s:?} vs {mean}");
    }

    fn factors(k: usize, r: usize, seed: u64) -> CoreFactors {
        CoreFactors {
            l: random(k, r, seed),
            r: random(k, r, seed + 1000),
        }
    }

    #[test]
    fn factored_and_dense_svds_agree() {
        let m = factors(8, 3, 4);
        let t = thin_factored(m.l.as_ref(), m.r.as_ref());
        let d = thin(m.dense().as_ref());
        assert_eq!(t.s.len(), 3);
        for (a, b) in t.s.iter().zip(&d.s) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        let back =
            &t.y * Mat::from_fn(3, 3, |i, j| if i == j { t.s[i] } else { 0.0 }) * t.z.transpose();
        assert!((&back - &m.dense()).norm_l2() < 1e-12);
    }

    #[test]
    fn tsv_of_one_adapter_is_that_adapter() {
        let m = factors(5, 5, 9);
        let got = tsv(std::slice::from_ref(&m), (5, 5));
        assert!((&got - &m.dense()).norm_l2() < 1e-9 * m.dense().norm_l2());
    }

    #[test]
    fn iso_cts_without_a_common_space_is_isotropic_tsv() {
        let cores: Vec<_> = (0..4).map(|i| factors(8, 2, 20 + i)).collect();
        let want = isotropize(tsv(&cores, (8, 8)).as_ref());
        let got = iso_cts(&cores, (8, 8), 0.0);
        assert!((&got - &want).norm_l2() < 1e-9 * want.norm_l2());
    }

    #[test]
    fn rank_deficient_inputs_stay_finite() {
        // Two identical adapters: the stacked bases are rank-deficient.
        let m = factors(4, 2, 5);
        let cores = vec![m.clone(), m.clone()];
        for merged in [
            tsv(&cores, (4, 4)),
            iso_cts(&cores, (4, 4), 0.5),
            isotropize(Mat::<f64>::zeros(4, 4).as_ref()),
        ] {
            let finite = (0..4).all(|i| (0..4).all(|j| merged[(i, j)].is_finite()));
            assert!(finite);
        }
    }
}
