//! `phi4 bench`: prefill and decode speed, time to first token and peak memory, next to the
//! machine's measured memory-bandwidth ceiling for the same weights.

use std::time::Instant;

use anyhow::Result;
use rayon::prelude::*;
use serde::Serialize;

use crate::engine::sampling::argmax;
use crate::model::{Logits, Phi3ForCausalLM};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub runs: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchRun {
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub time_to_first_token_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub threads: usize,
    /// Whether the CPU's matrix units (AMX) are usable, and whether the kernels use them.
    pub matrix_units: String,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub runs: Vec<BenchRun>,
    /// Medians over `runs`.
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub time_to_first_token_ms: f64,
    pub weight_bytes_per_token: usize,
    pub memory_bandwidth_gb_s: f64,
    /// Decode speed if every weight byte streamed at the measured bandwidth.
    pub decode_ceiling_tokens_per_s: f64,
    pub decode_fraction_of_ceiling: f64,
    /// Median speed of the plain read passes over the decode weights taken between decode
    /// steps (see [`READ_EVERY`]).
    pub weight_read_gb_s: Option<f64>,
    /// Median over those passes of (read pass time / time of the decode step beside it): the
    /// share of the bandwidth ceiling decode reaches, each step against the host's bandwidth of
    /// the same moment and the same pages.
    pub decode_fraction_of_weight_read: Option<f64>,
    pub peak_rss_mb: Option<f64>,
    /// KV cache storage and its size at the end of a run.
    pub kv_cache: &'static str,
    pub kv_cache_mb: f64,
    /// How activations met bf16 weights (`f32` or `bf16`).
    pub bf16_acts: &'static str,
    /// How activations met block-quantized weights (`auto`, `i8` or `i16`).
    pub quant_acts: &'static str,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Every this many decode steps, `phi4 bench` also reads the weights a step reads with a plain
/// loop (alternately just before and just after the step). The probe of
/// [`memory_bandwidth_gb_s`] runs once, and this host's bandwidth moves by up to ±30 % from one
/// second to the next, so a fraction of it says as much about the moment as about decode; a read
/// of the same pages beside each measured step does not.
pub const READ_EVERY: usize = 4;

/// Sums `words` with every thread. Integer sums vectorise (no float reassociation needed), so
/// the loop is bound by loads.
fn read_words(words: &[u32]) -> u32 {
    words
        .par_chunks(1 << 16)
        .map(|c| c.iter().fold(0u32, |a, b| a.wrapping_add(*b)))
        .reduce(|| 0, u32::wrapping_add)
}

/// Seconds one plain read of `parts` takes with every thread.
fn read_pass(parts: &[&[u8]]) -> f64 {
    let t = Instant::now();
    let s = parts
        .iter()
        .map(|p| read_words(bytemuck::pod_align_to::<u8, u32>(p).1))
        .fold(0u32, u32::wrapping_add);
    std::hint::black_box(s);
    t.elapsed().as_secs_f64()
}

/// Read bandwidth of this machine with all threads: best of several passes over 1 GiB, held
/// in the same kind of pages as the weights ([`crate::paging`]; 4 KB pages read 8–30 % slower).
pub fn memory_bandwidth_gb_s() -> f64 {
    let words = (1usize << 30) / 4;
    let mut store = crate::paging::Words::zeroed(words);
    store
        .as_mut_slice()
        .par_iter_mut()
        .enumerate()
        .for_each(|(i, w)| *w = i as u32 ^ 0x5555);
    let buf = store.as_slice();
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        std::hint::black_box(read_words(buf));
        best = best.max((words * 4) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Peak resident memory of this process (Linux), in MB.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Starts peak-RSS accounting afresh (Linux: `clear_refs` 5), so a benchmark's peak is that of
/// the model at work, not of building or quantizing its synthetic weights.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Reproducible ids below the special tokens (an LCG; the values do not matter for speed).
fn random_prompt(seed: u64, len: usize, vocab: usize) -> Vec<u32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % (vocab as u64).min(199_999)) as u32
        })
        .collect()
}

