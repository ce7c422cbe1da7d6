//! Frozen base weights kept compact for the whole of training (QLoRA and low-precision bases):
//! bitsandbytes' NF4 and FP4 (blocks of 64, the absmax scales optionally double-quantised),
//! LLM.int8's row-wise int8, bf16 / f16, and the GGUF block formats the inference engine reads.
//!
//! The frozen linear op multiplies against them without ever holding the matrix at f32: rows of
//! W are widened one panel at a time into a reused buffer and handed to kiln's sgemm. Forward
//! (`x·Wᵀ`) panels split W's rows (the product's columns); backward (`dY·W`) panels split W's rows
//! too, which is the product's inner dimension, at exactly the depth blocks the sgemm sums in
//! (`sgemm::k_block`), so both give the same bits as the f32 op on the widened matrix.

use super::engine::Mat as GgmlMat;
use super::sgemm::{gemm, k_block, Mat, MatMut};
use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::Arc;

/// bitsandbytes' NF4 code (`get_4bit_type("nf4")`, the QLoRA paper's normal-float values).
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit) before normalising by its largest
/// magnitude, indexed by the 4-bit code.
const FP4_RAW: [f32; 16] = [
    0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0,
];

/// bitsandbytes' default 4-bit block (values sharing one absmax).
pub const BLOCK_4BIT: usize = 64;
/// Double quantisation: the absmax scales, less their mean, quantised 8-bit in blocks of 256.
pub const BLOCK_ABSMAX: usize = 256;

/// The two 4-bit data types of bitsandbytes (`bnb_4bit_quant_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FourBit {
    Nf4,
    Fp4,
}

impl FourBit {
    /// Dequantised value of each 4-bit code.
    pub fn table(self) -> [f32; 16] {
        match self {
            FourBit::Nf4 => NF4,
            FourBit::Fp4 => FP4_RAW.map(|v| v / 12.0),
        }
    }

    /// (midpoints between the sorted code values, the code of each sorted position): a value
    /// goes to the nearest code (bitsandbytes' `bucketize` over the midpoints).
    fn bounds(self) -> ([f32; 15], [u8; 16]) {
        let t = self.table();
        let mut order: [u8; 16] = std::array::from_fn(|i| i as u8);
        // Stable and with -0 equal to +0: of FP4's two zeros, +0 (code 0) sorts first.
        order.sort_by(|a, b| {
            t[*a as usize]
                .partial_cmp(&t[*b as usize])
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let mid = std::array::from_fn(|i| (t[order[i] as usize] + t[order[i + 1] as usize]) / 2.0);
        (mid, order)
    }

    pub fn name(self) -> &'static str {
        match self {
            FourBit::Nf4 => "nf4",
            FourBit::Fp4 => "fp4",
        }
    }
}

pub use super::qmaps::{DYNAMIC_SIGNED, DYNAMIC_SIGNED_4BIT, DYNAMIC_UNSIGNED};

/// A sorted code with a lookup table for [`nearest`]'s answer: indexed by an f32's top 16 bits
/// (sign, exponent, 7 mantissa bits), it gives where the search starts, so quantising a value
/// is a table read and a step or two instead of an 8-step binary search.
pub struct CodeBook {
    pub values: &'static [f32],
    lut: std::sync::OnceLock<Vec<u8>>,
}

impl CodeBook {
    pub const fn new(values: &'static [f32]) -> Self {
        Self {
            values,
            lut: std::sync::OnceLock::new(),
        }
    }

    fn lut(&self) -> &[u8] {
        self.lut.get_or_init(|| {
            (0..1u32 << 16)
                .map(|b| {
                    // The smallest value whose top bits are `b`: for negatives, the largest
                    // magnitude in the bucket.
                    let bits = if b & 0x8000 != 0 {
                        (b << 16) | 0xFFFF
                    } else {
                        b << 16
                    };
                    let lo = f32::from_bits(bits);
                    if lo.is_nan() {
                        return 0;
                    }
                    // At most 255: the search steps on from there.
                    self.values.partition_point(|c| *c < lo).min(255) as u8
                })
                .collect()
        })
    }

