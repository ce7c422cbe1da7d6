//! Loading a model to train with its frozen base weights packed (QLoRA, 8-bit and 16-bit
//! bases): the files are read one tensor at a time and each block linear weight is packed as
//! soon as it is read, so the model never exists whole at f32. A GGUF's quantized blocks are
//! kept as the file holds them.

use super::llama::LINEAR_LAYERS;
use super::packed::{PackFormat, Packed};
use super::weights::Weights;
use super::{Llama, LlamaConfig, ModelError};
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

fn load_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Load {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// A block linear weight (`model.layers.N.self_attn.q_proj.weight`, …): what gets packed.
pub fn is_block_linear(name: &str) -> bool {
    name.starts_with("model.layers.")
        && name
            .strip_suffix(".weight")
            .and_then(|s| s.rsplit('.').next())
            .is_some_and(|m| LINEAR_LAYERS.contains(&m))
}

/// What was loaded: the formats the linear weights ended up in and their bytes.
#[derive(Debug, Default, Clone)]
pub struct PackedSummary {
    /// (format, tensors, bytes), by format name.
    pub formats: std::collections::BTreeMap<String, (usize, usize)>,
    /// Values in the packed weights.
    pub values: usize,
}

impl PackedSummary {
    fn add(&mut self, p: &Packed) {
        let e = self.formats.entry(p.format()).or_default();
        e.0 += 1;
        e.1 += p.bytes();
        self.values += p.n * p.k;
    }

    pub fn bytes(&self) -> usize {
        self.formats.values().map(|(_, b)| b).sum()
    }

    /// `nf4+dq: 210 tensors, 56.1 MB (4.15 bits a weight)`.
    pub fn describe(&self) -> String {
        let bits = self.bytes() as f64 * 8.0 / self.values.max(1) as f64;
        let parts: Vec<String> = self
            .formats
            .iter()
            .map(|(f, (n, b))| format!("{f} ×{n} ({:.1} MB)", *b as f64 / 1e6))
            .collect();
        format!("{} — {bits:.2} bits a weight", parts.join(", "))
    }
}

/// The embeddings and the head with a packed base: frozen like the base, so kept at 16 bits
/// (f16 with an f16 base, bf16 otherwise, as Axolotl's bf16 configs load them); norms stay f32.
fn embeddings_at_16_bits(dense: &mut Weights, fmt: PackFormat) -> Result<(), ModelError> {
    let dtype = if fmt == PackFormat::F16 {
        DType::F16
    } else {
        DType::BF16
    };
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        if let Some(t) = dense.get_mut(name) {
            *t = t.to_dtype(dtype)?;
        }
    }
    Ok(())
}

/// Loads a model directory (config.json + safetensors, or model.gguf) with its block linear
/// weights packed in `fmt`, the embeddings and head at 16 bits, the norms f32.
pub fn load_packed(
    dir: &Path,
    cfg: Option<LlamaConfig>,
    fmt: PackFormat,
) -> Result<(Llama, PackedSummary), ModelError> {
    let device = Device::Cpu;
    let gguf = dir.join("model.gguf");
    let mut dense = Weights::new();
    let mut packed: HashMap<String, Arc<Packed>> = HashMap::new();
    let mut summary = PackedSummary::default();
    let cfg = if gguf.exists() {
        let mut f = std::io::BufReader::with_capacity(
            1 << 20,
            std::fs::File::open(&gguf).map_err(|e| load_err(&gguf, e))?,
        );
        let c = Content::read(&mut f).map_err(|e| load_err(&gguf, e))?;
        let cfg = LlamaConfig::from_gguf(&c, c.tensor_infos.contains_key("output.weight"))?;
        let mut names: Vec<String> = c.tensor_infos.keys().cloned().collect();
        names.sort();
        for name in names {
            let Some(hf) = super::weights::hf_name(&name) else {
                continue;
            };
            let q = c
                .tensor(&mut f, &name, &device)
                .map_err(|e| load_err(&gguf, e))?;
            let heads = if cfg.architecture == "qwen2" {
                None
            } else if name.contains("attn_q.") {
                Some(cfg.num_attention_heads)
            } else if name.contains("attn_k.") {
                Some(cfg.num_key_value_heads)
            } else {
                None
            };
            let blocks = !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
            if is_block_linear(&hf) && blocks {
                // Keep the file's blocks; Q/K rows go back to HF's half-split RoPE order.
                let mut p = Packed::from_ggml(&q)?;
                if let Some(h) = heads {
                    p.permute_rows(&super::weights::unpermute_order(p.n, h));
                }
                summary.add(&p);
                packed.insert(hf, Arc::new(p));
                continue;
            }
            let mut t = q.dequantize(&device)?;
            if let Some(h) = heads {
                t = super::weights::unpermute(&t, h)?;
            }
            if is_block_linear(&hf) {
                let p = pack_tensor(&t, fmt)?;
                summary.add(&p);
                packed.insert(hf, Arc::new(p));
            } else {
                dense.insert(hf, t);
            }
        }
        cfg
    } else {
        let cfg = cfg.ok_or_else(|| load_err(dir, "no config.json"))?;
        super::weights::for_each_safetensor(dir, &device, |name, t| {
            if is_block_linear(&name) {
                let p = pack_tensor(&t, fmt)?;
                summary.add(&p);
                packed.insert(name, Arc::new(p));
            } else {
                dense.insert(name, t);
            }
            Ok(())
        })?;
        cfg
    };
    embeddings_at_16_bits(&mut dense, fmt)?;
    let model = Llama::from_weights_packed(cfg, dense, packed, &device)?;
    Ok((model, summary))
}

