//! Perplexity and, against a saved base run, KL divergence and top-token agreement: the figures
//! `llama-perplexity` (with `--kl-divergence`) reports, computed the same way so engines can be
//! compared. The text is cut into non-overlapping windows of `ctx` tokens; each window is run
//! from an empty cache, and the tokens of its second half are scored (positions ctx/2 .. ctx-2
//! predict tokens ctx/2+1 .. ctx-1), so every scored token has at least ctx/2 tokens of context.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use half::f16;

use super::Engine;
use crate::model::{BatchItem, Logits};

/// The scored rows of one window: log-probabilities (natural log), `rows × vocab`.
pub struct WindowLogprobs {
    pub rows: usize,
    pub vocab: usize,
    pub logprobs: Vec<f32>,
}

impl WindowLogprobs {
    pub fn row(&self, i: usize) -> &[f32] {
        &self.logprobs[i * self.vocab..(i + 1) * self.vocab]
    }
}

/// Scored positions per window of `ctx` tokens.
pub fn scored_per_window(ctx: usize) -> usize {
    ctx - 1 - ctx / 2
}

impl Engine {
    /// The log-probabilities of one window's scored positions (see the module text). The RoPE
    /// table is the one a single pass over the whole window uses, as in the reference.
    pub fn window_logprobs(&self, window: &[u32]) -> Result<WindowLogprobs> {
        let ctx = window.len();
        if ctx < 4 {
            bail!("a perplexity window needs at least 4 tokens");
        }
        let first = ctx / 2;
        let table = self.table_for(ctx);
        let mut cache = self.model.new_cache();
        let mut logits = Vec::new();
        // The first half is context only: its logits are not needed.
        let head = BatchItem::new(&window[..first], &mut cache, table);
        self.model
            .forward_item(head, Logits::Last, None, &mut logits)?;
        let tail = BatchItem::new(&window[first..ctx - 1], &mut cache, table);
        self.model
            .forward_item(tail, Logits::All, None, &mut logits)?;
        let vocab = self.model.config.vocab_size;
        let rows = scored_per_window(ctx);
        debug_assert_eq!(logits.len(), rows * vocab);
        for row in logits.chunks_mut(vocab) {
            log_softmax(row);
        }
        Ok(WindowLogprobs {
            rows,
            vocab,
            logprobs: logits,
        })
    }
}

/// In place; the normaliser summed in f64 (a 200k-entry row loses digits in f32).
pub fn log_softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = x.iter().map(|&v| ((v - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    for v in x {
        *v = (*v as f64 - lse) as f32;
    }
}

/// KL(base ‖ current) for one position, in nats, from two log-probability rows.
pub fn kl_divergence(base: &[f32], current: &[f32]) -> f64 {
    base.iter()
        .zip(current)
        .map(|(&b, &c)| {
            let p = (b as f64).exp();
            if p == 0.0 {
                0.0
            } else {
                p * (b as f64 - c as f64)
            }
        })
        .sum()
}

pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// What a run measured, per scored token.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub nll: Vec<f64>,
    /// Against a base run only.
    pub kl: Vec<f64>,
    pub same_top: usize,
}

/// A figure with its standard error (of the mean, as llama.cpp prints).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Estimate {
    pub value: f64,
    pub stderr: f64,
}

fn mean_stderr(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    if x.len() < 2 {
        return (mean, 0.0);
    }
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// The `q`-quantile (0..=1) by linear interpolation between order statistics.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct KlSummary {
    pub mean: Estimate,
    pub median: f64,
    pub p99: f64,
    pub max: f64,
    /// Share of positions whose most likely token is the base's.
    pub same_top: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub tokens: usize,
    pub mean_nll: Estimate,
    /// exp(mean NLL), its error propagated from the mean's.
    pub perplexity: Estimate,
    pub kl: Option<KlSummary>,
}

impl Tally {
    /// exp(mean NLL) so far (what a progress line needs, without the full summary's sort).
    pub fn perplexity(&self) -> f64 {
        (self.nll.iter().sum::<f64>() / self.nll.len().max(1) as f64).exp()
    }

