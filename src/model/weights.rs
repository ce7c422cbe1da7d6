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
    let mut out = Weights::new();
    for_each_safetensor(dir, device, |name, t| {
        out.insert(name, t);
        Ok(())
    })?;
    Ok(out)
}

/// The `*.safetensors` files of a directory, in name order.
pub fn safetensors_files(dir: &Path) -> Result<Vec<std::path::PathBuf>, ModelError> {
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
    Ok(files)
}

/// Calls `f` with every tensor of a directory's safetensors files, widened to f32, one at a
/// time in name order: each is read from the file by itself (no mapping, no whole-file buffer),
/// so a caller that packs or drops each one never holds more than it keeps.
pub fn for_each_safetensor(
    dir: &Path,
    device: &Device,
    mut f: impl FnMut(String, Tensor) -> Result<(), ModelError>,
) -> Result<(), ModelError> {
    use std::io::{Read, Seek, SeekFrom};
    for path in safetensors_files(dir)? {
        let mut file = std::fs::File::open(&path).map_err(|e| load_err(&path, e))?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len).map_err(|e| load_err(&path, e))?;
        let n = u64::from_le_bytes(len);
        let size = file.metadata().map_err(|e| load_err(&path, e))?.len();
        if n > size.saturating_sub(8) || n > 100 << 20 {
            return Err(load_err(
                &path,
                "not a safetensors file (bad header length)",
            ));
        }
        let mut head = vec![0u8; n as usize];
        file.read_exact(&mut head).map_err(|e| load_err(&path, e))?;
        let v: serde_json::Value = serde_json::from_slice(&head).map_err(|e| load_err(&path, e))?;
        let obj = v
            .as_object()
            .ok_or_else(|| load_err(&path, "safetensors header is not an object"))?;
        let mut names: Vec<&String> = obj.keys().filter(|k| *k != "__metadata__").collect();
        names.sort();
        for name in names {
            let info = &obj[name];
            let bad = |m: &str| load_err(&path, format!("{name}: {m}"));
            let dtype = match info["dtype"].as_str() {
                Some("F32") => DType::F32,
                Some("BF16") => DType::BF16,
                Some("F16") => DType::F16,
                Some("F64") => DType::F64,
                // Integer buffers (position ids, a quantized checkpoint's packed words) are no
                // weights of kiln's models: a weight that is missing is reported by name later.
                Some(_) => continue,
                None => return Err(bad("no dtype")),
            };
            let shape: Vec<usize> = info["shape"]
                .as_array()
                .ok_or_else(|| bad("no shape"))?
                .iter()
                .map(|d| d.as_u64().map(|d| d as usize))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("bad shape"))?;
            let offs: Vec<u64> = info["data_offsets"]
                .as_array()
                .and_then(|a| a.iter().map(|o| o.as_u64()).collect())
                .ok_or_else(|| bad("no data_offsets"))?;
            let (a, b) = match offs[..] {
                [a, b] if a <= b && 8 + n + b <= size => (a, b),
                _ => return Err(bad("data_offsets outside the file")),
            };
            let count: usize = shape.iter().product();
            if (b - a) as usize != count * dtype.size_in_bytes() {
                return Err(bad("data size does not match its shape"));
            }
            let mut bytes = vec![0u8; (b - a) as usize];
            file.seek(SeekFrom::Start(8 + n + a))
                .and_then(|_| file.read_exact(&mut bytes))
                .map_err(|e| load_err(&path, e))?;
            let vals: Vec<f32> = match dtype {
                DType::F32 => bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                DType::BF16 => bytes
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                DType::F16 => bytes
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                _ => bytes
                    .chunks_exact(8)
                    .map(|c| {
                        f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                    })
                    .collect(),
            };
            drop(bytes);
            f(name.clone(), Tensor::from_vec(vals, shape, device)?)?;
        }
    }
    Ok(())
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
    save_safetensors_meta(tensors, path, HashMap::new())
}

/// [`save_safetensors`] with more header metadata beside `format: pt`.
pub fn save_safetensors_meta(
    tensors: &HashMap<String, Tensor>,
    path: &Path,
    mut meta: HashMap<String, String>,
) -> Result<(), safetensors::SafeTensorError> {
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(tensors, Some(meta), path)
}

/// The `__metadata__` of a safetensors file's header (without reading the tensors).
pub fn safetensors_metadata(path: &Path) -> Result<HashMap<String, String>, ModelError> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| load_err(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| load_err(path, e))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return Err(load_err(
            path,
            format!("a {n}-byte header is not a safetensors header"),
        ));
    }
    let mut head = vec![0u8; n as usize];
    f.read_exact(&mut head).map_err(|e| load_err(path, e))?;
    let v: serde_json::Value = serde_json::from_slice(&head).map_err(|e| load_err(path, e))?;
    Ok(v["__metadata__"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default())
}
