//! Quantized prefill on AVX-512 VNNI: each thread's chunk of (up to 64) weight rows is repacked
//! into panels where one 512-bit vector holds four values of one block for 16 rows, so that
//! `vpdpbusd` against a broadcast 32-bit group of four activation values adds into 16 row
//! outputs at once. A pass keeps 3 activation rows × 4 vectors of block sums and as many f32
//! sums in registers; each block ends with one conversion and one multiply-add per register.
//!
//! The kernel it replaces for many activation rows ([`super::quant::dot_row_pair`], 2 weight
//! rows × 4 activation rows in 256-bit registers) spends 5 instructions per 8 `vpdpbusd` on
//! scales and offsets, extracts Q4 nibbles again on every pass, and spills registers. Here
//! codes are unpacked once, when packing (nibbles, with Q5 / Q6's high bits put back), a
//! block's offset (`8·Σx` for Q4 nibbles, 16 / 32 for Q5 / Q6, `128·Σx` for Q8 values made
//! unsigned; Q4M / Q5M: `o·Σx` with each row's zero point, one `vpmulld` per vector) is the
//! value its sums start from, and scales cost 3 instructions per 8 `vpdpbusd` of twice the
//! width. Q5, Q6, Q4M and Q5M took the row-pair kernel until 2026-12-06: on Zen 5 (2 threads,
//! 512 rows) q5 315 → 515 G products/s with panels, and an 8-layer 512-token prefill
//! (`phi4 bench --synthetic --layers 8 --quant Q`, tok/s, two alternating pairs) q5 330 →
//! 478, q6 311 → 411, q4m 338 → 462, q5m 302 → 439. Measured, 512 activation rows, 2 threads,
//! G products/s old / panels (four alternating pairs): Q4 16384 × 3072 235 / 285, 3072 × 8192
//! 172 / 276; Q8 239 / 310, 178 / 252 (`vpdpbusd`'s peak here is ~460). 512-token prefill,
//! tok/s, three alternating pairs: q4 58.6–63.5 / 74.8–75.6, q8 49.9–55.1 / 72.9–76.1, q4-edge
//! 51.1–55.0 / 73.9–77.9. Packing is 3 % of the q4 prefill's samples. Fetching the next
//! panel's weights into L2 during the passes, as the bf16 panels do, gained nothing here
//! (prefill in one process, with / without alternating, pair ratios: q4 512 tokens 0.94–1.07,
//! median 0.98; 128 tokens 0.94–1.01; q8 64 tokens 0.93–1.04), so there is none.
//!
//! Per block and pair of (activation row, 16 rows), 8 `vpdpbusd` and 3 scale instructions share
//! the two multiply pipes: ~73 % of the `vpdpbusd` peak at best. Within a 512-token q4 prefill
//! (80 tok/s, 3.2 G products per token, the kernel ~80 % of the non-loading samples) it runs
//! at ~320 G products/s on two cores, about 70 %.

use half::f16;

use super::matmul::{with_buffer, ChunkOut, ROW_CHUNK};
use super::quant::{QActs, QType, BLOCK};

/// Activation rows per pass: 3 × 4 block sums, 3 × 4 f32 sums, 4 weight vectors and a
/// broadcast fill 29 of the 32 vector registers.
const TOKENS: usize = 3;
/// Blocks per panel: 64 rows × 8 blocks is 20 KB of codes, scales and zero points, which stay in
/// L1 (32 KB or more on every CPU seen) while the activations pass; 32 blocks (80 KB) were read
/// from L2 on every pass. `phi4 bench --kernels`, 512 rows, Zen 5 (48 KB L1), 2 threads, six
/// alternating rounds, mean over the four shapes, ratios of the rounds' medians: 16 blocks
/// against 32 q5 1.11×, q4m 1.13×, q8 1.09×, q4 1.08×; 8 against 16 1.00× (q4m 0.98×).
const PANEL_BLOCKS: usize = 8;
/// 32-bit words per block and vector of 16 rows: 8 steps of 16 rows' four values, the 16 rows'
/// scales as f32, then (Q4M / Q5M) their zero points as i32.
const BLOCK_WORDS: usize = 8 * 16 + 16 + 16;