pub fn run(model: &Phi3ForCausalLM, opts: &BenchOptions) -> Result<BenchReport> {
    let prompt = random_prompt(0x1234_5678, opts.prompt_tokens, model.config.vocab_size);
    let table = model
        .rope
        .table_for_len(opts.prompt_tokens + opts.gen_tokens);
    let weights = model.decode_weights();
    let bytes: usize = weights.iter().map(|p| p.len()).sum();
    let (mut reads, mut fractions) = (Vec::new(), Vec::new());
    let mut runs = Vec::new();
    let mut kv_bytes = 0;
    for _ in 0..opts.runs {
        let mut cache = model.new_cache();
        let t0 = Instant::now();
        let logits = model.forward(&prompt, &mut cache, table, Logits::Last, None)?;
        let ttft = t0.elapsed().as_secs_f64();
        let mut tok = argmax(&logits);
        let mut dt = 0.0;
        let mut l = Vec::new();
        for i in 0..opts.gen_tokens {
            let sampled = i % READ_EVERY == READ_EVERY - 1;
            let read_first = (i / READ_EVERY) % 2 == 1;
            let before = (sampled && read_first).then(|| read_pass(&weights));
            let t = Instant::now();
            model.forward_into(&[tok], &mut cache, table, Logits::Last, None, &mut l)?;
            tok = argmax(&l);
            let step = t.elapsed().as_secs_f64();
            dt += step;
            let after = (sampled && !read_first).then(|| read_pass(&weights));
            if let Some(read) = before.or(after) {
                reads.push(bytes as f64 / read / 1e9);
                fractions.push(read / step);
            }
        }
        kv_bytes = cache.bytes();
        runs.push(BenchRun {
            prefill_tokens_per_s: opts.prompt_tokens as f64 / ttft,
            decode_tokens_per_s: opts.gen_tokens as f64 / dt,
            time_to_first_token_ms: ttft * 1e3,
        });
    }
    // Read before the bandwidth probe, whose 1 GiB buffer would otherwise count as ours.
    let peak_rss = peak_rss_mb();
    let bw = memory_bandwidth_gb_s();
    let ceiling = bw * 1e9 / bytes as f64;
    let decode = median(runs.iter().map(|r| r.decode_tokens_per_s).collect());
    Ok(BenchReport {
        threads: rayon::current_num_threads(),
        matrix_units: crate::kernels::amx::status().describe(),
        prompt_tokens: opts.prompt_tokens,
        gen_tokens: opts.gen_tokens,
        prefill_tokens_per_s: median(runs.iter().map(|r| r.prefill_tokens_per_s).collect()),
        decode_tokens_per_s: decode,
        time_to_first_token_ms: median(runs.iter().map(|r| r.time_to_first_token_ms).collect()),
        runs,
        weight_bytes_per_token: bytes,
        memory_bandwidth_gb_s: bw,
        decode_ceiling_tokens_per_s: ceiling,
        decode_fraction_of_ceiling: decode / ceiling,
        // None with fewer than READ_EVERY decode steps.
        weight_read_gb_s: (!reads.is_empty()).then(|| median(reads)),
        decode_fraction_of_weight_read: (!fractions.is_empty()).then(|| median(fractions)),
        peak_rss_mb: peak_rss,
        kv_cache: model.kv_cache.name(),
        kv_cache_mb: kv_bytes as f64 / 1e6,
        bf16_acts: model.bf16_acts().name(),
        quant_acts: model.quant_acts().name(),
    })
}

