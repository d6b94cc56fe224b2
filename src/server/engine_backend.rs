//! The model engine behind the server's [`Backend`] trait: generators (Llama layout) and
//! encoders (BERT) loaded once, shared by every request; a request's delta is converted once
//! per merged set and applied inside the linear layers.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;

use super::backend::{
    Backend, BackendError, BaseInfo, BaseKind, FinishReason, Finished, GenerateJob, LabelScore,
    Prompt, TaskHead,
};
use crate::adapters::SavedTensor;
use crate::engine::{
    self, DEFAULT_TEXT_SCALE, Encoder, EngineError, Head, Message, ModelPath, SamplingParams,
    Scope, TextModel,
};
use crate::merge::MergedDelta;

enum Model {
    Generator(TextModel),
    Encoder(Encoder),
}

/// Every served base model.
pub struct EngineBackend {
    models: Vec<(BaseInfo, Model)>,
}

impl EngineBackend {
    /// Loads each model spec (manifest id, directory, GGUF file or hub repo id) on `device`.
    pub fn load(specs: &[String], device: &str) -> Result<Self, EngineError> {
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
                (
                    BaseKind::Encoder,
                    Model::Encoder(Encoder::load(&path, &device)?),
                )
            } else {
                (
                    BaseKind::Generator,
                    Model::Generator(TextModel::load(&path, &device)?),
                )
            };
            let context_length = match &model {
                Model::Generator(m) => m.model.context_length(),
                Model::Encoder(e) => e.max_tokens,
            };
            tracing::info!(%id, ?kind, context_length, "loaded base model");
            models.push((
                BaseInfo {
                    id,
                    kind,
                    context_length,
                    aliases,
                },
                model,
            ));
        }
        Ok(Self { models })
    }

    fn model(&self, base: &str) -> Result<&Model, BackendError> {
        self.models
            .iter()
            .find(|(info, _)| info.id == base)
            .map(|(_, m)| m)
            .ok_or_else(|| BackendError::Failed(format!("base {base} is not loaded")))
    }

    fn encoder(&self, base: &str) -> Result<&Encoder, BackendError> {
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

fn backend_error(e: EngineError) -> BackendError {
    match e {
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

    fn generate(
        &self,
        job: &GenerateJob,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Finished, BackendError> {
        let Model::Generator(tm) = self.model(&job.base)? else {
            return Err(BackendError::InvalidInput {
                param: "model",
                message: format!("{} does not generate", job.base),
            });
        };
        let ids = match &job.prompt {
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
            max_tokens: s.max_tokens,
            stop: s.stop.clone(),
        };
        let generation = engine::generate(
            &tm.model,
            &tm.tokenizer,
            &ids,
            &params,
            delta.as_deref(),
            |event| {
                if event.text.is_empty() || on_text(event.text) {
                    ControlFlow::Continue(())
                } else {
                    ControlFlow::Break(())
                }
            },
        )
        .map_err(backend_error)?;
        let finish_reason = match generation.finish {
            engine::FinishReason::Eos | engine::FinishReason::Stop => FinishReason::Stop,
            engine::FinishReason::Length | engine::FinishReason::ContextFull => {
                FinishReason::Length
            }
            engine::FinishReason::Cancelled => return Err(BackendError::Cancelled),
        };
        let completion_tokens = generation.ids.len();
        Ok(Finished {
            prompt_tokens: generation.prompt_tokens,
            completion_tokens,
            finish_reason,
        })
    }

    fn embed(
        &self,
        base: &str,
        inputs: &[String],
        delta: Option<&Arc<MergedDelta>>,
    ) -> Result<(Vec<Vec<f32>>, usize), BackendError> {
        let encoder = self.encoder(base)?;
        let texts: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let tokens: usize = encoder
            .encode(&texts)
            .map_err(backend_error)?
            .iter()
            .map(Vec::len)
            .sum();
        let delta = delta
            .map(|d| encoder.load_delta(d))
            .transpose()
            .map_err(backend_error)?;
        let vectors = encoder
            .embed(&texts, delta.as_deref())
            .and_then(|t| Ok(t.to_vec2::<f32>()?))
            .map_err(backend_error)?;
        Ok((vectors, tokens))
    }

    fn classify(
        &self,
        base: &str,
        inputs: &[String],
        heads: &[TaskHead],
        delta: Option<&Arc<MergedDelta>>,
    ) -> Result<Vec<Vec<LabelScore>>, BackendError> {
        let encoder = self.encoder(base)?;
        let delta = delta
            .map(|d| encoder.load_delta(d))
            .transpose()
            .map_err(backend_error)?;
        let built = heads
            .iter()
            .map(|h| build_head(h, encoder))
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend_error)?;
        let texts: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let ranked = engine::classify(
            encoder,
            &built,
            &Scope::Joint,
            &texts,
            delta.as_deref(),
            usize::MAX,
        )
        .map_err(backend_error)?;
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
