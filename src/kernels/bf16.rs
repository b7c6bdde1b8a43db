//! bf16 weights against activations rounded to bf16 (`--bf16-acts bf16`, what llama.cpp does for
//! BF16 weights and PyTorch in bf16): on CPUs with AVX-512 BF16 one `vdpbf16ps` does 32 bf16
//! products with f32 sums, twice what an f32 FMA does, and the weights are read as stored
//! instead of widened to f32 first. Rounding costs up to 2⁻⁸ of each activation.
//!
//! The default keeps f32 activations and the f32 kernels of [`super::matmul`](mod@super::matmul),
//! except on AVX-512, where decode and prefill of 32+ rows have their own (`decode_f32`, and
//! `panels` with the weights widened as they are packed). (Splitting each activation into two
//! bf16 parts would keep 16 of its 24 bits at the f32 FMA rate; measured, not kept: its logits
//! drift past the decode parity test's tolerance, see BENCHMARKS.md.) Without AVX-512 BF16 the
//! rounded activations go through those f32 kernels, with the same numbers.
//!
//! Up to 127 rounded rows go as dot products of whole rows (both operands run along the
//! columns), a tile of up to [`TILE_TOKENS`] activation rows against [`TILE_ROWS`] weight rows
//! at a time: 24 f32 accumulators, each summed across its lanes once per row. Weight rows are
//! split across threads in chunks that stay in L2 while every group of activation rows (in L1)
//! passes over them. From 128 rows the weights are packed for broadcast activations instead
//! (`panels`). Decode (one activation row) takes the rounded activations through the f32
//! decode kernels (see `decode_f32`).

use std::cell::RefCell;

use half::bf16;
use rayon::prelude::*;

use super::avx512;
use super::dot::BLOCK_ROWS;
#[cfg(target_arch = "x86_64")]
use super::matmul::ROW_CHUNK;
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
        #[cfg(target_arch = "x86_64")]
        if n >= PANEL_MIN_TOKENS_F32 && avx512() {
            return by_row_chunks(rows, n, y, |r0, out| {
                panels(w, rows, cols, r0, PanelActs::F32(x), n, out)
            });
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
        rounded_products(w, rows, cols, x, held, stride, y)
    });
}

/// [`matmul_bf16`] with bf16 activations: `x` rounded into `held` (rows `stride` apart,
/// `stride > cols`, whatever it held before), then the tiles, or with many rows on AVX-512 BF16
/// the panels.
fn rounded_products(
    w: &[bf16],
    rows: usize,
    cols: usize,
    x: &[f32],
    held: &mut [u16],
    stride: usize,
    y: &mut [f32],
) {
    let n = x.len() / cols;
    assert!(stride > cols && held.len() == n * stride);
    held.par_chunks_mut(stride)
        .zip(x.par_chunks(cols))
        .for_each(|(h, row)| {
            round(row, &mut h[..cols]);
            // The packed kernel reads an odd row's last value as a pair with the one after it,
            // whose weight is packed as zero: a stale value there (inf, say) would make the sum
            // NaN.
            h[cols] = 0;
        });
    let held = &*held;
    if n >= PANEL_MIN_TOKENS && available() {
        #[cfg(target_arch = "x86_64")]
        return by_row_chunks(rows, n, y, |r0, out| {
            panels(w, rows, cols, r0, PanelActs::Bf16 { held, stride }, n, out)
        });
    }
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
}

