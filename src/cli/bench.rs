use super::*;

#[derive(Args)]
pub(super) struct BenchArgs {
    /// Benchmark this checkpoint (directory or repo id).
    #[arg(long, conflicts_with = "synthetic")]
    model: Option<String>,
    /// Random weights of the real Phi-4-mini shapes (bf16); no files needed.
    #[arg(long)]
    synthetic: bool,
    /// Quantize the weights first: a recipe of `phi4 quantize` (q8, q6, q5m, q5, q4m, q4, q4-edge or a mix).
    #[arg(long, value_parser = parse_recipe)]
    quant: Option<Recipe>,
    /// With --synthetic: write the (quantized, with --quant) weights and config.json to this
    /// directory instead of benchmarking, for `--model DIR` and other engines to read.
    #[arg(long, requires = "synthetic")]
    save: Option<PathBuf>,
    #[command(flatten)]
    opts: ModelOptions,
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long)]
    json: bool,
    /// Measure aggregate decode throughput of the continuous batcher at these numbers of
    /// simultaneous requests (e.g. 1,4,16) instead of the single-stream figures.
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Phi-4-multimodal's image path instead (repeatable, WIDTHxHEIGHT): time to first token
    /// for one image of each size with a --prompt-tokens text prompt, split into preprocess /
    /// vision tower / prefill. With --synthetic: random Phi-4-multimodal weights.
    #[arg(long = "image", value_parser = parse_size, value_name = "WxH")]
    images: Vec<(usize, usize)>,
    /// Phi-4-multimodal's speech path instead (repeatable, seconds of audio): time to first
    /// token and real-time factor with --gen-tokens output tokens, split into features /
    /// encoder / prefill / decode. With --synthetic: random Phi-4-multimodal weights.
    #[arg(long = "audio", value_name = "SECONDS")]
    audios: Vec<f64>,
    /// With --audio: transcribe that many clips as the windows of one long recording are
    /// (encoded and prefilled in turn, decoded together).
    #[arg(long, default_value_t = 1)]
    windows: usize,
    /// With --synthetic --audio: fold the speech adapter into the decoder's weights before
    /// quantizing (`phi4 transcribe --merge-adapter`).
    #[arg(long, requires = "synthetic")]
    merge_adapter: bool,
    /// With --synthetic --save: Phi-4-multimodal weights (transformers' layout, bf16) instead.
    #[arg(long)]
    multimodal: bool,
    /// One LoRA training step instead (r 8, every projection, --prompt-tokens labelled tokens
    /// per step): trained tokens/s and peak memory.
    #[arg(long)]
    train: bool,
    /// With --train: keep every layer's activations instead of recomputing them.
    #[arg(long, requires = "train")]
    no_checkpointing: bool,
    /// The quantized product kernels alone instead, no model: G multiply-adds/s for Phi-4-mini's
    /// matrix shapes in every block format at --prompt-tokens activation rows.
    #[arg(long, conflicts_with_all = ["model", "synthetic"])]
    kernels: bool,
    /// With --synthetic: only this many decoder layers (per-layer figures in less time).
    #[arg(long, requires = "synthetic")]
    layers: Option<usize>,
}

fn bench_kernels(a: BenchArgs) -> Result<()> {
    let r = phi4::bench::run_kernels(a.prompt_tokens, a.runs)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "threads: {}, {} activation rows, median of {} runs",
        r.threads, r.activation_rows, a.runs
    );
    println!("kernels: {}; {}", r.isa, r.matrix_units);
    for k in &r.products {
        println!(
            "{:>3} {:>5} x {:<5}: {:>7.1} G multiply-adds/s",
            k.format, k.rows, k.cols, k.gmacs
        );
    }
    Ok(())
}

