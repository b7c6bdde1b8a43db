//! Element-wise and row-wise ops of the decoder. These touch activations only (kilobytes per
//! token), so plain loops that the compiler vectorises are enough; the weights' traffic is in
//! [`super::matmul`](mod@super::matmul).

use half::f16;

use super::cpu;
use super::dot::WeightElem;
#[cfg(target_arch = "x86_64")]
use super::Isa;

/// RMSNorm as transformers computes it: `x / sqrt(mean(x²) + eps) * w`, accumulated in f32.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    debug_assert_eq!(x.len(), w.len());
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * g;
    }
}

/// In-place softmax over a row.
pub fn softmax(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::avx512() {
        // SAFETY: AVX-512 F detected.
        return unsafe { softmax_avx512(x) };
    }
    #[cfg(target_arch = "x86_64")]
    if cpu() == Isa::Avx2 {
        // SAFETY: Avx2 (with FMA) only after detection.
        return unsafe { softmax_avx2(x) };
    }
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `silu(gate) * up`, written into `gate`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    #[cfg(target_arch = "x86_64")]
    if super::avx512() {
        // SAFETY: AVX-512 F detected; lengths checked above.
        return unsafe { silu_mul_avx512(gate, up) };
    }
    #[cfg(target_arch = "x86_64")]
    if cpu() == Isa::Avx2 {
        // SAFETY: Avx2 (with FMA) only after detection; lengths checked above.
        return unsafe { silu_mul_avx2(gate, up) };
    }
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Scores of a block of queries, `S = scale · Q·Kᵀ`, on one thread (the `gemm` crate): `m` query
/// rows of `hd` values `qs` apart, `n` keys packed `hd` apart, `m` rows of `n` scores `ss` apart.
/// The blocked attention of the decoder's prefill and of the encoders is built from this and
/// [`attend_block_values`].
///
/// # Safety
/// `q`, `k` and `s` must be valid for those rows and strides, and `s` not alias the others.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn attend_block_scores(
    m: usize,
    n: usize,
    hd: usize,
    q: *const f32,
    qs: usize,
    k: *const f32,
    scale: f32,
    s: *mut f32,
    ss: usize,
) {
    gemm::gemm(
        m,
        n,
        hd,
        s,
        1,
        ss as isize,
        false,
        q,
        1,
        qs as isize,
        k,
        hd as isize,
        1,
        0.0,
        scale,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// `O = P·V`, or `O += P·V` with `accumulate`: `m` rows of `n` weights `ps` apart, `n` values
/// packed `hd` apart, `m` output rows `os` apart; one thread.
///
/// # Safety
/// As [`attend_block_scores`]: every pointer valid for its rows and stride, `o` not aliased.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn attend_block_values(
    m: usize,
    n: usize,
    hd: usize,
    p: *const f32,
    ps: usize,
    v: *const f32,
    o: *mut f32,
    os: usize,
    accumulate: bool,
) {
    gemm::gemm(
        m,
        hd,
        n,
        o,
        1,
        os as isize,
        accumulate,
        p,
        1,
        ps as isize,
        v,
        1,
        hd as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// GELU with the tanh approximation (`gelu_pytorch_tanh`) in place, computed as `x·σ(2u)` with
/// `u = √(2/π)·(x + 0.044715·x³)`: the same function as `0.5·x·(1 + tanh u)`, one exponential.
pub fn gelu_tanh(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::avx512() {
        // SAFETY: AVX-512 F detected.
        return unsafe { gelu_tanh_avx512(x) };
    }
    #[cfg(target_arch = "x86_64")]
    if cpu() == Isa::Avx2 {
        // SAFETY: Avx2 (with FMA) only after detection.
        return unsafe { gelu_tanh_avx2(x) };
    }
    for v in x {
        let u = GELU_K * (*v + 0.044715 * *v * *v * *v);
        *v /= 1.0 + (-2.0 * u).exp();
    }
}

/// √(2/π).
const GELU_K: f32 = 0.797_884_6;

/// [`gelu_tanh`] sixteen values at a time: libm's tanh one value at a time was 7 % of the
/// vision tower's time (synthetic so400m, 448×448 image, perf).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gelu_tanh_avx512(x: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = x.len();
    let p = x.as_mut_ptr();
    for i in (0..n).step_by(16) {
        let k = lanes_from(i, n);
        let v = _mm512_maskz_loadu_ps(k, p.add(i));
        let cube = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
        let u = _mm512_fmadd_ps(cube, _mm512_set1_ps(0.044715), v);
        let e = exp_avx512(_mm512_mul_ps(u, _mm512_set1_ps(-2.0 * GELU_K)));
        let y = _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0), e));
        _mm512_mask_storeu_ps(p.add(i), k, y);
    }
}

/// [`gelu_tanh_avx512`] eight values at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_tanh_avx2(x: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = x.len();
    let p = x.as_mut_ptr();
    for i in (0..n).step_by(8) {
        let k = lanes_from_avx2(i, n);
        let v = _mm256_maskload_ps(p.add(i), k);
        let cube = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
        let u = _mm256_fmadd_ps(cube, _mm256_set1_ps(0.044715), v);
        let e = exp_avx2(_mm256_mul_ps(u, _mm256_set1_ps(-2.0 * GELU_K)));
        let y = _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0), e));
        _mm256_maskstore_ps(p.add(i), k, y);
    }
}

/// Rotates the first `2 * cos.len()` dims of one head in place, NeoX half-split: dim k pairs with
/// dim k + half; dims past the rotary part pass through.
pub fn rope_neox(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for k in 0..half {
        let (a, b) = (head[k], head[k + half]);
        head[k] = a * cos[k] - b * sin[k];
        head[k + half] = b * cos[k] + a * sin[k];
    }
}

/// Values per scale of an 8-bit KV cache row (llama.cpp's `q8_0` cache uses the same block).
pub const KV_QBLOCK: usize = 32;

