//! Attention of one token's query heads over cached keys and values: what a decoding step
//! computes per layer. For each query head h of a group sharing one key/value head,
//! `out_h = softmax(scale · K·q_h)ᵀ · V`, with K and V the n cached rows of width hd.
//!
//! A decoding step of SmolLM2-135M runs this for 30 layers × 3 groups of 3 heads over a few
//! hundred positions. Done per head with a library dot product per position and scalar `exp`,
//! that took ~2.2 ms of a ~34 ms step at ~270 positions; now it takes ~1.1 ms on 2 threads.
//! It is bound by reading the KV cache (12 MB per step there), which is cold: decoding streams
//! every weight between two layers' attention. Here:
//! - a group's heads are done together, a block of 16 keys at a time, so the block is read
//!   from memory once for all of them;
//! - scores take four keys per pass with one horizontal reduction for all four;
//! - the softmax uses [`crate::vmath`]'s vector exp;
//! - the weighted sum of values walks rows in memory order with up to 64 columns of
//!   accumulators in registers.
//!
//! [`attend_part`] and [`merge_parts`] split the positions into parts (as flash-decoding
//! does): each part keeps its own maximum and sum, and merging rescales them to a common
//! maximum. Threads then read disjoint slices of the cache, and the result depends only on
//! where the positions were cut, not on which thread ran which part.

/// One part's softmax statistics for a head: the maximum score and Σ e^(score − max).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    pub max: f32,
    pub sum: f32,
}

/// Keys per block: K and V rows of one block stay in L1 while every head of the group uses them.
const BLOCK: usize = 16;

fn check(qs: &[f32], hd: usize, keys: &[f32], vals: &[f32], out: &[f32]) -> usize {
    assert!(
        hd > 0 && !qs.is_empty() && qs.len().is_multiple_of(hd),
        "attention: queries are not whole heads of width {hd}"
    );
    assert!(
        !keys.is_empty() && keys.len().is_multiple_of(hd),
        "attention: keys are not whole rows of width {hd}"
    );
    assert_eq!(
        keys.len(),
        vals.len(),
        "attention: keys and values differ in length"
    );
    assert_eq!(
        out.len(),
        qs.len(),
        "attention: output size differs from the queries'"
    );
    keys.len() / hd
}

/// Attention of the query heads in `qs` (heads of width `hd`, one after another) over one part
/// of the positions: the `n = keys.len() / hd` rows of `keys` and `vals`. Unnormalized:
/// `out_h = Σ_j e^(s_hj − max_h)·v_j` with `s_hj = scale·⟨q_h, key j⟩` and
/// `stats[h] = (max_h, Σ_j e^(s_hj − max_h))`; [`merge_parts`] combines the parts into
/// `softmax(s_h)ᵀ · V`. `scores` is scratch space.
///
/// # Panics
/// If the slices are not whole heads / rows of `hd`, hold no position, differ in length, or
/// `stats` does not hold one entry per head.
#[allow(clippy::too_many_arguments)]
pub fn attend_part(
    qs: &[f32],
    hd: usize,
    keys: &[f32],
    vals: &[f32],
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    stats: &mut [Stats],
) {
    let n = check(qs, hd, keys, vals, out);
    let g = qs.len() / hd;
    assert_eq!(stats.len(), g, "attention: one Stats per query head");
    scores.clear();
    scores.resize(g * n, 0.0);
    #[cfg(target_arch = "x86_64")]
    let simd = hd.is_multiple_of(8) && crate::vmath::simd_ok();
    #[cfg(not(target_arch = "x86_64"))]
    let simd = false;
    if simd {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and FMA are present; hd is a multiple of 8 and the lengths were checked.
        unsafe {
            avx2::scores(qs, hd, keys, scale, scores)
        };
    } else {
        for (q, s) in qs.chunks_exact(hd).zip(scores.chunks_exact_mut(n)) {
            for (s, k) in s.iter_mut().zip(keys.chunks_exact(hd)) {
                *s = scale * q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>();
            }
        }
    }
    for (s, st) in scores.chunks_exact_mut(n).zip(stats.iter_mut()) {
        let max = max_of(s);
        *st = Stats {
            max,
            sum: crate::vmath::exp_shifted_inplace(s, max),
        };
    }
    if simd {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; scores holds g rows of n.
        unsafe {
            avx2::weighted_sum(scores, vals, hd, out)
        };
    } else {
        out.iter_mut().for_each(|o| *o = 0.0);
        for (p, o) in scores.chunks_exact(n).zip(out.chunks_exact_mut(hd)) {
            for (w, v) in p.iter().zip(vals.chunks_exact(hd)) {
                for (o, x) in o.iter_mut().zip(v) {
                    *o += w * x;
                }
            }
        }
    }
}

