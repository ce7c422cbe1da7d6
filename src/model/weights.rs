//! Loads weights under Hugging Face names (`model.layers.0.self_attn.q_proj.weight`, …) from
//! safetensors files or from a GGUF file (dequantized to f32, tensors renamed, and Q/K rows
//! un-permuted back from llama.cpp's interleaved-RoPE layout to HF's half-split layout).

use super::{LlamaConfig, ModelError};
use candle_core::quantized::gguf_file::Content;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

pub type Weights = HashMap<String, Tensor>;

fn load_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Load {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Every `*.safetensors` file of a directory, as f32.
pub fn load_safetensors_dir(dir: &Path, device: &Device) -> Result<Weights, ModelError> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| load_err(dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(load_err(dir, "no .safetensors files"));
    }
    let mut out = Weights::new();
    for f in files {
        for (k, t) in candle_core::safetensors::load(&f, device).map_err(|e| load_err(&f, e))? {
            out.insert(k, t.to_dtype(DType::F32)?);
        }
    }
    Ok(out)
}

pub(crate) fn hf_name(gguf: &str) -> Option<String> {
    Some(match gguf {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        _ => {
            let rest = gguf.strip_prefix("blk.")?;
            let (layer, name) = rest.split_once('.')?;
            let mapped = match name {
                "attn_norm.weight" => "input_layernorm.weight",
                "ffn_norm.weight" => "post_attention_layernorm.weight",
                "attn_q.weight" => "self_attn.q_proj.weight",
                "attn_k.weight" => "self_attn.k_proj.weight",
                "attn_v.weight" => "self_attn.v_proj.weight",
                "attn_q.bias" => "self_attn.q_proj.bias",
                "attn_k.bias" => "self_attn.k_proj.bias",
                "attn_v.bias" => "self_attn.v_proj.bias",
                "attn_output.weight" => "self_attn.o_proj.weight",
                "ffn_gate.weight" => "mlp.gate_proj.weight",
                "ffn_up.weight" => "mlp.up_proj.weight",
                "ffn_down.weight" => "mlp.down_proj.weight",
                _ => return None,
            };
            format!("model.layers.{layer}.{mapped}")
        }
    })
}

/// Inverse of llama.cpp's Q/K permutation: GGUF rows are ordered (head, pair, 2); HF's are
/// (head, 2, pair). Works for weights (rows × in) and biases (rows).
pub(crate) fn unpermute(t: &Tensor, n_head: usize) -> Result<Tensor, ModelError> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let hd = rows / n_head;
    let rest: Vec<usize> = dims[1..].to_vec();
    let mut shape = vec![n_head, hd / 2, 2];
    shape.extend(&rest);
    let x = t.reshape(shape)?.transpose(1, 2)?.contiguous()?;
    Ok(x.reshape(dims)?)
}

/// The same un-permutation as a row order: HF row `i` is GGUF row `order[i]`.
pub(crate) fn unpermute_order(rows: usize, n_head: usize) -> Vec<usize> {
    let hd = rows / n_head.max(1);
    let half = hd / 2;
    (0..rows)
        .map(|i| {
            let (h, r) = (i / hd, i % hd);
            let (s, p) = (r / half.max(1), r % half.max(1));
            h * hd + p * 2 + s
        })
        .collect()
}

/// Reads a GGUF model: config from metadata, tensors dequantized under HF names.
pub fn load_gguf(path: &Path, device: &Device) -> Result<(LlamaConfig, Weights), ModelError> {
    let mut f = std::io::BufReader::with_capacity(
        1 << 20,
        std::fs::File::open(path).map_err(|e| load_err(path, e))?,
    );
    let c = Content::read(&mut f).map_err(|e| load_err(path, e))?;
    let cfg = LlamaConfig::from_gguf(&c, c.tensor_infos.contains_key("output.weight"))?;
    let mut out = Weights::new();
    let mut names: Vec<String> = c.tensor_infos.keys().cloned().collect();
    names.sort();
    for name in names {
        let Some(hf) = hf_name(&name) else { continue };
        let q = c
            .tensor(&mut f, &name, device)
            .map_err(|e| load_err(path, e))?;
        let mut t = q.dequantize(device)?;
        if cfg.architecture != "qwen2" {
            if name.contains("attn_q.") {
                t = unpermute(&t, cfg.num_attention_heads)?;
            } else if name.contains("attn_k.") {
                t = unpermute(&t, cfg.num_key_value_heads)?;
            }
        }
        out.insert(hf, t);
    }
    Ok((cfg, out))
}

pub use crate::config::parse_size;

/// Writes weights as HF does: one `model.safetensors`, or `model-0000i-of-0000n.safetensors`
/// shards of at most `max_shard_bytes` (a single larger tensor gets a shard of its own) plus
/// `model.safetensors.index.json`. Tensors go in name order, so the bytes are reproducible.
/// Returns the files written.
pub fn save_sharded(
    w: &Weights,
    dir: &Path,
    max_shard_bytes: u64,
    dtype: DType,
) -> Result<Vec<String>, ModelError> {
    let mut names: Vec<&String> = w.keys().collect();
    names.sort();
    let mut shards: Vec<Vec<&String>> = vec![Vec::new()];
    let mut size = 0u64;
    let mut total = 0u64;
    for n in names {
        let bytes = (w[n].elem_count() * dtype.size_in_bytes()) as u64;
        let last = shards.last().map(|s| s.is_empty()).unwrap_or(true);
        if !last && size + bytes > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        if let Some(s) = shards.last_mut() {
            s.push(n);
        }
        size += bytes;
        total += bytes;
    }
    let count = shards.len();
    let mut files = Vec::new();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = if count == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, count)
        };
        let mut m = HashMap::new();
        for n in shard {
            m.insert((*n).clone(), w[*n].to_dtype(dtype)?);
            weight_map.insert((*n).clone(), serde_json::Value::String(file.clone()));
        }
        let p = dir.join(&file);
        save_safetensors(&m, &p).map_err(|e| load_err(&p, e))?;
        files.push(file);
    }
    if count > 1 {
        let p = dir.join("model.safetensors.index.json");
        let index = serde_json::json!({
            "metadata": {"total_size": total},
            "weight_map": weight_map,
        });
        let bytes = serde_json::to_vec_pretty(&index).map_err(|e| load_err(&p, e))?;
        std::fs::write(&p, bytes).map_err(|e| load_err(&p, e))?;
        files.push("model.safetensors.index.json".into());
    }
    Ok(files)
}

/// Writes tensors as a safetensors file with the `{"format": "pt"}` metadata that transformers'
/// `from_pretrained` requires (it refuses a file without it); candle's own `save` writes none.
pub fn save_safetensors(
    tensors: &HashMap<String, Tensor>,
    path: &Path,
) -> Result<(), safetensors::SafeTensorError> {
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(tensors, Some(meta), path)
}
