//! Quantization recipes, quantizing a loaded model in place, and writing the self-describing
//! quantized checkpoint `phi4 quantize` makes (its layout: [`crate::weights`]).
//!
//! A recipe names the block format of every weight matrix by its tensor name; norms stay f32.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};

use super::Phi3ForCausalLM;
use crate::kernels::quant::QType;
use crate::weights::{DType, QuantEntry, Tensor, LAYOUT, LAYOUT_KEY, META_KEY};

/// Column importances by weight name: the mean square of the inputs each column of a matrix
/// met on calibration text ([`super::Phi3ForCausalLM::take_importance`]).
pub type Importance = BTreeMap<String, Vec<f32>>;

/// Metadata key of the calibration a checkpoint was quantized with (text file and tokens).
pub const CALIBRATION_KEY: &str = "phi4.calibration";

/// Metadata key of the recipe a checkpoint was made with.
pub const RECIPE_KEY: &str = "phi4.recipe";

/// Which block format each weight gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recipe {
    /// Every matrix at 8 bits.
    Q8,
    /// Every matrix at 6 bits (Q4's nibbles and two more bits), embeddings / LM head included.
    Q6,
    /// Every matrix at 5 bits.
    Q5,
    /// Every matrix at 4 bits, embeddings / LM head included.
    Q4,
    /// 4 bits, except `down_proj` and the embeddings / LM head at 8 bits: Phi-4-mini degrades
    /// under uniform 4-bit, most where errors are not averaged away (the MLP output, the logits).
    Q4Edge,
    /// One format for every matrix but the classes given another: `q4+qkv_proj+embed` (the
    /// classes at 8 bits), `q5+qkv_proj:q6+embed:q8` on the command line.
    Mix(Mix),
}

/// A [`Recipe::Mix`]: the base format, and per class of [`CLASSES`] (by index) its own format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mix {
    pub base: QType,
    pub classes: [Option<QType>; CLASSES.len()],
}

impl Mix {
    /// `base` with the classes whose bit is set in `mask` (bit `i` = `CLASSES[i]`) at `to`.
    pub fn with(base: QType, mask: u8, to: QType) -> Mix {
        Mix {
            base,
            classes: std::array::from_fn(|i| (mask & (1 << i) != 0).then_some(to)),
        }
    }
}

/// The classes of weight matrices a [`Recipe::Mix`] can give their own format: the four
/// projections of every layer by name, and `embed` for the embeddings and the LM head (one
/// matrix when tied). Measured on SmolLM2-135M (BENCHMARKS.md, issue 25), each alone at 8 bits
/// inside q4: qkv_proj helps most per byte (with grouped-query attention it is the smallest),
/// then the embeddings, down_proj, gate_up_proj; o_proj least.
pub const CLASSES: [&str; 5] = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed"];

/// Whether the weight `name` (a Hugging Face tensor name) is of `class`.
fn is_class(name: &str, class: &str) -> bool {
    match class {
        "embed" => name == "model.embed_tokens.weight" || name == "lm_head.weight",
        _ => name.ends_with(&format!("{class}.weight")),
    }
}

impl Recipe {
    /// The named recipes (a mix is named by its parts).
    pub const ALL: [Recipe; 5] = [
        Recipe::Q8,
        Recipe::Q6,
        Recipe::Q5,
        Recipe::Q4,
        Recipe::Q4Edge,
    ];

    /// q4-edge as a mix.
    const EDGE: Mix = Mix {
        base: QType::Q4,
        classes: [None, None, None, Some(QType::Q8), Some(QType::Q8)],
    };

