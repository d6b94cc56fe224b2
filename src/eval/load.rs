//! Turns a task definition and the data cache into ready-to-use splits: read the raw records,
//! map their keys to classes, clean the texts, drop short ones, deduplicate, split.
//!
//! Step in the data flow: between the suite definition and training/evaluation; `knots data`
//! prints what this produces.

use std::path::Path;

use super::EvalError;
use super::sources::read_records;
use super::split::{Example, Splits, cap, dedup, split};
use super::suite::{Suite, TaskDef};
use super::text::{TextRules, clean};

/// One task's classes and splits, ready for training and evaluation.
#[derive(Debug, Clone)]
pub struct TaskData {
    pub name: String,
    pub classes: Vec<String>,
    pub splits: Splits,
    /// Records whose cleaned text was shorter than the suite's `min_chars`.
    pub dropped_short: usize,
    /// Records dropped as longer than `max_chars` (tasks with `drop_long`).
    pub dropped_long: usize,
    /// Texts dropped because they appeared with two different classes.
    pub dropped_ambiguous: usize,
    /// Examples per class after deduplication, before the caps.
    pub available: Vec<usize>,
}

impl TaskData {
    /// (train, val, test) counts of class `class`.
    pub fn class_counts(&self, class: usize) -> (usize, usize, usize) {
        let count = |s: &[Example]| s.iter().filter(|e| e.label == class).count();
        (
            count(&self.splits.train),
            count(&self.splits.val),
            count(&self.splits.test),
        )
    }
}

/// Reads, cleans and splits one task of `suite` from the cache at `cache`; `quick` caps the
/// full splits to the suite's `quick_caps` (subsets of the full splits).
pub fn load_task(
    suite: &Suite,
    task: &TaskDef,
    cache: &Path,
    quick: bool,
) -> Result<TaskData, EvalError> {
    let rules = task.text_rules(suite);
    let uncut = TextRules {
        max_chars: usize::MAX,
        ..rules
    };
    let mut examples = Vec::new();
    let (mut dropped_short, mut dropped_long) = (0, 0);
    for record in read_records(task, cache)? {
        let Some(label) = task
            .classes
            .iter()
            .position(|c| c.keys.contains(&record.key))
        else {
            continue;
        };
        let text = clean(&record.text, if task.drop_long { uncut } else { rules });
        let chars = text.chars().count();
        if chars < suite.min_chars {
            dropped_short += 1;
            continue;
        }
        if chars > rules.max_chars {
            dropped_long += 1;
            continue;
        }
        examples.push(Example { text, label });
    }
    let (examples, dropped_ambiguous) = dedup(examples);
    let mut available = vec![0; task.classes.len()];
    for e in &examples {
        available[e.label] += 1;
    }
    if let Some(empty) = available.iter().position(|&n| n == 0) {
        let class = &task.classes[empty].name;
        return Err(EvalError::task(
            &task.name,
            format!("class {class} has no examples"),
        ));
    }
    let n_classes = task.classes.len();
    let mut splits = split(examples, n_classes, suite.caps, suite.seed, &task.name);
    if quick {
        splits = cap(splits, n_classes, suite.quick_caps);
    }
    Ok(TaskData {
        name: task.name.clone(),
        classes: task.classes.iter().map(|c| c.name.clone()).collect(),
        splits,
        dropped_short,
        dropped_long,
        dropped_ambiguous,
        available,
    })
}

/// Loads every task of the suite, in suite order.
pub fn load_suite(suite: &Suite, cache: &Path, quick: bool) -> Result<Vec<TaskData>, EvalError> {
    suite
        .tasks
        .iter()
        .map(|t| load_task(suite, t, cache, quick))
        .collect()
}
