//! Offline comparison of an experiment's arms on a labelled task of the benchmark suite, with the
//! benchmark's own code: label-word accuracy for generation arms (`labels`), classification
//! accuracy of the arm's task head for encoder arms. A team can compare a merged set with the
//! single adapters before sending it traffic.

use std::sync::Arc;

use serde_json::{Value, json};

use super::auth::Caller;
use super::backend::{BaseKind, LabelScore};
use super::call::{ModelRequest, admit};
use super::error::ApiError;
use super::experiments::Experiment;
use super::resolve::Target;
use super::routes::encode::heads;
use super::state::AppState;
use crate::eval::{Suite, TaskDef, default_paths, load_task};
use crate::labels::Example;

/// The most test examples one evaluation may score per arm.
pub const MAX_EXAMPLES: usize = 500;

/// A task's test examples, from the suite's cached data (`make data`).
fn task_examples(task: &str, n: usize) -> Result<(TaskDef, Vec<Example>), ApiError> {
    let (suite_path, cache) = default_paths();
    let unavailable = |e: crate::eval::EvalError| {
        ApiError::bad(
            "task",
            format!("the benchmark data is not available here (`make data`): {e}"),
        )
    };
    let suite = Suite::load(&suite_path).map_err(unavailable)?;
    let def = suite.task(task).cloned().ok_or_else(|| {
        let names: Vec<&str> = suite.tasks.iter().map(|t| t.name.as_str()).collect();
        ApiError::bad(
            "task",
            format!("unknown task {task:?} (tasks: {})", names.join(", ")),
        )
    })?;
    let data = load_task(&suite, &def, &cache, true).map_err(unavailable)?;
    let examples: Vec<Example> = data.splits.test.into_iter().take(n).collect();
    if examples.is_empty() {
        return Err(ApiError::bad(
            "task",
            format!("task {task} has no test examples"),
        ));
    }
    Ok((def, examples))
}

/// Every arm of `e` scored on `n` test examples of `task`.
pub async fn evaluate(
    state: &AppState,
    e: &Experiment,
    task: &str,
    n: usize,
) -> Result<Value, ApiError> {
    if !(1..=MAX_EXAMPLES).contains(&n) {
        return Err(ApiError::bad(
            "examples",
            format!("must be in [1, {MAX_EXAMPLES}], got {n}"),
        ));
    }
    let task = task.to_string();
    let (def, examples) = tokio::task::spawn_blocking(move || task_examples(&task, n))
        .await
        .map_err(|e| ApiError::internal(format!("loading the task failed: {e}")))??;
    let (def, examples) = (Arc::new(def), Arc::new(examples));
    // Arms are scored as their owner sees them, like the traffic they get.
    let owner = Caller::owner(&e.owner);
    let mut arms = Vec::new();
    for arm in &e.arms {
        let req = ModelRequest::parse(&arm.model, Some(arm.merge.clone()))?;
        let admitted = admit(state, &owner, &req, None, None).await?;
        let kind = state.base(&admitted.target.base).map(|b| b.kind);
        let (metric, accuracy) =
            score(state, &admitted.target, kind, def.clone(), examples.clone()).await?;
        let se = (accuracy * (1.0 - accuracy) / examples.len() as f64).sqrt();
        arms.push(
            json!({"name": arm.name, "model": arm.model, "metric": metric,
                         "accuracy": accuracy, "standard_error": se}),
        );
    }
    Ok(json!({"experiment": e.name, "task": def.name, "examples": examples.len(), "arms": arms}))
}

/// One arm's accuracy on the examples: the metric's name and its value.
async fn score(
    state: &AppState,
    target: &Target,
    kind: Option<BaseKind>,
    def: Arc<TaskDef>,
    examples: Arc<Vec<Example>>,
) -> Result<(&'static str, f64), ApiError> {
    let backend = state.backend.clone();
    let (base, delta) = (target.base.clone(), target.delta.clone());
    match kind {
        Some(BaseKind::Generator) => {
            let words: Vec<String> = def.classes.iter().map(|c| c.label_word.clone()).collect();
            let accuracy = tokio::task::spawn_blocking(move || {
                backend.label_word_accuracy(&base, delta.as_ref(), &def.prompt, &words, &examples)
            })
            .await
            .map_err(|e| ApiError::internal(format!("evaluation failed: {e}")))??;
            Ok(("label_word_accuracy", accuracy))
        }
        Some(BaseKind::Encoder) => {
            let heads = heads(&target.adapters, Some(&def.name))?;
            let deadline = std::time::Instant::now() + state.limits.request_timeout;
            let accuracy = tokio::task::spawn_blocking(move || {
                let texts: Vec<String> = examples.iter().map(|e| e.text.clone()).collect();
                let scores = backend.classify(&base, &texts, &heads, delta.as_ref(), deadline)?;
                Ok::<_, super::backend::BackendError>(classification_accuracy(
                    &def, &examples, &scores,
                ))
            })
            .await
            .map_err(|e| ApiError::internal(format!("evaluation failed: {e}")))??;
            Ok(("classification_accuracy", accuracy))
        }
        None => Err(ApiError::internal(format!(
            "base {} is not served",
            target.base
        ))),
    }
}

/// Fraction of examples whose best-scoring label is the gold class's name.
fn classification_accuracy(def: &TaskDef, examples: &[Example], scores: &[Vec<LabelScore>]) -> f64 {
    let correct = examples
        .iter()
        .zip(scores)
        .filter(|(e, s)| {
            let best = s.iter().max_by(|a, b| a.score.total_cmp(&b.score));
            best.is_some_and(|b| def.classes.get(e.label).is_some_and(|c| c.name == b.label))
        })
        .count();
    correct as f64 / examples.len().max(1) as f64
}
