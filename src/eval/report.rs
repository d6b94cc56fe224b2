//! The benchmark report: the measured numbers in one serialisable tree, rendered as markdown
//! tables (for the README), JSON (for tools) and an SVG scaling chart ([`super::svg`]).
//!
//! Step in the data flow: last; it formats what the metrics computed and never computes a
//! metric itself.

use std::fmt::Write as _;

use serde::Serialize;

use crate::merge::MergeParams;

use super::metrics::Normalized;
use super::stats::MeanCi;

/// Everything one `knots eval` run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Task names, in the column order of every per-task vector.
    pub tasks: Vec<String>,
    /// Test accuracy of each task's own (fine-tuned) adapter.
    pub individual: Vec<f64>,
    /// Test examples per task (the denominators of every accuracy, for standard errors).
    pub test_counts: Vec<usize>,
    pub methods: Vec<MethodResult>,
    /// Joint Hits@1/3/5 of the ensemble baseline (each label's best individual score).
    pub ensemble_joint: Option<Hits>,
    pub scaling: Vec<ScalingSeries>,
    /// Wall time of the whole run.
    pub seconds: f64,
}

/// Results of one merge method.
#[derive(Debug, Clone, Serialize)]
pub struct MethodResult {
    pub method: String,
    /// The parameters the validation search chose.
    pub params: ParamsRecord,
    /// Test accuracy per task, knowing the task.
    pub accuracy: Vec<f64>,
    pub normalized: Normalized,
    /// Joint evaluation over the union of all tasks' labels.
    pub joint: Hits,
}

/// What the causal benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct LabelWordReport {
    pub base_model: String,
    pub tasks: Vec<String>,
    /// Test label-word accuracy of the base model and of each task's own adapter.
    pub base: Vec<f64>,
    pub individual: Vec<f64>,
    pub methods: Vec<LabelWordMethod>,
    pub test_per_task: usize,
    /// Test prompts per task actually scored.
    pub test_counts: Vec<usize>,
    pub seconds: f64,
}

/// One merge method's result.
#[derive(Debug, Clone, Serialize)]
pub struct LabelWordMethod {
    pub method: String,
    pub params: ParamsRecord,
    pub accuracy: Vec<f64>,
    pub normalized: Normalized,
}

/// Merge parameters as recorded in the report.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ParamsRecord {
    pub lambda: f64,
    pub density: f64,
    pub dare_p: f64,
    pub seed: u64,
    pub isotropize: bool,
    pub common_fraction: f64,
}

impl From<&MergeParams> for ParamsRecord {
    fn from(p: &MergeParams) -> Self {
        Self {
            lambda: p.lambda,
            density: p.density,
            dare_p: p.dare_p,
            seed: p.seed,
            isotropize: p.isotropize,
            common_fraction: p.common_fraction,
        }
    }
}

/// Hits@1, @3 and @5.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Hits {
    pub at1: f64,
    pub at3: f64,
    pub at5: f64,
}

/// One method's normalised accuracy as a function of the number k of merged tasks.
#[derive(Debug, Clone, Serialize)]
pub struct ScalingSeries {
    pub method: String,
    pub points: Vec<ScalingPoint>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct ScalingPoint {
    pub k: usize,
    pub normalized: MeanCi,
}

/// A fraction as a percentage with one decimal.
fn pct(x: f64) -> String {
    format!("{:.1}", 100.0 * x)
}

/// The binomial standard error of an accuracy `p` measured on `n` examples.
fn binomial_se(p: f64, n: usize) -> f64 {
    (p * (1.0 - p) / n.max(1) as f64).sqrt()
}

/// The standard error of the mean over tasks of `accuracy[t] / reference[t]` (the reference
/// taken as fixed; tasks independent).
fn mean_se(accuracy: &[f64], reference: &[f64], counts: &[usize]) -> f64 {
    let sum: f64 = accuracy
        .iter()
        .zip(reference)
        .zip(counts)
        .map(|((&a, &r), &n)| (binomial_se(a, n) / if r > 0.0 { r } else { 1.0 }).powi(2))
        .sum();
    sum.sqrt() / accuracy.len().max(1) as f64
}

/// A method's row of a per-task table: normalised accuracy per task, absolute in parentheses,
/// and the mean with its standard error.
fn method_row(
    md: &mut String,
    name: &str,
    p: &ParamsRecord,
    n: &Normalized,
    accuracy: &[f64],
    reference: &[f64],
    counts: &[usize],
) {
    let cells: Vec<String> = n
        .per_task
        .iter()
        .zip(accuracy)
        .map(|(&n, &a)| format!("{} ({})", pct(n), pct(a)))
        .collect();
    let mut params = format!("λ {} d {} p {}", p.lambda, p.density, p.dare_p);
    if p.isotropize {
        params.push_str(" iso");
    }
    if name == "core-iso-cts" {
        params.push_str(&format!(" f {}", p.common_fraction));
    }
    let _ = writeln!(
        md,
        "| {name} | {params} | {} | {} ± {} |",
        cells.join(" | "),
        pct(n.mean),
        pct(mean_se(accuracy, reference, counts))
    );
}

/// A row of absolute accuracies with their mean and its standard error.
fn absolute_row(md: &mut String, name: &str, accuracy: &[f64], counts: &[usize]) {
    let cells: Vec<String> = accuracy.iter().map(|&a| pct(a)).collect();
    let mean = accuracy.iter().sum::<f64>() / accuracy.len().max(1) as f64;
    let ones = vec![1.0; accuracy.len()];
    let se = mean_se(accuracy, &ones, counts);
    let _ = writeln!(
        md,
        "| {name} | | {} | {} ± {} |",
        cells.join(" | "),
        pct(mean),
        pct(se)
    );
}

impl LabelWordReport {
    /// The per-task table in markdown (percentages).
    pub fn to_markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "Label-word accuracy (%) of merged {} adapters, normalised by each task's own adapter \
             (absolute in parentheses; {} test prompts per task; mean ± standard error)\n",
            self.base_model,
            self.test_counts.iter().max().copied().unwrap_or(0)
        );
        let _ = writeln!(
            md,
            "| method | params | {} | mean |",
            self.tasks.join(" | ")
        );
        let _ = writeln!(md, "|---|---|{}---|", "---|".repeat(self.tasks.len()));
        let counts = &self.test_counts;
        absolute_row(&mut md, "base model (absolute)", &self.base, counts);
        absolute_row(&mut md, "own adapter (absolute)", &self.individual, counts);
        for m in &self.methods {
            let (n, a) = (&m.normalized, &m.accuracy);
            method_row(
                &mut md,
                &m.method,
                &m.params,
                n,
                a,
                &self.individual,
                counts,
            );
        }
        md
    }
}