/// Aggregate decode speed with `concurrency` requests decoding together.
#[derive(Debug, Clone, Serialize)]
pub struct BatchBench {
    pub concurrency: usize,
    /// Tokens per second summed over all requests while every one of them was decoding.
    pub aggregate_decode_tokens_per_s: f64,
    /// Each request's own decode speed over the same window.
    pub per_request_decode_tokens_per_s: f64,
    /// Wall time of the whole level, prefills included.
    pub wall_s: f64,
}

/// A tokenizer with no vocabulary to speak of: enough for engines over synthetic weights, whose
/// outputs are never read as text (unknown ids decode to nothing).
const PLACEHOLDER_TOKENIZER: &str = r#"{"version":"1.0","truncation":null,"padding":null,
"added_tokens":[],"normalizer":null,
"pre_tokenizer":{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true},
"post_processor":null,
"decoder":{"type":"ByteLevel","add_prefix_space":true,"trim_offsets":true,"use_regex":true},
"model":{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,
"end_of_word_suffix":null,"fuse_unk":false,"byte_fallback":false,"ignore_merges":false,
"vocab":{"a":0},"merges":[]}}"#;

/// An engine over `model` for benchmarks (placeholder tokenizer, default chat template).
pub fn bench_engine(model: Phi3ForCausalLM) -> Result<crate::Engine> {
    let tokenizer = crate::text::Tokenizer::from_bytes(PLACEHOLDER_TOKENIZER.as_bytes())?;
    let template = crate::text::ChatTemplate::new(
        crate::text::chat::PHI4_CHAT_TEMPLATE,
        "<|endoftext|>",
        "<|endoftext|>",
    )?;
    Ok(crate::Engine::new(
        model,
        tokenizer,
        template,
        &Default::default(),
    ))
}

