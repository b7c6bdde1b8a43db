//! Random weights of a real configuration's shapes, for speed and memory figures: speed does not
//! depend on the values, and the real checkpoints cannot be downloaded on every machine.

use half::bf16;
use rayon::prelude::*;

use super::phi3::{Attention, DecoderLayer, Mlp, Phi3ForCausalLM};
use super::Linear;
use crate::config::Phi3Config;
use crate::weights::Tensor;

fn random_bf16(v: &mut [bf16], scale: f32, seed: u64) {
    v.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut s = seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            for x in chunk.iter_mut() {
                // splitmix64
                s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                let u = (z >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
                *x = bf16::from_f32((u * 2.0 - 1.0) * scale);
            }
        });
}

fn matrix(rows: usize, cols: usize, seed: u64) -> Linear {
    let scale = (3.0 / cols as f32).sqrt();
    Linear::new(Tensor::bf16_with(vec![rows, cols], |v| {
        random_bf16(v, scale, seed)
    }))
    .expect("2-D by construction")
}

impl Phi3ForCausalLM {
    /// A model of `config`'s shapes with random bf16 weights (deterministic in `seed`).
    pub fn synthetic(config: Phi3Config, seed: u64) -> Phi3ForCausalLM {
        let (h, i, v) = (
            config.hidden_size,
            config.intermediate_size,
            config.vocab_size,
        );
        let attn = config.num_attention_heads * config.head_dim();
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let s = seed.wrapping_add(100 * l as u64 + 1);
                DecoderLayer {
                    input_layernorm: vec![1.0; h],
                    self_attn: Attention {
                        qkv_proj: matrix(config.qkv_dim(), h, s),
                        o_proj: matrix(h, attn, s + 1),
                    },
                    post_attention_layernorm: vec![1.0; h],
                    mlp: Mlp {
                        gate_up_proj: matrix(2 * i, h, s + 2),
                        down_proj: matrix(h, i, s + 3),
                    },
                }
            })
            .collect();
        // ±0.1 gives tied-head logits a standard deviation near 3, as a trained LM's are
        // (wider values make every next-token distribution one-hot, hiding numeric error).
        let embed = Tensor::bf16_with(vec![v, h], |x| random_bf16(x, 0.1, seed));
        let lm_head = Linear::new(embed.clone()).expect("2-D");
        Phi3ForCausalLM::from_parts(config, embed, layers, vec![1.0; h], lm_head)
    }
}
