//! GGUF import: the Phi-4-mini files llama.cpp and ollama users already have (architecture
//! `phi3`). The file is memory-mapped; its metadata becomes a [`Phi3Config`] (LongRoPE factors
//! from the `rope_factors_long/short` tensors), its vocabulary a `tokenizer.json`, and its tensors
//! a [`Checkpoint`] under the Hugging Face names:
//! - F32 / F16 / BF16 tensors are used in place;
//! - Q8_0 and Q4_0 matrices are repacked into our Q8 / Q4 layouts without changing a value;
//! - Q4_K and Q6_K matrices (Q4_K_M files) are decoded and re-quantized to Q4M and Q8 — the only
//!   lossy step, since our kernels read 32-value blocks with one f16 scale word
//!   ([`GgmlType::ours`]).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use serde_json::{json, Value};

use crate::config::Phi3Config;
use crate::kernels::ggml::{self, GgmlType};
use crate::kernels::quant;
use crate::model::quantize::Recipe;
use crate::model::Phi3ForCausalLM;
use crate::weights::{Checkpoint, DType, Tensor};

thread_local! {
    /// A Q4_K row's sub-block grids while it converts (per worker, reused across rows).
    static GRIDS: std::cell::RefCell<Vec<(f32, f32)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A metadata value.
#[derive(Debug, Clone)]
pub enum Meta {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Meta>),
}

impl Meta {
    fn as_int(&self) -> Option<i64> {
        match self {
            Meta::Int(v) => Some(*v),
            _ => None,
        }
    }
    fn as_f64(&self) -> Option<f64> {
        match self {
            Meta::Float(v) => Some(*v),
            Meta::Int(v) => Some(*v as f64),
            _ => None,
        }
    }
    fn as_str(&self) -> Option<&str> {
        match self {
            Meta::Str(s) => Some(s),
            _ => None,
        }
    }
}

struct TensorInfo {
    /// Dimensions in ggml order (fastest first).
    dims: Vec<usize>,
    ggml: GgmlType,
    offset: usize,
}