/// Scales per cached row of `hd` values at 8 bits.
pub fn kv_row_blocks(hd: usize) -> usize {
    hd.div_ceil(KV_QBLOCK)
}

/// One page of cached keys or values of one kv head, as stored: `rows` of `hd` each.
#[derive(Clone, Copy, Debug)]
pub enum KvRows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    /// 8-bit values, with one f32 scale per [`KV_QBLOCK`] values of each row.
    Q8 {
        qs: &'a [i8],
        d: &'a [f32],
    },
}

impl<'a> KvRows<'a> {
    /// Rows `r0..r1`.
    pub fn sub(&self, r0: usize, r1: usize, hd: usize) -> KvRows<'a> {
        match *self {
            KvRows::F32(v) => KvRows::F32(&v[r0 * hd..r1 * hd]),
            KvRows::F16(v) => KvRows::F16(&v[r0 * hd..r1 * hd]),
            KvRows::Q8 { qs, d } => {
                let nb = kv_row_blocks(hd);
                KvRows::Q8 {
                    qs: &qs[r0 * hd..r1 * hd],
                    d: &d[r0 * nb..r1 * nb],
                }
            }
        }
    }

    /// Rows `0..n` as f32: borrowed when stored as f32, else widened into `buf`.
    pub fn to_f32<'b>(&self, n: usize, hd: usize, buf: &'b mut Vec<f32>) -> &'b [f32]
    where
        'a: 'b,
    {
        match *self {
            KvRows::F32(v) => &v[..n * hd],
            KvRows::F16(v) => {
                let out = grown(buf, n * hd);
                // `half` converts with F16C where the CPU has it.
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(&v[..n * hd], out);
                out
            }
            KvRows::Q8 { qs, d } => {
                let out = grown(buf, n * hd);
                let nb = kv_row_blocks(hd);
                match cpu() {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: Avx2 only after detection.
                    Isa::Avx2 => unsafe {
                        dequantize_kv_avx2(&qs[..n * hd], &d[..n * nb], hd, out)
                    },
                    _ => dequantize_kv(&qs[..n * hd], &d[..n * nb], hd, out),
                }
                out
            }
        }
    }
}

/// The first `n` values of `buf`, grown to hold them but never cleared: every value read back
/// is written first (zeroing the buffer on each call was 2 % of decode time).
fn grown(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    &mut buf[..n]
}

/// Quantizes one cached row to 8 bits: per block of [`KV_QBLOCK`] values, `q = round(x / d)`
/// with `d = max|x| / 127`.
pub fn quantize_kv_row(x: &[f32], qs: &mut [i8], d: &mut [f32]) {
    for ((xb, qb), db) in x.chunks(KV_QBLOCK).zip(qs.chunks_mut(KV_QBLOCK)).zip(d) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        *db = amax / 127.0;
        let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        for (q, v) in qb.iter_mut().zip(xb) {
            // Adding and removing 1.5·2²³ rounds to nearest (ties to even) for |x| ≤ 127 in
            // plain float adds, which vectorise; `round` is a libm call on baseline x86-64.
            const MAGIC: f32 = 12_582_912.0;
            *q = ((v * inv + MAGIC) - MAGIC) as i8;
        }
    }
}

