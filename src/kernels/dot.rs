//! Dot products of one weight row (bf16 / f16 / f32) with one to eight f32 activation rows.
//!
//! These are the inner loops of decoding: one pass over every weight per token, so they must run
//! at memory bandwidth. Taking several activation rows at once (a short prompt, or a batch of
//! sequences decoding together) reads each weight once for all of them. The AVX2 versions keep
//! up to eight independent accumulators to hide FMA latency and widen bf16 by a 16-bit shift
//! (bf16 is the top half of an f32); the NEON versions on aarch64 do the same with 4-lane
//! vectors.

use half::{bf16, f16};

use super::{cpu, Isa};

/// Most activation rows one call takes.
pub const MAX_ROWS: usize = 8;

/// Most activation rows [`WeightElem::dot_pair_rows`] takes (2 × 4 accumulators).
pub const PAIR_ROWS: usize = 4;

/// Consecutive weight rows [`WeightElem::dot_row_block`] takes against one activation row.
pub const BLOCK_ROWS: usize = 8;

/// A weight element type the kernels read directly.
pub trait WeightElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;

    /// `out[j] = w · xs[j]` for every j (`xs.len() <= MAX_ROWS`), with the CPU's best kernel.
    fn dot_rows(w: &[Self], xs: &[&[f32]], out: &mut [f32]);

    /// `outs[i][j] = ws[i] · xs[j]` for two weight rows at once (`xs.len() <= PAIR_ROWS`): each
    /// activation load feeds two FMAs, which is what several activation rows are short of.
    fn dot_pair_rows(ws: [&[Self]; 2], xs: &[&[f32]], outs: [&mut [f32]; 2]) {
        let [o0, o1] = outs;
        Self::dot_rows(ws[0], xs, o0);
        Self::dot_rows(ws[1], xs, o1);
    }

    /// `out[i] = w[i·c..(i+1)·c] · x` for `out.len()` (at most [`BLOCK_ROWS`]) consecutive
    /// weight rows of width `c = x.len()`: each activation load feeds every row. Decode against
    /// wide rows needs this: an f32 activation row of 8192 columns (32 KB) does not stay in L1
    /// beside the weight stream, and re-reading it from L2 for every weight row held bf16
    /// `down_proj` to 19 GB/s where the 3072-column products stream at 31.
    fn dot_row_block(w: &[Self], x: &[f32], out: &mut [f32]);

    /// The scalar reference of [`WeightElem::dot_rows`].
    fn scalar_dot_rows(w: &[Self], xs: &[&[f32]], out: &mut [f32]) {
        for (o, x) in out.iter_mut().zip(xs) {
            *o = w.iter().zip(x.iter()).map(|(a, b)| a.to_f32() * b).sum();
        }
    }
}

fn check(len: usize, xs: &[&[f32]], out: &[f32]) {
    assert!(xs.len() <= MAX_ROWS && out.len() == xs.len());
    assert!(
        xs.iter().all(|x| x.len() == len),
        "activation width differs from the weight row"
    );
}

macro_rules! weight_elem {
    ($t:ty, $to:expr, $avx:path, $neon:path, $pair:path, $block:path) => {
        impl WeightElem for $t {
            #[inline(always)]
            fn to_f32(self) -> f32 {
                $to(self)
            }

            fn dot_rows(w: &[Self], xs: &[&[f32]], out: &mut [f32]) {
                check(w.len(), xs, out);
                match cpu() {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: cpu() returns Avx2 only after detecting avx2, fma and f16c.
                    Isa::Avx2 => unsafe { $avx(w, xs, out) },
                    #[cfg(target_arch = "aarch64")]
                    // SAFETY: cpu() returns Neon only after detecting it.
                    Isa::Neon => unsafe { $neon(w, xs, out) },
                    _ => Self::scalar_dot_rows(w, xs, out),
                }
            }

            fn dot_pair_rows(ws: [&[Self]; 2], xs: &[&[f32]], outs: [&mut [f32]; 2]) {
                assert!(xs.len() <= PAIR_ROWS && ws[0].len() == ws[1].len());
                check(ws[0].len(), xs, outs[0]);
                check(ws[1].len(), xs, outs[1]);
                match cpu() {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as in dot_rows.
                    Isa::Avx2 => unsafe { $pair(ws, xs, outs) },
                    _ => {
                        let [o0, o1] = outs;
                        Self::dot_rows(ws[0], xs, o0);
                        Self::dot_rows(ws[1], xs, o1);
                    }
                }
            }

            fn dot_row_block(w: &[Self], x: &[f32], out: &mut [f32]) {
                assert!(out.len() <= BLOCK_ROWS && w.len() == out.len() * x.len());
                match cpu() {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as in dot_rows.
                    Isa::Avx2 if out.len() == BLOCK_ROWS => unsafe { $block(w, x, out) },
                    _ => {
                        let c = x.len();
                        for (i, o) in out.iter_mut().enumerate() {
                            Self::dot_rows(&w[i * c..(i + 1) * c], &[x], std::slice::from_mut(o));
                        }
                    }
                }
            }
        }
    };
}

