//! Loaded models with their tokenizers: [`TextModel`] (a Llama-layout generator) and
//! [`Encoder`] (a BERT sentence encoder), each built once from a [`ModelPath`] and shared by
//! every request (`Send + Sync`; forward passes take `&self`).

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde::Deserialize;

use super::bert::{Bert, BertConfig, cls_rows};
use super::chat::{CHATML, ChatTemplate, Message};
use super::error::{EngineError, Result};
use super::gguf::GgufFile;
use super::linear::{Deltas, LoadedDelta, needs_gradients};
use super::llama::{Llama, LlamaConfig};
use super::source::ModelPath;
use super::tokenizer::TextTokenizer;
use super::weights::{WeightFormat, WeightStore};
use crate::merge::MergedDelta;

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path, what: &'static str) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| EngineError::format(what, path, e))
}

/// A generator: Llama-layout weights, tokenizer and chat template.
#[derive(Debug)]
pub struct TextModel {
    pub model: Llama,
    pub tokenizer: TextTokenizer,
    pub chat: ChatTemplate,
}

/// `eos_token_id` may be one id or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Ids {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Debug, Deserialize, Default)]
struct GenerationIds {
    #[serde(default)]
    eos_token_id: Option<Ids>,
}

#[derive(Debug, Deserialize, Default)]
struct TokenizerConfig {
    #[serde(default)]
    chat_template: Option<serde_json::Value>,
}

impl TextModel {
    /// Loads with every weight in f32 (exact; what the reference-parity tests use).
    pub fn load(path: &ModelPath, device: &Device) -> Result<Self> {
        Self::load_as(path, device, WeightFormat::F32)
    }

    /// Loads with the projection weights held as `format` says.
    pub fn load_as(path: &ModelPath, device: &Device, format: WeightFormat) -> Result<Self> {
        Self::load_with(path, device, format, false)
    }

    /// [`Self::load_as`] for serving only: f32 host weights are kept only as column panels (see
    /// [`WeightStore::set_serving`]), half the memory of a model that can also train.
    pub fn load_serving(path: &ModelPath, device: &Device, format: WeightFormat) -> Result<Self> {
        Self::load_with(path, device, format, true)
    }

    fn load_with(
        path: &ModelPath,
        device: &Device,
        format: WeightFormat,
        serving: bool,
    ) -> Result<Self> {
        let dtype = match format {
            WeightFormat::Bf16 => Some(candle_core::DType::BF16),
            WeightFormat::Native | WeightFormat::F32 => None,
        };
        let format = if dtype.is_some() {
            WeightFormat::F32
        } else {
            format
        };
        match path {
            ModelPath::Gguf(file) => Self::from_gguf(file, device, format, dtype, serving),
            ModelPath::HfDir(dir) => Self::from_dir(dir, device, dtype, serving),
        }
    }

    fn from_gguf(
        file: &Path,
        device: &Device,
        format: WeightFormat,
        dtype: Option<candle_core::DType>,
        serving: bool,
    ) -> Result<Self> {
        let gguf = GgufFile::open(file)?;
        let cfg = gguf.llama_config()?;
        let mut store = gguf.load_weights(&cfg, device, format)?;
        prepare(&mut store, dtype, serving)?;
        let tokenizer = TextTokenizer::from_gguf(&gguf)?;
        let source = gguf.meta_str("tokenizer.chat_template").unwrap_or(CHATML);
        let chat = ChatTemplate::new(
            source,
            tokenizer.bos_token.clone(),
            tokenizer.eos_token.clone(),
        )?;
        Ok(Self {
            model: Llama::new(cfg, store)?,
            tokenizer,
            chat,
        })
    }

    fn from_dir(
        dir: &Path,
        device: &Device,
        dtype: Option<candle_core::DType>,
        serving: bool,
    ) -> Result<Self> {
        let cfg: LlamaConfig = read_json(&dir.join("config.json"), "config.json")?;
        let mut eos =
            read_json::<GenerationIds>(&dir.join("config.json"), "config.json")?.eos_token_id;
        let gen_cfg = dir.join("generation_config.json");
        if gen_cfg.is_file() {
            eos = read_json::<GenerationIds>(&gen_cfg, "generation_config.json")?
                .eos_token_id
                .or(eos);
        }
        let eos_ids = match eos {
            Some(Ids::One(id)) => vec![id],
            Some(Ids::Many(ids)) => ids,
            None => Vec::new(),
        };
        let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"), eos_ids)?;
        let tok_cfg_path = dir.join("tokenizer_config.json");
        let tok_cfg: TokenizerConfig = if tok_cfg_path.is_file() {
            read_json(&tok_cfg_path, "tokenizer_config.json")?
        } else {
            TokenizerConfig::default()
        };
        let source = match tok_cfg.chat_template {
            Some(serde_json::Value::String(s)) => s,
            _ => CHATML.to_string(),
        };
        let chat = ChatTemplate::new(
            source,
            tokenizer.bos_token.clone(),
            tokenizer.eos_token.clone(),
        )?;
        let mut store = WeightStore::from_safetensors_dir(dir, device)?;
        prepare(&mut store, dtype, serving)?;
        Ok(Self {
            model: Llama::new(cfg, store)?,
            tokenizer,
            chat,
        })
    }