/// Widens 8-bit rows (`qs` of rows × `hd`, `d` of rows × blocks) into `out`: element-wise, so
/// the loop vectorises.
#[inline(always)]
fn dequantize_kv(qs: &[i8], d: &[f32], hd: usize, out: &mut [f32]) {
    let nb = kv_row_blocks(hd);
    for ((qr, dr), or) in qs
        .chunks_exact(hd)
        .zip(d.chunks_exact(nb))
        .zip(out.chunks_exact_mut(hd))
    {
        for ((qb, &s), ob) in qr.chunks(KV_QBLOCK).zip(dr).zip(or.chunks_mut(KV_QBLOCK)) {
            for (o, &q) in ob.iter_mut().zip(qb) {
                *o = q as f32 * s;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dequantize_kv_avx2(qs: &[i8], d: &[f32], hd: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    if !hd.is_multiple_of(KV_QBLOCK) {
        return dequantize_kv(qs, d, hd, out);
    }
    // Whole blocks only: block b of the flattened rows has scale d[b]. (The generic loop,
    // vectorised by the compiler, took 4.5 % of decode at 1024 positions against 3.5 %.)
    let blocks = qs.len() / KV_QBLOCK;
    assert!(d.len() >= blocks && out.len() >= qs.len());
    for (b, &db) in d[..blocks].iter().enumerate() {
        let s = _mm256_set1_ps(db);
        let p = qs.as_ptr().add(b * KV_QBLOCK);
        let o = out.as_mut_ptr().add(b * KV_QBLOCK);
        for k in 0..4 {
            let v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(8 * k) as *const __m128i));
            _mm256_storeu_ps(o.add(8 * k), _mm256_mul_ps(_mm256_cvtepi32_ps(v), s));
        }
    }
}

/// Reusable buffers of [`attend_one`].
#[derive(Debug, Default)]
pub struct AttnScratch {
    /// Scores, `[group][keys]`.
    pub sc: Vec<f32>,
    /// Rows widened to f32 (f16 and 8-bit caches).
    pub rows: Vec<f32>,
}

/// Attention of one new token for the `q.len() / hd` query heads that share one kv head (GQA):
/// `out[g] = softmax(scale · q[g] · Kᵀ) · V` over the first `keys` cached positions, which lie
/// in the pages `k` and `v` (every page but the last full).
///
/// Each key and value row is read once for the whole group. Two general matrix products did the
/// same (no faster: with three query rows their packing of K and V is most of the work); what
/// made decode at 512–640 positions 12% faster was a contiguous run of rows per kv head
/// ([`KvCache`] pages).
///
/// [`KvCache`]: crate::model::KvCache
#[allow(clippy::too_many_arguments)]
pub fn attend_one<'a>(
    q: &[f32],
    k: impl IntoIterator<Item = KvRows<'a>>,
    v: impl IntoIterator<Item = KvRows<'a>>,
    keys: usize,
    hd: usize,
    scale: f32,
    out: &mut [f32],
    s: &mut AttnScratch,
) {
    let group = q.len() / hd;
    assert!(group <= 8 && q.len() == group * hd && out.len() == q.len());
    let AttnScratch { sc, rows } = s;
    sc.clear();
    // Capacity in steps of a KV page, so that decode steps in between do not reallocate.
    sc.reserve(group * keys.next_multiple_of(256));
    sc.resize(group * keys, 0.0);
    #[cfg(target_arch = "x86_64")]
    let k = {
        // A cache stores every page the same way.
        let mut k = k.into_iter().peekable();
        if let (Some(KvRows::F16(_)), Some(f)) = (k.peek(), F16Avx512::for_shape(group, hd)) {
            return f.attend(q, k, v, keys, hd, scale, out, sc);
        }
        k
    };
    let mut qs: [&[f32]; 8] = [&[]; 8];
    for (slot, head) in qs.iter_mut().zip(q.chunks(hd)) {
        *slot = head;
    }
    let mut dots = [0f32; 8];
    for (first, r0, r1, rows_of) in chunks(k, keys, hd) {
        let n = r1 - r0;
        let mut score = |p: usize, dots: &[f32]| {
            for g in 0..group {
                sc[g * keys + first + r0 + p] = dots[g] * scale;
            }
        };
        // f16 rows go to the f16 dot kernel as they are: widening them into a buffer first
        // (`half`, 5.6 G values/s on one Zen 4 core) cost more than the bytes it saved.
        if let KvRows::F16(kh) = rows_of {
            for (p, key) in kh[..n * hd].chunks_exact(hd).enumerate() {
                f16::dot_rows(key, &qs[..group], &mut dots[..group]);
                score(p, &dots);
            }
            continue;
        }
        let kf = rows_of.to_f32(n, hd, rows);
        for (p, key) in kf.chunks_exact(hd).enumerate() {
            f32::dot_rows(key, &qs[..group], &mut dots[..group]);
            score(p, &dots);
        }
    }
    for r in sc.chunks_mut(keys) {
        softmax(r);
    }
    out.fill(0.0);
    for (first, r0, r1, rows_of) in chunks(v, keys, hd) {
        #[cfg(target_arch = "x86_64")]
        if let (KvRows::F16(vh), Isa::Avx2) = (rows_of, cpu()) {
            // SAFETY: Avx2 (with F16C) only after detection; `pages` bounds every slice.
            unsafe { weighted_sum_f16_avx2(sc, first + r0, &vh[..(r1 - r0) * hd], keys, hd, out) };
            continue;
        }
        let vf = rows_of.to_f32(r1 - r0, hd, rows);
        match cpu() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: Avx2 only after detection; `pages` bounds every slice.
            Isa::Avx2 => unsafe { weighted_sum_avx2(sc, first + r0, vf, keys, hd, out) },
            _ => weighted_sum(sc, first + r0, vf, keys, hd, out),
        }
    }
}

/// Rows widened from 8 bits at a time in [`attend_one`]: 8 KB at head_dim 128, so the widened
/// rows stay in L1 and each thread keeps 8 KB of scratch instead of a 128 KB page. (Not faster
/// than a page at a time, measured at 2048 positions: 9.7 vs 9.8 tok/s, within noise.)
const WIDEN_ROWS: usize = 16;

/// `(page's first position, r0, r1, rows r0..r1 of the page)` over the first `keys` rows, in
/// runs of [`WIDEN_ROWS`].
fn chunks<'a>(
    k: impl IntoIterator<Item = KvRows<'a>>,
    keys: usize,
    hd: usize,
) -> impl Iterator<Item = (usize, usize, usize, KvRows<'a>)> {
    pages(k, keys, hd).flat_map(move |(first, n, page)| {
        (0..n).step_by(WIDEN_ROWS).map(move |r0| {
            let r1 = (r0 + WIDEN_ROWS).min(n);
            (first, r0, r1, page.sub(r0, r1, hd))
        })
    })
}

/// `(first position, rows used, page)` of each page holding some of the first `keys` rows.
pub fn pages<'a>(
    pages: impl IntoIterator<Item = KvRows<'a>>,
    keys: usize,
    hd: usize,
) -> impl Iterator<Item = (usize, usize, KvRows<'a>)> {
    let mut first = 0;
    pages.into_iter().map_while(move |p| {
        let cap = match p {
            KvRows::F32(v) => v.len() / hd,
            KvRows::F16(v) => v.len() / hd,
            KvRows::Q8 { qs, .. } => qs.len() / hd,
        };
        let n = cap.min(keys.saturating_sub(first));
        let at = first;
        first += n;
        (n > 0).then_some((at, n, p))
    })
}

