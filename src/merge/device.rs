//! The dense methods (TIES, DARE-TIES, DARE) with candle tensor ops on a [`Device`]: the
//! O(n·O·I) work — each adapter's dense update `c_i·B_i·A_i`, the DARE mask, the global trim,
//! the sign election and the disjoint mean — runs where the tensors are (a GPU with
//! `--merge-device cuda`). The same code runs on `Device::Cpu`, where tests check it against the
//! host implementation (`ties`, `dare`, `methods`).
//!
//! The result is the one the host computes, entry for entry up to f32 rounding of the products:
//! the same masks (DARE's ChaCha stream is drawn on the host, one byte per entry, and applied on
//! the device), the same trim thresholds (the exact rank-th magnitude, found by bisection on the
//! bit patterns of non-negative floats, one counting pass per step), the same accumulation order
//! per entry (adapter by adapter) and the same rule for entries whose sum cancels exactly. The
//! merged matrices come back to the host once, as the `MergedDelta` the cache stores.

use candle_core::{DType, Device, Tensor};

use super::dare::{self, DareKey};
use super::plan::Plan;
use super::{MergeError, MergeParams, ModuleDelta, Progress};
use crate::matrix::Matrix;

type Result<T> = std::result::Result<T, MergeError>;

/// The dense updates of a plan on a device, with DARE applied when the method uses it.
struct DeviceReps<'p> {
    plan: &'p Plan<'p>,
    params: &'p MergeParams,
    device: &'p Device,
}

impl DeviceReps<'_> {
    /// Adapter `i`'s update of module `m`, `(O, I)` f32, or `None` when it does not touch `m`.
    fn rep(&self, i: usize, m: usize) -> Result<Option<Tensor>> {
        let module = &self.plan.modules[m];
        let Some(member) = module.members.iter().find(|x| x.index == i) else {
            return Ok(None);
        };
        let (b, a) = (&member.lora.b, &member.lora.a);
        let b = Tensor::from_slice(b.as_slice(), b.shape(), self.device)?;
        let a = Tensor::from_slice(a.as_slice(), a.shape(), self.device)?;
        let update = b
            .matmul(&a)?
            .affine(f64::from(member.lora.scale as f32), 0.0)?;
        if !self.params.method.uses_dare() || self.params.dare_p == 0.0 {
            return Ok(Some(update));
        }
        let key = DareKey {
            seed: self.params.seed,
            adapter: &self.plan.inputs[i].adapter.digest,
            module: module.path,
        };
        let mask = dare::keep_mask(module.dense_len(), self.params.dare_p, key);
        let mask = Tensor::from_vec(mask, module.shape, self.device)?;
        let kept = update.affine(f64::from(dare::rescale(self.params.dare_p)), 0.0)?;
        Ok(Some(mask.where_cond(&kept, &kept.zeros_like()?)?))
    }
}

/// TIES (after DARE for `dare-ties`) on the dense updates, on `device`.
pub(crate) fn dense_ties(
    plan: &Plan<'_>,
    params: &MergeParams,
    device: &Device,
    progress: &dyn Progress,
) -> Result<Vec<ModuleDelta>> {
    let src = DeviceReps {
        plan,
        params,
        device,
    };
    let n = plan.len();
    progress.start("trimming", n as u64);
    let mut thresholds = Vec::with_capacity(n);
    for i in 0..n {
        thresholds.push(trim_threshold(&src, i, params.density)?);
        progress.advance(1);
    }
    progress.start("merging", plan.modules.len() as u64);
    let mut merged = Vec::with_capacity(plan.modules.len());
    let mut sign_sum = 0i64;
    for m in 0..plan.modules.len() {
        let module = merge_module(&src, m, &thresholds)?;
        sign_sum += module.sign_sum;
        merged.push(module);
        progress.advance(1);
    }
    let lambda = params.lambda as f32;
    merged
        .into_iter()
        .zip(&plan.modules)
        .map(|(module, plan_module)| {
            let mut values = module.values;
            if let Some((undecided, pos_mean, neg_mean)) = module.undecided {
                // The reference keeps positive values only when the elected sign is > 0.
                let chosen = if sign_sum > 0 { pos_mean } else { neg_mean };
                values = undecided.where_cond(&chosen, &values)?;
            }
            let values = values.affine(f64::from(lambda), 0.0)?;
            host_dense(plan_module.shape, &values)
        })
        .collect()
}

/// DARE on each dense update, then their weighted sum, on `device`.
pub(crate) fn dare_sum(
    plan: &Plan<'_>,
    params: &MergeParams,
    device: &Device,
    progress: &dyn Progress,
) -> Result<Vec<ModuleDelta>> {
    let src = DeviceReps {
        plan,
        params,
        device,
    };
    progress.start("merging", plan.modules.len() as u64);
    let mut out = Vec::with_capacity(plan.modules.len());
    for (m, module) in plan.modules.iter().enumerate() {
        let mut sum = Tensor::zeros(module.shape, DType::F32, device)?;
        for i in 0..plan.len() {
            if let Some(rep) = src.rep(i, m)? {
                let w = (params.lambda * plan.weight(i)) as f32;
                sum = (sum + rep.affine(f64::from(w), 0.0)?)?;
            }
        }
        out.push(host_dense(module.shape, &sum)?);
        progress.advance(1);
    }
    Ok(out)
}

