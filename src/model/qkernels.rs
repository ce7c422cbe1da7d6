//! Dot products of ggml's 32-value weight blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, same bytes as
//! in a GGUF file) with activations quantized to 8 bits per 32 values, four weight rows at a
//! time so each activation block is loaded once per four rows. The AVX2 kernels read every
//! format as `a·u + c` with u an unsigned byte (Q8_0 as signed bytes): the integer products
//! come from one `maddubs` per block, the scales are applied in f32, and the offset `c` is
//! folded in through the activation block's precomputed sum. Portable scalar code computes
//! the same sums elsewhere.

use half::f16;

/// Activations quantized per 32 values: `x ≈ d · q`, plus `s = d · Σq` per block.
#[derive(Default)]
pub struct QActs {
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    pub s: Vec<f32>,
}

impl QActs {
    /// Quantizes `x` (a multiple of 32 values long).
    pub fn quantize(&mut self, x: &[f32]) {
        let nb = x.len() / 32;
        self.q.resize(nb * 32, 0);
        self.d.resize(nb, 0.0);
        self.s.resize(nb, 0.0);
        for (b, (xs, qs)) in x
            .chunks_exact(32)
            .zip(self.q.chunks_exact_mut(32))
            .enumerate()
        {
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, v) in qs.iter_mut().zip(xs) {
                *q = (v * inv).round() as i8;
                sum += *q as i32;
            }
            self.d[b] = d;
            self.s[b] = d * sum as f32;
        }
    }
}

