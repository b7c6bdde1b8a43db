//! Memory-mapped safetensors checkpoints (one file or index-listed shards) and the tensor
//! registry that is checked before any compute.
//!
//! Weights stay in the mapping in their file dtype (bf16 stays bf16): a tensor is a typed view
//! into the mapped file, copied only when the file places it at an address the dtype cannot be
//! read from directly.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::kernels::quant::{self, QType};
use crate::paging::{self, Words};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// Raw bytes: the values of a quantized tensor as stored on disk, before [`crate::kernels::quant`]
    /// pairs them with their scales.
    U8,
    /// Block-quantized rows ([`crate::kernels::quant`]): the values, with the scales beside.
    Quant(QType),
}

impl DType {
    /// Bytes per stored element (for quantized tensors: per byte of values).
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 | DType::Quant(_) => 1,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }
}

/// Bytes of one tensor: borrowed from a mapped file or owned (synthetic weights, copies).
#[derive(Clone)]
enum Bytes {
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    },
    Owned(Arc<Words>, usize),
}

impl Bytes {
    /// Drops this process's resident pages of the mapped bytes at offsets `span` of these
    /// bytes ([`paging::release`]; a later read maps them back). Owned bytes stay.
    fn release(&self, span: std::ops::Range<usize>) {
        if let Bytes::Mapped { map, start, len } = self {
            let end = span.end.min(*len);
            if span.start < end {
                paging::release(map, start + span.start, end - span.start);
            }
        }
    }

    /// Points bytes mapped from `old` at the same place in `fresh` (a new mapping of the file).
    fn remap(&mut self, old: &Arc<Mmap>, fresh: &Arc<Mmap>) {
        if let Bytes::Mapped { map, .. } = self {
            if Arc::ptr_eq(map, old) {
                *map = fresh.clone();
            }
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped { map, start, len } => &map[*start..*start + *len],
            Bytes::Owned(v, len) => &bytemuck::cast_slice::<u32, u8>(v.as_slice())[..*len],
        }
    }
}

/// A tensor in its stored dtype. A quantized tensor is 2-D `[rows, cols]` (its logical shape);
/// `bytes` holds the values and `scales` the f16 block scales.
#[derive(Clone)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    bytes: Bytes,
    scales: Option<Bytes>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {:?})", self.dtype, self.shape)
    }
}

impl Tensor {
    /// An owned tensor from raw little-endian bytes (u32-aligned storage).
    pub fn from_bytes(dtype: DType, shape: Vec<usize>, data: &[u8]) -> Tensor {
        let mut words = Words::zeroed(data.len().div_ceil(4));
        bytemuck::cast_slice_mut::<u32, u8>(words.as_mut_slice())[..data.len()]
            .copy_from_slice(data);
        Tensor {
            dtype,
            shape,
            bytes: Bytes::Owned(Arc::new(words), data.len()),
            scales: None,
        }
    }

    /// An owned bf16 tensor whose values `fill` writes in place (no second copy of big data).
    pub fn bf16_with(shape: Vec<usize>, fill: impl FnOnce(&mut [bf16])) -> Tensor {
        let n: usize = shape.iter().product();
        let mut words = Words::zeroed(n.div_ceil(2));
        fill(&mut bytemuck::cast_slice_mut::<u32, bf16>(words.as_mut_slice())[..n]);
        Tensor {
            dtype: DType::BF16,
            shape,
            bytes: Bytes::Owned(Arc::new(words), n * 2),
            scales: None,
        }
    }

