//! Weighted cross-entropy over a whole vocabulary as one custom op with its own backward.
//!
//! The composed version (`log_softmax`, `gather`, multiply by the mask) makes about ten passes
//! over the logits (n × 49152 floats for SmolLM2, 50 MB at 256 tokens) and allocates a buffer of
//! that size for most of them, in the forward pass and again in the backward pass. This op reads
//! the logits once forward (keeping each row's log-sum-exp) and writes the gradient once
//! backward: `w_i · g_i · (softmax(x_i) − onehot(t_i))`. Rows are independent and each is summed
//! in a fixed order, so results do not depend on the thread count.

use crate::model::packed::BaseWeight;
use crate::model::sgemm::{gemm, k_block, Mat, MatMut};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

fn err(m: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Msg(m.into())
}

/// The contiguous f32 rows of `s` (shape n × v).
fn rows<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<(&'a [f32], usize, usize)> {
    let CpuStorage::F32(x) = s else {
        return Err(err("cross-entropy: logits must be f32"));
    };
    let (n, v) = l.shape().dims2()?;
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| err("cross-entropy: logits must be contiguous"))?;
    Ok((&x[a..b], n, v))
}

/// `max + ln Σ exp(x − max)` of one row (vectorized exp, summed in a fixed order).
fn logsumexp(x: &[f32]) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let s = kiln_kernels::vmath::sum_exp_shifted(x, max);
    max + s.ln()
}

/// Per-row loss `w_i · (logsumexp(x_i) − x_i[t_i])` of logits (n × v); rows with weight 0 are
/// skipped and cost nothing.
pub struct CrossEntropy {
    targets: Arc<Vec<u32>>,
    weights: Arc<Vec<f32>>,
    lse: Arc<Mutex<Vec<f32>>>,
}

impl CrossEntropy {
    pub fn new(targets: Vec<u32>, weights: Vec<f32>) -> Self {
        Self {
            targets: Arc::new(targets),
            weights: Arc::new(weights),
            lse: Arc::new(Mutex::new(Vec::new())),
        }
    }
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "kiln-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, n, v) = rows(s, l)?;
        if self.targets.len() != n || self.weights.len() != n {
            return Err(err(format!(
                "cross-entropy: {n} rows but {} targets and {} weights",
                self.targets.len(),
                self.weights.len()
            )));
        }
        if let Some(&t) = self.targets.iter().find(|&&t| t as usize >= v) {
            return Err(err(format!(
                "cross-entropy: target {t} outside the vocabulary of {v}"
            )));
        }
        let lse: Vec<f32> = x
            .par_chunks(v)
            .zip(self.weights.par_iter())
            .map(|(row, &w)| if w == 0.0 { 0.0 } else { logsumexp(row) })
            .collect();
        let loss: Vec<f32> = (0..n)
            .map(|i| {
                let w = self.weights[i];
                if w == 0.0 {
                    0.0
                } else {
                    w * (lse[i] - x[i * v + self.targets[i] as usize])
                }
            })
            .collect();
        *self
            .lse
            .lock()
            .map_err(|_| err("cross-entropy: poisoned"))? = lse;
        Ok((CpuStorage::F32(loss), Shape::from(n)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad_res
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        let lse = self
            .lse
            .lock()
            .map_err(|_| err("cross-entropy: poisoned"))?
            .clone();
        let op = CrossEntropyGrad {
            targets: self.targets.clone(),
            scale: self.weights.iter().zip(&g).map(|(w, g)| w * g).collect(),
            lse,
        };
        Ok(Some(arg.apply_op1_no_bwd(&op)?))
    }
}

/// The gradient of [`CrossEntropy`] with respect to its logits.
struct CrossEntropyGrad {
    targets: Arc<Vec<u32>>,
    /// `w_i · g_i` per row.
    scale: Vec<f32>,
    lse: Vec<f32>,
}

impl CustomOp1 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "kiln-cross-entropy-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, n, v) = rows(s, l)?;
        if self.scale.len() != n || self.lse.len() != n {
            return Err(err("cross-entropy backward: row count changed"));
        }
        let mut out = vec![0f32; n * v];
        out.par_chunks_mut(v)
            .zip(x.par_chunks(v))
            .enumerate()
            .for_each(|(i, (o, row))| {
                let c = self.scale[i];
                if c == 0.0 {
                    return;
                }
                let m = self.lse[i];
                kiln_kernels::vmath::scaled_exp_shifted(row, m, c, o);
                o[self.targets[i] as usize] -= c;
            });
        Ok((CpuStorage::F32(out), Shape::from((n, v))))
    }
}

