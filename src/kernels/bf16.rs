//! bf16 weights against activations rounded to bf16 (`--bf16-acts bf16`, what llama.cpp does for
//! BF16 weights and PyTorch in bf16): on CPUs with AVX-512 BF16 one `vdpbf16ps` does 32 bf16
//! products with f32 sums, twice what an f32 FMA does, and the weights are read as stored
//! instead of widened to f32 first. Rounding costs up to 2⁻⁸ of each activation.
//!
//! The default keeps f32 activations and the f32 kernels of [`super::matmul`](mod@super::matmul). (Splitting each
//! activation into two bf16 parts would keep 16 of its 24 bits at the f32 FMA rate; measured, not
//! kept: its logits drift past the decode parity test's tolerance, see BENCHMARKS.md.) Without
//! AVX-512 BF16 the rounded activations go through those f32 kernels, with the same numbers.
//!
//! Products go as dot products of whole rows (both operands run along the columns), a tile of
//! up to [`TILE_TOKENS`] activation rows against [`TILE_ROWS`] weight rows at a time: 24 f32
//! accumulators, each summed across its lanes once per row. Weight rows are split across
//! threads in chunks that stay in L2 while every group of activation rows (in L1) passes over
//! them. Decode (one activation row) takes the rounded activations through the f32 decode
//! kernels instead (see `decode_f32`).

use std::cell::RefCell;

use half::bf16;
use rayon::prelude::*;

use super::avx512;
use super::dot::BLOCK_ROWS;
use super::matmul::{by_row_chunks, matmul, with_buffer, ChunkOut, WeightView, WIDE_COLS};

/// How activations meet bf16 weights (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Bf16Acts {
    /// f32 activations: the reference's numbers.
    #[default]
    F32,
    /// Activations rounded to bf16 first.
    Bf16,
}