fn pack_tensor(t: &candle_core::Tensor, fmt: PackFormat) -> Result<Packed, ModelError> {
    let (n, k) = t.dims2()?;
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    Packed::pack(&v, n, k, fmt)
}

/// The file a quantize stage writes: the packed linear weights and every other weight.
pub const PACKED_FILE: &str = "model.packed.safetensors";

/// Writes a model's weights with its packed linear weights as they are stored: per packed weight
/// `NAME` its parts (`NAME.codes`, `NAME.absmax`, … as u8 / f32 tensors, a 16-bit weight as
/// itself) and a `kiln.packed` header entry giving each one's format and shape. Dense weights
/// are written as f32 under their own names.
pub fn save_packed(model: &Llama, path: &Path) -> Result<(), ModelError> {
    use super::packed::{Absmax, BaseWeight, Store};
    use candle_core::Tensor;
    let dev = Device::Cpu;
    let mut out: HashMap<String, Tensor> = HashMap::new();
    let mut meta = serde_json::Map::new();
    let u8s = |v: &[u8]| Tensor::from_vec(v.to_vec(), v.len(), &dev);
    let f32s = |v: &[f32]| Tensor::from_vec(v.to_vec(), v.len(), &dev);
    for (path_, lin) in model.linears() {
        let name = format!("{path_}.weight");
        let BaseWeight::Packed(p) = &lin.weight else {
            continue;
        };
        let mut entry = serde_json::json!({"format": p.format(), "shape": [p.n, p.k]});
        match &p.store {
            Store::Half(t) => {
                out.insert(name.clone(), t.clone());
            }
            Store::Int8 { q, row_absmax } => {
                let bytes: Vec<u8> = q.iter().map(|v| *v as u8).collect();
                out.insert(format!("{name}.int8"), u8s(&bytes)?);
                out.insert(format!("{name}.row_absmax"), f32s(row_absmax)?);
            }
            Store::FourBit {
                kind,
                codes,
                absmax,
            } => {
                entry["kind"] = serde_json::json!(kind.name());
                out.insert(format!("{name}.codes"), u8s(codes)?);
                match absmax {
                    Absmax::F32(a) => {
                        out.insert(format!("{name}.absmax"), f32s(a)?);
                    }
                    Absmax::Double { q, absmax2, offset } => {
                        out.insert(format!("{name}.absmax_q"), u8s(q)?);
                        out.insert(format!("{name}.absmax2"), f32s(absmax2)?);
                        entry["offset_bits"] = serde_json::json!(offset.to_bits());
                    }
                }
            }
            Store::Ggml(g) => {
                let (dtype, bytes) = g.raw();
                entry["ggml"] = serde_json::json!(format!("{dtype:?}"));
                out.insert(format!("{name}.ggml"), u8s(&bytes)?);
            }
        }
        meta.insert(name, entry);
    }
    for (name, t) in model.dense_weights()? {
        out.insert(name, t);
    }
    let header = HashMap::from([(
        "kiln.packed".to_string(),
        serde_json::Value::Object(meta).to_string(),
    )]);
    super::weights::save_safetensors_meta(&out, path, header).map_err(|e| load_err(path, e))
}

