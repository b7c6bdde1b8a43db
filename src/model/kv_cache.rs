//! Keys and values of one sequence, kept in pages of [`PAGE`] positions per (layer, kv head):
//! memory follows the context a page at a time, nothing is copied when it grows, and nothing is
//! reserved up front for the full context. Rows are f32, f16 ([`KvType::F16`], half the bytes
//! that decode attention reads per position) or, with [`KvType::Q8`], 8-bit with one scale per
//! 32 values (a quarter, plus the scales).

use anyhow::{bail, Result};
use half::f16;

use super::rope::RopeTable;
use crate::kernels::ops::{kv_row_blocks, quantize_kv_row, KvRows};

/// Positions per page.
pub const PAGE: usize = 256;

/// How cached keys and values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvType {
    #[default]
    F32,
    /// IEEE half precision (llama.cpp's default cache type): 11 significant bits, against bf16's
    /// 8 in the reference's own bf16 runs.
    F16,
    /// 8-bit values, one f32 scale per 32 (as llama.cpp's `--cache-type-k q8_0`).
    Q8,
}

impl KvType {
    pub fn parse(s: &str) -> Result<KvType> {
        match s {
            "f32" => Ok(KvType::F32),
            "f16" => Ok(KvType::F16),
            "q8" => Ok(KvType::Q8),
            _ => bail!("unknown KV cache type {s:?}: expected f32, f16 or q8"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
            KvType::Q8 => "q8",
        }
    }
}

#[derive(Debug, Clone)]
enum Page {
    F32(Box<[f32]>),
    F16(Box<[f16]>),
    Q8 { qs: Box<[i8]>, d: Box<[f32]> },
}

impl Page {
    fn new(t: KvType, hd: usize) -> Page {
        match t {
            KvType::F32 => Page::F32(vec![0.0; PAGE * hd].into()),
            KvType::F16 => Page::F16(vec![f16::ZERO; PAGE * hd].into()),
            KvType::Q8 => Page::Q8 {
                qs: vec![0; PAGE * hd].into(),
                d: vec![0.0; PAGE * kv_row_blocks(hd)].into(),
            },
        }
    }

    fn write(&mut self, row: usize, x: &[f32]) {
        let hd = x.len();
        match self {
            Page::F32(v) => v[row * hd..(row + 1) * hd].copy_from_slice(x),
            Page::F16(v) => {
                half::slice::HalfFloatSliceExt::convert_from_f32_slice(
                    &mut v[row * hd..(row + 1) * hd],
                    x,
                );
            }
            Page::Q8 { qs, d } => {
                let nb = kv_row_blocks(hd);
                quantize_kv_row(
                    x,
                    &mut qs[row * hd..(row + 1) * hd],
                    &mut d[row * nb..(row + 1) * nb],
                );
            }
        }
    }

    fn view(&self) -> KvRows<'_> {
        match self {
            Page::F32(v) => KvRows::F32(v),
            Page::F16(v) => KvRows::F16(v),
            Page::Q8 { qs, d } => KvRows::Q8 { qs, d },
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Page::F32(v) => v.len() * 4,
            Page::F16(v) => v.len() * 2,
            Page::Q8 { qs, d } => qs.len() + d.len() * 4,
        }
    }
}

/// The cache of one sequence. Positions `0..len` are complete in every layer; a forward pass
/// writes its new positions layer by layer and advances `len` at the end.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Pages of layer `l`, kv head `h` at `[l * kv_heads + h]`: one contiguous run of rows per
    /// head, so that attention streams it (rows of all heads side by side made each head's
    /// reads strided, at half the bandwidth).
    k: Vec<Vec<Page>>,
    v: Vec<Vec<Page>>,
    kv_heads: usize,
    head_dim: usize,
    dtype: KvType,
    pub len: usize,
    /// The rotary table the cached keys were rotated with (None while empty).
    pub table: Option<RopeTable>,
}

impl KvCache {
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize, dtype: KvType) -> KvCache {
        KvCache {
            k: vec![Vec::new(); layers * kv_heads],
            v: vec![Vec::new(); layers * kv_heads],
            kv_heads,
            head_dim,
            dtype,
            len: 0,
            table: None,
        }
    }

    pub fn dtype(&self) -> KvType {
        self.dtype
    }

    /// Stores key and value rows of layer `l`, kv head `h` at `pos`, which must be at most the
    /// number of rows that head already holds (append, or overwrite).
    pub fn write(&mut self, l: usize, h: usize, pos: usize, k: &[f32], v: &[f32]) {
        debug_assert!(k.len() == self.head_dim && v.len() == self.head_dim);
        let i = l * self.kv_heads + h;
        let (page, row) = (pos / PAGE, pos % PAGE);
        for (pages, x) in [(&mut self.k[i], k), (&mut self.v[i], v)] {
            assert!(page <= pages.len(), "KV cache written out of order");
            if page == pages.len() {
                pages.push(Page::new(self.dtype, self.head_dim));
            }
            pages[page].write(row, x);
        }
    }

    /// The pages of keys of layer `l`, kv head `h`, in position order.
    pub fn keys(&self, l: usize, h: usize) -> impl Iterator<Item = KvRows<'_>> + Clone {
        self.k[l * self.kv_heads + h].iter().map(Page::view)
    }

    /// The pages of values of layer `l`, kv head `h`, in position order.
    pub fn values(&self, l: usize, h: usize) -> impl Iterator<Item = KvRows<'_>> + Clone {
        self.v[l * self.kv_heads + h].iter().map(Page::view)
    }

    /// Bytes held by the pages.
    pub fn bytes(&self) -> usize {
        self.k
            .iter()
            .chain(&self.v)
            .flatten()
            .map(Page::bytes)
            .sum()
    }

    /// Forgets every position (and frees the pages).
    pub fn clear(&mut self) {
        self.k.iter_mut().for_each(Vec::clear);
        self.v.iter_mut().for_each(Vec::clear);
        self.len = 0;
        self.table = None;
    }
}
