//! Each merge method from the plan to a [`MergedDelta`] (README, "Methods").

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::Device;
use faer::Mat;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::align::{Alignment, Factors, align};
use super::align_cache::{AlignKey, Aligned, AlignmentCache, Family, TrimKey};
use super::core::{self, Bases, CoreBasis, CoreFactors, core_basis};
use super::dare::{self, DareKey};
use super::device;
use super::magnitude::Histogram;
use super::plan::{ModulePlan, Plan};
use super::ties::{
    RepSource, Ties, ties_merge, ties_merge_counted, ties_merge_trimmed, trim_thresholds,
};
use super::{
    MergeError, MergeInput, MergeParams, MergedDelta, Method, ModuleDelta, Progress, Silent,
};
use crate::matrix::Matrix;

/// Merges `inputs` with `params`. The result does not depend on the order of `inputs`.
pub fn merge(
    inputs: &[MergeInput<'_>],
    params: &MergeParams,
    progress: &dyn Progress,
) -> Result<MergedDelta, MergeError> {
    merge_cached(inputs, params, progress, None)
}

/// [`merge`], taking the alignment of each module (KnOTS, Core Space) from `cache` when it
/// holds it and storing it there when not.
pub fn merge_cached(
    inputs: &[MergeInput<'_>],
    params: &MergeParams,
    progress: &dyn Progress,
    cache: Option<&AlignmentCache>,
) -> Result<MergedDelta, MergeError> {
    merge_on(inputs, params, progress, cache, None)
}

/// [`merge_cached`] with the dense methods' O(n·O·I) work (TIES, DARE-TIES, DARE) on `device`
/// with tensor ops (`None`: the host implementation). The result is the host's within f32
/// rounding; the SVDs of the aligned methods always run on the host.
pub fn merge_on(
    inputs: &[MergeInput<'_>],
    params: &MergeParams,
    progress: &dyn Progress,
    cache: Option<&AlignmentCache>,
    device: Option<&Device>,
) -> Result<MergedDelta, MergeError> {
    // Merges spread their modules over the rayon pool, so each module's QRs and SVDs (faer's
    // `qr`, `thin_svd` and products, which follow faer's global setting) run on one thread
    // rather than splitting every small decomposition over the pool again. Process-wide;
    // knots' own faer products pass their parallelism explicitly.
    faer::set_global_parallelism(faer::Par::Seq);
    let plan = Plan::new(inputs)?;
    let modules = match (params.method, device) {
        (Method::Dare, Some(d)) => device::dare_sum(&plan, params, d, progress)?,
        (Method::Ties | Method::DareTies, Some(d)) => {
            device::dense_ties(&plan, params, d, progress)?
        }
        _ => merge_on_host(&plan, params, progress, cache)?,
    };
    let modules = plan
        .modules
        .iter()
        .map(|m| m.path.to_string())
        .zip(modules)
        .collect();
    Ok(MergedDelta { modules })
}

fn merge_on_host(
    plan: &Plan<'_>,
    params: &MergeParams,
    progress: &dyn Progress,
    cache: Option<&AlignmentCache>,
) -> Result<Vec<ModuleDelta>, MergeError> {
    Ok(match params.method {
        Method::Ta | Method::KnotsTa => task_arithmetic(plan, params.lambda),
        Method::CoreTa if !params.isotropize => task_arithmetic(plan, params.lambda),
        Method::Dare => dare_sum(plan, params, progress),
        Method::Ties | Method::DareTies => dense_ties(plan, params, progress),
        Method::KnotsTies | Method::KnotsDareTies => knots_ties(plan, params, progress, cache)?,
        Method::CoreTa
        | Method::CoreTies
        | Method::CoreDareTies
        | Method::CoreTsv
        | Method::CoreIsoC
        | Method::CoreIsoCts => core_merge(plan, params, progress, cache)?,
    })
}

/// `λ·Σ w_i·c_i·B_i·A_i` as `[λw_1c_1B_1 … λw_nc_nB_n] · [A_1; …; A_n]`, never dense.
fn task_arithmetic(plan: &Plan<'_>, lambda: f64) -> Vec<ModuleDelta> {
    plan.modules
        .iter()
        .map(|module| {
            let scaled: Vec<Matrix> = module
                .members
                .iter()
                .map(|m| {
                    let mut b = m.lora.b.clone();
                    b.scale((lambda * plan.weight(m.index) * m.lora.scale) as f32);
                    b
                })
                .collect();
            let b = Matrix::hstack(&scaled, module.shape.0);
            let a = Matrix::vstack(module.members.iter().map(|m| &m.lora.a), module.shape.1);
            ModuleDelta::LowRank { b, a }
        })
        .collect()
}

/// DARE on each dense update, then task arithmetic.
fn dare_sum(plan: &Plan<'_>, params: &MergeParams, progress: &dyn Progress) -> Vec<ModuleDelta> {
    let src = DenseReps { plan, params };
    progress.start("merging", plan.modules.len() as u64);
    (0..plan.modules.len())
        .into_par_iter()
        .map(|m| {
            let (rows, cols) = plan.modules[m].shape;
            let mut sum = vec![0.0f32; rows * cols];
            for i in 0..plan.len() {
                if let Some(rep) = src.rep(i, m) {
                    let w = (params.lambda * plan.weight(i)) as f32;
                    sum.iter_mut()
                        .zip(rep.iter())
                        .for_each(|(s, x)| *s += w * x);
                }
            }
            progress.advance(1);
            dense(rows, cols, sum)
        })
        .collect()
}

/// TIES (after DARE for `dare-ties`) on the dense updates.
fn dense_ties(plan: &Plan<'_>, params: &MergeParams, progress: &dyn Progress) -> Vec<ModuleDelta> {
    let src = DenseReps { plan, params };
    let merged = ties_merge(&src, &ties_settings(plan, params), progress);
    plan.modules
        .iter()
        .zip(merged)
        .map(|(module, values)| dense(module.shape.0, module.shape.1, values))
        .collect()
}

/// KnOTS: align every module, TIES (after DARE for `knots-dare-ties`) on the aligned
/// coordinates, and return `U · R` as low-rank factors.
fn knots_ties(
    plan: &Plan<'_>,
    params: &MergeParams,
    progress: &dyn Progress,
    cache: Option<&AlignmentCache>,
) -> Result<Vec<ModuleDelta>, MergeError> {
    let aligned = aligned_modules(plan, Family::Knots, progress, cache)?;
    let alignments: Vec<&Alignment> = aligned.iter().map(|a| a.knots()).collect();
    let src = AlignedReps {
        plan,
        params,
        alignments: &alignments,
    };
    let n = plan.inputs.len();
    let settings = ties_settings(plan, params);
    // With the alignments' histograms, the thresholds come out of a one-pass merge.
    let compute = || match ties_merge_counted(&src, &settings, progress) {
        Some((thresholds, merged)) => (thresholds, Some(merged)),
        None => (trim_thresholds(&src, n, params.density, progress), None),
    };
    // DARE drops entries anew for each seed and p, so its thresholds are not kept.
    let (thresholds, merged) = match cache.filter(|_| !uses_dare(params)) {
        Some(cache) => cache.trims_or_compute(trim_key(plan, params), &aligned, compute),
        None => {
            let (thresholds, merged) = compute();
            (Arc::new(thresholds), merged)
        }
    };
    let merged =
        merged.unwrap_or_else(|| ties_merge_trimmed(&src, &settings, &thresholds, progress));
    Ok(low_rank_modules(plan, &alignments, merged))
}

/// The set's alignments (every module's [`AlignKey`]) and the density, for the trim cache.
fn trim_key(plan: &Plan<'_>, params: &MergeParams) -> TrimKey {
    let mut hash = Sha256::new();
    for module in &plan.modules {
        let key = align_key(plan, module, Family::Knots);
        hash.update((key.module.len() as u64).to_le_bytes());
        hash.update(key.module.as_bytes());
        hash.update((key.members.len() as u64).to_le_bytes());
        key.members.iter().for_each(|d| hash.update(d.0));
    }
    TrimKey {
        set: hash.finalize().into(),
        density: params.density.to_bits(),
    }
}

/// Each module's merged coordinates `R` as the factors `U · R`.
fn low_rank_modules(
    plan: &Plan<'_>,
    alignments: &[&Alignment],
    merged: Vec<Vec<f32>>,
) -> Vec<ModuleDelta> {
    alignments
        .iter()
        .zip(plan.modules.iter().zip(merged))
        .map(|(alignment, (module, values))| {
            let a = Matrix::from_vec(alignment.rank(), module.shape.1, values)
                .expect("TIES keeps the representation's length");
            ModuleDelta::LowRank {
                b: alignment.u.clone(),
                a,
            }
        })
        .collect()
}

/// Every module's alignment for `family`, from `cache` where it holds one.
fn aligned_modules(
    plan: &Plan<'_>,
    family: Family,
    progress: &dyn Progress,
    cache: Option<&AlignmentCache>,
) -> Result<Vec<Arc<Aligned>>, MergeError> {
    progress.start("aligning", plan.modules.len() as u64);
    plan.modules
        .par_iter()
        .map(|module| {
            let compute = || {
                let factors = module_factors(module);
                Ok(match family {
                    Family::Knots => Aligned::Knots(align(module.path, &factors)?),
                    Family::CoreSingular => {
                        Aligned::Core(core_basis(module.path, &factors, Bases::Singular)?)
                    }
                    Family::Core => Aligned::Core(core_basis(module.path, &factors, Bases::Any)?),
                })
            };
            let aligned = match cache {
                Some(cache) => cache.get_or_compute(align_key(plan, module, family), compute),
                None => compute().map(Arc::new),
            };
            progress.advance(1);
            aligned
        })
        .collect()
}

fn align_key(plan: &Plan<'_>, module: &ModulePlan<'_>, family: Family) -> AlignKey {
    AlignKey {
        family,
        module: module.path.to_string(),
        members: module
            .members
            .iter()
            .map(|m| plan.inputs[m.index].adapter.digest)
            .collect(),
    }
}

fn module_factors<'a>(module: &ModulePlan<'a>) -> Vec<Factors<'a>> {
    module
        .members
        .iter()
        .map(|m| Factors {
            b: &m.lora.b,
            a: &m.lora.a,
            scale: m.lora.scale,
        })
        .collect()
}

/// Core Space: each module's core matrices merged by the method, then `λ·U·M*·Vᵀ`.
fn core_merge(
    plan: &Plan<'_>,
    params: &MergeParams,
    progress: &dyn Progress,
    cache: Option<&AlignmentCache>,
) -> Result<Vec<ModuleDelta>, MergeError> {
    let family = if params.method.uses_ties() {
        Family::CoreSingular
    } else {
        Family::Core
    };
    let aligned = aligned_modules(plan, family, progress, cache)?;
    progress.start("merging", plan.modules.len() as u64);
    Ok(aligned
        .par_iter()
        .enumerate()
        .map(|(m, aligned)| {
            let basis = aligned.core();
            let merged = merge_in_core(plan, params, m, basis);
            progress.advance(1);
            basis.expand(merged.as_ref(), params.lambda)
        })
        .collect())
}

/// `M*` of module `m` (before λ).
fn merge_in_core(plan: &Plan<'_>, params: &MergeParams, m: usize, basis: &CoreBasis) -> Mat<f64> {
    let shape = basis.shape();
    let weighted: Vec<CoreFactors> = plan.modules[m]
        .members
        .iter()
        .enumerate()
        .map(|(position, member)| basis.factors(position, plan.weight(member.index)))
        .collect();
    let merged = match params.method {
        Method::CoreTies | Method::CoreDareTies => core_ties(plan, params, m, basis),
        Method::CoreTsv => core::tsv(&weighted, shape),
        Method::CoreIsoCts => return core::iso_cts(&weighted, shape, params.common_fraction),
        _ => core::sum(&weighted, shape),
    };
    if params.isotropize {
        core::isotropize(merged.as_ref())
    } else {
        merged
    }
}

/// TIES (after DARE for `core-dare-ties`) on one module's core matrices: the trim, the sign
/// election and the exact-cancellation rule all run per module, as the reference does.
fn core_ties(plan: &Plan<'_>, params: &MergeParams, m: usize, basis: &CoreBasis) -> Mat<f64> {
    let src = CoreReps::new(plan, params, m, basis);
    let settings = Ties {
        lambda: 1.0,
        ..ties_settings(plan, params)
    };
    let merged = ties_merge(&src, &settings, &Silent);
    let (rows, cols) = basis.shape();
    let values = &merged[0];
    Mat::from_fn(rows, cols, |i, j| f64::from(values[i * cols + j]))
}

fn ties_settings(plan: &Plan<'_>, params: &MergeParams) -> Ties {
    let weights = plan.inputs.iter().map(|i| i.weight).collect();
    Ties {
        density: params.density,
        lambda: params.lambda,
        weights,
    }
}

fn dense(rows: usize, cols: usize, values: Vec<f32>) -> ModuleDelta {
    ModuleDelta::Dense(Matrix::from_vec(rows, cols, values).expect("a module's dense length"))
}

/// Whether the merge drops entries with DARE (a method that uses it, with `p > 0`).
fn uses_dare(params: &MergeParams) -> bool {
    params.method.uses_dare() && params.dare_p != 0.0
}

/// Applies DARE to `rep` when the method uses it.
fn maybe_dare<'a>(
    rep: Cow<'a, [f32]>,
    plan: &Plan<'_>,
    params: &MergeParams,
    i: usize,
    m: usize,
) -> Cow<'a, [f32]> {
    if !uses_dare(params) {
        return rep;
    }
    let mut owned = rep.into_owned();
    let key = DareKey {
        seed: params.seed,
        adapter: &plan.inputs[i].adapter.digest,
        module: plan.modules[m].path,
    };
    dare::apply(&mut owned, params.dare_p, key);
    Cow::Owned(owned)
}

