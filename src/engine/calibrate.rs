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

/// What [`Engine::choose_mix`] found of one class: its sensitivity, measured at 8 bits, and
/// the rounding error of each format.
#[derive(Debug, Clone)]
pub struct ClassGain {
    pub class: &'static str,
    /// Mean KL against the float model on the window with this class alone at 8 bits.
    pub q8_kl: f64,
    /// Per format of [`FORMATS`]: the class's importance-weighted squared rounding error
    /// (`Σ imp·(w − ŵ)²` over its matrices), and the bytes it takes.
    pub error: Widths<f64>,
    pub bytes: Widths<usize>,
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

/// Candidate mixes measured at the end of [`Engine::choose_mix`]: the ones its model ranks
/// best.
const FINALISTS: usize = 3;

/// `Σ imp_c·(w − ŵ)²` between a float matrix and its quantized copy (`imp` per column; 1 for
/// every column without): the expected squared error the copy adds to the product's outputs
/// when the activations are independent with mean squares `imp`.
fn weighted_error(float: &Tensor, q: &Tensor, imp: Option<&[f32]>) -> f64 {
    use rayon::prelude::*;
    let [rows, cols] = float.shape[..] else {
        return 0.0;
    };
    (0..rows)
        .into_par_iter()
        .map_init(
            || (vec![0f32; cols], vec![0f32; cols]),
            |(a, b), r| {
                float.read_f32(r * cols, a);
                q.read_f32(r * cols, b);
                a.iter()
                    .zip(b.iter())
                    .enumerate()
                    .map(|(c, (x, y))| {
                        let e = (x - y) as f64;
                        imp.map_or(1.0, |i| i[c] as f64) * e * e
                    })
                    .sum::<f64>()
            },
        )
        .sum()
}

/// `w` (a float matrix) in every format of [`FORMATS`], each copy's [`weighted_error`] added
/// to `error`. Reading `w` for the errors maps its pages back in; they are dropped after
/// (without that, every float matrix stayed resident beside the four copies: synthetic
/// Phi-4-mini peaked at 19.5 GB instead of 13.3).
fn every_format(
    w: &Tensor,
    imp: Option<&[f32]>,
    error: &mut Widths<f64>,
) -> Result<Widths<Tensor>> {
    let q = per_format(|_, t| w.quantize_weighted(t, imp))?;
    for (err, q) in error.iter_mut().zip(&q) {
        *err += weighted_error(w, q, imp);
    }
    w.release_pages();
    Ok(q)
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
    /// Quantizes the (float) model with a format per class of [`CLASSES`] (q4, q5, q6 or q8)
    /// for the least KL within `max_bits` per weight of the quantized matrices. A model of the
    /// loss, measured: each class's sensitivity comes from scoring q4 and q4 with that class
    /// alone at 8 bits (mean KL against the float model over the scored half of `window`), and
    /// its rounding error in each format is computed (`Σ imp·(w − ŵ)²`, with the column
    /// importances `imp` from [`Engine::calibrate`], which also weigh the scales); a class in
    /// format f is predicted to save sensitivity × (error at q4 − error at f), and the savings
    /// of classes to add up. Every assignment within the budget is ranked by that prediction,
    /// and the best [`FINALISTS`] are scored; the least KL wins. (Scoring each class in every
    /// format instead, then adding those up, chose worse: single-window differences of a few
    /// thousandths between q5 and q6 are noise; the errors are not.) Each matrix is quantized
    /// once per format (its float weights released as it is done, so the peak holds ~25 bits a
    /// weight), and the candidates are put together from those.
    pub fn choose_mix(
        &mut self,
        window: &[u32],
        imp: &Importance,
        max_bits: f64,
        progress: &dyn Fn(&str),
    ) -> Result<MixChoice> {
        let base = self.window_logprobs(window)?;
        let at = |name: &str| imp.get(name).map(Vec::as_slice);
        let e = CLASSES.len() - 1;
        // Rounding error per class and format, accumulated as the matrices are quantized.
        let mut error = [[0f64; FORMATS.len()]; CLASSES.len()];
        let mut every = |lin: &Linear, name: &str, c: usize| -> Result<Widths<Linear>> {
            let w = every_format(lin.weight(), at(name), &mut error[c])?;
            Ok(w.map(|w| lin.with_weight(w)))
        };
        progress("quantizing every matrix at 4, 5, 6 and 8 bits");
        let tied = self.model.config.tie_word_embeddings;
        let mut layers: Vec<Vec<Widths<Linear>>> = Vec::new();
        for (l, layer) in self.model.model.layers.iter_mut().enumerate() {
            let mut lins = Vec::new();
            for (c, (name, lin)) in layer.linears_mut().into_iter().enumerate() {
                let w = every(lin, &format!("model.layers.{l}.{name}.weight"), c)?;
                // The float matrix goes now: the peak is the formats, not them and the floats.
                *lin = w[0].clone();
                lins.push(w);
            }
            layers.push(lins);
        }
        let table = &self.model.model.embed_tokens;
        let (embed, head): (Widths<Tensor>, Widths<Linear>) = if tied {
            // The embedding is the LM head: its error is that of the head's product.
            let embed = every_format(table, at("lm_head.weight"), &mut error[e])?;
            let head = per_format(|i, _| Linear::new(embed[i].clone()))?;
            (embed, head)
        } else {
            let head = every(&self.model.lm_head, "lm_head.weight", e)?;
            // A lookup: every column counts alike.
            (every_format(table, None, &mut error[e])?, head)
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
        let q8 = FORMATS.len() - 1;
        let q4_kl = measure(self, q4)?;
        progress(&format!(
            "q4: mean KL {q4_kl:.5}, {:.2} bits/weight",
            bits(q4)
        ));
        // KL saved per unit of error removed, per class (0 where 8 bits measured no better).
        let mut sensitivity = [0f64; CLASSES.len()];
        let mut classes = Vec::new();
        for (c, name) in CLASSES.iter().enumerate() {
            let mut pick = q4;
            pick[c] = q8;
            let kl = measure(self, pick)?;
            let removed = error[c][0] - error[c][q8];
            if removed > 0.0 {
                sensitivity[c] = ((q4_kl - kl) / removed).max(0.0);
            }
            let rel = error[c].map(|x| x / error[c][0].max(f64::MIN_POSITIVE));
            progress(&format!(
                "q4+{name}: mean KL {kl:.5}, {:.2} bits/weight; its rounding error at q5 / q6 / q8: {:.3} / {:.4} / {:.5} of q4's",
                bits(pick),
                rel[1],
                rel[2],
                rel[3]
            ));
            classes.push(ClassGain {
                class: name,
                q8_kl: kl,
                error: error[c],
                bytes: bytes[c],
            });
        }
        // Every assignment within the budget, by predicted KL (then by size).
        let predict = |pick: Pick| -> f64 {
            q4_kl
                - (0..CLASSES.len())
                    .map(|c| sensitivity[c] * (error[c][0] - error[c][pick[c]]))
                    .sum::<f64>()
        };
        let mut fits: Vec<(f64, f64, Pick)> = (0..FORMATS.len().pow(CLASSES.len() as u32))
            .map(|mut n| {
                std::array::from_fn(|_| {
                    let f = n % FORMATS.len();
                    n /= FORMATS.len();
                    f
                })
            })
            .filter(|&pick| bits(pick) <= max_bits)
            .map(|pick| (predict(pick), bits(pick), pick))
            .collect();
        fits.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
        let mut best = (q4_kl, q4);
        for &(predicted, b, pick) in fits.iter().take(FINALISTS) {
            let kl = if pick == q4 {
                q4_kl
            } else {
                measure(self, pick)?
            };
            progress(&format!(
                "{}: predicted mean KL {predicted:.5}, measured {kl:.5}, {b:.2} bits/weight",
                recipe_of(pick).name()
            ));
            if kl < best.0 {
                best = (kl, pick);
            }
        }
        let (kl, pick) = best;
        set(&mut self.model, pick);
        self.model.set_quant_acts(acts);
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
