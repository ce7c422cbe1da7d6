//! `x · Wᵀ` for a frozen weight as a custom op whose backward returns only the input gradient.
//! candle's own matmul backward also computes the (discarded) gradient of W — about half of all
//! backward work in LoRA training, plus a weight-sized buffer per layer.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};

pub struct FrozenLinear {
    /// (out, in), contiguous f32 on the CPU.
    pub weight: Tensor,
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
        let (ws, wl) = self.weight.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(w)) = &*ws else {
            return Err(err("f32 CPU weight only"));
        };
        let (wa, wb) = wl
            .contiguous_offsets()
            .ok_or_else(|| err("contiguous weight only"))?;
        let w = &w[wa..wb];
        let n = wl.dims()[0];
        if wl.dims().get(1) != Some(&k) {
            return Err(err("weight and input disagree on the inner dimension"));
        }
        let m = x.len() / k.max(1);
        let mut dst = vec![0f32; m * n];
        let threads = rayon::current_num_threads();
        let par = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: dst is m×n row-major (rs = n, cs = 1); x is m×k row-major; Wᵀ is read from the
        // row-major n×k weight with rs = 1 (along k) and cs = k (along n). All slices are sized
        // exactly for these extents, checked above.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        }
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
        Ok(Some(grad_res.broadcast_matmul(&self.weight)?))
    }
}
