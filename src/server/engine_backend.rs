//! The model engine behind the server's [`Backend`] trait: generators (Llama layout), each
//! served by its own [`Engine`] loop, and encoders (BERT), loaded once and shared by every
//! request; a request's delta is converted once per merged set and applied inside the linear
//! layers.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;

use super::backend::{
    Backend, BackendError, BaseInfo, BaseKind, FinishReason, Finished, GenEvent, GenStream,
    GenerateJob, LabelScore, Piece, Prompt, Sampling, TaskHead, TokenLogprobs,
};
use crate::adapters::SavedTensor;
use crate::engine::{
    self, DEFAULT_TEXT_SCALE, Done, EncodeJob, Encoder, EncoderEngine, Engine, EngineError,
    EngineLimits, EngineStats, Features, Head, Job, Message, ModelPath, SamplingParams, Sink,
    TextModel, TextTokenizer, TokenLogprob, WeightFormat,
};
use crate::labels::{self, CausalTask, Example};
use crate::merge::MergedDelta;

/// A generation model and the engine loop that serves it.
struct Generator {
    model: Arc<TextModel>,
    engine: Engine,
}

/// An encoder model, the engine loop that batches its requests, and its label-text heads.
struct EncoderServer {
    encoder: Arc<Encoder>,
    engine: EncoderEngine,
    /// Label-text heads by (task, label texts): built once, not per request.
    text_heads: Mutex<HashMap<(String, Vec<String>), Head>>,
}

enum Model {
    Generator(Generator),
    Encoder(EncoderServer),
}

/// How served models are loaded and run.
#[derive(Debug, Clone, Copy, Default)]
pub struct EngineOptions {
    pub format: WeightFormat,
    pub limits: EngineLimits,
}

/// Every served base model.
pub struct EngineBackend {
    models: Vec<(BaseInfo, Model)>,
    /// Where the dense merges run: the models' GPU by default, `None` (the host) on the CPU.
    merge_device: Option<candle_core::Device>,
}

impl EngineBackend {
    /// Loads each model spec (manifest id, directory, GGUF file or hub repo id) on `device` and
    /// starts an engine loop per generation model.
    pub fn load(
        specs: &[String],
        device: &str,
        options: EngineOptions,
    ) -> Result<Self, EngineError> {
        let device = engine::parse_device(device)?;
        let dir = engine::models_dir();
        let manifest = engine::manifest(&dir)?;
        let mut models = Vec::new();
        for spec in specs {
            let path = engine::resolve(spec, &dir)?;
            let entry = manifest.iter().find(|m| &m.id == spec);
            let id = entry.map_or_else(|| base_id(spec), |m| m.id.clone());
            let aliases: Vec<String> = entry.and_then(|m| m.hf_repo.clone()).into_iter().collect();
            let (kind, model) = if is_encoder(&path) {
                let encoder = Arc::new(Encoder::load_serving(&path, &device)?);
                let engine = EncoderEngine::start(encoder.clone(), options.limits.max_queue);
                let server = EncoderServer {
                    encoder,
                    engine,
                    text_heads: Mutex::new(HashMap::new()),
                };
                (BaseKind::Encoder, Model::Encoder(server))
            } else {
                let model = Arc::new(TextModel::load_serving(&path, &device, options.format)?);
                let engine = Engine::start(model.clone(), options.limits);
                (
                    BaseKind::Generator,
                    Model::Generator(Generator { model, engine }),
                )
            };
            let context_length = match &model {
                Model::Generator(g) => g.model.model.context_length(),
                Model::Encoder(e) => e.encoder.max_tokens,
            };
            let weight_bytes = match &model {
                Model::Generator(g) => g.engine.stats().weight_bytes,
                Model::Encoder(e) => Some(e.engine.weight_bytes()),
            };
            tracing::info!(%id, ?kind, context_length, weight_bytes, "loaded base model");
            models.push((
                BaseInfo {
                    id,
                    kind,
                    context_length,
                    aliases,
                    weights: path.weight_files(),
                },
                model,
            ));
        }
        let merge_device = (!device.is_cpu()).then_some(device);
        Ok(Self {
            models,
            merge_device,
        })
    }

    /// Runs the dense merges on `spec` (`cpu`: the host implementation, `cuda:N`: that GPU)
    /// instead of the models' device.
    pub fn set_merge_device(&mut self, spec: &str) -> Result<(), EngineError> {
        let device = engine::parse_device(spec)?;
        self.merge_device = (!device.is_cpu()).then_some(device);
        Ok(())
    }

    fn model(&self, base: &str) -> Result<&Model, BackendError> {
        self.models
            .iter()
            .find(|(info, _)| info.id == base)
            .map(|(_, m)| m)
            .ok_or_else(|| BackendError::Failed(format!("base {base} is not loaded")))
    }