    /// The index of the nearest value (ties to the lower), as [`nearest`].
    #[inline]
    pub fn nearest(&self, x: f32) -> u8 {
        let v = self.values;
        let mut hi = self.lut()[(x.to_bits() >> 16) as usize] as usize;
        while hi < v.len() && v[hi] < x {
            hi += 1;
        }
        if hi == 0 {
            return 0;
        }
        if hi >= v.len() {
            return (v.len() - 1) as u8;
        }
        if x - v[hi - 1] <= v[hi] - x {
            (hi - 1) as u8
        } else {
            hi as u8
        }
    }
}

/// The dynamic maps as code books (see [`CodeBook`]).
pub static SIGNED_BOOK: CodeBook = CodeBook::new(&DYNAMIC_SIGNED);
pub static UNSIGNED_BOOK: CodeBook = CodeBook::new(&DYNAMIC_UNSIGNED);
pub static SIGNED_4BIT_BOOK: CodeBook = CodeBook::new(&DYNAMIC_SIGNED_4BIT);

/// The index of the value of `code` (sorted) nearest to `x`.
pub fn nearest(code: &[f32], x: f32) -> u8 {
    let hi = code.partition_point(|c| *c < x);
    if hi == 0 {
        return 0;
    }
    if hi >= code.len() {
        return (code.len() - 1) as u8;
    }
    let (a, b) = (code[hi - 1], code[hi]);
    if x - a <= b - x {
        (hi - 1) as u8
    } else {
        hi as u8
    }
}

/// 8-bit blockwise quantisation with a code (bitsandbytes' `quantize_blockwise`): per block of
/// `block` values, absmax = max |x|, each value stored as the index of the code value nearest
/// `x / absmax` (ties to the lower). bitsandbytes' CPU search agrees on all but a few values
/// per thousand, where it returns a farther neighbour; an all-zero block gets the code of 0.
pub fn quantize_blockwise(
    code: &CodeBook,
    x: &[f32],
    block: usize,
    q: &mut [u8],
    absmax: &mut [f32],
) {
    for ((xs, qs), am) in x
        .chunks(block)
        .zip(q.chunks_mut(block))
        .zip(absmax.iter_mut())
    {
        let m = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        *am = m;
        for (o, v) in qs.iter_mut().zip(xs) {
            let normed = if m > 0.0 { v / m } else { 0.0 };
            *o = code.nearest(normed.clamp(-1.0, 1.0));
        }
    }
}

/// The inverse of [`quantize_blockwise`].
pub fn dequantize_blockwise(code: &[f32], q: &[u8], absmax: &[f32], block: usize, out: &mut [f32]) {
    for ((qs, os), am) in q.chunks(block).zip(out.chunks_mut(block)).zip(absmax) {
        for (o, c) in os.iter_mut().zip(qs) {
            *o = code[*c as usize] * am;
        }
    }
}

/// The absmax scales of 4-bit blocks: as f32, or double-quantised (bitsandbytes'
/// `compress_statistics`: their mean subtracted, the rest 8-bit blockwise with the signed dynamic
/// map; about 0.127 bits per weight instead of 0.5).
pub enum Absmax {
    F32(Vec<f32>),
    Double {
        q: Vec<u8>,
        absmax2: Vec<f32>,
        offset: f32,
    },
}

impl Absmax {
    fn double(absmax: &[f32]) -> Self {
        // torch's mean of f32 values (pairwise summation in f32 for this size is close to an
        // f64 sum rounded; the offset is stored, so any rounding is exact on reading back).
        let offset =
            (absmax.iter().map(|v| *v as f64).sum::<f64>() / absmax.len().max(1) as f64) as f32;
        let centred: Vec<f32> = absmax.iter().map(|v| v - offset).collect();
        let mut q = vec![0u8; absmax.len()];
        let mut absmax2 = vec![0f32; absmax.len().div_ceil(BLOCK_ABSMAX)];
        quantize_blockwise(&SIGNED_BOOK, &centred, BLOCK_ABSMAX, &mut q, &mut absmax2);
        Absmax::Double { q, absmax2, offset }
    }

