//! The SigLIP vision tower of Phi-4-multimodal (`…image_embed.img_processor`, spec §3.3):
//! a 14×14 patch embedding, NaViT-style bucketed positions, pre-LN encoder layers with
//! bidirectional attention. Only the layers up to the feature layer are loaded and run (26 of
//! 27); the last layer, the post-LayerNorm and the pooling head are computed and thrown away by
//! the reference and skipped here.

use anyhow::{Context, Result};

use crate::config::multimodal::VisionConfig;
use crate::kernels::encoder::{attention_full, gelu_tanh, layer_norm};
use crate::model::linear::Linear;
use crate::weights::{Expected, Tensor};

/// `{name}.weight` and `{name}.bias` as one layer.
pub(super) fn biased_linear(
    take: &mut dyn FnMut(&str) -> Result<Tensor>,
    name: &str,
) -> Result<Linear> {
    let bias = take(&format!("{name}.bias"))?.to_f32_vec();
    Linear::with_bias(take(&format!("{name}.weight"))?, bias).context(name.to_owned())
}

pub struct LayerNorm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

impl LayerNorm {
    pub fn forward_rows(&self, x: &[f32], out: &mut [f32], eps: f32) {
        let h = self.weight.len();
        for (o, r) in out.chunks_mut(h).zip(x.chunks(h)) {
            layer_norm(r, &self.weight, &self.bias, eps, o);
        }
    }
}

pub struct VisionAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
}

pub struct VisionMlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

pub struct VisionEncoderLayer {
    pub layer_norm1: LayerNorm,
    pub self_attn: VisionAttention,
    pub layer_norm2: LayerNorm,
    pub mlp: VisionMlp,
}

pub struct VisionEmbeddings {
    /// The Conv2d(3 → hidden, 14, stride 14) as a matrix over flattened (channel, y, x) patches.
    pub patch_embedding: Linear,
    /// `[patches_per_side², hidden]`.
    pub position_embedding: Vec<f32>,
}

pub struct VisionModel {
    pub config: VisionConfig,
    pub embeddings: VisionEmbeddings,
    /// The layers that feed the feature layer.
    pub layers: Vec<VisionEncoderLayer>,
}

const LINEARS: [&str; 6] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
];

impl VisionModel {
    /// The tensors the tower needs under `prefix` (`….img_processor`).
    pub fn expected_tensors(c: &VisionConfig, prefix: &str) -> Vec<Expected> {
        let (h, i, p) = (c.hidden_size, c.intermediate_size, c.patch_size);
        let e = |name: String, shape: Vec<usize>| Expected {
            name,
            shape,
            optional: false,
        };
        let mut out = vec![
            e(
                format!("{prefix}.embeddings.patch_embedding.weight"),
                vec![h, c.num_channels, p, p],
            ),
            e(format!("{prefix}.embeddings.patch_embedding.bias"), vec![h]),
            e(
                format!("{prefix}.embeddings.position_embedding.weight"),
                vec![c.patches_per_side().pow(2), h],
            ),
        ];
        for l in 0..c.layers_used() {
            let q = format!("{prefix}.encoder.layers.{l}");
            for norm in ["layer_norm1", "layer_norm2"] {
                out.push(e(format!("{q}.{norm}.weight"), vec![h]));
                out.push(e(format!("{q}.{norm}.bias"), vec![h]));
            }
            for name in LINEARS {
                let shape = match name {
                    "mlp.fc1" => vec![i, h],
                    "mlp.fc2" => vec![h, i],
                    _ => vec![h, h],
                };
                out.push(e(format!("{q}.{name}.bias"), vec![shape[0]]));
                out.push(e(format!("{q}.{name}.weight"), shape));
            }
        }
        out
    }

    /// Whether `name` (under `prefix`) is a tensor the reference computes with and discards.
    pub fn is_unused(c: &VisionConfig, prefix: &str, name: &str) -> bool {
        let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('.')) else {
            return false;
        };
        if rest.starts_with("post_layernorm.") || rest.starts_with("head.") {
            return true;
        }
        rest.strip_prefix("encoder.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|l| l.parse::<usize>().ok())
            .is_some_and(|l| l >= c.layers_used() && l < c.num_hidden_layers)
    }

    /// Builds the tower from checked tensors (`take` removes one by name).
    pub fn load(
        c: &VisionConfig,
        prefix: &str,
        take: &mut dyn FnMut(&str) -> Result<Tensor>,
    ) -> Result<VisionModel> {
        let mut patch = take(&format!("{prefix}.embeddings.patch_embedding.weight"))?;
        patch.shape = vec![c.hidden_size, c.num_channels * c.patch_size * c.patch_size];
        let patch_bias = take(&format!("{prefix}.embeddings.patch_embedding.bias"))?.to_f32_vec();
        let embeddings = VisionEmbeddings {
            patch_embedding: Linear::with_bias(patch, patch_bias)?,
            position_embedding: take(&format!("{prefix}.embeddings.position_embedding.weight"))?
                .to_f32_vec(),
        };
        let mut layers = Vec::with_capacity(c.layers_used());
        for l in 0..c.layers_used() {
            let q = format!("{prefix}.encoder.layers.{l}");
            let self_attn = VisionAttention {
                q_proj: biased_linear(take, &format!("{q}.self_attn.q_proj"))?,
                k_proj: biased_linear(take, &format!("{q}.self_attn.k_proj"))?,
                v_proj: biased_linear(take, &format!("{q}.self_attn.v_proj"))?,
                out_proj: biased_linear(take, &format!("{q}.self_attn.out_proj"))?,
            };
            let mlp = VisionMlp {
                fc1: biased_linear(take, &format!("{q}.mlp.fc1"))?,
                fc2: biased_linear(take, &format!("{q}.mlp.fc2"))?,
            };
            let mut norm = |n: &str| -> Result<LayerNorm> {
                Ok(LayerNorm {
                    weight: take(&format!("{q}.{n}.weight"))?.to_f32_vec(),
                    bias: take(&format!("{q}.{n}.bias"))?.to_f32_vec(),
                })
            };
            let (layer_norm1, layer_norm2) = (norm("layer_norm1")?, norm("layer_norm2")?);
            layers.push(VisionEncoderLayer {
                layer_norm1,
                self_attn,
                layer_norm2,
                mlp,
            });
        }
        Ok(VisionModel {
            config: c.clone(),
            embeddings,
            layers,
        })
    }