/// The head's weight as [`HeadCrossEntropy`] multiplies with it: frozen (dense f32 or packed:
/// LoRA, QLoRA) or a trained dense f32 slice (full fine-tuning, unfrozen embeddings).
enum HeadWeight<'a> {
    Frozen(&'a BaseWeight),
    Trained(&'a [f32], usize, usize),
}

impl HeadWeight<'_> {
    fn dims(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            HeadWeight::Frozen(w) => w.dims2(),
            HeadWeight::Trained(_, n, k) => Ok((*n, *k)),
        }
    }

    /// `out (m × v) = x (m × k) · Wᵀ` for `m` of a batch's `whole` rows, with the bits the
    /// head's linear op gives them in the whole batch.
    fn logits(
        &self,
        x: &[f32],
        m: usize,
        whole: usize,
        out: &mut [f32],
    ) -> candle_core::Result<()> {
        match self {
            HeadWeight::Frozen(w) => w.matmul(x, m, out),
            HeadWeight::Trained(w, n, k) if whole <= GEMV_ROWS => {
                crate::model::frozen::matmul_into(x, w, m, *n, *k, out);
                Ok(())
            }
            HeadWeight::Trained(w, n, k) => {
                gemm(
                    1.0,
                    Mat::rows(x, m, *k),
                    Mat::transposed(w, *k, *n),
                    MatMut::rows(out, m, *n),
                    false,
                    true,
                );
                Ok(())
            }
        }
    }

    /// `dx (m × k) = dy (m × v) · W`.
    fn input_grad(&self, dy: &[f32], m: usize, dx: &mut [f32]) -> candle_core::Result<()> {
        match self {
            HeadWeight::Frozen(w) => w.matmul_t(dy, m, dx),
            HeadWeight::Trained(w, n, k) => {
                gemm(
                    1.0,
                    Mat::rows(dy, m, *n),
                    Mat::rows(w, *n, *k),
                    MatMut::rows(dx, m, *k),
                    false,
                    true,
                );
                Ok(())
            }
        }
    }
}

/// Values of one chunk of logits kept at once (16 MiB): the whole n × v logits are never held.
const CHUNK_VALUES: usize = 1 << 22;
/// Up to this many rows the head's product streams weight rows (frozen.rs's and packed.rs's GEMV
/// path): a frozen head's chunk never leaves so few rows for the last, and a trained head's
/// chunks run the sgemm, so every row's logits have the bits of the unchunked op.
const GEMV_ROWS: usize = 4;

/// The row ranges the logits are computed in. With a trained head the weight gradient sums over
/// rows, so chunks then end on the sgemm's depth blocks over all `m` rows and the summed parts
/// have the bits of one product over the whole batch.
fn chunks(m: usize, v: usize, trained: bool, values: usize) -> Vec<(usize, usize)> {
    let budget = (values / v.max(1)).max(8) / 8 * 8;
    let step = if trained {
        let kb = k_block(m);
        (budget / kb).max(1) * kb
    } else {
        budget
    };
    let mut out = Vec::new();
    let mut r0 = 0;
    while r0 < m {
        let mut r1 = (r0 + step).min(m);
        if !trained && m - r1 <= GEMV_ROWS {
            r1 = m;
        }
        out.push((r0, r1));
        r0 = r1;
    }
    out
}

/// What one pass over the head computes: per-row losses, and with gradient scales also dX (and
/// dW for a trained head).
struct HeadPass {
    loss: Vec<f32>,
    dx: Option<Vec<f32>>,
    dw: Option<Vec<f32>>,
}

