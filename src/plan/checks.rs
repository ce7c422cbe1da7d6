//! The config checked against a local base model before any work starts (`kiln validate`, and
//! `kiln run` when something will build): `sequence_len` against the model's context, LoRA
//! target modules against the layers the model has, and `config.json` against the weights'
//! shapes (read from the safetensors headers only; a GGUF file is one self-describing unit).
//! A hub model is checked once it is fetched (its files are then local).

use crate::config::{ModelSource, Problem, Settings};
use crate::model::llama::LINEAR_LAYERS;
use crate::model::LlamaConfig;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What the checks know about the model: its config and where it came from, and its tensors'
/// shapes when they could be read without loading weights.
struct Facts {
    from: PathBuf,
    cfg: LlamaConfig,
    shapes: Option<(PathBuf, BTreeMap<String, Vec<u64>>)>,
}

/// Problems of `s` against its local base model: (errors, warnings). Nothing when the model is
/// on the hub (not fetched yet) or cannot be read (the fetch stage reports that).
pub fn model_problems(s: &Settings) -> (Vec<Problem>, Vec<Problem>) {
    let mut errors = Vec::new();
    let warnings = Vec::new();
    let Some(f) = facts(&s.base_model) else {
        return (errors, warnings);
    };
    let problem = |key: &str, message: String, fix: String| Problem {
        file: s.config_path.clone(),
        key: key.to_string(),
        line: s.key_lines.get(key).copied(),
        column: None,
        message,
        fix: Some(fix),
    };
    let ctx = f.cfg.max_position_embeddings as u64;
    if s.sequence_len > ctx {
        errors.push(problem(
            "sequence_len",
            format!(
                "{} is longer than the model's context: max_position_embeddings is {ctx} in {}",
                s.sequence_len,
                f.from.display()
            ),
            format!(
                "lower sequence_len to {ctx} or less (kiln does not implement rope_scaling yet)"
            ),
        ));
    }
    let lora = &s.train.lora;
    if s.train.adapter.is_some() && !lora.lora_target_linear {
        let unknown: Vec<&String> = lora
            .lora_target_modules
            .iter()
            .filter(|m| !LINEAR_LAYERS.contains(&m.as_str()))
            .collect();
        if !unknown.is_empty() {
            let names: Vec<String> = unknown.iter().map(|m| format!("`{m}`")).collect();
            errors.push(problem(
                "lora_target_modules",
                format!(
                    "{} {} no layer of this {} model (a LoRA there would train nothing)",
                    names.join(", "),
                    if names.len() == 1 { "matches" } else { "match" },
                    f.cfg.architecture
                ),
                format!(
                    "its linear layers are {}; or set lora_target_linear: true",
                    LINEAR_LAYERS.join(", ")
                ),
            ));
        }
    }
    if let Some((file, shapes)) = &f.shapes {
        if let Some(m) = shape_mismatch(&f.cfg, shapes) {
            errors.push(problem(
                "base_model",
                format!("{}: {m}", file.display()),
                format!(
                    "{} does not describe these weights: use the config.json that came with them",
                    f.from.display()
                ),
            ));
        }
    }
    (errors, warnings)
}

fn facts(src: &ModelSource) -> Option<Facts> {
    match src {
        ModelSource::LocalDir(dir) => {
            let from = dir.join("config.json");
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&from).ok()?).ok()?;
            let cfg = LlamaConfig::from_hf(&v).ok()?;
            Some(Facts {
                shapes: dir_shapes(dir),
                from,
                cfg,
            })
        }
        ModelSource::Gguf(p) => {
            let mut f = std::io::BufReader::new(std::fs::File::open(p).ok()?);
            let c = candle_core::quantized::gguf_file::Content::read(&mut f).ok()?;
            let cfg =
                LlamaConfig::from_gguf(&c, c.tensor_infos.contains_key("output.weight")).ok()?;
            Some(Facts {
                from: p.clone(),
                cfg,
                shapes: None,
            })
        }
        ModelSource::Hub { .. } => None,
    }
}

