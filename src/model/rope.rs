//! Rotary position embedding with LongRoPE short/long factors.
//!
//! Frequencies are computed in f32 exactly as transformers does
//! (`1 / (factor[k] * theta^(2k/d))`, angle = `pos * inv_freq`, cos and sin multiplied by the
//! attention factor), so angles at large positions round the same way as the reference. Which
//! table a sequence uses is the engine's decision ([`RopeTable`]); this module only computes.

use crate::config::{RopeConfig, RopeScaling};

/// Which set of LongRoPE factors a forward pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeTable {
    Short,
    Long,
}

#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq_short: Vec<f32>,
    inv_freq_long: Vec<f32>,
    /// Multiplies cos and sin in both modes (LongRoPE "mscale").
    pub attention_factor: f32,
    /// Sequences longer than this need the long table (None: no LongRoPE).
    pub original_max_position_embeddings: Option<usize>,
}

impl Rope {
    pub fn new(cfg: &RopeConfig, max_position_embeddings: usize) -> Rope {
        let d = cfg.rotary_dim;
        // torch: base ** (arange(0, d, 2).float() / d), all in f32.
        let base_pow: Vec<f32> = (0..d / 2)
            .map(|k| (cfg.theta as f32).powf((2 * k) as f32 / d as f32))
            .collect();
        let with = |factors: &[f64]| -> Vec<f32> {
            base_pow
                .iter()
                .zip(factors)
                .map(|(b, f)| 1.0 / (*f as f32 * b))
                .collect()
        };
        match &cfg.scaling {
            RopeScaling::None => {
                let plain = with(&vec![1.0; d / 2]);
                Rope {
                    inv_freq_short: plain.clone(),
                    inv_freq_long: plain,
                    attention_factor: 1.0,
                    original_max_position_embeddings: None,
                }
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                factor,
                attention_factor,
            } => {
                let orig = *original_max_position_embeddings;
                let factor = factor.unwrap_or(max_position_embeddings as f64 / orig as f64);
                let attn = attention_factor.unwrap_or(if factor <= 1.0 {
                    1.0
                } else {
                    (1.0 + factor.ln() / (orig as f64).ln()).sqrt()
                });
                Rope {
                    inv_freq_short: with(short_factor),
                    inv_freq_long: with(long_factor),
                    attention_factor: attn as f32,
                    original_max_position_embeddings: Some(orig),
                }
            }
        }
    }

    pub fn half_dim(&self) -> usize {
        self.inv_freq_short.len()
    }

    pub fn inv_freq(&self, table: RopeTable) -> &[f32] {
        match table {
            RopeTable::Short => &self.inv_freq_short,
            RopeTable::Long => &self.inv_freq_long,
        }
    }

    /// The table transformers picks for a forward pass whose highest position is `seq_len - 1`.
    pub fn table_for_len(&self, seq_len: usize) -> RopeTable {
        match self.original_max_position_embeddings {
            Some(orig) if seq_len > orig => RopeTable::Long,
            _ => RopeTable::Short,
        }
    }

    /// cos and sin (each `half_dim` long) for one position.
    pub fn cos_sin(&self, table: RopeTable, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        let p = pos as f32;
        for ((c, s), f) in cos.iter_mut().zip(sin.iter_mut()).zip(self.inv_freq(table)) {
            let angle = p * f;
            *c = angle.cos() * self.attention_factor;
            *s = angle.sin() * self.attention_factor;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spec §1.3 / §5 sanity values for the real Phi-4-mini settings.
    #[test]
    fn phi4_mini_frequencies_and_mscale() {
        let long: Vec<f64> = [
            1.0,
            1.118320672,
            1.250641126,
            1.398617824,
            1.564103225,
            1.74916897,
            1.956131817,
            2.187582649,
            2.446418898,
            2.735880826,
            3.059592084,
            3.421605075,
            3.826451687,
            4.279200023,
            4.785517845,
            5.351743533,
            5.984965424,
            6.693110555,
            7.485043894,
            8.370679318,
            9.36110372,
            10.4687158,
            11.70738129,
            13.09260651,
            14.64173252,
            16.37415215,
            18.31155283,
            20.47818807,
            22.90118105,
            25.61086418,
            28.64115884,
            32.03,
            32.1,
            32.13,
            32.23,
            32.6,
            32.61,
            32.64,
            32.66,
            32.7,
            32.71,
            32.93,
            32.97,
            33.28,
            33.49,
            33.5,
            44.16,
            47.77,
        ]
        .to_vec();
        let cfg = RopeConfig {
            theta: 10000.0,
            rotary_dim: 96,
            scaling: RopeScaling::LongRope {
                short_factor: vec![1.0; 48],
                long_factor: long,
                original_max_position_embeddings: 4096,
                factor: None,
                attention_factor: None,
            },
        };
        let r = Rope::new(&cfg, 131072);
        assert!((r.attention_factor as f64 - 1.1902380714238083).abs() < 1e-6);
        let s = r.inv_freq(RopeTable::Short);
        let l = r.inv_freq(RopeTable::Long);
        assert!((s[1] as f64 - 0.8254041852680185).abs() < 1e-6);
        assert!((l[0] as f64 - 1.0).abs() < 1e-7);
        assert!((l[1] as f64 - 0.738074691753546).abs() < 1e-6);
        assert!((s[47] as f64 / 1.2115276586e-4 - 1.0).abs() < 1e-5);
        assert!((l[47] as f64 / 2.536168429e-6 - 1.0).abs() < 1e-5);
        assert_eq!(r.table_for_len(4096), RopeTable::Short);
        assert_eq!(r.table_for_len(4097), RopeTable::Long);
    }
}