    /// The scale of block `b`.
    #[inline]
    fn get(&self, b: usize) -> f32 {
        match self {
            Absmax::F32(v) => v[b],
            Absmax::Double { q, absmax2, offset } => {
                DYNAMIC_SIGNED[q[b] as usize] * absmax2[b / BLOCK_ABSMAX] + offset
            }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Absmax::F32(v) => v.len() * 4,
            Absmax::Double { q, absmax2, .. } => q.len() + absmax2.len() * 4 + 4,
        }
    }
}

/// How a frozen base weight is stored.
pub enum Store {
    /// A BF16 or F16 candle tensor (n, k) (shared with the embeddings when tied).
    Half(Tensor),
    /// LLM.int8's weight storage: row-wise absmax int8, `w = q · absmax_row / 127`.
    Int8 { q: Vec<i8>, row_absmax: Vec<f32> },
    /// bitsandbytes 4-bit: two codes a byte (the first value in the high nibble) over the
    /// row-major flattened matrix, one absmax per 64 values.
    FourBit {
        kind: FourBit,
        codes: Vec<u8>,
        absmax: Absmax,
    },
    /// GGUF blocks as the file holds them.
    Ggml(GgmlMat),
}

/// A frozen base weight (n × k, out × in) in a compact format.
pub struct Packed {
    pub n: usize,
    pub k: usize,
    pub store: Store,
}

/// The storage formats a base weight can be packed into from f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackFormat {
    Bf16,
    F16,
    Int8,
    FourBit { kind: FourBit, double_quant: bool },
}

impl PackFormat {
    /// The packing a config's base-weight storage asks for; None for f32 (weights as loaded).
    pub fn for_base(b: crate::config::precision::BaseWeights) -> Option<Self> {
        use crate::config::precision::BaseWeights::*;
        let four = |kind, double_quant| PackFormat::FourBit { kind, double_quant };
        Some(match b {
            F32 => return None,
            Bf16 => PackFormat::Bf16,
            F16 => PackFormat::F16,
            Int8 => PackFormat::Int8,
            Nf4 => four(FourBit::Nf4, false),
            Nf4DoubleQuant => four(FourBit::Nf4, true),
            Fp4 => four(FourBit::Fp4, false),
            Fp4DoubleQuant => four(FourBit::Fp4, true),
        })
    }
}

impl Packed {
    /// Packs an f32 matrix (n × k, row-major).
    pub fn pack(w: &[f32], n: usize, k: usize, fmt: PackFormat) -> Result<Self, super::ModelError> {
        if w.len() != n * k {
            return Err(super::ModelError::Config(format!(
                "a ({n}, {k}) weight holds {} values",
                w.len()
            )));
        }
        let store = match fmt {
            PackFormat::Bf16 => Store::Half(Tensor::from_vec(
                w.par_iter().map(|v| bf16::from_f32(*v)).collect::<Vec<_>>(),
                (n, k),
                &Device::Cpu,
            )?),
            PackFormat::F16 => Store::Half(Tensor::from_vec(
                w.par_iter().map(|v| f16::from_f32(*v)).collect::<Vec<_>>(),
                (n, k),
                &Device::Cpu,
            )?),
            PackFormat::Int8 => {
                let row_absmax: Vec<f32> = w
                    .par_chunks(k.max(1))
                    .map(|r| r.iter().fold(0f32, |m, v| m.max(v.abs())))
                    .collect();
                let mut q = vec![0i8; n * k];
                q.par_chunks_mut(k.max(1))
                    .zip(w.par_chunks(k.max(1)))
                    .zip(&row_absmax)
                    .for_each(|((qs, ws), am)| {
                        let s = if *am > 0.0 { 127.0 / am } else { 0.0 };
                        for (o, v) in qs.iter_mut().zip(ws) {
                            *o = (v * s).round_ties_even().clamp(-127.0, 127.0) as i8;
                        }
                    });
                Store::Int8 { q, row_absmax }
            }
            PackFormat::FourBit { kind, double_quant } => {
                let (codes, absmax) = quantize_4bit(w, kind);
                Store::FourBit {
                    kind,
                    codes,
                    absmax: if double_quant {
                        Absmax::double(&absmax)
                    } else {
                        Absmax::F32(absmax)
                    },
                }
            }
        };
        Ok(Self { n, k, store })
    }

    /// A 16-bit (BF16 or F16) candle tensor (n, k) as a packed weight, sharing its storage.
    pub fn half(t: Tensor) -> Result<Self, super::ModelError> {
        let (n, k) = t.dims2()?;
        if !matches!(t.dtype(), DType::BF16 | DType::F16) {
            return Err(super::ModelError::Config(format!(
                "a 16-bit weight was expected, found {:?}",
                t.dtype()
            )));
        }
        Ok(Self {
            n,
            k,
            store: Store::Half(t.contiguous()?),
        })
    }

    /// Keeps a GGUF tensor's blocks (formats kiln has no kernel for are widened to f32).
    pub fn from_ggml(q: &candle_core::quantized::QTensor) -> Result<Self, super::ModelError> {
        let m = GgmlMat::from_qtensor(q)?;
        Ok(Self {
            n: m.n,
            k: m.k,
            store: Store::Ggml(m),
        })
    }

