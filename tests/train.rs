//! LoRA fine-tuning against PyTorch + PEFT (tests/fixtures/lora, scripts/make_lora_fixtures.py):
//! data encoding, one window's gradients, a whole run's losses / norms / learning rates and
//! its final adapter.

mod common;

use common::lora::*;
use common::tiny_dir;
use phi4::config::Phi3Config;
use phi4::model::Phi3ForCausalLM;
use phi4::train::{DataOptions, Encoder, LoraParams, Trainer, Truncation};
use phi4::weights::{open_safetensors, Checkpoint};
use serde_json::Value;

#[test]
fn encoding_matches_ms_swift() {
    let dir = tiny_dir();
    let tok = phi4::text::Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let tmpl = phi4::text::ChatTemplate::from_model_dir(&dir).unwrap();
    let enc = Encoder {
        tokenizer: &tok,
        template: &tmpl,
        eos_token: "<|endoftext|>".into(),
    };
    let opts = DataOptions {
        max_length: 512,
        truncation: Truncation::Delete,
        strict: true,
    };
    let data = lora_dir().join("data.jsonl");
    let (ours, skipped) = enc.load(&[data.display().to_string()], &opts, 0).unwrap();
    assert!(skipped.is_empty());
    let want = reference_samples();
    assert_eq!(ours.len(), want.len());
    for (i, (a, b)) in ours.iter().zip(&want).enumerate() {
        assert_eq!(a.input_ids, b.input_ids, "sample {i} ids");
        assert_eq!(a.labels, b.labels, "sample {i} labels");
    }
}