    pub fn name(self) -> std::borrow::Cow<'static, str> {
        match self {
            Recipe::Q8 => "q8".into(),
            Recipe::Q6 => "q6".into(),
            Recipe::Q5 => "q5".into(),
            Recipe::Q4 => "q4".into(),
            Recipe::Q4Edge => "q4-edge".into(),
            Recipe::Mix(mix) => {
                let mut s = String::from(mix.base.name());
                for (c, t) in CLASSES.iter().zip(mix.classes) {
                    if let Some(t) = t {
                        s += "+";
                        s += c;
                        if t != QType::Q8 {
                            s += ":";
                            s += t.name();
                        }
                    }
                }
                s.into()
            }
        }
    }

    pub fn parse(s: &str) -> Result<Recipe> {
        if let Some(r) = Recipe::ALL.into_iter().find(|r| r.name() == s) {
            return Ok(r);
        }
        let mut parts = s.split('+');
        let base = parts.next().and_then(QType::parse);
        let Some(base) = base.filter(|_| s.contains('+')) else {
            anyhow::bail!(
                "unknown quantization recipe {s:?}; choose q8, q6, q5, q4, q4-edge, or a format with classes in another (8 bits unless named), as q4+qkv_proj+embed or q5+qkv_proj:q6 (classes: {}; formats: q4, q5, q6, q8)",
                CLASSES.join(", ")
            );
        };
        let mut classes = [None; CLASSES.len()];
        for part in parts {
            let (class, t) = match part.split_once(':') {
                Some((class, t)) => (
                    class,
                    QType::parse(t).with_context(|| {
                        format!(
                            "unknown format {t:?} in recipe {s:?}; the formats are q4, q5, q6, q8"
                        )
                    })?,
                ),
                None => (part, QType::Q8),
            };
            let i = CLASSES.iter().position(|c| *c == class).with_context(|| {
                format!(
                    "unknown class {class:?} in recipe {s:?}; the classes are {}",
                    CLASSES.join(", ")
                )
            })?;
            if classes[i].is_some() {
                anyhow::bail!("class {class:?} named twice in recipe {s:?}");
            }
            if t == base {
                anyhow::bail!(
                    "class {class:?} is given the base format {} in recipe {s:?}",
                    t.name()
                );
            }
            classes[i] = Some(t);
        }
        let mix = Mix { base, classes };
        // A mix that is a named recipe goes by that name.
        Ok(if mix == Recipe::EDGE {
            Recipe::Q4Edge
        } else {
            Recipe::Mix(mix)
        })
    }

    /// The format for the weight matrix `name` (a Hugging Face tensor name).
    pub fn qtype(self, name: &str) -> QType {
        let mix = match self {
            Recipe::Q8 => return QType::Q8,
            Recipe::Q6 => return QType::Q6,
            Recipe::Q5 => return QType::Q5,
            Recipe::Q4 => return QType::Q4,
            Recipe::Q4Edge => Recipe::EDGE,
            Recipe::Mix(mix) => mix,
        };
        CLASSES
            .iter()
            .zip(mix.classes)
            .find_map(|(c, t)| t.filter(|_| is_class(name, c)))
            .unwrap_or(mix.base)
    }
}

/// Writes `model` as `dir/model.safetensors`: quantized matrices as described in
/// [`crate::weights::META_KEY`], float tensors as they are. `recipe` is recorded if given.
pub fn write_checkpoint(model: &Phi3ForCausalLM, recipe: Option<Recipe>, dir: &Path) -> Result<()> {
    write_checkpoint_with(model, recipe, &[], dir)
}

/// [`write_checkpoint`] with more metadata entries (`notes`: key, value).
pub fn write_checkpoint_with(
    model: &Phi3ForCausalLM,
    recipe: Option<Recipe>,
    notes: &[(&str, String)],
    dir: &Path,
) -> Result<()> {
    write_tensors_with(&model.named_tensors(), recipe, notes, dir)
}

/// Writes named tensors as `dir/model.safetensors` (quantized ones as `N.qs` + `N.scales`).
pub fn write_tensors(named: &[(String, Tensor)], recipe: Option<Recipe>, dir: &Path) -> Result<()> {
    write_tensors_with(named, recipe, &[], dir)
}