/// Rows of bf16 activations from which prefill takes [`panels`] instead of [`tile`]: packing
/// costs the same whatever the number of rows. Measured, one layer's four products, 2 threads,
/// G products/s panels / tiles (four alternating reps): 16 rows 90 / 106, 32 rows 124 / 138,
/// 64 rows 155 / 157, 96 rows 141–165 / 152–165, 256 rows 174–200 / 172–193, 512 rows
/// 166–186 / 147–154.
const PANEL_MIN_TOKENS: usize = 128;
/// The same for f32 activations, against widening a block of weights to f32 for the `gemm`
/// crate (from 64 rows) or the pair kernel of [`super::dot`]: same measure, panels / those, 16
/// rows 42–56 / 50–53, 32 rows 63–70 / 53–56, 64 rows 71–93 / 40–53, 96 rows 79–93 / 46–47,
/// 512 rows 94–107 / 70–82 (the f32 FMA peak is ~117 here).
#[cfg(target_arch = "x86_64")]
const PANEL_MIN_TOKENS_F32: usize = 32;
/// Activation rows per pass over a packed panel: 6 × 4 accumulators, 4 weight vectors and one
/// broadcast activation pair fill 29 of the 32 vector registers.
#[cfg(target_arch = "x86_64")]
const PANEL_TOKENS: usize = 6;
/// Steps per packed panel (a column pair each for bf16 activations, a column for f32): 64 rows
/// × 1024 steps of 32 bits is 256 KB, which stays in L2 while the activations stream past it.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const PANEL_STEPS: usize = 1024;

/// The activations [`panels`] reads: rows rounded to bf16 (`stride` apart), whose pairs meet
/// packed weight pairs in `vdpbf16ps`; or the f32 rows themselves, against weights widened to
/// f32 as they are packed, in f32 FMAs. Either way one step reads 32 bits of each row.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum PanelActs<'a> {
    Bf16 { held: &'a [u16], stride: usize },
    F32(&'a [f32]),
}

#[cfg(target_arch = "x86_64")]
impl PanelActs<'_> {
    fn is_f32(self) -> bool {
        matches!(self, PanelActs::F32(_))
    }

    /// Columns per step.
    fn step_cols(self) -> usize {
        if self.is_f32() {
            1
        } else {
            2
        }
    }

    /// Row `t` from column `c` on.
    fn at(self, t: usize, c: usize, cols: usize) -> *const u8 {
        match self {
            PanelActs::Bf16 { held, stride } => held[t * stride + c..].as_ptr().cast(),
            PanelActs::F32(x) => x[t * cols + c..].as_ptr().cast(),
        }
    }
}