fn host_dense(shape: (usize, usize), values: &Tensor) -> Result<ModuleDelta> {
    let values = values.flatten_all()?.to_vec1::<f32>()?;
    let matrix = Matrix::from_vec(shape.0, shape.1, values).map_err(|e| MergeError::Device {
        message: e.to_string(),
    })?;
    Ok(ModuleDelta::Dense(matrix))
}

/// The trim threshold of adapter `i` (see `ties::trim_threshold`): the `(D − ⌊D·d⌋)`-th smallest
/// `|x|` over its whole representation, missing modules counting as zeros.
fn trim_threshold(src: &DeviceReps<'_>, i: usize, density: f64) -> Result<f32> {
    let plan = src.plan;
    let total: usize = plan.modules.iter().map(|m| m.dense_len()).sum();
    let keep = (total as f64 * density).floor() as usize;
    if keep >= total {
        return Ok(0.0);
    }
    let rank = total - keep - 1;
    let mut magnitudes = Vec::new();
    let mut zeros = 0;
    for (m, module) in plan.modules.iter().enumerate() {
        match src.rep(i, m)? {
            Some(rep) => magnitudes.push(rep.abs()?),
            None => zeros += module.dense_len(),
        }
    }
    if rank < zeros {
        return Ok(0.0);
    }
    nth_magnitude(&magnitudes, (rank - zeros) as u64)
}