fn write_tensors_with(
    named: &[(String, Tensor)],
    recipe: Option<Recipe>,
    notes: &[(&str, String)],
    dir: &Path,
) -> Result<()> {
    let mut entries = BTreeMap::new();
    let mut pieces: Vec<(String, safetensors::Dtype, Vec<usize>, &[u8])> = Vec::new();
    for (name, t) in named {
        match t.as_quant() {
            Some((q, qs, d)) => {
                let rows = t.shape[0];
                entries.insert(
                    name.clone(),
                    QuantEntry {
                        qtype: q.name().into(),
                        shape: t.shape.clone(),
                    },
                );
                pieces.push((
                    format!("{name}.qs"),
                    safetensors::Dtype::U8,
                    vec![rows, qs.len() / rows],
                    qs,
                ));
                pieces.push((
                    format!("{name}.scales"),
                    safetensors::Dtype::F16,
                    vec![rows, d.len() / rows],
                    bytemuck::cast_slice(d),
                ));
            }
            None => {
                let dt = match t.dtype {
                    DType::F32 => safetensors::Dtype::F32,
                    DType::F16 => safetensors::Dtype::F16,
                    DType::BF16 => safetensors::Dtype::BF16,
                    DType::U8 => safetensors::Dtype::U8,
                    DType::Quant(_) => unreachable!("as_quant covers quantized tensors"),
                };
                pieces.push((name.clone(), dt, t.shape.clone(), t.raw()));
            }
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = pieces
        .into_iter()
        .map(|(n, dt, shape, data)| {
            let v = safetensors::tensor::TensorView::new(dt, shape, data)
                .with_context(|| format!("tensor {n}"))?;
            Ok((n, v))
        })
        .collect::<Result<_>>()?;
    let mut meta = std::collections::HashMap::new();
    meta.insert(META_KEY.to_string(), serde_json::to_string(&entries)?);
    meta.insert(LAYOUT_KEY.to_string(), LAYOUT.to_string());
    if let Some(r) = recipe {
        meta.insert(RECIPE_KEY.to_string(), r.name().into_owned());
    }
    for (k, v) in notes {
        meta.insert(k.to_string(), v.clone());
    }
    meta.insert("format".to_string(), "pt".to_string());
    let path = dir.join("model.safetensors");
    safetensors::serialize_to_file(views, Some(meta), &path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Copies everything in `dir` but its weight files into `out`: config, tokenizer, chat template,
/// and with `folders` the subfolders' files too (Phi-4-multimodal's adapter folders).
pub fn copy_beside_weights(dir: &Path, out: &Path, folders: bool) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let is_weights = name.ends_with(".safetensors") || name == "model.safetensors.index.json";
        if path.is_dir() && folders {
            std::fs::create_dir_all(out.join(name))?;
            for f in std::fs::read_dir(&path)? {
                let f = f?.path();
                if f.is_file() {
                    std::fs::copy(&f, out.join(name).join(f.file_name().unwrap()))
                        .with_context(|| format!("copying {}", f.display()))?;
                }
            }
        } else if path.is_file() && !is_weights {
            std::fs::copy(&path, out.join(name))
                .with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipes_parse_name_and_place_each_matrix() {
        for r in Recipe::ALL {
            assert_eq!(Recipe::parse(&r.name()).unwrap(), r);
        }
        let m = Recipe::parse("q4+qkv_proj+embed").unwrap();
        assert_eq!(m, Recipe::Mix(Mix::with(QType::Q4, 1 | 1 << 4, QType::Q8)));
        assert_eq!(m.name(), "q4+qkv_proj+embed");
        assert_eq!(Recipe::parse("q4+embed+qkv_proj").unwrap(), m);
        let q = |r: Recipe, n: &str| r.qtype(n);
        let qkv = "model.layers.3.self_attn.qkv_proj.weight";
        let down = "model.layers.3.mlp.down_proj.weight";
        assert_eq!(q(m, qkv), QType::Q8);
        assert_eq!(q(m, "model.layers.3.self_attn.o_proj.weight"), QType::Q4);
        assert_eq!(q(m, down), QType::Q4);
        assert_eq!(q(m, "lm_head.weight"), QType::Q8);
        assert_eq!(q(m, "model.embed_tokens.weight"), QType::Q8);
        // q4-edge is q4+down_proj+embed under its own name.
        let edge = Recipe::parse("q4+down_proj+embed").unwrap();
        assert_eq!(edge, Recipe::Q4Edge);
        let six = Recipe::parse("q5+qkv_proj:q6+embed").unwrap();
        assert_eq!(six.name(), "q5+qkv_proj:q6+embed");
        assert_eq!(q(six, qkv), QType::Q6);
        assert_eq!(q(six, down), QType::Q5);
        assert_eq!(q(six, "lm_head.weight"), QType::Q8);
        assert_eq!(q(Recipe::Q6, down), QType::Q6);
        for n in [
            qkv,
            down,
            "lm_head.weight",
            "model.layers.0.mlp.gate_up_proj.weight",
        ] {
            assert_eq!(q(edge, n), q(Recipe::Q4Edge, n), "{n}");
        }
        for (bad, needle) in [
            ("q3", "unknown quantization recipe"),
            ("q5-edge", "unknown quantization recipe"),
            ("q4+", "unknown class \"\""),
            ("q4+mlp", "unknown class \"mlp\""),
            ("q4+embed:q7", "unknown format \"q7\""),
            ("q6+embed:q6", "base format"),
            ("q4+embed+embed", "named twice"),
        ] {
            let e = Recipe::parse(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }
}
