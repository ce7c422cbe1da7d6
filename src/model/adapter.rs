//! PEFT LoRA adapters read back from disk (`adapter_model.safetensors` + `adapter_config.json`),
//! applied to a loaded model (unmerged, for inference and evaluation) or merged into its weights:
//! W' = W + s·B·A (DoRA: rescaled per row to the trained magnitude) with s = alpha/r (alpha/√r under rsLoRA), r and alpha per module when the
//! adapter carries `rank_pattern` / `alpha_pattern`.

use super::llama::LoraDelta;
use super::{Llama, ModelError};
use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// One module's low-rank pair and its scale.
pub struct ModuleDelta {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    /// DoRA's magnitude vector (out,), when the adapter is a DoRA one.
    pub magnitude: Option<Tensor>,
}

/// A LoRA adapter keyed by HF module path (`model.layers.0.self_attn.q_proj`).
pub struct PeftAdapter {
    pub dir: PathBuf,
    pub modules: BTreeMap<String, ModuleDelta>,
    /// `modules_to_save`: whole tensors that replace the base model's (HF tensor name, e.g.
    /// `model.norm.weight`).
    pub saved: BTreeMap<String, Tensor>,
}

/// Does PEFT's module name `pattern` (`lm_head`, `norm`, `model.norm`) select `module`?
pub fn module_matches(module: &str, pattern: &str) -> bool {
    module == pattern || module.ends_with(&format!(".{pattern}"))
}

/// `modules_to_save` on a model whose head is its embedding matrix: PEFT trains a separate copy
/// of one of them, which kiln's tied model cannot hold.
pub fn check_tied_modules_to_save(tied: bool, names: &[String]) -> Result<(), String> {
    if let Some(n) = names
        .iter()
        .find(|n| tied && (n.as_str() == "lm_head" || n.ends_with("embed_tokens")))
    {
        return Err(format!(
            "modules_to_save `{n}`: this model ties lm_head to embed_tokens, so a separately trained copy of one is not supported yet"
        ));
    }
    Ok(())
}

