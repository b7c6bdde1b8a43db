//! Block-quantized weights (8-bit and 4-bit, 32 values per block, one f16 scale each) and the
//! integer dot products that read them against 8-bit activations, as llama.cpp does for Q8_0 /
//! Q4_0, with a layout chosen for AVX2.
//!
//! Layout of one quantized row (`cols` padded with zeros to a multiple of [`GROUP`]):
//! - values: blocks taken in pairs of 64 elements `e0..e63`. Q8 stores them as bytes in the order
//!   `e0..15, e32..47, e16..31, e48..63`; Q4 stores 32 bytes per pair, byte `j` holding `e_j`
//!   (low nibble) and `e_{16+j}` (high nibble), byte `16+j` holding `e_{32+j}` and `e_{48+j}`
//!   (each block packed as ggml packs Q4_0). Either way one 32-byte load (Q4: after splitting the
//!   nibbles) gives 16 values of each block of the pair, so per-block sums land in fixed lanes.
//! - scales: one f16 per block, in each group of 8 blocks in the order 0,2,4,6,1,3,5,7 — the order
//!   in which three horizontal adds leave the eight block sums of a group.
//!
//! Q8 values are `round(w / d)` with `d = max|w| / 127`; Q4 values are unsigned nibbles `q` with
//! `w ≈ (q - 8)·d`, `d = m / -8` where `m` is the element of largest magnitude (as ggml's Q4_0).
//! Activations are quantized per block to i8 with an f32 scale `max|x| / 127`, laid out like Q8
//! weights, with each block's value sum kept so the Q4 kernel can multiply unsigned nibbles and
//! subtract `8·Σx` once per block.

use half::f16;

use super::{cpu, Isa};

/// Values per block.
pub const BLOCK: usize = 32;
/// Blocks are processed (and rows padded) in groups of eight.
pub const GROUP: usize = 8 * BLOCK;

/// A block-quantized weight format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QType {
    Q8,
    Q4,
}

impl QType {
    pub fn name(self) -> &'static str {
        match self {
            QType::Q8 => "q8",
            QType::Q4 => "q4",
        }
    }

    pub fn parse(s: &str) -> Option<QType> {
        match s {
            "q8" => Some(QType::Q8),
            "q4" => Some(QType::Q4),
            _ => None,
        }
    }

    /// Bytes of values per row of `cols` logical columns.
    pub fn row_bytes(self, cols: usize) -> usize {
        let p = padded(cols);
        match self {
            QType::Q8 => p,
            QType::Q4 => p / 2,
        }
    }
}

/// `cols` rounded up to whole groups.
pub fn padded(cols: usize) -> usize {
    cols.div_ceil(GROUP) * GROUP
}

/// Scales per row of `cols` logical columns.
pub fn row_blocks(cols: usize) -> usize {
    padded(cols) / BLOCK
}

/// Position of element `e` (0..64) of a block pair in the stored order.
#[inline]
fn pair_pos(e: usize) -> usize {
    match e {
        16..=31 => e + 16,
        32..=47 => e - 16,
        _ => e,
    }
}

/// Position of block `b` of a row among the row's scales.
#[inline]
pub fn scale_index(b: usize) -> usize {
    const ORDER: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];
    b / 8 * 8 + ORDER[b % 8]
}

/// Quantizes one row (`w.len()` logical columns) into `qs` (`row_bytes`) and `d` (`row_blocks`).
pub fn quantize_row(t: QType, w: &[f32], qs: &mut [u8], d: &mut [f16]) {
    match cpu() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: cpu() returns Avx2 only after detecting avx2 and fma.
        Isa::Avx2 => unsafe { avx2::quantize_row(t, w, qs, d) },
        _ => quantize_row_generic(t, w, qs, d),
    }
}

/// Inlined into an AVX2 copy too: the same code, with vector rounding and wider lanes
/// (the baseline build calls libm for `round` and gets 4-wide SSE2 at best).
#[inline(always)]
fn quantize_row_generic(t: QType, w: &[f32], qs: &mut [u8], d: &mut [f16]) {
    let cols = w.len();
    let p = padded(cols);
    assert_eq!(qs.len(), t.row_bytes(cols));
    assert_eq!(d.len(), p / BLOCK);
    let mut vals = [0f32; 64];
    for pair in 0..p / 64 {
        let mut q = [0u8; 64];
        for half in 0..2 {
            let b = 2 * pair + half;
            for (k, v) in vals[..BLOCK].iter_mut().enumerate() {
                *v = w.get(b * BLOCK + k).copied().unwrap_or(0.0);
            }
            let block = &vals[..BLOCK];
            let scale = match t {
                QType::Q8 => {
                    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let scale = amax / 127.0;
                    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                    for (k, v) in block.iter().enumerate() {
                        let x = (v * inv).round().clamp(-127.0, 127.0) as i8;
                        q[pair_pos(half * BLOCK + k)] = x as u8;
                    }
                    scale
                }
                QType::Q4 => {
                    let scale = q4_scale(block);
                    let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
                    for (k, v) in block.iter().enumerate() {
                        // Nibble value q with w ≈ (q - 8)·scale.
                        q[half * BLOCK + k] = nibble(v * inv);
                    }
                    scale
                }
            };
            d[scale_index(b)] = f16::from_f32(scale);
        }
        match t {
            QType::Q8 => qs[pair * 64..pair * 64 + 64].copy_from_slice(&q),
            QType::Q4 => {
                let out = &mut qs[pair * 32..pair * 32 + 32];
                for j in 0..16 {
                    out[j] = q[j] | (q[16 + j] << 4);
                    out[16 + j] = q[32 + j] | (q[48 + j] << 4);
                }
            }
        }
    }
}

