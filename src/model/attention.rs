//! Attention `softmax(Q·Kᵀ·scale + M)·V` with an additive mask M as one custom op with its own
//! backward. The composed version keeps about six (batch, heads, t, t) tensors per layer for
//! backpropagation (scores, scaled, masked, and softmax's pieces): ~1.7 GB at 512 tokens over
//! SmolLM2's 30 layers. This op keeps only its output; the backward recomputes the
//! probabilities P from Q and K for one layer at a time:
//! `dV = Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P ⊙ (dP − rowsum(dP ⊙ P))`, `dQ = dS·K·scale`,
//! `dK = dSᵀ·Q·scale`. Forward and backward run per (batch, head) on rayon's threads, each
//! product a single-threaded blocked gemm, so every value is computed by one thread in a fixed
//! order and results do not depend on the thread count (nor wait on candle's spinning pool).

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::ops::to_f32_vec as flat;

fn err(m: impl std::fmt::Display) -> candle_core::Error {
    super::ops::op_err("attention", m)
}

fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    super::ops::cpu_f32("attention", s, l, what)
}

/// `dst (m × n) = beta · lhs (m × k) · rhs (k × n)`, with (row, column) strides for each; one
/// thread (callers run many of these in parallel).
///
/// # Safety
/// Every pointer must address its matrix's full extent under the given strides; no one else
/// may write `lhs` or `rhs`, or touch `dst`'s elements, meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    beta: f32,
) {
    use super::sgemm::{gemm, Mat, MatMut};
    let extent = |rows: usize, cols: usize, rs: usize, cs: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + (cols - 1) * cs + 1
        }
    };
    // SAFETY: the caller guarantees each pointer addresses its matrix's full extent, and that
    // dst does not overlap the operands.
    let (d, l, r) = unsafe {
        (
            MatMut::from_raw(dst, m, n, dst_rs, 1),
            std::slice::from_raw_parts(lhs, extent(m, k, lhs_rs, lhs_cs)),
            std::slice::from_raw_parts(rhs, extent(k, n, rhs_rs, rhs_cs)),
        )
    };
    gemm(
        beta,
        Mat::new(l, m, k, lhs_rs, lhs_cs),
        Mat::new(r, k, n, rhs_rs, rhs_cs),
        d,
        false,
        false,
    );
}

