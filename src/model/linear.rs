//! The one linear layer every projection of the decoder goes through.
//!
//! It owns a reference to the stored weight (mapped bf16, f16 or f32) and nothing else: a
//! quantized format or a LoRA delta wraps this type instead of adding a second copy of the model
//! code.

use anyhow::{bail, Result};

use crate::kernels::bf16::{matmul_bf16, Bf16Acts};
use crate::kernels::quant::QType;
use crate::kernels::{matmul, WeightView};
use crate::weights::{DType, Tensor};

/// `y = x · Wᵀ`, with `W` stored `[out_features, in_features]` as in PyTorch.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    pub out_features: usize,
    pub in_features: usize,
    /// How activations meet the weight when it is bf16 (other dtypes ignore it).
    bf16_acts: Bf16Acts,
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
        })
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
                WeightView::Quant { t, qs, d }
            }
        }
    }

    /// This layer with its weight quantized to `t`.
    pub fn quantize(&self, t: QType) -> Result<Linear> {
        Linear::new(self.weight.quantize(t)?)
    }

    pub fn bf16_acts(&self) -> Bf16Acts {
        self.bf16_acts
    }

    pub fn set_bf16_acts(&mut self, acts: Bf16Acts) {
        self.bf16_acts = acts;
    }

    /// `x` is `[n, in_features]`, `y` is `[n, out_features]`, both row-major.
    pub fn forward(&self, x: &[f32], y: &mut [f32]) {
        let (rows, cols) = (self.out_features, self.in_features);
        match self.view() {
            WeightView::BF16(w) => matmul_bf16(w, rows, cols, x, y, self.bf16_acts),
            view => matmul(view, rows, cols, x, y),
        }
    }
}