pub(super) fn parse_size(s: &str) -> Result<(usize, usize)> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .with_context(|| format!("image size {s:?} is not WIDTHxHEIGHT"))?;
    let (w, h): (usize, usize) = (
        w.parse().with_context(|| format!("image width in {s:?}"))?,
        h.parse()
            .with_context(|| format!("image height in {s:?}"))?,
    );
    if w == 0 || h == 0 || w * h > 100_000_000 {
        bail!("image size {s:?} must be between 1x1 and 100 Mpixel");
    }
    Ok((w, h))
}

pub(super) fn bench_cmd(a: BenchArgs) -> Result<()> {
    if a.prompt_tokens == 0 || a.gen_tokens == 0 || a.runs == 0 {
        bail!("--prompt-tokens, --gen-tokens and --runs must be at least 1");
    }
    if !a.images.is_empty() || !a.audios.is_empty() || a.multimodal {
        return bench_images(a);
    }
    if a.kernels {
        return bench_kernels(a);
    }
    let mut engine = None;
    let mut synthetic = None;
    let (model, label): (&Phi3ForCausalLM, String) = match (&a.model, a.synthetic) {
        (Some(m), _) if !a.concurrency.is_empty() => {
            let e: &Engine = engine.insert(load_engine(m, a.quant, &a.opts)?);
            (&e.model, m.clone())
        }
        (Some(m), _) if is_gguf(m) => {
            let mut model = phi4::model::gguf::GgufFile::open(Path::new(m))?.model(a.quant)?;
            a.opts.apply(&mut model);
            (synthetic.insert(model), m.clone())
        }
        (Some(m), _) => {
            // Single-stream figures need only the weights: no tokenizer or template.
            let mut model = load_model(&resolve_model(m)?, a.quant)?;
            a.opts.apply(&mut model);
            (synthetic.insert(model), m.clone())
        }
        (None, true) => {
            eprintln!("building synthetic Phi-4-mini weights (bf16, random)...");
            let mut config = Phi3Config::phi4_mini();
            if let Some(l) = a.layers {
                if l == 0 || l > config.num_hidden_layers {
                    bail!(
                        "--layers must be between 1 and {}",
                        config.num_hidden_layers
                    );
                }
                config.num_hidden_layers = l;
            }
            let mut m = Phi3ForCausalLM::synthetic(config, 1);
            let format = match a.quant {
                Some(r) => {
                    eprintln!("quantizing ({})...", r.name());
                    m.quantize(r)?;
                    r.name()
                }
                None => "bf16".into(),
            };
            if let Some(dir) = &a.save {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                std::fs::write(dir.join("config.json"), phi4::config::PHI4_MINI_CONFIG)?;
                phi4::model::quantize::write_checkpoint(&m, a.quant, dir)?;
                eprintln!("wrote {} ({format})", dir.display());
                return Ok(());
            }
            a.opts.apply(&mut m);
            let s: &Phi3ForCausalLM = synthetic.insert(m);
            (s, format!("synthetic Phi-4-mini {format}"))
        }
        (None, false) => bail!("give --model M or --synthetic"),
    };
    let ctx = model.config.max_position_embeddings;
    if a.prompt_tokens + a.gen_tokens > ctx {
        bail!("--prompt-tokens plus --gen-tokens exceed the model's context ({ctx})");
    }
    if !a.concurrency.is_empty() {
        return bench_batched(a, engine_for_batching(engine, synthetic)?);
    }
    if a.train {
        let r = phi4::bench::run_train(model, a.prompt_tokens, a.runs, !a.no_checkpointing)?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            println!(
                "model: {label} ({} layers), threads: {}, LoRA r 8 all-linear, checkpointing {}",
                r.layers, r.threads, r.gradient_checkpointing
            );
            println!(
                "train step ({} tokens): {:.2} s = {:.2} tok/s   peak RSS {:.0} MB",
                r.seq,
                r.step_s,
                r.tokens_per_s,
                r.peak_rss_mb.unwrap_or(f64::NAN)
            );
        }
        return Ok(());
    }
    let report = phi4::bench::run(
        model,
        &BenchOptions {
            prompt_tokens: a.prompt_tokens,
            gen_tokens: a.gen_tokens,
            runs: a.runs,
        },
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("model: {label}, threads: {}", report.threads);
        println!("{}", report.matrix_units);
        println!(
            "prefill ({} tokens): {:.2} tok/s   time to first token: {:.0} ms",
            report.prompt_tokens, report.prefill_tokens_per_s, report.time_to_first_token_ms
        );
        println!(
            "decode ({} tokens): {:.2} tok/s   ceiling {:.2} tok/s ({:.1} GB/s over {:.2} GB of weights) = {:.0}%",
            report.gen_tokens,
            report.decode_tokens_per_s,
            report.decode_ceiling_tokens_per_s,
            report.memory_bandwidth_gb_s,
            report.weight_bytes_per_token as f64 / 1e9,
            100.0 * report.decode_fraction_of_ceiling
        );
        if let (Some(read), Some(frac)) = (
            report.weight_read_gb_s,
            report.decode_fraction_of_weight_read,
        ) {
            println!(
                "decode vs a plain read of the same weights beside every {}th step ({read:.1} GB/s): {:.0}%",
                phi4::bench::READ_EVERY,
                100.0 * frac
            );
        }
        if let Some(rss) = report.peak_rss_mb {
            println!("peak RSS: {rss:.0} MB");
        }
        println!(
            "KV cache: {} ({:.1} MB)   activations against bf16 weights: {}, against quantized ones: {}",
            report.kv_cache, report.kv_cache_mb, report.bf16_acts, report.quant_acts
        );
        println!(
            "runs (median reported): {:?}",
            report
                .runs
                .iter()
                .map(|r| (r.prefill_tokens_per_s * 10.0).round() / 10.0)
                .collect::<Vec<_>>()
        );
    }
    Ok(())
}

