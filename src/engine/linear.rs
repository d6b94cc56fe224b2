//! The one LoRA-aware linear layer used by every model (README, "The serving engine").
//!
//! `y = x·Wᵀ (+ bias) + (x·aᵀ)·bᵀ` for a low-rank delta, or `+ x·ΔWᵀ` for a dense one. The base
//! weight is shared by every request; a request's delta arrives as a [`LoadedDelta`]: the
//! [`MergedDelta`] converted once to tensors on the model's device and indexed by layer, so a
//! forward pass never looks modules up by name and never re-uploads the factors.
//!
//! The base weight is either an f32 tensor or a quantized one (GGUF blocks behind candle's
//! quantized matmul); deltas always stay f32. A batched forward of the serving engine mixes rows
//! of different adapter sets: the base projection runs once over every row, then each distinct
//! delta is applied to its own rows only (gather, `x·aᵀ·bᵀ`, scatter-add), see [`Deltas`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};

use super::delta_pass::{DeltaPass, DeltaRows, DeltaWork};
use super::error::{EngineError, Result};
use super::host;
use super::low_rank::LowRankPanels;
use super::masked::MaskedMatrix;
use super::panels::PanelMatrix;
use super::qmatmul::{self, PackedMatrix};
use super::weights::{WeightStore, tensor_bytes};
use crate::matrix::Matrix;
use crate::merge::{MergedDelta, ModuleDelta};

