//! The optimisation loop, with transformers' Trainer semantics (what ms-swift drives):
//! batches of `per_device_train_batch_size` samples in epoch order, windows of
//! `gradient_accumulation_steps` batches (the last window of an epoch may be shorter), one
//! update per window. A window's loss is its summed token cross-entropy divided by its labelled
//! positions (`num_items_in_batch`), so long samples weigh more and padding never counts; the
//! gradient norm is logged before clipping; the learning rate of 0-based update `s` comes from
//! the schedule at `s`.
//!
//! Samples are run one at a time (no padding: causal attention makes a right-padded row's real
//! tokens independent of its padding), each with the rotary table its padded batch would use.

use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::backward::{Dropout, Pass};
use super::data::Sample;
use super::lora::LoraParams;
use super::optim::{clip_grad_norm, warmup_steps, AdamW, Schedule};
use crate::model::Phi3ForCausalLM;

/// The optimisation settings (transformers' `TrainingArguments` names; ms-swift's defaults are
/// applied by the CLI).
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub learning_rate: f64,
    pub num_train_epochs: f64,
    /// Overrides the epochs when set.
    pub max_steps: Option<u64>,
    pub per_device_train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub lr_scheduler_type: Schedule,
    pub warmup_ratio: f64,
    pub warmup_steps: Option<u64>,
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Reshuffle the samples every epoch (else the file order).
    pub shuffle: bool,
    pub gradient_checkpointing: bool,
}

/// The run's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub batches_per_epoch: usize,
    pub steps_per_epoch: usize,
    pub total_steps: u64,
    pub warmup_steps: u64,
}

/// What one update did.
#[derive(Debug, Clone, Copy)]
pub struct StepLog {
    /// 1-based.
    pub step: u64,
    pub loss: f64,
    /// Before clipping.
    pub grad_norm: f64,
    /// The learning rate this update used.
    pub learning_rate: f64,
    /// Labelled positions of the window.
    pub n_tokens: usize,
    /// Tokens run through the model (forward and backward).
    pub tokens: usize,
    pub epoch: f64,
}

pub struct Trainer<'m> {
    pub model: &'m Phi3ForCausalLM,
    /// The tied LM head transposed once, when bf16 kernels take its input gradient.
    head_t: Option<crate::model::Linear>,
    pub cfg: TrainConfig,
    pub params: LoraParams,
    pub opt: AdamW,
    pub plan: Plan,
    n_samples: usize,
}