/// `out[g] += Σ_p sc[g][first + p] · v[p]`: element-wise, so plain loops vectorise.
#[inline(always)]
fn weighted_sum(sc: &[f32], first: usize, v: &[f32], keys: usize, hd: usize, out: &mut [f32]) {
    for (p, vr) in v.chunks_exact(hd).enumerate() {
        for (g, o) in out.chunks_mut(hd).enumerate() {
            let w = sc[g * keys + first + p];
            for (o, x) in o.iter_mut().zip(vr) {
                *o += w * x;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_sum_avx2(
    sc: &[f32],
    first: usize,
    v: &[f32],
    keys: usize,
    hd: usize,
    out: &mut [f32],
) {
    weighted_sum(sc, first, v, keys, hd, out)
}

/// [`weighted_sum`] over f16 rows, widened 8 at a time in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_sum_f16_avx2(
    sc: &[f32],
    first: usize,
    v: &[f16],
    keys: usize,
    hd: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let whole = hd - hd % 8;
    for (p, vr) in v.chunks_exact(hd).enumerate() {
        for (g, o) in out.chunks_mut(hd).enumerate() {
            let w = sc[g * keys + first + p];
            let wv = _mm256_set1_ps(w);
            for j in (0..whole).step_by(8) {
                let x = _mm256_cvtph_ps(_mm_loadu_si128(vr.as_ptr().add(j) as *const __m128i));
                let op = o.as_mut_ptr().add(j);
                _mm256_storeu_ps(op, _mm256_fmadd_ps(wv, x, _mm256_loadu_ps(op)));
            }
            for j in whole..hd {
                o[j] += w * vr[j].to_f32();
            }
        }
    }
}

/// `(q, key rows, scale, sc, keys, first)`: see [`scores_f16_avx512`].
#[cfg(target_arch = "x86_64")]
type ScoresF16 = unsafe fn(&[f32], &[f16], f32, &mut [f32], usize, usize);
/// `(sc, first, value rows, keys, out)`: see [`weighted_sum_f16_avx512`].
#[cfg(target_arch = "x86_64")]
type WeightedSumF16 = unsafe fn(&[f32], usize, &[f16], usize, &mut [f32]);

/// [`attend_one`]'s AVX-512 kernels over an f16 cache, for `group` query heads of `hd` values
/// where all of a row's accumulators fit in registers (`group · hd / 16 ≤ 24` of the 32).
///
/// Both read the rows once, in order. The AVX2 path's value loop keeps the outputs in memory
/// (or 16 columns at a time over 16 rows in registers, tried: a row's cache lines then arrive
/// in an order the prefetcher does not follow; one thread, 65536 rows from memory: 14–40 ns per
/// row against 8 this way), and its key loop reduces every row and head on its own. Attention
/// over a full-size 600-position cache (32 layers × 8 kv heads, 2 threads) went from 0.43 to
/// 0.53 of a plain read of the same bytes, 0.60 with [`softmax_avx512`]; decode, q4,
/// alternating steps (before that softmax): +2–3 % at 512–576 positions, +4.5 % at 1500.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct F16Avx512 {
    scores: ScoresF16,
    weighted_sum: WeightedSumF16,
}

#[cfg(target_arch = "x86_64")]
impl F16Avx512 {
    fn for_shape(group: usize, hd: usize) -> Option<F16Avx512> {
        if !super::avx512() {
            return None;
        }
        macro_rules! pick {
            ($($g:literal),*; $cs:tt) => {
                match group {
                    $($g => pick!(@c $g $cs),)*
                    _ => None,
                }
            };
            (@c $g:literal [$($c:literal),*]) => {
                match hd {
                    $(h if h == 16 * $c => Some(F16Avx512 {
                        scores: scores_f16_avx512::<$g, $c>,
                        weighted_sum: weighted_sum_f16_avx512::<$g, $c>,
                    }),)*
                    _ => None,
                }
            };
        }
        pick!(1, 2, 3; [1, 2, 4, 8])
    }

    /// [`attend_one`] over f16 pages (`k` peeked at already).
    #[allow(clippy::too_many_arguments)]
    fn attend<'a>(
        self,
        q: &[f32],
        k: impl Iterator<Item = KvRows<'a>>,
        v: impl IntoIterator<Item = KvRows<'a>>,
        keys: usize,
        hd: usize,
        scale: f32,
        out: &mut [f32],
        sc: &mut [f32],
    ) {
        let f16_rows = |page: KvRows<'a>, n: usize| match page {
            KvRows::F16(h) => &h[..n * hd],
            _ => panic!("an f16 cache has f16 pages only"),
        };
        for (first, n, page) in pages(k, keys, hd) {
            // SAFETY: chosen for this group and hd after detection; `pages` bounds the rows.
            unsafe { (self.scores)(q, f16_rows(page, n), scale, sc, keys, first) };
        }
        for r in sc.chunks_mut(keys) {
            softmax(r);
        }
        out.fill(0.0);
        for (first, n, page) in pages(v, keys, hd) {
            // SAFETY: as above.
            unsafe { (self.weighted_sum)(sc, first, f16_rows(page, n), keys, out) };
        }
    }
}

/// [`softmax`] with AVX-512: sixteen values at a time, `exp` as a polynomial. One decode step at
/// 600 positions takes 460 thousand exponentials (24 heads × 32 layers); libm's one at a time
/// was ~1 % of the step. A 512-token prefill's causal attention takes 100 million.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_avx512(x: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = x.len();
    let mask = |i: usize| lanes_from(i, n);
    let p = x.as_mut_ptr();
    let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
    for i in (0..n).step_by(16) {
        m = _mm512_mask_max_ps(m, mask(i), m, _mm512_maskz_loadu_ps(mask(i), p.add(i)));
    }
    let max = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    let mut sum = _mm512_setzero_ps();
    for i in (0..n).step_by(16) {
        let e = exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask(i), p.add(i)), max));
        _mm512_mask_storeu_ps(p.add(i), mask(i), e);
        sum = _mm512_mask_add_ps(sum, mask(i), sum, e);
    }
    let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
    for i in (0..n).step_by(16) {
        let v = _mm512_maskz_loadu_ps(mask(i), p.add(i));
        _mm512_mask_storeu_ps(p.add(i), mask(i), _mm512_mul_ps(v, inv));
    }
}

/// [`silu_mul`] sixteen values at a time. It runs on one thread between two parallel products,
/// so libm's exponentials one at a time (8192 per layer) kept the other thread waiting:
/// 0.8–1.1 ms of a decode step over 32 layers, against 0.1 ms this way.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn silu_mul_avx512(gate: &mut [f32], up: &[f32]) {
    use std::arch::x86_64::*;
    let n = gate.len();
    let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
    for i in (0..n).step_by(16) {
        let k = lanes_from(i, n);
        let x = _mm512_maskz_loadu_ps(k, g.add(i));
        let e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), x));
        let silu = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0), e));
        let y = _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(k, u.add(i)));
        _mm512_mask_storeu_ps(g.add(i), k, y);
    }
}

