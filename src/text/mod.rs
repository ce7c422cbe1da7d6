//! Tokenizer loading (tokenizer.json + tokenizer_config.json, or rebuilt from GGUF metadata) and
//! chat templates. Needs no model weights; never prints.

pub mod fastbpe;
pub mod gguf;
pub mod template;

use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("{}", crate::ioerr::describe("cannot read", path, source))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a usable tokenizer: {message}")]
    BadTokenizer { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Gguf { path: PathBuf, message: String },
    #[error("chat template: {0}")]
    Template(String),
}

/// A tokenizer with the special tokens and chat template that formats need.
pub struct TextTokenizer {
    pub tokenizer: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub chat_template: Option<String>,
    /// The byte-level BPE fast path, when this tokenizer's pipeline is one it reproduces.
    pub fast: Option<fastbpe::FastBpe>,
}

/// Per-thread state for [`TextTokenizer::encode_offsets`]: the fast path's word cache.
pub type EncodeCache = std::collections::HashMap<Vec<u8>, Vec<u32>, foldhash::fast::RandomState>;

impl TextTokenizer {
    /// Loads `tokenizer.json` and (if present) `tokenizer_config.json` from a directory.
    pub fn load_dir(dir: &Path) -> Result<Self, TextError> {
        let tj = dir.join("tokenizer.json");
        let bytes = std::fs::read(&tj).map_err(|source| TextError::Io {
            path: tj.clone(),
            source,
        })?;
        let tokenizer =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| TextError::BadTokenizer {
                path: tj.clone(),
                message: e.to_string(),
            })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = match std::fs::read(&cfg_path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| TextError::BadTokenizer {
                path: cfg_path.clone(),
                message: e.to_string(),
            })?,
            Err(_) => Value::Null,
        };
        Ok(Self::assemble(tokenizer, &cfg))
    }

    /// The tokenizer and chat template a GGUF file carries in its metadata.
    pub fn from_gguf(path: &Path) -> Result<Self, TextError> {
        let files = gguf::tokenizer_files(path)?;
        let tokenizer = tokenizers::Tokenizer::from_bytes(files.tokenizer_json.to_string())
            .map_err(|e| TextError::Gguf {
                path: path.to_path_buf(),
                message: format!("the tokenizer rebuilt from its metadata does not load: {e}"),
            })?;
        Ok(Self::assemble(tokenizer, &files.tokenizer_config))
    }

    fn assemble(tokenizer: tokenizers::Tokenizer, cfg: &Value) -> Self {
        Self {
            fast: fastbpe::FastBpe::from_tokenizer(&tokenizer),
            tokenizer,
            bos_token: token_field(cfg, "bos_token"),
            eos_token: token_field(cfg, "eos_token"),
            chat_template: chat_template_field(cfg),
        }
    }

    /// Ids, byte offsets and special-token mask of `text`, exactly as
    /// `tokenizers::Tokenizer::encode` gives them; through the fast path when it applies.
    pub fn encode_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
        cache: &mut EncodeCache,
    ) -> Result<fastbpe::Enc, String> {
        if let Some(e) = self
            .fast
            .as_ref()
            .and_then(|f| f.encode(text, add_special_tokens, cache))
        {
            return Ok(e);
        }
        let enc = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| format!("tokenizer failed: {e}"))?;
        Ok(fastbpe::Enc {
            ids: enc.get_ids().to_vec(),
            offsets: enc.get_offsets().to_vec(),
            special: enc.get_special_tokens_mask().to_vec(),
        })
    }

    pub fn token_id(&self, tok: &str) -> Option<u32> {
        self.tokenizer.token_to_id(tok)
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_id(t))
    }
}

/// `bos_token` may be a string or an AddedToken object `{content: ...}`.
fn token_field(cfg: &Value, k: &str) -> Option<String> {
    match cfg.get(k)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

/// `chat_template` may be a string or a list of `{name, template}` (the `default` one is used).
fn chat_template_field(cfg: &Value) -> Option<String> {
    match cfg.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or_else(|| items.first())
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(String::from),
        _ => None,
    }
}

/// The tokenizer files a model directory may hold; the tokenize stage reads exactly these.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];