    /// Every matrix of the tower, for quantization and memory accounting.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = vec![&mut self.embeddings.patch_embedding];
        for l in &mut self.layers {
            out.extend([
                &mut l.self_attn.q_proj,
                &mut l.self_attn.k_proj,
                &mut l.self_attn.v_proj,
                &mut l.self_attn.out_proj,
                &mut l.mlp.fc1,
                &mut l.mlp.fc2,
            ]);
        }
        out
    }

    /// The feature layer of `views` crops: `pixels` is `[views, 3, 448, 448]`, `masks`
    /// `[views, 32, 32]` (1 = image, 0 = padding); returns `[views, 1024, hidden]`.
    pub fn forward(&self, pixels: &[f32], masks: &[u8], views: usize) -> Vec<f32> {
        let c = &self.config;
        let (side, p, h) = (c.patches_per_side(), c.patch_size, c.hidden_size);
        let (img, patches) = (c.image_size, side * side);
        let n = views * patches;
        let pdim = c.num_channels * p * p;
        // Patches flattened in the convolution's (channel, y, x) order.
        let mut flat = vec![0f32; n * pdim];
        for (row, out) in flat.chunks_mut(pdim).enumerate() {
            let (v, idx) = (row / patches, row % patches);
            let (py, px) = (idx / side, idx % side);
            let view = &pixels[v * c.num_channels * img * img..];
            for ch in 0..c.num_channels {
                for ky in 0..p {
                    let at = ch * img * img + (py * p + ky) * img + px * p;
                    out[(ch * p + ky) * p..][..p].copy_from_slice(&view[at..at + p]);
                }
            }
        }
        let mut x = vec![0f32; n * h];
        self.embeddings.patch_embedding.forward(&flat, &mut x);
        drop(flat);
        // NaViT positions: the valid patches of a crop stretched over the whole table,
        // bucket(i / nb) = floor(side · i / nb) (spec §3.3); padding patches take position 0.
        for v in 0..views {
            let m = &masks[v * patches..(v + 1) * patches];
            let nb_h = (0..side).filter(|&i| m[i * side] != 0).count().max(1);
            let nb_w = (0..side).filter(|&j| m[j] != 0).count().max(1);
            for i in 0..side {
                for j in 0..side {
                    let pos = if m[i * side + j] != 0 {
                        (side * i / nb_h).min(side - 1) * side + (side * j / nb_w).min(side - 1)
                    } else {
                        0
                    };
                    let row = &mut x[(v * patches + i * side + j) * h..][..h];
                    for (a, b) in row
                        .iter_mut()
                        .zip(&self.embeddings.position_embedding[pos * h..])
                    {
                        *a += b;
                    }
                }
            }
        }
        let valid: Vec<bool> = masks.iter().map(|&m| m != 0).collect();
        let eps = c.layer_norm_eps as f32;
        let heads = c.num_attention_heads;
        let scale = 1.0 / (c.head_dim() as f32).sqrt();
        let mut normed = vec![0f32; n * h];
        let (mut q, mut k, mut vv) = (vec![0f32; n * h], vec![0f32; n * h], vec![0f32; n * h]);
        let mut attn = vec![0f32; n * h];
        let mut proj = vec![0f32; n * h];
        let mut mid = vec![0f32; n * c.intermediate_size];
        for layer in &self.layers {
            layer.layer_norm1.forward_rows(&x, &mut normed, eps);
            layer.self_attn.q_proj.forward(&normed, &mut q);
            layer.self_attn.k_proj.forward(&normed, &mut k);
            layer.self_attn.v_proj.forward(&normed, &mut vv);
            attention_full(
                &q,
                &k,
                &vv,
                &valid,
                views,
                patches,
                heads,
                h / heads,
                scale,
                None,
                &mut attn,
            );
            layer.self_attn.out_proj.forward(&attn, &mut proj);
            for (a, b) in x.iter_mut().zip(&proj) {
                *a += b;
            }
            layer.layer_norm2.forward_rows(&x, &mut normed, eps);
            layer.mlp.fc1.forward(&normed, &mut mid);
            gelu_tanh(&mut mid);
            layer.mlp.fc2.forward(&mid, &mut proj);
            for (a, b) in x.iter_mut().zip(&proj) {
                *a += b;
            }
        }
        x
    }
}