/// Submits `concurrency` greedy requests at once to a continuous batcher and measures the
/// decode throughput while all of them run (the window from the last first token to the first
/// last token), so prefill time does not dilute the figure.
pub fn run_batched(
    engine: std::sync::Arc<crate::Engine>,
    concurrency: usize,
    prompt_tokens: usize,
    gen_tokens: usize,
) -> Result<BatchBench> {
    use crate::engine::{Batcher, BatcherConfig, Event, Request, SamplingParams};
    let vocab = engine.model.config.vocab_size;
    let batcher = Batcher::spawn(
        engine,
        BatcherConfig {
            max_batch: concurrency,
            max_queue: concurrency,
        },
    );
    let t0 = Instant::now();
    let mut rxs = Vec::new();
    for r in 0..concurrency {
        let prompt = random_prompt(0x9E37_79B9 + r as u64, prompt_tokens, vocab);
        let params = SamplingParams {
            max_tokens: gen_tokens,
            ignore_eos: true,
            ..SamplingParams::greedy(gen_tokens)
        };
        rxs.push(
            batcher
                .submit(Request {
                    prompt,
                    params,
                    ..Default::default()
                })
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
    }
    // Token arrival times per request.
    let stamps: Vec<Vec<Instant>> = std::thread::scope(|scope| {
        let handles: Vec<_> = rxs
            .into_iter()
            .map(|mut rx| {
                scope.spawn(move || -> Result<Vec<Instant>> {
                    let mut t = Vec::new();
                    while let Some(ev) = rx.blocking_recv() {
                        match ev {
                            Event::Step(s) => {
                                t.push(Instant::now());
                                if s.finish.is_some() {
                                    break;
                                }
                            }
                            Event::Error(e) => anyhow::bail!("{e}"),
                            Event::Started => {}
                        }
                    }
                    Ok(t)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("collector thread"))
            .collect::<Result<Vec<_>>>()
    })?;
    let wall_s = t0.elapsed().as_secs_f64();
    let start = stamps.iter().map(|t| t[0]).max().expect("requests");
    let end = stamps
        .iter()
        .map(|t| *t.last().unwrap())
        .min()
        .expect("requests");
    let window = end.duration_since(start).as_secs_f64();
    let tokens: usize = stamps
        .iter()
        .map(|t| t.iter().filter(|&&x| x > start && x <= end).count())
        .sum();
    if window <= 0.0 || tokens == 0 {
        anyhow::bail!("no steady decoding window; raise the number of generated tokens");
    }
    let aggregate = tokens as f64 / window;
    Ok(BatchBench {
        concurrency,
        aggregate_decode_tokens_per_s: aggregate,
        per_request_decode_tokens_per_s: aggregate / concurrency as f64,
        wall_s,
    })
}

/// One image size of the image benchmark: medians over the runs, milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct ImageBench {
    pub width: usize,
    pub height: usize,
    /// Global view + crops through the vision tower.
    pub views: usize,
    pub image_tokens: usize,
    pub prompt_tokens: usize,
    /// Decoding aside: the dynamic-HD processor on the RGB pixels.
    pub preprocess_ms: f64,
    /// Vision tower, pooling, layout and projection.
    pub vision_ms: f64,
    /// The decoder over the whole prompt (vision adapter on), to the first token's logits.
    pub prefill_ms: f64,
    pub time_to_first_token_ms: f64,
    /// Vision-tower matrix products per second (multiply-adds of its linear layers and
    /// attention), to compare with the machine's matrix-product peak.
    pub vision_gmacs: f64,
    pub runs: usize,
}

/// Filler weight `i` of the kernel timings: spread values in [-0.1, 0.1), no file needed.
fn filler_weight(i: usize) -> f32 {
    ((i * 2654435761) % 1999) as f32 * 1e-4 - 0.1
}

/// Filler activation `i` of the kernel timings, in [-0.5, 0.5).
fn filler_act(i: usize) -> f32 {
    ((i * 40503) % 997) as f32 * 1e-3 - 0.5
}

/// The machine's bf16 matrix-product rate as our kernels reach it, G multiply-adds/s: the best
/// of five products of a 4096×4096 bf16 matrix with 1024 activation rows (compute-bound) with
/// `acts` activations; the yardstick for the encoders' efficiency.
pub fn bf16_matmul_peak_gmacs(acts: crate::kernels::bf16::Bf16Acts) -> Result<f64> {
    let (n, rows) = (4096, 1024);
    let w = crate::weights::Tensor::bf16_with(vec![n, n], |v| {
        for (i, x) in v.iter_mut().enumerate() {
            *x = half::bf16::from_f32(filler_weight(i));
        }
    });
    let mut lin = crate::model::Linear::new(w)?;
    lin.set_bf16_acts(acts);
    let x: Vec<f32> = (0..rows * n).map(filler_act).collect();
    let mut y = vec![0f32; rows * n];
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        lin.forward(&x, &mut y);
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok((n * n * rows) as f64 / best / 1e9)
}

/// One quantized product's speed in `phi4 bench --kernels`.
#[derive(Debug, Clone, Serialize)]
pub struct KernelRun {
    pub format: &'static str,
    pub rows: usize,
    pub cols: usize,
    /// Median over the runs, G multiply-adds/s.
    pub gmacs: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct KernelReport {
    pub threads: usize,
    /// The kernels that ran: AVX-512 VNNI, AVX2, NEON or scalar, as the CPU has.
    pub isa: String,
    pub matrix_units: String,
    pub activation_rows: usize,
    pub products: Vec<KernelRun>,
}

/// The quantized products alone: Phi-4-mini's four matrix shapes (qkv, o, gate_up, down:
/// outputs × inputs) in every block format against `m` activation rows (8-bit); median of
/// `runs` after one untimed product.
pub fn run_kernels(m: usize, runs: usize) -> Result<KernelReport> {
    use crate::kernels::quant::{self, QType};
    use crate::kernels::wide_acts::QuantActs;
    use crate::kernels::{matmul, WeightView};
    let mut products = Vec::new();
    for t in QType::ALL {
        for (rows, cols) in [(5120, 3072), (3072, 3072), (16384, 3072), (3072, 8192)] {
            let (rb, nb) = (t.row_bytes(cols), quant::row_blocks(cols));
            let mut qs = vec![0u8; rows * rb];
            let mut d = vec![half::f16::ZERO; rows * nb];
            qs.par_chunks_mut(rb)
                .zip(d.par_chunks_mut(nb))
                .enumerate()
                .for_each(|(r, (q, d))| {
                    let w: Vec<f32> = (0..cols).map(|c| filler_weight(r * cols + c)).collect();
                    quant::quantize_row(t, &w, q, d);
                });
            let x: Vec<f32> = (0..m * cols).map(filler_act).collect();
            let mut y = vec![0f32; m * rows];
            let view = WeightView::Quant {
                t,
                qs: &qs,
                d: &d,
                acts: QuantActs::I8,
            };
            let mut times = Vec::new();
            for rep in 0..=runs {
                let start = Instant::now();
                matmul(view, rows, cols, &x, &mut y);
                if rep > 0 {
                    times.push(start.elapsed().as_secs_f64());
                }
            }
            products.push(KernelRun {
                format: t.name(),
                rows,
                cols,
                gmacs: (rows * cols * m) as f64 / median(times) / 1e9,
            });
        }
    }
    Ok(KernelReport {
        threads: rayon::current_num_threads(),
        isa: crate::kernels::quant::isa_name().into(),
        matrix_units: crate::kernels::amx::status().describe(),
        activation_rows: m,
        products,
    })
}

/// Multiply-adds of the vision tower over `views` crops (linear layers and attention).
pub fn vision_macs(c: &crate::config::multimodal::VisionConfig, views: usize) -> f64 {
    let n = c.patches_per_side().pow(2) as f64;
    let (h, i) = (c.hidden_size as f64, c.intermediate_size as f64);
    let pdim = (c.num_channels * c.patch_size * c.patch_size) as f64;
    let per_layer = n * (4.0 * h * h + 2.0 * h * i) + 2.0 * n * n * h;
    views as f64 * (n * pdim * h + c.layers_used() as f64 * per_layer)
}

/// Time to first token for one image of each size with a `text_tokens`-token text prompt,
/// split into preprocess / vision tower / prefill (spec: the image's tokens after the text).
pub fn run_images(
    lm: &Phi3ForCausalLM,
    image_embed: &crate::model::phi4mm::image_embed::ImageEmbedding,
    image_token_id: u32,
    sizes: &[(usize, usize)],
    text_tokens: usize,
    runs: usize,
) -> Result<Vec<ImageBench>> {
    use crate::media::{dynamic_hd, RgbImage};
    let mut out = Vec::new();
    for &(w, h) in sizes {
        // A textured picture: the processor's cost depends on the sizes only.
        let data = (0..w * h * 3)
            .map(|i| ((i * 2654435761usize) >> 13) as u8)
            .collect();
        let img = RgbImage::new(w, h, data)?;
        let (mut pre, mut vis, mut fill) = (Vec::new(), Vec::new(), Vec::new());
        let mut shape = (0, 0, 0);
        for r in 0..runs {
            let t0 = Instant::now();
            let p = dynamic_hd::preprocess(&img, dynamic_hd::DEFAULT_MAX_CROPS)?;
            let t1 = Instant::now();
            let rows = image_embed.forward(&p)?;
            let t2 = Instant::now();
            let text = random_prompt(7 + r as u64, text_tokens, lm.config.vocab_size.min(199_999));
            let mut ids = vec![image_token_id; p.num_tokens()];
            ids.extend(text);
            let embeds = crate::model::InputEmbeds::new(
                (0..p.num_tokens()).collect(),
                rows,
                lm.config.hidden_size,
            )?;
            let mut cache = lm.new_cache();
            let item = crate::model::BatchItem {
                adapter: Some(crate::model::phi4mm::VISION),
                embeds: Some(&embeds),
                ..crate::model::BatchItem::new(&ids, &mut cache, lm.rope.table_for_len(ids.len()))
            };
            let mut logits = Vec::new();
            lm.forward_item(item, Logits::Last, None, &mut logits)?;
            std::hint::black_box(argmax(&logits));
            let t3 = Instant::now();
            pre.push((t1 - t0).as_secs_f64() * 1e3);
            vis.push((t2 - t1).as_secs_f64() * 1e3);
            fill.push((t3 - t2).as_secs_f64() * 1e3);
            shape = (p.views(), p.num_tokens(), ids.len());
        }
        let vision_ms = median(vis);
        out.push(ImageBench {
            width: w,
            height: h,
            views: shape.0,
            image_tokens: shape.1,
            prompt_tokens: shape.2,
            preprocess_ms: median(pre.clone()),
            vision_ms,
            prefill_ms: median(fill.clone()),
            time_to_first_token_ms: median(
                pre.iter()
                    .zip(&fill)
                    .map(|(a, b)| a + b)
                    .collect::<Vec<_>>(),
            ) + vision_ms,
            vision_gmacs: vision_macs(&image_embed.img_processor.config, shape.0) / vision_ms / 1e6,
            runs,
        });
    }
    Ok(out)
}

/// The speech path for one clip length: medians over the runs, milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct AudioBench {
    pub seconds: f64,
    /// Clips transcribed as windows of one recording (decoded together); the times below are
    /// for all of them, the time to first token for one.
    pub windows: usize,
    pub audio_tokens: usize,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    /// Log-mel features from the 16 kHz samples (decoding and resampling aside).
    pub features_ms: f64,
    /// Conformer encoder and the speech projection.
    pub encoder_ms: f64,
    /// The decoder over the prompt (speech adapter on), to the first token's logits.
    pub prefill_ms: f64,
    /// `gen_tokens` decode steps with the speech adapter.
    pub decode_ms: f64,
    pub time_to_first_token_ms: f64,
    /// Seconds of compute per second of audio, end to end (features to the last token).
    pub real_time_factor: f64,
    /// Audio seconds per second of feature extraction.
    pub features_x_real_time: f64,
    /// Encoder matrix-product rate (multiply-adds of its linear layers, convolutions and
    /// attention), to compare with the machine's matrix-product peak.
    pub encoder_gmacs: f64,
    pub runs: usize,
}

/// Multiply-adds of the speech encoder (subsampling, blocks, one projection) for `frames`
/// feature frames.
pub fn audio_macs(
    c: &crate::config::multimodal::AudioConfig,
    frames: usize,
    lm_hidden: usize,
) -> f64 {
    let ch = c.nemo_conv_channels as f64;
    let (mut t, mut f) = (frames as f64, c.input_size as f64);
    let mut macs = 0.0;
    for s in 0..c.subsampling_stages() {
        t = (t / 2.0).ceil();
        f = (f / 2.0).ceil();
        macs += t * f * ch * 9.0; // the 3×3 taps (full from one channel, or depthwise)
        if s > 0 {
            macs += t * f * ch * ch; // pointwise
        }
    }
    let h = c.hidden_size as f64;
    let i = c.intermediate_size as f64;
    macs += t * ch * f * h; // the linear over (channel, frequency)
    let win = t.min(crate::model::phi4mm::conformer::MAX_SEQ_LEN as f64);
    let per_block = t * (2.0 * (h * 2.0 * i + i * h) + 4.0 * h * h + 2.0 * h * h + 2.0 * h * h)
        + 2.0 * t * win * h;
    macs += c.num_blocks as f64 * per_block;
    let lm = lm_hidden as f64;
    macs + t * (h * lm + lm * lm)
}

/// Time to first token and real-time factor for clips of each length (synthetic speech-like
/// noise), with the transcription instruction as the text and `gen_tokens` decoded tokens. With
/// `windows` > 1, that many clips are transcribed as one long recording's windows are: each
/// encoded and prefilled in turn, then all decoded together; the times are for all of them and
/// the real-time factor is over their total length. `adapter`: the speech adapter's id, or
/// `None` when it is merged into the weights.
#[allow(clippy::too_many_arguments)]
pub fn run_audio(
    lm: &Phi3ForCausalLM,
    audio_embed: &crate::model::phi4mm::audio_embed::AudioEmbedding,
    audio_token_id: u32,
    seconds: &[f64],
    gen_tokens: usize,
    runs: usize,
    windows: usize,
    adapter: Option<crate::model::AdapterId>,
) -> Result<Vec<AudioBench>> {
    use crate::media::{log_mel, LogMel};
    use crate::model::phi4mm::audio_embed::Projection;
    use crate::model::BatchItem;
    let mel = LogMel::new();
    let windows = windows.max(1);
    let mut out = Vec::new();
    for &secs in seconds {
        let n = (secs * 16000.0) as usize;
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        let samples: Vec<f32> = (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let env = ((i % 8000) as f32 / 8000.0 * std::f32::consts::PI).sin();
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.3 * env
            })
            .collect();
        let tokens = log_mel::num_tokens(n);
        let (mut fe, mut enc, mut fill, mut dec) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut prompt_len = 0;
        for r in 0..runs {
            let (mut f_ms, mut e_ms, mut p_ms) = (0.0, 0.0, 0.0);
            let mut caches = Vec::with_capacity(windows);
            let mut toks = Vec::with_capacity(windows);
            let mut table = None;
            for w in 0..windows {
                let t0 = Instant::now();
                let feats = mel.features(&samples);
                let t1 = Instant::now();
                let rows = audio_embed.forward(&feats, Projection::Speech);
                let t2 = Instant::now();
                // <|user|> audio "Transcribe the audio clip into text." <|end|><|assistant|>:
                // 12 text tokens around the audio.
                let top = lm.config.vocab_size as u32 - 1;
                let mut ids = vec![200021u32.min(top)];
                ids.extend(std::iter::repeat_n(audio_token_id, tokens));
                ids.extend(random_prompt(
                    11 + (r * windows + w) as u64,
                    9,
                    lm.config.vocab_size,
                ));
                ids.extend([200020u32.min(top), 200019u32.min(top)]);
                prompt_len = ids.len();
                let embeds = crate::model::InputEmbeds::new(
                    (1..1 + tokens).collect(),
                    rows,
                    lm.config.hidden_size,
                )?;
                let t = lm.rope.table_for_len(ids.len() + gen_tokens);
                table = Some(t);
                let mut cache = lm.new_cache();
                let item = BatchItem {
                    adapter,
                    embeds: Some(&embeds),
                    ..BatchItem::new(&ids, &mut cache, t)
                };
                let mut logits = Vec::new();
                lm.forward_item(item, Logits::Last, None, &mut logits)?;
                toks.push(argmax(&logits));
                caches.push(cache);
                let t3 = Instant::now();
                f_ms += (t1 - t0).as_secs_f64() * 1e3;
                e_ms += (t2 - t1).as_secs_f64() * 1e3;
                p_ms += (t3 - t2).as_secs_f64() * 1e3;
            }
            let table = table.expect("at least one window");
            let t3 = Instant::now();
            for _ in 1..gen_tokens {
                let steps: Vec<[u32; 1]> = toks.iter().map(|&t| [t]).collect();
                let mut items: Vec<BatchItem> = caches
                    .iter_mut()
                    .zip(&steps)
                    .map(|(c, step)| BatchItem {
                        adapter,
                        ..BatchItem::new(step, c, table)
                    })
                    .collect();
                let logits = lm.forward_batch(&mut items)?;
                for (t, l) in toks.iter_mut().zip(&logits) {
                    *t = argmax(l);
                }
            }
            let t4 = Instant::now();
            fe.push(f_ms);
            enc.push(e_ms);
            fill.push(p_ms);
            dec.push((t4 - t3).as_secs_f64() * 1e3);
        }
        let total: Vec<f64> = (0..runs)
            .map(|i| fe[i] + enc[i] + fill[i] + dec[i])
            .collect();
        let ttft: Vec<f64> = (0..runs)
            .map(|i| (fe[i] + enc[i] + fill[i]) / windows as f64)
            .collect();
        let (features_ms, encoder_ms) = (median(fe), median(enc));
        out.push(AudioBench {
            seconds: secs,
            windows,
            audio_tokens: tokens,
            prompt_tokens: prompt_len,
            gen_tokens,
            features_ms,
            encoder_ms,
            prefill_ms: median(fill),
            decode_ms: median(dec),
            time_to_first_token_ms: median(ttft),
            real_time_factor: median(total) / 1e3 / (secs * windows as f64),
            features_x_real_time: secs * windows as f64 * 1e3 / features_ms,
            encoder_gmacs: windows as f64
                * audio_macs(
                    &audio_embed.encoder.config,
                    log_mel::num_frames(n),
                    lm.config.hidden_size,
                )
                / encoder_ms
                / 1e6,
            runs,
        });
    }
    Ok(out)
}

/// One LoRA training step's speed and memory (`phi4 bench --train`).
#[derive(Debug, Clone, Serialize)]
pub struct TrainBench {
    pub seq: usize,
    pub layers: usize,
    pub threads: usize,
    pub gradient_checkpointing: bool,
    /// Median over the timed steps.
    pub step_s: f64,
    pub tokens_per_s: f64,
    pub peak_rss_mb: Option<f64>,
}

/// Times optimizer steps of a LoRA (r 8, alpha 32, every projection, no dropout) on one
/// sample of `seq` random tokens, every position labelled (as `bench_train_peft.py` does):
/// one warm-up step, then `runs` timed ones.
pub fn run_train(
    model: &Phi3ForCausalLM,
    seq: usize,
    runs: usize,
    gradient_checkpointing: bool,
) -> Result<TrainBench> {
    use crate::train::{
        LoraParams, LoraSettings, Sample, Schedule, TargetModules, TrainConfig, Trainer,
    };
    let settings = LoraSettings {
        r: 8,
        alpha: 32.0,
        dropout: 0.0,
        use_rslora: false,
        targets: TargetModules::parse(&["all-linear".to_string()])?,
    };
    let params = LoraParams::init(model, settings, 0)?;
    let ids = random_prompt(7, seq, model.config.vocab_size);
    let sample = Sample {
        labels: ids.iter().map(|&t| t as i32).collect(),
        input_ids: ids,
        origin: "bench".into(),
    };
    let cfg = TrainConfig {
        learning_rate: 1e-4,
        num_train_epochs: 1.0,
        max_steps: Some(runs as u64 + 1),
        per_device_train_batch_size: 1,
        gradient_accumulation_steps: 1,
        weight_decay: 0.1,
        adam_beta1: 0.9,
        adam_beta2: 0.95,
        adam_epsilon: 1e-8,
        lr_scheduler_type: Schedule::Cosine,
        warmup_ratio: 0.0,
        warmup_steps: None,
        max_grad_norm: 1.0,
        seed: 0,
        shuffle: false,
        gradient_checkpointing,
    };
    let samples = [sample];
    let mut t = Trainer::new(model, cfg, params, 1)?;
    reset_peak_rss();
    t.step(&samples)?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t0 = Instant::now();
        t.step(&samples)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let step_s = times[times.len() / 2];
    Ok(TrainBench {
        seq,
        layers: model.config.num_hidden_layers,
        threads: rayon::current_num_threads(),
        gradient_checkpointing,
        step_s,
        tokens_per_s: seq as f64 / step_s,
        peak_rss_mb: peak_rss_mb(),
    })
}