impl Bf16Acts {
    pub fn parse(s: &str) -> Result<Bf16Acts, String> {
        match s {
            "f32" => Ok(Bf16Acts::F32),
            "bf16" => Ok(Bf16Acts::Bf16),
            _ => Err(format!(
                "unknown activation precision {s:?} for bf16 weights (expected f32 or bf16)"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Bf16Acts::F32 => "f32",
            Bf16Acts::Bf16 => "bf16",
        }
    }
}

/// Activation rows per tile.
pub const TILE_TOKENS: usize = 4;
/// Padding between rounded activation rows, one cache line. L1 sets repeat every 4 KB, so with
/// rows a multiple of 4 KB long (`down_proj`'s 8192 columns: 16 KB) a tile's four activation
/// streams fall in one set, and if the weight rows start at about the same offset within a
/// page, its six weight streams do too: ten streams in an 8-way set. Whether they do depends
/// on where the tensor sits in the checkpoint file. Measured, 512 × 8192 activations against
/// 3072 × 8192 weights, 2 threads, G products/s: buffers at the same page offset 123–124
/// unpadded, 154–158 padded; 2 KB apart 149–158 either way.
const ACT_PAD: usize = 32;
/// Weight rows per tile. 4 × 6 accumulators, 6 weight vectors and one activation vector fill 31
/// of the 32 vector registers.
pub const TILE_ROWS: usize = 6;

/// Whether the `vdpbf16ps` kernels run: [`super::avx512`] and AVX-512 BF16.
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            avx512() && is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// `y[t, r] = W[r,:] · x[t,:]` with `x` `[n, cols]` and `y` `[n, rows]` row-major, the
/// activations as `acts` says.
pub fn matmul_bf16(w: &[bf16], rows: usize, cols: usize, x: &[f32], y: &mut [f32], acts: Bf16Acts) {
    let n = x.len() / cols;
    assert_eq!(x.len(), n * cols);
    assert_eq!(y.len(), n * rows);
    assert_eq!(w.len(), rows * cols);
    let view = WeightView::BF16(w);
    if acts == Bf16Acts::F32 {
        if n == 1 && avx512() {
            return decode_f32(w, rows, cols, x, y);
        }
        return matmul(view, rows, cols, x, y);
    }
    if n == 1 || !available() {
        // The rounded activations through the f32 kernels: every product is exact in f32 either
        // way, so only the order of the sums differs from vdpbf16ps. For decode this also streams
        // faster. Decode steps of the synthetic bf16 model as a share of a plain read of the
        // same weights beside each, three alternating pairs of runs: this way 0.89, 0.89, 0.92;
        // a one-row vdpbf16ps loop 0.89, 0.83, 0.87.
        return with_buffer(&WIDENED, n * cols, n, |r: &mut [f32]| {
            for (o, v) in r.iter_mut().zip(x) {
                *o = bf16::from_f32(*v).to_f32();
            }
            matmul_bf16(w, rows, cols, r, y, Bf16Acts::F32)
        });
    }
    let stride = cols + ACT_PAD;
    with_buffer(&ROUNDED, n * stride, n, |held: &mut [u16]| {
        held.par_chunks_mut(stride)
            .zip(x.par_chunks(cols))
            .for_each(|(h, row)| round(row, &mut h[..cols]));
        let held = &*held;
        let task = |r0: usize, out: &mut ChunkOut| {
            let len = out.len();
            let mut res = [0f32; TILE_TOKENS * TILE_ROWS];
            for t0 in (0..n).step_by(TILE_TOKENS) {
                let m = TILE_TOKENS.min(n - t0);
                let xs: [&[u16]; TILE_TOKENS] = std::array::from_fn(|i| {
                    let t = t0 + i.min(m - 1);
                    &held[t * stride..t * stride + cols]
                });
                for i in (0..len).step_by(TILE_ROWS) {
                    let k = TILE_ROWS.min(len - i);
                    let ws = &w[(r0 + i) * cols..(r0 + i + k) * cols];
                    tile(ws, &xs[..m], cols, &mut res[..k * m]);
                    for j in 0..k {
                        out.put(i + j, t0, &res[j * m..(j + 1) * m]);
                    }
                }
            }
        };
        by_row_chunks(rows, n, y, task);
    });
}

/// One f32 activation row against bf16 weights, on AVX-512 F/BW/VL. Decode reads every weight
/// byte once, so what counts is how fast one core can stream: a bf16 pair sits in one 32-bit
/// lane, and the lane masked to its top half is the odd value as f32, the lane shifted left by
/// 16 the even one. So one 64-byte load, an AND, a shift and two FMAs (against the activations
/// split into even and odd columns once per product) take 32 weights, where the AVX2 kernel
/// needs four loads and four widening shuffles. Rows of [`WIDE_COLS`] columns or more go
/// [`BLOCK_ROWS`] at a time against one activation load, as in [`super::dot`], because their
/// activations do not stay in L1 beside the weight stream. Measured, weights from memory in
/// 2 MB pages, one thread (where a core's own stream rate shows; two threads share the memory
/// bus), GB/s AVX2 kernels / these, two runs: 3072-column rows 18–21 / 22–25, `down_proj`
/// (8192 columns) 19–20 / 20 (BENCHMARKS.md, run G).
fn decode_f32(w: &[bf16], rows: usize, cols: usize, x: &[f32], y: &mut [f32]) {
    let pairs = cols / 2;
    with_buffer(&SPLIT, 2 * pairs, 1, |split: &mut [f32]| {
        let (even, odd) = split.split_at_mut(pairs);
        for (i, p) in x.chunks_exact(2).enumerate() {
            even[i] = p[0];
            odd[i] = p[1];
        }
        let (even, odd) = (&*even, &*odd);
        let task = |r0: usize, out: &mut ChunkOut| {
            let len = out.len();
            let mut i = 0;
            if cols >= WIDE_COLS {
                let mut t = [0f32; BLOCK_ROWS];
                while i + BLOCK_ROWS <= len {
                    let ws = &w[(r0 + i) * cols..(r0 + i + BLOCK_ROWS) * cols];
                    split_dot(ws, x, even, odd, &mut t);
                    for (j, v) in t.iter().enumerate() {
                        out.put(i + j, 0, &[*v]);
                    }
                    i += BLOCK_ROWS;
                }
            }
            for i in i..len {
                let mut v = 0f32;
                let ws = &w[(r0 + i) * cols..(r0 + i + 1) * cols];
                split_dot(ws, x, even, odd, std::slice::from_mut(&mut v));
                out.put(i, 0, &[v]);
            }
        };
        by_row_chunks(rows, 1, y, task);
    })
}

thread_local! {
    static ROUNDED: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
    static WIDENED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static SPLIT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `out[j] = W[j,:] · x` for the `out.len()` rows of `w` (1 or [`BLOCK_ROWS`]), with `even`
/// and `odd` the activations at even and odd columns.
fn split_dot(w: &[bf16], x: &[f32], even: &[f32], odd: &[f32], out: &mut [f32]) {
    let cols = x.len();
    assert!(out.len() == 1 || out.len() == BLOCK_ROWS);
    assert_eq!(w.len(), out.len() * cols);
    assert!(even.len() == cols / 2 && odd.len() == cols / 2);
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: avx512() checked the features; shapes asserted above.
        return unsafe { x86::split_dot(w, x, even, odd, out) };
    }
    for (o, row) in out.iter_mut().zip(w.chunks(cols)) {
        *o = row.iter().zip(x).map(|(a, b)| a.to_f32() * b).sum();
    }
}

/// `x` rounded to the nearest bf16 (ties to even), as bits.
fn round(x: &[f32], out: &mut [u16]) {
    assert_eq!(out.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: available() checked AVX-512 F/BW/VL/BF16; lengths asserted above.
        return unsafe { x86::round(x, out) };
    }
    scalar_round(x, out)
}

/// Reference of `round`.
pub fn scalar_round(x: &[f32], out: &mut [u16]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = bf16::from_f32(v).to_bits();
    }
}

/// `out[j * m + i] = W[j,:] · x[i]` for the `k = out.len() / m` rows of `w` and the `m = xs.len()`
/// activation rows (bf16 bits).
fn tile(w: &[bf16], xs: &[&[u16]], cols: usize, out: &mut [f32]) {
    let (m, k) = (xs.len(), out.len() / xs.len());
    assert!((1..=TILE_TOKENS).contains(&m) && (1..=TILE_ROWS).contains(&k));
    assert_eq!(w.len(), k * cols);
    assert!(xs.iter().all(|x| x.len() == cols));
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: available() checked the features; shapes asserted above.
        return unsafe { x86::tile(w, xs, cols, out) };
    }
    scalar_tile(w, xs, cols, out)
}

