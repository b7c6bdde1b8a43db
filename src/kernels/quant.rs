//! Block-quantized weights (8, 6, 5 and 4 bits, 32 values per block, one f16 scale each) and
//! the integer dot products that read them against 8-bit activations, as llama.cpp does for
//! Q8_0 / Q4_0, with a layout chosen for AVX2.
//!
//! Layout of one quantized row (`cols` padded with zeros to whole blocks), a group of eight blocks
//! (256 values) at a time:
//! - values: the group is cut into eight chunks of 32 bytes; chunk `c` holds values `4c..4c+4` of
//!   block 0, then of block 1, …, of block 7 ([`pos8`]). Q8 stores the chunks as they are (256
//!   bytes); Q4 packs them into four 32-byte words, word `m` holding chunk `2m` in its low nibbles
//!   and chunk `2m + 1` in its high nibbles (128 bytes). Every 4-byte lane of a chunk belongs to
//!   one block, so the multiply-adds that sum four (`vpdpbusd`) or two (`maddubs`) neighbouring
//!   products leave each block's sum in its own 32-bit lane, with no horizontal adds. (The
//!   previous layout paired blocks and needed three horizontal adds per group and row; this one
//!   made the 4-row kernel, one core, L2-resident weights, 42 % faster for Q4 and 55 % for Q8 with
//!   VNNI, 13 % / 43 % with AVX2, and a 384-token q4 prefill 22 % faster.)
//! - Q5 / Q6 are Q4's four words (the codes' low nibbles) followed by `h = 1` / `2` words of
//!   high bits (160 / 192 bytes): chunk `c`'s high bits sit in word `4 + c / (8 / h)` at bit
//!   `h·(c mod 8 / h)` of the byte at the same place as its nibble ([`high_pos`]), so a kernel
//!   rebuilds a chunk's codes with a shift, a mask and an OR per 32 bytes and then multiplies as
//!   for Q4 (the codes stay below 64, so `maddubs` pairs fit 16 bits). They fill the gap
//!   between Q4 and Q8 where llama.cpp's Q4_K_M / Q6_K sit (issue 25).
//! - scales: one f16 per block, in block order. Q4M (Q4's nibbles) keeps its block's zero point
//!   in the scale's five lowest bits ([`zero_point`]): `w ≈ d·(q − o/2)`, a grid that need not be
//!   centred on zero, at Q4's bytes; its kernels are Q4's with `2·Σq·x − o·Σx` in place of
//!   `Σq·x − 8·Σx`. Q5M is the same on Q5's codes, `w ≈ d·(q − o)`.
//! - a row's last group may hold fewer than eight blocks (`w`): it is laid out the same with
//!   32-byte units (Q8 chunks, Q4 / Q5 / Q6 words) of `4w` bytes instead of 32 ([`row_pos`]), so
//!   a row takes `cols / 32` blocks' bytes and no more (576-wide rows padded to 768 made
//!   SmolLM2's q4 file a third larger). The AVX2 kernels read such a group in place with masked
//!   loads (decode); batches (once per chunk of rows, in `matmul`), VNNI's tiles and panels, and
//!   NEON get rows widened to whole groups by [`pad_rows`] first. Rows whose width is a multiple
//!   of 256, every Phi-4-mini matrix, are whole groups already.
//!
//! Q8 values are `round(w / d)` with `d = max|w| / 127`; the low-bit formats store unsigned codes
//! `q` with `w ≈ (q - H)·d` (`H` = 8, 16, 32 for Q4, Q5, Q6), Q4's `d = m / -8` where `m` is the
//! element of largest magnitude (as ggml's Q4_0) among a few candidates (`low_bit_scale`).
//! Activations are quantized per block to i8 with an f32 scale `max|x| / 127`, laid out like Q8
//! weights, with each block's value sum kept so that kernels multiplying unsigned weights (the
//! low-bit codes; with VNNI, Q8 values plus 128) can subtract `H·Σx` or `128·Σx` once per block.

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
    /// Q4's nibbles plus one high bit per value in a plane of its own (see the module notes).
    Q5,
    /// Q4's nibbles plus two high bits per value.
    Q6,
    /// Q4's nibbles on an asymmetric grid: each block has its own zero point (the K-quants'
    /// minimum), kept in the low bits of its scale, so it costs no bytes over Q4 (see
    /// [`zero_point`]).
    Q4M,
    /// Q5's codes with a zero point per block, as Q4M.
    Q5M,
}

impl QType {
    /// Every format, the widest first.
    pub const ALL: [QType; 6] = [
        QType::Q8,
        QType::Q6,
        QType::Q5M,
        QType::Q5,
        QType::Q4M,
        QType::Q4,
    ];

    pub fn name(self) -> &'static str {
        match self {
            QType::Q8 => "q8",
            QType::Q4 => "q4",
            QType::Q5 => "q5",
            QType::Q6 => "q6",
            QType::Q4M => "q4m",
            QType::Q5M => "q5m",
        }
    }

    pub fn parse(s: &str) -> Option<QType> {
        QType::ALL.into_iter().find(|t| t.name() == s)
    }

    /// This format's place in [`QType::ALL`] (for tables kept per format).
    pub fn index(self) -> usize {
        QType::ALL
            .iter()
            .position(|&t| t == self)
            .expect("every format is in ALL")
    }

    /// Bits per stored value.
    pub fn bits(self) -> usize {
        match self {
            QType::Q8 => 8,
            QType::Q4 | QType::Q4M => 4,
            QType::Q5 | QType::Q5M => 5,
            QType::Q6 => 6,
        }
    }

    /// Whether blocks carry a zero point in their scale word ([`zero_point`]).
    pub fn has_zero(self) -> bool {
        matches!(self, QType::Q4M | QType::Q5M)
    }

    /// Bytes of values per stored row of `cols` logical columns.
    pub fn row_bytes(self, cols: usize) -> usize {
        self.block_bytes() * row_blocks(cols)
    }

    /// Bytes of values per block.
    pub fn block_bytes(self) -> usize {
        BLOCK * self.bits() / 8
    }
}

/// How far `QActs::sum8` (8·Σx per block) is shifted left to give the offset that a format of
/// `bits` bits carries as unsigned codes: the low-bit formats store `q` with `w ≈ (q −
/// 2^(bits−1))·d`, so Q4 / Q5 / Q6 take `8·`, `16·`, `32·Σx` off; Q8 is signed, but the VNNI
/// kernels make it unsigned (`w + 128`) and take `128·Σx` off.
pub(super) const fn offset_shift(bits: usize) -> u32 {
    if bits == 8 {
        4
    } else {
        bits as u32 - 4
    }
}

/// The scale word of Q4M / Q5M: the block's scale `d` as an f16 whose five lowest mantissa bits
/// are replaced by its zero point `o` in 0..=31, in half steps for Q4M (`w = d·(q − o/2) =
/// (d/2)·(2q − o)`, codes `q` in 0..16) and whole ones for Q5M (`w = d·(q − o)`, codes in 0..32;
/// [`zero_mult`]). Returns `(d, o)`. Like llama.cpp's Q4_1 /
/// Q4_K the grid need not be centred on zero (those keep a minimum in 16 or 6 more bits per
/// block); here the scale gives up those bits and keeps six significant bits, as fine as Q4_K's
/// sub-block scales. Why the minimum is worth it: weights are rarely symmetric within 32 values,
/// and a centred grid wastes levels on the side without an outlier. Simulated on blocks of 32
/// (numpy, each format's best scale among a few dozen candidates), squared error against Q4:
/// Gaussian 0.80×, Student-t with 4 degrees of freedom 0.62× (an f32 scale and minimum: 0.73×
/// and 0.56×; Q4_K's layout 0.78× and 0.60×); Q5M against Q5 0.85× and 0.64×.
#[inline]
pub fn zero_point(word: f16) -> (f32, i32) {
    let bits = word.to_bits();
    (
        f16::from_bits(bits & !ZERO_MASK).to_f32(),
        (bits & ZERO_MASK) as i32,
    )
}

/// Steps of the zero point per code step: 2 for 4 bits (half steps: 32 zero points span the
/// 16 levels), 1 for 5 bits. Either way zero point 16 is the centred grid of Q4 / Q5.
pub const fn zero_mult(bits: usize) -> i32 {
    if bits == 4 {
        2
    } else {
        1
    }
}

/// The scale-word bits that hold a Q4M / Q5M zero point.
pub const ZERO_MASK: u16 = 31;

/// `d` rounded to the scales a Q4M / Q5M word can hold (six significant bits).
#[inline]
fn zero_scale(d: f32) -> f32 {
    f16::from_bits(zero_word_bits(d)).to_f32()
}

#[inline]
fn zero_word_bits(d: f32) -> u16 {
    // Round to nearest on the bit pattern: a carry out of the mantissa steps the exponent, which
    // is the next representable value.
    (f16::from_f32(d).to_bits().saturating_add(ZERO_MASK / 2 + 1)) & !ZERO_MASK
}

/// Block `b`'s terms for the scalar references: `w_e = scale · (mult · value(e) − zero)` with
/// [`value`]'s integers (for Q4M / Q5M the unsigned codes).
#[inline]
pub(super) fn block_terms(t: QType, word: f16) -> (f32, i32, i32) {
    if t.has_zero() {
        let (d, o) = zero_point(word);
        let mult = zero_mult(t.bits());
        (d / mult as f32, mult, o)
    } else {
        (word.to_f32(), 1, 0)
    }
}

/// `cols` rounded up to whole groups: the width of an activation row, and of a weight row as
/// the kernels read it.
pub fn padded(cols: usize) -> usize {
    cols.div_ceil(GROUP) * GROUP
}

/// Scales (blocks) per stored row of `cols` logical columns.
pub fn row_blocks(cols: usize) -> usize {
    cols.div_ceil(BLOCK)
}

/// Byte and nibble shift (0 for Q8) of element `e` in a stored row of `nb` blocks: full groups
/// as described above (Q8 as [`pos8`]), the last group, if it holds `w < 8` blocks, with units
/// of `4w` bytes. For Q5 / Q6 this is the low nibble; [`high_pos`] has the rest.
#[inline]
pub fn row_pos(t: QType, e: usize, nb: usize) -> (usize, u32) {
    let (base, unit, b, k) = unit_of(t, e, nb);
    let c = k / 4;
    match t {
        QType::Q8 => (base + c * unit + 4 * b + k % 4, 0),
        _ => (base + c / 2 * unit + 4 * b + k % 4, c as u32 % 2 * 4),
    }
}

/// Byte and bit shift of the high bits (`bits - 4` of them) of element `e` of a Q5 / Q6 row:
/// chunk `c`'s in high word `4 + c / (8 / h)` at bit `h·(c mod 8 / h)` (`h = bits - 4`), each
/// byte beside the nibbles' byte of the same place. `None` for Q8 and Q4.
#[inline]
pub fn high_pos(t: QType, e: usize, nb: usize) -> Option<(usize, u32)> {
    let h = match t {
        QType::Q5 | QType::Q5M | QType::Q6 => t.bits() - 4,
        QType::Q8 | QType::Q4 | QType::Q4M => return None,
    };
    let (base, unit, b, k) = unit_of(t, e, nb);
    let (c, per) = (k / 4, 8 / h);
    Some((
        base + (4 + c / per) * unit + 4 * b + k % 4,
        (h * (c % per)) as u32,
    ))
}

/// Where element `e`'s group starts in a stored row of `nb` blocks, the length of that group's
/// 32-byte units (shorter in a partial last group), its block and its place in the block.
#[inline]
fn unit_of(t: QType, e: usize, nb: usize) -> (usize, usize, usize, usize) {
    let (g, b, k) = (e / GROUP, e % GROUP / BLOCK, e % BLOCK);
    let width = if g < nb / 8 { 8 } else { nb % 8 };
    (g * 8 * t.block_bytes(), 4 * width, b, k)
}