/// Combines parts from [`attend_part`] over disjoint position ranges into the normalized
/// attention output (heads × hd): `outs` holds the parts' unnormalized outputs one after
/// another (parts × heads × hd), `stats` their stats (parts × heads). Parts are added in order,
/// so the result depends only on how the positions were cut.
///
/// # Panics
/// If there is no part, or `outs` and `stats` disagree with each other or with `out`.
pub fn merge_parts(outs: &[f32], stats: &[Stats], hd: usize, out: &mut [f32]) {
    let g = out.len() / hd.max(1);
    assert!(
        g > 0 && !stats.is_empty() && stats.len().is_multiple_of(g),
        "merge_parts: stats are not whole parts"
    );
    let parts = stats.len() / g;
    assert_eq!(
        outs.len(),
        parts * out.len(),
        "merge_parts: outputs and stats disagree"
    );
    for (h, dst) in out.chunks_exact_mut(hd).enumerate() {
        let st = |p: usize| stats[p * g + h];
        let max = (0..parts).fold(f32::NEG_INFINITY, |m, p| m.max(st(p).max));
        let mut total = 0f32;
        dst.iter_mut().for_each(|v| *v = 0.0);
        for p in 0..parts {
            let w = crate::vmath::exp(st(p).max - max);
            total += w * st(p).sum;
            let o = &outs[p * g * hd + h * hd..][..hd];
            for (d, v) in dst.iter_mut().zip(o) {
                *d += w * v;
            }
        }
        let inv = 1.0 / total;
        dst.iter_mut().for_each(|v| *v *= inv);
    }
}

