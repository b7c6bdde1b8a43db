use super::*;

#[derive(Args)]
pub(super) struct QuantizeArgs {
    /// A local model directory or a Hugging Face repo id.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// Output directory (created; must not already hold a model.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// q5 (the default: 5.5 bits per weight, smaller than q4-edge with half its KL or less on
    /// SmolLM2 and on synthetic Phi-4-mini, BENCHMARKS.md issue 25), q8, q6, q5m / q4m (q5's / q4's
    /// bytes with a zero point per block: less loss than q5 / q4 on trained weights), q4, q4-edge (4-bit with down_proj and the
    /// embeddings / LM head at 8 bits),
    /// or a format with named classes in another, 8 bits unless given, as q4+qkv_proj+embed or
    /// q5+qkv_proj:q6+embed:q6 (classes: qkv_proj, o_proj, gate_up_proj, down_proj, embed;
    /// embed is the embeddings and the LM head), and layers of a class in another still, as
    /// q5+down_proj:q6+down_proj@0-9,29:q8 (layers from 0; lists and ranges).
    #[arg(long, value_parser = parse_recipe, default_value = "q5")]
    recipe: Recipe,
    /// Calibration text (UTF-8): the float model runs over it first, and each 4-, 5- or 6-bit
    /// matrix's scales are chosen to minimise its rounding error weighted by the mean square of
    /// the activations each column met (llama.cpp's importance matrix, computed by phi4 itself).
    /// Use text like what the model will see, and not the text you evaluate on.
    #[arg(long, value_name = "FILE")]
    calibration: Option<PathBuf>,
    /// With --calibration: tokens per window (each run from an empty cache).
    #[arg(long, default_value_t = 512, requires = "calibration")]
    calibration_ctx: usize,
    /// With --calibration: at most this many windows.
    #[arg(long, default_value_t = 32, requires = "calibration")]
    calibration_windows: usize,
    /// With --calibration, instead of --recipe: the formats per class, or per class and third
    /// of the layers, with the least KL within this many bits per weight of the quantized
    /// matrices (q4 is 4.5, q5 5.5, q6 6.5, q8 8.5): each class's sensitivity in each third of
    /// the layers is measured on the first calibration window against the float model, each
    /// matrix's rounding error in each format computed, and the best predicted candidates
    /// scored.
    #[arg(
        long,
        value_name = "BITS",
        requires = "calibration",
        conflicts_with = "recipe"
    )]
    mix_budget: Option<f64>,
}

pub(super) fn quantize_cmd(a: QuantizeArgs) -> Result<()> {
    if is_gguf(&a.model) {
        bail!("phi4 quantize reads Hugging Face safetensors checkpoints; run a GGUF file directly (--model FILE.gguf, with --quant to re-quantize its float tensors)");
    }
    let dir = resolve_model(&a.model)?;
    if a.out.join("model.safetensors").exists() {
        bail!(
            "{} already holds a model.safetensors; choose an empty directory",
            a.out.display()
        );
    }
    if let Some(b) = a.mix_budget {
        if !(b.is_finite() && b >= 4.5) {
            bail!("--mix-budget must be at least 4.5 bits per weight (q4's), got {b}");
        }
    }
    let what = match a.mix_budget {
        Some(b) => format!("a mix within {b} bits per weight"),
        None => a.recipe.name().into_owned(),
    };
    eprintln!("quantizing {} ({what})...", dir.display());
    let config_text = std::fs::read_to_string(dir.join("config.json"))
        .with_context(|| format!("reading {}", dir.join("config.json").display()))?;
    if phi4::config::multimodal::Phi4MMConfig::is_multimodal(&config_text) {
        if a.calibration.is_some() {
            bail!("--calibration quantizes text models; Phi-4-multimodal's decoder serves several adapters, so quantize it without");
        }
        let cfg = phi4::config::multimodal::Phi4MMConfig::from_json(&config_text)?;
        phi4::model::phi4mm::write_quantized(&dir, cfg, a.recipe, &a.out)?;
        eprintln!(
            "wrote {} ({}: the decoder quantized; vision tower, projections, speech encoder and adapters as stored)",
            a.out.display(),
            a.recipe.name()
        );
        return Ok(());
    }
    let mut notes = Vec::new();
    let (model, recipe) = match &a.calibration {
        None => (load_model(&dir, Some(a.recipe))?, a.recipe),
        Some(file) => {
            let (model, note, recipe) = calibrated(&a, &dir, file)?;
            notes.push((phi4::model::quantize::CALIBRATION_KEY, note));
            (model, recipe)
        }
    };
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    phi4::model::quantize::write_checkpoint_with(&model, Some(recipe), &notes, &a.out)?;
    // Everything but the weights travels unchanged: config, tokenizer, chat template.
    phi4::model::quantize::copy_beside_weights(&dir, &a.out, false)?;
    let bytes = model.weight_bytes();
    eprintln!(
        "wrote {} ({}, {:.2} GB of weights read per token)",
        a.out.display(),
        recipe.name(),
        bytes as f64 / 1e9
    );
    Ok(())
}

/// The float model run over the calibration text, then quantized with the importances it
/// collected (as --recipe says, or the mix --mix-budget finds); a note of what it was
/// calibrated on, for the checkpoint's metadata; and the recipe.
fn calibrated(
    a: &QuantizeArgs,
    dir: &Path,
    file: &Path,
) -> Result<(Phi3ForCausalLM, String, Recipe)> {
    if a.calibration_windows == 0 {
        bail!("--calibration-windows must be at least 1");
    }
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| anyhow::anyhow!("{} is not valid UTF-8 ({e})", file.display()))?;
    let opts = ModelOptions {
        kv_cache: KvType::F32,
        bf16_acts: Bf16Acts::F32,
        quant_acts: QuantActs::Auto,
    };
    let mut engine = load_engine(&dir.display().to_string(), None, &opts)?;
    let ids = engine.tokenizer.encode(&text)?;
    let (imp, rows) =
        engine.calibrate(&ids, a.calibration_ctx, a.calibration_windows, &|i, n| {
            eprintln!("calibration window {i}/{n}")
        })?;
    let name = file.file_name().map_or_else(
        || file.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let note = format!("{name}: {rows} tokens in windows of {}", a.calibration_ctx);
    eprintln!("calibrated on {note}");
    let Some(budget) = a.mix_budget else {
        let mut model = engine.model;
        model.quantize_weighted(a.recipe, Some(&imp))?;
        return Ok((model, note, a.recipe));
    };
    let window = &ids[..a.calibration_ctx];
    let choice = engine.choose_mix(window, &imp, budget, &|m| eprintln!("{m}"))?;
    eprintln!(
        "chose {}: mean KL {:.5} on the first window at {:.2} bits/weight (q4m: {:.5} at {:.2})",
        choice.recipe.name(),
        choice.kl,
        choice.bits,
        choice.base_kl,
        choice.base_bits
    );
    Ok((engine.model, note, choice.recipe))
}