/// Logits chunk by chunk, each row's loss `w_i · (logsumexp − x[t_i])`, and where `scale` is
/// given the gradient `c_i · (softmax − onehot)` with `c_i = w_i · scale_i` folded straight into
/// dX (and dW) before the next chunk overwrites the buffer.
fn head_pass(
    x: &[f32],
    head: &HeadWeight,
    targets: &[u32],
    weights: &[f32],
    scale: Option<&[f32]>,
    want_dw: bool,
    chunk_values: usize,
) -> candle_core::Result<HeadPass> {
    let (v, k) = head.dims()?;
    let m = x.len() / k.max(1);
    if x.len() != m * k || targets.len() != m || weights.len() != m {
        return Err(err(format!(
            "cross-entropy: {m} rows of width {k} but {} targets and {} weights",
            targets.len(),
            weights.len()
        )));
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= v) {
        return Err(err(format!(
            "cross-entropy: target {t} outside the vocabulary of {v}"
        )));
    }
    let trained = matches!(head, HeadWeight::Trained(..));
    let mut loss = vec![0f32; m];
    let mut dx = scale.map(|_| vec![0f32; m * k]);
    let mut dw = (scale.is_some() && want_dw).then(|| vec![0f32; v * k]);
    let parts = chunks(m, v, trained, chunk_values);
    let most = parts.iter().map(|(a, b)| b - a).max().unwrap_or(0);
    let mut buf = vec![0f32; most * v];
    for (ci, &(r0, r1)) in parts.iter().enumerate() {
        let rows = r1 - r0;
        let logits = &mut buf[..rows * v];
        head.logits(&x[r0 * k..r1 * k], rows, m, logits)?;
        let w = &weights[r0..r1];
        let t = &targets[r0..r1];
        let lse: Vec<f32> = logits
            .par_chunks(v)
            .zip(w.par_iter())
            .map(|(row, &w)| if w == 0.0 { 0.0 } else { logsumexp(row) })
            .collect();
        for i in 0..rows {
            if w[i] != 0.0 {
                loss[r0 + i] = w[i] * (lse[i] - logits[i * v + t[i] as usize]);
            }
        }
        let Some(scale) = scale else { continue };
        let s = &scale[r0..r1];
        logits.par_chunks_mut(v).enumerate().for_each(|(i, row)| {
            let c = w[i] * s[i];
            if c == 0.0 {
                row.fill(0.0);
                return;
            }
            kiln_kernels::vmath::scaled_exp_shifted_inplace(row, lse[i], c);
            row[t[i] as usize] -= c;
        });
        if let Some(dx) = dx.as_mut() {
            head.input_grad(logits, rows, &mut dx[r0 * k..r1 * k])?;
        }
        if let Some(dw) = dw.as_mut() {
            gemm(
                1.0,
                Mat::transposed(logits, v, rows),
                Mat::rows(&x[r0 * k..r1 * k], rows, k),
                MatMut::rows(dw, v, k),
                ci > 0,
                true,
            );
        }
    }
    Ok(HeadPass { loss, dx, dw })
}

/// The head's product and the weighted cross-entropy as one op: input the final hidden states
/// (n × k, normed), output the per-row losses (n) as [`CrossEntropy`] gives them for the
/// logits. The n × v logits (50 MB at 256 tokens for SmolLM2, 400 MB at 2048) are only ever
/// held a chunk at a time, and their gradient never as a whole.
///
/// Given a [`GradHint`] the forward pass computes the gradients too while each chunk of logits
/// is at hand. `Uniform(g)` (the gradient each row's loss will receive: `1 / trained tokens` in
/// a supervised step): the backward pass returns them when the hint held for every row, with the
/// bits of the logits → [`CrossEntropy`] chain. `PerRow` (rows scaled by the backward pass,
/// e.g. preference losses over per-sequence sums): a frozen head's dX is kept unscaled and each
/// row scaled by its gradient in the backward pass (equal to the chain's up to rounding, as
/// dXᵢ is linear in its row's gradient). Otherwise (a hint that did not hold, none, or a trained
/// head under `PerRow`) the backward pass recomputes the logits.
///
/// Applied with `apply_op1` to a frozen head (the weight held here, dense or packed), or with
/// `apply_op2(x, w)` to a trained f32 head, whose gradient it then returns too.
/// What [`HeadCrossEntropy`]'s forward pass may assume about the gradient its losses receive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GradHint {
    /// Every row's loss receives this gradient.
    Uniform(f32),
    /// Each row its own, known only in the backward pass.
    PerRow,
}

