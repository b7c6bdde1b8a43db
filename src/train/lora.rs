//! The trainable side of a LoRA adapter: every targeted projection's `A [r, in]` and
//! `B [out, r]` in one flat f32 vector (PEFT keeps adapters in f32 whatever the base's dtype),
//! so the optimizer, the gradient norm and the checkpoint files walk one slice.
//!
//! Files are PEFT's: `adapter_config.json` + `adapter_model.safetensors` with the keys
//! `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight`, which
//! transformers/PEFT, ms-swift (`swift infer --adapters`), vLLM (`--lora-modules`) and
//! llama.cpp's `convert_lora_to_gguf.py` all read.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use anyhow::{bail, Context, Result};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use crate::config::multimodal::LoraSpec;
use crate::model::Phi3ForCausalLM;
use crate::weights::{open_safetensors, DType};

/// The projections of a decoder layer LoRA can target, in [`DecoderLayer::linears`] order,
/// by their PEFT leaf names (`all-linear` in PEFT and ms-swift means all four; the tied LM head
/// and the embedding are never targets).
///
/// [`DecoderLayer::linears`]: crate::model::phi3::DecoderLayer::linears
pub const TARGETS: [&str; 4] = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"];

/// Key prefix of PEFT's files for a causal LM.
const PEFT_PREFIX: &str = "base_model.model.";

/// What `--target-modules` selects: leaf names, or a regex PEFT full-matches against the module
/// path (`model.layers.3.mlp.down_proj`).
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    Names(Vec<String>),
    Regex(String),
}

impl TargetModules {
    /// `all-linear`, a comma/space separated list of leaf names, or a regex (anything with a
    /// regex metacharacter in it).
    pub fn parse(args: &[String]) -> Result<TargetModules> {
        let items: Vec<String> = args
            .iter()
            .flat_map(|a| a.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if items.is_empty() {
            bail!("--target-modules is empty (use all-linear or some of {TARGETS:?})");
        }
        if items.len() == 1 && items[0].contains(['*', '.', '|', '(', '[', '^', '$', '\\']) {
            regex::Regex::new(&format!("^(?:{})$", items[0]))
                .with_context(|| format!("--target-modules {:?} is not a valid regex", items[0]))?;
            return Ok(TargetModules::Regex(items[0].clone()));
        }
        let mut names = Vec::new();
        for it in items {
            if it == "all-linear" {
                names.extend(TARGETS.iter().map(|t| t.to_string()));
            } else if TARGETS.contains(&it.as_str()) {
                names.push(it);
            } else {
                bail!(
                    "--target-modules {it:?} is not a projection of this model; Phi-4's are \
                     {TARGETS:?} (q/k/v and gate/up are fused: qkv_proj, gate_up_proj)"
                );
            }
        }
        names.sort();
        names.dedup();
        Ok(TargetModules::Names(names))
    }

    fn matches(&self, path: &str, leaf: &str, re: Option<&regex::Regex>) -> bool {
        match self {
            TargetModules::Names(n) => n.iter().any(|x| x == leaf),
            TargetModules::Regex(_) => re.is_some_and(|r| r.is_match(path)),
        }
    }

    /// As `adapter_config.json` stores it.
    fn to_json(&self) -> Value {
        match self {
            TargetModules::Names(n) => json!(n),
            TargetModules::Regex(r) => json!(r),
        }
    }
}

/// The adapter's hyper-parameters (PEFT's `LoraConfig` fields of the same names).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSettings {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub use_rslora: bool,
    pub targets: TargetModules,
}

impl LoraSettings {
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f32 {
        LoraSpec {
            r: self.r,
            alpha: self.alpha,
            rslora: self.use_rslora,
        }
        .scale()
    }
}

/// One targeted projection: where its A and B sit in [`LoraParams::values`].
#[derive(Debug, Clone)]
pub struct LoraModule {
    pub layer: usize,
    /// Index into [`TARGETS`].
    pub target: usize,
    pub din: usize,
    pub dout: usize,
    pub a: Range<usize>,
    pub b: Range<usize>,
}

impl LoraModule {
    /// `model.layers.{i}.self_attn.qkv_proj` and so on.
    pub fn path(&self) -> String {
        let block = if self.target < 2 { "self_attn" } else { "mlp" };
        format!(
            "model.layers.{}.{block}.{}",
            self.layer, TARGETS[self.target]
        )
    }
}

