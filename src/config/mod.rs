//! `config.json` and `generation_config.json`, mirrored field for field.
//!
//! Two layouts of the rotary settings exist in the wild: the published Phi-4-mini file
//! (`rope_scaling` + top-level `rope_theta`) and the one transformers 5 writes
//! (`rope_parameters`, carrying theta, the partial factor and the original context too).
//! Both resolve to one [`RopeConfig`]. Unknown rope types, wrong factor lengths and shapes that
//! do not divide are refused with an error naming the field.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

pub mod multimodal;

/// The fields of a Phi-3-architecture `config.json` (Phi-4-mini uses `model_type: "phi3"`).
#[derive(Debug, Clone, Deserialize)]
pub struct Phi3Config {
    pub model_type: String,
    #[serde(default)]
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default, alias = "torch_dtype")]
    pub dtype: Option<String>,
    /// Derived once by [`Phi3Config::validate`]; not part of the file.
    #[serde(skip)]
    pub rope: RopeConfig,
}

fn default_act() -> String {
    "silu".into()
}
fn default_eps() -> f64 {
    1e-5
}

/// `eos_token_id` is an integer in some files and a list in others.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

/// Rotary settings after both config layouts are resolved.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    /// Number of leading head dimensions that are rotated (96 of 128 for Phi-4-mini).
    pub rotary_dim: usize,
    pub scaling: RopeScaling,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub enum RopeScaling {
    #[default]
    None,
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: usize,
        /// `factor` if the file gives one; else max / original context (transformers' rule).
        factor: Option<f64>,
        /// `attention_factor` if the file gives one; else derived from the factor.
        attention_factor: Option<f64>,
    },
}

impl Phi3Config {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let mut cfg: Phi3Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            anyhow::anyhow!("config field `{field}`: {}", e.into_inner())
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of the fused qkv projection output.
    pub fn qkv_dim(&self) -> usize {
        (self.num_attention_heads + 2 * self.num_kv_heads()) * self.head_dim()
    }

    /// Checks every field the decoder depends on and resolves the rotary settings.
    pub fn validate(&mut self) -> Result<()> {
        if self.model_type != "phi3" {
            bail!(
                "config field `model_type` is {:?}; this engine runs \"phi3\" (Phi-4-mini) checkpoints",
                self.model_type
            );
        }
        if self.hidden_act != "silu" {
            bail!(
                "config field `hidden_act` is {:?}; only \"silu\" is supported",
                self.hidden_act
            );
        }
        if self.attention_bias || self.mlp_bias {
            bail!("config fields `attention_bias`/`mlp_bias` are true; Phi-4 has no biases and this engine loads none");
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                bail!("config field `{name}` must be positive");
            }
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            bail!(
                "config field `hidden_size` ({}) is not a multiple of `num_attention_heads` ({}): head_dim is not integral",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            bail!(
                "config field `num_key_value_heads` ({kv}) must divide `num_attention_heads` ({})",
                self.num_attention_heads
            );
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            bail!("config field `rms_norm_eps` must be positive");
        }
        self.rope = self.resolve_rope()?;
        Ok(())
    }

    fn resolve_rope(&self) -> Result<RopeConfig> {
        // transformers 5 moves theta, partial factor and original context into `rope_parameters`.
        let (params, field) = match (&self.rope_parameters, &self.rope_scaling) {
            (Some(p), _) if !p.is_null() => (Some(p), "rope_parameters"),
            (_, Some(s)) if !s.is_null() => (Some(s), "rope_scaling"),
            _ => (None, "rope_scaling"),
        };
        let get_f64 = |key: &str| -> Result<Option<f64>> {
            match params.and_then(|p| p.get(key)) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .with_context(|| format!("config field `{field}.{key}` must be a number")),
            }
        };
        let theta = get_f64("rope_theta")?
            .or(self.rope_theta)
            .unwrap_or(10000.0);
        if theta.is_nan() || theta <= 0.0 {
            bail!("config field `rope_theta` must be positive");
        }
        let partial = get_f64("partial_rotary_factor")?
            .or(self.partial_rotary_factor)
            .unwrap_or(1.0);
        let head_dim = self.head_dim();
        let rotary = head_dim as f64 * partial;
        if !(partial > 0.0 && partial <= 1.0)
            || rotary.fract() != 0.0
            || !(rotary as usize).is_multiple_of(2)
        {
            bail!(
                "config field `partial_rotary_factor` ({partial}) must give an even whole number of rotary dims of head_dim {head_dim}"
            );
        }
        let rotary_dim = rotary as usize;
        let kind = params
            .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
            .and_then(Value::as_str);
        let scaling = match kind {
            None | Some("default") => RopeScaling::None,
            Some("longrope") | Some("su") => {
                let p = params.expect("kind implies params");
                let factors = |key: &str| -> Result<Vec<f64>> {
                    let arr = p
                        .get(key)
                        .and_then(Value::as_array)
                        .with_context(|| format!("config field `{field}.{key}` is missing"))?;
                    let v: Option<Vec<f64>> = arr.iter().map(Value::as_f64).collect();
                    let v = v.with_context(|| {
                        format!("config field `{field}.{key}` must be a list of numbers")
                    })?;
                    if v.len() != rotary_dim / 2 {
                        bail!(
                            "config field `{field}.{key}` has {} values; rotary dim {rotary_dim} needs {}",
                            v.len(),
                            rotary_dim / 2
                        );
                    }
                    if v.iter().any(|x| x.is_nan() || *x <= 0.0) {
                        bail!("config field `{field}.{key}` must hold positive values");
                    }
                    Ok(v)
                };
                let original = p
                    .get("original_max_position_embeddings")
                    .and_then(Value::as_u64)
                    .map(|v| v as usize)
                    .or(self.original_max_position_embeddings)
                    .with_context(|| {
                        "config field `original_max_position_embeddings` is required for longrope"
                    })?;
                if original == 0 || original > self.max_position_embeddings {
                    bail!("config field `original_max_position_embeddings` ({original}) must be in 1..=max_position_embeddings");
                }
                RopeScaling::LongRope {
                    short_factor: factors("short_factor")?,
                    long_factor: factors("long_factor")?,
                    original_max_position_embeddings: original,
                    factor: get_f64("factor")?,
                    attention_factor: get_f64("attention_factor")?,
                }
            }
            Some(other) => bail!(
                "config field `{field}` has rope type {other:?}; supported: \"longrope\" or none"
            ),
        };
        Ok(RopeConfig {
            theta,
            rotary_dim,
            scaling,
        })
    }
}

