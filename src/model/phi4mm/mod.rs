//! Phi-4-multimodal (spec §3): the Phi-4-mini decoder ([`Phi3ForCausalLM`], the same code and
//! kernels), with the vision and speech LoRA adapters riding unmerged on its linear layers, the
//! image embedding that turns pictures into rows of the prompt and the audio embedding that does
//! the same for speech.
//!
//! Both checkpoint layouts load into the same structs, named as transformers' native model
//! names them: Microsoft's remote-code one (adapters inside the weights, PEFT-wrapped names, the
//! original image-projection names) is renamed on load.

pub mod audio_embed;
pub mod conformer;
pub mod image_embed;
pub mod siglip;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};

use self::audio_embed::{AudioEmbedding, Projection};
use self::image_embed::ImageEmbedding;
use crate::config::multimodal::{Layout, LoraSpec, Phi4MMConfig};
use crate::media::ProcessedImage;
use crate::model::linear::AdapterId;
use crate::model::phi3::Phi3ForCausalLM;
use crate::model::quantize::Recipe;
use crate::weights::{check_registry, open_safetensors, Checkpoint, Expected, Tensor};

/// The adapters of the released model, by [`AdapterId`].
pub const ADAPTERS: [&str; 2] = ["vision", "speech"];
pub const VISION: AdapterId = 0;
pub const SPEECH: AdapterId = 1;

/// The settings `config.json` gives adapter `id` (the remote layout's `vision_lora` /
/// `speech_lora`).
pub fn adapter_spec(config: &Phi4MMConfig, id: AdapterId) -> Option<&LoraSpec> {
    match id {
        VISION => config.vision_lora.as_ref(),
        SPEECH => config.speech_lora.as_ref(),
        _ => None,
    }
}

/// What an input's media make of it (the remote code's `input_mode`, spec §3.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputMode {
    Language,
    Vision,
    Speech,
    VisionSpeech,
}

impl InputMode {
    pub fn of(images: usize, audios: usize) -> InputMode {
        match (images > 0, audios > 0) {
            (false, false) => InputMode::Language,
            (true, false) => InputMode::Vision,
            (false, true) => InputMode::Speech,
            (true, true) => InputMode::VisionSpeech,
        }
    }

    /// The one adapter the mode runs with: none for text, vision whenever an image is present,
    /// speech for audio alone. Never both.
    pub fn adapter(self) -> Option<AdapterId> {
        match self {
            InputMode::Language => None,
            InputMode::Vision | InputMode::VisionSpeech => Some(VISION),
            InputMode::Speech => Some(SPEECH),
        }
    }
}

pub struct Phi4MMForCausalLM {
    pub config: Phi4MMConfig,
    /// The language model, its projections carrying the adapters.
    pub lm: Phi3ForCausalLM,
    pub image_embed: ImageEmbedding,
    /// The speech encoder and its projections; `None` for a checkpoint without them.
    pub audio_embed: Option<AudioEmbedding>,
}