/// The lanes of a 16-wide step at `i` that fall before `n`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn lanes_from(i: usize, n: usize) -> std::arch::x86_64::__mmask16 {
    if n - i >= 16 {
        0xffff
    } else {
        (1 << (n - i)) - 1
    }
}

/// ln 2 in two parts, the first exact in a few bits, so that n·part1 is exact in the range
/// reduction of the vector exponentials.
#[cfg(target_arch = "x86_64")]
const EXP_LN2: [f32; 2] = [0.693_359_4, -2.121_944_4e-4];
/// Cephes' degree-5 polynomial for `(eʳ − 1 − r) / r²`, highest degree first.
#[cfg(target_arch = "x86_64")]
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// `exp(x)` to about 1 ulp: `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`, [`EXP_POLY`] for
/// `(eʳ − 1 − r) / r²`, then `2ⁿ` by `vscalefps`, which also rounds results below the
/// normal range (to 0 from `x < −104`) and gives +∞ above `ln f32::MAX`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exp_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // The upper clamp keeps n within what scalef turns into +∞ rather than a NaN from ∞ − ∞.
    // (x second: min and max return their second operand when either is NaN, so NaN stays.)
    let x = _mm512_min_ps(
        _mm512_set1_ps(100.0),
        _mm512_max_ps(_mm512_set1_ps(-104.0), x),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2[0]), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2[1]), r);
    let mut y = _mm512_set1_ps(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(*c));
    }
    let y = _mm512_fmadd_ps(
        y,
        _mm512_mul_ps(r, r),
        _mm512_add_ps(r, _mm512_set1_ps(1.0)),
    );
    _mm512_scalef_ps(y, n)
}

/// [`softmax_avx512`] eight values at a time, for CPUs with AVX2 but not AVX-512. Measured
/// under `PHI4_ISA=avx2` on the Zen 4 machine: 1.1–1.2 µs per 600 scores against 2.3–2.4 µs
/// for libm's exponentials one at a time (768 such rows per decode step at 600 positions).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(x: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = x.len();
    let p = x.as_mut_ptr();
    let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
    for i in (0..n).step_by(8) {
        let k = lanes_from_avx2(i, n);
        let v = _mm256_maskload_ps(p.add(i), k);
        m = _mm256_max_ps(m, _mm256_blendv_ps(m, v, _mm256_castsi256_ps(k)));
    }
    let max = _mm256_set1_ps(hmax_avx2(m));
    let mut sum = _mm256_setzero_ps();
    for i in (0..n).step_by(8) {
        let k = lanes_from_avx2(i, n);
        let e = exp_avx2(_mm256_sub_ps(_mm256_maskload_ps(p.add(i), k), max));
        _mm256_maskstore_ps(p.add(i), k, e);
        sum = _mm256_add_ps(sum, _mm256_and_ps(e, _mm256_castsi256_ps(k)));
    }
    let s = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps::<1>(sum));
    let s = _mm_hadd_ps(s, s);
    let inv = _mm256_set1_ps(1.0 / _mm_cvtss_f32(_mm_hadd_ps(s, s)));
    for i in (0..n).step_by(8) {
        let k = lanes_from_avx2(i, n);
        let v = _mm256_maskload_ps(p.add(i), k);
        _mm256_maskstore_ps(p.add(i), k, _mm256_mul_ps(v, inv));
    }
}

/// [`silu_mul_avx512`] eight values at a time, for CPUs with AVX2 but not AVX-512: 10–16 µs
/// per 8192 values against 23–28 µs with libm (`PHI4_ISA=avx2`, Zen 4).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(gate: &mut [f32], up: &[f32]) {
    use std::arch::x86_64::*;
    let n = gate.len();
    let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
    for i in (0..n).step_by(8) {
        let k = lanes_from_avx2(i, n);
        let x = _mm256_maskload_ps(g.add(i), k);
        let e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), x));
        let silu = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e));
        let y = _mm256_mul_ps(silu, _mm256_maskload_ps(u.add(i), k));
        _mm256_maskstore_ps(g.add(i), k, y);
    }
}

/// The lanes of an 8-wide step at `i` that fall before `n`, as a mask of all-ones lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn lanes_from_avx2(i: usize, n: usize) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let left = _mm256_set1_epi32((n - i).min(8) as i32);
    _mm256_cmpgt_epi32(left, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
}

/// The largest of eight lanes. (A NaN score need not come out here: it makes its exponential,
/// hence the sum and the whole row, NaN either way.)
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn hmax_avx2(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)))
}

/// [`exp_avx512`]'s polynomial without `vscalefps`: `2ⁿ` is built in the exponent bits, as
/// `2ⁿ⁻¹ · 2` so that `n` may reach 128 (e^88.72 is f32::MAX). Inputs are clamped to
/// [−87, ln f32::MAX] (NaN passes through): below, the true value is under 2⁻¹²⁵ and the result
/// comes out 0 or that small; at the top the last product overflows to +∞.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exp_avx2(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    const LN_MAX: f32 = 88.722_84;
    // x second: min and max return their second operand when either is NaN, so NaN stays.
    let x = _mm256_min_ps(
        _mm256_set1_ps(LN_MAX),
        _mm256_max_ps(_mm256_set1_ps(-87.0), x),
    );
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2[0]), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2[1]), r);
    let mut y = _mm256_set1_ps(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(*c));
    }
    let y = _mm256_fmadd_ps(
        y,
        _mm256_mul_ps(r, r),
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    // n in [−126, 128]: 2ⁿ⁻¹ has the biased exponent n + 126, from 0 (the value 0) to 254.
    let half = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(126),
    ));
    _mm256_mul_ps(
        _mm256_mul_ps(y, _mm256_castsi256_ps(half)),
        _mm256_set1_ps(2.0),
    )
}