/// 32-byte units of a full group: Q8 chunks, Q4 words (and Q5 / Q6's high words after them).
/// A tail group keeps the first `4w` bytes of each.
fn group_units(t: QType) -> usize {
    t.block_bytes() * 8 / 32
}

/// `rows` stored rows of `nb` blocks (`qs`, `d`) in the layout the kernels read: each row
/// widened to whole groups (padding values zero-weighted: scale 0) in `out_qs` / `out_d`,
/// which are resized. Only rows with a partial last group need this (see the module notes).
pub fn pad_rows(
    t: QType,
    qs: &[u8],
    d: &[f16],
    rows: usize,
    nb: usize,
    out_qs: &mut Vec<u8>,
    out_d: &mut Vec<f16>,
) {
    let pnb = nb.div_ceil(8) * 8;
    let (rb, prb) = (nb * t.block_bytes(), pnb * t.block_bytes());
    assert!(qs.len() == rows * rb && d.len() == rows * nb);
    // Padding nibbles 8 stand for 0 (and Q8's 0x88 is as good as any: its scale is 0).
    out_qs.clear();
    out_qs.resize(rows * prb, 0x88);
    out_d.clear();
    out_d.resize(rows * pnb, f16::ZERO);
    let full = nb / 8 * 8 * t.block_bytes();
    for r in 0..rows {
        let (src, dst) = (
            &qs[r * rb..(r + 1) * rb],
            &mut out_qs[r * prb..(r + 1) * prb],
        );
        dst[..full].copy_from_slice(&src[..full]);
        widen_tail(t, &src[full..], nb % 8, &mut dst[full..]);
        out_d[r * pnb..r * pnb + nb].copy_from_slice(&d[r * nb..(r + 1) * nb]);
    }
}

/// A last group of `width` blocks (`src`, stored) into the whole-group layout (`dst`; its
/// padding positions are left as they are).
#[inline]
fn widen_tail(t: QType, src: &[u8], width: usize, dst: &mut [u8]) {
    // Copies of a length known at compile time are a few moves instead of a memcpy call per
    // unit (with those calls, a decode that widened every 576-wide row ran 18 % slower).
    fn widen<const UNIT: usize>(units: usize, src: &[u8], dst: &mut [u8]) {
        for u in 0..units {
            let s: &[u8; UNIT] = src[UNIT * u..UNIT * (u + 1)].try_into().unwrap();
            dst[32 * u..32 * u + UNIT].copy_from_slice(s);
        }
    }
    let units = group_units(t);
    match width {
        0 => {}
        1 => widen::<4>(units, src, dst),
        2 => widen::<8>(units, src, dst),
        3 => widen::<12>(units, src, dst),
        4 => widen::<16>(units, src, dst),
        5 => widen::<20>(units, src, dst),
        6 => widen::<24>(units, src, dst),
        7 => widen::<28>(units, src, dst),
        _ => unreachable!("a partial group holds fewer than 8 blocks"),
    }
}

/// `f` of a stored row widened to whole groups, for kernels that read only those (NEON): the
/// row is copied into a per-thread buffer ([`pad_rows`]).
#[cfg(target_arch = "aarch64")]
pub(super) fn with_widened_row<R>(
    t: QType,
    qs: &[u8],
    d: &[f16],
    f: impl FnOnce(&[u8], &[f16]) -> R,
) -> R {
    WIDENED.with(|buf| {
        let (q, s) = &mut *buf.borrow_mut();
        pad_rows(t, qs, d, 1, d.len(), q, s);
        f(q, s)
    })
}

#[cfg(target_arch = "aarch64")]
thread_local! {
    static WIDENED: std::cell::RefCell<(Vec<u8>, Vec<f16>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Position of element `e` of a row in the Q8 (and activation) layout.
#[inline]
pub fn pos8(e: usize) -> usize {
    let (g, b, k) = (e / GROUP, e % GROUP / BLOCK, e % BLOCK);
    g * GROUP + k / 4 * 32 + b * 4 + k % 4
}

/// Quantizes one row (`w.len()` logical columns) into `qs` (`row_bytes`) and `d` (`row_blocks`).
pub fn quantize_row(t: QType, w: &[f32], qs: &mut [u8], d: &mut [f16]) {
    quantize_row_weighted(t, w, None, qs, d)
}

/// [`quantize_row`] with each column's importance (`imp`, as long as `w`): the mean square of
/// the activations it meets, from calibration text. Q4 scales then minimise the error each
/// block adds to the layer's output, `Σ imp_k (w_k - ŵ_k)²` (the expected squared output error
/// when the activations are independent), over a wider set of candidate scales. Q8 scales stay
/// `max|w| / 127`: their rounding costs a small fraction of q8's error (see `wide_acts`).
pub fn quantize_row_weighted(
    t: QType,
    w: &[f32],
    imp: Option<&[f32]>,
    qs: &mut [u8],
    d: &mut [f16],
) {
    if let Some(imp) = imp {
        assert_eq!(imp.len(), w.len(), "one importance per column");
    }
    quantize_row_with(t, w, Guide { imp, grids: None }, qs, d)
}

/// [`quantize_row`] into Q4M / Q5M for values that already lie near a grid `w ≈ a·q − m` per
/// block of 32 (`grids[b] = (a, m)`, as a GGUF Q4_K sub-block's scale and minimum): only the
/// scale words next to `a` and the zero points next to `m / a` are tried, with the refit of the
/// best, instead of the whole search. A synthetic Phi-4-mini Q4_K_M GGUF (llama.cpp's
/// quantizer) opened and run briefly took 13.6–13.7 s this way against 14.7–16.3 s when Q4_K
/// became Q4; the whole search made it ~24 s slower than Q4 (Zen 5, 2 threads; BENCHMARKS.md run
/// Q7). The error is the whole search's or less (tests/gguf.rs: 0.266 against 0.270 of Q4_K's
/// own).
pub fn quantize_row_near(t: QType, w: &[f32], grids: &[(f32, f32)], qs: &mut [u8], d: &mut [f16]) {
    assert!(t.has_zero(), "grids guide Q4M / Q5M only");
    assert_eq!(grids.len(), row_blocks(w.len()), "one grid per block");
    let grids = Some(grids);
    quantize_row_with(t, w, Guide { imp: None, grids }, qs, d)
}

/// What a row's search may lean on: the columns' importances ([`quantize_row_weighted`]) or
/// the blocks' grids ([`quantize_row_near`]).
#[derive(Clone, Copy)]
struct Guide<'a> {
    imp: Option<&'a [f32]>,
    grids: Option<&'a [(f32, f32)]>,
}

fn quantize_row_with(t: QType, w: &[f32], guide: Guide, qs: &mut [u8], d: &mut [f16]) {
    match cpu() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: cpu() returns Avx2 only after detecting avx2 and fma.
        Isa::Avx2 => unsafe { avx2::quantize_row(t, w, guide, qs, d) },
        _ => quantize_row_generic(t, w, guide, qs, d),
    }
}

/// Inlined into an AVX2 copy too: the same code, with vector rounding and wider lanes
/// (the baseline build calls libm for `round` and gets 4-wide SSE2 at best).
#[inline(always)]
fn quantize_row_generic(t: QType, w: &[f32], guide: Guide, qs: &mut [u8], d: &mut [f16]) {
    let Guide { imp, grids } = guide;
    let cols = w.len();
    let nb = row_blocks(cols);
    assert_eq!(qs.len(), t.row_bytes(cols));
    assert_eq!(d.len(), nb);
    let mut block = [0f32; BLOCK];
    let mut weights = [0f32; BLOCK];
    for g in 0..nb.div_ceil(8) {
        let width = (nb - 8 * g).min(8);
        // The group's codes in the Q8 order (Q4: one nibble per byte), as if it were whole.
        let mut q = [0u8; GROUP];
        for b in 0..width {
            let first = (g * 8 + b) * BLOCK;
            for (k, v) in block.iter_mut().enumerate() {
                *v = w.get(first + k).copied().unwrap_or(0.0);
            }
            let grid = grids.map(|gr| gr[g * 8 + b]);
            let scale = match t {
                QType::Q8 => {
                    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let scale = amax / 127.0;
                    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                    for (k, v) in block.iter().enumerate() {
                        let x = (v * inv).round().clamp(-127.0, 127.0) as i8;
                        q[pos8(b * BLOCK + k)] = x as u8;
                    }
                    scale
                }
                QType::Q4 => low_bit_block::<8>(&block, imp, first, &mut weights, b, &mut q),
                QType::Q4M => {
                    d[g * 8 + b] =
                        zero_block::<8>(&block, imp, grid, first, &mut weights, b, &mut q);
                    continue;
                }
                QType::Q5M => {
                    d[g * 8 + b] =
                        zero_block::<16>(&block, imp, grid, first, &mut weights, b, &mut q);
                    continue;
                }
                QType::Q5 => low_bit_block::<16>(&block, imp, first, &mut weights, b, &mut q),
                QType::Q6 => low_bit_block::<32>(&block, imp, first, &mut weights, b, &mut q),
            };
            d[g * 8 + b] = f16::from_f32(scale);
        }
        // Each 32-byte unit keeps its first 4·width bytes (all of them in a whole group).
        let (unit, out) = (4 * width, &mut qs[g * 8 * t.block_bytes()..]);
        if t == QType::Q8 {
            for c in 0..8 {
                out[c * unit..(c + 1) * unit].copy_from_slice(&q[32 * c..32 * c + unit]);
            }
            continue;
        }
        for m in 0..4 {
            for k in 0..unit {
                out[m * unit + k] = q[64 * m + k] & 15 | (q[64 * m + 32 + k] & 15) << 4;
            }
        }
        // Q5 / Q6: chunk c's high bits in word 4 + c / per at bit h·(c mod per), OR-ed into
        // words cleared first (the caller's buffer may hold anything).
        let h = t.bits() - 4;
        let per = 8 / h.max(1);
        out[4 * unit..(4 + h) * unit].fill(0);
        for c in 0..8 * usize::from(h > 0) {
            let (word, shift) = (4 + c / per, h * (c % per));
            for k in 0..unit {
                out[word * unit + k] |= (q[32 * c + k] >> 4) << shift;
            }
        }
    }
}

/// The importances of the block starting at column `first` of the row's `imp` (0 past its
/// end), gathered into `weights`.
#[inline(always)]
fn block_importances<'a>(
    imp: &[f32],
    first: usize,
    weights: &'a mut [f32; BLOCK],
) -> &'a [f32; BLOCK] {
    for (k, v) in weights.iter_mut().enumerate() {
        *v = imp.get(first + k).copied().unwrap_or(0.0);
    }
    weights
}

/// A block's importances as error weights: columns no calibration token reached still count a
/// little (a thousandth of the block's mean), since a zero weight would let their values round
/// anywhere.
#[inline(always)]
fn floored(imp: &[f32; BLOCK]) -> [f32; BLOCK] {
    let floor = imp.iter().sum::<f32>() / BLOCK as f32 * 1e-3 + f32::MIN_POSITIVE;
    let mut out = [0f32; BLOCK];
    for (o, i) in out.iter_mut().zip(imp) {
        *o = i.max(0.0) + floor;
    }
    out
}

