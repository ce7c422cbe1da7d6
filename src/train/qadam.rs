//! AdamW with its moments stored blockwise-quantised (Axolotl's `adamw_bnb_8bit`,
//! `adamw_8bit`, `paged_adamw_8bit`, `adamw_torch_8bit`, `adamw_torch_4bit`), as bitsandbytes
//! and torchao define them: per block, m and v are widened with their block's absmax, updated in
//! f32 with the gradient, the weight is updated from the f32 values, and m and v are requantised
//! with the block's new absmax (m with the signed dynamic map, v with the unsigned one; torchao's
//! 4-bit v with a linear map without zero). Blocks are independent, so the result does not
//! depend on the thread count.

use crate::config::precision::OptimStates;
use crate::model::packed::{CodeBook, SIGNED_4BIT_BOOK, SIGNED_BOOK, UNSIGNED_BOOK};
use candle_core::{CpuStorage, InplaceOp2, Layout};
use rayon::prelude::*;

/// Parameters below this many values keep f32 moments (bitsandbytes' `min_8bit_size`, the
/// size torchao quantises from).
pub const MIN_QUANTISED: usize = 4096;

/// torchao's 4-bit second-moment map: 1/16 … 1 (no zero).
static LINEAR_4BIT_BOOK: CodeBook = CodeBook::new(&LINEAR_UNSIGNED_4BIT);
const LINEAR_UNSIGNED_4BIT: [f32; 16] = [
    0.0625, 0.125, 0.1875, 0.25, 0.3125, 0.375, 0.4375, 0.5, 0.5625, 0.625, 0.6875, 0.75, 0.8125,
    0.875, 0.9375, 1.0,
];

/// One parameter's quantised moments.
#[derive(Debug, Clone)]
pub struct QMoments {
    pub kind: OptimStates,
    pub len: usize,
    /// Codes (one a byte at 8 bits, two a byte at 4, the first in the high nibble).
    pub m: Vec<u8>,
    pub v: Vec<u8>,
    pub m_absmax: Vec<f32>,
    pub v_absmax: Vec<f32>,
}

impl QMoments {
    /// Zero moments for a parameter of `len` values, or None where moments stay f32.
    pub fn new(kind: OptimStates, len: usize) -> Option<Self> {
        if kind.is_f32() || len < MIN_QUANTISED {
            return None;
        }
        let block = block_of(kind);
        let bytes = if bits(kind) == 4 {
            len.div_ceil(2)
        } else {
            len
        };
        let blocks = len.div_ceil(block);
        Some(Self {
            kind,
            len,
            m: vec![0; bytes],
            v: vec![0; bytes],
            m_absmax: vec![0.0; blocks],
            v_absmax: vec![0.0; blocks],
        })
    }

    /// Bytes the moments occupy.
    pub fn bytes(&self) -> usize {
        self.m.len() + self.v.len() + 4 * (self.m_absmax.len() + self.v_absmax.len())
    }

    fn maps(&self) -> (&'static CodeBook, &'static CodeBook) {
        match self.kind {
            OptimStates::Torchao4bit => (&SIGNED_4BIT_BOOK, &LINEAR_4BIT_BOOK),
            _ => (&SIGNED_BOOK, &UNSIGNED_BOOK),
        }
    }

    /// The moments widened (for tests and inspection).
    pub fn widen(&self) -> (Vec<f32>, Vec<f32>) {
        let (mm, vm) = self.maps();
        let (mm, vm) = (mm.values, vm.values);
        let block = block_of(self.kind);
        let four = bits(self.kind) == 4;
        let get = |q: &[u8], i: usize| code_at(q, i, four);
        let m = (0..self.len)
            .map(|i| mm[get(&self.m, i)] * self.m_absmax[i / block])
            .collect();
        let v = (0..self.len)
            .map(|i| vm[get(&self.v, i)] * self.v_absmax[i / block])
            .collect();
        (m, v)
    }
}

/// Code `i` of a row of codes: a byte each, or two a byte (the first in the high nibble).
#[inline]
fn code_at(q: &[u8], i: usize, four: bool) -> usize {
    if !four {
        q[i] as usize
    } else if i.is_multiple_of(2) {
        (q[i / 2] >> 4) as usize
    } else {
        (q[i / 2] & 0xF) as usize
    }
}

fn block_of(kind: OptimStates) -> usize {
    match kind {
        OptimStates::Torchao4bit => 128,
        _ => 256,
    }
}

fn bits(kind: OptimStates) -> u32 {
    match kind {
        OptimStates::Torchao4bit => 4,
        _ => 8,
    }
}