weight_elem!(
    bf16,
    bf16::to_f32,
    avx2::dot_rows_bf16,
    neon::dot_rows_bf16,
    avx2::dot_pair_bf16,
    avx2::dot_block_bf16
);
weight_elem!(
    f16,
    f16::to_f32,
    avx2::dot_rows_f16,
    neon::dot_rows_f16,
    avx2::dot_pair_f16,
    avx2::dot_block_f16
);
weight_elem!(
    f32,
    |x: f32| x,
    avx2::dot_rows_f32,
    neon::dot_rows_f32,
    avx2::dot_pair_f32,
    avx2::dot_block_f32
);

/// `w · x` for one activation row.
#[inline]
pub fn dot<T: WeightElem>(w: &[T], x: &[f32]) -> f32 {
    let mut out = [0f32];
    T::dot_rows(w, &[x], &mut out);
    out[0]
}

pub fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    dot(w, x)
}

/// Picks the kernel instantiation for the number of activation rows: N rows, U steps in flight,
/// keeping N·U accumulators within the register file (shared by the AVX2 and NEON modules).
#[allow(unused_macros)]
macro_rules! rows_dispatch {
    ($dot:ident, $w:expr, $xs:expr, $out:expr, $load:expr, $one:expr) => {
        match $xs.len() {
            0 => {}
            1 => $dot::<T, 1, 4>($w, $xs, $out, $load, $one),
            2 => $dot::<T, 2, 4>($w, $xs, $out, $load, $one),
            3 => $dot::<T, 3, 2>($w, $xs, $out, $load, $one),
            4 => $dot::<T, 4, 2>($w, $xs, $out, $load, $one),
            5 => $dot::<T, 5, 1>($w, $xs, $out, $load, $one),
            6 => $dot::<T, 6, 1>($w, $xs, $out, $load, $one),
            7 => $dot::<T, 7, 1>($w, $xs, $out, $load, $one),
            _ => $dot::<T, 8, 1>($w, $xs, $out, $load, $one),
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use half::{bf16, f16};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_hadd_ps(s, s);
        let s = _mm_hadd_ps(s, s);
        _mm_cvtss_f32(s)
    }

    /// N activation rows, U steps of 8 weights in flight: N·U accumulators (at most 8, leaving
    /// registers for the weight and activation loads). Inlined into the `target_feature`
    /// functions below, so every instantiation is compiled with AVX2/FMA enabled.
    #[inline(always)]
    unsafe fn dot_n<T, const N: usize, const U: usize>(
        w: &[T],
        xs: &[&[f32]],
        out: &mut [f32],
        load: impl Fn(*const T) -> __m256,
        one: impl Fn(&T) -> f32,
    ) {
        let n = w.len();
        let wp = w.as_ptr();
        let xp: [*const f32; N] = std::array::from_fn(|j| xs[j].as_ptr());
        let mut acc = [[_mm256_setzero_ps(); N]; U];
        let mut i = 0;
        while i + 8 * U <= n {
            for (u, a) in acc.iter_mut().enumerate() {
                let o = i + 8 * u;
                let wv = load(wp.add(o));
                for j in 0..N {
                    a[j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp[j].add(o)), a[j]);
                }
            }
            i += 8 * U;
        }
        while i + 8 <= n {
            let wv = load(wp.add(i));
            for j in 0..N {
                acc[0][j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp[j].add(i)), acc[0][j]);
            }
            i += 8;
        }
        for j in 0..N {
            let mut s = acc[0][j];
            for a in acc.iter().skip(1) {
                s = _mm256_add_ps(s, a[j]);
            }
            let mut sum = hsum(s);
            for k in i..n {
                sum += one(&w[k]) * xs[j][k];
            }
            out[j] = sum;
        }
    }

    /// Two weight rows against N activation rows, U steps in flight: 2·N·U accumulators (at
    /// most 8). Several activation rows (a decode batch) make the one-row kernel load-bound on
    /// the activations, which come from L2 once they outgrow L1; here each activation load feeds
    /// two FMAs.
    #[inline(always)]
    unsafe fn dot_pair_n<T, const N: usize, const U: usize>(
        ws: [&[T]; 2],
        xs: &[&[f32]],
        outs: [&mut [f32]; 2],
        load: impl Fn(*const T) -> __m256,
        one: impl Fn(&T) -> f32,
    ) {
        let n = ws[0].len();
        let (w0, w1) = (ws[0].as_ptr(), ws[1].as_ptr());
        let xp: [*const f32; N] = std::array::from_fn(|j| xs[j].as_ptr());
        let mut acc = [[[_mm256_setzero_ps(); N]; 2]; U];
        let mut i = 0;
        while i + 8 * U <= n {
            for (u, a) in acc.iter_mut().enumerate() {
                let o = i + 8 * u;
                let (a0, a1) = (load(w0.add(o)), load(w1.add(o)));
                for j in 0..N {
                    let x = _mm256_loadu_ps(xp[j].add(o));
                    a[0][j] = _mm256_fmadd_ps(a0, x, a[0][j]);
                    a[1][j] = _mm256_fmadd_ps(a1, x, a[1][j]);
                }
            }
            i += 8 * U;
        }
        while i + 8 <= n {
            let (a0, a1) = (load(w0.add(i)), load(w1.add(i)));
            for j in 0..N {
                let x = _mm256_loadu_ps(xp[j].add(i));
                acc[0][0][j] = _mm256_fmadd_ps(a0, x, acc[0][0][j]);
                acc[0][1][j] = _mm256_fmadd_ps(a1, x, acc[0][1][j]);
            }
            i += 8;
        }
        for (r, out) in outs.into_iter().enumerate() {
            for j in 0..N {
                let mut s = acc[0][r][j];
                for a in acc.iter().skip(1) {
                    s = _mm256_add_ps(s, a[r][j]);
                }
                let mut sum = hsum(s);
                for k in i..n {
                    sum += one(&ws[r][k]) * xs[j][k];
                }
                out[j] = sum;
            }
        }
    }

    /// R consecutive weight rows against one activation row: R accumulators, one activation
    /// load per step for all of them.
    #[inline(always)]
    unsafe fn dot_block_n<T, const R: usize>(
        w: &[T],
        x: &[f32],
        out: &mut [f32],
        load: impl Fn(*const T) -> __m256,
        one: impl Fn(&T) -> f32,
    ) {
        let c = x.len();
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); R];
        let mut i = 0;
        while i + 8 <= c {
            let xv = _mm256_loadu_ps(xp.add(i));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(load(wp.add(r * c + i)), xv, *a);
            }
            i += 8;
        }
        for (r, o) in out.iter_mut().enumerate() {
            let mut sum = hsum(acc[r]);
            for k in i..c {
                sum += one(&w[r * c + k]) * x[k];
            }
            *o = sum;
        }
    }

    #[inline(always)]
    unsafe fn dispatch<T>(
        w: &[T],
        xs: &[&[f32]],
        out: &mut [f32],
        load: impl Fn(*const T) -> __m256 + Copy,
        one: impl Fn(&T) -> f32 + Copy,
    ) {
        rows_dispatch!(dot_n, w, xs, out, load, one)
    }

    #[inline(always)]
    unsafe fn dispatch_pair<T>(
        ws: [&[T]; 2],
        xs: &[&[f32]],
        outs: [&mut [f32]; 2],
        load: impl Fn(*const T) -> __m256 + Copy,
        one: impl Fn(&T) -> f32 + Copy,
    ) {
        match xs.len() {
            0 => {}
            1 => dot_pair_n::<T, 1, 4>(ws, xs, outs, load, one),
            2 => dot_pair_n::<T, 2, 2>(ws, xs, outs, load, one),
            3 => dot_pair_n::<T, 3, 1>(ws, xs, outs, load, one),
            _ => dot_pair_n::<T, 4, 1>(ws, xs, outs, load, one),
        }
    }

    #[inline(always)]
    unsafe fn load_bf16(p: *const bf16) -> __m256 {
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_rows_bf16(w: &[bf16], xs: &[&[f32]], out: &mut [f32]) {
        dispatch(w, xs, out, |p| load_bf16(p), |v: &bf16| v.to_f32())
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_pair_bf16(ws: [&[bf16]; 2], xs: &[&[f32]], outs: [&mut [f32]; 2]) {
        dispatch_pair(ws, xs, outs, |p| load_bf16(p), |v: &bf16| v.to_f32())
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_block_bf16(w: &[bf16], x: &[f32], out: &mut [f32]) {
        dot_block_n::<_, { super::BLOCK_ROWS }>(w, x, out, |p| load_bf16(p), |v| v.to_f32())
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_block_f16(w: &[f16], x: &[f32], out: &mut [f32]) {
        let load = |p: *const f16| _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
        dot_block_n::<_, { super::BLOCK_ROWS }>(w, x, out, load, |v| v.to_f32())
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_block_f32(w: &[f32], x: &[f32], out: &mut [f32]) {
        dot_block_n::<_, { super::BLOCK_ROWS }>(w, x, out, |p| _mm256_loadu_ps(p), |v| *v)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows_f16(w: &[f16], xs: &[&[f32]], out: &mut [f32]) {
        let load = |p: *const f16| _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
        dispatch(w, xs, out, load, |v: &f16| v.to_f32())
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_pair_f16(ws: [&[f16]; 2], xs: &[&[f32]], outs: [&mut [f32]; 2]) {
        let load = |p: *const f16| _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
        dispatch_pair(ws, xs, outs, load, |v: &f16| v.to_f32())
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_rows_f32(w: &[f32], xs: &[&[f32]], out: &mut [f32]) {
        dispatch(w, xs, out, |p: *const f32| _mm256_loadu_ps(p), |v: &f32| *v)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_pair_f32(ws: [&[f32]; 2], xs: &[&[f32]], outs: [&mut [f32]; 2]) {
        dispatch_pair(
            ws,
            xs,
            outs,
            |p: *const f32| _mm256_loadu_ps(p),
            |v: &f32| *v,
        )
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use half::slice::HalfFloatSliceExt;
    use half::{bf16, f16};
    use std::arch::aarch64::*;

    /// As the AVX2 version, with 8 weights as two 4-lane vectors: N rows × U steps × 2
    /// accumulators (at most 16 of the 32 vector registers).
    #[inline(always)]
    unsafe fn dot_n<T, const N: usize, const U: usize>(
        w: &[T],
        xs: &[&[f32]],
        out: &mut [f32],
        load: impl Fn(*const T) -> (float32x4_t, float32x4_t),
        one: impl Fn(&T) -> f32,
    ) {
        let n = w.len();
        let wp = w.as_ptr();
        let xp: [*const f32; N] = std::array::from_fn(|j| xs[j].as_ptr());
        let zero = vdupq_n_f32(0.0);
        let mut acc = [[(zero, zero); N]; U];
        let mut i = 0;
        while i + 8 * U <= n {
            for (u, a) in acc.iter_mut().enumerate() {
                let o = i + 8 * u;
                let (w0, w1) = load(wp.add(o));
                for j in 0..N {
                    a[j].0 = vfmaq_f32(a[j].0, w0, vld1q_f32(xp[j].add(o)));
                    a[j].1 = vfmaq_f32(a[j].1, w1, vld1q_f32(xp[j].add(o + 4)));
                }
            }
            i += 8 * U;
        }
        while i + 8 <= n {
            let (w0, w1) = load(wp.add(i));
            for j in 0..N {
                acc[0][j].0 = vfmaq_f32(acc[0][j].0, w0, vld1q_f32(xp[j].add(i)));
                acc[0][j].1 = vfmaq_f32(acc[0][j].1, w1, vld1q_f32(xp[j].add(i + 4)));
            }
            i += 8;
        }
        for j in 0..N {
            let mut s = vaddq_f32(acc[0][j].0, acc[0][j].1);
            for a in acc.iter().skip(1) {
                s = vaddq_f32(s, vaddq_f32(a[j].0, a[j].1));
            }
            let mut sum = vaddvq_f32(s);
            for k in i..n {
                sum += one(&w[k]) * xs[j][k];
            }
            out[j] = sum;
        }
    }

    #[inline(always)]
    unsafe fn dispatch<T>(
        w: &[T],
        xs: &[&[f32]],
        out: &mut [f32],
        load: impl Fn(*const T) -> (float32x4_t, float32x4_t) + Copy,
        one: impl Fn(&T) -> f32 + Copy,
    ) {
        rows_dispatch!(dot_n, w, xs, out, load, one)
    }

    #[target_feature(enable = "neon")]
    pub unsafe fn dot_rows_bf16(w: &[bf16], xs: &[&[f32]], out: &mut [f32]) {
        // bf16 is the top half of an f32: widen each u16 lane to u32 shifted left by 16.
        let load = |p: *const bf16| {
            let h = vld1q_u16(p as *const u16);
            (
                vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(h))),
                vreinterpretq_f32_u32(vshll_high_n_u16::<16>(h)),
            )
        };
        dispatch(w, xs, out, load, |v: &bf16| v.to_f32())
    }

    #[target_feature(enable = "neon")]
    pub unsafe fn dot_rows_f16(w: &[f16], xs: &[&[f32]], out: &mut [f32]) {
        // Rust's f16 vector intrinsics are not stable yet: `half` widens 8 at a time (with the
        // fp16 conversion instructions where the CPU has them) and NEON does the arithmetic.
        let load = |p: *const f16| {
            let mut buf = [0f32; 8];
            std::slice::from_raw_parts(p, 8).convert_to_f32_slice(&mut buf);
            (vld1q_f32(buf.as_ptr()), vld1q_f32(buf.as_ptr().add(4)))
        };
        dispatch(w, xs, out, load, |v: &f16| v.to_f32())
    }

    #[target_feature(enable = "neon")]
    pub unsafe fn dot_rows_f32(w: &[f32], xs: &[&[f32]], out: &mut [f32]) {
        let load = |p: *const f32| (vld1q_f32(p), vld1q_f32(p.add(4)));
        dispatch(w, xs, out, load, |v: &f32| *v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_data as data;

    fn compare<T: WeightElem>(w: &[T], xs: &[&[f32]]) {
        let mut got = vec![0f32; xs.len()];
        let mut want = vec![0f32; xs.len()];
        T::dot_rows(w, xs, &mut got);
        T::scalar_dot_rows(w, xs, &mut want);
        let tol = 1e-5 * (w.len() as f32).max(1.0);
        for (g, r) in got.iter().zip(&want) {
            assert!(
                (g - r).abs() <= tol,
                "n={} rows={}: {g} vs {r}",
                w.len(),
                xs.len()
            );
        }
    }

    #[test]
    fn simd_matches_scalar_reference() {
        for n in [0, 1, 7, 8, 15, 16, 31, 32, 33, 100, 3072, 8193] {
            let w = data(n, 1);
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let rows: Vec<Vec<f32>> = (0..MAX_ROWS as u64).map(|s| data(n, 10 + s)).collect();
            for k in 1..=MAX_ROWS {
                let xs: Vec<&[f32]> = rows[..k].iter().map(Vec::as_slice).collect();
                compare(&wb, &xs);
                compare(&wh, &xs);
                compare(&w, &xs);
            }
            for k in 1..=PAIR_ROWS {
                let xs: Vec<&[f32]> = rows[..k].iter().map(Vec::as_slice).collect();
                let w2 = data(n, 2);
                compare_pair(&w, &w2, &xs);
                let b2: Vec<bf16> = w2.iter().map(|&v| bf16::from_f32(v)).collect();
                compare_pair(&wb, &b2, &xs);
                let h2: Vec<f16> = w2.iter().map(|&v| f16::from_f32(v)).collect();
                compare_pair(&wh, &h2, &xs);
            }
        }
    }

    fn compare_block<T: WeightElem>(w: &[T], x: &[f32], rows: usize) {
        let c = x.len();
        let mut got = vec![0f32; rows];
        T::dot_row_block(&w[..rows * c], x, &mut got);
        let tol = 1e-5 * (c as f32).max(1.0);
        for (i, g) in got.iter().enumerate() {
            let mut want = [0f32];
            T::scalar_dot_rows(&w[i * c..(i + 1) * c], &[x], &mut want);
            assert!(
                (g - want[0]).abs() <= tol,
                "block c={c} row {i}/{rows}: {g} vs {}",
                want[0]
            );
        }
    }

    #[test]
    fn row_blocks_match_the_scalar_reference() {
        for c in [0, 1, 7, 8, 9, 33, 3072, 8193] {
            let w = data(BLOCK_ROWS * c, 3);
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let x = data(c, 4);
            for rows in 0..=BLOCK_ROWS {
                compare_block(&w, &x, rows);
                compare_block(&wb, &x, rows);
                compare_block(&wh, &x, rows);
            }
        }
    }

    fn compare_pair<T: WeightElem>(w0: &[T], w1: &[T], xs: &[&[f32]]) {
        let (mut g0, mut g1) = (vec![0f32; xs.len()], vec![0f32; xs.len()]);
        T::dot_pair_rows([w0, w1], xs, [&mut g0, &mut g1]);
        let tol = 1e-5 * (w0.len() as f32).max(1.0);
        for (w, got) in [(w0, g0), (w1, g1)] {
            let mut want = vec![0f32; xs.len()];
            T::scalar_dot_rows(w, xs, &mut want);
            for (g, r) in got.iter().zip(&want) {
                assert!(
                    (g - r).abs() <= tol,
                    "pair n={} rows={}: {g} vs {r}",
                    w.len(),
                    xs.len()
                );
            }
        }
    }
}
