//! AdamW, the learning-rate schedules and gradient clipping exactly as PyTorch and transformers
//! define them (`torch.optim.AdamW`, `get_{linear,cosine,constant}_schedule_with_warmup`,
//! `clip_grad_norm_`), over the flat LoRA parameter vector.

use anyhow::{bail, Result};

/// `torch.optim.AdamW` with decoupled weight decay on every parameter (transformers decays
/// every LoRA matrix: only biases and norms are excluded, and LoRA has neither).
#[derive(Debug, Clone)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Updates done so far (PyTorch's `step`, 1 after the first).
    pub step: u64,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl AdamW {
    pub fn new(n: usize, beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> AdamW {
        AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            step: 0,
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    /// One update with learning rate `lr` (PyTorch's single-tensor path: `p *= 1 - lr·wd`,
    /// then the moments, then `p -= lr/(1-β1ᵗ) · m / (√v/√(1-β2ᵗ) + eps)`, in f32 as PyTorch
    /// computes for f32 parameters, with the bias corrections in f64 as Python floats).
    pub fn update(&mut self, params: &mut [f32], grads: &[f32], lr: f64) {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        let step_size = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let decay = (1.0 - lr * self.weight_decay) as f32;
        let (b1, b2, eps) = (self.beta1 as f32, self.beta2 as f32, self.eps as f32);
        for (((p, g), m), v) in params
            .iter_mut()
            .zip(grads)
            .zip(self.m.iter_mut())
            .zip(self.v.iter_mut())
        {
            *p *= decay;
            // lerp as torch does: m + (g - m)·(1 - β1).
            *m += (g - *m) * (1.0 - b1);
            *v = *v * b2 + (1.0 - b2) * g * g;
            let denom = v.sqrt() / bc2_sqrt + eps;
            *p -= step_size * (*m / denom);
        }
    }
}

/// `--lr-scheduler-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    Linear,
    Cosine,
    Constant,
}

impl Schedule {
    pub fn parse(s: &str) -> Result<Schedule> {
        Ok(match s {
            "linear" => Schedule::Linear,
            "cosine" => Schedule::Cosine,
            "constant" | "constant_with_warmup" => Schedule::Constant,
            _ => bail!("--lr-scheduler-type {s:?}: expected linear, cosine or constant"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Schedule::Linear => "linear",
            Schedule::Cosine => "cosine",
            Schedule::Constant => "constant",
        }
    }

    /// The factor on the base learning rate at 0-based update `s` of `total`, after `warmup`
    /// linear warm-up updates (transformers' lambdas: the first update of a warm-up has lr 0).
    pub fn factor(self, s: u64, total: u64, warmup: u64) -> f64 {
        if s < warmup {
            return s as f64 / warmup.max(1) as f64;
        }
        match self {
            Schedule::Constant => 1.0,
            Schedule::Linear => {
                (total.saturating_sub(s)) as f64 / total.saturating_sub(warmup).max(1) as f64
            }
            Schedule::Cosine => {
                let progress = (s - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

/// Warm-up updates from `--warmup-ratio` (transformers ≥ 5.12: `ceil(total · ratio)`) or
/// `--warmup-steps`.
pub fn warmup_steps(total: u64, ratio: f64, steps: Option<u64>) -> u64 {
    match steps {
        Some(s) => s,
        None => (total as f64 * ratio).ceil() as u64,
    }
}

/// The L2 norm of all gradients (before clipping), and the gradients scaled by
/// `min(1, max_norm / (norm + 1e-6))` as `torch.nn.utils.clip_grad_norm_` does.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f64) -> f64 {
    // PyTorch sums per-tensor norms in f32; f64 here is at least as exact.
    let norm = grads
        .iter()
        .map(|&g| (g as f64) * (g as f64))
        .sum::<f64>()
        .sqrt();
    if max_norm > 0.0 {
        let coef = (max_norm / (norm + 1e-6)).min(1.0);
        if coef < 1.0 {
            let c = coef as f32;
            grads.iter_mut().for_each(|g| *g *= c);
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values transformers' lambdas give (T = 9, W = 1; cosine), as the fixture's run logs them.
    #[test]
    fn cosine_with_warmup_matches_transformers() {
        let lrs: Vec<f64> = (0..9)
            .map(|s| 1e-3 * Schedule::Cosine.factor(s, 9, 1))
            .collect();
        let want = [
            0.0,
            1e-3,
            9.619398e-4,
            8.535534e-4,
            6.913417e-4,
            5e-4,
            3.086583e-4,
            1.464466e-4,
            3.806023e-5,
        ];
        for (a, b) in lrs.iter().zip(want) {
            assert!((a - b).abs() < 1e-9, "{a} vs {b}");
        }
        assert_eq!(warmup_steps(9, 0.1, None), 1);
        assert_eq!(Schedule::Linear.factor(3, 10, 2), 7.0 / 8.0);
    }

    #[test]
    fn clipping_scales_by_max_over_norm() {
        let mut g = vec![3.0f32, 4.0];
        let n = clip_grad_norm(&mut g, 1.0);
        assert!((n - 5.0).abs() < 1e-12);
        assert!((g[0] - 3.0 / (5.0 + 1e-6) as f32).abs() < 1e-7);
        let mut small = vec![0.1f32];
        clip_grad_norm(&mut small, 1.0);
        assert_eq!(small[0], 0.1);
    }
}