/// Tensor shapes of a directory's safetensors files, from their headers (8-byte length, JSON).
fn dir_shapes(dir: &Path) -> Option<(PathBuf, BTreeMap<String, Vec<u64>>)> {
    let single = dir.join("model.safetensors");
    let files: Vec<PathBuf> = if single.exists() {
        vec![single.clone()]
    } else {
        let idx = dir.join("model.safetensors.index.json");
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(idx).ok()?).ok()?;
        let mut names: Vec<String> = v["weight_map"]
            .as_object()?
            .values()
            .filter_map(|f| f.as_str().map(String::from))
            .collect();
        names.sort();
        names.dedup();
        names.into_iter().map(|n| dir.join(n)).collect()
    };
    let mut shapes = BTreeMap::new();
    for f in &files {
        use std::io::Read;
        let mut r = std::fs::File::open(f).ok()?;
        let mut len = [0u8; 8];
        r.read_exact(&mut len).ok()?;
        let n = u64::from_le_bytes(len);
        if n > 100 << 20 {
            return None;
        }
        let mut head = vec![0u8; n as usize];
        r.read_exact(&mut head).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&head).ok()?;
        for (name, t) in v.as_object()? {
            if let Some(shape) = t["shape"].as_array() {
                shapes.insert(
                    name.clone(),
                    shape.iter().filter_map(|d| d.as_u64()).collect(),
                );
            }
        }
    }
    let shown = if files.len() == 1 {
        files[0].clone()
    } else {
        dir.to_path_buf()
    };
    Some((shown, shapes))
}

/// The first tensor whose shape disagrees with what `cfg` implies (or that is missing).
fn shape_mismatch(cfg: &LlamaConfig, shapes: &BTreeMap<String, Vec<u64>>) -> Option<String> {
    let (h, v, i) = (
        cfg.hidden_size as u64,
        cfg.vocab_size as u64,
        cfg.intermediate_size as u64,
    );
    let hd = cfg.head_dim() as u64;
    let q = cfg.num_attention_heads as u64 * hd;
    let kv = cfg.num_key_value_heads as u64 * hd;
    let mut want: Vec<(String, Vec<u64>, &str)> = vec![(
        "model.embed_tokens.weight".into(),
        vec![v, h],
        "vocab_size × hidden_size",
    )];
    if !cfg.tie_word_embeddings {
        want.push((
            "lm_head.weight".into(),
            vec![v, h],
            "vocab_size × hidden_size",
        ));
    }
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        want.extend([
            (
                format!("{p}.self_attn.q_proj.weight"),
                vec![q, h],
                "heads·head_dim × hidden_size",
            ),
            (
                format!("{p}.self_attn.k_proj.weight"),
                vec![kv, h],
                "kv_heads·head_dim × hidden_size",
            ),
            (
                format!("{p}.self_attn.v_proj.weight"),
                vec![kv, h],
                "kv_heads·head_dim × hidden_size",
            ),
            (
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, q],
                "hidden_size × heads·head_dim",
            ),
            (
                format!("{p}.mlp.gate_proj.weight"),
                vec![i, h],
                "intermediate_size × hidden_size",
            ),
            (
                format!("{p}.mlp.up_proj.weight"),
                vec![i, h],
                "intermediate_size × hidden_size",
            ),
            (
                format!("{p}.mlp.down_proj.weight"),
                vec![h, i],
                "hidden_size × intermediate_size",
            ),
        ]);
    }
    // Weights named otherwise (no `model.` prefix, another family's layout) are not judged.
    if !shapes.contains_key("model.embed_tokens.weight") {
        return None;
    }
    for (name, shape, what) in want {
        match shapes.get(&name) {
            None => {
                return Some(format!(
                    "no tensor {name}, which config.json's num_hidden_layers {} implies",
                    cfg.num_hidden_layers
                ))
            }
            Some(got) if *got != shape => {
                return Some(format!(
                    "{name} is {got:?}, but config.json implies {shape:?} ({what})"
                ))
            }
            Some(_) => {}
        }
    }
    None
}
