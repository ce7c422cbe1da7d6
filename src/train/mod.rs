//! Training: LoRA adapters on the model's linear layers, the masked next-token loss, and AdamW
//! with decoupled weight decay and global-norm clipping. Optimizer state is kiln's own (not
//! candle's) so checkpoints can save and restore it exactly.

mod adamw_ops;
pub mod ce;
pub mod pref;
pub mod qadam;

use crate::model::llama::{packed_causal_mask, LoraDelta, LoraDropout};
use crate::model::packed::BaseWeight;
use crate::model::{Llama, ModelError};
use crate::rng::SplitMix64;
use candle_core::{DType, Device, Tensor, Var};

/// Which linear layers get LoRA, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    /// Module names (`q_proj`, `down_proj`, …); empty with `target_linear` = all linear layers.
    pub target_modules: Vec<String>,
    pub target_linear: bool,
    pub rslora: bool,
    /// DoRA (`peft_use_dora`): a trained magnitude vector per adapted layer.
    pub dora: bool,
}

impl LoraSpec {
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    fn targets(&self, module_path: &str) -> bool {
        let leaf = module_path.rsplit('.').next().unwrap_or("");
        if self.target_linear {
            return true;
        }
        self.target_modules.iter().any(|t| t == leaf)
    }
}

/// Uniform in [-bound, bound) from kiln's PRNG (candle's CPU seeding is not usable).
fn uniform(rng: &mut SplitMix64, n: usize, bound: f32) -> Vec<f32> {
    (0..n)
        .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * bound)
        .collect()
}

/// Attaches LoRA deltas (A: PEFT's kaiming-uniform init, bound 1/√in; B: zeros) and returns the
/// trainable variables with their PEFT names (`base_model.model.<module>.lora_A.weight`).
pub fn attach_lora(
    model: &mut Llama,
    spec: &LoraSpec,
    seed: u64,
    device: &Device,
) -> Result<Vec<(String, Var)>, ModelError> {
    let mut rng = SplitMix64::new(seed);
    let mut vars = Vec::new();
    for (path, lin) in model.linears_mut() {
        if !spec.targets(&path) {
            continue;
        }
        let (out_f, in_f) = lin.weight.dims2()?;
        let a = Var::from_tensor(&Tensor::from_vec(
            uniform(&mut rng, spec.r * in_f, 1.0 / (in_f as f32).sqrt()),
            (spec.r, in_f),
            device,
        )?)?;
        let b = Var::zeros((out_f, spec.r), DType::F32, device)?;
        vars.push((format!("base_model.model.{path}.lora_A.weight"), a.clone()));
        vars.push((format!("base_model.model.{path}.lora_B.weight"), b.clone()));
        let magnitude = if spec.dora {
            // m starts at ‖W‖ per row, so the adapted layer starts equal to the base one.
            let m = lin
                .weight
                .to_f32()?
                .sqr()?
                .sum_keepdim(1)?
                .sqrt()?
                .squeeze(1)?;
            let m = Var::from_tensor(&m)?;
            vars.push((
                format!("base_model.model.{path}.lora_magnitude_vector"),
                m.clone(),
            ));
            Some(m)
        } else {
            None
        };
        lin.lora = Some(LoraDelta {
            a,
            b,
            scale: spec.scale(),
            magnitude,
            dropout: None,
        });
    }
    Ok(vars)
}

/// Turns on LoRA dropout with probability `p` for every adapted layer of `model` (after
/// [`attach_lora`]); masks are drawn only for batches with a `dropout_seed`.
pub fn enable_lora_dropout(model: &mut Llama, p: f64) {
    if p <= 0.0 {
        return;
    }
    let d = std::sync::Arc::new(LoraDropout::new(p as f32));
    for (salt, (_, lin)) in model.linears_mut().into_iter().enumerate() {
        if let Some(l) = &mut lin.lora {
            l.dropout = Some((d.clone(), salt as u64));
        }
    }
    model.lora_dropout = Some(d);
}

