//! HF's rotate-half RoPE as one custom op with its own backward. Composed, it is two narrows,
//! four products, a difference, a sum and a concatenation per call, each a pass with its own
//! buffer kept for backward; this op keeps nothing (cos and sin are constants). Each pair
//! (x1, x2) = (x[j], x[j + half]) is rotated by its angle, so the backward is the rotation by the
//! opposite angle: the same op with sin negated.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::ops::to_f32_vec as flat;

fn err(m: impl std::fmt::Display) -> candle_core::Error {
    super::ops::op_err("rope", m)
}

/// x: (batch, heads, t, head_dim), contiguous f32; cos, sin: (batch, 1, t, head_dim / 2).
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "kiln-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = super::ops::cpu_f32("rope", s, l, "input")?;
        let &[b, h, t, d] = l.dims() else {
            return Err(err("input must be (batch, heads, t, head_dim)"));
        };
        let half = d / 2;
        if self.cos.dims() != [b, 1, t, half] || self.sin.dims() != [b, 1, t, half] {
            return Err(err(format!(
                "cos/sin {:?} do not fit (batch {b}, 1, {t}, {half})",
                self.cos.dims()
            )));
        }
        let (cos, sin) = (flat(&self.cos)?, flat(&self.sin)?);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(t * d)
            .zip(x.par_chunks(t * d))
            .enumerate()
            .for_each(|(bh, (o, xs))| {
                let bi = bh / h;
                for ti in 0..t {
                    let at = (bi * t + ti) * half;
                    let (c, s) = (&cos[at..at + half], &sin[at..at + half]);
                    let (x1, x2) = xs[ti * d..(ti + 1) * d].split_at(half);
                    let (o1, o2) = o[ti * d..(ti + 1) * d].split_at_mut(half);
                    for j in 0..half {
                        o1[j] = x1[j] * c[j] - x2[j] * s[j];
                        o2[j] = x2[j] * c[j] + x1[j] * s[j];
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from(l.dims())))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let back = Rope {
            cos: self.cos.clone(),
            sin: self.sin.neg()?,
        };
        Ok(Some(grad.contiguous()?.apply_op1(back)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    #[test]
    fn matches_the_composed_rope_in_value_and_gradient() {
        let dev = Device::Cpu;
        let (b, h, t, d) = (2, 3, 5, 8);
        let n = b * h * t * d;
        let xs: Vec<f32> = (0..n).map(|i| ((i * 7 % 31) as f32) / 8.0 - 2.0).collect();
        let angles: Vec<f32> = (0..b * t * d / 2).map(|i| i as f32 * 0.37).collect();
        let ang = Tensor::from_vec(angles, (b, 1, t, d / 2), &dev).unwrap();
        let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
        let proj = Tensor::from_vec(
            (0..n)
                .map(|i| ((i * 5 % 13) as f32) / 4.0 - 1.5)
                .collect::<Vec<f32>>(),
            (b, h, t, d),
            &dev,
        )
        .unwrap();
        let run = |fused: bool| {
            let x = Var::from_vec(xs.clone(), (b, h, t, d), &dev).unwrap();
            let y = if fused {
                x.as_tensor()
                    .apply_op1(Rope {
                        cos: cos.clone(),
                        sin: sin.clone(),
                    })
                    .unwrap()
            } else {
                let x1 = x.as_tensor().narrow(D::Minus1, 0, d / 2).unwrap();
                let x2 = x.as_tensor().narrow(D::Minus1, d / 2, d / 2).unwrap();
                let a =
                    (x1.broadcast_mul(&cos).unwrap() - x2.broadcast_mul(&sin).unwrap()).unwrap();
                let c =
                    (x2.broadcast_mul(&cos).unwrap() + x1.broadcast_mul(&sin).unwrap()).unwrap();
                Tensor::cat(&[a, c], D::Minus1).unwrap()
            };
            let g = (y.clone() * &proj)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (flat(&y), flat(g.get(&x).unwrap()))
        };
        let (a, c) = (run(true), run(false));
        for (what, x, y) in [("output", &a.0, &c.0), ("dx", &a.1, &c.1)] {
            let diff = x
                .iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "{what}: max diff {diff}");
        }
    }
}