/// A delta for one linear layer, transposed for right-multiplication.
#[derive(Debug, Clone)]
enum LayerDelta {
    /// `aᵀ: I × k` and `bᵀ: k × O`.
    LowRank { a_t: Tensor, b_t: Tensor },
    /// `ΔW: O × I`, each output's weights contiguous (the host kernel streams them in order).
    Dense { w: Tensor },
    /// `ΔW: O × I` with most entries zero, packed in host memory (f32 CPU models only).
    Masked(MaskedMatrix),
    /// `a: k × I` and `b: O × k` packed in host memory (f32 CPU models only).
    Factors(LowRankPanels),
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
    /// The element type deltas are converted to: the model's (`None`: f32).
    dtype: Option<DType>,
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
        let name = format!("{path}.weight");
        let weight = match store.get_quantized(&name, &[shape.0, shape.1])? {
            Some(q) if qmatmul::packs_tensor(&q) => {
                BaseWeight::Packed(Arc::new(PackedMatrix::from_qtensor(&q)?))
            }
            Some(q) => BaseWeight::Quantized(QMatMul::from_arc(q)?),
            None => dense_weight(store.get(&name, &[shape.0, shape.1])?, store.serving()),
        };
        let bias = if bias {
            Some(store.get(&format!("{path}.bias"), &[shape.0])?)
        } else {
            None
        };
        let id = self.shapes.len();
        self.index.insert(path.to_string(), id);
        self.shapes.push(shape);
        Ok(LoraLinear {
            weight,
            bias,
            id,
            out_dim: shape.0,
        })
    }

    /// Converts deltas to `dtype` (a bf16 model's), not f32.
    pub fn set_dtype(&mut self, dtype: DType) {
        self.dtype = (dtype != DType::F32).then_some(dtype);
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
        if let Ok(mut cache) = self.cache.lock() {
            cache.retain(|(k, _)| k.strong_count() > 0);
            if let Some((_, loaded)) = cache.iter().find(|(k, _)| k.ptr_eq(&key)) {
                return Ok(loaded.clone());
            }
        }
        let loaded = Arc::new(self.convert(delta, device)?);
        if let Ok(mut cache) = self.cache.lock() {
            cache.push((key, loaded.clone()));
        }
        Ok(loaded)
    }

    /// Drops the conversions of deltas nobody holds any more (evicted merges that no running
    /// request uses); a conversion still in use by a running sequence lives on in its `Arc`.
    pub fn release_unused(&self) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.retain(|(k, _)| k.strong_count() > 0);
        }
    }

    /// Bytes a conversion of `delta` holds: f32 values of the same factors or dense matrix (packed
    /// factors pad their widths to sixteen values, a few percent more; a bf16 model's hold half;
    /// the budget counts f32).
    pub fn converted_bytes(delta: &MergedDelta) -> usize {
        delta.bytes()
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
            layers[id] = Some(layer_delta(d, device, self.dtype)?);
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

fn as_tensor(m: &Matrix, device: &Device, dtype: Option<DType>) -> Result<Tensor> {
    let t = Tensor::from_slice(m.as_slice(), m.shape(), device)?;
    Ok(match dtype {
        Some(dtype) => t.to_dtype(dtype)?,
        None => t,
    })
}

fn transposed(m: &Matrix, device: &Device, dtype: Option<DType>) -> Result<Tensor> {
    as_tensor(&m.transpose(), device, dtype)
}

fn layer_delta(d: &ModuleDelta, device: &Device, dtype: Option<DType>) -> Result<LayerDelta> {
    Ok(match d {
        ModuleDelta::LowRank { b, a } => {
            let ((rank, in_dim), out_dim) = (a.shape(), b.rows());
            let packed = (device.is_cpu() && dtype.is_none())
                .then(|| LowRankPanels::pack(a.as_slice(), b.as_slice(), rank, in_dim, out_dim))
                .flatten();
            match packed {
                Some(p) => LayerDelta::Factors(p),
                None => LayerDelta::LowRank {
                    a_t: transposed(a, device, dtype)?,
                    b_t: transposed(b, device, dtype)?,
                },
            }
        }
        ModuleDelta::Dense(w) => {
            let (rows, cols) = w.shape();
            let packed = (device.is_cpu() && dtype.is_none())
                .then(|| MaskedMatrix::pack(w.as_slice(), rows, cols))
                .flatten();
            match packed {
                Some(m) => LayerDelta::Masked(m),
                None => LayerDelta::Dense {
                    w: as_tensor(w, device, dtype)?,
                },
            }
        }
    })
}

/// An f32 weight as a [`BaseWeight`]: only its panels when the model is built for serving and
/// the weight is f32 in host memory, else the tensor (with panels packed at its first product).
fn dense_weight(w: Tensor, serving: bool) -> BaseWeight {
    let packed = serving
        .then(|| {
            let (outputs, inputs) = w.dims2().ok()?;
            host::with_slice(&w, |values| PanelMatrix::pack(values, outputs, inputs))
        })
        .flatten();
    match packed {
        Some(panels) => BaseWeight::Panels(Arc::new(panels)),
        None => BaseWeight::Dense {
            w,
            panels: Arc::default(),
        },
    }
}

/// The shared base weight of a linear layer.
#[derive(Debug, Clone)]
enum BaseWeight {
    /// `O × I` f32, and the same values in column panels for host products, packed at the first
    /// one (a model that only trains never packs them).
    Dense {
        w: Tensor,
        panels: Arc<OnceLock<Option<PanelMatrix>>>,
    },
    /// `O × I` f32 in host memory kept only as column panels, packed at load: a model built for
    /// serving ([`WeightStore::set_serving`]), whose base products need no gradients.
    Panels(Arc<PanelMatrix>),
    /// Quantized blocks (`O × I`), multiplied by candle's quantized matmul.
    Quantized(QMatMul),
    /// Quantized blocks (`O × I`) for the packed CPU kernels (see `qmatmul`).
    Packed(Arc<PackedMatrix>),
}

/// Which delta applies to which rows of a `(rows, I)` input.
#[derive(Debug, Clone, Copy)]
pub enum Deltas<'a> {
    /// Every row uses this delta, or the base alone.
    Uniform(Option<&'a LoadedDelta>),
    /// Rows grouped by delta; rows in no group use the base alone.
    Grouped(&'a [RowGroup<'a>]),
}

impl Deltas<'_> {
    /// Whether a forward pass must use ops with gradients (a trainable uniform delta).
    pub fn need_gradients(&self) -> bool {
        matches!(self, Deltas::Uniform(d) if needs_gradients(*d))
    }
}

/// The rows of a batch that share one delta.
#[derive(Debug, Clone)]
pub struct RowGroup<'a> {
    pub delta: &'a LoadedDelta,
    /// Row indices.
    pub rows: Vec<u32>,
    /// The same indices as a `u32` tensor on the model's device (gather and scatter there).
    pub index: Tensor,
    /// Whether the group holds every row of the batch (then no gather or scatter is needed).
    pub all: bool,
}

impl<'a> RowGroup<'a> {
    /// A group of `rows` out of a batch of `batch_rows`.
    pub fn new(
        delta: &'a LoadedDelta,
        rows: Vec<u32>,
        batch_rows: usize,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self {
            delta,
            index: Tensor::new(rows.as_slice(), device)?,
            all: rows.len() == batch_rows,
            rows,
        })
    }
}

impl RowGroup<'_> {
    /// Adds `layer`'s update of this group's rows of `x` to `y` with tensor ops (gather,
    /// product, scatter-add).
    fn add_with_tensors(&self, y: Tensor, x: &Tensor, layer: &LayerDelta) -> Result<Tensor> {
        Ok(if self.all {
            (y + layer.apply(x)?)?
        } else {
            let part = layer.apply(&x.index_select(&self.index, 0)?)?;
            y.index_add(&self.index, &part, 0)?
        })
    }
}