/// `sc[g][first + p] = scale · q[g] · k[p]` for G query heads of `16·C` values over f16 key
/// rows, with AVX-512: eight rows at a time, whose sums for one head are reduced together
/// (a horizontal reduction per row and head is as many instructions as the row's products).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
unsafe fn scores_f16_avx512<const G: usize, const C: usize>(
    q: &[f32],
    k: &[f16],
    scale: f32,
    sc: &mut [f32],
    keys: usize,
    first: usize,
) {
    use std::arch::x86_64::*;
    let hd = 16 * C;
    let rows = k.len() / hd;
    assert!(q.len() == G * hd && sc.len() >= (G - 1) * keys + first + rows);
    let qp = q.as_ptr();
    // acc[r][g]: row r against head g, 16 lanes of partial sums.
    let row_sums = |kr: *const f16, acc: &mut [__m512; G]| {
        for c in 0..C {
            let x = _mm512_cvtph_ps(_mm256_loadu_si256(kr.add(16 * c) as *const __m256i));
            for (g, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(x, _mm512_loadu_ps(qp.add(g * hd + 16 * c)), *a);
            }
        }
    };
    let whole = rows - rows % 8;
    for p0 in (0..whole).step_by(8) {
        let mut acc = [[_mm512_setzero_ps(); G]; 8];
        for (r, a) in acc.iter_mut().enumerate() {
            row_sums(k.as_ptr().add((p0 + r) * hd), a);
        }
        for g in 0..G {
            // Halves added, then three rounds of pairwise adds leave row r's sum in lane r.
            let y: [__m256; 8] = std::array::from_fn(|r| {
                let v = acc[r][g];
                // (The f64 extract is AVX-512 F; the f32 one would need DQ.)
                let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
                _mm256_add_ps(_mm512_castps512_ps256(v), high)
            });
            let h01 = _mm256_hadd_ps(y[0], y[1]);
            let h23 = _mm256_hadd_ps(y[2], y[3]);
            let h45 = _mm256_hadd_ps(y[4], y[5]);
            let h67 = _mm256_hadd_ps(y[6], y[7]);
            let (lo, hi) = (_mm256_hadd_ps(h01, h23), _mm256_hadd_ps(h45, h67));
            let s = _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(lo, hi),
                _mm256_permute2f128_ps::<0x31>(lo, hi),
            );
            let dst = &mut sc[g * keys + first + p0..][..8];
            _mm256_storeu_ps(dst.as_mut_ptr(), _mm256_mul_ps(s, _mm256_set1_ps(scale)));
        }
    }
    for p in whole..rows {
        let mut acc = [_mm512_setzero_ps(); G];
        row_sums(k.as_ptr().add(p * hd), &mut acc);
        for (g, a) in acc.iter().enumerate() {
            sc[g * keys + first + p] = _mm512_reduce_add_ps(*a) * scale;
        }
    }
}