/// Rows `r0..r0 + out.len()` (≤ 64) of `w` against all `n` activation rows, for prefill.
/// `vdpbf16ps` multiplies pairs of bf16 in each 32-bit lane, so with bf16 activations the
/// chunk's weights are packed for it first, [`PANEL_STEPS`] pairs at a time: for each column
/// pair, the pairs of 16 rows side by side in one vector ([`x86::pack`]); with f32 activations
/// one column of 16 rows, widened to f32. Then each step takes four such vectors (64 rows) and
/// one 32-bit broadcast per activation row, and the 6 × 4 accumulators hold 16 outputs each,
/// stored as they stand: no lane sums and fewer loads per product than [`tile`]'s dot products
/// (10 per 24 `vdpbf16ps` there, with the weight rows passing through L1 beside the
/// activations; 4 vectors and 6 broadcasts from L1/L2 here), and no separate widening pass as
/// for the `gemm` crate.
///
/// Packing is where the weights come from memory (once per prefill): 3–4 % of a 512-token
/// prefill's samples (`perf`). While the activations pass over one panel, the last passes
/// prefetch the next panel's weights (the next columns, or the next chunk's rows, which rayon
/// mostly gives the same thread) into L2, one cache line every 8 steps: bf16 prefill of 512
/// tokens with / without, seven alternating pairs, 1.04–1.13× (median 1.07×).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn panels(
    w: &[bf16],
    rows: usize,
    cols: usize,
    r0: usize,
    acts: PanelActs,
    n: usize,
    out: &mut ChunkOut,
) {
    let len = out.len();
    assert!(len <= ROW_CHUNK && r0 + len <= rows && w.len() == rows * cols);
    match acts {
        PanelActs::Bf16 { held, stride } => assert!(held.len() >= n * stride && stride > cols),
        PanelActs::F32(x) => assert_eq!(x.len(), n * cols),
    }
    let vectors = len.div_ceil(16);
    let groups = n.div_ceil(PANEL_TOKENS);
    let chunk = &w[r0 * cols..(r0 + len) * cols];
    let panel_cols = PANEL_STEPS * acts.step_cols();
    with_buffer(
        &PANEL,
        vectors * 16 * PANEL_STEPS,
        1,
        |panel: &mut [u32]| {
            for c0 in (0..cols).step_by(panel_cols) {
                let kc = panel_cols.min(cols - c0);
                let steps = kc.div_ceil(acts.step_cols());
                // SAFETY (both calls): panels runs only where avx512() holds, and for bf16
                // activations available(); `chunk` has len rows of cols, the panel room for vectors
                // × 16 × steps values, each bf16 activation row one value past cols (stride > cols),
                // and out.row gives len outputs per token.
                unsafe { x86::pack(chunk, len, cols, c0, kc, acts.is_f32(), panel) };
                // The next panel's weights: rows nr0.. (up to 64), columns nc0..nc0 + nk.
                let (nr0, nc0) = if c0 + kc < cols {
                    (r0, c0 + kc)
                } else {
                    (r0 + len, 0)
                };
                let nlen = ROW_CHUNK.min(rows.saturating_sub(nr0));
                let row_lines = (panel_cols.min(cols - nc0) * 2).div_ceil(64);
                // Each of the last passes takes `per` of those rows.
                let per = nlen.div_ceil(groups);
                let first = groups - nlen.div_ceil(per.max(1));
                for (g, t0) in (0..n).step_by(PANEL_TOKENS).enumerate() {
                    let pr = if g >= first {
                        ((g - first) * per).min(nlen)
                    } else {
                        nlen
                    };
                    let ahead = x86::Ahead {
                        at: w[(nr0 + pr).min(rows - 1) * cols + nc0..].as_ptr().cast(),
                        row_bytes: cols * 2,
                        lines: per.min(nlen - pr) * row_lines,
                        row_lines,
                    };
                    let m = PANEL_TOKENS.min(n - t0);
                    let xs: [*const u8; PANEL_TOKENS] =
                        std::array::from_fn(|i| acts.at(t0 + i.min(m - 1), c0, cols));
                    let ys: [*mut f32; PANEL_TOKENS] =
                        std::array::from_fn(|i| out.row(t0 + i.min(m - 1)));
                    unsafe {
                        x86::panel(
                            panel,
                            vectors,
                            steps,
                            &xs[..m],
                            &ys[..m],
                            len,
                            c0 > 0,
                            ahead,
                            acts.is_f32(),
                        )
                    };
                }
            }
        },
    )
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
    static PANEL: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
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
pub(super) mod x86 {
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

    /// Packs columns `c0..c0 + kc` of the `len` rows of `w` (row length `cols`) for [`panel`]:
    /// `out[(k * V + v) * 16 + l]` = step `k` of row `16 v + l`, with `V = len / 16` rounded up:
    /// the bf16 pair at columns `c0 + 2k`, `c0 + 2k + 1`, or with `widen` the value at column
    /// `c0 + k` as f32. Rows past `len` and a column past `c0 + kc` are zero.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn pack(
        w: &[half::bf16],
        len: usize,
        cols: usize,
        c0: usize,
        kc: usize,
        widen: bool,
        out: &mut [u32],
    ) {
        let vectors = len.div_ceil(16);
        let per = if widen { 1 } else { 2 };
        let steps = kc.div_ceil(per);
        assert!(len * cols <= w.len() && c0 + kc <= cols && out.len() >= steps * vectors * 16);
        let (wp, op) = (w.as_ptr().cast::<u16>(), out.as_mut_ptr());
        for v in 0..vectors {
            for k0 in (0..steps).step_by(16) {
                let c = c0 + per * k0;
                let left = (c0 + kc - c).min(16 * per);
                let mask = (u64::MAX >> (64 - left)) as __mmask32;
                // Rows past len: an all-zero mask, which reads nothing.
                let mut r: [__m512i; 16] = std::array::from_fn(|l| {
                    let row = 16 * v + l;
                    let m = if row < len { mask } else { 0 };
                    let at = wp.wrapping_add(row * cols + c).cast();
                    if widen {
                        let h = _mm256_maskz_loadu_epi16(m as __mmask16, at);
                        _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h))
                    } else {
                        _mm512_maskz_loadu_epi16(m, at)
                    }
                });
                transpose(&mut r);
                for (i, r) in r.iter().take(steps - k0).enumerate() {
                    _mm512_storeu_si512(op.add(((k0 + i) * vectors + v) * 16).cast(), *r);
                }
            }
        }
    }

    /// Transposes 16 × 16 32-bit values: `r[i]` lane `j` becomes `r[j]` lane `i`.
    #[inline(always)]
    pub(in crate::kernels) unsafe fn transpose(r: &mut [__m512i; 16]) {
        // Pairs of rows interleaved, then pairs of pairs: b[4i + c] holds, in each 128-bit lane
        // L, rows 4i..4i + 4 of column 4L + c; the last two steps gather lane L of
        // b[c], b[4 + c], b[8 + c], b[12 + c].
        let mut a = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        let mut b = [_mm512_setzero_si512(); 16];
        for i in 0..4 {
            b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
            b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
            b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
            b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
        }
        for c in 0..4 {
            let e0 = _mm512_shuffle_i32x4::<0x44>(b[c], b[4 + c]);
            let e1 = _mm512_shuffle_i32x4::<0xEE>(b[c], b[4 + c]);
            let f0 = _mm512_shuffle_i32x4::<0x44>(b[8 + c], b[12 + c]);
            let f1 = _mm512_shuffle_i32x4::<0xEE>(b[8 + c], b[12 + c]);
            r[c] = _mm512_shuffle_i32x4::<0x88>(e0, f0);
            r[4 + c] = _mm512_shuffle_i32x4::<0xDD>(e0, f0);
            r[8 + c] = _mm512_shuffle_i32x4::<0x88>(e1, f1);
            r[12 + c] = _mm512_shuffle_i32x4::<0xDD>(e1, f1);
        }
    }

    /// `y[i][16 v + l] (+)= Σ_p panel pair (p, v, l) · x[i] pair p` for the `m = xs.len()`
    /// activation rows and `vectors` vectors of a [`pack`]ed panel, storing the first `len`
    /// outputs of each row; with `add`, onto what `y` holds (a panel after the first).
    /// The first `len` of a panel pass's outputs for one activation row, 16 per vector of `row`,
    /// stored at `y`, or with `add` added to what `y` holds (a panel after a row's first).
    #[inline(always)]
    pub(in crate::kernels) unsafe fn store_row(row: &[__m512], y: *mut f32, len: usize, add: bool) {
        for (v, s) in row.iter().enumerate() {
            let mask = crate::kernels::ops::lanes_from(16 * v, len);
            let at = y.add(16 * v);
            let s = if add {
                _mm512_add_ps(*s, _mm512_maskz_loadu_ps(mask, at))
            } else {
                *s
            };
            _mm512_mask_storeu_ps(at, mask, s);
        }
    }

    /// Weights for the next panel to fetch into L2 during a [`panel`] pass: `lines` cache lines,
    /// `row_lines` from each row starting at `at`, rows `row_bytes` apart.
    #[derive(Clone, Copy)]
    pub struct Ahead {
        pub at: *const u8,
        pub row_bytes: usize,
        pub lines: usize,
        pub row_lines: usize,
    }

    /// `y[i][16 v + l] (+)= Σ_k panel step (k, v, l) · x[i] step k` for the `m = xs.len()`
    /// activation rows and `vectors` vectors of a [`pack`]ed panel, storing the first `len`
    /// outputs of each row; with `add`, onto what `y` holds (a panel after the first). `f32`:
    /// the panel was widened and the activations are f32 (FMAs on AVX-512 F), else both are
    /// bf16 pairs (`vdpbf16ps`, AVX-512 BF16).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn panel(
        panel: &[u32],
        vectors: usize,
        steps: usize,
        xs: &[*const u8],
        ys: &[*mut f32],
        len: usize,
        add: bool,
        ahead: Ahead,
        f32: bool,
    ) {
        assert!(panel.len() >= steps * vectors * 16 && xs.len() == ys.len());
        assert!(len <= vectors * 16 && len > (vectors - 1) * 16);
        let p = panel.as_ptr();
        let x: [*const u8; 6] = std::array::from_fn(|i| xs[i.min(xs.len() - 1)]);
        let y: [*mut f32; 6] = std::array::from_fn(|i| ys[i.min(ys.len() - 1)]);
        macro_rules! go {
            ($run:ident, $($m:literal)*) => {
                match (xs.len(), vectors) {
                    $(
                        ($m, 1) => $run::<$m, 1>(p, steps, x, y, len, add, ahead),
                        ($m, 2) => $run::<$m, 2>(p, steps, x, y, len, add, ahead),
                        ($m, 3) => $run::<$m, 3>(p, steps, x, y, len, add, ahead),
                        ($m, 4) => $run::<$m, 4>(p, steps, x, y, len, add, ahead),
                    )*
                    _ => unreachable!("panel shapes are checked by the caller"),
                }
            };
        }
        if f32 {
            go!(run_panel_f32, 1 2 3 4 5 6)
        } else {
            go!(run_panel_bf16, 1 2 3 4 5 6)
        }
    }

    /// The panel kernel, once per kind of step: M activation rows × V vectors of 16 outputs,
    /// each step one load per vector and one 32-bit broadcast per row.
    macro_rules! panel_kernel {
        ($name:ident, $features:literal, $vector:ty, |$a:ident, $w:ident, $b:ident| $mac:expr) => {
            #[target_feature(enable = $features)]
            unsafe fn $name<const M: usize, const V: usize>(
                p: *const u32,
                steps: usize,
                x: [*const u8; 6],
                y: [*mut f32; 6],
                len: usize,
                add: bool,
                ahead: Ahead,
            ) {
                let mut acc = [[_mm512_setzero_ps(); V]; M];
                let mut line = 0;
                for k in 0..steps {
                    if k % 8 == 0 && line < ahead.lines {
                        let (r, l) = (line / ahead.row_lines, line % ahead.row_lines);
                        let at = ahead.at.wrapping_add(r * ahead.row_bytes + 64 * l).cast();
                        _mm_prefetch::<_MM_HINT_T1>(at);
                        line += 1;
                    }
                    let wv: [$vector; V] = std::array::from_fn(|v| {
                        std::mem::transmute(_mm512_loadu_si512(p.add((k * V + v) * 16).cast()))
                    });
                    for (row, x) in acc.iter_mut().zip(x) {
                        let b: $vector = std::mem::transmute(_mm512_set1_epi32(
                            x.add(4 * k).cast::<i32>().read_unaligned(),
                        ));
                        for (acc, $w) in row.iter_mut().zip(wv) {
                            let ($a, $b) = (*acc, b);
                            *acc = $mac;
                        }
                    }
                }
                for (row, y) in acc.iter().zip(y) {
                    store_row(row, y, len, add);
                }
            }
        };
    }
    panel_kernel!(
        run_panel_bf16,
        "avx512f,avx512bw,avx512vl,avx512bf16",
        __m512bh,
        |a, w, b| _mm512_dpbf16_ps(a, w, b)
    );
    panel_kernel!(
        run_panel_f32,
        "avx512f,avx512bw,avx512vl",
        __m512,
        |a, w, b| _mm512_fmadd_ps(w, b, a)
    );

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

