//! The one LoRA-aware linear layer used by every model (DESIGN.md §5).
//!
//! `y = x·Wᵀ (+ bias) + (x·aᵀ)·bᵀ` for a low-rank delta, or `+ x·ΔWᵀ` for a dense one. The base
//! weight is shared by every request; a request's delta arrives as a [`LoadedDelta`]: the
//! [`MergedDelta`] converted once to tensors on the model's device and indexed by layer, so a
//! forward pass never looks modules up by name and never re-uploads the factors.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};

use candle_core::{Device, Tensor};

use super::error::{EngineError, Result};
use super::weights::WeightStore;
use crate::matrix::Matrix;
use crate::merge::{MergedDelta, ModuleDelta};

/// A delta for one linear layer, transposed for right-multiplication.
#[derive(Debug, Clone)]
enum LayerDelta {
    /// `aᵀ: I × k` and `bᵀ: k × O`.
    LowRank { a_t: Tensor, b_t: Tensor },
    /// `ΔWᵀ: I × O`.
    Dense { w_t: Tensor },
}

/// A [`MergedDelta`] ready to apply: one optional tensor pair per linear layer of one model.
#[derive(Debug)]
pub struct LoadedDelta {
    layers: Vec<Option<LayerDelta>>,
    /// Built from trainable variables: the model then uses ops that have gradients (composite
    /// softmax and norms instead of the fused kernels).
    differentiable: bool,
}

impl LoadedDelta {
    fn layer(&self, index: usize) -> Option<&LayerDelta> {
        self.layers.get(index).and_then(Option::as_ref)
    }

    /// How many linear layers this delta changes.
    pub fn modules(&self) -> usize {
        self.layers.iter().filter(|l| l.is_some()).count()
    }

    /// Whether gradients flow through this delta (see [`LinearRegistry::trainable_delta`]).
    pub fn differentiable(&self) -> bool {
        self.differentiable
    }
}

/// Whether a forward pass must use ops with gradients.
pub fn needs_gradients(delta: Option<&LoadedDelta>) -> bool {
    delta.is_some_and(LoadedDelta::differentiable)
}

/// The linear layers of a model, by module path (the weight name without `.weight`).
#[derive(Debug, Default)]
pub struct LinearRegistry {
    index: HashMap<String, usize>,
    shapes: Vec<(usize, usize)>,
    /// Converted deltas, keyed by the address of the `MergedDelta` they came from; the weak
    /// pointer tells when that delta is gone so the entry can be dropped.
    cache: Mutex<Vec<(Weak<MergedDelta>, Arc<LoadedDelta>)>>,
}

impl LinearRegistry {
    /// Loads the linear layer `path` (`path.weight`, and `path.bias` when `bias` is set).
    pub fn linear(
        &mut self,
        store: &WeightStore,
        path: &str,
        shape: (usize, usize),
        bias: bool,
    ) -> Result<LoraLinear> {
        let weight = store.get(&format!("{path}.weight"), &[shape.0, shape.1])?;
        let bias = if bias {
            Some(store.get(&format!("{path}.bias"), &[shape.0])?)
        } else {
            None
        };
        let id = self.shapes.len();
        self.index.insert(path.to_string(), id);
        self.shapes.push(shape);
        Ok(LoraLinear { weight, bias, id })
    }

    /// Module paths of every linear layer.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Finds the layer a delta module key names. PEFT keys may carry a model-class prefix the
    /// base checkpoint lacks (`bert.encoder…` vs `encoder…`) or the other way round.
    fn resolve(&self, module: &str) -> Option<usize> {
        if let Some(&i) = self.index.get(module) {
            return Some(i);
        }
        const WRAPPERS: [&str; 4] = ["bert.", "model.", "roberta.", "transformer."];
        WRAPPERS.iter().find_map(|w| {
            let stripped = module.strip_prefix(w).and_then(|m| self.index.get(m));
            stripped
                .or_else(|| self.index.get(&format!("{w}{module}")))
                .copied()
        })
    }

    /// Converts `delta` to tensors on `device`, or returns the conversion made earlier for the
    /// same `Arc`. Fails if a module names no layer of this model or has the wrong shape.
    pub fn load_delta(
        &self,
        delta: &Arc<MergedDelta>,
        device: &Device,
    ) -> Result<Arc<LoadedDelta>> {
        let key = Arc::downgrade(delta);
        if let Ok(cache) = self.cache.lock()
            && let Some((_, loaded)) = cache.iter().find(|(k, _)| k.ptr_eq(&key))
        {
            return Ok(loaded.clone());
        }
        let loaded = Arc::new(self.convert(delta, device)?);
        if let Ok(mut cache) = self.cache.lock() {
            cache.retain(|(k, _)| k.strong_count() > 0);
            cache.push((key, loaded.clone()));
        }
        Ok(loaded)
    }