    fn encoder(&self, base: &str) -> Result<&EncoderServer, BackendError> {
        match self.model(base)? {
            Model::Encoder(e) => Ok(e),
            Model::Generator(_) => Err(BackendError::InvalidInput {
                param: "model",
                message: format!("{base} is not an encoder"),
            }),
        }
    }
}

/// A base id for a spec that is not a manifest id: a hub repo id as is, a path's last name.
fn base_id(spec: &str) -> String {
    let path = Path::new(spec);
    if path.exists() {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        stem.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    } else {
        spec.to_string()
    }
}

/// BERT-family directories are encoders; GGUF files and other layouts generate.
fn is_encoder(path: &ModelPath) -> bool {
    let ModelPath::HfDir(dir) = path else {
        return false;
    };
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap_or_default();
    let value: serde_json::Value = serde_json::from_str(&config).unwrap_or_default();
    matches!(
        value["model_type"].as_str(),
        Some("bert" | "roberta" | "xlm-roberta" | "distilbert")
    )
}

/// The `max_tokens` a job runs with: a requested value the context cannot hold after the prompt
/// is an error naming it (as OpenAI's API and vLLM answer), the server's default is cut to the
/// room left. A prompt that fills the context is left to the engine's prompt check.
fn fit_max_tokens(s: &Sampling, prompt: usize, context: usize) -> Result<usize, BackendError> {
    let room = context.saturating_sub(prompt);
    if room == 0 {
        return Ok(s.max_tokens);
    }
    if !s.max_tokens_given {
        return Ok(s.max_tokens.min(room));
    }
    if s.max_tokens > room {
        return Err(BackendError::InvalidInput {
            param: "max_tokens",
            message: format!(
                "the prompt's {prompt} tokens plus max_tokens {} exceed the model's context of \
                 {context} tokens (at most {room} here)",
                s.max_tokens
            ),
        });
    }
    Ok(s.max_tokens)
}

fn backend_error(e: EngineError) -> BackendError {
    match e {
        EngineError::QueueFull { .. } | EngineError::Stopped => {
            BackendError::Overloaded(e.to_string())
        }
        EngineError::Timeout => BackendError::Timeout,
        EngineError::CacheTooSmall { .. } => BackendError::InvalidInput {
            param: "max_tokens",
            message: e.to_string(),
        },
        EngineError::InvalidParam { name, .. } => BackendError::InvalidInput {
            param: name,
            message: e.to_string(),
        },
        EngineError::PromptTooLong { .. } => BackendError::InvalidInput {
            param: "prompt",
            message: e.to_string(),
        },
        EngineError::EmptyInput { .. } => BackendError::InvalidInput {
            param: "input",
            message: e.to_string(),
        },
        EngineError::Template { .. } => BackendError::InvalidInput {
            param: "messages",
            message: e.to_string(),
        },
        EngineError::UnknownModule { .. } | EngineError::DeltaShape { .. } => {
            BackendError::InvalidInput {
                param: "model",
                message: format!("the adapter does not fit the base model: {e}"),
            }
        }
        other => BackendError::Failed(other.to_string()),
    }
}

impl Backend for EngineBackend {
    fn bases(&self) -> Vec<BaseInfo> {
        self.models.iter().map(|(info, _)| info.clone()).collect()
    }

    fn generate(&self, job: GenerateJob) -> Result<GenStream, BackendError> {
        let Model::Generator(g) = self.model(&job.base)? else {
            return Err(BackendError::InvalidInput {
                param: "model",
                message: format!("{} does not generate", job.base),
            });
        };
        let tm = &g.model;
        let prompt = match &job.prompt {
            Prompt::Text(text) => tm.encode_plain(text),
            Prompt::Chat(messages) => {
                let messages: Vec<Message> = messages
                    .iter()
                    .map(|m| Message {
                        role: m.role.clone(),
                        content: m.content.clone(),
                    })
                    .collect();
                tm.encode_chat(&messages)
            }
        }
        .map_err(backend_error)?;
        let delta = job
            .delta
            .as_ref()
            .map(|d| tm.load_delta(d))
            .transpose()
            .map_err(backend_error)?;
        let s = &job.sampling;
        let params = SamplingParams {
            temperature: s.temperature as f32,
            top_p: s.top_p as f32,
            top_k: s.top_k,
            seed: s.seed,
            max_tokens: fit_max_tokens(s, prompt.len(), tm.model.context_length())?,
            stop: s.stop.clone(),
            frequency_penalty: s.frequency_penalty as f32,
            presence_penalty: s.presence_penalty as f32,
            logit_bias: s.logit_bias.iter().map(|&(id, b)| (id, b as f32)).collect(),
            logprobs: s.logprobs,
        };
        params
            .validate_vocab(tm.tokenizer.vocab_size())
            .map_err(backend_error)?;
        let (tx, rx) = mpsc::unbounded_channel();
        g.engine
            .submit(Job {
                tenant: job.tenant,
                label: job.label,
                prompt,
                params,
                delta,
                deadline: job.deadline,
                sink: Box::new(StreamSink {
                    tx,
                    model: g.model.clone(),
                }),
            })
            .map_err(backend_error)?;
        Ok(rx)
    }

