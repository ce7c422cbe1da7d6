//! Linear layers as single custom ops on kiln's sgemm, so a layer is two products forward and a
//! handful backward instead of a dozen candle ops (each with its own buffers, page faults and
//! thread-pool round trip):
//!
//! - [`LoraLinear`]: `y = x·Wᵀ + s·((x ⊙ mask)·Aᵀ)·Bᵀ` with W frozen. The low-rank product is
//!   added into y by the same sgemm call (accumulate), and backward recomputes the m × r
//!   `h = (x ⊙ mask)·Aᵀ` instead of keeping it:
//!   `g = s·dy·B`, `dB = s·dyᵀ·h`, `dA = gᵀ·(x ⊙ mask)`, `dx = dy·W + (g·A) ⊙ mask`.
//! - [`TrainedLinear`]: `y = x·Wᵀ` with W trained (full fine-tuning): `dx = dy·W`, `dW = dyᵀ·x`.

use super::sgemm::{gemm, Mat, MatMut};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor};

fn err(m: impl std::fmt::Display) -> candle_core::Error {
    super::ops::op_err("linear", m)
}

/// Runs `f` on a tensor's values as a contiguous f32 slice of CPU storage.
fn with_f32<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    let Storage::Cpu(c) = &*s else {
        return Err(err(format!("{what} must be on the CPU")));
    };
    f(super::ops::cpu_f32("linear", c, l, what)?)
}

/// (rows, out) of a linear layer's input (…, k) against a weight (out, k).
fn geometry(x_dims: &[usize], w_dims: &[usize]) -> candle_core::Result<(usize, usize, usize)> {
    let k = *x_dims.last().ok_or_else(|| err("scalar input"))?;
    let &[n, wk] = w_dims else {
        return Err(err("the weight must be (out, in)"));
    };
    if wk != k {
        return Err(err(format!(
            "input has {k} features but the weight expects {wk}"
        )));
    }
    Ok((x_dims.iter().product::<usize>() / k.max(1), n, k))
}

fn out_shape(x_dims: &[usize], last: usize) -> Shape {
    let mut d = x_dims.to_vec();
    if let Some(l) = d.last_mut() {
        *l = last;
    }
    Shape::from(d)
}

/// `y = x·Wᵀ + scale·((x ⊙ mask)·Aᵀ)·Bᵀ`: inputs x (…, k), A (r, k), B (n, r); W (n, k) frozen.
pub struct LoraLinear {
    pub weight: super::packed::BaseWeight,
    pub scale: f32,
    /// LoRA dropout's mask on A's input (0 or 1/(1−p)), shaped like x.
    pub mask: Option<Tensor>,
}