impl<'m> Trainer<'m> {
    pub fn new(
        model: &'m Phi3ForCausalLM,
        cfg: TrainConfig,
        params: LoraParams,
        n_samples: usize,
    ) -> Result<Trainer<'m>> {
        if n_samples == 0 {
            bail!("no training samples");
        }
        if cfg.per_device_train_batch_size == 0 || cfg.gradient_accumulation_steps == 0 {
            bail!("batch size and gradient accumulation steps must be at least 1");
        }
        if !(cfg.learning_rate.is_finite() && cfg.learning_rate >= 0.0) {
            bail!("--learning-rate must be a non-negative number");
        }
        if cfg.max_steps.is_none() && (cfg.num_train_epochs.is_nan() || cfg.num_train_epochs <= 0.0)
        {
            bail!("--num-train-epochs must be positive");
        }
        if !(0.0..1.0).contains(&cfg.warmup_ratio) {
            bail!("--warmup-ratio must be in [0, 1)");
        }
        let batches = n_samples.div_ceil(cfg.per_device_train_batch_size);
        let per_epoch = batches.div_ceil(cfg.gradient_accumulation_steps);
        let total = match cfg.max_steps {
            Some(0) => bail!("--max-steps must be at least 1"),
            Some(s) => s,
            None => (cfg.num_train_epochs * per_epoch as f64).ceil() as u64,
        };
        let plan = Plan {
            batches_per_epoch: batches,
            steps_per_epoch: per_epoch,
            total_steps: total,
            warmup_steps: warmup_steps(total, cfg.warmup_ratio, cfg.warmup_steps),
        };
        let opt = AdamW::new(
            params.len(),
            cfg.adam_beta1,
            cfg.adam_beta2,
            cfg.adam_epsilon,
            cfg.weight_decay,
        );
        Ok(Trainer {
            head_t: model.lm_head.transposed_bf16(),
            model,
            cfg,
            params,
            opt,
            plan,
            n_samples,
        })
    }

    /// The sample indices of 0-based update `s`, batch by batch.
    pub fn window(&self, s: u64) -> Vec<Vec<usize>> {
        let (bs, ga) = (
            self.cfg.per_device_train_batch_size,
            self.cfg.gradient_accumulation_steps,
        );
        let epoch = s / self.plan.steps_per_epoch as u64;
        let k = (s % self.plan.steps_per_epoch as u64) as usize;
        let mut order: Vec<usize> = (0..self.n_samples).collect();
        if self.cfg.shuffle {
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(
                self.cfg.seed ^ epoch.wrapping_mul(0x9E37_79B9),
            ));
        }
        let batches: Vec<Vec<usize>> = order.chunks(bs).map(<[usize]>::to_vec).collect();
        batches.into_iter().skip(k * ga).take(ga).collect()
    }

    /// The window's loss (summed CE over its labelled positions) and the gradient of every LoRA
    /// matrix, before clipping.
    pub fn gradients(
        &self,
        samples: &[Sample],
        window: &[Vec<usize>],
        dropout_seed: u64,
    ) -> Result<(f64, usize, usize, Vec<f32>)> {
        let n_tokens: usize = window
            .iter()
            .flatten()
            .map(|&i| samples[i].labelled())
            .sum();
        let mut grads = vec![0f32; self.params.len()];
        if n_tokens == 0 {
            return Ok((0.0, 0, 0, grads));
        }
        let mut loss = 0.0;
        let mut tokens = 0;
        let p = self.params.settings.dropout;
        for (b, batch) in window.iter().enumerate() {
            let longest = batch
                .iter()
                .map(|&i| samples[i].input_ids.len())
                .max()
                .unwrap_or(0);
            let table = self.model.rope.table_for_len(longest);
            for (j, &i) in batch.iter().enumerate() {
                let pass = Pass {
                    model: self.model,
                    lora: &self.params,
                    table,
                    dropout: (p > 0.0).then_some(Dropout {
                        p,
                        seed: dropout_seed ^ ((b as u64) << 20) ^ ((j as u64) << 32),
                    }),
                    head_t: self.head_t.as_ref(),
                };
                let s = &samples[i];
                let (l, _) = pass.sample(
                    &s.input_ids,
                    &s.labels,
                    n_tokens as f32,
                    self.cfg.gradient_checkpointing,
                    &mut grads,
                )?;
                loss += l;
                tokens += s.input_ids.len();
            }
        }
        Ok((loss, n_tokens, tokens, grads))
    }

    /// Runs 0-based update `s` (= `self.opt.step` when steps are taken in order).
    pub fn step(&mut self, samples: &[Sample]) -> Result<StepLog> {
        let s = self.opt.step;
        let window = self.window(s);
        let seed = self.cfg.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ s;
        let (loss, n_tokens, tokens, mut grads) = self.gradients(samples, &window, seed)?;
        let grad_norm = clip_grad_norm(&mut grads, self.cfg.max_grad_norm);
        if !grad_norm.is_finite() {
            bail!(
                "update {}: the gradient norm is {grad_norm} (loss {loss}); stopping",
                s + 1
            );
        }
        let lr = self.cfg.learning_rate
            * self
                .cfg
                .lr_scheduler_type
                .factor(s, self.plan.total_steps, self.plan.warmup_steps);
        self.opt.update(&mut self.params.values, &grads, lr);
        let done_batches = (s as usize % self.plan.steps_per_epoch)
            * self.cfg.gradient_accumulation_steps
            + window.len();
        let epoch = (s / self.plan.steps_per_epoch as u64) as f64
            + done_batches as f64 / self.plan.batches_per_epoch as f64;
        Ok(StepLog {
            step: s + 1,
            loss,
            grad_norm,
            learning_rate: lr,
            n_tokens,
            tokens,
            epoch,
        })
    }

    /// Mean token loss over `samples` (no dropout, no gradient).
    pub fn evaluate(&self, samples: &[Sample]) -> Result<f64> {
        let (mut sum, mut count) = (0.0, 0usize);
        for s in samples {
            let pass = Pass {
                model: self.model,
                lora: &self.params,
                table: self.model.rope.table_for_len(s.input_ids.len()),
                dropout: None,
                head_t: self.head_t.as_ref(),
            };
            let (l, n) = pass.loss(&s.input_ids, &s.labels, 1.0)?;
            sum += l;
            count += n;
        }
        Ok(if count == 0 { 0.0 } else { sum / count as f64 })
    }
}
