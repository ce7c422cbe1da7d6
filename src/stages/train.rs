//! `train`: LoRA fine-tuning of the fetched model on the packed training split.
//! Reads: every file of `fetch.model` (weights, config, tokenizer) and `pack`'s `train/`.
//! Writes a PEFT adapter: `adapter_model.safetensors` (PEFT tensor names), `adapter_config.json`,
//! plus `config.json`, `tokenizer.json`, `tokenizer_config.json` and `trainer_state.json`.

use super::{io_err, write_json, RunCx, Stage, StageError, StageKind};
use crate::config::{CadenceSettings, LoraSettings, OptimSettings, StepSettings};
use crate::data::pack::PackedSplit;
use crate::events::Event;
use crate::model::{weights, Llama, LlamaConfig, ModelError};
use crate::rng::SplitMix64;
use crate::train::pref::{pref_step, PrefMetrics, PrefMicro};
use crate::train::{attach_lora, train_step, AdamW, Batch, LoraSpec};
use candle_core::Device;
use serde::Serialize;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Instant;

/// Everything the train stage reads, and so its key: the config's training groups whole (a
/// setting added to one of them is keyed without touching this file), the seed, and whether a
/// checkpoint upstream seeds the run. Field names are Axolotl's, so a stale reason reads
/// `learning_rate changed 2e-4 → 1e-4`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Train {
    #[serde(flatten)]
    pub method: TrainMethod,
    #[serde(flatten)]
    pub optim: OptimSettings,
    #[serde(flatten)]
    pub steps: StepSettings,
    #[serde(flatten)]
    pub cadence: CadenceSettings,
    pub seed: u64,
    pub neftune_noise_alpha: Option<f64>,
    /// `unfrozen_parameters` (full fine-tuning): the weights that train; all when empty (and
    /// then absent from the key).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unfrozen_parameters: Vec<String>,
    /// How the frozen base weights are stored (f32, the default, is left out of the key).
    #[serde(skip_serializing_if = "crate::config::precision::BaseWeights::is_f32")]
    pub base_weights: crate::config::precision::BaseWeights,
    /// AdamW's moment storage (f32, the default, is left out of the key).
    #[serde(skip_serializing_if = "crate::config::precision::OptimStates::is_f32")]
    pub optimizer_states: crate::config::precision::OptimStates,
    /// `resume_from_checkpoint`: a third upstream holds the checkpoint to start from.
    #[serde(rename = "resume_from_checkpoint")]
    pub from_checkpoint: bool,
    /// `rl:` preference training's loss (absent for supervised training); a loss that compares
    /// with the reference model reads the `refscore` entry as the last upstream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rl: Option<crate::config::pref::PrefLoss>,
}

/// What trains: LoRA deltas on the frozen base, or (no `adapter`, Axolotl's meaning) every
/// weight, in which case the output is the whole model.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "adapter", rename_all = "snake_case")]
pub enum TrainMethod {
    Full,
    Lora(LoraSettings),
}

/// What the train stage reads that does not change its output.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainNeutral {
    /// How often a `TrainLog` event is emitted; `trainer_state.json` records every step
    /// whatever this is, so the bytes do not depend on it.
    pub logging_steps: u64,
    /// `gradient_checkpointing`: the same gradients, bit for bit (tests/train.rs), for one
    /// layer's activations in memory instead of all of them.
    pub gradient_checkpointing: bool,
}

/// Mean loss over every trained token of the validation split (no gradients kept).
pub(crate) fn evaluate(
    model: &Llama,
    val: &PackedSplit,
    batch: usize,
    device: &Device,
) -> Result<Option<f64>, StageError> {
    let n = val.header.bins as usize;
    if n == 0 || val.header.trained_tokens == 0 {
        return Ok(None);
    }
    let (mut sum, mut count) = (0f64, 0usize);
    for chunk in (0..n).collect::<Vec<_>>().chunks(batch.max(1)) {
        let rows: Vec<(Vec<u32>, Vec<u8>, Vec<u32>)> = chunk.iter().map(|&b| val.row(b)).collect();
        let batch = Batch::new(&rows, device)?;
        count += batch.trained_tokens;
        sum += crate::train::loss_sum(model, &batch)?
            .detach()
            .to_scalar::<f32>()? as f64;
    }
    Ok((count > 0).then(|| sum / count as f64))
}

/// The reference scores (chosen, rejected) of the pairs of bin `b`, from the refscore entry's
/// per-sample scores.
fn bin_refs(data: &PackedSplit, scores: &[f64], b: usize) -> Vec<(f64, f64)> {
    let (s0, s1) = (data.bins[b] as usize, data.bins[b + 1] as usize);
    (s0..s1)
        .step_by(2)
        .map(|s| (scores[s], scores[s + 1]))
        .collect()
}