/// The fields of `generation_config.json` the engine honours.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationConfig {
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub do_sample: Option<bool>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<usize>,
}

impl GenerationConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        serde_json::json!({
            "model_type": "phi3", "vocab_size": 200064, "hidden_size": 3072,
            "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 24,
            "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "partial_rotary_factor": 0.75, "max_position_embeddings": 131072,
            "original_max_position_embeddings": 4096, "tie_word_embeddings": true,
            "rope_scaling": {"type": "longrope", "short_factor": vec![1.0; 48], "long_factor": vec![2.0; 48]}
        })
    }

    #[test]
    fn published_layout_resolves() {
        let cfg = Phi3Config::from_json(&base().to_string()).unwrap();
        assert_eq!(cfg.head_dim(), 128);
        assert_eq!(cfg.rope.rotary_dim, 96);
        assert_eq!(cfg.qkv_dim(), 5120);
        match &cfg.rope.scaling {
            RopeScaling::LongRope {
                original_max_position_embeddings,
                ..
            } => assert_eq!(*original_max_position_embeddings, 4096),
            other => panic!("{other:?}"),
        }
    }

    fn err(v: Value) -> String {
        format!("{:#}", Phi3Config::from_json(&v.to_string()).unwrap_err())
    }

    #[test]
    fn bad_fields_are_named() {
        let mut v = base();
        v["rope_scaling"]["type"] = "yarn".into();
        assert!(err(v).contains("rope type \"yarn\""));
        let mut v = base();
        v["rope_scaling"]["long_factor"] = serde_json::json!(vec![1.0; 47]);
        assert!(err(v).contains("rope_scaling.long_factor"));
        let mut v = base();
        v["num_attention_heads"] = 25.into();
        v["num_key_value_heads"] = 5.into();
        assert!(err(v).contains("head_dim is not integral"));
        let mut v = base();
        v["model_type"] = "llama".into();
        assert!(err(v).contains("model_type"));
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        assert!(err(v).contains("hidden_size"));
    }
}

/// The published Phi-4-mini-instruct `config.json` (spec §1.1), for synthetic full-size weights.
pub const PHI4_MINI_CONFIG: &str = r#"{
  "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 200064,
  "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
  "num_attention_heads": 24, "num_key_value_heads": 8, "hidden_act": "silu",
  "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
  "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
  "sliding_window": 262144, "tie_word_embeddings": true, "attention_bias": false,
  "mlp_bias": false, "bos_token_id": 199999, "eos_token_id": 199999, "pad_token_id": 199999,
  "torch_dtype": "bfloat16",
  "rope_scaling": {"type": "longrope",
    "short_factor": [1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0],
    "long_factor": [1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649, 2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845, 5.351743533, 5.984965424, 6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158, 11.70738129, 13.09260651, 14.64173252, 16.37415215, 18.31155283, 20.47818807, 22.90118105, 25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71, 32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77]}
}"#;

impl Phi3Config {
    /// The real Phi-4-mini-instruct configuration.
    pub fn phi4_mini() -> Phi3Config {
        Phi3Config::from_json(PHI4_MINI_CONFIG).expect("the built-in config is valid")
    }

    /// Parameters of the decoder (embedding counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let attn = self.num_attention_heads * self.head_dim();
        let layer = 2 * h + self.qkv_dim() * h + h * attn + 2 * i * h + h * i;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_hidden_layers * layer + h + head
    }
}

#[cfg(test)]
mod phi4_mini_tests {
    #[test]
    fn parameter_count_matches_the_published_model() {
        assert_eq!(
            super::Phi3Config::phi4_mini().num_parameters(),
            3_836_021_760
        );
    }
}
