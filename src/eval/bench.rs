//! The benchmark run behind `knots eval`: the suite's encoder adapters (one per task, trained by
//! `knots train`) are merged by each method and scored on real data, per task and jointly.
//!
//! Every score is a cosine between a text's embedding under some update and a task's frozen
//! label-text embeddings, so one encoder pass per (update, split) gives every metric: per-task
//! accuracy (argmax over the task's labels), joint Hits@k (ranking over the union of all tasks'
//! labels) and the ensemble baseline (each label's best score over the individual adapters).
//!
//! Step in the data flow: suite splits + adapters → merges ([`crate::merge`]) → encoder
//! ([`crate::engine`]) → [`super::metrics`], [`super::stats`] → [`Report`].

use std::time::Instant;

use crate::adapters::LoraAdapter;
use crate::engine::{Encoder, EngineError, LoadedDelta};
use crate::merge::{self, MergeInput, MergeParams, MergedDelta, Method, Progress, Silent};

use super::metrics::{JointLabels, accuracy, ensemble_max, hits_at, normalized_accuracy};
use super::report::{Hits, MethodResult, Report, ScalingPoint, ScalingSeries};
use super::search::{SearchGrid, greedy_search};
use super::split::Example;
use super::stats::{combinations, mean_ci95};
use super::{EvalError, TaskData};

/// Texts embedded per forward pass.
const BATCH: usize = 64;

/// How much of the paper's protocol to run.
#[derive(Debug, Clone)]
pub struct BenchSettings {
    pub methods: Vec<Method>,
    pub grid: SearchGrid,
    /// Test examples per task (the first ones of each split, classes interleaved by hash).
    pub test_per_task: usize,
    /// Validation examples per task used by the search.
    pub search_per_task: usize,
    /// Numbers k of merged tasks for the scaling study (each at most the number of tasks).
    pub scaling_ks: Vec<usize>,
    /// Random k-task combinations per k.
    pub scaling_combinations: usize,
    /// Test examples per task in the scaling study.
    pub scaling_per_task: usize,
    pub seed: u64,
}

impl BenchSettings {
    /// The default run (on 2 CPU cores with the 8-task suite, see the README): 200 test and 12
    /// validation examples per task, grids in steps of 0.2, one DARE seed, scaling at
    /// k = 2, 4, 6, … n over 3 combinations each on 12 test examples per task.
    pub fn standard(tasks: usize) -> Self {
        let fifths = |from: u32, to: u32| (from..=to).map(|i| f64::from(i) / 5.0).collect();
        Self {
            methods: vec![
                Method::Ta,
                Method::Ties,
                Method::DareTies,
                Method::KnotsTies,
                Method::KnotsDareTies,
                Method::CoreTies,
                Method::CoreDareTies,
                Method::CoreTsv,
                Method::CoreIsoC,
                Method::CoreIsoCts,
            ],
            grid: SearchGrid {
                lambdas: fifths(1, 5),
                densities: fifths(1, 5),
                dare_ps: vec![0.1, 0.3, 0.5, 0.7, 0.9],
                dare_seeds: vec![0],
                isotropize: vec![false, true],
                common_fractions: vec![0.6, 0.8],
            },
            test_per_task: 200,
            search_per_task: 12,
            scaling_ks: (2..=tasks).step_by(2).chain([tasks]).collect(),
            scaling_combinations: 3,
            scaling_per_task: 12,
            seed: 0,
        }
    }

    /// The paper's protocol on every test example: λ and density 0.1–1.0, p 0.1–0.9, DARE
    /// best of 3 seeds, scaling at every k over 5 combinations (many hours on 2 CPU cores).
    pub fn paper(tasks: usize) -> Self {
        Self {
            grid: SearchGrid::default(),
            test_per_task: usize::MAX,
            search_per_task: 100,
            scaling_ks: (2..=tasks).collect(),
            scaling_combinations: 5,
            scaling_per_task: 60,
            ..Self::standard(tasks)
        }
    }

    /// A small run for CI: coarse grids, one DARE seed, scaling at k = 2 and n.
    pub fn quick(tasks: usize) -> Self {
        Self {
            grid: SearchGrid {
                lambdas: vec![0.5, 1.0],
                densities: vec![0.2, 0.6],
                dare_ps: vec![0.2],
                dare_seeds: vec![0],
                isotropize: vec![false, true],
                common_fractions: vec![0.8],
            },
            test_per_task: 48,
            search_per_task: 24,
            scaling_ks: vec![2, tasks],
            scaling_combinations: 2,
            scaling_per_task: 24,
            ..Self::standard(tasks)
        }
    }
}

