//! kiln's f32 matrix product: `C = (C if accumulating) + alpha · A · B` for strided A, B and C,
//! blocked the way BLIS and OpenBLAS do it. B is packed into 16-column panels (kc × 16), A into
//! 6-row panels (kc × 6), and a 6 × 16 register tile (12 AVX2 accumulators) runs over kc with
//! one broadcast and two FMAs per A value. The `gemm` crate reaches ~43% of this machine's FMA
//! peak on 1024³ (77 of 178 GFLOP/s on 2 cores); this layout keeps both FMA pipes busy.
//!
//! Results do not depend on the thread count: threads split C into column (or row) ranges, and
//! every element is summed over k in the same order (kc-blocks in turn, k in order within one)
//! whichever range it lands in. CPUs without AVX2/FMA run a scalar kernel with the same blocking.

use std::cell::RefCell;

const MR: usize = 6;
const NR: usize = 16;
/// Most depth of a packed panel pair: A's 6×320 and B's 16×320 panels (27.5 KiB) stay in L1.
const KC: usize = 320;
/// Rows of A packed per block (96 × 320 × 4 = 120 KiB, within L2).
const MC: usize = 96;
/// Columns of B packed per block (320 × 2048 × 4 = 2.5 MiB, within L3).
const NC: usize = 2048;
/// Parts a parallel product is split into per thread (see `gemm`).
const PARTS_PER_THREAD: usize = 3;
/// Fewest register tiles along the split side per part.
const MIN_PART_TILES: usize = 4;
/// Below this many multiply-adds one thread does the product (splitting costs more).
const PAR_MIN: usize = 1 << 18;

/// The depth block `gemm` sums an inner dimension of `k` in: equal blocks of at most 320 (576 →
/// 2 × 288). A product split along its inner dimension at these bounds, the parts accumulated in
/// order, has the same result bits as the whole product.
pub fn k_block(k: usize) -> usize {
    k.div_ceil(k.div_ceil(KC).max(1)).max(1)
}

/// A read-only strided matrix: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// Panics if the matrix does not fit in `data` (a caller bug, not user input).
    pub fn new(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        assert!(
            rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < data.len(),
            "sgemm: {rows}×{cols} matrix (strides {rs}, {cs}) outside its {} values",
            data.len()
        );
        Self {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// Row-major `rows × cols`.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }

    /// The transpose of a row-major `cols × rows` matrix (a weight W stored (out, in) read as Wᵀ).
    pub fn transposed(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, 1, rows)
    }

    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// A writable strided matrix (strides as in [`Mat`]; distinct elements never share a slot).
pub struct MatMut<'a> {
    p: *mut f32,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
    _borrow: std::marker::PhantomData<&'a mut f32>,
}

fn check_out(len: Option<usize>, rows: usize, cols: usize, rs: usize, cs: usize) {
    if let Some(len) = len {
        assert!(
            rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < len,
            "sgemm: {rows}×{cols} output (strides {rs}, {cs}) outside its {len} values"
        );
    }
    assert!(
        rows <= 1 || cols <= 1 || (rs >= cols * cs && cs >= 1) || (cs >= rows * rs && rs >= 1),
        "sgemm: output strides ({rs}, {cs}) overlap"
    );
}

impl<'a> MatMut<'a> {
    /// Panics if the matrix does not fit in `data`, or if two elements would share a slot.
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        check_out(Some(data.len()), rows, cols, rs, cs);
        Self {
            p: data.as_mut_ptr(),
            rows,
            cols,
            rs,
            cs,
            _borrow: std::marker::PhantomData,
        }
    }

    pub fn rows(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }

    /// A block of a larger buffer that other threads write elsewhere in (a head's columns).
    ///
    /// # Safety
    /// Every element `p + i·rs + j·cs` must be valid, and no one else may read or write those
    /// elements while the matrix lives.
    pub unsafe fn from_raw(p: *mut f32, rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        check_out(None, rows, cols, rs, cs);
        Self {
            p,
            rows,
            cols,
            rs,
            cs,
            _borrow: std::marker::PhantomData,
        }
    }
}

