//! Phi-4-multimodal's `config.json`, in both layouts the checkpoint exists in (spec §3.2):
//!
//! * Microsoft's remote code (`model_type: "phi4mm"`): the LM fields at the top level,
//!   `embd_layer` describing the image/audio embedding, `vision_lora` / `speech_lora` (r, alpha,
//!   dropout, target regex) for the adapters stored inside the weights. The official file does not
//!   describe the vision tower (the code hard-codes SigLIP so400m); small test checkpoints carry
//!   their sizes as `vision_config` (the project's convention, native field names).
//! * transformers' native layout (`model_type: "phi4_multimodal"`): `vision_config` and
//!   `audio_config` objects; the adapters are PEFT folders beside the weights.
//!
//! The language model is a Phi-3 decoder in both, read by [`Phi3Config`]. The audio settings are
//! kept as written; the speech encoder reads them (part 2).

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::Phi3Config;

/// Which checkpoint layout a directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `Phi4MMForCausalLM` (`phi4mm`): adapters inside the weights.
    Remote,
    /// `Phi4MultimodalForCausalLM` (`phi4_multimodal`): adapters in `vision-lora/`, `speech-lora/`.
    Native,
}

/// The SigLIP vision tower (`vision_config`, transformers' field names).
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: String,
    /// Which hidden state feeds the projection (−2: the output of the second-to-last layer).
    pub feature_layer: i64,
    pub crop_size: usize,
    pub image_token_id: u32,
}

impl Default for VisionConfig {
    /// SigLIP so400m-patch14-448 as Phi-4-multimodal uses it (spec §3.3).
    fn default() -> VisionConfig {
        VisionConfig {
            hidden_size: 1152,
            intermediate_size: 4304,
            num_hidden_layers: 27,
            num_attention_heads: 16,
            num_channels: 3,
            image_size: 448,
            patch_size: 14,
            layer_norm_eps: 1e-6,
            hidden_act: "gelu_pytorch_tanh".into(),
            feature_layer: -2,
            crop_size: 448,
            image_token_id: 200010,
        }
    }
}

