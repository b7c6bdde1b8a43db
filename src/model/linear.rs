//! The one linear layer every projection of the decoder goes through.
//!
//! It owns a reference to the stored weight (mapped bf16, f16 or f32, or quantized), an optional
//! bias (the vision tower's layers have one) and the LoRA deltas that may ride on it: a quantized
//! format or a LoRA adapter wraps this type instead of adding a second copy of the model code.
//!
//! LoRA stays unmerged: `y = W·x + b + (α/r)·B·(A·x)`, with the adapter chosen per row of a
//! batch. The base product runs once for all rows; each adapter then adds its delta to the rows
//! that asked for it. Phi-4-multimodal's vision and speech adapters live here, and a user's
//! fine-tuned adapter is one more entry; a quantized base keeps its adapters in 16 bits.

use std::sync::{Arc, Mutex};

use anyhow::{bail, Result};

use crate::kernels::bf16::{matmul_bf16, Bf16Acts};
use crate::kernels::quant::QType;
use crate::kernels::wide_acts::QuantActs;
use crate::kernels::{matmul, WeightView};
use crate::weights::{DType, Tensor};

/// `y = x · Wᵀ (+ b)`, with `W` stored `[out_features, in_features]` as in PyTorch.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    pub out_features: usize,
    pub in_features: usize,
    /// How activations meet the weight when it is bf16 (other dtypes ignore it).
    bf16_acts: Bf16Acts,
    /// How activations meet the weight when it is block-quantized.
    quant_acts: QuantActs,
    bias: Option<Vec<f32>>,
    lora: Vec<LoraDelta>,
    /// While calibrating: the inputs' running column statistics.
    stats: Option<Arc<ColumnStats>>,
}

/// Running sums of the square of each input column over every row a layer multiplied: the
/// importance `phi4 quantize --calibration` weighs each weight column's rounding error by.
#[derive(Debug)]
pub struct ColumnStats {
    sums: Mutex<(Vec<f64>, u64)>,
}

impl ColumnStats {
    fn new(cols: usize) -> ColumnStats {
        ColumnStats {
            sums: Mutex::new((vec![0.0; cols], 0)),
        }
    }

    fn add(&self, x: &[f32], cols: usize) {
        let mut g = self.sums.lock().unwrap_or_else(|e| e.into_inner());
        let (sums, rows) = &mut *g;
        for row in x.chunks_exact(cols) {
            for (s, &v) in sums.iter_mut().zip(row) {
                *s += (v as f64) * (v as f64);
            }
            *rows += 1;
        }
    }

    /// The mean square of each column, and the rows seen.
    pub fn mean_squares(&self) -> (Vec<f32>, u64) {
        let g = self.sums.lock().unwrap_or_else(|e| e.into_inner());
        let n = g.1.max(1) as f64;
        (g.0.iter().map(|s| (s / n) as f32).collect(), g.1)
    }
}

/// Identifies one adapter of a model (an index into its adapter names).
pub type AdapterId = usize;

/// One adapter's low-rank update of a linear layer: `scale · B·(A·x)`.
#[derive(Clone, Debug)]
pub struct LoraDelta {
    pub adapter: AdapterId,
    /// `[r, in_features]`.
    pub a: Linear,
    /// `[out_features, r]`.
    pub b: Linear,
    /// `lora_alpha / r` (PEFT; `/ sqrt(r)` with rsLoRA).
    pub scale: f32,
}

impl Linear {
    pub fn new(weight: Tensor) -> Result<Linear> {
        if weight.shape.len() != 2 {
            bail!("linear weight must be 2-D, got shape {:?}", weight.shape);
        }
        if weight.dtype == DType::U8 {
            bail!("linear weight holds raw bytes, not a float or quantized matrix");
        }
        Ok(Linear {
            out_features: weight.shape[0],
            in_features: weight.shape[1],
            weight,
            bf16_acts: Bf16Acts::default(),
            quant_acts: QuantActs::default(),
            bias: None,
            lora: Vec::new(),
            stats: None,
        })
    }

    /// A layer with a bias of `out_features` values.
    pub fn with_bias(weight: Tensor, bias: Vec<f32>) -> Result<Linear> {
        let mut l = Linear::new(weight)?;
        if bias.len() != l.out_features {
            bail!(
                "bias of {} values for a layer of {} outputs",
                bias.len(),
                l.out_features
            );
        }
        l.bias = Some(bias);
        Ok(l)
    }

    /// Adds an adapter's delta (`a` is `[r, in]`, `b` is `[out, r]`).
    pub fn add_lora(&mut self, adapter: AdapterId, a: Tensor, b: Tensor, scale: f32) -> Result<()> {
        let (a, b) = (Linear::new(a)?, Linear::new(b)?);
        if a.in_features != self.in_features
            || b.out_features != self.out_features
            || a.out_features != b.in_features
        {
            bail!(
                "LoRA shapes A {:?} / B {:?} do not fit a layer of {} -> {}",
                a.weight.shape,
                b.weight.shape,
                self.in_features,
                self.out_features
            );
        }
        if self.lora.iter().any(|d| d.adapter == adapter) {
            bail!("adapter {adapter} is already on this layer");
        }
        self.lora.push(LoraDelta {
            adapter,
            a,
            b,
            scale,
        });
        Ok(())
    }