/// Rows of the batch grouped by delta (compared by address), for [`Deltas::Grouped`].
pub fn row_groups<'a>(
    deltas: impl Iterator<Item = (Option<&'a LoadedDelta>, std::ops::Range<usize>)>,
    rows: usize,
    device: &Device,
) -> Result<Vec<RowGroup<'a>>> {
    let mut by_delta: Vec<(&'a LoadedDelta, Vec<u32>)> = Vec::new();
    for (delta, range) in deltas {
        let Some(delta) = delta else { continue };
        let rows = range.map(|r| r as u32);
        match by_delta.iter_mut().find(|(d, _)| std::ptr::eq(*d, delta)) {
            Some((_, list)) => list.extend(rows),
            None => by_delta.push((delta, rows.collect())),
        }
    }
    by_delta
        .into_iter()
        .map(|(delta, list)| RowGroup::new(delta, list, rows, device))
        .collect()
}

/// A linear layer whose weight is shared and whose per-request delta is applied on the fly.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    weight: BaseWeight,
    bias: Option<Tensor>,
    /// Index into a [`LoadedDelta`].
    id: usize,
    out_dim: usize,
}

impl LoraLinear {
    /// `x: (…, I)` to `(…, O)`, adding the layer's part of `delta` when there is one.
    pub fn forward(&self, x: &Tensor, delta: Option<&LoadedDelta>) -> Result<Tensor> {
        self.forward_with(x, Deltas::Uniform(delta))
    }

    /// `x: (…, I)` to `(…, O)`, rows (all leading axes flattened) taking their deltas from
    /// `deltas`.
    pub fn forward_with(&self, x: &Tensor, deltas: Deltas<'_>) -> Result<Tensor> {
        Self::forward_shared(&[self], x, deltas)?
            .pop()
            .ok_or(EngineError::EmptyInput { what: "projection" })
    }

    /// [`forward_with`](Self::forward_with) of several layers that read the same `x` (see
    /// [`forward_rows_shared`](Self::forward_rows_shared)).
    pub fn forward_shared(
        layers: &[&LoraLinear],
        x: &Tensor,
        deltas: Deltas<'_>,
    ) -> Result<Vec<Tensor>> {
        let dims = x.dims().to_vec();
        let (lead, in_dim) = dims.split_at(dims.len().saturating_sub(1));
        let rows: usize = lead.iter().product();
        let in_dim = in_dim.first().copied().unwrap_or(0);
        let ys = Self::forward_rows_shared(layers, &x.reshape((rows, in_dim))?, deltas)?;
        (ys.into_iter().zip(layers))
            .map(|(y, l)| {
                let mut out_dims = lead.to_vec();
                out_dims.push(l.out_dim);
                Ok(y.reshape(out_dims)?)
            })
            .collect()
    }

    /// `x: (rows, I)` to `(rows, O)`: the base projection over every row, then each delta over
    /// its own rows.
    pub fn forward_rows(&self, x: &Tensor, deltas: Deltas<'_>) -> Result<Tensor> {
        Self::forward_rows_shared(&[self], x, deltas)?
            .pop()
            .ok_or(EngineError::EmptyInput { what: "projection" })
    }

    /// [`forward_rows`](Self::forward_rows) of several layers that read the same `x` (q, k and
    /// v; gate and up). With host weights and no gradients the whole projection stays on the
    /// host until its result (packed weights share one quantization of `x` and one pass over
    /// the worker pool); otherwise tensor ops.
    pub fn forward_rows_shared(
        layers: &[&LoraLinear],
        x: &Tensor,
        deltas: Deltas<'_>,
    ) -> Result<Vec<Tensor>> {
        let grad = deltas.need_gradients();
        if grad
            && layers
                .iter()
                .any(|l| matches!(l.weight, BaseWeight::Panels(_)))
        {
            return Err(EngineError::Unsupported {
                message: "gradients through a model built for serving, whose f32 weights are kept \
                          only as panels: load it for training"
                    .into(),
            });
        }
        if !grad {
            let x = x.contiguous()?;
            let (rows, k) = x.dims2()?;
            let on_host = host::with_slice(&x, |xs| {
                Self::finish_host(layers, &x, xs, deltas, |pass| {
                    Self::host_products(layers, xs, rows, k, true, pass)
                })
            });
            if let Some(Some(result)) = on_host {
                return result;
            }
        }
        layers
            .iter()
            .map(|l| l.finish_rows(x, l.base(x)?, deltas))
            .collect()
    }