impl LoraLinear {
    /// `x ⊙ mask`, or x itself without a mask.
    fn masked<'a>(&self, x: &'a [f32], buf: &'a mut Vec<f32>) -> candle_core::Result<&'a [f32]> {
        let Some(mask) = &self.mask else {
            return Ok(x);
        };
        with_f32(mask, "dropout mask", |mk| {
            if mk.len() != x.len() {
                return Err(err("dropout mask and input differ in size"));
            }
            *buf = x.iter().zip(mk).map(|(a, b)| a * b).collect();
            Ok(())
        })?;
        Ok(buf)
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "kiln-lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = super::ops::cpu_f32("linear", xs, xl, "input")?;
        let a = super::ops::cpu_f32("linear", as_, al, "lora_A")?;
        let b = super::ops::cpu_f32("linear", bs, bl, "lora_B")?;
        let (wn, wk) = self.weight.dims2()?;
        let (m, n, k) = geometry(xl.dims(), &[wn, wk])?;
        let r = al.dims().first().copied().unwrap_or(0);
        if al.dims() != [r, k] || bl.dims() != [n, r] {
            return Err(err(format!(
                "lora_A {:?} / lora_B {:?} do not fit a ({n}, {k}) weight",
                al.dims(),
                bl.dims()
            )));
        }
        let mut y = vec![0f32; m * n];
        self.weight.matmul(x, m, &mut y)?;
        let mut buf = Vec::new();
        let xm = self.masked(x, &mut buf)?;
        let mut h = vec![0f32; m * r];
        gemm(
            1.0,
            Mat::rows(xm, m, k),
            Mat::transposed(a, k, r),
            MatMut::rows(&mut h, m, r),
            false,
            true,
        );
        gemm(
            self.scale,
            Mat::rows(&h, m, r),
            Mat::transposed(b, r, n),
            MatMut::rows(&mut y, m, n),
            true,
            true,
        );
        Ok((CpuStorage::F32(y), out_shape(xl.dims(), n)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (wn, wk) = self.weight.dims2()?;
        let (m, n, k) = geometry(x.dims(), &[wn, wk])?;
        let r = a.dim(0)?;
        let dev = x.device();
        let (mut dx, mut da, mut db) = (vec![0f32; m * k], vec![0f32; r * k], vec![0f32; n * r]);
        with_f32(x, "input", |x| {
            with_f32(a, "lora_A", |a| {
                with_f32(b, "lora_B", |b| {
                    with_f32(grad, "gradient", |dy| {
                        if dy.len() != m * n {
                            return Err(err("gradient does not match the output"));
                        }
                        let mut buf = Vec::new();
                        let xm = self.masked(x, &mut buf)?;
                        let mut h = vec![0f32; m * r];
                        gemm(
                            1.0,
                            Mat::rows(xm, m, k),
                            Mat::transposed(a, k, r),
                            MatMut::rows(&mut h, m, r),
                            false,
                            true,
                        );
                        // g = s·dy·B (m × r); dB = s·dyᵀ·h; dA = gᵀ·(x ⊙ mask).
                        let mut g = vec![0f32; m * r];
                        gemm(
                            self.scale,
                            Mat::rows(dy, m, n),
                            Mat::rows(b, n, r),
                            MatMut::rows(&mut g, m, r),
                            false,
                            true,
                        );
                        gemm(
                            self.scale,
                            Mat::transposed(dy, n, m),
                            Mat::rows(&h, m, r),
                            MatMut::rows(&mut db, n, r),
                            false,
                            true,
                        );
                        gemm(
                            1.0,
                            Mat::transposed(&g, r, m),
                            Mat::rows(xm, m, k),
                            MatMut::rows(&mut da, r, k),
                            false,
                            true,
                        );
                        // dx = dy·W + (g·A) ⊙ mask.
                        self.weight.matmul_t(dy, m, &mut dx)?;
                        match &self.mask {
                            None => gemm(
                                1.0,
                                Mat::rows(&g, m, r),
                                Mat::rows(a, r, k),
                                MatMut::rows(&mut dx, m, k),
                                true,
                                true,
                            ),
                            Some(mask) => {
                                let mut ga = vec![0f32; m * k];
                                gemm(
                                    1.0,
                                    Mat::rows(&g, m, r),
                                    Mat::rows(a, r, k),
                                    MatMut::rows(&mut ga, m, k),
                                    false,
                                    true,
                                );
                                with_f32(mask, "dropout mask", |mk| {
                                    for ((d, v), q) in dx.iter_mut().zip(&ga).zip(mk) {
                                        *d += v * q;
                                    }
                                    Ok(())
                                })?;
                            }
                        }
                        Ok(())
                    })
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(da, (r, k), dev)?),
            Some(Tensor::from_vec(db, (n, r), dev)?),
        ))
    }
}

/// `y = x·Wᵀ` with W (n, k) trained: inputs x (…, k) and W.
pub struct TrainedLinear;

impl CustomOp2 for TrainedLinear {
    fn name(&self) -> &'static str {
        "kiln-trained-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = super::ops::cpu_f32("linear", xs, xl, "input")?;
        let w = super::ops::cpu_f32("linear", ws, wl, "weight")?;
        let (m, n, k) = geometry(xl.dims(), wl.dims())?;
        let mut y = vec![0f32; m * n];
        super::frozen::matmul_into(x, w, m, n, k, &mut y);
        Ok((CpuStorage::F32(y), out_shape(xl.dims(), n)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (m, n, k) = geometry(x.dims(), w.dims())?;
        let (mut dx, mut dw) = (vec![0f32; m * k], vec![0f32; n * k]);
        with_f32(x, "input", |x| {
            with_f32(w, "weight", |w| {
                with_f32(grad, "gradient", |dy| {
                    if dy.len() != m * n {
                        return Err(err("gradient does not match the output"));
                    }
                    gemm(
                        1.0,
                        Mat::rows(dy, m, n),
                        Mat::rows(w, n, k),
                        MatMut::rows(&mut dx, m, k),
                        false,
                        true,
                    );
                    gemm(
                        1.0,
                        Mat::transposed(dy, n, m),
                        Mat::rows(x, m, k),
                        MatMut::rows(&mut dw, n, k),
                        false,
                        true,
                    );
                    Ok(())
                })
            })
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut rng = crate::rng::SplitMix64::new(seed);
        let v: Vec<f32> = (0..n)
            .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn close(a: &Tensor, b: &Tensor, what: &str) {
        let d = crate::model::ops::max_abs_diff(a, b);
        assert!(d < 1e-4, "{what}: max diff {d}");
    }

    /// The fused op's output equals the composed ops', and so do the gradients of
    /// Σ output ⊙ `up` with respect to each of `vars`.
    fn agree(fused: &Tensor, composed: &Tensor, up: &Tensor, vars: &[(&Var, &str)]) {
        close(fused, composed, "output");
        let grads = |out: &Tensor| (out * up).unwrap().sum_all().unwrap().backward().unwrap();
        let (gf, gc) = (grads(fused), grads(composed));
        for (v, name) in vars {
            close(
                gf.get(v.as_tensor()).unwrap(),
                gc.get(v.as_tensor()).unwrap(),
                name,
            );
        }
    }

    #[test]
    fn lora_linear_matches_the_composed_layer_in_value_and_gradients() {
        let (bt, t, k, n, r) = (2, 5, 24, 19, 4);
        let w = rand(&[n, k], 1);
        for with_mask in [false, true] {
            let x = Var::from_tensor(&rand(&[bt, t, k], 2)).unwrap();
            let a = Var::from_tensor(&rand(&[r, k], 3)).unwrap();
            let b = Var::from_tensor(&rand(&[n, r], 4)).unwrap();
            let mask = with_mask.then(|| {
                let m = rand(&[bt, t, k], 5);
                // 0 or 2 (dropout p = 0.5).
                m.ge(0.0)
                    .unwrap()
                    .to_dtype(candle_core::DType::F32)
                    .unwrap()
                    * 2.0
            });
            let mask = mask.map(|m| m.unwrap());
            let up = rand(&[bt, t, n], 6);
            let fused = x
                .as_tensor()
                .apply_op3(
                    a.as_tensor(),
                    b.as_tensor(),
                    LoraLinear {
                        weight: w.clone().into(),
                        scale: 1.5,
                        mask: mask.clone(),
                    },
                )
                .unwrap();
            let xin = match &mask {
                Some(m) => x.as_tensor().mul(m).unwrap(),
                None => x.as_tensor().clone(),
            };
            let composed = (x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap()
                + (xin
                    .broadcast_matmul(&a.as_tensor().t().unwrap())
                    .unwrap()
                    .broadcast_matmul(&b.as_tensor().t().unwrap())
                    .unwrap()
                    * 1.5)
                    .unwrap())
            .unwrap();
            agree(
                &fused,
                &composed,
                &up,
                &[(&x, "dx"), (&a, "dA"), (&b, "dB")],
            );
        }
    }

    #[test]
    fn trained_linear_matches_candle_matmul_in_value_and_gradients() {
        let (bt, t, k, n) = (2, 7, 20, 33);
        let x = Var::from_tensor(&rand(&[bt, t, k], 7)).unwrap();
        let w = Var::from_tensor(&rand(&[n, k], 8)).unwrap();
        let up = rand(&[bt, t, n], 9);
        let fused = x
            .as_tensor()
            .apply_op2(w.as_tensor(), TrainedLinear)
            .unwrap();
        let composed = x
            .as_tensor()
            .broadcast_matmul(&w.as_tensor().t().unwrap())
            .unwrap();
        agree(&fused, &composed, &up, &[(&x, "dx"), (&w, "dW")]);
    }
}
