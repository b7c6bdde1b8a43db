//! Phi-4-multimodal's speech path against transformers 5.25 (scripts/make_mm_fixtures.py): the
//! log-mel features, the Conformer encoder (one window and past the 500-frame chunk), both
//! projections; and the audio front end (decoding every supported format, mixdown, resampling).

mod common;

use common::{load_mm, max_abs_diff, rel, synth_wave, Reference};
use phi4::media::log_mel::{self, LogMel};
use phi4::model::phi4mm::audio_embed::Projection;

fn reference() -> Reference {
    Reference::load_named("tiny-phi4mm")
}

fn clip(r: &Reference, name: &str) -> Vec<f32> {
    let c = &r.meta["audio"]["clips"][name];
    synth_wave(
        c["samples"].as_u64().unwrap() as usize,
        c["seed"].as_u64().unwrap() as u32,
    )
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
    // The windows decode together; each one's tokens are those of its piece transcribed alone.
    opts.params = phi4::SamplingParams::greedy(5);
    let t = e.transcribe(&wave, &opts).unwrap();
    for s in &t.segments {
        let (a, b) = (
            (s.start * 16000.0).round() as usize,
            (s.end * 16000.0).round() as usize,
        );
        let piece = phi4::media::Waveform {
            samples: wave.samples[a..b].to_vec(),
        };
        assert_eq!(
            e.transcribe(&piece, &opts).unwrap().segments[0].tokens,
            s.tokens
        );
    }
    // A summary takes the recording whole; the windows are bounded by the encoder's 40 s.
    let mut sum = SpeechOptions::new(SpeechTask::Summarize);
    sum.params = phi4::SamplingParams::greedy(1);
    assert_eq!(e.transcribe(&wave, &sum).unwrap().segments.len(), 1);
    opts.window_seconds = 41.0;
    assert!(e.transcribe(&wave, &opts).is_err());
}