/// One AdamW step on a parameter with quantised moments: `param` is updated in place, the
/// moments through `state`. `step` counts from 1.
pub struct QuantisedStep<'a> {
    pub state: std::sync::Mutex<&'a mut QMoments>,
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub step: u64,
    /// Gradient clipping's scale.
    pub clip: f32,
}

fn err(m: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("adamw (quantised states): {m}"))
}

impl InplaceOp2 for QuantisedStep<'_> {
    fn name(&self) -> &'static str {
        "adamw-quantised"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let p = super::adamw_ops::slice_mut(s1, l1, "weight")?;
        let g = super::adamw_ops::slice(s2, l2, "gradient")?;
        let mut guard = self.state.lock().map_err(|_| err("state lock poisoned"))?;
        let st: &mut QMoments = &mut guard;
        if p.len() != st.len || g.len() != st.len {
            return Err(err("weight, gradient and moments differ in size"));
        }
        let kind = st.kind;
        let (mbook, vbook) = st.maps();
        let (mmap, vmap) = (mbook.values, vbook.values);
        let block = block_of(kind);
        let four = bits(kind) == 4;
        let code_bytes = if four { block / 2 } else { block };
        // Scalars as PyTorch passes Python floats to f32 ops: computed in f64, then rounded.
        let bc1 = 1.0 - self.beta1.powi(self.step as i32);
        let bc2 = (1.0 - self.beta2.powi(self.step as i32)).sqrt() as f32;
        let (b1, b2, eps, clip) = (
            self.beta1 as f32,
            self.beta2 as f32,
            self.eps as f32,
            self.clip,
        );
        let (omb1, omb2) = ((1.0 - self.beta1) as f32, (1.0 - self.beta2) as f32);
        let decay = (1.0 - self.lr * self.weight_decay) as f32;
        let step_size = (self.lr / bc1) as f32;
        let torch_style = kind != OptimStates::Bnb8bit;
        p.par_chunks_mut(block)
            .zip(g.par_chunks(block))
            .zip(
                st.m.par_chunks_mut(code_bytes)
                    .zip(st.v.par_chunks_mut(code_bytes)),
            )
            .zip(st.m_absmax.par_iter_mut().zip(st.v_absmax.par_iter_mut()))
            .for_each(|(((p, g), (mq, vq)), (ma, va))| {
                let n = p.len();
                let mut m = [0f32; 256];
                let mut v = [0f32; 256];
                let code = |q: &[u8], i: usize| code_at(q, i, four);
                let (mut new_ma, mut new_va) = (0f32, 0f32);
                for i in 0..n {
                    let gi = g[i] * clip;
                    let mi = mmap[code(mq, i)] * *ma;
                    let vi = vmap[code(vq, i)] * *va;
                    let (mi, vi) = if torch_style {
                        // torchao: lerp towards the gradient (and its square).
                        (mi + omb1 * (gi - mi), vi + omb2 * (gi * gi - vi))
                    } else {
                        // bitsandbytes: mul_(β) then add_(g, alpha=1−β) / addcmul_(g, g, 1−β).
                        (mi * b1 + omb1 * gi, vi * b2 + omb2 * (gi * gi))
                    };
                    m[i] = mi;
                    v[i] = vi;
                    new_ma = new_ma.max(mi.abs());
                    new_va = new_va.max(vi.abs());
                    let denom = vi.sqrt() / bc2 + eps;
                    p[i] = p[i] * decay - step_size * (mi / denom);
                }
                *ma = new_ma;
                *va = new_va;
                // x · (1/absmax): one division a block instead of one a value.
                let inv = |am: f32| if am > 0.0 { 1.0 / am } else { 0.0 };
                let (inv_ma, inv_va) = (inv(new_ma), inv(new_va));
                let q = |x: f32, inv_am: f32, book: &CodeBook| -> u8 {
                    book.nearest((x * inv_am).clamp(-1.0, 1.0))
                };
                if four {
                    for j in 0..n.div_ceil(2) {
                        let pair = |arr: &[f32; 256], am, book: &CodeBook| {
                            let hi = q(arr[2 * j], am, book);
                            let lo = if 2 * j + 1 < n {
                                q(arr[2 * j + 1], am, book)
                            } else {
                                0
                            };
                            (hi << 4) | lo
                        };
                        mq[j] = pair(&m, inv_ma, mbook);
                        vq[j] = pair(&v, inv_va, vbook);
                    }
                } else {
                    for i in 0..n {
                        mq[i] = q(m[i], inv_ma, mbook);
                        vq[i] = q(v[i], inv_va, vbook);
                    }
                }
            });
        Ok(())
    }
}