/// One block of a low-bit format (`HALF = 2^(bits-1)`: 8, 16, 32) into `q` (block `b` of the
/// group, in the Q8 order, one code per byte); returns its scale. `weights` is scratch for the
/// block's importances (from `imp`, the row's, starting at column `first`).
#[inline(always)]
fn low_bit_block<const HALF: i32>(
    block: &[f32; BLOCK],
    imp: Option<&[f32]>,
    first: usize,
    weights: &mut [f32; BLOCK],
    b: usize,
    q: &mut [u8; GROUP],
) -> f32 {
    let scale = match imp {
        Some(imp) => scale_weighted::<HALF>(block, block_importances(imp, first, weights)),
        None => low_bit_scale::<HALF>(block),
    };
    let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    for (k, v) in block.iter().enumerate() {
        // Code q with w ≈ (q - HALF)·scale.
        q[pos8(b * BLOCK + k)] = code::<HALF>(v * inv);
    }
    scale
}

/// One Q4M / Q5M block (`HALF` = 8 / 16: `2·HALF` levels) into `q` (as [`low_bit_block`]);
/// returns its scale word ([`zero_point`]). Candidates: grids spanning the block's range (its
/// lowest value on code 0, widths of 0.9 to 1.07 times `2·HALF − 1` steps, each zero point and
/// the one beside it), Q4's / Q5's centred grid (zero point 16), and each one's weighted
/// least-squares refit of scale and minimum for the codes it rounds to; the least
/// error `Σ imp·(w − ŵ)²` wins (equal weights without calibration). Given the block's `grid`
/// (`w ≈ a·q − m`, see [`quantize_row_near`]) only the grids next to it are tried.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn zero_block<const HALF: i32>(
    block: &[f32; BLOCK],
    imp: Option<&[f32]>,
    grid: Option<(f32, f32)>,
    first: usize,
    weights: &mut [f32; BLOCK],
    b: usize,
    q: &mut [u8; GROUP],
) -> f16 {
    let raw = imp.map(|imp| block_importances(imp, first, weights));
    let wt = &raw.map_or([1.0; BLOCK], floored);
    // The zero point's step in codes (see `zero_mult`).
    let step = 1.0 / zero_mult(if HALF == 8 { 4 } else { 5 }) as f32;
    let (lo, hi) = block
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
            (l.min(v), h.max(v))
        });
    let (sw, sv) = (
        wt.iter().sum::<f32>(),
        wt.iter().zip(block).map(|(w, v)| w * v).sum::<f32>(),
    );
    let mut search = ZeroSearch::<HALF> {
        block,
        wt,
        step,
        sw,
        sv,
        best: (f32::INFINITY, 0.0, 0),
        best_fit: None,
    };
    if let Some((a, m)) = grid.filter(|&(a, _)| a > 0.0 && a.is_finite()) {
        // The scale words on either side of `a`, each with the zero points on either side of
        // its minimum, then the best one's refit.
        let bits = zero_word_bits(a);
        let other = if f16::from_bits(bits).to_f32() > a {
            bits.saturating_sub(ZERO_MASK + 1)
        } else {
            bits.saturating_add(ZERO_MASK + 1)
        };
        for bits in [bits, other] {
            let d = f16::from_bits(bits).to_f32();
            let o = m / d / step;
            if o.is_finite() {
                search.consider(d, o.floor() as i32);
                search.consider(d, o.ceil() as i32);
            }
        }
        search.refit_best();
    }
    // Without a grid, or when none near it fits (a minimum past the zero points' reach): the
    // whole search. Each candidate's refit (weighted least squares of scale and minimum for the
    // codes it rounds to) is tried too with importances (quantizing with calibration is done
    // once, offline), only the best one's without: on the test's uniform and cubed values, Q4's
    // squared error × 0.86 / 0.90 that way against 0.85 / 0.90 refitting all (SmolLM2 quantized
    // in 3.4 s against 5.3 s); with importances × 0.77 / 0.76 refitting all against 0.80 / 0.78.
    if search.best.1 == 0.0 {
        let range = hi - lo;
        if range > 0.0 {
            let top = (2 * HALF - 1) as f32;
            for width in [1.0f32, 0.967, 0.933, 0.9, 1.033, 1.067] {
                let d = zero_scale(range / (top * width));
                if d > 0.0 {
                    let o = (-lo / d / step).round() as i32;
                    for o in [o - 1, o, o + 1] {
                        let fit = search.consider(d, o);
                        if imp.is_some() {
                            search.refit(fit);
                        }
                    }
                }
            }
        }
        // The centred grid (Q4's / Q5's) as a candidate too: never worse than that format but for
        // the scale's rounding. A negative scale there puts the spare level on the positive side:
        // zero point HALF − 1 with the scale's magnitude is the same grid.
        let centred = match raw {
            Some(raw) => scale_weighted::<HALF>(block, raw),
            None => low_bit_scale::<HALF>(block),
        };
        let zero = if centred < 0.0 { HALF - 1 } else { HALF };
        let fit = search.consider(centred, (zero as f32 / step) as i32);
        search.refit(fit);
        if imp.is_none() {
            search.refit_best();
        }
    }
    let (_, d, o) = search.best;
    if d == 0.0 {
        // An all-zero block (or one too small for an f16 scale): every value reads as 0.
        for k in 0..BLOCK {
            q[pos8(b * BLOCK + k)] = 0;
        }
        return f16::ZERO;
    }
    let (inv, z) = (1.0 / d, o as f32 * step);
    for (k, v) in block.iter().enumerate() {
        q[pos8(b * BLOCK + k)] = code::<HALF>(v * inv + z - HALF as f32);
    }
    f16::from_bits(zero_word_bits(d) | o as u16)
}

/// The candidates of one [`zero_block`] search and the best so far. Methods, not closures:
/// a closure called from several places is compiled out of line, and then without the AVX2 of
/// `avx2::quantize_row`, which inlines all of this (the closures ran at SSE2's width);
/// `#[inline(always)]` methods land inside it.
struct ZeroSearch<'a, const HALF: i32> {
    block: &'a [f32; BLOCK],
    wt: &'a [f32; BLOCK],
    /// The zero point's step in codes.
    step: f32,
    /// Σ wt and Σ wt·v, for the refits.
    sw: f32,
    sv: f32,
    /// (error, scale, zero point), the least error so far, and its refit.
    best: (f32, f32, i32),
    best_fit: Option<(f32, f32)>,
}

impl<const HALF: i32> ZeroSearch<'_, HALF> {
    /// Weighted squared error of (d, o), and the refit (d, minimum) for its codes. Eight
    /// running sums each, so that the loop vectorises.
    #[inline(always)]
    fn eval(&self, d: f32, o: i32) -> (f32, Option<(f32, f32)>) {
        let (inv, z) = (1.0 / d, o as f32 * self.step);
        let (mut e, mut sq, mut sqq, mut sqv) = ([0f32; 8], [0f32; 8], [0f32; 8], [0f32; 8]);
        for (c, w) in self.block.chunks_exact(8).zip(self.wt.chunks_exact(8)) {
            for k in 0..8 {
                let qk = code::<HALF>(c[k] * inv + z - HALF as f32) as f32;
                let r = c[k] - d * (qk - z);
                e[k] += w[k] * r * r;
                sq[k] += w[k] * qk;
                sqq[k] += w[k] * qk * qk;
                sqv[k] += w[k] * qk * c[k];
            }
        }
        let sum = |a: [f32; 8]| a.iter().sum::<f32>();
        let (e, sq, sqq, sqv) = (sum(e), sum(sq), sum(sqq), sum(sqv));
        // v ≈ a·q − m: normal equations of the weighted fit.
        let det = self.sw * sqq - sq * sq;
        let fit = (det > 0.0).then(|| {
            let a = (self.sw * sqv - sq * self.sv) / det;
            let m = (sq * sqv - sqq * self.sv) / det;
            (a, m)
        });
        (e, fit)
    }

    /// Tries the grid (|d| rounded to a scale word, o); returns its refit.
    #[inline(always)]
    fn consider(&mut self, d: f32, o: i32) -> Option<(f32, f32)> {
        let d = zero_scale(d.abs());
        if !(d.is_finite() && d > 0.0 && (0..=ZERO_MASK as i32).contains(&o)) {
            return None;
        }
        let (e, fit) = self.eval(d, o);
        if e < self.best.0 {
            (self.best, self.best_fit) = ((e, d, o), fit);
        }
        fit
    }

    /// Tries the best grid's refit (kept when it was found, not evaluated again).
    #[inline(always)]
    fn refit_best(&mut self) {
        self.refit(self.best_fit);
    }

    /// Tries a refit (scale, minimum) on the nearest zero point.
    #[inline(always)]
    fn refit(&mut self, fit: Option<(f32, f32)>) {
        if let Some((a, m)) = fit {
            let a = zero_scale(a);
            if a > 0.0 {
                self.consider(a, (m / a / self.step).round() as i32);
            }
        }
    }
}

/// The code of `x = w / d` in a format of `2·HALF` levels: `clamp(floor(x + HALF + 0.5), 0,
/// 2·HALF - 1)`. Clamping before the truncating cast gives the same value without `floor`, which
/// is a libm call on baseline x86-64 (no SSE4.1) and was a fifth of the time of quantizing a
/// checkpoint.
#[inline(always)]
#[allow(clippy::manual_clamp)] // clamp keeps NaN, which the unchecked cast must not see
fn code<const HALF: i32>(x: f32) -> u8 {
    // `max` maps NaN to 0, so the value is finite and in 0..2·HALF: the unchecked cast is
    // sound, and unlike the saturating `as` it vectorises.
    // SAFETY: see above.
    unsafe {
        (x + HALF as f32 + 0.5)
            .max(0.0)
            .min((2 * HALF - 1) as f32)
            .to_int_unchecked::<i32>() as u8
    }
}

/// The signed level `code(x) - HALF` as a float.
#[inline(always)]
fn level<const HALF: i32>(x: f32) -> f32 {
    code::<HALF>(x) as f32 - HALF as f32
}