impl VisionConfig {
    fn from_value(v: Option<&Value>) -> Result<VisionConfig> {
        let mut c = VisionConfig::default();
        let Some(v) = v.filter(|v| !v.is_null()) else {
            return Ok(c);
        };
        let obj = v
            .as_object()
            .context("config field `vision_config` must be an object")?;
        let uint = |key: &str, into: &mut usize| -> Result<()> {
            if let Some(x) = obj.get(key) {
                *into = x.as_u64().with_context(|| {
                    format!("config field `vision_config.{key}` must be a whole number")
                })? as usize;
            }
            Ok(())
        };
        uint("hidden_size", &mut c.hidden_size)?;
        uint("intermediate_size", &mut c.intermediate_size)?;
        uint("num_hidden_layers", &mut c.num_hidden_layers)?;
        uint("num_attention_heads", &mut c.num_attention_heads)?;
        uint("num_channels", &mut c.num_channels)?;
        uint("image_size", &mut c.image_size)?;
        uint("patch_size", &mut c.patch_size)?;
        uint("crop_size", &mut c.crop_size)?;
        if let Some(x) = obj.get("layer_norm_eps") {
            c.layer_norm_eps = x
                .as_f64()
                .context("config field `vision_config.layer_norm_eps` must be a number")?;
        }
        if let Some(x) = obj.get("hidden_act") {
            c.hidden_act = x
                .as_str()
                .context("config field `vision_config.hidden_act` must be a string")?
                .into();
        }
        if let Some(x) = obj.get("feature_layer") {
            c.feature_layer = x
                .as_i64()
                .context("config field `vision_config.feature_layer` must be an integer")?;
        }
        if let Some(x) = obj.get("image_token_id") {
            c.image_token_id = x
                .as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .context("config field `vision_config.image_token_id` must be a token id")?;
        }
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<()> {
        // The processor works in 448-px crops of 14-px patches (32×32 masks, 256 + 16 + 1 tokens).
        if self.image_size != 448 || self.patch_size != 14 || self.crop_size != 448 {
            bail!(
                "config field `vision_config`: image_size {} / patch_size {} / crop_size {}; Phi-4-multimodal's processor needs 448 / 14 / 448",
                self.image_size,
                self.patch_size,
                self.crop_size
            );
        }
        if self.num_channels != 3 {
            bail!("config field `vision_config.num_channels` must be 3 (RGB)");
        }
        if self.hidden_act != "gelu_pytorch_tanh" {
            bail!(
                "config field `vision_config.hidden_act` is {:?}; the vision tower supports \"gelu_pytorch_tanh\"",
                self.hidden_act
            );
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            bail!("config field `vision_config.num_attention_heads` must divide `hidden_size`");
        }
        if self.layers_used() == 0 || self.layers_used() > self.num_hidden_layers {
            bail!(
                "config field `vision_config.feature_layer` ({}) does not name a layer of {}",
                self.feature_layer,
                self.num_hidden_layers
            );
        }
        Ok(())
    }

    /// Layers whose output the image features come from (26 of 27 for the real model).
    pub fn layers_used(&self) -> usize {
        let n = self.num_hidden_layers as i64;
        // hidden_states = [embeddings, layer 1, …, layer n]; index f (from the end if < 0).
        let idx = if self.feature_layer < 0 {
            n + 1 + self.feature_layer
        } else {
            self.feature_layer
        };
        idx.clamp(0, n) as usize
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Patches along a side of a crop.
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// One LoRA adapter's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    /// rsLoRA scales by `alpha / sqrt(r)` instead of `alpha / r`.
    pub rslora: bool,
}

impl LoraSpec {
    pub fn scale(&self) -> f32 {
        if self.rslora {
            (self.alpha / (self.r as f64).sqrt()) as f32
        } else {
            (self.alpha / self.r as f64) as f32
        }
    }

    /// The remote code's `vision_lora` / `speech_lora` object: `{r, lora_alpha, dp, layer}`.
    fn from_remote(v: &Value, field: &str) -> Result<LoraSpec> {
        let r =
            v.get("r").and_then(Value::as_u64).with_context(|| {
                format!("config field `{field}.r` is missing or not a whole number")
            })? as usize;
        let alpha = v
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .with_context(|| {
                format!("config field `{field}.lora_alpha` is missing or not a number")
            })?;
        if r == 0 {
            bail!("config field `{field}.r` must be positive");
        }
        Ok(LoraSpec {
            r,
            alpha,
            rslora: false,
        })
    }

    /// PEFT's `adapter_config.json`: a plain LoRA (no DoRA, no bias training).
    pub fn from_peft(text: &str) -> Result<LoraSpec> {
        let v: Value = serde_json::from_str(text).context("adapter_config.json is not JSON")?;
        let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("LORA");
        if peft_type != "LORA" {
            bail!("adapter_config.json: peft_type {peft_type:?}; only LORA adapters are supported");
        }
        if v.get("use_dora").and_then(Value::as_bool) == Some(true) {
            bail!("adapter_config.json: use_dora is true; DoRA adapters are not supported");
        }
        if v.get("bias")
            .and_then(Value::as_str)
            .is_some_and(|b| b != "none")
        {
            bail!("adapter_config.json: bias is not \"none\"; adapters with trained biases are not supported");
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if v.get(key)
                .and_then(Value::as_object)
                .is_some_and(|m| !m.is_empty())
            {
                bail!("adapter_config.json: {key} is set; per-module ranks are not supported");
            }
        }
        let mut spec = LoraSpec::from_remote(&v, "adapter_config")?;
        spec.rslora = v.get("use_rslora").and_then(Value::as_bool) == Some(true);
        Ok(spec)
    }
}

/// The Conformer speech encoder (transformers' `audio_config` field names; the remote layout's
/// `audio_processor.config` is read into the same struct). Missing fields take the released
/// checkpoint's values, not transformers' class defaults, which differ (spec P15).
#[derive(Debug, Clone, PartialEq)]
pub struct AudioConfig {
    pub hidden_size: usize,
    /// FFN width (each FFN's first matrix is twice this: value and gate).
    pub intermediate_size: usize,
    pub num_blocks: usize,
    pub num_attention_heads: usize,
    pub input_size: usize,
    pub time_reduction: usize,
    pub nemo_conv_channels: usize,
    pub ext_pw_out_channel: usize,
    pub depthwise_separable_out_channel: usize,
    pub kernel_size: usize,
    /// The relative-position table has `2 · bias_max_distance` rows.
    pub bias_max_distance: usize,
    pub audio_token_id: u32,
}

impl Default for AudioConfig {
    /// Phi-4-multimodal-instruct's encoder (spec §3.6).
    fn default() -> AudioConfig {
        AudioConfig {
            hidden_size: 1024,
            intermediate_size: 1536,
            num_blocks: 24,
            num_attention_heads: 16,
            input_size: 80,
            time_reduction: 8,
            nemo_conv_channels: 1024,
            ext_pw_out_channel: 1024,
            depthwise_separable_out_channel: 1024,
            kernel_size: 3,
            bias_max_distance: 500,
            audio_token_id: 200011,
        }
    }
}

impl AudioConfig {
    /// Frequency bins left after the ×`time_reduction` subsampling (80 → 40 → 20 → 10).
    pub fn nemo_final_size(&self) -> usize {
        let mut f = self.input_size;
        for _ in 0..self.subsampling_stages() {
            f = f.div_ceil(2);
        }
        f
    }

    pub fn subsampling_stages(&self) -> usize {
        self.time_reduction.trailing_zeros() as usize
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    fn from_value(v: Option<&Value>, layout: Layout) -> Result<AudioConfig> {
        let mut c = AudioConfig::default();
        let Some(v) = v.filter(|v| !v.is_null()) else {
            return Ok(c);
        };
        let field = match layout {
            Layout::Native => "audio_config",
            Layout::Remote => "audio_processor.config",
        };
        let obj = v
            .as_object()
            .with_context(|| format!("config field `{field}` must be an object"))?;
        let uint = |path: &[&str], into: &mut usize| -> Result<()> {
            let mut at = Some(v);
            for p in path {
                at = at.and_then(|x| x.get(*p));
            }
            if let Some(x) = at {
                *into = x.as_u64().with_context(|| {
                    format!(
                        "config field `{field}.{}` must be a whole number",
                        path.join(".")
                    )
                })? as usize;
            }
            Ok(())
        };
        match layout {
            Layout::Native => {
                uint(&["hidden_size"], &mut c.hidden_size)?;
                uint(&["intermediate_size"], &mut c.intermediate_size)?;
                uint(&["num_attention_heads"], &mut c.num_attention_heads)?;
                uint(&["nemo_conv_channels"], &mut c.nemo_conv_channels)?;
                uint(
                    &["depthwise_separable_out_channel"],
                    &mut c.depthwise_separable_out_channel,
                )?;
                uint(&["bias_max_distance"], &mut c.bias_max_distance)?;
            }
            Layout::Remote => {
                uint(&["attention_dim"], &mut c.hidden_size)?;
                uint(&["linear_units"], &mut c.intermediate_size)?;
                uint(&["attention_heads"], &mut c.num_attention_heads)?;
                uint(
                    &["nemo_conv_settings", "conv_channels"],
                    &mut c.nemo_conv_channels,
                )?;
                uint(
                    &["depthwise_seperable_out_channel"],
                    &mut c.depthwise_separable_out_channel,
                )?;
                uint(
                    &["relative_attention_bias_args", "t5_bias_max_distance"],
                    &mut c.bias_max_distance,
                )?;
            }
        }
        uint(&["num_blocks"], &mut c.num_blocks)?;
        uint(&["input_size"], &mut c.input_size)?;
        uint(&["time_reduction"], &mut c.time_reduction)?;
        uint(&["ext_pw_out_channel"], &mut c.ext_pw_out_channel)?;
        uint(&["kernel_size"], &mut c.kernel_size)?;
        let mut token = c.audio_token_id as usize;
        uint(&["audio_token_id"], &mut token)?;
        c.audio_token_id = token as u32;
        // Settings the released encoder fixes; anything else would run a different network.
        let fixed: [(&str, Value); 9] = [
            ("activation", Value::from("swish")),
            ("conv_activation", Value::from("swish")),
            ("conv_glu_type", Value::from("swish")),
            ("nemo_activation", Value::from("relu")),
            ("depthwise_multiplier", Value::from(1)),
            ("downsample_rate", Value::from(1)),
            ("chunk_size", Value::from(-1)),
            ("bias_symmetric", Value::from(false)),
            ("batch_norm", Value::from(false)),
        ];
        for (key, want) in fixed {
            if let Some(got) = obj.get(key) {
                if *got != want {
                    bail!("config field `{field}.{key}` is {got}; only {want} is supported");
                }
            }
        }
        if c.hidden_size == 0
            || c.num_attention_heads == 0
            || c.hidden_size % c.num_attention_heads != 0
        {
            bail!(
                "config: the audio encoder's hidden size {} is not a multiple of its {} heads",
                c.hidden_size,
                c.num_attention_heads
            );
        }
        if !c.time_reduction.is_power_of_two() || c.time_reduction < 2 {
            bail!(
                "config field `{field}.time_reduction` is {}; a power of two is required",
                c.time_reduction
            );
        }
        if c.kernel_size == 0 || c.bias_max_distance == 0 {
            bail!("config field `{field}`: kernel_size and bias_max_distance must be positive");
        }
        if c.depthwise_separable_out_channel != c.hidden_size
            || c.ext_pw_out_channel != c.hidden_size
        {
            bail!(
                "config field `{field}`: the convolution module's widths ({}, {}) must equal the hidden size {}",
                c.depthwise_separable_out_channel,
                c.ext_pw_out_channel,
                c.hidden_size
            );
        }
        Ok(c)
    }
}

/// A Phi-4-multimodal `config.json`.
#[derive(Debug, Clone)]
pub struct Phi4MMConfig {
    pub layout: Layout,
    /// The language model (a Phi-3 decoder).
    pub text: Phi3Config,
    pub vision: VisionConfig,
    /// Adapter settings the remote layout writes in the config (the native one in PEFT folders).
    pub vision_lora: Option<LoraSpec>,
    pub speech_lora: Option<LoraSpec>,
    pub audio_token_id: u32,
    /// The speech encoder (`audio_config` or `audio_processor.config`).
    pub audio: AudioConfig,
}

/// The LoRA target regex of transformers' converter (both adapters).
pub const LORA_TARGETS: &str =
    r"model.layers.\d+.((self_attn.(qkv|o)_proj)|(mlp.(gate_up|down)_proj))";

/// `model_type`s of Phi-4-multimodal checkpoints.
pub const MODEL_TYPES: [&str; 2] = ["phi4mm", "phi4_multimodal"];

impl Phi4MMConfig {
    pub fn from_json(text: &str) -> Result<Phi4MMConfig> {
        let v: Value = serde_json::from_str(text).context("config.json is not valid JSON")?;
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        let layout = match model_type {
            "phi4mm" => Layout::Remote,
            "phi4_multimodal" => Layout::Native,
            other => bail!(
                "config field `model_type` is {other:?}; a Phi-4-multimodal checkpoint has \"phi4mm\" or \"phi4_multimodal\""
            ),
        };
        // The language model's fields are those of a Phi-3 config (spec §3.2).
        let mut lm = v.clone();
        lm["model_type"] = Value::from("phi3");
        let text = Phi3Config::from_json(&lm.to_string())?;
        let vision = VisionConfig::from_value(v.get("vision_config"))?;
        if vision.image_token_id as usize >= text.vocab_size {
            bail!(
                "config: the image token id {} is outside the vocabulary ({})",
                vision.image_token_id,
                text.vocab_size
            );
        }
        let (vision_lora, speech_lora, audio) = match layout {
            Layout::Remote => {
                let embd = v
                    .get("embd_layer")
                    .context("config field `embd_layer` is missing (the remote-code layout describes its image and audio embedding there)")?;
                check_image_embedding(embd.get("image_embd_layer"))?;
                let lora = |k: &str| {
                    v.get(k)
                        .filter(|x| !x.is_null())
                        .map(|x| LoraSpec::from_remote(x, k))
                        .transpose()
                };
                (
                    lora("vision_lora")?,
                    lora("speech_lora")?,
                    v.get("audio_processor")
                        .and_then(|a| a.get("config"))
                        .cloned(),
                )
            }
            Layout::Native => (None, None, v.get("audio_config").cloned()),
        };
        let audio = AudioConfig::from_value(audio.as_ref(), layout)?;
        let audio_token_id = audio.audio_token_id;
        if audio_token_id as usize >= text.vocab_size {
            bail!(
                "config: the audio token id {audio_token_id} is outside the vocabulary ({})",
                text.vocab_size
            );
        }
        Ok(Phi4MMConfig {
            layout,
            text,
            vision,
            vision_lora,
            speech_lora,
            audio_token_id,
            audio,
        })
    }

    /// The released Phi-4-multimodal-instruct (remote-code layout, spec §3.2): the Phi-4-mini
    /// decoder, SigLIP so400m, vision LoRA r 256 / α 512, speech LoRA r 320 / α 640.
    pub fn phi4_multimodal() -> Phi4MMConfig {
        let mut v: Value =
            serde_json::from_str(super::PHI4_MINI_CONFIG).expect("the built-in config is JSON");
        v["architectures"] = serde_json::json!(["Phi4MMForCausalLM"]);
        v["model_type"] = Value::from("phi4mm");
        v["eos_token_id"] = serde_json::json!([199999, 200020]);
        v["embd_layer"] = serde_json::json!({
            "embedding_cls": "image_audio",
            "image_embd_layer": {"crop_size": 448, "embedding_cls": "tune_image",
                "hd_transform_order": "sub_glb", "image_token_compression_cls": "avg_pool_2d",
                "projection_cls": "mlp", "use_hd_transform": true, "with_learnable_separator": true},
            "audio_embd_layer": {"compression_rate": 8, "downsample_rate": 1, "embedding_cls": "audio",
                "projection_cls": "mlp", "use_conv_downsample": false, "use_qformer": false}
        });
        v["vision_lora"] = serde_json::json!({"r": 256, "lora_alpha": 512, "dp": 0.0});
        v["speech_lora"] = serde_json::json!({"r": 320, "lora_alpha": 640, "dp": 0.01});
        Phi4MMConfig::from_json(&v.to_string()).expect("the built-in config is valid")
    }

    /// This configuration as transformers' native `config.json` (`phi4_multimodal`), for a
    /// checkpoint that transformers loads.
    pub fn native_json(&self) -> Value {
        let t = &self.text;
        let v = &self.vision;
        let a = &self.audio;
        serde_json::json!({
            "architectures": ["Phi4MultimodalForCausalLM"],
            "model_type": "phi4_multimodal",
            "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_kv_heads(),
            "hidden_act": t.hidden_act, "rms_norm_eps": t.rms_norm_eps,
            "max_position_embeddings": t.max_position_embeddings,
            "original_max_position_embeddings": t.original_max_position_embeddings,
            "rope_theta": t.rope.theta, "partial_rotary_factor": t.rope.rotary_dim as f64 / t.head_dim() as f64,
            "rope_scaling": t.rope_scaling, "rope_parameters": t.rope_parameters,
            "sliding_window": t.sliding_window, "tie_word_embeddings": t.tie_word_embeddings,
            "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id.as_ref().map(|e| e.to_vec()),
            "pad_token_id": t.pad_token_id,
            "torch_dtype": "bfloat16",
            "vision_config": {
                "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
                "image_size": v.image_size, "patch_size": v.patch_size, "layer_norm_eps": v.layer_norm_eps,
                "hidden_act": v.hidden_act, "feature_layer": v.feature_layer, "crop_size": v.crop_size,
                "image_token_id": v.image_token_id
            },
            "audio_config": {
                "hidden_size": a.hidden_size, "intermediate_size": a.intermediate_size,
                "num_blocks": a.num_blocks, "num_attention_heads": a.num_attention_heads,
                "input_size": a.input_size, "time_reduction": a.time_reduction,
                "nemo_conv_channels": a.nemo_conv_channels, "ext_pw_out_channel": a.ext_pw_out_channel,
                "depthwise_separable_out_channel": a.depthwise_separable_out_channel,
                "kernel_size": a.kernel_size, "bias_max_distance": a.bias_max_distance,
                "audio_token_id": self.audio_token_id
            }
        })
    }

    /// Whether a `config.json` text names a Phi-4-multimodal model.
    pub fn is_multimodal(text: &str) -> bool {
        serde_json::from_str::<Value>(text)
            .ok()
            .and_then(|v| {
                v.get("model_type")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .is_some_and(|t| MODEL_TYPES.contains(&t.as_str()))
    }
}

/// The remote code's `image_embd_layer`: only the settings the released model uses are
/// implemented, and anything else is refused rather than run differently.
fn check_image_embedding(v: Option<&Value>) -> Result<()> {
    let Some(v) = v else {
        bail!("config field `embd_layer.image_embd_layer` is missing");
    };
    for (key, want) in [
        ("hd_transform_order", Value::from("sub_glb")),
        ("image_token_compression_cls", Value::from("avg_pool_2d")),
        ("projection_cls", Value::from("mlp")),
        ("use_hd_transform", Value::from(true)),
        ("with_learnable_separator", Value::from(true)),
        ("crop_size", Value::from(448)),
    ] {
        if let Some(got) = v.get(key) {
            if *got != want {
                bail!("config field `embd_layer.image_embd_layer.{key}` is {got}; only {want} is supported");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_layer_counts_from_the_end() {
        let c = VisionConfig::default();
        assert_eq!(c.layers_used(), 26);
        let c = VisionConfig {
            feature_layer: 5,
            ..VisionConfig::default()
        };
        assert_eq!(c.layers_used(), 5);
    }

    #[test]
    fn unsupported_adapters_and_layouts_are_refused() {
        let e = LoraSpec::from_peft(r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"use_dora":true}"#)
            .unwrap_err();
        assert!(e.to_string().contains("DoRA"), "{e}");
        let s = LoraSpec::from_peft(r#"{"r":4,"lora_alpha":8,"use_rslora":true}"#).unwrap();
        assert_eq!(s.scale(), 4.0);
        let e = check_image_embedding(Some(&serde_json::json!({"hd_transform_order": "glb_sub"})))
            .unwrap_err();
        assert!(e.to_string().contains("hd_transform_order"), "{e}");
    }
}