/// The dense updates `c_i·B_i·A_i`, computed when asked for.
struct DenseReps<'p> {
    plan: &'p Plan<'p>,
    params: &'p MergeParams,
}

impl RepSource for DenseReps<'_> {
    fn module_count(&self) -> usize {
        self.plan.modules.len()
    }

    fn module_len(&self, m: usize) -> usize {
        self.plan.modules[m].dense_len()
    }

    fn rep(&self, i: usize, m: usize) -> Option<Cow<'_, [f32]>> {
        let member = self.plan.modules[m].members.iter().find(|x| x.index == i)?;
        let mut update = member.lora.b.matmul(&member.lora.a);
        update.scale(member.lora.scale as f32);
        Some(maybe_dare(
            Cow::Owned(update.into_vec()),
            self.plan,
            self.params,
            i,
            m,
        ))
    }
}

/// One module's core matrices `M_i`, flattened row by row.
struct CoreReps<'p> {
    plan: &'p Plan<'p>,
    params: &'p MergeParams,
    m: usize,
    basis: &'p CoreBasis,
    /// Each member's core matrix, row-major f32, computed once (TIES reads every
    /// representation twice: for the trim threshold, then for the merge).
    cores: Vec<Vec<f32>>,
}

impl<'p> CoreReps<'p> {
    fn new(plan: &'p Plan<'p>, params: &'p MergeParams, m: usize, basis: &'p CoreBasis) -> Self {
        let cores = (0..plan.modules[m].members.len())
            .map(|position| {
                let core = basis.factors(position, 1.0).dense();
                let (rows, cols) = (core.nrows(), core.ncols());
                let mut values = Vec::with_capacity(rows * cols);
                for r in 0..rows {
                    values.extend((0..cols).map(|c| core[(r, c)] as f32));
                }
                values
            })
            .collect();
        Self {
            plan,
            params,
            m,
            basis,
            cores,
        }
    }
}