impl Phi4MMForCausalLM {
    /// Loads a model directory in either layout; with `quant` the decoder's matrices are
    /// quantized by the recipe (adapters and the vision tower stay 16-bit).
    pub fn load_dir(
        dir: &Path,
        config: Phi4MMConfig,
        quant: Option<Recipe>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Phi4MMForCausalLM> {
        Self::load_dir_merged(dir, config, quant, None, progress)
    }

    /// [`Phi4MMForCausalLM::load_dir`] with adapter `merge` folded into the decoder's weights
    /// before any quantization: that mode then runs at the base model's speed, and the model
    /// serves that mode only.
    pub fn load_dir_merged(
        dir: &Path,
        config: Phi4MMConfig,
        quant: Option<Recipe>,
        merge: Option<AdapterId>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Phi4MMForCausalLM> {
        let mut ckpt = Checkpoint::open_dir(dir)?;
        if quant.is_none() {
            ckpt.prefault(progress)
                .with_context(|| format!("reading {}", dir.display()))?;
        }
        let mut tensors = std::mem::take(&mut ckpt.tensors);
        let mut adapters: [Option<(LoraSpec, HashMap<String, Tensor>)>; 2] = [None, None];
        match config.layout {
            Layout::Remote => {
                tensors = tensors
                    .into_iter()
                    .map(|(k, t)| (remote_to_native(&k), t))
                    .collect();
                for (id, name) in ADAPTERS.iter().enumerate() {
                    let spec = adapter_spec(&config, id).cloned();
                    let seg = format!(".{name}.weight");
                    let keys: Vec<String> = tensors
                        .keys()
                        .filter(|k| k.contains(".lora_") && k.ends_with(&seg))
                        .cloned()
                        .collect();
                    if keys.is_empty() {
                        continue;
                    }
                    let spec = spec.with_context(|| {
                        format!("the weights hold a {name} adapter but config.json has no `{name}_lora` (r, lora_alpha)")
                    })?;
                    let mut map = HashMap::new();
                    for k in keys {
                        let t = tensors.remove(&k).expect("listed");
                        map.insert(k.replace(&seg, ".weight"), t);
                    }
                    adapters[id] = Some((spec, map));
                }
            }
            Layout::Native => {
                for (id, name) in ADAPTERS.iter().enumerate() {
                    let sub = dir.join(format!("{name}-lora"));
                    if sub.join("adapter_config.json").exists() {
                        adapters[id] = Some(read_peft_adapter(&sub)?);
                    }
                }
            }
        }
        if tensors.keys().any(|k| k.contains(".lora_")) {
            let k = tensors.keys().find(|k| k.contains(".lora_")).unwrap();
            bail!("tensor {k} is a LoRA weight of no adapter this model knows (vision, speech)");
        }
        // Split the checkpoint: decoder, image embedding, speech (later), and what is unused.
        let vision_cfg = &config.vision;
        let mut lm = HashMap::new();
        let mut vision = HashMap::new();
        let mut audio = HashMap::new();
        for (k, t) in tensors {
            if k.starts_with(image_embed::PREFIX) {
                if !ImageEmbedding::is_unused(vision_cfg, &k) {
                    vision.insert(k, t);
                }
            } else if k.starts_with(audio_embed::PREFIX) {
                audio.insert(k, t);
            } else {
                lm.insert(k, t);
            }
        }
        let audio_embed = if audio.is_empty() {
            None
        } else {
            let audio_ckpt = Checkpoint::from_parts(audio, ckpt.files.clone(), Vec::new());
            let mut found = check_registry(
                &audio_ckpt,
                &AudioEmbedding::expected_tensors(&config.audio, config.text.hidden_size),
            )
            .with_context(|| format!("loading the speech encoder from {}", dir.display()))?;
            let mut take = |name: &str| -> Result<Tensor> {
                found
                    .remove(name)
                    .with_context(|| format!("tensor {name} missing after registry check"))
            };
            Some(AudioEmbedding::load(&config.audio, &mut take)?)
        };
        let lm_ckpt = Checkpoint::from_parts(lm, ckpt.files.clone(), Vec::new());
        let mut lm = Phi3ForCausalLM::load(config.text.clone(), &lm_ckpt)
            .with_context(|| format!("loading the language model from {}", dir.display()))?;
        let vision_ckpt = Checkpoint::from_parts(vision, ckpt.files.clone(), Vec::new());
        let mut found = check_registry(
            &vision_ckpt,
            &ImageEmbedding::expected_tensors(vision_cfg, config.text.hidden_size),
        )
        .with_context(|| format!("loading the vision tower from {}", dir.display()))?;
        let mut take = |name: &str| -> Result<Tensor> {
            found
                .remove(name)
                .with_context(|| format!("tensor {name} missing after registry check"))
        };
        let image_embed = ImageEmbedding::load(vision_cfg, &mut take)?;
        for (id, a) in adapters.into_iter().enumerate() {
            if let Some((spec, map)) = a {
                attach_adapter(&mut lm, id, &spec, map)
                    .with_context(|| format!("loading the {} adapter", ADAPTERS[id]))?;
            }
        }
        if let Some(id) = merge {
            merge_adapter(&mut lm, id)?;
        }
        if let Some(recipe) = quant {
            lm.quantize(recipe)
                .with_context(|| format!("quantizing {} ({})", dir.display(), recipe.name()))?;
        }
        Ok(Phi4MMForCausalLM {
            config,
            lm,
            image_embed,
            audio_embed,
        })
    }

    pub fn image_token_id(&self) -> u32 {
        self.config.vision.image_token_id
    }

    pub fn audio_token_id(&self) -> u32 {
        self.config.audio_token_id
    }

    /// Whether the model carries adapter `id`.
    pub fn has_adapter(&self, id: AdapterId) -> bool {
        self.lm.model.layers.iter().any(|l| {
            l.linears()
                .iter()
                .any(|(_, lin)| lin.lora().iter().any(|d| d.adapter == id))
        })
    }

    /// The prompt rows of one audio's `[frames, 80]` features, through the projection its
    /// prompt's mode selects.
    pub fn embed_audio(&self, features: &[f32], projection: Projection) -> Result<Vec<f32>> {
        let a = self.audio_embed.as_ref().context(
            "this checkpoint has no speech encoder (no model.embed_tokens_extend.audio_embed.* tensors)",
        )?;
        Ok(a.forward(features, projection))
    }

    /// The embedding rows of every image, concatenated in order (one per image token).
    pub fn embed_images(&self, images: &[ProcessedImage]) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for img in images {
            out.extend(self.image_embed.forward(img)?);
        }
        Ok(out)
    }
}

/// Writes a quantized copy of the Phi-4-multimodal checkpoint in `dir` to `out`, in the same
/// layout: the decoder's matrices by `recipe`, every other tensor (vision tower, projections,
/// speech encoder, adapters) as stored, and every other file (config, tokenizer, adapter folders)
/// copied.
pub fn write_quantized(dir: &Path, config: Phi4MMConfig, recipe: Recipe, out: &Path) -> Result<()> {
    let layout = config.layout;
    let model = Phi4MMForCausalLM::load_dir(dir, config, Some(recipe), &mut |_| {})?;
    let stored = |native: &str| -> String {
        match layout {
            Layout::Remote
                if native.starts_with("model.layers.")
                    && native.ends_with("_proj.weight")
                    && !native.contains("layernorm") =>
            {
                native.replacen(".weight", ".base_layer.weight", 1)
            }
            _ => native.to_owned(),
        }
    };
    let mut named: Vec<(String, Tensor)> = model
        .lm
        .named_tensors()
        .into_iter()
        .map(|(n, t)| (stored(&n), t))
        .collect();
    let written: std::collections::HashSet<String> = named.iter().map(|(n, _)| n.clone()).collect();
    let original = Checkpoint::open_dir(dir)?;
    let mut rest: Vec<(String, Tensor)> = original
        .tensors
        .into_iter()
        .filter(|(n, _)| !written.contains(n) && n != "lm_head.weight")
        .collect();
    rest.sort_by(|a, b| a.0.cmp(&b.0));
    named.extend(rest);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    crate::model::quantize::write_tensors(&named, Some(recipe), out)?;
    crate::model::quantize::copy_beside_weights(dir, out, true)
}

/// Writes `model` in transformers' native layout: `config.json`, `model.safetensors` (decoder,
/// image and audio embeddings; a float model only) and one PEFT folder per adapter, so the result
/// serves as the peer's copy of synthetic weights for benchmarks.
pub fn write_native(model: &Phi4MMForCausalLM, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&model.config.native_json())?,
    )?;
    let mut named = model.lm.named_tensors();
    named.extend(model.image_embed.named_tensors());
    if let Some(a) = &model.audio_embed {
        named.extend(a.named_tensors());
    }
    crate::model::quantize::write_tensors(&named, None, out)?;
    for (id, name) in ADAPTERS.iter().enumerate() {
        let Some(spec) = adapter_spec(&model.config, id) else {
            continue;
        };
        let mut tensors = Vec::new();
        for (l, layer) in model.lm.model.layers.iter().enumerate() {
            for (m, lin) in layer.linears() {
                for d in lin.lora().iter().filter(|d| d.adapter == id) {
                    let p = format!("model.layers.{l}.{m}");
                    tensors.push((format!("{p}.lora_A.weight"), d.a.weight().clone()));
                    tensors.push((format!("{p}.lora_B.weight"), d.b.weight().clone()));
                }
            }
        }
        if tensors.is_empty() {
            continue;
        }
        let dir = out.join(format!("{name}-lora"));
        std::fs::create_dir_all(&dir)?;
        crate::model::quantize::write_tensors(&tensors, None, &dir)?;
        std::fs::rename(
            dir.join("model.safetensors"),
            dir.join("adapter_model.safetensors"),
        )?;
        std::fs::write(
            dir.join("adapter_config.json"),
            serde_json::to_string_pretty(&serde_json::json!({
                "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.r,
                "lora_alpha": spec.alpha, "lora_dropout": 0.0, "bias": "none",
                "use_rslora": spec.rslora, "use_dora": false,
                "target_modules": crate::config::multimodal::LORA_TARGETS,
            }))?,
        )?;
    }
    Ok(())
}

