//! The benchmark's metrics, as pure functions of score matrices: accuracy, Hits@k, accuracy
//! normalised by the individual adapters, the joint label space over all tasks, and the
//! ensemble baseline.
//!
//! Step in the data flow: after a model (merged or individual) has scored every test example
//! against the candidate labels; the report formats what these return.
//!
//! Ties: a label tied with the gold label's score is ordered at random, and the metrics return
//! the *expected* value over that random order. With `g` labels scoring strictly higher and `t`
//! other labels tied with the gold one, Hits@k = clamp((k − g) / (t + 1), 0, 1). A model that
//! scores every label equally thus gets exactly chance accuracy, never full credit.

use super::EvalError;

/// Expected Hits@k of one example: `scores` over all candidate labels, `gold` the right one.
pub fn hit_at_k(scores: &[f32], gold: usize, k: usize) -> Result<f64, EvalError> {
    let Some(&g_score) = scores.get(gold) else {
        let reason = format!("gold label {gold} outside {} scores", scores.len());
        return Err(EvalError::metric("hits@k", reason));
    };
    if scores.iter().any(|s| s.is_nan()) {
        return Err(EvalError::metric("hits@k", "a score is NaN"));
    }
    let greater = scores.iter().filter(|&&s| s > g_score).count();
    let tied = scores.iter().filter(|&&s| s == g_score).count() - 1;
    let hit = (k as f64 - greater as f64) / (tied as f64 + 1.0);
    Ok(hit.clamp(0.0, 1.0))
}

/// Mean expected Hits@k over examples, for each k in `ks`.
pub fn hits_at(scores: &[Vec<f32>], gold: &[usize], ks: &[usize]) -> Result<Vec<f64>, EvalError> {
    if scores.len() != gold.len() {
        let reason = format!("{} score rows but {} labels", scores.len(), gold.len());
        return Err(EvalError::metric("hits@k", reason));
    }
    if scores.is_empty() {
        return Err(EvalError::metric("hits@k", "no examples"));
    }
    ks.iter()
        .map(|&k| {
            let mut total = 0.0;
            for (row, &g) in scores.iter().zip(gold) {
                total += hit_at_k(row, g, k)?;
            }
            Ok(total / scores.len() as f64)
        })
        .collect()
}

/// Accuracy: expected Hits@1 (ties with the gold label share the credit).
pub fn accuracy(scores: &[Vec<f32>], gold: &[usize]) -> Result<f64, EvalError> {
    Ok(hits_at(scores, gold, &[1])?[0])
}

/// Per-task accuracies normalised by the individual (fine-tuned) adapters' accuracies, and their
/// mean over tasks: the paper's per-task metric.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Normalized {
    pub per_task: Vec<f64>,
    pub mean: f64,
}

/// `merged[t] / individual[t]` for every task `t`, and the mean of those ratios.
pub fn normalized_accuracy(merged: &[f64], individual: &[f64]) -> Result<Normalized, EvalError> {
    if merged.len() != individual.len() || merged.is_empty() {
        let reason = format!(
            "{} merged accuracies for {} individual ones",
            merged.len(),
            individual.len()
        );
        return Err(EvalError::metric("normalized accuracy", reason));
    }
    if let Some(bad) = individual.iter().find(|&&a| !(a > 0.0 && a <= 1.0)) {
        let reason = format!("individual accuracy {bad} is not in (0, 1]");
        return Err(EvalError::metric("normalized accuracy", reason));
    }
    let per_task: Vec<f64> = merged.iter().zip(individual).map(|(m, i)| m / i).collect();
    let mean = per_task.iter().sum::<f64>() / per_task.len() as f64;
    Ok(Normalized { per_task, mean })
}

/// The joint label space: the union of every task's classes, each a (task, class) pair, so the
/// same label text in two tasks stays two labels. Joint index order: task by task, class by
/// class.
#[derive(Debug, Clone, PartialEq)]
pub struct JointLabels {
    labels: Vec<(usize, usize)>,
    offsets: Vec<usize>,
}

impl JointLabels {
    /// Builds the space from each task's number of classes.
    pub fn new(classes_per_task: &[usize]) -> Self {
        let mut labels = Vec::new();
        let mut offsets = Vec::with_capacity(classes_per_task.len());
        for (task, &n) in classes_per_task.iter().enumerate() {
            offsets.push(labels.len());
            labels.extend((0..n).map(|class| (task, class)));
        }
        Self { labels, offsets }
    }

    /// Number of joint labels.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The (task, class) pair of joint label `index`.
    pub fn label(&self, index: usize) -> Option<(usize, usize)> {
        self.labels.get(index).copied()
    }

    /// The joint index of `class` of `task`.
    pub fn index(&self, task: usize, class: usize) -> Option<usize> {
        let offset = *self.offsets.get(task)?;
        let end = self
            .offsets
            .get(task + 1)
            .copied()
            .unwrap_or(self.labels.len());
        (offset + class < end).then_some(offset + class)
    }
}

/// The ensemble baseline's scores: for every example and label, the best score any individual
/// adapter gives it. `per_adapter[a][example][label]`.
pub fn ensemble_max(per_adapter: &[Vec<Vec<f32>>]) -> Result<Vec<Vec<f32>>, EvalError> {
    let Some((first, rest)) = per_adapter.split_first() else {
        return Err(EvalError::metric("ensemble", "no adapters"));
    };
    let mut best = first.clone();
    for scores in rest {
        let same_shape =
            scores.len() == best.len() && scores.iter().zip(&best).all(|(a, b)| a.len() == b.len());
        if !same_shape {
            return Err(EvalError::metric(
                "ensemble",
                "adapters scored different shapes",
            ));
        }
        for (best_row, row) in best.iter_mut().zip(scores) {
            for (b, &s) in best_row.iter_mut().zip(row) {
                *b = b.max(s);
            }
        }
    }
    Ok(best)
}