impl Report {
    /// Pretty-printed JSON.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string_pretty(self)
    }

    /// The per-task, joint and scaling tables in markdown (percentages).
    pub fn to_markdown(&self) -> String {
        let mut md = String::new();
        self.per_task_table(&mut md);
        md.push('\n');
        self.joint_table(&mut md);
        if !self.scaling.is_empty() {
            md.push('\n');
            self.scaling_table(&mut md);
        }
        md
    }

    fn per_task_table(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "Per-task accuracy (%), normalised by each task's fine-tuned adapter (absolute in \
             parentheses; up to {} test examples per task; mean ± standard error)\n",
            self.test_counts.iter().max().copied().unwrap_or(0)
        );
        let _ = writeln!(
            md,
            "| method | params | {} | mean |",
            self.tasks.join(" | ")
        );
        let _ = writeln!(md, "|---|---|{}---|", "---|".repeat(self.tasks.len()));
        let counts = &self.test_counts;
        absolute_row(md, "fine-tuned (absolute)", &self.individual, counts);
        for m in &self.methods {
            let (n, a) = (&m.normalized, &m.accuracy);
            method_row(md, &m.method, &m.params, n, a, &self.individual, counts);
        }
    }

    fn joint_table(&self, md: &mut String) {
        let total: usize = self.test_counts.iter().sum();
        let _ = writeln!(
            md,
            "Joint evaluation over all tasks' labels (%, ± standard error over {total} examples)\n"
        );
        let _ = writeln!(
            md,
            "| method | Hits@1 | Hits@3 | Hits@5 |\n|---|---|---|---|"
        );
        let cell = |p: f64| format!("{} ± {}", pct(p), pct(binomial_se(p, total)));
        let row = |md: &mut String, name: &str, h: &Hits| {
            let _ = writeln!(
                md,
                "| {name} | {} | {} | {} |",
                cell(h.at1),
                cell(h.at3),
                cell(h.at5)
            );
        };
        if let Some(h) = &self.ensemble_joint {
            row(md, "ensemble", h);
        }
        for m in &self.methods {
            row(md, &m.method, &m.joint);
        }
    }

    fn scaling_table(&self, md: &mut String) {
        let mut ks: Vec<usize> = self
            .scaling
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.k))
            .collect();
        ks.sort_unstable();
        ks.dedup();
        let _ = writeln!(
            md,
            "Normalised accuracy (%) of merges of k tasks: mean [95% CI, Student t]\n"
        );
        let header: Vec<String> = ks.iter().map(|k| format!("k = {k}")).collect();
        let _ = writeln!(md, "| method | {} |", header.join(" | "));
        let _ = writeln!(md, "|---|{}", "---|".repeat(ks.len()));
        for s in &self.scaling {
            let cells: Vec<String> = ks
                .iter()
                .map(|k| match s.points.iter().find(|p| p.k == *k) {
                    Some(p) => {
                        let c = p.normalized;
                        format!("{} [{}, {}]", pct(c.mean), pct(c.lo), pct(c.hi))
                    }
                    None => String::new(),
                })
                .collect();
            let _ = writeln!(md, "| {} | {} |", s.method, cells.join(" | "));
        }
    }
}
