//! `phi4 export --adapters DIR --merge-lora`: the base model with a LoRA adapter folded in,
//! written as a Hugging Face checkpoint (as `swift export --merge_lora true` does).

use super::*;

#[derive(Args)]
pub(super) struct ExportArgs {
    /// The base model the adapter was trained on (default: the adapter's
    /// `base_model_name_or_path`).
    #[arg(long)]
    model: Option<String>,
    /// The adapter directory (`phi4 sft` checkpoint, PEFT or ms-swift).
    #[arg(long)]
    adapters: PathBuf,
    /// Fold the adapter into the weights (the only export there is; ms-swift's flag).
    #[arg(long, alias = "merge_lora", default_value = "true", value_parser = parse_bool_flag, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    merge_lora: bool,
    /// Output directory (default: ADAPTERS-merged, as ms-swift).
    #[arg(long, alias = "output-dir", alias = "output_dir")]
    out: Option<PathBuf>,
    /// Also quantize the merged weights (a `phi4 quantize` recipe: q8, q6, q5m, q5, q4m, q4, q4-edge or a
    /// mix): a phi4-format checkpoint.
    #[arg(long, value_parser = parse_recipe)]
    quant: Option<Recipe>,
}

fn parse_bool_flag(s: &str) -> Result<bool, String> {
    match s {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(format!("expected true or false, not {s:?}")),
    }
}

pub(super) fn export(a: ExportArgs) -> Result<()> {
    if !a.merge_lora {
        bail!("phi4 export merges an adapter into its base (--merge-lora); an unmerged adapter is already a PEFT directory that transformers, vLLM and phi4 load");
    }
    let cfg_path = a.adapters.join("adapter_config.json");
    let adapter_cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).with_context(|| {
            format!(
                "{} is not an adapter directory (no adapter_config.json)",
                a.adapters.display()
            )
        })?)
        .with_context(|| format!("{} is not valid JSON", cfg_path.display()))?;
    let model = match &a.model {
        Some(m) => m.clone(),
        None => adapter_cfg
            .get("base_model_name_or_path")
            .and_then(serde_json::Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .with_context(|| format!("{} names no base model; pass --model", cfg_path.display()))?,
    };
    let out = a.out.clone().unwrap_or_else(|| {
        let mut s = a.adapters.as_os_str().to_owned();
        s.push("-merged");
        PathBuf::from(s)
    });
    if out.join("model.safetensors").exists() {
        bail!(
            "{} already holds a model.safetensors; choose an empty directory",
            out.display()
        );
    }
    let dir = resolve_model(&model)?;
    let config_text = std::fs::read_to_string(dir.join("config.json"))
        .with_context(|| format!("reading {}", dir.join("config.json").display()))?;
    if phi4::config::multimodal::Phi4MMConfig::is_multimodal(&config_text) {
        bail!(
            "{} is Phi-4-multimodal; export merges adapters into Phi-4-mini checkpoints",
            dir.display()
        );
    }
    let mut base = load_model(&dir, None)?;
    let params = phi4::train::LoraParams::load_peft(&base, &a.adapters)?;
    params.attach(&mut base, 0)?;
    for layer in &mut base.model.layers {
        for (_, lin) in layer.linears_mut() {
            lin.merge_lora(0)?;
        }
    }
    if let Some(r) = a.quant {
        base.quantize(r)?;
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    phi4::model::quantize::write_checkpoint(&base, a.quant, &out)?;
    phi4::model::quantize::copy_beside_weights(&dir, &out, false)?;
    eprintln!(
        "merged {} into {} ({} projections, scale {}) → {}{}",
        a.adapters.display(),
        dir.display(),
        params.modules.len(),
        params.settings.scale(),
        out.display(),
        a.quant
            .map(|q| format!(" ({}: loads in phi4 only)", q.name()))
            .unwrap_or_default()
    );
    println!("{}", out.display());
    Ok(())
}