/// The scale of one block of a low-bit format (levels `-HALF..HALF`): ggml's `m / -8` for Q4
/// (`m` the value of largest magnitude, which then maps exactly to the lowest level) is one
/// candidate among a few narrower grids, each refitted by least squares to the values it rounds
/// to; the one with the least squared error wins. On Gaussian or uniform weights this lowers
/// Q4's RMS error by about a fifth against `m / -8` alone.
#[inline(always)]
fn low_bit_scale<const HALF: i32>(block: &[f32]) -> f32 {
    let half = HALF as f32;
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
                let e = v - level::<HALF>(v * inv) * d;
                *a += e * e;
            }
        }
        acc.iter().sum()
    };
    let mut best = (sse(m / -half), m / -half);
    for grid in [half - 0.5, half - 1.0] {
        let d0 = m / -grid;
        // Least-squares refit of the scale for the levels d0 rounds to.
        let inv = 1.0 / d0;
        let (mut num, mut den) = ([0f32; 8], [0f32; 8]);
        for c in block.chunks_exact(8) {
            for k in 0..8 {
                let q = level::<HALF>(c[k] * inv);
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

/// The scale of one low-bit block whose values weigh `imp` each in the error: the candidates
/// that map the value of largest magnitude `m` to the levels from the lowest (`-HALF`) to two
/// above it or from the highest (`HALF - 1`) to one below it (quarter steps; for Q4 -8 … -6 and
/// +7 … +6), each also refitted by weighted least squares to the levels it rounds to; the least
/// weighted squared error wins. (With equal weights this finds what [`low_bit_scale`] finds or
/// better; it costs ~6x the time, which quantizing a checkpoint once can afford.)
#[inline(always)]
fn scale_weighted<const HALF: i32>(block: &[f32; BLOCK], imp: &[f32; BLOCK]) -> f32 {
    let half = HALF as f32;
    let m = block
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    if m == 0.0 {
        return 0.0;
    }
    let wt = floored(imp);
    // A function, not a closure: a closure called from several places is compiled out of line,
    // without the AVX2 of `avx2::quantize_row` that inlines this (see `ZeroSearch`).
    #[inline(always)]
    fn err<const HALF: i32>(block: &[f32; BLOCK], wt: &[f32; BLOCK], d: f32) -> (f32, f32, f32) {
        let inv = 1.0 / d;
        let (mut e, mut num, mut den) = ([0f32; 8], [0f32; 8], [0f32; 8]);
        for (c, w) in block.chunks_exact(8).zip(wt.chunks_exact(8)) {
            for k in 0..8 {
                let q = level::<HALF>(c[k] * inv);
                let r = c[k] - q * d;
                e[k] += w[k] * r * r;
                num[k] += w[k] * c[k] * q;
                den[k] += w[k] * q * q;
            }
        }
        (e.iter().sum(), num.iter().sum(), den.iter().sum())
    }
    let mut best = (f32::INFINITY, m / -half);
    let low = [0.0f32, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0].map(|s| s - half);
    let high = [0.0f32, 0.25, 0.5, 1.0].map(|s| half - 1.0 - s);
    for grid in low.into_iter().chain(high) {
        let d0 = m / grid;
        let (e0, num, den) = err::<HALF>(block, &wt, d0);
        if e0 < best.0 {
            best = (e0, d0);
        }
        if den > 0.0 && num != 0.0 {
            let d1 = num / den;
            let (e1, _, _) = err::<HALF>(block, &wt, d1);
            if e1 < best.0 {
                best = (e1, d1);
            }
        }
    }
    best.1
}

/// The signed integer value of element `e` (logical index) of a quantized row of `nb` blocks
/// (stored, or padded for the kernels); for Q4M the unsigned code (see [`block_terms`]).
#[inline]
pub(super) fn value(t: QType, qs: &[u8], e: usize, nb: usize) -> i32 {
    let (at, shift) = row_pos(t, e, nb);
    if t == QType::Q8 {
        return qs[at] as i8 as i32;
    }
    let mut q = (qs[at] >> shift) & 15;
    if let Some((at, shift)) = high_pos(t, e, nb) {
        let h = t.bits() as u32 - 4;
        q |= ((qs[at] >> shift) & ((1 << h) - 1)) << 4;
    }
    if t.has_zero() {
        return q as i32;
    }
    q as i32 - (1 << (t.bits() - 1))
}

/// Widens a quantized row (`d` holds its scales) back to f32 (`out.len()` logical columns).
pub fn dequantize_row(t: QType, qs: &[u8], d: &[f16], out: &mut [f32]) {
    for (e, o) in out.iter_mut().enumerate() {
        let (scale, mult, zero) = block_terms(t, d[e / BLOCK]);
        *o = (mult * value(t, qs, e, d.len()) - zero) as f32 * scale;
    }
}

/// One activation row quantized to i8 blocks, laid out like a Q8 weight row.
#[derive(Clone, Debug, Default)]
pub struct QActs {
    pub qs: Vec<i8>,
    /// Per block.
    pub d: Vec<f32>,
    /// Per block: 8 × the sum of the block's values (the offset correction of kernels that
    /// multiply unsigned weights: Q4 nibbles, and Q8 values plus 128 with VNNI).
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
            // Four values at a time into their chunks (see `pos8`).
            let first = pos8(b * BLOCK);
            for (c, four) in q.chunks_exact(4).enumerate() {
                let at = first + 32 * c;
                self.qs[at..at + 4].copy_from_slice(four);
            }
            self.d[b] = scale;
            self.sum8[b] = 8 * sum;
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
        for (b, db) in d.iter().enumerate() {
            let (scale, mult, zero) = block_terms(t, *db);
            let mut isum = 0i32;
            for k in 0..BLOCK {
                let e = b * BLOCK + k;
                isum += value(t, qs, e, d.len()) * x.qs[pos8(e)] as i32;
            }
            let isum = mult * isum - zero * (x.sum8[b] >> 3);
            acc += scale * x.d[b] * isum as f32;
        }
        *o = acc;
    }
}

/// Most activation rows one call takes.
pub const MAX_ROWS: usize = 4;

/// `out[j] = w · xs[j]` (`xs.len() <= MAX_ROWS`) for one stored weight row (`qs`, `d`) with
/// the CPU's best kernel.
pub fn dot_rows(t: QType, qs: &[u8], d: &[f16], xs: &[&QActs], out: &mut [f32]) {
    assert!(xs.len() <= MAX_ROWS && out.len() == xs.len());
    assert_eq!(qs.len(), d.len() * t.block_bytes());
    let pnb = d.len().div_ceil(8) * 8;
    assert!(
        xs.iter().all(|x| x.d.len() == pnb),
        "activation width differs"
    );
    match cpu() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as below, and vnni() only after detecting AVX-512 F/BW/VL and VNNI.
        Isa::Avx2 if vnni() => unsafe { avx2::dot_rows_vnni(t, qs, d, xs, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: cpu() returns Avx2 only after detecting avx2, fma and f16c; lengths checked
        // above (the kernel reads a partial last group with masked loads).
        Isa::Avx2 => unsafe { avx2::dot_rows(t, qs, d, xs, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: cpu() returns Neon only after detecting it; lengths checked above.
        Isa::Neon if d.len().is_multiple_of(8) => unsafe { neon::dot_rows(t, qs, d, xs, out) },
        // The NEON kernel reads whole groups: a row ending in a partial one goes widened.
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above, for the widened row (whole groups, as long as the activations).
        Isa::Neon => with_widened_row(t, qs, d, |q, s| unsafe { neon::dot_rows(t, q, s, xs, out) }),
        _ => scalar_dot_rows(t, qs, d, xs, out),
    }
}

/// `out[i] = w_i · x` for consecutive weight rows `w_0 .. w_{out.len()}` (`qs`, `d` hold them
/// all): one call per run of rows instead of one per row, so the checks and the kernel choice
/// are paid once (decode calls this for every chunk of every product).
pub fn dot_row_run(t: QType, qs: &[u8], d: &[f16], x: &QActs, out: &mut [f32]) {
    let rows = out.len();
    assert!(rows > 0 && d.len().is_multiple_of(rows) && qs.len().is_multiple_of(rows));
    let (nb, rb) = (d.len() / rows, qs.len() / rows);
    assert_eq!(rb, nb * t.block_bytes());
    assert_eq!(x.d.len(), nb.div_ceil(8) * 8, "activation width differs");
    match cpu() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: vnni() only after detecting AVX-512 F/BW/VL/VNNI on top of Avx2; every
        // row's length is checked above.
        Isa::Avx2 if vnni() => unsafe { avx2::dot_row_run_vnni(t, qs, d, x, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: cpu() returns Avx2 only after detecting avx2, fma and f16c; lengths as above.
        Isa::Avx2 => unsafe { avx2::dot_row_run(t, qs, d, x, out) },
        _ => {
            for (i, o) in out.iter_mut().enumerate() {
                let (q, s) = (&qs[i * rb..(i + 1) * rb], &d[i * nb..(i + 1) * nb]);
                dot_rows(t, q, s, &[x], std::slice::from_mut(o));
            }
        }
    }
}

/// `out[j] = w0 · xs[j]` and `out[k + j] = w1 · xs[j]` for two adjacent weight rows (`qs`, `d`
/// hold both, `k = xs.len() <= MAX_ROWS`). With AVX-512 VNNI one pass computes the 2 × k tile,
/// so each activation load feeds two `vpdpbusd` (32 registers hold its 16 accumulators). On
/// 2 Zen 4 cores, 384-token prefill, median of 4 runs each: q4 38 → 57 tok/s, q8 33 → 36 (Q8
/// then still had a `vpsignb` per product; see `vnni_group_sums` for what replaced it).
/// Elsewhere it is two [`dot_rows`] calls (AVX2's 16 registers cannot hold the tile).
pub fn dot_row_pair(t: QType, qs: &[u8], d: &[f16], xs: &[&QActs], out: &mut [f32]) {
    let (k, half_q, half_d) = (xs.len(), qs.len() / 2, d.len() / 2);
    assert!(k <= MAX_ROWS && out.len() == 2 * k && qs.len() == 2 * half_q);
    assert_eq!(d.len(), 2 * half_d);
    assert_eq!(half_q, half_d * t.block_bytes());
    assert!(
        xs.iter().all(|x| x.d.len() == half_d.div_ceil(8) * 8),
        "activation width differs"
    );
    #[cfg(target_arch = "x86_64")]
    if vnni() && half_d.is_multiple_of(8) {
        // SAFETY: vnni() only after detecting avx2, fma, f16c and AVX-512 F/BW/VL/VNNI; the
        // lengths of both rows and every activation row are checked above.
        return unsafe { avx2::dot_row_pair_vnni(t, qs, d, xs, out) };
    }
    let (o0, o1) = out.split_at_mut(k);
    dot_rows(t, &qs[..half_q], &d[..half_d], xs, o0);
    dot_rows(t, &qs[half_q..], &d[half_d..], xs, o1);
}

/// Whether the CPU has AVX-512 VNNI on top of [`super::avx512`]: then one `vpdpbusd` on 256-bit
/// registers does the work of `maddubs` + `madd`, with 32-bit sums (no 16-bit limits).
/// `PHI4_ISA=avx2` keeps the plain AVX2 kernels.
pub fn vnni() -> bool {
    static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VNNI.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            super::avx512() && is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Which kernels the integer products run on this CPU, for reports.
pub fn isa_name() -> &'static str {
    match cpu() {
        _ if vnni() => "AVX-512 VNNI",
        Isa::Avx2 => "AVX2",
        Isa::Neon => "NEON",
        Isa::Scalar => "scalar",
    }
}

/// Evaluates `$call` with the constants `$n = xs.len()` (1..=MAX_ROWS), `$bits = t.bits()` and
/// `$zero = t.has_zero()`, so that a kernel can take them as const generic arguments.
macro_rules! by_rows_and_type {
    ($t:expr, $xs:expr, |$n:ident, $bits:ident, $zero:ident| $call:expr) => {
        match $t {
            QType::Q8 => by_rows_and_type!(@rows 8, false, $xs, $n, $bits, $zero, $call),
            QType::Q6 => by_rows_and_type!(@rows 6, false, $xs, $n, $bits, $zero, $call),
            QType::Q5 => by_rows_and_type!(@rows 5, false, $xs, $n, $bits, $zero, $call),
            QType::Q4 => by_rows_and_type!(@rows 4, false, $xs, $n, $bits, $zero, $call),
            QType::Q4M => by_rows_and_type!(@rows 4, true, $xs, $n, $bits, $zero, $call),
            QType::Q5M => by_rows_and_type!(@rows 5, true, $xs, $n, $bits, $zero, $call),
        }
    };
    (@rows $bv:literal, $zv:literal, $xs:expr, $n:ident, $bits:ident, $zero:ident, $call:expr) => {
        match $xs.len() {
            0 => {}
            1 => by_rows_and_type!(@ 1, $bv, $zv, $n, $bits, $zero, $call),
            2 => by_rows_and_type!(@ 2, $bv, $zv, $n, $bits, $zero, $call),
            3 => by_rows_and_type!(@ 3, $bv, $zv, $n, $bits, $zero, $call),
            _ => by_rows_and_type!(@ 4, $bv, $zv, $n, $bits, $zero, $call),
        }
    };
    (@ $nv:literal, $bv:literal, $zv:literal, $n:ident, $bits:ident, $zero:ident, $call:expr) => {{
        const $n: usize = $nv;
        const $bits: usize = $bv;
        const $zero: bool = $zv;
        $call
    }};
}
#[allow(unused_imports)] // used by the kernel modules of `wide_acts`, per architecture
pub(super) use by_rows_and_type;

/// The same kernels with Advanced SIMD: 8×8→16-bit multiplies (`smull`) summed pairwise into
/// 32-bit lanes (`sadalp`), a group at a time, 16 values per register. Q4 nibbles are made
/// signed (`q - 8`) before multiplying, so no offset correction is needed. Tested against the
/// scalar reference under qemu-aarch64 (no ARM machine here to time it on).
#[cfg(target_arch = "aarch64")]
mod neon {
    use super::{QActs, QType};
    use half::f16;
    use std::arch::aarch64::*;

    #[target_feature(enable = "neon")]
    pub unsafe fn dot_rows(t: QType, qs: &[u8], d: &[f16], xs: &[&QActs], out: &mut [f32]) {
        by_rows_and_type!(t, xs, |N, B, Z| dot_n::<N, B, Z>(qs, d, xs, out))
    }

    /// Half `h` (16 bytes) of chunks `2m` and `2m + 1` of a Q4 / Q5 / Q6 group (`B` bits) as
    /// unsigned codes: the nibbles of word `m`, Q5 / Q6's high bits from their word above them.
    #[inline(always)]
    pub(crate) unsafe fn low_bit_pair<const B: usize>(
        w: *const u8,
        m: usize,
        h: usize,
    ) -> [uint8x16_t; 2] {
        let m4 = vdupq_n_u8(15);
        let v = vld1q_u8(w.add(32 * m + 16 * h));
        let mut out = [vandq_u8(v, m4), vshrq_n_u8::<4>(v)];
        if B > 4 {
            let hb = B - 4;
            let per = 8 / hb;
            let hw = vld1q_u8(w.add(32 * (4 + 2 * m / per) + 16 * h));
            let mask = vdupq_n_u8(((1 << hb) - 1) as u8);
            for (i, o) in out.iter_mut().enumerate() {
                let at = (hb * ((2 * m + i) % per)) as i8;
                // A negative count shifts right.
                let bits = vandq_u8(vshlq_u8(hw, vdupq_n_s8(-at)), mask);
                *o = vorrq_u8(*o, vshlq_n_u8::<4>(bits));
            }
        }
        out
    }

    /// One group's weights as signed values, 16 per register: register `2c + h` holds half `h`
    /// of chunk `c` (four values of each of blocks `4h..4h+4`).
    #[inline(always)]
    unsafe fn group_values<const B: usize>(w: *const u8) -> [int8x16_t; 16] {
        let mut out = [vdupq_n_s8(0); 16];
        if B < 8 {
            let e = vdupq_n_s8(1 << (B - 1));
            let s = |v: uint8x16_t| vsubq_s8(vreinterpretq_s8_u8(v), e);
            for m4 in 0..4 {
                for h in 0..2 {
                    let [lo, hi] = low_bit_pair::<B>(w, m4, h);
                    out[2 * (2 * m4) + h] = s(lo);
                    out[2 * (2 * m4 + 1) + h] = s(hi);
                }
            }
        } else {
            for (i, o) in out.iter_mut().enumerate() {
                *o = vld1q_s8(w.add(16 * i) as *const i8);
            }
        }
        out
    }

    /// Products are widened to 16 bits (`smull`) and added in pairs into 32-bit lanes
    /// (`sadalp`), which leaves each block's sum in two neighbouring lanes; one pairwise add per
    /// four blocks finishes a group.
    #[inline(always)]
    unsafe fn dot_n<const N: usize, const B: usize, const Z: bool>(
        qs: &[u8],
        d: &[f16],
        xs: &[&QActs],
        out: &mut [f32],
    ) {
        let group_bytes = 32 * B;
        let mut acc = [[vdupq_n_f32(0.0); 2]; N];
        for g in 0..d.len() / 8 {
            let (dw, zero) = super::neon_scales::<B, Z>(&d[g * 8..]);
            let wv = group_values::<B>(qs.as_ptr().add(g * group_bytes));
            for r in 0..N {
                let x = xs[r].qs.as_ptr().add(g * 256);
                // a[2h]: blocks 4h, 4h+1 (two lanes each); a[2h+1]: blocks 4h+2, 4h+3.
                let mut a = [vdupq_n_s32(0); 4];
                for c in 0..8 {
                    for h in 0..2 {
                        let (w, xv) = (wv[2 * c + h], vld1q_s8(x.add(32 * c + 16 * h)));
                        a[2 * h] = vpadalq_s16(a[2 * h], vmull_s8(vget_low_s8(w), vget_low_s8(xv)));
                        a[2 * h + 1] = vpadalq_s16(a[2 * h + 1], vmull_high_s8(w, xv));
                    }
                }
                let dx = xs[r].d.as_ptr().add(g * 8);
                for h in 0..2 {
                    let mut s = vpaddq_s32(a[2 * h], a[2 * h + 1]);
                    if Z {
                        // The codes went in as q − H (8, 16): with m = zero_mult (2, 1),
                        // m·Σq·x − o·Σx = m·s + (m·H − o)·Σx, and m·H = 16 either way.
                        let sx =
                            vshrq_n_s32::<3>(vld1q_s32(xs[r].sum8.as_ptr().add(g * 8 + 4 * h)));
                        let k = vsubq_s32(vdupq_n_s32(16), vld1q_s32(zero.as_ptr().add(4 * h)));
                        let ms = if B == 4 { vaddq_s32(s, s) } else { s };
                        s = vmlaq_s32(ms, k, sx);
                    }
                    let sums = vcvtq_f32_s32(s);
                    let scale =
                        vmulq_f32(vld1q_f32(dw.as_ptr().add(4 * h)), vld1q_f32(dx.add(4 * h)));
                    acc[r][h] = vfmaq_f32(acc[r][h], sums, scale);
                }
            }
        }
        for r in 0..N {
            out[r] = vaddvq_f32(vaddq_f32(acc[r][0], acc[r][1]));
        }
    }
}

/// A group's eight scale words for a NEON kernel: the f32 scales and, for Q4M / Q5M (`Z`), the
/// zero points (the scale divided by [`zero_mult`], and `o`); zeros otherwise.
#[cfg(target_arch = "aarch64")]
#[inline(always)]
pub(super) fn neon_scales<const B: usize, const Z: bool>(d: &[f16]) -> ([f32; 8], [i32; 8]) {
    use half::slice::HalfFloatSliceExt;
    let (mut dw, mut zero) = ([0f32; 8], [0i32; 8]);
    if Z {
        for b in 0..8 {
            let (s, o) = zero_point(d[b]);
            (dw[b], zero[b]) = (s / zero_mult(B) as f32, o);
        }
    } else {
        d[..8].convert_to_f32_slice(&mut dw);
    }
    (dw, zero)
}

/// How far ahead of the weight reads to prefetch.
#[cfg(target_arch = "x86_64")]
const PREFETCH: usize = 2048;

/// A stored row's partial last group for an AVX2 kernel (`group_bytes` per whole group): where
/// its units start (unit `u` at `width·u` 32-bit words), the mask that loads a unit's
/// `4·width` bytes and leaves the missing blocks' lanes 0 without touching memory past the
/// row, and the group's scale words (0 for the missing blocks; see [`group_scales`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn partial_group(
    qs: &[u8],
    d: &[f16],
    group_bytes: usize,
) -> (
    *const i32,
    std::arch::x86_64::__m256i,
    std::arch::x86_64::__m128i,
) {
    use std::arch::x86_64::*;
    let (groups, width) = (d.len() / 8, d.len() % 8);
    let w = qs.as_ptr().add(groups * group_bytes) as *const i32;
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(width as i32), lane);
    let mut sc = [f16::ZERO; 8];
    sc[..width].copy_from_slice(&d[groups * 8..]);
    (w, mask, _mm_loadu_si128(sc.as_ptr() as *const __m128i))
}

/// A group's eight scale words (lane `b`: block `b`) as the kernels use them: the f32 scales
/// and, for Q4M / Q5M (`Z`), the zero points ([`zero_point`]'s `o`, with the scale divided as
/// [`corrected`]'s form needs: by 16 for 4 bits, 8 for 5); zeros otherwise.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn group_scales<const B: usize, const Z: bool>(
    raw: std::arch::x86_64::__m128i,
) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256i) {
    use std::arch::x86_64::*;
    if Z {
        let mask = _mm_set1_epi16(ZERO_MASK as i16);
        let d = _mm256_cvtph_ps(_mm_andnot_si128(mask, raw));
        let k = 1.0 / (8 * zero_mult(B)) as f32;
        (
            _mm256_mul_ps(d, _mm256_set1_ps(k)),
            _mm256_cvtepu16_epi32(_mm_and_si128(raw, mask)),
        )
    } else {
        (_mm256_cvtph_ps(raw), _mm256_setzero_si256())
    }
}

/// [`group_scales`] of the group at `d` (eight words).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn load_scales<const B: usize, const Z: bool>(
    d: *const f16,
) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256i) {
    use std::arch::x86_64::*;
    group_scales::<B, Z>(_mm_loadu_si128(d as *const __m128i))
}

