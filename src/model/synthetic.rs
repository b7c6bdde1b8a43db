//! Random weights of a real configuration's shapes, for speed and memory figures: speed does not
//! depend on the values, and the real checkpoints cannot be downloaded on every machine.

use half::bf16;
use rayon::prelude::*;

use super::phi3::{Attention, DecoderLayer, Mlp, Phi3ForCausalLM};
use super::Linear;
use crate::config::multimodal::Phi4MMConfig;
use crate::config::Phi3Config;
use crate::weights::Tensor;
use anyhow::{Context, Result};

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

impl super::phi4mm::Phi4MMForCausalLM {
    /// Phi-4-multimodal of `config`'s shapes with random bf16 weights: the decoder, the vision
    /// tower (the layers that feed the feature layer), the projection, the speech encoder with
    /// both projections, and both adapters on every decoder projection (unmerged, as served).
    pub fn synthetic(config: Phi4MMConfig, seed: u64) -> Result<super::phi4mm::Phi4MMForCausalLM> {
        use super::phi4mm::audio_embed::AudioEmbedding;
        use super::phi4mm::image_embed::ImageEmbedding;
        use super::phi4mm::siglip::{
            LayerNorm, VisionAttention, VisionEmbeddings, VisionEncoderLayer, VisionMlp,
            VisionModel,
        };
        let mut lm = Phi3ForCausalLM::synthetic(config.text.clone(), seed);
        let v = &config.vision;
        let (hv, iv) = (v.hidden_size, v.intermediate_size);
        let biased = |rows: usize, cols: usize, s: u64| -> Result<Linear> {
            let m = matrix(rows, cols, s);
            Linear::with_bias(m.weight().clone(), vec![0.0; rows])
        };
        let norm = || LayerNorm {
            weight: vec![1.0; hv],
            bias: vec![0.0; hv],
        };
        let s = seed.wrapping_mul(31).wrapping_add(7);
        let mut layers = Vec::new();
        for l in 0..v.layers_used() {
            let k = s.wrapping_add(10 * l as u64);
            layers.push(VisionEncoderLayer {
                layer_norm1: norm(),
                self_attn: VisionAttention {
                    q_proj: biased(hv, hv, k)?,
                    k_proj: biased(hv, hv, k + 1)?,
                    v_proj: biased(hv, hv, k + 2)?,
                    out_proj: biased(hv, hv, k + 3)?,
                },
                layer_norm2: norm(),
                mlp: VisionMlp {
                    fc1: biased(iv, hv, k + 4)?,
                    fc2: biased(hv, iv, k + 5)?,
                },
            });
        }
        let patches = v.patches_per_side().pow(2);
        let pdim = v.num_channels * v.patch_size * v.patch_size;
        let h = config.text.hidden_size;
        let pos = matrix(patches, hv, s + 1000).weight().to_f32_vec();
        let image_embed = ImageEmbedding {
            img_processor: VisionModel {
                config: v.clone(),
                embeddings: VisionEmbeddings {
                    patch_embedding: biased(hv, pdim, s + 1001)?,
                    position_embedding: pos,
                },
                layers,
            },
            sub_img_feature_extensor: vec![0.01; hv],
            global_img_feature_extensor: vec![-0.01; hv],
            img_projection_up: biased(h, hv, s + 1002)?,
            img_projection_down: biased(h, h, s + 1003)?,
        };
        for id in 0..super::phi4mm::ADAPTERS.len() {
            let Some(spec) = super::phi4mm::adapter_spec(&config, id) else {
                continue;
            };
            for (l, layer) in lm.model.layers.iter_mut().enumerate() {
                for (k, (_, lin)) in layer.linears_mut().into_iter().enumerate() {
                    let base = s.wrapping_add(5000 + 100 * l as u64 + 10 * k as u64 + id as u64);
                    let a = matrix(spec.r, lin.in_features, base).weight().clone();
                    let b = matrix(lin.out_features, spec.r, base + 5).weight().clone();
                    lin.add_lora(id, a, b, spec.scale())?;
                }
            }
        }
        // The speech encoder: every tensor of the registry, norms at 1, biases and CMVN mean at 0,
        // matrices uniform with the fan-in scale.
        let mut audio: std::collections::HashMap<String, Tensor> =
            AudioEmbedding::expected_tensors(&config.audio, h)
                .into_iter()
                .enumerate()
                .map(|(i, e)| {
                    let n = e.name.as_str();
                    let fill = |x: f32| {
                        Tensor::from_f32(e.shape.clone(), &vec![x; e.shape.iter().product()])
                    };
                    let t = if n.ends_with("norm.weight")
                        || n.ends_with("norm_att.weight")
                        || n.ends_with("global_invstd")
                    {
                        fill(1.0)
                    } else if n.ends_with(".bias")
                        || n.ends_with("global_mean")
                        || n.ends_with(".b1")
                        || n.ends_with(".b2")
                    {
                        fill(0.0)
                    } else {
                        let cols: usize = e.shape[1..].iter().product::<usize>().max(1);
                        let scale = (3.0 / cols as f32).sqrt();
                        let seed = s.wrapping_add(20_000 + i as u64);
                        Tensor::bf16_with(e.shape.clone(), |v| random_bf16(v, scale, seed))
                    };
                    (e.name, t)
                })
                .collect();
        let audio_embed = AudioEmbedding::load(&config.audio, &mut |name: &str| {
            audio
                .remove(name)
                .with_context(|| format!("synthetic tensor {name}"))
        })?;
        Ok(super::phi4mm::Phi4MMForCausalLM {
            config,
            lm,
            image_embed,
            audio_embed: Some(audio_embed),
        })
    }
}