    fn converted_bytes(&self, delta: &MergedDelta) -> usize {
        engine::LinearRegistry::converted_bytes(delta)
    }

    fn merge_device(&self) -> Option<candle_core::Device> {
        self.merge_device.clone()
    }

    fn release_unused(&self) {
        for (_, model) in &self.models {
            match model {
                Model::Generator(g) => g.model.release_unused(),
                Model::Encoder(e) => e.encoder.release_unused(),
            }
        }
    }

    fn engine_stats(&self) -> Vec<(String, EngineStats)> {
        self.models
            .iter()
            .map(|(info, m)| match m {
                Model::Generator(g) => (info.id.clone(), g.engine.stats()),
                Model::Encoder(e) => (
                    info.id.clone(),
                    EngineStats {
                        waiting: e.engine.waiting(),
                        weight_bytes: Some(e.engine.weight_bytes()),
                        ..EngineStats::default()
                    },
                ),
            })
            .collect()
    }

    fn embed(
        &self,
        base: &str,
        inputs: &[String],
        delta: Option<&Arc<MergedDelta>>,
        deadline: Instant,
    ) -> Result<(Vec<Vec<f32>>, usize), BackendError> {
        let server = self.encoder(base)?;
        let (features, tokens) = server
            .features(inputs, delta, false, deadline)
            .map_err(backend_error)?;
        let vectors = features
            .mean
            .to_vec2::<f32>()
            .map_err(|e| backend_error(e.into()))?;
        Ok((vectors, tokens))
    }

    fn label_word_accuracy(
        &self,
        base: &str,
        delta: Option<&Arc<MergedDelta>>,
        prompt: &str,
        label_words: &[String],
        examples: &[Example],
    ) -> Result<f64, BackendError> {
        let Model::Generator(g) = self.model(base)? else {
            return Err(BackendError::InvalidInput {
                param: "model",
                message: format!("{base} does not generate"),
            });
        };
        let tm = &g.model;
        let task = CausalTask {
            task: "evaluate",
            prompt,
            label_words,
            train: &[],
            val: &[],
        };
        let answers = labels::answer_tokens(tm, label_words).map_err(backend_error)?;
        let delta = delta
            .map(|d| tm.load_delta(d))
            .transpose()
            .map_err(backend_error)?;
        labels::label_word_accuracy(tm, &task, &answers, delta.as_deref(), examples)
            .map_err(backend_error)
    }

    fn classify(
        &self,
        base: &str,
        inputs: &[String],
        heads: &[TaskHead],
        delta: Option<&Arc<MergedDelta>>,
        deadline: Instant,
    ) -> Result<Vec<Vec<LabelScore>>, BackendError> {
        let server = self.encoder(base)?;
        let built = heads
            .iter()
            .map(|h| server.head(h))
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend_error)?;
        let chosen: Vec<&Head> = built.iter().collect();
        let pooled = engine::needs_pooled(chosen.iter().copied());
        let (features, _) = server
            .features(inputs, delta, pooled, deadline)
            .map_err(backend_error)?;
        let ranked = engine::rank(&chosen, &features, usize::MAX).map_err(backend_error)?;
        Ok(ranked
            .into_iter()
            .map(|per_text| {
                per_text
                    .into_iter()
                    .map(|s| LabelScore {
                        task: s.task,
                        label: s.label,
                        score: s.score,
                    })
                    .collect()
            })
            .collect())
    }
}

impl EncoderServer {
    /// Encodes `inputs` with `delta` through the batching engine; also the tokens read.
    fn features(
        &self,
        inputs: &[String],
        delta: Option<&Arc<MergedDelta>>,
        pooled: bool,
        deadline: Instant,
    ) -> Result<(Features, usize), EngineError> {
        let texts: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let ids = self.encoder.encode(&texts)?;
        let tokens = ids.iter().map(Vec::len).sum();
        let delta = delta.map(|d| self.encoder.load_delta(d)).transpose()?;
        let reply = self.engine.submit(EncodeJob {
            ids,
            delta,
            pooled,
            deadline,
        })?;
        let wait = deadline.saturating_duration_since(Instant::now());
        let features = reply.recv_timeout(wait).map_err(|e| match e {
            std::sync::mpsc::RecvTimeoutError::Timeout => EngineError::Timeout,
            std::sync::mpsc::RecvTimeoutError::Disconnected => EngineError::Stopped,
        })??;
        Ok((features, tokens))
    }

