//! Phi-4-multimodal against transformers 5.25 (scripts/make_mm_fixtures.py): the image
//! processor, the vision tower, both checkpoint layouts, the LoRA routing per mode.

mod common;

use common::{load_mm, max_abs_diff, mode_images, pattern_image, rel, Reference};
use phi4::media::dynamic_hd::{self, CropLayout, DEFAULT_MAX_CROPS, MASK};
use sha2::{Digest, Sha256};

fn reference() -> Reference {
    Reference::load_named("tiny-phi4mm")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn processor_matches_transformers_for_every_image_size() {
    let r = reference();
    let cases = r.meta["processor"].as_array().unwrap();
    assert!(cases.len() >= 6);
    for case in cases {
        let (w, h) = (
            case["width"].as_u64().unwrap() as usize,
            case["height"].as_u64().unwrap() as usize,
        );
        let img = pattern_image(w, h);
        let l = CropLayout::new(w, h, DEFAULT_MAX_CROPS).unwrap();
        let json = |k: &str| -> Vec<usize> {
            case[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect()
        };
        assert_eq!(vec![l.grid_w, l.grid_h], json("grid"), "{w}x{h} grid");
        assert_eq!(vec![l.resized_w, l.resized_h], json("resized"), "{w}x{h}");
        assert_eq!(vec![l.pad_w, l.pad_h], json("padding"), "{w}x{h}");
        assert_eq!(vec![l.canvas_h(), l.canvas_w()], json("image_sizes"));
        assert_eq!(
            l.num_tokens(),
            case["num_img_tokens"].as_u64().unwrap() as usize,
            "{w}x{h} tokens"
        );
        // The uint8 resize must be bit-exact: the ±1 rounding cases are all over this picture.
        let canvas = dynamic_hd::canvas(&img, &l);
        assert_eq!(
            hex(&Sha256::digest(&canvas)),
            case["canvas_sha256"].as_str().unwrap(),
            "{w}x{h}: resized canvas differs from torchvision's"
        );
        let p = dynamic_hd::preprocess(&img, DEFAULT_MAX_CROPS).unwrap();
        let key = format!("proc.{w}x{h}");
        let want_mask = r.tensor(&format!("{key}.mask"));
        let got_mask: Vec<f32> = p.masks.iter().map(|&m| m as f32).collect();
        assert_eq!(got_mask, want_mask, "{w}x{h} masks");
        assert_eq!(p.masks.len(), p.views() * MASK * MASK);
        // Crops are the normalised canvas exactly; the global view is bicubic in f32.
        let cw = l.canvas_w();
        let crop0 = &p.pixels[3 * 448 * 448..];
        for (y, x, c) in [(0, 0, 0), (17, 301, 1), (447, 447, 2)] {
            let want = (canvas[(y * cw + x) * 3 + c] as f32 - 127.5) / 127.5;
            assert_eq!(crop0[c * 448 * 448 + y * 448 + x], want);
        }
        let rows = r.tensor(&format!("{key}.global_rows"));
        let mut got = Vec::new();
        for c in 0..3 {
            for y in (0..448).step_by(32) {
                got.extend_from_slice(&p.pixels[c * 448 * 448 + y * 448..][..448]);
            }
        }
        let d = max_abs_diff(&got, rows);
        assert!(d < 2e-6, "{w}x{h}: global view differs by {d}");
    }
}

use phi4::config::multimodal::Phi4MMConfig;
use phi4::model::phi4mm::{InputMode, Phi4MMForCausalLM, VISION};
use phi4::model::{BatchItem, InputEmbeds, Logits};

fn main_image() -> phi4::media::ProcessedImage {
    dynamic_hd::preprocess(&pattern_image(500, 300), DEFAULT_MAX_CROPS).unwrap()
}

#[test]
fn vision_tower_pooling_and_projection_match_transformers() {
    let r = reference();
    let m = load_mm(&common::tiny_mm_dir());
    let img = main_image();
    let c = &m.image_embed.img_processor.config;
    let feats = m
        .image_embed
        .img_processor
        .forward(&img.pixels, &img.masks, img.views());
    let d = rel(&feats, r.tensor("vision.feature_layer"));
    assert!(d < 2e-5, "feature layer differs by {d} (relative)");
    let pooled = m.image_embed.pooled_features(&img);
    let d = rel(&pooled, r.tensor("vision.pooled"));
    assert!(d < 2e-5, "pooled features differ by {d}");
    let rows = m.image_embed.forward(&img).unwrap();
    assert_eq!(rows.len(), 721 * m.lm.config.hidden_size);
    assert_eq!(c.layers_used(), 2);
    let d = rel(&rows, r.tensor("image.embeds"));
    assert!(d < 2e-5, "projected image embeddings differ by {d}");
}

/// Runs a reference mode's prompt through the decoder with the adapter its media route to.
fn mode_logits(
    m: &Phi4MMForCausalLM,
    r: &Reference,
    mode: &str,
    images: &[(usize, usize)],
) -> Vec<f32> {
    let ids = r.ids_at(&["modes", mode, "prompt_ids"]);
    let processed: Vec<_> = images
        .iter()
        .map(|&(w, h)| dynamic_hd::preprocess(&pattern_image(w, h), DEFAULT_MAX_CROPS).unwrap())
        .collect();
    let rows = m.embed_images(&processed).unwrap();
    let positions: Vec<usize> = (0..ids.len())
        .filter(|&i| ids[i] == m.image_token_id())
        .collect();
    let h = m.lm.config.hidden_size;
    assert_eq!(
        positions.len() * h,
        rows.len(),
        "{mode}: image tokens vs rows"
    );
    let embeds = InputEmbeds::new(positions, rows, h).unwrap();
    let mut cache = m.lm.new_cache();
    let item = BatchItem {
        embeds: Some(&embeds),
        adapter: InputMode::of(images.len(), 0).adapter(),
        ..BatchItem::new(&ids, &mut cache, m.lm.rope.table_for_len(ids.len()))
    };
    let mut logits = Vec::new();
    m.lm.forward_item(item, Logits::All, None, &mut logits)
        .unwrap();
    logits
}

#[test]
fn each_mode_matches_transformers_with_its_adapter_in_both_layouts() {
    let r = reference();
    let native = load_mm(&common::tiny_mm_dir());
    let remote = load_mm(&common::tiny_mm_remote_dir());
    assert!(native.has_adapter(VISION) && remote.has_adapter(VISION));
    let v = native.lm.config.vocab_size;
    for m in [&native, &remote] {
        let text = mode_logits(m, &r, "text", &[]);
        let d = rel(&text, r.tensor("mode.text.logits"));
        assert!(d < 1e-5, "text logits differ by {d}");
        let image = mode_logits(m, &r, "image", &[(500, 300)]);
        let d = rel(&image, r.tensor("mode.image.logits"));
        assert!(d < 1e-4, "image logits differ by {d}");
        let two = mode_logits(m, &r, "two_images", &[(500, 300), (100, 80)]);
        let d = rel(
            &two[two.len() - v..],
            r.tensor("mode.two_images.logits_last"),
        );
        assert!(d < 1e-4, "two-image logits differ by {d}");
    }
    // Same weights in both layouts: the same numbers, not merely close ones.
    assert_eq!(
        mode_logits(&native, &r, "image", &[(500, 300)]),
        mode_logits(&remote, &r, "image", &[(500, 300)])
    );
}

use phi4::engine::{Batcher, BatcherConfig, Event, Request};
use phi4::text::ImageSource;
use phi4::{Engine, Message, SamplingParams};
use std::sync::Arc;

fn png(img: &phi4::media::RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    image::RgbImage::from_raw(img.width as u32, img.height as u32, img.data.clone())
        .unwrap()
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

const MODES: [&str; 5] = ["text", "image", "two_images", "audio", "image_audio"];

#[test]
fn engine_generates_transformers_greedy_tokens_in_every_mode_and_layout() {
    let r = reference();
    for dir in [common::tiny_mm_dir(), common::tiny_mm_remote_dir()] {
        let e = Engine::load(&dir).unwrap();
        for mode in MODES {
            common::check_mode_greedy(&e, &r, mode);
        }
    }
}

#[test]
fn chat_messages_carry_images_as_files_or_data_urls() {
    let r = reference();
    let e = Engine::load(&common::tiny_mm_dir()).unwrap();
    let bytes = png(&pattern_image(500, 300));
    let want = r.ids_at(&["modes", "image", "greedy_ids"]);
    let params = SamplingParams::greedy(want.len());
    // Attached without a placeholder: it goes before the text.
    let m = Message::with_images(
        "user",
        "Describe the image.",
        vec![ImageSource::Bytes(Arc::new(bytes.clone()))],
    );
    let out = e.chat(&[m], &params).unwrap();
    assert_eq!(out.prompt_ids, r.ids_at(&["modes", "image", "prompt_ids"]));
    assert_eq!(out.generated_ids, want);
    // OpenAI content parts: an image part before the text, as a data: URL.
    use base64::Engine as _;
    let url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&bytes)
    );
    let m: Message = serde_json::from_value(serde_json::json!({
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "Describe the image."}]
    }))
    .unwrap();
    assert_eq!(m.content, "<|image_1|>Describe the image.");
    assert_eq!(e.chat(&[m], &params).unwrap().generated_ids, want);
    // Two images in two messages: placeholders count across the chat.
    let small = png(&pattern_image(100, 80));
    let msgs = [
        Message::with_images(
            "user",
            "First <|image_1|>",
            vec![ImageSource::Bytes(Arc::new(bytes))],
        ),
        Message::new("assistant", "Yes."),
        Message::with_images(
            "user",
            "then <|image_1|>",
            vec![ImageSource::Bytes(Arc::new(small))],
        ),
    ];
    let (ids, media) = e.encode_chat(&msgs, None).unwrap();
    let media = media.unwrap();
    assert_eq!(media.images, 2);
    assert_eq!(media.embeds.len(), 721 + 494);
    assert_eq!(ids.iter().filter(|&&t| t == 512).count(), 721 + 494);
}

