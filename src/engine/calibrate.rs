//! Calibration for `phi4 quantize --calibration`: the float model runs over a text while every
//! projection and the LM head record the mean square of each input column, which then weighs
//! each weight column's rounding error (the role of llama.cpp's importance matrix, computed by
//! the engine itself).

use anyhow::{bail, Result};

use super::Engine;
use crate::kernels::quant::QType;
use crate::model::linear::Linear;
use crate::model::quantize::{Importance, Mix, Recipe, CLASSES};
use crate::model::{BatchItem, Logits, Phi3ForCausalLM};
use crate::weights::Tensor;

impl Engine {
    /// Column importances from up to `max_windows` non-overlapping windows of `ctx` tokens of
    /// `ids`, each run from an empty cache (every position through the LM head too), and the
    /// tokens they covered. `progress(done, total)` is told after each window.
    pub fn calibrate(
        &mut self,
        ids: &[u32],
        ctx: usize,
        max_windows: usize,
        progress: &dyn Fn(usize, usize),
    ) -> Result<(Importance, u64)> {
        if ctx < 2 || ctx > self.max_model_len {
            bail!(
                "calibration windows of {ctx} tokens: choose 2 to {} (the model's context)",
                self.max_model_len
            );
        }
        let windows = (ids.len() / ctx).min(max_windows);
        if windows == 0 {
            bail!(
                "the calibration text has {} tokens; a window of {ctx} needs at least that many",
                ids.len()
            );
        }
        if !self.model.lm_head.weight().dtype.is_float() {
            bail!("calibration needs the float model: the weights are already quantized");
        }
        self.model.collect_stats();
        let table = self.table_for(ctx);
        let mut logits = Vec::new();
        let mut run = || -> Result<()> {
            for (i, window) in ids.chunks_exact(ctx).take(windows).enumerate() {
                let mut cache = self.model.new_cache();
                let item = BatchItem::new(window, &mut cache, table);
                self.model
                    .forward_item(item, Logits::All, None, &mut logits)?;
                progress(i + 1, windows);
            }
            Ok(())
        };
        let ran = run();
        // Collectors come off whatever happened, so the model computes as before.
        let (imp, rows) = self.model.take_importance();
        ran?;
        Ok((imp, rows))
    }
}

/// What [`Engine::choose_mix`] measured of one class in one wider format inside q4.
#[derive(Debug, Clone)]
pub struct ClassGain {
    pub class: &'static str,
    pub format: QType,
    /// Mean KL against the float model on the window with this class alone in `format`.
    pub kl: f64,
    /// Bytes it adds to q4.
    pub extra_bytes: usize,
}

/// The mix [`Engine::choose_mix`] settled on.
#[derive(Debug, Clone)]
pub struct MixChoice {
    pub recipe: Recipe,
    /// Mean KL of plain q4, and of the chosen mix, on the window.
    pub q4_kl: f64,
    pub kl: f64,
    /// Bits per weight of the quantized matrices (padding included), q4's and the mix's.
    pub q4_bits: f64,
    pub bits: f64,
    pub classes: Vec<ClassGain>,
}

/// The formats a class can take in a mix, q4 (the base) first.
const FORMATS: [QType; 4] = [QType::Q4, QType::Q5, QType::Q6, QType::Q8];

/// One matrix in every format of [`FORMATS`].
type Widths<T> = [T; FORMATS.len()];

/// `f(i, FORMATS[i])` for each format, in order.
fn per_format<T>(mut f: impl FnMut(usize, QType) -> Result<T>) -> Result<Widths<T>> {
    let mut out = Vec::with_capacity(FORMATS.len());
    for (i, t) in FORMATS.into_iter().enumerate() {
        out.push(f(i, t)?);
    }
    Ok(out
        .try_into()
        .unwrap_or_else(|_| unreachable!("one per format")))
}

/// The recipe that gives class `c` the format `FORMATS[pick[c]]`, by its shortest name: one
/// format everywhere is that format's recipe; otherwise the narrowest format used is the base.
fn recipe_of(pick: [usize; CLASSES.len()]) -> Recipe {
    let base = *pick.iter().min().expect("classes");
    if pick.iter().all(|&p| p == base) {
        return match FORMATS[base] {
            QType::Q4 => Recipe::Q4,
            QType::Q5 => Recipe::Q5,
            QType::Q6 => Recipe::Q6,
            QType::Q8 => Recipe::Q8,
        };
    }
    let mix = Mix {
        base: FORMATS[base],
        classes: pick.map(|p| (p != base).then_some(FORMATS[p])),
    };
    // Through the parser, so that a mix with a name of its own (q4-edge) gets it.
    Recipe::parse(&Recipe::Mix(mix).name()).expect("a mix names a valid recipe")
}