/// A 32-value weight block in one of ggml's formats.
pub trait QBlock: Copy + Send + Sync + 'static {
    /// Widens the block to 32 f32 values.
    fn to_float(&self, out: &mut [f32]);
    /// Σ w·x over the block, x = d·q with s = d·Σq.
    fn dot(&self, q: &[i8], d: f32, s: f32) -> f32;
    /// Four rows' dot products with the same activations (`kb` blocks each).
    fn dot4(rows: [&[Self]; 4], x: &QActs, at: usize, kb: usize) -> [f32; 4];
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Q4_0 {
    d: u16,
    qs: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Q4_1 {
    d: u16,
    m: u16,
    qs: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Q5_0 {
    d: u16,
    qh: [u8; 4],
    qs: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Q5_1 {
    d: u16,
    m: u16,
    qh: [u8; 4],
    qs: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Q8_0 {
    d: u16,
    qs: [i8; 32],
}

const _: () = assert!(std::mem::size_of::<Q4_0>() == 18);
const _: () = assert!(std::mem::size_of::<Q4_1>() == 20);
const _: () = assert!(std::mem::size_of::<Q5_0>() == 22);
const _: () = assert!(std::mem::size_of::<Q5_1>() == 24);
const _: () = assert!(std::mem::size_of::<Q8_0>() == 34);

fn h(v: u16) -> f32 {
    f16::from_bits(v).to_f32()
}

/// The 32 unsigned values of 4-bit nibbles: element j is the low nibble of byte j (j < 16),
/// element j + 16 its high nibble.
fn nibbles(qs: &[u8; 16]) -> [u8; 32] {
    let mut u = [0u8; 32];
    for j in 0..16 {
        u[j] = qs[j] & 15;
        u[j + 16] = qs[j] >> 4;
    }
    u
}

/// Nibbles with the fifth bit of element j from bit j of `qh`.
fn fives(qs: &[u8; 16], qh: &[u8; 4]) -> [u8; 32] {
    let bits = u32::from_le_bytes(*qh);
    let mut u = nibbles(qs);
    for (j, v) in u.iter_mut().enumerate() {
        *v |= (((bits >> j) & 1) as u8) << 4;
    }
    u
}

fn udot(u: &[u8; 32], q: &[i8]) -> i32 {
    u.iter().zip(q).map(|(&a, &b)| a as i32 * b as i32).sum()
}

/// `a·u + c` per value: the block's unsigned values, scale and offset; and the values as
/// ggml computes them (bit for bit).
trait Affine {
    fn unsigned(&self) -> ([u8; 32], f32, f32);
    fn widen(&self, out: &mut [f32]);
}

impl Affine for Q4_0 {
    fn unsigned(&self) -> ([u8; 32], f32, f32) {
        let d = h(self.d);
        (nibbles(&self.qs), d, -8.0 * d)
    }
    fn widen(&self, out: &mut [f32]) {
        let d = h(self.d);
        for (o, u) in out.iter_mut().zip(nibbles(&self.qs)) {
            *o = (u as i32 - 8) as f32 * d;
        }
    }
}
impl Affine for Q4_1 {
    fn unsigned(&self) -> ([u8; 32], f32, f32) {
        (nibbles(&self.qs), h(self.d), h(self.m))
    }
    fn widen(&self, out: &mut [f32]) {
        let (d, m) = (h(self.d), h(self.m));
        for (o, u) in out.iter_mut().zip(nibbles(&self.qs)) {
            *o = u as f32 * d + m;
        }
    }
}
impl Affine for Q5_0 {
    fn unsigned(&self) -> ([u8; 32], f32, f32) {
        let d = h(self.d);
        (fives(&self.qs, &self.qh), d, -16.0 * d)
    }
    fn widen(&self, out: &mut [f32]) {
        let d = h(self.d);
        for (o, u) in out.iter_mut().zip(fives(&self.qs, &self.qh)) {
            *o = (u as i32 - 16) as f32 * d;
        }
    }
}
impl Affine for Q5_1 {
    fn unsigned(&self) -> ([u8; 32], f32, f32) {
        (fives(&self.qs, &self.qh), h(self.d), h(self.m))
    }
    fn widen(&self, out: &mut [f32]) {
        let (d, m) = (h(self.d), h(self.m));
        for (o, u) in out.iter_mut().zip(fives(&self.qs, &self.qh)) {
            *o = u as f32 * d + m;
        }
    }
}

fn scalar_dot4<B: QBlock>(rows: [&[B]; 4], x: &QActs, at: usize, kb: usize) -> [f32; 4] {
    let mut out = [0f32; 4];
    for (o, row) in out.iter_mut().zip(rows) {
        for (b, blk) in row[..kb].iter().enumerate() {
            let i = at + b;
            *o += blk.dot(&x.q[i * 32..(i + 1) * 32], x.d[i], x.s[i]);
        }
    }
    out
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `[Σ rows[i]·x]` in f32 for N weight rows (decoding with f32 weights). Each row gets two
/// 8-lane FMA accumulators with AVX2, and its arithmetic does not depend on N or on which rows
/// share a call, so a row's result is the same bits however rows are grouped. Giving the
/// core N rows from distant parts of a matrix keeps N streams of weights in flight, which
/// reads memory faster than one stream (measured: see `f32_gemv`).
pub fn dot_f32_rows<const N: usize>(rows: [&[f32]; N], x: &[f32]) -> [f32; N] {
    for r in &rows {
        assert_eq!(
            r.len(),
            x.len(),
            "dot_f32_rows: a row's length differs from x's"
        );
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked); every row is x.len() long (asserted).
        return unsafe { avx::dot_f32_rows(rows, x) };
    }
    rows.map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
}

macro_rules! affine_block {
    ($t:ty, $avx:ident) => {
        impl QBlock for $t {
            fn to_float(&self, out: &mut [f32]) {
                self.widen(out)
            }
            fn dot(&self, q: &[i8], d: f32, s: f32) -> f32 {
                let (u, a, c) = self.unsigned();
                a * d * udot(&u, q) as f32 + c * s
            }
            fn dot4(rows: [&[Self]; 4], x: &QActs, at: usize, kb: usize) -> [f32; 4] {
                #[cfg(target_arch = "x86_64")]
                if has_avx2() {
                    // SAFETY: the CPU has AVX2, FMA and F16C (checked); every row holds kb
                    // blocks and x holds blocks at..at + kb (asserted by the caller's slicing).
                    return unsafe { avx::$avx(rows, x, at, kb) };
                }
                scalar_dot4(rows, x, at, kb)
            }
        }
    };
}

affine_block!(Q4_0, dot4_q4_0);
affine_block!(Q4_1, dot4_q4_1);
affine_block!(Q5_0, dot4_q5_0);
affine_block!(Q5_1, dot4_q5_1);

impl QBlock for Q8_0 {
    fn to_float(&self, out: &mut [f32]) {
        let d = h(self.d);
        for (o, &v) in out.iter_mut().zip(&self.qs) {
            *o = d * v as f32;
        }
    }
    fn dot(&self, q: &[i8], d: f32, _s: f32) -> f32 {
        let sum: i32 = self
            .qs
            .iter()
            .zip(q)
            .map(|(&a, &b)| a as i32 * b as i32)
            .sum();
        h(self.d) * d * sum as f32
    }
    fn dot4(rows: [&[Self]; 4], x: &QActs, at: usize, kb: usize) -> [f32; 4] {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: as for the other formats.
            return unsafe { avx::dot4_q8_0(rows, x, at, kb) };
        }
        scalar_dot4(rows, x, at, kb)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use super::{QActs, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: __m256) -> f32 {
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(hi, _mm256_castps256_ps128(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// See [`super::dot_f32_rows`]; needs every row to be x.len() long.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_f32_rows<const N: usize>(rows: [&[f32]; N], x: &[f32]) -> [f32; N] {
        let n = x.len();
        let px = x.as_ptr();
        let mut acc = [[_mm256_setzero_ps(); 2]; N];
        let mut i = 0;
        // SAFETY (all loads): i + 16 ≤ n, resp. i + 8 ≤ n, inside x and every row.
        while i + 16 <= n {
            let (x0, x1) = unsafe { (_mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(px.add(i + 8))) };
            for (a, r) in acc.iter_mut().zip(&rows) {
                let (w0, w1) = unsafe {
                    (
                        _mm256_loadu_ps(r.as_ptr().add(i)),
                        _mm256_loadu_ps(r.as_ptr().add(i + 8)),
                    )
                };
                a[0] = _mm256_fmadd_ps(w0, x0, a[0]);
                a[1] = _mm256_fmadd_ps(w1, x1, a[1]);
            }
            i += 16;
        }
        if i + 8 <= n {
            let x0 = unsafe { _mm256_loadu_ps(px.add(i)) };
            for (a, r) in acc.iter_mut().zip(&rows) {
                let w0 = unsafe { _mm256_loadu_ps(r.as_ptr().add(i)) };
                a[0] = _mm256_fmadd_ps(w0, x0, a[0]);
            }
            i += 8;
        }
        let mut out = [0f32; N];
        for ((o, a), r) in out.iter_mut().zip(&acc).zip(&rows) {
            *o = hsum(_mm256_add_ps(a[0], a[1]));
            for j in i..n {
                *o += r[j] * x[j];
            }
        }
        out
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn half(v: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(v as i32)))
    }

    /// The 32 nibbles of 16 bytes as bytes: low nibbles first, then high ones.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn nibbles(qs: &[u8; 16]) -> __m256i {
        // SAFETY: qs is 16 readable bytes.
        let lo = unsafe { _mm_loadu_si128(qs.as_ptr() as *const __m128i) };
        let both = _mm256_set_m128i(_mm_srli_epi16(lo, 4), lo);
        _mm256_and_si256(both, _mm256_set1_epi8(15))
    }

    /// 0x10 in byte j where bit j of `qh` is set.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn fifth_bits(qh: &[u8; 4]) -> __m256i {
        let bits = u32::from_le_bytes(*qh) as i32;
        let shuf = _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0,
        );
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits), shuf);
        let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
        let set = _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    macro_rules! kernel {
        ($name:ident, $t:ty, |$b:ident| $unpack:expr) => {
            /// # Safety
            /// Needs AVX2, FMA and F16C; rows hold `kb` blocks, `x` blocks `at..at + kb`.
            #[target_feature(enable = "avx2,fma,f16c")]
            pub(super) unsafe fn $name(
                rows: [&[$t]; 4],
                x: &QActs,
                at: usize,
                kb: usize,
            ) -> [f32; 4] {
                let ones = _mm256_set1_epi16(1);
                let xq = &x.q[at * 32..(at + kb) * 32];
                let (xd, xs) = (&x.d[at..at + kb], &x.s[at..at + kb]);
                // One row at a time (the activations stay in L1), two accumulators so
                // consecutive blocks do not wait on each other. A loop, not a closure: a
                // closure is not compiled with this function's target features unless it is
                // inlined, and out of line its intrinsics became calls (decode at 2/3 speed).
                let mut out = [0f32; 4];
                for (o, row) in out.iter_mut().zip(rows) {
                    let row = &row[..kb];
                    let mut acc = [_mm256_setzero_ps(); 2];
                    let mut corr = 0f32;
                    for i in 0..kb {
                        // SAFETY: xq holds kb blocks of 32 bytes.
                        let xv = unsafe {
                            _mm256_loadu_si256(xq.as_ptr().add(i * 32) as *const __m256i)
                        };
                        let $b = &row[i];
                        let (u, a, c): (__m256i, f32, f32) = $unpack;
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, xv), ones);
                        acc[i & 1] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(p),
                            _mm256_set1_ps(a * xd[i]),
                            acc[i & 1],
                        );
                        corr += c * xs[i];
                    }
                    *o = hsum(_mm256_add_ps(acc[0], acc[1])) + corr;
                }
                out
            }
        };
    }

    kernel!(dot4_q4_0, Q4_0, |b| {
        let d = half(b.d);
        (nibbles(&b.qs), d, -8.0 * d)
    });
    kernel!(dot4_q4_1, Q4_1, |b| (nibbles(&b.qs), half(b.d), half(b.m)));
    kernel!(dot4_q5_0, Q5_0, |b| {
        let d = half(b.d);
        (
            _mm256_or_si256(nibbles(&b.qs), fifth_bits(&b.qh)),
            d,
            -16.0 * d,
        )
    });
    kernel!(dot4_q5_1, Q5_1, |b| (
        _mm256_or_si256(nibbles(&b.qs), fifth_bits(&b.qh)),
        half(b.d),
        half(b.m)
    ));

    /// # Safety
    /// As for the other kernels.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot4_q8_0(
        rows: [&[Q8_0]; 4],
        x: &QActs,
        at: usize,
        kb: usize,
    ) -> [f32; 4] {
        let ones = _mm256_set1_epi16(1);
        let xq = &x.q[at * 32..(at + kb) * 32];
        let xd = &x.d[at..at + kb];
        // A loop, not a closure (see the kernel! macro).
        let mut out = [0f32; 4];
        for (o, row) in out.iter_mut().zip(rows) {
            let row = &row[..kb];
            let mut acc = [_mm256_setzero_ps(); 2];
            for i in 0..kb {
                // SAFETY: xq holds kb blocks of 32 bytes; a block holds 32 bytes of qs.
                let (xv, w) = unsafe {
                    (
                        _mm256_loadu_si256(xq.as_ptr().add(i * 32) as *const __m256i),
                        _mm256_loadu_si256(row[i].qs.as_ptr() as *const __m256i),
                    )
                };
                // |w| · (x with w's sign): unsigned × signed, as maddubs needs.
                let p = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w)),
                    ones,
                );
                acc[i & 1] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(p),
                    _mm256_set1_ps(half(row[i].d) * xd[i]),
                    acc[i & 1],
                );
            }
            *o = hsum(_mm256_add_ps(acc[0], acc[1]));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = crate::rng::SplitMix64::new(seed);
        move || s.next_u64()
    }

    /// Random blocks from random bytes, with sane f16 scales.
    fn random_blocks<B: QBlock>(n: usize, seed: u64) -> Vec<B> {
        let mut r = rng(seed);
        let size = std::mem::size_of::<B>();
        let mut bytes: Vec<u8> = (0..n * size).map(|_| r() as u8).collect();
        for b in 0..n {
            // Scale (and min, where there is one) in the first 4 bytes: small normal halves.
            for k in 0..2 {
                let v = f16::from_f32(((r() % 1000) as f32 / 1000.0 - 0.3) * 0.1).to_bits();
                bytes[b * size + 2 * k..b * size + 2 * k + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
        let mut v: Vec<B> = Vec::with_capacity(n);
        // SAFETY: B is plain data for any bytes; capacity holds n blocks.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr() as *mut u8, n * size);
            v.set_len(n);
        }
        v
    }

    #[test]
    fn f32_row_dots_match_f64_and_do_not_depend_on_grouping() {
        let mut r = rng(5);
        let mut val = move || (r() % 2001) as f32 / 1000.0 - 1.0;
        // Lengths with and without the 16- and 8-wide tails.
        for k in [1, 7, 8, 15, 16, 24, 33, 576, 1536] {
            let rows: Vec<Vec<f32>> = (0..4).map(|_| (0..k).map(|_| val()).collect()).collect();
            let x: Vec<f32> = (0..k).map(|_| val()).collect();
            let four = dot_f32_rows([&rows[0][..], &rows[1], &rows[2], &rows[3]], &x);
            for (row, got) in rows.iter().zip(four) {
                let want: f64 = row.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                assert!((got as f64 - want).abs() < 1e-4, "k {k}: {got} vs {want}");
                // A row alone, or beside other rows, gives the same bits.
                assert_eq!(dot_f32_rows([&row[..]], &x)[0].to_bits(), got.to_bits());
                assert_eq!(
                    dot_f32_rows([&rows[3][..], &row[..]], &x)[1].to_bits(),
                    got.to_bits()
                );
            }
        }
    }

    fn check<B: QBlock>(seed: u64) {
        let kb = 18; // SmolLM2's 576 inputs
        let rows = random_blocks::<B>(4 * kb, seed);
        let mut r = rng(seed + 1);
        let x: Vec<f32> = (0..kb * 32)
            .map(|_| (r() % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let mut acts = QActs::default();
        acts.quantize(&x);
        let rs = [
            &rows[0..kb],
            &rows[kb..2 * kb],
            &rows[2 * kb..3 * kb],
            &rows[3 * kb..4 * kb],
        ];
        let fast = B::dot4(rs, &acts, 0, kb);
        let slow = scalar_dot4(rs, &acts, 0, kb);
        for (row, (f, s)) in rs.iter().zip(fast.iter().zip(slow)) {
            // The kernel equals the scalar sums up to f32 rounding...
            assert!((f - s).abs() <= 1e-4 * (1.0 + s.abs()), "{f} vs {s}");
            // ...and the exact product with the widened weights up to the 8-bit activations.
            let mut w = vec![0f32; 32];
            let exact: f32 = row
                .iter()
                .enumerate()
                .map(|(b, blk)| {
                    blk.to_float(&mut w);
                    w.iter().zip(&x[b * 32..]).map(|(a, b)| a * b).sum::<f32>()
                })
                .sum();
            let scale: f32 = row
                .iter()
                .map(|blk| {
                    blk.to_float(&mut w);
                    w.iter().map(|v| v.abs()).sum::<f32>()
                })
                .sum();
            assert!(
                (s - exact).abs() <= 0.01 * scale,
                "{s} vs exact {exact} (scale {scale})"
            );
        }
    }

    #[test]
    fn block_kernels_agree_with_scalar_sums_and_widened_weights() {
        check::<Q4_0>(1);
        check::<Q4_1>(2);
        check::<Q5_0>(3);
        check::<Q5_1>(4);
        check::<Q8_0>(5);
    }

    #[test]
    fn widening_matches_candle_dequantization() {
        use candle_core::quantized::k_quants::{self as kq, GgmlType};
        fn same<B: QBlock, C: GgmlType>(seed: u64) {
            let ours = random_blocks::<B>(3, seed);
            let theirs: Vec<C> = {
                let mut v: Vec<C> = Vec::with_capacity(3);
                // SAFETY: candle's block of the same ggml format has the same size and layout
                // (both mirror ggml's C structs; sizes asserted below).
                assert_eq!(std::mem::size_of::<B>(), std::mem::size_of::<C>());
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        ours.as_ptr() as *const u8,
                        v.as_mut_ptr() as *mut u8,
                        3 * std::mem::size_of::<B>(),
                    );
                    v.set_len(3);
                }
                v
            };
            let mut a = vec![0f32; 96];
            for (b, o) in ours.iter().zip(a.chunks_exact_mut(32)) {
                b.to_float(o);
            }
            let mut c = vec![0f32; 96];
            C::to_float(&theirs, &mut c);
            assert_eq!(a, c);
        }
        same::<Q4_0, kq::BlockQ4_0>(7);
        same::<Q4_1, kq::BlockQ4_1>(8);
        same::<Q5_0, kq::BlockQ5_0>(9);
        same::<Q5_1, kq::BlockQ5_1>(10);
        same::<Q8_0, kq::BlockQ8_0>(11);
    }
}