/// dX and, for a trained head, dW.
type SavedGrads = (Vec<f32>, Option<Vec<f32>>);

pub struct HeadCrossEntropy {
    head: Option<BaseWeight>,
    targets: Arc<Vec<u32>>,
    weights: Arc<Vec<f32>>,
    grad_hint: Option<GradHint>,
    /// dX (and dW) computed in the forward pass under `grad_hint`.
    saved: Mutex<Option<SavedGrads>>,
    /// Set when a backward pass returned the forward pass's gradients (tests check the hint).
    reused: Arc<AtomicBool>,
    chunk_values: usize,
}

impl HeadCrossEntropy {
    /// A frozen head (`apply_op1` on the hidden states).
    pub fn frozen(head: BaseWeight, targets: Vec<u32>, weights: Vec<f32>) -> Self {
        Self {
            head: Some(head),
            targets: Arc::new(targets),
            weights: Arc::new(weights),
            grad_hint: None,
            saved: Mutex::new(None),
            reused: Arc::new(AtomicBool::new(false)),
            chunk_values: CHUNK_VALUES,
        }
    }

    /// A trained f32 head (`apply_op2(hidden, weight)`).
    pub fn trained(targets: Vec<u32>, weights: Vec<f32>) -> Self {
        Self {
            head: None,
            targets: Arc::new(targets),
            weights: Arc::new(weights),
            grad_hint: None,
            saved: Mutex::new(None),
            reused: Arc::new(AtomicBool::new(false)),
            chunk_values: CHUNK_VALUES,
        }
    }

    /// Logits values held per chunk (tests use small ones to cover several chunks).
    #[cfg(test)]
    fn with_chunk_values(mut self, values: usize) -> Self {
        self.chunk_values = values;
        self
    }

    /// A flag set when a backward pass reused the forward pass's gradients.
    pub fn reused(&self) -> Arc<AtomicBool> {
        self.reused.clone()
    }

    /// Compute the gradients in the forward pass (see [`GradHint`]).
    pub fn with_grad_hint(mut self, g: Option<GradHint>) -> Self {
        self.grad_hint = g;
        self
    }

    fn forward(
        &self,
        x: &[f32],
        head: &HeadWeight,
        k: usize,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let m = x.len() / k.max(1);
        let want_dw = matches!(head, HeadWeight::Trained(..));
        let hint = match self.grad_hint {
            Some(GradHint::Uniform(g)) => Some(vec![g; m]),
            Some(GradHint::PerRow) if !want_dw => Some(vec![1.0; m]),
            _ => None,
        };
        let pass = head_pass(
            x,
            head,
            &self.targets,
            &self.weights,
            hint.as_deref(),
            want_dw,
            self.chunk_values,
        )?;
        *self
            .saved
            .lock()
            .map_err(|_| err("cross-entropy: poisoned"))? = pass.dx.map(|dx| (dx, pass.dw));
        Ok((CpuStorage::F32(pass.loss), Shape::from(m)))
    }

    /// (dX, dW) for the backward pass's per-row gradient `g`: the forward pass's when `g` is the
    /// hint in every row, recomputed otherwise.
    fn grads(
        &self,
        x: &Tensor,
        head: &HeadWeight,
        g: &Tensor,
    ) -> candle_core::Result<(Tensor, Option<Vec<f32>>)> {
        let g = g.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        let saved = self
            .saved
            .lock()
            .map_err(|_| err("cross-entropy: poisoned"))?
            .take();
        let uniform = |h: f32| g.iter().all(|&v| v.to_bits() == h.to_bits());
        let (dx, dw) = match (saved, self.grad_hint) {
            (Some(s), Some(GradHint::Uniform(h))) if uniform(h) => {
                self.reused.store(true, Ordering::Relaxed);
                s
            }
            (Some((mut dx, None)), Some(GradHint::PerRow)) if dx.len() == g.len() * k_of(x)? => {
                let k = k_of(x)?;
                dx.par_chunks_mut(k.max(1))
                    .zip(g.par_iter())
                    .for_each(|(row, &gi)| row.iter_mut().for_each(|v| *v *= gi));
                self.reused.store(true, Ordering::Relaxed);
                (dx, None)
            }
            _ => {
                let xs = crate::model::ops::to_f32_vec(x)?;
                let pass = head_pass(
                    &xs,
                    head,
                    &self.targets,
                    &self.weights,
                    Some(&g),
                    matches!(head, HeadWeight::Trained(..)),
                    self.chunk_values,
                )?;
                (pass.dx.unwrap_or_default(), pass.dw)
            }
        };
        Ok((Tensor::from_vec(dx, x.shape(), x.device())?, dw))
    }
}

