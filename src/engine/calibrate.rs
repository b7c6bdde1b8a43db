//! Calibration for `phi4 quantize --calibration`: the float model runs over a text while every
//! projection and the LM head record the mean square of each input column, which then weighs
//! each weight column's rounding error (the role of llama.cpp's importance matrix, computed by
//! the engine itself).

use anyhow::{bail, Result};

use super::Engine;
use crate::kernels::quant::QType;
use crate::model::linear::Linear;
use crate::model::quantize::{Importance, Recipe, CLASSES};
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

/// What [`Engine::choose_mix`] measured of one class kept at 8 bits inside q4.
#[derive(Debug, Clone)]
pub struct ClassGain {
    pub class: &'static str,
    /// Mean KL against the float model on the window with this class alone at 8 bits.
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

/// One matrix at both widths: `[q4, q8]`.
type Widths<T> = [T; 2];

impl Engine {
    /// Quantizes the (float) model as q4 keeping at 8 bits the classes of [`CLASSES`] that buy
    /// the most accuracy per byte, measured: each class alone at 8 bits is scored by its mean
    /// KL against the float model over the scored half of `window`, and classes are added in
    /// order of KL saved per extra byte while the quantized matrices stay within `max_bits` per
    /// weight. Scales are weighted by `imp` (from [`Engine::calibrate`]). Each matrix is
    /// quantized once per width, and the candidates are put together from those.
    pub fn choose_mix(
        &mut self,
        window: &[u32],
        imp: &Importance,
        max_bits: f64,
        progress: &dyn Fn(&str),
    ) -> Result<MixChoice> {
        let base = self.window_logprobs(window)?;
        let m = &self.model;
        let at = |name: &str| imp.get(name).map(Vec::as_slice);
        let both = |lin: &Linear, name: &str| -> Result<Widths<Linear>> {
            Ok([
                lin.quantize_weighted(QType::Q4, at(name))?,
                lin.quantize_weighted(QType::Q8, at(name))?,
            ])
        };
        progress("quantizing every matrix at 4 and 8 bits");
        let mut layers: Vec<Vec<Widths<Linear>>> = Vec::new();
        for (l, layer) in m.model.layers.iter().enumerate() {
            let mut lins = Vec::new();
            for (name, lin) in layer.linears() {
                lins.push(both(lin, &format!("model.layers.{l}.{name}.weight"))?);
            }
            layers.push(lins);
        }
        let tied = m.config.tie_word_embeddings;
        let embed_imp = if tied { at("lm_head.weight") } else { None };
        let embed: Widths<Tensor> = [
            m.model
                .embed_tokens
                .quantize_weighted(QType::Q4, embed_imp)?,
            m.model
                .embed_tokens
                .quantize_weighted(QType::Q8, embed_imp)?,
        ];
        let head: Widths<Linear> = if tied {
            [
                Linear::new(embed[0].clone())?,
                Linear::new(embed[1].clone())?,
            ]
        } else {
            both(&m.lm_head, "lm_head.weight")?
        };
        // Bytes per class at each width, and the weights they hold.
        let mut bytes = [[0usize; 2]; CLASSES.len()];
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
        let bits = |mask: u8| -> f64 {
            let b: usize = (0..CLASSES.len())
                .map(|c| bytes[c][usize::from(mask & (1 << c) != 0)])
                .sum();
            8.0 * b as f64 / weights as f64
        };
        let set = |model: &mut Phi3ForCausalLM, mask: u8| {
            let pick = |c: usize| usize::from(mask & (1 << c) != 0);
            for (layer, lins) in model.model.layers.iter_mut().zip(&layers) {
                for (c, ((_, lin), w)) in layer.linears_mut().into_iter().zip(lins).enumerate() {
                    *lin = w[pick(c)].clone();
                }
            }
            model.model.embed_tokens = embed[pick(e)].clone();
            model.lm_head = head[pick(e)].clone();
        };
        let kl_of = |engine: &Engine| -> Result<f64> {
            let cur = engine.window_logprobs(window)?;
            let total: f64 = (0..base.rows)
                .map(|i| super::perplexity::kl_divergence(base.row(i), cur.row(i)))
                .sum();
            Ok(total / base.rows as f64)
        };
        let acts = self.model.quant_acts();
        let measure = |engine: &mut Engine, mask: u8| -> Result<f64> {
            set(&mut engine.model, mask);
            engine.model.set_quant_acts(acts);
            kl_of(engine)
        };
        let q4_kl = measure(self, 0)?;
        progress(&format!(
            "q4: mean KL {q4_kl:.5}, {:.2} bits/weight",
            bits(0)
        ));
        let mut classes = Vec::new();
        for (c, name) in CLASSES.iter().enumerate() {
            let kl = measure(self, 1 << c)?;
            let extra_bytes = bytes[c][1] - bytes[c][0];
            progress(&format!(
                "q4+{name}: mean KL {kl:.5}, {:.2} bits/weight",
                bits(1 << c)
            ));
            classes.push(ClassGain {
                class: name,
                kl,
                extra_bytes,
            });
        }
        let mut order: Vec<usize> = (0..CLASSES.len())
            .filter(|&c| classes[c].kl < q4_kl)
            .collect();
        let per_byte = |c: usize| (q4_kl - classes[c].kl) / classes[c].extra_bytes.max(1) as f64;
        order.sort_by(|&a, &b| per_byte(b).total_cmp(&per_byte(a)));
        let mut mask = 0u8;
        for c in order {
            if bits(mask | 1 << c) <= max_bits {
                mask |= 1 << c;
            }
        }
        let kl = measure(self, mask)?;
        let recipe = if mask == 0 {
            Recipe::Q4
        } else {
            Recipe::Mix(mask)
        };
        Ok(MixChoice {
            recipe,
            q4_kl,
            kl,
            q4_bits: bits(0),
            bits: bits(mask),
            classes,
        })
    }
}