    /// The head of one task: its trained classifier, or label-text embeddings built once.
    fn head(&self, h: &TaskHead) -> Result<Head, EngineError> {
        if h.classifier.is_some() {
            return build_head(h, &self.encoder);
        }
        let key = (h.task.clone(), h.label_texts.clone());
        if let Some(head) = self
            .text_heads
            .lock()
            .ok()
            .and_then(|m| m.get(&key).cloned())
        {
            let mut head = head;
            head.labels = h.labels.clone();
            return Ok(head);
        }
        let head = build_head(h, &self.encoder)?;
        if let Ok(mut cache) = self.text_heads.lock() {
            cache.insert(key, head.clone());
        }
        Ok(head)
    }
}

/// Sends an engine job's output to its HTTP stream.
struct StreamSink {
    tx: mpsc::UnboundedSender<GenEvent>,
    /// Its tokenizer spells tokens out for log-probabilities.
    model: Arc<TextModel>,
}

impl Sink for StreamSink {
    fn token(&mut self, text: &str, logprob: Option<TokenLogprob>) -> bool {
        let piece = Piece {
            text: text.to_string(),
            logprob: logprob.map(|lp| spelled(&self.model.tokenizer, &lp)),
        };
        self.tx.send(GenEvent::Text(piece)).is_ok()
    }

    fn closed(&self) -> bool {
        self.tx.is_closed()
    }

    fn done(self: Box<Self>, done: Done) {
        let finish_reason = match done.finish {
            engine::FinishReason::Eos | engine::FinishReason::Stop => FinishReason::Stop,
            _ => FinishReason::Length,
        };
        let _ = self.tx.send(GenEvent::Done(Finished {
            prompt_tokens: done.prompt_tokens,
            completion_tokens: done.completion_tokens,
            finish_reason,
        }));
    }

    fn failed(self: Box<Self>, error: EngineError) {
        let _ = self.tx.send(GenEvent::Failed(backend_error(error)));
    }
}

/// A token's log-probabilities with each token as its text.
fn spelled(tokenizer: &TextTokenizer, lp: &TokenLogprob) -> TokenLogprobs {
    let text = |id: u32| tokenizer.decode(&[id]).unwrap_or_default();
    TokenLogprobs {
        token: text(lp.id),
        logprob: lp.logprob,
        top: lp.top.iter().map(|&(id, l)| (text(id), l)).collect(),
    }
}

fn build_head(h: &TaskHead, encoder: &Encoder) -> Result<Head, EngineError> {
    match &h.classifier {
        Some((weight, bias)) => {
            let hidden = weight.len() / h.labels.len().max(1);
            let saved = [
                (
                    "classifier.weight".to_string(),
                    SavedTensor {
                        shape: vec![h.labels.len(), hidden],
                        data: weight.clone(),
                    },
                ),
                (
                    "classifier.bias".to_string(),
                    SavedTensor {
                        shape: vec![bias.len()],
                        data: bias.clone(),
                    },
                ),
            ]
            .into_iter()
            .collect();
            Head::from_saved(&h.task, &saved, Some(h.labels.clone()), encoder)
        }
        None => {
            let mut head = Head::from_label_texts(
                &h.task,
                h.label_texts.clone(),
                DEFAULT_TEXT_SCALE,
                encoder,
            )?;
            head.labels = h.labels.clone();
            Ok(head)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(max_tokens: usize, given: bool) -> Sampling {
        Sampling {
            max_tokens,
            max_tokens_given: given,
            temperature: 0.0,
            top_p: 1.0,
            top_k: None,
            seed: None,
            stop: Vec::new(),
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
            logprobs: None,
        }
    }

    #[test]
    fn requested_max_tokens_must_fit_and_the_default_is_cut_to_fit() {
        assert_eq!(fit_max_tokens(&sampling(92, true), 8, 100).ok(), Some(92));
        match fit_max_tokens(&sampling(93, true), 8, 100) {
            Err(BackendError::InvalidInput { param, .. }) => assert_eq!(param, "max_tokens"),
            other => panic!("expected a max_tokens error, got {other:?}"),
        }
        assert_eq!(fit_max_tokens(&sampling(256, false), 8, 100).ok(), Some(92));
        assert_eq!(fit_max_tokens(&sampling(5, false), 8, 100).ok(), Some(5));
        // A prompt that fills the context is the engine's prompt error, not this one.
        assert_eq!(fit_max_tokens(&sampling(5, true), 100, 100).ok(), Some(5));
    }
}
