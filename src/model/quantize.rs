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
// A mix's layer rules make it ~330 bytes; recipes are copied a few times per quantization, not
// per token, and staying `Copy` keeps every caller simple, so it is not boxed.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recipe {
    /// Every matrix at 8 bits.
    Q8,
    /// Every matrix at 6 bits (Q4's nibbles and two more bits), embeddings / LM head included.
    Q6,
    /// Every matrix at 5 bits.
    Q5,
    /// Every matrix at 5 bits with a zero point per block (same bytes as q5).
    Q5M,
    /// Every matrix at 4 bits, embeddings / LM head included.
    Q4,
    /// Every matrix at 4 bits with a zero point per block (same bytes as q4).
    Q4M,
    /// 4 bits, except `down_proj` and the embeddings / LM head at 8 bits: Phi-4-mini degrades
    /// under uniform 4-bit, most where errors are not averaged away (the MLP output, the logits).
    Q4Edge,
    /// One format for every matrix but the classes given another: `q4+qkv_proj+embed` (the
    /// classes at 8 bits), `q5+qkv_proj:q6+embed:q8` on the command line; and layers of a
    /// class given another still: `q5+down_proj@0-2,29:q6`.
    Mix(Mix),
}

/// Decoder layers, bit `i` for layer `i`.
pub type Layers = u128;

/// Layers a recipe can name one by one.
pub const MAX_LAYERS: usize = Layers::BITS as usize;

/// A [`Recipe::Mix`]: the base format, per class of [`CLASSES`] (by index) its own format, and
/// per class and format (by index in [`QType::ALL`]) the layers that take that format instead
/// of the class's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mix {
    pub base: QType,
    pub classes: [Option<QType>; CLASSES.len()],
    pub layers: [[Layers; QType::ALL.len()]; CLASSES.len()],
}

impl Mix {
    /// `base` with the classes whose bit is set in `mask` (bit `i` = `CLASSES[i]`) at `to`.
    pub fn with(base: QType, mask: u8, to: QType) -> Mix {
        Mix {
            base,
            classes: std::array::from_fn(|i| (mask & (1 << i) != 0).then_some(to)),
            layers: NO_LAYERS,
        }
    }

    /// The format of class `c` (index in [`CLASSES`]) in decoder layer `layer`.
    pub fn format(&self, c: usize, layer: Option<usize>) -> QType {
        if let Some(l) = layer.filter(|&l| l < MAX_LAYERS) {
            if let Some(f) = self.layers[c].iter().position(|m| m >> l & 1 == 1) {
                return QType::ALL[f];
            }
        }
        self.classes[c].unwrap_or(self.base)
    }

    /// The highest layer a layer rule names.
    pub fn max_layer(&self) -> Option<usize> {
        let all = self.layers.iter().flatten().fold(0, |a, m| a | m);
        (all != 0).then(|| MAX_LAYERS - 1 - all.leading_zeros() as usize)
    }
}

/// No layer rules.
pub const NO_LAYERS: [[Layers; QType::ALL.len()]; CLASSES.len()] =
    [[0; QType::ALL.len()]; CLASSES.len()];

/// `0-2,5` for layers 0, 1, 2 and 5.
fn layers_name(m: Layers) -> String {
    let mut parts = Vec::new();
    let mut l = 0;
    while l < MAX_LAYERS {
        if m >> l & 1 == 0 {
            l += 1;
            continue;
        }
        let start = l;
        while l + 1 < MAX_LAYERS && m >> (l + 1) & 1 == 1 {
            l += 1;
        }
        parts.push(if l == start {
            start.to_string()
        } else {
            format!("{start}-{l}")
        });
        l += 1;
    }
    parts.join(",")
}

fn parse_layers(s: &str, recipe: &str) -> Result<Layers> {
    let bad = || {
        anyhow::anyhow!(
            "layers {s:?} in recipe {recipe:?}: give layer numbers and ranges below {MAX_LAYERS}, as 0-3,29"
        )
    };
    let mut m: Layers = 0;
    for part in s.split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        );
        if a > b || b >= MAX_LAYERS {
            return Err(bad());
        }
        for l in a..=b {
            m |= 1 << l;
        }
    }
    Ok(m)
}