    /// Reorders the rows of a GGUF weight: row `i` becomes row `perm[i]` of the file's.
    pub fn permute_rows(&mut self, perm: &[usize]) {
        if let Store::Ggml(m) = &mut self.store {
            m.permute_rows(perm);
        }
    }

    /// Whether the parts fit an n × k matrix (a packed file read back is checked with it).
    pub fn check(&self) -> Result<(), String> {
        let (n, k) = (self.n, self.k);
        let len = n * k;
        let ok = match &self.store {
            Store::Half(t) => t.dims() == [n, k],
            Store::Int8 { q, row_absmax } => q.len() == len && row_absmax.len() == n,
            Store::FourBit { codes, absmax, .. } => {
                let blocks = len.div_ceil(BLOCK_4BIT);
                codes.len() == len.div_ceil(2)
                    && match absmax {
                        Absmax::F32(a) => a.len() == blocks,
                        Absmax::Double { q, absmax2, .. } => {
                            q.len() == blocks && absmax2.len() == blocks.div_ceil(BLOCK_ABSMAX)
                        }
                    }
            }
            Store::Ggml(m) => m.n == n && m.k == k,
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "its {} parts do not fit a ({n}, {k}) weight",
                self.format()
            ))
        }
    }

    /// Bytes the weight occupies.
    pub fn bytes(&self) -> usize {
        match &self.store {
            Store::Half(_) => self.n * self.k * 2,
            Store::Int8 { q, row_absmax } => q.len() + row_absmax.len() * 4,
            Store::FourBit { codes, absmax, .. } => codes.len() + absmax.bytes(),
            Store::Ggml(m) => m.bytes(),
        }
    }

    /// The format's name (`nf4`, `nf4+dq`, `int8`, `bf16`, `q4_k`, …).
    pub fn format(&self) -> String {
        match &self.store {
            Store::Half(t) => if t.dtype() == DType::BF16 {
                "bf16"
            } else {
                "f16"
            }
            .into(),
            Store::Int8 { .. } => "int8".into(),
            Store::FourBit { kind, absmax, .. } => match absmax {
                Absmax::F32(_) => kind.name().into(),
                Absmax::Double { .. } => format!("{}+dq", kind.name()),
            },
            Store::Ggml(m) => m.format().into(),
        }
    }

    /// Rows `r0..r1` widened to f32, row-major into `out`, split across threads.
    pub fn widen_rows(&self, r0: usize, r1: usize, out: &mut [f32]) -> candle_core::Result<()> {
        let k = self.k;
        if out.len() != (r1 - r0) * k || r1 > self.n {
            return Err(candle_core::Error::Msg(format!(
                "packed weight: rows {r0}..{r1} of {} do not fit {} values",
                self.n,
                out.len()
            )));
        }
        let half = match &self.store {
            Store::Half(t) => {
                let (s, l) = t.storage_and_layout();
                let candle_core::Storage::Cpu(c) = &*s else {
                    return Err(candle_core::Error::Msg("packed weight off the CPU".into()));
                };
                let (a, _) = l.contiguous_offsets().ok_or_else(|| {
                    candle_core::Error::Msg("packed weight not contiguous".into())
                })?;
                match c {
                    candle_core::CpuStorage::BF16(v) => {
                        let v = &v[a + r0 * k..a + r1 * k];
                        out.par_chunks_mut(4096)
                            .zip(v.par_chunks(4096))
                            .for_each(|(o, s)| {
                                for (o, s) in o.iter_mut().zip(s) {
                                    *o = s.to_f32();
                                }
                            });
                    }
                    candle_core::CpuStorage::F16(v) => {
                        let v = &v[a + r0 * k..a + r1 * k];
                        out.par_chunks_mut(4096)
                            .zip(v.par_chunks(4096))
                            .for_each(|(o, s)| {
                                for (o, s) in o.iter_mut().zip(s) {
                                    *o = s.to_f32();
                                }
                            });
                    }
                    _ => return Err(candle_core::Error::Msg("packed weight not 16-bit".into())),
                }
                true
            }
            _ => false,
        };
        if half {
            return Ok(());
        }
        // Whole rows per task, enough of them that handing out tasks costs little.
        let rows_per = (16384 / k.max(1)).max(1);
        out.par_chunks_mut(rows_per * k)
            .enumerate()
            .for_each(|(i, o)| {
                let a = r0 + i * rows_per;
                let b = (a + rows_per).min(r1);
                match &self.store {
                    Store::Half(_) => {}
                    Store::Int8 { q, row_absmax } => {
                        for (r, (orow, qrow)) in
                            o.chunks_mut(k).zip(q[a * k..b * k].chunks(k)).enumerate()
                        {
                            let s = row_absmax[a + r];
                            for (o, q) in orow.iter_mut().zip(qrow) {
                                // bitsandbytes' int8_vectorwise_dequant: q · SCB · (1/127).
                                *o = (*q as f32 * s) * 7.874_016e-3;
                            }
                        }
                    }
                    Store::FourBit {
                        kind,
                        codes,
                        absmax,
                    } => widen_4bit(kind.table(), codes, absmax, a * k, o),
                    Store::Ggml(m) => m.widen_rows(a, b, o),
                }
            });
        Ok(())
    }

    /// The whole matrix as an f32 tensor (merging, DoRA's norm, the inference engine).
    pub fn to_tensor(&self) -> candle_core::Result<Tensor> {
        if let Store::Half(t) = &self.store {
            return t.to_dtype(DType::F32);
        }
        let mut w = vec![0f32; self.n * self.k];
        self.widen_rows(0, self.n, &mut w)?;
        Tensor::from_vec(w, (self.n, self.k), &Device::Cpu)
    }
}