#[test]
fn one_window_gradients_match_peft() {
    let model = tiny_model();
    let params = LoraParams::load_peft(&model, &lora_dir().join("init_randB")).unwrap();
    let samples = reference_samples();
    let want = tensors(&lora_dir().join("grads_randB.safetensors"));
    let fixture = &trajectory()["grads_randB"];
    for checkpointing in [true, false] {
        let mut cfg = fixture_config();
        cfg.gradient_checkpointing = checkpointing;
        let t = Trainer::new(&model, cfg, params.clone(), samples.len()).unwrap();
        let window = t.window(0);
        let (loss, n, _, grads) = t.gradients(&samples, &window, 0).unwrap();
        assert_eq!(n as u64, fixture["n_tokens"].as_u64().unwrap());
        let want_loss = fixture["loss"].as_f64().unwrap();
        assert!(
            ((loss - want_loss) / want_loss).abs() < 1e-5,
            "loss {loss} vs {want_loss}"
        );
        // The base forward pass alone differs from PyTorch's by 2e-6 of the logits' range (f32
        // sums in another order, logits up to ±43 on these random weights); the probabilities'
        // gradient inherits it, so the tolerance is 2e-5 of each tensor's largest value.
        let err = compare(&t.params, &grads, &want);
        assert!(
            err < 2e-5,
            "gradients differ by {err} (relative, worst tensor)"
        );
        let norm = grads
            .iter()
            .map(|&g| (g as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let want_norm = fixture["grad_norm"].as_f64().unwrap();
        assert!(((norm - want_norm) / want_norm).abs() < 1e-5);
    }
}

#[test]
fn training_run_matches_peft() {
    let model = tiny_model();
    let params = LoraParams::load_peft(&model, &lora_dir().join("init")).unwrap();
    let samples = reference_samples();
    let traj = trajectory();
    let steps = traj["trajectory"].as_array().unwrap();
    let mut t = Trainer::new(&model, fixture_config(), params, samples.len()).unwrap();
    assert_eq!(t.plan.total_steps, traj["total_steps"].as_u64().unwrap());
    assert_eq!(t.plan.warmup_steps, traj["warmup_steps"].as_u64().unwrap());
    for want in steps {
        let log = t.step(&samples).unwrap();
        let close = |a: f64, key: &str| {
            let b = want[key].as_f64().unwrap();
            let err = (a - b).abs() / b.abs().max(1e-12);
            assert!(err < 1e-5, "step {}: {key} {a} vs {b}", log.step);
        };
        close(log.loss, "loss");
        close(log.grad_norm, "grad_norm");
        assert!((log.learning_rate - want["lr"].as_f64().unwrap()).abs() < 1e-12);
        assert_eq!(log.n_tokens as u64, want["n_tokens"].as_u64().unwrap());
    }
    // Adam divides each gradient element by its own running RMS, so elements whose gradient
    // is near zero (every A before B has moved) turn f32 noise into whole steps: the matrices
    // agree to 1e-3 of their largest value (a few % of one update), and what the adapter
    // does, the logits, agrees as closely as the base model's do.
    let want = tensors(&lora_dir().join("final/adapter_model.safetensors"));
    let err = compare(&t.params, &t.params.values, &want);
    assert!(err < 1e-3, "final adapter differs by {err}");
    let logits = tensors(&lora_dir().join("merged_logits.safetensors"));
    let ids: Vec<u32> = logits["input_ids"].iter().map(|&v| v as u32).collect();
    let mut model = tiny_model();
    t.params.attach(&mut model, 0).unwrap();
    let ours = adapter_logits(&model, &ids, Some(0));
    let err = common::rel(&ours, &logits["unmerged"]);
    assert!(
        err < 1e-5,
        "logits with the trained adapter differ by {err}"
    );
}

/// Logits of every position of `ids`, with adapter `adapter` on every row.
fn adapter_logits(model: &Phi3ForCausalLM, ids: &[u32], adapter: Option<usize>) -> Vec<f32> {
    let mut cache = model.new_cache();
    let mut item =
        phi4::model::BatchItem::new(ids, &mut cache, model.rope.table_for_len(ids.len()));
    item.adapter = adapter;
    let mut out = Vec::new();
    model
        .forward_item(item, phi4::model::Logits::All, None, &mut out)
        .unwrap();
    out
}

fn phi4_bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_phi4"))
}

/// `phi4 sft` with the fixture run's settings into `out` (no version folder).
fn sft_fixture_run(out: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let mut cmd = phi4_bin();
    cmd.args(["sft", "--model"])
        .arg(tiny_dir())
        .arg("--dataset")
        .arg(lora_dir().join("data.jsonl"))
        .args(["--adapters"])
        .arg(lora_dir().join("init"))
        .args([
            "--per-device-train-batch-size",
            "2",
            "--gradient-accumulation-steps",
            "2",
            "--num-train-epochs",
            "3",
            "--learning-rate",
            "1e-3",
            "--warmup-ratio",
            "0.1",
            "--lora-dropout",
            "0",
            "--train-dataloader-shuffle",
            "false",
            "--save-steps",
            "4",
            "--logging-steps",
            "1",
            "--add-version",
            "false",
            "--output-dir",
        ])
        .arg(out)
        .args(extra);
    cmd.output().unwrap()
}

#[test]
fn sft_command_trains_saves_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    let o = sft_fixture_run(&full, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The loss per step is the reference run's.
    let log = std::fs::read_to_string(full.join("logging.jsonl")).unwrap();
    let losses: Vec<f64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok()?.get("loss")?.as_f64())
        .collect();
    let traj = trajectory();
    let want: Vec<f64> = traj["trajectory"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), want.len());
    for (a, b) in losses.iter().zip(&want) {
        assert!((a - b).abs() / b < 1e-5, "loss {a} vs {b}");
    }
    let names: Vec<String> = std::fs::read_dir(&full)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for n in [
        "args.json",
        "logging.jsonl",
        "checkpoint-4",
        "checkpoint-8",
        "checkpoint-9",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} missing in {names:?}");
    }
    let ck = full.join("checkpoint-9");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(ck.join(f).is_file(), "{f}");
    }
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["lora_alpha"], 32.0);
    assert_eq!(cfg["modules_to_save"], Value::Null);
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["down_proj", "gate_up_proj", "o_proj", "qkv_proj"])
    );
    let want = tensors(&lora_dir().join("final/adapter_model.safetensors"));
    let ours = tensors(&ck.join("adapter_model.safetensors"));
    assert_eq!(ours.len(), want.len());
    for (k, v) in &want {
        assert_eq!(ours[k].len(), v.len(), "{k}");
        assert!(common::rel(&ours[k], v) < 1e-3, "{k}");
    }

    // A run killed after checkpoint-4 and resumed ends with the same adapter, bit for bit.
    let killed = tmp.path().join("killed");
    std::fs::create_dir_all(killed.join("checkpoint-4")).unwrap();
    for e in std::fs::read_dir(full.join("checkpoint-4")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, killed.join("checkpoint-4").join(p.file_name().unwrap())).unwrap();
    }
    let resume = killed.join("checkpoint-4").display().to_string();
    let o = sft_fixture_run(&killed, &["--resume-from-checkpoint", &resume]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a = std::fs::read(ck.join("adapter_model.safetensors")).unwrap();
    let b = std::fs::read(killed.join("checkpoint-9/adapter_model.safetensors")).unwrap();
    assert!(a == b, "resumed run ended with a different adapter");

    // Resuming with other data is refused.
    let o = sft_fixture_run(
        &killed,
        &["--resume-from-checkpoint", &resume, "--max-steps", "12"],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("same data and settings"));
}