/// Every trainable LoRA matrix of a model, flat.
#[derive(Debug, Clone)]
pub struct LoraParams {
    pub settings: LoraSettings,
    pub modules: Vec<LoraModule>,
    pub values: Vec<f32>,
    /// `layer * 4 + target` → index into `modules`.
    slot: Vec<Option<usize>>,
}

impl LoraParams {
    /// The layout for `model` under `settings`, all values zero.
    pub fn zeros(model: &Phi3ForCausalLM, settings: LoraSettings) -> Result<LoraParams> {
        if settings.r == 0 {
            bail!("--lora-rank must be at least 1");
        }
        if !(settings.alpha.is_finite() && settings.alpha > 0.0) {
            bail!("--lora-alpha must be a positive number");
        }
        if !(0.0..1.0).contains(&settings.dropout) {
            bail!("--lora-dropout must be in [0, 1)");
        }
        let re = match &settings.targets {
            TargetModules::Regex(r) => Some(regex::Regex::new(&format!("^(?:{r})$"))?),
            TargetModules::Names(_) => None,
        };
        let (mut modules, mut slot, mut at) = (Vec::new(), Vec::new(), 0);
        for (l, layer) in model.model.layers.iter().enumerate() {
            for (t, (name, lin)) in layer.linears().into_iter().enumerate() {
                let path = format!("model.layers.{l}.{name}");
                if !settings.targets.matches(&path, TARGETS[t], re.as_ref()) {
                    slot.push(None);
                    continue;
                }
                let (din, dout, r) = (lin.in_features, lin.out_features, settings.r);
                let a = at..at + r * din;
                let b = a.end..a.end + dout * r;
                at = b.end;
                slot.push(Some(modules.len()));
                modules.push(LoraModule {
                    layer: l,
                    target: t,
                    din,
                    dout,
                    a,
                    b,
                });
            }
        }
        if modules.is_empty() {
            bail!(
                "--target-modules {:?} selects none of the model's projections",
                settings.targets
            );
        }
        Ok(LoraParams {
            settings,
            modules,
            values: vec![0.0; at],
            slot,
        })
    }

    /// PEFT's default init: A ~ U(±1/√in) (`kaiming_uniform_(a=√5)`), B = 0, from `seed`.
    pub fn init(model: &Phi3ForCausalLM, settings: LoraSettings, seed: u64) -> Result<LoraParams> {
        let mut p = LoraParams::zeros(model, settings)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for m in &p.modules {
            let bound = 1.0 / (m.din as f32).sqrt();
            for v in &mut p.values[m.a.clone()] {
                *v = rng.random_range(-bound..bound);
            }
        }
        Ok(p)
    }

