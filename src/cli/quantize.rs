use super::*;

#[derive(Args)]
pub(super) struct QuantizeArgs {
    /// A local model directory or a Hugging Face repo id.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// Output directory (created; must not already hold a model.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// q8, q4, q4-edge (4-bit with down_proj and the embeddings / LM head at 8 bits), or q4
    /// keeping the named classes at 8 bits, as q4+qkv_proj+embed (classes: qkv_proj, o_proj,
    /// gate_up_proj, down_proj, embed; embed is the embeddings and the LM head).
    #[arg(long, value_parser = parse_recipe, default_value = "q4-edge")]
    recipe: Recipe,
    /// Calibration text (UTF-8): the float model runs over it first, and each 4-bit matrix's
    /// scales are chosen to minimise its rounding error weighted by the mean square of the
    /// activations each column met (llama.cpp's importance matrix, computed by phi4 itself).
    /// Use text like what the model will see, and not the text you evaluate on.
    #[arg(long, value_name = "FILE")]
    calibration: Option<PathBuf>,
    /// With --calibration: tokens per window (each run from an empty cache).
    #[arg(long, default_value_t = 512, requires = "calibration")]
    calibration_ctx: usize,
    /// With --calibration: at most this many windows.
    #[arg(long, default_value_t = 32, requires = "calibration")]
    calibration_windows: usize,
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
    eprintln!("quantizing {} ({})...", dir.display(), a.recipe.name());
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
    let model = match &a.calibration {
        None => load_model(&dir, Some(a.recipe))?,
        Some(file) => {
            let (model, note) = calibrated(&a, &dir, file)?;
            notes.push((phi4::model::quantize::CALIBRATION_KEY, note));
            model
        }
    };
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    phi4::model::quantize::write_checkpoint_with(&model, Some(a.recipe), &notes, &a.out)?;
    // Everything but the weights travels unchanged: config, tokenizer, chat template.
    phi4::model::quantize::copy_beside_weights(&dir, &a.out, false)?;
    let bytes = model.weight_bytes();
    eprintln!(
        "wrote {} ({}, {:.2} GB of weights read per token)",
        a.out.display(),
        a.recipe.name(),
        bytes as f64 / 1e9
    );
    Ok(())
}

/// The float model run over the calibration text, then quantized with the importances it
/// collected; and a note of what it was calibrated on, for the checkpoint's metadata.
fn calibrated(a: &QuantizeArgs, dir: &Path, file: &Path) -> Result<(Phi3ForCausalLM, String)> {
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
    let mut model = engine.model;
    model.quantize_weighted(a.recipe, Some(&imp))?;
    Ok((model, note))
}
