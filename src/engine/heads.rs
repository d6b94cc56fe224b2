//! Classification heads on a sentence encoder, per task:
//! - a linear head from an adapter's saved `classifier.*` (PEFT SEQ_CLS `modules_to_save`),
//!   applied to BERT's pooler output as `BertForSequenceClassification` does;
//! - a label-text head: the normalised embeddings of the label texts, logits = scale · cosine
//!   (the paper's zero-shot-style heads).
//!
//! Scoring is per task or joint: joint ranks the union of every task's labels by their logits.

use std::collections::BTreeMap;

use candle_core::Tensor;

use super::bert::mean_pool;
use super::error::{EngineError, Result};
use super::linear::LoadedDelta;
use super::models::Encoder;
use crate::adapters::SavedTensor;

/// Default logit scale of label-text heads (cosine similarities are in [-1, 1]).
pub const DEFAULT_TEXT_SCALE: f32 = 20.0;

#[derive(Debug, Clone)]
enum Kind {
    /// `weight: labels × hidden`, `bias: labels`, on the pooler output.
    Linear {
        weight: Tensor,
        bias: Option<Tensor>,
    },
    /// Normalised label embeddings `labels × hidden`, on mean-pooled embeddings.
    LabelText { embeddings: Tensor, scale: f32 },
}

/// One task's head.
#[derive(Debug, Clone)]
pub struct Head {
    pub task: String,
    pub labels: Vec<String>,
    kind: Kind,
}

fn head_error(message: impl Into<String>) -> EngineError {
    EngineError::Head {
        message: message.into(),
    }
}

impl Head {
    /// The classifier an adapter saved (`classifier.weight` / `.bias`, or `score.*`). PEFT does
    /// not store label names: `labels` names them, else they are `LABEL_0`, `LABEL_1`, ….
    pub fn from_saved(
        task: &str,
        saved: &BTreeMap<String, SavedTensor>,
        labels: Option<Vec<String>>,
        encoder: &Encoder,
    ) -> Result<Self> {
        let (prefix, w) = ["classifier", "score"]
            .iter()
            .find_map(|p| saved.get(&format!("{p}.weight")).map(|w| (*p, w)))
            .ok_or_else(|| {
                head_error(format!(
                    "task {task}: the adapter saved no classifier.weight"
                ))
            })?;
        let hidden = encoder.model.config().hidden_size;
        let [n, h] = w.shape[..] else {
            return Err(head_error(format!(
                "task {task}: classifier weight has shape {:?}",
                w.shape
            )));
        };
        if h != hidden || n == 0 {
            return Err(head_error(format!(
                "task {task}: classifier is {n}×{h}, the encoder has {hidden} features"
            )));
        }
        let device = encoder.model.device();
        let weight = Tensor::from_slice(&w.data, (n, h), device)?;
        let bias = match saved.get(&format!("{prefix}.bias")) {
            Some(b) if b.data.len() == n => Some(Tensor::from_slice(&b.data, n, device)?),
            Some(b) => {
                return Err(head_error(format!(
                    "task {task}: bias has shape {:?}",
                    b.shape
                )));
            }
            None => None,
        };
        let labels = labels.unwrap_or_else(|| (0..n).map(|i| format!("LABEL_{i}")).collect());
        if labels.len() != n {
            return Err(head_error(format!(
                "task {task}: {} label names for {n} classes",
                labels.len()
            )));
        }
        Ok(Self {
            task: task.to_string(),
            labels,
            kind: Kind::Linear { weight, bias },
        })
    }

    /// A head from label texts, embedded by the base encoder and normalised. The head is
    /// frozen: adapters are trained against these base embeddings (`knots train`), so an
    /// adapter or merged set changes the texts' side only, as in the KnOTS paper's protocol.
    pub fn from_label_texts(
        task: &str,
        labels: Vec<String>,
        scale: f32,
        encoder: &Encoder,
    ) -> Result<Self> {
        if labels.is_empty() {
            return Err(EngineError::EmptyInput { what: "labels" });
        }
        let texts: Vec<&str> = labels.iter().map(String::as_str).collect();
        let embeddings = encoder.embed(&texts, None)?;
        Ok(Self {
            task: task.to_string(),
            labels,
            kind: Kind::LabelText { embeddings, scale },
        })
    }
}

/// Which labels to rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Task(String),
    /// The union of every head's labels.
    Joint,
}

/// One ranked label.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub task: String,
    pub label: String,
    pub logit: f32,
    /// Softmax over the labels in scope.
    pub score: f32,
}

