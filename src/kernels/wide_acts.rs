//! Block-quantized weights against 16-bit activations: the few-row products (decode, small
//! batches) without the 8-bit activation rounding of [`super::quant`].
//!
//! Why: on trained weights the 8-bit activations, not the 8-bit weights, cost most of q8's
//! accuracy (SmolLM2-135M, 8 × 512 tokens of GPL-3: mean KL 0.0040 with 8-bit activations
//! against 0.00135 for the weight rounding alone). A decode step reads each weight byte once and
//! is bound by memory, so the products have room for wider activations.
//!
//! Activations are rounded per block of 32 to i16 with the scale `max|x| / 32767` (a relative
//! step of 2^-15 of the block's largest value: finer than bf16's 2^-8 per value). Weights are
//! widened to 16-bit lanes on the fly and multiplied in pairs into 32-bit lanes (`vpmaddwd`).
//! Read as sixteen 16-bit lanes, a 32-byte chunk of Q8 codes ([`super::quant::pos8`]: bytes
//! `4b..4b+4` belong to block `b`) gives its even bytes by a shift left and right, its odd
//! bytes by one arithmetic shift right; a 32-byte word of Q4 nibbles gives four such halves by
//! shifts and masks (Q5 / Q6 first rebuild their two chunks' codes, `quant::low_bit_pair`). So activations are stored chunk by chunk as the values at even positions,
//! then those at odd positions ([`pos16`]): each multiply then pairs positions `4b` and `4b+2`
//! (or `4b+1` and `4b+3`), both of block `b`, and every block's sum lands in its own 32-bit
//! lane, with no lane crossing. Q4 / Q5 / Q6 codes are multiplied unsigned; `8·Σx` (`16·`,
//! `32·`) per block comes off afterwards (Q4M / Q5M: `m·Σq·x − o·Σx` with the block's zero point,
//! `quant::corrected`). The integer sums are exact (a lane takes at most 32 · 128 · 32767 < 2^31), so the
//! only roundings are the weights', the activations' 2^-15 and the f32 sums of the block sums.
//!
//! Kernels: the scalar reference, AVX2 (which AVX-512 machines run too: `vpdpwssd` would fuse
//! the multiply and the add there, not written yet) and NEON.

use half::f16;

use super::quant::{block_terms, padded, pos8, value, QType, BLOCK};
use super::{cpu, Isa};

/// One activation row rounded to i16 blocks.
#[derive(Clone, Debug, Default)]
pub struct QActs16 {
    /// Element `e` at [`pos16`]`(e)`.
    pub qs: Vec<i16>,
    /// Per block: `max|x| / 32767`.
    pub d: Vec<f32>,
    /// Per block: 8 × the sum of the block's values (the offset of unsigned Q4 nibbles).
    pub sum8: Vec<i32>,
}

/// Position of element `e` of a row in the 16-bit activation layout: its place `p` in the Q8
/// layout's 32-value chunk, with the chunk's even places first (`p / 2`), then its odd ones.
#[inline]
pub fn pos16(e: usize) -> usize {
    let p = pos8(e);
    let j = p % 32;
    p - j + j % 2 * 16 + j / 2
}

impl QActs16 {
    /// Rounds `x` (logical columns), reusing this buffer's allocations.
    pub fn quantize(&mut self, x: &[f32]) {
        match cpu() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: cpu() returns Avx2 only after detecting avx2 and fma.
            Isa::Avx2 => unsafe { avx2::quantize(self, x) },
            _ => quantize_generic(self, x),
        }
    }
}