/// Labelled texts drawn from several tasks.
#[derive(Debug, Clone, Default)]
struct EvalSet {
    texts: Vec<String>,
    /// Task index of each text.
    task: Vec<usize>,
    /// Class within its task.
    label: Vec<usize>,
}

impl EvalSet {
    /// The first `cap` examples of each listed task's split.
    fn new(
        tasks: &[TaskData],
        which: &[usize],
        split: fn(&TaskData) -> &[Example],
        cap: usize,
    ) -> Self {
        let mut set = Self::default();
        for &t in which {
            for e in split(&tasks[t]).iter().take(cap) {
                set.texts.push(e.text.clone());
                set.task.push(t);
                set.label.push(e.label);
            }
        }
        set
    }

    fn len(&self) -> usize {
        self.texts.len()
    }

    /// The first `cap` texts of each task, and their rows in `self`.
    fn prefix(&self, cap: usize) -> (Self, Vec<usize>) {
        let mut seen = std::collections::HashMap::new();
        let rows: Vec<usize> = (0..self.len())
            .filter(|&i| {
                let n = seen.entry(self.task[i]).or_insert(0usize);
                *n += 1;
                *n <= cap
            })
            .collect();
        let set = Self {
            texts: rows.iter().map(|&i| self.texts[i].clone()).collect(),
            task: rows.iter().map(|&i| self.task[i]).collect(),
            label: rows.iter().map(|&i| self.label[i]).collect(),
        };
        (set, rows)
    }
}

/// Embeddings of one set under one update, row per text.
type Embeddings = Vec<Vec<f32>>;

/// The encoder, the tasks, their adapters and their frozen heads.
pub struct Bench<'a> {
    encoder: &'a Encoder,
    tasks: &'a [TaskData],
    adapters: &'a [LoraAdapter],
    /// Per task, the label-text embeddings of its classes.
    heads: Vec<Embeddings>,
    joint: JointLabels,
    progress: &'a dyn Progress,
}

/// A small subset on which an adapter gets nothing right cannot normalise a score; the
/// adapter's accuracy on the whole test split stands in for each such zero.
pub(super) fn stand_in_for_zeros(subset: &mut [f64], whole: &[f64]) {
    for (sub, whole) in subset.iter_mut().zip(whole) {
        if *sub <= 0.0 {
            *sub = *whole;
        }
    }
}