/// bitsandbytes' `quantize_4bit` over a flattened matrix: (packed codes, absmax per block).
pub fn quantize_4bit(w: &[f32], kind: FourBit) -> (Vec<u8>, Vec<f32>) {
    let (mid, order) = kind.bounds();
    let absmax: Vec<f32> = w
        .par_chunks(BLOCK_4BIT)
        .map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())))
        .collect();
    let mut codes = vec![0u8; w.len().div_ceil(2)];
    codes
        .par_chunks_mut(BLOCK_4BIT / 2)
        .zip(w.par_chunks(BLOCK_4BIT))
        .zip(&absmax)
        .for_each(|((cs, ws), am)| {
            // 1/absmax with absmax clamped to 1e-38, as bitsandbytes (an all-zero block → code 0.0).
            let inv = 1.0 / am.max(1e-38);
            let code = |v: f32| {
                let x = (v * inv).clamp(-1.0, 1.0);
                order[mid.partition_point(|m| *m < x)]
            };
            for (c, pair) in cs.iter_mut().zip(ws.chunks(2)) {
                let hi = code(pair[0]);
                let lo = pair.get(1).map(|v| code(*v)).unwrap_or(0);
                *c = (hi << 4) | lo;
            }
        });
    (codes, absmax)
}

/// Widens 4-bit values starting at flat index `start` into `out`.
fn widen_4bit(table: [f32; 16], codes: &[u8], absmax: &Absmax, start: usize, out: &mut [f32]) {
    let mut i = start;
    let end = start + out.len();
    let mut o = 0;
    while i < end {
        let b = i / BLOCK_4BIT;
        let stop = ((b + 1) * BLOCK_4BIT).min(end);
        let s = absmax.get(b);
        // Two values a byte while aligned, the odd ends one at a time.
        while i < stop && i % 2 == 1 {
            out[o] = table[(codes[i / 2] & 0xF) as usize] * s;
            i += 1;
            o += 1;
        }
        let pairs = (stop - i) / 2;
        for (dst, c) in out[o..o + 2 * pairs]
            .chunks_exact_mut(2)
            .zip(&codes[i / 2..i / 2 + pairs])
        {
            dst[0] = table[(c >> 4) as usize] * s;
            dst[1] = table[(c & 0xF) as usize] * s;
        }
        i += 2 * pairs;
        o += 2 * pairs;
        if i < stop {
            out[o] = table[(codes[i / 2] >> 4) as usize] * s;
            i += 1;
            o += 1;
        }
    }
}

/// Most f32 values a widened panel holds (4 MiB), so the buffer stays small next to the model.
const PANEL_VALUES: usize = 1 << 20;
/// Up to this many input rows the forward streams widened rows through dot products.
const GEMV_ROWS: usize = 4;

thread_local! {
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn with_panel<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    PANEL.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![0f32; len]),
    })
}