    pub fn from_f32(shape: Vec<usize>, data: &[f32]) -> Tensor {
        Tensor::from_bytes(DType::F32, shape, bytemuck::cast_slice(data))
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn raw(&self) -> &[u8] {
        self.bytes.as_slice()
    }

    /// Bytes held: values plus, for a quantized tensor, its scales.
    pub fn nbytes(&self) -> usize {
        self.parts().iter().map(|p| p.len()).sum()
    }

    /// The memory a product with this tensor reads: its values and, if quantized, its scales.
    pub fn parts(&self) -> Vec<&[u8]> {
        let mut parts = vec![self.raw()];
        parts.extend(self.scales.as_ref().map(|s| s.as_slice()));
        parts
    }

    /// A quantized tensor's format, values and scales.
    pub fn as_quant(&self) -> Option<(QType, &[u8], &[f16])> {
        match (self.dtype, &self.scales) {
            (DType::Quant(t), Some(s)) => Some((t, self.raw(), bytemuck::cast_slice(s.as_slice()))),
            _ => None,
        }
    }

    /// A quantized tensor from its parts, checked against the layout of `t` for `shape`.
    pub fn quantized(
        t: QType,
        shape: Vec<usize>,
        values: Tensor,
        scales: Tensor,
    ) -> Result<Tensor> {
        let [rows, cols] = shape[..] else {
            bail!("a quantized tensor must be 2-D, got shape {shape:?}");
        };
        if values.dtype != DType::U8 || values.raw().len() != rows * t.row_bytes(cols) {
            bail!(
                "quantized values hold {} bytes, a {} tensor of shape {shape:?} needs {}",
                values.raw().len(),
                t.name(),
                rows * t.row_bytes(cols)
            );
        }
        if scales.dtype != DType::F16 || scales.numel() != rows * quant::row_blocks(cols) {
            bail!(
                "quantized scales must be {} f16 values for shape {shape:?}, got {:?} {:?}",
                rows * quant::row_blocks(cols),
                scales.dtype,
                scales.shape
            );
        }
        Ok(Tensor {
            dtype: DType::Quant(t),
            shape,
            bytes: values.bytes,
            scales: Some(scales.bytes),
        })
    }

    /// This 2-D float tensor quantized to `t` (rows in parallel).
    pub fn quantize(&self, t: QType) -> Result<Tensor> {
        self.quantize_weighted(t, None)
    }

    /// [`Tensor::quantize`] with each column's importance (see [`quant::quantize_row_weighted`]).
    pub fn quantize_weighted(&self, t: QType, imp: Option<&[f32]>) -> Result<Tensor> {
        let [rows, cols] = self.shape[..] else {
            bail!("only 2-D tensors are quantized, got shape {:?}", self.shape);
        };
        if let Some(imp) = imp {
            if imp.len() != cols {
                bail!(
                    "{} column importances for a matrix of {cols} columns",
                    imp.len()
                );
            }
        }
        if !self.dtype.is_float() {
            bail!("tensor is already quantized ({:?})", self.dtype);
        }
        let row_bytes = cols * self.dtype.size();
        // Quantizing a checkpoint reads each float matrix once; without the release its pages
        // stay resident beside the quantized copies until the whole mapping goes (`--quant q4`
        // on bf16 Phi-4-mini peaked at 9.4 GB; releasing whole matrices, at 3.2 GB, while the
        // 1.2 GB embedding table converted).
        Ok(Tensor::quantize_rows(
            t,
            rows,
            cols,
            |r, row, q, d| {
                self.read_f32(r * cols, row);
                quant::quantize_row_weighted(t, row, imp, q, d);
            },
            |done| {
                self.bytes
                    .release(done.start * row_bytes..done.end * row_bytes)
            },
        ))
    }

    /// Drops this process's resident pages of a tensor mapped from a file (a later read maps
    /// them back); owned tensors are untouched. For a float matrix read for the last time.
    pub fn release_pages(&self) {
        self.bytes.release(0..usize::MAX);
        if let Some(s) = &self.scales {
            s.release(0..usize::MAX);
        }
    }

    /// A `[rows, cols]` tensor of type `t` whose rows `fill(r, scratch, values, scales)` writes
    /// (rows in parallel; `scratch` is a `cols`-long f32 buffer per worker). Rows go in slabs,
    /// and `done(rows)` is told after each, so that a caller can release the source rows it
    /// will not read again: converting the 200K-row embedding table in one go kept all its
    /// source pages resident beside the converted tensors.
    pub fn quantize_rows(
        t: QType,
        rows: usize,
        cols: usize,
        fill: impl Fn(usize, &mut [f32], &mut [u8], &mut [f16]) + Sync,
        mut done: impl FnMut(std::ops::Range<usize>),
    ) -> Tensor {
        const SLAB_ROWS: usize = 2048;
        let (rb, nb) = (t.row_bytes(cols), quant::row_blocks(cols));
        let mut qs = Words::zeroed((rows * rb).div_ceil(4));
        let mut d = Words::zeroed((rows * nb).div_ceil(2));
        {
            let qb = &mut bytemuck::cast_slice_mut::<u32, u8>(qs.as_mut_slice())[..rows * rb];
            let db = &mut bytemuck::cast_slice_mut::<u32, f16>(d.as_mut_slice())[..rows * nb];
            let slabs = qb
                .chunks_mut(SLAB_ROWS * rb)
                .zip(db.chunks_mut(SLAB_ROWS * nb));
            for (i, (qb, db)) in slabs.enumerate() {
                let first = i * SLAB_ROWS;
                qb.par_chunks_mut(rb)
                    .zip(db.par_chunks_mut(nb))
                    .enumerate()
                    .for_each_init(
                        || vec![0f32; cols],
                        |row, (r, (q, s))| fill(first + r, row, q, s),
                    );
                done(first..(first + SLAB_ROWS).min(rows));
            }
        }
        Tensor {
            dtype: DType::Quant(t),
            shape: vec![rows, cols],
            bytes: Bytes::Owned(Arc::new(qs), rows * rb),
            scales: Some(Bytes::Owned(Arc::new(d), rows * nb * 2)),
        }
    }

    /// A view of `len` bytes at `start` of a mapped file (copied if the address does not suit
    /// the dtype).
    pub fn mapped(
        dtype: DType,
        shape: Vec<usize>,
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    ) -> Tensor {
        let t = Tensor {
            dtype,
            shape,
            bytes: Bytes::Mapped { map, start, len },
            scales: None,
        };
        if (t.raw().as_ptr() as usize).is_multiple_of(dtype.size()) {
            t
        } else {
            Tensor::from_bytes(dtype, t.shape.clone(), t.raw())
        }
    }

    pub fn as_f32(&self) -> &[f32] {
        assert_eq!(self.dtype, DType::F32);
        bytemuck::cast_slice(self.raw())
    }

    pub fn as_bf16(&self) -> &[bf16] {
        assert_eq!(self.dtype, DType::BF16);
        bytemuck::cast_slice(self.raw())
    }

    pub fn as_f16(&self) -> &[f16] {
        assert_eq!(self.dtype, DType::F16);
        bytemuck::cast_slice(self.raw())
    }

    /// The values as f32 (copies; for vectors and tests, never for the big matrices).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        self.read_f32(0, &mut out);
        out
    }