    /// The module on projection `target` of layer `layer`, if targeted.
    pub fn module(&self, layer: usize, target: usize) -> Option<&LoraModule> {
        self.slot
            .get(layer * TARGETS.len() + target)
            .copied()
            .flatten()
            .map(|i| &self.modules[i])
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Every matrix by its PEFT key, in module order.
    pub fn named(&self) -> Vec<(String, Vec<usize>, Range<usize>)> {
        let mut out = Vec::new();
        for m in &self.modules {
            let p = format!("{PEFT_PREFIX}{}", m.path());
            out.push((
                format!("{p}.lora_A.weight"),
                vec![self.settings.r, m.din],
                m.a.clone(),
            ));
            out.push((
                format!("{p}.lora_B.weight"),
                vec![m.dout, self.settings.r],
                m.b.clone(),
            ));
        }
        out
    }

    /// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` (f32).
    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let s = &self.settings;
        let cfg = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": s.r,
            "lora_alpha": s.alpha,
            "lora_dropout": s.dropout,
            "target_modules": s.targets.to_json(),
            "bias": "none",
            "fan_in_fan_out": false,
            "use_rslora": s.use_rslora,
            "use_dora": false,
            "modules_to_save": null,
            "init_lora_weights": true,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "inference_mode": true,
            "revision": null,
        });
        write_atomic(
            &dir.join("adapter_config.json"),
            serde_json::to_string_pretty(&cfg)?.as_bytes(),
        )?;
        save_f32_tensors(
            &dir.join("adapter_model.safetensors"),
            &self
                .named()
                .into_iter()
                .map(|(k, shape, r)| (k, shape, &self.values[r]))
                .collect::<Vec<_>>(),
        )
    }

    /// Reads a PEFT adapter directory for `model`; its tensors must be exactly the ones its
    /// config's targets give, with its rank.
    pub fn load_peft(model: &Phi3ForCausalLM, dir: &Path) -> Result<LoraParams> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).with_context(|| {
            format!(
                "{} is not an adapter directory (no adapter_config.json)",
                dir.display()
            )
        })?;
        let spec =
            LoraSpec::from_peft(&text).with_context(|| format!("in {}", cfg_path.display()))?;
        let v: Value = serde_json::from_str(&text)?;
        if v.get("modules_to_save")
            .and_then(Value::as_array)
            .is_some_and(|m| !m.is_empty())
        {
            bail!(
                "{}: modules_to_save is set; adapters that retrain whole modules are not supported",
                cfg_path.display()
            );
        }
        let file = dir.join("adapter_model.safetensors");
        let tensors: HashMap<String, crate::weights::Tensor> = open_safetensors(&file)
            .with_context(|| format!("reading {}", file.display()))?
            .into_iter()
            .map(|(k, t)| {
                let k = k.strip_prefix(PEFT_PREFIX).unwrap_or(&k).to_owned();
                (k, t)
            })
            .collect();
        // The file's keys are the truth (as in vLLM): target whatever projections it holds.
        let mut leaves: Vec<String> = TARGETS
            .iter()
            .filter(|t| tensors.keys().any(|k| k.contains(&format!(".{t}.lora_A"))))
            .map(|t| t.to_string())
            .collect();
        leaves.sort();
        let dropout = v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32;
        let mut p = LoraParams::zeros(
            model,
            LoraSettings {
                r: spec.r,
                alpha: spec.alpha,
                dropout: dropout.clamp(0.0, 0.99),
                use_rslora: spec.rslora,
                targets: TargetModules::Names(leaves),
            },
        )?;
        let mut used = 0;
        for (key, shape, range) in p.named() {
            let key = key.strip_prefix(PEFT_PREFIX).unwrap().to_owned();
            // Layer subsets (layers_to_transform) leave some projections without a delta.
            let Some(t) = tensors.get(&key) else {
                continue;
            };
            if t.shape != shape {
                bail!(
                    "{}: {key} has shape {:?}, expected {shape:?} for rank {}",
                    file.display(),
                    t.shape,
                    spec.r
                );
            }
            if !t.dtype.is_float() || t.dtype == DType::U8 {
                bail!("{}: {key} is not a float tensor", file.display());
            }
            t.read_f32(0, &mut p.values[range]);
            used += 1;
        }
        if used != tensors.len() {
            let extra: Vec<&String> = tensors
                .keys()
                .filter(|k| !p.named().iter().any(|(n, ..)| n.ends_with(k.as_str())))
                .take(3)
                .collect();
            bail!(
                "{}: tensors this model has no place for: {extra:?} (Phi-4 adapters target {TARGETS:?} of model.layers)",
                file.display()
            );
        }
        Ok(p)
    }
}

/// Writes `path` through a temporary file and a rename, so a crash never leaves half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// f32 tensors as one safetensors file (`format: pt`, as PEFT writes it), atomically.
pub fn save_f32_tensors(path: &Path, tensors: &[(String, Vec<usize>, &[f32])]) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(k, shape, v)| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                shape.clone(),
                bytemuck::cast_slice(v),
            )
            .with_context(|| format!("tensor {k}"))?;
            Ok((k.clone(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(views, Some(meta))?;
    write_atomic(path, &bytes)
}

impl LoraParams {
    /// Puts this adapter on `model`'s projections as adapter `id`, unmerged (rows that ask for
    /// `id` get `W·x + s·B·(A·x)`), in f32 as trained.
    pub fn attach(&self, model: &mut Phi3ForCausalLM, id: crate::model::AdapterId) -> Result<()> {
        use crate::weights::Tensor;
        let (r, scale) = (self.settings.r, self.settings.scale());
        for m in &self.modules {
            let [(_, qkv), (_, o), (_, gu), (_, down)] = model.model.layers[m.layer].linears_mut();
            let lin = [qkv, o, gu, down]
                .into_iter()
                .nth(m.target)
                .expect("4 targets");
            let a = Tensor::from_f32(vec![r, m.din], &self.values[m.a.clone()]);
            let b = Tensor::from_f32(vec![m.dout, r], &self.values[m.b.clone()]);
            lin.add_lora(id, a, b, scale).with_context(|| m.path())?;
        }
        Ok(())
    }
}
