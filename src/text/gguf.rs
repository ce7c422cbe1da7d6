//! Rebuilds a Hugging Face `tokenizer.json` and `tokenizer_config.json` from GGUF metadata
//! (`tokenizer.ggml.*`), so a lone .gguf file is a complete model source.

use super::TextError;
use candle_core::quantized::gguf_file::{Content, Value as GValue};
use serde_json::{json, Map, Value};
use std::path::Path;

pub struct GgufTokenizerFiles {
    pub tokenizer_json: Value,
    pub tokenizer_config: Value,
    pub architecture: String,
}

fn err(path: &Path, message: impl Into<String>) -> TextError {
    TextError::Gguf {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

pub fn read_metadata(path: &Path) -> Result<Content, TextError> {
    // Buffered: the vocabulary is ~100k small strings, two reads each unbuffered.
    let mut f =
        std::io::BufReader::new(std::fs::File::open(path).map_err(|source| TextError::Io {
            path: path.to_path_buf(),
            source,
        })?);
    Content::read(&mut f).map_err(|e| err(path, format!("not a readable GGUF file: {e}")))
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Builds the tokenizer files from a GGUF's metadata. Supports the byte-level BPE family
/// (`tokenizer.ggml.model = gpt2`: SmolLM, Llama 3, Qwen2, ...).
pub fn tokenizer_files(path: &Path) -> Result<GgufTokenizerFiles, TextError> {
    let c = read_metadata(path)?;
    let md = &c.metadata;
    let get_str = |k: &str| md.get(k).and_then(|v| v.to_string().ok()).cloned();
    let get_u32 = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
    let architecture = get_str("general.architecture").unwrap_or_else(|| "llama".into());
    let model = get_str("tokenizer.ggml.model").ok_or_else(|| {
        err(
            path,
            "no tokenizer.ggml.model metadata: this GGUF carries no tokenizer",
        )
    })?;
    if model != "gpt2" {
        return Err(err(
            path,
            format!("not supported yet: GGUF tokenizer model `{model}` (kiln rebuilds byte-level BPE `gpt2` tokenizers); use the model's tokenizer.json instead"),
        ));
    }
    let tokens: Vec<String> = match md.get("tokenizer.ggml.tokens") {
        Some(GValue::Array(a)) => a
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<Result<_, _>>()
            .map_err(|e| err(path, format!("tokenizer.ggml.tokens: {e}")))?,
        _ => return Err(err(path, "no tokenizer.ggml.tokens array")),
    };
    let merges: Vec<String> = match md.get("tokenizer.ggml.merges") {
        Some(GValue::Array(a)) => a
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<Result<_, _>>()
            .map_err(|e| err(path, format!("tokenizer.ggml.merges: {e}")))?,
        _ => return Err(err(path, "no tokenizer.ggml.merges array")),
    };
    let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
        Some(GValue::Array(a)) => a.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(i));
        // 3 = control, 4 = user-defined: both are matched whole in text.
        let ty = types.get(i).copied().unwrap_or(1);
        if ty == 3 || ty == 4 {
            added.push(json!({
                "id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": ty == 4, "special": ty == 3
            }));
        }
    }
    let pre = get_str("tokenizer.ggml.pre").unwrap_or_else(|| "default".into());
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let pre_tokenizer = match pre.as_str() {
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" | "llama3" | "smaug-bpe" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
            byte_level(false)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
            byte_level(false)]}),
        _ => byte_level(true),
    };
    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges
        }
    });
    let tok_at = |k: &str| get_u32(k).and_then(|i| tokens.get(i as usize).cloned());
    let mut cfg = Map::new();
    if let Some(b) = tok_at("tokenizer.ggml.bos_token_id") {
        cfg.insert("bos_token".into(), json!(b));
    }
    if let Some(e) = tok_at("tokenizer.ggml.eos_token_id") {
        cfg.insert("eos_token".into(), json!(e));
    }
    if let Some(p) = tok_at("tokenizer.ggml.padding_token_id") {
        cfg.insert("pad_token".into(), json!(p));
    }
    if let Some(u) = tok_at("tokenizer.ggml.unknown_token_id") {
        cfg.insert("unk_token".into(), json!(u));
    }
    if let Some(t) = get_str("tokenizer.chat_template") {
        cfg.insert("chat_template".into(), json!(t));
    }
    let add_bos = md
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(false);
    cfg.insert("add_bos_token".into(), json!(add_bos));
    if let Some(n) = get_u32(&format!("{architecture}.context_length")) {
        cfg.insert("model_max_length".into(), json!(n));
    }
    cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    Ok(GgufTokenizerFiles {
        tokenizer_json,
        tokenizer_config: Value::Object(cfg),
        architecture,
    })
}
