//! Calibration for `phi4 quantize --calibration`: the float model runs over a text while every
//! projection and the LM head record the mean square of each input column, which then weighs
//! each weight column's rounding error (the role of llama.cpp's importance matrix, computed by
//! the engine itself).

use anyhow::{bail, Result};

use super::Engine;
use crate::kernels::quant::QType;
use crate::model::linear::Linear;
use crate::model::quantize::{Importance, Mix, Recipe, CLASSES, MAX_LAYERS, NO_LAYERS};
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

/// What [`Engine::choose_mix`] found of one class: its sensitivity, measured at 8 bits in each
/// band of layers, and the rounding error of each format.
#[derive(Debug, Clone)]
pub struct ClassGain {
    pub class: &'static str,
    /// Mean KL against the float model on the window with this class at 8 bits in one band of
    /// layers (see [`BANDS`]; the embeddings: one figure), the rest q4m.
    pub q8_kl: Vec<f64>,
    /// Per format of [`FORMATS`]: the class's importance-weighted squared rounding error
    /// (`Σ imp·(w − ŵ)²` over its matrices), and the bytes it takes.
    pub error: Widths<f64>,
    pub bytes: Widths<usize>,
}

/// Contiguous bands of layers whose sensitivity [`Engine::choose_mix`] measures apart. On
/// SmolLM2-135M (30 layers, GPL-3 8 × 512, i8 activations), each third of `down_proj` alone at
/// 8 bits inside q4 saved 0.006 / 0.019 / 0.016 of KL (all of it 0.042), `qkv_proj` 0.013 /
/// 0.025 / 0.015 (0.053): the bands add up, and the middle third counts most, which the
/// matrices' rounding errors alone do not say (ranked by error share within the class, a
/// per-matrix assignment predicted 0.021 and measured 0.033, against 0.023 for the best
/// per-class one).
pub const BANDS: usize = 3;

/// The mix [`Engine::choose_mix`] settled on.
#[derive(Debug, Clone)]
pub struct MixChoice {
    pub recipe: Recipe,
    /// Mean KL of plain q4m (the base), and of the chosen mix, on the window.
    pub base_kl: f64,
    pub kl: f64,
    /// Bits per weight of the quantized matrices (padding included), q4m's and the mix's.
    pub base_bits: f64,
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

/// The formats a class can take in a mix, the base first: q4m, not q4, which it beats at the
/// same bytes (SmolLM2-135M calibrated: mean KL 0.086 against 0.218, BENCHMARKS.md run Q6).
const FORMATS: [QType; 4] = [QType::Q4M, QType::Q5, QType::Q6, QType::Q8];

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

/// The band (of [`BANDS`]) that layer `l` of `layers` falls in.
fn band(l: usize, layers: usize) -> usize {
    l * BANDS / layers
}

/// Projection classes: every class of [`CLASSES`] but the last (`embed`), one matrix per layer.
const PROJ: usize = CLASSES.len() - 1;

/// A format (index in [`FORMATS`]) for each matrix: per layer one per projection class, and one
/// for the embeddings / LM head.
#[derive(Debug, Clone, PartialEq)]
struct Assign {
    layers: Vec<[usize; PROJ]>,
    embed: usize,
}

impl Assign {
    /// Class `c` in format `pick[c]` in every layer.
    fn of_classes(pick: [usize; CLASSES.len()], layers: usize) -> Assign {
        Assign {
            layers: vec![std::array::from_fn(|c| pick[c]); layers],
            embed: pick[PROJ],
        }
    }

