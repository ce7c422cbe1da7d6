//! The Llama-family forward pass from differentiable candle ops (no fused kernels without a
//! backward): RMSNorm, rotate-half RoPE with per-token position ids, grouped-query attention with
//! an additive mask (causal, or block-diagonal causal for packed rows), SwiGLU MLP.

use super::packed::BaseWeight;
use super::weights::Weights;
use super::{LlamaConfig, ModelError};
use candle_core::{DType, Device, Tensor, D};

/// A low-rank delta on a frozen linear layer: `scale · x Aᵀ Bᵀ` (PEFT's LoRA; `scale` is
/// alpha/r, or alpha/√r with rsLoRA).
#[derive(Clone)]
pub struct LoraDelta {
    pub a: candle_core::Var,
    pub b: candle_core::Var,
    pub scale: f64,
    /// DoRA's magnitude vector m (out,): the output is rescaled row-wise to
    /// m / ‖W + s·B·A‖ (the norm detached, as in the DoRA paper and PEFT).
    pub magnitude: Option<candle_core::Var>,
    /// LoRA dropout on this layer's input to A, with the layer's own salt for its masks.
    pub dropout: Option<(std::sync::Arc<LoraDropout>, u64)>,
}

/// PEFT's `lora_dropout`: while training, each adapted layer's input to A is zeroed with
/// probability p and the rest scaled by 1/(1−p). The masks come from kiln's PRNG, seeded per
/// micro-batch (and per layer), so a run, and a run resumed from a checkpoint, draw the same
/// masks. Off (no masks) unless a seed is set: evaluation and inference never drop.
pub struct LoraDropout {
    pub p: f32,
    /// u64::MAX = off.
    seed: std::sync::atomic::AtomicU64,
}

impl LoraDropout {
    pub fn new(p: f32) -> Self {
        Self {
            p,
            seed: std::sync::atomic::AtomicU64::new(u64::MAX),
        }
    }