    pub fn summary(&self) -> Summary {
        let (m, e) = mean_stderr(&self.nll);
        let kl = (!self.kl.is_empty()).then(|| {
            let (km, ke) = mean_stderr(&self.kl);
            let mut sorted = self.kl.clone();
            sorted.sort_by(f64::total_cmp);
            KlSummary {
                mean: Estimate {
                    value: km,
                    stderr: ke,
                },
                median: quantile(&sorted, 0.5),
                p99: quantile(&sorted, 0.99),
                max: *sorted.last().unwrap_or(&0.0),
                same_top: self.same_top as f64 / self.kl.len() as f64,
            }
        });
        Summary {
            tokens: self.nll.len(),
            mean_nll: Estimate {
                value: m,
                stderr: e,
            },
            perplexity: Estimate {
                value: m.exp(),
                stderr: m.exp() * e,
            },
            kl,
        }
    }
}

const MAGIC: &[u8; 8] = b"PHI4LP01";

/// A base run's log-probabilities on disk: a header (magic, vocabulary, window, the text's
/// token ids, so a comparison on other text or another tokenizer is refused), then every
/// scored row as f16 log-probabilities, window after window. Full rows, because KL needs the
/// whole distribution (a top-k summary underestimates it).
pub struct BaseWriter {
    out: BufWriter<std::fs::File>,
    vocab: usize,
}

impl BaseWriter {
    pub fn create(path: &Path, vocab: usize, ctx: usize, ids: &[u32]) -> Result<BaseWriter> {
        let file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut out = BufWriter::new(file);
        out.write_all(MAGIC)?;
        for v in [vocab, ctx, ids.len()] {
            out.write_all(&(v as u32).to_le_bytes())?;
        }
        for id in ids {
            out.write_all(&id.to_le_bytes())?;
        }
        Ok(BaseWriter { out, vocab })
    }

    pub fn push(&mut self, w: &WindowLogprobs) -> Result<()> {
        assert_eq!(w.vocab, self.vocab);
        let mut buf = Vec::with_capacity(w.vocab * 2);
        for r in 0..w.rows {
            buf.clear();
            for &v in w.row(r) {
                buf.extend_from_slice(&f16::from_f32(v).to_le_bytes());
            }
            self.out.write_all(&buf)?;
        }
        Ok(())
    }

    pub fn finish(mut self) -> Result<()> {
        self.out.flush()?;
        Ok(())
    }
}

pub struct BaseReader {
    input: BufReader<std::fs::File>,
    vocab: usize,
    path: String,
}

impl BaseReader {
    /// Opens a base file and checks it was made with the same vocabulary, window and text.
    pub fn open(path: &Path, vocab: usize, ctx: usize, ids: &[u32]) -> Result<BaseReader> {
        let name = path.display().to_string();
        let file = std::fs::File::open(path).with_context(|| format!("opening {name}"))?;
        let len = file.metadata()?.len();
        let mut input = BufReader::new(file);
        let mut magic = [0u8; 8];
        input
            .read_exact(&mut magic)
            .with_context(|| format!("{name} is too short to be a base log-probability file"))?;
        if &magic != MAGIC {
            bail!("{name} is not a base log-probability file (written by `phi4 perplexity --save-logits`)");
        }
        let mut word = || -> Result<usize> {
            let mut b = [0u8; 4];
            input
                .read_exact(&mut b)
                .with_context(|| format!("{name} is truncated"))?;
            Ok(u32::from_le_bytes(b) as usize)
        };
        let (v, c, n) = (word()?, word()?, word()?);
        if v != vocab {
            bail!("{name} was made with a vocabulary of {v} tokens; this model has {vocab}");
        }
        if c != ctx {
            bail!("{name} was made with --ctx {c}; use the same window (this run: --ctx {ctx})");
        }
        let windows = n / ctx;
        let expect = 8 + 12 + 4 * n as u64 + (windows * scored_per_window(ctx) * vocab * 2) as u64;
        if len != expect {
            bail!("{name} is {len} bytes, {expect} expected: truncated or damaged");
        }
        let mut saved = vec![0u8; 4 * n];
        input.read_exact(&mut saved)?;
        let same = n == ids.len()
            && saved
                .chunks_exact(4)
                .zip(ids)
                .all(|(b, &id)| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) == id);
        if !same {
            bail!("{name} was made on a different text (or with another tokenizer): its {n} token ids differ from this run's {}", ids.len());
        }
        Ok(BaseReader {
            input,
            vocab,
            path: name,
        })
    }

    /// The next window's base rows.
    pub fn next(&mut self, rows: usize) -> Result<WindowLogprobs> {
        let mut raw = vec![0u8; rows * self.vocab * 2];
        self.input
            .read_exact(&mut raw)
            .with_context(|| format!("{} ended early", self.path))?;
        let mut logprobs: Vec<f32> = raw
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
        // Rounded to f16, a row no longer sums to exactly 1, which would leave a first-order
        // term (~1e-4 nats) in every KL; renormalised, only the second-order one remains.
        for row in logprobs.chunks_mut(self.vocab) {
            log_softmax(row);
        }
        Ok(WindowLogprobs {
            rows,
            vocab: self.vocab,
            logprobs,
        })
    }
}

