//! `x · Wᵀ` for a frozen weight as a custom op whose backward returns only the input gradient.
//! candle's own matmul backward also computes the (discarded) gradient of W — about half of all
//! backward work in LoRA training, plus a weight-sized buffer per layer.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};

/// Up to this many input rows (decoding: one token) the product is memory-bound: stream each
/// weight row once and take its dot products with every input row, rows split across threads.
const GEMV_MAX_ROWS: usize = 4;

/// 8-lane partial sums so the compiler emits SIMD code; summation order is fixed, so results
/// do not depend on the thread count or the instruction set.
#[inline(always)]
fn dot_generic(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_generic(a, b)
}

pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_generic(a, b)
}

/// `x (m×k) · Wᵀ` with W (n×k) row-major, for small m, into `out` (m×n).
fn gemv(x: &[f32], w: &[f32], m: usize, n: usize, k: usize, out: &mut [f32]) {
    use rayon::prelude::*;
    let block = 64;
    let fill = |bi: usize, chunk: &mut [f32]| {
        for (j, o) in chunk.chunks_mut(m).enumerate() {
            let row = &w[(bi * block + j) * k..(bi * block + j + 1) * k];
            for (r, v) in o.iter_mut().enumerate() {
                *v = dot(&x[r * k..(r + 1) * k], row);
            }
        }
    };
    if m == 1 {
        out.par_chunks_mut(block)
            .enumerate()
            .for_each(|(bi, c)| fill(bi, c));
        return;
    }
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(block * m)
        .enumerate()
        .for_each(|(bi, c)| fill(bi, c));
    for j in 0..n {
        for r in 0..m {
            out[r * n + j] = out_t[j * m + r];
        }
    }
}

/// `out (m×n) = x (m×k) · Wᵀ` with W (n×k) row-major: streamed dot products for a few rows,
/// kiln's blocked sgemm above that.
pub(crate) fn matmul_into(x: &[f32], w: &[f32], m: usize, n: usize, k: usize, out: &mut [f32]) {
    if m <= GEMV_MAX_ROWS {
        return gemv(x, w, m, n, k, out);
    }
    use super::sgemm::{gemm, Mat, MatMut};
    gemm(
        1.0,
        Mat::rows(x, m, k),
        Mat::transposed(w, k, n),
        MatMut::rows(out, m, n),
        false,
        true,
    );
}

pub struct FrozenLinear {
    /// (out, in): contiguous f32 on the CPU, or packed (see model/packed.rs).
    pub weight: super::packed::BaseWeight,
}

fn err(m: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("frozen-linear: {m}"))
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = storage else {
            return Err(err("f32 input only"));
        };
        let (a, b) = layout
            .contiguous_offsets()
            .ok_or_else(|| err("contiguous input only"))?;
        let x = &x[a..b];
        let dims = layout.shape().dims();
        let k = *dims.last().ok_or_else(|| err("scalar input"))?;
        let (n, wk) = self.weight.dims2()?;
        if wk != k {
            return Err(err("weight and input disagree on the inner dimension"));
        }
        let m = x.len() / k.max(1);
        let mut dst = vec![0f32; m * n];
        self.weight.matmul(x, m, &mut dst)?;
        let mut out = dims.to_vec();
        if let Some(last) = out.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(dst), Shape::from(out)))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // dX = dY · W with kiln's sgemm (candle's matmul would run the gemm crate).
        let grad_res = grad_res.contiguous()?;
        let (gs, gl) = grad_res.storage_and_layout();
        let Storage::Cpu(gc) = &*gs else {
            return Err(err("CPU gradient only"));
        };
        let g = super::ops::cpu_f32("frozen-linear", gc, gl, "the gradient")?;
        let (n, k) = self.weight.dims2()?;
        let dims = grad_res.dims();
        if dims.last() != Some(&n) {
            return Err(err("gradient and weight disagree on the output dimension"));
        }
        let m = g.len() / n.max(1);
        let mut dx = vec![0f32; m * k];
        self.weight.matmul_t(g, m, &mut dx)?;
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = k;
        }
        Ok(Some(Tensor::from_vec(dx, shape, grad_res.device())?))
    }
}