/// PEFT's `modules_to_save` (Axolotl's `lora_modules_to_save`): the tensors of the named
/// modules (`lm_head`, `embed_tokens`, `norm`, `input_layernorm`…) train in full beside the
/// LoRA deltas, under PEFT's saved names (`base_model.model.lm_head.weight`). Call after
/// [`attach_lora`]: a module cannot be both LoRA-adapted and saved whole.
pub fn attach_modules_to_save(
    model: &mut Llama,
    names: &[String],
) -> Result<Vec<(String, Var)>, ModelError> {
    use crate::model::adapter::{check_tied_modules_to_save, module_matches};
    if names.is_empty() {
        return Ok(Vec::new());
    }
    check_tied_modules_to_save(model.lm_head.is_none(), names).map_err(ModelError::Config)?;
    for (path, lin) in model.linears_mut() {
        if lin.lora.is_some() {
            if let Some(p) = names.iter().find(|p| module_matches(&path, p)) {
                return Err(ModelError::Config(format!(
                    "lora_modules_to_save `{p}` is also a LoRA target ({path}); a module is either adapted or saved whole"
                )));
            }
        }
    }
    let mut vars = Vec::new();
    let mut used = vec![false; names.len()];
    for (name, t) in model.tensors_mut() {
        let module = name.rsplit_once('.').map_or(name.as_str(), |x| x.0);
        let mut hit = false;
        for (i, p) in names.iter().enumerate() {
            if module_matches(module, p) {
                used[i] = true;
                hit = true;
            }
        }
        if hit {
            let v = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
            *t = v.as_tensor().clone();
            vars.push((format!("base_model.model.{name}"), v));
        }
    }
    if let Some((p, _)) = names.iter().zip(&used).find(|(_, u)| !**u) {
        return Err(ModelError::Config(format!(
            "lora_modules_to_save `{p}` matches no module of this model (e.g. lm_head, embed_tokens, norm, input_layernorm)"
        )));
    }
    Ok(vars)
}

/// Full fine-tuning: every weight becomes a trainable variable (its storage shared with the
/// model, so optimizer updates are seen by the next forward). Returns them with their HF names.
pub fn attach_full(model: &mut Llama) -> Result<Vec<(String, Var)>, ModelError> {
    attach_full_matching(model, &[])
}

/// As [`attach_full`], training only the weights whose names match one of `patterns` (all of
/// them when `patterns` is empty; Axolotl's `unfrozen_parameters`). The others stay frozen
/// tensors: no gradient, no optimizer state.
pub fn attach_full_matching(
    model: &mut Llama,
    patterns: &[regex::Regex],
) -> Result<Vec<(String, Var)>, ModelError> {
    let mut vars = Vec::new();
    for (name, t) in model.tensors_mut() {
        if !patterns.is_empty() && !patterns.iter().any(|p| p.is_match(&name)) {
            // Frozen, in the dtype the trained weights compute in.
            if t.dtype() != DType::F32 {
                *t = t.to_dtype(DType::F32)?;
            }
            continue;
        }
        let v = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
        *t = v.as_tensor().clone();
        vars.push((name, v));
    }
    Ok(vars)
}

/// One packed row (or several of equal length) ready for the model.
pub struct Batch {
    pub ids: Tensor,
    pub positions: Tensor,
    pub mask: Tensor,
    /// Per position (b·t, row-major): 1.0 where the *next* token is trained, else 0.0 (the last
    /// position of each row, padding, untrained tokens).
    pub loss_weights: Vec<f32>,
    /// Per position (b·t): the next token's id (0 where the weight is 0).
    pub targets: Vec<u32>,
    pub trained_tokens: usize,
    /// Each sample's flat position range (row · t + position; a packed row holds several, each
    /// starting where the position ids restart at 0). Padding is in none of them.
    pub samples: Vec<(usize, usize)>,
    /// NEFTune noise for the input embeddings (training only).
    pub embed_noise: Option<Tensor>,
    /// Seed of this micro-batch's LoRA dropout masks (training only).
    pub dropout_seed: Option<u64>,
}