/// Folds adapter `id` into every decoder projection that carries it.
pub fn merge_adapter(lm: &mut Phi3ForCausalLM, id: AdapterId) -> Result<()> {
    let name = ADAPTERS.get(id).copied().unwrap_or("the");
    let mut merged = 0;
    for (l, layer) in lm.model.layers.iter_mut().enumerate() {
        for (m, lin) in layer.linears_mut() {
            if lin
                .merge_lora(id)
                .with_context(|| format!("merging the {name} adapter into model.layers.{l}.{m}"))?
            {
                merged += 1;
            }
        }
    }
    if merged == 0 {
        bail!("the model has no {name} adapter to merge");
    }
    Ok(())
}

/// A native-layout name for a remote-code one (spec §3.9): PEFT's `base_layer.` dropped, the
/// original image-projection and separator names replaced. LoRA weights keep their adapter
/// segment (`lora_A.vision.weight`) for the caller to sort out.
fn remote_to_native(name: &str) -> String {
    const IMG: &str = "model.embed_tokens_extend.image_embed.";
    if let Some(rest) = name.strip_prefix(IMG) {
        let rest = match rest {
            "glb_GN" => "global_img_feature_extensor".to_owned(),
            "sub_GN" => "sub_img_feature_extensor".to_owned(),
            r => r
                .replacen("img_projection.0.", "img_projection_up.", 1)
                .replacen("img_projection.2.", "img_projection_down.", 1),
        };
        return format!("{IMG}{rest}");
    }
    if name.starts_with("model.layers.") {
        return name.replacen(".base_layer.weight", ".weight", 1);
    }
    const AUDIO: &str = "model.embed_tokens_extend.audio_embed.";
    if let Some(rest) = name.strip_prefix(AUDIO) {
        let rest = rest
            .replacen("audio_projection.speech.0.", "up_proj_for_speech.", 1)
            .replacen("audio_projection.speech.2.", "down_proj_for_speech.", 1)
            .replacen(
                "audio_projection.vision.0.",
                "up_proj_for_vision_speech.",
                1,
            )
            .replacen(
                "audio_projection.vision.2.",
                "down_proj_for_vision_speech.",
                1,
            )
            .replacen(".net.0.linear.", ".gate_up_proj.", 1)
            .replacen(".net.2.", ".down_proj.", 1)
            .replacen(".self_attn.linear_q.", ".self_attn.q_proj.", 1)
            .replacen(".self_attn.linear_k.", ".self_attn.k_proj.", 1)
            .replacen(".self_attn.linear_v.", ".self_attn.v_proj.", 1)
            .replacen(".self_attn.linear_out.", ".self_attn.o_proj.", 1);
        return format!("{AUDIO}{rest}");
    }
    name.to_owned()
}

