//! RMSNorm `y = x · r · w` with `r = 1/√(mean(x²) + eps)` per row, as one custom op with its own
//! backward. The composed version runs six elementwise ops forward and about twice as many
//! backward, each a separate pass with its own buffer; candle's fused `rms_norm` passes no
//! gradient. Backward: `dx = r·(g·w − x·r²·mean(g·w·x))`, `dw = Σ_rows g·x·r`. Rows are summed
//! in a fixed order, so results do not depend on the thread count.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

fn err(m: impl std::fmt::Display) -> candle_core::Error {
    super::ops::op_err("rms_norm", m)
}

fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    super::ops::cpu_f32("rms_norm", s, l, what)
}

/// `1/√(mean(x²) + eps)` of one row.
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ss: f32 = row.iter().map(|v| v * v).sum();
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}

pub struct RmsNorm {
    pub eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "kiln-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32s(xs, xl, "input")?;
        let w = f32s(ws, wl, "weight")?;
        let h = w.len();
        if h == 0 || x.len() % h != 0 || xl.dims().last() != Some(&h) {
            return Err(err("the weight must match the last dimension"));
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(h)
            .zip(x.par_chunks(h))
            .for_each(|(o, row)| {
                let r = inv_rms(row, self.eps);
                for ((o, &v), &g) in o.iter_mut().zip(row).zip(w) {
                    *o = v * r * g;
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let x = x.contiguous()?;
        let g = grad.contiguous()?;
        let h = w.elem_count();
        let rows = x.elem_count() / h.max(1);
        let xv = x.flatten_all()?.to_vec1::<f32>()?;
        let gv = g.flatten_all()?.to_vec1::<f32>()?;
        let wv = w.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0f32; xv.len()];
        // Per row: dx, and the row's contribution to dw (summed below in row order).
        let mut dw_rows = vec![0f32; xv.len()];
        dx.par_chunks_mut(h)
            .zip(dw_rows.par_chunks_mut(h))
            .enumerate()
            .for_each(|(i, (dx, dwr))| {
                let row = &xv[i * h..(i + 1) * h];
                let gr = &gv[i * h..(i + 1) * h];
                let r = inv_rms(row, self.eps);
                let dot: f32 = gr
                    .iter()
                    .zip(&wv)
                    .zip(row)
                    .map(|((g, w), x)| g * w * x)
                    .sum();
                let c = r * r * dot / h as f32;
                for k in 0..h {
                    dx[k] = r * (gr[k] * wv[k] - row[k] * c);
                    dwr[k] = gr[k] * row[k] * r;
                }
            });
        let mut dw = vec![0f32; h];
        for i in 0..rows {
            for (d, v) in dw.iter_mut().zip(&dw_rows[i * h..(i + 1) * h]) {
                *d += v;
            }
        }
        let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
        let dw = Tensor::from_vec(dw, w.shape(), w.device())?;
        Ok((Some(dx), Some(dw)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    #[test]
    fn matches_the_composed_rms_norm_in_value_and_gradients() {
        let dev = Device::Cpu;
        let (b, t, h) = (2, 3, 16);
        let xd: Vec<f32> = (0..b * t * h)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let wd: Vec<f32> = (0..h).map(|i| 0.5 + i as f32 / 10.0).collect();
        let proj: Vec<f32> = (0..b * t * h)
            .map(|i| ((i * 13 % 17) as f32 - 8.0) / 5.0)
            .collect();
        let proj = Tensor::from_vec(proj, (b, t, h), &dev).unwrap();

        let x1 = Var::from_vec(xd.clone(), (b, t, h), &dev).unwrap();
        let w1 = Var::from_vec(wd.clone(), h, &dev).unwrap();
        let y1 = x1
            .as_tensor()
            .apply_op2(w1.as_tensor(), RmsNorm { eps: 1e-5 })
            .unwrap();
        let l1 = (y1.clone() * &proj).unwrap().sum_all().unwrap();
        let g1 = l1.backward().unwrap();

        let x2 = Var::from_vec(xd, (b, t, h), &dev).unwrap();
        let w2 = Var::from_vec(wd, h, &dev).unwrap();
        let ms = x2
            .as_tensor()
            .sqr()
            .unwrap()
            .mean_keepdim(D::Minus1)
            .unwrap();
        let y2 = x2
            .as_tensor()
            .broadcast_div(&(ms + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(w2.as_tensor())
            .unwrap();
        let l2 = (y2.clone() * &proj).unwrap().sum_all().unwrap();
        let g2 = l2.backward().unwrap();

        let close = |a: &Tensor, b: &Tensor| {
            let d = crate::model::ops::max_abs_diff(a, b);
            assert!(d < 1e-4, "max diff {d}");
        };
        close(&y1, &y2);
        close(g1.get(&x1).unwrap(), g2.get(&x2).unwrap());
        close(g1.get(&w1).unwrap(), g2.get(&w2).unwrap());
    }
}
