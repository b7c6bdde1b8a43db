//! Helpers shared by the integration tests: fixture paths and reference tensors.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use phi4::weights::open_safetensors;

pub mod http;
pub mod lora;
pub mod o200k;
pub mod raw;
pub mod venv;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn tiny_dir() -> PathBuf {
    fixtures().join("tiny-phi4")
}

/// The tiny Phi-4-multimodal in transformers' native layout (scripts/make_mm_fixtures.py).
pub fn tiny_mm_dir() -> PathBuf {
    fixtures().join("tiny-phi4mm")
}

/// The same weights in Microsoft's remote-code layout.
pub fn tiny_mm_remote_dir() -> PathBuf {
    fixtures().join("tiny-phi4mm-remote")
}

/// The test picture of scripts/make_mm_fixtures.py (`pattern_image`), interleaved RGB.
pub fn pattern_image(w: usize, h: usize) -> phi4::media::RgbImage {
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h as i64 {
        for x in 0..w as i64 {
            let hsh = (x * 73856093) ^ (y * 19349663);
            let r = (x * 255 / (w as i64 - 1).max(1) + (hsh & 31)) & 255;
            let g = (y * 255 / (h as i64 - 1).max(1) + ((hsh >> 5) & 15)) & 255;
            let b = ((((x >> 4) + (y >> 4)) & 1) * 180 + ((hsh >> 9) & 63)) & 255;
            data.extend([r as u8, g as u8, b as u8]);
        }
    }
    phi4::media::RgbImage::new(w, h, data).unwrap()
}

/// transformers' outputs on the tiny checkpoint (written by scripts/make_fixtures.py).
pub struct Reference {
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub meta: serde_json::Value,
}

impl Reference {
    pub fn load() -> Reference {
        Self::load_named("tiny-phi4")
    }

    /// `tests/fixtures/{name}-reference.{safetensors,json}`.
    pub fn load_named(name: &str) -> Reference {
        let tensors = open_safetensors(&fixtures().join(format!("{name}-reference.safetensors")))
            .unwrap()
            .into_iter()
            .map(|(k, t)| (k, (t.shape.clone(), t.to_f32_vec())))
            .collect();
        let meta = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join(format!("{name}-reference.json"))).unwrap(),
        )
        .unwrap();
        Reference { tensors, meta }
    }

    pub fn tensor(&self, name: &str) -> &[f32] {
        &self
            .tensors
            .get(name)
            .unwrap_or_else(|| panic!("no reference {name}"))
            .1
    }

    /// Token ids at a JSON path of the metadata.
    pub fn ids_at(&self, path: &[&str]) -> Vec<u32> {
        let mut v = &self.meta;
        for k in path {
            v = &v[*k];
        }
        v.as_array()
            .unwrap_or_else(|| panic!("no {path:?}"))
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    }

    pub fn ids(&self, case: &str, key: &str) -> Vec<u32> {
        self.meta[case][key]
            .as_array()
            .unwrap_or_else(|| panic!("no {case}.{key}"))
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    }
}

/// Largest absolute difference, asserting equal lengths.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `max |a − b| / max |b|`, the scale-free error the multimodal tolerances are written in.
pub fn rel(a: &[f32], b: &[f32]) -> f32 {
    let m = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    max_abs_diff(a, b) / m
}

/// A Phi-4-multimodal directory loaded as a model (no engine around it).
pub fn load_mm(dir: &std::path::Path) -> phi4::model::phi4mm::Phi4MMForCausalLM {
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cfg = phi4::config::multimodal::Phi4MMConfig::from_json(&text).unwrap();
    phi4::model::phi4mm::Phi4MMForCausalLM::load_dir(dir, cfg, None, &mut |_| {}).unwrap()
}

/// The pictures of a reference mode of tiny-phi4mm (sizes in its metadata).
pub fn mode_images(r: &Reference, mode: &str) -> Vec<phi4::media::RgbImage> {
    r.meta["modes"][mode]["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|wh| {
            let wh: Vec<usize> = wh
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            pattern_image(wh[0], wh[1])
        })
        .collect()
}

/// The audios of a reference mode of tiny-phi4mm (clip names in its metadata), 16 kHz.
pub fn mode_audios(r: &Reference, mode: &str) -> Vec<phi4::media::Waveform> {
    r.meta["modes"][mode]["audios"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|name| {
            let c = &r.meta["audio"]["clips"][name.as_str().unwrap()];
            phi4::media::Waveform {
                samples: synth_wave(
                    c["samples"].as_u64().unwrap() as usize,
                    c["seed"].as_u64().unwrap() as u32,
                ),
            }
        })
        .collect()
}

/// Runs a reference mode's prompt with its images and audios through `e` and checks the prompt
/// ids and the greedy continuation against transformers'.
pub fn check_mode_greedy(e: &phi4::Engine, r: &Reference, mode: &str) {
    let prompt = r.meta["modes"][mode]["prompt"].as_str().unwrap();
    let (ids, media) = e
        .encode_with_media(prompt, &mode_images(r, mode), &mode_audios(r, mode))
        .unwrap();
    assert_eq!(ids, r.ids_at(&["modes", mode, "prompt_ids"]), "{mode}");
    let want = r.ids_at(&["modes", mode, "greedy_ids"]);
    let params = phi4::SamplingParams::greedy(want.len());
    let out = e
        .generate_media(&ids, media, &params, &mut |_| true)
        .unwrap();
    assert_eq!(out.generated_ids, want, "{mode}");
}

/// The test clip generator of scripts/make_mm_fixtures.py (`synth_pcm`), integer for integer:
/// xorshift32 noise and a triangle tone under a triangle envelope, a pause every 2.5 s.
pub fn synth_pcm(n: usize, seed: u32) -> Vec<i16> {
    let mut state = seed;
    (0..n as i64)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let noise = (state >> 16) as i64 - 32768;
            let k = i % 37;
            let tone = (if k < 19 { k } else { 37 - k }) * 1200 - 10800;
            let e = i % 8000;
            let env = if i % 40000 >= 35200 {
                0
            } else {
                (if e < 4000 { e } else { 8000 - e }) / 4
            };
            // Python's floor division, for negative numerators too.
            let v = (noise.div_euclid(4) + tone) * env;
            let v = v.div_euclid(1000) + noise.div_euclid(256);
            v.clamp(-32768, 32767) as i16
        })
        .collect()
}

/// `synth_pcm` as the float waveform the reference's extractor was given.
pub fn synth_wave(n: usize, seed: u32) -> Vec<f32> {
    synth_pcm(n, seed)
        .into_iter()
        .map(|s| s as f32 / 32768.0)
        .collect()
}

/// A 16-bit mono PCM WAV file of `samples` at `rate`.
pub fn wav_bytes(samples: &[i16], rate: u32) -> Vec<u8> {
    let data = samples.len() as u32 * 2;
    let mut out = Vec::with_capacity(44 + data as usize);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * 2).to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data.to_le_bytes());
    for s in samples {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}

/// The reference's clip `name` of tiny-phi4mm as a WAV file's bytes.
pub fn clip_wav(r: &Reference, name: &str) -> Vec<u8> {
    let c = &r.meta["audio"]["clips"][name];
    wav_bytes(
        &synth_pcm(
            c["samples"].as_u64().unwrap() as usize,
            c["seed"].as_u64().unwrap() as u32,
        ),
        16000,
    )
}