/// Softmax of each row of `s` (t × t) after adding the mask rows, with the vectorized exp.
/// Entries more than 87 below the row's maximum (masked ones: the mask is −1e9) become 0;
/// their true value is below f32's smallest normal number.
fn masked_softmax(s: &mut [f32], mask: &[f32], t: usize) {
    for (row, mr) in s.chunks_exact_mut(t).zip(mask.chunks_exact(t)) {
        let mut max = f32::NEG_INFINITY;
        for (x, mv) in row.iter_mut().zip(mr) {
            *x += mv;
            max = max.max(*x);
        }
        let sum = kiln_kernels::vmath::exp_shifted_inplace(row, max);
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

/// The mask as a contiguous f32 slice with its batch size (1 or `b`), checked against (b, t).
fn mask_rows(mask: &Tensor, b: usize, t: usize) -> candle_core::Result<(Vec<f32>, usize)> {
    match mask.dims() {
        &[mb, 1, mt, mt2] if (mb == 1 || mb == b) && mt == t && mt2 == t => Ok((
            mask.to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?,
            mb,
        )),
        dims => Err(err(format!(
            "mask {dims:?} does not fit (batch {b}, 1, {t}, {t})"
        ))),
    }
}

/// q, k, v: (batch, heads, t, head_dim), contiguous f32 on the CPU (K and V already repeated
/// to every query head). `mask`: (batch or 1, 1, t, t), additive.
pub struct Attention {
    pub mask: Tensor,
    pub scale: f32,
}

/// Output pointers shared by the (batch, head) tasks, each writing only its own block.
use super::engine::OutPtr as Out;

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
        let (m, mb) = mask_rows(&self.mask, b, t)?;
        let m = &m;
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
                // SAFETY: S (t × t) = Q (t × d) · Kᵀ (d × t: K's rows read as columns), then
                // O (t × d) = P · V into this task's own block; all inside this (batch, head)'s
                // blocks of the contiguous inputs (shapes checked above).
                unsafe {
                    mm(
                        (t, t, d),
                        s.as_mut_ptr(),
                        t,
                        q.as_ptr().add(base),
                        (d, 1),
                        k.as_ptr().add(base),
                        (1, d),
                        scale,
                    );
                }
                masked_softmax(s, mrow, t);
                unsafe {
                    mm(
                        (t, d, t),
                        dst.at(base),
                        d,
                        s.as_ptr(),
                        (t, 1),
                        v.as_ptr().add(base),
                        (d, 1),
                        1.0,
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
        let &[b, h, t, d] = q.dims() else {
            return Err(err("q must be (batch, heads, t, head_dim)"));
        };
        let (q, k, v, g) = (flat(q)?, flat(k)?, flat(v)?, flat(grad)?);
        let (m, mb) = mask_rows(&self.mask, b, t)?;
        let n = b * h * t * d;
        if [q.len(), k.len(), v.len(), g.len()] != [n; 4] {
            return Err(err("q, k, v and the gradient must have the same shape"));
        }
        let (mut dq, mut dk, mut dv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        let (pq, pk, pv) = (
            Out(dq.as_mut_ptr()),
            Out(dk.as_mut_ptr()),
            Out(dv.as_mut_ptr()),
        );
        let scale = self.scale;
        (0..b * h).into_par_iter().for_each_init(
            || (Vec::new(), Vec::new()),
            |(p, ds): &mut (Vec<f32>, Vec<f32>), bh| {
                let base = bh * t * d;
                let mrow = &m[if mb == 1 { 0 } else { bh / h } * t * t..][..t * t];
                p.clear();
                p.resize(t * t, 0.0);
                ds.clear();
                ds.resize(t * t, 0.0);
                let (qp, kp, vp, gp) = (&q[base..], &k[base..], &v[base..], &g[base..]);
                // SAFETY (all products): operands are this (batch, head)'s t × d blocks of the
                // flat inputs and this task's t × t scratch; results go to this task's own
                // blocks of dq, dk, dv.
                unsafe {
                    // P = softmax(Q·Kᵀ·scale + M), as in the forward pass.
                    mm(
                        (t, t, d),
                        p.as_mut_ptr(),
                        t,
                        qp.as_ptr(),
                        (d, 1),
                        kp.as_ptr(),
                        (1, d),
                        scale,
                    );
                    masked_softmax(p, mrow, t);
                    // dV = Pᵀ · dO.
                    mm(
                        (t, d, t),
                        pv.at(base),
                        d,
                        p.as_ptr(),
                        (1, t),
                        gp.as_ptr(),
                        (d, 1),
                        1.0,
                    );
                    // dP = dO · Vᵀ.
                    mm(
                        (t, t, d),
                        ds.as_mut_ptr(),
                        t,
                        gp.as_ptr(),
                        (d, 1),
                        vp.as_ptr(),
                        (1, d),
                        1.0,
                    );
                }
                // dS = P ⊙ (dP − rowsum(dP ⊙ P)).
                for (dsr, pr) in ds.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
                    let dot: f32 = dsr.iter().zip(pr).map(|(a, b)| a * b).sum();
                    for (x, pv) in dsr.iter_mut().zip(pr) {
                        *x = pv * (*x - dot);
                    }
                }
                unsafe {
                    // dQ = dS · K · scale; dK = dSᵀ · Q · scale.
                    mm(
                        (t, d, t),
                        pq.at(base),
                        d,
                        ds.as_ptr(),
                        (t, 1),
                        kp.as_ptr(),
                        (d, 1),
                        scale,
                    );
                    mm(
                        (t, d, t),
                        pk.at(base),
                        d,
                        ds.as_ptr(),
                        (1, t),
                        qp.as_ptr(),
                        (d, 1),
                        scale,
                    );
                }
            },
        );
        let dev = grad.device();
        let shape = (b, h, t, d);
        Ok((
            Some(Tensor::from_vec(dq, shape, dev)?),
            Some(Tensor::from_vec(dk, shape, dev)?),
            Some(Tensor::from_vec(dv, shape, dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

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
            let diff = crate::model::ops::max_abs_diff(a, b);
            assert!(diff < 1e-5, "{what}: max diff {diff}");
        };
        close(&y1, &y2, "output");
        close(g1.get(&q1).unwrap(), g2.get(&q2).unwrap(), "dq");
        close(g1.get(&k1).unwrap(), g2.get(&k2).unwrap(), "dk");
        close(g1.get(&v1).unwrap(), g2.get(&v2).unwrap(), "dv");
    }
}