    /// Turns the masks on with this micro-batch's seed, or off.
    pub fn set(&self, seed: Option<u64>) {
        self.seed.store(
            seed.map(|s| s & !(1 << 63)).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// The mask (0 or 1/(1−p)) for an input shaped like `x`, when on.
    pub fn mask(&self, salt: u64, x: &Tensor) -> Result<Option<Tensor>, ModelError> {
        let seed = self.seed.load(std::sync::atomic::Ordering::Relaxed);
        if seed == u64::MAX || self.p <= 0.0 {
            return Ok(None);
        }
        let mut rng = crate::rng::SplitMix64::new(seed ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let keep = 1.0 / (1.0 - self.p);
        let threshold = (self.p as f64 * (1u64 << 53) as f64) as u64;
        let v: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if (rng.next_u64() >> 11) < threshold {
                    0.0
                } else {
                    keep
                }
            })
            .collect();
        Ok(Some(Tensor::from_vec(v, x.shape(), x.device())?))
    }
}

impl LoraDelta {
    /// ‖W + s·B·A‖ per output row, without gradient.
    pub fn dora_norm(&self, weight: &BaseWeight) -> Result<Tensor, ModelError> {
        let delta = (self
            .b
            .as_tensor()
            .detach()
            .matmul(&self.a.as_tensor().detach())?
            * self.scale)?;
        let w = (weight.to_f32()?.detach() + delta)?;
        Ok(w.sqr()?.sum_keepdim(1)?.sqrt()?.squeeze(1)?)
    }
}

/// A linear layer `y = x Wᵀ (+ b)`, the base weight frozen (dense, or packed: QLoRA and
/// low-precision bases), optionally with a LoRA delta. Cloning shares every tensor.
#[derive(Clone)]
pub struct Linear {
    pub weight: BaseWeight,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraDelta>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let (weight_f32, trained) = match &self.weight {
            BaseWeight::Dense(t) => (t.dtype() == DType::F32, t.is_variable()),
            BaseWeight::Packed(_) => (true, false),
        };
        let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32 && weight_f32;
        let contiguous = || -> Result<BaseWeight, ModelError> {
            Ok(match &self.weight {
                BaseWeight::Dense(t) => BaseWeight::Dense(t.contiguous()?),
                p => p.clone(),
            })
        };
        let mut y = match &self.lora {
            // The whole LoRA layer as one op on kiln's sgemm (see model/lora_op.rs).
            Some(l) if cpu_f32 && !trained && l.a.as_tensor().dtype() == DType::F32 => {
                let mask = match &l.dropout {
                    Some((d, salt)) => d.mask(*salt, x)?,
                    None => None,
                };
                x.contiguous()?.apply_op3(
                    l.a.as_tensor(),
                    l.b.as_tensor(),
                    super::lora_op::LoraLinear {
                        weight: contiguous()?,
                        scale: l.scale as f32,
                        mask,
                    },
                )?
            }
            Some(l) => {
                let base = x.broadcast_matmul(&self.weight.to_f32()?.t()?)?;
                let dropped = match &l.dropout {
                    Some((d, salt)) => d.mask(*salt, x)?.map(|m| x.mul(&m)).transpose()?,
                    None => None,
                };
                let d = dropped
                    .as_ref()
                    .unwrap_or(x)
                    .broadcast_matmul(&l.a.as_tensor().t()?)?
                    .broadcast_matmul(&l.b.as_tensor().t()?)?;
                (base + (d * l.scale)?)?
            }
            // A trained weight (full fine-tuning): both gradients from one op.
            None if cpu_f32 && trained => match &self.weight {
                BaseWeight::Dense(w) => x
                    .contiguous()?
                    .apply_op2(w, super::lora_op::TrainedLinear)?,
                BaseWeight::Packed(_) => unreachable!("a packed weight is never trained"),
            },
            // A frozen weight: only the input's gradient (see model/frozen.rs).
            None if cpu_f32 => x.contiguous()?.apply_op1(super::frozen::FrozenLinear {
                weight: contiguous()?,
            })?,
            None => x.broadcast_matmul(&self.weight.to_f32()?.t()?)?,
        };
        if let Some(l) = &self.lora {
            if let Some(m) = &l.magnitude {
                let k = m.as_tensor().div(&l.dora_norm(&self.weight)?)?;
                y = y.broadcast_mul(&k)?;
            }
        }
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// The linear layers of a block, by their module names: what LoRA can target
/// (`lora_target_linear` = all of them).
pub const LINEAR_LAYERS: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

#[derive(Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
}

#[derive(Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

#[derive(Clone)]
pub struct Layer {
    pub input_layernorm: Tensor,
    pub post_attention_layernorm: Tensor,
    pub attn: Attention,
    pub mlp: Mlp,
}

pub struct Llama {
    pub cfg: LlamaConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    /// None when tied to the embeddings.
    pub lm_head: Option<Tensor>,
    /// Shared by every adapted layer when training with `lora_dropout` > 0.
    pub lora_dropout: Option<std::sync::Arc<LoraDropout>>,
    /// Gradient checkpointing on: where the layers' recomputed backward leaves the trained
    /// tensors' gradients (see model/checkpoint.rs).
    pub checkpoint: Option<std::sync::Arc<super::checkpoint::CheckpointGrads>>,
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor, ModelError> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 {
        // One pass forward and one backward (see model/norm.rs).
        return Ok(x
            .contiguous()?
            .apply_op2(&w.contiguous()?, super::norm::RmsNorm { eps: eps as f32 })?);
    }
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let x = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    Ok(x.broadcast_mul(w)?)
}

/// HF's rotate-half RoPE: (x1, x2) -> (x1·cos − x2·sin, x2·cos + x1·sin) on the two halves.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor, ModelError> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() == 4 {
        // One op that keeps nothing for backward (see model/rope.rs).
        return Ok(x.contiguous()?.apply_op1(super::rope::Rope {
            cos: cos.clone(),
            sin: sin.clone(),
        })?);
    }
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let a = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let b = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Ok(Tensor::cat(&[a, b], D::Minus1)?)
}

pub(crate) fn repeat_kv(x: Tensor, n: usize) -> Result<Tensor, ModelError> {
    if n == 1 {
        return Ok(x);
    }
    let (b, kvh, t, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .expand((b, kvh, n, t, d))?
        .reshape((b, kvh * n, t, d))?)
}

