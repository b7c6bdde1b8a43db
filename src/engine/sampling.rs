//! Sampling parameters and the sampler.
//!
//! Order of operations (as in vLLM): repetition penalty (HF rule, over prompt and output),
//! presence and frequency penalties (OpenAI rule, over output), then temperature; temperature 0
//! is greedy. Then top-k, top-p (smallest set reaching p), min-p (relative to the top
//! probability), and one draw from a seeded ChaCha8 stream: same seed and input, same output.

use std::collections::HashMap;

use anyhow::{bail, Result};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub min_p: f32,
    /// 1 = off; > 1 discourages any token already in prompt or output.
    pub repetition_penalty: f32,
    /// Subtracted once from every token already generated (-2..2).
    pub presence_penalty: f32,
    /// Subtracted per occurrence in the output (-2..2).
    pub frequency_penalty: f32,
    /// None: a fresh random seed per request.
    pub seed: Option<u64>,
    /// Generation ends before the first occurrence of any of these strings.
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_tokens: 256,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    pub fn greedy(max_tokens: usize) -> Self {
        SamplingParams {
            max_tokens,
            ..Default::default()
        }
    }

    /// Rejects values with no meaning, naming the parameter.
    pub fn validate(&self) -> Result<()> {
        if self.max_tokens == 0 {
            bail!("max_tokens must be at least 1");
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            bail!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("top_p must be in (0, 1], got {}", self.top_p);
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            bail!("min_p must be in [0, 1], got {}", self.min_p);
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            bail!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            );
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                bail!("{name} must be in [-2, 2], got {v}");
            }
        }
        if self.stop.iter().any(String::is_empty) {
            bail!("stop strings must not be empty");
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Occurrences of each generated token (presence / frequency penalties).
    counts: HashMap<u32, usize>,
    /// Tokens seen in prompt or output (repetition penalty).
    seen: std::collections::HashSet<u32>,
}

impl Sampler {
    pub fn new(params: &SamplingParams, prompt: &[u32]) -> Sampler {
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        Sampler {
            params: params.clone(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            counts: HashMap::new(),
            seen: prompt.iter().copied().collect(),
        }
    }

    /// Records a token the sequence now contains.
    pub fn accept(&mut self, tok: u32) {
        *self.counts.entry(tok).or_default() += 1;
        self.seen.insert(tok);
    }

    /// Picks the next token from `logits` (modified in place).
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for &t in &self.seen {
                let l = &mut logits[t as usize];
                *l = if *l > 0.0 {
                    *l / p.repetition_penalty
                } else {
                    *l * p.repetition_penalty
                };
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &c) in &self.counts {
                logits[t as usize] -= p.presence_penalty + p.frequency_penalty * c as f32;
            }
        }
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        // Candidates sorted by logit, best first; the filters only ever cut the tail.
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l / p.temperature))
            .collect();
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, &pr) in probs.iter().enumerate() {
                acc += pr;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = p.min_p * probs[0];
            keep = keep.min(probs.iter().take_while(|&&x| x >= floor).count().max(1));
        }
        let total: f32 = probs[..keep].iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, &pr) in probs[..keep].iter().enumerate() {
            r -= pr;
            if r <= 0.0 {
                return cand[i].0;
            }
        }
        cand[keep - 1].0
    }
}

/// Index of the largest value; the first one on ties (as torch.argmax).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 0.5, 2.9]
    }

    #[test]
    fn greedy_takes_argmax_and_penalties_apply() {
        let mut s = Sampler::new(&SamplingParams::greedy(1), &[]);
        assert_eq!(s.sample(&mut logits()), 1);
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy(1)
        };
        let mut s = Sampler::new(&p, &[1]);
        assert_eq!(s.sample(&mut logits()), 4); // 3.0 / 2 < 2.9
        let p = SamplingParams {
            presence_penalty: 1.0,
            ..SamplingParams::greedy(1)
        };
        let mut s = Sampler::new(&p, &[]);
        s.accept(1);
        assert_eq!(s.sample(&mut logits()), 4);
    }

    #[test]
    fn seeded_sampling_repeats_and_filters_cut_the_tail() {
        let p = SamplingParams {
            temperature: 1.0,
            seed: Some(7),
            ..Default::default()
        };
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p, &[]);
            (0..50).map(|_| s.sample(&mut logits())).collect::<Vec<_>>()
        };
        assert_eq!(draw(&p), draw(&p));
        assert!(
            draw(&p)
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len()
                > 2
        );
        let top2 = SamplingParams {
            top_k: 2,
            ..p.clone()
        };
        assert!(draw(&top2).iter().all(|t| *t == 1 || *t == 4));
        let nucleus = SamplingParams {
            top_p: 0.3,
            ..p.clone()
        };
        assert!(draw(&nucleus).iter().all(|t| *t == 1));
        let minp = SamplingParams {
            min_p: 0.5,
            ..p.clone()
        };
        assert!(draw(&minp).iter().all(|t| [1, 4, 2].contains(t)));
    }

    #[test]
    fn invalid_parameters_are_named() {
        let bad = [
            (
                SamplingParams {
                    temperature: -1.0,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 1.5,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    min_p: 2.0,
                    ..Default::default()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    max_tokens: 0,
                    ..Default::default()
                },
                "max_tokens",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    presence_penalty: 3.0,
                    ..Default::default()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..Default::default()
                },
                "temperature",
            ),
        ];
        for (p, name) in bad {
            let e = p.validate().unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
    }
}