/// Inlined into an AVX2 copy too, where `round_ties_even` is one vector instruction instead of
/// a libm call per value.
#[inline(always)]
fn quantize_generic(a: &mut QActs16, x: &[f32]) {
    let p = padded(x.len());
    a.qs.resize(p, 0);
    a.d.resize(p / BLOCK, 0.0);
    a.sum8.resize(p / BLOCK, 0);
    for b in 0..p / BLOCK {
        let block = &x[(b * BLOCK).min(x.len())..((b + 1) * BLOCK).min(x.len())];
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 32767.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let mut q = [0i16; BLOCK];
        for (q, v) in q.iter_mut().zip(block) {
            // |v · inv| ≤ 32767 up to rounding, which the clamp absorbs.
            *q = (v * inv).round_ties_even().clamp(-32767.0, 32767.0) as i16;
        }
        for (k, &v) in q.iter().enumerate() {
            a.qs[pos16(b * BLOCK + k)] = v;
        }
        a.d[b] = scale;
        a.sum8[b] = 8 * q.iter().map(|&v| v as i32).sum::<i32>();
    }
}

/// Whether this CPU has a vector kernel for 16-bit activations (else the 8-bit path is faster
/// and `auto` keeps it).
pub fn available() -> bool {
    matches!(cpu(), Isa::Avx2 | Isa::Neon)
}

/// Which activations meet block-quantized weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuantActs {
    /// 16-bit for Q8 weights in products of at most [`FEW_ROWS`] activation rows (decode,
    /// small batches), 8-bit elsewhere. Measured on an AVX2 EPYC (Zen 2), 2 threads, synthetic
    /// Phi-4-mini shapes (8 layers), 16-token prompt and 64 decode steps, four alternating
    /// rounds, decode tok/s i8 / i16: q8 16.0 / 16.0 (memory-bound: free), q4 30.7 / 32.6.
    /// q4 stays at 8 bits all the same: its nibbles give twice the products per byte, and with
    /// the weights in cache one core does 57 G weights/s with 8-bit activations against 35 with
    /// 16-bit ones (one `vpmaddwd` per cycle on Zen 2), so a machine with more bandwidth per core
    /// would pay for 16 bits, for a KL only 1-3 % lower (the weights' rounding dominates).
    /// q8's KL on SmolLM2-135M (8 × 512 tokens of GPL-3) falls from 0.0040 to 0.00137, against
    /// 0.00135 for the weight rounding alone. 8-bit everywhere on CPUs without a 16-bit kernel
    /// ([`available`]).
    #[default]
    Auto,
    /// 8-bit everywhere, as llama.cpp does for its Q8_0 / Q4_0 products.
    I8,
    /// 16-bit everywhere: a prefill rounds like decode (slower prefill); what `phi4 perplexity`
    /// needs to measure the accuracy decode gets.
    I16,
}