    /// The recipe that gives each matrix its format, by its shortest name: each class at its
    /// most common format (the narrower on a tie), layer rules for the rest, and the narrowest
    /// class format as the base; one format everywhere is that format's recipe.
    fn recipe(&self) -> Recipe {
        let mut own = [0usize; CLASSES.len()];
        for (c, o) in own.iter_mut().enumerate().take(PROJ) {
            let mut count = [0usize; FORMATS.len()];
            for l in &self.layers {
                count[l[c]] += 1;
            }
            // max_by_key keeps the last maximum: scan widest first to prefer the narrower.
            *o = (0..FORMATS.len())
                .rev()
                .max_by_key(|&f| count[f])
                .expect("formats");
        }
        own[PROJ] = self.embed;
        let base = *own.iter().min().expect("classes");
        let mut layers = NO_LAYERS;
        for (l, picks) in self.layers.iter().enumerate() {
            for c in 0..PROJ {
                if picks[c] != own[c] {
                    layers[c][FORMATS[picks[c]].index()] |= 1 << l;
                }
            }
        }
        if own.iter().all(|&o| o == base) && layers == NO_LAYERS {
            return match FORMATS[base] {
                QType::Q4 => Recipe::Q4,
                QType::Q4M => Recipe::Q4M,
                QType::Q5M => Recipe::Q5M,
                QType::Q5 => Recipe::Q5,
                QType::Q6 => Recipe::Q6,
                QType::Q8 => Recipe::Q8,
            };
        }
        let mix = Mix {
            base: FORMATS[base],
            classes: own.map(|o| (o != base).then_some(FORMATS[o])),
            layers,
        };
        // Through the parser, so that a mix with a name of its own would get it (none on the
        // q4m base today; q4-edge's base is q4).
        Recipe::parse(&Recipe::Mix(mix).name()).expect("a mix names a valid recipe")
    }
}

/// Per matrix of a model: a value in each format of [`FORMATS`], per layer and projection
/// class, and for the embeddings / LM head.
#[derive(Clone)]
struct PerMatrix<T> {
    layers: Vec<[Widths<T>; PROJ]>,
    embed: Widths<T>,
}

impl<T: Copy + Default + std::ops::AddAssign> PerMatrix<T> {
    fn new(layers: usize) -> Self {
        PerMatrix {
            layers: vec![[[T::default(); FORMATS.len()]; PROJ]; layers],
            embed: [T::default(); FORMATS.len()],
        }
    }

    /// The sum over the matrices of class `c` in each format.
    fn class(&self, c: usize) -> Widths<T> {
        if c == PROJ {
            return self.embed;
        }
        let mut out = [T::default(); FORMATS.len()];
        for l in &self.layers {
            for (o, v) in out.iter_mut().zip(l[c]) {
                *o += v;
            }
        }
        out
    }

