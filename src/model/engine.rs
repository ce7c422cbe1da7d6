//! kiln's inference engine: the Llama forward pass for generation, written against flat buffers
//! instead of candle tensors. One call feeds a prompt or one token through every layer with a
//! handful of allocations per call, fuses what the op-by-op path runs as separate tensor ops
//! (q/k/v as one stacked matmul, gate/up likewise, RoPE and the KV-cache write in place,
//! attention per token without materialising masks), and computes logits for the last
//! position only.
//!
//! Weights stay in the format they were loaded in: f32 from a kiln model, or the quantized
//! blocks of a GGUF file (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K…Q6_K) multiplied with candle's
//! block dot products against the activations quantized to the matching 8-bit format, as
//! llama.cpp does. Other GGUF types (F16, BF16…) are widened to f32 on load.

use super::qkernels::{self as qk, QActs, QBlock};
use super::{Llama, LlamaConfig, ModelError};
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, GgmlType,
};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use kiln_kernels::attn;
use rayon::prelude::*;
use std::path::Path;

/// Decoding attention cuts a token's positions at multiples of this, attends each part on its
/// own (on any thread) and merges the parts in order ([`attn::merge_parts`]). Threads then
/// read disjoint slices of the KV cache, and since the cuts do not depend on the thread count,
/// neither do the results.
const ATTEND_PART: usize = 32;

/// Weight rows handed to one thread at a time.
const ROW_BLOCK: usize = 32;

/// From this many input rows on (prompt processing), a quantized matrix is widened to f32 and
/// multiplied with the blocked f32 gemm: the widening costs one pass over the weights, and the
/// gemm reuses each widened row for every input row from cache, where block dot products
/// would re-decode the blocks once per input row.
const WIDEN_ROWS: usize = 8;

/// The rows of a weight matrix (out × in), in the format a matmul reads them.
enum Rows {
    F32(Vec<f32>),
    Q4_0(Vec<qk::Q4_0>),
    Q4_1(Vec<qk::Q4_1>),
    Q5_0(Vec<qk::Q5_0>),
    Q5_1(Vec<qk::Q5_1>),
    Q8_0(Vec<qk::Q8_0>),
    Q2K(Vec<BlockQ2K>),
    Q3K(Vec<BlockQ3K>),
    Q4K(Vec<BlockQ4K>),
    Q5K(Vec<BlockQ5K>),
    Q6K(Vec<BlockQ6K>),
}

/// Runs `$body` with `$v` bound to the block vector of any quantized variant, or `$f32` for f32.
macro_rules! with_rows {
    ($rows:expr, $v:ident => $body:expr, $f:ident => $fbody:expr) => {
        match $rows {
            Rows::F32($f) => $fbody,
            Rows::Q4_0($v) => $body,
            Rows::Q4_1($v) => $body,
            Rows::Q5_0($v) => $body,
            Rows::Q5_1($v) => $body,
            Rows::Q8_0($v) => $body,
            Rows::Q2K($v) => $body,
            Rows::Q3K($v) => $body,
            Rows::Q4K($v) => $body,
            Rows::Q5K($v) => $body,
            Rows::Q6K($v) => $body,
        }
    };
}

/// A weight matrix n × k (out × in).
pub struct Mat {
    pub n: usize,
    pub k: usize,
    rows: Rows,
}

/// A raw output pointer shared by threads that write disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: every user writes only elements no other thread writes (disjoint weight rows).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Element `i` (a method, so closures capture the whole Sync wrapper).
    pub(crate) fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// A block format's operations, over kiln's kernels ([`qk`]: 32-value formats) or candle's
/// (k-quants, 256-value super-blocks).
trait Blocks: Sized + Send + Sync + 'static {
    /// Values per block.
    const BLOCK: usize;
    /// Widens consecutive blocks to f32.
    fn widen(blocks: &[Self], out: &mut [f32]);
    /// `out (t × n) = x (t × k) · Wᵀ` for t below [`WIDEN_ROWS`].
    fn matmul_small(w: &[Self], n: usize, k: usize, x: &[f32], t: usize, out: &mut [f32]);
}

macro_rules! own_blocks {
    ($($t:ty),*) => {$(
        impl Blocks for $t {
            const BLOCK: usize = 32;
            fn widen(blocks: &[Self], out: &mut [f32]) {
                for (b, o) in blocks.iter().zip(out.chunks_exact_mut(32)) {
                    b.to_float(o);
                }
            }
            fn matmul_small(w: &[Self], n: usize, k: usize, x: &[f32], t: usize, out: &mut [f32]) {
                own_matmul(w, n, k, x, t, out)
            }
        }
    )*};
}
own_blocks!(qk::Q4_0, qk::Q4_1, qk::Q5_0, qk::Q5_1, qk::Q8_0);

macro_rules! candle_blocks {
    ($($t:ty),*) => {$(
        impl Blocks for $t {
            const BLOCK: usize = <$t as GgmlType>::BLCK_SIZE;
            fn widen(blocks: &[Self], out: &mut [f32]) {
                <$t as GgmlType>::to_float(blocks, out)
            }
            fn matmul_small(w: &[Self], n: usize, k: usize, x: &[f32], t: usize, out: &mut [f32]) {
                candle_matmul(w, n, k, x, t, out)
            }
        }
    )*};
}
candle_blocks!(BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K);

/// Runs `rows(r0, r1)` over the weight rows 0..n, in blocks across threads when worth it:
/// about four blocks per thread (enough to even out a busy core, few enough that handing out
/// blocks costs little next to streaming them), at least [`ROW_BLOCK`] rows each.
fn for_row_blocks(n: usize, rows: impl Fn(usize, usize) + Sync) {
    let threads = rayon::current_num_threads();
    if n <= ROW_BLOCK || threads == 1 {
        return rows(0, n);
    }
    let block = n.div_ceil(threads * 4).max(ROW_BLOCK).next_multiple_of(4);
    (0..n.div_ceil(block))
        .into_par_iter()
        .for_each(|b| rows(b * block, ((b + 1) * block).min(n)));
}