/// Raw view of C shared by the threads that each write a disjoint range of it.
#[derive(Clone, Copy)]
struct CPtr {
    p: *mut f32,
    rs: usize,
    cs: usize,
}
// SAFETY: threads write disjoint elements (see `gemm`'s partition).
unsafe impl Send for CPtr {}
unsafe impl Sync for CPtr {}

thread_local! {
    /// Packing buffers (A block, B block), kept per thread so repeated products do not fault in
    /// fresh pages.
    static PACK: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `C = (C if accumulate) + alpha · A · B`. `parallel` splits large products over the current
/// rayon pool's threads (with the same result bits as one thread).
pub fn gemm(alpha: f32, a: Mat, b: Mat, c: MatMut, accumulate: bool, parallel: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(
        b.rows == k && c.rows == m && c.cols == n,
        "sgemm: shapes {m}×{k} · {}×{n} → {}×{}",
        b.rows,
        c.rows,
        c.cols
    );
    if m == 0 || n == 0 {
        return;
    }
    let cp = CPtr {
        p: c.p,
        rs: c.rs,
        cs: c.cs,
    };
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: (i, j) is inside C (checked by MatMut::new).
                    unsafe { *cp.p.add(i * cp.rs + j * cp.cs) = 0.0 };
                }
            }
        }
        return;
    }
    let threads = if parallel && m * n * k >= PAR_MIN {
        rayon::current_num_threads().max(1)
    } else {
        1
    };
    if threads == 1 {
        // SAFETY: C's whole range, owned by this call through `c`.
        unsafe { serial(alpha, &a, &b, cp, (0, m), (0, n), accumulate) };
        return;
    }
    // Split the longer side into one range per thread, aligned to the register tile.
    let (split_n, len, unit) = if n >= m {
        (true, n, NR)
    } else {
        (false, m, MR)
    };
    let tiles = len.div_ceil(unit);
    // A few parts per thread, so a thread that was descheduled (a busy machine) or got a
    // slower part does not hold up the rest; each part repacks the shared operand, which is
    // small next to its share of the product.
    let parts = (threads * PARTS_PER_THREAD)
        .min(tiles.div_ceil(MIN_PART_TILES))
        .max(threads.min(tiles));
    let bounds: Vec<(usize, usize)> = (0..parts)
        .map(|p| {
            let lo = (tiles * p / parts * unit).min(len);
            let hi = (tiles * (p + 1) / parts * unit).min(len);
            (lo, hi)
        })
        .collect();
    use rayon::prelude::*;
    bounds.par_iter().for_each(|&(lo, hi)| {
        let (rows, cols) = if split_n {
            ((0, m), (lo, hi))
        } else {
            ((lo, hi), (0, n))
        };
        // SAFETY: the ranges are disjoint, and C is borrowed mutably for the whole call.
        unsafe { serial(alpha, &a, &b, cp, rows, cols, accumulate) };
    });
}

