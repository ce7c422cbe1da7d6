//! SwiGLU's gate `silu(g) · u` as one custom op with its own backward. Composed, it is a
//! sigmoid, two products and their buffers per layer, kept for backward; this op keeps only its
//! output and recomputes σ(g) in backward:
//! `du = grad · g·σ(g)`, `dg = grad · u · σ(g)·(1 + g·(1 − σ(g)))`.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Elements per parallel task.
const CHUNK: usize = 4096;

use super::ops::to_f32_vec as flat;

fn err(m: impl std::fmt::Display) -> candle_core::Error {
    super::ops::op_err("swiglu", m)
}

fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    super::ops::cpu_f32("swiglu", s, l, what)
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

pub struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "kiln-swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, u) = (f32s(gs, gl, "gate")?, f32s(us, ul, "up")?);
        if gl.dims() != ul.dims() {
            return Err(err("gate and up must have the same shape"));
        }
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(o, (g, u))| {
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = g * sigmoid(g) * u;
                }
            });
        Ok((CpuStorage::F32(out), Shape::from(gl.dims())))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (gv, uv, dy) = (flat(g)?, flat(u)?, flat(grad)?);
        if gv.len() != uv.len() || gv.len() != dy.len() {
            return Err(err("gate, up and the gradient must have the same shape"));
        }
        let mut dg = vec![0f32; gv.len()];
        let mut du = vec![0f32; gv.len()];
        dg.par_chunks_mut(CHUNK)
            .zip(du.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(c, (dg, du))| {
                let at = c * CHUNK;
                for (i, (dg, du)) in dg.iter_mut().zip(du.iter_mut()).enumerate() {
                    let (x, up, d) = (gv[at + i], uv[at + i], dy[at + i]);
                    let s = sigmoid(x);
                    *du = d * x * s;
                    *dg = d * up * s * (1.0 + x * (1.0 - s));
                }
            });
        Ok((
            Some(Tensor::from_vec(dg, g.shape(), g.device())?),
            Some(Tensor::from_vec(du, u.shape(), u.device())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_the_composed_swiglu_in_value_and_gradients() {
        let dev = Device::Cpu;
        let n = 3 * 5000; // more than one parallel chunk
        let data = |m: usize, o: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * m + o) % 41) as f32 / 5.0 - 4.0)
                .collect()
        };
        let proj = Tensor::from_vec(data(7, 1), (3, 5000), &dev).unwrap();
        let run = |fused: bool| {
            let g = Var::from_vec(data(3, 0), (3, 5000), &dev).unwrap();
            let u = Var::from_vec(data(11, 2), (3, 5000), &dev).unwrap();
            let y = if fused {
                g.as_tensor().apply_op2(u.as_tensor(), SwiGlu).unwrap()
            } else {
                (candle_nn::ops::silu(g.as_tensor()).unwrap() * u.as_tensor()).unwrap()
            };
            let grads = (y.clone() * &proj)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (
                flat(&y),
                flat(grads.get(&g).unwrap()),
                flat(grads.get(&u).unwrap()),
            )
        };
        let (a, b) = (run(true), run(false));
        for (what, x, y) in [
            ("output", &a.0, &b.0),
            ("dg", &a.1, &b.1),
            ("du", &a.2, &b.2),
        ] {
            let d = x
                .iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs() / (1.0 + q.abs()))
                .fold(0f32, f32::max);
            assert!(d < 1e-5, "{what}: relative diff {d}");
        }
    }
}