/// The layer a weight name belongs to (`model.layers.{i}.…`).
fn layer_of(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("model.layers.")?;
    rest.split('.').next()?.parse().ok()
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
    pub const ALL: [Recipe; 7] = [
        Recipe::Q8,
        Recipe::Q6,
        Recipe::Q5M,
        Recipe::Q5,
        Recipe::Q4M,
        Recipe::Q4,
        Recipe::Q4Edge,
    ];

    /// q4-edge as a mix.
    const EDGE: Mix = Mix {
        base: QType::Q4,
        classes: [None, None, None, Some(QType::Q8), Some(QType::Q8)],
        layers: NO_LAYERS,
    };

    pub fn name(self) -> std::borrow::Cow<'static, str> {
        match self {
            Recipe::Q8 => "q8".into(),
            Recipe::Q6 => "q6".into(),
            Recipe::Q5 => "q5".into(),
            Recipe::Q5M => "q5m".into(),
            Recipe::Q4 => "q4".into(),
            Recipe::Q4M => "q4m".into(),
            Recipe::Q4Edge => "q4-edge".into(),
            Recipe::Mix(mix) => {
                let mut s = String::from(mix.base.name());
                let mut part = |class: &str, layers: Option<Layers>, t: QType| {
                    s += "+";
                    s += class;
                    if let Some(m) = layers {
                        s += "@";
                        s += &layers_name(m);
                    }
                    if t != QType::Q8 {
                        s += ":";
                        s += t.name();
                    }
                };
                for (c, t) in CLASSES.iter().zip(mix.classes) {
                    if let Some(t) = t {
                        part(c, None, t);
                    }
                }
                for (c, per_format) in CLASSES.iter().zip(mix.layers) {
                    for (t, m) in QType::ALL.into_iter().zip(per_format) {
                        if m != 0 {
                            part(c, Some(m), t);
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
                "unknown quantization recipe {s:?}; choose q8, q6, q5m, q5, q4m, q4, q4-edge, or a format with classes in another (8 bits unless named), as q4+qkv_proj+embed or q5+qkv_proj:q6 (classes: {}; formats: q4, q4m, q5, q5m, q6, q8)",
                CLASSES.join(", ")
            );
        };
        let mut classes = [None; CLASSES.len()];
        let mut layers = NO_LAYERS;
        for part in parts {
            let (head, t) = match part.split_once(':') {
                Some((head, t)) => (
                    head,
                    QType::parse(t).with_context(|| {
                        format!(
                            "unknown format {t:?} in recipe {s:?}; the formats are q4, q4m, q5, q5m, q6, q8"
                        )
                    })?,
                ),
                None => (part, QType::Q8),
            };
            let (class, at) = match head.split_once('@') {
                Some((class, at)) => (class, Some(at)),
                None => (head, None),
            };
            let i = CLASSES.iter().position(|c| *c == class).with_context(|| {
                format!(
                    "unknown class {class:?} in recipe {s:?}; the classes are {}",
                    CLASSES.join(", ")
                )
            })?;
            if let Some(at) = at {
                if class == "embed" {
                    anyhow::bail!(
                        "the embeddings are in no layer: {part:?} in recipe {s:?} names layers"
                    );
                }
                let m = parse_layers(at, s)?;
                let f = t.index();
                let taken = layers[i].iter().fold(0, |a, m| a | m);
                if layers[i][f] != 0 || taken & m != 0 {
                    anyhow::bail!(
                        "layers of class {class:?} named twice in recipe {s:?}: give each layer one format, and a format's layers in one part"
                    );
                }
                layers[i][f] = m;
                continue;
            }
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
        for (i, class) in CLASSES.iter().enumerate() {
            let own = classes[i].unwrap_or(base);
            if layers[i][own.index()] != 0 {
                anyhow::bail!(
                    "layers of class {class:?} are given its own format {} in recipe {s:?}",
                    own.name()
                );
            }
        }
        let mix = Mix {
            base,
            classes,
            layers,
        };
        // A mix that is a named recipe goes by that name.
        Ok(if mix == Recipe::EDGE {
            Recipe::Q4Edge
        } else {
            Recipe::Mix(mix)
        })
    }

    /// The highest decoder layer the recipe names (for a check against the model's).
    pub fn max_layer(self) -> Option<usize> {
        match self {
            Recipe::Mix(mix) => mix.max_layer(),
            _ => None,
        }
    }

    /// The format for the weight matrix `name` (a Hugging Face tensor name).
    pub fn qtype(self, name: &str) -> QType {
        let mix = match self {
            Recipe::Q8 => return QType::Q8,
            Recipe::Q6 => return QType::Q6,
            Recipe::Q5 => return QType::Q5,
            Recipe::Q5M => return QType::Q5M,
            Recipe::Q4 => return QType::Q4,
            Recipe::Q4M => return QType::Q4M,
            Recipe::Q4Edge => Recipe::EDGE,
            Recipe::Mix(mix) => mix,
        };
        match CLASSES.iter().position(|c| is_class(name, c)) {
            Some(c) => mix.format(c, layer_of(name)),
            None => mix.base,
        }
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

    #[test]
    fn layer_rules_parse_name_and_place_each_matrix() {
        let r = Recipe::parse("q5+down_proj@29,0-2:q6+qkv_proj:q6+qkv_proj@3:q8+down_proj@5:q4")
            .unwrap();
        // Canonical order: class-wide parts, then layer rules by class and widest format first.
        let name = "q5+qkv_proj:q6+qkv_proj@3+down_proj@0-2,29:q6+down_proj@5:q4";
        assert_eq!(r.name(), name);
        assert_eq!(Recipe::parse(name).unwrap(), r);
        assert_eq!(r.max_layer(), Some(29));
        let at = |l: usize, m: &str| r.qtype(&format!("model.layers.{l}.{m}.weight"));
        assert_eq!(at(0, "mlp.down_proj"), QType::Q6);
        assert_eq!(at(2, "mlp.down_proj"), QType::Q6);
        assert_eq!(at(3, "mlp.down_proj"), QType::Q5);
        assert_eq!(at(5, "mlp.down_proj"), QType::Q4);
        assert_eq!(at(29, "mlp.down_proj"), QType::Q6);
        assert_eq!(at(3, "self_attn.qkv_proj"), QType::Q8);
        assert_eq!(at(4, "self_attn.qkv_proj"), QType::Q6);
        assert_eq!(at(0, "mlp.gate_up_proj"), QType::Q5);
        assert_eq!(r.qtype("lm_head.weight"), QType::Q5);
        // Layers past 127 cannot be named and take the class's format.
        assert_eq!(at(200, "mlp.down_proj"), QType::Q5);
        assert_eq!(Recipe::Q4Edge.max_layer(), None);
        assert_eq!(Recipe::parse("q4+embed").unwrap().max_layer(), None);
        for (bad, needle) in [
            ("q4+embed@0", "no layer"),
            ("q4+down_proj@", "layers \"\""),
            ("q4+down_proj@3-1", "ranges below 128"),
            ("q4+down_proj@128", "ranges below 128"),
            ("q4+down_proj@x:q6", "layers \"x\""),
            ("q4+down_proj@1:q6+down_proj@2:q6", "named twice"),
            ("q4+down_proj@1-3:q6+down_proj@3:q8", "named twice"),
            ("q4+down_proj@1:q4", "its own format q4"),
            ("q4+down_proj:q6+down_proj@1:q6", "its own format q6"),
            ("q4+mlp@1", "unknown class \"mlp\""),
        ] {
            let e = Recipe::parse(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }
}