/// Adds one window's scores: its negative log-likelihoods, and against `base` its KL and top
/// agreement. `window` is the window's tokens.
pub fn score(
    tally: &mut Tally,
    window: &[u32],
    lp: &WindowLogprobs,
    base: Option<&WindowLogprobs>,
) {
    let first = window.len() / 2;
    for r in 0..lp.rows {
        let row = lp.row(r);
        let target = window[first + r + 1] as usize;
        tally.nll.push(-(row[target] as f64));
        if let Some(b) = base {
            let brow = b.row(r);
            tally.kl.push(kl_divergence(brow, row));
            tally.same_top += usize::from(argmax(brow) == argmax(row));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_of_known_distributions() {
        let ln = |v: &[f64]| v.iter().map(|p| p.ln() as f32).collect::<Vec<_>>();
        let p = ln(&[0.5, 0.25, 0.25]);
        let q = ln(&[0.25, 0.5, 0.25]);
        // 0.5 ln 2 + 0.25 ln 0.5 = 0.25 ln 2.
        let want = 0.25 * std::f64::consts::LN_2;
        assert!((kl_divergence(&p, &q) - want).abs() < 1e-7);
        assert_eq!(kl_divergence(&p, &p), 0.0);
        // Against the uniform distribution over 4: ln 4 - H(p).
        let p = ln(&[0.7, 0.1, 0.1, 0.1]);
        let u = ln(&[0.25; 4]);
        let h = -(0.7f64 * 0.7f64.ln() + 3.0 * 0.1 * 0.1f64.ln());
        assert!((kl_divergence(&p, &u) - (4f64.ln() - h)).abs() < 1e-6);
    }

    #[test]
    fn log_softmax_normalises_and_keeps_differences() {
        let mut x = vec![1000.0f32, 1001.0, 999.0, -5.0];
        log_softmax(&mut x);
        let total: f64 = x.iter().map(|&v| (v as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!((x[1] - x[0] - 1.0).abs() < 1e-4);
    }

    #[test]
    fn summary_figures() {
        let t = Tally {
            nll: vec![1.0, 2.0, 3.0],
            kl: (1..=100).map(f64::from).collect(),
            same_top: 75,
        };
        let s = t.summary();
        assert_eq!(s.mean_nll.value, 2.0);
        // sd 1, n 3.
        assert!((s.mean_nll.stderr - 1.0 / 3f64.sqrt()).abs() < 1e-12);
        assert!((s.perplexity.value - 2f64.exp()).abs() < 1e-12);
        let kl = s.kl.unwrap();
        assert_eq!(kl.median, 50.5);
        assert!((kl.p99 - 99.01).abs() < 1e-9);
        assert_eq!((kl.max, kl.same_top), (100.0, 0.75));
    }
}