fn err(path: &Path, message: impl std::fmt::Display) -> ModelError {
    ModelError::Load {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// The value of a PEFT pattern map (`rank_pattern`, `alpha_pattern`) that applies to a module:
/// a key matches when the module path equals it or ends with `.key`.
fn pattern_value(cfg: &Value, field: &str, module: &str) -> Option<f64> {
    let map = cfg.get(field)?.as_object()?;
    map.iter()
        .find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}")))
        .and_then(|(_, v)| v.as_f64())
}

impl PeftAdapter {
    /// Reads a PEFT adapter directory. Refuses what it cannot apply faithfully (DoRA, extra
    /// trained modules, fan-in/fan-out layouts) rather than applying part of it.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let cp = dir.join(ADAPTER_CONFIG);
        let bytes = std::fs::read(&cp).map_err(|e| err(&cp, e))?;
        let cfg: Value = serde_json::from_slice(&bytes).map_err(|e| err(&cp, e))?;
        let peft_type = cfg["peft_type"].as_str().unwrap_or("LORA");
        if !peft_type.eq_ignore_ascii_case("lora") {
            return Err(err(
                &cp,
                format!("peft_type {peft_type} is not supported; kiln applies LoRA adapters"),
            ));
        }
        let dora = cfg["use_dora"].as_bool() == Some(true);
        if cfg["fan_in_fan_out"].as_bool() == Some(true) {
            return Err(err(&cp, "fan_in_fan_out adapters are not supported yet"));
        }
        let alpha = cfg["lora_alpha"]
            .as_f64()
            .ok_or_else(|| err(&cp, "no `lora_alpha`"))?;
        let rslora = cfg["use_rslora"].as_bool().unwrap_or(false);
        let wp = dir.join(ADAPTER_WEIGHTS);
        if !wp.exists() {
            let hint = if dir.join("adapter_model.bin").exists() {
                "; adapter_model.bin (pickle) is not read, save with safe_serialization=True"
            } else {
                ""
            };
            return Err(err(&wp, format!("no such file{hint}")));
        }
        let tensors = candle_core::safetensors::load(&wp, device).map_err(|e| err(&wp, e))?;
        let to_save: Vec<String> = cfg["modules_to_save"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let mut saved: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut pairs: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        let mut magnitudes: BTreeMap<String, Tensor> = BTreeMap::new();
        for (name, t) in tensors {
            let rest = name.strip_prefix("base_model.model.").unwrap_or(&name);
            let magnitude = rest
                .strip_suffix(".lora_magnitude_vector")
                .or_else(|| rest.strip_suffix(".lora_magnitude_vector.weight"));
            if let Some(m) = magnitude {
                magnitudes.insert(m.to_string(), t.to_dtype(DType::F32)?.flatten_all()?);
                continue;
            }
            let (module, which) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
                (m, 0)
            } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
                (m, 1)
            } else if rest
                .strip_suffix(".weight")
                .or_else(|| rest.strip_suffix(".bias"))
                .is_some_and(|m| to_save.iter().any(|p| module_matches(m, p)))
            {
                saved.insert(rest.to_string(), t.to_dtype(DType::F32)?);
                continue;
            } else {
                return Err(err(
                    &wp,
                    format!(
                        "tensor `{name}` is not a LoRA A/B weight (modules_to_save and trainable \
                         tokens are not supported yet)"
                    ),
                ));
            };
            let t = t.to_dtype(DType::F32)?;
            let e = pairs.entry(module.to_string()).or_default();
            if which == 0 {
                e.0 = Some(t);
            } else {
                e.1 = Some(t);
            }
        }
        let mut modules = BTreeMap::new();
        for (module, pair) in pairs {
            let (Some(a), Some(b)) = pair else {
                return Err(err(
                    &wp,
                    format!("`{module}` has only one of lora_A / lora_B"),
                ));
            };
            let (r, _) = a.dims2()?;
            let (_, rb) = b.dims2()?;
            if r != rb || r == 0 {
                return Err(err(
                    &wp,
                    format!("`{module}`: lora_A has rank {r} but lora_B has rank {rb}"),
                ));
            }
            let alpha = pattern_value(&cfg, "alpha_pattern", &module).unwrap_or(alpha);
            let scale = if rslora {
                alpha / (r as f64).sqrt()
            } else {
                alpha / r as f64
            };
            let magnitude = magnitudes.remove(&module);
            match (&magnitude, dora) {
                (None, true) => {
                    return Err(err(
                        &wp,
                        format!("a DoRA adapter (use_dora: true) without lora_magnitude_vector for `{module}`"),
                    ))
                }
                (Some(m), _) if m.dims1()? != b.dims2()?.0 => {
                    return Err(err(
                        &wp,
                        format!("`{module}`: the DoRA magnitude vector does not match lora_B's rows"),
                    ))
                }
                _ => {}
            }
            modules.insert(
                module,
                ModuleDelta {
                    a,
                    b,
                    scale,
                    magnitude,
                },
            );
        }
        if let Some(m) = magnitudes.keys().next() {
            return Err(err(
                &wp,
                format!("`{m}` has a DoRA magnitude but no lora_A / lora_B"),
            ));
        }
        if modules.is_empty() {
            return Err(err(&wp, "the adapter holds no LoRA weights"));
        }
        if let Some(p) = to_save.iter().find(|p| {
            !saved
                .keys()
                .any(|k| module_matches(k.rsplit_once('.').map_or(k.as_str(), |x| x.0), p))
        }) {
            return Err(err(
                &wp,
                format!("adapter_config.json lists `{p}` in modules_to_save but the weights hold no tensor for it"),
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            modules,
            saved,
        })
    }

    /// Checks every module exists in `model` with matching shapes.
    fn check(&self, model: &mut Llama) -> Result<(), ModelError> {
        let to_save: Vec<String> = self
            .saved
            .keys()
            .map(|k| k.rsplit_once('.').map_or(k.clone(), |x| x.0.to_string()))
            .collect();
        check_tied_modules_to_save(model.lm_head.is_none(), &to_save)
            .map_err(|m| err(&self.dir, m))?;
        let tensors: HashMap<String, Vec<usize>> = model
            .tensors_mut()
            .into_iter()
            .map(|(n, t)| (n, t.dims().to_vec()))
            .collect();
        for (name, t) in &self.saved {
            match tensors.get(name) {
                Some(d) if d.as_slice() == t.dims() => {}
                Some(d) => {
                    return Err(err(
                        &self.dir,
                        format!("`{name}` is {d:?} in the base model but {:?} in the adapter; was it trained on another model?", t.dims()),
                    ))
                }
                None => {
                    return Err(err(
                        &self.dir,
                        format!("the adapter saves `{name}`, which the base model does not have"),
                    ))
                }
            }
        }
        let mut shapes: HashMap<String, (usize, usize)> = HashMap::new();
        for (path, lin) in model.linears_mut() {
            shapes.insert(path, lin.weight.dims2()?);
        }
        for (m, d) in &self.modules {
            let Some(&(out_f, in_f)) = shapes.get(m) else {
                return Err(err(
                    &self.dir,
                    format!("the adapter targets `{m}`, which the base model does not have; was it trained on another model?"),
                ));
            };
            let (_, a_in) = d.a.dims2()?;
            let (b_out, _) = d.b.dims2()?;
            if a_in != in_f || b_out != out_f {
                return Err(err(
                    &self.dir,
                    format!(
                        "`{m}` is {out_f}×{in_f} in the base model but the adapter's delta is \
                         {b_out}×{a_in}; was it trained on another model?"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Attaches the deltas unmerged (frozen: the Vars are not trained).
    pub fn apply(&self, model: &mut Llama) -> Result<(), ModelError> {
        self.check(model)?;
        self.replace_saved(model);
        for (path, lin) in model.linears_mut() {
            if let Some(d) = self.modules.get(&path) {
                lin.lora = Some(LoraDelta {
                    a: Var::from_tensor(&d.a)?,
                    b: Var::from_tensor(&d.b)?,
                    scale: d.scale,
                    magnitude: d.magnitude.as_ref().map(Var::from_tensor).transpose()?,
                    dropout: None,
                });
            }
        }
        Ok(())
    }

    /// Folds the deltas into the base weights, computed in f32: W' = W + s·B·A, and for DoRA
    /// W' = m / ‖W + s·B·A‖ (per row) · (W + s·B·A).
    pub fn merge_into(&self, model: &mut Llama) -> Result<(), ModelError> {
        self.check(model)?;
        self.replace_saved(model);
        for (path, lin) in model.linears_mut() {
            if let Some(d) = self.modules.get(&path) {
                let delta = (d.b.matmul(&d.a)? * d.scale)?;
                // A packed (QLoRA) base is widened first: the merge is into the dequantised
                // weights, as PEFT merges into a bitsandbytes layer.
                let mut w = (lin.weight.to_f32()? + delta)?;
                if let Some(m) = &d.magnitude {
                    let norm = w.sqr()?.sum_keepdim(1)?.sqrt()?;
                    w = w.broadcast_mul(&m.unsqueeze(1)?.div(&norm)?)?;
                }
                lin.weight = w.into();
                lin.lora = None;
            }
        }
        Ok(())
    }

    /// Puts the `modules_to_save` tensors in place of the base model's.
    fn replace_saved(&self, model: &mut Llama) {
        for (name, t) in model.tensors_mut() {
            if let Some(new) = self.saved.get(&name) {
                *t = new.clone();
            }
        }
    }
}