    /// `xs · Wᵀ` of every layer on the host, for `xs: rows × k`, each with whether it includes
    /// the layer's bias (f32 weights start their sums from it when `with_bias` is set), running
    /// the jobs of `pass` too (in the same pass over the pool for packed weights, after the
    /// products for f32 ones): `None` unless every weight is packed, or every weight is f32 in
    /// host memory (the jobs then have not run).
    fn host_products(
        layers: &[&LoraLinear],
        xs: &[f32],
        rows: usize,
        k: usize,
        with_bias: bool,
        pass: &mut DeltaPass<'_>,
    ) -> Option<Vec<(Vec<f32>, bool)>> {
        let packed: Option<Vec<&PackedMatrix>> = layers
            .iter()
            .map(|l| match &l.weight {
                BaseWeight::Packed(p) => Some(p.as_ref()),
                _ => None,
            })
            .collect();
        if let Some(ps) = packed {
            let ys = pass.run(|jobs, run| PackedMatrix::matmul_with(&ps, xs, rows, jobs, run));
            return Some(ys.into_iter().map(|y| (y, false)).collect());
        }
        let panels: Vec<&PanelMatrix> = layers
            .iter()
            .map(|l| l.panels().filter(|p| p.shape().1 == k))
            .collect::<Option<_>>()?;
        let biases: Vec<Option<&Tensor>> = layers
            .iter()
            .map(|l| l.bias.as_ref().filter(|_| with_bias))
            .collect();
        let present: Vec<&Tensor> = biases.iter().flatten().copied().collect();
        host::with_slices(&present, |values| {
            let mut values = values.iter();
            let shared: Vec<(&PanelMatrix, Option<&[f32]>)> = (panels.iter().zip(&biases))
                .map(|(p, b)| (*p, b.and_then(|_| values.next().copied())))
                .collect();
            let ys = PanelMatrix::matmul_shared(&shared, xs, rows);
            ys.into_iter()
                .zip(&biases)
                .map(|(y, b)| (y, b.is_some()))
                .collect()
        })
        .inspect(|_| pass.run_alone())
    }

    /// The f32 weight in column panels: packed at load for a model built for serving, else at
    /// the first call; `None` for other weights or one not in host memory.
    fn panels(&self) -> Option<&PanelMatrix> {
        let (w, panels) = match &self.weight {
            BaseWeight::Dense { w, panels } => (w, panels),
            BaseWeight::Panels(p) => return Some(p),
            _ => return None,
        };
        panels
            .get_or_init(|| {
                let (outputs, inputs) = w.dims2().ok()?;
                host::with_slice(w, |w| PanelMatrix::pack(w, outputs, inputs))
            })
            .as_ref()
    }

    /// Adds the bias and the deltas of `deltas` to the base product `y` of `x`.
    fn finish_rows(&self, x: &Tensor, y: Tensor, deltas: Deltas<'_>) -> Result<Tensor> {
        let touched = match deltas {
            Deltas::Uniform(d) => d.is_some_and(|d| d.layer(self.id).is_some()),
            Deltas::Grouped(groups) => groups.iter().any(|g| g.delta.layer(self.id).is_some()),
        };
        if !touched && self.bias.is_none() {
            return Ok(y);
        }
        if !deltas.need_gradients() {
            let x = x.contiguous()?;
            let done = host::with_slices(&[&x, &y], |s| {
                Self::finish_host(&[self], &x, s[0], deltas, |pass| {
                    pass.run_alone();
                    Some(vec![(s[1].to_vec(), false)])
                })
            });
            if let Some(mut y) = done.flatten().transpose()? {
                return y
                    .pop()
                    .ok_or(EngineError::EmptyInput { what: "projection" });
            }
        }
        let mut y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        match deltas {
            Deltas::Uniform(d) => match d.and_then(|d| d.layer(self.id)) {
                Some(layer) => Ok((y + layer.apply(x)?)?),
                None => Ok(y),
            },
            Deltas::Grouped(groups) => {
                for g in groups {
                    if let Some(layer) = g.delta.layer(self.id) {
                        y = g.add_with_tensors(y, x, layer)?;
                    }
                }
                Ok(y)
            }
        }
    }