/// Chunks `2m` and `2m + 1` of a Q4 / Q5 / Q6 group (`BITS`) as unsigned codes, one per byte:
/// word `m`'s low and high nibbles, with Q5 / Q6's high bits from their word put above them
/// (`w(u)` loads the group's 32-byte unit `u`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn low_bit_pair<const BITS: usize>(
    w: &impl Fn(usize) -> std::arch::x86_64::__m256i,
    m: usize,
) -> [std::arch::x86_64::__m256i; 2] {
    use std::arch::x86_64::*;
    let m4 = _mm256_set1_epi8(15);
    let v = w(m);
    let mut out = [
        _mm256_and_si256(v, m4),
        _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4),
    ];
    if BITS > 4 {
        let h = BITS - 4;
        let per = 8 / h;
        let hw = w(4 + 2 * m / per);
        let mask = _mm256_set1_epi8((((1 << h) - 1) << 4) as i8);
        for (i, o) in out.iter_mut().enumerate() {
            // Chunk 2m + i's high bits sit at bit `at` of each byte; moved to bit 4 by a 16-bit
            // shift, whose bits carried across a byte land outside the mask.
            let at = (h * ((2 * m + i) % per)) as i32;
            let moved = if at <= 4 {
                _mm256_sll_epi16(hw, _mm_cvtsi32_si128(4 - at))
            } else {
                _mm256_srl_epi16(hw, _mm_cvtsi32_si128(at - 4))
            };
            *o = _mm256_or_si256(*o, _mm256_and_si256(moved, mask));
        }
    }
    out
}

/// A group's block sums of unsigned codes (`s`, lane `b`: block `b`) made the integers its
/// scales multiply, with the activation sums `sum8` (8·Σx per block): the offset the codes
/// carry comes off ([`offset_shift`]: `sum8 << shift`); for Q4M / Q5M (`Z`), `8·(m·Σq·x −
/// o·Σx)` with the blocks' zero points `zero` ([`group_scales`]; `m` = [`zero_mult`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn corrected<const B: usize, const Z: bool>(
    s: std::arch::x86_64::__m256i,
    sum8: *const i32,
    zero: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let c = _mm256_loadu_si256(sum8 as *const __m256i);
    if Z {
        // 8 times over (8m·Σq·x − o·8Σx), which saves shifting sum8 back; `group_scales` gave
        // the scales an eighth more. The sums stay below 2^28 (16-bit activations).
        let ms = if B == 4 {
            _mm256_slli_epi32::<4>(s)
        } else {
            _mm256_slli_epi32::<3>(s)
        };
        _mm256_sub_epi32(ms, _mm256_mullo_epi32(zero, c))
    } else {
        _mm256_sub_epi32(
            s,
            _mm256_sll_epi32(c, _mm_cvtsi32_si128(offset_shift(B) as i32)),
        )
    }
}