pub(super) fn bench_images(a: BenchArgs) -> Result<()> {
    use phi4::config::multimodal::Phi4MMConfig;
    use phi4::model::phi4mm::Phi4MMForCausalLM;
    let mut synthetic = None;
    let mut engine = None;
    let (lm, image_embed, audio_embed, ids, label) = match (&a.model, a.synthetic) {
        (None, true) => {
            eprintln!(
                "building synthetic Phi-4-multimodal weights (bf16, random, both adapters)..."
            );
            let mut m = Phi4MMForCausalLM::synthetic(Phi4MMConfig::phi4_multimodal(), 1)?;
            if let Some(dir) = &a.save {
                if a.quant.is_some() {
                    bail!("--save with --multimodal writes bf16 weights (for transformers); leave out --quant");
                }
                phi4::model::phi4mm::write_native(&m, dir)?;
                eprintln!("wrote {} (transformers' layout, bf16)", dir.display());
                return Ok(());
            }
            if a.merge_adapter {
                eprintln!("merging the speech adapter into the decoder...");
                phi4::model::phi4mm::merge_adapter(&mut m.lm, phi4::model::phi4mm::SPEECH)?;
            }
            let format = match a.quant {
                Some(r) => {
                    eprintln!("quantizing the decoder ({})...", r.name());
                    m.lm.quantize(r)?;
                    r.name()
                }
                None => "bf16".into(),
            };
            a.opts.apply(&mut m.lm);
            m.image_embed.set_bf16_acts(a.opts.bf16_acts);
            if let Some(ae) = &mut m.audio_embed {
                ae.set_bf16_acts(a.opts.bf16_acts);
            }
            let m = synthetic.insert(m);
            let id = m.image_token_id();
            (
                &m.lm,
                &m.image_embed,
                m.audio_embed.as_ref(),
                (id, m.audio_token_id()),
                format!(
                    "synthetic Phi-4-multimodal {format}{}",
                    if a.merge_adapter {
                        ", speech adapter merged"
                    } else {
                        ""
                    }
                ),
            )
        }
        (Some(path), _) => {
            let e: &Engine = engine.insert(load_engine(path, a.quant, &a.opts)?);
            let mm = e.multimodal()?;
            (
                &e.model,
                &mm.image_embed,
                mm.audio_embed.as_ref(),
                (mm.config.vision.image_token_id, mm.config.audio_token_id),
                path.clone(),
            )
        }
        (None, false) => bail!("give --model M or --synthetic"),
    };
    let (image_id, audio_id) = ids;
    if !a.audios.is_empty() {
        let audio_embed = audio_embed.context("this checkpoint has no speech encoder")?;
        if a.audios.iter().any(|&s| !(0.1..=3600.0).contains(&s)) {
            bail!("--audio takes seconds of audio between 0.1 and 3600");
        }
        let results = phi4::bench::run_audio(
            lm,
            audio_embed,
            audio_id,
            &a.audios,
            a.gen_tokens,
            a.runs,
            a.windows,
            (!a.merge_adapter).then_some(phi4::model::phi4mm::SPEECH),
        )?;
        let peak_gmacs = phi4::bench::bf16_matmul_peak_gmacs(a.opts.bf16_acts)?;
        if a.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "model": label, "threads": rayon::current_num_threads(), "audio": results,
                    "bf16_matmul_peak_gmacs": peak_gmacs, "bf16_acts": a.opts.bf16_acts.name(),
                    "peak_rss_mb": phi4::bench::peak_rss_mb(),
                }))?
            );
        } else {
            println!("model: {label}, threads: {}", rayon::current_num_threads());
            for r in &results {
                if r.windows > 1 {
                    println!(
                        "{} windows of {:.1} s decoded together: features {:.0} + encoder {:.0} + prefill {:.0} + decode {:.0} ms; real-time factor {:.3} over {:.0} s (median of {})",
                        r.windows, r.seconds, r.features_ms, r.encoder_ms, r.prefill_ms, r.decode_ms,
                        r.real_time_factor, r.seconds * r.windows as f64, r.runs
                    );
                    continue;
                }
                println!(
                    "{:.1} s audio ({} audio + {} text tokens, {} generated): time to first token {:.0} ms = features {:.1} ({:.0}x real time) + encoder {:.0} ({:.1} G MAC/s, {:.0}% of the bf16 product peak) + prefill {:.0}; decode {:.0} ms; real-time factor {:.3} (median of {})",
                    r.seconds, r.audio_tokens, r.prompt_tokens - r.audio_tokens, r.gen_tokens,
                    r.time_to_first_token_ms, r.features_ms, r.features_x_real_time, r.encoder_ms,
                    r.encoder_gmacs, 100.0 * r.encoder_gmacs / peak_gmacs, r.prefill_ms,
                    r.decode_ms, r.real_time_factor, r.runs
                );
            }
            println!(
                "bf16 matrix-product peak ({} activations): {peak_gmacs:.1} G MAC/s",
                a.opts.bf16_acts.name()
            );
        }
        if a.images.is_empty() {
            return Ok(());
        }
    }
    if a.images.is_empty() {
        bail!("give the image sizes to time with --image WIDTHxHEIGHT (e.g. 448x448) or audio lengths with --audio SECONDS");
    }
    phi4::bench::reset_peak_rss();
    let results = phi4::bench::run_images(
        lm,
        image_embed,
        image_id,
        &a.images,
        a.prompt_tokens,
        a.runs,
    )?;
    let peak_gmacs = phi4::bench::bf16_matmul_peak_gmacs(a.opts.bf16_acts)?;
    let tensor_bytes = |v: Vec<(String, phi4::weights::Tensor)>| -> usize {
        v.iter().map(|(_, t)| t.nbytes()).sum()
    };
    let lora_bytes: usize = lm
        .model
        .layers
        .iter()
        .flat_map(|l| l.linears())
        .flat_map(|(_, lin)| lin.lora().iter())
        .map(|d| d.a.weight().nbytes() + d.b.weight().nbytes())
        .sum();
    let weights_mb = (tensor_bytes(lm.named_tensors())
        + lora_bytes
        + tensor_bytes(image_embed.named_tensors())) as f64
        / 1e6;
    let peak = phi4::bench::peak_rss_mb();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "model": label, "threads": rayon::current_num_threads(),
                "text_tokens": a.prompt_tokens, "images": results,
                "weights_mb": weights_mb, "adapters_mb": lora_bytes as f64 / 1e6,
                "peak_rss_mb": peak, "bf16_matmul_peak_gmacs": peak_gmacs,
                "bf16_acts": a.opts.bf16_acts.name(),
            }))?
        );
    } else {
        println!("model: {label}, threads: {}", rayon::current_num_threads());
        for r in &results {
            println!(
                "{}x{}: {} views, {} image + {} text tokens: time to first token {:.0} ms = preprocess {:.0} + vision {:.0} ({:.1} G MAC/s, {:.0}% of the bf16 product peak) + prefill {:.0} ms (median of {})",
                r.width, r.height, r.views, r.image_tokens, r.prompt_tokens - r.image_tokens,
                r.time_to_first_token_ms, r.preprocess_ms, r.vision_ms, r.vision_gmacs,
                100.0 * r.vision_gmacs / peak_gmacs, r.prefill_ms, r.runs
            );
        }
        println!(
            "bf16 matrix-product peak ({} activations): {peak_gmacs:.1} G MAC/s",
            a.opts.bf16_acts.name()
        );
        println!(
            "weights {weights_mb:.0} MB (adapters {:.0} MB, unmerged); peak RSS {}",
            lora_bytes as f64 / 1e6,
            peak.map_or("n/a".into(), |p| format!("{p:.0} MB"))
        );
    }
    Ok(())
}