    /// The outputs of `layers` (which all read `x`; `xs` is its values) from base products on
    /// the host (see [`Self::host_outputs`]), as tensors, with what the host left added by
    /// tensor ops. `None` when `base` gives none (weights not on the host).
    fn finish_host(
        layers: &[&LoraLinear],
        x: &Tensor,
        xs: &[f32],
        deltas: Deltas<'_>,
        base: impl FnOnce(&mut DeltaPass<'_>) -> Option<Vec<(Vec<f32>, bool)>>,
    ) -> Option<Result<Vec<Tensor>>> {
        let in_dim = x.dim(1).ok()?;
        let done = Self::host_outputs(layers, xs, in_dim, deltas, base)?;
        Some(done.into_tensors(layers, x))
    }

    /// `xs: (rows, k) · Wᵀ` of every layer in `layers` (which all read it) with each row's
    /// delta, on host values: the same results as [`Self::forward_rows_shared`]. Work the host
    /// cannot do (weights or deltas on a GPU) goes through tensors on `device`.
    pub fn forward_host(
        layers: &[&LoraLinear],
        xs: &[f32],
        rows: usize,
        deltas: Deltas<'_>,
        device: &Device,
    ) -> Result<Vec<Vec<f32>>> {
        let k = xs.len() / rows.max(1);
        let x = || Tensor::from_slice(xs, (rows, k), device);
        let done = (!deltas.need_gradients())
            .then(|| {
                Self::host_outputs(layers, xs, k, deltas, |pass| {
                    Self::host_products(layers, xs, rows, k, true, pass)
                })
            })
            .flatten();
        let tensors = match done {
            Some(done) if done.complete() => return Ok(done.ys),
            Some(done) => done.into_tensors(layers, &x()?)?,
            None => Self::forward_rows_shared(layers, &x()?, deltas)?,
        };
        tensors
            .iter()
            .map(|y| Ok(y.flatten_all()?.to_vec1::<f32>()?))
            .collect()
    }

    /// The outputs of `layers` (which all read `xs: (rows, in_dim)`) from base products on the
    /// host: `base(pass)` returns them, each with whether it includes its bias, having run the
    /// jobs of `pass`, which holds every delta whose tensors are in host memory (the others, on
    /// a GPU, are left for tensor ops); then the biases and the deltas' updates are added.
    /// `None` when `base` gives none (weights not on the host).
    fn host_outputs<'d>(
        layers: &[&LoraLinear],
        xs: &[f32],
        in_dim: usize,
        deltas: Deltas<'d>,
        base: impl FnOnce(&mut DeltaPass<'_>) -> Option<Vec<(Vec<f32>, bool)>>,
    ) -> Option<HostOutputs<'d>> {
        let rows = xs.len() / in_dim.max(1);
        // Only a uniform delta needs the list of every row (one group of them all).
        let all: Vec<u32> = match deltas {
            Deltas::Uniform(Some(_)) => (0..rows as u32).collect(),
            _ => Vec::new(),
        };
        let groups: Vec<Vec<DeltaGroup<'_, 'd>>> = layers
            .iter()
            .map(|l| l.delta_groups(deltas, &all))
            .collect();
        let out_dims: Vec<usize> = layers.iter().map(|l| l.out_dim).collect();
        let tensors: Vec<&Tensor> = (groups.iter().flatten())
            .filter_map(|g| match g.layer {
                LayerDelta::Dense { w } => Some(w),
                _ => None,
            })
            .collect();
        let mut base = Some(base);
        let mut attempt = |slices: Option<&[&[f32]]>| {
            let (work, rest) = split_deltas(&groups, slices, in_dim, &out_dims, rows);
            let mut pass = DeltaPass::new(xs, in_dim, out_dims.clone(), work);
            let ys = base.take()?(&mut pass)?;
            let (mut ys, biased): (Vec<Vec<f32>>, Vec<bool>) = ys.into_iter().unzip();
            let bias_added: Vec<bool> = (layers.iter().zip(&mut ys).zip(biased))
                .map(|((l, y), biased)| biased || l.add_bias_on_host(y))
                .collect();
            pass.add_to(&mut ys.iter_mut().map(Vec::as_mut_slice).collect::<Vec<_>>());
            Some(HostOutputs {
                ys,
                bias_added,
                rest,
            })
        };
        match host::with_slices(&tensors, |s| attempt(Some(s))) {
            Some(done) => done,
            None => attempt(None),
        }
    }

    /// Adds the bias to every row of `y` when it is in host memory; whether it did (no bias:
    /// nothing to add).
    fn add_bias_on_host(&self, y: &mut [f32]) -> bool {
        match &self.bias {
            Some(b) => host::with_slice(b, |b| {
                y.chunks_exact_mut(self.out_dim)
                    .for_each(|row| host::add_assign(row, b));
            })
            .is_some(),
            None => true,
        }
    }

