//! Checkpoint layouts (config layouts, shards, dtypes) and bad input: every failure is an error
//! that names the problem, never a panic.

mod common;

use std::path::Path;

use common::{max_abs_diff, tiny_dir, Reference};
use half::{bf16, f16};
use phi4::config::Phi3Config;
use phi4::model::{Logits, Phi3ForCausalLM};
use phi4::weights::{open_safetensors, Checkpoint, DType, Tensor};
use phi4::Engine;
use safetensors::tensor::TensorView;
use serde_json::{json, Value};

/// A writable copy of the tiny checkpoint.
fn copy_tiny() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(tiny_dir()).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, d.path().join(p.file_name().unwrap())).unwrap();
    }
    d
}

fn short_logits(dir: &Path) -> Vec<f32> {
    let r = Reference::load();
    let cfg = Phi3Config::from_file(&dir.join("config.json")).unwrap();
    let m = Phi3ForCausalLM::load(cfg, &Checkpoint::open_dir(dir).unwrap()).unwrap();
    let mut c = m.new_cache();
    let prompt = r.ids("short", "prompt");
    m.forward(
        &prompt,
        &mut c,
        m.rope.table_for_len(prompt.len()),
        Logits::All,
        None,
    )
    .unwrap()
}

fn tiny_tensors() -> Vec<(String, Tensor)> {
    let mut v = open_safetensors(&tiny_dir().join("model.safetensors")).unwrap();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn write_st(path: &Path, tensors: &[(String, Tensor)]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, t)| {
            let dt = match t.dtype {
                DType::F32 => safetensors::Dtype::F32,
                DType::F16 => safetensors::Dtype::F16,
                DType::BF16 => safetensors::Dtype::BF16,
                DType::U8 => safetensors::Dtype::U8,
                DType::Quant(_) => panic!("write_st takes the fixture's float tensors"),
            };
            (
                n.clone(),
                TensorView::new(dt, t.shape.clone(), t.raw()).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut Value)) {
    let p = dir.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, v.to_string()).unwrap();
}