    /// Elements `start..start + out.len()` (flat index) widened to f32 (dequantized).
    pub fn read_f32(&self, start: usize, out: &mut [f32]) {
        let span = start..start + out.len();
        match self.dtype {
            DType::F32 => out.copy_from_slice(&self.as_f32()[span]),
            DType::BF16 => self.as_bf16()[span].convert_to_f32_slice(out),
            DType::F16 => self.as_f16()[span].convert_to_f32_slice(out),
            DType::U8 => {
                for (o, b) in out.iter_mut().zip(&self.raw()[span]) {
                    *o = *b as f32;
                }
            }
            DType::Quant(_) => {
                let (t, qs, d) = self.as_quant().expect("quantized tensors carry scales");
                let cols = self.shape[1];
                let (rb, nb) = (t.row_bytes(cols), quant::row_blocks(cols));
                // Only a part row needs a buffer (an embedding lookup reads whole rows, and
                // decode must not allocate).
                let mut row = Vec::new();
                let mut done = 0;
                while done < out.len() {
                    let e = start + done;
                    let (r, c) = (e / cols, e % cols);
                    let k = (cols - c).min(out.len() - done);
                    let (qs, d) = (&qs[r * rb..(r + 1) * rb], &d[r * nb..(r + 1) * nb]);
                    if k == cols {
                        quant::dequantize_row(t, qs, d, &mut out[done..done + k]);
                    } else {
                        row.resize(cols, 0.0);
                        quant::dequantize_row(t, qs, d, &mut row);
                        out[done..done + k].copy_from_slice(&row[c..c + k]);
                    }
                    done += k;
                }
            }
        }
    }
}

/// All tensors of a checkpoint by name.
pub struct Checkpoint {
    pub tensors: HashMap<String, Tensor>,
    pub files: Vec<PathBuf>,
    maps: Vec<Arc<Mmap>>,
}