/// kiln's 32-value block kernels: four weight rows per call against each token's activations.
fn own_matmul<B: QBlock>(w: &[B], n: usize, k: usize, x: &[f32], t: usize, out: &mut [f32]) {
    let kb = k / 32;
    let mut acts = QActs::default();
    acts.quantize(&x[..t * k]);
    let acts = &acts;
    let dst = OutPtr(out.as_mut_ptr());
    for_row_blocks(n, |r0, r1| {
        let row = |r: usize| &w[r * kb..(r + 1) * kb];
        row_groups(r0, r1, false, |ids, live| {
            for tok in 0..t {
                let d = B::dot4(ids.map(row), acts, tok * kb, kb);
                for (&r, v) in ids.iter().zip(d).take(live) {
                    // SAFETY: out is t×n; this task alone writes rows r0..r1 of every token.
                    unsafe { *dst.at(tok * n + r) = v };
                }
            }
        });
    });
}

/// A copy of `v` in memory backed by 2 MiB pages where the kernel allows it (Linux
/// transparent huge pages in `madvise` mode): decoding streams every weight once per token,
/// and with 4 KiB pages that is a TLB miss every 4 KiB (measured: f32 decode 28 -> 30 tokens/s,
/// quantized a few % faster).
fn on_huge_pages<T: Clone>(v: &[T]) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(v.len());
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = out.as_ptr() as usize;
        let end = start + std::mem::size_of_val(v);
        let (a, b) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if b > a {
            // SAFETY: advice on whole pages inside this vector's own, not yet touched,
            // allocation; it changes how pages are backed, never their contents. Failure only
            // means 4 KiB pages.
            unsafe {
                libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE);
            }
        }
    }
    out.extend_from_slice(v);
    out
}

/// Copies GGUF block bytes into a typed vector. The block types are `repr(C)` plain data
/// (f16 scales and byte arrays), so any bit pattern is a valid value.
fn blocks<T: Blocks>(bytes: &[u8]) -> Result<Vec<T>, ModelError> {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size) {
        return Err(ModelError::Config(format!(
            "a quantized tensor of {} bytes is not a whole number of {size}-byte blocks",
            bytes.len()
        )));
    }
    let n = bytes.len() / size;
    let mut v: Vec<T> = Vec::with_capacity(n);
    // SAFETY: the destination has capacity for n blocks = bytes.len() bytes, the regions do
    // not overlap, and T is plain data valid for any bytes (see above).
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr() as *mut u8, bytes.len());
        v.set_len(n);
    }
    Ok(v)
}

/// candle's block dot products (k-quants) on activations quantized to the matching format.
fn candle_matmul<T: GgmlType>(w: &[T], n: usize, k: usize, x: &[f32], t: usize, out: &mut [f32]) {
    let kb = k / T::BLCK_SIZE;
    let mut xq = vec![T::VecDotType::zeros(); t * kb];
    for (r, q) in x.chunks_exact(k).zip(xq.chunks_exact_mut(kb)) {
        T::VecDotType::from_float(r, q);
    }
    let xq = &xq;
    let dst = OutPtr(out.as_mut_ptr());
    let rows = |r0: usize, r1: usize| {
        let row = |r: usize| &w[r * kb..(r + 1) * kb];
        row_groups(r0, r1, false, |[a, b, c, d], live| {
            for tok in 0..t {
                let xr = &xq[tok * kb..(tok + 1) * kb];
                if live < STREAMS {
                    for &r in [a, b, c, d].iter().take(live) {
                        let v = T::vec_dot(k, row(r), xr);
                        // SAFETY: out is t×n; this task alone writes rows r0..r1 of every token.
                        unsafe { *dst.at(tok * n + r) = v };
                    }
                    continue;
                }
                let v = T::vec_dot_4(k, row(a), row(b), row(c), row(d), xr);
                // SAFETY: as above.
                unsafe {
                    *dst.at(tok * n + a) = v.0;
                    *dst.at(tok * n + b) = v.1;
                    *dst.at(tok * n + c) = v.2;
                    *dst.at(tok * n + d) = v.3;
                }
            }
        });
    };
    for_row_blocks(n, rows);
}

/// Weight rows a decoding matmul reads per pass.
const STREAMS: usize = 4;

/// Calls `group(ids, live)` for the rows r0..r1 in groups of [`STREAMS`] rows; the last groups
/// (fewer rows than STREAMS left) repeat their final row, and `live` says how many of `ids` are
/// real. Together they cover every row exactly once.
///
/// With `spread`, a group takes one row from each of STREAMS equal parts of the range, else
/// consecutive rows. A core reads memory faster from several independent streams than from
/// one: f32 decoding (memory-bound) streamed SmolLM2's matrices at 22–25 GB/s on 2 threads
/// with 4 streams per thread against 19–21 with one, and decoded 30–33 -> 37–44 tokens/s. The
/// quantized kernels are compute-bound, and spreading their rows made q8_0 and q4_k_m decode
/// ~10–15% slower, so they read consecutive rows.
fn row_groups(r0: usize, r1: usize, spread: bool, mut group: impl FnMut([usize; STREAMS], usize)) {
    let mut r = r0;
    if spread {
        let part = (r1 - r0) / STREAMS;
        for i in 0..part {
            group(std::array::from_fn(|s| r0 + i + s * part), STREAMS);
        }
        r += STREAMS * part;
    }
    while r < r1 {
        let live = (r1 - r).min(STREAMS);
        group(std::array::from_fn(|s| r + s.min(live - 1)), live);
        r += live;
    }
}