/// A PEFT adapter folder: `adapter_config.json` and `adapter_model.safetensors` with keys
/// `[base_model.model.]model.layers.{i}.<module>.lora_{A,B}.weight`.
pub fn read_peft_adapter(dir: &Path) -> Result<(LoraSpec, HashMap<String, Tensor>)> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("reading {}", cfg_path.display()))?;
    let spec = LoraSpec::from_peft(&text).with_context(|| format!("in {}", cfg_path.display()))?;
    let file = dir.join("adapter_model.safetensors");
    if !file.exists() {
        bail!("{} has no adapter_model.safetensors", dir.display());
    }
    let map = open_safetensors(&file)?
        .into_iter()
        .map(|(k, t)| {
            let k = k.strip_prefix("base_model.model.").unwrap_or(&k).to_owned();
            (k, t)
        })
        .collect();
    Ok((spec, map))
}

/// Puts an adapter's deltas on the decoder's projections, after checking every tensor: each
/// targeted projection needs both matrices at rank `r`, and nothing else may be in the file.
fn attach_adapter(
    lm: &mut Phi3ForCausalLM,
    id: AdapterId,
    spec: &LoraSpec,
    mut map: HashMap<String, Tensor>,
) -> Result<()> {
    let mut expected = Vec::new();
    let r = spec.r;
    for (l, layer) in lm.model.layers.iter().enumerate() {
        for (name, lin) in layer.linears() {
            let p = format!("model.layers.{l}.{name}");
            if map.contains_key(&format!("{p}.lora_A.weight")) {
                expected.push(Expected {
                    name: format!("{p}.lora_A.weight"),
                    shape: vec![r, lin.in_features],
                    optional: false,
                });
                expected.push(Expected {
                    name: format!("{p}.lora_B.weight"),
                    shape: vec![lin.out_features, r],
                    optional: false,
                });
            }
        }
    }
    if expected.is_empty() {
        bail!("it targets none of the decoder's projections");
    }
    let ckpt = Checkpoint::from_parts(std::mem::take(&mut map), Vec::new(), Vec::new());
    let mut found: BTreeMap<String, Tensor> = check_registry(&ckpt, &expected)?;
    for (l, layer) in lm.model.layers.iter_mut().enumerate() {
        for (name, lin) in layer.linears_mut() {
            let p = format!("model.layers.{l}.{name}");
            if let Some(a) = found.remove(&format!("{p}.lora_A.weight")) {
                let b = found
                    .remove(&format!("{p}.lora_B.weight"))
                    .expect("checked");
                lin.add_lora(id, a, b, spec.scale()).context(p)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_names_map_to_native_ones() {
        for (remote, native) in [
            (
                "model.layers.3.mlp.down_proj.base_layer.weight",
                "model.layers.3.mlp.down_proj.weight",
            ),
            (
                "model.embed_tokens_extend.image_embed.img_projection.2.bias",
                "model.embed_tokens_extend.image_embed.img_projection_down.bias",
            ),
            (
                "model.embed_tokens_extend.image_embed.glb_GN",
                "model.embed_tokens_extend.image_embed.global_img_feature_extensor",
            ),
            (
                "model.layers.0.self_attn.qkv_proj.lora_A.vision.weight",
                "model.layers.0.self_attn.qkv_proj.lora_A.vision.weight",
            ),
            (
                "model.embed_tokens_extend.audio_embed.audio_projection.vision.2.weight",
                "model.embed_tokens_extend.audio_embed.down_proj_for_vision_speech.weight",
            ),
            (
                "model.embed_tokens_extend.audio_embed.encoder.encoders.3.feed_forward_out.net.0.linear.bias",
                "model.embed_tokens_extend.audio_embed.encoder.encoders.3.feed_forward_out.gate_up_proj.bias",
            ),
            (
                "model.embed_tokens_extend.audio_embed.encoder.encoders.0.self_attn.linear_out.weight",
                "model.embed_tokens_extend.audio_embed.encoder.encoders.0.self_attn.o_proj.weight",
            ),
        ] {
            assert_eq!(remote_to_native(remote), native);
        }
        assert_eq!(InputMode::of(1, 1).adapter(), Some(VISION));
        assert_eq!(InputMode::of(0, 2).adapter(), Some(SPEECH));
        assert_eq!(InputMode::of(0, 0).adapter(), None);
    }
}