impl QuantActs {
    pub fn parse(s: &str) -> Result<QuantActs, String> {
        match s {
            "auto" => Ok(QuantActs::Auto),
            "i8" => Ok(QuantActs::I8),
            "i16" => Ok(QuantActs::I16),
            _ => Err(format!(
                "unknown activation precision {s:?} for quantized weights (expected auto, i8 or i16)"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantActs::Auto => "auto",
            QuantActs::I8 => "i8",
            QuantActs::I16 => "i16",
        }
    }

    /// Whether a product of `n` activation rows with `t` weights takes the 16-bit path.
    pub fn wide(self, t: QType, n: usize) -> bool {
        match self {
            QuantActs::Auto => t == QType::Q8 && n <= FEW_ROWS && available(),
            QuantActs::I8 => false,
            QuantActs::I16 => true,
        }
    }
}

/// Activation rows up to which `auto` picks 16-bit activations for Q8: decode batches of up to
/// four streams round like a single stream. (At four rows the weights come from cache often
/// enough that the products count: 64 × 3072 Q8 rows in L2, one core, 8.8 G weight reads/s
/// against 10.0 with 8-bit activations.)
pub const FEW_ROWS: usize = 4;

/// Most activation rows one call takes.
pub const MAX_ROWS: usize = 4;

/// Scalar reference: `out[j] = w · xs[j]` for one quantized weight row.
pub fn scalar_dot_rows(t: QType, qs: &[u8], d: &[f16], xs: &[&QActs16], out: &mut [f32]) {
    for (o, x) in out.iter_mut().zip(xs) {
        let mut acc = 0f32;
        for (b, db) in d.iter().enumerate() {
            let (scale, mult, zero) = block_terms(t, *db);
            let isum: i32 = (b * BLOCK..(b + 1) * BLOCK)
                .map(|e| value(t, qs, e, d.len()) * x.qs[pos16(e)] as i32)
                .sum();
            let isum = mult * isum - zero * (x.sum8[b] >> 3);
            acc += scale * x.d[b] * isum as f32;
        }
        *o = acc;
    }
}

/// `out[i * xs.len() + j] = w_i · xs[j]` for the consecutive stored weight rows `w_i` in `qs` /
/// `d` (`xs.len() <= MAX_ROWS`), with the CPU's best kernel.
pub fn dot_rows(t: QType, qs: &[u8], d: &[f16], xs: &[&QActs16], out: &mut [f32]) {
    let n = xs.len();
    assert!(n > 0 && n <= MAX_ROWS && out.len().is_multiple_of(n));
    let rows = out.len() / n;
    assert!(d.len().is_multiple_of(rows) && qs.len().is_multiple_of(rows));
    let (nb, rb) = (d.len() / rows, qs.len() / rows);
    assert_eq!(rb, nb * t.block_bytes());
    let pnb = nb.div_ceil(8) * 8;
    assert!(
        xs.iter()
            .all(|x| x.d.len() == pnb && x.qs.len() == pnb * BLOCK),
        "activation width differs"
    );
    let isa = cpu();
    for (i, o) in out.chunks_mut(n).enumerate() {
        let (q, s) = (&qs[i * rb..(i + 1) * rb], &d[i * nb..(i + 1) * nb]);
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: cpu() returns Avx2 only after detecting avx2, fma and f16c; the row's and
            // every activation row's lengths are checked above (a partial last group is read
            // with masked loads).
            Isa::Avx2 => unsafe { avx2::dot_rows(t, q, s, xs, o) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: cpu() returns Neon only after detecting it; lengths checked above.
            Isa::Neon if nb.is_multiple_of(8) => unsafe { neon::dot_rows(t, q, s, xs, o) },
            #[cfg(target_arch = "aarch64")]
            // The NEON kernel reads whole groups: a row ending in a partial one goes widened.
            // SAFETY: as above, for the widened row of whole groups.
            Isa::Neon => super::quant::with_widened_row(t, q, s, |q, s| unsafe {
                neon::dot_rows(t, q, s, xs, o)
            }),
            _ => scalar_dot_rows(t, q, s, xs, o),
        }
    }
}

/// The same products with Advanced SIMD: `vld2q` splits a chunk's bytes into its even and odd
/// positions (the activation layout's two halves), which are widened to 16 bits and multiplied
/// into 32-bit lanes by `smlal` / `smlal2`; two neighbouring lanes per block, one pairwise add
/// per four blocks at the end of a group. Tested against the scalar reference under
/// qemu-aarch64 (`bash scripts/test_aarch64.sh`); not timed on an Arm machine.
#[cfg(target_arch = "aarch64")]
mod neon {
    use super::super::quant::{by_rows_and_type, offset_shift};
    use super::{QActs16, QType};
    use half::f16;
    use std::arch::aarch64::*;

    #[target_feature(enable = "neon")]
    pub unsafe fn dot_rows(t: QType, qs: &[u8], d: &[f16], xs: &[&QActs16], out: &mut [f32]) {
        by_rows_and_type!(t, xs, |N, B, Z| dot_n::<N, B, Z>(qs, d, xs, out))
    }

    /// Chunk `c` of a group as 16-bit values: `[even, odd]` positions, each as blocks 0–3 and
    /// blocks 4–7.
    type Chunk = [[int16x8_t; 2]; 2];

    #[inline(always)]
    unsafe fn widen_s8(v: int8x16_t) -> [int16x8_t; 2] {
        [vmovl_s8(vget_low_s8(v)), vmovl_high_s8(v)]
    }

    #[inline(always)]
    unsafe fn widen_u8(v: uint8x16_t) -> [int16x8_t; 2] {
        [
            vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(v))),
            vreinterpretq_s16_u16(vmovl_high_u8(v)),
        ]
    }

