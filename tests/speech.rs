//! Phi-4-multimodal's speech path against transformers 5.25 (scripts/make_mm_fixtures.py): the
//! log-mel features, the Conformer encoder (one window and past the 500-frame chunk), both
//! projections; and the audio front end (decoding every supported format, mixdown, resampling).

mod common;

use common::{max_abs_diff, synth_wave, Reference};
use phi4::config::multimodal::Phi4MMConfig;
use phi4::media::log_mel::{self, LogMel};
use phi4::model::phi4mm::audio_embed::Projection;
use phi4::model::phi4mm::Phi4MMForCausalLM;

fn reference() -> Reference {
    Reference::load_named("tiny-phi4mm")
}

fn load_mm(dir: &std::path::Path) -> Phi4MMForCausalLM {
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cfg = Phi4MMConfig::from_json(&text).unwrap();
    Phi4MMForCausalLM::load_dir(dir, cfg, None, &mut |_| {}).unwrap()
}

fn clip(r: &Reference, name: &str) -> Vec<f32> {
    let c = &r.meta["audio"]["clips"][name];
    synth_wave(
        c["samples"].as_u64().unwrap() as usize,
        c["seed"].as_u64().unwrap() as u32,
    )
}

/// `max |a − b| / max |b|`.
fn rel(a: &[f32], b: &[f32]) -> f32 {
    let m = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    max_abs_diff(a, b) / m
}

#[test]
fn mel_bank_frame_count_and_token_count_match_transformers() {
    let r = reference();
    let want = r.tensor("audio.mel_filters");
    let got = log_mel::mel_filters();
    assert_eq!(got.len(), want.len());
    assert!(
        max_abs_diff(&got, want) <= 1e-7,
        "{}",
        max_abs_diff(&got, want)
    );
    // The HF bank's one entry beyond the remote code's: FFT bin 246 in filter 79 (spec §3.5).
    assert!(got[246 * 80 + 79] > 0.009 && got[246 * 80 + 79] < 0.0098);
    for (name, c) in r.meta["audio"]["clips"].as_object().unwrap() {
        let n = c["samples"].as_u64().unwrap() as usize;
        assert_eq!(
            log_mel::num_frames(n),
            c["frames"].as_u64().unwrap() as usize,
            "{name}"
        );
        assert_eq!(
            log_mel::num_tokens(n),
            c["tokens"].as_u64().unwrap() as usize,
            "{name}"
        );
    }
    // The spec's table (16 kHz): 1 s → 98 frames, 13 tokens; 30 s → 375; 40 s → 500.
    assert_eq!(
        (log_mel::num_frames(16000), log_mel::num_tokens(16000)),
        (98, 13)
    );
    assert_eq!(log_mel::num_tokens(30 * 16000), 375);
    assert_eq!(log_mel::num_tokens(40 * 16000), 500);
    assert_eq!(log_mel::num_frames(399), 0);
}

#[test]
fn log_mel_features_match_transformers() {
    let r = reference();
    let lm = LogMel::new();
    let stride = r.meta["audio"]["long_feature_stride"].as_u64().unwrap() as usize;
    for name in ["short", "main", "long"] {
        let wave = clip(&r, name);
        let got = lm.features(&wave);
        let frames = r.meta["audio"]["clips"][name]["frames"].as_u64().unwrap() as usize;
        assert_eq!(got.len(), frames * 80, "{name}");
        let (got, want) = if name == "long" {
            let rows: Vec<f32> = got.chunks(80).step_by(stride).flatten().copied().collect();
            (rows, r.tensor("audio.long.features_rows").to_vec())
        } else {
            (got, r.tensor(&format!("audio.{name}.features")).to_vec())
        };
        let d = max_abs_diff(&got, &want);
        // ln of f32 energies: the f64 FFT rounded to complex64 as the reference does leaves the
        // f32 mel product's summation order as the only difference.
        assert!(d <= 1e-5, "{name}: features differ by {d}");
    }
}

#[test]
fn conformer_encoder_and_projections_match_transformers() {
    let r = reference();
    let m = load_mm(&common::tiny_mm_dir());
    let a = m
        .audio_embed
        .as_ref()
        .expect("the fixture has a speech encoder");
    let lm = LogMel::new();
    for name in ["short", "main", "long"] {
        let feats = lm.features(&clip(&r, name));
        let sub = a.encoder.subsample(&feats);
        if name == "main" {
            let e = rel(&sub, r.tensor("audio.main.subsampled"));
            assert!(e < 1e-5, "subsampling: rel err {e}");
        }
        let enc = a.encoder.blocks_forward(&sub);
        let want = r.tensor(&format!("audio.{name}.encoder_out"));
        assert_eq!(enc.len(), want.len(), "{name}");
        let e = rel(&enc, want);
        assert!(e < 1e-5, "{name}: encoder rel err {e}");
        if name == "main" {
            for (p, key) in [
                (Projection::Speech, "audio.main.embeds_speech"),
                (Projection::VisionSpeech, "audio.main.embeds_vision_speech"),
            ] {
                let got = a.project(&enc, p);
                let e = rel(&got, r.tensor(key));
                assert!(e < 1e-4, "{key}: rel err {e}");
            }
        }
    }
    // The remote layout's renamed tensors load to the same encoder.
    let remote = load_mm(&common::tiny_mm_remote_dir());
    let feats = lm.features(&clip(&r, "main"));
    assert_eq!(
        remote
            .embed_audio(&feats, Projection::VisionSpeech)
            .unwrap(),
        m.embed_audio(&feats, Projection::VisionSpeech).unwrap()
    );
}