/// Named metric values.
type Metrics = Vec<(&'static str, f64)>;

/// TRL's per-step preference metrics, by its names (KTO: no accuracy, its KL estimate).
fn pref_metric_list(
    m: &PrefMetrics,
    loss: &crate::config::pref::PrefLoss,
    nll_loss: f64,
) -> Metrics {
    let mut v = vec![
        ("rewards/chosen", m.rewards_chosen),
        ("rewards/rejected", m.rewards_rejected),
        ("rewards/margins", m.rewards_margins),
        ("logps/chosen", m.logps_chosen),
        ("logps/rejected", m.logps_rejected),
    ];
    if loss.unpaired() {
        v.push(("kl", m.kl));
    } else {
        v.push(("rewards/accuracies", m.rewards_accuracies));
    }
    if loss.nll_weight() > 0.0 {
        v.push(("nll_loss", nll_loss));
    }
    v
}

/// The preference loss over every unit of the validation split (no gradients kept) and its
/// metrics with TRL's `eval_` names.
fn evaluate_pref(
    model: &Llama,
    val: &PackedSplit,
    scores: Option<&[f64]>,
    loss: &crate::config::pref::PrefLoss,
    batch: usize,
    device: &Device,
) -> Result<Option<(f64, Metrics)>, StageError> {
    let n = val.header.bins as usize;
    if n == 0 {
        return Ok(None);
    }
    let mut sums = crate::train::pref::MetricSums::default();
    let (mut total, mut units, mut nll, mut chosen_tokens) = (0f64, 0usize, 0f64, 0usize);
    for chunk in (0..n).collect::<Vec<_>>().chunks(batch.max(1)) {
        let rows: Vec<(Vec<u32>, Vec<u8>, Vec<u32>)> = chunk.iter().map(|&b| val.row(b)).collect();
        let b = Batch::new(&rows, device)?;
        let refs: Vec<(f64, f64)> = match scores {
            Some(sc) => chunk
                .iter()
                .flat_map(|&bin| bin_refs(val, sc, bin))
                .collect(),
            None => Vec::new(),
        };
        let labels: Vec<bool> = chunk.iter().flat_map(|&bin| bin_labels(val, bin)).collect();
        let losses = crate::train::token_losses(model, &b, None)?
            .detach()
            .flatten_all()?
            .to_vec1::<f32>()?;
        let per = crate::train::pref::sample_logps(&losses, &b.loss_weights, &b.samples);
        for (k, (l, _, _)) in crate::train::pref::score_units(loss, &per, &refs, &labels, &mut sums)
            .into_iter()
            .enumerate()
        {
            total += l;
            units += 1;
            nll -= per[2 * k].0;
            chosen_tokens += per[2 * k].1;
        }
    }
    let nll = nll / chosen_tokens.max(1) as f64;
    let total = total / units.max(1) as f64 + loss.nll_weight() * nll;
    let mut v = vec![("eval_loss", total)];
    for (name, value) in pref_metric_list(&sums.finish(loss), loss, nll) {
        let eval_name: &'static str = match name {
            "rewards/chosen" => "eval_rewards/chosen",
            "rewards/rejected" => "eval_rewards/rejected",
            "rewards/margins" => "eval_rewards/margins",
            "rewards/accuracies" => "eval_rewards/accuracies",
            "logps/chosen" => "eval_logps/chosen",
            "logps/rejected" => "eval_logps/rejected",
            "kl" => "eval_kl",
            _ => "eval_nll_loss",
        };
        v.push((eval_name, value));
    }
    Ok(Some((total, v)))
}

/// KTO: whether each unit of bin `b` is desirable (empty for pairs).
fn bin_labels(data: &PackedSplit, b: usize) -> Vec<bool> {
    if data.set.labels.is_empty() {
        return Vec::new();
    }
    let (s0, s1) = (data.bins[b] as usize, data.bins[b + 1] as usize);
    (s0..s1)
        .step_by(2)
        .map(|s| data.set.labels.get(s / 2).is_some_and(|&l| l == 1))
        .collect()
}

fn save_tensors(
    map: &std::collections::HashMap<String, candle_core::Tensor>,
    path: &Path,
) -> Result<(), StageError> {
    crate::model::weights::save_safetensors(map, path)
        .map_err(|e| StageError::Invalid(format!("{}: {e}", path.display())))
}

/// A checkpoint's own manifest (sizes and blake3 of its files), written and fsynced last: a
/// checkpoint is complete and intact only when every file matches it. Kept out of the published
/// entry (whose manifest covers the copies).
const CHECKPOINT_MANIFEST: &str = "kiln-checkpoint.json";

/// Fsyncs every file of a checkpoint directory, then writes and fsyncs its manifest.
fn seal_checkpoint(dir: &Path) -> Result<(), StageError> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n != CHECKPOINT_MANIFEST)
        .collect();
    names.sort();
    let mut files = Vec::new();
    for n in names {
        let p = dir.join(&n);
        let f = std::fs::File::open(&p).map_err(io_err(&p))?;
        f.sync_all().map_err(io_err(&p))?;
        let size = f.metadata().map_err(io_err(&p))?.len();
        let digest = crate::hash::hash_file(&p).map_err(io_err(&p))?;
        files.push(json!({"path": n, "size": size, "blake3": digest}));
    }
    let mp = dir.join(CHECKPOINT_MANIFEST);
    write_json(&mp, &json!({ "files": files }))?;
    std::fs::File::open(&mp)
        .and_then(|f| f.sync_all())
        .map_err(io_err(&mp))
}

/// Why a checkpoint directory cannot be resumed from, if it cannot.
fn checkpoint_damage(dir: &Path) -> Option<String> {
    let mp = dir.join(CHECKPOINT_MANIFEST);
    let m: Value = match std::fs::read(&mp).map(|b| serde_json::from_slice(&b)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return Some(format!("{CHECKPOINT_MANIFEST} is unreadable ({e})")),
        Err(_) => return Some(format!("no {CHECKPOINT_MANIFEST} (it was not finished)")),
    };
    let files = m["files"].as_array().cloned().unwrap_or_default();
    if files.is_empty() {
        return Some(format!("{CHECKPOINT_MANIFEST} lists no files"));
    }
    for f in files {
        let name = f["path"].as_str().unwrap_or_default();
        let p = dir.join(name);
        let size = std::fs::metadata(&p).map(|m| m.len()).ok();
        if size != f["size"].as_u64() {
            return Some(format!("{name}: missing or truncated"));
        }
        match crate::hash::hash_file(&p) {
            Ok(h) if Some(h.as_str()) == f["blake3"].as_str() => {}
            _ => return Some(format!("{name}: content changed (blake3 mismatch)")),
        }
    }
    None
}

/// The checkpoint to resume from, of those before step `total`: the highest intact one below
/// every damaged one, so that training passes a damaged checkpoint's step again and rewrites it
/// (the finished entry holds every kept checkpoint, byte-identical to an uninterrupted run's).
/// `checkpoint-N.partial` directories never parse as a step. Damaged ones are said through `warn`.
fn resume_point(
    dir: &Path,
    total: u64,
    warn: &mut dyn FnMut(String),
) -> Option<(u64, std::path::PathBuf)> {
    let mut best = None;
    let mut damaged = false;
    for (n, p) in checkpoints(dir).into_iter().filter(|(n, _)| *n < total) {
        match checkpoint_damage(&p) {
            None if !damaged => best = Some((n, p)),
            None => {}
            Some(why) => {
                let then = match (&best, damaged) {
                    (_, true) => "it is written again too".to_string(),
                    (Some((m, _)), false) => {
                        format!("resuming from checkpoint-{m}, so that it is written again")
                    }
                    (None, false) => {
                        "training from the start, so that it is written again".to_string()
                    }
                };
                warn(format!("checkpoint-{n} is damaged ({why}); {then}"));
                damaged = true;
            }
        }
    }
    best
}