    /// The sum over every matrix in its assigned format.
    fn total(&self, a: &Assign) -> T {
        let mut sum = self.embed[a.embed];
        for (l, picks) in self.layers.iter().zip(&a.layers) {
            for c in 0..PROJ {
                sum += l[c][picks[c]];
            }
        }
        sum
    }
}

/// KL saved per unit of rounding error removed: per projection class and band of layers, and
/// for the embeddings / LM head.
struct Sensitivity {
    layers: [[f64; BANDS]; PROJ],
    embed: f64,
}

impl Sensitivity {
    /// The KL the model predicts for assignment `a` (the base's, q4m, less the savings).
    fn predict(&self, q4_kl: f64, error: &PerMatrix<f64>, a: &Assign) -> f64 {
        let n = error.layers.len();
        let mut saved = self.embed * (error.embed[0] - error.embed[a.embed]);
        for (l, (e, picks)) in error.layers.iter().zip(&a.layers).enumerate() {
            for c in 0..PROJ {
                saved += self.layers[c][band(l, n)] * (e[c][0] - e[c][picks[c]]);
            }
        }
        q4_kl - saved
    }
}

/// Units the band-level search assigns a format to: each projection class in each band of
/// layers, and the embeddings / LM head.
const UNITS: usize = PROJ * BANDS + 1;

/// The band-level assignments (each unit of [`UNITS`] one format) within `max_bits` that the
/// loss model ranks best, `keep` of them, leaving out those that give every band of a class the
/// same format (the per-class search has them): (predicted KL, bits, per unit its format). A
/// depth-first walk over the units that stops where the bits already exceed the budget.
fn best_by_bands(
    error: &PerMatrix<f64>,
    bits: &PerMatrix<f64>,
    sensitivity: &Sensitivity,
    q4_kl: f64,
    max_bits: f64,
    keep: usize,
) -> Vec<(f64, f64, [usize; UNITS])> {
    if keep == 0 {
        return Vec::new();
    }
    let n = error.layers.len();
    // Per unit: saving per format (against q4m), bits per format, and whether it holds a matrix.
    let mut save = [[0f64; FORMATS.len()]; UNITS];
    let mut cost = [[0f64; FORMATS.len()]; UNITS];
    let mut live = [false; UNITS];
    for l in 0..n {
        for c in 0..PROJ {
            let u = c * BANDS + band(l, n);
            let (e, b) = (&error.layers[l][c], &bits.layers[l][c]);
            for f in 0..FORMATS.len() {
                save[u][f] += sensitivity.layers[c][band(l, n)] * (e[0] - e[f]);
                cost[u][f] += b[f];
            }
            live[u] = true;
        }
    }
    for f in 0..FORMATS.len() {
        save[UNITS - 1][f] = sensitivity.embed * (error.embed[0] - error.embed[f]);
        cost[UNITS - 1][f] = bits.embed[f];
    }
    live[UNITS - 1] = true;
    // The least bits each tail of units can take, for pruning.
    let mut floor = [0f64; UNITS + 1];
    for u in (0..UNITS).rev() {
        floor[u] = floor[u + 1] + cost[u].iter().cloned().fold(f64::INFINITY, f64::min);
    }
    struct Walk<'a> {
        save: &'a [[f64; FORMATS.len()]; UNITS],
        cost: &'a [[f64; FORMATS.len()]; UNITS],
        live: &'a [bool; UNITS],
        floor: &'a [f64; UNITS + 1],
        max_bits: f64,
        q4_kl: f64,
        keep: usize,
        pick: [usize; UNITS],
        best: Vec<(f64, f64, [usize; UNITS])>,
    }
    impl Walk<'_> {
        fn go(&mut self, u: usize, bits: f64, saved: f64) {
            if bits + self.floor[u] > self.max_bits {
                return;
            }
            if u == UNITS {
                let uniform = (0..PROJ).all(|c| {
                    let first = self.pick[c * BANDS];
                    (0..BANDS)
                        .all(|k| !self.live[c * BANDS + k] || self.pick[c * BANDS + k] == first)
                });
                if uniform {
                    return;
                }
                let kl = self.q4_kl - saved;
                let at = self
                    .best
                    .partition_point(|b| b.0 < kl || (b.0 == kl && b.1 <= bits));
                if at < self.keep {
                    self.best.insert(at, (kl, bits, self.pick));
                    self.best.truncate(self.keep);
                }
                return;
            }
            // An empty band (fewer layers than bands) stays q4m: other formats change nothing.
            let formats = if self.live[u] { FORMATS.len() } else { 1 };
            for f in 0..formats {
                self.pick[u] = f;
                self.go(u + 1, bits + self.cost[u][f], saved + self.save[u][f]);
            }
        }
    }
    let mut walk = Walk {
        save: &save,
        cost: &cost,
        live: &live,
        floor: &floor,
        max_bits,
        q4_kl,
        keep,
        pick: [0; UNITS],
        best: Vec::new(),
    };
    walk.go(0, 0.0, 0.0);
    walk.best
}

/// The assignment that gives each unit of [`UNITS`] its format in `pick`.
fn of_bands(pick: &[usize; UNITS], layers: usize) -> Assign {
    Assign {
        layers: (0..layers)
            .map(|l| std::array::from_fn(|c| pick[c * BANDS + band(l, layers)]))
            .collect(),
        embed: pick[UNITS - 1],
    }
}

/// Band-level candidates measured beside the per-class ones.
const BAND_FINALISTS: usize = 2;

