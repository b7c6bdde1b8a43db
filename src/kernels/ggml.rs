//! ggml's block formats, as GGUF files store them: decoding to f32 (Q8_0, Q4_0, Q4_K, Q6_K, and
//! the float types), and a lossless repacking of Q4_0 rows into [`super::quant`]'s Q4 layout.
//! Layouts follow ggml's `block_q8_0`, `block_q4_0`, `block_q4_K` and `block_q6_K`.

use anyhow::{bail, Result};
use half::{bf16, f16};

use super::quant::{self, QType};

/// A ggml tensor type this importer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4K,
    Q6K,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Result<GgmlType> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            30 => GgmlType::BF16,
            8 => GgmlType::Q8_0,
            2 => GgmlType::Q4_0,
            12 => GgmlType::Q4K,
            14 => GgmlType::Q6K,
            other => bail!(
                "ggml type {other} is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K)"
            ),
        })
    }

    /// (values per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q6K => (256, 210),
        }
    }

    /// Bytes of a row of `cols` values (`cols` a whole number of blocks, checked by the caller).
    pub fn row_bytes(self, cols: usize) -> usize {
        let (n, b) = self.block();
        cols / n * b
    }

    /// The block format a quantized matrix of this type becomes (`None` for the float types,
    /// used as they are). Q8_0 and Q4_0 map onto Q8 and Q4 value for value. Q4_K's 32-value
    /// sub-blocks are asymmetric grids (a scale and a minimum each), which Q4M's zero point
    /// follows closely at the same bytes (4.5 bits): its re-quantization error is a small
    /// fraction of Q4's (tests/gguf.rs). Q6_K becomes Q8 (Q6's search would round its values
    /// a second time).
    pub fn ours(self) -> Option<QType> {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => None,
            GgmlType::Q8_0 | GgmlType::Q6K => Some(QType::Q8),
            GgmlType::Q4_0 => Some(QType::Q4),
            GgmlType::Q4K => Some(QType::Q4M),
        }
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Decodes one row of `out.len()` values stored as `t` in `src`.
pub fn dequantize_row(t: GgmlType, src: &[u8], out: &mut [f32]) {
    let (n, bytes) = t.block();
    match t {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::Q8_0 => {
            for (o, b) in out.chunks_mut(n).zip(src.chunks_exact(bytes)) {
                let d = f16_at(b, 0);
                for (v, q) in o.iter_mut().zip(&b[2..]) {
                    *v = d * (*q as i8) as f32;
                }
            }
        }
        GgmlType::Q4_0 => {
            for (o, b) in out.chunks_mut(n).zip(src.chunks_exact(bytes)) {
                let d = f16_at(b, 0);
                for j in 0..16 {
                    o[j] = d * ((b[2 + j] & 15) as i32 - 8) as f32;
                    o[j + 16] = d * ((b[2 + j] >> 4) as i32 - 8) as f32;
                }
            }
        }
        GgmlType::Q4K => {
            for (o, b) in out.chunks_mut(n).zip(src.chunks_exact(bytes)) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let qs = &b[16..144];
                for c in 0..4 {
                    let (s1, m1) = scale_min_k4(2 * c, scales);
                    let (s2, m2) = scale_min_k4(2 * c + 1, scales);
                    let q = &qs[32 * c..32 * c + 32];
                    for l in 0..32 {
                        o[64 * c + l] = d * s1 as f32 * (q[l] & 15) as f32 - dmin * m1 as f32;
                        o[64 * c + 32 + l] = d * s2 as f32 * (q[l] >> 4) as f32 - dmin * m2 as f32;
                    }
                }
            }
        }
        GgmlType::Q6K => {
            for (o, b) in out.chunks_mut(n).zip(src.chunks_exact(bytes)) {
                let (ql, qh) = (&b[0..128], &b[128..192]);
                let sc = &b[192..208];
                let d = f16_at(b, 208);
                for half in 0..2 {
                    let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
                    let sc = &sc[8 * half..];
                    let y = &mut o[128 * half..];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 15) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        let s = |k: usize| d * (sc[is + k] as i8) as f32;
                        y[l] = s(0) * q1 as f32;
                        y[l + 32] = s(2) * q2 as f32;
                        y[l + 64] = s(4) * q3 as f32;
                        y[l + 96] = s(6) * q4 as f32;
                    }
                }
            }
        }
    }
}

/// The grid `(a, m)` of each 32-value sub-block of a Q4_K row (`src`): its values are
/// `a·q − m` for nibbles `q`, which [`quant::quantize_row_near`] starts from.
pub fn q4_k_grids(src: &[u8], out: &mut [(f32, f32)]) {
    let (n, bytes) = GgmlType::Q4K.block();
    assert_eq!(
        src.len() / bytes * n / 32,
        out.len(),
        "one grid per 32 values"
    );
    for (o, b) in out.chunks_mut(8).zip(src.chunks_exact(bytes)) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        for (j, o) in o.iter_mut().enumerate() {
            let (sc, m) = scale_min_k4(j, &b[4..16]);
            *o = (d * sc as f32, dmin * m as f32);
        }
    }
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K super-block.
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Repacks a Q4_0 row (`cols` values) into the Q4 layout of [`quant`] without changing a value:
/// ggml's nibble `q` stands for `(q - 8)·d` as ours does; only the positions move.
pub fn repack_q4_0_row(src: &[u8], cols: usize, qs: &mut [u8], d: &mut [f16]) {
    qs.fill(0x88); // padding blocks: value 8 - 8 = 0 (their scale is 0 anyway)
    d.fill(f16::ZERO);
    for (b, blk) in src.chunks_exact(18).take(cols / 32).enumerate() {
        d[b] = f16::from_le_bytes([blk[0], blk[1]]);
        // ggml: byte j holds element j (low nibble) and element j + 16 (high nibble).
        for (j, &byte) in blk[2..18].iter().enumerate() {
            for (k, nib) in [(j, byte & 15), (j + 16, byte >> 4)] {
                let (at, shift) = quant::row_pos(QType::Q4, b * 32 + k, d.len());
                qs[at] = (qs[at] & !(15 << shift)) | (nib << shift);
            }
        }
    }
}