pub(super) fn engine_for_batching(
    engine: Option<Engine>,
    synthetic: Option<Phi3ForCausalLM>,
) -> Result<Engine> {
    match (engine, synthetic) {
        (Some(e), _) => Ok(e),
        (None, Some(m)) => phi4::bench::bench_engine(m),
        (None, None) => bail!("no model to benchmark"),
    }
}

pub(super) fn bench_batched(a: BenchArgs, engine: Engine) -> Result<()> {
    if a.concurrency.contains(&0) {
        bail!("--concurrency levels must be at least 1");
    }
    let engine = std::sync::Arc::new(engine);
    let mut results = Vec::new();
    for &c in &a.concurrency {
        let mut runs = Vec::new();
        for _ in 0..a.runs {
            runs.push(phi4::bench::run_batched(
                engine.clone(),
                c,
                a.prompt_tokens,
                a.gen_tokens,
            )?);
        }
        runs.sort_by(|x, y| {
            x.aggregate_decode_tokens_per_s
                .total_cmp(&y.aggregate_decode_tokens_per_s)
        });
        let median = runs[runs.len() / 2].clone();
        if !a.json {
            println!(
                "concurrency {c:>3}: aggregate decode {:.2} tok/s ({:.2} per request), runs {:?}",
                median.aggregate_decode_tokens_per_s,
                median.per_request_decode_tokens_per_s,
                runs.iter()
                    .map(|r| (r.aggregate_decode_tokens_per_s * 100.0).round() / 100.0)
                    .collect::<Vec<_>>()
            );
        }
        results.push(median);
    }
    let base = results[0].aggregate_decode_tokens_per_s;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        for r in &results[1..] {
            println!(
                "concurrency {} / concurrency {}: {:.2}x",
                r.concurrency,
                results[0].concurrency,
                r.aggregate_decode_tokens_per_s / base
            );
        }
    }
    Ok(())
}