/// Reference of `tile`: every product in f32, summed in order.
pub fn scalar_tile(w: &[bf16], xs: &[&[u16]], cols: usize, out: &mut [f32]) {
    let m = xs.len();
    for (j, row) in w.chunks(cols).enumerate() {
        for (i, x) in xs.iter().enumerate() {
            let mut s = 0f32;
            for (a, b) in row.iter().zip(x.iter()) {
                s += a.to_f32() * bf16::from_bits(*b).to_f32();
            }
            out[j * m + i] = s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// [`super::round`], 16 values at a time.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn round(x: &[f32], out: &mut [u16]) {
        let body = x.len() / 16 * 16;
        for i in (0..body).step_by(16) {
            let h: __m256i =
                std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(x.as_ptr().add(i))));
            _mm256_storeu_si256(out.as_mut_ptr().add(i).cast(), h);
        }
        super::scalar_round(&x[body..], &mut out[body..]);
    }

    #[inline(always)]
    unsafe fn load(p: *const u16) -> __m512bh {
        std::mem::transmute(_mm512_loadu_si512(p.cast()))
    }

    #[inline(always)]
    unsafe fn load_masked(p: *const u16, mask: __mmask32) -> __m512bh {
        std::mem::transmute(_mm512_maskz_loadu_epi16(mask, p.cast()))
    }

    /// [`super::split_dot`]: one row with eight accumulators (even and odd columns of four
    /// steps of 32), or [`BLOCK_ROWS`](super::BLOCK_ROWS) rows with one accumulator each
    /// against one load of the activations. Columns past the last multiple of 32 are summed in
    /// scalar.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    pub unsafe fn split_dot(
        w: &[half::bf16],
        x: &[f32],
        even: &[f32],
        odd: &[f32],
        out: &mut [f32],
    ) {
        let cols = x.len();
        let body = cols / 32 * 32;
        let (wp, ep, op) = (w.as_ptr().cast::<u16>(), even.as_ptr(), odd.as_ptr());
        let top = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        // Lane i of the 32 bf16 at column c holds columns c + 2i (low half) and c + 2i + 1.
        let widen = |p: *const u16| {
            let v = _mm512_loadu_si512(p.cast());
            (
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)),
                _mm512_castsi512_ps(_mm512_and_si512(v, top)),
            )
        };
        if out.len() == 1 {
            let mut acc = [_mm512_setzero_ps(); 8];
            let mut c = 0;
            while c + 128 <= body {
                for u in 0..4 {
                    let o = c + 32 * u;
                    let (e, d) = widen(wp.add(o));
                    acc[2 * u] = _mm512_fmadd_ps(e, _mm512_loadu_ps(ep.add(o / 2)), acc[2 * u]);
                    acc[2 * u + 1] =
                        _mm512_fmadd_ps(d, _mm512_loadu_ps(op.add(o / 2)), acc[2 * u + 1]);
                }
                c += 128;
            }
            while c < body {
                let (e, d) = widen(wp.add(c));
                acc[0] = _mm512_fmadd_ps(e, _mm512_loadu_ps(ep.add(c / 2)), acc[0]);
                acc[1] = _mm512_fmadd_ps(d, _mm512_loadu_ps(op.add(c / 2)), acc[1]);
                c += 32;
            }
            let mut s = acc[0];
            for a in &acc[1..] {
                s = _mm512_add_ps(s, *a);
            }
            out[0] = _mm512_reduce_add_ps(s) + tail(&w[body..], &x[body..]);
            return;
        }
        let mut acc = [_mm512_setzero_ps(); super::BLOCK_ROWS];
        let mut c = 0;
        while c < body {
            let (xe, xo) = (
                _mm512_loadu_ps(ep.add(c / 2)),
                _mm512_loadu_ps(op.add(c / 2)),
            );
            for (r, a) in acc.iter_mut().enumerate() {
                let (e, d) = widen(wp.add(r * cols + c));
                *a = _mm512_fmadd_ps(d, xo, _mm512_fmadd_ps(e, xe, *a));
            }
            c += 32;
        }
        for (r, o) in out.iter_mut().enumerate() {
            let row = &w[r * cols..(r + 1) * cols];
            *o = _mm512_reduce_add_ps(acc[r]) + tail(&row[body..], &x[body..]);
        }
    }

    #[inline(always)]
    fn tail(w: &[half::bf16], x: &[f32]) -> f32 {
        w.iter().zip(x).map(|(a, b)| a.to_f32() * b).sum()
    }

    /// Runs the tile kernel for `m` activation rows and `k` weight rows, both as constants.
    /// (AVX-512 VL matters here: without it the 256- and 128-bit steps of the lane sums can
    /// only use registers 0–15, the accumulators are kept there too, and the 4 × 6 tile spilled
    /// half of them to the stack on every step: 109 against 155–166 G products/s, 2 threads.)
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn tile(w: &[half::bf16], xs: &[&[u16]], cols: usize, out: &mut [f32]) {
        let w = w.as_ptr().cast::<u16>();
        let x: [*const u16; 4] = std::array::from_fn(|i| xs[i.min(xs.len() - 1)].as_ptr());
        let k = out.len() / xs.len();
        let o = out.as_mut_ptr();
        match (xs.len(), k) {
            (1, 1) => run::<1, 1>(w, x, cols, o),
            (1, 2) => run::<1, 2>(w, x, cols, o),
            (1, 3) => run::<1, 3>(w, x, cols, o),
            (1, 4) => run::<1, 4>(w, x, cols, o),
            (1, 5) => run::<1, 5>(w, x, cols, o),
            (1, 6) => run::<1, 6>(w, x, cols, o),
            (2, 1) => run::<2, 1>(w, x, cols, o),
            (2, 2) => run::<2, 2>(w, x, cols, o),
            (2, 3) => run::<2, 3>(w, x, cols, o),
            (2, 4) => run::<2, 4>(w, x, cols, o),
            (2, 5) => run::<2, 5>(w, x, cols, o),
            (2, 6) => run::<2, 6>(w, x, cols, o),
            (3, 1) => run::<3, 1>(w, x, cols, o),
            (3, 2) => run::<3, 2>(w, x, cols, o),
            (3, 3) => run::<3, 3>(w, x, cols, o),
            (3, 4) => run::<3, 4>(w, x, cols, o),
            (3, 5) => run::<3, 5>(w, x, cols, o),
            (3, 6) => run::<3, 6>(w, x, cols, o),
            (4, 1) => run::<4, 1>(w, x, cols, o),
            (4, 2) => run::<4, 2>(w, x, cols, o),
            (4, 3) => run::<4, 3>(w, x, cols, o),
            (4, 4) => run::<4, 4>(w, x, cols, o),
            (4, 5) => run::<4, 5>(w, x, cols, o),
            (4, 6) => run::<4, 6>(w, x, cols, o),
            _ => unreachable!("tile shapes are checked by the caller"),
        }
    }

    /// `out[j * M + i] = W[j,:] · x[i]`: `M × N` accumulators of 16 lanes, each taking 32
    /// products per step; weight row `j` starts at `w + j·cols`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn run<const M: usize, const N: usize>(
        w: *const u16,
        x: [*const u16; 4],
        cols: usize,
        out: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); N]; M];
        let step = |acc: &mut [[__m512; N]; M], wv: [__m512bh; N], xv: [__m512bh; M]| {
            for (row, x) in acc.iter_mut().zip(xv) {
                for (a, w) in row.iter_mut().zip(wv) {
                    *a = _mm512_dpbf16_ps(*a, w, x);
                }
            }
        };
        let body = cols / 32 * 32;
        let mut c = 0;
        while c < body {
            step(
                &mut acc,
                std::array::from_fn(|j| load(w.add(j * cols + c))),
                std::array::from_fn(|i| load(x[i].add(c))),
            );
            c += 32;
        }
        if body < cols {
            let mask: __mmask32 = (1u32 << (cols - body)) - 1;
            step(
                &mut acc,
                std::array::from_fn(|j| load_masked(w.add(j * cols + c), mask)),
                std::array::from_fn(|i| load_masked(x[i].add(c), mask)),
            );
        }
        for (i, row) in acc.iter().enumerate() {
            for (j, a) in row.iter().enumerate() {
                *out.add(j * M + i) = _mm512_reduce_add_ps(*a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kernels::test_data as data;

    /// Sums in f64 over the f32 activations, and the sums of the products' magnitudes (what
    /// bounds the error of a relative error per activation).
    fn f64_reference(w: &[bf16], rows: usize, cols: usize, x: &[f32]) -> (Vec<f64>, Vec<f64>) {
        let n = x.len() / cols;
        let (mut y, mut mag) = (vec![0f64; n * rows], vec![0f64; n * rows]);
        for t in 0..n {
            for r in 0..rows {
                for c in 0..cols {
                    let p = w[r * cols + c].to_f32() as f64 * x[t * cols + c] as f64;
                    y[t * rows + r] += p;
                    mag[t * rows + r] += p.abs();
                }
            }
        }
        (y, mag)
    }

    #[test]
    fn rounding_matches_the_scalar_rounding_within_2e_minus_8() {
        let x: Vec<f32> = data(1000, 11).iter().map(|v| v * 37.0).collect();
        let (mut got, mut want) = (vec![0u16; x.len()], vec![0u16; x.len()]);
        round(&x, &mut got);
        scalar_round(&x, &mut want);
        assert_eq!(got, want);
        for (&v, &b) in x.iter().zip(&got) {
            let back = bf16::from_bits(b).to_f32();
            assert!((back - v).abs() <= v.abs() * 2f32.powi(-8), "{v}: {back}");
        }
    }

    /// Every tile shape (token and row tails) and column tails (masked loads): the SIMD tile
    /// against the scalar one on the same activations.
    #[test]
    fn tiles_match_the_scalar_tile() {
        for cols in [32, 40, 96, 1000] {
            let w: Vec<bf16> = data(TILE_ROWS * cols, 3)
                .iter()
                .map(|&v| bf16::from_f32(v))
                .collect();
            let x = data(TILE_TOKENS * cols, 4);
            let mut held = vec![0u16; TILE_TOKENS * cols];
            scalar_round(&x, &mut held);
            let xs: Vec<&[u16]> = held.chunks(cols).collect();
            for m in 1..=TILE_TOKENS {
                for k in 1..=TILE_ROWS {
                    let (mut got, mut want) = ([0f32; 24], [0f32; 24]);
                    let w = &w[..k * cols];
                    tile(w, &xs[..m], cols, &mut got[..k * m]);
                    scalar_tile(w, &xs[..m], cols, &mut want[..k * m]);
                    for (g, e) in got.iter().zip(&want) {
                        let tol = 1e-6 * (cols as f32).sqrt();
                        assert!((g - e).abs() <= tol, "{m}x{k} {cols}: {g} vs {e}");
                    }
                }
            }
        }
    }

    /// Products over threads and row chunks, decode and batches, against f64 sums over the
    /// f32 activations: within what rounding them may lose (2⁻⁸ of each product's magnitude)
    /// plus f32 summation, and visibly further off than the f32 default.
    #[test]
    fn products_match_f32_activations_within_the_rounding_error() {
        for (rows, cols, n) in [
            (1, 32, 1),
            (7, 40, 1),
            (70, 1000, 1),
            (21, WIDE_COLS + 40, 1),
            (9, 2 * WIDE_COLS, 1),
            (131, 96, 3),
            (200, 160, 9),
            (70, 1000, 5),
        ] {
            let w: Vec<bf16> = data(rows * cols, 3)
                .iter()
                .map(|&v| bf16::from_f32(v))
                .collect();
            let x = data(n * cols, 4);
            let (exact, mag) = f64_reference(&w, rows, cols, &x);
            let mut errs = [0f64; 2];
            for (a, acts) in [Bf16Acts::F32, Bf16Acts::Bf16].into_iter().enumerate() {
                let mut got = vec![0f32; n * rows];
                matmul_bf16(&w, rows, cols, &x, &mut got, acts);
                let rounding = match acts {
                    Bf16Acts::F32 => 0.0,
                    Bf16Acts::Bf16 => 2f64.powi(-8),
                };
                for (i, &g) in got.iter().enumerate() {
                    let tol = (rounding + cols as f64 * 2f64.powi(-24)) * mag[i];
                    let err = (g as f64 - exact[i]).abs();
                    let tag = format!("{acts:?} {rows}x{cols} n={n} [{i}]");
                    assert!(err <= tol, "{tag}: {g} vs {}", exact[i]);
                    errs[a] = errs[a].max(err);
                }
            }
            assert!(errs[1] > 10.0 * errs[0], "{rows}x{cols} n={n}: {errs:?}");
        }
    }
}