/// One thread's blocked product over C rows `r0..r1`, columns `c0..c1`.
///
/// # Safety
/// C's elements in the range must be valid and written by no one else meanwhile.
unsafe fn serial(
    alpha: f32,
    a: &Mat,
    b: &Mat,
    c: CPtr,
    (r0, r1): (usize, usize),
    (c0, c1): (usize, usize),
    accumulate: bool,
) {
    let k = a.cols;
    PACK.with(|cell| {
        let mut fresh = (Vec::new(), Vec::new());
        let mut guard = cell.try_borrow_mut();
        let (abuf, bbuf) = match guard.as_deref_mut() {
            Ok(bufs) => bufs,
            Err(_) => &mut fresh,
        };
        let need_a = MC * KC.min(k);
        let need_b = NC.min((c1 - c0).div_ceil(NR) * NR) * KC.min(k);
        if abuf.len() < need_a {
            abuf.resize(need_a, 0.0);
        }
        if bbuf.len() < need_b {
            bbuf.resize(need_b, 0.0);
        }
        let avx = simd_ok();
        for jc in (c0..c1).step_by(NC) {
            let nc = NC.min(c1 - jc);
            // Equal k-blocks of at most KC (576 → 2 × 288, not 256 + 256 + 64): a short last
            // block would pay a full pass over C for little work.
            let kb = k_block(k);
            for pc in (0..k).step_by(kb) {
                let kc = kb.min(k - pc);
                pack_b(b, pc, kc, jc, nc, bbuf);
                let load = accumulate || pc > 0;
                for ic in (r0..r1).step_by(MC) {
                    let mc = MC.min(r1 - ic);
                    pack_a(a, ic, mc, pc, kc, abuf);
                    for jr in (0..nc).step_by(NR) {
                        let nr = NR.min(nc - jr);
                        let bp = &bbuf[jr * kc..(jr + NR) * kc];
                        for ir in (0..mc).step_by(MR) {
                            let mr = MR.min(mc - ir);
                            let ap = &abuf[ir * kc..(ir + MR) * kc];
                            // SAFETY: tile (ic+ir.., jc+jr..) of mr × nr lies in this thread's
                            // range of C.
                            let dst = unsafe { c.p.add((ic + ir) * c.rs + (jc + jr) * c.cs) };
                            let tile = Tile {
                                dst,
                                rs: c.rs,
                                cs: c.cs,
                                mr,
                                nr,
                                load,
                                alpha,
                            };
                            #[cfg(target_arch = "x86_64")]
                            if avx {
                                // SAFETY: AVX2 and FMA are present (simd_ok); the panels hold
                                // kc × 6 and kc × 16 values.
                                unsafe { kernel_avx2(kc, ap, bp, &tile) };
                                continue;
                            }
                            let _ = avx;
                            // SAFETY: as above.
                            unsafe { kernel_scalar(kc, ap, bp, &tile) };
                        }
                    }
                }
            }
        }
    });
}

fn simd_ok() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A's rows `ic..ic+mc`, columns `pc..pc+kc` as 6-row panels, value (p, i) of panel r at
/// `r·kc·6 + p·6 + i`; rows past the matrix are zero. Writes run in order; reads take 6 rows
/// (or, for a transposed A, 6 adjacent values) at a time.
fn pack_a(a: &Mat, ic: usize, mc: usize, pc: usize, kc: usize, out: &mut [f32]) {
    for (r, ir) in (0..mc).step_by(MR).enumerate() {
        let panel = &mut out[r * kc * MR..(r + 1) * kc * MR];
        let live = MR.min(mc - ir);
        let base = (ic + ir) * a.rs + pc * a.cs;
        if live == MR && a.cs == 1 {
            let rows: [&[f32]; MR] =
                std::array::from_fn(|i| &a.data[base + i * a.rs..base + i * a.rs + kc]);
            for (p, dst) in panel.chunks_exact_mut(MR).enumerate() {
                for i in 0..MR {
                    dst[i] = rows[i][p];
                }
            }
        } else if live == MR && a.rs == 1 {
            for (p, dst) in panel.chunks_exact_mut(MR).enumerate() {
                let at = base + p * a.cs;
                dst.copy_from_slice(&a.data[at..at + MR]);
            }
        } else {
            for (p, dst) in panel.chunks_exact_mut(MR).enumerate() {
                for (i, d) in dst.iter_mut().enumerate() {
                    *d = if i < live {
                        a.data[base + i * a.rs + p * a.cs]
                    } else {
                        0.0
                    };
                }
            }
        }
    }
}

/// B's rows `pc..pc+kc`, columns `jc..jc+nc` as 16-column panels, value (p, j) of panel q at
/// `q·kc·16 + p·16 + j`; columns past the matrix are zero. Writes run in order.
fn pack_b(b: &Mat, pc: usize, kc: usize, jc: usize, nc: usize, out: &mut [f32]) {
    for (q, jr) in (0..nc).step_by(NR).enumerate() {
        let panel = &mut out[q * kc * NR..(q + 1) * kc * NR];
        let live = NR.min(nc - jr);
        let base = pc * b.rs + (jc + jr) * b.cs;
        if live == NR && b.cs == 1 {
            for (p, dst) in panel.chunks_exact_mut(NR).enumerate() {
                let src: &[f32; NR] = b.data[base + p * b.rs..base + p * b.rs + NR]
                    .try_into()
                    .unwrap_or(&[0.0; NR]);
                dst.copy_from_slice(src);
            }
        } else if live == NR && b.rs == 1 && simd_ok() {
            // SAFETY: AVX2 is present; the 16 columns hold kc values each from `base` on.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                pack_b_columns_avx2(&b.data[base..], b.cs, kc, panel)
            };
        } else if live == NR && b.rs == 1 {
            let cols: [&[f32]; NR] =
                std::array::from_fn(|j| &b.data[base + j * b.cs..base + j * b.cs + kc]);
            for (p, dst) in panel.chunks_exact_mut(NR).enumerate() {
                for j in 0..NR {
                    dst[j] = cols[j][p];
                }
            }
        } else {
            for (p, dst) in panel.chunks_exact_mut(NR).enumerate() {
                for (j, d) in dst.iter_mut().enumerate() {
                    *d = if j < live {
                        b.data[base + p * b.rs + j * b.cs]
                    } else {
                        0.0
                    };
                }
            }
        }
    }
}