/// Decoding with f32 weights: each weight row streamed once, dotted with every token.
fn f32_gemv(w: &[f32], n: usize, k: usize, x: &[f32], t: usize, out: &mut [f32]) {
    let dst = OutPtr(out.as_mut_ptr());
    for_row_blocks(n, |r0, r1| {
        let row = |r: usize| &w[r * k..(r + 1) * k];
        row_groups(r0, r1, true, |ids, live| {
            for tok in 0..t {
                let d = qk::dot_f32_rows(ids.map(row), &x[tok * k..(tok + 1) * k]);
                for (&r, v) in ids.iter().zip(d).take(live) {
                    // SAFETY: out is t×n; this task alone writes rows r0..r1 of every token.
                    unsafe { *dst.at(tok * n + r) = v };
                }
            }
        });
    });
}

/// Widens the whole matrix and runs the f32 gemm (prompts; see [`WIDEN_ROWS`]).
fn widened_matmul<B: Blocks>(w: &[B], n: usize, k: usize, x: &[f32], t: usize, out: &mut [f32]) {
    let kb = k / B::BLOCK;
    let mut wide = vec![0f32; n * k];
    wide.par_chunks_mut(ROW_BLOCK * k)
        .zip(w.par_chunks(ROW_BLOCK * kb))
        .for_each(|(o, b)| B::widen(b, o));
    super::frozen::matmul_into(x, &wide, t, n, k, out)
}

impl Mat {
    fn f32(w: Vec<f32>, n: usize, k: usize) -> Self {
        Self {
            n,
            k,
            rows: Rows::F32(w),
        }
    }

    /// Keeps the GGUF's quantized blocks when kiln has a kernel for them, else widens to f32.
    pub(crate) fn from_qtensor(q: &QTensor) -> Result<Self, ModelError> {
        let (n, k) = match q.shape().dims() {
            [n, k] => (*n, *k),
            d => {
                return Err(ModelError::Config(format!(
                    "expected a 2-d weight, got shape {d:?}"
                )))
            }
        };
        let data = || q.data();
        let rows = match q.dtype() {
            GgmlDType::Q4_0 => Rows::Q4_0(blocks(&data()?)?),
            GgmlDType::Q4_1 => Rows::Q4_1(blocks(&data()?)?),
            GgmlDType::Q5_0 => Rows::Q5_0(blocks(&data()?)?),
            GgmlDType::Q5_1 => Rows::Q5_1(blocks(&data()?)?),
            GgmlDType::Q8_0 => Rows::Q8_0(blocks(&data()?)?),
            GgmlDType::Q2K => Rows::Q2K(blocks(&data()?)?),
            GgmlDType::Q3K => Rows::Q3K(blocks(&data()?)?),
            GgmlDType::Q4K => Rows::Q4K(blocks(&data()?)?),
            GgmlDType::Q5K => Rows::Q5K(blocks(&data()?)?),
            GgmlDType::Q6K => Rows::Q6K(blocks(&data()?)?),
            _ => Rows::F32(q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?),
        };
        let m = Self { n, k, rows };
        let have = with_rows!(&m.rows, v => v.len() * block_size_of(v), f => f.len());
        if k % m.block_elems() != 0 {
            return Err(ModelError::Config(format!(
                "{} weight rows of {k} values are not whole blocks",
                m.format()
            )));
        }
        if have != n * k {
            return Err(ModelError::Config(format!(
                "weight of shape ({n}, {k}) holds {have} values"
            )));
        }
        Ok(m)
    }

    fn block_elems(&self) -> usize {
        with_rows!(&self.rows, v => block_size_of(v), _f => 1)
    }

    fn block_bytes(&self) -> usize {
        with_rows!(&self.rows, v => block_bytes_of(v), _f => 4)
    }

    /// Bytes the matrix occupies in memory.
    pub fn bytes(&self) -> usize {
        self.n * self.k / self.block_elems() * self.block_bytes()
    }