/// The 4-bit code of `x = w / d`: `clamp(floor(x + 8.5), 0, 15)`. Clamping before the
/// truncating cast gives the same value without `floor`, which is a libm call on baseline x86-64
/// (no SSE4.1) and was a fifth of the time of quantizing a checkpoint.
#[inline(always)]
#[allow(clippy::manual_clamp)] // clamp keeps NaN, which the unchecked cast must not see
fn nibble(x: f32) -> u8 {
    // `max` maps NaN to 0, so the value is finite and in 0..=15: the unchecked cast is sound,
    // and unlike the saturating `as` it vectorises.
    // SAFETY: see above.
    unsafe { (x + 8.5).max(0.0).min(15.0).to_int_unchecked::<i32>() as u8 }
}

/// The signed level `nibble(x) - 8` as a float.
#[inline(always)]
fn level(x: f32) -> f32 {
    nibble(x) as f32 - 8.0
}

/// The Q4 scale of one block: ggml's `m / -8` (`m` the value of largest magnitude, which then
/// maps exactly to -8) is one candidate among a few narrower grids, each refitted by least
/// squares to the values it rounds to; the one with the least squared error wins. On Gaussian
/// or uniform weights this lowers the RMS error by about a fifth against `m / -8` alone.
#[inline(always)]
fn q4_scale(block: &[f32]) -> f32 {
    let m = block
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    if m == 0.0 {
        return 0.0;
    }
    // Eight running sums, so that the loops vectorise (a single float sum is kept in order).
    let sse = |d: f32| -> f32 {
        let inv = 1.0 / d;
        let mut acc = [0f32; 8];
        for c in block.chunks_exact(8) {
            for (a, &v) in acc.iter_mut().zip(c) {
                let e = v - level(v * inv) * d;
                *a += e * e;
            }
        }
        acc.iter().sum()
    };
    let mut best = (sse(m / -8.0), m / -8.0);
    for grid in [7.5f32, 7.0] {
        let d0 = m / -grid;
        // Least-squares refit of the scale for the levels d0 rounds to.
        let inv = 1.0 / d0;
        let (mut num, mut den) = ([0f32; 8], [0f32; 8]);
        for c in block.chunks_exact(8) {
            for k in 0..8 {
                let q = level(c[k] * inv);
                num[k] += c[k] * q;
                den[k] += q * q;
            }
        }
        let (num, den): (f32, f32) = (num.iter().sum(), den.iter().sum());
        for d in [d0, if den > 0.0 { num / den } else { d0 }] {
            let e = sse(d);
            if e < best.0 {
                best = (e, d);
            }
        }
    }
    best.1
}

/// The signed integer value of element `e` (logical index) of a quantized row.
#[inline]
fn value(t: QType, qs: &[u8], e: usize) -> i32 {
    let (pair, k) = (e / 64, e % 64);
    match t {
        QType::Q8 => qs[pair * 64 + pair_pos(k)] as i8 as i32,
        QType::Q4 => {
            let byte = qs[pair * 32 + (k / 32) * 16 + k % 16];
            let nib = if k % 32 < 16 { byte & 15 } else { byte >> 4 };
            nib as i32 - 8
        }
    }
}

/// Widens a quantized row back to f32 (`out.len()` logical columns).
pub fn dequantize_row(t: QType, qs: &[u8], d: &[f16], out: &mut [f32]) {
    for (e, o) in out.iter_mut().enumerate() {
        *o = value(t, qs, e) as f32 * d[scale_index(e / BLOCK)].to_f32();
    }
}

/// One activation row quantized to i8 blocks, laid out like a Q8 weight row.
#[derive(Clone, Debug, Default)]
pub struct QActs {
    pub qs: Vec<i8>,
    /// Per block, in scale order.
    pub d: Vec<f32>,
    /// Per block, in scale order: 8 × the sum of the block's values (the Q4 offset correction).
    pub sum8: Vec<i32>,
}