#[test]
fn bad_image_input_is_refused_with_a_clear_error() {
    let e = Engine::load(&common::tiny_mm_dir()).unwrap();
    let img = pattern_image(64, 64);
    let err = |text: &str, images: &[phi4::media::RgbImage]| {
        format!("{:#}", e.encode_with_images(text, images).unwrap_err())
    };
    assert!(err("<|image_2|>hi", std::slice::from_ref(&img)).contains("<|image_2|> has no image"));
    assert!(err("hi", std::slice::from_ref(&img)).contains("no <|image_1|> placeholder"));
    assert!(err("<|image_1|><|image_1|>", std::slice::from_ref(&img)).contains("more than once"));
    assert!(err("<|image_1|> hi", &[]).contains("has no image"));
    assert!(err("a <|endoftext10|> b", &[]).contains("reserved for image and audio"));
    assert!(err("a <|endoftext11|> b", &[]).contains("reserved for image and audio"));
    let too_many = vec![img.clone(); 17];
    let text: String = (1..=17).map(|i| format!("<|image_{i}|>")).collect();
    assert!(err(&text, &too_many).contains("the limit is 16"));
    let load = |bytes: Vec<u8>| {
        format!(
            "{:#}",
            e.load_image(&ImageSource::Bytes(Arc::new(bytes)))
                .unwrap_err()
        )
    };
    assert!(load(b"not an image at all".to_vec()).contains("unsupported image format"));
    let mut truncated = png(&img);
    truncated.truncate(truncated.len() / 2);
    assert!(
        load(truncated).contains("corrupt"),
        "{}",
        load(png(&img)[..60].to_vec())
    );
    assert!(load(Vec::new()).contains("empty"));
    // Ids given directly (the completions endpoint) are held to the same rule.
    for id in [512u32, 513] {
        let e2 = e.generate_ids(&[504, id, 30], &SamplingParams::greedy(1), &mut |_| true);
        assert!(format!("{:#}", e2.unwrap_err()).contains(&format!("id {id}")));
    }
    let remote = e.load_image(&ImageSource::Url("https://example.com/a.png".into()));
    assert!(format!("{:#}", remote.unwrap_err()).contains("--allow-remote-media"));
    // A text model says it takes no images.
    let text_model = Engine::load(&common::tiny_dir()).unwrap();
    let m = Message::with_images("user", "hi", vec![ImageSource::Bytes(Arc::new(png(&img)))]);
    let e2 = text_model
        .chat(&[m], &SamplingParams::greedy(2))
        .unwrap_err();
    assert!(format!("{e2:#}").contains("text only"), "{e2:#}");
}