pub(super) fn model_error(e: EngineError) -> EvalError {
    EvalError::metric("model", e.to_string())
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

impl<'a> Bench<'a> {
    /// `label_texts[t]` are task `t`'s label texts; `adapters[t]` its adapter.
    pub fn new(
        encoder: &'a Encoder,
        tasks: &'a [TaskData],
        adapters: &'a [LoraAdapter],
        label_texts: &[Vec<String>],
        progress: &'a dyn Progress,
    ) -> Result<Self, EvalError> {
        if tasks.len() != adapters.len() || tasks.len() != label_texts.len() || tasks.is_empty() {
            return Err(EvalError::metric(
                "benchmark",
                "one adapter and one set of label texts per task is needed",
            ));
        }
        let heads = label_texts
            .iter()
            .map(|texts| {
                let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
                encoder
                    .embed(&texts, None)?
                    .to_vec2::<f32>()
                    .map_err(EngineError::from)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(model_error)?;
        let joint = JointLabels::new(&heads.iter().map(Vec::len).collect::<Vec<_>>());
        Ok(Self {
            encoder,
            tasks,
            adapters,
            heads,
            joint,
            progress,
        })
    }

    fn embed(&self, set: &EvalSet, delta: Option<&MergedDelta>) -> Result<Embeddings, EvalError> {
        let run = || -> Result<Embeddings, EngineError> {
            let registry = self.encoder.model.registry();
            let loaded: Option<LoadedDelta> = delta
                .map(|d| registry.convert(d, self.encoder.model.device()))
                .transpose()?;
            // Batches of similar length waste less compute on padding.
            let ids = self
                .encoder
                .encode(&set.texts.iter().map(String::as_str).collect::<Vec<_>>())?;
            let mut order: Vec<usize> = (0..set.len()).collect();
            order.sort_by_key(|&i| ids[i].len());
            let mut rows = vec![Vec::new(); set.len()];
            for chunk in order.chunks(BATCH) {
                let batch = self
                    .encoder
                    .model
                    .batch(&chunk.iter().map(|&i| ids[i].clone()).collect::<Vec<_>>())?;
                let emb = self
                    .encoder
                    .model
                    .embed(&batch, loaded.as_ref())?
                    .to_vec2::<f32>()?;
                for (&i, row) in chunk.iter().zip(emb) {
                    rows[i] = row;
                }
            }
            Ok(rows)
        };
        let rows = run().map_err(model_error)?;
        self.progress.advance(1);
        Ok(rows)
    }

    fn merge(&self, subset: &[usize], params: &MergeParams) -> Result<MergedDelta, EvalError> {
        let inputs: Vec<MergeInput<'_>> = subset
            .iter()
            .map(|&t| MergeInput::new(&self.adapters[t]))
            .collect();
        Ok(merge::merge(&inputs, params, &Silent)?)
    }

    /// Accuracy of each task in `tasks` on its examples of `set`, knowing the task.
    fn accuracy(
        &self,
        set: &EvalSet,
        emb: &Embeddings,
        tasks: &[usize],
    ) -> Result<Vec<f64>, EvalError> {
        tasks
            .iter()
            .map(|&t| {
                let rows: Vec<usize> = (0..set.len()).filter(|&i| set.task[i] == t).collect();
                let scores: Vec<Vec<f32>> = rows
                    .iter()
                    .map(|&i| self.heads[t].iter().map(|h| dot(&emb[i], h)).collect())
                    .collect();
                let gold: Vec<usize> = rows.iter().map(|&i| set.label[i]).collect();
                accuracy(&scores, &gold)
            })
            .collect()
    }

    /// Scores over the union of every task's labels, and each text's gold joint index.
    fn joint_scores(&self, set: &EvalSet, emb: &Embeddings) -> (Vec<Vec<f32>>, Vec<usize>) {
        let scores = emb
            .iter()
            .map(|e| self.heads.iter().flatten().map(|h| dot(e, h)).collect())
            .collect();
        let gold = (0..set.len())
            .map(|i| {
                self.joint
                    .index(set.task[i], set.label[i])
                    .unwrap_or(usize::MAX)
            })
            .collect();
        (scores, gold)
    }

    fn hits(scores: &[Vec<f32>], gold: &[usize]) -> Result<Hits, EvalError> {
        let h = hits_at(scores, gold, &[1, 3, 5])?;
        Ok(Hits {
            at1: h[0],
            at3: h[1],
            at5: h[2],
        })
    }

    /// Mean normalised accuracy of the merge of `subset` on `set`.
    fn merged_score(
        &self,
        set: &EvalSet,
        subset: &[usize],
        params: &MergeParams,
        individual: &[f64],
    ) -> Result<f64, EvalError> {
        let emb = self.embed(set, Some(&self.merge(subset, params)?))?;
        let accuracy = self.accuracy(set, &emb, subset)?;
        let own: Vec<f64> = subset.iter().map(|&t| individual[t]).collect();
        Ok(normalized_accuracy(&accuracy, &own)?.mean)
    }

    /// Runs the whole protocol.
    pub fn run(&self, settings: &BenchSettings) -> Result<Report, EvalError> {
        let started = Instant::now();
        let n = self.tasks.len();
        let all: Vec<usize> = (0..n).collect();
        let test = EvalSet::new(self.tasks, &all, |t| &t.splits.test, settings.test_per_task);
        let val = EvalSet::new(
            self.tasks,
            &all,
            |t| &t.splits.val,
            settings.search_per_task,
        );
        let (small, small_rows) = test.prefix(settings.scaling_per_task);

        self.progress.start("individual", 2 * n as u64);
        let mut individual = Vec::with_capacity(n);
        let mut individual_val = Vec::with_capacity(n);
        let mut individual_small = Vec::with_capacity(n);
        let mut per_adapter_joint = Vec::with_capacity(n);
        for t in 0..n {
            let delta = self.adapters[t].delta();
            let emb_test = self.embed(&test, Some(&delta))?;
            individual.push(self.accuracy(&test, &emb_test, &[t])?[0]);
            per_adapter_joint.push(self.joint_scores(&test, &emb_test).0);
            let emb = self.embed(&val, Some(&delta))?;
            individual_val.push(self.accuracy(&val, &emb, &[t])?[0]);
            let emb: Embeddings = small_rows.iter().map(|&i| emb_test[i].clone()).collect();
            individual_small.push(self.accuracy(&small, &emb, &[t])?[0]);
        }
        for sub in [&mut individual_val, &mut individual_small] {
            stand_in_for_zeros(sub, &individual);
        }
        let gold = self.joint_scores(&test, &vec![Vec::new(); test.len()]).1;
        let ensemble = ensemble_max(&per_adapter_joint)?;
        let ensemble_joint = Some(Self::hits(&ensemble, &gold)?);

        let mut methods = Vec::with_capacity(settings.methods.len());
        for &method in &settings.methods {
            methods.push(self.method(
                method,
                settings,
                &test,
                &val,
                &individual,
                &individual_val,
            )?);
        }
        let scaling = self.scaling(settings, &methods, &individual_small)?;
        Ok(Report {
            tasks: self.tasks.iter().map(|t| t.name.clone()).collect(),
            individual,
            test_counts: (0..n)
                .map(|t| test.task.iter().filter(|&&x| x == t).count())
                .collect(),
            methods,
            ensemble_joint,
            scaling,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Searches `method`'s parameters on validation, then scores them on test.
    fn method(
        &self,
        method: Method,
        settings: &BenchSettings,
        test: &EvalSet,
        val: &EvalSet,
        individual: &[f64],
        individual_val: &[f64],
    ) -> Result<MethodResult, EvalError> {
        let all: Vec<usize> = (0..self.tasks.len()).collect();
        self.progress
            .start(method.as_str(), settings.grid.points(method) + 1);
        let outcome = greedy_search(method, &settings.grid, |params| {
            self.merged_score(val, &all, params, individual_val)
        })?;
        let emb = self.embed(test, Some(&self.merge(&all, &outcome.best)?))?;
        let accuracy = self.accuracy(test, &emb, &all)?;
        let normalized = normalized_accuracy(&accuracy, individual)?;
        let (scores, gold) = self.joint_scores(test, &emb);
        Ok(MethodResult {
            method: method.as_str().to_string(),
            params: (&outcome.best).into(),
            accuracy,
            normalized,
            joint: Self::hits(&scores, &gold)?,
        })
    }

    /// Normalised accuracy of merges of k tasks, over random k-task combinations, with each
    /// method's searched parameters, on the first `scaling_per_task` test examples of each merged
    /// task (`individual` is measured on the same examples).
    fn scaling(
        &self,
        settings: &BenchSettings,
        methods: &[MethodResult],
        individual: &[f64],
    ) -> Result<Vec<ScalingSeries>, EvalError> {
        let n = self.tasks.len();
        let ks: Vec<usize> = settings
            .scaling_ks
            .iter()
            .copied()
            .filter(|&k| (2..=n).contains(&k))
            .collect();
        let combos: Vec<(usize, Vec<Vec<usize>>)> = ks
            .iter()
            .map(|&k| {
                (
                    k,
                    combinations(
                        n,
                        k,
                        settings.scaling_combinations,
                        settings.seed ^ k as u64,
                    ),
                )
            })
            .collect();
        let total: usize = combos.iter().map(|(_, c)| c.len()).sum::<usize>() * methods.len();
        self.progress.start("scaling", total as u64);
        let mut series = Vec::with_capacity(methods.len());
        for (m, result) in settings.methods.iter().zip(methods) {
            let p = result.params;
            let options = merge::MergeOptions {
                lambda: Some(p.lambda),
                density: Some(p.density),
                dare_p: Some(p.dare_p),
                seed: Some(p.seed),
                isotropize: Some(p.isotropize),
                common_fraction: Some(p.common_fraction),
            };
            let params = MergeParams::new(*m, options)?;
            let mut points = Vec::with_capacity(combos.len());
            for (k, sets) in &combos {
                let values = sets
                    .iter()
                    .map(|subset| {
                        let set = EvalSet::new(
                            self.tasks,
                            subset,
                            |t| &t.splits.test,
                            settings.scaling_per_task,
                        );
                        self.merged_score(&set, subset, &params, individual)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                points.push(ScalingPoint {
                    k: *k,
                    normalized: mean_ci95(&values)?,
                });
            }
            series.push(ScalingSeries {
                method: result.method.clone(),
                points,
            });
        }
        Ok(series)
    }
}