/// A parsed, mapped GGUF file.
pub struct GgufFile {
    map: Arc<Mmap>,
    path: std::path::PathBuf,
    pub meta: BTreeMap<String, Meta>,
    tensors: BTreeMap<String, TensorInfo>,
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.pos + n > self.b.len() {
            bail!("file ends inside the header (truncated?)");
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn len(&mut self) -> Result<usize> {
        let n = self.u64()?;
        if n > self.b.len() as u64 {
            bail!("a length of {n} is larger than the file (corrupt header)");
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String> {
        let n = self.len()?;
        String::from_utf8(self.take(n)?.to_vec()).context("a string in the header is not UTF-8")
    }
    fn value(&mut self, ty: u32) -> Result<Meta> {
        let b = |r: &mut Self, n: usize| -> Result<Vec<u8>> { Ok(r.take(n)?.to_vec()) };
        Ok(match ty {
            0 => Meta::Int(b(self, 1)?[0] as i64),
            1 => Meta::Int(b(self, 1)?[0] as i8 as i64),
            2 => Meta::Int(u16::from_le_bytes(b(self, 2)?.try_into().expect("2")) as i64),
            3 => Meta::Int(i16::from_le_bytes(b(self, 2)?.try_into().expect("2")) as i64),
            4 => Meta::Int(self.u32()? as i64),
            5 => Meta::Int(self.u32()? as i32 as i64),
            6 => Meta::Float(f32::from_bits(self.u32()?) as f64),
            7 => Meta::Bool(b(self, 1)?[0] != 0),
            8 => Meta::Str(self.string()?),
            9 => {
                let inner = self.u32()?;
                let n = self.len()?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(inner)?);
                }
                Meta::Array(v)
            }
            10 => Meta::Int(self.u64()? as i64),
            11 => Meta::Int(self.u64()? as i64),
            12 => Meta::Float(f64::from_bits(self.u64()?)),
            other => bail!("unknown metadata value type {other}"),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("opening GGUF file {}", path.display()))?;
        // SAFETY: read-only mapping; a file modified while we run is outside our contract.
        let map = Arc::new(
            unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?,
        );
        crate::paging::advise(&map);
        Self::parse(map, path)
            .with_context(|| format!("{} is not a readable GGUF file", path.display()))
    }

    fn parse(map: Arc<Mmap>, path: &Path) -> Result<GgufFile> {
        let mut r = Reader {
            b: &map[..],
            pos: 0,
        };
        if r.take(4)? != b"GGUF" {
            bail!("no GGUF magic");
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            bail!("GGUF version {version} (supported: 2, 3)");
        }
        let n_tensors = r.len()?;
        let n_kv = r.len()?;
        let mut meta = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r.value(ty).with_context(|| format!("metadata {key}"))?;
            meta.insert(key, v);
        }
        let mut infos = Vec::with_capacity(n_tensors.min(1 << 16));
        for _ in 0..n_tensors {
            let name = r.string()?;
            let nd = r.u32()? as usize;
            if nd == 0 || nd > 4 {
                bail!("tensor {name} has {nd} dimensions");
            }
            let dims = (0..nd).map(|_| r.len()).collect::<Result<Vec<_>>>()?;
            let ty = r.u32()?;
            let offset = r.len()?;
            infos.push((name, dims, ty, offset));
        }
        let align = meta
            .get("general.alignment")
            .and_then(Meta::as_int)
            .unwrap_or(32) as usize;
        if align == 0 {
            bail!("general.alignment is 0");
        }
        let data = r.pos.div_ceil(align) * align;
        let mut tensors = BTreeMap::new();
        for (name, dims, ty, offset) in infos {
            let ggml = GgmlType::from_id(ty).with_context(|| format!("tensor {name}"))?;
            let (bn, bb) = ggml.block();
            if dims[0] % bn != 0 {
                bail!(
                    "tensor {name}: row length {} is not a whole number of blocks",
                    dims[0]
                );
            }
            let bytes = dims.iter().product::<usize>() / bn * bb;
            if data + offset + bytes > map.len() {
                bail!("tensor {name} runs past the end of the file (truncated?)");
            }
            tensors.insert(
                name,
                TensorInfo {
                    dims,
                    ggml,
                    offset: data + offset,
                },
            );
        }
        Ok(GgufFile {
            map,
            path: path.to_path_buf(),
            meta,
            tensors,
        })
    }

    fn arch_key(&self, key: &str) -> Result<&Meta> {
        let k = format!("phi3.{key}");
        self.meta
            .get(&k)
            .with_context(|| format!("GGUF metadata has no {k}"))
    }

    fn int(&self, key: &str) -> Result<i64> {
        self.arch_key(key)?
            .as_int()
            .with_context(|| format!("phi3.{key} is not an integer"))
    }

    fn f32_tensor(&self, name: &str) -> Result<Vec<f32>> {
        let t = self
            .tensors
            .get(name)
            .with_context(|| format!("GGUF file has no {name} tensor"))?;
        if t.ggml != GgmlType::F32 {
            bail!("{name} must be F32");
        }
        let n = t.dims.iter().product();
        let mut out = vec![0f32; n];
        ggml::dequantize_row(
            GgmlType::F32,
            &self.map[t.offset..t.offset + 4 * n],
            &mut out,
        );
        Ok(out)
    }

    /// The model configuration the metadata describes, as a Hugging Face `config.json` would.
    pub fn config(&self) -> Result<Phi3Config> {
        let arch = self
            .meta
            .get("general.architecture")
            .and_then(Meta::as_str)
            .context("GGUF metadata has no general.architecture")?;
        if arch != "phi3" {
            bail!("GGUF architecture is {arch:?}; Phi-4-mini files are \"phi3\"");
        }
        let hidden = self.int("embedding_length")?;
        let heads = self.int("attention.head_count")?;
        let head_dim = hidden / heads.max(1);
        let rot = self.int("rope.dimension_count").unwrap_or(head_dim);
        let vocab = self
            .tensors
            .get("token_embd.weight")
            .context("GGUF file has no token_embd.weight")?
            .dims[1];
        let ctx = self.int("context_length")?;
        let orig = self
            .int("rope.scaling.original_context_length")
            .unwrap_or(ctx);
        let token = |k: &str| self.meta.get(k).and_then(Meta::as_int);
        let mut cfg = json!({
            "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
            "vocab_size": vocab, "hidden_size": hidden,
            "intermediate_size": self.int("feed_forward_length")?,
            "num_hidden_layers": self.int("block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": self.int("attention.head_count_kv").unwrap_or(heads),
            "hidden_act": "silu",
            "rms_norm_eps": self.arch_key("attention.layer_norm_rms_epsilon")?.as_f64()
                .context("phi3.attention.layer_norm_rms_epsilon is not a number")?,
            "rope_theta": self.arch_key("rope.freq_base").ok().and_then(Meta::as_f64).unwrap_or(10000.0),
            "partial_rotary_factor": rot as f64 / head_dim as f64,
            "max_position_embeddings": ctx,
            "original_max_position_embeddings": orig,
            "tie_word_embeddings": !self.tensors.contains_key("output.weight"),
            "bos_token_id": token("tokenizer.ggml.bos_token_id"),
            "eos_token_id": token("tokenizer.ggml.eos_token_id"),
            "pad_token_id": token("tokenizer.ggml.padding_token_id"),
        });
        if self.tensors.contains_key("rope_factors_long.weight") {
            cfg["rope_scaling"] = json!({
                "type": "longrope",
                "long_factor": self.f32_tensor("rope_factors_long.weight")?,
                "short_factor": self.f32_tensor("rope_factors_short.weight")?,
            });
        }
        Phi3Config::from_json(&cfg.to_string())
            .context("the GGUF metadata is not a valid Phi-3 config")
    }

    /// A `tokenizer.json` for the file's vocabulary (`gpt2` byte-level BPE with the o200k
    /// pre-tokenizer, as llama.cpp's `gpt-4o` pre-tokenizer; control tokens become special added
    /// tokens, user-defined ones plain added tokens).
    pub fn tokenizer_json(&self, o200k_pattern: &str) -> Result<Value> {
        let model = self.meta.get("tokenizer.ggml.model").and_then(Meta::as_str);
        if model != Some("gpt2") {
            bail!("GGUF tokenizer model is {model:?}; Phi-4 files use \"gpt2\" (byte-level BPE)");
        }
        let list = |k: &str| -> Result<&Vec<Meta>> {
            match self.meta.get(k) {
                Some(Meta::Array(v)) => Ok(v),
                _ => bail!("GGUF metadata has no {k} array"),
            }
        };
        let tokens = list("tokenizer.ggml.tokens")?;
        let types = list("tokenizer.ggml.token_type").ok();
        let merges = list("tokenizer.ggml.merges")?;
        let mut vocab = serde_json::Map::new();
        let mut added = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            let t = t.as_str().context("a token is not a string")?;
            vocab.insert(t.to_string(), json!(i));
            let ty = types
                .and_then(|v| v.get(i))
                .and_then(Meta::as_int)
                .unwrap_or(1);
            if ty == 3 || ty == 4 {
                added.push(json!({
                    "id": i, "content": t, "single_word": false, "lstrip": false,
                    // GGUF keeps no strip flags; Phi-4's role and tool tags strip whitespace to
                    // their right (spec P8, §2.2).
                    "rstrip": RSTRIP_TAGS.contains(&t),
                    "normalized": false, "special": ty == 3,
                }));
            }
        }
        let merges: Vec<Value> = merges
            .iter()
            .map(|m| {
                let m = m.as_str().context("a merge is not a string")?;
                let (a, b) = m.split_once(' ').context("a merge is not two tokens")?;
                Ok(json!([a, b]))
            })
            .collect::<Result<_>>()?;
        Ok(json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added, "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": o200k_pattern}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
            ]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
                "byte_fallback": false, "ignore_merges": true, "vocab": vocab, "merges": merges},
        }))
    }

    /// The chat template the file carries, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.meta
            .get("tokenizer.chat_template")
            .and_then(Meta::as_str)
    }

    /// The token string of `id`, if the vocabulary has it.
    pub fn token(&self, id: i64) -> Option<&str> {
        match self.meta.get("tokenizer.ggml.tokens") {
            Some(Meta::Array(v)) => v.get(id as usize).and_then(Meta::as_str),
            _ => None,
        }
    }

    pub fn bos_eos(&self) -> (Option<i64>, Option<i64>) {
        let id = |k: &str| self.meta.get(k).and_then(Meta::as_int);
        (
            id("tokenizer.ggml.bos_token_id"),
            id("tokenizer.ggml.eos_token_id"),
        )
    }

    /// Every tensor under its Hugging Face name (see the module comment for the conversions).
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        let mut out = HashMap::new();
        for (name, t) in &self.tensors {
            if name.starts_with("rope_factors_") {
                continue; // in the config
            }
            let hf = hf_name(name).with_context(|| format!("unexpected GGUF tensor {name}"))?;
            let shape: Vec<usize> = t.dims.iter().rev().copied().collect();
            let bytes = t.dims.iter().product::<usize>() / t.ggml.block().0 * t.ggml.block().1;
            let tensor = match t.ggml {
                GgmlType::F32 => {
                    Tensor::mapped(DType::F32, shape, self.map.clone(), t.offset, bytes)
                }
                GgmlType::F16 => {
                    Tensor::mapped(DType::F16, shape, self.map.clone(), t.offset, bytes)
                }
                GgmlType::BF16 => {
                    Tensor::mapped(DType::BF16, shape, self.map.clone(), t.offset, bytes)
                }
                q => {
                    let [rows, cols] = shape[..] else {
                        bail!("quantized GGUF tensor {name} is not 2-D");
                    };
                    let src = &self.map[t.offset..t.offset + bytes];
                    let rb = q.row_bytes(cols);
                    let target = q.ours().expect("a quantized ggml type");
                    Tensor::quantize_rows(
                        target,
                        rows,
                        cols,
                        |r, row, qs, d| {
                            let src = &src[r * rb..(r + 1) * rb];
                            if q == GgmlType::Q4_0 {
                                ggml::repack_q4_0_row(src, cols, qs, d);
                            } else if q == GgmlType::Q4K {
                                ggml::dequantize_row(q, src, row);
                                GRIDS.with_borrow_mut(|grids| {
                                    grids.resize(cols / 32, (0.0, 0.0));
                                    ggml::q4_k_grids(src, grids);
                                    quant::quantize_row_near(target, row, grids, qs, d);
                                });
                            } else {
                                ggml::dequantize_row(q, src, row);
                                quant::quantize_row(target, row, qs, d);
                            }
                        },
                        // The source rows are never read again: without this they stay
                        // resident next to the converted copy while the rest converts.
                        |done| {
                            let at = t.offset + done.start * rb;
                            crate::paging::release(&self.map, at, done.len() * rb)
                        },
                    )
                }
            };
            out.insert(hf, tensor);
        }
        Ok(Checkpoint::from_parts(
            out,
            vec![self.path.clone()],
            vec![self.map.clone()],
        ))
    }

    /// The decoder alone (no tokenizer): what `bench` needs, and the first half of
    /// `Engine::load_gguf`. `quant` re-quantizes the float matrices; quantized ones stay as read.
    pub fn model(&self, quant: Option<Recipe>) -> Result<Phi3ForCausalLM> {
        let config = self.config()?;
        let mut ckpt = self.checkpoint()?;
        // Reading the whole file in would bring back the pages of the converted tensors (a
        // 2.3 GB Q4_0 file peaked at 4.6 GB); only a file used in place is worth prefaulting.
        let floats_only = self
            .tensors
            .values()
            .all(|t| matches!(t.ggml, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16));
        Phi3ForCausalLM::load_ready(
            config,
            &mut ckpt,
            quant,
            &self.path,
            floats_only,
            &mut |_| {},
        )
    }
}

/// Phi-4's added tokens that carry `rstrip` in its tokenizer.json.
const RSTRIP_TAGS: [&str; 10] = [
    "<|assistant|>",
    "<|end|>",
    "<|user|>",
    "<|system|>",
    "<|tool|>",
    "<|/tool|>",
    "<|tool_call|>",
    "<|/tool_call|>",
    "<|tool_response|>",
    "<|tag|>",
];

/// The Hugging Face name of a llama.cpp `phi3` tensor.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_qkv.weight" => "self_attn.qkv_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_up.weight" => "mlp.gate_up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}