    /// Folds adapter `adapter` into the weight, `W + scale · B·A`, and drops its delta: the
    /// layer then computes that adapter's output with no extra product, and no other mode's.
    /// The weight must be a float one (merge before quantizing); the sum is rounded to bf16.
    /// Returns whether the layer carried the adapter.
    pub fn merge_lora(&mut self, adapter: AdapterId) -> Result<bool> {
        let Some(at) = self.lora.iter().position(|d| d.adapter == adapter) else {
            return Ok(false);
        };
        if !self.weight.dtype.is_float() {
            bail!("an adapter merges into float weights only (merge before quantizing)");
        }
        let d = self.lora.remove(at);
        let (din, dout, r) = (self.in_features, self.out_features, d.a.out_features);
        // (B·A)ᵀ as the B layer applied to the rows of Aᵀ: row i of Aᵀ is column i of A.
        let a = d.a.weight.to_f32_vec();
        let mut at_rows = vec![0f32; din * r];
        for k in 0..r {
            for i in 0..din {
                at_rows[i * r + k] = a[k * din + i];
            }
        }
        let mut delta_t = vec![0f32; din * dout];
        d.b.forward(&at_rows, &mut delta_t);
        let w = self.weight.to_f32_vec();
        let scale = d.scale;
        self.weight = Tensor::bf16_with(vec![dout, din], |out| {
            use rayon::prelude::*;
            out.par_chunks_mut(din).enumerate().for_each(|(o, row)| {
                for (i, v) in row.iter_mut().enumerate() {
                    *v = half::bf16::from_f32(w[o * din + i] + scale * delta_t[i * dout + o]);
                }
            });
        });
        Ok(true)
    }

    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    pub fn lora(&self) -> &[LoraDelta] {
        &self.lora
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn view(&self) -> WeightView<'_> {
        match self.weight.dtype {
            DType::F32 => WeightView::F32(self.weight.as_f32()),
            DType::F16 => WeightView::F16(self.weight.as_f16()),
            DType::BF16 => WeightView::BF16(self.weight.as_bf16()),
            DType::U8 => unreachable!("Linear::new refuses raw bytes"),
            DType::Quant(_) => {
                let (t, qs, d) = self
                    .weight
                    .as_quant()
                    .expect("quantized tensors carry scales");
                WeightView::Quant {
                    t,
                    qs,
                    d,
                    acts: self.quant_acts,
                }
            }
        }
    }

    /// This layer with its weight quantized to `t` (bias and adapters as they were).
    pub fn quantize(&self, t: QType) -> Result<Linear> {
        self.quantize_weighted(t, None)
    }

    /// [`Linear::quantize`] with each input column's importance (see [`ColumnStats`]).
    pub fn quantize_weighted(&self, t: QType, imp: Option<&[f32]>) -> Result<Linear> {
        Ok(self.with_weight(self.weight.quantize_weighted(t, imp)?))
    }

    /// This layer with `weight` (of the same shape, e.g. a quantized copy) in place of its
    /// own: bias, adapters and activation settings as they were, no statistics collected.
    pub fn with_weight(&self, weight: Tensor) -> Linear {
        debug_assert_eq!(weight.shape, self.weight.shape);
        Linear {
            weight,
            stats: None,
            bf16_acts: self.bf16_acts,
            quant_acts: self.quant_acts,
            bias: self.bias.clone(),
            lora: self.lora.clone(),
            out_features: self.out_features,
            in_features: self.in_features,
        }
    }

    pub fn bf16_acts(&self) -> Bf16Acts {
        self.bf16_acts
    }

    /// Also for the adapters' matrices on this layer.
    pub fn set_bf16_acts(&mut self, acts: Bf16Acts) {
        self.bf16_acts = acts;
        for d in &mut self.lora {
            d.a.set_bf16_acts(acts);
            d.b.set_bf16_acts(acts);
        }
    }

    pub fn quant_acts(&self) -> QuantActs {
        self.quant_acts
    }

    pub fn set_quant_acts(&mut self, acts: QuantActs) {
        self.quant_acts = acts;
    }

    /// Starts collecting the statistics of this layer's inputs ([`ColumnStats`]), anew.
    pub fn collect_stats(&mut self) -> Arc<ColumnStats> {
        let s = Arc::new(ColumnStats::new(self.in_features));
        self.stats = Some(s.clone());
        s
    }

    /// Stops collecting; returns what was collected, if anything was.
    pub fn take_stats(&mut self) -> Option<Arc<ColumnStats>> {
        self.stats.take()
    }

