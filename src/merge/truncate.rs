//! Truncated SVD of a merged delta to a fixed rank, for exporting dense results (TIES, DARE) or
//! compressing low-rank ones as an ordinary PEFT adapter.

use faer::Mat;

use super::align::{Factors, align_with_cut};
use super::{MergeError, MergedDelta, ModuleDelta};
use crate::matrix::Matrix;

/// A delta cut to a rank, and how much of it was lost.
#[derive(Debug, Clone)]
pub struct Truncated {
    pub delta: MergedDelta,
    /// `‖ΔW − ΔW_rank‖_F / ‖ΔW‖_F` over all modules together.
    pub relative_error: f64,
}

/// Keeps the `rank` largest singular components of every module, as low-rank factors
/// `b = U·diag(s)`, `a = Vᵀ`.
pub fn truncate(delta: &MergedDelta, rank: usize) -> Result<Truncated, MergeError> {
    if rank == 0 {
        return Err(MergeError::ZeroRank);
    }
    let (mut kept_sq, mut total_sq) = (0.0, 0.0);
    let mut modules = std::collections::BTreeMap::new();
    for (path, module) in &delta.modules {
        let (u, s, vt) = svd(path, module)?;
        let r = rank.min(s.len());
        total_sq += s.iter().map(|x| x * x).sum::<f64>();
        kept_sq += s[..r].iter().map(|x| x * x).sum::<f64>();
        let b = Matrix::from_fn(u.rows(), r, |i, j| (f64::from(u.row(i)[j]) * s[j]) as f32);
        let a = Matrix::from_fn(r, vt.cols(), |i, j| vt.row(i)[j]);
        modules.insert(path.clone(), ModuleDelta::LowRank { b, a });
    }
    let relative_error = if total_sq > 0.0 {
        ((total_sq - kept_sq).max(0.0) / total_sq).sqrt()
    } else {
        0.0
    };
    Ok(Truncated {
        delta: MergedDelta { modules },
        relative_error,
    })
}

/// `(U, s, Vᵀ)` of one module's update, largest singular values first.
fn svd(path: &str, module: &ModuleDelta) -> Result<(Matrix, Vec<f64>, Matrix), MergeError> {
    match module {
        ModuleDelta::LowRank { b, a } => {
            if a.rows() == 0 {
                return Ok((
                    Matrix::zeros(b.rows(), 0),
                    Vec::new(),
                    Matrix::zeros(0, a.cols()),
                ));
            }
            let aligned = align_with_cut(path, &[Factors { b, a, scale: 1.0 }], 0.0)?;
            let rep = &aligned.reps[0];
            // rep = diag(s)·Vᵀ: divide the rows back out.
            let vt = Matrix::from_fn(rep.rows(), rep.cols(), |i, j| {
                (f64::from(rep.row(i)[j]) / aligned.s[i]) as f32
            });
            Ok((aligned.u, aligned.s, vt))
        }
        ModuleDelta::Dense(w) => {
            let m = Mat::<f64>::from_fn(w.rows(), w.cols(), |i, j| f64::from(w.row(i)[j]));
            let svd = m.thin_svd().map_err(|_| MergeError::Svd {
                module: path.to_string(),
            })?;
            let s_all = svd.S().column_vector();
            let s: Vec<f64> = (0..s_all.nrows()).map(|j| s_all[j]).collect();
            let u = Matrix::from_faer(svd.U());
            let vt = Matrix::from_faer(svd.V().transpose());
            Ok((u, s, vt))
        }
    }
}