/// [`weighted_sum`] over f16 rows with AVX-512, for G query heads of `16·C` values: every
/// output value stays in a register while the rows stream past.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
unsafe fn weighted_sum_f16_avx512<const G: usize, const C: usize>(
    sc: &[f32],
    first: usize,
    v: &[f16],
    keys: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let hd = 16 * C;
    let rows = v.len() / hd;
    assert!(out.len() == G * hd && sc.len() >= (G - 1) * keys + first + rows);
    let mut acc = [[_mm512_setzero_ps(); C]; G];
    for (g, a) in acc.iter_mut().enumerate() {
        for (c, a) in a.iter_mut().enumerate() {
            *a = _mm512_loadu_ps(out.as_ptr().add(g * hd + 16 * c));
        }
    }
    for (p, row) in v.chunks_exact(hd).enumerate() {
        let w: [__m512; G] = std::array::from_fn(|g| _mm512_set1_ps(sc[g * keys + first + p]));
        for c in 0..C {
            let x = _mm512_cvtph_ps(_mm256_loadu_si256(
                row.as_ptr().add(16 * c) as *const __m256i
            ));
            for (a, w) in acc.iter_mut().zip(w) {
                a[c] = _mm512_fmadd_ps(w, x, a[c]);
            }
        }
    }
    for (g, a) in acc.iter().enumerate() {
        for (c, a) in a.iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add(g * hd + 16 * c), *a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages stored as 8-bit values and scales.
    type Q8Pages = Vec<(Vec<i8>, Vec<f32>)>;

    /// Splits `rows` rows of `hd` into pages of `page` rows, stored as f32 or 8-bit.
    fn paged(x: &[f32], hd: usize, page: usize, q8: bool) -> (Vec<Vec<f32>>, Q8Pages) {
        let mut f = Vec::new();
        let mut q = Vec::new();
        for chunk in x.chunks(page * hd) {
            // Pages are allocated whole; the unused tail must not be read.
            let mut full = chunk.to_vec();
            full.resize(page * hd, f32::NAN);
            if q8 {
                let mut qs = vec![0i8; page * hd];
                let mut d = vec![0f32; page * kv_row_blocks(hd)];
                let nb = kv_row_blocks(hd);
                for r in 0..chunk.len() / hd {
                    quantize_kv_row(
                        &chunk[r * hd..(r + 1) * hd],
                        &mut qs[r * hd..(r + 1) * hd],
                        &mut d[r * nb..(r + 1) * nb],
                    );
                }
                q.push((qs, d));
            } else {
                f.push(full);
            }
        }
        (f, q)
    }

    fn views<'a>(f: &'a [Vec<f32>], q: &'a [(Vec<i8>, Vec<f32>)]) -> Vec<KvRows<'a>> {
        f.iter()
            .map(|p| KvRows::F32(p))
            .chain(q.iter().map(|(qs, d)| KvRows::Q8 { qs, d }))
            .collect()
    }

    /// softmax(scale · q Kᵀ) V in f64.
    fn reference(q: &[f32], k: &[f32], v: &[f32], keys: usize, hd: usize, scale: f32) -> Vec<f64> {
        let group = q.len() / hd;
        let mut out = vec![0f64; group * hd];
        for g in 0..group {
            let mut s: Vec<f64> = (0..keys)
                .map(|p| {
                    (0..hd)
                        .map(|j| q[g * hd + j] as f64 * k[p * hd + j] as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let m = s.iter().cloned().fold(f64::MIN, f64::max);
            s.iter_mut().for_each(|x| *x = (*x - m).exp());
            let z: f64 = s.iter().sum();
            for j in 0..hd {
                out[g * hd + j] = (0..keys).map(|p| s[p] / z * v[p * hd + j] as f64).sum();
            }
        }
        out
    }

    #[test]
    fn one_token_attention_matches_the_definition_across_pages() {
        let (hd, group, keys) = (48, 3, 37);
        let data = |n: usize, seed: u64| crate::kernels::test_data(n, seed);
        let q = data(group * hd, 1);
        let k = data(keys * hd, 2);
        let v = data(keys * hd, 3);
        let scale = 0.3;
        let want = reference(&q, &k, &v, keys, hd, scale);
        for page in [8, 37, 64] {
            let (kf, _) = paged(&k, hd, page, false);
            let (vf, _) = paged(&v, hd, page, false);
            let mut out = vec![0f32; group * hd];
            let mut s = AttnScratch::default();
            attend_one(
                &q,
                views(&kf, &[]),
                views(&vf, &[]),
                keys,
                hd,
                scale,
                &mut out,
                &mut s,
            );
            for (i, (&o, &w)) in out.iter().zip(&want).enumerate() {
                assert!((o as f64 - w).abs() < 1e-5, "page {page}, {i}: {o} vs {w}");
            }
        }
    }

    #[test]
    fn half_precision_cache_attends_to_its_rounded_rows() {
        // hd 44: five vectors of 8 and a tail of 4; pages of 20 rows (16 + 4 at a time). With
        // AVX-512, groups of up to 3 at hd 16·{1, 2, 4, 8} take the register-held weighted sum
        // (group 4 does not); Phi-4 is group 3, hd 128.
        for (hd, group) in [(44, 3), (64, 3), (128, 3), (128, 1), (32, 2), (16, 4)] {
            let (keys, page) = (29, 20);
            let data = |n: usize, seed: u64| crate::kernels::test_data(n, seed);
            let q = data(group * hd, 7);
            // The values as f16 stores them, and those pages (NaN padding stays NaN) in f16.
            let rounded = |x: Vec<f32>| -> Vec<f32> {
                x.iter().map(|&v| f16::from_f32(v).to_f32()).collect()
            };
            let (k, v) = (rounded(data(keys * hd, 8)), rounded(data(keys * hd, 9)));
            let half_pages = |x: &[f32]| -> Vec<Vec<f16>> {
                let (f, _) = paged(x, hd, page, false);
                f.iter()
                    .map(|p| p.iter().map(|&v| f16::from_f32(v)).collect())
                    .collect()
            };
            let (kp, vp) = (half_pages(&k), half_pages(&v));
            let mut out = vec![0f32; group * hd];
            attend_one(
                &q,
                kp.iter().map(|p| KvRows::F16(p)),
                vp.iter().map(|p| KvRows::F16(p)),
                keys,
                hd,
                0.3,
                &mut out,
                &mut AttnScratch::default(),
            );
            let want = reference(&q, &k, &v, keys, hd, 0.3);
            for (i, (&o, &w)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (o as f64 - w).abs() < 1e-5,
                    "hd {hd}, group {group}, {i}: {o} vs {w}"
                );
            }
        }
    }

    #[test]
    fn eight_bit_cache_attends_to_its_dequantized_rows() {
        // hd 48: one full block of 32 and a short one of 16 per row (the generic widening);
        // hd 64: whole blocks (the vector one). Pages of 20 rows: widened 16 + 4 at a time.
        for hd in [48, 64] {
            eight_bit_attention(hd);
        }
    }

    fn eight_bit_attention(hd: usize) {
        let (group, keys) = (3, 29);
        let data = |n: usize, seed: u64| crate::kernels::test_data(n, seed);
        let q = data(group * hd, 4);
        let k = data(keys * hd, 5);
        let v = data(keys * hd, 6);
        let (_, kq) = paged(&k, hd, 20, true);
        let (_, vq) = paged(&v, hd, 20, true);
        // The rows as the cache holds them, widened by hand.
        let widen = |pages: &[(Vec<i8>, Vec<f32>)]| -> Vec<f32> {
            let mut out = Vec::new();
            for (qs, d) in pages {
                for (e, &x) in qs.iter().enumerate() {
                    let (r, c) = (e / hd, e % hd);
                    out.push(x as f32 * d[r * kv_row_blocks(hd) + c / KV_QBLOCK]);
                }
            }
            out
        };
        let (kd, vd) = (widen(&kq), widen(&vq));
        for (x, y) in k.iter().zip(&kd) {
            // Half a step of max|x|/127, with max|x| ≤ 0.5.
            assert!((x - y).abs() <= 0.5 / 127.0 * 0.5 + 1e-7, "{x} vs {y}");
        }
        let scale = 0.3;
        let mut out = vec![0f32; group * hd];
        attend_one(
            &q,
            views(&[], &kq),
            views(&[], &vq),
            keys,
            hd,
            scale,
            &mut out,
            &mut AttnScratch::default(),
        );
        let exact = reference(&q, &kd, &vd, keys, hd, scale);
        let approx = reference(&q, &k, &v, keys, hd, scale);
        for i in 0..out.len() {
            assert!(
                (out[i] as f64 - exact[i]).abs() < 1e-5,
                "{i}: {} vs {}",
                out[i],
                exact[i]
            );
            assert!(
                (out[i] as f64 - approx[i]).abs() < 4e-3,
                "{i}: {} vs {}",
                out[i],
                approx[i]
            );
        }
    }

    #[test]
    fn rms_norm_matches_definition() {
        let x = [1.0f32, -2.0, 3.0, 0.5];
        let w = [1.0f32, 0.5, 2.0, -1.0];
        let mut out = [0f32; 4];
        rms_norm(&x, &w, 1e-5, &mut out);
        let rms = ((1.0 + 4.0 + 9.0 + 0.25) / 4.0f32 + 1e-5).sqrt();
        for i in 0..4 {
            assert!((out[i] - x[i] / rms * w[i]).abs() < 1e-6);
        }
    }

    #[test]
    fn rope_rotates_pairs_and_keeps_the_tail() {
        let mut h = [1.0f32, 2.0, 3.0, 4.0, 9.0];
        let (c, s) = ([0.0f32, 1.0], [1.0f32, 0.0]);
        rope_neox(&mut h, &c, &s);
        // pair (0,2) rotated by 90°, pair (1,3) untouched, dim 4 passes through.
        assert_eq!(h, [-3.0, 2.0, 1.0, 4.0, 9.0]);
    }

    /// The vector kernels this CPU can run: AVX-512 and AVX2 (softmax, silu_mul).
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::type_complexity)]
    fn vector_kernels() -> Vec<(
        &'static str,
        unsafe fn(&mut [f32]),
        unsafe fn(&mut [f32], &[f32]),
    )> {
        let mut k: Vec<(&str, unsafe fn(&mut [f32]), unsafe fn(&mut [f32], &[f32]))> = vec![];
        if crate::kernels::avx512() {
            k.push(("avx512", softmax_avx512, silu_mul_avx512));
        }
        if cpu() == Isa::Avx2 {
            k.push(("avx2", softmax_avx2, silu_mul_avx2));
        }
        k
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_softmax_matches_the_definition() {
        for (name, softmax_k, _) in vector_kernels() {
            for n in [1, 2, 7, 8, 9, 15, 16, 17, 33, 600] {
                // Spreads from 0.01 to 300: the smallest terms underflow to 0 as they should.
                for spread in [0.01f32, 1.0, 30.0, 300.0] {
                    let mut x: Vec<f32> = crate::kernels::test_data(n, n as u64)
                        .iter()
                        .map(|v| v * spread)
                        .collect();
                    // From the differences as f32 computes them (the scalar softmax rounds them
                    // the same way), so that what is compared is the exponentials and their sum.
                    let max = x.iter().fold(f32::MIN, |m, &v| m.max(v));
                    let e: Vec<f64> = x.iter().map(|&v| ((v - max) as f64).exp()).collect();
                    let z: f64 = e.iter().sum();
                    // SAFETY: vector_kernels lists only what this CPU has.
                    unsafe { softmax_k(&mut x) };
                    for (i, (&got, want)) in x.iter().zip(e.iter().map(|v| v / z)).enumerate() {
                        let tol = 1e-6 * want + 1e-37;
                        assert!(
                            (got as f64 - want).abs() <= tol,
                            "{name} n {n}, spread {spread}, {i}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_silu_matches_the_definition() {
        for (name, softmax_k, silu_k) in vector_kernels() {
            for n in [1, 7, 8, 9, 15, 16, 17, 8192] {
                for spread in [0.1f32, 3.0, 30.0, 200.0] {
                    let x: Vec<f32> = crate::kernels::test_data(n, 3 * n as u64)
                        .iter()
                        .map(|v| v * spread)
                        .collect();
                    let up = crate::kernels::test_data(n, 5 * n as u64);
                    let mut got = x.clone();
                    // SAFETY: vector_kernels lists only what this CPU has.
                    unsafe { silu_k(&mut got, &up) };
                    for i in 0..n {
                        let (g, u) = (x[i] as f64, up[i] as f64);
                        let want = g / (1.0 + (-g).exp()) * u;
                        let tol = 1e-6 * want.abs() + 1e-37;
                        assert!(
                            (got[i] as f64 - want).abs() <= tol,
                            "{name} n {n}, spread {spread}, {i}: {} vs {want}",
                            got[i]
                        );
                    }
                }
            }
            let mut nan = [f32::NAN, 1.0, f32::INFINITY, f32::NEG_INFINITY];
            // SAFETY: as above.
            unsafe { silu_k(&mut nan, &[1.0; 4]) };
            // −∞ · sigmoid(−∞) is NaN here as in the scalar loop and in torch.
            assert!(
                nan[0].is_nan() && nan[2] == f32::INFINITY && nan[3].is_nan(),
                "{name} {nan:?}"
            );
            let mut scores = [0.5, f32::NAN, 1.0];
            // SAFETY: as above.
            unsafe { softmax_k(&mut scores) };
            assert!(scores.iter().all(|v| v.is_nan()), "{name} {scores:?}");
        }
    }

    /// The AVX2 exponential over the whole f32 range it must handle: within 2 ulp of the exact
    /// value where that is normal, 0 or tiny below, +∞ above ln f32::MAX.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_exp_holds_over_the_whole_range() {
        if cpu() != Isa::Avx2 {
            return;
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn exp8(x: &[f32; 8]) -> [f32; 8] {
            let v = exp_avx2(std::arch::x86_64::_mm256_loadu_ps(x.as_ptr()));
            std::mem::transmute(v)
        }
        let mut x = -120.0f32;
        while x < 100.0 {
            let xs: [f32; 8] = std::array::from_fn(|i| x + i as f32 * 0.013);
            // SAFETY: Avx2 (with FMA) detected above.
            let got = unsafe { exp8(&xs) };
            for (g, &v) in got.iter().zip(&xs) {
                let want = (v as f64).exp();
                if want > f32::MAX as f64 {
                    assert_eq!(*g, f32::INFINITY, "exp({v})");
                } else if want < 2f64.powi(-125) {
                    assert!((*g as f64) <= 2f64.powi(-124), "exp({v}) = {g}");
                } else {
                    let ulp = 2f64.powi((want.log2().floor() as i32) - 23);
                    assert!(
                        ((*g as f64) - want).abs() <= 2.0 * ulp,
                        "exp({v}) = {g} vs {want}"
                    );
                }
            }
            x += 0.1;
        }
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut x = [1.0f32, 2.0, 3.0, -1e9];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(x[3], 0.0);
    }
}