impl Checkpoint {
    /// Opens `model.safetensors`, or every shard listed in `model.safetensors.index.json`, or
    /// (with neither) every `*.safetensors` file in the directory.
    pub fn open_dir(dir: &Path) -> Result<Checkpoint> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            shard_files(&index)?
                .into_iter()
                .map(|n| dir.join(n))
                .collect()
        } else if dir.join("model.safetensors").exists() {
            vec![dir.join("model.safetensors")]
        } else {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
                .with_context(|| format!("reading model directory {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            v.sort();
            if v.is_empty() {
                bail!(
                    "no safetensors weights in {} (expected model.safetensors or model.safetensors.index.json)",
                    dir.display()
                );
            }
            v
        };
        let mut tensors = HashMap::new();
        let mut maps = Vec::new();
        for f in &files {
            let (map, list) = map_safetensors(f)?;
            maps.push(map);
            for (name, t) in list {
                if tensors.insert(name.clone(), t).is_some() {
                    bail!(
                        "tensor {name} appears in more than one shard ({})",
                        f.display()
                    );
                }
            }
        }
        Ok(Checkpoint {
            tensors,
            files,
            maps,
        })
    }

    /// A checkpoint read by another loader (GGUF): its tensors and the mappings they view.
    pub fn from_parts(
        tensors: HashMap<String, Tensor>,
        files: Vec<PathBuf>,
        maps: Vec<Arc<Mmap>>,
    ) -> Checkpoint {
        Checkpoint {
            tensors,
            files,
            maps,
        }
    }

    /// Total bytes of the mapped files.
    pub fn mapped_bytes(&self) -> u64 {
        self.maps.iter().map(|m| m.len() as u64).sum()
    }

    /// Readies the mapped files for use in place: each is paged in once, so the first forward
    /// pass does not stall on disk, in huge pages where it can be ([`paging::settle`] may
    /// replace a mapping; its tensors then view the new one). `progress` receives the bytes
    /// done so far.
    pub fn prefault(&mut self, mut progress: impl FnMut(u64)) -> Result<()> {
        const STEP: usize = 64 << 20;
        let mut done = 0u64;
        for i in 0..self.maps.len() {
            let old = self.maps[i].clone();
            let settled = match self.files.get(i) {
                Some(path) => paging::settle(&old, path)?,
                None => None,
            };
            if let Some(fresh) = settled {
                let fresh = Arc::new(fresh);
                for t in self.tensors.values_mut() {
                    t.bytes.remap(&old, &fresh);
                    if let Some(s) = &mut t.scales {
                        s.remap(&old, &fresh);
                    }
                }
                self.maps[i] = fresh;
            }
            let m = &self.maps[i];
            #[cfg(unix)]
            let _ = m.advise(memmap2::Advice::WillNeed);
            for chunk in m.chunks(STEP) {
                paging::touch(chunk);
                done += chunk.len() as u64;
                progress(done);
            }
        }
        Ok(())
    }
}

/// The shard file names an index (`model.safetensors.index.json`) lists, sorted, each once.
pub fn shard_files(index: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(index).with_context(|| format!("reading {}", index.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", index.display()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{} has no `weight_map` object", index.display()))?;
    let mut names: Vec<String> = map
        .values()
        .map(|f| f.as_str().map(str::to_owned))
        .collect::<Option<_>>()
        .with_context(|| format!("{}: weight_map values must be file names", index.display()))?;
    names.sort();
    names.dedup();
    Ok(names)
}

/// Maps one safetensors file and returns views of its tensors.
pub fn open_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    Ok(map_safetensors(path)?.1)
}

/// A mapped file and the tensors viewing into it.
type Mapped = (Arc<Mmap>, Vec<(String, Tensor)>);

