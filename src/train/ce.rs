//! Weighted cross-entropy over a whole vocabulary as one custom op with its own backward.
//!
//! The composed version (`log_softmax`, `gather`, multiply by the mask) makes about ten passes
//! over the logits (n × 49152 floats for SmolLM2, 50 MB at 256 tokens) and allocates a buffer of
//! that size for most of them, in the forward pass and again in the backward pass. This op reads
//! the logits once forward (keeping each row's log-sum-exp) and writes the gradient once
//! backward: `w_i · g_i · (softmax(x_i) − onehot(t_i))`. Rows are independent and each is summed
//! in a fixed order, so results do not depend on the thread count.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;
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
}