/// [`pack_b`] for 16 full columns stored contiguously (B = Wᵀ of a row-major W): 8 × 8 blocks
/// transposed in registers instead of one gathered value at a time.
///
/// # Safety
/// AVX2 must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pack_b_columns_avx2(src: &[f32], cs: usize, kc: usize, panel: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(panel.len() >= kc * NR && src.len() >= (NR - 1) * cs + kc);
    let full = kc / 8 * 8;
    for half in 0..2 {
        for p in (0..full).step_by(8) {
            // SAFETY: columns half·8..half·8+8 have values p..p+8 (asserted extents); the
            // panel has rows p..p+8 of 16.
            unsafe {
                let col = |j: usize| _mm256_loadu_ps(src.as_ptr().add((half * 8 + j) * cs + p));
                let (r0, r1, r2, r3) = (col(0), col(1), col(2), col(3));
                let (r4, r5, r6, r7) = (col(4), col(5), col(6), col(7));
                let t0 = _mm256_unpacklo_ps(r0, r1);
                let t1 = _mm256_unpackhi_ps(r0, r1);
                let t2 = _mm256_unpacklo_ps(r2, r3);
                let t3 = _mm256_unpackhi_ps(r2, r3);
                let t4 = _mm256_unpacklo_ps(r4, r5);
                let t5 = _mm256_unpackhi_ps(r4, r5);
                let t6 = _mm256_unpacklo_ps(r6, r7);
                let t7 = _mm256_unpackhi_ps(r6, r7);
                let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                let rows = [
                    _mm256_permute2f128_ps::<0x20>(u0, u4),
                    _mm256_permute2f128_ps::<0x20>(u1, u5),
                    _mm256_permute2f128_ps::<0x20>(u2, u6),
                    _mm256_permute2f128_ps::<0x20>(u3, u7),
                    _mm256_permute2f128_ps::<0x31>(u0, u4),
                    _mm256_permute2f128_ps::<0x31>(u1, u5),
                    _mm256_permute2f128_ps::<0x31>(u2, u6),
                    _mm256_permute2f128_ps::<0x31>(u3, u7),
                ];
                for (i, r) in rows.iter().enumerate() {
                    _mm256_storeu_ps(panel.as_mut_ptr().add((p + i) * NR + half * 8), *r);
                }
            }
        }
    }
    for p in full..kc {
        for j in 0..NR {
            panel[p * NR + j] = src[j * cs + p];
        }
    }
}

/// Where a 6 × 16 register tile goes: its top-left element, C's strides, the live part
/// (`mr` × `nr` at the edges), whether to add C's current values, and the scale.
struct Tile {
    dst: *mut f32,
    rs: usize,
    cs: usize,
    mr: usize,
    nr: usize,
    load: bool,
    alpha: f32,
}

impl Tile {
    /// Writes the live part of an accumulated 6 × 16 tile (row-major in `acc`).
    ///
    /// # Safety
    /// The tile's live elements must be valid and this thread's to write.
    unsafe fn store(&self, acc: &[f32; MR * NR]) {
        for i in 0..self.mr {
            for j in 0..self.nr {
                // SAFETY: (i, j) is in the live part (caller's contract).
                let d = unsafe { self.dst.add(i * self.rs + j * self.cs) };
                let v = self.alpha * acc[i * NR + j];
                // SAFETY: as above.
                unsafe { *d = if self.load { *d + v } else { v } };
            }
        }
    }
}