impl Batch {
    /// NEFTune (Jain et al. 2023, as in HF transformers): uniform noise in ±alpha/√(t·hidden) on
    /// the input embeddings, drawn from kiln's PRNG so runs stay reproducible.
    pub fn with_neftune(
        mut self,
        alpha: f64,
        hidden: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let (b, t) = self.ids.dims2()?;
        let mag = (alpha / ((t * hidden) as f64).sqrt()) as f32;
        let mut rng = SplitMix64::new(seed);
        self.embed_noise = Some(Tensor::from_vec(
            uniform(&mut rng, b * t * hidden, mag),
            (b, t, hidden),
            device,
        )?);
        Ok(self)
    }

    /// Builds a batch from rows of (ids, trained flags, position ids), padding to the longest
    /// row (padding is masked out of attention and loss).
    pub fn new(
        rows: &[(Vec<u32>, Vec<u8>, Vec<u32>)],
        device: &Device,
    ) -> Result<Self, ModelError> {
        let t = rows.iter().map(|r| r.0.len()).max().unwrap_or(1).max(2);
        let b = rows.len();
        let (mut ids, mut pos, mut lm, mut tg): (Vec<u32>, Vec<u32>, Vec<f32>, Vec<u32>) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut all_pos = Vec::new();
        let mut trained_tokens = 0;
        let mut samples = Vec::new();
        for (row, (r_ids, r_tr, r_pos)) in rows.iter().enumerate() {
            let n = r_ids.len();
            let starts: Vec<usize> = (0..n).filter(|&i| i == 0 || r_pos[i] == 0).collect();
            for (k, &a) in starts.iter().enumerate() {
                let z = starts.get(k + 1).copied().unwrap_or(n);
                samples.push((row * t + a, row * t + z));
            }
            let mut p = r_pos.clone();
            // Padding continues as its own "sample" (position 0 restarts it), so it never mixes in.
            p.extend((0..(t - n) as u32).map(|i| if i == 0 { 0 } else { i }));
            ids.extend(r_ids.iter().copied().chain(std::iter::repeat_n(0, t - n)));
            for i in 0..t {
                let next_trained = i + 1 < n && r_tr[i + 1] == 1 && r_pos[i + 1] != 0;
                lm.push(if next_trained { 1f32 } else { 0f32 });
                trained_tokens += next_trained as usize;
                tg.push(if next_trained { r_ids[i + 1] } else { 0 });
            }
            pos.extend(&p);
            all_pos.push(p);
        }
        Ok(Self {
            ids: Tensor::from_vec(ids, (b, t), device)?,
            positions: Tensor::from_vec(pos, (b, t), device)?,
            mask: packed_causal_mask(&all_pos, device)?,
            loss_weights: lm,
            targets: tg,
            trained_tokens,
            samples,
            embed_noise: None,
            dropout_seed: None,
        })
    }
}

/// Sum of token losses over trained positions (divide by the trained-token count of the whole
/// effective batch for the mean).
pub fn loss_sum(model: &Llama, batch: &Batch) -> Result<Tensor, ModelError> {
    Ok(token_losses(model, batch, None)?.sum_all()?)
}