/// The `rank`-th smallest (0-based) value over `parts` (all ≥ 0, not NaN). Non-negative floats
/// order like their bit patterns, so a bisection over the patterns with one count of
/// `x ≤ v` per step ends on the exact value, an element of `parts`.
fn nth_magnitude(parts: &[Tensor], rank: u64) -> Result<f32> {
    let (mut lo, mut hi) = (0u32, f32::INFINITY.to_bits());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let v = f32::from_bits(mid);
        let counts: Vec<Tensor> = parts
            .iter()
            .map(|p| row_counts(&p.le(v)?))
            .collect::<Result<_>>()?;
        let at_most: u64 = Tensor::cat(&counts, 0)?
            .to_vec1::<u32>()?
            .into_iter()
            .map(u64::from)
            .sum();
        if at_most > rank {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok(f32::from_bits(lo))
}

/// The number of true entries of a mask per row of its last dimension, as a vector (one entry
/// for a vector). A whole-tensor sum is one reduction block on CUDA, however large the tensor;
/// one row per block spreads a module over the whole device.
fn row_counts(mask: &Tensor) -> Result<Tensor> {
    let counts = mask.to_dtype(DType::U32)?;
    let rows = match counts.rank() {
        0 => counts.reshape(1)?,
        1 => counts.sum_keepdim(0)?,
        r => counts.sum(r - 1)?.flatten_all()?,
    };
    Ok(rows)
}

/// The number of true entries of a mask.
fn count_true(mask: &Tensor) -> Result<u64> {
    let rows = row_counts(mask)?.to_vec1::<u32>()?;
    Ok(rows.into_iter().map(u64::from).sum())
}

/// One merged module before λ, on the device.
struct MergedModule {
    values: Tensor,
    /// Σ sign(Σ_i x_i) over the module's entries.
    sign_sum: i64,
    /// Entries whose sum is exactly zero with nonzero terms (a mask), with the means of their
    /// positive and of their negative values; `None` when there are none.
    undecided: Option<(Tensor, Tensor, Tensor)>,
}

/// Trim, weight, elect and take the disjoint mean of module `m`, as `ties::merge_entries`.
fn merge_module(src: &DeviceReps<'_>, m: usize, thresholds: &[f32]) -> Result<MergedModule> {
    let shape = src.plan.modules[m].shape;
    let zeros = Tensor::zeros(shape, DType::F32, src.device)?;
    let (mut total, mut pos, mut neg) = (zeros.clone(), zeros.clone(), zeros.clone());
    let (mut pos_n, mut neg_n) = (zeros.clone(), zeros.clone());
    for (i, &t) in thresholds.iter().enumerate() {
        let Some(rep) = src.rep(i, m)? else { continue };
        let w = src.plan.inputs[i].weight as f32;
        let weighted = rep.affine(f64::from(w), 0.0)?;
        let kept = rep.abs()?.ge(t)?.where_cond(&weighted, &zeros)?;
        total = (total + &kept)?;
        pos = (pos + kept.maximum(0f32)?)?;
        neg = (neg + kept.minimum(0f32)?)?;
        pos_n = (pos_n + kept.gt(0f32)?.to_dtype(DType::F32)?)?;
        neg_n = (neg_n + kept.lt(0f32)?.to_dtype(DType::F32)?)?;
    }
    // Disjoint mean: the sum over max(1, count).
    let pos_mean = (pos / pos_n.maximum(1f32)?)?;
    let neg_mean = (neg / neg_n.maximum(1f32)?)?;
    let positive = total.gt(0f32)?;
    let negative = total.lt(0f32)?;
    let values = positive.where_cond(&pos_mean, &negative.where_cond(&neg_mean, &zeros)?)?;
    let sign_sum = count_true(&positive)? as i64 - count_true(&negative)? as i64;
    let undecided = total.eq(0f32)?.mul(&(pos_n + neg_n)?.gt(0f32)?)?;
    let undecided = (count_true(&undecided)? > 0).then_some((undecided, pos_mean, neg_mean));
    Ok(MergedModule {
        values,
        sign_sum,
        undecided,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::{AdapterDigest, LoraAdapter, LoraModule};
    use crate::merge::{MergeInput, MergeOptions, Method, Silent, merge, merge_on};

    /// An adapter of rank 4 on three modules of different shapes (the third only when `all`).
    fn adapter(name: &str, seed: u32, all: bool) -> LoraAdapter {
        let mut next = crate::merge::test_values(seed);
        let mut modules = std::collections::BTreeMap::new();
        let shapes = [("k", 24, 40), ("q", 40, 40), ("v", 16, 40)];
        for (path, rows, cols) in shapes.into_iter().take(if all { 3 } else { 2 }) {
            let a = Matrix::from_fn(4, cols, |_, _| next());
            let b = Matrix::from_fn(rows, 4, |_, _| next());
            modules.insert(path.to_string(), LoraModule { a, b, scale: 0.5 });
        }
        let config = serde_json::from_str(
            r#"{"peft_type":"LORA","r":4,"lora_alpha":2,"target_modules":["q","k","v"]}"#,
        )
        .expect("config");
        LoraAdapter {
            name: name.into(),
            path: name.into(),
            config,
            modules,
            saved_modules: Default::default(),
            task: None,
            digest: AdapterDigest([seed as u8; 32]),
        }
    }

    fn relative(a: &Matrix, b: &Matrix) -> f64 {
        let diff: f64 = a
            .as_slice()
            .iter()
            .zip(b.as_slice())
            .map(|(x, y)| f64::from(x - y).powi(2))
            .sum();
        diff.sqrt() / b.frobenius().max(1e-30)
    }

    /// TIES, DARE-TIES and DARE with tensor ops equal the host implementation within 1e-5
    /// (relative Frobenius norm, per module), with weights and a module one adapter lacks.
    #[test]
    fn tensor_merges_match_the_host_merges() {
        let adapters = [
            adapter("a", 1, true),
            adapter("b", 2, false),
            adapter("c", 3, true),
        ];
        let inputs: Vec<MergeInput<'_>> = adapters
            .iter()
            .zip([1.0, 0.5, 1.5])
            .map(|(a, w)| MergeInput {
                adapter: a,
                weight: w,
            })
            .collect();
        for (method, density) in [
            (Method::Ties, 0.2),
            (Method::Ties, 1.0),
            (Method::DareTies, 0.3),
            (Method::Dare, 1.0),
        ] {
            let options = MergeOptions {
                density: Some(density),
                dare_p: Some(0.4),
                seed: Some(9),
                lambda: Some(0.8),
                ..MergeOptions::default()
            };
            let params = MergeParams::new(method, options).expect("params");
            let host = merge(&inputs, &params, &Silent).expect("host");
            let tensors =
                merge_on(&inputs, &params, &Silent, None, Some(&Device::Cpu)).expect("tensors");
            assert_eq!(host.modules.len(), tensors.modules.len());
            for (path, want) in &host.modules {
                let got = tensors.get(path).expect("module").to_dense();
                let want = want.to_dense();
                assert!(want.frobenius() > 0.0, "{method:?} {path}: empty merge");
                let err = relative(&got, &want);
                assert!(err <= 1e-5, "{method:?} {path}: relative error {err:e}");
            }
        }
    }

    /// The bisection finds the exact rank-th value, repeats and zeros included.
    #[test]
    fn bisection_finds_the_rank_th_magnitude() {
        let values = [0.0f32, 3.5, 1e-30, 2.0, 2.0, 7.25, 0.0, 1.0];
        let parts = [
            Tensor::new(&values[..3], &Device::Cpu).expect("t"),
            Tensor::new(&values[3..], &Device::Cpu).expect("t"),
        ];
        let mut sorted = values.to_vec();
        sorted.sort_by(f32::total_cmp);
        for (rank, want) in sorted.iter().enumerate() {
            assert_eq!(nth_magnitude(&parts, rank as u64).expect("nth"), *want);
        }
    }
}
