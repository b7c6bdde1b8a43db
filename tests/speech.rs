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

/// Amplitude of the `freq` Hz component of 16 kHz samples (a least-squares sine/cosine fit).
fn tone_amplitude(x: &[f32], freq: f64) -> f64 {
    let w = 2.0 * std::f64::consts::PI * freq / 16000.0;
    let (mut s, mut c) = (0f64, 0f64);
    for (i, &v) in x.iter().enumerate() {
        s += f64::from(v) * (w * i as f64).sin();
        c += f64::from(v) * (w * i as f64).cos();
    }
    2.0 * (s * s + c * c).sqrt() / x.len() as f64
}

fn rms(x: &[f32]) -> f64 {
    (x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / x.len() as f64).sqrt()
}

#[test]
fn every_supported_format_decodes_mixes_down_and_resamples() {
    use phi4::media::audio;
    let dir = common::fixtures().join("audio");
    // (file, rate, channels, amplitude tolerance): lossless files within quantization, lossy ones
    // within their codec's error. Every file holds 0.4 s of 440 Hz that mixes down to 0.4.
    for (file, rate, channels, tol) in [
        ("u8_8000_mono.wav", 8000, 1, 0.01),
        ("s16_16000_mono.wav", 16000, 1, 1e-3),
        ("s24_11025_stereo.wav", 11025, 2, 1e-3),
        ("s32_8000_mono.wav", 8000, 1, 1e-3),
        ("f32_22050_mono.wav", 22050, 1, 1e-3),
        ("flac_44100_stereo.flac", 44100, 2, 1e-3),
        ("mp3_44100_stereo.mp3", 44100, 2, 0.03),
        ("vorbis_48000_stereo.ogg", 48000, 2, 0.03),
        ("aac_48000_mono.m4a", 48000, 1, 0.03),
    ] {
        let bytes = std::fs::read(dir.join(file)).unwrap();
        let ext = file.rsplit('.').next();
        let d = audio::decode(&bytes, ext, 60.0).unwrap_or_else(|e| panic!("{file}: {e:#}"));
        assert_eq!((d.rate, d.channels), (rate, channels), "{file}");
        // Encoders add priming/padding frames; the tone itself is 0.4 s.
        assert!(
            (d.seconds() - 0.4).abs() < 0.06,
            "{file}: {} s decoded",
            d.seconds()
        );
        // No hint: the content alone decides.
        assert_eq!(
            audio::decode(&bytes, None, 60.0).unwrap().frames(),
            d.frames()
        );
        let w = audio::load(&bytes, ext, 60.0).unwrap();
        assert!(
            (w.seconds() - d.seconds()).abs() < 2e-3,
            "{file}: length kept"
        );
        // The middle of the clip (away from encoder fades): a 0.4-amplitude 440 Hz tone.
        let mid = &w.samples[w.samples.len() / 4..w.samples.len() * 3 / 4];
        let amp = tone_amplitude(mid, 440.0);
        assert!((amp - 0.4).abs() < tol, "{file}: tone amplitude {amp}");
        // And nothing else: the residual is small.
        let resid = (rms(mid).powi(2) - amp * amp / 2.0).max(0.0).sqrt();
        assert!(resid < 0.02 + tol, "{file}: residual rms {resid}");
    }
}

#[test]
fn resampler_keeps_the_speech_band_and_removes_what_16k_cannot_hold() {
    use phi4::media::audio::resample_to_16k;
    for rate in [8000u32, 11025, 22050, 32000, 44100, 48000, 96000] {
        let n = rate as usize; // one second
        let sine = |f: f64, a: f32| -> Vec<f32> {
            (0..n)
                .map(|i| a * (2.0 * std::f64::consts::PI * f * i as f64 / rate as f64).sin() as f32)
                .collect()
        };
        let nyquist_in = rate as f64 / 2.0;
        // In-band tones keep their amplitude (±0.5 %), the length is exact to a sample.
        for f in [100.0, 440.0, 1000.0, 3000.0, 6000.0, 7000.0] {
            if f >= nyquist_in * 0.9 {
                continue;
            }
            let out = resample_to_16k(&sine(f, 0.5), rate).unwrap();
            assert!(
                out.len().abs_diff(16000) <= 1,
                "{rate} Hz: {} samples",
                out.len()
            );
            let amp = tone_amplitude(&out[2000..14000], f);
            assert!(
                (amp - 0.5).abs() < 2.5e-3,
                "{rate} Hz: {f} Hz tone at {amp}"
            );
        }
        // Tones above 8 kHz are removed, not folded back into the band.
        for f in [8500.0, 10000.0, 15000.0, 20000.0] {
            if f >= nyquist_in * 0.95 {
                continue;
            }
            let out = resample_to_16k(&sine(f, 0.5), rate).unwrap();
            let r = rms(&out[2000..14000]);
            assert!(r < 1e-3, "{rate} Hz: {f} Hz leaves rms {r}");
        }
    }
}