#[test]
fn a_batch_mixing_text_image_and_audio_requests_equals_each_run_alone() {
    let r = reference();
    let e = Arc::new(Engine::load(&common::tiny_mm_dir()).unwrap());
    let b = Batcher::spawn(e.clone(), BatcherConfig::default());
    // Encoded first (the vision tower takes a moment), then submitted together.
    let encoded: Vec<_> = MODES
        .iter()
        .map(|&mode| {
            let prompt = r.meta["modes"][mode]["prompt"].as_str().unwrap();
            (
                mode,
                e.encode_with_media(
                    prompt,
                    &mode_images(&r, mode),
                    &common::mode_audios(&r, mode),
                )
                .unwrap(),
            )
        })
        .collect();
    let mut rxs = Vec::new();
    for (mode, (ids, media)) in encoded {
        let rx = b
            .submit(Request {
                prompt: ids,
                params: SamplingParams::greedy(6),
                media,
                ..Default::default()
            })
            .unwrap();
        rxs.push((mode, rx));
    }
    for (mode, mut rx) in rxs {
        let mut ids = Vec::new();
        loop {
            match rx.blocking_recv().expect("batcher dropped a request") {
                Event::Started => {}
                Event::Step(s) => {
                    ids.push(s.token);
                    if s.finish.is_some() {
                        break;
                    }
                }
                Event::Error(e) => panic!("{mode}: {e}"),
            }
        }
        assert_eq!(ids, r.ids_at(&["modes", mode, "greedy_ids"]), "{mode}");
    }
    // The three decoded together (each alone would take 3 × 5 steps).
    let steps = b
        .stats
        .decode_steps
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(steps < 15, "decode steps were not shared: {steps}");
}

