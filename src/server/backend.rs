//! The boundary between HTTP and the model engine: what the server asks of a served base model.
//! Routes depend only on this trait, so the API is testable against any implementation.
//! Generation is a submission: the job joins the model's engine queue and its text arrives on a
//! [`GenStream`]; dropping the stream cancels the job. The other calls are synchronous and
//! heavy, and the server makes them from blocking threads.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::engine::EngineStats;
use crate::labels::Example;
use crate::merge::MergedDelta;

/// What a base model is served for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseKind {
    /// Text generation (completions, chat).
    Generator,
    /// Embeddings and classification.
    Encoder,
}

/// A served base model.
#[derive(Debug, Clone)]
pub struct BaseInfo {
    /// The id requests use in `model`.
    pub id: String,
    pub kind: BaseKind,
    /// Tokens of prompt plus completion the model can attend to.
    pub context_length: usize,
    /// Other names adapters may give in `base_model_name_or_path` (an upstream repo id, …).
    pub aliases: Vec<String>,
    /// The files holding its weights; the shared merge store keys on their digest.
    pub weights: Vec<PathBuf>,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    /// Rendered with the model's chat template, with the generation prompt appended.
    Chat(Vec<ChatMessage>),
}

/// Sampling settings, validated by the server.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub max_tokens: usize,
    /// Whether the client gave `max_tokens`: then a prompt plus `max_tokens` beyond the model's
    /// context is an error; the server's default is cut to the room the prompt leaves.
    pub max_tokens_given: bool,
    /// 0 means greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: Option<usize>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub frequency_penalty: f64,
    pub presence_penalty: f64,
    /// Token id and bias.
    pub logit_bias: Vec<(u32, f64)>,
    /// Report each token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
}

/// A generation request for the engine.
#[derive(Debug, Clone)]
pub struct GenerateJob {
    pub base: String,
    pub prompt: Prompt,
    pub sampling: Sampling,
    /// The update to apply (a merged set or one adapter); `None` for the base model.
    pub delta: Option<Arc<MergedDelta>>,
    /// Fairness key of the engine's queue.
    pub tenant: String,
    /// The request's `model` string, reported in the running/waiting metrics.
    pub label: String,
    /// When the request's time is up, wherever it is (queued, prefilling or decoding).
    pub deadline: Instant,
}

/// What a generation produces, in order: text pieces, then one `Done` or `Failed`.
#[derive(Debug)]
pub enum GenEvent {
    Text(Piece),
    Done(Finished),
    Failed(BackendError),
}

/// Text made final by one generated token (or, last, text held back until the end), with the
/// token's log-probabilities when the request asked for them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Piece {
    pub text: String,
    pub logprob: Option<TokenLogprobs>,
}

/// A token as text, its log-probability and the most likely alternatives (best first).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// The events of one generation; dropping it cancels the generation.
pub type GenStream = mpsc::UnboundedReceiver<GenEvent>;

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub finish_reason: FinishReason,
}

/// A classification head of one task.
#[derive(Debug, Clone)]
pub struct TaskHead {
    pub task: String,
    /// Class names, reported in scores.
    pub labels: Vec<String>,
    /// Text embedded per class by label-text heads (same order as `labels`).
    pub label_texts: Vec<String>,
    /// A trained linear classifier over the pooled output (`labels × hidden` weights and bias),
    /// or `None` to score normalised label-text embeddings by scaled cosine.
    pub classifier: Option<(Vec<f32>, Vec<f32>)>,
}

/// The score of one (task, label).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LabelScore {
    pub task: String,
    pub label: String,
    pub score: f32,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The input cannot be served (e.g. a prompt longer than the context).
    #[error("{message}")]
    InvalidInput {
        param: &'static str,
        message: String,
    },
    /// The consumer went away and generation stopped.
    #[error("cancelled")]
    Cancelled,
    /// The model's queue is full: retry later.
    #[error("{0}")]
    Overloaded(String),
    /// The request's deadline passed.
    #[error("deadline passed")]
    Timeout,
    #[error("{0}")]
    Failed(String),
}

/// A served base model (or several) behind one interface.
pub trait Backend: Send + Sync + 'static {
    fn bases(&self) -> Vec<BaseInfo>;

    /// Queues a generation (tokenizing its prompt and preparing its delta) and returns its
    /// stream; fails at once, with [`BackendError::Overloaded`], when the model's queue is full.
    fn generate(&self, job: GenerateJob) -> Result<GenStream, BackendError>;

    /// The engine state of each generation model, by base id (for metrics).
    fn engine_stats(&self) -> Vec<(String, EngineStats)> {
        Vec::new()
    }

    /// Bytes the backend holds for `delta` once it has served it (its converted copy), which
    /// count against the merge cache's budget beside the delta itself.
    fn converted_bytes(&self, _delta: &MergedDelta) -> usize {
        0
    }

    /// Frees what the backend holds for deltas nobody holds any more (evicted merges).
    fn release_unused(&self) {}

    /// Where the dense merge methods run their tensor work (`--merge-device`); `None`: the host.
    fn merge_device(&self) -> Option<candle_core::Device> {
        None
    }

    /// Normalised embeddings of `inputs`, and the number of tokens read; not run, and a
    /// timeout, once `deadline` has passed.
    fn embed(
        &self,
        base: &str,
        inputs: &[String],
        delta: Option<&Arc<MergedDelta>>,
        deadline: Instant,
    ) -> Result<(Vec<Vec<f32>>, usize), BackendError>;

    /// Label-word accuracy of a generation base under `delta`: the fraction of `examples` whose
    /// gold class's label word (its first token) scores highest among `label_words` at the
    /// answer position of `prompt` (`{text}` replaced by the example) in the chat template.
    fn label_word_accuracy(
        &self,
        base: &str,
        delta: Option<&Arc<MergedDelta>>,
        prompt: &str,
        label_words: &[String],
        examples: &[Example],
    ) -> Result<f64, BackendError> {
        let _ = (delta, prompt, label_words, examples);
        Err(BackendError::Failed(format!(
            "{base}: this backend does not score label words"
        )))
    }

    /// Scores of every label of every head, per input.
    fn classify(
        &self,
        base: &str,
        inputs: &[String],
        heads: &[TaskHead],
        delta: Option<&Arc<MergedDelta>>,
        deadline: Instant,
    ) -> Result<Vec<Vec<LabelScore>>, BackendError>;
}
