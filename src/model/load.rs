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

/// Loads a model directory (config.json + safetensors, or model.gguf) with its block linear
/// weights packed in `fmt`. Other weights (embeddings, norms, head) load as f32.
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
        for f in files {
            // SAFETY: the file is a cache entry (read-only, verified when fetched) or the user's
            // model directory, not written while training reads it.
            let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(&f) }
                .map_err(|e| load_err(&f, e))?;
            let mut names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
            names.sort();
            for name in names {
                let t = st
                    .load(&name, &device)
                    .map_err(|e| load_err(&f, e))?
                    .to_dtype(DType::F32)?;
                if is_block_linear(&name) {
                    let p = pack_tensor(&t, fmt)?;
                    summary.add(&p);
                    packed.insert(name, Arc::new(p));
                } else {
                    dense.insert(name, t);
                }
            }
        }
        cfg
    };
    let model = Llama::from_weights_packed(cfg, dense, packed, &device)?;
    Ok((model, summary))
}

fn pack_tensor(t: &candle_core::Tensor, fmt: PackFormat) -> Result<Packed, ModelError> {
    let (n, k) = t.dims2()?;
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    Packed::pack(&v, n, k, fmt)
}
