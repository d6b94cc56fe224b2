//! Orthonormal bases of the column space of a tall matrix, as the merges use them: for `X`
//! (`n × R`), a basis `U` (`n × k`) and the coordinates of X's columns in it, `Uᵀ·X` (`k × R`).
//!
//! A well-conditioned `X` gets its basis from the Cholesky factor of the small Gram matrix
//! `XᵀX`: one product at `X`'s full size instead of a Householder QR and the formation of its
//! `Q`, and `U` itself is never formed: `U·M = X·(T·M)` with the small transform `T`.

use faer::{Mat, MatRef, Side};

/// How a [`Frame`] holds its basis.
#[derive(Debug, Clone)]
enum Basis {
    /// `U = X·T` with this `T` (`R × k`).
    Transform(Mat<f64>),
    /// `U` itself (`n × k`).
    Explicit(Mat<f64>),
}

/// A basis of a tall matrix's columns and their coordinates in it.
#[derive(Debug, Clone)]
pub struct Frame {
    basis: Basis,
    /// `Uᵀ·X`, `k × R`.
    pub coords: Mat<f64>,
}

impl Frame {
    /// Smallest ratio of Cholesky diagonal entries accepted; below it the Gram matrix is too
    /// close to singular for a triangular factor, and the caller's fallback is used instead.
    const MIN_PIVOT_RATIO: f64 = 1e-4;

    /// From `XᵀX = L·Lᵀ`: `U = X·L⁻ᵀ` and `Uᵀ·X = Lᵀ` (upper triangular, the `R` of a thin QR
    /// with a positive diagonal). `None` when `X` is wide, empty or not well conditioned.
    pub fn cholesky(x: MatRef<'_, f64>) -> Option<Self> {
        if x.ncols() == 0 || x.nrows() < x.ncols() {
            return None;
        }
        let gram = x.transpose() * x;
        let llt = gram.llt(Side::Lower).ok()?;
        let l = llt.L();
        let pivots = (0..l.nrows()).map(|i| l[(i, i)]);
        let (low, high) = pivots.fold((f64::INFINITY, 0.0f64), |(lo, hi), d| {
            (lo.min(d), hi.max(d))
        });
        // `low` is NaN for a non-finite Gram matrix: refused as well.
        let conditioned = low.partial_cmp(&(high * Self::MIN_PIVOT_RATIO));
        if conditioned != Some(std::cmp::Ordering::Greater) {
            return None;
        }
        let mut inverse = Mat::<f64>::identity(l.nrows(), l.nrows());
        l.solve_lower_triangular_in_place(inverse.as_mut());
        Some(Self {
            basis: Basis::Transform(inverse.transpose().to_owned()),
            coords: l.transpose().to_owned(),
        })
    }

    /// A thin QR `X = Q·R` by Householder reflections: `U = Q`, `Uᵀ·X = R`. Defined for every
    /// `X`, rank-deficient ones included (`R` then has zeros on its diagonal).
    pub fn householder(x: MatRef<'_, f64>) -> Self {
        let qr = x.qr();
        Self {
            basis: Basis::Explicit(qr.compute_thin_Q()),
            coords: qr.thin_R().to_owned(),
        }
    }

    /// A triangular frame (`Uᵀ·X` upper triangular): [`Frame::cholesky`] where `X` is well
    /// conditioned, else [`Frame::householder`].
    pub fn triangular(x: MatRef<'_, f64>) -> Self {
        Self::cholesky(x).unwrap_or_else(|| Self::householder(x))
    }

    /// The frame `U = X·transform` with `Uᵀ·X = coords`; the caller vouches that `U` is
    /// orthonormal.
    pub fn from_transform(transform: Mat<f64>, coords: Mat<f64>) -> Self {
        Self {
            basis: Basis::Transform(transform),
            coords,
        }
    }

    /// `U`, for the `x` this frame was made from.
    pub fn basis(&self, x: MatRef<'_, f64>) -> Mat<f64> {
        match &self.basis {
            Basis::Transform(t) => x * t,
            Basis::Explicit(u) => u.clone(),
        }
    }

    /// `U·m`, for the `x` this frame was made from.
    pub fn basis_times(&self, x: MatRef<'_, f64>, m: MatRef<'_, f64>) -> Mat<f64> {
        match &self.basis {
            Basis::Transform(t) => x * (t * m),
            Basis::Explicit(u) => u * m,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tall(seed: u32, rows: usize, cols: usize) -> Mat<f64> {
        let mut next = crate::merge::test_values(seed);
        Mat::from_fn(rows, cols, |_, _| f64::from(next()))
    }

    /// `U` orthonormal, `U·coords = X`, and `basis_times` equal to `U·M`.
    fn check(frame: &Frame, x: MatRef<'_, f64>) {
        let u = frame.basis(x);
        let k = u.ncols();
        let gram = u.transpose() * &u;
        let eye = Mat::<f64>::identity(k, k);
        assert!((&gram - &eye).norm_max() < 1e-10, "U is not orthonormal");
        assert!((&u * &frame.coords - x).norm_max() < 1e-10, "U·coords ≠ X");
        let m = tall(9, k, 3);
        let direct = &u * &m;
        assert!((frame.basis_times(x, m.as_ref()) - direct).norm_max() < 1e-10);
    }

    #[test]
    fn cholesky_and_householder_frames_reconstruct_the_matrix() {
        let x = tall(1, 64, 12);
        let chol = Frame::cholesky(x.as_ref()).expect("a random tall matrix is well conditioned");
        check(&chol, x.as_ref());
        check(&Frame::householder(x.as_ref()), x.as_ref());
        // Both coordinates are the R of a thin QR: upper triangular, equal up to row signs.
        let house = Frame::householder(x.as_ref());
        for i in 0..12 {
            for j in 0..12 {
                let (c, h) = (chol.coords[(i, j)], house.coords[(i, j)]);
                assert!((c.abs() - h.abs()).abs() < 1e-10, "R differs at ({i}, {j})");
            }
        }
    }

    #[test]
    fn a_rank_deficient_matrix_falls_back_to_householder() {
        let mut x = tall(2, 40, 6);
        for i in 0..40 {
            x[(i, 5)] = 2.0 * x[(i, 1)];
        }
        assert!(Frame::cholesky(x.as_ref()).is_none());
        let frame = Frame::triangular(x.as_ref());
        let u = frame.basis(x.as_ref());
        assert!((&u * &frame.coords - &x).norm_max() < 1e-10);
        assert!(
            Frame::cholesky(Mat::<f64>::zeros(3, 5).as_ref()).is_none(),
            "wide"
        );
    }
}