/// The per-position losses (batch × t, zero where nothing is trained). `grad_hint` is the
/// gradient each position's loss will receive in the backward pass, when known (a training
/// step's `1 / trained tokens`): the head's fused op then computes its gradient while each
/// chunk of logits is at hand instead of recomputing them (see [`ce::HeadCrossEntropy`]).
pub fn token_losses(
    model: &Llama,
    batch: &Batch,
    grad_hint: Option<ce::GradHint>,
) -> Result<Tensor, ModelError> {
    if let Some(d) = &model.lora_dropout {
        d.set(batch.dropout_seed);
    }
    let hidden = model.hidden_noised(
        &batch.ids,
        &batch.positions,
        &batch.mask,
        batch.embed_noise.as_ref(),
    );
    if let Some(d) = &model.lora_dropout {
        d.set(None);
    }
    let hidden = hidden?;
    let (b, t, h) = hidden.dims3()?;
    let x = hidden.reshape((b * t, h))?.contiguous()?;
    let (targets, weights) = (batch.targets.clone(), batch.loss_weights.clone());
    let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32;
    Ok(match model.head_weight()? {
        // Full fine-tuning (or unfrozen embeddings): the head's gradient from the same op.
        BaseWeight::Dense(w) if cpu_f32 && w.dtype() == DType::F32 && w.is_variable() => x
            .apply_op2(
                &w,
                ce::HeadCrossEntropy::trained(targets, weights).with_grad_hint(grad_hint),
            )?,
        BaseWeight::Dense(w) if cpu_f32 && w.dtype() == DType::F32 && !w.track_op() => x
            .apply_op1(
                ce::HeadCrossEntropy::frozen(w.contiguous()?.into(), targets, weights)
                    .with_grad_hint(grad_hint),
            )?,
        p @ BaseWeight::Packed(_) if cpu_f32 => x.apply_op1(
            ce::HeadCrossEntropy::frozen(p, targets, weights).with_grad_hint(grad_hint),
        )?,
        // Anything else: the logits whole, then the cross-entropy op.
        weight => {
            let logits = crate::model::llama::Linear {
                weight,
                bias: None,
                lora: None,
            }
            .forward(&x)?
            .contiguous()?;
            logits.apply_op1(ce::CrossEntropy::new(targets, weights))?
        }
    })
}

