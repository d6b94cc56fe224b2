//! The paper's language setting on the suite: each task's causal-LM adapter (`<task>-lm`, from
//! `knots train --causal`) answers an instruction-style prompt with a label word. A merge of
//! those adapters is scored per task by label-word accuracy (the gold word's first token
//! outranks the task's other label words at the answer position), normalised by each adapter's
//! own accuracy; the base model's accuracy is reported beside it.
//!
//! Step in the data flow: `knots eval` runs it after the encoder benchmark ([`super::Bench`])
//! when the adapter directory holds causal adapters for at least two of the selected tasks. The
//! same greedy search picks each method's parameters on the validation split.

use std::time::Instant;

use crate::adapters::LoraAdapter;
use crate::engine::{LoadedDelta, TextModel};
use crate::labels::{CausalTask, answer_tokens, label_word_accuracy};
use crate::merge::{self, MergeInput, MergeParams, MergedDelta, Method, Progress, Silent};

use super::bench::{model_error, stand_in_for_zeros};
use super::metrics::normalized_accuracy;
use super::report::{LabelWordMethod, LabelWordReport};
use super::search::{SearchGrid, greedy_search};
use super::{EvalError, Example};

/// How much of the protocol a run does.
#[derive(Debug, Clone)]
pub struct LabelWordSettings {
    pub methods: Vec<Method>,
    pub grid: SearchGrid,
    pub test_per_task: usize,
    pub search_per_task: usize,
}

impl LabelWordSettings {
    /// A causal forward per prompt costs far more than an encoder pass, so the grids are
    /// coarser than the encoder benchmark's: λ and density in {0.4, 0.7, 1.0}, p in {0.2, 0.5}.
    pub fn standard(methods: Vec<Method>) -> Self {
        Self {
            methods,
            grid: SearchGrid {
                lambdas: vec![0.4, 0.7, 1.0],
                densities: vec![0.4, 0.7, 1.0],
                dare_ps: vec![0.2, 0.5],
                dare_seeds: vec![0],
                isotropize: vec![false, true],
                common_fractions: vec![0.6, 0.8],
            },
            test_per_task: 100,
            search_per_task: 12,
        }
    }

    /// For CI: λ ∈ {0.5, 1.0} and the methods' default density and p.
    pub fn quick(methods: Vec<Method>) -> Self {
        Self {
            grid: SearchGrid {
                lambdas: vec![0.5, 1.0],
                densities: vec![0.5],
                dare_ps: vec![0.2],
                dare_seeds: vec![0],
                isotropize: vec![false, true],
                common_fractions: vec![0.8],
            },
            test_per_task: 12,
            search_per_task: 6,
            ..Self::standard(methods)
        }
    }
}

/// One task as the causal benchmark sees it.
pub struct LabelWordTask<'a> {
    pub name: &'a str,
    /// `{text}` is replaced by the example.
    pub prompt: &'a str,
    pub label_words: Vec<String>,
    pub val: &'a [Example],
    pub test: &'a [Example],
    /// The task's own causal adapter.
    pub adapter: &'a LoraAdapter,
}

impl LabelWordTask<'_> {
    fn causal(&self) -> CausalTask<'_> {
        CausalTask {
            task: self.name,
            prompt: self.prompt,
            label_words: &self.label_words,
            train: &[],
            val: self.val,
        }
    }
}

/// The causal base model and its tasks.
pub struct LabelWordBench<'a> {
    model: &'a TextModel,
    tasks: &'a [LabelWordTask<'a>],
    /// Per task, the first token of each label word.
    answers: Vec<Vec<u32>>,
    progress: &'a dyn Progress,
}

/// Validation or test examples of one task.
#[derive(Clone, Copy)]
enum Split {
    Val(usize),
    Test(usize),
}