impl Engine {
    /// Quantizes the (float) model with a format (q4m, q5, q6 or q8) per class of [`CLASSES`],
    /// or per class and band of layers ([`BANDS`]), for the least KL within `max_bits` per
    /// weight of the quantized matrices. A model of the loss, measured: the sensitivities come
    /// from scoring q4m, and q4m with one class at 8 bits in one band of layers (the embeddings:
    /// alone), 14 runs with q4m's (mean KL against the float model over the scored half of
    /// `window`); each matrix's rounding error in each format is computed (`Σ imp·(w − ŵ)²`,
    /// with the column importances `imp` from [`Engine::calibrate`], which also weigh the
    /// scales); a matrix in format f is predicted to save its class and band's sensitivity × (error at q4m − error at
    /// f), and the savings to add up. The best [`FINALISTS`] per-class assignments within the
    /// budget by that prediction (all 4^5 tried) and the best [`BAND_FINALISTS`] that give
    /// bands of a class different formats ([`best_by_bands`], all 4^13 in effect) are scored;
    /// the least KL wins. (Scoring each class in every format instead, then adding those up,
    /// chose worse: single-window differences of a few thousandths between q5 and q6 are noise;
    /// the errors are not. Layer by layer through the errors alone chose worse too: see
    /// [`BANDS`].) Each matrix is quantized once per format (its float weights released as it
    /// is done, so the peak holds ~25 bits a weight), and the candidates are put together from
    /// those.
    pub fn choose_mix(
        &mut self,
        window: &[u32],
        imp: &Importance,
        max_bits: f64,
        progress: &dyn Fn(&str),
    ) -> Result<MixChoice> {
        let base = self.window_logprobs(window)?;
        let at = |name: &str| imp.get(name).map(Vec::as_slice);
        let n_layers = self.model.model.layers.len();
        // Rounding error per matrix and format, filled in as the matrices are quantized.
        let mut error = PerMatrix::<f64>::new(n_layers);
        progress("quantizing every matrix at 4, 5, 6 and 8 bits");
        let tied = self.model.config.tie_word_embeddings;
        let mut layers: Vec<Vec<Widths<Linear>>> = Vec::new();
        for (l, layer) in self.model.model.layers.iter_mut().enumerate() {
            let mut lins = Vec::new();
            for (c, (name, lin)) in layer.linears_mut().into_iter().enumerate() {
                let name = format!("model.layers.{l}.{name}.weight");
                let w = every_format(lin.weight(), at(&name), &mut error.layers[l][c])?;
                let w = w.map(|w| lin.with_weight(w));
                // The float matrix goes now: the peak is the formats, not them and the floats.
                *lin = w[0].clone();
                lins.push(w);
            }
            layers.push(lins);
        }
        let table = &self.model.model.embed_tokens;
        let (embed, head): (Widths<Tensor>, Widths<Linear>) = if tied {
            // The embedding is the LM head: its error is that of the head's product.
            let embed = every_format(table, at("lm_head.weight"), &mut error.embed)?;
            let head = per_format(|i, _| Linear::new(embed[i].clone()))?;
            (embed, head)
        } else {
            let lin = &self.model.lm_head;
            let head = every_format(lin.weight(), at("lm_head.weight"), &mut error.embed)?;
            let head = head.map(|w| lin.with_weight(w));
            // A lookup: every column counts alike.
            (every_format(table, None, &mut error.embed)?, head)
        };
        // Bytes per matrix in each format, and the weights they hold.
        let mut bytes = PerMatrix::<f64>::new(n_layers);
        let mut weights = 0usize;
        for (l, lins) in layers.iter().enumerate() {
            for (c, w) in lins.iter().enumerate() {
                for (b, lin) in bytes.layers[l][c].iter_mut().zip(w) {
                    *b = lin.weight().nbytes() as f64;
                }
                weights += w[0].in_features * w[0].out_features;
            }
        }
        for (i, t) in embed.iter().enumerate() {
            bytes.embed[i] += t.nbytes() as f64;
        }
        weights += embed[0].numel();
        if !tied {
            for (i, lin) in head.iter().enumerate() {
                bytes.embed[i] += lin.weight().nbytes() as f64;
            }
            weights += head[0].in_features * head[0].out_features;
        }
        let mut bits_of = bytes.clone();
        for v in bits_of
            .layers
            .iter_mut()
            .flatten()
            .flatten()
            .chain(bits_of.embed.iter_mut())
        {
            *v *= 8.0 / weights as f64;
        }
        let bits = |a: &Assign| bits_of.total(a);
        let set = |model: &mut Phi3ForCausalLM, a: &Assign| {
            for ((layer, lins), picks) in model.model.layers.iter_mut().zip(&layers).zip(&a.layers)
            {
                for (c, ((_, lin), w)) in layer.linears_mut().into_iter().zip(lins).enumerate() {
                    *lin = w[picks[c]].clone();
                }
            }
            model.model.embed_tokens = embed[a.embed].clone();
            model.lm_head = head[a.embed].clone();
        };
        let kl_of = |engine: &Engine| -> Result<f64> {
            let cur = engine.window_logprobs(window)?;
            let total: f64 = (0..base.rows)
                .map(|i| super::perplexity::kl_divergence(base.row(i), cur.row(i)))
                .sum();
            Ok(total / base.rows as f64)
        };
        let acts = self.model.quant_acts();
        let measure = |engine: &mut Engine, a: &Assign| -> Result<f64> {
            set(&mut engine.model, a);
            engine.model.set_quant_acts(acts);
            kl_of(engine)
        };
        type Pick = [usize; CLASSES.len()];
        let of = |pick: Pick| Assign::of_classes(pick, n_layers);
        let q4 = [0; CLASSES.len()];
        let q8 = FORMATS.len() - 1;
        let base = FORMATS[0].name();
        let q4_kl = measure(self, &of(q4))?;
        progress(&format!(
            "{base}: mean KL {q4_kl:.5}, {:.2} bits/weight",
            bits(&of(q4))
        ));
        // KL saved per unit of error removed, per class and band (0 where 8 bits measured no
        // better): q4m with that class at 8 bits in that band of layers.
        let mut sensitivity = Sensitivity {
            layers: [[0.0; BANDS]; PROJ],
            embed: 0.0,
        };
        let mut classes = Vec::new();
        for (c, name) in CLASSES.iter().enumerate() {
            let mut kls = Vec::new();
            for k in 0..if c == PROJ { 1 } else { BANDS } {
                let mut a = of(q4);
                let (removed, label) = if c == PROJ {
                    a.embed = q8;
                    (error.embed[0] - error.embed[q8], format!("{base}+{name}"))
                } else {
                    let mut removed = 0.0;
                    let mut span: Option<(usize, usize)> = None;
                    for (l, picks) in a.layers.iter_mut().enumerate() {
                        if band(l, n_layers) == k {
                            picks[c] = q8;
                            removed += error.layers[l][c][0] - error.layers[l][c][q8];
                            span = Some((span.map_or(l, |s| s.0), l));
                        }
                    }
                    // Fewer layers than bands: this band is empty.
                    let Some((first, last)) = span else { continue };
                    let layers = if first == last {
                        first.to_string()
                    } else {
                        format!("{first}-{last}")
                    };
                    (removed, format!("{base}+{name}@{layers}"))
                };
                let kl = measure(self, &a)?;
                let s = if removed > 0.0 {
                    ((q4_kl - kl) / removed).max(0.0)
                } else {
                    0.0
                };
                if c == PROJ {
                    sensitivity.embed = s;
                } else {
                    sensitivity.layers[c][k] = s;
                }
                progress(&format!(
                    "{label}: mean KL {kl:.5}, {:.2} bits/weight",
                    bits(&a)
                ));
                kls.push(kl);
            }
            let err = error.class(c);
            let rel = err.map(|x| x / err[0].max(f64::MIN_POSITIVE));
            progress(&format!(
                "{name}: rounding error at q5 / q6 / q8: {:.3} / {:.4} / {:.5} of {base}'s",
                rel[1], rel[2], rel[3]
            ));
            classes.push(ClassGain {
                class: name,
                q8_kl: kls,
                error: err,
                bytes: bytes.class(c).map(|b| b as usize),
            });
        }
        let predict = |a: &Assign| sensitivity.predict(q4_kl, &error, a);
        // Every per-class assignment within the budget, by predicted KL (then by size).
        let mut fits: Vec<(f64, f64, Assign)> = (0..FORMATS.len().pow(CLASSES.len() as u32))
            .map(|mut n| {
                of(std::array::from_fn(|_| {
                    let f = n % FORMATS.len();
                    n /= FORMATS.len();
                    f
                }))
            })
            .filter(|a| bits(a) <= max_bits)
            .map(|a| (predict(&a), bits(&a), a))
            .collect();
        fits.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
        fits.truncate(FINALISTS);
        // A recipe names layers below MAX_LAYERS only: deeper models get per-class mixes.
        let bands = if n_layers <= MAX_LAYERS {
            BAND_FINALISTS
        } else {
            0
        };
        for (predicted, b, pick) in
            best_by_bands(&error, &bits_of, &sensitivity, q4_kl, max_bits, bands)
        {
            fits.push((predicted, b, of_bands(&pick, n_layers)));
        }
        let q4_all = of(q4);
        let mut best = (q4_kl, q4_all.clone());
        for (predicted, b, a) in fits {
            let kl = if a == q4_all {
                q4_kl
            } else {
                measure(self, &a)?
            };
            progress(&format!(
                "{}: predicted mean KL {predicted:.5}, measured {kl:.5}, {b:.2} bits/weight",
                a.recipe().name()
            ));
            if kl < best.0 {
                best = (kl, a);
            }
        }
        let (kl, a) = best;
        set(&mut self.model, &a);
        self.model.set_quant_acts(acts);
        Ok(MixChoice {
            recipe: a.recipe(),
            base_kl: q4_kl,
            kl,
            base_bits: bits(&q4_all),
            bits: bits(&a),
            classes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [0, 1): the kernels' test data, shifted.
    fn values(n: usize, seed: u64) -> Vec<f64> {
        crate::kernels::test_data(n, seed)
            .into_iter()
            .map(|v| v as f64 + 0.5)
            .collect()
    }

    /// A made-up model of `layers` layers: errors falling and bits rising with the format.
    fn problem(layers: usize, seed: u64) -> (PerMatrix<f64>, PerMatrix<f64>, Sensitivity) {
        let mut v = values(1000, seed).into_iter();
        let mut error = PerMatrix::<f64>::new(layers);
        let mut bits = PerMatrix::<f64>::new(layers);
        let widths = [4.5, 5.5, 6.5, 8.5];
        let fill = |e: &mut Widths<f64>, b: &mut Widths<f64>, v: &mut dyn Iterator<Item = f64>| {
            let (scale, size) = (v.next().unwrap(), 0.02 + 0.1 * v.next().unwrap());
            for f in 0..FORMATS.len() {
                e[f] = scale * [1.0, 0.24, 0.055, 0.006][f] * (0.8 + 0.4 * v.next().unwrap());
                b[f] = size * widths[f];
            }
        };
        for l in 0..layers {
            for c in 0..PROJ {
                fill(&mut error.layers[l][c], &mut bits.layers[l][c], &mut v);
            }
        }
        fill(&mut error.embed, &mut bits.embed, &mut v);
        let sensitivity = Sensitivity {
            layers: std::array::from_fn(|_| std::array::from_fn(|_| v.next().unwrap())),
            embed: v.next().unwrap(),
        };
        (error, bits, sensitivity)
    }

    #[test]
    fn the_band_search_finds_what_trying_every_assignment_finds() {
        // Fewer layers than bands: nine units (two layers) or five (one) hold matrices, so that
        // trying every assignment stays quick; the walk skips the empty ones.
        for (layers, seed) in [(2, 1), (2, 2), (1, 3)] {
            let (error, bits, sens) = problem(layers, seed);
            let all_q4 = bits.total(&of_bands(&[0; UNITS], layers));
            let all_q8 = bits.total(&of_bands(&[3; UNITS], layers));
            for budget in [
                all_q4 + 0.3 * (all_q8 - all_q4),
                all_q4 + 0.8 * (all_q8 - all_q4),
            ] {
                let got = best_by_bands(&error, &bits, &sens, 1.0, budget, 3);
                // Every assignment, by brute force through the per-matrix model.
                let live: Vec<usize> = (0..UNITS)
                    .filter(|&u| {
                        u == UNITS - 1 || (0..layers).any(|l| band(l, layers) == u % BANDS)
                    })
                    .collect();
                let mut want: Vec<(f64, f64, [usize; UNITS])> = Vec::new();
                for mut n in 0..FORMATS.len().pow(live.len() as u32) {
                    let mut pick = [0; UNITS];
                    for &u in &live {
                        pick[u] = n % FORMATS.len();
                        n /= FORMATS.len();
                    }
                    let a = of_bands(&pick, layers);
                    let uniform = a.layers.iter().all(|l| *l == a.layers[0]);
                    let b = bits.total(&a);
                    if b <= budget && !uniform {
                        want.push((sens.predict(1.0, &error, &a), b, pick));
                    }
                }
                want.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.total_cmp(&y.1)));
                assert_eq!(got.len(), want.len().min(3));
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g.0 - w.0).abs() < 1e-12 && (g.1 - w.1).abs() < 1e-12,
                        "{layers} layers, budget {budget}: {g:?} vs {w:?}"
                    );
                    assert!(g.1 <= budget);
                }
            }
        }
    }

    #[test]
    fn assignments_are_named_by_recipes_that_give_each_matrix_its_format() {
        let classes = [
            "self_attn.qkv_proj",
            "self_attn.o_proj",
            "mlp.gate_up_proj",
            "mlp.down_proj",
        ];
        for pick in [
            [0usize; UNITS],
            [3; UNITS],
            [1, 1, 1, 2, 2, 2, 0, 0, 0, 3, 3, 3, 2],
            [1, 2, 1, 0, 0, 3, 2, 2, 2, 0, 1, 0, 2],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 3, 3, 3],
        ] {
            let a = of_bands(&pick, 7);
            let r = a.recipe();
            // The name is the recipe's canonical one and parses back to it.
            assert_eq!(Recipe::parse(&r.name()).unwrap(), r);
            for (l, picks) in a.layers.iter().enumerate() {
                for (c, class) in classes.iter().enumerate() {
                    let name = format!("model.layers.{l}.{class}.weight");
                    assert_eq!(r.qtype(&name), FORMATS[picks[c]], "{} {name}", r.name());
                }
            }
            assert_eq!(r.qtype("lm_head.weight"), FORMATS[a.embed]);
        }
        assert_eq!(of_bands(&[0; UNITS], 7).recipe(), Recipe::Q4M);
        // q4-edge's classes at 8 bits on the q4m base: a mix of its own, not q4-edge.
        let edge = [0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 3, 3, 3];
        assert_eq!(of_bands(&edge, 7).recipe().name(), "q4m+down_proj+embed");
    }
}