impl RepSource for CoreReps<'_> {
    fn module_count(&self) -> usize {
        1
    }

    fn module_len(&self, _: usize) -> usize {
        let (rows, cols) = self.basis.shape();
        rows * cols
    }

    fn rep(&self, i: usize, _: usize) -> Option<Cow<'_, [f32]>> {
        let position = self.plan.modules[self.m]
            .members
            .iter()
            .position(|x| x.index == i)?;
        Some(maybe_dare(
            Cow::Borrowed(self.cores[position].as_slice()),
            self.plan,
            self.params,
            i,
            self.m,
        ))
    }
}

/// The KnOTS coordinates `rep_i = diag(s)·V_iᵀ` of every module.
struct AlignedReps<'p> {
    plan: &'p Plan<'p>,
    params: &'p MergeParams,
    alignments: &'p [&'p Alignment],
}

impl RepSource for AlignedReps<'_> {
    fn module_count(&self) -> usize {
        self.alignments.len()
    }

    fn module_len(&self, m: usize) -> usize {
        self.alignments[m].rank() * self.plan.modules[m].shape.1
    }

    fn rep(&self, i: usize, m: usize) -> Option<Cow<'_, [f32]>> {
        let position = self.plan.modules[m]
            .members
            .iter()
            .position(|x| x.index == i)?;
        let rep = Cow::Borrowed(self.alignments[m].reps[position].as_slice());
        Some(maybe_dare(rep, self.plan, self.params, i, m))
    }

    fn histogram(&self, i: usize, m: usize) -> Option<&Histogram> {
        if uses_dare(self.params) {
            return None;
        }
        let position = self.plan.modules[m]
            .members
            .iter()
            .position(|x| x.index == i)?;
        self.alignments[m].histograms.get(position)
    }

    fn has_histograms(&self) -> bool {
        !uses_dare(self.params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::{AdapterDigest, LoraAdapter, LoraModule};
    use crate::merge::{MergeInput, MergeOptions};

    fn adapter(name: &str, seed: u32) -> LoraAdapter {
        adapter_of_rank(name, seed, 2)
    }

    fn adapter_of_rank(name: &str, seed: u32, rank: usize) -> LoraAdapter {
        let mut next = crate::merge::test_values(seed);
        let a = Matrix::from_fn(rank, 6, |_, _| next());
        let b = Matrix::from_fn(5, rank, |_, _| next());
        let config = serde_json::from_str(&format!(
            r#"{{"peft_type":"LORA","r":{rank},"lora_alpha":{rank},"target_modules":["q"]}}"#
        ))
        .unwrap();
        LoraAdapter {
            name: name.into(),
            path: name.into(),
            config,
            modules: [("q".to_string(), LoraModule { a, b, scale: 0.5 })].into(),
            saved_modules: Default::default(),
            task: None,
            digest: AdapterDigest([seed as u8; 32]),
        }
    }

    /// Flipping the sign of one singular component (a column of U with the matching row of every
    /// rep_i) is an equally valid SVD; the merge must not change.
    #[test]
    fn flipping_an_svd_component_does_not_change_the_merge() {
        let adapters = [adapter("a", 1), adapter("b", 2), adapter("c", 3)];
        let inputs: Vec<_> = adapters.iter().map(MergeInput::new).collect();
        let plan = Plan::new(&inputs).unwrap();
        for method in [Method::KnotsTies, Method::KnotsDareTies] {
            let options = MergeOptions {
                density: Some(0.4),
                lambda: Some(0.7),
                ..Default::default()
            };
            let params = MergeParams::new(method, options).unwrap();
            let aligned = vec![align("q", &module_factors(&plan.modules[0])).unwrap()];
            let mut flipped = aligned.clone();
            for component in [0, 2] {
                let k = flipped[0].rank();
                let u = flipped[0].u.as_mut_slice();
                u.iter_mut()
                    .skip(component)
                    .step_by(k)
                    .for_each(|x| *x = -*x);
                for rep in &mut flipped[0].reps {
                    let cols = rep.cols();
                    rep.as_mut_slice()[component * cols..(component + 1) * cols]
                        .iter_mut()
                        .for_each(|x| *x = -*x);
                }
            }
            let ties = |alignment: &Alignment| {
                let alignments = [alignment];
                let src = AlignedReps {
                    plan: &plan,
                    params: &params,
                    alignments: &alignments,
                };
                let trims = trim_thresholds(&src, inputs.len(), params.density, &Silent);
                let merged =
                    ties_merge_trimmed(&src, &ties_settings(&plan, &params), &trims, &Silent);
                low_rank_modules(&plan, &alignments, merged)[0].to_dense()
            };
            let (want, got) = (ties(&aligned[0]), ties(&flipped[0]));
            assert!(got.relative_error(&want) < 1e-6, "{method}");
        }
    }

    fn params(method: Method, options: MergeOptions) -> MergeParams {
        MergeParams::new(method, options).unwrap()
    }

    /// `U·M_i·Vᵀ` gives back each scaled update `c_i·B_i·A_i`, unequal ranks included, and the
    /// core path's sum expands to task arithmetic.
    #[test]
    fn core_matrices_reconstruct_each_update() {
        let adapters = [
            adapter_of_rank("a", 1, 1),
            adapter_of_rank("b", 2, 2),
            adapter_of_rank("c", 3, 3),
        ];
        let inputs: Vec<_> = adapters.iter().map(MergeInput::new).collect();
        let plan = Plan::new(&inputs).unwrap();
        let basis = core_basis("q", &module_factors(&plan.modules[0]), Bases::Singular).unwrap();
        // R = 6 > O = 5: the left basis has at most 5 directions.
        assert_eq!((basis.u.cols(), basis.vt.rows()), (5, 6));
        let cores: Vec<_> = (0..adapters.len()).map(|i| basis.factors(i, 1.0)).collect();
        for (adapter, core) in adapters.iter().zip(&cores) {
            let got = basis.expand(core.dense().as_ref(), 1.0).to_dense();
            let want = adapter.delta().modules["q"].to_dense();
            assert!(got.relative_error(&want) < 1e-6, "{}", adapter.name);
        }
        let summed = basis
            .expand(core::sum(&cores, basis.shape()).as_ref(), 0.7)
            .to_dense();
        let ta = merge(&inputs, &params(Method::Ta, lambda(0.7)), &Silent).unwrap();
        assert!(summed.relative_error(&ta.modules["q"].to_dense()) < 1e-6);
    }

    fn lambda(l: f64) -> MergeOptions {
        MergeOptions {
            lambda: Some(l),
            ..Default::default()
        }
    }

    /// One adapter, unequal ranks, a duplicated update under another name, a zero weight: every
    /// Core Space method gives a finite low-rank result.
    #[test]
    fn core_methods_are_defined_on_degenerate_sets() {
        let one = [adapter("a", 1)];
        let unequal = [adapter_of_rank("a", 1, 1), adapter_of_rank("b", 2, 3)];
        let mut twin = adapter("b", 1);
        twin.digest = AdapterDigest([9; 32]);
        let duplicated = [adapter("a", 1), twin];
        let sets: [&[LoraAdapter]; 3] = [&one, &unequal, &duplicated];
        for set in sets {
            for weights in [vec![1.0; set.len()], vec![0.0; set.len()]] {
                let inputs: Vec<_> = set
                    .iter()
                    .zip(&weights)
                    .map(|(adapter, &weight)| MergeInput { adapter, weight })
                    .collect();
                for method in Method::ALL.into_iter().filter(|m| m.is_core()) {
                    let p = params(method, MergeOptions::default());
                    let merged = merge(&inputs, &p, &Silent).unwrap();
                    let dense = merged.modules["q"].to_dense();
                    assert!(merged.is_low_rank(), "{method}");
                    assert!(
                        dense.as_slice().iter().all(|x| x.is_finite()),
                        "{method} on {} adapters, weights {weights:?}",
                        set.len()
                    );
                }
            }
        }
        // TSV of one adapter is that adapter.
        let inputs = [MergeInput::new(&one[0])];
        let tsv = merge(&inputs, &params(Method::CoreTsv, lambda(1.0)), &Silent).unwrap();
        let own = one[0].delta().modules["q"].to_dense();
        assert!(tsv.modules["q"].to_dense().relative_error(&own) < 1e-5);
    }

    /// A second merge of the same adapters with other parameters reuses every module's
    /// alignment and gives what an uncached merge gives.
    #[test]
    fn the_alignment_cache_serves_other_parameters() {
        let adapters = [adapter("a", 1), adapter("b", 2), adapter("c", 3)];
        let inputs: Vec<_> = adapters.iter().map(MergeInput::new).collect();
        let cache = AlignmentCache::new(1 << 20);
        let runs = [
            (Method::KnotsTies, 0.5),
            (Method::KnotsDareTies, 0.9),
            (Method::CoreTsv, 0.5),
            (Method::CoreIsoCts, 0.8),
            (Method::CoreTies, 1.0),
        ];
        for (method, l) in runs {
            let p = params(method, lambda(l));
            let cached = merge_cached(&inputs, &p, &Silent, Some(&cache)).unwrap();
            let fresh = merge(&inputs, &p, &Silent).unwrap();
            let err = cached.modules["q"]
                .to_dense()
                .relative_error(&fresh.modules["q"].to_dense());
            assert!(err < 1e-6, "{method}: {err}");
        }
        let stats = cache.stats();
        // One module: a miss per family (KnOTS, Core Space with any bases, with singular
        // vectors), a hit for every later run of that family.
        assert_eq!((stats.misses, stats.hits), (3, 2));
        assert!(stats.bytes > 0);
    }

    /// KnOTS-TIES keeps each set's trim thresholds per density: another λ or other weights
    /// reuse them, another density or an alignment computed anew does not, and every merge
    /// equals an uncached one.
    #[test]
    fn trim_thresholds_are_reused_only_with_their_alignments() {
        let adapters = [adapter("a", 1), adapter("b", 2), adapter("c", 3)];
        let weighted: Vec<_> = (adapters.iter().zip([1.0, 0.5, 2.0]))
            .map(|(adapter, weight)| MergeInput { adapter, weight })
            .collect();
        let plain: Vec<_> = adapters.iter().map(MergeInput::new).collect();
        let check = |cache: &AlignmentCache, inputs: &[MergeInput<'_>], options: MergeOptions| {
            let p = params(Method::KnotsTies, options);
            let cached = merge_cached(inputs, &p, &Silent, Some(cache)).unwrap();
            let fresh = merge(inputs, &p, &Silent).unwrap();
            let err = cached.modules["q"]
                .to_dense()
                .relative_error(&fresh.modules["q"].to_dense());
            assert!(err < 1e-6, "{err}");
        };
        let density = |d: f64, l: f64| MergeOptions {
            density: Some(d),
            lambda: Some(l),
            ..Default::default()
        };
        let cache = AlignmentCache::new(1 << 20);
        check(&cache, &plain, density(0.4, 1.0));
        check(&cache, &plain, density(0.4, 0.6));
        check(&cache, &weighted, density(0.4, 0.6));
        check(&cache, &plain, density(0.3, 0.6));
        let stats = cache.stats();
        assert_eq!((stats.trim_hits, stats.trim_misses), (2, 2));

        // A cache too small to keep an alignment computes it for every merge, and the
        // thresholds with it.
        let tiny = AlignmentCache::new(1);
        check(&tiny, &plain, density(0.4, 1.0));
        assert_eq!(tiny.stats().entries, 0, "evicted");
        check(&tiny, &plain, density(0.4, 0.6));
        let stats = tiny.stats();
        assert_eq!((stats.trim_hits, stats.trim_misses), (0, 2));
    }

    /// TA, TSV-M, Iso-C and Iso-CTS do not depend on which orthonormal bases span the core:
    /// the Cholesky bases give what the singular vectors give.
    #[test]
    fn invariant_methods_agree_across_bases() {
        let adapters = [adapter_of_rank("a", 1, 2), adapter_of_rank("b", 2, 1)];
        let inputs: Vec<_> = adapters.iter().map(MergeInput::new).collect();
        let plan = Plan::new(&inputs).unwrap();
        let factors = module_factors(&plan.modules[0]);
        let any = core_basis("q", &factors, Bases::Any).unwrap();
        let singular = core_basis("q", &factors, Bases::Singular).unwrap();
        for method in [Method::CoreTsv, Method::CoreIsoC, Method::CoreIsoCts] {
            let p = params(method, lambda(0.9));
            let a = any.expand(merge_in_core(&plan, &p, 0, &any).as_ref(), 0.9);
            let b = singular.expand(merge_in_core(&plan, &p, 0, &singular).as_ref(), 0.9);
            let err = a.to_dense().relative_error(&b.to_dense());
            assert!(err < 1e-6, "{method}: {err}");
        }
    }
}