    /// Prompt ids for plain text (with the tokenizer's own BOS, if it adds one).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(text, true)
    }

    /// Prompt ids for a conversation rendered with the chat template.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let text = self.chat.render(messages)?;
        self.tokenizer.encode(&text, false)
    }

    /// Converts (once per `Arc`) a merged delta for this model.
    pub fn load_delta(&self, delta: &Arc<MergedDelta>) -> Result<Arc<LoadedDelta>> {
        self.model.registry().load_delta(delta, self.model.device())
    }

    /// Drops conversions of deltas that are gone.
    pub fn release_unused(&self) {
        self.model.registry().release_unused();
    }
}

/// A sentence encoder: BERT weights and a WordPiece `tokenizer.json`.
#[derive(Debug)]
pub struct Encoder {
    pub model: Bert,
    pub tokenizer: TextTokenizer,
    /// Longest input in tokens: `sentence_bert_config.json`'s `max_seq_length`, else the
    /// model's positions.
    pub max_tokens: usize,
}

#[derive(Debug, Deserialize)]
struct SentenceConfig {
    max_seq_length: Option<usize>,
}

impl Encoder {
    pub fn load(path: &ModelPath, device: &Device) -> Result<Self> {
        Self::load_with(path, device, false)
    }

    /// [`Self::load`] for serving only: the projections' f32 weights are kept only as column
    /// panels (see [`WeightStore::set_serving`]).
    pub fn load_serving(path: &ModelPath, device: &Device) -> Result<Self> {
        Self::load_with(path, device, true)
    }

    fn load_with(path: &ModelPath, device: &Device, serving: bool) -> Result<Self> {
        let ModelPath::HfDir(dir) = path else {
            return Err(EngineError::Unsupported {
                message: "encoders load from a Hugging Face directory, not GGUF".into(),
            });
        };
        let cfg: BertConfig = read_json(&dir.join("config.json"), "config.json")?;
        let mut store = WeightStore::from_safetensors_dir(dir, device)?;
        prepare(&mut store, None, serving)?;
        let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"), Vec::new())?;
        let st_path = dir.join("sentence_bert_config.json");
        let st_max = if st_path.is_file() {
            read_json::<SentenceConfig>(&st_path, "sentence_bert_config.json")?.max_seq_length
        } else {
            None
        };
        let max_tokens = st_max
            .unwrap_or(cfg.max_position_embeddings)
            .min(cfg.max_position_embeddings);
        Ok(Self {
            model: Bert::new(cfg, &store)?,
            tokenizer,
            max_tokens,
        })
    }

    /// Token ids of each text, with `[CLS]`/`[SEP]`, cut to the model's positions.
    pub fn encode(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        if texts.is_empty() {
            return Err(EngineError::EmptyInput { what: "texts" });
        }
        let max = self.max_tokens.max(2);
        texts
            .iter()
            .map(|t| {
                let mut ids = self.tokenizer.encode(t, true)?;
                if ids.len() > max {
                    let last = ids[ids.len() - 1];
                    ids.truncate(max);
                    ids[max - 1] = last;
                }
                Ok(ids)
            })
            .collect()
    }

    /// Normalised sentence embeddings, `(texts, hidden)`: packed texts for inference, a padded
    /// batch when `delta` is trainable.
    pub fn embed(&self, texts: &[&str], delta: Option<&LoadedDelta>) -> Result<Tensor> {
        let ids = self.encode(texts)?;
        if needs_gradients(delta) {
            return self.model.embed(&self.model.batch(&ids)?, delta);
        }
        self.model
            .embed_packed(&self.model.pack(&ids)?, Deltas::Uniform(delta))
    }

    /// BERT pooler outputs, `(texts, hidden)`, the input of a SEQ_CLS classifier.
    pub fn pooled(&self, texts: &[&str], delta: Option<&LoadedDelta>) -> Result<Tensor> {
        let ids = self.encode(texts)?;
        if needs_gradients(delta) {
            return self.model.pooled(&self.model.batch(&ids)?, delta);
        }
        let packed = self.model.pack(&ids)?;
        let deltas = Deltas::Uniform(delta);
        let hidden = self.model.hidden_packed(&packed, deltas)?;
        self.model.pool_rows(&cls_rows(&hidden, &packed)?, deltas)
    }

    pub fn load_delta(&self, delta: &Arc<MergedDelta>) -> Result<Arc<LoadedDelta>> {
        self.model.registry().load_delta(delta, self.model.device())
    }

    /// Drops conversions of deltas that are gone.
    pub fn release_unused(&self) {
        self.model.registry().release_unused();
    }
}

/// Casts `store` to `dtype` when one is asked for, and marks it for serving when `serving`.
fn prepare(
    store: &mut WeightStore,
    dtype: Option<candle_core::DType>,
    serving: bool,
) -> Result<()> {
    if let Some(dtype) = dtype {
        store.cast(dtype)?;
    }
    if serving {
        store.set_serving();
    }
    Ok(())
}
