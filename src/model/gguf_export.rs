//! Writes a model as a GGUF file llama.cpp loads: architecture metadata, the tokenizer (copied
//! from a source GGUF, or rebuilt from tokenizer.json for byte-level BPE vocabularies), the chat
//! template, and tensors under llama.cpp's names with Q/K rows permuted to its interleaved RoPE
//! layout, quantized per llama.cpp's rules for the chosen file type.

use super::{Llama, ModelError};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;
use serde_json::Value as Json;
use std::path::Path;

pub use crate::config::Quant;

impl Quant {
    /// llama.cpp's `general.file_type` (LLAMA_FTYPE_*).
    fn file_type(&self) -> u32 {
        match self {
            Quant::F32 => 0,
            Quant::F16 => 1,
            Quant::Q4_0 => 2,
            Quant::Q8_0 => 7,
            Quant::Q4KM => 15,
        }
    }
}

fn err(path: &Path, m: impl std::fmt::Display) -> ModelError {
    ModelError::Load {
        path: path.to_path_buf(),
        message: m.to_string(),
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third one
/// between, get more bits for attn_v and ffn_down under the _M k-quant mixes.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// k-quants need rows that are a multiple of 256 and the others of 32; llama.cpp falls back
/// like this (then to f16 when even 32 does not divide the row).
fn fit(t: GgmlDType, cols: usize) -> GgmlDType {
    let t = if cols.is_multiple_of(t.block_size()) {
        t
    } else {
        match t {
            GgmlDType::Q4K => GgmlDType::Q5_0,
            GgmlDType::Q6K => GgmlDType::Q8_0,
            other => other,
        }
    };
    if cols.is_multiple_of(t.block_size()) {
        t
    } else {
        GgmlDType::F16
    }
}

/// The storage type of one tensor (GGUF name, shape (rows, cols) or (n,)).
fn tensor_type(
    name: &str,
    dims: &[usize],
    q: Quant,
    n_layer: usize,
    has_output: bool,
) -> GgmlDType {
    if dims.len() < 2 {
        return GgmlDType::F32;
    }
    let cols = dims[dims.len() - 1];
    let is_output = name == "output.weight" || (!has_output && name == "token_embd.weight");
    let layer = name
        .strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|n| n.parse::<usize>().ok());
    let t = match q {
        Quant::F32 => GgmlDType::F32,
        Quant::F16 => GgmlDType::F16,
        Quant::Q8_0 => GgmlDType::Q8_0,
        Quant::Q4_0 if is_output => GgmlDType::Q6K,
        Quant::Q4_0 => GgmlDType::Q4_0,
        Quant::Q4KM if is_output => GgmlDType::Q6K,
        Quant::Q4KM => {
            let more = layer.is_some_and(|i| use_more_bits(i, n_layer))
                && (name.contains("attn_v.") || name.contains("ffn_down."));
            if more {
                GgmlDType::Q6K
            } else {
                GgmlDType::Q4K
            }
        }
    };
    fit(t, cols)
}

fn gguf_name(hf: &str) -> Option<String> {
    Some(match hf {
        "model.embed_tokens.weight" => "token_embd.weight".into(),
        "model.norm.weight" => "output_norm.weight".into(),
        "lm_head.weight" => "output.weight".into(),
        _ => {
            let rest = hf.strip_prefix("model.layers.")?;
            let (layer, name) = rest.split_once('.')?;
            let mapped = match name {
                "input_layernorm.weight" => "attn_norm.weight",
                "post_attention_layernorm.weight" => "ffn_norm.weight",
                "self_attn.q_proj.weight" => "attn_q.weight",
                "self_attn.k_proj.weight" => "attn_k.weight",
                "self_attn.v_proj.weight" => "attn_v.weight",
                "self_attn.q_proj.bias" => "attn_q.bias",
                "self_attn.k_proj.bias" => "attn_k.bias",
                "self_attn.v_proj.bias" => "attn_v.bias",
                "self_attn.o_proj.weight" => "attn_output.weight",
                "mlp.gate_proj.weight" => "ffn_gate.weight",
                "mlp.up_proj.weight" => "ffn_up.weight",
                "mlp.down_proj.weight" => "ffn_down.weight",
                _ => return None,
            };
            format!("blk.{layer}.{mapped}")
        }
    })
}

/// HF's half-split RoPE rows (head, 2, pair) to llama.cpp's interleaved (head, pair, 2).
fn permute(t: &Tensor, n_head: usize) -> Result<Tensor, ModelError> {
    let dims = t.dims().to_vec();
    let hd = dims[0] / n_head;
    let mut shape = vec![n_head, 2, hd / 2];
    shape.extend(&dims[1..]);
    Ok(t.reshape(shape)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// Tokenizer metadata: copied from the source GGUF when there is one, else rebuilt from
/// tokenizer.json + tokenizer_config.json.
fn tokenizer_metadata(
    tok_dir: &Path,
    source_gguf: Option<&Path>,
    vocab_size: usize,
    arch: &str,
) -> Result<Vec<(String, Value)>, ModelError> {
    if let Some(src) = source_gguf {
        let mut f = std::io::BufReader::new(std::fs::File::open(src).map_err(|e| err(src, e))?);
        let c = gguf_file::Content::read(&mut f).map_err(|e| err(src, e))?;
        let mut out: Vec<(String, Value)> = c
            .metadata
            .into_iter()
            .filter(|(k, _)| k.starts_with("tokenizer.") && k != "tokenizer.chat_template")
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        return Ok(out);
    }
    let tj = tok_dir.join("tokenizer.json");
    let t: Json = serde_json::from_slice(&std::fs::read(&tj).map_err(|e| err(&tj, e))?)
        .map_err(|e| err(&tj, e))?;
    let model = &t["model"];
    if model["type"].as_str() != Some("BPE")
        || !t["pre_tokenizer"].to_string().contains("ByteLevel")
    {
        return Err(err(
            &tj,
            "not supported yet: exporting this tokenizer to GGUF (kiln writes byte-level BPE vocabularies)",
        ));
    }
    let mut tokens = vec![String::new(); vocab_size];
    let mut types = vec![5i32; vocab_size];
    let mut filled = vec![false; vocab_size];
    if let Some(v) = model["vocab"].as_object() {
        for (tok, id) in v {
            if let Some(id) = id.as_u64().map(|i| i as usize).filter(|&i| i < vocab_size) {
                tokens[id] = tok.clone();
                types[id] = 1;
                filled[id] = true;
            }
        }
    }
    for a in t["added_tokens"].as_array().into_iter().flatten() {
        if let (Some(id), Some(c)) = (a["id"].as_u64(), a["content"].as_str()) {
            let id = id as usize;
            if id < vocab_size {
                tokens[id] = c.to_string();
                types[id] = if a["special"].as_bool() == Some(true) {
                    3
                } else {
                    4
                };
                filled[id] = true;
            }
        }
    }
    for (i, f) in filled.iter().enumerate() {
        if !f {
            tokens[i] = format!("[PAD{i}]");
        }
    }
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Json::String(s) => Some(s.clone()),
            Json::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
            _ => None,
        })
        .map(Value::String)
        .collect();
    let pre_regex = t["pre_tokenizer"].to_string();
    let pre = if arch == "qwen2" {
        "qwen2"
    } else if pre_regex.contains("\\\\p{N}{1,3}") {
        "llama-bpe"
    } else if pre_regex.contains("Digits") {
        "smollm"
    } else {
        "gpt2"
    };
    let mut out = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".to_string(), Value::String(pre.into())),
        (
            "tokenizer.ggml.tokens".to_string(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
    ];
    let cfg_path = tok_dir.join("tokenizer_config.json");
    let cfg: Json = std::fs::read(&cfg_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Json::Null);
    let tk = crate::text::TextTokenizer::load_dir(tok_dir).map_err(|e| err(tok_dir, e))?;
    for (field, key) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
    ] {
        let tokstr = match &cfg[field] {
            Json::String(s) => Some(s.clone()),
            Json::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
            _ => None,
        };
        if let Some(id) = tokstr.and_then(|s| tk.token_id(&s)) {
            out.push((key.to_string(), Value::U32(id)));
        }
    }
    out.push((
        "tokenizer.ggml.add_bos_token".to_string(),
        Value::Bool(cfg["add_bos_token"].as_bool().unwrap_or(false)),
    ));
    Ok(out)
}

/// What was written.
pub struct GgufSummary {
    pub bytes: u64,
    pub tensors: usize,
}

/// Writes `model` to `out` as GGUF, with `extra` metadata keys added.
pub fn write_gguf(
    model: &Llama,
    tok_dir: &Path,
    source_gguf: Option<&Path>,
    chat_template: Option<&str>,
    quant: Quant,
    extra: &[(String, Value)],
    out: &Path,
) -> Result<GgufSummary, ModelError> {
    let cfg = &model.cfg;
    let arch = if cfg.architecture == "qwen2" {
        "qwen2"
    } else {
        "llama"
    };
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (
            "general.name".into(),
            Value::String("kiln fine-tune".into()),
        ),
        ("general.file_type".into(), Value::U32(quant.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        (
            format!("{arch}.context_length"),
            Value::U32(cfg.max_position_embeddings as u32),
        ),
        (
            format!("{arch}.embedding_length"),
            Value::U32(cfg.hidden_size as u32),
        ),
        (
            format!("{arch}.block_count"),
            Value::U32(cfg.num_hidden_layers as u32),
        ),
        (
            format!("{arch}.feed_forward_length"),
            Value::U32(cfg.intermediate_size as u32),
        ),
        (
            format!("{arch}.attention.head_count"),
            Value::U32(cfg.num_attention_heads as u32),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            Value::U32(cfg.num_key_value_heads as u32),
        ),
        (
            format!("{arch}.rope.freq_base"),
            Value::F32(cfg.rope_theta as f32),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (
            format!("{arch}.rope.dimension_count"),
            Value::U32(cfg.head_dim() as u32),
        ),
        (
            format!("{arch}.vocab_size"),
            Value::U32(cfg.vocab_size as u32),
        ),
        (
            "kiln.version".into(),
            Value::String(env!("CARGO_PKG_VERSION").into()),
        ),
    ];
    // Extra keys (lineage, or a `general.name`) replace defaults of the same name.
    md.retain(|(k, _)| extra.iter().all(|(e, _)| e != k));
    md.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    md.extend(tokenizer_metadata(
        tok_dir,
        source_gguf,
        cfg.vocab_size,
        arch,
    )?);
    let template = chat_template.map(String::from).or_else(|| {
        crate::text::TextTokenizer::load_dir(tok_dir)
            .ok()
            .and_then(|t| t.chat_template)
    });
    if let Some(t) = template {
        md.push(("tokenizer.chat_template".into(), Value::String(t)));
    }

    let w = model.to_weights()?;
    let has_output = w.contains_key("lm_head.weight");
    let mut names: Vec<(String, String)> = w
        .keys()
        .filter_map(|k| gguf_name(k).map(|g| (g, k.clone())))
        .collect();
    // llama.cpp's order: token_embd, the blocks in order, output_norm, output.
    let rank = |g: &str| -> (usize, usize, String) {
        match g {
            "token_embd.weight" => (0, 0, String::new()),
            "output_norm.weight" => (2, 0, String::new()),
            "output.weight" => (3, 0, String::new()),
            _ => {
                let layer = g
                    .split('.')
                    .nth(1)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                (1, layer, g.to_string())
            }
        }
    };
    names.sort_by_key(|(g, _)| rank(g));
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    for (g, hf) in names {
        let mut t = w[&hf].clone();
        if arch != "qwen2" {
            if g.contains("attn_q.") {
                t = permute(&t, cfg.num_attention_heads)?;
            } else if g.contains("attn_k.") {
                t = permute(&t, cfg.num_key_value_heads)?;
            }
        }
        let ty = tensor_type(&g, t.dims(), quant, cfg.num_hidden_layers, has_output);
        let q = QTensor::quantize(&t.contiguous()?, ty)?;
        tensors.push((g, q));
    }
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let f = std::fs::File::create(out).map_err(|e| err(out, e))?;
    let mut bw = std::io::BufWriter::new(f);
    gguf_file::write(&mut bw, &md_refs, &t_refs)?;
    use std::io::Write;
    bw.flush().map_err(|e| err(out, e))?;
    drop(bw);
    let bytes = std::fs::metadata(out).map_err(|e| err(out, e))?.len();
    Ok(GgufSummary {
        bytes,
        tensors: tensors.len(),
    })
}