#[test]
fn bad_audio_is_refused_with_a_reason() {
    use phi4::media::audio;
    let err = |bytes: &[u8]| format!("{:#}", audio::decode(bytes, None, 60.0).unwrap_err());
    assert!(err(b"").contains("empty"));
    assert!(err(b"hello, this is not audio at all").contains("not a supported audio file"));
    let good = std::fs::read(common::fixtures().join("audio/s16_16000_mono.wav")).unwrap();
    // A header with its data cut off: what remains decodes, nothing at all is an error.
    let cut = err(&good[..44]);
    assert!(
        cut.contains("no samples") || cut.contains("could not be read"),
        "{cut}"
    );
    let e = format!("{:#}", audio::decode(&good, None, 0.1).unwrap_err());
    assert!(e.contains("longer than the limit"), "{e}");
    let png = std::fs::read(common::fixtures().join("../../README.md")).unwrap_or_default();
    if !png.is_empty() {
        assert!(err(&png).contains("not a supported"));
    }
}

/// A reference mode through the engine's encoders and decoder: every position's logits.
fn engine_logits(e: &phi4::Engine, r: &Reference, mode: &str) -> Vec<f32> {
    use phi4::model::{BatchItem, Logits};
    let prompt = r.meta["modes"][mode]["prompt"].as_str().unwrap();
    let (ids, media) = e
        .encode_with_media(
            prompt,
            &common::mode_images(r, mode),
            &common::mode_audios(r, mode),
        )
        .unwrap();
    assert_eq!(ids, r.ids_at(&["modes", mode, "prompt_ids"]), "{mode} ids");
    let media = media.unwrap();
    let want_adapter = match r.meta["modes"][mode]["adapter"].as_str() {
        Some("vision") => Some(phi4::model::phi4mm::VISION),
        Some("speech") => Some(phi4::model::phi4mm::SPEECH),
        _ => None,
    };
    assert_eq!(media.adapter, want_adapter, "{mode} adapter");
    let m = &e.model;
    let mut cache = m.new_cache();
    let item = BatchItem {
        embeds: Some(&media.embeds),
        adapter: media.adapter,
        ..BatchItem::new(&ids, &mut cache, m.rope.table_for_len(ids.len()))
    };
    let mut logits = Vec::new();
    m.forward_item(item, Logits::All, None, &mut logits)
        .unwrap();
    logits
}

#[test]
fn audio_prompts_match_transformers_with_the_speech_or_vision_route() {
    let r = reference();
    for dir in [common::tiny_mm_dir(), common::tiny_mm_remote_dir()] {
        let e = phi4::Engine::load(&dir).unwrap();
        let v = e.model.config.vocab_size;
        // Audio alone: speech adapter, speech projection; every position.
        let got = engine_logits(&e, &r, "audio");
        let d = rel(&got, r.tensor("mode.audio.logits"));
        assert!(d < 1e-4, "audio logits differ by {d}");
        // Image and audio: vision adapter, vision-speech projection; the last position.
        let got = engine_logits(&e, &r, "image_audio");
        let d = rel(
            &got[got.len() - v..],
            r.tensor("mode.image_audio.logits_last"),
        );
        assert!(d < 1e-4, "image+audio logits differ by {d}");
        for mode in ["audio", "image_audio"] {
            common::check_mode_greedy(&e, &r, mode);
        }
    }
}

#[test]
fn long_audio_is_cut_in_its_pauses_and_each_window_transcribed() {
    use phi4::engine::{SpeechOptions, SpeechTask};
    let r = reference();
    let e = phi4::Engine::load(&common::tiny_mm_dir()).unwrap();
    let wave = phi4::media::Waveform {
        samples: clip(&r, "long"),
    };
    let mut opts = SpeechOptions::new(SpeechTask::Transcribe);
    opts.params = phi4::SamplingParams::greedy(2);
    let t = e.transcribe(&wave, &opts).unwrap();
    // 41 s in windows of at most 30 s: two, the cut inside one of the clip's pauses (the last
    // 0.3 s of every 2.5 s: samples 35200..40000 mod 40000) in the window's last third.
    assert_eq!(t.segments.len(), 2, "{:?}", t.segments);
    let cut = t.segments[0].end;
    assert!((20.0..=30.0).contains(&cut), "cut at {cut} s");
    let at = (cut * 16000.0).round() as usize % 40000;
    assert!(
        (35200..40000).contains(&at),
        "cut at {cut} s is not in a pause"
    );
    assert_eq!(t.segments[1].start, cut);
    assert!((t.segments[1].end - 41.0).abs() < 1e-9);
    assert!(t.segments.iter().all(|s| s.tokens.len() == 2));
    // A window's tokens are those of that piece of audio transcribed alone.
    let piece = phi4::media::Waveform {
        samples: wave.samples[..(cut * 16000.0).round() as usize].to_vec(),
    };
    assert_eq!(
        e.transcribe(&piece, &opts).unwrap().segments[0].tokens,
        t.segments[0].tokens
    );
    // A summary takes the recording whole; the windows are bounded by the encoder's 40 s.
    let mut sum = SpeechOptions::new(SpeechTask::Summarize);
    sum.params = phi4::SamplingParams::greedy(1);
    assert_eq!(e.transcribe(&wave, &sum).unwrap().segments.len(), 1);
    opts.window_seconds = 41.0;
    assert!(e.transcribe(&wave, &opts).is_err());
}
