//! Vectorized `exp` for softmax-shaped loops (attention rows, the cross-entropy over the
//! vocabulary). glibc's `expf` is scalar; these run 8 lanes at a time with AVX2/FMA, ~1 ulp
//! (Cephes' range reduction and degree-5 polynomial). Results below e⁻⁸⁷ (below f32's smallest
//! normal) are 0, as a masked attention entry should be.
//!
//! The scalar fallback does the same operations (fused multiply-adds included) in the same
//! order, and sums use 8 lane accumulators reduced in a fixed order in both paths, so results
//! are the same bits with or without AVX2.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const C: [f32; 6] = [
    0.5,
    1.666_666_5e-1,
    4.166_579_6e-2,
    8.333_452e-3,
    1.398_2e-3,
    1.987_569_1e-4,
];
/// Below this the result is 0 (e⁻⁸⁷ ≈ 1.6e-38).
const LO: f32 = -87.0;
const HI: f32 = 88.3;

/// eˣ, the lane computation of the vector path.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    if x < LO {
        return 0.0;
    }
    let x = x.min(HI);
    let n = (x * LOG2E).round_ties_even();
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    let mut p = C[5];
    for &c in C[..5].iter().rev() {
        p = p.mul_add(r, c);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[inline(always)]
fn reduce(acc: &[f32; 8]) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

pub(crate) fn simd_ok() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x[i] ← e^(x[i] − shift)` in place; returns their sum.
pub fn exp_shifted_inplace(x: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd_ok() {
        // SAFETY: AVX2 and FMA are present.
        return unsafe { avx2::exp_shifted(x.as_ptr(), x.as_mut_ptr(), x.len(), shift, 1.0, true) };
    }
    let mut acc = [0f32; 8];
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
            *v = exp(*v - shift);
            *a += *v;
        }
    }
    let mut s = reduce(&acc);
    for v in chunks.into_remainder() {
        *v = exp(*v - shift);
        s += *v;
    }
    s
}

/// Σ e^(x[i] − shift), without storing the terms.
pub fn sum_exp_shifted(x: &[f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd_ok() {
        // SAFETY: AVX2 and FMA are present; nothing is written (store = false).
        return unsafe {
            avx2::exp_shifted(x.as_ptr(), std::ptr::null_mut(), x.len(), shift, 1.0, false)
        };
    }
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += exp(*v - shift);
        }
    }
    let mut s = reduce(&acc);
    for v in rest {
        s += exp(*v - shift);
    }
    s
}

/// `x[i] ← scale · e^(x[i] − shift)` in place (the same values as [`scaled_exp_shifted`]).
pub fn scaled_exp_shifted_inplace(x: &mut [f32], shift: f32, scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if simd_ok() {
        // SAFETY: AVX2 and FMA are present; the kernel reads each value before writing it.
        unsafe {
            avx2::exp_shifted(x.as_ptr(), x.as_mut_ptr(), x.len(), shift, scale, true);
        }
        return;
    }
    for v in x.iter_mut() {
        *v = scale * exp(*v - shift);
    }
}

/// `dst[i] ← scale · e^(src[i] − shift)`.
pub fn scaled_exp_shifted(src: &[f32], shift: f32, scale: f32, dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "scaled_exp_shifted: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if simd_ok() {
        // SAFETY: AVX2 and FMA are present; both slices have src.len() values.
        unsafe {
            avx2::exp_shifted(
                src.as_ptr(),
                dst.as_mut_ptr(),
                src.len(),
                shift,
                scale,
                true,
            )
        };
        return;
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = scale * exp(*s - shift);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// e^(v − shift) for 8 lanes, as [`exp`] does per lane.
    #[inline(always)]
    unsafe fn exp8(v: __m256, shift: __m256) -> __m256 {
        let x = _mm256_sub_ps(v, shift);
        let zero = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(LO));
        let x = _mm256_min_ps(x, _mm256_set1_ps(HI));
        let x = _mm256_max_ps(x, _mm256_set1_ps(LO));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
        );
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), x);
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
        let mut p = _mm256_set1_ps(C[5]);
        for &c in C[..5].iter().rev() {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        let y = _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
        _mm256_andnot_ps(zero, y)
    }

    /// Writes `scale · e^(src − shift)` to `dst` when `store`, and returns Σ e^(src − shift).
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `src` (and `dst` when storing) must hold `n` values.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted(
        src: *const f32,
        dst: *mut f32,
        n: usize,
        shift: f32,
        scale: f32,
        store: bool,
    ) -> f32 {
        let sh = _mm256_set1_ps(shift);
        let sc = _mm256_set1_ps(scale);
        let mut acc = _mm256_setzero_ps();
        let full = n / 8 * 8;
        let mut i = 0;
        while i < full {
            // SAFETY: i + 8 <= n.
            unsafe {
                let e = exp8(_mm256_loadu_ps(src.add(i)), sh);
                acc = _mm256_add_ps(acc, e);
                if store {
                    let out = if scale == 1.0 {
                        e
                    } else {
                        _mm256_mul_ps(sc, e)
                    };
                    _mm256_storeu_ps(dst.add(i), out);
                }
            }
            i += 8;
        }
        let mut lanes = [0f32; 8];
        // SAFETY: lanes holds 8 values.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        let mut s = reduce(&lanes);
        for j in full..n {
            // SAFETY: j < n.
            unsafe {
                let e = exp(*src.add(j) - shift);
                s += e;
                if store {
                    *dst.add(j) = if scale == 1.0 { e } else { scale * e };
                }
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_and_flushes_below_e_minus_87() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            assert!(
                ((got - want) / want).abs() < 2.5e-7,
                "exp({x}) = {got}, want {want}"
            );
            x += 0.0137;
        }
        assert_eq!(exp(-88.0), 0.0);
        assert_eq!(exp(-1e9), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn vector_and_scalar_paths_give_the_same_bits() {
        let src: Vec<f32> = (0..1003)
            .map(|i| ((i * 37) % 200) as f32 * 0.5 - 90.0)
            .collect();
        let shift = 3.25;
        // The scalar path, written out.
        let want: Vec<f32> = src.iter().map(|v| 0.5 * exp(v - shift)).collect();
        let mut got = vec![0f32; src.len()];
        scaled_exp_shifted(&src, shift, 0.5, &mut got);
        assert_eq!(
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        let mut acc = [0f32; 8];
        for (i, v) in src[..1000].iter().enumerate() {
            acc[i % 8] += exp(v - shift);
        }
        let mut s = reduce(&acc);
        for v in &src[1000..] {
            s += exp(v - shift);
        }
        assert_eq!(sum_exp_shifted(&src, shift).to_bits(), s.to_bits());
        let mut inplace = src.clone();
        assert_eq!(
            exp_shifted_inplace(&mut inplace, shift).to_bits(),
            s.to_bits()
        );
        assert_eq!(inplace[5].to_bits(), exp(src[5] - shift).to_bits());
    }
}