impl Engine {
    /// Quantizes the (float) model as q4 with the classes of [`CLASSES`] in the wider formats
    /// (q5, q6, q8) that buy the most accuracy per byte, measured: each class alone in each
    /// wider format is scored by its mean KL against the float model over the scored half of
    /// `window`; then, starting from q4, the step (one class to a wider format) that saves the
    /// most KL per extra byte, the savings of classes taken as adding up, is taken while the
    /// quantized matrices stay within `max_bits` per weight. Scales are weighted by `imp` (from
    /// [`Engine::calibrate`]). Each matrix is quantized once per format (its float weights
    /// released as it is done, so the peak holds ~25 bits a weight), and the candidates are put
    /// together from those.
    pub fn choose_mix(
        &mut self,
        window: &[u32],
        imp: &Importance,
        max_bits: f64,
        progress: &dyn Fn(&str),
    ) -> Result<MixChoice> {
        let base = self.window_logprobs(window)?;
        let at = |name: &str| imp.get(name).map(Vec::as_slice);
        let every = |lin: &Linear, name: &str| -> Result<Widths<Linear>> {
            per_format(|_, t| lin.quantize_weighted(t, at(name)))
        };
        progress("quantizing every matrix at 4, 5, 6 and 8 bits");
        let tied = self.model.config.tie_word_embeddings;
        let mut layers: Vec<Vec<Widths<Linear>>> = Vec::new();
        for (l, layer) in self.model.model.layers.iter_mut().enumerate() {
            let mut lins = Vec::new();
            for (name, lin) in layer.linears_mut() {
                let w = every(lin, &format!("model.layers.{l}.{name}.weight"))?;
                // The float matrix goes now: the peak is the formats, not them and the floats.
                *lin = w[0].clone();
                lins.push(w);
            }
            layers.push(lins);
        }
        let embed_imp = if tied { at("lm_head.weight") } else { None };
        let embed: Widths<Tensor> = per_format(|_, t| {
            self.model
                .model
                .embed_tokens
                .quantize_weighted(t, embed_imp)
        })?;
        let head: Widths<Linear> = if tied {
            per_format(|i, _| Linear::new(embed[i].clone()))?
        } else {
            every(&self.model.lm_head, "lm_head.weight")?
        };
        // Bytes per class in each format, and the weights they hold.
        let mut bytes = [[0usize; FORMATS.len()]; CLASSES.len()];
        let mut weights = 0usize;
        for lins in &layers {
            for (c, w) in lins.iter().enumerate() {
                for (b, lin) in bytes[c].iter_mut().zip(w) {
                    *b += lin.weight().nbytes();
                }
                weights += w[0].in_features * w[0].out_features;
            }
        }
        let e = CLASSES.len() - 1;
        for (i, t) in embed.iter().enumerate() {
            bytes[e][i] += t.nbytes();
        }
        weights += embed[0].numel();
        if !tied {
            for (i, lin) in head.iter().enumerate() {
                bytes[e][i] += lin.weight().nbytes();
            }
            weights += head[0].in_features * head[0].out_features;
        }
        type Pick = [usize; CLASSES.len()];
        let bits = |pick: Pick| -> f64 {
            let b: usize = (0..CLASSES.len()).map(|c| bytes[c][pick[c]]).sum();
            8.0 * b as f64 / weights as f64
        };
        let set = |model: &mut Phi3ForCausalLM, pick: Pick| {
            for (layer, lins) in model.model.layers.iter_mut().zip(&layers) {
                for (c, ((_, lin), w)) in layer.linears_mut().into_iter().zip(lins).enumerate() {
                    *lin = w[pick[c]].clone();
                }
            }
            model.model.embed_tokens = embed[pick[e]].clone();
            model.lm_head = head[pick[e]].clone();
        };
        let kl_of = |engine: &Engine| -> Result<f64> {
            let cur = engine.window_logprobs(window)?;
            let total: f64 = (0..base.rows)
                .map(|i| super::perplexity::kl_divergence(base.row(i), cur.row(i)))
                .sum();
            Ok(total / base.rows as f64)
        };
        let acts = self.model.quant_acts();
        let measure = |engine: &mut Engine, pick: Pick| -> Result<f64> {
            set(&mut engine.model, pick);
            engine.model.set_quant_acts(acts);
            kl_of(engine)
        };
        let q4 = [0; CLASSES.len()];
        let q4_kl = measure(self, q4)?;
        progress(&format!(
            "q4: mean KL {q4_kl:.5}, {:.2} bits/weight",
            bits(q4)
        ));
        // kl[c][f]: class c alone in FORMATS[f] (f = 0: plain q4).
        let mut kl = [[q4_kl; FORMATS.len()]; CLASSES.len()];
        let mut classes = Vec::new();
        for (c, name) in CLASSES.iter().enumerate() {
            for (f, t) in FORMATS.iter().enumerate().skip(1) {
                let mut pick = q4;
                pick[c] = f;
                kl[c][f] = measure(self, pick)?;
                progress(&format!(
                    "q4+{name}:{}: mean KL {:.5}, {:.2} bits/weight",
                    t.name(),
                    kl[c][f],
                    bits(pick)
                ));
                classes.push(ClassGain {
                    class: name,
                    format: *t,
                    kl: kl[c][f],
                    extra_bytes: bytes[c][f] - bytes[c][0],
                });
            }
        }
        let mut pick = q4;
        loop {
            // The step that saves the most (measured) KL per extra byte and fits the budget.
            let mut best: Option<(f64, usize, usize)> = None;
            for c in 0..CLASSES.len() {
                for f in pick[c] + 1..FORMATS.len() {
                    let mut next = pick;
                    next[c] = f;
                    let saved = kl[c][pick[c]] - kl[c][f];
                    if saved <= 0.0 || bits(next) > max_bits {
                        continue;
                    }
                    let per_byte = saved / (bytes[c][f] - bytes[c][pick[c]]).max(1) as f64;
                    if best.is_none_or(|(b, _, _)| per_byte > b) {
                        best = Some((per_byte, c, f));
                    }
                }
            }
            let Some((_, c, f)) = best else { break };
            pick[c] = f;
        }
        let kl = measure(self, pick)?;
        Ok(MixChoice {
            recipe: recipe_of(pick),
            q4_kl,
            kl,
            q4_bits: bits(q4),
            bits: bits(pick),
            classes,
        })
    }
}
