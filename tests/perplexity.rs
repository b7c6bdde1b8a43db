//! `phi4 perplexity` against transformers (scripts/make_perplexity_fixture.py: per-token
//! negative log-likelihoods of the tiny model over tests/fixtures/perplexity.txt, windows of 48
//! tokens on the short RoPE table and 96 on the long one), and its KL divergence against saved
//! base runs.

mod common;

use std::process::Command;

use phi4::engine::perplexity::{argmax, score, Tally};
use phi4::Engine;
use serde_json::Value;

fn reference() -> Value {
    let text = std::fs::read_to_string(common::fixtures().join("perplexity.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn text_path() -> String {
    common::fixtures()
        .join("perplexity.txt")
        .display()
        .to_string()
}

fn phi4(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_phi4"))
        .args(args)
        .output()
        .unwrap()
}

/// `phi4 perplexity --json` with `extra`; the figures.
fn run_json(extra: &[&str]) -> Value {
    let tiny = common::tiny_dir().display().to_string();
    let text = text_path();
    let mut args = vec!["perplexity", "--model", &tiny, "--file", &text, "--json"];
    args.extend_from_slice(extra);
    let o = phi4(&args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn every_scored_token_matches_transformers_on_both_rope_tables() {
    let r = reference();
    let e = Engine::load(&common::tiny_dir()).unwrap();
    let text = std::fs::read_to_string(text_path()).unwrap();
    let ids = e.tokenizer.encode(&text).unwrap();
    let want_ids: Vec<u32> = r["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids, want_ids);
    for ctx in [48usize, 96] {
        let run = &r["runs"][ctx.to_string()];
        let mut tally = Tally::default();
        let mut tops = Vec::new();
        let mut heads = Vec::new();
        for window in ids.chunks_exact(ctx) {
            let lp = e.window_logprobs(window).unwrap();
            score(&mut tally, window, &lp, None);
            tops.extend((0..lp.rows).map(|i| argmax(lp.row(i))));
            heads.push(lp.row(0)[..8].to_vec());
        }
        let want_nll: Vec<f64> = run["nll"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(tally.nll.len(), want_nll.len(), "ctx {ctx}");
        let worst = tally
            .nll
            .iter()
            .zip(&want_nll)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        // The suite's tolerance for logits against transformers (tests/parity.rs): 2e-4
        // absolute; a log-probability is a logit less the row's log-sum-exp.
        assert!(worst < 2e-4, "ctx {ctx}: NLL off by {worst}");
        let want_tops: Vec<usize> = run["top1"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(tops, want_tops, "ctx {ctx}: most likely tokens");
        for (w, (got, want)) in heads
            .iter()
            .zip(run["first_row_head"].as_array().unwrap())
            .enumerate()
        {
            for (g, x) in got.iter().zip(want.as_array().unwrap()) {
                assert!(
                    (*g as f64 - x.as_f64().unwrap()).abs() < 1e-4,
                    "ctx {ctx} window {w}"
                );
            }
        }
        // The command's summary: the same mean, and the window count.
        let s = run_json(&["--ctx", &ctx.to_string()]);
        let mean = run["mean_nll"].as_f64().unwrap();
        assert!(
            (s["mean_nll"]["value"].as_f64().unwrap() - mean).abs() < 1e-5,
            "{s}"
        );
        let ppl = s["perplexity"]["value"].as_f64().unwrap();
        assert!((ppl / run["perplexity"].as_f64().unwrap() - 1.0).abs() < 1e-4);
        assert_eq!(s["tokens"], run["scored"]);
        assert_eq!(s["windows"], run["windows"]);
        assert!(s["kl"].is_null());
    }
}

#[test]
fn kl_divergence_against_a_saved_base_run() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.lp");
    let base_s = base.display().to_string();
    let f32_run = run_json(&["--ctx", "48", "--save-logits", &base_s]);
    assert!(f32_run["kl"].is_null());
    // Against itself: nothing lost but the f16 storage.
    let same = run_json(&["--ctx", "48", "--kl-base", &base_s]);
    let kl = &same["kl"];
    assert!(kl["max"].as_f64().unwrap() < 1e-5, "{kl}");
    assert_eq!(kl["same_top"], 1.0);
    // Quantized: some loss, more at 4 bits than at 8.
    let q8 = run_json(&["--ctx", "48", "--quant", "q8", "--kl-base", &base_s]);
    let q4 = run_json(&["--ctx", "48", "--quant", "q4", "--kl-base", &base_s]);
    let mean = |v: &Value| v["kl"]["mean"]["value"].as_f64().unwrap();
    assert!(mean(&q8) > 1e-4 && mean(&q8) < 0.3, "{q8}");
    assert!(mean(&q4) > 3.0 * mean(&q8), "q4 {q4} vs q8 {q8}");
    assert!(q8["kl"]["same_top"].as_f64().unwrap() > 0.7, "{q8}");
    let p99 = q8["kl"]["p99"].as_f64().unwrap();
    let median = q8["kl"]["median"].as_f64().unwrap();
    assert!(median <= mean(&q8) && mean(&q8) <= p99 && p99 <= q8["kl"]["max"].as_f64().unwrap());
}

#[test]
fn mismatched_or_damaged_bases_and_short_texts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.lp");
    let base_s = base.display().to_string();
    run_json(&[
        "--ctx",
        "48",
        "--max-windows",
        "3",
        "--save-logits",
        &base_s,
    ]);
    let tiny = common::tiny_dir().display().to_string();
    let text = text_path();
    let fails = |extra: &[&str], file: &str, needle: &str| {
        let mut args = vec!["perplexity", "--model", &tiny, "--file", file];
        args.extend_from_slice(extra);
        let o = phi4(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    };
    fails(
        &["--ctx", "96", "--max-windows", "3", "--kl-base", &base_s],
        &text,
        "--ctx 48",
    );
    fails(
        &["--ctx", "48", "--max-windows", "2", "--kl-base", &base_s],
        &text,
        "different text",
    );
    let other = dir.path().join("other.txt");
    std::fs::write(
        &other,
        std::fs::read_to_string(&text)
            .unwrap()
            .replace("keeper", "warden"),
    )
    .unwrap();
    let other_s = other.display().to_string();
    fails(
        &["--ctx", "48", "--max-windows", "3", "--kl-base", &base_s],
        &other_s,
        "different text",
    );
    let bytes = std::fs::read(&base).unwrap();
    let cut = dir.path().join("cut.lp");
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    let cut_s = cut.display().to_string();
    fails(
        &["--ctx", "48", "--max-windows", "3", "--kl-base", &cut_s],
        &text,
        "truncated or damaged",
    );
    fails(
        &["--ctx", "48", "--kl-base", &text],
        &text,
        "not a base log-probability file",
    );
    fails(
        &["--ctx", "48", "--save-logits", "x", "--kl-base", &base_s],
        &text,
        "cannot be used with",
    );
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "a few words only").unwrap();
    fails(
        &["--ctx", "48"],
        &short.display().to_string(),
        "needs at least",
    );
    fails(&["--ctx", "4"], &text, "at least 8");
    fails(
        &["--ctx", "100000"],
        &text,
        "longer than the model's context",
    );
    fails(
        &["--ctx", "48"],
        "/no/such/file.txt",
        "reading /no/such/file.txt",
    );
}