/// The largest value, eight lanes at a time (a scalar fold is a chain of dependent `max`es).
fn max_of(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (m, v) in lanes.iter_mut().zip(c) {
            *m = if *v > *m { *v } else { *m };
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, v| m.max(*v))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::BLOCK;
    use std::arch::x86_64::*;

    /// `scores[h·n + j] = scale · ⟨q_h, key j⟩` for the heads in qs (width hd, a multiple of 8)
    /// and the n = keys.len() / hd keys; scores holds heads × n.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores(qs: &[f32], hd: usize, keys: &[f32], scale: f32, s: &mut [f32]) {
        let n = keys.len() / hd;
        let kp = keys.as_ptr();
        let sc = _mm_set1_ps(scale);
        let mut j0 = 0;
        while j0 < n {
            let j1 = (j0 + BLOCK).min(n);
            for (h, q) in qs.chunks_exact(hd).enumerate() {
                let qp = q.as_ptr();
                let row = &mut s[h * n..(h + 1) * n];
                let mut j = j0;
                // SAFETY (all loads): key j + i < n and c + 8 ≤ hd, inside keys and q.
                while j + 4 <= j1 {
                    let mut a = [_mm256_setzero_ps(); 4];
                    for c in (0..hd).step_by(8) {
                        let qv = unsafe { _mm256_loadu_ps(qp.add(c)) };
                        for (i, a) in a.iter_mut().enumerate() {
                            let kv = unsafe { _mm256_loadu_ps(kp.add((j + i) * hd + c)) };
                            *a = _mm256_fmadd_ps(qv, kv, *a);
                        }
                    }
                    // t2's lanes: [a0 low half, a1 low, a2 low, a3 low, a0 high, …, a3 high].
                    let t0 = _mm256_hadd_ps(a[0], a[1]);
                    let t1 = _mm256_hadd_ps(a[2], a[3]);
                    let t2 = _mm256_hadd_ps(t0, t1);
                    let v = _mm_add_ps(_mm256_castps256_ps128(t2), _mm256_extractf128_ps(t2, 1));
                    // SAFETY: j + 4 ≤ n = row.len().
                    unsafe { _mm_storeu_ps(row.as_mut_ptr().add(j), _mm_mul_ps(v, sc)) };
                    j += 4;
                }
                for (jj, out) in row.iter_mut().enumerate().take(j1).skip(j) {
                    let mut a = _mm256_setzero_ps();
                    for c in (0..hd).step_by(8) {
                        let (qv, kv) = unsafe {
                            (
                                _mm256_loadu_ps(qp.add(c)),
                                _mm256_loadu_ps(kp.add(jj * hd + c)),
                            )
                        };
                        a = _mm256_fmadd_ps(qv, kv, a);
                    }
                    let v = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
                    let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
                    let v = _mm_add_ss(v, _mm_movehdup_ps(v));
                    *out = scale * _mm_cvtss_f32(v);
                }
            }
            j0 = j1;
        }
    }

    /// `out_h = Σ_j p[h·n + j] · val row j` for each head h (out holds heads × hd, hd a multiple
    /// of 8; vals holds n rows of hd; p holds heads × n). Rows are walked in memory order, a
    /// block at a time for all heads, with up to 64 columns of accumulators in registers.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weighted_sum(p: &[f32], vals: &[f32], hd: usize, out: &mut [f32]) {
        out.iter_mut().for_each(|o| *o = 0.0);
        let mut c = 0;
        while c < hd {
            // SAFETY: c + 8·W ≤ hd in each arm.
            unsafe {
                c += match (hd - c) / 8 {
                    8.. => columns::<8>(p, vals, hd, c, out),
                    4..=7 => columns::<4>(p, vals, hd, c, out),
                    2..=3 => columns::<2>(p, vals, hd, c, out),
                    _ => columns::<1>(p, vals, hd, c, out),
                };
            }
        }
    }

    /// Adds columns c..c + 8·W of every head's weighted sum into out; returns 8·W. Needs
    /// c + 8·W ≤ hd and the sizes of [`weighted_sum`].
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn columns<const W: usize>(
        p: &[f32],
        vals: &[f32],
        hd: usize,
        c: usize,
        out: &mut [f32],
    ) -> usize {
        let n = vals.len() / hd;
        let heads = out.len() / hd;
        let mut j0 = 0;
        while j0 < n {
            let j1 = (j0 + BLOCK).min(n);
            for h in 0..heads {
                let o = out[h * hd + c..].as_mut_ptr();
                let mut a = [_mm256_setzero_ps(); W];
                for (i, a) in a.iter_mut().enumerate() {
                    // SAFETY: c + 8·W ≤ hd, inside head h's output.
                    *a = unsafe { _mm256_loadu_ps(o.add(8 * i)) };
                }
                for (j, &pj) in p[h * n + j0..h * n + j1].iter().enumerate() {
                    let w = _mm256_set1_ps(pj);
                    // SAFETY: row j0 + j < n; columns c..c + 8·W are inside it.
                    let row = unsafe { vals.as_ptr().add((j0 + j) * hd + c) };
                    for (i, a) in a.iter_mut().enumerate() {
                        let v = unsafe { _mm256_loadu_ps(row.add(8 * i)) };
                        *a = _mm256_fmadd_ps(w, v, *a);
                    }
                }
                for (i, a) in a.iter().enumerate() {
                    // SAFETY: as for the loads above.
                    unsafe { _mm256_storeu_ps(o.add(8 * i), *a) };
                }
            }
            j0 = j1;
        }
        8 * W
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(mut seed: u64) -> impl FnMut() -> f32 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
    }

    fn reference(q: &[f32], keys: &[f32], vals: &[f32], scale: f32) -> Vec<f64> {
        let hd = q.len();
        let s: Vec<f64> = keys
            .chunks_exact(hd)
            .map(|k| {
                scale as f64
                    * q.iter()
                        .zip(k)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
            })
            .collect();
        let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        let mut out = vec![0f64; hd];
        for (w, v) in e.iter().zip(vals.chunks_exact(hd)) {
            for (o, x) in out.iter_mut().zip(v) {
                *o += w / sum * *x as f64;
            }
        }
        out
    }

    fn assert_close(got: &[f32], qs: &[f32], hd: usize, keys: &[f32], vals: &[f32], what: &str) {
        let scale = 1.0 / (hd as f32).sqrt();
        for (h, (o, q)) in got.chunks_exact(hd).zip(qs.chunks_exact(hd)).enumerate() {
            let want = reference(q, keys, vals, scale);
            for (i, (o, w)) in o.iter().zip(&want).enumerate() {
                assert!(
                    (*o as f64 - w).abs() < 2e-6,
                    "{what}: head {h}, lane {i}: {o} vs {w}"
                );
            }
        }
    }

    /// The whole attention as one part, merged.
    fn attend(qs: &[f32], hd: usize, keys: &[f32], vals: &[f32], scale: f32, out: &mut [f32]) {
        let mut stats = vec![Stats { max: 0.0, sum: 0.0 }; qs.len() / hd];
        let mut part = vec![0f32; out.len()];
        attend_part(
            qs,
            hd,
            keys,
            vals,
            scale,
            &mut Vec::new(),
            &mut part,
            &mut stats,
        );
        merge_parts(&part, &stats, hd, out);
    }

    #[test]
    fn matches_an_f64_softmax_for_every_width_length_and_group() {
        let mut r = rng(0x2545_f491_4f6c_dd1d);
        // Widths with and without the 8-lane path and every column tiling; lengths around the
        // 4-key and 16-key blocking; 1 to 4 query heads per key/value head.
        for hd in [8, 12, 16, 24, 40, 64, 96, 128, 200] {
            for n in [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33, 250] {
                for g in [1, 3, 4] {
                    let qs: Vec<f32> = (0..g * hd).map(|_| 3.0 * r()).collect();
                    let keys: Vec<f32> = (0..n * hd).map(|_| r()).collect();
                    let vals: Vec<f32> = (0..n * hd).map(|_| r()).collect();
                    let scale = 1.0 / (hd as f32).sqrt();
                    let mut out = vec![f32::NAN; g * hd];
                    attend(&qs, hd, &keys, &vals, scale, &mut out);
                    assert_close(&out, &qs, hd, &keys, &vals, &format!("hd {hd}, n {n}"));
                }
            }
        }
    }

    #[test]
    fn parts_over_split_positions_merge_to_the_whole() {
        let mut r = rng(99);
        let (hd, n, g) = (64, 301, 3);
        let qs: Vec<f32> = (0..g * hd).map(|_| 4.0 * r()).collect();
        let keys: Vec<f32> = (0..n * hd).map(|_| r()).collect();
        let vals: Vec<f32> = (0..n * hd).map(|_| r()).collect();
        let scale = 1.0 / (hd as f32).sqrt();
        for cuts in [
            vec![0, n],
            vec![0, 1, n],
            vec![0, 150, n],
            vec![0, 7, 100, 250, n],
        ] {
            let parts = cuts.len() - 1;
            let mut outs = vec![0f32; parts * g * hd];
            let mut stats = vec![Stats { max: 0.0, sum: 0.0 }; parts * g];
            let each = outs.chunks_exact_mut(g * hd).zip(stats.chunks_exact_mut(g));
            for (w, (o, st)) in cuts.windows(2).zip(each) {
                let (a, b) = (w[0] * hd, w[1] * hd);
                let ks = &keys[a..b];
                attend_part(&qs, hd, ks, &vals[a..b], scale, &mut Vec::new(), o, st);
            }
            let mut out = vec![f32::NAN; g * hd];
            merge_parts(&outs, &stats, hd, &mut out);
            assert_close(&out, &qs, hd, &keys, &vals, &format!("cuts {cuts:?}"));
        }
    }

    #[test]
    fn one_position_returns_its_value_row() {
        let q = [1.0f32; 16];
        let keys = [0.5f32; 16];
        let vals: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let mut out = [0f32; 16];
        attend(&q, 16, &keys, &vals, 0.25, &mut out);
        assert_eq!(&out[..], &vals[..]);
    }
}