fn map_safetensors(path: &Path) -> Result<Mapped> {
    let file =
        std::fs::File::open(path).with_context(|| format!("opening weights {}", path.display()))?;
    // SAFETY: the mapping is read-only; a checkpoint modified while we run is outside our contract.
    let map = Arc::new(
        unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?,
    );
    paging::advise(&map);
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(&map[..])
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
    let base = 8 + header_len;
    let quantized = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY).cloned());
    let mut whole_groups_only = false;
    if quantized.is_some() {
        let layout = meta.metadata().as_ref().and_then(|m| m.get(LAYOUT_KEY));
        if layout.map(String::as_str) == Some(LAYOUT_WHOLE_GROUPS) {
            whole_groups_only = true;
        } else if layout.map(String::as_str) != Some(LAYOUT) {
            bail!(
                "{}: quantized by another version of phi4, whose block layout this one does not read ({LAYOUT_KEY} is {}, expected {LAYOUT:?}); quantize the original checkpoint again with `phi4 quantize`",
                path.display(),
                layout.map_or("absent".to_string(), |l| format!("{l:?}"))
            );
        }
    }
    let mut out = BTreeMap::new();
    for (name, info) in meta.tensors() {
        let dtype = match info.dtype {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::U8 if quantized.is_some() => DType::U8,
            other => bail!(
                "{}: tensor {name} has dtype {other:?}; supported: F32, F16, BF16 (and U8 in a phi4 quantized checkpoint)",
                path.display()
            ),
        };
        let (s, e) = info.data_offsets;
        let start = base + s;
        let len = e - s;
        if start + len > map.len() {
            bail!(
                "{}: tensor {name} runs past the end of the file (truncated?)",
                path.display()
            );
        }
        let bytes = Bytes::Mapped {
            map: map.clone(),
            start,
            len,
        };
        let mut t = Tensor {
            dtype,
            shape: info.shape.clone(),
            bytes,
            scales: None,
        };
        if !(t.raw().as_ptr() as usize).is_multiple_of(dtype.size()) {
            // Unaligned in the file: a copy is the only safe way to read it as typed values.
            t = Tensor::from_bytes(dtype, t.shape.clone(), t.raw());
        }
        out.insert(name.clone(), t);
    }
    let out = match quantized {
        Some(q) => assemble_quantized(out, &q, whole_groups_only)
            .with_context(|| path.display().to_string())?,
        None => out,
    };
    Ok((map, out.into_iter().collect()))
}

/// Metadata key of a quantized checkpoint's tensor description: each quantized matrix `N` is
/// stored as `N.qs` (U8, `[rows, row bytes]`) and `N.scales` (F16, `[rows, blocks]`), and this
/// key maps `N` to `{"type": "q4", "shape": [rows, cols]}`. Loading maps the file and reads the
/// blocks in place, like any safetensors checkpoint.
pub const META_KEY: &str = "phi4.quant";

/// Metadata key of the block layout version of a quantized checkpoint's values
/// ([`crate::kernels::quant`]): files of another layout are refused, not misread.
pub const LAYOUT_KEY: &str = "phi4.quant_layout";

/// The block layout this version writes and reads. (Version 1, files without the key, paired
/// blocks for horizontal adds; version 2 interleaves the eight blocks of a group by four values
/// and pads rows to whole groups; version 3 stores a row's last group with only its blocks.)
pub const LAYOUT: &str = "3";

/// Version 2, read too: its rows are byte for byte version 3's where the width is a multiple of
/// 256 (every Phi-4-mini matrix), and refused, with the same advice, where it is not.
const LAYOUT_WHOLE_GROUPS: &str = "2";

/// One quantized tensor's entry in the metadata.
#[derive(Debug, Serialize, Deserialize)]
pub struct QuantEntry {
    #[serde(rename = "type")]
    pub qtype: String,
    pub shape: Vec<usize>,
}

/// Joins the `N.qs` / `N.scales` pairs of a mapped file described by `meta` (the `phi4.quant`
/// value) into quantized tensors named `N`; everything else passes through.
fn assemble_quantized(
    mut tensors: BTreeMap<String, Tensor>,
    meta: &str,
    whole_groups_only: bool,
) -> Result<BTreeMap<String, Tensor>> {
    let entries: BTreeMap<String, QuantEntry> =
        serde_json::from_str(meta).with_context(|| format!("metadata {META_KEY} is not valid"))?;
    for (name, e) in entries {
        let t = QType::parse(&e.qtype)
            .with_context(|| format!("{name}: unknown quantized type {:?}", e.qtype))?;
        let mut part = |suffix: &str| {
            tensors
                .remove(&format!("{name}.{suffix}"))
                .with_context(|| format!("quantized tensor {name} has no {name}.{suffix}"))
        };
        if whole_groups_only
            && e.shape
                .get(1)
                .is_none_or(|c| !c.is_multiple_of(quant::GROUP))
        {
            bail!(
                "{name}: quantized by an older phi4 ({LAYOUT_KEY} {LAYOUT_WHOLE_GROUPS:?}), which padded rows of {:?} columns to whole groups of {}; this version stores them without the padding and cannot read that file: quantize the original checkpoint again with `phi4 quantize`",
                e.shape.get(1),
                quant::GROUP
            );
        }
        let (values, scales) = (part("qs")?, part("scales")?);
        if values.dtype != DType::U8 {
            bail!("{name}.qs must be U8, is {:?}", values.dtype);
        }
        let q = Tensor::quantized(t, e.shape, values, scales).with_context(|| name.clone())?;
        tensors.insert(name, q);
    }
    if let Some(stray) = tensors.keys().find(|k| k.ends_with(".qs")) {
        bail!("{stray} is not described in the {META_KEY} metadata");
    }
    Ok(tensors)
}

