use super::*;

#[derive(Args)]
pub(super) struct QuantizeArgs {
    /// A local model directory or a Hugging Face repo id.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// Output directory (created; must not already hold a model.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// q8, q4, or q4-edge (4-bit with down_proj and the embeddings / LM head at 8 bits).
    #[arg(long, value_parser = parse_recipe, default_value = "q4-edge")]
    recipe: Recipe,
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
        let cfg = phi4::config::multimodal::Phi4MMConfig::from_json(&config_text)?;
        phi4::model::phi4mm::write_quantized(&dir, cfg, a.recipe, &a.out)?;
        eprintln!(
            "wrote {} ({}: the decoder quantized; vision tower, projections, speech encoder and adapters as stored)",
            a.out.display(),
            a.recipe.name()
        );
        return Ok(());
    }
    let model = load_model(&dir, Some(a.recipe))?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    phi4::model::quantize::write_checkpoint(&model, Some(a.recipe), &a.out)?;
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