/// AdamW (decoupled weight decay) with bias correction, as PyTorch's `torch.optim.AdamW`.
pub struct AdamW {
    pub vars: Vec<Var>,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub step: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Each variable's learning-rate multiplier (1 for all but LoRA+'s B matrices).
    pub lr_scale: Vec<f64>,
    /// In-place update passes on f32 CPU tensors (see adamw_ops.rs); off = composed candle ops
    /// (the reference the tests compare with).
    pub fused: bool,
    /// Per variable: its moments quantised (8- and 4-bit optimizers, see qadam.rs); such a
    /// variable's `m` and `v` are zero-length tensors and its moments live here.
    pub quantised: Vec<Option<qadam::QMoments>>,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, weight_decay: f64) -> Result<Self, ModelError> {
        let n_vars = vars.len();
        let m = vars
            .iter()
            .map(|v| v.as_tensor().zeros_like())
            .collect::<Result<Vec<_>, _>>()?;
        // Separate storage from m: the update writes both in place.
        let v = vars
            .iter()
            .map(|v| v.as_tensor().zeros_like())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            vars,
            m,
            v,
            step: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            lr_scale: vec![1.0; n_vars],
            fused: true,
            quantised: vec![None; n_vars],
        })
    }

    /// Stores the moments of every variable of at least [`qadam::MIN_QUANTISED`] values as
    /// `kind` says (f32: unchanged). Call before the first step.
    pub fn with_states(
        mut self,
        kind: crate::config::precision::OptimStates,
    ) -> Result<Self, ModelError> {
        for (i, var) in self.vars.iter().enumerate() {
            if let Some(q) = qadam::QMoments::new(kind, var.as_tensor().elem_count()) {
                self.quantised[i] = Some(q);
                let empty = Tensor::zeros(0, candle_core::DType::F32, var.device())?;
                self.m[i] = empty.clone();
                self.v[i] = Tensor::zeros(0, candle_core::DType::F32, var.device())?;
            }
        }
        Ok(self)
    }

    /// Bytes the optimizer's moments occupy.
    pub fn state_bytes(&self) -> usize {
        (0..self.vars.len())
            .map(|i| match &self.quantised[i] {
                Some(q) => q.bytes(),
                None => (self.m[i].elem_count() + self.v[i].elem_count()) * 4,
            })
            .sum()
    }

    /// One update with the given gradients (already divided by the token count), clipped to
    /// `max_grad_norm` (0 = no clipping). Returns the gradient norm before clipping.
    pub fn update(
        &mut self,
        grads: &[Tensor],
        lr: f64,
        max_grad_norm: f64,
    ) -> Result<f64, ModelError> {
        let fused = self.fused
            && self
                .vars
                .iter()
                .zip(&self.m)
                .zip(&self.v)
                .zip(grads)
                .all(|(((p, m), v), g)| {
                    [p.as_tensor(), m, v, g]
                        .iter()
                        .all(|t| adamw_ops::supported(t))
                });
        let mut sq = 0f64;
        for g in grads {
            sq += if fused {
                adamw_ops::sum_sq(g)?
            } else {
                g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64
            };
        }
        let norm = sq.sqrt();
        let clip = if max_grad_norm > 0.0 && norm > max_grad_norm {
            max_grad_norm / (norm + 1e-6)
        } else {
            1.0
        };
        self.step += 1;
        let bc1 = 1.0 - self.beta1.powi(self.step as i32);
        let bc2 = 1.0 - self.beta2.powi(self.step as i32);
        // Quantised moments: one blockwise pass per variable (see qadam.rs).
        for (i, var) in self.vars.iter().enumerate() {
            if let Some(q) = &mut self.quantised[i] {
                var.as_tensor().inplace_op2(
                    &grads[i].contiguous()?,
                    &qadam::QuantisedStep {
                        state: std::sync::Mutex::new(q),
                        lr: lr * self.lr_scale[i],
                        weight_decay: self.weight_decay,
                        beta1: self.beta1,
                        beta2: self.beta2,
                        eps: self.eps,
                        step: self.step as u64,
                        clip: clip as f32,
                    },
                )?;
            }
        }
        if fused {
            // In place, no temporaries (see adamw_ops.rs).
            for (i, var) in self.vars.iter().enumerate() {
                if self.quantised[i].is_some() {
                    continue;
                }
                let g = &grads[i];
                self.m[i].inplace_op2(
                    g,
                    &adamw_ops::Moment {
                        beta: self.beta1 as f32,
                        clip: clip as f32,
                        square: false,
                    },
                )?;
                self.v[i].inplace_op2(
                    g,
                    &adamw_ops::Moment {
                        beta: self.beta2 as f32,
                        clip: clip as f32,
                        square: true,
                    },
                )?;
                var.as_tensor().inplace_op3(
                    &self.m[i],
                    &self.v[i],
                    &adamw_ops::Apply {
                        lr: (lr * self.lr_scale[i]) as f32,
                        weight_decay: self.weight_decay as f32,
                        bc1: bc1 as f32,
                        bc2: bc2 as f32,
                        eps: self.eps as f32,
                    },
                )?;
            }
            return Ok(norm);
        }
        for (i, var) in self.vars.iter().enumerate() {
            if self.quantised[i].is_some() {
                continue;
            }
            let g = (&grads[i] * clip)?;
            self.m[i] = ((&self.m[i] * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
            self.v[i] = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let denom = ((&self.v[i] / bc2)?.sqrt()? + self.eps)?;
            let upd = ((&self.m[i] / bc1)? / denom)?;
            let lr = lr * self.lr_scale[i];
            let theta = (var.as_tensor() * (1.0 - lr * self.weight_decay))?;
            var.set(&(theta - (upd * lr)?)?)?;
        }
        Ok(norm)
    }
}

/// Adds one backward pass's gradients of `vars` to `acc` (with gradient checkpointing, the
/// layers' trained tensors get theirs from the recomputed backward passes, model/checkpoint.rs).
pub(crate) fn accumulate(
    model: &Llama,
    vars: &[Var],
    grads: &candle_core::backprop::GradStore,
    acc: &mut [Option<Tensor>],
) -> Result<(), ModelError> {
    let mut side: std::collections::HashMap<candle_core::TensorId, Tensor> = Default::default();
    if let Some(store) = &model.checkpoint {
        for (id, g) in store.take() {
            let g = match side.remove(&id) {
                Some(a) => (a + g)?,
                None => g,
            };
            side.insert(id, g);
        }
    }
    for (i, v) in vars.iter().enumerate() {
        let here = grads.get(v.as_tensor()).cloned();
        let g = match (here, side.remove(&v.as_tensor().id())) {
            (Some(a), Some(b)) => Some((a + b)?),
            (a, b) => a.or(b),
        };
        if let Some(g) = g {
            acc[i] = Some(match acc[i].take() {
                Some(a) => (a + g)?,
                None => g,
            });
        }
    }
    Ok(())
}

/// The accumulated gradients, zeros for a variable no pass reached.
pub(crate) fn finish_grads(
    acc: Vec<Option<Tensor>>,
    vars: &[Var],
) -> Result<Vec<Tensor>, ModelError> {
    Ok(acc
        .into_iter()
        .zip(vars)
        .map(|(g, v)| g.map(Ok).unwrap_or_else(|| v.as_tensor().zeros_like()))
        .collect::<Result<_, candle_core::Error>>()?)
}

/// One optimizer step over micro-batches (gradient accumulation): the loss is the mean over the
/// trained tokens of all micro-batches together. Returns (mean loss, grad norm).
pub fn train_step(
    model: &Llama,
    opt: &mut AdamW,
    micro: &[Batch],
    lr: f64,
    max_grad_norm: f64,
) -> Result<(f64, f64), ModelError> {
    let total: usize = micro.iter().map(|b| b.trained_tokens).sum::<usize>().max(1);
    let mut acc: Vec<Option<Tensor>> = vec![None; opt.vars.len()];
    let mut loss_total = 0f64;
    for b in micro {
        // `x / total` hands each position's loss the gradient `(1 / total) as f32`.
        let hint = (1.0 / total as f64) as f32;
        let loss =
            (token_losses(model, b, Some(ce::GradHint::Uniform(hint)))?.sum_all()? / total as f64)?;
        loss_total += loss.to_scalar::<f32>()? as f64;
        let grads = loss.backward()?;
        accumulate(model, &opt.vars, &grads, &mut acc)?;
    }
    let grads = finish_grads(acc, &opt.vars)?;
    let norm = opt.update(&grads, lr, max_grad_norm)?;
    Ok((loss_total, norm))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rand(n: usize, seed: u64, scale: f32) -> Tensor {
        let mut rng = crate::rng::SplitMix64::new(seed);
        let v: Vec<f32> = (0..n)
            .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale)
            .collect();
        Tensor::from_vec(v, n, &Device::Cpu).unwrap()
    }

    #[test]
    fn fused_adamw_matches_the_composed_update() {
        // Two tensors, one larger than a parallel chunk; weight decay on; clipping on in the
        // second step (large gradients) and off in the others.
        let sizes = [37usize, 70_000];
        let make = || {
            let vars: Vec<Var> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| Var::from_tensor(&rand(n, 10 + i as u64, 1.0)).unwrap())
                .collect();
            AdamW::new(vars, 0.01).unwrap()
        };
        let (mut fused, mut composed) = (make(), make());
        composed.fused = false;
        for step in 0..3u64 {
            let scale = if step == 1 { 50.0 } else { 0.01 };
            let grads: Vec<Tensor> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| rand(n, 100 * step + i as u64, scale))
                .collect();
            let a = fused.update(&grads, 1e-2, 1.0).unwrap();
            let b = composed.update(&grads, 1e-2, 1.0).unwrap();
            assert!((a - b).abs() < 1e-6 * b.max(1.0), "norm {a} vs {b}");
            for (p, q) in fused.vars.iter().zip(&composed.vars) {
                let d = crate::model::ops::max_abs_diff(p.as_tensor(), q.as_tensor());
                assert!(d < 1e-6, "step {step}: weights differ by {d}");
            }
        }
        // The update moved the weights, and the moments are distinct tensors.
        let start = rand(37, 10, 1.0);
        let moved = (fused.vars[0].as_tensor() - &start)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(moved > 1e-3);
        // (Shared storage would make them equal: both updates would land in one buffer.)
        let m0 = fused.m[0].to_vec1::<f32>().unwrap();
        let v0 = fused.v[0].to_vec1::<f32>().unwrap();
        assert_ne!(m0, v0);
    }
}