fn load_err(dir: &Path) -> String {
    match Engine::load(dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn decode_weight_bytes_are_the_projections_and_the_tied_head() {
    // What `phi4 bench` divides bandwidth by and reads beside decode steps: every layer's four
    // projections and the LM head, not the norms; counted here from the config alone.
    let dir = tiny_dir();
    let cfg = Phi3Config::from_file(&dir.join("config.json")).unwrap();
    let m = Phi3ForCausalLM::load(cfg.clone(), &Checkpoint::open_dir(&dir).unwrap()).unwrap();
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let attn = cfg.num_attention_heads * cfg.head_dim();
    let per_layer = cfg.qkv_dim() * h + h * attn + 2 * i * h + h * i;
    let values = cfg.num_hidden_layers * per_layer + v * h;
    assert_eq!(m.model.embed_tokens.dtype, DType::BF16);
    assert_eq!(m.weight_bytes(), 2 * values);
    assert_eq!(m.decode_weights().len(), 4 * cfg.num_hidden_layers + 1);
}

#[test]
fn published_rope_scaling_layout_gives_identical_logits() {
    let d = copy_tiny();
    edit_config(d.path(), |v| {
        let p = v["rope_parameters"].take();
        let o = v.as_object_mut().unwrap();
        o.remove("rope_parameters");
        o.insert("rope_theta".into(), p["rope_theta"].clone());
        o.insert(
            "rope_scaling".into(),
            json!({"type": "longrope", "short_factor": p["short_factor"], "long_factor": p["long_factor"]}),
        );
    });
    assert_eq!(short_logits(d.path()), short_logits(&tiny_dir()));
}

#[test]
fn shards_with_and_without_index_load_the_same() {
    let all = tiny_tensors();
    let (a, b) = all.split_at(all.len() / 2);
    let d = copy_tiny();
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    write_st(&d.path().join("model-00001-of-00002.safetensors"), a);
    write_st(&d.path().join("model-00002-of-00002.safetensors"), b);
    let no_index = short_logits(d.path());
    let map: serde_json::Map<String, Value> = a
        .iter()
        .map(|(n, _)| (n.clone(), json!("model-00001-of-00002.safetensors")))
        .chain(
            b.iter()
                .map(|(n, _)| (n.clone(), json!("model-00002-of-00002.safetensors"))),
        )
        .collect();
    std::fs::write(
        d.path().join("model.safetensors.index.json"),
        json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let with_index = short_logits(d.path());
    let single = short_logits(&tiny_dir());
    assert_eq!(no_index, single);
    assert_eq!(with_index, single);
}

#[test]
fn f32_and_f16_checkpoints_match_the_reference() {
    let r = Reference::load();
    let want = r.tensor("short.logits");
    for (dtype, tol) in [(DType::F32, 2e-4f32), (DType::F16, 5e-2)] {
        let converted: Vec<(String, Tensor)> = tiny_tensors()
            .into_iter()
            .map(|(n, t)| {
                let vals = t.to_f32_vec();
                let t = match dtype {
                    DType::F32 => Tensor::from_f32(t.shape.clone(), &vals),
                    _ => {
                        let h: Vec<f16> = vals.iter().map(|&x| f16::from_f32(x)).collect();
                        Tensor::from_bytes(DType::F16, t.shape.clone(), bytemuck::cast_slice(&h))
                    }
                };
                (n, t)
            })
            .collect();
        let d = copy_tiny();
        write_st(&d.path().join("model.safetensors"), &converted);
        let got = short_logits(d.path());
        let diff = max_abs_diff(&got, want);
        assert!(diff < tol, "{dtype:?}: max diff {diff}");
    }
    // bf16 and f32 copies of the same values agree exactly in the weights we read.
    let t = &tiny_tensors()[0].1;
    assert!(t.as_bf16().iter().all(|x| bf16::from_f32(x.to_f32()) == *x));
}

#[test]
fn missing_and_corrupt_files_are_named() {
    let d = copy_tiny();
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    assert!(load_err(d.path()).contains("config.json"));

    let d = copy_tiny();
    std::fs::write(d.path().join("config.json"), "{ not json").unwrap();
    assert!(load_err(d.path()).contains("config.json"));

    let d = copy_tiny();
    std::fs::write(d.path().join("tokenizer.json"), "[]").unwrap();
    assert!(load_err(d.path()).contains("tokenizer"));

    let d = copy_tiny();
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    assert!(load_err(d.path()).contains("no safetensors weights"));

    // Truncated weights file.
    let d = copy_tiny();
    let p = d.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.safetensors"), "{e}");

    // Garbage header.
    std::fs::write(&p, b"\xff\xff\xff\xff\xff\xff\xff\x7fjunk").unwrap();
    let e = load_err(d.path());
    assert!(e.contains("not a valid safetensors file"), "{e}");

    // Index naming a shard that does not exist.
    let d = copy_tiny();
    std::fs::write(
        d.path().join("model.safetensors.index.json"),
        json!({"weight_map": {"model.norm.weight": "model-00009.safetensors"}}).to_string(),
    )
    .unwrap();
    assert!(load_err(d.path()).contains("model-00009.safetensors"));
}

#[test]
fn wrong_missing_and_extra_tensors_are_named() {
    let mut tensors = tiny_tensors();
    let i = tensors
        .iter()
        .position(|(n, _)| n == "model.layers.1.mlp.down_proj.weight")
        .unwrap();
    let (name, t) = tensors.remove(i);
    let d = copy_tiny();
    write_st(&d.path().join("model.safetensors"), &tensors);
    let e = load_err(d.path());
    assert!(
        e.contains("missing tensor model.layers.1.mlp.down_proj.weight"),
        "{e}"
    );

    let vals = t.to_f32_vec();
    let wrong = Tensor::from_f32(vec![t.shape[1], t.shape[0]], &vals);
    tensors.push((name, wrong));
    tensors.push((
        "model.layers.0.self_attn.q_proj.weight".into(),
        Tensor::from_f32(vec![2], &[0.0, 1.0]),
    ));
    write_st(&d.path().join("model.safetensors"), &tensors);
    let e = load_err(d.path());
    assert!(
        e.contains("model.layers.1.mlp.down_proj.weight has shape [160, 96], expected [96, 160]"),
        "{e}"
    );
    assert!(
        e.contains("unexpected tensor model.layers.0.self_attn.q_proj.weight"),
        "{e}"
    );
}

#[test]
fn invalid_config_values_are_named() {
    for (edit, needle) in [
        (json!({"model_type": "llama"}), "model_type"),
        (json!({"hidden_act": "gelu"}), "hidden_act"),
        (json!({"num_key_value_heads": 4}), "num_key_value_heads"),
        (
            json!({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0}}),
            "yarn",
        ),
        (
            json!({"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0], "long_factor": [1.0], "original_max_position_embeddings": 64}}),
            "short_factor",
        ),
        (
            json!({"partial_rotary_factor": 0.7, "rope_parameters": null}),
            "partial_rotary_factor",
        ),
        (json!({"vocab_size": "many"}), "vocab_size"),
    ] {
        let d = copy_tiny();
        edit_config(d.path(), |v| {
            for (k, x) in edit.as_object().unwrap() {
                v[k] = x.clone();
            }
        });
        let e = load_err(d.path());
        assert!(e.contains(needle), "{needle}: {e}");
    }
}