    /// `x` is `[n, in_features]`, `y` is `[n, out_features]`, both row-major. No adapter.
    pub fn forward(&self, x: &[f32], y: &mut [f32]) {
        if let Some(s) = &self.stats {
            s.add(x, self.in_features);
        }
        let (rows, cols) = (self.out_features, self.in_features);
        match self.view() {
            WeightView::BF16(w) => matmul_bf16(w, rows, cols, x, y, self.bf16_acts),
            view => matmul(view, rows, cols, x, y),
        }
        if let Some(b) = &self.bias {
            for row in y.chunks_mut(rows) {
                for (v, b) in row.iter_mut().zip(b) {
                    *v += b;
                }
            }
        }
    }

    /// `dx = dy · W`: the gradient at the input of [`Linear::forward`] (no adapter; training
    /// adds its own LoRA terms). With bf16 weights and bf16 activations on AVX-512 BF16 the
    /// weight is transposed (a copy of this one matrix) and the product runs on the bf16
    /// kernels, as PyTorch's bf16 training does; otherwise W is widened (quantized rows
    /// dequantized) block by block with f32 products.
    pub fn backward_input(&self, dy: &[f32], dx: &mut [f32]) {
        let (rows, cols) = (self.out_features, self.in_features);
        if self.weight.dtype == DType::BF16
            && self.bf16_acts == Bf16Acts::Bf16
            && crate::kernels::bf16::available()
        {
            thread_local! {
                static TRANSPOSED: std::cell::RefCell<Vec<half::bf16>> = const { std::cell::RefCell::new(Vec::new()) };
            }
            return TRANSPOSED.with(|t| {
                let mut wt = t.borrow_mut();
                crate::kernels::bf16::transpose_into(self.weight.as_bf16(), rows, cols, &mut wt);
                matmul_bf16(&wt, cols, rows, dy, dx, Bf16Acts::Bf16)
            });
        }
        crate::kernels::matmul_transposed(self.view(), rows, cols, dy, dx, false);
    }

    /// This layer's weight transposed (`[in, out]`, bf16 weights with bf16 activations on
    /// AVX-512 BF16 only): for repeated [`Linear::backward_input`]-style products with one
    /// matrix (the tied LM head), transposed once.
    pub fn transposed_bf16(&self) -> Option<Linear> {
        if self.weight.dtype != DType::BF16
            || self.bf16_acts != Bf16Acts::Bf16
            || !crate::kernels::bf16::available()
        {
            return None;
        }
        let (rows, cols) = (self.out_features, self.in_features);
        let wt = crate::kernels::bf16::transpose(self.weight.as_bf16(), rows, cols);
        let mut l = Linear::new(Tensor::bf16_with(vec![cols, rows], |o| {
            o.copy_from_slice(&wt)
        }))
        .ok()?;
        l.bf16_acts = Bf16Acts::Bf16;
        Some(l)
    }

    /// [`Linear::forward`] with row `i` adding the delta of adapter `adapters[i]` (none for
    /// `None`; an empty slice means no adapter anywhere). Rows of the same adapter go through
    /// its two small products together.
    pub fn forward_with(&self, x: &[f32], y: &mut [f32], adapters: &[Option<AdapterId>]) {
        self.forward(x, y);
        if self.lora.is_empty() || adapters.iter().all(Option::is_none) {
            return;
        }
        let n = x.len() / self.in_features;
        assert_eq!(adapters.len(), n, "one adapter choice per row");
        let (din, dout) = (self.in_features, self.out_features);
        for d in &self.lora {
            let rows: Vec<usize> = (0..n).filter(|&i| adapters[i] == Some(d.adapter)).collect();
            if rows.is_empty() {
                continue;
            }
            let gathered;
            let xs = if rows.len() == n {
                x
            } else {
                gathered = rows
                    .iter()
                    .flat_map(|&i| &x[i * din..(i + 1) * din])
                    .copied()
                    .collect::<Vec<f32>>();
                &gathered
            };
            let mut t = vec![0f32; rows.len() * d.a.out_features];
            d.a.forward(xs, &mut t);
            let mut u = vec![0f32; rows.len() * dout];
            d.b.forward(&t, &mut u);
            for (&i, u) in rows.iter().zip(u.chunks(dout)) {
                for (v, u) in y[i * dout..(i + 1) * dout].iter_mut().zip(u) {
                    *v += u * d.scale;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_stats_are_the_mean_square_of_every_input_row_while_collecting() {
        let w = Tensor::from_f32(vec![2, 3], &[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
        let mut l = Linear::new(w).unwrap();
        let mut y = vec![0f32; 4];
        l.forward(&[9.0, 9.0, 9.0, 9.0, 9.0, 9.0], &mut y);
        let s = l.collect_stats();
        l.forward(&[1.0, -2.0, 0.0, 3.0, 0.0, 0.5], &mut y);
        l.forward(&[-1.0, 2.0, 4.0], &mut y[..2]);
        let taken = l.take_stats().unwrap();
        assert!(Arc::ptr_eq(&s, &taken));
        l.forward(&[9.0, 9.0, 9.0], &mut y[..2]);
        let (ms, rows) = taken.mean_squares();
        assert_eq!(rows, 3);
        assert_eq!(ms, vec![11.0 / 3.0, 8.0 / 3.0, 16.25 / 3.0]);
        assert!(l.take_stats().is_none());
    }
}