#[cfg(test)]
mod untied_tests {
    use super::*;
    use crate::weights::DType;

    /// A model whose LM head is a matrix of its own: the search counts the head and the table
    /// (both of class `embed`), gives both the format its recipe names, and keeps them apart.
    #[test]
    fn an_untied_head_and_table_both_take_the_embed_format() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-phi4");
        let mut e = Engine::load(&dir).unwrap();
        let table = e.model.model.embed_tokens.clone();
        let mut values = vec![0f32; table.numel()];
        table.read_f32(0, &mut values);
        // A head unlike the table, so that a mix-up of the two shows.
        values
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = -0.5 * *v + (i % 7) as f32 * 1e-3);
        e.model.config.tie_word_embeddings = false;
        e.model.lm_head = Linear::new(Tensor::from_f32(table.shape.clone(), &values)).unwrap();
        let text = std::fs::read_to_string(dir.join("../perplexity.txt")).unwrap();
        let ids = e.tokenizer.encode(&text).unwrap();
        let (imp, _) = e.calibrate(&ids, 64, 2, &|_, _| {}).unwrap();
        let choice = e.choose_mix(&ids[..64], &imp, 6.0, &|_| {}).unwrap();
        assert!(choice.bits <= 6.0 + 1e-9, "{}", choice.bits);
        let r = choice.recipe;
        let head = e.model.lm_head.weight();
        let table = &e.model.model.embed_tokens;
        assert_eq!(
            head.dtype,
            DType::Quant(r.qtype("lm_head.weight")),
            "{}",
            r.name()
        );
        assert_eq!(
            table.dtype,
            DType::Quant(r.qtype("model.embed_tokens.weight"))
        );
        // The head kept its own values: its first row is not the table's.
        let (mut h, mut t) = (vec![0f32; table.shape[1]], vec![0f32; table.shape[1]]);
        head.read_f32(0, &mut h);
        table.read_f32(0, &mut t);
        assert_ne!(h, t);
        // The embed class's bytes are the two matrices', in each format.
        let embed = &choice.classes[CLASSES.len() - 1];
        let f = FORMATS
            .iter()
            .position(|&q| q == r.qtype("lm_head.weight"))
            .unwrap();
        assert_eq!(embed.bytes[f], head.nbytes() + table.nbytes());
    }
}