/// Additive attention mask (batch, 1, t, t): 0 where token i may attend to j, −1e9 elsewhere.
/// Causal within each packed sample: a new sample starts wherever a position id is 0.
pub fn packed_causal_mask(
    position_ids: &[Vec<u32>],
    device: &Device,
) -> Result<Tensor, ModelError> {
    let b = position_ids.len();
    let t = position_ids.first().map(|p| p.len()).unwrap_or(0);
    let mut m = vec![-1e9f32; b * t * t];
    for (bi, pos) in position_ids.iter().enumerate() {
        let mut seg = Vec::with_capacity(t);
        let mut s = 0u32;
        for (i, &p) in pos.iter().enumerate() {
            if p == 0 && i > 0 {
                s += 1;
            }
            seg.push(s);
        }
        for i in 0..t {
            for j in 0..=i {
                if seg[i] == seg[j] {
                    m[bi * t * t + i * t + j] = 0.0;
                }
            }
        }
    }
    Ok(Tensor::from_vec(m, (b, 1, t, t), device)?)
}

/// Mistral's sliding window as an additive mask (1, 1, t_q, t_k) for queries at absolute
/// positions `q_start..q_start + t_q` over keys `0..t_k`: a query sees only keys less than
/// `window` positions back (HF's `sliding_window`). None when no key is that far back.
pub fn sliding_window_mask(
    q_start: usize,
    t_q: usize,
    t_k: usize,
    window: usize,
    device: &Device,
) -> Result<Option<Tensor>, ModelError> {
    if window == 0 || q_start + t_q <= window {
        return Ok(None);
    }
    let mut m = vec![0f32; t_q * t_k];
    for i in 0..t_q {
        let q = q_start + i;
        for j in 0..t_k.min((q + 1).saturating_sub(window)) {
            m[i * t_k + j] = -1e9;
        }
    }
    Ok(Some(Tensor::from_vec(m, (1, 1, t_q, t_k), device)?))
}

/// What every layer's forward reads besides its own weights.
#[derive(Clone)]
pub(crate) struct LayerCtx {
    pub cos: Tensor,
    pub sin: Tensor,
    pub mask: Tensor,
    pub b: usize,
    pub t: usize,
    pub nh: usize,
    pub nkv: usize,
    pub hd: usize,
    pub eps: f64,
    pub scale: f64,
}

/// One decoder layer: attention and MLP blocks with their residuals.
pub(crate) fn layer_forward(l: &Layer, x: &Tensor, c: &LayerCtx) -> Result<Tensor, ModelError> {
    let LayerCtx {
        cos,
        sin,
        mask,
        b,
        t,
        nh,
        nkv,
        hd,
        eps,
        scale,
    } = c;
    let (b, t, nh, nkv, hd, scale) = (*b, *t, *nh, *nkv, *hd, *scale);
    let mut x = x.clone();
    let h = rms_norm(&x, &l.input_layernorm, *eps)?;
    let q = l
        .attn
        .q_proj
        .forward(&h)?
        .reshape((b, t, nh, hd))?
        .transpose(1, 2)?;
    let k = l
        .attn
        .k_proj
        .forward(&h)?
        .reshape((b, t, nkv, hd))?
        .transpose(1, 2)?;
    let v = l
        .attn
        .v_proj
        .forward(&h)?
        .reshape((b, t, nkv, hd))?
        .transpose(1, 2)?;
    let q = rope(&q.contiguous()?, cos, sin)?;
    let k = repeat_kv(rope(&k.contiguous()?, cos, sin)?, nh / nkv)?;
    let v = repeat_kv(v.contiguous()?, nh / nkv)?;
    let y = if q.device().is_cpu() && q.dtype() == DType::F32 {
        // One op that keeps no (t × t) scores for backward (see model/attention.rs).
        q.contiguous()?.apply_op3(
            &k.contiguous()?,
            &v.contiguous()?,
            super::attention::Attention {
                mask: mask.clone(),
                scale: scale as f32,
            },
        )?
    } else {
        let att = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
        candle_nn::ops::softmax(&att, D::Minus1)?.matmul(&v)?
    };
    let y = y.transpose(1, 2)?.reshape((b, t, nh * hd))?;
    x = (x + l.attn.o_proj.forward(&y)?)?;
    let h = rms_norm(&x, &l.post_attention_layernorm, *eps)?;
    let g = l.mlp.gate_proj.forward(&h)?;
    let u = l.mlp.up_proj.forward(&h)?;
    let act = if g.device().is_cpu() && g.dtype() == DType::F32 {
        // One op keeping only its output for backward (see model/swiglu.rs).
        g.contiguous()?
            .apply_op2(&u.contiguous()?, super::swiglu::SwiGlu)?
    } else {
        (candle_nn::ops::silu(&g)? * u)?
    };
    x = (x + l.mlp.down_proj.forward(&act)?)?;
    Ok(x)
}