fn k_of(x: &Tensor) -> candle_core::Result<usize> {
    x.dims()
        .last()
        .copied()
        .ok_or_else(|| err("cross-entropy: scalar hidden states"))
}

fn hidden_width(l: &Layout) -> candle_core::Result<usize> {
    l.dims()
        .last()
        .copied()
        .ok_or_else(|| err("cross-entropy: scalar hidden states"))
}

impl CustomOp1 for HeadCrossEntropy {
    fn name(&self) -> &'static str {
        "kiln-head-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let head = self
            .head
            .as_ref()
            .ok_or_else(|| err("cross-entropy: a trained head needs apply_op2"))?;
        let x = crate::model::ops::cpu_f32("cross-entropy", s, l, "the hidden states")?;
        let k = hidden_width(l)?;
        if head.dims2()?.1 != k {
            return Err(err(
                "cross-entropy: head and hidden states disagree on width",
            ));
        }
        self.forward(x, &HeadWeight::Frozen(head), k)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let head = self
            .head
            .as_ref()
            .ok_or_else(|| err("cross-entropy: a trained head needs apply_op2"))?;
        Ok(Some(self.grads(x, &HeadWeight::Frozen(head), g)?.0))
    }
}

impl CustomOp2 for HeadCrossEntropy {
    fn name(&self) -> &'static str {
        "kiln-head-cross-entropy-trained"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = crate::model::ops::cpu_f32("cross-entropy", xs, xl, "the hidden states")?;
        let w = crate::model::ops::cpu_f32("cross-entropy", ws, wl, "the head")?;
        let (v, k) = wl.shape().dims2()?;
        if hidden_width(xl)? != k {
            return Err(err(
                "cross-entropy: head and hidden states disagree on width",
            ));
        }
        self.forward(x, &HeadWeight::Trained(w, v, k), k)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let wc = w.contiguous()?;
        let (v, k) = wc.dims2()?;
        let (s, l) = wc.storage_and_layout();
        let candle_core::Storage::Cpu(c) = &*s else {
            return Err(err("cross-entropy: head off the CPU"));
        };
        let wv = crate::model::ops::cpu_f32("cross-entropy", c, l, "the head")?;
        let (dx, dw) = self.grads(x, &HeadWeight::Trained(wv, v, k), g)?;
        let dw = dw
            .map(|d| Tensor::from_vec(d, (v, k), w.device()))
            .transpose()?;
        Ok((Some(dx), dw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    #[test]
    fn matches_log_softmax_gather_in_value_and_gradient() {
        let dev = Device::Cpu;
        let (n, v) = (5, 37);
        let data: Vec<f32> = (0..n * v)
            .map(|i| ((i * 7919 % 101) as f32 / 13.0).sin() * 4.0)
            .collect();
        let targets = vec![3u32, 0, 36, 12, 5];
        let weights = vec![1.0f32, 0.0, 2.0, 1.0, 0.5];

        let x = Var::from_vec(data.clone(), (n, v), &dev).unwrap();
        let fused = x
            .apply_op1(CrossEntropy::new(targets.clone(), weights.clone()))
            .unwrap()
            .sum_all()
            .unwrap();
        let g_fused = fused.backward().unwrap();
        let g_fused = g_fused
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();

        let y = Var::from_vec(data, (n, v), &dev).unwrap();
        let logp = candle_nn::ops::log_softmax(y.as_tensor(), D::Minus1).unwrap();
        let t = Tensor::from_vec(targets, (n, 1), &dev).unwrap();
        let w = Tensor::from_vec(weights, n, &dev).unwrap();
        let picked = logp
            .gather(&t, D::Minus1)
            .unwrap()
            .squeeze(D::Minus1)
            .unwrap();
        let reference = (picked * w).unwrap().sum_all().unwrap().neg().unwrap();
        let g_ref = reference.backward().unwrap();
        let g_ref = g_ref
            .get(&y)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();

        let (a, b) = (
            fused.to_scalar::<f32>().unwrap(),
            reference.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        for (p, q) in g_fused.iter().zip(&g_ref) {
            assert!((p - q).abs() < 1e-5, "{p} vs {q}");
        }
        // The zero-weight row has no gradient at all.
        assert!(g_fused[v..2 * v].iter().all(|&z| z == 0.0));
    }

    #[test]
    fn rejects_targets_outside_the_vocabulary() {
        let x = Tensor::zeros((2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let e = x
            .apply_op1(CrossEntropy::new(vec![1, 9], vec![1.0, 1.0]))
            .unwrap_err();
        assert!(e.to_string().contains("target 9"), "{e}");
    }

    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u64 * 7919 + seed * 104_729) % 1009) as f32 / 97.0).sin() * scale)
            .collect()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    /// `(Σ losses) / total` and its gradients through the unfused chain (the head's linear op,
    /// then [`CrossEntropy`]) and through [`HeadCrossEntropy`] under each hint.
    fn compare(m: usize, k: usize, v: usize, trained: bool, packed: bool, chunk: usize) {
        let dev = Device::Cpu;
        let targets: Vec<u32> = (0..m).map(|i| ((i * 31 + 7) % v) as u32).collect();
        let weights: Vec<f32> = (0..m).map(|i| if i % 5 == 3 { 0.0 } else { 1.0 }).collect();
        let total = weights.iter().filter(|&&w| w > 0.0).count();
        let hint = (1.0 / total as f64) as f32;
        let xv = values(m * k, 1, 1.5);
        let wv = values(v * k, 2, 0.8);
        let frozen_w = || -> BaseWeight {
            let w = Tensor::from_vec(wv.clone(), (v, k), &dev).unwrap();
            if packed {
                let half = w.to_dtype(candle_core::DType::BF16).unwrap();
                BaseWeight::Packed(Arc::new(crate::model::packed::Packed::half(half).unwrap()))
            } else {
                w.into()
            }
        };
        // Reference chain.
        let x = Var::from_vec(xv.clone(), (m, k), &dev).unwrap();
        let w = Var::from_vec(wv.clone(), (v, k), &dev).unwrap();
        let weight: BaseWeight = if trained {
            w.as_tensor().clone().into()
        } else {
            frozen_w()
        };
        let logits = crate::model::llama::Linear {
            weight,
            bias: None,
            lora: None,
        }
        .forward(x.as_tensor())
        .unwrap();
        let rl = logits
            .apply_op1(CrossEntropy::new(targets.clone(), weights.clone()))
            .unwrap();
        let rloss = (rl.sum_all().unwrap() / total as f64).unwrap();
        let rg = rloss.backward().unwrap();
        let (rdx, rdw) = (rg.get(x.as_tensor()).unwrap(), rg.get(w.as_tensor()));
        assert_eq!(rdw.is_some(), trained);

        for (h, expect_reuse) in [
            (Some(GradHint::Uniform(hint)), true),
            (None, false),
            (Some(GradHint::Uniform(hint * 2.0)), false),
        ] {
            let x2 = Var::from_vec(xv.clone(), (m, k), &dev).unwrap();
            let w2 = Var::from_vec(wv.clone(), (v, k), &dev).unwrap();
            let op = if trained {
                HeadCrossEntropy::trained(targets.clone(), weights.clone())
            } else {
                HeadCrossEntropy::frozen(frozen_w(), targets.clone(), weights.clone())
            }
            .with_grad_hint(h)
            .with_chunk_values(chunk);
            let reused = op.reused();
            let fl = if trained {
                x2.apply_op2(w2.as_tensor(), op).unwrap()
            } else {
                x2.apply_op1(op).unwrap()
            };
            assert_eq!(bits(&fl), bits(&rl), "losses, hint {h:?}");
            let floss = (fl.sum_all().unwrap() / total as f64).unwrap();
            let fg = floss.backward().unwrap();
            assert_eq!(
                bits(fg.get(x2.as_tensor()).unwrap()),
                bits(rdx),
                "dX, hint {h:?}"
            );
            if let Some(rdw) = rdw {
                assert_eq!(
                    bits(fg.get(w2.as_tensor()).unwrap()),
                    bits(rdw),
                    "dW, hint {h:?}"
                );
            }
            assert_eq!(
                reused.load(Ordering::Relaxed),
                expect_reuse,
                "reuse, hint {h:?}"
            );
        }
    }

    #[test]
    fn fused_head_matches_the_logits_chain_bit_for_bit() {
        // Frozen f32 head over several chunks (16 rows each; the last 3 rows join the one
        // before), one chunk, and a 3-row batch (the GEMV path).
        compare(35, 24, 300, false, false, 16 * 300);
        compare(35, 24, 300, false, false, 1 << 22);
        compare(3, 24, 300, false, false, 16 * 300);
        // A 16-bit head of a packed base.
        compare(35, 24, 300, false, true, 16 * 300);
        // A trained head: chunks on the sgemm's depth blocks over 700 rows (3 × 234), dW summed.
        compare(700, 8, 50, true, false, 8 * 50);
        compare(3, 8, 50, true, false, 8 * 50);
    }

    #[test]
    fn per_row_hint_scales_a_frozen_heads_rows_and_recomputes_a_trained_one() {
        let dev = Device::Cpu;
        let (m, k, v) = (40, 16, 200);
        let targets: Vec<u32> = (0..m).map(|i| ((i * 13 + 1) % v) as u32).collect();
        let weights: Vec<f32> = (0..m).map(|i| if i % 7 == 0 { 0.0 } else { 1.0 }).collect();
        // A per-row gradient as a preference loss gives it: one value per sequence.
        let g: Vec<f32> = (0..m).map(|i| [0.3f32, -1.7, 0.05][i / 14]).collect();
        let xv = values(m * k, 3, 1.2);
        let wv = values(v * k, 4, 0.7);
        for trained in [false, true] {
            let run = |fused: bool| {
                let x = Var::from_vec(xv.clone(), (m, k), &dev).unwrap();
                let w = Var::from_vec(wv.clone(), (v, k), &dev).unwrap();
                let gt = Tensor::from_vec(g.clone(), m, &dev).unwrap();
                let frozen =
                    || BaseWeight::from(Tensor::from_vec(wv.clone(), (v, k), &dev).unwrap());
                let mut reused = None;
                let losses = if fused {
                    let op = if trained {
                        HeadCrossEntropy::trained(targets.clone(), weights.clone())
                    } else {
                        HeadCrossEntropy::frozen(frozen(), targets.clone(), weights.clone())
                    }
                    .with_grad_hint(Some(GradHint::PerRow))
                    .with_chunk_values(16 * v);
                    reused = Some(op.reused());
                    if trained {
                        x.apply_op2(w.as_tensor(), op).unwrap()
                    } else {
                        x.apply_op1(op).unwrap()
                    }
                } else {
                    let weight = if trained {
                        w.as_tensor().clone().into()
                    } else {
                        frozen()
                    };
                    crate::model::llama::Linear {
                        weight,
                        bias: None,
                        lora: None,
                    }
                    .forward(x.as_tensor())
                    .unwrap()
                    .apply_op1(CrossEntropy::new(targets.clone(), weights.clone()))
                    .unwrap()
                };
                let grads = (losses.clone() * gt)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let dx = grads
                    .get(x.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let dw = grads.get(w.as_tensor()).map(bits);
                (
                    bits(&losses),
                    dx,
                    dw,
                    reused.map(|r| r.load(Ordering::Relaxed)),
                )
            };
            let (rl, rdx, rdw, _) = run(false);
            let (fl, fdx, fdw, reused) = run(true);
            assert_eq!(fl, rl, "losses (trained head: {trained})");
            assert_eq!(fdw, rdw, "dW (trained head: {trained})");
            // A frozen head's rows are scaled after the product: equal up to rounding. A trained
            // head's gradients are recomputed in the backward pass: the chain's bits.
            assert_eq!(reused, Some(!trained));
            for (a, b) in fdx.iter().zip(&rdx) {
                if trained {
                    assert_eq!(a.to_bits(), b.to_bits());
                } else {
                    assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
                }
            }
            assert!(rdx.iter().any(|&d| d != 0.0));
        }
    }
}