/// What heads read of a batch of texts: mean-pooled normalised embeddings `(texts, hidden)` and,
/// for trained classifiers, BERT's pooler output.
#[derive(Debug, Clone)]
pub struct Features {
    pub mean: Tensor,
    pub pooled: Option<Tensor>,
}

impl Features {
    /// Runs the encoder over `texts` with `delta` (the pooler only when `pooled`).
    pub fn compute(
        encoder: &Encoder,
        texts: &[&str],
        delta: Option<&LoadedDelta>,
        pooled: bool,
    ) -> Result<Self> {
        let batch = encoder.model.batch(&encoder.encode(texts)?)?;
        let hidden = encoder.model.hidden(&batch, delta)?;
        Ok(Self {
            mean: mean_pool(&hidden, &batch)?,
            pooled: if pooled {
                Some(encoder.model.pool_cls(&hidden, delta)?)
            } else {
                None
            },
        })
    }
}

/// Whether any of `heads` reads the pooler output.
pub fn needs_pooled<'a>(heads: impl IntoIterator<Item = &'a Head>) -> bool {
    heads
        .into_iter()
        .any(|h| matches!(h.kind, Kind::Linear { .. }))
}

/// Logits of each text for each head, `heads × (texts × labels)`.
pub fn head_logits(
    encoder: &Encoder,
    heads: &[&Head],
    texts: &[&str],
    delta: Option<&LoadedDelta>,
) -> Result<Vec<Vec<Vec<f32>>>> {
    let pooled = needs_pooled(heads.iter().copied());
    logits_of(heads, &Features::compute(encoder, texts, delta, pooled)?)
}

fn logits_of(heads: &[&Head], features: &Features) -> Result<Vec<Vec<Vec<f32>>>> {
    heads
        .iter()
        .map(|head| {
            let logits = match &head.kind {
                Kind::Linear { weight, bias } => {
                    let x = features
                        .pooled
                        .as_ref()
                        .ok_or(EngineError::EmptyInput { what: "pooled" })?;
                    let y = x.matmul(&weight.t()?)?;
                    match bias {
                        Some(b) => y.broadcast_add(b)?,
                        None => y,
                    }
                }
                Kind::LabelText { embeddings, scale } => {
                    (features.mean.matmul(&embeddings.t()?)? * f64::from(*scale))?
                }
            };
            Ok(logits.to_vec2::<f32>()?)
        })
        .collect()
}

/// Ranks the labels in `scope` for each text; `top_k` entries per text, best first.
pub fn classify(
    encoder: &Encoder,
    heads: &[Head],
    scope: &Scope,
    texts: &[&str],
    delta: Option<&LoadedDelta>,
    top_k: usize,
) -> Result<Vec<Vec<Scored>>> {
    let chosen: Vec<&Head> = match scope {
        Scope::Joint => heads.iter().collect(),
        Scope::Task(t) => heads.iter().filter(|h| &h.task == t).collect(),
    };
    if chosen.is_empty() {
        return Err(head_error(format!("no head for {scope:?}")));
    }
    let pooled = needs_pooled(chosen.iter().copied());
    let features = Features::compute(encoder, texts, delta, pooled)?;
    rank(&chosen, &features, top_k)
}

/// Ranks the labels of every head for each text of `features`; `top_k` per text, best first.
pub fn rank(heads: &[&Head], features: &Features, top_k: usize) -> Result<Vec<Vec<Scored>>> {
    let chosen = heads;
    let texts = features.mean.dim(0)?;
    let logits = logits_of(chosen, features)?;
    let ranked = (0..texts)
        .map(|i| {
            let mut all: Vec<Scored> = chosen
                .iter()
                .zip(&logits)
                .flat_map(|(head, per_text)| {
                    head.labels
                        .iter()
                        .zip(&per_text[i])
                        .map(|(label, &logit)| Scored {
                            task: head.task.clone(),
                            label: label.clone(),
                            logit,
                            score: 0.0,
                        })
                })
                .collect();
            softmax_scores(&mut all);
            all.sort_by(|a, b| b.logit.total_cmp(&a.logit));
            all.truncate(top_k.max(1));
            all
        })
        .collect();
    Ok(ranked)
}

fn softmax_scores(all: &mut [Scored]) {
    let max = all
        .iter()
        .map(|s| s.logit)
        .fold(f32::NEG_INFINITY, f32::max);
    let total: f32 = all.iter().map(|s| (s.logit - max).exp()).sum();
    for s in all.iter_mut() {
        s.score = (s.logit - max).exp() / total;
    }
}