impl Llama {
    /// Every linear layer with its HF module path (`model.layers.0.self_attn.q_proj`).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.self_attn.q_proj"), &mut l.attn.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &mut l.attn.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &mut l.attn.v_proj));
            out.push((format!("{p}.self_attn.o_proj"), &mut l.attn.o_proj));
            out.push((format!("{p}.mlp.gate_proj"), &mut l.mlp.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), &mut l.mlp.up_proj));
            out.push((format!("{p}.mlp.down_proj"), &mut l.mlp.down_proj));
        }
        out
    }

    /// Every linear layer with its HF module path.
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.self_attn.q_proj"), &l.attn.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &l.attn.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &l.attn.v_proj));
            out.push((format!("{p}.self_attn.o_proj"), &l.attn.o_proj));
            out.push((format!("{p}.mlp.gate_proj"), &l.mlp.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), &l.mlp.up_proj));
            out.push((format!("{p}.mlp.down_proj"), &l.mlp.down_proj));
        }
        out
    }

    /// The weights that are not packed, under their HF names.
    pub fn dense_weights(&self) -> Result<Weights, ModelError> {
        self.weights_where(false)
    }

    /// Every weight tensor under its HF name, mutably (full fine-tuning turns them into Vars).
    pub fn tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut out: Vec<(String, &mut Tensor)> = Vec::new();
        out.push(("model.embed_tokens.weight".into(), &mut self.embed_tokens));
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                &mut l.input_layernorm,
            ));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                &mut l.post_attention_layernorm,
            ));
            for (n, lin) in [
                ("self_attn.q_proj", &mut l.attn.q_proj),
                ("self_attn.k_proj", &mut l.attn.k_proj),
                ("self_attn.v_proj", &mut l.attn.v_proj),
                ("self_attn.o_proj", &mut l.attn.o_proj),
                ("mlp.gate_proj", &mut l.mlp.gate_proj),
                ("mlp.up_proj", &mut l.mlp.up_proj),
                ("mlp.down_proj", &mut l.mlp.down_proj),
            ] {
                // A packed base weight is frozen for good (never trained in full).
                if let BaseWeight::Dense(w) = &mut lin.weight {
                    out.push((format!("{p}.{n}.weight"), w));
                }
                if let Some(b) = &mut lin.bias {
                    out.push((format!("{p}.{n}.bias"), b));
                }
            }
        }
        out.push(("model.norm.weight".into(), &mut self.norm));
        if let Some(h) = &mut self.lm_head {
            out.push(("lm_head.weight".into(), h));
        }
        out
    }

    /// The weights under their HF names (the inverse of [`Llama::from_weights`]), packed ones
    /// widened to f32; LoRA deltas are not included (merge them first).
    pub fn to_weights(&self) -> Result<Weights, ModelError> {
        self.weights_where(true)
    }

    /// The weights, packed ones widened (`widen`) or left out.
    fn weights_where(&self, widen: bool) -> Result<Weights, ModelError> {
        let mut w = Weights::new();
        w.insert(
            "model.embed_tokens.weight".into(),
            self.embed_tokens.clone(),
        );
        w.insert("model.norm.weight".into(), self.norm.clone());
        if let Some(h) = &self.lm_head {
            w.insert("lm_head.weight".into(), h.clone());
        }
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            w.insert(
                format!("{p}.input_layernorm.weight"),
                l.input_layernorm.clone(),
            );
            w.insert(
                format!("{p}.post_attention_layernorm.weight"),
                l.post_attention_layernorm.clone(),
            );
            for (n, lin) in [
                ("self_attn.q_proj", &l.attn.q_proj),
                ("self_attn.k_proj", &l.attn.k_proj),
                ("self_attn.v_proj", &l.attn.v_proj),
                ("self_attn.o_proj", &l.attn.o_proj),
                ("mlp.gate_proj", &l.mlp.gate_proj),
                ("mlp.up_proj", &l.mlp.up_proj),
                ("mlp.down_proj", &l.mlp.down_proj),
            ] {
                match &lin.weight {
                    BaseWeight::Dense(t) => {
                        w.insert(format!("{p}.{n}.weight"), t.clone());
                    }
                    BaseWeight::Packed(pw) if widen => {
                        w.insert(format!("{p}.{n}.weight"), pw.to_tensor()?);
                    }
                    BaseWeight::Packed(_) => {}
                }
                if let Some(b) = &lin.bias {
                    w.insert(format!("{p}.{n}.bias"), b.clone());
                }
            }
        }
        Ok(w)
    }

    pub fn from_weights(cfg: LlamaConfig, w: Weights, device: &Device) -> Result<Self, ModelError> {
        Self::from_weights_packed(cfg, w, Default::default(), device)
    }

    /// [`Llama::from_weights`] with some linear weights already packed (see model/load.rs).
    pub fn from_weights_packed(
        cfg: LlamaConfig,
        mut w: Weights,
        mut packed: std::collections::HashMap<String, std::sync::Arc<super::packed::Packed>>,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let mut take = |k: &str| {
            w.remove(k)
                .ok_or_else(|| ModelError::MissingWeight(k.to_string()))
        };
        let embed_tokens = take("model.embed_tokens.weight")?;
        let norm = take("model.norm.weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(take("lm_head.weight")?)
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut lin = |n: &str, bias: bool| -> Result<Linear, ModelError> {
                let name = format!("{p}.{n}.weight");
                let weight = match packed.remove(&name) {
                    Some(pw) => BaseWeight::Packed(pw),
                    None => take(&name)?.into(),
                };
                Ok(Linear {
                    weight,
                    bias: if bias {
                        Some(take(&format!("{p}.{n}.bias"))?)
                    } else {
                        None
                    },
                    lora: None,
                })
            };
            let ab = cfg.attention_bias;
            let attn = Attention {
                q_proj: lin("self_attn.q_proj", ab)?,
                k_proj: lin("self_attn.k_proj", ab)?,
                v_proj: lin("self_attn.v_proj", ab)?,
                o_proj: lin("self_attn.o_proj", false)?,
            };
            let mlp = Mlp {
                gate_proj: lin("mlp.gate_proj", false)?,
                up_proj: lin("mlp.up_proj", false)?,
                down_proj: lin("mlp.down_proj", false)?,
            };
            layers.push(Layer {
                input_layernorm: take(&format!("{p}.input_layernorm.weight"))?,
                post_attention_layernorm: take(&format!("{p}.post_attention_layernorm.weight"))?,
                attn,
                mlp,
            });
        }
        let hd = cfg.head_dim();
        let max = cfg.max_position_embeddings.max(1);
        let inv: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / (cfg.rope_theta as f32).powf(2.0 * i as f32 / hd as f32))
            .collect();
        let inv = Tensor::from_vec(inv, (1, hd / 2), device)?;
        let pos = Tensor::arange(0u32, max as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max, 1))?;
        let freqs = pos.matmul(&inv)?;
        Ok(Self {
            lora_dropout: None,
            checkpoint: None,
            cos: freqs.cos()?,
            sin: freqs.sin()?,
            cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    /// Logits (batch, t, vocab) for token ids (batch, t) at the given position ids, under an
    /// additive mask (batch, 1, t, t); see [`packed_causal_mask`].
    pub fn forward(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor, ModelError> {
        self.forward_noised(ids, positions, mask, None)
    }

    /// [`Llama::forward`] with noise (batch, t, hidden) added to the input embeddings (NEFTune).
    pub fn forward_noised(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        embed_noise: Option<&Tensor>,
    ) -> Result<Tensor, ModelError> {
        let x = self.hidden_noised(ids, positions, mask, embed_noise)?;
        Linear {
            weight: self.head_weight()?,
            bias: None,
            lora: None,
        }
        .forward(&x)
    }

    /// The head's weight as its linear op multiplies with it. The head is frozen (LoRA trains
    /// deltas only): the largest matmul of the model, so the skipped weight gradient matters
    /// most here. A 16-bit head (a packed base's) multiplies through the packed path, widened a
    /// panel at a time.
    pub fn head_weight(&self) -> Result<BaseWeight, ModelError> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        Ok(match head.dtype() {
            DType::BF16 | DType::F16 if !head.is_variable() => BaseWeight::Packed(
                std::sync::Arc::new(super::packed::Packed::half(head.clone())?),
            ),
            _ => head.clone().into(),
        })
    }

    /// The final normed hidden states (batch, t, hidden): the head's input.
    pub fn hidden_noised(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        embed_noise: Option<&Tensor>,
    ) -> Result<Tensor, ModelError> {
        let (b, t) = ids.dims2()?;
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim(),
        );
        let flat = positions.flatten_all()?;
        let max_pos = flat.max(0)?.to_scalar::<u32>()? as usize;
        if max_pos >= self.cos.dim(0)? {
            return Err(ModelError::Config(format!(
                "position {max_pos} is beyond the model's max_position_embeddings {}; lower sequence_len",
                self.cos.dim(0)?
            )));
        }
        let cos = self
            .cos
            .index_select(&flat, 0)?
            .reshape((b, 1, t, hd / 2))?;
        let sin = self
            .sin
            .index_select(&flat, 0)?
            .reshape((b, 1, t, hd / 2))?;
        let mut x = self
            .embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, cfg.hidden_size))?
            .to_dtype(DType::F32)?;
        if let Some(noise) = embed_noise {
            x = (x + noise)?;
        }
        let scale = 1.0 / (hd as f64).sqrt();
        // Packed samples sit in one row contiguously, so row distance is sample distance.
        let windowed = match cfg.sliding_window {
            Some(w) => sliding_window_mask(0, t, t, w, ids.device())?
                .map(|wm| mask.broadcast_add(&wm))
                .transpose()?,
            None => None,
        };
        let mask = windowed.as_ref().unwrap_or(mask);
        let ctx = LayerCtx {
            cos,
            sin,
            mask: mask.clone(),
            b,
            t,
            nh,
            nkv,
            hd,
            eps: cfg.rms_norm_eps,
            scale,
        };
        match &self.checkpoint {
            // Gradient checkpointing: each layer one op keeping only its input (model/checkpoint.rs).
            Some(store) if x.device().is_cpu() && x.dtype() == DType::F32 => {
                // The ops record a graph only downstream of a variable, and the trained
                // tensors sit inside them: start from a variable copy of the embeddings.
                if !x.track_op() {
                    x = candle_core::Var::from_tensor(&x)?.as_tensor().clone();
                }
                for l in &self.layers {
                    x = x
                        .contiguous()?
                        .apply_op1(super::checkpoint::CheckpointedLayer {
                            layer: l.clone(),
                            ctx: ctx.clone(),
                            store: store.clone(),
                        })?;
                }
            }
            _ => {
                for l in &self.layers {
                    x = layer_forward(l, &x, &ctx)?;
                }
            }
        }
        rms_norm(&x, &self.norm, cfg.rms_norm_eps)
    }

    /// Convenience: logits for one unpacked sequence.
    pub fn forward_one(&self, ids: &[u32], device: &Device) -> Result<Tensor, ModelError> {
        let t = ids.len();
        let pos: Vec<u32> = (0..t as u32).collect();
        let mask = packed_causal_mask(std::slice::from_ref(&pos), device)?;
        let ids = Tensor::from_vec(ids.to_vec(), (1, t), device)?;
        let pos = Tensor::from_vec(pos, (1, t), device)?;
        Ok(self.forward(&ids, &pos, &mask)?.squeeze(0)?)
    }

    /// Greedy decoding without a KV cache (recomputes the prefix; for tests and checks).
    pub fn greedy(
        &self,
        prompt: &[u32],
        max_new: usize,
        stop: Option<u32>,
        device: &Device,
    ) -> Result<Vec<u32>, ModelError> {
        let mut ids = prompt.to_vec();
        let mut out = Vec::new();
        for _ in 0..max_new {
            let logits = self.forward_one(&ids, device)?;
            let last = logits.get(ids.len() - 1)?;
            let next = last.argmax(0)?.to_scalar::<u32>()?;
            if Some(next) == stop {
                break;
            }
            ids.push(next);
            out.push(next);
        }
        Ok(out)
    }
}
