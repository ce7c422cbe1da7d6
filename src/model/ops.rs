//! Helpers shared by kiln's custom candle ops (RMSNorm, RoPE, SwiGLU, attention): errors that
//! name the op, and access to their f32 CPU inputs.

use candle_core::{CpuStorage, Layout, Tensor};

/// An error naming the op.
pub(crate) fn op_err(op: &str, m: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: {m}"))
}

/// An op input as a contiguous f32 slice of CPU storage.
pub(crate) fn cpu_f32<'a>(
    op: &str,
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        return Err(op_err(op, format!("{what} must be f32")));
    };
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| op_err(op, format!("{what} must be contiguous")))?;
    Ok(&v[a..b])
}

/// A tensor's values, in row-major order, as f32.
pub(crate) fn to_f32_vec(x: &Tensor) -> candle_core::Result<Vec<f32>> {
    x.contiguous()?.flatten_all()?.to_vec1::<f32>()
}

/// The largest |a − b| over two same-shaped tensors (for tests comparing an op with its
/// composed reference).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("tensors of the same shape")
}