    #[inline(always)]
    unsafe fn dot_n<const N: usize, const B: usize, const Z: bool>(
        qs: &[u8],
        d: &[f16],
        xs: &[&QActs16],
        out: &mut [f32],
    ) {
        let group_bytes = 32 * B;
        let mut acc = [[vdupq_n_f32(0.0); 2]; N];
        for g in 0..d.len() / 8 {
            let (dw, zero) = super::super::quant::neon_scales::<B, Z>(&d[g * 8..]);
            let w = qs.as_ptr().add(g * group_bytes);
            let mut chunks = [[[vdupq_n_s16(0); 2]; 2]; 8];
            if B < 8 {
                let m4 = vdupq_n_u8(15);
                for m in 0..4 {
                    let v = vld2q_u8(w.add(32 * m));
                    // [chunk 2m, 2m + 1][even bytes, odd bytes] as unsigned codes.
                    let mut p = [
                        [vandq_u8(v.0, m4), vandq_u8(v.1, m4)],
                        [vshrq_n_u8::<4>(v.0), vshrq_n_u8::<4>(v.1)],
                    ];
                    if B > 4 {
                        // Q5 / Q6: the high bits from their word (see `quant::high_pos`).
                        let (hb, per) = (B - 4, 8 / (B - 4));
                        let hv = vld2q_u8(w.add(32 * (4 + 2 * m / per)));
                        let mask = vdupq_n_u8(((1 << hb) - 1) as u8);
                        for (i, pi) in p.iter_mut().enumerate() {
                            let at = vdupq_n_s8(-((hb * ((2 * m + i) % per)) as i8));
                            for (j, hj) in [hv.0, hv.1].into_iter().enumerate() {
                                let bits = vandq_u8(vshlq_u8(hj, at), mask);
                                pi[j] = vorrq_u8(pi[j], vshlq_n_u8::<4>(bits));
                            }
                        }
                    }
                    chunks[2 * m] = [widen_u8(p[0][0]), widen_u8(p[0][1])];
                    chunks[2 * m + 1] = [widen_u8(p[1][0]), widen_u8(p[1][1])];
                }
            } else {
                for (c, ch) in chunks.iter_mut().enumerate() {
                    let v = vld2q_s8(w.add(32 * c) as *const i8);
                    *ch = [widen_s8(v.0), widen_s8(v.1)];
                }
            }
            for r in 0..N {
                let x = xs[r].qs.as_ptr().add(g * 256);
                // a[q]: blocks 2q and 2q + 1, two lanes each.
                let mut a = [vdupq_n_s32(0); 4];
                for (c, ch) in chunks.iter().enumerate() {
                    let ch: &Chunk = ch;
                    for (half, wv) in ch.iter().enumerate() {
                        for (k, w) in wv.iter().enumerate() {
                            let xv = vld1q_s16(x.add(32 * c + 16 * half + 8 * k));
                            a[2 * k] = vmlal_s16(a[2 * k], vget_low_s16(*w), vget_low_s16(xv));
                            a[2 * k + 1] = vmlal_high_s16(a[2 * k + 1], *w, xv);
                        }
                    }
                }
                let mut sums = [vpaddq_s32(a[0], a[1]), vpaddq_s32(a[2], a[3])];
                let dx = xs[r].d.as_ptr().add(g * 8);
                for h in 0..2 {
                    let c = vld1q_s32(xs[r].sum8.as_ptr().add(g * 8 + 4 * h));
                    if Z {
                        // Q4M / Q5M: m·Σq·x − o·Σx (m = 2, 1: `quant::zero_mult`).
                        let o = vld1q_s32(zero.as_ptr().add(4 * h));
                        let ms = if B == 4 {
                            vaddq_s32(sums[h], sums[h])
                        } else {
                            sums[h]
                        };
                        sums[h] = vmlsq_s32(ms, o, vshrq_n_s32::<3>(c));
                    } else if B < 8 {
                        // The unsigned codes' offset: 8·Σx for Q4, 16, 32 for Q5, Q6.
                        let c = vshlq_s32(c, vdupq_n_s32(offset_shift(B) as i32));
                        sums[h] = vsubq_s32(sums[h], c);
                    }
                    let scale =
                        vmulq_f32(vld1q_f32(dw.as_ptr().add(4 * h)), vld1q_f32(dx.add(4 * h)));
                    acc[r][h] = vfmaq_f32(acc[r][h], vcvtq_f32_s32(sums[h]), scale);
                }
            }
        }
        for r in 0..N {
            out[r] = vaddvq_f32(vaddq_f32(acc[r][0], acc[r][1]));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::quant::by_rows_and_type;
    use super::{QActs16, QType};
    use half::f16;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn quantize(a: &mut QActs16, x: &[f32]) {
        super::quantize_generic(a, x)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows(t: QType, qs: &[u8], d: &[f16], xs: &[&QActs16], out: &mut [f32]) {
        by_rows_and_type!(t, xs, |N, B, Z| dot_n::<N, B, Z>(qs, d, xs, out))
    }

    /// Group `g`'s block sums (weights loaded unit by unit by `w`, scales and zero points as
    /// `quant::group_scales` gives them) against N activation rows, scaled into `acc`.
    #[inline(always)]
    unsafe fn add_group<const N: usize, const B: usize, const Z: bool>(
        g: usize,
        w: impl Fn(usize) -> __m256i,
        (dw, zero): (__m256, __m256i),
        xs: &[&QActs16],
        xp: &[*const i16; N],
        acc: &mut [__m256; N],
    ) {
        let low4 = _mm256_set1_epi16(15);
        let x =
            |r: usize, i: usize| _mm256_loadu_si256(xp[r].add(g * 256 + 16 * i) as *const __m256i);
        // Lane b: block b. Two sums per row halve the dependency chains.
        let mut s = [[_mm256_setzero_si256(); 2]; N];
        if B < 8 {
            for m in 0..4 {
                // Chunk 2m then 2m + 1; even bytes, odd bytes.
                let halves = if B == 4 {
                    // Q4 straight from the word: its low nibbles, then its high ones.
                    let v = w(m);
                    [
                        _mm256_and_si256(v, low4),
                        _mm256_and_si256(_mm256_srli_epi16::<8>(v), low4),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(v), low4),
                        _mm256_srli_epi16::<12>(v),
                    ]
                } else {
                    let [c0, c1] = super::super::quant::low_bit_pair::<B>(&w, m);
                    let low8 = _mm256_set1_epi16(0xFF);
                    [
                        _mm256_and_si256(c0, low8),
                        _mm256_srli_epi16::<8>(c0),
                        _mm256_and_si256(c1, low8),
                        _mm256_srli_epi16::<8>(c1),
                    ]
                };
                for (r, sr) in s.iter_mut().enumerate() {
                    for (i, h) in halves.iter().enumerate() {
                        let p = _mm256_madd_epi16(*h, x(r, 4 * m + i));
                        sr[i % 2] = _mm256_add_epi32(sr[i % 2], p);
                    }
                }
            }
        } else {
            for c in 0..8 {
                let v = w(c);
                let even = _mm256_srai_epi16::<8>(_mm256_slli_epi16::<8>(v));
                let odd = _mm256_srai_epi16::<8>(v);
                for (r, sr) in s.iter_mut().enumerate() {
                    let p = _mm256_add_epi32(
                        _mm256_madd_epi16(even, x(r, 2 * c)),
                        _mm256_madd_epi16(odd, x(r, 2 * c + 1)),
                    );
                    sr[c % 2] = _mm256_add_epi32(sr[c % 2], p);
                }
            }
        }
        for r in 0..N {
            let mut sums = _mm256_add_epi32(s[r][0], s[r][1]);
            if B < 8 {
                // The unsigned codes' offset: 8·Σx for Q4, 16, 32 for Q5, Q6; Q4M's zero points.
                let sum8 = xs[r].sum8.as_ptr().add(g * 8);
                sums = super::super::quant::corrected::<B, Z>(sums, sum8, zero);
            }
            let dx = _mm256_loadu_ps(xs[r].d.as_ptr().add(g * 8));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(dw, dx), acc[r]);
        }
    }

    /// One stored row (whole groups, then possibly a partial one, read as the 8-bit kernel
    /// reads it: `quant::avx2::dot_n`) against N activation rows.
    #[inline(always)]
    unsafe fn dot_n<const N: usize, const B: usize, const Z: bool>(
        qs: &[u8],
        d: &[f16],
        xs: &[&QActs16],
        out: &mut [f32],
    ) {
        let group_bytes = 32 * B;
        let mut xp = [std::ptr::null::<i16>(); N];
        for r in 0..N {
            xp[r] = xs[r].qs.as_ptr();
        }
        let mut acc = [_mm256_setzero_ps(); N];
        let groups = d.len() / 8;
        for g in 0..groups {
            let w = qs.as_ptr().add(g * group_bytes);
            super::super::quant::prefetch_group(w, group_bytes);
            let sc = super::super::quant::load_scales::<B, Z>(d.as_ptr().add(g * 8));
            let load = |u: usize| _mm256_loadu_si256(w.add(32 * u) as *const __m256i);
            add_group::<N, B, Z>(g, load, sc, xs, &xp, &mut acc);
        }
        let width = d.len() % 8;
        if width > 0 {
            let (w, mask, raw) = super::super::quant::partial_group(qs, d, group_bytes);
            let load = |u: usize| _mm256_maskload_epi32(w.add(width * u), mask);
            let sc = super::super::quant::group_scales::<B, Z>(raw);
            add_group::<N, B, Z>(groups, load, sc, xs, &xp, &mut acc);
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
    use crate::kernels::quant::dequantize_row;
    use crate::kernels::quant::tests::{quantized, TAIL_WIDTHS};
    use crate::kernels::test_data as data;

    /// Blocks of a row as the kernels read it, and its bytes.
    fn row_blocks(cols: usize) -> usize {
        padded(cols) / BLOCK
    }

    fn acts(x: &[f32]) -> QActs16 {
        let mut a = QActs16::default();
        a.quantize(x);
        a
    }

    #[test]
    fn vector_rounding_equals_the_scalar_one() {
        let mut rows: Vec<Vec<f32>> = (0..20).map(|s| data(300, s)).collect();
        // Ties (x / d = k + 0.5 exactly) round to even in both.
        rows.push(
            (0..64)
                .map(|k| if k == 0 { 32767.0 } else { k as f32 + 0.5 })
                .collect(),
        );
        rows.push(vec![0.0; 40]);
        for x in &rows {
            let mut want = QActs16::default();
            quantize_generic(&mut want, x);
            let got = acts(x);
            assert_eq!((&got.qs, &got.d), (&want.qs, &want.d));
        }
        let tie = acts(&rows[20]);
        let codes: Vec<i16> = (1..4).map(|e| tie.qs[pos16(e)]).collect();
        assert_eq!(codes, [2, 2, 4]);
    }

    #[test]
    fn kernels_match_the_scalar_reference_and_the_float_product() {
        for t in QType::ALL {
            for cols in TAIL_WIDTHS {
                let rows = 3;
                let (nb, rb) = (t.row_bytes(cols) / t.block_bytes(), t.row_bytes(cols));
                let (mut qs, mut d) = (vec![0u8; rows * rb], vec![f16::ZERO; rows * nb]);
                let mut deq = vec![0f32; rows * cols];
                for r in 0..rows {
                    let (q, s) = quantized(t, &data(cols, 60 + r as u64));
                    dequantize_row(t, &q, &s, &mut deq[r * cols..(r + 1) * cols]);
                    qs[r * rb..(r + 1) * rb].copy_from_slice(&q);
                    d[r * nb..(r + 1) * nb].copy_from_slice(&s);
                }
                let raw: Vec<Vec<f32>> = (0..MAX_ROWS as u64).map(|s| data(cols, 9 + s)).collect();
                let xs16: Vec<QActs16> = raw.iter().map(|x| acts(x)).collect();
                for n in 1..=MAX_ROWS {
                    let xs: Vec<&QActs16> = xs16[..n].iter().collect();
                    let mut got = vec![0f32; rows * n];
                    dot_rows(t, &qs, &d, &xs, &mut got);
                    for r in 0..rows {
                        let mut want = vec![0f32; n];
                        let (q, s) = (&qs[r * rb..(r + 1) * rb], &d[r * nb..(r + 1) * nb]);
                        scalar_dot_rows(t, q, s, &xs, &mut want);
                        let w = &deq[r * cols..(r + 1) * cols];
                        for j in 0..n {
                            let g = got[r * n + j];
                            // Same integer sums, f32 accumulation in another order.
                            let tol = 1e-5 * (cols as f32).sqrt() * want[j].abs().max(1.0);
                            assert!(
                                (g - want[j]).abs() <= tol,
                                "{t:?} {cols} n{n}: {g} vs {}",
                                want[j]
                            );
                            // Against the f32 product of the dequantized weights: within the
                            // activations' half step of 2^-15 of each block's largest value
                            // (|x| ≤ 0.5 here), plus f32 rounding.
                            let exact: f32 = w.iter().zip(&raw[j]).map(|(a, b)| a * b).sum();
                            let bound =
                                w.iter().map(|a| a.abs()).sum::<f32>() * 0.5 * 0.5 / 32767.0;
                            assert!(
                                (g - exact).abs() <= bound + 2e-6 * (cols as f32).sqrt(),
                                "{t:?} {cols} n{n}: {g} vs exact {exact}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn extreme_codes_and_activations_do_not_overflow() {
        // Q8 codes -128 / 127 and Q4 levels -8 / 7 (and the rest) against -32767 in every
        // position: the largest 32-bit lane sums the kernel forms.
        let cols = 512;
        let x = QActs16 {
            qs: vec![-32767; cols],
            d: vec![1.0; cols / BLOCK],
            sum8: vec![8 * 32 * -32767; cols / BLOCK],
        };
        // (format, every byte, zero point in the scale word, the weight each value then is).
        for (t, byte, o, level) in [
            (QType::Q8, 0x80u8, 0u16, -128f64),
            (QType::Q8, 0x7F, 0, 127.0),
            (QType::Q4, 0x00, 0, -8.0),
            (QType::Q4, 0xFF, 0, 7.0),
            (QType::Q6, 0x00, 0, -32.0),
            (QType::Q6, 0xFF, 0, 31.0),
            // Zero points at both ends: the largest sums of `m·Σq·x − o·Σx`.
            (QType::Q4M, 0xFF, 0, 15.0),
            (QType::Q4M, 0x00, 31, -15.5),
            (QType::Q5M, 0xFF, 0, 31.0),
            (QType::Q5M, 0x00, 31, -31.0),
        ] {
            let qs = vec![byte; row_blocks(cols) * t.block_bytes()];
            let d = vec![f16::from_bits(f16::ONE.to_bits() | o); cols / BLOCK];
            let want = (level * -32767.0 * cols as f64) as f32;
            for n in 1..=MAX_ROWS {
                let mut got = vec![0f32; n];
                dot_rows(t, &qs, &d, &vec![&x; n], &mut got);
                // Exact integer sums; only the f32 adds of the block sums round.
                let close = |g: f32| (g - want).abs() <= want.abs() * 1e-6;
                assert!(got.iter().all(|&g| close(g)), "{t:?}: {got:?} vs {want}");
            }
        }
    }
}