    /// The storage format's name, as GGUF spells it.
    pub fn format(&self) -> &'static str {
        match &self.rows {
            Rows::F32(_) => "f32",
            Rows::Q4_0(_) => "q4_0",
            Rows::Q4_1(_) => "q4_1",
            Rows::Q5_0(_) => "q5_0",
            Rows::Q5_1(_) => "q5_1",
            Rows::Q8_0(_) => "q8_0",
            Rows::Q2K(_) => "q2_k",
            Rows::Q3K(_) => "q3_k",
            Rows::Q4K(_) => "q4_k",
            Rows::Q5K(_) => "q5_k",
            Rows::Q6K(_) => "q6_k",
        }
    }

    /// The blocks' bytes as a GGUF file holds them, with their format.
    pub(crate) fn raw(&self) -> (GgmlDType, Vec<u8>) {
        fn bytes<T>(v: &[T]) -> Vec<u8> {
            // SAFETY: the block types are plain #[repr(C)] data; reading them as bytes is valid.
            unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
                .to_vec()
        }
        match &self.rows {
            Rows::F32(v) => (GgmlDType::F32, bytes(v)),
            Rows::Q4_0(v) => (GgmlDType::Q4_0, bytes(v)),
            Rows::Q4_1(v) => (GgmlDType::Q4_1, bytes(v)),
            Rows::Q5_0(v) => (GgmlDType::Q5_0, bytes(v)),
            Rows::Q5_1(v) => (GgmlDType::Q5_1, bytes(v)),
            Rows::Q8_0(v) => (GgmlDType::Q8_0, bytes(v)),
            Rows::Q2K(v) => (GgmlDType::Q2K, bytes(v)),
            Rows::Q3K(v) => (GgmlDType::Q3K, bytes(v)),
            Rows::Q4K(v) => (GgmlDType::Q4K, bytes(v)),
            Rows::Q5K(v) => (GgmlDType::Q5K, bytes(v)),
            Rows::Q6K(v) => (GgmlDType::Q6K, bytes(v)),
        }
    }

    /// Rows `r0..r1` as f32, row-major into `out` ((r1 − r0) × k values).
    pub(crate) fn widen_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let k = self.k;
        with_rows!(&self.rows, v => {
            let kb = k / block_size_of(v);
            Blocks::widen(&v[r0 * kb..r1 * kb], out)
        }, f => out.copy_from_slice(&f[r0 * k..r1 * k]))
    }

    /// Row `i` as f32 (an embedding lookup).
    fn row(&self, i: usize, out: &mut [f32]) {
        let k = self.k;
        with_rows!(&self.rows, v => {
            let kb = k / block_size_of(v);
            Blocks::widen(&v[i * kb..(i + 1) * kb], out)
        }, f => out.copy_from_slice(&f[i * k..(i + 1) * k]))
    }

    /// `out (t × n) = x (t × k) · Wᵀ`.
    pub fn matmul(&self, x: &[f32], t: usize, out: &mut [f32]) {
        let (n, k) = (self.n, self.k);
        with_rows!(&self.rows, v => if t >= WIDEN_ROWS {
            widened_matmul(v, n, k, x, t, out)
        } else {
            Blocks::matmul_small(v, n, k, x, t, out)
        },
        f => if t >= WIDEN_ROWS {
            super::frozen::matmul_into(x, f, t, n, k, out)
        } else {
            f32_gemv(f, n, k, x, t, out)
        })
    }

    /// Moves the rows onto huge pages ([`on_huge_pages`]).
    fn rehome(&mut self) {
        with_rows!(&mut self.rows, v => *v = on_huge_pages(v), f => *f = on_huge_pages(f))
    }

    /// Reorders the rows: row `i` of the result is row `perm[i]` of `self`.
    pub(crate) fn permute_rows(&mut self, perm: &[usize]) {
        fn go<T: Clone>(v: &mut Vec<T>, per_row: usize, perm: &[usize]) {
            let mut out = Vec::with_capacity(v.len());
            for &p in perm {
                out.extend_from_slice(&v[p * per_row..(p + 1) * per_row]);
            }
            *v = out;
        }
        let k = self.k;
        with_rows!(&mut self.rows, v => { let b = k / block_size_of(v); go(v, b, perm) }, f => go(f, k, perm))
    }

    /// The rows of several matrices stacked into one (same format and width), or the
    /// matrices back when they cannot be.
    fn stack(mut parts: Vec<Mat>) -> Result<Mat, Vec<Mat>> {
        let same = parts.windows(2).all(|w| {
            w[0].k == w[1].k
                && std::mem::discriminant(&w[0].rows) == std::mem::discriminant(&w[1].rows)
        });
        if !same || parts.is_empty() {
            return Err(parts);
        }
        let n = parts.iter().map(|p| p.n).sum();
        let mut first = parts.remove(0);
        for p in parts {
            macro_rules! app {
                ($($var:ident),*) => {
                    match (&mut first.rows, p.rows) {
                        $((Rows::$var(a), Rows::$var(b)) => a.extend(b),)*
                        _ => unreachable!("formats checked above"),
                    }
                };
            }
            app!(F32, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2K, Q3K, Q4K, Q5K, Q6K);
        }
        first.n = n;
        Ok(first)
    }
}

fn block_size_of<T: Blocks>(_: &[T]) -> usize {
    T::BLOCK
}

fn block_bytes_of<T>(_: &[T]) -> usize {
    std::mem::size_of::<T>()
}

/// Several projections of the same input whose outputs are concatenated (q|k|v, gate|up):
/// one stacked matrix when their formats agree, else one matmul each.
struct Proj {
    parts: Vec<Mat>,
    n: usize,
}

impl Proj {
    fn new(mats: Vec<Mat>) -> Self {
        let n = mats.iter().map(|m| m.n).sum();
        let parts = match Mat::stack(mats) {
            Ok(m) => vec![m],
            Err(v) => v,
        };
        Self { parts, n }
    }

    fn matmul(&self, x: &[f32], t: usize, out: &mut [f32], scratch: &mut Vec<f32>) {
        if let [m] = &self.parts[..] {
            return m.matmul(x, t, &mut out[..t * self.n]);
        }
        let mut off = 0;
        for m in &self.parts {
            scratch.resize(t * m.n, 0.0);
            m.matmul(x, t, scratch);
            for tok in 0..t {
                out[tok * self.n + off..tok * self.n + off + m.n]
                    .copy_from_slice(&scratch[tok * m.n..(tok + 1) * m.n]);
            }
            off += m.n;
        }
    }

    fn formats(&self) -> impl Iterator<Item = (&'static str, usize)> + '_ {
        self.parts.iter().map(|m| (m.format(), m.bytes()))
    }
}

struct Block {
    attn_norm: Vec<f32>,
    mlp_norm: Vec<f32>,
    /// q | k | v.
    qkv: Proj,
    qkv_bias: Option<Vec<f32>>,
    o: Mat,
    /// gate | up.
    gate_up: Proj,
    down: Mat,
}

/// The model, ready to generate.
pub struct Engine {
    pub cfg: LlamaConfig,
    embed: Mat,
    /// None when tied to the embeddings.
    head: Option<Mat>,
    norm: Vec<f32>,
    blocks: Vec<Block>,
    inv_freq: Vec<f32>,
}

/// Keys and values of every layer for the tokens fed so far: per layer, per KV head, one row
/// of head_dim per position.
pub struct EngineCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    cap: usize,
    pub len: usize,
}

impl EngineCache {
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Room for `need` positions, keeping what is cached.
    fn reserve(&mut self, need: usize, nkv: usize, hd: usize) {
        if need <= self.cap {
            return;
        }
        let cap = need.max(self.cap * 2).max(256);
        for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
            let mut grown = vec![0f32; nkv * cap * hd];
            for g in 0..nkv {
                let len = self.len * hd;
                grown[g * cap * hd..g * cap * hd + len]
                    .copy_from_slice(&buf[g * self.cap * hd..g * self.cap * hd + len]);
            }
            *buf = grown;
        }
        self.cap = cap;
    }
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>, ModelError> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(w) {
        *o = v * r * w;
    }
}