/// From this many activation rows on, the panels beat [`super::quant::dot_row_pair`]; below,
/// packing (with the weights' reads from memory) is too large a part of the work. 16384 × 3072,
/// G products/s old / panels: Q4 16 rows 108 / 107, 32 rows 179 / 185, 64 rows 215 / 232; Q8
/// 8 rows 55 / 59, 16 rows 148 / 137 (noisy), 32 rows 129 / 166.
pub(super) const MIN_TOKENS: usize = 32;

thread_local! {
    static PANEL: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The `out.len()` weight rows of a chunk (`qs`, `d`: rows of `nb` blocks, whole groups, see
/// [`super::quant::pad_rows`]) against every quantized activation row of `acts`, into `out`.
/// Only where [`super::quant::vnni`] holds.
pub(super) fn panels(
    t: QType,
    qs: &[u8],
    d: &[f16],
    nb: usize,
    acts: &[QActs],
    out: &mut ChunkOut,
) {
    let rb = nb * t.block_bytes();
    let len = out.len();
    assert!(len <= ROW_CHUNK && nb.is_multiple_of(8));
    assert!(qs.len() == len * rb && d.len() == len * nb);
    assert!(acts
        .iter()
        .all(|a| a.d.len() == nb && a.qs.len() == nb * BLOCK));
    assert!(super::quant::vnni(), "quantized panels need AVX-512 VNNI");
    let vectors = len.div_ceil(16);
    let n = acts.len();
    let chunk = (qs, d);
    with_buffer(&PANEL, PANEL_BLOCKS * vectors * BLOCK_WORDS, 1, |panel| {
        for b0 in (0..nb).step_by(PANEL_BLOCKS) {
            let blocks = PANEL_BLOCKS.min(nb - b0);
            // SAFETY (both calls): vnni() holds (asserted); the chunk holds len rows of rb bytes
            // and nb scales, the panel room for `blocks` blocks of `vectors` vectors, every
            // activation row nb blocks, and out.row gives len outputs per activation row.
            unsafe { x86::pack(t, chunk.0, chunk.1, len, nb, b0, blocks, panel) };
            for t0 in (0..n).step_by(TOKENS) {
                let m = TOKENS.min(n - t0);
                let xs: [&QActs; TOKENS] = std::array::from_fn(|i| &acts[t0 + i.min(m - 1)]);
                let ys: [*mut f32; TOKENS] = std::array::from_fn(|i| out.row(t0 + i.min(m - 1)));
                // SAFETY: as above; xs and ys name the same m activation rows.
                unsafe { x86::panel(t, panel, vectors, b0, blocks, &xs[..m], &ys[..m], len) };
            }
        }
    })
}

mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::{QActs, QType, BLOCK_WORDS};
    use crate::kernels::quant::{zero_mult, zero_point};

    /// Packs blocks `b0..b0 + blocks` of the `len` rows (`qs`, `d`; `nb` blocks a row) for
    /// [`panel`]: for block `b` and vector `v` (rows `16v..16v + 16`), at word
    /// `(b·V + v)·BLOCK_WORDS`, eight steps of 16 words, step `j` holding values `4j..4j + 4` of
    /// the block for each of the 16 rows as unsigned bytes (Q8 values plus 128; the low-bit
    /// formats' codes, Q5 / Q6's high bits put back above the nibbles, Q4M's doubled so that its
    /// half-step zero point is a whole one), then the 16 rows' scales as f32 (Q4M / Q5M: `d` over
    /// [`zero_mult`]), then their zero points. Rows past `len` are zero, scale included.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn pack(
        t: QType,
        qs: &[u8],
        d: &[f16],
        len: usize,
        nb: usize,
        b0: usize,
        blocks: usize,
        out: &mut [u32],
    ) {
        let vectors = len.div_ceil(16);
        let rb = t.row_bytes(nb * 32);
        assert!(qs.len() == len * rb && d.len() == len * nb && b0 + blocks <= nb);
        assert!(out.len() >= blocks * vectors * BLOCK_WORDS);
        // Rows hold whole groups of 8 blocks (see `quant::padded`), and panels whole groups.
        assert!(
            b0.is_multiple_of(8) && blocks.is_multiple_of(8),
            "panels cover whole groups"
        );
        let op = out.as_mut_ptr();
        let at = |b: usize, v: usize| op.add(((b - b0) * vectors + v) * BLOCK_WORDS);
        let low = _mm512_set1_epi8(15);
        let flip = _mm512_set1_epi8(-128);
        let group_bytes = 8 * t.block_bytes();
        // The bytes of 16 rows at `offset` in group g, 64 at a time (`bytes` of them, the rest
        // zero), transposed: r[i] holds every row's 32-bit lane i, i.e. block i % 8 of the
        // 32-byte unit i / 8.
        let rows = |v: usize, g: usize, offset: usize, bytes: usize| {
            let mut r = [_mm512_setzero_si512(); 16];
            for (l, r) in r.iter_mut().enumerate().take((len - 16 * v).min(16)) {
                let p = qs
                    .as_ptr()
                    .add((16 * v + l) * rb + g * group_bytes + offset);
                *r = _mm512_maskz_loadu_epi8(u64::MAX >> (64 - bytes), p.cast());
            }
            crate::kernels::bf16::x86::transpose(&mut r);
            r
        };
        for v in 0..vectors {
            let live = (len - 16 * v).min(16);
            for g in b0 / 8..(b0 + blocks) / 8 {
                // Q8: chunks 2k, 2k + 1 (steps of blocks 0..8); the others: words 2k, 2k + 1,
                // each two steps of blocks 0..8 in its nibbles.
                let loads = if t == QType::Q8 { 4 } else { 2 };
                for k in 0..loads {
                    let r = rows(v, g, 64 * k, 64);
                    for (i, r) in r.iter().enumerate() {
                        let b = g * 8 + i % 8;
                        let c = 2 * k + i / 8;
                        if t == QType::Q8 {
                            _mm512_storeu_si512(
                                at(b, v).add(16 * c).cast(),
                                _mm512_xor_si512(*r, flip),
                            );
                        } else {
                            let mut lo = _mm512_and_si512(*r, low);
                            let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(*r), low);
                            if t == QType::Q4M {
                                (lo, hi) = (_mm512_add_epi8(lo, lo), _mm512_add_epi8(hi, hi));
                            }
                            _mm512_storeu_si512(at(b, v).add(16 * (2 * c)).cast(), lo);
                            _mm512_storeu_si512(at(b, v).add(16 * (2 * c + 1)).cast(), hi);
                        }
                    }
                }
                if matches!(t.bits(), 5 | 6) {
                    // The high words after the four nibble words: chunk c's bits at bit
                    // h·(c mod 8 / h) of word c / (8 / h) (see `quant::high_pos`).
                    let h = t.bits() - 4;
                    let per = 8 / h;
                    let r = rows(v, g, 128, 32 * h);
                    let mask = _mm512_set1_epi8((((1 << h) - 1) << 4) as i8);
                    for b in 0..8 {
                        for c in 0..8 {
                            let hw = r[c / per * 8 + b];
                            let shift = (h * (c % per)) as i32;
                            // Moved to bit 4 by a 16-bit shift; bits carried across a byte land
                            // outside the mask.
                            let moved = if shift <= 4 {
                                _mm512_sll_epi16(hw, _mm_cvtsi32_si128(4 - shift))
                            } else {
                                _mm512_srl_epi16(hw, _mm_cvtsi32_si128(shift - 4))
                            };
                            let step = at(g * 8 + b, v).add(16 * c).cast::<__m512i>();
                            let codes = _mm512_or_si512(
                                _mm512_loadu_si512(step.cast()),
                                _mm512_and_si512(moved, mask),
                            );
                            _mm512_storeu_si512(step.cast(), codes);
                        }
                    }
                }
            }
            for b in b0..b0 + blocks {
                let s = at(b, v).add(8 * 16).cast::<f32>();
                let z = at(b, v).add(8 * 16 + 16).cast::<i32>();
                for l in 0..16 {
                    let (scale, zero) = if l >= live {
                        (0.0, 0)
                    } else if t.has_zero() {
                        let (d, o) = zero_point(d[(16 * v + l) * nb + b]);
                        (d / zero_mult(t.bits()) as f32, o)
                    } else {
                        (d[(16 * v + l) * nb + b].to_f32(), 0)
                    };
                    *s.add(l) = scale;
                    *z.add(l) = zero;
                }
            }
        }
    }

    /// `y[i][16v + l] (+)= Σ_b scale_w · scale_x · Σ_k w·x` over the `blocks` blocks of a
    /// [`pack`]ed panel that starts at block `b0`, for the `m = xs.len()` activation rows,
    /// storing the first `len` outputs of each; a panel after a row's first adds onto `y`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn panel(
        t: QType,
        panel: &[u32],
        vectors: usize,
        b0: usize,
        blocks: usize,
        xs: &[&QActs],
        ys: &[*mut f32],
        len: usize,
    ) {
        assert!(panel.len() >= blocks * vectors * BLOCK_WORDS && xs.len() == ys.len());
        assert!(len <= vectors * 16 && len > (vectors - 1) * 16);
        assert!(xs.iter().all(|x| x.d.len() >= b0 + blocks));
        let p = panel.as_ptr();
        let x: [&QActs; 3] = std::array::from_fn(|i| xs[i.min(xs.len() - 1)]);
        let y: [*mut f32; 3] = std::array::from_fn(|i| ys[i.min(ys.len() - 1)]);
        // The offset of the unsigned weights: 8·Σx for Q4 nibbles (16, 32 for Q5, Q6), 128·Σx
        // for Q8 + 128; Q4M / Q5M's own per row and block.
        let shift = super::super::quant::offset_shift(t.bits());
        macro_rules! go {
            ($z:literal, $($m:literal)*) => {
                match (xs.len(), vectors) {
                    $(
                        ($m, 1) => run::<$m, 1, $z>(p, b0, blocks, x, shift, y, len),
                        ($m, 2) => run::<$m, 2, $z>(p, b0, blocks, x, shift, y, len),
                        ($m, 3) => run::<$m, 3, $z>(p, b0, blocks, x, shift, y, len),
                        ($m, 4) => run::<$m, 4, $z>(p, b0, blocks, x, shift, y, len),
                    )*
                    _ => unreachable!("panel shapes are checked by the caller"),
                }
            };
        }
        if t.has_zero() {
            go!(true, 1 2 3)
        } else {
            go!(false, 1 2 3)
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn run<const M: usize, const V: usize, const Z: bool>(
        p: *const u32,
        b0: usize,
        blocks: usize,
        x: [&QActs; 3],
        shift: u32,
        y: [*mut f32; 3],
        len: usize,
    ) {
        let mut sums = [[_mm512_setzero_ps(); V]; M];
        for b in 0..blocks {
            let gb = b0 + b;
            // Where block gb's step 0 sits in an activation row (see `quant::pos8`).
            let xo = gb / 8 * 256 + gb % 8 * 4;
            let blk = p.add(b * V * BLOCK_WORDS);
            let mut acc = [[_mm512_setzero_si512(); V]; M];
            if Z {
                // −o·Σx per row (sum8 is 8·Σx): the zero points' share, exact in integers.
                let mut o = [_mm512_setzero_si512(); V];
                for (v, o) in o.iter_mut().enumerate() {
                    *o = _mm512_loadu_si512(blk.add(v * BLOCK_WORDS + 144).cast());
                }
                for (row, x) in acc.iter_mut().zip(x) {
                    let sx = _mm512_set1_epi32(-(x.sum8[gb] >> 3));
                    for (a, o) in row.iter_mut().zip(o) {
                        *a = _mm512_mullo_epi32(o, sx);
                    }
                }
            } else {
                for (row, x) in acc.iter_mut().zip(x) {
                    *row = [_mm512_set1_epi32(-(x.sum8[gb] << shift)); V];
                }
            }
            for j in 0..8 {
                let w: [__m512i; V] = std::array::from_fn(|v| {
                    _mm512_loadu_si512(blk.add(v * BLOCK_WORDS + 16 * j).cast())
                });
                for (row, x) in acc.iter_mut().zip(x) {
                    let xb = _mm512_set1_epi32(
                        x.qs.as_ptr()
                            .add(xo + 32 * j)
                            .cast::<i32>()
                            .read_unaligned(),
                    );
                    for (a, w) in row.iter_mut().zip(w) {
                        *a = _mm512_dpbusd_epi32(*a, w, xb);
                    }
                }
            }
            let dw: [__m512; V] =
                std::array::from_fn(|v| _mm512_loadu_ps(blk.add(v * BLOCK_WORDS + 128).cast()));
            for ((s, a), x) in sums.iter_mut().zip(&acc).zip(x) {
                let dx = _mm512_set1_ps(x.d[gb]);
                for v in 0..V {
                    s[v] =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[v]), _mm512_mul_ps(dw[v], dx), s[v]);
                }
            }
        }
        for (row, y) in sums.iter().zip(y) {
            crate::kernels::bf16::x86::store_row(row, y, len, b0 > 0);
        }
    }
}