#[test]
fn sft_reports_bad_data_with_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("bad.jsonl");
    let good = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}"#;
    let long = format!(
        r#"{{"messages": [{{"role": "user", "content": "{}"}}, {{"role": "assistant", "content": "ok"}}]}}"#,
        "word ".repeat(80)
    );
    let lines = [
        good,
        "{not json",
        r#"{"messages": [{"role": "narrator", "content": "x"}]}"#,
        r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}"#,
        &long,
        r#"{"messages": [{"role": "user", "content": "Only a question"}]}"#,
        good,
    ];
    std::fs::write(&data, lines.join("\n")).unwrap();
    let run = |extra: &[&str]| {
        phi4_bin()
            .args(["sft", "--model"])
            .arg(tiny_dir())
            .arg("--dataset")
            .arg(&data)
            .args(["--max-length", "64", "--max-steps", "1", "--output-dir"])
            .arg(tmp.path().join("out"))
            .args(extra)
            .output()
            .unwrap()
    };
    let o = run(&[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let f = data.display().to_string();
    assert!(err.contains("skipped 5 samples"), "{err}");
    for (line, why) in [
        (2, "not valid JSON"),
        (3, "role \"narrator\""),
        (4, "empty assistant turn"),
        (5, "over --max-length 64"),
        (6, "nothing to learn"),
    ] {
        assert!(
            err.contains(&format!("{f}:{line}: ")) && err.contains(why),
            "line {line} ({why}) not reported:\n{err}"
        );
    }
    let o = run(&["--strict"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("{f}:2:")) && err.contains("not valid JSON"),
        "{err}"
    );

    for (flag, value, why) in [
        ("--tuner-type", "full", "not supported"),
        ("--target-modules", "q_proj", "not a projection"),
        ("--lora-rank", "0", "--lora-rank"),
        ("--lr-scheduler-type", "wavy", "--lr-scheduler-type"),
    ] {
        let o = run(&[flag, value]);
        assert!(!o.status.success(), "{flag} {value} accepted");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(why),
            "{flag}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// The PEFT reference adapter, loaded unmerged, gives PEFT's logits (and the base rows stay
/// the base model's).
#[test]
fn adapters_apply_unmerged_as_peft() {
    let mut e = phi4::Engine::load(&tiny_dir()).unwrap();
    let id = e.add_adapter("tuned", &lora_dir().join("final")).unwrap();
    let logits = tensors(&lora_dir().join("merged_logits.safetensors"));
    let ids: Vec<u32> = logits["input_ids"].iter().map(|&v| v as u32).collect();
    let ours = adapter_logits(&e.model, &ids, Some(id));
    assert!(common::rel(&ours, &logits["unmerged"]) < 1e-5);
    let base = adapter_logits(&e.model, &ids, None);
    assert!(common::rel(&base, &logits["base"]) < 1e-5);
    // Two sequences, one on the adapter and one not, in one batched step.
    let (mut a, _) = e.start_adapter(&ids[..10], None, Some(id)).unwrap();
    let (mut b, _) = e.start_adapter(&ids[..10], None, None).unwrap();
    a.tokens.push(ids[10]);
    b.tokens.push(ids[10]);
    let out = e.forward_pending(&mut [&mut a, &mut b]).unwrap();
    let v = 512;
    assert!(common::rel(&out[0], &logits["unmerged"][10 * v..11 * v]) < 1e-5);
    assert!(common::rel(&out[1], &logits["base"][10 * v..11 * v]) < 1e-5);
    // Errors name the problem.
    let err = e
        .add_adapter("tuned", &lora_dir().join("init"))
        .unwrap_err();
    assert!(format!("{err:#}").contains("two adapters"));
    let err = e.add_adapter("x", &lora_dir()).unwrap_err();
    assert!(
        format!("{err:#}").contains("not an adapter directory"),
        "{err:#}"
    );
}

mod server {
    use super::*;
    use axum::http::StatusCode;
    use phi4::engine::BatcherConfig;
    use phi4::server::{engine_router, ServerOptions};
    use serde_json::json;

    fn app() -> axum::Router {
        let mut e = phi4::Engine::load(&tiny_dir()).unwrap();
        e.add_adapter("tuned", &lora_dir().join("final")).unwrap();
        engine_router(
            std::sync::Arc::new(e),
            BatcherConfig::default(),
            ServerOptions {
                model_id: "tiny".into(),
                lora_modules: vec!["tuned".into()],
                ..Default::default()
            },
        )
    }

    use common::http::call;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lora_modules_are_listed_and_chosen_by_model_name() {
        let app = app();
        let (s, v) = call(&app, "GET", "/v1/models", None).await;
        assert_eq!(s, StatusCode::OK);
        let ids: Vec<&str> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["tiny", "tuned"]);
        assert_eq!(v["data"][1]["parent"], "tiny");
        let ask = |model: &str| json!({"model": model, "prompt": "Capital of France?", "max_tokens": 8, "temperature": 0});
        // Both requests at once: they decode in one batch on different adapters.
        let (base, tuned) = tokio::join!(
            call(&app, "POST", "/v1/completions", Some(ask("tiny"))),
            call(&app, "POST", "/v1/completions", Some(ask("tuned")))
        );
        assert_eq!(base.0, StatusCode::OK, "{}", base.1);
        assert_eq!(tuned.0, StatusCode::OK, "{}", tuned.1);
        assert_eq!(tuned.1["model"], "tuned");
        // The same greedy continuation as the engine gives with the adapter.
        let mut e = phi4::Engine::load(&tiny_dir()).unwrap();
        let id = e.add_adapter("tuned", &lora_dir().join("final")).unwrap();
        let prompt = e.tokenizer.encode("Capital of France?").unwrap();
        let params = phi4::SamplingParams {
            max_tokens: 8,
            temperature: 0.0,
            ..Default::default()
        };
        let want = |adapter| {
            let (mut g, mut logits) = e
                .begin(phi4::engine::Request {
                    prompt: prompt.clone(),
                    params: params.clone(),
                    adapter,
                    ..Default::default()
                })
                .unwrap();
            let mut text = String::new();
            loop {
                let step = e.sample_next(&mut g, &mut logits).unwrap();
                text.push_str(&step.text);
                if step.finish.is_some() {
                    break text;
                }
                logits = e.extend_generation(&mut g).unwrap();
            }
        };
        assert_eq!(tuned.1["choices"][0]["text"], want(Some(id)));
        assert_eq!(base.1["choices"][0]["text"], want(None));
        assert_ne!(
            want(Some(id)),
            want(None),
            "the adapter changes nothing on this prompt"
        );
        let (s, v) = call(
            &app,
            "POST",
            "/v1/chat/completions",
            Some(json!({"model": "other", "messages": [{"role": "user", "content": "hi"}]})),
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert!(
            v["error"]["message"].as_str().unwrap().contains("`tuned`"),
            "{v}"
        );
    }
}

#[test]
fn export_merges_as_peft_then_bf16() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let o = phi4_bin()
        .args(["export", "--model"])
        .arg(tiny_dir())
        .arg("--adapters")
        .arg(lora_dir().join("final"))
        .arg("--merge-lora")
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let names: Vec<String> = open_safetensors(&out.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            assert!(!k.contains("lora"), "{k}");
            if t.shape.len() == 2 {
                assert_eq!(t.dtype, phi4::weights::DType::BF16, "{k}");
            }
            k
        })
        .collect();
    assert_eq!(
        names.len(),
        20,
        "the base's tensors, tied head not duplicated"
    );
    let logits = tensors(&lora_dir().join("merged_logits.safetensors"));
    let ids: Vec<u32> = logits["input_ids"].iter().map(|&v| v as u32).collect();
    let cfg = Phi3Config::from_file(&out.join("config.json")).unwrap();
    let merged = Phi3ForCausalLM::load(cfg, &Checkpoint::open_dir(&out).unwrap()).unwrap();
    let ours = adapter_logits(&merged, &ids, None);
    // PEFT's merge rounded to bf16 is what we write; against the unmerged adapter the only
    // difference is that rounding of W + s·B·A (here 1.7 % of the logits' range: the tiny
    // model's weights are large and its logits reach ±43).
    assert!(common::rel(&ours, &logits["merged_bf16"]) < 1e-5);
    assert!(common::rel(&ours, &logits["unmerged"]) < 0.03);

    // Refusals name the problem.
    let o = phi4_bin()
        .args(["export", "--adapters"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not an adapter directory"));
    let o = phi4_bin()
        .args(["export", "--model"])
        .arg(tiny_dir())
        .arg("--adapters")
        .arg(lora_dir().join("final"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already holds"));
}

/// QLoRA: training on a q8 or q4 base. The gradient flows through the dequantized weights
/// (`matmul_transposed`, exact in its unit test), so a window's gradient must point the way
/// that of a float model holding the dequantized weights does (only the forward's 8-bit
/// activations differ), and training must lower the loss. (This tiny random model, logits up
/// to ±43, is so sensitive that rounding activations moves the gradient by 18 % of its largest
/// element: elementwise bounds would say nothing.)
#[test]
fn quantized_base_gradients() {
    let samples = reference_samples();
    let params = LoraParams::load_peft(&tiny_model(), &lora_dir().join("init_randB")).unwrap();
    let grads = |m: &Phi3ForCausalLM| {
        let t = Trainer::new(m, fixture_config(), params.clone(), samples.len()).unwrap();
        t.gradients(&samples, &t.window(0), 0).unwrap().3
    };
    let cosine = |a: &[f32], b: &[f32]| {
        let d: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        d / (n(a) * n(b))
    };
    for recipe in [
        phi4::model::Recipe::Q8,
        phi4::model::Recipe::Q6,
        phi4::model::Recipe::Q4,
    ] {
        let mut q = tiny_model();
        q.quantize(recipe).unwrap();
        let mut deq = tiny_model();
        for (l, layer) in deq.model.layers.iter_mut().enumerate() {
            for (t, (_, lin)) in layer.linears_mut().into_iter().enumerate() {
                let w = q.model.layers[l].linears()[t].1.weight();
                *lin = phi4::model::Linear::new(phi4::weights::Tensor::from_f32(
                    w.shape.clone(),
                    &w.to_f32_vec(),
                ))
                .unwrap();
            }
        }
        let e = &q.model.embed_tokens;
        deq.model.embed_tokens = phi4::weights::Tensor::from_f32(e.shape.clone(), &e.to_f32_vec());
        deq.lm_head = phi4::model::Linear::new(deq.model.embed_tokens.clone()).unwrap();
        let c = cosine(&grads(&q), &grads(&deq));
        assert!(c > 0.95, "{}: gradient cosine {c}", recipe.name());
        let mut t = Trainer::new(&q, fixture_config(), params.clone(), samples.len()).unwrap();
        let losses: Vec<f64> = (0..9).map(|_| t.step(&samples).unwrap().loss).collect();
        assert!(
            losses[6] < losses[0] && losses[7] < losses[1],
            "{}: {losses:?}",
            recipe.name()
        );
    }
}
