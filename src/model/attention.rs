//! Attention `softmax(Q·Kᵀ·scale + M)·V` with an additive mask M as one custom op with its own
//! backward. The composed version keeps about six (batch, heads, t, t) tensors per layer for
//! backpropagation (scores, scaled, masked, and softmax's pieces): ~1.7 GB at 512 tokens over
//! SmolLM2's 30 layers. This op keeps only its output; the backward recomputes the
//! probabilities P from Q and K for one layer at a time:
//! `dV = Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P ⊙ (dP − rowsum(dP ⊙ P))`, `dQ = dS·K·scale`,
//! `dK = dSᵀ·Q·scale`. The forward runs per (batch, head) with the blocked gemm and a
//! one-pass softmax per row; every value is computed by one thread in a fixed order, so results
//! do not depend on the thread count.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, D};
use rayon::prelude::*;

fn err(m: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Msg(format!("attention: {}", m.into()))
}

fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        return Err(err(format!("{what} must be f32")));
    };
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| err(format!("{what} must be contiguous")))?;
    Ok(&v[a..b])
}

/// q, k, v: (batch, heads, t, head_dim), contiguous f32 on the CPU (K and V already repeated
/// to every query head). `mask`: (batch or 1, 1, t, t), additive.
pub struct Attention {
    pub mask: Tensor,
    pub scale: f32,
}

/// A raw output pointer for threads writing disjoint (batch, head) blocks.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: each (batch, head) task writes only its own t × head_dim block.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}
impl Out {
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "kiln-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k, v) = (f32s(qs, ql, "q")?, f32s(ks, kl, "k")?, f32s(vs, vl, "v")?);
        let &[b, h, t, d] = ql.dims() else {
            return Err(err("q must be (batch, heads, t, head_dim)"));
        };
        if kl.dims() != ql.dims() || vl.dims() != ql.dims() {
            return Err(err("q, k and v must have the same shape"));
        }
        let mask = self.mask.contiguous()?;
        let mb = match mask.dims() {
            &[mb, 1, mt, mt2] if (mb == 1 || mb == b) && mt == t && mt2 == t => mb,
            dims => {
                return Err(err(format!(
                    "mask {dims:?} does not fit (batch {b}, 1, {t}, {t})"
                )))
            }
        };
        let (ms, mlay) = mask.storage_and_layout();
        let candle_core::Storage::Cpu(CpuStorage::F32(mv)) = &*ms else {
            return Err(err("mask must be f32 on the CPU"));
        };
        let (ma, mz) = mlay
            .contiguous_offsets()
            .ok_or_else(|| err("mask must be contiguous"))?;
        let m = &mv[ma..mz];
        let mut out = vec![0f32; b * h * t * d];
        let dst = Out(out.as_mut_ptr());
        let scale = self.scale;
        (0..b * h)
            .into_par_iter()
            .for_each_init(Vec::new, |s: &mut Vec<f32>, bh| {
                let base = bh * t * d;
                let mrow = &m[if mb == 1 { 0 } else { bh / h } * t * t..][..t * t];
                s.clear();
                s.resize(t * t, 0.0);
                // SAFETY: S (t × t, rs = t) = Q (t × d, rs = d) · Kᵀ (d × t: rs = 1, cs = d), all
                // inside this (batch, head)'s blocks of the contiguous inputs (shapes checked).
                unsafe {
                    gemm::gemm(
                        t,
                        t,
                        d,
                        s.as_mut_ptr(),
                        1,
                        t as isize,
                        false,
                        q.as_ptr().add(base),
                        1,
                        d as isize,
                        k.as_ptr().add(base),
                        d as isize,
                        1,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                for (row, mr) in s.chunks_exact_mut(t).zip(mrow.chunks_exact(t)) {
                    let mut max = f32::NEG_INFINITY;
                    for (x, mv) in row.iter_mut().zip(mr) {
                        *x += mv;
                        max = max.max(*x);
                    }
                    let mut sum = 0f32;
                    for x in row.iter_mut() {
                        *x = (*x - max).exp();
                        sum += *x;
                    }
                    let inv = 1.0 / sum;
                    row.iter_mut().for_each(|x| *x *= inv);
                }
                // SAFETY: O (t × d) = P (t × t) · V (t × d), written to this task's own block.
                unsafe {
                    gemm::gemm(
                        t,
                        d,
                        t,
                        dst.at(base),
                        1,
                        d as isize,
                        false,
                        s.as_ptr(),
                        1,
                        t as isize,
                        v.as_ptr().add(base),
                        1,
                        d as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            });
        Ok((CpuStorage::F32(out), Shape::from(ql.dims())))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let s = (q.matmul(&k.t()?)? * self.scale as f64)?.broadcast_add(&self.mask)?;
        let p = candle_nn::ops::softmax_last_dim(&s)?;
        drop(s);
        let grad = grad.contiguous()?;
        let dv = p.t()?.matmul(&grad)?;
        let dp = grad.matmul(&v.t()?)?;
        let ds = (dp.broadcast_sub(&(&dp * &p)?.sum_keepdim(D::Minus1)?)? * &p)?;
        let dq = (ds.matmul(&k)? * self.scale as f64)?;
        let dk = (ds.t()?.matmul(&q)? * self.scale as f64)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_the_composed_attention_in_value_and_gradients() {
        let dev = Device::Cpu;
        let (b, h, t, d) = (2, 3, 7, 8);
        let n = b * h * t * d;
        let data = |m: usize, o: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * m + o) % 29) as f32 / 14.0 - 1.0)
                .collect()
        };
        // Two packed samples in row 0 (positions restart at 4), one in row 1.
        let pos = vec![vec![0u32, 1, 2, 3, 0, 1, 2], vec![0u32, 1, 2, 3, 4, 5, 6]];
        let mask = super::super::llama::packed_causal_mask(&pos, &dev).unwrap();
        let proj = Tensor::from_vec(data(7, 3), (b, h, t, d), &dev).unwrap();
        let scale = 1.0 / (d as f32).sqrt();

        let vars = |o: usize| {
            [
                Var::from_vec(data(5, o), (b, h, t, d), &dev).unwrap(),
                Var::from_vec(data(11, o + 1), (b, h, t, d), &dev).unwrap(),
                Var::from_vec(data(13, o + 2), (b, h, t, d), &dev).unwrap(),
            ]
        };
        let [q1, k1, v1] = vars(0);
        let y1 = q1
            .as_tensor()
            .apply_op3(
                k1.as_tensor(),
                v1.as_tensor(),
                Attention {
                    mask: mask.clone(),
                    scale,
                },
            )
            .unwrap();
        let g1 = (y1.clone() * &proj)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();

        let [q2, k2, v2] = vars(0);
        let att = (q2.as_tensor().matmul(&k2.as_tensor().t().unwrap()).unwrap() * scale as f64)
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let att = candle_nn::ops::softmax(&att, D::Minus1).unwrap();
        let y2 = att.matmul(v2.as_tensor()).unwrap();
        let g2 = (y2.clone() * &proj)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();

        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let diff = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "{what}: max diff {diff}");
        };
        close(&y1, &y2, "output");
        close(g1.get(&q1).unwrap(), g2.get(&q2).unwrap(), "dq");
        close(g1.get(&k1).unwrap(), g2.get(&k2).unwrap(), "dk");
        close(g1.get(&v1).unwrap(), g2.get(&v2).unwrap(), "dv");
    }
}