impl QActs {
    /// Quantizes `x` (logical columns), reusing this buffer's allocations.
    pub fn quantize(&mut self, x: &[f32]) {
        let p = padded(x.len());
        self.qs.resize(p, 0);
        self.d.resize(p / BLOCK, 0.0);
        self.sum8.resize(p / BLOCK, 0);
        let isa = cpu();
        let mut q = [0i8; BLOCK];
        for b in 0..p / BLOCK {
            let start = (b * BLOCK).min(x.len());
            let block = &x[start..((b + 1) * BLOCK).min(x.len())];
            let (scale, sum) = match (isa, block.len()) {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: Avx2 is returned only after detection; the block is 32 values long.
                (Isa::Avx2, BLOCK) => unsafe { avx2::quantize_block(block, &mut q) },
                _ => quantize_block(block, &mut q),
            };
            // Stored order of a block pair: [b0 0..16][b1 0..16][b0 16..32][b1 16..32].
            let (pair, half) = (b / 2, b % 2);
            let at = pair * 64 + half * 16;
            self.qs[at..at + 16].copy_from_slice(&q[..16]);
            self.qs[at + 32..at + 48].copy_from_slice(&q[16..]);
            self.d[scale_index(b)] = scale;
            self.sum8[scale_index(b)] = 8 * sum;
        }
    }
}

/// Scalar reference for one activation block (`block` may be short: the rest is padding):
/// `q = round(x / d)` with ties to even (what the vector conversion does), `d = max|x| / 127`.
/// Returns the scale and the sum of `q`.
fn quantize_block(block: &[f32], q: &mut [i8; BLOCK]) -> (f32, i32) {
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    let mut sum = 0i32;
    for (k, q) in q.iter_mut().enumerate() {
        let v = block
            .get(k)
            .map_or(0, |v| (v * inv).round_ties_even() as i32);
        sum += v;
        *q = v as i8;
    }
    (scale, sum)
}

/// Scalar reference: `out[j] = w · xs[j]` for one quantized weight row.
pub fn scalar_dot_rows(t: QType, qs: &[u8], d: &[f16], xs: &[&QActs], out: &mut [f32]) {
    for (o, x) in out.iter_mut().zip(xs) {
        let mut acc = 0f32;
        for b in 0..d.len() {
            let mut isum = 0i32;
            for k in 0..BLOCK {
                let e = b * BLOCK + k;
                let (pair, kk) = (e / 64, e % 64);
                isum += value(t, qs, e) * x.qs[pair * 64 + pair_pos(kk)] as i32;
            }
            let s = scale_index(b);
            acc += d[s].to_f32() * x.d[s] * isum as f32;
        }
        *o = acc;
    }
}

/// Most activation rows one call takes.
pub const MAX_ROWS: usize = 4;