mod server {
    use super::*;
    use axum::http::StatusCode;
    use phi4::engine::{LocalMedia, MediaLimits};
    use phi4::server::{engine_router, ServerOptions};
    use serde_json::{json, Value};

    fn app(limits: MediaLimits) -> axum::Router {
        let mut e = Engine::load(&common::tiny_mm_dir()).unwrap();
        e.mm.as_mut().unwrap().limits = limits;
        engine_router(
            Arc::new(e),
            BatcherConfig::default(),
            ServerOptions {
                max_body_bytes: 32 << 20,
                ..Default::default()
            },
        )
    }

    async fn post(app: &axum::Router, body: Value) -> (StatusCode, Value) {
        common::http::call(app, "POST", "/v1/chat/completions", Some(body)).await
    }

    fn data_url(bytes: &[u8], mime: &str) -> String {
        use base64::Engine as _;
        format!(
            "data:{mime};base64,{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )
    }

    fn request(parts: Value) -> Value {
        json!({"model": "phi4", "temperature": 0, "max_tokens": 6,
               "messages": [{"role": "user", "content": parts}]})
    }

    fn image_part(url: &str) -> Value {
        json!({"type": "image_url", "image_url": {"url": url}})
    }

    fn text_part(t: &str) -> Value {
        json!({"type": "text", "text": t})
    }

    fn server_defaults() -> MediaLimits {
        MediaLimits {
            local: LocalMedia::Denied,
            ..MediaLimits::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn image_url_parts_answer_like_the_reference_and_bad_ones_get_400() {
        let r = reference();
        let app = app(server_defaults());
        let png = png(&pattern_image(500, 300));
        let (s, v) = post(
            &app,
            request(json!([
                image_part(&data_url(&png, "image/png")),
                text_part("Describe the image.")
            ])),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let prompt = r.ids_at(&["modes", "image", "prompt_ids"]);
        assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
        assert_eq!(v["usage"]["completion_tokens"], 6);
        let e = Engine::load(&common::tiny_mm_dir()).unwrap();
        let want = e
            .tokenizer
            .decode(&r.ids_at(&["modes", "image", "greedy_ids"]), true)
            .unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], want);

        let bad = |parts: Value, needle: &'static str| {
            let app = app.clone();
            async move {
                let (s, v) = post(&app, request(parts)).await;
                assert_eq!(s, StatusCode::BAD_REQUEST, "{needle}: {v}");
                let msg = v["error"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                assert!(msg.contains(needle), "wanted {needle:?} in {msg:?}");
                let param = v["error"]["param"].as_str().unwrap_or_default();
                assert!(param.starts_with("messages"), "param {param:?}");
            }
        };
        bad(
            json!([image_part("https://example.com/cat.png"), text_part("x")]),
            "--allow-remote-media",
        )
        .await;
        bad(
            json!([image_part("/etc/hostname"), text_part("x")]),
            "--allowed-local-media-path",
        )
        .await;
        bad(
            json!([image_part("data:image/png;base64,@@@@"), text_part("x")]),
            "not valid base64",
        )
        .await;
        bad(
            json!([
                image_part(&data_url(&png[..png.len() / 2], "image/png")),
                text_part("x")
            ]),
            "corrupt",
        )
        .await;
        bad(
            json!([
                image_part(&data_url(b"plain text", "text/plain")),
                text_part("x")
            ]),
            "unsupported image format",
        )
        .await;
        bad(
            json!([
                image_part(&data_url(&png, "image/png")),
                text_part("<|image_2|>")
            ]),
            "<|image_2|>",
        )
        .await;
        bad(
            json!([text_part("what is <|endoftext10|>?")]),
            "reserved for image",
        )
        .await;
        bad(json!([{"type": "image_url", "image_url": {}}]), "image_url").await;
        let many: Vec<Value> = (0..17)
            .map(|_| image_part(&data_url(&png, "image/png")))
            .collect();
        bad(Value::Array(many), "the limit is 16").await;
        let huge = MediaLimits {
            max_image_pixels: 1000,
            ..server_defaults()
        };
        let (s, v) = post(
            &app_with(huge),
            request(json!([image_part(&data_url(&png, "image/png"))])),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("larger than the limit"),
            "{v}"
        );
    }

    fn app_with(l: MediaLimits) -> axum::Router {
        app(l)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn local_files_only_under_the_allowed_directory() {
        let dir = tempfile::tempdir().unwrap();
        let inside = dir.path().join("in.png");
        std::fs::write(&inside, png(&pattern_image(500, 300))).unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(outside.path(), png(&pattern_image(500, 300))).unwrap();
        let app = app(MediaLimits {
            local: LocalMedia::Under(dir.path().to_path_buf()),
            ..MediaLimits::default()
        });
        let url = format!("file://{}", inside.display());
        let (s, v) = post(
            &app,
            request(json!([image_part(&url), text_part("Describe the image.")])),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let sneaky = format!("{}/../{}", dir.path().display(), outside.path().display());
        for url in [outside.path().display().to_string(), sneaky] {
            let (s, v) = post(&app, request(json!([image_part(&url)]))).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{url}: {v}");
        }
    }
}

#[test]
fn quantized_decoder_keeps_adapters_and_vision_and_saves_in_either_layout() {
    use phi4::model::Recipe;
    let r = reference();
    let v = 520;
    let want_last = {
        let all = r.tensor("mode.image.logits");
        all[all.len() - v..].to_vec()
    };
    for dir in [common::tiny_mm_dir(), common::tiny_mm_remote_dir()] {
        let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let out = tempfile::tempdir().unwrap();
        let cfg = Phi4MMConfig::from_json(&text).unwrap();
        phi4::model::phi4mm::write_quantized(&dir, cfg, Recipe::Q8, out.path()).unwrap();
        let saved = Engine::load(out.path()).unwrap();
        let at_load = Engine::load_with_progress(&dir, Some(Recipe::Q8), &mut |_, _| {}).unwrap();
        let prompt = r.meta["modes"]["image"]["prompt"].as_str().unwrap();
        let img = [pattern_image(500, 300)];
        let last = |e: &Engine| {
            let (ids, media) = e.encode_with_images(prompt, &img).unwrap();
            let (_, logits) = e.start_with(&ids, media).unwrap();
            logits
        };
        let (a, b) = (last(&saved), last(&at_load));
        assert_eq!(
            a,
            b,
            "saved and load-time quantization differ ({})",
            dir.display()
        );
        // 8-bit decoder, 16-bit adapters and vision: close to the bf16 reference.
        let d = rel(&a, &want_last);
        assert!(
            d < 0.02,
            "q8 image logits differ by {d} ({})",
            dir.display()
        );
        assert!(saved.model.model.layers[0]
            .self_attn
            .qkv_proj
            .weight()
            .as_quant()
            .is_some());
        assert_eq!(
            saved.model.model.layers[0].self_attn.qkv_proj.lora().len(),
            2
        );
        let vision = &saved.mm.as_ref().unwrap().image_embed.img_processor.layers[0];
        assert!(vision.mlp.fc1.weight().dtype.is_float());
    }
}