/// `Wᵀ` of a row-major `[rows, cols]` bf16 matrix, in 64×64 tiles across threads: training's
/// input gradients `dY·W` then run as products with the transposed weights on the bf16 kernels.
pub fn transpose(w: &[bf16], rows: usize, cols: usize) -> Vec<bf16> {
    let mut out = Vec::new();
    transpose_into(w, rows, cols, &mut out);
    out
}

/// [`transpose`] into `out` (resized; a buffer kept across calls saves the page faults of a
/// fresh 100 MB allocation per projection).
pub fn transpose_into(w: &[bf16], rows: usize, cols: usize, out: &mut Vec<bf16>) {
    assert_eq!(w.len(), rows * cols);
    const T: usize = 64;
    out.resize(rows * cols, bf16::ZERO);
    out.par_chunks_mut(T * rows)
        .enumerate()
        .for_each(|(cb, block)| {
            // `block` holds output rows (= input columns) cb*T .. cb*T + block.len()/rows.
            let c0 = cb * T;
            let nc = block.len() / rows;
            for r0 in (0..rows).step_by(T) {
                let r1 = (r0 + T).min(rows);
                for c in 0..nc {
                    let dst = &mut block[c * rows + r0..c * rows + r1];
                    for (k, d) in dst.iter_mut().enumerate() {
                        *d = w[(r0 + k) * cols + c0 + c];
                    }
                }
            }
        });
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

    /// The packed-panel prefill path (row, column and token tails, an odd row length, several
    /// column panels) against the scalar tile on the same rounded activations, with the
    /// rounded rows' buffer full of infinities beforehand (what a reused buffer may hold past
    /// an odd row's end).
    #[test]
    fn panels_match_the_scalar_tile() {
        for (rows, cols, n) in [
            (64, 32, PANEL_MIN_TOKENS),
            (17, 33, PANEL_MIN_TOKENS + 1),
            (130, 4 * PANEL_STEPS + 70, PANEL_MIN_TOKENS + 2),
            (200, 96, PANEL_MIN_TOKENS + 3),
            (1, 7, PANEL_MIN_TOKENS + 5),
        ] {
            let w: Vec<bf16> = data(rows * cols, 5)
                .iter()
                .map(|&v| bf16::from_f32(v))
                .collect();
            let x = data(n * cols, 6);
            let stride = cols + ACT_PAD;
            let mut stale = vec![bf16::INFINITY.to_bits(); n * stride];
            let mut got = vec![0f32; n * rows];
            rounded_products(&w, rows, cols, &x, &mut stale, stride, &mut got);
            let mut held = vec![0u16; n * cols];
            scalar_round(&x, &mut held);
            for t in 0..n {
                let xs = [&held[t * cols..(t + 1) * cols]];
                for r in 0..rows {
                    let row = &w[r * cols..(r + 1) * cols];
                    let mut want = [0f32];
                    scalar_tile(row, &xs, cols, &mut want);
                    let mag: f32 = row
                        .iter()
                        .zip(xs[0])
                        .map(|(a, &b)| (a.to_f32() * bf16::from_bits(b).to_f32()).abs())
                        .sum();
                    let g = got[t * rows + r];
                    let tol = cols as f32 * 2f32.powi(-23) * mag;
                    let tag = format!("{rows}x{cols} n={n} [{t},{r}]");
                    assert!((g - want[0]).abs() <= tol, "{tag}: {g} vs {}", want[0]);
                }
            }
        }
    }

    /// Products over threads and row chunks, decode and batches (from PANEL_MIN_TOKENS rows on
    /// AVX-512 the packed panels, for f32 activations too: widened weights, several panels, an
    /// odd row length), against f64 sums over the f32 activations: within what rounding them
    /// may lose (2⁻⁸ of each product's magnitude) plus f32 summation, and visibly further off
    /// than the f32 default.
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
            (70, 1000, PANEL_MIN_TOKENS + 2),
            (131, 2 * PANEL_STEPS + 33, PANEL_MIN_TOKENS + 1),
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

    #[test]
    fn transpose_swaps_rows_and_columns() {
        let (rows, cols) = (130, 67);
        let w: Vec<bf16> = (0..rows * cols).map(|i| bf16::from_f32(i as f32)).collect();
        let t = transpose(&w, rows, cols);
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(t[c * rows + r], w[r * cols + c]);
            }
        }
    }
}