/// HF's rotate-half RoPE on one head vector, in place.
fn rope(v: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = v.len() / 2;
    let (a, b) = v.split_at_mut(half);
    for i in 0..half {
        let (x1, x2) = (a[i], b[i]);
        a[i] = x1 * cos[i] - x2 * sin[i];
        b[i] = x2 * cos[i] + x1 * sin[i];
    }
}

/// Shapes of one layer's attention over a chunk of `t` tokens after `start` cached ones.
struct Geometry {
    t: usize,
    start: usize,
    /// Cache capacity (positions per KV head).
    cap: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    /// Width of a q|k|v row.
    qkv_n: usize,
    scale: f32,
    window: Option<usize>,
}

/// Attention for a prompt, per head with the blocked gemm: scores = Q·Kᵀ over every cached
/// key, softmax over each query's causal (and windowed) range, then scores·V written into the
/// head's columns of `att` (t × nh·hd). Heads run in parallel.
fn attend_prompt(g: &Geometry, qkv: &[f32], kc: &[f32], vc: &[f32], att: &mut [f32]) {
    let len = g.start + g.t;
    let nq = g.nh * g.hd;
    assert!(qkv.len() >= g.t * g.qkv_n && att.len() >= g.t * nq);
    assert!(kc.len() >= g.nkv * g.cap * g.hd && vc.len() >= g.nkv * g.cap * g.hd && len <= g.cap);
    let dst = OutPtr(att.as_mut_ptr());
    (0..g.nh)
        .into_par_iter()
        .for_each_init(Vec::new, |s: &mut Vec<f32>, h| {
            let kv = h / (g.nh / g.nkv);
            s.clear();
            s.resize(g.t * len, 0.0);
            // scores (t × len) = Q_h (t × hd: rs = qkv_n, cs = 1) · K_kvᵀ (hd × len: the
            // cache's rows of hd, so rs = 1 along hd and cs = hd along positions).
            {
                use super::sgemm::{gemm, Mat, MatMut};
                let q = Mat::new(&qkv[h * g.hd..], g.t, g.hd, g.qkv_n, 1);
                let k = Mat::new(&kc[kv * g.cap * g.hd..], g.hd, len, 1, g.hd);
                gemm(g.scale, q, k, MatMut::rows(s, g.t, len), false, false);
            }
            for (i, row) in s.chunks_exact_mut(len).enumerate() {
                let pos = g.start + i;
                let lo = g.window.map(|w| (pos + 1).saturating_sub(w)).unwrap_or(0);
                let live = &mut row[lo..=pos];
                let max = live.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
                let mut sum = 0f32;
                for v in live.iter_mut() {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                live.iter_mut().for_each(|v| *v /= sum);
                row[..lo].iter_mut().for_each(|v| *v = 0.0);
                row[pos + 1..].iter_mut().for_each(|v| *v = 0.0);
            }
            // att's columns h·hd..(h+1)·hd (rs = nq) = scores (t × len) · V_kv (len × hd).
            {
                use super::sgemm::{gemm, Mat, MatMut};
                let p = Mat::rows(s, g.t, len);
                let v = Mat::new(&vc[kv * g.cap * g.hd..], len, g.hd, g.hd, 1);
                // SAFETY: att's t × hd block at column h·hd (row stride nq) is inside att
                // (asserted above), and this head alone writes it.
                let out = unsafe { MatMut::from_raw(dst.at(h * g.hd), g.t, g.hd, nq, 1) };
                gemm(1.0, p, v, out, false, false);
            }
        });
}

/// Row permutation taking llama.cpp's interleaved-RoPE Q/K rows (head, pair, 2) back to HF's
/// half-split order (head, 2, pair): result row i is GGUF row perm[i].
fn unpermute_order(rows: usize, n_head: usize) -> Vec<usize> {
    let hd = rows / n_head;
    let mut perm = Vec::with_capacity(rows);
    for h in 0..n_head {
        for a in 0..2 {
            for p in 0..hd / 2 {
                perm.push(h * hd + p * 2 + a);
            }
        }
    }
    perm
}

impl Engine {
    /// From a loaded model (f32 weights). LoRA deltas must be merged first
    /// ([`crate::model::adapter::PeftAdapter::merge_into`]).
    pub fn from_llama(m: &Llama) -> Result<Self, ModelError> {
        let mat = |w: &Tensor| -> Result<Mat, ModelError> {
            let (n, k) = w.dims2()?;
            Ok(Mat::f32(to_vec(w)?, n, k))
        };
        let lin = |l: &super::llama::Linear| -> Result<Mat, ModelError> {
            if l.lora.is_some() {
                return Err(ModelError::Config(
                    "the inference engine needs LoRA deltas merged into the weights first".into(),
                ));
            }
            mat(&l.weight.to_f32()?)
        };
        let mut blocks = Vec::with_capacity(m.layers.len());
        for l in &m.layers {
            let a = &l.attn;
            let qkv_bias = match (&a.q_proj.bias, &a.k_proj.bias, &a.v_proj.bias) {
                (Some(q), Some(k), Some(v)) => Some([to_vec(q)?, to_vec(k)?, to_vec(v)?].concat()),
                _ => None,
            };
            blocks.push(Block {
                attn_norm: to_vec(&l.input_layernorm)?,
                mlp_norm: to_vec(&l.post_attention_layernorm)?,
                qkv: Proj::new(vec![lin(&a.q_proj)?, lin(&a.k_proj)?, lin(&a.v_proj)?]),
                qkv_bias,
                o: lin(&a.o_proj)?,
                gate_up: Proj::new(vec![lin(&l.mlp.gate_proj)?, lin(&l.mlp.up_proj)?]),
                down: lin(&l.mlp.down_proj)?,
            });
        }
        Ok(Self::assemble(
            m.cfg.clone(),
            mat(&m.embed_tokens)?,
            m.lm_head.as_ref().map(mat).transpose()?,
            to_vec(&m.norm)?,
            blocks,
        ))
    }

    /// From a GGUF file, keeping its quantized weights as they are (Q/K rows reordered from
    /// llama.cpp's interleaved RoPE layout to the half-split one, as whole rows).
    pub fn from_gguf(path: &Path) -> Result<Self, ModelError> {
        let load_err = |e: &dyn std::fmt::Display| ModelError::Load {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let mut f = std::io::BufReader::with_capacity(
            1 << 20,
            std::fs::File::open(path).map_err(|e| load_err(&e))?,
        );
        let c = Content::read(&mut f).map_err(|e| load_err(&e))?;
        let has_output = c.tensor_infos.contains_key("output.weight");
        let cfg = LlamaConfig::from_gguf(&c, has_output)?;
        let mut tensor = |name: &str| -> Result<QTensor, ModelError> {
            if !c.tensor_infos.contains_key(name) {
                return Err(ModelError::Load {
                    path: path.to_path_buf(),
                    message: format!("missing tensor `{name}`"),
                });
            }
            c.tensor(&mut f, name, &Device::Cpu)
                .map_err(|e| load_err(&format!("{name}: {e}")))
        };
        let vector = |q: QTensor| -> Result<Vec<f32>, ModelError> {
            Ok(q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?)
        };
        let permute = cfg.architecture != "qwen2";
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("blk.{i}");
            let mut q = Mat::from_qtensor(&tensor(&format!("{p}.attn_q.weight"))?)?;
            let mut k = Mat::from_qtensor(&tensor(&format!("{p}.attn_k.weight"))?)?;
            let v = Mat::from_qtensor(&tensor(&format!("{p}.attn_v.weight"))?)?;
            let (qperm, kperm) = (unpermute_order(q.n, nh), unpermute_order(k.n, nkv));
            if permute {
                q.permute_rows(&qperm);
                k.permute_rows(&kperm);
            }
            let qkv_bias = if cfg.attention_bias {
                let mut qb = vector(tensor(&format!("{p}.attn_q.bias"))?)?;
                let mut kb = vector(tensor(&format!("{p}.attn_k.bias"))?)?;
                if permute {
                    qb = qperm.iter().map(|&j| qb[j]).collect();
                    kb = kperm.iter().map(|&j| kb[j]).collect();
                }
                let vb = vector(tensor(&format!("{p}.attn_v.bias"))?)?;
                Some([qb, kb, vb].concat())
            } else {
                None
            };
            blocks.push(Block {
                attn_norm: vector(tensor(&format!("{p}.attn_norm.weight"))?)?,
                mlp_norm: vector(tensor(&format!("{p}.ffn_norm.weight"))?)?,
                qkv: Proj::new(vec![q, k, v]),
                qkv_bias,
                o: Mat::from_qtensor(&tensor(&format!("{p}.attn_output.weight"))?)?,
                gate_up: Proj::new(vec![
                    Mat::from_qtensor(&tensor(&format!("{p}.ffn_gate.weight"))?)?,
                    Mat::from_qtensor(&tensor(&format!("{p}.ffn_up.weight"))?)?,
                ]),
                down: Mat::from_qtensor(&tensor(&format!("{p}.ffn_down.weight"))?)?,
            });
        }
        let embed = Mat::from_qtensor(&tensor("token_embd.weight")?)?;
        let head = if has_output {
            Some(Mat::from_qtensor(&tensor("output.weight")?)?)
        } else {
            None
        };
        let norm = vector(tensor("output_norm.weight")?)?;
        let e = Self::assemble(cfg, embed, head, norm, blocks);
        e.check_shapes().map_err(|m| load_err(&m))?;
        Ok(e)
    }

    fn assemble(
        cfg: LlamaConfig,
        embed: Mat,
        head: Option<Mat>,
        norm: Vec<f32>,
        mut blocks: Vec<Block>,
    ) -> Self {
        let mut embed = embed;
        let mut head = head;
        embed.rehome();
        if let Some(h) = &mut head {
            h.rehome();
        }
        for b in &mut blocks {
            for m in b.qkv.parts.iter_mut().chain(&mut b.gate_up.parts) {
                m.rehome();
            }
            b.o.rehome();
            b.down.rehome();
        }
        let hd = cfg.head_dim();
        let inv_freq = (0..hd / 2)
            .map(|i| 1.0 / (cfg.rope_theta as f32).powf(2.0 * i as f32 / hd as f32))
            .collect();
        Self {
            cfg,
            embed,
            head,
            norm,
            blocks,
            inv_freq,
        }
    }

    /// Every matrix has the shape the config implies.
    fn check_shapes(&self) -> Result<(), String> {
        let c = &self.cfg;
        let (h, hd) = (c.hidden_size, c.head_dim());
        let qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * hd;
        let want = |what: &str, m: (usize, usize), n: usize, k: usize| {
            if m == (n, k) {
                Ok(())
            } else {
                Err(format!(
                    "{what} has shape {m:?}, the config implies ({n}, {k})"
                ))
            }
        };
        want("token_embd", (self.embed.n, self.embed.k), c.vocab_size, h)?;
        if let Some(m) = &self.head {
            want("output", (m.n, m.k), c.vocab_size, h)?;
        }
        for (i, b) in self.blocks.iter().enumerate() {
            let k = |p: &Proj| p.parts.first().map(|m| m.k).unwrap_or(0);
            want(&format!("layer {i} q|k|v"), (b.qkv.n, k(&b.qkv)), qkv, h)?;
            want(
                &format!("layer {i} attn_output"),
                (b.o.n, b.o.k),
                h,
                c.num_attention_heads * hd,
            )?;
            want(
                &format!("layer {i} gate|up"),
                (b.gate_up.n, k(&b.gate_up)),
                2 * c.intermediate_size,
                h,
            )?;
            want(
                &format!("layer {i} ffn_down"),
                (b.down.n, b.down.k),
                h,
                c.intermediate_size,
            )?;
            if b.attn_norm.len() != h || b.mlp_norm.len() != h {
                return Err(format!("layer {i}: norm weights are not {h} long"));
            }
        }
        Ok(())
    }

    pub fn new_cache(&self) -> EngineCache {
        let n = self.cfg.num_hidden_layers;
        EngineCache {
            k: vec![Vec::new(); n],
            v: vec![Vec::new(); n],
            cap: 0,
            len: 0,
        }
    }

    /// Weight formats and their share of the weight bytes, e.g. "q4_k 88%, q6_k 12%".
    pub fn weight_formats(&self) -> String {
        let mut by: Vec<(&'static str, usize)> = Vec::new();
        let mut add = |f: &'static str, b: usize| match by.iter_mut().find(|(n, _)| *n == f) {
            Some(e) => e.1 += b,
            None => by.push((f, b)),
        };
        add(self.embed.format(), self.embed.bytes());
        if let Some(h) = &self.head {
            add(h.format(), h.bytes());
        }
        for b in &self.blocks {
            for (f, n) in b.qkv.formats().chain(b.gate_up.formats()) {
                add(f, n);
            }
            add(b.o.format(), b.o.bytes());
            add(b.down.format(), b.down.bytes());
        }
        let total: usize = by.iter().map(|(_, b)| b).sum::<usize>().max(1);
        by.sort_by_key(|e| std::cmp::Reverse(e.1));
        by.iter()
            .map(|(f, b)| format!("{f} {:.0}%", 100.0 * *b as f64 / total as f64))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Bytes of all weight matrices.
    pub fn weight_bytes(&self) -> usize {
        let mut n = self.embed.bytes() + self.head.as_ref().map(|h| h.bytes()).unwrap_or(0);
        for b in &self.blocks {
            n += b
                .qkv
                .parts
                .iter()
                .chain(&b.gate_up.parts)
                .map(|m| m.bytes())
                .sum::<usize>();
            n += b.o.bytes() + b.down.bytes();
        }
        n
    }

    /// Feeds `ids` after what `cache` holds; returns the logits (vocab) of the last one.
    pub fn forward(&self, ids: &[u32], cache: &mut EngineCache) -> Result<Vec<f32>, ModelError> {
        if rayon::current_thread_index().is_some() || rayon::current_num_threads() == 1 {
            return self.forward_here(ids, cache);
        }
        // On a pool thread: the ~120 parallel matmuls of a token then split work from inside
        // the pool instead of each handing it over from outside and sleeping until it is done.
        rayon::join(|| self.forward_here(ids, cache), || ()).0
    }

    fn forward_here(&self, ids: &[u32], cache: &mut EngineCache) -> Result<Vec<f32>, ModelError> {
        let c = &self.cfg;
        let t = ids.len();
        if t == 0 {
            return Err(ModelError::Config("forward: no tokens".into()));
        }
        let start = cache.len;
        if start + t > c.max_position_embeddings {
            return Err(ModelError::Config(format!(
                "the conversation is {} tokens, beyond the model's max_position_embeddings {}; /reset it",
                start + t,
                c.max_position_embeddings
            )));
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.embed.n) {
            return Err(ModelError::Config(format!(
                "token id {bad} is outside the vocabulary ({} tokens)",
                self.embed.n
            )));
        }
        let (h, nh, nkv, hd) = (
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim(),
        );
        let (nq, nk) = (nh * hd, nkv * hd);
        let qkv_n = nq + 2 * nk;
        let inter = c.intermediate_size;
        let eps = c.rms_norm_eps as f32;
        cache.reserve(start + t, nkv, hd);
        let cap = cache.cap;

        let mut x = vec![0f32; t * h];
        for (row, &id) in x.chunks_exact_mut(h).zip(ids) {
            self.embed.row(id as usize, row);
        }
        let half = hd / 2;
        let mut cos = vec![0f32; t * half];
        let mut sin = vec![0f32; t * half];
        for i in 0..t {
            let pos = (start + i) as f32;
            for (j, f) in self.inv_freq.iter().enumerate() {
                let a = pos * f;
                cos[i * half + j] = a.cos();
                sin[i * half + j] = a.sin();
            }
        }
        let mut normed = vec![0f32; t * h];
        let mut qkv = vec![0f32; t * qkv_n];
        let mut att = vec![0f32; t * nq];
        let mut proj = vec![0f32; t * h];
        let mut gu = vec![0f32; t * 2 * inter];
        let mut act = vec![0f32; t * inter];
        let mut scratch = Vec::new();
        let scale = 1.0 / (hd as f32).sqrt();
        let window = c.sliding_window.filter(|&w| w > 0);

        for (li, b) in self.blocks.iter().enumerate() {
            for (xr, nr) in x.chunks_exact(h).zip(normed.chunks_exact_mut(h)) {
                rms_norm(xr, &b.attn_norm, eps, nr);
            }
            b.qkv.matmul(&normed, t, &mut qkv, &mut scratch);
            let (kc, vc) = (&mut cache.k[li], &mut cache.v[li]);
            for (i, row) in qkv.chunks_exact_mut(qkv_n).enumerate() {
                if let Some(bias) = &b.qkv_bias {
                    row.iter_mut().zip(bias).for_each(|(r, b)| *r += b);
                }
                let (cs, sn) = (
                    &cos[i * half..(i + 1) * half],
                    &sin[i * half..(i + 1) * half],
                );
                for head in row[..nq + nk].chunks_exact_mut(hd) {
                    rope(head, cs, sn);
                }
                let pos = start + i;
                for g in 0..nkv {
                    let at = (g * cap + pos) * hd;
                    kc[at..at + hd].copy_from_slice(&row[nq + g * hd..nq + (g + 1) * hd]);
                    vc[at..at + hd].copy_from_slice(&row[nq + nk + g * hd..nq + nk + (g + 1) * hd]);
                }
            }
            let (kc, vc) = (&cache.k[li][..], &cache.v[li][..]);
            let gs = nh / nkv;
            // Positions token i attends to: its window's start and one past its own position.
            let span = |i: usize| {
                let pos = start + i;
                (
                    window.map(|w| (pos + 1).saturating_sub(w)).unwrap_or(0),
                    pos + 1,
                )
            };
            // Token i's attention into `out` (nq values): its positions in parts cut at
            // multiples of ATTEND_PART, each attended on its own (attn::attend_part), then
            // merged in order. With `parallel`, each thread takes a contiguous run of parts.
            let attend = |i: usize, out: &mut [f32], parallel: bool| {
                let (p0, p1) = span(i);
                let cuts: Vec<usize> = std::iter::once(p0)
                    .chain(
                        (p0 / ATTEND_PART + 1..)
                            .map(|c| c * ATTEND_PART)
                            .take_while(|&c| c < p1),
                    )
                    .chain(std::iter::once(p1))
                    .collect();
                let parts = cuts.len() - 1;
                let mut outs = vec![0f32; parts * nq];
                let mut stats = vec![attn::Stats { max: 0.0, sum: 0.0 }; parts * nh];
                // Parts first.. into `o` (parts × nq) and `st` (parts × nh).
                let run = |first: usize, o: &mut [f32], st: &mut [attn::Stats]| {
                    let mut scores = Vec::new();
                    let each = o.chunks_exact_mut(nq).zip(st.chunks_exact_mut(nh));
                    for (k, (o, st)) in each.enumerate() {
                        let (a, b) = (cuts[first + k], cuts[first + k + 1]);
                        let groups = o.chunks_exact_mut(gs * hd).zip(st.chunks_exact_mut(gs));
                        for (g, (o, st)) in groups.enumerate() {
                            let q = &qkv[i * qkv_n + g * gs * hd..][..gs * hd];
                            let (k0, k1) = ((g * cap + a) * hd, (g * cap + b) * hd);
                            let (k, v) = (&kc[k0..k1], &vc[k0..k1]);
                            attn::attend_part(q, hd, k, v, scale, &mut scores, o, st);
                        }
                    }
                };
                let threads = if parallel {
                    rayon::current_num_threads().min(parts)
                } else {
                    1
                };
                if threads > 1 {
                    let per = parts.div_ceil(threads);
                    outs.par_chunks_mut(per * nq)
                        .zip(stats.par_chunks_mut(per * nh))
                        .enumerate()
                        .for_each(|(c, (o, st))| run(c * per, o, st));
                } else {
                    run(0, &mut outs, &mut stats);
                }
                attn::merge_parts(&outs, &stats, hd, out);
            };
            if t >= WIDEN_ROWS {
                let geo = Geometry {
                    t,
                    start,
                    cap,
                    nh,
                    nkv,
                    hd,
                    qkv_n,
                    scale,
                    window,
                };
                attend_prompt(&geo, &qkv, kc, vc, &mut att);
            } else if t == 1 {
                // Decoding: the parts of the positions on all threads.
                attend(0, &mut att[..nq], rayon::current_num_threads() > 1);
            } else {
                att.par_chunks_mut(nq)
                    .enumerate()
                    .for_each(|(i, out)| attend(i, out, false));
            }
            b.o.matmul(&att, t, &mut proj);
            x.iter_mut().zip(&proj).for_each(|(a, p)| *a += p);

            for (xr, nr) in x.chunks_exact(h).zip(normed.chunks_exact_mut(h)) {
                rms_norm(xr, &b.mlp_norm, eps, nr);
            }
            b.gate_up.matmul(&normed, t, &mut gu, &mut scratch);
            for (a, row) in act.chunks_exact_mut(inter).zip(gu.chunks_exact(2 * inter)) {
                let (g, u) = row.split_at(inter);
                for ((a, g), u) in a.iter_mut().zip(g).zip(u) {
                    *a = g / (1.0 + (-g).exp()) * u;
                }
            }
            b.down.matmul(&act, t, &mut proj);
            x.iter_mut().zip(&proj).for_each(|(a, p)| *a += p);
        }
        cache.len += t;
        let mut last = vec![0f32; h];
        rms_norm(&x[(t - 1) * h..], &self.norm, eps, &mut last);
        let head = self.head.as_ref().unwrap_or(&self.embed);
        let mut logits = vec![0f32; head.n];
        head.matmul(&last, 1, &mut logits);
        Ok(logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_groups_cover_every_row_once() {
        let ranges = [
            (0, 0),
            (0, 1),
            (0, 3),
            (0, 4),
            (5, 12),
            (0, 31),
            (32, 160),
            (7, 130),
        ];
        for ((r0, r1), spread) in ranges.into_iter().flat_map(|r| [(r, false), (r, true)]) {
            let mut seen = vec![0u32; r1];
            row_groups(r0, r1, spread, |ids, live| {
                assert!((1..=STREAMS).contains(&live));
                for &r in &ids[..live] {
                    seen[r] += 1;
                }
                // Padding repeats the last live row.
                assert!(ids[live..].iter().all(|&r| r == ids[live - 1]));
            });
            assert!(seen[..r0].iter().all(|&c| c == 0), "{r0}..{r1}");
            assert!(
                seen[r0..].iter().all(|&c| c == 1),
                "{r0}..{r1} {spread}: {seen:?}"
            );
        }
    }
}
