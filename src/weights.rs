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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
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
    Owned(Arc<Vec<u32>>, usize),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped { map, start, len } => &map[*start..*start + *len],
            Bytes::Owned(v, len) => &bytemuck::cast_slice::<u32, u8>(v)[..*len],
        }
    }
}

/// A tensor in its stored dtype.
#[derive(Clone)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    bytes: Bytes,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {:?})", self.dtype, self.shape)
    }
}

impl Tensor {
    /// An owned tensor from raw little-endian bytes (u32-aligned storage).
    pub fn from_bytes(dtype: DType, shape: Vec<usize>, data: &[u8]) -> Tensor {
        let mut words = vec![0u32; data.len().div_ceil(4)];
        bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..data.len()].copy_from_slice(data);
        Tensor {
            dtype,
            shape,
            bytes: Bytes::Owned(Arc::new(words), data.len()),
        }
    }

    /// An owned bf16 tensor whose values `fill` writes in place (no second copy of big data).
    pub fn bf16_with(shape: Vec<usize>, fill: impl FnOnce(&mut [bf16])) -> Tensor {
        let n: usize = shape.iter().product();
        let mut words = vec![0u32; n.div_ceil(2)];
        fill(&mut bytemuck::cast_slice_mut::<u32, bf16>(&mut words)[..n]);
        Tensor {
            dtype: DType::BF16,
            shape,
            bytes: Bytes::Owned(Arc::new(words), n * 2),
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

    /// Elements `start..start + out.len()` (flat index) widened to f32.
    pub fn read_f32(&self, start: usize, out: &mut [f32]) {
        let span = start..start + out.len();
        match self.dtype {
            DType::F32 => out.copy_from_slice(&self.as_f32()[span]),
            DType::BF16 => self.as_bf16()[span].convert_to_f32_slice(out),
            DType::F16 => self.as_f16()[span].convert_to_f32_slice(out),
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

    /// Total bytes of the mapped files.
    pub fn mapped_bytes(&self) -> u64 {
        self.maps.iter().map(|m| m.len() as u64).sum()
    }

    /// Reads every page of the mapped files once, so the first forward pass does not stall on
    /// disk; `progress` receives the bytes done so far.
    pub fn prefault(&self, mut progress: impl FnMut(u64)) {
        const STEP: usize = 64 << 20;
        let mut done = 0u64;
        for m in &self.maps {
            #[cfg(unix)]
            let _ = m.advise(memmap2::Advice::WillNeed);
            for chunk in m.chunks(STEP) {
                let mut acc = 0u8;
                for page in chunk.chunks(4096) {
                    acc ^= page[0];
                }
                std::hint::black_box(acc);
                done += chunk.len() as u64;
                progress(done);
            }
        }
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
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(&map[..])
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
    let base = 8 + header_len;
    let mut out = Vec::new();
    for (name, info) in meta.tensors() {
        let dtype = match info.dtype {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => bail!(
                "{}: tensor {name} has dtype {other:?}; supported: F32, F16, BF16",
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
        };
        if !(t.raw().as_ptr() as usize).is_multiple_of(dtype.size()) {
            // Unaligned in the file: a copy is the only safe way to read it as typed values.
            t = Tensor::from_bytes(dtype, t.shape.clone(), t.raw());
        }
        out.push((name, t));
    }
    Ok((map, out))
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
