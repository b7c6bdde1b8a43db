//! GGUF import: the tiny fixture written as llama.cpp-style `phi3` GGUF files (by a minimal
//! writer here) loads with the same config, tokenizer, template and numbers as the safetensors
//! checkpoint; Q8_0 / Q4_0 matrices keep their exact values; Q4_K / Q6_K blocks decode as
//! llama.cpp's gguf-py decodes them (fixture from scripts/make_ggml_fixture.py).

mod common;

use std::path::Path;

use half::bf16;
use phi4::kernels::ggml::{dequantize_row, GgmlType};
use phi4::model::{Logits, RopeTable};
use phi4::weights::Checkpoint;
use phi4::{Engine, Message};
use serde_json::Value;

use common::{fixtures, tiny_dir, Reference};

#[derive(Default)]
struct GgufWriter {
    kv: Vec<u8>,
    n_kv: u64,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

impl GgufWriter {
    fn key(&mut self, k: &str, ty: u32) {
        put_str(&mut self.kv, k);
        self.kv.extend(ty.to_le_bytes());
        self.n_kv += 1;
    }
    fn u32(&mut self, k: &str, v: u32) {
        self.key(k, 4);
        self.kv.extend(v.to_le_bytes());
    }
    fn f32(&mut self, k: &str, v: f32) {
        self.key(k, 6);
        self.kv.extend(v.to_le_bytes());
    }
    fn str(&mut self, k: &str, v: &str) {
        self.key(k, 8);
        put_str(&mut self.kv, v);
    }
    fn strs(&mut self, k: &str, v: &[String]) {
        self.key(k, 9);
        self.kv.extend(8u32.to_le_bytes());
        self.kv.extend((v.len() as u64).to_le_bytes());
        for s in v {
            put_str(&mut self.kv, s);
        }
    }
    fn i32s(&mut self, k: &str, v: &[i32]) {
        self.key(k, 9);
        self.kv.extend(5u32.to_le_bytes());
        self.kv.extend((v.len() as u64).to_le_bytes());
        for x in v {
            self.kv.extend(x.to_le_bytes());
        }
    }
    /// `shape` in PyTorch order ([rows, cols]).
    fn tensor(&mut self, name: &str, shape: &[usize], ty: u32, data: Vec<u8>) {
        let dims = shape.iter().rev().map(|&d| d as u64).collect();
        self.tensors.push((name.into(), dims, ty, data));
    }
    fn write(&self, path: &Path) {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend(self.n_kv.to_le_bytes());
        b.extend(&self.kv);
        let mut offset = 0u64;
        for (name, dims, ty, data) in &self.tensors {
            put_str(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend(offset.to_le_bytes());
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        b.resize(b.len().div_ceil(32) * 32, 0);
        for (_, _, _, data) in &self.tensors {
            b.extend(data);
            b.resize(b.len().div_ceil(32) * 32, 0);
        }
        std::fs::write(path, b).unwrap();
    }
}

/// ggml's Q8_0 of one row.
fn q8_0(row: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for blk in row.chunks(32) {
        let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend(half::f16::from_f32(d).to_le_bytes());
        out.extend(blk.iter().map(|v| (v * id).round() as i8 as u8));
    }
    out
}

/// ggml's Q4_0 of one row.
fn q4_0(row: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for blk in row.chunks(32) {
        let m = blk
            .iter()
            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = m / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(half::f16::from_f32(d).to_le_bytes());
        let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
        for j in 0..16 {
            out.push(q(blk[j]) | (q(blk[j + 16]) << 4));
        }
    }
    out
}

/// A Q4_K encoding of one row (a multiple of 256 values), ggml's layout: per super-block of 256,
/// `d` and `dmin` (f16), eight 6-bit sub-block scales and minimums packed in 12 bytes, then the
/// nibbles (byte `32c + l`: value `64c + l` low, `64c + 32 + l` high). Each sub-block spans its
/// range (down to at most 0) in 15 steps, as a plain K-quant encoder does.
fn q4_k(row: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for sb in row.chunks(256) {
        let (mut scale, mut min) = ([0f32; 8], [0f32; 8]);
        for (j, sub) in sb.chunks(32).enumerate() {
            let lo = sub.iter().fold(0f32, |m, &v| m.min(v));
            let hi = sub.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            (scale[j], min[j]) = ((hi - lo) / 15.0, -lo);
        }
        let d = half::f16::from_f32(scale.iter().fold(0f32, |m, &v| m.max(v)) / 63.0);
        let dmin = half::f16::from_f32(min.iter().fold(0f32, |m, &v| m.max(v)) / 63.0);
        let six = |v: f32, unit: half::f16| {
            let unit = unit.to_f32();
            if unit > 0.0 {
                (v / unit).round().clamp(0.0, 63.0) as u8
            } else {
                0
            }
        };
        let sc: Vec<u8> = scale.iter().map(|&v| six(v, d)).collect();
        let m: Vec<u8> = min.iter().map(|&v| six(v, dmin)).collect();
        let mut packed = [0u8; 12];
        for j in 0..4 {
            packed[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            packed[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
            packed[j + 8] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4);
        }
        out.extend(d.to_le_bytes());
        out.extend(dmin.to_le_bytes());
        out.extend(packed);
        let code = |k: usize| {
            let j = k / 32;
            let step = d.to_f32() * sc[j] as f32;
            let v = (sb[k] + dmin.to_f32() * m[j] as f32) / step;
            if step > 0.0 {
                v.round().clamp(0.0, 15.0) as u8
            } else {
                0
            }
        };
        for c in 0..4 {
            for l in 0..32 {
                out.push(code(64 * c + l) | (code(64 * c + 32 + l) << 4));
            }
        }
    }
    out
}

/// The tiny fixture as a GGUF file, matrices stored as `matrix` says ("bf16", "q8_0", "q4_0").
fn tiny_gguf(path: &Path, matrix: &str, with_template: bool) {
    let dir = tiny_dir();
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let tok: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let mut w = GgufWriter::default();
    w.str("general.architecture", "phi3");
    let u = |k: &str| cfg[k].as_u64().unwrap() as u32;
    w.u32("phi3.context_length", u("max_position_embeddings"));
    w.u32("phi3.embedding_length", u("hidden_size"));
    w.u32("phi3.feed_forward_length", u("intermediate_size"));
    w.u32("phi3.block_count", u("num_hidden_layers"));
    w.u32("phi3.attention.head_count", u("num_attention_heads"));
    w.u32("phi3.attention.head_count_kv", u("num_key_value_heads"));
    w.f32("phi3.attention.layer_norm_rms_epsilon", 1e-5);
    w.u32("phi3.rope.dimension_count", 12);
    w.f32("phi3.rope.freq_base", 10000.0);
    w.u32(
        "phi3.rope.scaling.original_context_length",
        u("original_max_position_embeddings"),
    );
    // The vocabulary, as llama.cpp's converter writes it.
    let vocab = tok["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    let mut types = vec![1i32; tokens.len()];
    for a in tok["added_tokens"].as_array().unwrap() {
        types[a["id"].as_u64().unwrap() as usize] = if a["special"].as_bool().unwrap() {
            3
        } else {
            4
        };
    }
    let merges: Vec<String> = tok["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap()))
        .collect();
    w.str("tokenizer.ggml.model", "gpt2");
    w.str("tokenizer.ggml.pre", "gpt-4o");
    w.strs("tokenizer.ggml.tokens", &tokens);
    w.i32s("tokenizer.ggml.token_type", &types);
    w.strs("tokenizer.ggml.merges", &merges);
    w.u32("tokenizer.ggml.bos_token_id", 500);
    w.u32("tokenizer.ggml.eos_token_id", 500);
    if with_template {
        w.str(
            "tokenizer.chat_template",
            &std::fs::read_to_string(dir.join("chat_template.jinja")).unwrap(),
        );
    }
    let rope = &cfg["rope_parameters"];
    for (name, key) in [
        ("rope_factors_long.weight", "long_factor"),
        ("rope_factors_short.weight", "short_factor"),
    ] {
        let v: Vec<u8> = rope[key]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|x| (x.as_f64().unwrap() as f32).to_le_bytes())
            .collect();
        w.tensor(name, &[v.len() / 4], 0, v);
    }
    let ckpt = Checkpoint::open_dir(&dir).unwrap();
    let mut names: Vec<&String> = ckpt.tensors.keys().collect();
    names.sort();
    for hf in names {
        let t = &ckpt.tensors[hf];
        let gg = gguf_name(hf);
        let vals = t.to_f32_vec();
        if t.shape.len() == 1 {
            w.tensor(
                &gg,
                &t.shape,
                0,
                vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
            );
            continue;
        }
        let cols = t.shape[1];
        let (ty, data): (u32, Vec<u8>) = match matrix {
            "bf16" => (
                30,
                vals.iter()
                    .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
            "q8_0" => (8, vals.chunks(cols).flat_map(q8_0).collect()),
            "q4_0" => (2, vals.chunks(cols).flat_map(q4_0).collect()),
            _ => unreachable!(),
        };
        w.tensor(&gg, &t.shape, ty, data);
    }
    w.write(path);
}

fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (l, part) = rest.split_once('.').unwrap();
    let g = match part {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.qkv_proj.weight" => "attn_qkv.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        other => panic!("{other}"),
    };
    format!("blk.{l}.{g}")
}

#[test]
fn bf16_gguf_loads_as_the_safetensors_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tiny.gguf");
    tiny_gguf(&path, "bf16", true);
    let g = Engine::load_gguf(&path, None).unwrap();
    let s = Engine::load(&tiny_dir()).unwrap();
    let (a, b) = (&g.model.config, &s.model.config);
    assert_eq!(
        (
            a.vocab_size,
            a.hidden_size,
            a.num_hidden_layers,
            a.max_position_embeddings
        ),
        (
            b.vocab_size,
            b.hidden_size,
            b.num_hidden_layers,
            b.max_position_embeddings
        )
    );
    assert!(g.model.config.tie_word_embeddings);
    // Same numbers: the LongRoPE factors came from the rope_factors tensors.
    let r = Reference::load();
    for (case, table) in [("short", RopeTable::Short), ("long", RopeTable::Long)] {
        let p = r.ids(case, "prompt");
        let x = g
            .model
            .forward(&p, &mut g.model.new_cache(), table, Logits::All, None)
            .unwrap();
        let y = s
            .model
            .forward(&p, &mut s.model.new_cache(), table, Logits::All, None)
            .unwrap();
        assert_eq!(x, y, "{case}");
    }
    // Same tokenizer (rebuilt from tokens + merges) and chat rendering.
    let text = "Hello <|user|>  world!\n\tdef f(x): return x ** 2  # ünïcode 😀 <|tool_call|>x";
    assert_eq!(
        g.tokenizer.encode(text).unwrap(),
        s.tokenizer.encode(text).unwrap()
    );
    let msgs = [
        Message::new("system", "Be brief."),
        Message::new("user", "Hi there"),
    ];
    assert_eq!(
        g.template.render(&msgs, None, true).unwrap(),
        s.template.render(&msgs, None, true).unwrap()
    );
}

#[test]
fn q8_0_and_q4_0_matrices_keep_their_exact_values() {
    let tmp = tempfile::tempdir().unwrap();
    let float = Engine::load(&tiny_dir()).unwrap();
    for (kind, ty) in [("q8_0", GgmlType::Q8_0), ("q4_0", GgmlType::Q4_0)] {
        let path = tmp.path().join(format!("{kind}.gguf"));
        tiny_gguf(&path, kind, false);
        let g = Engine::load_gguf(&path, None).unwrap();
        let l = &g.model.model.layers[1];
        let f = &float.model.model.layers[1];
        for (got, src) in [
            (l.mlp.gate_up_proj.weight(), f.mlp.gate_up_proj.weight()),
            (l.self_attn.qkv_proj.weight(), f.self_attn.qkv_proj.weight()),
        ] {
            assert!(got.as_quant().is_some(), "{kind}: stored quantized");
            let cols = src.shape[1];
            let vals = src.to_f32_vec();
            let blocks: Vec<u8> = vals
                .chunks(cols)
                .flat_map(if kind == "q8_0" { q8_0 } else { q4_0 })
                .collect();
            let mut want = vec![0f32; vals.len()];
            let rb = ty.row_bytes(cols);
            for (r, out) in want.chunks_mut(cols).enumerate() {
                dequantize_row(ty, &blocks[r * rb..(r + 1) * rb], out);
            }
            assert_eq!(got.to_f32_vec(), want, "{kind}");
        }
        // And the model still answers like the float one, within quantization error.
        let p: Vec<u32> = (1..30).collect();
        let x = g
            .model
            .forward(
                &p,
                &mut g.model.new_cache(),
                RopeTable::Short,
                Logits::Last,
                None,
            )
            .unwrap();
        let y = float
            .model
            .forward(
                &p,
                &mut float.model.new_cache(),
                RopeTable::Short,
                Logits::Last,
                None,
            )
            .unwrap();
        let rel = (x.iter().zip(&y).map(|(a, b)| (a - b).powi(2)).sum::<f32>()
            / y.iter().map(|b| b * b).sum::<f32>())
        .sqrt();
        assert!(
            rel < if kind == "q8_0" { 0.1 } else { 0.6 },
            "{kind}: relative logit error {rel}"
        );
        // No chat template in the file: the official Phi-4 one.
        let msgs = [Message::new("user", "Hi")];
        assert_eq!(
            g.template.render(&msgs, None, true).unwrap(),
            "<|user|>Hi<|end|><|assistant|>"
        );
    }
}

#[test]
fn k_quant_blocks_decode_as_gguf_py_decodes_them() {
    let f: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("ggml_kquants.json")).unwrap(),
    )
    .unwrap();
    for (name, ty) in [("Q4_K", GgmlType::Q4K), ("Q6_K", GgmlType::Q6K)] {
        let hex = f[name]["bytes"].as_str().unwrap();
        let bytes: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let want: Vec<f32> = f[name]["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let mut got = vec![0f32; want.len()];
        dequantize_row(ty, &bytes, &mut got);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 + 1e-5 * w.abs(),
                "{name}[{i}]: {g} vs {w}"
            );
        }
    }
}

/// Q4_K matrices (Q4_K_M files) load as Q4M: its zero point per 32 values follows each Q4_K
/// sub-block's minimum, so the one lossy step of the import moves the decoded values far less
/// than a symmetric Q4 grid would, at the same 4.5 bits.
#[test]
fn q4_k_rows_requantize_to_q4m_with_a_fraction_of_q4s_error() {
    use phi4::kernels::quant::{self, QType};
    assert_eq!(GgmlType::Q4K.ours(), Some(QType::Q4M));
    let cols = 1024;
    // Heavy-tailed values (a Gaussian times a random spread per 64 values), as trained weights.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut uniform = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 11) as f32 / (1u64 << 53) as f32
    };
    // Squared errors of q4, q4m (the whole search) and q4m guided by the Q4_K grids (what the
    // importer runs).
    let (mut q4k, mut err) = (0f64, [0f64; 3]);
    for _ in 0..64 {
        let mut row = vec![0f32; cols];
        for chunk in row.chunks_mut(64) {
            let spread = 0.2 + 2.0 * uniform();
            for v in chunk {
                let g = (-2.0 * uniform().max(1e-9).ln()).sqrt()
                    * (std::f32::consts::TAU * uniform()).cos();
                *v = 0.02 * spread * g + 0.01 * (uniform() - 0.5);
            }
        }
        let mut decoded = vec![0f32; cols];
        let bytes = q4_k(&row);
        dequantize_row(GgmlType::Q4K, &bytes, &mut decoded);
        let mut grids = vec![(0f32, 0f32); cols / 32];
        phi4::kernels::ggml::q4_k_grids(&bytes, &mut grids);
        q4k += row
            .iter()
            .zip(&decoded)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>();
        for (i, e) in err.iter_mut().enumerate() {
            let t = [QType::Q4, QType::Q4M, QType::Q4M][i];
            let (mut qs, mut d) = (
                vec![0u8; t.row_bytes(cols)],
                vec![half::f16::ZERO; cols / 32],
            );
            if i == 2 {
                quant::quantize_row_near(t, &decoded, &grids, &mut qs, &mut d);
            } else {
                quant::quantize_row(t, &decoded, &mut qs, &mut d);
            }
            let mut back = vec![0f32; cols];
            quant::dequantize_row(t, &qs, &d, &mut back);
            *e += back
                .iter()
                .zip(&decoded)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>();
        }
    }
    let [q4, q4m, near] = err.map(|e| e / q4k);
    eprintln!("re-quantization error / Q4_K's own: q4 {q4:.3}, q4m {q4m:.3}, guided {near:.3}");
    // Measured: q4 1.01, q4m 0.27 of Q4_K's own squared error (the q4 import doubled it).
    assert!(q4m < 0.35 && q4m < 0.35 * q4, "q4m {q4m} vs q4 {q4}");
    assert!(near < 0.35 && near < 1.05 * q4m, "guided {near} vs {q4m}");
}

#[test]
fn broken_gguf_files_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tiny.gguf");
    tiny_gguf(&path, "bf16", false);
    let full = std::fs::read(&path).unwrap();
    let err = |bytes: &[u8]| {
        let p = tmp.path().join("bad.gguf");
        std::fs::write(&p, bytes).unwrap();
        format!(
            "{:#}",
            Engine::load_gguf(&p, None).err().expect("must fail")
        )
    };
    assert!(
        err(&full[..full.len() - 100]).contains("past the end"),
        "truncated data"
    );
    assert!(err(&full[..200]).contains("truncated"), "truncated header");
    assert!(err(b"GGML and more bytes").contains("magic"));
    let mut other = full.clone();
    let at = other.windows(4).position(|w| w == b"phi3").unwrap();
    other[at..at + 4].copy_from_slice(b"qwen");
    assert!(err(&other).contains("qwen"), "{}", err(&other));
}