fn checkpoints(dir: &Path) -> Vec<(u64, std::path::PathBuf)> {
    let mut v: Vec<(u64, std::path::PathBuf)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().to_string();
                    let n = name.strip_prefix("checkpoint-")?.parse::<u64>().ok()?;
                    Some((n, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

impl From<candle_core::Error> for StageError {
    fn from(e: candle_core::Error) -> Self {
        StageError::Invalid(e.to_string())
    }
}

impl From<ModelError> for StageError {
    fn from(e: ModelError) -> Self {
        StageError::Invalid(e.to_string())
    }
}

/// Loads the model to train, its frozen block linear weights packed as `base` says (one tensor
/// at a time, see model/load.rs), with a line saying what was stored.
pub fn load_model_as(
    dir: &Path,
    base: crate::config::precision::BaseWeights,
) -> Result<(Llama, Option<String>), StageError> {
    let Some(fmt) = crate::model::packed::PackFormat::for_base(base) else {
        return Ok((load_model(dir, &Device::Cpu)?, None));
    };
    let cfg = if dir.join("model.gguf").exists() {
        None
    } else {
        Some(read_config(dir)?)
    };
    let (model, summary) = crate::model::load::load_packed(dir, cfg, fmt)?;
    Ok((model, Some(stored_line(base, &summary))))
}

/// A model directory's config.json as kiln's model config.
fn read_config(dir: &Path) -> Result<LlamaConfig, StageError> {
    let p = dir.join("config.json");
    let v: Value = serde_json::from_slice(&std::fs::read(&p).map_err(io_err(&p))?)
        .map_err(|e| StageError::Invalid(format!("{}: {e}", p.display())))?;
    Ok(LlamaConfig::from_hf(&v)?)
}

/// Loads a quantize stage's entry (see stages/quantize.rs), with the line saying what it holds.
pub fn load_quantized(
    dir: &Path,
    base: crate::config::precision::BaseWeights,
) -> Result<(Llama, Option<String>), StageError> {
    let (model, summary) = crate::model::load::load_packed_file(
        &dir.join(crate::model::load::PACKED_FILE),
        read_config(dir)?,
    )?;
    Ok((model, Some(stored_line(base, &summary))))
}

fn stored_line(
    base: crate::config::precision::BaseWeights,
    summary: &crate::model::load::PackedSummary,
) -> String {
    format!(
        "base weights: {} asked; the block linear weights are stored {} (embeddings, norms and the LoRA matrices, gradients and optimizer state in f32; products computed in f32)",
        base.describe(),
        summary.describe()
    )
}

/// Loads the model from a fetched model directory (a GGUF, or config.json + safetensors).
pub fn load_model(dir: &Path, device: &Device) -> Result<Llama, StageError> {
    let gguf = dir.join("model.gguf");
    let (cfg, w) = if gguf.exists() {
        weights::load_gguf(&gguf, device)?
    } else {
        (
            read_config(dir)?,
            weights::load_safetensors_dir(dir, device)?,
        )
    };
    Ok(Llama::from_weights(cfg, w, device)?)
}

impl Train {
    fn is_full(&self) -> bool {
        self.method == TrainMethod::Full
    }

    /// The LoRA layers to attach, as the training code takes them.
    fn lora_spec(l: &LoraSettings) -> LoraSpec {
        LoraSpec {
            r: l.lora_r as usize,
            alpha: l.lora_alpha,
            target_modules: l.lora_target_modules.clone(),
            target_linear: l.lora_target_linear || l.lora_target_modules.is_empty(),
            rslora: l.peft_use_rslora,
            dora: l.peft_use_dora,
        }
    }

    /// The trainable variables with their names: LoRA deltas, or every weight (full).
    fn trainable(
        &self,
        model: &mut Llama,
        device: &Device,
    ) -> Result<Vec<(String, candle_core::Var)>, StageError> {
        Ok(match &self.method {
            TrainMethod::Full => {
                let pats = self
                    .unfrozen_parameters
                    .iter()
                    .map(|p| {
                        regex::Regex::new(&format!("^(?:{p})")).map_err(|e| {
                            StageError::Invalid(format!("unfrozen_parameters `{p}`: {e}"))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let vars = crate::train::attach_full_matching(model, &pats)?;
                if vars.is_empty() {
                    return Err(StageError::Invalid(format!(
                        "unfrozen_parameters {:?} match no weight of the model (names look like model.layers.0.mlp.down_proj.weight, lm_head.weight)",
                        self.unfrozen_parameters
                    )));
                }
                vars
            }
            TrainMethod::Lora(l) => {
                let mut vars = attach_lora(model, &Self::lora_spec(l), self.seed, device)?;
                crate::train::enable_lora_dropout(model, l.lora_dropout);
                vars.extend(crate::train::attach_modules_to_save(
                    model,
                    &l.lora_modules_to_save,
                )?);
                vars
            }
        })
    }

    /// The weights file of a checkpoint.
    fn weights_file(&self) -> &'static str {
        if self.is_full() {
            "model.safetensors"
        } else {
            "adapter_model.safetensors"
        }
    }

    /// PEFT's adapter_config.json (null for full fine-tuning).
    fn adapter_config(&self) -> Value {
        let TrainMethod::Lora(l) = &self.method else {
            return Value::Null;
        };
        let spec = Self::lora_spec(l);
        let mut targets: Vec<String> = if spec.target_linear {
            crate::model::llama::LINEAR_LAYERS
                .iter()
                .map(|s| s.to_string())
                .collect()
        } else {
            spec.target_modules.clone()
        };
        targets.sort();
        let mut cfg = json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": null,
            "r": spec.r, "lora_alpha": spec.alpha, "lora_dropout": l.lora_dropout,
            "target_modules": targets, "bias": "none", "fan_in_fan_out": false,
            "inference_mode": true, "init_lora_weights": true, "use_rslora": spec.rslora,
            "use_dora": spec.dora,
            "modules_to_save": if l.lora_modules_to_save.is_empty() { Value::Null } else { json!(l.lora_modules_to_save) },
            "revision": null
        });
        // Which storage of the base the adapter was trained against (QLoRA: merge into the
        // same, widened). Absent for an f32 base, so those adapters are as before.
        if !self.base_weights.is_f32() {
            cfg["kiln_base_weights"] = json!(self.base_weights);
        }
        cfg
    }

    /// `checkpoint-N/`: adapter, optimizer moments, step and log history; written beside and
    /// renamed into place (`rotate_checkpoints` then applies `save_total_limit`).
    fn write_checkpoint(
        &self,
        work: &Path,
        step: u64,
        vars: &[(String, candle_core::Var)],
        opt: &AdamW,
        adapter_cfg: &Value,
        history: &[Value],
    ) -> Result<(), StageError> {
        let tmp = work.join(format!("checkpoint-{step}.partial"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        let a: std::collections::HashMap<String, candle_core::Tensor> = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        save_tensors(&a, &tmp.join(self.weights_file()))?;
        let mut o = std::collections::HashMap::new();
        for i in 0..opt.vars.len() {
            match &opt.quantised[i] {
                // Quantised moments: codes (u8) and block scales.
                Some(q) => {
                    let dev = &Device::Cpu;
                    let u8s = |v: &Vec<u8>| candle_core::Tensor::from_vec(v.clone(), v.len(), dev);
                    let f32s =
                        |v: &Vec<f32>| candle_core::Tensor::from_vec(v.clone(), v.len(), dev);
                    o.insert(format!("m.{i}.codes"), u8s(&q.m)?);
                    o.insert(format!("v.{i}.codes"), u8s(&q.v)?);
                    o.insert(format!("m.{i}.absmax"), f32s(&q.m_absmax)?);
                    o.insert(format!("v.{i}.absmax"), f32s(&q.v_absmax)?);
                }
                None => {
                    o.insert(format!("m.{i}"), opt.m[i].clone());
                    o.insert(format!("v.{i}"), opt.v[i].clone());
                }
            }
        }
        save_tensors(&o, &tmp.join("optimizer.safetensors"))?;
        if !self.is_full() {
            write_json(&tmp.join("adapter_config.json"), adapter_cfg)?;
        }
        write_json(
            &tmp.join("trainer_state.json"),
            &json!({"global_step": step, "log_history": history}),
        )?;
        seal_checkpoint(&tmp)?;
        let dest = work.join(format!("checkpoint-{step}"));
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
        if let Ok(d) = std::fs::File::open(work) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Removes the oldest checkpoints beyond `save_total_limit`, never `keep` (the best one).
    fn rotate_checkpoints(&self, work: &Path, keep: Option<u64>) {
        if let Some(limit) = self.cadence.save_total_limit.filter(|l| *l > 0) {
            // The best checkpoint (load_best_model_at_end) is kept beyond the limit, as HF keeps it.
            let all: Vec<_> = checkpoints(work)
                .into_iter()
                .filter(|(n, _)| Some(*n) != keep)
                .collect();
            let limit = limit as usize - usize::from(keep.is_some() && limit > 1);
            let excess = all.len().saturating_sub(limit);
            for (_, p) in all.into_iter().take(excess) {
                let _ = std::fs::remove_dir_all(p);
            }
        }
    }

    /// Each trained variable's learning-rate multiplier: LoRA+ (`loraplus_lr_ratio`) gives the
    /// B matrices and 1-d vectors (DoRA magnitudes, norms trained whole) the ratio, as PEFT's
    /// `create_loraplus_optimizer` groups them; 1 otherwise.
    fn lr_scales(&self, vars: &[(String, candle_core::Var)]) -> Vec<f64> {
        vars.iter()
            .map(|(name, v)| match self.optim.loraplus_lr_ratio {
                Some(r) if name.contains("lora_B") || v.as_tensor().rank() == 1 => r,
                _ => 1.0,
            })
            .collect()
    }

    /// Learning rate at optimizer step `step` (0-based) of `total`: linear warmup, then the
    /// schedule (cosine to 0, linear to 0, or constant).
    pub fn lr_at(&self, step: u64, total: u64) -> f64 {
        let o = &self.optim;
        let warm = o
            .warmup_steps
            .unwrap_or_else(|| (o.warmup_ratio.unwrap_or(0.0) * total as f64).ceil() as u64);
        if step < warm {
            let f = (step + 1) as f64 / warm as f64;
            return o.learning_rate * if o.lr_quadratic_warmup { f * f } else { f };
        }
        let progress = (step - warm) as f64 / (total.saturating_sub(warm)).max(1) as f64;
        match o.lr_scheduler.as_str() {
            "cosine" => {
                let min = o.cosine_min_lr_ratio.unwrap_or(0.0);
                let factor = match o.cosine_constant_lr_ratio {
                    // Axolotl's warmup-decay-constant schedule: the cosine reaches `min` at
                    // int(total × ratio) steps and holds it.
                    Some(c) => {
                        let until = (total as f64 * c) as u64;
                        let p = (step.min(until) as f64 - warm as f64)
                            / until.saturating_sub(warm).max(1) as f64;
                        ((1.0 - min) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())).max(0.0)
                            + min
                    }
                    None => {
                        (1.0 - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) + min
                    }
                };
                o.learning_rate * factor
            }
            "linear" => o.learning_rate * (1.0 - progress),
            _ => o.learning_rate,
        }
    }
}

impl Stage for Train {
    const KIND: StageKind = StageKind::Train;
    // v2: frozen-weight linear op (gemm) for base and head matmuls; low bits may differ.
    // v3: fused cross-entropy and RMSNorm ops (different summation order; low bits differ).
    // v6: LoRA and trained linear layers as single ops on kiln's sgemm (low bits differ);
    //     safetensors written with {"format": "pt"} metadata.
    // v7: the key is the canonical encoding of the typed inputs (kiln.stage/2); output unchanged.
    const VERSION: u32 = 7;

    const USES_ALL_CORES: bool = true;
    type Neutral = TrainNeutral;

    fn run(&self, neutral: &TrainNeutral, cx: &mut RunCx<'_>) -> Result<(), StageError> {
        // Upstream: the model, the pack, the checkpoint to resume from (if any), the quantize
        // entry (for a packed base).
        let packed = !self.base_weights.is_f32();
        let needs_ref = self.rl.is_some_and(|l| l.needs_reference());
        let mut ups = cx.upstream.iter();
        let mut next = |what: &str| {
            ups.next()
                .ok_or_else(|| StageError::Invalid(format!("train needs {what} upstream")))
        };
        let model_up = next("the model")?;
        let pack_up = next("the pack")?;
        let given = if self.from_checkpoint {
            Some(next("the checkpoint to resume from")?)
        } else {
            None
        };
        let quant = if packed {
            Some(next("the quantized base")?)
        } else {
            None
        };
        let refs_up = if needs_ref {
            Some(next("the reference scores (refscore)")?)
        } else {
            None
        };
        if ups.next().is_some() {
            return Err(StageError::Invalid(
                "train was given more upstream entries than it reads".into(),
            ));
        }
        let device = Device::Cpu;
        let (mut model, stored) = match quant {
            Some(q) => load_quantized(&q.dir, self.base_weights)?,
            None => load_model_as(&model_up.dir, self.base_weights)?,
        };
        if let Some(message) = stored {
            (cx.emit)(Event::Note {
                message: format!("{}: {message}", cx.name),
            });
        }
        let vars = self.trainable(&mut model, &device)?;
        if neutral.gradient_checkpointing {
            model.checkpoint = Some(Default::default());
        }
        let mut opt = AdamW::new(
            vars.iter().map(|(_, v)| v.clone()).collect(),
            self.optim.weight_decay,
        )?
        .with_states(self.optimizer_states)?;
        (opt.beta1, opt.beta2, opt.eps) = self.optim.betas();
        opt.lr_scale = self.lr_scales(&vars);
        if !self.optimizer_states.is_f32() {
            let f32_bytes: usize = vars.iter().map(|(_, v)| v.elem_count() * 8).sum();
            (cx.emit)(Event::Note {
                message: format!(
                    "{}: optimizer moments stored {:?}: {:.1} MB (f32 moments would take {:.1} MB)",
                    cx.name,
                    self.optimizer_states,
                    opt.state_bytes() as f64 / 1e6,
                    f32_bytes as f64 / 1e6
                ),
            });
        }
        let data = PackedSplit::read(&pack_up.dir.join("train"))?;
        if self.rl.is_some() != data.header.paired {
            return Err(StageError::Invalid(if data.header.paired {
                "the pack holds preference pairs, and this config does supervised training (no `rl:`)".into()
            } else {
                "rl: preference training needs preference pairs, and the pack holds single samples"
                    .into()
            }));
        }
        let ref_scores = match refs_up {
            Some(r) => Some(super::refscore::read_scores(
                &r.dir,
                "train",
                data.set.len(),
            )?),
            None => None,
        };
        let n_bins = data.header.bins as usize;
        let mbs = self.steps.micro_batch_size.max(1) as usize;
        let gas = self.steps.gradient_accumulation_steps.max(1) as usize;
        let micro_per_epoch = n_bins.div_ceil(mbs);
        let steps_per_epoch = micro_per_epoch.div_ceil(gas).max(1);
        let total = self
            .steps
            .max_steps
            .unwrap_or_else(|| (self.steps.num_epochs * steps_per_epoch as f64).ceil() as u64)
            .max(1);
        let eval_every = match (self.cadence.eval_steps, self.cadence.evals_per_epoch) {
            (Some(x), _) if x >= 1.0 => x as u64,
            (Some(x), _) if x > 0.0 => ((x * total as f64).ceil() as u64).max(1),
            (_, Some(n)) if n > 0 => (steps_per_epoch as u64).div_ceil(n).max(1),
            _ => 0,
        };
        let val = if eval_every > 0 {
            Some(PackedSplit::read(&pack_up.dir.join("val"))?)
        } else {
            None
        };
        let val_scores = match (refs_up, &val) {
            (Some(r), Some(v)) => Some(super::refscore::read_scores(&r.dir, "val", v.set.len())?),
            _ => None,
        };
        let save_every = match (self.cadence.save_steps, self.cadence.saves_per_epoch) {
            (Some(x), _) if x >= 1.0 => x as u64,
            (Some(x), _) if x > 0.0 => ((x * total as f64).ceil() as u64).max(1),
            (_, Some(n)) if n > 0 => (steps_per_epoch as u64).div_ceil(n).max(1),
            _ => 0,
        };
        // The micro-batch stream: bins in pack order for epoch 0, reshuffled with seed for later
        // epochs.
        let mut order: Vec<usize> = Vec::new();
        let mut epoch = 0u64;
        let mut next_bin = |order: &mut Vec<usize>| -> usize {
            if order.is_empty() {
                *order = (0..n_bins).rev().collect();
                if epoch > 0 {
                    SplitMix64::new(self.seed.wrapping_add(epoch)).shuffle(order);
                }
                epoch += 1;
            }
            order.pop().unwrap_or(0)
        };
        let adapter_cfg = self.adapter_config();
        let mut history: Vec<Value> = Vec::new();
        let mut start = 0u64;
        // Resume: a checkpoint left by an interrupted build of this same key, else the one
        // `resume_from_checkpoint` names (fetched into the cache as this stage's input).
        let given = match given {
            Some(c) => {
                let sp = c.dir.join("trainer_state.json");
                let st: Value =
                    serde_json::from_slice(&std::fs::read(&sp).map_err(io_err(&sp))?)
                        .map_err(|e| StageError::Invalid(format!("{}: {e}", sp.display())))?;
                let n = st["global_step"].as_u64().ok_or_else(|| {
                    StageError::Invalid(format!("{}: no global_step", sp.display()))
                })?;
                if n >= total {
                    return Err(StageError::Invalid(format!(
                        "resume_from_checkpoint: the checkpoint is at step {n}, but this run has only {total} steps; raise max_steps or num_epochs"
                    )));
                }
                Some((n, c.dir.clone()))
            }
            None => None,
        };
        let own = {
            let (name, emit) = (cx.name, &mut *cx.emit);
            resume_point(cx.work, total, &mut |m| {
                emit(Event::Warning {
                    message: format!("{name}: {m}"),
                })
            })
        };
        let resume = match (own, given) {
            (Some(o), Some(g)) => Some(if o.0 >= g.0 { o } else { g }),
            (o, g) => o.or(g),
        };
        if let Some((n, ck)) = resume {
            (cx.emit)(Event::Warning {
                message: format!(
                    "{}: resumed from checkpoint-{n} (step {n} of {total})",
                    cx.name
                ),
            });
            let a = candle_core::safetensors::load(ck.join(self.weights_file()), &device)?;
            for (name, v) in &vars {
                let t = a
                    .get(name)
                    .ok_or_else(|| StageError::Invalid(format!("{}: no {name}; the checkpoint comes from a run with other adapter settings (lora_target_modules, full fine-tuning?)", ck.display())))?;
                if t.shape() != v.shape() {
                    return Err(StageError::Invalid(format!(
                        "{}: {name} has shape {:?}, this run's has {:?}; the checkpoint comes from a run with another lora_r or model",
                        ck.display(),
                        t.dims(),
                        v.dims()
                    )));
                }
                v.set(t)?;
            }
            let o = candle_core::safetensors::load(ck.join("optimizer.safetensors"), &device)?;
            for i in 0..opt.vars.len() {
                let get = |k: String| {
                    o.get(&k)
                        .cloned()
                        .ok_or_else(|| StageError::Invalid(format!("{}: no {k}", ck.display())))
                };
                match &mut opt.quantised[i] {
                    Some(q) => {
                        let (mc, vc) = (get(format!("m.{i}.codes"))?, get(format!("v.{i}.codes"))?);
                        let (ma, va) =
                            (get(format!("m.{i}.absmax"))?, get(format!("v.{i}.absmax"))?);
                        let (mc, vc) = (mc.to_vec1::<u8>()?, vc.to_vec1::<u8>()?);
                        let (ma, va) = (ma.to_vec1::<f32>()?, va.to_vec1::<f32>()?);
                        if mc.len() != q.m.len()
                            || vc.len() != q.v.len()
                            || ma.len() != q.m_absmax.len()
                            || va.len() != q.v_absmax.len()
                        {
                            return Err(StageError::Invalid(format!(
                                "{}: quantised optimizer state {i} does not fit this run's",
                                ck.display()
                            )));
                        }
                        (q.m, q.v, q.m_absmax, q.v_absmax) = (mc, vc, ma, va);
                    }
                    None => {
                        opt.m[i] = get(format!("m.{i}"))?;
                        opt.v[i] = get(format!("v.{i}"))?;
                    }
                }
            }
            opt.step = n as usize;
            let sp = ck.join("trainer_state.json");
            let st: Value = serde_json::from_slice(&std::fs::read(&sp).map_err(io_err(&sp))?)
                .map_err(|e| StageError::Invalid(format!("{}: {e}", sp.display())))?;
            history = st["log_history"].as_array().cloned().unwrap_or_default();
            // Replay the data stream up to where the checkpoint was taken.
            for _ in 0..(n as usize * gas * mbs) {
                next_bin(&mut order);
            }
            start = n;
            (cx.emit)(Event::Warning {
                message: format!("{}: resuming from checkpoint-{n}", cx.name),
            });
        }
        // Early stopping and the best checkpoint (HF's EarlyStoppingCallback with threshold 0 and
        // load_best_model_at_end on eval_loss): rebuilt from the history when resuming.
        let patience = self.cadence.early_stopping_patience;
        let keep_best = self.cadence.load_best_model_at_end;
        if keep_best && (eval_every == 0 || save_every == 0 || save_every % eval_every != 0) {
            return Err(StageError::Invalid(format!(
                "load_best_model_at_end chooses among checkpoints by the evaluation at their step: it needs save steps that are a multiple of the eval steps (this run saves every {save_every} and evaluates every {eval_every} steps)"
            )));
        }
        let mut tracker = BestTracker::default();
        let (metric, greater) = self.cadence.best_metric();
        tracker.greater = greater;
        for h in &history {
            if let (Some(l), Some(st)) = (h[metric.as_str()].as_f64(), h["step"].as_u64()) {
                tracker.observe(l, st, save_every > 0 && st % save_every == 0 && st < total);
            }
        }
        let mut last = total;
        let started = Instant::now();
        let mut tokens = 0usize;
        let mut samples = 0usize;
        for step in start..total {
            let mut micro = Vec::with_capacity(gas);
            let mut micro_refs: Vec<Vec<(f64, f64)>> = Vec::with_capacity(gas);
            let mut micro_labels: Vec<Vec<bool>> = Vec::with_capacity(gas);
            for _ in 0..gas {
                let bins: Vec<usize> = (0..mbs).map(|_| next_bin(&mut order)).collect();
                let rows: Vec<(Vec<u32>, Vec<u8>, Vec<u32>)> =
                    bins.iter().map(|&b| data.row(b)).collect();
                micro_refs.push(match &ref_scores {
                    Some(sc) => bins.iter().flat_map(|&b| bin_refs(&data, sc, b)).collect(),
                    None => Vec::new(),
                });
                micro_labels.push(bins.iter().flat_map(|&b| bin_labels(&data, b)).collect());
                tokens += rows.iter().map(|r| r.0.len()).sum::<usize>();
                // Samples, not packed rows: a packed row holds several (position 0 starts one).
                samples += rows
                    .iter()
                    .map(|r| r.2.iter().filter(|&&p| p == 0).count().max(1))
                    .sum::<usize>();
                let mut batch = Batch::new(&rows, &device)?;
                if let Some(alpha) = self.neftune_noise_alpha {
                    let noise_seed = self.seed ^ (step << 20) ^ micro.len() as u64 ^ 0x6e65_6674;
                    batch =
                        batch.with_neftune(alpha, model.cfg.hidden_size, noise_seed, &device)?;
                }
                if model.lora_dropout.is_some() {
                    // From the step and micro-batch only: a resumed run draws the same masks.
                    batch.dropout_seed =
                        Some(self.seed ^ (step << 20) ^ micro.len() as u64 ^ 0x6472_6f70);
                }
                micro.push(batch);
            }
            let lr = self.lr_at(step, total);
            let mut pref_metrics = Vec::new();
            let (loss, gnorm) = match &self.rl {
                None => train_step(&model, &mut opt, &micro, lr, self.optim.max_grad_norm)?,
                Some(pl) => {
                    let micro: Vec<PrefMicro> = micro
                        .into_iter()
                        .zip(micro_refs)
                        .zip(micro_labels)
                        .map(|((batch, reference), labels)| PrefMicro {
                            batch,
                            reference,
                            labels,
                        })
                        .collect();
                    let (g, norm) =
                        pref_step(&model, &mut opt, &micro, pl, lr, self.optim.max_grad_norm)?;
                    pref_metrics = pref_metric_list(&g.metrics, pl, g.nll);
                    (g.loss, norm)
                }
            };
            if !loss.is_finite() {
                return Err(StageError::Invalid(format!(
                    "loss became {loss} at step {}; lower learning_rate or check the data",
                    step + 1
                )));
            }
            let s = step + 1;
            let mut entry = json!({"step": s, "loss": loss, "lr": lr, "grad_norm": gnorm});
            for (name, value) in &pref_metrics {
                entry[name] = json!(value);
            }
            history.push(entry);
            if s % neutral.logging_steps.max(1) == 0 || s == total {
                let secs = started.elapsed().as_secs_f64().max(1e-9);
                let done_here = (s - start) as f64;
                let log = crate::events::TrainLog {
                    stage: cx.name.to_string(),
                    step: s,
                    total,
                    loss,
                    lr,
                    grad_norm: gnorm,
                    tokens_per_s: tokens as f64 / secs,
                    samples_per_s: samples as f64 / secs,
                    elapsed_s: secs,
                    eta_s: secs / done_here * (total - s) as f64,
                    peak_rss_bytes: peak_rss_bytes(),
                };
                for (name, value) in [
                    ("loss", loss),
                    ("lr", lr),
                    ("grad_norm", gnorm),
                    ("tokens_per_s", log.tokens_per_s),
                    ("samples_per_s", log.samples_per_s),
                ]
                .into_iter()
                .chain(pref_metrics.iter().map(|(n, v)| (*n, *v)))
                {
                    (cx.emit)(Event::Metric {
                        stage: cx.name.to_string(),
                        step: s,
                        name: name.into(),
                        value,
                    });
                }
                (cx.emit)(Event::TrainLog(log));
            }
            if let Some(val) = val.as_ref().filter(|_| s % eval_every == 0 || s == total) {
                let evaluated = match &self.rl {
                    None => evaluate(&model, val, mbs, &device)?
                        .map(|l| (l, vec![("eval_loss", l), ("eval_perplexity", l.exp())])),
                    Some(pl) => {
                        evaluate_pref(&model, val, val_scores.as_deref(), pl, mbs, &device)?
                    }
                };
                if let Some((eval_loss, metrics)) = evaluated {
                    if let Some(&(_, v)) = metrics.iter().find(|(n, _)| *n == metric) {
                        tracker.observe(v, s, save_every > 0 && s % save_every == 0 && s < total);
                    }
                    let mut entry = json!({"step": s, "eval_loss": eval_loss});
                    for (name, value) in &metrics {
                        entry[name] = json!(value);
                    }
                    history.push(entry);
                    for (name, value) in metrics {
                        (cx.emit)(Event::Metric {
                            stage: cx.name.to_string(),
                            step: s,
                            name: name.into(),
                            value,
                        });
                    }
                }
            }
            if save_every > 0 && s % save_every == 0 && s < total {
                self.write_checkpoint(cx.work, s, &vars, &opt, &adapter_cfg, &history)?;
                let keep = tracker.best_checkpoint.filter(|_| keep_best).map(|b| b.1);
                self.rotate_checkpoints(cx.work, keep);
            }
            if let Some(p) = patience.filter(|p| tracker.bad_evals >= *p) {
                (cx.emit)(Event::Note {
                    message: format!(
                        "{}: early stopping at step {s} of {total}: {metric} has not improved on {:.6} for {p} evaluations (early_stopping_patience)",
                        cx.name,
                        tracker.best.map_or(f64::NAN, |b| b.0)
                    ),
                });
                last = s;
                break;
            }
        }
        // load_best_model_at_end: the best checkpoint's weights, unless the last step's are.
        let best_model = tracker
            .best_checkpoint
            .filter(|_| keep_best)
            .filter(|b| tracker.best.is_some_and(|g| g.1 != last) && b.1 != last);
        if let Some((loss, b)) = best_model {
            let ck = cx.work.join(format!("checkpoint-{b}"));
            let a = candle_core::safetensors::load(ck.join(self.weights_file()), &device)?;
            for (name, v) in &vars {
                let t = a
                    .get(name)
                    .ok_or_else(|| StageError::Invalid(format!("{}: no {name}", ck.display())))?;
                v.set(t)?;
            }
            (cx.emit)(Event::Note {
                message: format!(
                    "{}: publishing checkpoint-{b}'s weights, its {metric} {loss:.6} the best (load_best_model_at_end)",
                    cx.name
                ),
            });
        }
        if self.is_full() {
            // HF layout: the whole model.
            crate::model::weights::save_sharded(
                &model.to_weights()?,
                cx.out,
                super::merge::DEFAULT_MAX_SHARD,
                candle_core::DType::F32,
            )?;
        } else {
            // PEFT layout.
            let tensors: std::collections::HashMap<String, candle_core::Tensor> = vars
                .iter()
                .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                .collect();
            save_tensors(&tensors, &cx.out.join("adapter_model.safetensors"))?;
            write_json(&cx.out.join("adapter_config.json"), &adapter_cfg)?;
        }
        for (n, ck) in checkpoints(cx.work) {
            // Each was verified or written by this run; one damaged since cannot be published.
            if let Some(why) = checkpoint_damage(&ck) {
                return Err(StageError::Invalid(format!(
                    "checkpoint-{n} was damaged while training ran ({why}); run again to rebuild it"
                )));
            }
            let dest = cx.out.join(format!("checkpoint-{n}"));
            std::fs::create_dir_all(&dest).map_err(io_err(&dest))?;
            for f in std::fs::read_dir(&ck).map_err(io_err(&ck))?.flatten() {
                if f.file_name() == CHECKPOINT_MANIFEST {
                    continue;
                }
                std::fs::copy(f.path(), dest.join(f.file_name())).map_err(io_err(&f.path()))?;
            }
        }
        write_json(&cx.out.join("config.json"), &model.cfg.to_hf())?;
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            let src = model_up.dir.join(f);
            if src.exists() {
                std::fs::copy(&src, cx.out.join(f)).map_err(io_err(&src))?;
            }
        }
        let mut state = json!({"global_step": last, "log_history": history});
        if patience.is_some() || keep_best {
            if let Some((l, _)) = tracker.best {
                state["best_metric"] = json!(l);
            }
            if let Some((_, b)) = tracker.best_checkpoint {
                state["best_model_checkpoint"] = json!(format!("checkpoint-{b}"));
            }
        }
        write_json(&cx.out.join("trainer_state.json"), &state)
    }
}

/// The evaluations so far, as HF's Trainer follows them: the best value of the compared metric
/// (`metric_for_best_model`, eval_loss by default) and its step, how many evaluations in a row
/// have not improved on it, and the checkpoint saved at a new best.
#[derive(Debug, Default)]
struct BestTracker {
    best: Option<(f64, u64)>,
    bad_evals: u64,
    best_checkpoint: Option<(f64, u64)>,
    /// Higher values are better (`greater_is_better`).
    greater: bool,
}

impl BestTracker {
    /// One evaluation's metric `loss` at step `step` (`saved`: a checkpoint is written at it).
    fn observe(&mut self, loss: f64, step: u64, saved: bool) {
        let better = |b: f64| if self.greater { loss > b } else { loss < b };
        if self.best.is_none_or(|b| better(b.0)) {
            self.best = Some((loss, step));
            self.bad_evals = 0;
            if saved {
                self.best_checkpoint = Some((loss, step));
            }
        } else {
            self.bad_evals += 1;
        }
    }
}

/// What `kiln train --debug` reports: one optimizer step on the first training bins.
#[derive(Debug, Clone)]
pub struct DebugStep {
    pub loss: f64,
    pub grad_norm: f64,
    pub seconds: f64,
    pub tokens: usize,
    pub trainable_params: usize,
    pub peak_rss_bytes: Option<u64>,
}

/// Peak resident set size of this process (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    status_bytes("VmHWM:")
}

/// The process's resident memory now.
pub fn rss_bytes() -> Option<u64> {
    status_bytes("VmRSS:")
}

fn status_bytes(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

impl Train {
    /// One step (one micro-batch per accumulation slot) without publishing anything.
    pub fn debug_step(&self, model_dir: &Path, pack_dir: &Path) -> Result<DebugStep, StageError> {
        let device = Device::Cpu;
        // The base stored as training stores it (QLoRA: packed), with the same optimizer state.
        let (mut model, _) = load_model_as(model_dir, self.base_weights)?;
        let vars = self.trainable(&mut model, &device)?;
        let trainable_params = vars.iter().map(|(_, v)| v.as_tensor().elem_count()).sum();
        let mut opt = AdamW::new(
            vars.iter().map(|(_, v)| v.clone()).collect(),
            self.optim.weight_decay,
        )?
        .with_states(self.optimizer_states)?;
        (opt.beta1, opt.beta2, opt.eps) = self.optim.betas();
        opt.lr_scale = self.lr_scales(&vars);
        let data = PackedSplit::read(&pack_dir.join("train"))?;
        let n = data.header.bins as usize;
        let mbs = self.steps.micro_batch_size.max(1) as usize;
        let rows: Vec<(Vec<u32>, Vec<u8>, Vec<u32>)> =
            (0..mbs.min(n)).map(|b| data.row(b)).collect();
        let tokens = rows.iter().map(|r| r.0.len()).sum();
        let batch = Batch::new(&rows, &device)?;
        let t = Instant::now();
        let (loss, grad_norm) = match &self.rl {
            None => train_step(
                &model,
                &mut opt,
                &[batch],
                self.lr_at(0, 1),
                self.optim.max_grad_norm,
            )?,
            Some(pl) => {
                // The reference is the model as training starts (LoRA's B is zero; full
                // fine-tuning has not stepped yet), scored here instead of read from refscore.
                let reference = if pl.needs_reference() {
                    crate::train::pref::pair_logps(&model, &batch)?
                } else {
                    Vec::new()
                };
                let labels = (0..mbs.min(n)).flat_map(|b| bin_labels(&data, b)).collect();
                let micro = [PrefMicro {
                    batch,
                    reference,
                    labels,
                }];
                let (g, norm) = pref_step(
                    &model,
                    &mut opt,
                    &micro,
                    pl,
                    self.lr_at(0, 1),
                    self.optim.max_grad_norm,
                )?;
                (g.loss, norm)
            }
        };
        Ok(DebugStep {
            loss,
            grad_norm,
            seconds: t.elapsed().as_secs_f64(),
            tokens,
            trainable_params,
            peak_rss_bytes: peak_rss_bytes(),
        })
    }
}
