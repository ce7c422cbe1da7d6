//! Gradient checkpointing (`gradient_checkpointing: true`): each decoder layer runs as one op
//! that keeps only its input. Its forward computes the layer and drops everything inside;
//! its backward recomputes the layer from the kept input, backpropagates through it, returns
//! the input's gradient, and leaves the gradients of the layer's trained tensors (LoRA A/B,
//! DoRA magnitudes, full fine-tuning's weights) in a store the training step adds in. The
//! recomputation is the same ops on the same values, so the gradients are the ones the full
//! graph gives, bit for bit; memory keeps one layer's activations instead of every layer's.

use super::llama::{layer_forward, Layer, LayerCtx};
use super::packed::BaseWeight;
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor, TensorId, Var};
use std::sync::{Arc, Mutex};

/// The trained tensors' gradients the layers' backward passes produced.
#[derive(Default)]
pub struct CheckpointGrads {
    grads: Mutex<Vec<(TensorId, Tensor)>>,
}

impl CheckpointGrads {
    /// The gradients gathered since the last call.
    pub fn take(&self) -> Vec<(TensorId, Tensor)> {
        match self.grads.lock() {
            Ok(mut g) => std::mem::take(&mut *g),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        }
    }

    fn push(&self, id: TensorId, g: Tensor) {
        match self.grads.lock() {
            Ok(mut v) => v.push((id, g)),
            Err(p) => p.into_inner().push((id, g)),
        }
    }
}

/// A layer as one checkpointed op (it holds shared clones of the layer's tensors).
pub(crate) struct CheckpointedLayer {
    pub layer: Layer,
    pub ctx: LayerCtx,
    pub store: Arc<CheckpointGrads>,
}

fn err(m: impl std::fmt::Display) -> candle_core::Error {
    super::ops::op_err("checkpointed-layer", m)
}

/// The tensors of a layer that train (variables).
fn trained(l: &Layer) -> Vec<Tensor> {
    let mut out = Vec::new();
    for t in [&l.input_layernorm, &l.post_attention_layernorm] {
        if t.is_variable() {
            out.push(t.clone());
        }
    }
    for lin in [
        &l.attn.q_proj,
        &l.attn.k_proj,
        &l.attn.v_proj,
        &l.attn.o_proj,
        &l.mlp.gate_proj,
        &l.mlp.up_proj,
        &l.mlp.down_proj,
    ] {
        if let BaseWeight::Dense(w) = &lin.weight {
            if w.is_variable() {
                out.push(w.clone());
            }
        }
        if let Some(b) = lin.bias.as_ref().filter(|b| b.is_variable()) {
            out.push(b.clone());
        }
        if let Some(d) = &lin.lora {
            out.push(d.a.as_tensor().clone());
            out.push(d.b.as_tensor().clone());
            if let Some(m) = &d.magnitude {
                out.push(m.as_tensor().clone());
            }
        }
    }
    out
}

impl CustomOp1 for CheckpointedLayer {
    fn name(&self) -> &'static str {
        "checkpointed-layer"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = super::ops::cpu_f32("checkpointed-layer", s, l, "input")?;
        let x = Tensor::from_vec(x.to_vec(), l.shape(), &Device::Cpu)?;
        // The layer's own graph lives only until this returns.
        let y = layer_forward(&self.layer, &x, &self.ctx).map_err(err)?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let x = Var::from_tensor(&arg.detach())?;
        let y = layer_forward(&self.layer, x.as_tensor(), &self.ctx).map_err(err)?;
        // d/dy Σ(y ⊙ g) is exactly g: backpropagating it is backpropagating g.
        let grads = (y * grad_res.detach())?.sum_all()?.backward()?;
        for t in trained(&self.layer) {
            if let Some(g) = grads.get(&t) {
                self.store.push(t.id(), g.clone());
            }
        }
        Ok(grads.get(x.as_tensor()).cloned())
    }
}