    /// The groups of rows whose delta changes this layer; a uniform delta is one group of all
    /// rows (`all`).
    fn delta_groups<'r, 'd: 'r>(
        &self,
        deltas: Deltas<'d>,
        all: &'r [u32],
    ) -> Vec<DeltaGroup<'r, 'd>> {
        match deltas {
            Deltas::Uniform(d) => d
                .and_then(|d| d.layer(self.id))
                .map(|layer| DeltaGroup {
                    rows: all,
                    layer,
                    group: None,
                })
                .into_iter()
                .collect(),
            Deltas::Grouped(groups) => groups
                .iter()
                .filter_map(|g| {
                    g.delta.layer(self.id).map(|layer| DeltaGroup {
                        rows: g.rows.as_slice(),
                        layer,
                        group: Some(g),
                    })
                })
                .collect(),
        }
    }

    /// `x · Wᵀ` with tensor ops (see [`Self::host_products`] for the host path).
    fn base(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match &self.weight {
            BaseWeight::Dense { w, .. } => x.matmul(&w.t()?)?,
            BaseWeight::Quantized(q) => q.forward(&x.contiguous()?)?,
            BaseWeight::Packed(_) | BaseWeight::Panels(_) => {
                let x = x.contiguous()?;
                let (rows, k) = x.dims2()?;
                let (y, _) = host::with_slice(&x, |xs| {
                    let mut no_deltas = DeltaPass::new(xs, k, vec![self.out_dim], Vec::new());
                    Self::host_products(&[self], xs, rows, k, false, &mut no_deltas)
                })
                .flatten()
                .and_then(|mut ys| ys.pop())
                .ok_or(EngineError::EmptyInput {
                    what: "host activations",
                })?;
                Tensor::from_vec(y, (rows, self.out_dim), x.device())?
            }
        })
    }

    /// The base weight's packed blocks, when it is kept that way.
    pub fn packed(&self) -> Option<&Arc<PackedMatrix>> {
        match &self.weight {
            BaseWeight::Packed(p) => Some(p),
            _ => None,
        }
    }

    /// The base weight's column panels, when it is kept only that way.
    pub fn panels_only(&self) -> Option<&Arc<PanelMatrix>> {
        match &self.weight {
            BaseWeight::Panels(p) => Some(p),
            _ => None,
        }
    }

    /// Whether the base weight is kept quantized.
    pub fn is_quantized(&self) -> bool {
        matches!(
            self.weight,
            BaseWeight::Quantized(_) | BaseWeight::Packed(_)
        )
    }

    /// Bytes the layer's weights occupy: the base weight as it is kept (with its column panels
    /// once a product has packed them) and the bias.
    pub fn weight_bytes(&self) -> usize {
        let weight = match &self.weight {
            BaseWeight::Dense { w, panels } => {
                tensor_bytes(w)
                    + panels
                        .get()
                        .and_then(Option::as_ref)
                        .map_or(0, PanelMatrix::bytes)
            }
            BaseWeight::Quantized(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            BaseWeight::Packed(p) => p.bytes(),
            BaseWeight::Panels(p) => p.bytes(),
            BaseWeight::Quantized(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => tensor_bytes(w),
        };
        weight + self.bias.as_ref().map_or(0, tensor_bytes)
    }
}

impl LayerDelta {
    /// `x·aᵀ·bᵀ` or `x·ΔWᵀ` for `x: (rows, I)`.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            LayerDelta::LowRank { a_t, b_t } => x.matmul(a_t)?.matmul(b_t)?,
            LayerDelta::Factors(p) => {
                let ((out_dim, in_dim), rank) = (p.shape(), p.rank());
                let (a, b) = p.factors();
                let a = Tensor::from_vec(a, (rank, in_dim), x.device())?;
                let b = Tensor::from_vec(b, (out_dim, rank), x.device())?;
                x.matmul(&a.t()?)?.matmul(&b.t()?)?
            }
            LayerDelta::Dense { w } => x.matmul(&w.t()?)?,
            LayerDelta::Masked(m) => {
                let w = Tensor::from_vec(m.to_dense(), m.shape(), x.device())?;
                x.matmul(&w.t()?)?
            }
        })
    }
}

/// Rows of a batch that one layer's delta changes (a [`RowGroup`]'s, or every row for a uniform
/// delta: `group` is `None`).
struct DeltaGroup<'r, 'd> {
    rows: &'r [u32],
    layer: &'d LayerDelta,
    group: Option<&'d RowGroup<'d>>,
}