/// `out (m × n) = x (m × k) · Wᵀ`, widening W a panel of rows at a time.
pub fn matmul(x: &[f32], w: &Packed, m: usize, out: &mut [f32]) -> candle_core::Result<()> {
    let (n, k) = (w.n, w.k);
    let rows = (PANEL_VALUES / k.max(1)).max(16) / 16 * 16;
    for j0 in (0..n).step_by(rows.max(1)) {
        let j1 = (j0 + rows).min(n);
        let pr = j1 - j0;
        with_panel(pr * k, |buf| -> candle_core::Result<()> {
            w.widen_rows(j0, j1, buf)?;
            if m <= GEMV_ROWS {
                for (j, row) in buf.chunks(k).enumerate() {
                    for r in 0..m {
                        out[r * n + j0 + j] = super::frozen::dot(&x[r * k..(r + 1) * k], row);
                    }
                }
            } else {
                gemm(
                    1.0,
                    Mat::rows(x, m, k),
                    Mat::transposed(buf, k, pr),
                    MatMut::new(&mut out[j0..], m, pr, n, 1),
                    false,
                    true,
                );
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// `dx (m × k) = dy (m × n) · W`, W widened in panels of rows at the sgemm's depth blocks and
/// the panels' products accumulated in order.
pub fn matmul_t(dy: &[f32], w: &Packed, m: usize, dx: &mut [f32]) -> candle_core::Result<()> {
    let (n, k) = (w.n, w.k);
    let kb = k_block(n);
    for (p, j0) in (0..n).step_by(kb).enumerate() {
        let j1 = (j0 + kb).min(n);
        let pr = j1 - j0;
        with_panel(pr * k, |buf| -> candle_core::Result<()> {
            w.widen_rows(j0, j1, buf)?;
            gemm(
                1.0,
                Mat::new(&dy[j0..], m, pr, n, 1),
                Mat::rows(buf, pr, k),
                MatMut::rows(dx, m, k),
                p > 0,
                true,
            );
            Ok(())
        })?;
    }
    Ok(())
}

/// Runs `f` on a dense f32 CPU weight's values with its (out, in).
fn with_dense(t: &Tensor, f: impl FnOnce(&[f32], usize, usize)) -> candle_core::Result<()> {
    let t = t.contiguous()?;
    let (n, k) = t.dims2()?;
    let (s, l) = t.storage_and_layout();
    let candle_core::Storage::Cpu(c) = &*s else {
        return Err(candle_core::Error::Msg("weight off the CPU".into()));
    };
    f(super::ops::cpu_f32("linear", c, l, "the weight")?, n, k);
    Ok(())
}

/// A frozen linear layer's base weight: an f32 (or other candle) tensor, or packed.
#[derive(Clone)]
pub enum BaseWeight {
    Dense(Tensor),
    Packed(Arc<Packed>),
}

impl From<Tensor> for BaseWeight {
    fn from(t: Tensor) -> Self {
        BaseWeight::Dense(t)
    }
}

impl BaseWeight {
    /// (out, in).
    pub fn dims2(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            BaseWeight::Dense(t) => t.dims2(),
            BaseWeight::Packed(p) => Ok((p.n, p.k)),
        }
    }

    /// The weight as an f32 tensor (a packed one widened whole: merging, DoRA, export).
    pub fn to_f32(&self) -> candle_core::Result<Tensor> {
        match self {
            BaseWeight::Dense(t) => t.to_dtype(DType::F32),
            BaseWeight::Packed(p) => p.to_tensor(),
        }
    }

    pub fn dense(&self) -> Option<&Tensor> {
        match self {
            BaseWeight::Dense(t) => Some(t),
            BaseWeight::Packed(_) => None,
        }
    }

    /// `out (m × n) = x (m × k) · Wᵀ` for an f32 dense weight or a packed one.
    pub(crate) fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) -> candle_core::Result<()> {
        match self {
            BaseWeight::Packed(p) => matmul(x, p, m, out),
            BaseWeight::Dense(t) => with_dense(t, |w, n, k| {
                super::frozen::matmul_into(x, w, m, n, k, out);
            }),
        }
    }

    /// `dx (m × k) = dy (m × n) · W`.
    pub(crate) fn matmul_t(&self, dy: &[f32], m: usize, dx: &mut [f32]) -> candle_core::Result<()> {
        match self {
            BaseWeight::Packed(p) => matmul_t(dy, p, m, dx),
            BaseWeight::Dense(t) => with_dense(t, |w, n, k| {
                gemm(
                    1.0,
                    Mat::rows(dy, m, n),
                    Mat::rows(w, n, k),
                    MatMut::rows(dx, m, k),
                    false,
                    true,
                );
            }),
        }
    }
}
