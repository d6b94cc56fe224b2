//! `MergedDelta`: the result of a merge (or one adapter's own update), per target module either
//! low-rank factors or a dense matrix. The model engine applies it inside its LoRA-aware linear
//! layer as `y = x·Wᵀ + (x·aᵀ)·bᵀ` (or `x·ΔWᵀ`); the cache weighs it by `bytes()`.

use std::collections::BTreeMap;

use crate::matrix::Matrix;

/// The update of one target module (a Linear of shape `O × I`).
#[derive(Debug, Clone, PartialEq)]
pub enum ModuleDelta {
    /// `ΔW = b · a` with `b: O × k` and `a: k × I`. Any scale is already folded into `b`.
    LowRank { b: Matrix, a: Matrix },
    /// `ΔW` itself, `O × I`.
    Dense(Matrix),
}

impl ModuleDelta {
    /// `(O, I)`, the shape of the weight this delta updates.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Self::LowRank { b, a } => (b.rows(), a.cols()),
            Self::Dense(w) => w.shape(),
        }
    }

    /// The rank of the factored form (`k`), or `None` for a dense delta.
    pub fn rank(&self) -> Option<usize> {
        match self {
            Self::LowRank { a, .. } => Some(a.rows()),
            Self::Dense(_) => None,
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            Self::LowRank { b, a } => b.bytes() + a.bytes(),
            Self::Dense(w) => w.bytes(),
        }
    }

    /// The dense `O × I` update.
    pub fn to_dense(&self) -> Matrix {
        match self {
            Self::LowRank { b, a } => b.matmul(a),
            Self::Dense(w) => w.clone(),
        }
    }
}

/// Per-module updates keyed by module path without the PEFT prefix, e.g.
/// `model.layers.0.self_attn.q_proj` or `encoder.layer.0.attention.self.query`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MergedDelta {
    pub modules: BTreeMap<String, ModuleDelta>,
}

impl MergedDelta {
    pub fn get(&self, module: &str) -> Option<&ModuleDelta> {
        self.modules.get(module)
    }

    /// Total size of the stored values, the cache weigher.
    pub fn bytes(&self) -> usize {
        self.modules.values().map(ModuleDelta::bytes).sum()
    }

    /// Whether every module is in factored form.
    pub fn is_low_rank(&self) -> bool {
        self.modules.values().all(|m| m.rank().is_some())
    }
}