/// The deltas of `groups` (one list per target) split into those a [`DeltaPass`] takes and
/// those left for tensor ops. The packed ones (factors, sparse `ΔW`) go to the pass; dense
/// `ΔW`s go too when `slices` holds their values, in order. Factors kept as tensors (on a GPU,
/// in bf16, or with gradients) and a delta that does not fit go through tensor ops, which check
/// shapes.
fn split_deltas<'a, 'd: 'a>(
    groups: &[Vec<DeltaGroup<'a, 'd>>],
    slices: Option<&[&'a [f32]]>,
    in_dim: usize,
    out_dims: &[usize],
    rows: usize,
) -> (Vec<DeltaRows<'a>>, Vec<Vec<Leftover<'d>>>) {
    let mut slices = slices.map(|s| s.iter().copied());
    let mut next = || slices.as_mut().and_then(Iterator::next);
    let mut rest: Vec<Vec<Leftover<'d>>> = vec![Vec::new(); groups.len()];
    let mut work = Vec::new();
    for (target, layer_groups) in groups.iter().enumerate() {
        for g in layer_groups {
            let delta = match g.layer {
                LayerDelta::Masked(m) => Some(DeltaWork::Masked(m)),
                LayerDelta::Factors(p) => Some(DeltaWork::LowRank(p)),
                LayerDelta::LowRank { .. } => None,
                LayerDelta::Dense { .. } => next().map(DeltaWork::Dense),
            }
            .map(|work| DeltaRows {
                target,
                rows: g.rows,
                work,
            });
            match delta.filter(|d| d.fits(in_dim, out_dims, rows)) {
                Some(d) => work.push(d),
                None => rest[target].push(Leftover {
                    layer: g.layer,
                    group: g.group,
                }),
            }
        }
    }
    (work, rest)
}

/// A delta the host could not add (its tensors are on a GPU): added with tensor ops.
#[derive(Clone, Copy)]
struct Leftover<'d> {
    layer: &'d LayerDelta,
    group: Option<&'d RowGroup<'d>>,
}

/// Projection outputs computed on the host, and what is left for tensor ops.
struct HostOutputs<'d> {
    ys: Vec<Vec<f32>>,
    /// Per output, whether its bias is in it.
    bias_added: Vec<bool>,
    /// Per output, the deltas still to add.
    rest: Vec<Vec<Leftover<'d>>>,
}