    /// Converts without caching.
    pub fn convert(&self, delta: &MergedDelta, device: &Device) -> Result<LoadedDelta> {
        let mut layers: Vec<Option<LayerDelta>> = vec![None; self.shapes.len()];
        for (module, d) in &delta.modules {
            let id = self
                .resolve(module)
                .ok_or_else(|| EngineError::UnknownModule {
                    module: module.clone(),
                })?;
            let expected = self.shapes[id];
            if d.shape() != expected {
                return Err(EngineError::DeltaShape {
                    module: module.clone(),
                    expected,
                    actual: d.shape(),
                });
            }
            layers[id] = Some(layer_delta(d, device)?);
        }
        Ok(LoadedDelta {
            layers,
            differentiable: false,
        })
    }

    /// `O × I` shape of the linear layer `module`, if the model has it.
    pub fn shape(&self, module: &str) -> Option<(usize, usize)> {
        self.resolve(module).map(|i| self.shapes[i])
    }

    /// A delta from trainable factors `(module, a: r × I, b: O × r)`, the update being
    /// `scale · b·a`. Gradients flow back to `a` and `b`.
    pub fn trainable_delta(
        &self,
        factors: &[(String, Tensor, Tensor)],
        scale: f64,
    ) -> Result<LoadedDelta> {
        let mut layers: Vec<Option<LayerDelta>> = vec![None; self.shapes.len()];
        for (module, a, b) in factors {
            let id = self
                .resolve(module)
                .ok_or_else(|| EngineError::UnknownModule {
                    module: module.clone(),
                })?;
            layers[id] = Some(LayerDelta::LowRank {
                a_t: a.t()?,
                b_t: (b * scale)?.t()?,
            });
        }
        Ok(LoadedDelta {
            layers,
            differentiable: true,
        })
    }

    /// How many converted deltas are held.
    pub fn cached_deltas(&self) -> usize {
        self.cache.lock().map(|c| c.len()).unwrap_or(0)
    }
}

fn transposed(m: &Matrix, device: &Device) -> Result<Tensor> {
    let t = m.transpose();
    Ok(Tensor::from_slice(t.as_slice(), t.shape(), device)?)
}

fn layer_delta(d: &ModuleDelta, device: &Device) -> Result<LayerDelta> {
    Ok(match d {
        ModuleDelta::LowRank { b, a } => LayerDelta::LowRank {
            a_t: transposed(a, device)?,
            b_t: transposed(b, device)?,
        },
        ModuleDelta::Dense(w) => LayerDelta::Dense {
            w_t: transposed(w, device)?,
        },
    })
}

/// A linear layer whose weight is shared and whose per-request delta is applied on the fly.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    /// `O × I`.
    weight: Tensor,
    bias: Option<Tensor>,
    /// Index into a [`LoadedDelta`].
    id: usize,
}

impl LoraLinear {
    /// `x: (…, I)` to `(…, O)`, adding the layer's part of `delta` when there is one.
    pub fn forward(&self, x: &Tensor, delta: Option<&LoadedDelta>) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (lead, in_dim) = dims.split_at(dims.len().saturating_sub(1));
        let rows: usize = lead.iter().product();
        let in_dim = in_dim.first().copied().unwrap_or(0);
        let x2 = x.reshape((rows, in_dim))?;
        let mut y = x2.matmul(&self.weight.t()?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        match delta.and_then(|d| d.layer(self.id)) {
            Some(LayerDelta::LowRank { a_t, b_t }) => y = (y + x2.matmul(a_t)?.matmul(b_t)?)?,
            Some(LayerDelta::Dense { w_t }) => y = (y + x2.matmul(w_t)?)?,
            None => {}
        }
        let mut out_dims = lead.to_vec();
        out_dims.push(self.weight.dim(0)?);
        Ok(y.reshape(out_dims)?)
    }

    /// The shared base weight, `O × I`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

/// Folds a delta into dense per-module matrices (for checks and for pinning a hot set).
pub fn dense_modules(delta: &MergedDelta) -> MergedDelta {
    let modules: BTreeMap<String, ModuleDelta> = delta
        .modules
        .iter()
        .map(|(k, d)| (k.clone(), ModuleDelta::Dense(d.to_dense())))
        .collect();
    MergedDelta { modules }
}