/// # Safety
/// `ap` holds kc × 6 and `bp` kc × 16 values; see [`Tile::store`].
unsafe fn kernel_scalar(kc: usize, ap: &[f32], bp: &[f32], tile: &Tile) {
    let mut acc = [0f32; MR * NR];
    for p in 0..kc {
        let av = &ap[p * MR..(p + 1) * MR];
        let bv = &bp[p * NR..(p + 1) * NR];
        for i in 0..MR {
            for j in 0..NR {
                acc[i * NR + j] = av[i].mul_add(bv[j], acc[i * NR + j]);
            }
        }
    }
    // SAFETY: forwarded.
    unsafe { tile.store(&acc) };
}

/// The 6 × 16 AVX2 register tile.
///
/// # Safety
/// AVX2 and FMA must be available; `ap` holds kc × 6 and `bp` kc × 16 values; see
/// [`Tile::store`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2(kc: usize, ap: &[f32], bp: &[f32], tile: &Tile) {
    use std::arch::x86_64::*;
    assert!(ap.len() >= kc * MR && bp.len() >= kc * NR);
    let (a, b) = (ap.as_ptr(), bp.as_ptr());
    let z = _mm256_setzero_ps();
    let (mut c00, mut c01, mut c10, mut c11, mut c20, mut c21) = (z, z, z, z, z, z);
    let (mut c30, mut c31, mut c40, mut c41, mut c50, mut c51) = (z, z, z, z, z, z);
    for p in 0..kc {
        // SAFETY: p < kc, within both panels (asserted above).
        unsafe {
            let b0 = _mm256_loadu_ps(b.add(p * NR));
            let b1 = _mm256_loadu_ps(b.add(p * NR + 8));
            let ar = a.add(p * MR);
            let x = _mm256_broadcast_ss(&*ar);
            c00 = _mm256_fmadd_ps(x, b0, c00);
            c01 = _mm256_fmadd_ps(x, b1, c01);
            let x = _mm256_broadcast_ss(&*ar.add(1));
            c10 = _mm256_fmadd_ps(x, b0, c10);
            c11 = _mm256_fmadd_ps(x, b1, c11);
            let x = _mm256_broadcast_ss(&*ar.add(2));
            c20 = _mm256_fmadd_ps(x, b0, c20);
            c21 = _mm256_fmadd_ps(x, b1, c21);
            let x = _mm256_broadcast_ss(&*ar.add(3));
            c30 = _mm256_fmadd_ps(x, b0, c30);
            c31 = _mm256_fmadd_ps(x, b1, c31);
            let x = _mm256_broadcast_ss(&*ar.add(4));
            c40 = _mm256_fmadd_ps(x, b0, c40);
            c41 = _mm256_fmadd_ps(x, b1, c41);
            let x = _mm256_broadcast_ss(&*ar.add(5));
            c50 = _mm256_fmadd_ps(x, b0, c50);
            c51 = _mm256_fmadd_ps(x, b1, c51);
        }
    }
    let rows = [
        (c00, c01),
        (c10, c11),
        (c20, c21),
        (c30, c31),
        (c40, c41),
        (c50, c51),
    ];
    if tile.cs == 1 && tile.nr == NR {
        let al = _mm256_set1_ps(tile.alpha);
        for (i, (lo, hi)) in rows.iter().enumerate().take(tile.mr) {
            // SAFETY: row i of the tile has 16 contiguous live elements (cs = 1, nr = 16).
            unsafe {
                let d = tile.dst.add(i * tile.rs);
                let (mut lo, mut hi) = (_mm256_mul_ps(al, *lo), _mm256_mul_ps(al, *hi));
                if tile.load {
                    lo = _mm256_add_ps(_mm256_loadu_ps(d), lo);
                    hi = _mm256_add_ps(_mm256_loadu_ps(d.add(8)), hi);
                }
                _mm256_storeu_ps(d, lo);
                _mm256_storeu_ps(d.add(8), hi);
            }
        }
        return;
    }
    let mut acc = [0f32; MR * NR];
    for (i, (lo, hi)) in rows.iter().enumerate() {
        // SAFETY: acc has 16 values per row.
        unsafe {
            _mm256_storeu_ps(acc.as_mut_ptr().add(i * NR), *lo);
            _mm256_storeu_ps(acc.as_mut_ptr().add(i * NR + 8), *hi);
        }
    }
    // SAFETY: forwarded.
    unsafe { tile.store(&acc) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(a: &Mat, b: &Mat) -> Vec<f64> {
        let mut out = vec![0f64; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                let mut s = 0f64;
                for p in 0..a.cols {
                    s += a.data[i * a.rs + p * a.cs] as f64 * b.data[p * b.rs + j * b.cs] as f64;
                }
                out[i * b.cols + j] = s;
            }
        }
        out
    }

    /// Values in [-0.5, 0.5) from a SplitMix64 stream.
    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                (z >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn matches_reference_for_every_layout_and_edge() {
        // Shapes straddling the tile (6 × 16) and block (96, 256, 2048) edges.
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 3, 17),
            (13, 300, 33),
            (97, 257, 40),
            (5, 513, 2050),
        ] {
            let ad = data(m * k, 1);
            let bd = data(k * n, 2);
            for (at, bt) in [(false, false), (true, false), (false, true), (true, true)] {
                let a = if at {
                    Mat::transposed(&ad, m, k)
                } else {
                    Mat::rows(&ad, m, k)
                };
                let b = if bt {
                    Mat::transposed(&bd, k, n)
                } else {
                    Mat::rows(&bd, k, n)
                };
                let want = reference(&a, &b);
                for ct in [false, true] {
                    let mut c = data(m * n, 3);
                    let before = c.clone();
                    let cm = if ct {
                        MatMut::new(&mut c, m, n, 1, m)
                    } else {
                        MatMut::rows(&mut c, m, n)
                    };
                    gemm(0.5, a, b, cm, true, true);
                    for i in 0..m {
                        for j in 0..n {
                            let idx = if ct { j * m + i } else { i * n + j };
                            let expect = before[idx] as f64 + 0.5 * want[i * n + j];
                            let got = c[idx] as f64;
                            assert!(
                                (got - expect).abs() < 1e-4 * (1.0 + (k as f64).sqrt()),
                                "{m}×{k}×{n} at={at} bt={bt} ct={ct} ({i},{j}): {got} vs {expect}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn overwrite_ignores_old_values_and_threads_do_not_change_bits() {
        let (m, k, n) = (70, 600, 300);
        let ad = data(m * k, 4);
        let bd = data(k * n, 5);
        let mut one = vec![f32::NAN; m * n];
        gemm(
            1.0,
            Mat::rows(&ad, m, k),
            Mat::transposed(&bd, k, n),
            MatMut::rows(&mut one, m, n),
            false,
            false,
        );
        assert!(one.iter().all(|v| v.is_finite()));
        for threads in [2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut par = vec![f32::NAN; m * n];
            pool.install(|| {
                gemm(
                    1.0,
                    Mat::rows(&ad, m, k),
                    Mat::transposed(&bd, k, n),
                    MatMut::rows(&mut par, m, n),
                    false,
                    true,
                )
            });
            assert_eq!(
                one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                par.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn scalar_and_avx2_kernels_agree() {
        let kc = 37;
        let ap = data(kc * MR, 6);
        let bp = data(kc * NR, 7);
        let mut x = vec![0f32; MR * NR];
        let mut y = vec![0f32; MR * NR];
        let tile = |d: &mut Vec<f32>| Tile {
            dst: d.as_mut_ptr(),
            rs: NR,
            cs: 1,
            mr: MR,
            nr: NR,
            load: false,
            alpha: 1.0,
        };
        // SAFETY: panels of kc × 6 and kc × 16; the tiles are full 6 × 16 buffers.
        unsafe { kernel_scalar(kc, &ap, &bp, &tile(&mut x)) };
        #[cfg(target_arch = "x86_64")]
        if simd_ok() {
            // SAFETY: as above, with AVX2 and FMA present.
            unsafe { kernel_avx2(kc, &ap, &bp, &tile(&mut y)) };
            // The same fused multiply-adds in the same order: the same bits.
            assert_eq!(x, y);
        }
        let _ = &mut y;
    }
}