/// One expected tensor: name and shape. `optional` entries may be absent (tied LM head).
#[derive(Debug, Clone)]
pub struct Expected {
    pub name: String,
    pub shape: Vec<usize>,
    pub optional: bool,
}

/// Checks every expected tensor is present with its shape and a supported float dtype, and that
/// the checkpoint holds nothing unexpected. All problems are reported together.
pub fn check_registry(
    ckpt: &Checkpoint,
    expected: &[Expected],
) -> Result<BTreeMap<String, Tensor>> {
    let mut problems = Vec::new();
    let mut found = BTreeMap::new();
    for e in expected {
        match ckpt.tensors.get(&e.name) {
            None if e.optional => {}
            None => problems.push(format!("missing tensor {} {:?}", e.name, e.shape)),
            Some(t) if t.shape != e.shape => problems.push(format!(
                "tensor {} has shape {:?}, expected {:?}",
                e.name, t.shape, e.shape
            )),
            Some(t) if !(t.dtype.is_float() || (e.shape.len() == 2 && t.as_quant().is_some())) => {
                problems.push(format!(
                    "tensor {} has dtype {:?}; expected a float{}",
                    e.name,
                    t.dtype,
                    if e.shape.len() == 2 {
                        " or quantized matrix"
                    } else {
                        ""
                    }
                ))
            }
            Some(t) => {
                found.insert(e.name.clone(), t.clone());
            }
        }
    }
    let known: std::collections::HashSet<&str> = expected.iter().map(|e| e.name.as_str()).collect();
    let mut extra: Vec<&String> = ckpt
        .tensors
        .keys()
        .filter(|k| !known.contains(k.as_str()))
        .collect();
    extra.sort();
    for k in extra.into_iter().take(10) {
        problems.push(format!("unexpected tensor {k}"));
    }
    if !problems.is_empty() {
        bail!(
            "checkpoint does not match the config ({} problem{}):\n  {}",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" },
            problems.join("\n  ")
        );
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each row of `t` quantized alone, as the reference for slab-wise conversion.
    fn rows_one_by_one(t: QType, w: &[f32], cols: usize) -> (Vec<u8>, Vec<f16>) {
        let (rb, nb) = (t.row_bytes(cols), quant::row_blocks(cols));
        let rows = w.len() / cols;
        let (mut qs, mut d) = (vec![0u8; rows * rb], vec![f16::ZERO; rows * nb]);
        for r in 0..rows {
            let (q, s) = (&mut qs[r * rb..(r + 1) * rb], &mut d[r * nb..(r + 1) * nb]);
            quant::quantize_row(t, &w[r * cols..(r + 1) * cols], q, s);
        }
        (qs, d)
    }

    #[test]
    fn slab_wise_quantization_keeps_every_row_in_place_and_releases_its_source() {
        // More rows than one slab, and a last slab that is not full.
        let (rows, cols) = (5000, 64);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0 + (i / cols) as f32 * 1e-3)
            .collect();
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut file, bytemuck::cast_slice(&w)).unwrap();
        // SAFETY: a private temporary file nothing else writes.
        let map = Arc::new(unsafe { Mmap::map(file.as_file()) }.unwrap());
        let mapped = Tensor::mapped(DType::F32, vec![rows, cols], map, 0, w.len() * 4);
        let owned = Tensor::from_f32(vec![rows, cols], &w);
        for t in QType::ALL {
            let (want_qs, want_d) = rows_one_by_one(t, &w, cols);
            for source in [&owned, &mapped] {
                let q = source.quantize(t).unwrap();
                let (_, qs, d) = q.as_quant().unwrap();
                assert!(qs == &want_qs[..], "{t:?} values differ");
                assert!(d == &want_d[..], "{t:?} scales differ");
            }
            // Released pages come back from the file.
            assert!(mapped.as_f32() == &w[..]);
        }
        let mut seen = Vec::new();
        Tensor::quantize_rows(QType::Q8, rows, cols, |_, _, _, _| {}, |r| seen.push(r));
        assert_eq!(seen, [0..2048, 2048..4096, 4096..5000]);
    }
}
