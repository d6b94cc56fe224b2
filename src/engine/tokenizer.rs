//! Text to token ids and back: a `tokenizer.json`, or a byte-level BPE built from a GGUF's
//! `tokenizer.ggml.*` arrays (GPT-2 split regex, control tokens recognised inside text, no BOS).

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use super::error::{EngineError, Result};
use super::gguf::GgufFile;

/// GGUF token types that are special (control and user-defined tokens).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// A tokenizer plus the ids generation needs.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Ids that end generation.
    pub eos_ids: Vec<u32>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

impl TextTokenizer {
    /// Reads `tokenizer.json`; `eos_ids` come from the model config.
    pub fn from_file(path: &Path, eos_ids: Vec<u32>) -> Result<Self> {
        let mut inner = Tokenizer::from_file(path)
            .map_err(|e| EngineError::format("tokenizer.json", path, e))?;
        // Batches are padded by the models themselves; a file's fixed padding or truncation
        // would change lengths silently (too-long inputs are an error there instead).
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| EngineError::format("tokenizer.json", path, e))?;
        let eos_token = eos_ids.first().and_then(|&id| inner.id_to_token(id));
        Ok(Self {
            inner,
            eos_ids,
            bos_token: None,
            eos_token,
        })
    }

    /// Builds the byte-level BPE stored in a GGUF file.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let model = gguf.meta_str("tokenizer.ggml.model").unwrap_or("");
        if model != "gpt2" {
            return Err(EngineError::Unsupported {
                message: format!("GGUF tokenizer model {model:?} (only byte-level BPE \"gpt2\")"),
            });
        }
        let tokens = gguf.meta_strings("tokenizer.ggml.tokens")?;
        let types = gguf.meta_ints("tokenizer.ggml.token_type")?;
        let merges = gguf.meta_strings("tokenizer.ggml.merges")?;
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = merges
            .iter()
            .filter_map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
            })
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(EngineError::tokenizer)?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(types.iter().chain(std::iter::repeat(&1)))
            .filter(|(_, t)| matches!(**t, CONTROL | USER_DEFINED))
            .map(|(tok, _)| AddedToken::from(tok.clone(), true))
            .collect();
        inner
            .add_special_tokens(special)
            .map_err(EngineError::tokenizer)?;
        let id_token = |key: &str| -> Result<Option<(u32, String)>> {
            Ok(gguf
                .meta_u32(key)?
                .and_then(|id| tokens.get(id as usize).map(|t| (id, t.clone()))))
        };
        let eos = id_token("tokenizer.ggml.eos_token_id")?;
        let bos = id_token("tokenizer.ggml.bos_token_id")?;
        Ok(Self {
            inner,
            eos_ids: eos.iter().map(|(id, _)| *id).collect(),
            bos_token: bos.map(|(_, t)| t),
            eos_token: eos.map(|(_, t)| t),
        })
    }

    /// Token ids of `text`; `special` adds the tokenizer's own framing (BOS, `[CLS]…[SEP]`).
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, special)
            .map_err(EngineError::tokenizer)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens kept.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(EngineError::tokenizer)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}
