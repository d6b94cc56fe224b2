//! Trainable LoRA factors: one `(A, B)` pair of candle variables per target module, initialised
//! as PEFT does (A Kaiming-uniform, B zero, so training starts at the base model), turned into a
//! differentiable [`LoadedDelta`] for the forward pass and into a [`MergedDelta`] for export.

use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::engine::{EngineError, LinearRegistry, LoadedDelta};
use crate::matrix::Matrix;
use crate::merge::{MergedDelta, ModuleDelta};

/// The LoRA factors of every target module of one model.
pub struct LoraFactors {
    /// `(module path, A: r × I, B: O × r)`.
    modules: Vec<(String, Var, Var)>,
    /// `lora_alpha / r`.
    scale: f64,
}

impl LoraFactors {
    /// Factors of rank `rank` for every linear layer of `registry` whose path ends with one of
    /// `targets` (PEFT's suffix matching: `query` matches `…attention.self.query`).
    pub fn new(
        registry: &LinearRegistry,
        targets: &[String],
        rank: usize,
        alpha: f64,
        seed: u64,
        device: &Device,
    ) -> Result<Self, EngineError> {
        let mut paths: Vec<&str> = registry
            .paths()
            .filter(|p| {
                targets
                    .iter()
                    .any(|t| p == t || p.ends_with(&format!(".{t}")))
            })
            .collect();
        paths.sort_unstable();
        if paths.is_empty() || rank == 0 {
            return Err(EngineError::Unsupported {
                message: format!("no linear layer matches the targets {targets:?} (or rank is 0)"),
            });
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let modules = paths
            .into_iter()
            .map(|path| {
                let (out, inp) =
                    registry
                        .shape(path)
                        .ok_or_else(|| EngineError::UnknownModule {
                            module: path.into(),
                        })?;
                // kaiming_uniform_(a = √5): bound = 1/√fan_in.
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..rank * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (rank, inp), device)?)?;
                let b = Var::zeros((out, rank), candle_core::DType::F32, device)?;
                Ok((path.to_string(), a, b))
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        Ok(Self {
            modules,
            scale: alpha / rank as f64,
        })
    }

    /// Every variable, for the optimiser.
    pub fn vars(&self) -> Vec<Var> {
        self.modules
            .iter()
            .flat_map(|(_, a, b)| [a.clone(), b.clone()])
            .collect()
    }

    /// Module paths, sorted.
    pub fn module_paths(&self) -> Vec<&str> {
        self.modules.iter().map(|(p, _, _)| p.as_str()).collect()
    }

    /// The update as a delta gradients flow through.
    pub fn trainable(&self, registry: &LinearRegistry) -> Result<LoadedDelta, EngineError> {
        let factors: Vec<(String, Tensor, Tensor)> = self
            .modules
            .iter()
            .map(|(p, a, b)| (p.clone(), a.as_tensor().clone(), b.as_tensor().clone()))
            .collect();
        registry.trainable_delta(&factors, self.scale)
    }

    /// The current update, the scale folded into B (a PEFT export then has `r = lora_alpha`).
    pub fn to_delta(&self) -> Result<MergedDelta, EngineError> {
        let modules = self
            .modules
            .iter()
            .map(|(path, a, b)| {
                let b = (b.as_tensor() * self.scale)?;
                let delta = ModuleDelta::LowRank {
                    b: matrix(&b)?,
                    a: matrix(a.as_tensor())?,
                };
                Ok((path.clone(), delta))
            })
            .collect::<Result<_, EngineError>>()?;
        Ok(MergedDelta { modules })
    }

    /// Overwrites one entry of a factor (for finite-difference checks).
    pub fn perturb(
        &self,
        module: usize,
        factor_b: bool,
        index: usize,
        by: f32,
    ) -> Result<(), EngineError> {
        let (_, a, b) = &self.modules[module];
        let var = if factor_b { b } else { a };
        let mut values: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
        values[index] += by;
        var.set(&Tensor::from_vec(values, var.shape(), var.device())?)?;
        Ok(())
    }

    /// One factor as a flat vector.
    pub fn factor(&self, module: usize, factor_b: bool) -> Result<Vec<f32>, EngineError> {
        let (_, a, b) = &self.modules[module];
        let var = if factor_b { b } else { a };
        Ok(var.as_tensor().flatten_all()?.to_vec1()?)
    }

    /// The variable of one factor.
    pub fn var(&self, module: usize, factor_b: bool) -> &Var {
        let (_, a, b) = &self.modules[module];
        if factor_b { b } else { a }
    }
}

fn matrix(t: &Tensor) -> Result<Matrix, EngineError> {
    let (rows, cols) = t.dims2()?;
    let data: Vec<f32> = t.flatten_all()?.to_vec1()?;
    Matrix::from_vec(rows, cols, data).map_err(|e| EngineError::Unsupported {
        message: format!("factor shape: {e}"),
    })
}
