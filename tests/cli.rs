//! The `phi4` binary as scripts use it: JSON output names, exit codes and error messages.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::{tiny_dir, Reference};
use serde_json::Value;

fn phi4(args: &[&str], stdin: Option<&[u8]>) -> Output {
    phi4_env(args, stdin, &[])
}

/// Runs the binary offline with extra environment variables.
fn phi4_env(args: &[&str], stdin: Option<&[u8]>, env: &[(&str, &std::path::Path)]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_phi4"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut pipe = child.stdin.take().unwrap();
        if let Some(b) = stdin {
            pipe.write_all(b).unwrap();
        }
    }
    child.wait_with_output().unwrap()
}

fn tiny() -> String {
    tiny_dir().display().to_string()
}

/// The ids of a `--json` output's field.
fn json_ids(v: &Value, key: &str) -> Vec<u32> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Runs `phi4 args`, which must fail with `needle` in its error output.
fn fails_with(args: &[&str], needle: &str) {
    let o = phi4(args, None);
    assert!(!o.status.success(), "{args:?} succeeded");
    assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn run_json_reproduces_the_reference_chat() {
    let r = Reference::load();
    let msgs = &r.meta["chat"]["messages"];
    let want = r.ids("chat", "generated");
    let n = want.len().to_string();
    let o = phi4(
        &[
            "run",
            "--model",
            &tiny(),
            "--system",
            msgs[0]["content"].as_str().unwrap(),
            "--prompt",
            msgs[1]["content"].as_str().unwrap(),
            "--max-tokens",
            &n,
            "--json",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let ids = |k: &str| json_ids(&v, k);
    assert_eq!(ids("prompt_ids"), r.ids("chat", "prompt"));
    assert_eq!(ids("generated_ids"), want);
    assert_eq!(v["text"], r.meta["chat"]["text"]);
    assert!(v["finish_reason"].is_string());
    assert!(v["timings"]["prefill_tokens_per_s"].is_number());
}

#[test]
fn run_streams_text_and_raw_skips_the_template() {
    let o = phi4(
        &[
            "run",
            "--model",
            &tiny(),
            "--prompt",
            "Hello",
            "--raw",
            "--max-tokens",
            "5",
            "--json",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    // "Hello" alone: no role tags around it.
    assert!(v["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .all(|x| x.as_u64().unwrap() < 500));
    let o = phi4(
        &[
            "run",
            "--model",
            &tiny(),
            "--prompt",
            "Hello",
            "--raw",
            "--max-tokens",
            "5",
        ],
        None,
    );
    assert!(o.status.success());
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim_end_matches('\n'),
        v["text"].as_str().unwrap()
    );
}

#[test]
fn tokenize_prints_ids() {
    let o = phi4(
        &["tokenize", "--model", &tiny(), "--json"],
        Some(b"<|user|>Hi<|end|>"),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let user = 504; // tiny tokenizer ids: specials follow the 500 BPE ranks
    assert_eq!(v["ids"][0], user);
    assert_eq!(v["ids"].as_array().unwrap().last().unwrap(), 503);
}

#[test]
fn bad_input_exits_non_zero_with_a_reason() {
    let bad_prompt = std::env::temp_dir().join(format!("phi4-bad-{}.txt", std::process::id()));
    std::fs::write(&bad_prompt, b"\xff\xfe not utf8").unwrap();
    let long = "word ".repeat(600);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "run".into(),
                "--model".into(),
                "/no/such/dir".into(),
                "--prompt".into(),
                "x".into(),
            ],
            "no such directory",
        ),
        (
            vec![
                "run".into(),
                "--model".into(),
                tiny(),
                "--kv-cache".into(),
                "q3".into(),
                "--prompt".into(),
                "x".into(),
            ],
            "unknown KV cache type",
        ),
        (
            vec![
                "run".into(),
                "--model".into(),
                tiny(),
                "--bf16-acts".into(),
                "fp8".into(),
                "--prompt".into(),
                "x".into(),
            ],
            "unknown activation precision",
        ),
        (
            vec![
                "run".into(),
                "--model".into(),
                tiny(),
                "--prompt-file".into(),
                bad_prompt.display().to_string(),
            ],
            "not valid UTF-8",
        ),
        (
            vec![
                "run".into(),
                "--model".into(),
                tiny(),
                "--prompt".into(),
                "x".into(),
                "--temperature".into(),
                "-1".into(),
            ],
            "temperature",
        ),
        (
            vec![
                "run".into(),
                "--model".into(),
                tiny(),
                "--prompt".into(),
                "x".into(),
                "--top-p".into(),
                "1.5".into(),
            ],
            "top_p",
        ),
        (
            vec![
                "run".into(),
                "--model".into(),
                tiny(),
                "--prompt".into(),
                long,
                "--raw".into(),
            ],
            "context",
        ),
        (vec!["run".into(), "--model".into(), tiny()], "--prompt"),
        (
            vec!["run".into(), "--prompt".into(), "x".into()],
            "HF_HUB_OFFLINE",
        ),
        (vec!["bench".into()], "--synthetic"),
    ];
    // serve's operational flags: checked before anything listens or loads.
    let serve = |flag: &str, value: &str| -> Vec<String> {
        [
            "serve",
            "--model",
            &tiny(),
            "--port",
            "0",
            &format!("{flag}={value}"),
        ]
        .map(String::from)
        .to_vec()
    };
    let cases = cases.into_iter().chain([
        (
            serve("--header-timeout", "0"),
            "--header-timeout must be a positive",
        ),
        (
            serve("--body-timeout", "nan"),
            "--body-timeout must be a positive",
        ),
        (
            serve("--keep-alive-timeout", "-3"),
            "--keep-alive-timeout must be a positive",
        ),
        (
            serve("--shutdown-timeout", "inf"),
            "--shutdown-timeout must be a positive",
        ),
        (serve("--request-timeout", "-1"), "or 0 for no limit"),
        (
            serve("--max-connections", "0"),
            "--max-connections must be at least 1",
        ),
        (serve("--log-format", "xml"), "invalid value 'xml'"),
        (
            vec![
                "serve".into(),
                "--model".into(),
                "/no/such/dir".into(),
                "--port".into(),
                "0".into(),
            ],
            "no such directory",
        ),
    ]);
    for (args, needle) in cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = phi4(&a, None);
        assert!(!o.status.success(), "{a:?} should fail");
        let e = stderr(&o);
        assert!(e.contains(needle), "{a:?}: {e}");
        assert!(!e.contains("panicked"), "{a:?} panicked: {e}");
    }
    let o = phi4(&["tokenize", "--model", &tiny()], Some(b"\xc3\x28"));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("UTF-8"));
}

#[test]
fn chat_repl_answers_each_turn() {
    let o = phi4(
        &["chat", "--model", &tiny(), "--max-tokens", "4"],
        Some(b"Hello\n/reset\nAgain\n/exit\nnever read\n"),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // One answer line per user turn.
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 2);
}

#[test]
fn bench_times_the_quantized_kernels_alone() {
    let o = phi4(
        &[
            "bench",
            "--kernels",
            "--prompt-tokens",
            "2",
            "--runs",
            "1",
            "--json",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let products = v["products"].as_array().unwrap();
    // Four shapes in each of the six formats.
    assert_eq!(products.len(), 24);
    for f in ["q4", "q4m", "q5", "q5m", "q6", "q8"] {
        assert_eq!(
            products.iter().filter(|p| p["format"] == f).count(),
            4,
            "{f}"
        );
    }
    assert!(products.iter().all(|p| p["gmacs"].as_f64().unwrap() > 0.0));
    assert_eq!(v["activation_rows"], 2);
    let o = phi4(&["bench", "--kernels", "--synthetic"], None);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("cannot be used with"), "{}", stderr(&o));
}

#[test]
fn bench_runs_on_the_tiny_checkpoint() {
    let o = phi4(
        &[
            "bench",
            "--model",
            &tiny(),
            "--prompt-tokens",
            "16",
            "--gen-tokens",
            "4",
            "--runs",
            "1",
            "--kv-cache",
            "q8",
            "--bf16-acts",
            "bf16",
            "--json",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["kv_cache"], "q8");
    assert_eq!(v["bf16_acts"], "bf16");
    assert!(v["kv_cache_mb"].as_f64().unwrap() > 0.0);
    for k in [
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "time_to_first_token_ms",
        "decode_ceiling_tokens_per_s",
        "weight_read_gb_s",
        "decode_fraction_of_weight_read",
    ] {
        assert!(v[k].as_f64().unwrap() > 0.0, "{k}");
    }
}

#[test]
fn repo_id_is_found_in_the_local_hub_cache() {
    // The hub cache layout: models--{org}--{name}/refs/main -> snapshots/{commit}/files.
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--acme--tiny-phi4");
    let snap = repo.join("snapshots/0123456789abcdef");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123456789abcdef").unwrap();
    for e in std::fs::read_dir(tiny_dir()).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, snap.join(p.file_name().unwrap())).unwrap();
    }
    let o = phi4_env(
        &[
            "run",
            "--model",
            "acme/tiny-phi4",
            "--prompt",
            "Hi",
            "--max-tokens",
            "3",
            "--json",
        ],
        None,
        &[("HF_HUB_CACHE", cache.path())],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["generated_ids"].as_array().unwrap().len(), 3);
    // A repo that is not cached, offline: a clear message, no hang.
    let o = phi4_env(
        &["run", "--model", "acme/other", "--prompt", "Hi"],
        None,
        &[("HF_HUB_CACHE", cache.path())],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--model /path/to"), "{}", stderr(&o));
}

/// The reference's main test picture as a PNG file.
fn image_file(dir: &std::path::Path, w: usize, h: usize, ext: &str) -> String {
    let img = common::pattern_image(w, h);
    let path = dir.join(format!("pattern_{w}x{h}.{ext}"));
    image::RgbImage::from_raw(w as u32, h as u32, img.data)
        .unwrap()
        .save(&path)
        .unwrap();
    path.display().to_string()
}

#[test]
fn run_with_an_image_reproduces_the_reference_in_json() {
    let r = Reference::load_named("tiny-phi4mm");
    let dir = tempfile::tempdir().unwrap();
    let png = image_file(dir.path(), 500, 300, "png");
    let mm = common::tiny_mm_dir().display().to_string();
    let want = r.ids_at(&["modes", "image", "greedy_ids"]);
    let o = phi4(
        &[
            "run",
            "--model",
            &mm,
            "--image",
            &png,
            "--prompt",
            "Describe the image.",
            "--max-tokens",
            "6",
            "--temperature",
            "0",
            "--json",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let ids = |k: &str| json_ids(&v, k);
    assert_eq!(
        ids("prompt_ids"),
        r.ids_at(&["modes", "image", "prompt_ids"])
    );
    assert_eq!(ids("generated_ids"), want);
    // The chat REPL attaches an image to the next message.
    let script = format!("/image {png}\nDescribe the image.\n/exit\n");
    let o = phi4(
        &["chat", "--model", &mm, "--max-tokens", "2"],
        Some(script.as_bytes()),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 1);
    // Wrong inputs: a missing file, a file that is no image, an image for a text model.
    let bad = fails_with;
    bad(
        &[
            "run",
            "--model",
            &mm,
            "--image",
            "/nonexistent.png",
            "--prompt",
            "x",
        ],
        "/nonexistent.png",
    );
    let junk = dir.path().join("junk.png");
    std::fs::write(&junk, b"hello").unwrap();
    bad(
        &[
            "run",
            "--model",
            &mm,
            "--image",
            junk.to_str().unwrap(),
            "--prompt",
            "x",
        ],
        "unsupported image format",
    );
    bad(
        &["run", "--model", &tiny(), "--image", &png, "--prompt", "x"],
        "text only",
    );
    bad(
        &[
            "run",
            "--model",
            &mm,
            "--image",
            &png,
            "--prompt",
            "<|image_2|> x",
        ],
        "names <|image_2|> but carries 1 image",
    );
}

#[test]
fn transcribe_and_run_with_audio_reproduce_the_reference() {
    let r = Reference::load_named("tiny-phi4mm");
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("clip.wav");
    std::fs::write(&wav, common::clip_wav(&r, "main")).unwrap();
    let wav = wav.display().to_string();
    let mm = common::tiny_mm_dir().display().to_string();
    let want = r.ids_at(&["modes", "audio", "greedy_ids"]);
    // The built-in transcription prompt is the reference's audio prompt.
    let o = phi4(
        &[
            "transcribe",
            &wav,
            "--model",
            &mm,
            "--format",
            "verbose-json",
            "--max-tokens",
            &want.len().to_string(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["task"], "transcribe");
    assert!((v["duration"].as_f64().unwrap() - 3.0).abs() < 1e-9);
    let seg = &v["segments"][0];
    assert_eq!(json_ids(seg, "tokens"), want);
    assert_eq!(
        (seg["start"].as_f64(), seg["end"].as_f64()),
        (Some(0.0), Some(3.0))
    );
    assert_eq!(v["text"], seg["text"]);
    // Subtitles: one cue over the 3 s.
    let o = phi4(
        &[
            "transcribe",
            &wav,
            "--model",
            &mm,
            "--format",
            "srt",
            "--max-tokens",
            "2",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let srt = String::from_utf8(o.stdout).unwrap();
    assert!(
        srt.starts_with("1\n00:00:00,000 --> 00:00:03,000\n"),
        "{srt}"
    );
    let o = phi4(
        &[
            "transcribe",
            &wav,
            "--model",
            &mm,
            "--format",
            "vtt",
            "--max-tokens",
            "2",
            "--translate-to",
            "fr",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8(o.stdout)
        .unwrap()
        .starts_with("WEBVTT\n\n00:00:00.000 --> 00:00:03.000\n"));
    // run --audio with the same instruction: the same prompt and tokens.
    let o = phi4(
        &[
            "run",
            "--model",
            &mm,
            "--audio",
            &wav,
            "--prompt",
            "Transcribe the audio clip into text.",
            "--max-tokens",
            "6",
            "--json",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        json_ids(&v, "prompt_ids"),
        r.ids_at(&["modes", "audio", "prompt_ids"])
    );
    assert_eq!(json_ids(&v, "generated_ids"), want);
    // The chat REPL attaches an audio to the next message.
    let script = format!("/audio {wav}\nTranscribe the audio clip into text.\n/exit\n");
    let o = phi4(
        &["chat", "--model", &mm, "--max-tokens", "2"],
        Some(script.as_bytes()),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 1);
    // Wrong inputs.
    let bad = fails_with;
    bad(
        &["transcribe", "/nonexistent.wav", "--model", &mm],
        "/nonexistent.wav",
    );
    let junk = dir.path().join("junk.mp3");
    std::fs::write(&junk, b"hello").unwrap();
    bad(
        &["transcribe", junk.to_str().unwrap(), "--model", &mm],
        "not a supported audio file",
    );
    bad(
        &["transcribe", &wav, "--model", &mm, "--window-seconds", "50"],
        "between 1 and 40 seconds",
    );
    bad(&["transcribe", &wav, "--model", &tiny()], "text only");
    bad(
        &[
            "run",
            "--model",
            &mm,
            "--audio",
            &wav,
            "--prompt",
            "<|audio_2|>",
        ],
        "names <|audio_2|>",
    );
}

/// `phi4 quantize` without `--recipe` writes q5 (the default since it beat q4-edge in size and
/// KL) and says so in the metadata.
#[test]
fn quantize_defaults_to_q5() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("d").display().to_string();
    let r = phi4(&["quantize", "--model", &tiny(), "--out", &out], None);
    assert!(r.status.success(), "{}", stderr(&r));
    let bytes = std::fs::read(std::path::Path::new(&out).join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let h: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(h["__metadata__"]["phi4.recipe"], "q5");
    let kinds: Value =
        serde_json::from_str(h["__metadata__"]["phi4.quant"].as_str().unwrap()).unwrap();
    for (name, kind) in kinds.as_object().unwrap() {
        assert_eq!(kind["type"], "q5", "{name}");
    }
}

/// `phi4 quantize --calibration`: runs the float model over the text, records what it was
/// calibrated on in the checkpoint's metadata, changes the 4-bit scales (and not the 8-bit
/// ones), and the result loads and runs; bad calibration input is refused by name.
#[test]
fn quantize_with_calibration_records_it_and_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let t = tiny();
    let text = common::fixtures()
        .join("perplexity.txt")
        .display()
        .to_string();
    let out = |name: &str| dir.path().join(name).display().to_string();
    let quantize = |o: &str, extra: &[&str]| {
        let mut args = vec!["quantize", "--model", &t, "--out", o, "--recipe", "q4-edge"];
        args.extend_from_slice(extra);
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = phi4(&a, None);
        assert!(r.status.success(), "{a:?}: {}", stderr(&r));
        stderr(&r)
    };
    let (plain, cal) = (out("plain"), out("cal"));
    quantize(&plain, &[]);
    let log = quantize(
        &cal,
        &[
            "--calibration",
            &text,
            "--calibration-ctx",
            "64",
            "--calibration-windows",
            "3",
        ],
    );
    assert!(
        log.contains("calibrated on perplexity.txt: 192 tokens in windows of 64"),
        "{log}"
    );
    let header = |d: &str| {
        let bytes = std::fs::read(std::path::Path::new(d).join("model.safetensors")).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let h: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        (h, bytes)
    };
    let ((hp, bp), (hc, bc)) = (header(&plain), header(&cal));
    assert_eq!(
        hc["__metadata__"]["phi4.calibration"],
        "perplexity.txt: 192 tokens in windows of 64"
    );
    assert!(hp["__metadata__"].get("phi4.calibration").is_none());
    let span = |h: &Value, bytes: &[u8], name: &str| -> Vec<u8> {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let o = &h[name]["data_offsets"];
        let (a, b) = (
            o[0].as_u64().unwrap() as usize,
            o[1].as_u64().unwrap() as usize,
        );
        bytes[8 + n + a..8 + n + b].to_vec()
    };
    // q4-edge: qkv_proj is 4-bit (scales searched with the importances), down_proj 8-bit.
    let q4 = "model.layers.0.self_attn.qkv_proj.weight.scales";
    let q8 = "model.layers.0.mlp.down_proj.weight.scales";
    assert_ne!(
        span(&hp, &bp, q4),
        span(&hc, &bc, q4),
        "4-bit scales unchanged"
    );
    assert_eq!(
        span(&hp, &bp, q8),
        span(&hc, &bc, q8),
        "8-bit scales changed"
    );
    let r = phi4(
        &[
            "run",
            "--model",
            &cal,
            "--prompt",
            "Hello",
            "--max-tokens",
            "4",
        ],
        None,
    );
    assert!(r.status.success(), "{}", stderr(&r));

    // A mix chosen by measurement within a budget: a recipe (one format, or a mix of them),
    // recorded as such.
    let auto = out("auto");
    let r = phi4(
        &[
            "quantize",
            "--model",
            &t,
            "--out",
            &auto,
            "--calibration",
            &text,
            "--calibration-ctx",
            "64",
            "--mix-budget",
            "6",
        ],
        None,
    );
    let log = stderr(&r);
    assert!(r.status.success(), "{log}");
    // Each projection class measured band by band of layers (the tiny model's three layers: one
    // a band), the embeddings once.
    for class in ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] {
        for layer in 0..3 {
            assert!(
                log.contains(&format!("q4m+{class}@{layer}: mean KL")),
                "{log}"
            );
        }
    }
    assert!(log.contains("q4m+embed: mean KL"), "{log}");
    let (ha, _) = header(&auto);
    let chosen = ha["__metadata__"]["phi4.recipe"]
        .as_str()
        .unwrap()
        .to_string();
    let recipe = phi4::model::Recipe::parse(&chosen).unwrap();
    assert_eq!(recipe.name(), chosen);
    // The recorded recipe is what the matrices hold.
    let kinds: Value =
        serde_json::from_str(ha["__metadata__"]["phi4.quant"].as_str().unwrap()).unwrap();
    for (name, kind) in kinds.as_object().unwrap() {
        assert_eq!(kind["type"], recipe.qtype(name).name(), "{chosen}: {name}");
    }
    assert!(log.contains(&format!("chose {chosen}: mean KL")), "{log}");
    assert!(log.contains("predicted mean KL"), "{log}");

    // A mix: 4-bit but the classes named after `q4+`, recorded in the metadata.
    let mix = out("mix");
    let r = phi4(
        &[
            "quantize",
            "--model",
            &t,
            "--out",
            &mix,
            "--recipe",
            "q4+qkv_proj+embed",
        ],
        None,
    );
    assert!(r.status.success(), "{}", stderr(&r));
    let (hm, _) = header(&mix);
    assert_eq!(hm["__metadata__"]["phi4.recipe"], "q4+qkv_proj+embed");
    let kinds: Value =
        serde_json::from_str(hm["__metadata__"]["phi4.quant"].as_str().unwrap()).unwrap();
    for (name, want) in [
        ("model.layers.0.self_attn.qkv_proj.weight", "q8"),
        ("model.layers.0.self_attn.o_proj.weight", "q4"),
        ("model.layers.1.mlp.down_proj.weight", "q4"),
        ("model.layers.1.mlp.gate_up_proj.weight", "q4"),
        ("model.embed_tokens.weight", "q8"),
    ] {
        assert_eq!(kinds[name]["type"], want, "{name}");
    }

    let base = ["quantize", "--model", t.as_str(), "--recipe", "q4"];
    let short = out("short.txt");
    std::fs::write(&short, "A few words only.").unwrap();
    let o4 = out("o4");
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter()
            .chain(["--out", o4.as_str()].iter())
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (with(&["--calibration", "/no/such/text"]), "/no/such/text"),
        (
            with(&["--calibration", &text, "--calibration-windows", "0"]),
            "--calibration-windows must be at least 1",
        ),
        (
            with(&["--calibration", &text, "--calibration-ctx", "100000"]),
            "calibration windows of 100000 tokens",
        ),
        (
            with(&["--calibration", &short, "--calibration-ctx", "64"]),
            "a window of 64 needs at least that many",
        ),
        (with(&["--calibration-ctx", "64"]), "--calibration"),
        (
            vec!["quantize".into(), "--model".into(), t.clone(), "--out".into(), o4.clone(), "--mix-budget".into(), "6".into()],
            "the following required arguments were not provided:\n  --calibration",
        ),
        (with(&["--calibration", &text, "--mix-budget", "6"]), "'--recipe <RECIPE>' cannot be used with '--mix-budget <BITS>'"),
        (
            vec!["quantize".into(), "--model".into(), t.clone(), "--out".into(), o4.clone(), "--calibration".into(), text.clone(), "--mix-budget".into(), "4".into()],
            "--mix-budget must be at least 4.5 bits per weight",
        ),
        (
            vec!["quantize".into(), "--model".into(), t.clone(), "--out".into(), o4.clone(), "--recipe".into(), "q4+attn".into()],
            "unknown class \"attn\" in recipe \"q4+attn\"; the classes are qkv_proj, o_proj, gate_up_proj, down_proj, embed",
        ),
        (
            vec!["quantize".into(), "--model".into(), t.clone(), "--out".into(), o4.clone(), "--recipe".into(), "q4+down_proj@1-5:q6".into()],
            "recipe q4+down_proj@1-5:q6 names layer 5, but the model has 3 layers (0 to 2)",
        ),
    ];
    for (args, needle) in cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = phi4(&a, None);
        assert!(!o.status.success(), "{a:?} should fail");
        let e = stderr(&o);
        assert!(e.contains(needle), "{a:?}: {e}");
        assert!(!e.contains("panicked"), "{a:?} panicked: {e}");
    }
    fails_with(
        &[
            "run",
            "--model",
            &t,
            "--quant",
            "q8",
            "--quant-acts",
            "i4",
            "--prompt",
            "x",
        ],
        "unknown activation precision \"i4\" for quantized weights",
    );
}