/// Readies the weights of decode's next groups: the group at `w` (`bytes` long) is about to be
/// read, and the one PREFETCH bytes ahead is asked for.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn prefetch_group(w: *const u8, bytes: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    // The hardware prefetcher alone leaves decode waiting on weight loads; asking PREFETCH
    // bytes ahead gained ~10 % (q4, 2 threads, 3 runs each: median 12.55 vs 11.15 tok/s). Past
    // the row's end this touches the next row, which comes next.
    for line in (0..bytes).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(PREFETCH + line) as *const i8);
    }
    // The group's later cache lines, read now: the compiler sinks the vector loads to their
    // first use, after the products of the first line, so their misses would start late.
    // Touching them here overlaps the misses (decode +4 %, q4, 8 runs each).
    for line in (64..bytes).step_by(64) {
        // SAFETY: the caller's group is `bytes` long.
        unsafe { std::ptr::read_volatile(w.add(line)) };
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{QActs, QType, PREFETCH};
    use half::f16;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_row(
        t: QType,
        w: &[f32],
        guide: super::Guide,
        qs: &mut [u8],
        d: &mut [f16],
    ) {
        super::quantize_row_generic(t, w, guide, qs, d)
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
        // Spelled out: an array `map` here is a call into a function without AVX, where the
        // intrinsics cannot be inlined (see `pair_n`).
        let i = [
            _mm256_cvtps_epi32(_mm256_mul_ps(v[0], inv)),
            _mm256_cvtps_epi32(_mm256_mul_ps(v[1], inv)),
            _mm256_cvtps_epi32(_mm256_mul_ps(v[2], inv)),
            _mm256_cvtps_epi32(_mm256_mul_ps(v[3], inv)),
        ];
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
        by_rows_and_type!(t, xs, |N, B, Z| dot_n::<N, B, Z, VNNI>(qs, d, xs, out))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_row_run(t: QType, qs: &[u8], d: &[f16], x: &QActs, out: &mut [f32]) {
        dot_row_run_with::<false>(t, qs, d, x, out)
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn dot_row_run_vnni(t: QType, qs: &[u8], d: &[f16], x: &QActs, out: &mut [f32]) {
        dot_row_run_with::<true>(t, qs, d, x, out)
    }

    #[inline(always)]
    unsafe fn dot_row_run_with<const VNNI: bool>(
        t: QType,
        qs: &[u8],
        d: &[f16],
        x: &QActs,
        out: &mut [f32],
    ) {
        let rows = out.len();
        let (rb, nb) = (qs.len() / rows, d.len() / rows);
        for (i, o) in out.iter_mut().enumerate() {
            let (q, dd) = (&qs[i * rb..(i + 1) * rb], &d[i * nb..(i + 1) * nb]);
            dot_rows_with::<VNNI>(t, q, dd, &[x], std::slice::from_mut(o));
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn dot_row_pair_vnni(
        t: QType,
        qs: &[u8],
        d: &[f16],
        xs: &[&QActs],
        out: &mut [f32],
    ) {
        by_rows_and_type!(t, xs, |N, B, Z| pair_n::<N, B, Z>(qs, d, xs, out))
    }

    /// [`dot_n`] for two weight rows at once (VNNI only): the group sums of both rows against
    /// N activation rows, each activation vector loaded once for both.
    #[inline(always)]
    unsafe fn pair_n<const N: usize, const B: usize, const Z: bool>(
        qs: &[u8],
        d: &[f16],
        xs: &[&QActs],
        out: &mut [f32],
    ) {
        let (row_bytes, nb) = (qs.len() / 2, d.len() / 2);
        let groups = nb / 8;
        let group_bytes = 32 * B;
        let mut xp = [std::ptr::null::<i8>(); N];
        for r in 0..N {
            xp[r] = xs[r].qs.as_ptr();
        }
        let mut acc = [[_mm256_setzero_ps(); N]; 2];
        for g in 0..groups {
            let w = [
                qs.as_ptr().add(g * group_bytes),
                qs.as_ptr().add(row_bytes + g * group_bytes),
            ];
            for wr in w {
                for line in (0..group_bytes).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(wr.wrapping_add(PREFETCH + line) as *const i8);
                }
            }
            let off = g * 256;
            let x =
                |r: usize, c: usize| _mm256_loadu_si256(xp[r].add(off + 32 * c) as *const __m256i);
            // a: even chunks, b: odd chunks; [weight row][activation row].
            let mut a = [[_mm256_setzero_si256(); N]; 2];
            let mut b = [[_mm256_setzero_si256(); N]; 2];
            if B < 8 {
                let load0 = |u: usize| _mm256_loadu_si256(w[0].add(32 * u) as *const __m256i);
                let load1 = |u: usize| _mm256_loadu_si256(w[1].add(32 * u) as *const __m256i);
                for m in 0..4 {
                    let v = [
                        super::low_bit_pair::<B>(&load0, m),
                        super::low_bit_pair::<B>(&load1, m),
                    ];
                    for r in 0..N {
                        let (xl, xh) = (x(r, 2 * m), x(r, 2 * m + 1));
                        for i in 0..2 {
                            a[i][r] = _mm256_dpbusd_epi32(a[i][r], v[i][0], xl);
                            b[i][r] = _mm256_dpbusd_epi32(b[i][r], v[i][1], xh);
                        }
                    }
                }
            } else {
                let flip = _mm256_set1_epi8(-128);
                for c in 0..8 {
                    let uw = [
                        _mm256_xor_si256(_mm256_loadu_si256(w[0].add(32 * c).cast()), flip),
                        _mm256_xor_si256(_mm256_loadu_si256(w[1].add(32 * c).cast()), flip),
                    ];
                    for r in 0..N {
                        let xr = x(r, c);
                        for i in 0..2 {
                            if c % 2 == 0 {
                                a[i][r] = _mm256_dpbusd_epi32(a[i][r], uw[i], xr);
                            } else {
                                b[i][r] = _mm256_dpbusd_epi32(b[i][r], uw[i], xr);
                            }
                        }
                    }
                }
            }
            // Not `[0, nb].map(…)`: array `map` runs its closure in a function without the
            // kernel's target features, where the scale intrinsics became calls (Q4M / Q5M's
            // pairs ran at a third of Q5's speed on Zen 5).
            let sc = [
                super::load_scales::<B, Z>(d.as_ptr().add(g * 8)),
                super::load_scales::<B, Z>(d.as_ptr().add(nb + g * 8)),
            ];
            for r in 0..N {
                let dx = _mm256_loadu_ps(xs[r].d.as_ptr().add(g * 8));
                let sum8 = xs[r].sum8.as_ptr().add(g * 8);
                for i in 0..2 {
                    // Lane b: block b of the group.
                    let s = _mm256_add_epi32(a[i][r], b[i][r]);
                    let s = super::corrected::<B, Z>(s, sum8, sc[i].1);
                    acc[i][r] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(s),
                        _mm256_mul_ps(sc[i].0, dx),
                        acc[i][r],
                    );
                }
            }
        }
        for i in 0..2 {
            for r in 0..N {
                let v = acc[i][r];
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let s = _mm_hadd_ps(s, s);
                out[i * N + r] = _mm_cvtss_f32(_mm_hadd_ps(s, s));
            }
        }
    }

    /// The eight block sums of a group (256 values) against N activation rows with `vpdpbusd`,
    /// block `b` in lane `b`. Q4 multiplies the unsigned nibbles, like the AVX2 path (the `8·Σx`
    /// offset comes off later). Q8 flips each code's top bit, which makes it the unsigned `w + 128`
    /// (exact for every i8, -128 included), so it too takes one `vpdpbusd` per 32 products, and
    /// `128·Σx` comes off later. It used to multiply |w| by x·sign(w) as the AVX2 path must
    /// (`maddubs` would saturate on `w + 128`); that `vpsignb` per activation vector held the Q8
    /// product at 156–161 G products/s against 190–205 now (512 activation rows, 3072 × 8192 and
    /// 16384 × 3072, 2 threads, 8 alternating pairs; results bit for bit the same). Two
    /// accumulators per row halve the dependency chains (one row, as in decode, would otherwise
    /// wait on each multiply-add).
    #[inline(always)]
    unsafe fn vnni_group_sums<const N: usize, const B: usize>(
        w: impl Fn(usize) -> __m256i,
        xp: &[*const i8; N],
        off: usize,
    ) -> [__m256i; N] {
        let x = |r: usize, c: usize| _mm256_loadu_si256(xp[r].add(off + 32 * c) as *const __m256i);
        let mut a = [_mm256_setzero_si256(); N];
        let mut b = [_mm256_setzero_si256(); N];
        if B < 8 {
            for m in 0..4 {
                let [lo, hi] = super::low_bit_pair::<B>(&w, m);
                for r in 0..N {
                    a[r] = _mm256_dpbusd_epi32(a[r], lo, x(r, 2 * m));
                    b[r] = _mm256_dpbusd_epi32(b[r], hi, x(r, 2 * m + 1));
                }
            }
        } else {
            let flip = _mm256_set1_epi8(-128);
            for c in 0..8 {
                let uw = _mm256_xor_si256(w(c), flip);
                for r in 0..N {
                    if c % 2 == 0 {
                        a[r] = _mm256_dpbusd_epi32(a[r], uw, x(r, c));
                    } else {
                        b[r] = _mm256_dpbusd_epi32(b[r], uw, x(r, c));
                    }
                }
            }
        }
        let mut out = [_mm256_setzero_si256(); N];
        for r in 0..N {
            out[r] = _mm256_add_epi32(a[r], b[r]);
        }
        out
    }

    /// The eight block sums of a Q4 / Q5 / Q6 group (256 values), block `b` in lane `b`, before
    /// the offset. The `maddubs` of a row are added in 16 bits for as many words as cannot
    /// overflow, then widened by one `madd`: Q4's pairs reach 2·15·127 per lane, so all eight
    /// (30480 < 2^15) take one `madd` per group; Q5's 2·31·127, four of them (31496) per
    /// `madd`; Q6's 2·63·127, two (32004).
    #[inline(always)]
    unsafe fn low_bit_group_sums<const N: usize, const B: usize>(
        w: impl Fn(usize) -> __m256i,
        xp: &[*const i8; N],
        off: usize,
    ) -> [__m256i; N] {
        let x = |r: usize, c: usize| _mm256_loadu_si256(xp[r].add(off + 32 * c) as *const __m256i);
        let ones = _mm256_set1_epi16(1);
        // Words (two chunks each) added in 16 bits before a `madd`: 4, 2, 1 for Q4, Q5, Q6.
        let words = 1 << (6 - B);
        let mut s = [_mm256_setzero_si256(); N];
        let mut p16 = [_mm256_setzero_si256(); N];
        for m in 0..4 {
            let [lo, hi] = super::low_bit_pair::<B>(&w, m);
            for r in 0..N {
                let p = _mm256_add_epi16(
                    _mm256_maddubs_epi16(lo, x(r, 2 * m)),
                    _mm256_maddubs_epi16(hi, x(r, 2 * m + 1)),
                );
                p16[r] = _mm256_add_epi16(p16[r], p);
                if (m + 1) % words == 0 {
                    s[r] = _mm256_add_epi32(s[r], _mm256_madd_epi16(p16[r], ones));
                    p16[r] = _mm256_setzero_si256();
                }
            }
        }
        s
    }

    /// The eight block sums of a Q8 group (256 values), block `b` in lane `b`: |w|·(x·sign w),
    /// unsigned × signed as `maddubs` needs. Each product pair reaches 2·127·127 in 16 bits, so
    /// unlike Q4 every `maddubs` is widened (`madd`) before adding.
    #[inline(always)]
    unsafe fn q8_group_sums<const N: usize>(
        w: impl Fn(usize) -> __m256i,
        xp: &[*const i8; N],
        off: usize,
    ) -> [__m256i; N] {
        let x = |r: usize, c: usize| _mm256_loadu_si256(xp[r].add(off + 32 * c) as *const __m256i);
        let ones = _mm256_set1_epi16(1);
        let mut out = [_mm256_setzero_si256(); N];
        for c in 0..8 {
            let wc = w(c);
            let aw = _mm256_sign_epi8(wc, wc);
            for (r, o) in out.iter_mut().enumerate() {
                let p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(x(r, c), wc));
                *o = _mm256_add_epi32(*o, _mm256_madd_epi16(p, ones));
            }
        }
        out
    }

    /// Group `g`'s block sums (weights loaded unit by unit by `w`, scales `dw`) against N
    /// activation rows, scaled into `acc`.
    #[inline(always)]
    unsafe fn add_group<const N: usize, const B: usize, const Z: bool, const VNNI: bool>(
        g: usize,
        w: impl Fn(usize) -> __m256i,
        (dw, zero): (__m256, __m256i),
        xs: &[&QActs],
        xp: &[*const i8; N],
        acc: &mut [__m256; N],
    ) {
        let off = g * 256;
        let sums = if VNNI {
            vnni_group_sums::<N, B>(w, xp, off)
        } else if B < 8 {
            low_bit_group_sums::<N, B>(w, xp, off)
        } else {
            q8_group_sums::<N>(w, xp, off)
        };
        for r in 0..N {
            // Lane b: block b of the group.
            let mut s = sums[r];
            if B < 8 || VNNI {
                // The offset the unsigned weights carry: 8·Σx for Q4 nibbles (16, 32 for Q5,
                // Q6), 128·Σx for Q8 values made unsigned for `vpdpbusd`; Q4M's zero points.
                s = super::corrected::<B, Z>(s, xs[r].sum8.as_ptr().add(g * 8), zero);
            }
            let dx = _mm256_loadu_ps(xs[r].d.as_ptr().add(g * 8));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, dx), acc[r]);
        }
    }

    /// One stored row (whole groups, then possibly a partial one) against N activation rows.
    #[inline(always)]
    unsafe fn dot_n<const N: usize, const B: usize, const Z: bool, const VNNI: bool>(
        qs: &[u8],
        d: &[f16],
        xs: &[&QActs],
        out: &mut [f32],
    ) {
        let groups = d.len() / 8;
        let group_bytes = 32 * B;
        let mut xp = [std::ptr::null::<i8>(); N];
        for r in 0..N {
            xp[r] = xs[r].qs.as_ptr();
        }
        let mut acc = [_mm256_setzero_ps(); N];
        for g in 0..groups {
            let w = qs.as_ptr().add(g * group_bytes);
            super::prefetch_group(w, group_bytes);
            let sc = super::load_scales::<B, Z>(d.as_ptr().add(g * 8));
            let load = |u: usize| _mm256_loadu_si256(w.add(32 * u) as *const __m256i);
            add_group::<N, B, Z, VNNI>(g, load, sc, xs, &xp, &mut acc);
        }
        let width = d.len() % 8;
        if width > 0 {
            // A partial last group (see `row_pos`): each 32-byte unit's first 4·width bytes,
            // read with a mask so that nothing past the row is touched; the lanes of missing
            // blocks load as 0, meet activations of 0 and scales of 0.
            let (w, mask, raw) = super::partial_group(qs, d, group_bytes);
            let load = |u: usize| _mm256_maskload_epi32(w.add(width * u), mask);
            let sc = super::group_scales::<B, Z>(raw);
            add_group::<N, B, Z, VNNI>(groups, load, sc, xs, &xp, &mut acc);
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
pub(crate) mod tests {
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

    /// `w` quantized as a stored row (its last group partial unless the width is a multiple
    /// of 256): what every kernel entry point takes.
    pub(crate) fn quantized(t: QType, w: &[f32]) -> (Vec<u8>, Vec<f16>) {
        let mut qs = vec![0u8; t.row_bytes(w.len())];
        let mut d = vec![f16::ZERO; row_blocks(w.len())];
        quantize_row(t, w, &mut qs, &mut d);
        (qs, d)
    }

    /// What a row quantizes to does not depend on what its buffers held before.
    #[test]
    fn quantizing_overwrites_every_byte_of_the_row() {
        for t in QType::ALL {
            for cols in [64, 288, 3072] {
                let w = data(cols, 5);
                let (want_q, want_d) = quantized(t, &w);
                let mut qs = vec![0xA5u8; t.row_bytes(cols)];
                let mut d = vec![f16::from_f32(3.0); row_blocks(cols)];
                quantize_row(t, &w, &mut qs, &mut d);
                assert_eq!((qs, d), (want_q, want_d), "{t:?} {cols}");
            }
        }
    }

    /// `w` quantized and widened to whole groups.
    fn widened(t: QType, w: &[f32]) -> (Vec<u8>, Vec<f16>) {
        let (qs, d) = quantized(t, w);
        let (mut pq, mut pd) = (Vec::new(), Vec::new());
        pad_rows(t, &qs, &d, 1, d.len(), &mut pq, &mut pd);
        (pq, pd)
    }

    /// Widths whose last group holds 1 … 7 blocks, alone and after whole groups, and whole.
    pub(crate) const TAIL_WIDTHS: [usize; 12] = [
        32,
        96,
        224,
        256,
        288,
        320,
        384,
        416,
        480,
        1100,
        3072,
        8192 + 64,
    ];

    /// Stored rows hold only their blocks, read back to the same values as the padded rows
    /// the kernels get, and the padding adds nothing: every position of a tail group is hit
    /// once, and a product over padded rows equals the dequantized dot.
    #[test]
    fn stored_rows_are_compact_and_pad_to_the_same_values() {
        for t in QType::ALL {
            for cols in [32, 64, 200, 256, 288, 576, 1100, 3072] {
                let w = data(cols, 3);
                let (qs, d) = quantized(t, &w);
                assert_eq!(
                    qs.len(),
                    cols.div_ceil(BLOCK) * t.block_bytes(),
                    "{t:?} {cols}"
                );
                assert_eq!(d.len(), cols.div_ceil(BLOCK));
                let (pq, pd) = widened(t, &w);
                assert_eq!(pq.len(), padded(cols) * t.block_bytes() / BLOCK);
                let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
                dequantize_row(t, &qs, &d, &mut a);
                dequantize_row(t, &pq, &pd, &mut b);
                assert_eq!(a, b, "{t:?} {cols}");
                // Every bit of the stored row belongs to exactly one element.
                let nb = d.len();
                let mut owner = vec![0u8; qs.len()];
                let mut claim = |at: usize, shift: u32, bits: usize, e: usize| {
                    let m = ((1u32 << bits) - 1) << shift;
                    assert!(at < qs.len() && m <= 0xFF, "{t:?} {cols} e{e}");
                    assert_eq!(owner[at] as u32 & m, 0, "{t:?} {cols} e{e}");
                    owner[at] |= m as u8;
                };
                for e in 0..nb * BLOCK {
                    let (at, shift) = row_pos(t, e, nb);
                    claim(
                        at,
                        shift,
                        t.bits().min(if t == QType::Q8 { 8 } else { 4 }),
                        e,
                    );
                    if let Some((at, shift)) = high_pos(t, e, nb) {
                        claim(at, shift, t.bits() - 4, e);
                    }
                }
                assert!(owner.iter().all(|&o| o == 0xFF), "{t:?} {cols}");
                // Padded positions beyond the row's blocks carry scale 0.
                assert!(pd[nb..].iter().all(|s| *s == f16::ZERO));
            }
        }
    }

    /// `x` quantized as an activation row.
    fn activation(x: &[f32]) -> QActs {
        let mut a = QActs::default();
        a.quantize(x);
        a
    }

    #[test]
    fn round_trip_error_is_within_a_grid_step() {
        for t in QType::ALL {
            for cols in [32, 96, 256, 3072 + 32] {
                let w = data(cols, 7);
                let (qs, d) = quantized(t, &w);
                let mut back = vec![0f32; cols];
                dequantize_row(t, &qs, &d, &mut back);
                for b in 0..cols.div_ceil(BLOCK) {
                    let blk = &w[b * BLOCK..((b + 1) * BLOCK).min(cols)];
                    let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let step = amax
                        / if t == QType::Q8 {
                            127.0
                        } else {
                            (1 << (t.bits() - 1)) as f32
                        };
                    // Q8: half a step. Q4: a full step where the largest value's opposite
                    // clamps at +7 (the grid is -8..7; likewise Q5, Q6).
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
        for t in QType::ALL {
            for cols in TAIL_WIDTHS {
                let (qs, d) = quantized(t, &data(cols, 3));
                let acts: Vec<QActs> = (0..MAX_ROWS as u64)
                    .map(|s| activation(&data(cols, 40 + s)))
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

    /// A run of weight rows against one activation row (decode's entry point) against the
    /// scalar reference for each row, with whichever kernel the CPU gets.
    #[test]
    fn row_runs_match_the_scalar_reference() {
        for t in QType::ALL {
            for cols in TAIL_WIDTHS {
                let rows = 5;
                let (rb, nb) = (t.row_bytes(cols), row_blocks(cols));
                let (mut qs, mut d) = (vec![0u8; rows * rb], vec![f16::ZERO; rows * nb]);
                for r in 0..rows {
                    let (q, s) = quantized(t, &data(cols, 60 + r as u64));
                    qs[r * rb..(r + 1) * rb].copy_from_slice(&q);
                    d[r * nb..(r + 1) * nb].copy_from_slice(&s);
                }
                let x = activation(&data(cols, 7));
                let mut got = vec![0f32; rows];
                dot_row_run(t, &qs, &d, &x, &mut got);
                for (r, g) in got.iter().enumerate() {
                    let mut want = [0f32];
                    let (q, s) = (&qs[r * rb..(r + 1) * rb], &d[r * nb..(r + 1) * nb]);
                    scalar_dot_rows(t, q, s, &[&x], &mut want);
                    let tol = 1e-5 * (cols as f32).sqrt() * want[0].abs().max(1.0);
                    assert!(
                        (g - want[0]).abs() <= tol,
                        "{t:?} {cols} row {r}: {g} vs {}",
                        want[0]
                    );
                }
            }
        }
    }

    /// The two-row kernel (VNNI where the CPU has it, else two single-row calls) against the
    /// scalar reference for each row.
    #[test]
    fn row_pairs_match_the_scalar_reference() {
        eprintln!(
            "pair kernel: {}",
            if vnni() { "vnni" } else { "two dot_rows" }
        );
        for t in QType::ALL {
            for cols in TAIL_WIDTHS {
                let (q0, d0) = quantized(t, &data(cols, 7));
                let (q1, d1) = quantized(t, &data(cols, 8));
                let (qs, d) = (
                    [q0.clone(), q1.clone()].concat(),
                    [d0.clone(), d1.clone()].concat(),
                );
                let acts: Vec<QActs> = (0..MAX_ROWS as u64)
                    .map(|s| activation(&data(cols, 50 + s)))
                    .collect();
                for n in 1..=MAX_ROWS {
                    let xs: Vec<&QActs> = acts[..n].iter().collect();
                    let mut want = vec![0f32; 2 * n];
                    scalar_dot_rows(t, &q0, &d0, &xs, &mut want[..n]);
                    scalar_dot_rows(t, &q1, &d1, &xs, &mut want[n..]);
                    let mut got = vec![0f32; 2 * n];
                    dot_row_pair(t, &qs, &d, &xs, &mut got);
                    for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                        let tol = 1e-5 * (cols as f32).sqrt() * w.abs().max(1.0);
                        assert!(
                            (g - w).abs() <= tol,
                            "{t:?} {cols} n{n} out {j}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn extreme_codes_do_not_overflow_the_16_bit_sums() {
        // Every code at its top (Q4 nibble 15, value +7; Q6 63, +31) or 0 (value -8, -32)
        // against activations of ±127: the largest magnitudes the 16-bit partial sums of the
        // kernels ever hold.
        for (t, (byte, x, top)) in [QType::Q4, QType::Q5, QType::Q6].into_iter().flat_map(|t| {
            [
                (0xFFu8, 127i8, true),
                (0x00, -127, false),
                (0xFF, -127, true),
            ]
            .map(|c| (t, c))
        }) {
            let half = 1i64 << (t.bits() - 1);
            let level = if top { half - 1 } else { -half };
            let cols = 512;
            let qs = vec![byte; t.row_bytes(cols)];
            let d = vec![f16::ONE; row_blocks(cols)];
            let want = (level * x as i64 * cols as i64) as f32;
            assert_exact_sums(t, &qs, &d, x, want, &format!("{t:?} {byte} {x}"));
        }
    }

    /// One stored row (`qs`, `d`) against 1..=MAX_ROWS copies of the activation row of `x` in
    /// every column (scale 1), through `dot_rows`, the scalar reference and the row pair, and
    /// against 40 copies through the batched product (VNNI's panels where the CPU has them):
    /// each must give exactly `want`.
    fn assert_exact_sums(t: QType, qs: &[u8], d: &[f16], x: i8, want: f32, what: &str) {
        let cols = d.len() * BLOCK;
        let acts = QActs {
            qs: vec![x; cols],
            d: vec![1.0; d.len()],
            sum8: vec![8 * 32 * x as i32; d.len()],
        };
        for n in 1..=MAX_ROWS {
            let xs = vec![&acts; n];
            let mut got = vec![0f32; n];
            dot_rows(t, qs, d, &xs, &mut got);
            assert!(got.iter().all(|&g| g == want), "{what}: {got:?} vs {want}");
            scalar_dot_rows(t, qs, d, &xs, &mut got);
            assert!(got.iter().all(|&g| g == want), "{what} scalar: {got:?}");
            let mut pair = vec![0f32; 2 * n];
            let (q2, d2) = ([qs, qs].concat(), [d, d].concat());
            dot_row_pair(t, &q2, &d2, &xs, &mut pair);
            assert!(pair.iter().all(|&g| g == want), "{what} pair: {pair:?}");
        }
        // ±127 in every column: the activation scale is exactly 1 and every code ±127.
        let n = 40;
        let mut got = vec![0f32; n];
        let view = crate::kernels::WeightView::Quant {
            t,
            qs,
            d,
            acts: crate::kernels::wide_acts::QuantActs::I8,
        };
        crate::kernels::matmul(view, 1, cols, &vec![x as f32; n * cols], &mut got);
        assert!(got.iter().all(|&g| g == want), "{what} batch: {got:?}");
    }

    /// Q4M / Q5M codes at both ends under the extreme zero points (0 and 31) against
    /// activations of ±127, through every entry point: `m·Σq·x − o·Σx` stays exact.
    #[test]
    fn extreme_zero_points_give_exact_sums() {
        let cols = 512;
        for (t, byte, top) in [QType::Q4M, QType::Q5M]
            .into_iter()
            .flat_map(|t| [(t, 0xFFu8, true), (t, 0x00, false)])
        {
            let code = if top { (1i64 << t.bits()) - 1 } else { 0 };
            let m = zero_mult(t.bits()) as i64;
            for o in [0u16, 1, 16, 31] {
                for x in [127i8, -127] {
                    let qs = vec![byte; t.row_bytes(cols)];
                    let d = vec![f16::from_bits(f16::ONE.to_bits() | o); row_blocks(cols)];
                    let want =
                        (m * code - o as i64) as f32 / m as f32 * (x as i64 * cols as i64) as f32;
                    assert_exact_sums(t, &qs, &d, x, want, &format!("{t:?} {byte} o {o} {x}"));
                }
            }
        }
    }

    #[test]
    fn zero_point_words_keep_six_significant_bits_and_the_zero_point() {
        for d in [1.0f32, 0.0123, 3.7e-3, 0.5 + 1.0 / 64.0, 6.0e-5, 1000.0] {
            let r = zero_scale(d);
            assert!((r - d).abs() <= d / 64.0 + 1e-9, "{d} -> {r}");
            for o in [0u16, 7, 31] {
                let word = f16::from_bits(zero_word_bits(d) | o);
                assert_eq!(zero_point(word), (r, o as i32));
            }
        }
    }

    /// Squared error (importance-weighted with `imp`) of a row in format `t`.
    fn row_error(t: QType, w: &[f32], imp: Option<&[f32]>) -> f64 {
        let (nb, cols) = (row_blocks(w.len()), w.len());
        let (mut qs, mut d) = (vec![0u8; t.row_bytes(cols)], vec![f16::ZERO; nb]);
        quantize_row_weighted(t, w, imp, &mut qs, &mut d);
        let mut back = vec![0f32; cols];
        dequantize_row(t, &qs, &d, &mut back);
        (0..cols)
            .map(|k| imp.map_or(1.0, |i| i[k] as f64) * ((w[k] - back[k]) as f64).powi(2))
            .sum()
    }

    #[test]
    fn zero_points_cut_the_error_at_the_same_bytes() {
        let cols = 3072;
        // Measured: Q4M 0.86 / 0.77 of Q4's error (uniform; without / with importances), 0.90 /
        // 0.76 (cubed); Q5M 0.97 / 0.94 and 0.89 / 0.82 of Q5's: a 32-level centred grid already
        // fits uniform values well, and the scale's six significant bits cost more at 5 bits.
        for (plain, zero, limits) in [
            (QType::Q4, QType::Q4M, [0.9, 0.95]),
            (QType::Q5, QType::Q5M, [0.99, 0.93]),
        ] {
            assert_eq!(plain.row_bytes(cols), zero.row_bytes(cols));
            zero_points_cut(plain, zero, cols, limits);
        }
    }

    fn zero_points_cut(plain: QType, zero: QType, cols: usize, limits: [f64; 2]) {
        // Uniform values, and heavy-tailed ones (cubes: most values small, a few large, as
        // trained weights have), without and with importances spread over three orders of
        // magnitude.
        for (shape, limit) in [(1, limits[0]), (3, limits[1])] {
            for weighted in [false, true] {
                let (mut q4, mut q4m) = (0.0, 0.0);
                for seed in 0..8 {
                    let w: Vec<f32> = data(cols, 400 + seed)
                        .iter()
                        .map(|u| u.powi(shape))
                        .collect();
                    let imp: Vec<f32> = data(cols, 500 + seed)
                        .iter()
                        .map(|u| (u * 14.0).exp())
                        .collect();
                    let imp = weighted.then_some(&imp[..]);
                    q4 += row_error(plain, &w, imp);
                    q4m += row_error(zero, &w, imp);
                }

                assert!(
                    q4m < limit * q4,
                    "{zero:?} shape {shape} weighted {weighted}: {q4m} vs {q4} ({:.3})",
                    q4m / q4
                );
            }
        }
    }

    /// Q8 codes at both ends, -128 included (ggml's quantizer never writes it, but a Q8_0 file
    /// may hold it), against activations of ±127, through every entry point: the VNNI kernels
    /// make the codes unsigned (`w + 128`) and take `128·Σx` off afterwards.
    #[test]
    fn extreme_q8_codes_give_exact_sums() {
        let cols = 512;
        for (code, x) in [(-128i8, 127i8), (-128, -127), (127, 127), (127, -127)] {
            let qs = vec![code as u8; 2 * cols];
            let d = vec![f16::ONE; 2 * row_blocks(cols)];
            let acts = QActs {
                qs: vec![x; cols],
                d: vec![1.0; row_blocks(cols)],
                sum8: vec![8 * 32 * x as i32; row_blocks(cols)],
            };
            let want = (code as i64 * x as i64 * cols as i64) as f32;
            for n in 1..=MAX_ROWS {
                let xs = vec![&acts; n];
                let mut got = vec![0f32; 3 * n];
                dot_rows(
                    QType::Q8,
                    &qs[..cols],
                    &d[..cols / BLOCK],
                    &xs,
                    &mut got[..n],
                );
                dot_row_pair(QType::Q8, &qs, &d, &xs, &mut got[n..]);
                assert!(
                    got.iter().all(|&g| g == want),
                    "{code} {x}: {got:?} vs {want}"
                );
            }
            let mut run = [0f32; 2];
            dot_row_run(QType::Q8, &qs, &d, &acts, &mut run);
            assert_eq!(run, [want; 2], "{code} {x}");
        }
    }

    /// Σ imp·(w - ŵ)² of a row quantized with or without the importances.
    fn weighted_error(t: QType, w: &[f32], imp: &[f32], with: bool) -> f64 {
        let (mut qs, mut d) = (
            vec![0u8; t.row_bytes(w.len())],
            vec![f16::ZERO; row_blocks(w.len())],
        );
        quantize_row_weighted(t, w, with.then_some(imp), &mut qs, &mut d);
        let mut back = vec![0f32; w.len()];
        dequantize_row(t, &qs, &d, &mut back);
        w.iter()
            .zip(&back)
            .zip(imp)
            .map(|((a, b), i)| *i as f64 * ((a - b) as f64).powi(2))
            .sum()
    }

    #[test]
    fn importance_weighted_q4_scales_cut_the_weighted_error() {
        let cols = 3072;
        // Equal importances: the weighted search tries every scale the plain one does and more.
        let ones = vec![1.0f32; cols];
        for t in [QType::Q4, QType::Q5, QType::Q6] {
            for seed in 0..8 {
                let w = data(cols, 100 + seed);
                let (plain, weighted) = (
                    weighted_error(t, &w, &ones, false),
                    weighted_error(t, &w, &ones, true),
                );
                assert!(weighted <= plain * 1.001, "{t:?} {weighted} vs {plain}");
            }
        }
        // Importances spread over three orders of magnitude, as activation mean squares are
        // (a few outlier channels dominate): the error that reaches the output falls a lot.
        let (mut plain, mut weighted) = (0.0, 0.0);
        for seed in 0..8 {
            let w = data(cols, 200 + seed);
            let imp: Vec<f32> = data(cols, 300 + seed)
                .iter()
                .map(|u| (u * 14.0).exp())
                .collect();
            plain += weighted_error(QType::Q4, &w, &imp, false);
            weighted += weighted_error(QType::Q4, &w, &imp, true);
        }
        assert!(
            weighted < 0.7 * plain,
            "weighted {weighted} vs plain {plain}"
        );
    }

    #[test]
    fn simd_matches_scalar_reference_and_float_dot() {
        for t in QType::ALL {
            for cols in TAIL_WIDTHS {
                let w = data(cols, 1);
                let (qs, d) = quantized(t, &w);
                let mut deq = vec![0f32; cols];
                dequantize_row(t, &qs, &d, &mut deq);
                let raw: Vec<Vec<f32>> = (0..MAX_ROWS as u64).map(|s| data(cols, 20 + s)).collect();
                let acts: Vec<QActs> = raw.iter().map(|x| activation(x)).collect();
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