/// `out[j] = w · xs[j]` (`xs.len() <= MAX_ROWS`) with the CPU's best kernel.
pub fn dot_rows(t: QType, qs: &[u8], d: &[f16], xs: &[&QActs], out: &mut [f32]) {
    assert!(xs.len() <= MAX_ROWS && out.len() == xs.len());
    assert_eq!(d.len() % 8, 0);
    assert_eq!(
        qs.len(),
        d.len() * BLOCK / if t == QType::Q4 { 2 } else { 1 }
    );
    assert!(
        xs.iter().all(|x| x.d.len() == d.len()),
        "activation width differs"
    );
    match cpu() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as below, and vnni() only after detecting avx512vnni and avx512vl.
        Isa::Avx2 if vnni() => unsafe { avx2::dot_rows_vnni(t, qs, d, xs, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: cpu() returns Avx2 only after detecting avx2, fma and f16c; lengths checked above.
        Isa::Avx2 => unsafe { avx2::dot_rows(t, qs, d, xs, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: cpu() returns Neon only after detecting it; lengths checked above.
        Isa::Neon => unsafe { neon::dot_rows(t, qs, d, xs, out) },
        _ => scalar_dot_rows(t, qs, d, xs, out),
    }
}

/// Whether the CPU has AVX-512 VNNI (with VL) on top of AVX2: then one `vpdpbusd` on 256-bit
/// registers does the work of `maddubs` + `madd`, with 32-bit sums (no 16-bit limits).
/// `PHI4_ISA=avx2` keeps the plain AVX2 kernels.
pub fn vnni() -> bool {
    static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VNNI.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            cpu() == Isa::Avx2
                && std::env::var("PHI4_ISA").map_or(true, |v| v != "avx2")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// The same kernels with Advanced SIMD: 8×8→16-bit multiplies (`smull`) summed pairwise into
/// 32-bit lanes (`sadalp`), a block at a time, 16 values per register. Q4 nibbles are made
/// signed (`q - 8`) before multiplying, so no offset correction is needed. Tested against the
/// scalar reference under qemu-aarch64 (no ARM machine here to time it on).
#[cfg(target_arch = "aarch64")]
mod neon {
    use super::{scale_index, QActs, QType};
    use half::{f16, slice::HalfFloatSliceExt};
    use std::arch::aarch64::*;

    #[target_feature(enable = "neon")]
    pub unsafe fn dot_rows(t: QType, qs: &[u8], d: &[f16], xs: &[&QActs], out: &mut [f32]) {
        match (t, xs.len()) {
            (_, 0) => {}
            (QType::Q4, 1) => dot_n::<1, true>(qs, d, xs, out),
            (QType::Q4, 2) => dot_n::<2, true>(qs, d, xs, out),
            (QType::Q4, 3) => dot_n::<3, true>(qs, d, xs, out),
            (QType::Q4, _) => dot_n::<4, true>(qs, d, xs, out),
            (QType::Q8, 1) => dot_n::<1, false>(qs, d, xs, out),
            (QType::Q8, 2) => dot_n::<2, false>(qs, d, xs, out),
            (QType::Q8, 3) => dot_n::<3, false>(qs, d, xs, out),
            (QType::Q8, _) => dot_n::<4, false>(qs, d, xs, out),
        }
    }

    /// `acc` plus the products of 16 signed weights and 16 activations, summed in pairs.
    #[inline(always)]
    unsafe fn mla(acc: int32x4_t, w: int8x16_t, x: *const i8) -> int32x4_t {
        let x = vld1q_s8(x);
        let lo = vmull_s8(vget_low_s8(w), vget_low_s8(x));
        let hi = vmull_high_s8(w, x);
        vpadalq_s16(vpadalq_s16(acc, lo), hi)
    }

    /// The weights of one block pair as signed values: (first block elements 0–15, 16–31,
    /// second block 0–15, 16–31).
    #[inline(always)]
    unsafe fn pair_values<const Q4: bool>(w: *const u8) -> [int8x16_t; 4] {
        if Q4 {
            let (v0, v1) = (vld1q_u8(w), vld1q_u8(w.add(16)));
            let (m, e) = (vdupq_n_u8(15), vdupq_n_s8(8));
            let s = |v: uint8x16_t| vsubq_s8(vreinterpretq_s8_u8(v), e);
            [
                s(vandq_u8(v0, m)),
                s(vshrq_n_u8::<4>(v0)),
                s(vandq_u8(v1, m)),
                s(vshrq_n_u8::<4>(v1)),
            ]
        } else {
            let p = w as *const i8;
            [
                vld1q_s8(p),
                vld1q_s8(p.add(32)),
                vld1q_s8(p.add(16)),
                vld1q_s8(p.add(48)),
            ]
        }
    }

    #[inline(always)]
    unsafe fn dot_n<const N: usize, const Q4: bool>(
        qs: &[u8],
        d: &[f16],
        xs: &[&QActs],
        out: &mut [f32],
    ) {
        let pair_bytes = if Q4 { 32 } else { 64 };
        let mut acc = [0f32; N];
        let mut dw = [0f32; 8];
        for g in 0..d.len() / 8 {
            d[g * 8..g * 8 + 8].convert_to_f32_slice(&mut dw);
            for p in 0..4 {
                let pair = g * 4 + p;
                let [w0a, w0b, w1a, w1b] = pair_values::<Q4>(qs.as_ptr().add(pair * pair_bytes));
                // Activations share the Q8 layout: first block's halves at +0 and +32,
                // the second's at +16 and +48.
                let (s0, s1) = (scale_index(2 * pair), scale_index(2 * pair + 1));
                for r in 0..N {
                    let x = xs[r].qs.as_ptr().add(pair * 64);
                    let z = vdupq_n_s32(0);
                    let b0 = vaddvq_s32(mla(mla(z, w0a, x), w0b, x.add(32)));
                    let b1 = vaddvq_s32(mla(mla(z, w1a, x.add(16)), w1b, x.add(48)));
                    acc[r] += dw[s0 % 8] * xs[r].d[s0] * b0 as f32;
                    acc[r] += dw[s1 % 8] * xs[r].d[s1] * b1 as f32;
                }
            }
        }
        out[..N].copy_from_slice(&acc);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{QActs, QType};
    use half::f16;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn quantize_row(t: QType, w: &[f32], qs: &mut [u8], d: &mut [f16]) {
        super::quantize_row_generic(t, w, qs, d)
    }

    /// [`super::quantize_block`] for a full block, eight lanes at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn quantize_block(block: &[f32], q: &mut [i8; 32]) -> (f32, i32) {
        debug_assert_eq!(block.len(), 32);
        let p = block.as_ptr();
        let v = [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ];
        let sign = _mm256_set1_ps(-0.0);
        let mut m = _mm256_andnot_ps(sign, v[0]);
        for x in &v[1..] {
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *x));
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
        let scale = amax / 127.0;
        let inv = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
        // cvtps rounds with the default mode: to nearest, ties to even.
        let i = v.map(|x| _mm256_cvtps_epi32(_mm256_mul_ps(x, inv)));
        let s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0b10_11_00_01)));
        // The packs work per 128-bit lane; the final permute restores element order.
        let w = _mm256_packs_epi16(
            _mm256_packs_epi32(i[0], i[1]),
            _mm256_packs_epi32(i[2], i[3]),
        );
        let w = _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, w);
        (scale, sum)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows(t: QType, qs: &[u8], d: &[f16], xs: &[&QActs], out: &mut [f32]) {
        dot_rows_with::<false>(t, qs, d, xs, out)
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn dot_rows_vnni(t: QType, qs: &[u8], d: &[f16], xs: &[&QActs], out: &mut [f32]) {
        dot_rows_with::<true>(t, qs, d, xs, out)
    }

    #[inline(always)]
    unsafe fn dot_rows_with<const VNNI: bool>(
        t: QType,
        qs: &[u8],
        d: &[f16],
        xs: &[&QActs],
        out: &mut [f32],
    ) {
        match (t, xs.len()) {
            (_, 0) => {}
            (QType::Q4, 1) => dot_n::<1, true, VNNI>(qs, d, xs, out),
            (QType::Q4, 2) => dot_n::<2, true, VNNI>(qs, d, xs, out),
            (QType::Q4, 3) => dot_n::<3, true, VNNI>(qs, d, xs, out),
            (QType::Q4, _) => dot_n::<4, true, VNNI>(qs, d, xs, out),
            (QType::Q8, 1) => dot_n::<1, false, VNNI>(qs, d, xs, out),
            (QType::Q8, 2) => dot_n::<2, false, VNNI>(qs, d, xs, out),
            (QType::Q8, 3) => dot_n::<3, false, VNNI>(qs, d, xs, out),
            (QType::Q8, _) => dot_n::<4, false, VNNI>(qs, d, xs, out),
        }
    }

    /// A block pair against N activation rows with `vpdpbusd`: i32 lanes 0–3 hold partial sums
    /// of the first block, 4–7 of the second (the Q8 pair sums' layout, for both formats). Q4
    /// multiplies the unsigned nibbles, like the AVX2 path (the `8·Σx` offset comes off later).
    #[inline(always)]
    unsafe fn vnni_pair_sums<const N: usize, const Q4: bool>(
        w: *const u8,
        xp: &[*const i8; N],
        off: usize,
    ) -> [__m256i; N] {
        let (ua, ub, signs) = if Q4 {
            let v = _mm256_loadu_si256(w as *const __m256i);
            let m4 = _mm256_set1_epi8(15);
            let lo = _mm256_and_si256(v, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            (lo, hi, None)
        } else {
            let wa = _mm256_loadu_si256(w as *const __m256i);
            let wb = _mm256_loadu_si256(w.add(32) as *const __m256i);
            let (aa, ab) = (_mm256_sign_epi8(wa, wa), _mm256_sign_epi8(wb, wb));
            (aa, ab, Some((wa, wb)))
        };
        let mut out = [_mm256_setzero_si256(); N];
        for r in 0..N {
            let mut xa = _mm256_loadu_si256(xp[r].add(off) as *const __m256i);
            let mut xb = _mm256_loadu_si256(xp[r].add(off + 32) as *const __m256i);
            if let Some((wa, wb)) = signs {
                // |w|·(x·sign w), as in the AVX2 Q8 kernel.
                xa = _mm256_sign_epi8(xa, wa);
                xb = _mm256_sign_epi8(xb, wb);
            }
            let s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), ua, xa);
            out[r] = _mm256_dpbusd_epi32(s, ub, xb);
        }
        out
    }

    /// The eight block sums of a group (256 values) in the scales' order, with `vpdpbusd`.
    #[inline(always)]
    unsafe fn vnni_group_sums<const N: usize, const Q4: bool>(
        w: *const u8,
        xp: &[*const i8; N],
        off: usize,
    ) -> [__m256i; N] {
        let pair = if Q4 { 32 } else { 64 };
        let p0 = vnni_pair_sums::<N, Q4>(w, xp, off);
        let p1 = vnni_pair_sums::<N, Q4>(w.add(pair), xp, off + 64);
        let p2 = vnni_pair_sums::<N, Q4>(w.add(2 * pair), xp, off + 128);
        let p3 = vnni_pair_sums::<N, Q4>(w.add(3 * pair), xp, off + 192);
        let mut out = [_mm256_setzero_si256(); N];
        for r in 0..N {
            out[r] = _mm256_hadd_epi32(
                _mm256_hadd_epi32(p0[r], p1[r]),
                _mm256_hadd_epi32(p2[r], p3[r]),
            );
        }
        out
    }

    /// A Q4 block pair against N activation rows, as 16-bit partial sums (low lane: the first
    /// block, high lane: the second), each at most 2·15·127·2 in magnitude.
    #[inline(always)]
    unsafe fn q4_pair_i16<const N: usize>(
        w: *const u8,
        xp: &[*const i8; N],
        off: usize,
    ) -> [__m256i; N] {
        let v = _mm256_loadu_si256(w as *const __m256i);
        let m4 = _mm256_set1_epi8(15);
        let lo = _mm256_and_si256(v, m4);
        let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        let mut out = [_mm256_setzero_si256(); N];
        for r in 0..N {
            let xa = _mm256_loadu_si256(xp[r].add(off) as *const __m256i);
            let xb = _mm256_loadu_si256(xp[r].add(off + 32) as *const __m256i);
            out[r] = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xa), _mm256_maddubs_epi16(hi, xb));
        }
        out
    }

    /// The eight block sums of a Q4 group (256 values), in the scales' order, before the
    /// `8·Σx` offset. The four pairs' 16-bit sums are reduced pairwise in 16 bits: each level at
    /// most doubles |15·127·2·2| = 7620, so two levels stay below 2^15. One widening madd per
    /// group instead of four cuts the multiply-port work (the prefill limit: 8 maddubs + 1 madd
    /// per 256 values instead of 8 + 4).
    #[inline(always)]
    unsafe fn q4_group_sums<const N: usize>(
        w: *const u8,
        xp: &[*const i8; N],
        off: usize,
    ) -> [__m256i; N] {
        let s0 = q4_pair_i16::<N>(w, xp, off);
        let s1 = q4_pair_i16::<N>(w.add(32), xp, off + 64);
        let s2 = q4_pair_i16::<N>(w.add(64), xp, off + 128);
        let s3 = q4_pair_i16::<N>(w.add(96), xp, off + 192);
        let ones = _mm256_set1_epi16(1);
        let mut out = [_mm256_setzero_si256(); N];
        for r in 0..N {
            let h = _mm256_hadd_epi16(
                _mm256_hadd_epi16(s0[r], s1[r]),
                _mm256_hadd_epi16(s2[r], s3[r]),
            );
            out[r] = _mm256_madd_epi16(h, ones);
        }
        out
    }

    /// Sums of one Q8 block pair against N activation rows: i32 lanes 0–3 hold partial sums of
    /// the first block, lanes 4–7 of the second. The weight bytes are loaded once for all rows.
    #[inline(always)]
    unsafe fn q8_pair_sums<const N: usize>(
        w: *const u8,
        xp: &[*const i8; N],
        off: usize,
    ) -> [__m256i; N] {
        let ones = _mm256_set1_epi16(1);
        let wa = _mm256_loadu_si256(w as *const __m256i);
        let wb = _mm256_loadu_si256(w.add(32) as *const __m256i);
        let (aa, ab) = (_mm256_sign_epi8(wa, wa), _mm256_sign_epi8(wb, wb));
        let mut out = [_mm256_setzero_si256(); N];
        for r in 0..N {
            let xa = _mm256_loadu_si256(xp[r].add(off) as *const __m256i);
            let xb = _mm256_loadu_si256(xp[r].add(off + 32) as *const __m256i);
            // |w|·(x·sign w): unsigned × signed as maddubs needs, ≤ 2·127·127 per i16 lane
            // (no headroom to add two in 16 bits, unlike Q4).
            let sa = _mm256_maddubs_epi16(aa, _mm256_sign_epi8(xa, wa));
            let sb = _mm256_maddubs_epi16(ab, _mm256_sign_epi8(xb, wb));
            out[r] = _mm256_add_epi32(_mm256_madd_epi16(sa, ones), _mm256_madd_epi16(sb, ones));
        }
        out
    }

    /// The eight block sums of a Q8 group (256 values) in the scales' order: three horizontal
    /// adds put them there, so one conversion and one FMA scale a whole group. (Scaling each
    /// pair in its lanes instead, with no horizontal adds, measured slower: 22.5 vs 24.8 tok/s
    /// prefill.)
    #[inline(always)]
    unsafe fn q8_group_sums<const N: usize>(
        w: *const u8,
        xp: &[*const i8; N],
        off: usize,
    ) -> [__m256i; N] {
        let p0 = q8_pair_sums::<N>(w, xp, off);
        let p1 = q8_pair_sums::<N>(w.add(64), xp, off + 64);
        let p2 = q8_pair_sums::<N>(w.add(128), xp, off + 128);
        let p3 = q8_pair_sums::<N>(w.add(192), xp, off + 192);
        let mut out = [_mm256_setzero_si256(); N];
        for r in 0..N {
            out[r] = _mm256_hadd_epi32(
                _mm256_hadd_epi32(p0[r], p1[r]),
                _mm256_hadd_epi32(p2[r], p3[r]),
            );
        }
        out
    }

    /// How far ahead of the weight reads to prefetch.
    const PREFETCH: usize = 2048;

    #[inline(always)]
    unsafe fn dot_n<const N: usize, const Q4: bool, const VNNI: bool>(
        qs: &[u8],
        d: &[f16],
        xs: &[&QActs],
        out: &mut [f32],
    ) {
        let groups = d.len() / 8;
        let group_bytes = if Q4 { 128 } else { 256 };
        let mut xp = [std::ptr::null::<i8>(); N];
        for r in 0..N {
            xp[r] = xs[r].qs.as_ptr();
        }
        let mut acc = [_mm256_setzero_ps(); N];
        for g in 0..groups {
            let w = qs.as_ptr().add(g * group_bytes);
            // The hardware prefetcher alone leaves decode waiting on weight loads; asking
            // PREFETCH bytes ahead gained ~10 % (q4, 2 threads, 3 runs each: median 12.55 vs
            // 11.15 tok/s). Past the row's end this touches the next row, which comes next.
            for line in (0..group_bytes).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(PREFETCH + line) as *const i8);
            }
            let off = g * 256;
            let sums = if VNNI {
                vnni_group_sums::<N, Q4>(w, &xp, off)
            } else if Q4 {
                q4_group_sums::<N>(w, &xp, off)
            } else {
                q8_group_sums::<N>(w, &xp, off)
            };
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr().add(g * 8) as *const __m128i));
            for r in 0..N {
                // Lanes: blocks 0,2,4,6,1,3,5,7 of the group, the scales' order.
                let mut s = sums[r];
                if Q4 {
                    let c = _mm256_loadu_si256(xs[r].sum8.as_ptr().add(g * 8) as *const __m256i);
                    s = _mm256_sub_epi32(s, c);
                }
                let dx = _mm256_loadu_ps(xs[r].d.as_ptr().add(g * 8));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, dx), acc[r]);
            }
        }
        for r in 0..N {
            let v = acc[r];
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_hadd_ps(s, s);
            out[r] = _mm_cvtss_f32(_mm_hadd_ps(s, s));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_data as data;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_activation_quantizer_equals_the_scalar_one_bit_for_bit() {
        if cpu() != Isa::Avx2 {
            return;
        }
        let mut blocks: Vec<Vec<f32>> = (0..200).map(|s| data(32, s)).collect();
        // Ties: with max 127 the codes are the values themselves, so halves round to even.
        blocks.push(
            (0..32)
                .map(|k| k as f32 - 15.5)
                .chain([127.0])
                .skip(1)
                .collect(),
        );
        blocks.push(vec![0.0; 32]);
        blocks.push((0..32).map(|k| if k == 3 { -1e-30 } else { 0.0 }).collect());
        for b in &blocks {
            let (mut a, mut v) = ([0i8; BLOCK], [0i8; BLOCK]);
            let ra = quantize_block(b, &mut a);
            // SAFETY: AVX2 detected above; the block is 32 long.
            let rv = unsafe { avx2::quantize_block(b, &mut v) };
            assert_eq!(
                (ra.0.to_bits(), ra.1, a),
                (rv.0.to_bits(), rv.1, v),
                "{b:?}"
            );
        }
    }

    fn quantized(t: QType, w: &[f32]) -> (Vec<u8>, Vec<f16>) {
        let mut qs = vec![0u8; t.row_bytes(w.len())];
        let mut d = vec![f16::ZERO; row_blocks(w.len())];
        quantize_row(t, w, &mut qs, &mut d);
        (qs, d)
    }

    #[test]
    fn round_trip_error_is_within_a_grid_step() {
        for t in [QType::Q8, QType::Q4] {
            for cols in [32, 96, 256, 3072 + 32] {
                let w = data(cols, 7);
                let (qs, d) = quantized(t, &w);
                let mut back = vec![0f32; cols];
                dequantize_row(t, &qs, &d, &mut back);
                for b in 0..cols.div_ceil(BLOCK) {
                    let blk = &w[b * BLOCK..((b + 1) * BLOCK).min(cols)];
                    let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let step = amax / if t == QType::Q8 { 127.0 } else { 8.0 };
                    // Q8: half a step. Q4: a full step where the largest value's opposite
                    // clamps at +7 (the grid is -8..7).
                    let steps = if t == QType::Q8 { 0.5 } else { 1.0 };
                    for k in 0..blk.len() {
                        let e = b * BLOCK + k;
                        // plus the f16 rounding of the scale
                        let tol = steps * step + amax * 2e-3 + 1e-7;
                        assert!(
                            (back[e] - w[e]).abs() <= tol,
                            "{t:?} {cols} e{e}: {} vs {}",
                            back[e],
                            w[e]
                        );
                    }
                }
            }
        }
    }

    /// Every x86 kernel this CPU can run, called directly (dot_rows picks only the best).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn each_x86_kernel_matches_the_scalar_reference() {
        if cpu() != Isa::Avx2 {
            return;
        }
        type Kernel = unsafe fn(QType, &[u8], &[f16], &[&QActs], &mut [f32]);
        let mut kernels: Vec<(&str, Kernel)> = vec![("avx2", avx2::dot_rows)];
        if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
            kernels.push(("vnni", avx2::dot_rows_vnni));
        }
        eprintln!(
            "kernels: {:?}",
            kernels.iter().map(|k| k.0).collect::<Vec<_>>()
        );
        for t in [QType::Q8, QType::Q4] {
            for cols in [256, 3072] {
                let (qs, d) = quantized(t, &data(cols, 3));
                let acts: Vec<QActs> = (0..MAX_ROWS as u64)
                    .map(|s| {
                        let mut a = QActs::default();
                        a.quantize(&data(cols, 40 + s));
                        a
                    })
                    .collect();
                for n in 1..=MAX_ROWS {
                    let xs: Vec<&QActs> = acts[..n].iter().collect();
                    let mut want = vec![0f32; n];
                    scalar_dot_rows(t, &qs, &d, &xs, &mut want);
                    for (name, k) in &kernels {
                        let mut got = vec![0f32; n];
                        // SAFETY: the features each kernel needs were detected above.
                        unsafe { k(t, &qs, &d, &xs, &mut got) };
                        for j in 0..n {
                            let tol = 1e-5 * (cols as f32).sqrt() * want[j].abs().max(1.0);
                            assert!(
                                (got[j] - want[j]).abs() <= tol,
                                "{name} {t:?} {cols} n{n}: {} vs {}",
                                got[j],
                                want[j]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn extreme_codes_do_not_overflow_the_16_bit_sums() {
        // Every nibble 15 (value +7) or 0 (value -8) against activations of ±127: the largest
        // magnitudes the 16-bit partial sums of the kernels ever hold.
        for (byte, x, level) in [(0xFFu8, 127i8, 7i64), (0x00, -127, -8), (0xFF, -127, 7)] {
            let cols = 512;
            let qs = vec![byte; QType::Q4.row_bytes(cols)];
            let d = vec![f16::ONE; row_blocks(cols)];
            let acts = QActs {
                qs: vec![x; cols],
                d: vec![1.0; row_blocks(cols)],
                sum8: vec![8 * 32 * x as i32; row_blocks(cols)],
            };
            let want = (level * x as i64 * cols as i64) as f32;
            for n in 1..=MAX_ROWS {
                let xs = vec![&acts; n];
                let mut got = vec![0f32; n];
                dot_rows(QType::Q4, &qs, &d, &xs, &mut got);
                assert!(got.iter().all(|&g| g == want), "{got:?} vs {want}");
            }
        }
    }

    #[test]
    fn simd_matches_scalar_reference_and_float_dot() {
        for t in [QType::Q8, QType::Q4] {
            for cols in [32, 96, 160, 256, 3072, 8192] {
                let w = data(cols, 1);
                let (qs, d) = quantized(t, &w);
                let mut deq = vec![0f32; cols];
                dequantize_row(t, &qs, &d, &mut deq);
                let raw: Vec<Vec<f32>> = (0..MAX_ROWS as u64).map(|s| data(cols, 20 + s)).collect();
                let acts: Vec<QActs> = raw
                    .iter()
                    .map(|x| {
                        let mut a = QActs::default();
                        a.quantize(x);
                        a
                    })
                    .collect();
                for n in 1..=MAX_ROWS {
                    let xs: Vec<&QActs> = acts[..n].iter().collect();
                    let (mut got, mut want) = (vec![0f32; n], vec![0f32; n]);
                    dot_rows(t, &qs, &d, &xs, &mut got);
                    scalar_dot_rows(t, &qs, &d, &xs, &mut want);
                    for j in 0..n {
                        // Same integer sums, float accumulation in another order.
                        let tol = 1e-5 * (cols as f32).sqrt() * want[j].abs().max(1.0);
                        assert!(
                            (got[j] - want[j]).abs() <= tol,
                            "{t:?} {cols} n{n}: {} vs {}",
                            got[j],
                            want[j]
                        );
                        // And the quantized dot is the float dot of the dequantized weights
                        // within the activation rounding (≤ half a step of 1/127 per block).
                        let exact: f32 = deq.iter().zip(&raw[j]).map(|(a, b)| a * b).sum();
                        let bound: f32 =
                            deq.iter().map(|a| a.abs()).sum::<f32>() * 0.5 / 127.0 * 0.5;
                        assert!(
                            (got[j] - exact).abs() <= bound + 1e-4,
                            "{t:?} {cols}: {} vs {exact}",
                            got[j]
                        );
                    }
                }
            }
        }
    }
}