impl<'a> LabelWordBench<'a> {
    pub fn new(
        model: &'a TextModel,
        tasks: &'a [LabelWordTask<'a>],
        progress: &'a dyn Progress,
    ) -> Result<Self, EvalError> {
        if tasks.len() < 2 {
            return Err(EvalError::metric(
                "label words",
                "merging needs the causal adapters of at least 2 tasks",
            ));
        }
        let answers = tasks
            .iter()
            .map(|t| answer_tokens(model, &t.label_words))
            .collect::<Result<Vec<_>, _>>()
            .map_err(model_error)?;
        Ok(Self {
            model,
            tasks,
            answers,
            progress,
        })
    }

    /// Label-word accuracy of every task under `delta` (`None`: the base model).
    fn accuracies(&self, delta: Option<&MergedDelta>, split: Split) -> Result<Vec<f64>, EvalError> {
        let loaded = self.load(delta)?;
        (0..self.tasks.len())
            .map(|t| self.accuracy(t, loaded.as_ref(), split))
            .collect()
    }

    fn load(&self, delta: Option<&MergedDelta>) -> Result<Option<LoadedDelta>, EvalError> {
        let registry = self.model.model.registry();
        delta
            .map(|d| registry.convert(d, self.model.model.device()))
            .transpose()
            .map_err(model_error)
    }

    fn accuracy(
        &self,
        t: usize,
        delta: Option<&LoadedDelta>,
        split: Split,
    ) -> Result<f64, EvalError> {
        let task = &self.tasks[t];
        let examples = match split {
            Split::Val(cap) => &task.val[..task.val.len().min(cap)],
            Split::Test(cap) => &task.test[..task.test.len().min(cap)],
        };
        let acc = label_word_accuracy(
            self.model,
            &task.causal(),
            &self.answers[t],
            delta,
            examples,
        )
        .map_err(model_error)?;
        self.progress.advance(1);
        Ok(acc)
    }

    fn merge(&self, params: &MergeParams) -> Result<MergedDelta, EvalError> {
        let inputs: Vec<MergeInput<'_>> = self
            .tasks
            .iter()
            .map(|t| MergeInput::new(t.adapter))
            .collect();
        Ok(merge::merge(&inputs, params, &Silent)?)
    }

    /// Base and individual accuracies, then each method's search on validation and its test
    /// accuracy. `base_model` names the model in the report.
    pub fn run(
        &self,
        base_model: &str,
        settings: &LabelWordSettings,
    ) -> Result<LabelWordReport, EvalError> {
        let started = Instant::now();
        let n = self.tasks.len();
        let test = Split::Test(settings.test_per_task);
        let val = Split::Val(settings.search_per_task);
        self.progress
            .start("label words: base and own", 3 * n as u64);
        let base = self.accuracies(None, test)?;
        let mut individual = Vec::with_capacity(n);
        let mut individual_val = Vec::with_capacity(n);
        for (t, task) in self.tasks.iter().enumerate() {
            let own = self.load(Some(&task.adapter.delta()))?;
            individual.push(self.accuracy(t, own.as_ref(), test)?);
            individual_val.push(self.accuracy(t, own.as_ref(), val)?);
        }
        stand_in_for_zeros(&mut individual_val, &individual);
        let mut methods = Vec::with_capacity(settings.methods.len());
        for &method in &settings.methods {
            let points = settings.grid.points(method) + 1;
            self.progress.start(method.as_str(), points * n as u64);
            let outcome = greedy_search(method, &settings.grid, |params| {
                let accuracy = self.accuracies(Some(&self.merge(params)?), val)?;
                Ok(normalized_accuracy(&accuracy, &individual_val)?.mean)
            })?;
            let accuracy = self.accuracies(Some(&self.merge(&outcome.best)?), test)?;
            methods.push(LabelWordMethod {
                method: method.as_str().to_string(),
                params: (&outcome.best).into(),
                normalized: normalized_accuracy(&accuracy, &individual)?,
                accuracy,
            });
        }
        Ok(LabelWordReport {
            base_model: base_model.to_string(),
            tasks: self.tasks.iter().map(|t| t.name.to_string()).collect(),
            base,
            individual,
            methods,
            test_per_task: settings.test_per_task,
            test_counts: self
                .tasks
                .iter()
                .map(|t| t.test.len().min(settings.test_per_task))
                .collect(),
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}