impl HostOutputs<'_> {
    /// Whether nothing is left for tensor ops.
    fn complete(&self) -> bool {
        self.bias_added.iter().all(|&b| b) && self.rest.iter().all(Vec::is_empty)
    }

    /// Tensors of the outputs of `layers` (which read `x`), with the biases and deltas the host
    /// left added by tensor ops.
    fn into_tensors(self, layers: &[&LoraLinear], x: &Tensor) -> Result<Vec<Tensor>> {
        let rows = x.dim(0)?;
        let mut out = Vec::with_capacity(layers.len());
        for (i, (l, y)) in layers.iter().zip(self.ys).enumerate() {
            let mut y = Tensor::from_vec(y, (rows, l.out_dim), x.device())?;
            if !self.bias_added[i]
                && let Some(b) = &l.bias
            {
                y = y.broadcast_add(b)?;
            }
            for g in &self.rest[i] {
                y = match g.group {
                    Some(group) => group.add_with_tensors(y, x, g.layer)?,
                    None => (y + g.layer.apply(x)?)?,
                };
            }
            out.push(y);
        }
        Ok(out)
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::quantized::{GgmlDType, QTensor};

    use super::*;

    const IN: usize = 64;
    const OUT: usize = 8;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104729) % 997) as f32 / 498.0 - 1.0) * 0.5)
            .collect()
    }

    /// A quantized `OUT × IN` layer with a large bias, and its weight dequantized.
    fn quantized_layer() -> (LoraLinear, LinearRegistry, Vec<f32>) {
        let w = Tensor::from_vec(values(OUT * IN, 1), (OUT, IN), &Device::Cpu).expect("w");
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).expect("quantize");
        let dequantized = q.dequantize(&Device::Cpu).expect("dequantize");
        let mut store = WeightStore::new(HashMap::new(), Device::Cpu);
        store.insert_quantized("p.weight", Arc::new(q));
        store.insert(
            "p.bias",
            Tensor::full(100f32, OUT, &Device::Cpu).expect("bias"),
        );
        let mut reg = LinearRegistry::default();
        let layer = reg.linear(&store, "p", (OUT, IN), true).expect("layer");
        let w = dequantized
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("values");
        (layer, reg, w)
    }

    fn rows(x: &[f32]) -> Tensor {
        Tensor::from_vec(x.to_vec(), (x.len() / IN, IN), &Device::Cpu).expect("x")
    }

    /// A low-rank delta on an f32 CPU model is packed for the host, and its tensor fallback
    /// (for rows the host pass does not take) gives the host pass's products within f32
    /// rounding; on a bf16 model it stays tensors.
    #[test]
    fn packed_factors_apply_as_tensors_too() {
        let rank = 3;
        let a = Matrix::from_vec(rank, IN, values(rank * IN, 3)).expect("a");
        let b = Matrix::from_vec(OUT, rank, values(OUT * rank, 4)).expect("b");
        let d = ModuleDelta::LowRank { b, a };
        let packed = layer_delta(&d, &Device::Cpu, None).expect("convert");
        let LayerDelta::Factors(p) = &packed else {
            panic!("an f32 CPU low-rank delta is packed");
        };
        assert!(matches!(
            layer_delta(&d, &Device::Cpu, Some(DType::BF16)).expect("convert"),
            LayerDelta::LowRank { .. }
        ));
        let x = values(2 * IN, 5);
        let by_tensors = packed.apply(&rows(&x)).expect("apply");
        let by_tensors = (by_tensors.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .expect("values");
        let mut on_host = vec![vec![0f32; OUT]; 2];
        let xs: Vec<&[f32]> = x.chunks_exact(IN).collect();
        p.products(
            &xs,
            &mut on_host
                .iter_mut()
                .map(Vec::as_mut_slice)
                .collect::<Vec<_>>(),
        );
        for (t, h) in by_tensors.iter().zip(on_host.concat()) {
            assert!((t - h).abs() < 1e-5 * (1.0 + h.abs()), "{t} vs {h}");
        }
        assert!(by_tensors.iter().any(|v| v.abs() > 1e-3));
    }

    /// `x·Wᵀ + b` with the bias added once, whichever kernel runs the quantized weight (8-bit
    /// activations: within 0.05 of the exact product here).
    #[test]
    fn a_quantized_projection_adds_its_bias_once() {
        let (layer, _, w) = quantized_layer();
        let x = values(3 * IN, 2);
        let y = layer
            .forward_rows(&rows(&x), Deltas::Uniform(None))
            .expect("forward");
        let y = y.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("y");
        for r in 0..3 {
            for o in 0..OUT {
                let exact: f32 =
                    (0..IN).map(|i| x[r * IN + i] * w[o * IN + i]).sum::<f32>() + 100.0;
                assert!(
                    (y[r * OUT + o] - exact).abs() < 0.05,
                    "({r},{o}): {}",
                    y[r * OUT + o]
                );
            }
        }
    }

    /// Rows of a low-rank set and of a dense set in one batch get what each gets alone.
    #[test]
    fn low_rank_and_dense_groups_in_one_batch_match_each_alone() {
        let (layer, reg, _) = quantized_layer();
        let delta = |m: ModuleDelta| MergedDelta {
            modules: BTreeMap::from([("p".to_string(), m)]),
        };
        let low_rank = ModuleDelta::LowRank {
            b: Matrix::from_vec(OUT, 2, values(OUT * 2, 3)).expect("b"),
            a: Matrix::from_vec(2, IN, values(2 * IN, 4)).expect("a"),
        };
        let dense = ModuleDelta::Dense(Matrix::from_vec(OUT, IN, values(OUT * IN, 5)).expect("w"));
        let low_rank = reg
            .convert(&delta(low_rank), &Device::Cpu)
            .expect("convert");
        let dense = reg.convert(&delta(dense), &Device::Cpu).expect("convert");
        let x = values(4 * IN, 6);
        let sets = [Some(&low_rank), Some(&dense), None, Some(&low_rank)];
        let groups = row_groups(
            sets.iter().enumerate().map(|(i, d)| (*d, i..i + 1)),
            4,
            &Device::Cpu,
        )
        .expect("groups");
        let batched = layer
            .forward_rows(&rows(&x), Deltas::Grouped(&groups))
            .and_then(|t| Ok(t.to_vec2::<f32>()?))
            .expect("batched");
        for (r, set) in sets.iter().enumerate() {
            let alone = layer
                .forward_rows(&rows(&x[r * IN..(r + 1) * IN]), Deltas::Uniform(*set))
                .and_then(|t| Ok(t.to_vec2::<f32>()?))
                .expect("alone");
            for (a, b) in alone[0].iter().zip(&batched[r]) {
                assert!((a - b).abs() < 1e-4, "row {r}: {a} vs {b}");
            }
        }
    }
}