mod server {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request as HttpRequest, StatusCode};
    use http_body_util::BodyExt;
    use phi4::engine::{BatcherConfig, LocalMedia, MediaLimits};
    use phi4::server::{engine_router, ServerOptions};
    use serde_json::{json, Value};
    use std::sync::Arc;
    use tower::ServiceExt;

    fn app_with(limits: MediaLimits, max_body_bytes: usize) -> axum::Router {
        let mut e = phi4::Engine::load(&common::tiny_mm_dir()).unwrap();
        e.mm.as_mut().unwrap().limits = limits;
        engine_router(
            Arc::new(e),
            BatcherConfig::default(),
            ServerOptions {
                max_body_bytes,
                ..Default::default()
            },
        )
    }

    fn app() -> axum::Router {
        app_with(
            MediaLimits {
                local: LocalMedia::Denied,
                ..MediaLimits::default()
            },
            32 << 20,
        )
    }

    async fn send(app: &axum::Router, req: HttpRequest<Body>) -> (StatusCode, String, Vec<u8>) {
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let ctype = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, ctype, bytes.to_vec())
    }

    async fn chat(app: &axum::Router, parts: Value) -> (StatusCode, Value) {
        let body = json!({"model": "phi4", "temperature": 0, "max_tokens": 6,
                          "messages": [{"role": "user", "content": parts}]});
        let req = HttpRequest::builder()
            .method("POST")
            .uri("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let (s, _, b) = send(app, req).await;
        (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
    }

    fn b64(bytes: &[u8]) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    /// A multipart/form-data body: (name, filename, bytes) per field.
    fn multipart(fields: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
        let boundary = "phi4-test-boundary-7d1f";
        let mut body = Vec::new();
        for (name, file, value) in fields {
            body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
            match file {
                Some(f) => body.extend_from_slice(
                    format!(
                        "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                    )
                    .as_bytes(),
                ),
                None => body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
                ),
            }
            body.extend_from_slice(value);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        (format!("multipart/form-data; boundary={boundary}"), body)
    }

    async fn audio_api(
        app: &axum::Router,
        path: &str,
        fields: &[(&str, Option<&str>, &[u8])],
    ) -> (StatusCode, String, Vec<u8>) {
        let (ctype, body) = multipart(fields);
        let req = HttpRequest::builder()
            .method("POST")
            .uri(path)
            .header("content-type", ctype)
            .body(Body::from(body))
            .unwrap();
        send(app, req).await
    }

    fn greedy_text(r: &Reference, mode: &str) -> String {
        let e = phi4::Engine::load(&common::tiny_mm_dir()).unwrap();
        e.tokenizer
            .decode(&r.ids_at(&["modes", mode, "greedy_ids"]), true)
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chat_audio_parts_answer_like_the_reference() {
        let r = reference();
        let app = app();
        let wav = common::clip_wav(&r, "main");
        let text = json!({"type": "text", "text": "Transcribe the audio clip into text."});
        let (s, v) = chat(
            &app,
            json!([{"type": "input_audio", "input_audio": {"data": b64(&wav), "format": "wav"}}, text]),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(
            v["usage"]["prompt_tokens"],
            r.ids_at(&["modes", "audio", "prompt_ids"]).len()
        );
        assert_eq!(
            v["choices"][0]["message"]["content"],
            greedy_text(&r, "audio")
        );
        // The same audio as an audio_url data: URL.
        let url = format!("data:audio/wav;base64,{}", b64(&wav));
        let (s, v2) = chat(
            &app,
            json!([{"type": "audio_url", "audio_url": {"url": url}}, text]),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v2}");
        assert_eq!(
            v2["choices"][0]["message"]["content"],
            v["choices"][0]["message"]["content"]
        );
        // Image and audio in one prompt: vision adapter, vision-speech projection.
        let png = {
            let img = common::pattern_image(500, 300);
            let mut out = Vec::new();
            image::RgbImage::from_raw(500, 300, img.data)
                .unwrap()
                .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
                .unwrap();
            out
        };
        let (s, v) = chat(
            &app,
            json!([
                {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", b64(&png))}},
                {"type": "input_audio", "input_audio": {"data": b64(&wav), "format": "wav"}},
                {"type": "text", "text": "Answer the question in the audio."}
            ]),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(
            v["choices"][0]["message"]["content"],
            greedy_text(&r, "image_audio")
        );
        // Bad audio parts are 400s that say why.
        for (part, needle) in [
            (
                json!({"type": "input_audio", "input_audio": {"data": "@@@", "format": "wav"}}),
                "base64",
            ),
            (
                json!({"type": "input_audio", "input_audio": {"data": b64(b"not audio"), "format": "mp3"}}),
                "not a supported audio file",
            ),
            (
                json!({"type": "input_audio", "input_audio": {"format": "wav"}}),
                "data",
            ),
            (
                json!({"type": "audio_url", "audio_url": {"url": "https://example.com/a.wav"}}),
                "--allow-remote-media",
            ),
            (
                json!({"type": "audio_url", "audio_url": {"url": "/etc/hostname"}}),
                "--allowed-local-media-path",
            ),
            (
                json!({"type": "input_audio", "input_audio": {"data": b64(&wav[..100]), "format": "wav"}}),
                "too short",
            ),
        ] {
            let (s, v) = chat(&app, json!([part, text])).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{needle}: {v}");
            let msg = v["error"]["message"].as_str().unwrap_or_default();
            assert!(msg.contains(needle), "wanted {needle:?} in {msg:?}");
        }
    }

    /// A transcription that runs into the request time limit (or the drain's end) answers with
    /// what it has: a prefix of the uncut transcript, never a hang or an error.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cut_transcription_returns_its_text_so_far() {
        let r = reference();
        let wav = common::clip_wav(&r, "main");
        let fields: &[(&str, Option<&str>, &[u8])] = &[
            ("file", Some("clip.wav"), &wav),
            ("model", None, b"phi4"),
            ("response_format", None, b"text"),
        ];
        let (s, _, full) = audio_api(&app(), "/v1/audio/transcriptions", fields).await;
        assert_eq!(s, StatusCode::OK);
        let full = String::from_utf8(full).unwrap();
        assert!(!full.trim().is_empty());
        let make = |timeout_ms: u64| {
            let e = phi4::Engine::load(&common::tiny_mm_dir()).unwrap();
            let opts = ServerOptions {
                request_timeout: Some(std::time::Duration::from_millis(timeout_ms)),
                ..Default::default()
            };
            let status = opts.status.clone();
            (
                engine_router(Arc::new(e), BatcherConfig::default(), opts),
                status,
            )
        };
        for timeout_ms in [0, 20] {
            let (app, _) = make(timeout_ms);
            let (s, _, cut) = audio_api(&app, "/v1/audio/transcriptions", fields).await;
            assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&cut));
            let cut = String::from_utf8(cut).unwrap();
            assert!(
                full.trim().starts_with(cut.trim()),
                "{cut:?} is not a prefix of {full:?}"
            );
            if timeout_ms == 0 {
                assert_eq!(cut.trim(), "");
            }
        }
        // The drain's end cuts the same way.
        let (app, status) = make(60_000);
        status.end_running_requests();
        let (s, _, cut) = audio_api(&app, "/v1/audio/translations", fields).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(String::from_utf8(cut).unwrap().trim(), "");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn transcription_endpoints_answer_in_every_format() {
        let r = reference();
        let app = app();
        let wav = common::clip_wav(&r, "main");
        let want = r.ids_at(&["modes", "audio", "greedy_ids"]);
        let (s, ctype, body) = audio_api(
            &app,
            "/v1/audio/transcriptions",
            &[
                ("file", Some("clip.wav"), &wav),
                ("model", None, b"phi4"),
                ("response_format", None, b"verbose_json"),
                ("temperature", None, b"0"),
            ],
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        assert!(ctype.starts_with("application/json"), "{ctype}");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["task"], "transcribe");
        assert_eq!(v["duration"], 3.0);
        let seg = &v["segments"][0];
        let tokens: Vec<u32> = seg["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        // The reference's greedy tokens begin the window's output.
        assert_eq!(&tokens[..want.len()], &want[..]);
        assert_eq!(
            (seg["start"].as_f64(), seg["end"].as_f64()),
            (Some(0.0), Some(3.0))
        );
        assert!(seg["avg_logprob"].as_f64().unwrap() < 0.0);
        let text = v["text"].as_str().unwrap().to_owned();
        for (format, ctype_want, check) in [
            ("json", "application/json", 0),
            ("text", "text/plain", 1),
            ("srt", "text/plain", 2),
            ("vtt", "text/plain", 3),
        ] {
            let (s, ctype, body) = audio_api(
                &app,
                "/v1/audio/transcriptions",
                &[
                    ("file", Some("clip.wav"), &wav),
                    ("model", None, b"phi4"),
                    ("response_format", None, format.as_bytes()),
                ],
            )
            .await;
            assert_eq!(s, StatusCode::OK, "{format}");
            assert!(ctype.starts_with(ctype_want), "{format}: {ctype}");
            let body = String::from_utf8(body).unwrap();
            match check {
                0 => assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["text"], text),
                1 => assert_eq!(body, format!("{text}\n")),
                2 => assert!(
                    body.starts_with("1\n00:00:00,000 --> 00:00:03,000\n"),
                    "{body}"
                ),
                _ => assert!(
                    body.starts_with("WEBVTT\n\n00:00:00.000 --> 00:00:03.000\n"),
                    "{body}"
                ),
            }
        }
        // A 41 s clip: two windows through the batcher, the same tokens as the engine's.
        let long = common::clip_wav(&r, "long");
        let (s, _, body) = audio_api(
            &app,
            "/v1/audio/transcriptions",
            &[
                ("file", Some("long.wav"), &long),
                ("model", None, b"phi4"),
                ("response_format", None, b"verbose_json"),
            ],
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let v: Value = serde_json::from_slice(&body).unwrap();
        let e = phi4::Engine::load(&common::tiny_mm_dir()).unwrap();
        let opts = phi4::engine::SpeechOptions::new(phi4::engine::SpeechTask::Transcribe);
        let want = e
            .transcribe(
                &phi4::media::Waveform {
                    samples: clip(&r, "long"),
                },
                &opts,
            )
            .unwrap();
        let segs = v["segments"].as_array().unwrap();
        assert_eq!(segs.len(), 2);
        for (got, want) in segs.iter().zip(&want.segments) {
            assert_eq!(got["start"].as_f64().unwrap(), want.start);
            let ids: Vec<u32> = got["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(ids, want.tokens);
        }
        // Translations (into English) run the translation prompt.
        let (s, _, body) = audio_api(
            &app,
            "/v1/audio/translations",
            &[("file", Some("clip.wav"), &wav), ("model", None, b"phi4")],
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        assert!(serde_json::from_slice::<Value>(&body).unwrap()["text"].is_string());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_transcription_requests_get_clear_4xx() {
        let r = reference();
        let app = app();
        let wav = common::clip_wav(&r, "main");
        let check = |path: &'static str,
                     fields: Vec<(&'static str, Option<&'static str>, Vec<u8>)>,
                     status: StatusCode,
                     needle: &'static str| {
            let app = app.clone();
            async move {
                let f: Vec<(&str, Option<&str>, &[u8])> = fields
                    .iter()
                    .map(|(n, f, v)| (*n, *f, v.as_slice()))
                    .collect();
                let (s, _, body) = audio_api(&app, path, &f).await;
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                assert_eq!(s, status, "{needle}: {v}");
                let msg = v["error"]["message"].as_str().unwrap_or_default();
                assert!(msg.contains(needle), "wanted {needle:?} in {msg:?}");
            }
        };
        let t = "/v1/audio/transcriptions";
        let model = ("model", None, b"phi4".to_vec());
        let file = ("file", Some("clip.wav"), wav.clone());
        check(
            t,
            vec![model.clone()],
            StatusCode::BAD_REQUEST,
            "no `file` field",
        )
        .await;
        check(
            t,
            vec![file.clone()],
            StatusCode::BAD_REQUEST,
            "model parameter",
        )
        .await;
        check(
            t,
            vec![file.clone(), ("model", None, b"whisper-1".to_vec())],
            StatusCode::NOT_FOUND,
            "does not exist",
        )
        .await;
        check(
            t,
            vec![("file", Some("a.wav"), Vec::new()), model.clone()],
            StatusCode::BAD_REQUEST,
            "empty",
        )
        .await;
        check(
            t,
            vec![
                ("file", Some("a.mp3"), b"not audio".to_vec()),
                model.clone(),
            ],
            StatusCode::BAD_REQUEST,
            "not a supported audio file",
        )
        .await;
        check(
            t,
            vec![
                ("file", Some("a.wav"), wav[..wav.len() / 2 + 1].to_vec()),
                model.clone(),
                ("bogus", None, b"1".to_vec()),
            ],
            StatusCode::BAD_REQUEST,
            "Unrecognized request argument",
        )
        .await;
        check(
            t,
            vec![
                file.clone(),
                model.clone(),
                ("response_format", None, b"xml".to_vec()),
            ],
            StatusCode::BAD_REQUEST,
            "response_format",
        )
        .await;
        check(
            t,
            vec![
                file.clone(),
                model.clone(),
                ("temperature", None, b"hot".to_vec()),
            ],
            StatusCode::BAD_REQUEST,
            "not a number",
        )
        .await;
        check(
            t,
            vec![
                file.clone(),
                model.clone(),
                ("timestamp_granularities[]", None, b"word".to_vec()),
            ],
            StatusCode::BAD_REQUEST,
            "not supported",
        )
        .await;
        check(
            "/v1/audio/translations",
            vec![
                file.clone(),
                model.clone(),
                ("language", None, b"fr".to_vec()),
            ],
            StatusCode::BAD_REQUEST,
            "Unrecognized request argument",
        )
        .await;
        // Not multipart at all.
        let req = HttpRequest::builder()
            .method("POST")
            .uri(t)
            .header("content-type", "application/json")
            .body(Body::from("{}"))
            .unwrap();
        let (s, _, body) = send(&app, req).await;
        assert!(s.is_client_error(), "{s}");
        assert!(String::from_utf8_lossy(&body).contains("multipart/form-data"));
        // Too long, too large.
        let short = app_with(
            MediaLimits {
                max_audio_seconds: 1.0,
                ..MediaLimits::default()
            },
            32 << 20,
        );
        let (s, _, body) = audio_api(
            &short,
            t,
            &[("file", Some("a.wav"), &wav), ("model", None, b"phi4")],
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(String::from_utf8_lossy(&body).contains("longer than the limit"));
        let small = app_with(MediaLimits::default(), 50_000);
        let (s, _, body) = audio_api(
            &small,
            t,
            &[("file", Some("a.wav"), &wav), ("model", None, b"phi4")],
        )
        .await;
        assert_eq!(
            s,
            StatusCode::PAYLOAD_TOO_LARGE,
            "{}",
            String::from_utf8_lossy(&body)
        );
        // A text model has no audio endpoint to speak of.
        let text_app = engine_router(
            Arc::new(phi4::Engine::load(&common::tiny_dir()).unwrap()),
            BatcherConfig::default(),
            ServerOptions::default(),
        );
        let (s, _, body) = audio_api(
            &text_app,
            t,
            &[("file", Some("a.wav"), &wav), ("model", None, b"phi4")],
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(String::from_utf8_lossy(&body).contains("text only"));
    }
}

#[test]
fn resampled_input_gives_the_reference_features_of_the_16k_clip() {
    // The reference cannot resample (transformers 5.25 refuses anything but 16 kHz). So the main
    // clip is taken to another rate (rubato, band-limited) and back by our front end; the
    // features must stay those transformers computed from the 16 kHz original, in every mel band
    // the intermediate rate can carry.
    use rubato::audioadapter_buffers::direct::InterleavedSlice;
    use rubato::{Fft, FixedSync, Resampler, WindowFunction};
    let r = reference();
    let x = clip(&r, "main");
    let want = r.tensor("audio.main.features");
    let lm = LogMel::new();
    let bank = log_mel::mel_filters();
    for rate in [8000usize, 22050, 44100, 48000] {
        let mut up = Fft::<f32>::new_custom(
            16000,
            rate,
            4096,
            1,
            1,
            WindowFunction::BlackmanHarris2,
            FixedSync::Input,
        )
        .unwrap();
        let input = InterleavedSlice::new(&x, 1, x.len()).unwrap();
        let there = up.process_all(&input, x.len(), None).unwrap().take_data();
        let back = phi4::media::audio::resample_to_16k(&there, rate as u32).unwrap();
        assert!(
            back.len().abs_diff(x.len()) <= 1,
            "{rate}: {} samples",
            back.len()
        );
        let got = lm.features(&back[..x.len().min(back.len())]);
        // Mel filters whose whole triangle lies below 90 % of the band both rates share.
        let band_hz = 0.9 * (rate.min(16000) as f64 / 2.0);
        let top_bin = (band_hz / 31.25) as usize;
        let bins: Vec<usize> = (0..80)
            .filter(|&m| (top_bin..257).all(|k| bank[k * 80 + m] == 0.0))
            .collect();
        assert!(
            bins.len() >= if rate >= 16000 { 75 } else { 55 },
            "{rate}: {} bins",
            bins.len()
        );
        let frames = got.len().min(want.len()) / 80;
        // Frames away from the ends, where the resampler's edge handling differs. Log energies
        // magnify tiny absolute errors in quiet cells (the lowest bins, which pre-emphasis all
        // but removes, and the clip's pauses), so the bound is on the mean and on the loud cells.
        let (mut sum, mut n) = (0f64, 0usize);
        let mut loud = Vec::new();
        for t in 3..frames - 3 {
            for &m in &bins {
                let d = (got[t * 80 + m] - want[t * 80 + m]).abs();
                sum += f64::from(d);
                n += 1;
                if want[t * 80 + m] > 8.0 {
                    loud.push(d);
                }
            }
        }
        let mean = sum / n as f64;
        loud.sort_by(f32::total_cmp);
        let p99 = loud[loud.len() * 99 / 100];
        // Measured (2026-12-04): mean 0.037 / 0.025 / 0.004 / 0.004 and loud p99 0.45 / 0.34 /
        // 0.05 / 0.06 for 8 / 22.05 / 44.1 / 48 kHz.
        let (mean_max, p99_max) = if rate >= 44100 {
            (0.01, 0.1)
        } else {
            (0.05, 0.6)
        };
        assert!(
            mean < mean_max && p99 < p99_max,
            "{rate} Hz: mean |diff| {mean}, loud p99 {p99}"
        );
    }
}

#[test]
fn several_audios_each_take_their_own_rows_in_prompt_order() {
    use phi4::model::phi4mm::audio_embed::Projection;
    let r = reference();
    let e = phi4::Engine::load(&common::tiny_mm_dir()).unwrap();
    let main = phi4::media::Waveform {
        samples: clip(&r, "main"),
    };
    let short = phi4::media::Waveform {
        samples: clip(&r, "short"),
    };
    // Placeholders out of order: audio 2 (short, 13 tokens) first, then audio 1 (main, 38).
    let (ids, media) = e
        .encode_with_media(
            "<|user|>A <|audio_2|> B <|audio_1|> C<|end|><|assistant|>",
            &[],
            &[main.clone(), short.clone()],
        )
        .unwrap();
    let media = media.unwrap();
    assert_eq!(media.adapter, Some(phi4::model::phi4mm::SPEECH));
    assert_eq!((media.images, media.audios), (0, 2));
    let audio_id = e.mm.as_ref().unwrap().config.audio_token_id;
    let pos: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] == audio_id).collect();
    assert_eq!(pos.len(), 13 + 38);
    assert_eq!(media.embeds.positions(), &pos[..]);
    // Two runs of audio tokens with text between them.
    let first_run = pos.windows(2).position(|w| w[1] != w[0] + 1).unwrap() + 1;
    assert_eq!(first_run, 13);
    let mm = e.mm.as_ref().unwrap();
    let mut want = mm.embed_audio(&short, Projection::Speech).unwrap();
    want.extend(mm.embed_audio(&main, Projection::Speech).unwrap());
    let h = e.model.config.hidden_size;
    let got: Vec<f32> = pos
        .iter()
        .flat_map(|&p| media.embeds.row(p).unwrap().to_vec())
        .collect();
    assert_eq!(got.len(), want.len());
    assert_eq!(
        got, want,
        "rows in prompt order, each audio encoded alone ({h} wide)"
    );
    // Mistakes are named.
    let err = |t: &str, n: usize| {
        format!(
            "{:#}",
            e.encode_with_media(t, &[], &vec![main.clone(); n])
                .unwrap_err()
        )
    };
    assert!(err("<|audio_1|><|audio_1|>", 1).contains("more than once"));
    assert!(err("<|audio_1|>", 2).contains("audio 2 has no <|audio_2|>"));
    assert!(err("<|audio_3|>", 1).contains("<|audio_3|> has no audio"));
    assert!(err("hi <|endoftext11|>", 0).contains("reserved for image and audio"));
}

#[test]
fn a_merged_speech_adapter_gives_the_same_transcription_and_refuses_other_modes() {
    let r = reference();
    let merged = phi4::Engine::load_merged(
        &common::tiny_mm_dir(),
        None,
        phi4::model::phi4mm::SPEECH,
        &mut |_, _| {},
    )
    .unwrap();
    // The decoder no longer carries the speech deltas; the vision ones stay.
    let layer = &merged.model.model.layers[0];
    for (_, lin) in layer.linears() {
        assert!(lin
            .lora()
            .iter()
            .all(|d| d.adapter != phi4::model::phi4mm::SPEECH));
    }
    // W + s·B·A rounded to bf16: the logits stay within the rounding, the tokens the same.
    let got = {
        use phi4::model::{BatchItem, Logits};
        let prompt = r.meta["modes"]["audio"]["prompt"].as_str().unwrap();
        let (ids, media) = merged
            .encode_with_media(prompt, &[], &common::mode_audios(&r, "audio"))
            .unwrap();
        let media = media.unwrap();
        assert_eq!(media.adapter, None, "the adapter is in the weights");
        let m = &merged.model;
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
    };
    let d = rel(&got, r.tensor("mode.audio.logits"));
    assert!(d < 2e-2, "merged logits differ by {d}");
    common::check_mode_greedy(&merged, &r, "audio");
    // Other modes would run with the speech delta in the weights: refused, with the reason.
    let err = |e: anyhow::Error| format!("{e:#}");
    let text = merged.encode_with_media("<|user|>Hi<|end|><|assistant|>", &[], &[]);
    assert!(err(text.unwrap_err()).contains("serves speech requests only"));
    let img = merged.encode_with_media("<|image_1|>x", &common::mode_images(&r, "image"), &[]);
    assert!(err(img.unwrap_err()).contains("serves speech requests only"));
    let ids = merged
        .generate_ids(&[504, 30], &phi4::SamplingParams::greedy(1), &mut |_| true)
        .unwrap_err();
    assert!(err(ids).contains("serves speech requests only"));
    // A text model has nothing to merge.
    assert!(phi4::Engine::load_merged(&common::tiny_dir(), None, 1, &mut |_, _| {}).is_err());
}

#[test]
fn resampled_audio_is_the_same_signal_in_time_not_just_in_spectrum() {
    // Many sines below 85 % of the lower Nyquist, at each rate, against the same sum evaluated
    // at 16 kHz: the output must match sample for sample (≥ 90 dB SNR) up to a delay of at most
    // half a sample (rubato's FFT blocks at some ratios: 31 µs at 96 kHz). A chunk glitch or a
    // wrong trim of the resampler's delay fails this, as the tone amplitudes above cannot see.
    use phi4::media::audio::resample_to_16k;
    for rate in [
        8000u32, 11025, 22050, 32000, 44100, 48000, 88200, 96000, 192000,
    ] {
        let fmax = f64::from(rate.min(16000)) / 2.0 * 0.85;
        let f = |t: f64| -> f64 {
            (0..24)
                .map(|k| {
                    let hz = 100.0 + (fmax - 100.0) * f64::from(k) / 23.0;
                    (2.0 * std::f64::consts::PI * hz * t + f64::from(k)).sin()
                })
                .sum::<f64>()
                / 24.0
        };
        let n = rate as usize * 2;
        let src: Vec<f32> = (0..n)
            .map(|i| f(i as f64 / f64::from(rate)) as f32)
            .collect();
        let out = resample_to_16k(&src, rate).unwrap();
        assert!(
            out.len().abs_diff(32000) <= 1,
            "{rate} Hz: {} samples",
            out.len()
        );
        let snr = |shift: f64| {
            let (mut e, mut s) = (0f64, 0f64);
            for (i, &y) in out.iter().enumerate().take(28000).skip(4000) {
                let want = f((i as f64 + shift) / 16000.0);
                e += (f64::from(y) - want).powi(2);
                s += want * want;
            }
            10.0 * (s / e).log10()
        };
        let best = [0.0, -0.5, 0.5]
            .map(snr)
            .into_iter()
            .fold(f64::MIN, f64::max);
        assert!(best >= 90.0, "{rate} Hz: {best:.1} dB");
    }
}

#[test]
fn a_chat_resending_its_media_runs_each_encoder_once() {
    let r = reference();
    let e = phi4::Engine::load(&common::tiny_mm_dir()).unwrap();
    let mm = e.mm.as_ref().unwrap();
    let wav = std::sync::Arc::new(common::clip_wav(&r, "main"));
    let audio = || phi4::text::AudioSource::Bytes(wav.clone());
    let turn1 = vec![phi4::Message::with_media(
        "user",
        "Transcribe.",
        vec![],
        vec![audio()],
    )];
    let (ids1, m1) = e.encode_chat(&turn1, None).unwrap();
    assert_eq!(mm.cache.hits(), 0);
    // The next turn resends the audio: its rows come from the cache, the same ones.
    let mut turn2 = turn1.clone();
    turn2.push(phi4::Message::new("assistant", "ok"));
    turn2.push(phi4::Message::new("user", "And again?"));
    let (ids2, m2) = e.encode_chat(&turn2, None).unwrap();
    assert_eq!(mm.cache.hits(), 1);
    assert_eq!(&ids2[..ids1.len() - 1], &ids1[..ids1.len() - 1]);
    let (m1, m2) = (m1.unwrap(), m2.unwrap());
    assert_eq!(m1.embeds.positions(), m2.embeds.positions());
    for &p in m1.embeds.positions() {
        assert_eq!(m1.embeds.row(p), m2.embeds.row(p));
    }
    // With an image the audio goes through the other projection: a different entry.
    let img = common::mode_images(&r, "image");
    let w = common::mode_audios(&r, "audio");
    e.encode_with_media("<|image_1|><|audio_1|>x", &img, &w)
        .unwrap();
    assert_eq!(mm.cache.hits(), 1);
    e.encode_with_media("<|image_1|><|audio_1|>y", &img, &w)
        .unwrap();
    assert_eq!(mm.cache.hits(), 3, "image and audio both found");
}