/// Reads what [`save_packed`] wrote back into a model.
pub fn load_packed_file(
    path: &Path,
    cfg: LlamaConfig,
) -> Result<(Llama, PackedSummary), ModelError> {
    use super::packed::{Absmax, FourBit, Store};
    let dev = Device::Cpu;
    let meta = super::weights::safetensors_metadata(path)?;
    let entries: serde_json::Map<String, serde_json::Value> = meta
        .get("kiln.packed")
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| load_err(path, "no kiln.packed header: not a packed model file"))?;
    // SAFETY: a published cache entry, read-only and verified, not written while read.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
        .map_err(|e| load_err(path, e))?;
    let bad = |m: String| load_err(path, m);
    let u8s = |n: &str| -> Result<Vec<u8>, ModelError> {
        Ok(st
            .load(n, &dev)
            .map_err(|e| load_err(path, e))?
            .to_vec1::<u8>()?)
    };
    let f32s = |n: &str| -> Result<Vec<f32>, ModelError> {
        Ok(st
            .load(n, &dev)
            .map_err(|e| load_err(path, e))?
            .to_vec1::<f32>()?)
    };
    let mut packed: HashMap<String, Arc<Packed>> = HashMap::new();
    let mut summary = PackedSummary::default();
    for (name, e) in &entries {
        let shape: Vec<usize> = e["shape"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_u64())
                    .map(|v| v as usize)
                    .collect()
            })
            .unwrap_or_default();
        let &[n, k] = &shape[..] else {
            return Err(bad(format!("{name}: no (out, in) shape")));
        };
        let format = e["format"].as_str().unwrap_or("");
        let store = if let Some(g) = e["ggml"].as_str() {
            let dtype =
                ggml_dtype(g).ok_or_else(|| bad(format!("{name}: unknown GGUF format {g}")))?;
            let bytes = u8s(&format!("{name}.ggml"))?;
            let q = candle_core::quantized::QTensor::new(
                candle_core::quantized::QStorage::from_data(
                    std::borrow::Cow::Owned(bytes),
                    &dev,
                    dtype,
                )?,
                (n, k),
            )?;
            Packed::from_ggml(&q)?.store
        } else if format == "bf16" || format == "f16" {
            Store::Half(st.load(name, &dev).map_err(|e| load_err(path, e))?)
        } else if format == "int8" {
            let q = u8s(&format!("{name}.int8"))?
                .into_iter()
                .map(|b| b as i8)
                .collect();
            Store::Int8 {
                q,
                row_absmax: f32s(&format!("{name}.row_absmax"))?,
            }
        } else {
            let kind = match e["kind"].as_str() {
                Some("nf4") => FourBit::Nf4,
                Some("fp4") => FourBit::Fp4,
                _ => return Err(bad(format!("{name}: unknown packed format {format}"))),
            };
            let absmax = match e["offset_bits"].as_u64() {
                Some(bits) => Absmax::Double {
                    q: u8s(&format!("{name}.absmax_q"))?,
                    absmax2: f32s(&format!("{name}.absmax2"))?,
                    offset: f32::from_bits(bits as u32),
                },
                None => Absmax::F32(f32s(&format!("{name}.absmax"))?),
            };
            Store::FourBit {
                kind,
                codes: u8s(&format!("{name}.codes"))?,
                absmax,
            }
        };
        let p = Packed { n, k, store };
        p.check().map_err(|m| bad(format!("{name}: {m}")))?;
        summary.add(&p);
        packed.insert(name.clone(), Arc::new(p));
    }
    let mut dense = Weights::new();
    for (name, _) in st.tensors() {
        let part = entries.keys().any(|p| {
            name.len() > p.len() && name.starts_with(p.as_str()) && name.as_bytes()[p.len()] == b'.'
        });
        if entries.contains_key(&name) || part {
            continue;
        }
        let t = st.load(&name, &dev).map_err(|e| load_err(path, e))?;
        // Norms (and anything else) as f32; the embeddings and head as written (16-bit).
        let t = if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
            t
        } else {
            t.to_dtype(DType::F32)?
        };
        dense.insert(name, t);
    }
    let model = Llama::from_weights_packed(cfg, dense, packed, &dev)?;
    Ok((model, summary))
}

fn ggml_dtype(name: &str) -> Option<GgmlDType> {
    use GgmlDType::*;
    [F32, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2K, Q3K, Q4K, Q5K, Q6K]
        .into_iter()
        .find(|d| format!("{d:?}") == name)
}
