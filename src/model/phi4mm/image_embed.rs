//! `model.embed_tokens_extend.image_embed`: vision tower → 2×2 average pool → HD layout with
//! learned separators → two-layer GELU projection into the language model's width
//! (spec §3.3–3.4, `hd_transform_order = "sub_glb"`).

use anyhow::{ensure, Result};

use super::siglip::{biased_linear, VisionModel};
use crate::config::multimodal::VisionConfig;
use crate::kernels::bf16::Bf16Acts;
use crate::kernels::encoder::gelu_erf;
use crate::media::ProcessedImage;
use crate::model::linear::Linear;
use crate::weights::{Expected, Tensor};

/// Native tensor names under this prefix (the remote layout's are renamed on load).
pub const PREFIX: &str = "model.embed_tokens_extend.image_embed";

pub struct ImageEmbedding {
    pub img_processor: VisionModel,
    /// Separator after each row of features (`sub_GN`), `[vision hidden]`.
    pub sub_img_feature_extensor: Vec<f32>,
    /// Separator between the crops' features and the global view's (`glb_GN`).
    pub global_img_feature_extensor: Vec<f32>,
    pub img_projection_up: Linear,
    pub img_projection_down: Linear,
}

impl ImageEmbedding {
    pub fn expected_tensors(c: &VisionConfig, lm_hidden: usize) -> Vec<Expected> {
        let hv = c.hidden_size;
        let mut out = VisionModel::expected_tensors(c, &format!("{PREFIX}.img_processor"));
        let e = |name: &str, shape: Vec<usize>| Expected {
            name: format!("{PREFIX}.{name}"),
            shape,
            optional: false,
        };
        out.extend([
            e("sub_img_feature_extensor", vec![1, 1, 1, hv]),
            e("global_img_feature_extensor", vec![1, 1, hv]),
            e("img_projection_up.weight", vec![lm_hidden, hv]),
            e("img_projection_up.bias", vec![lm_hidden]),
            e("img_projection_down.weight", vec![lm_hidden, lm_hidden]),
            e("img_projection_down.bias", vec![lm_hidden]),
        ]);
        out
    }

    pub fn is_unused(c: &VisionConfig, name: &str) -> bool {
        VisionModel::is_unused(c, &format!("{PREFIX}.img_processor"), name)
    }

    pub fn load(c: &VisionConfig, take: &mut dyn FnMut(&str) -> Result<Tensor>) -> Result<Self> {
        let img_processor = VisionModel::load(c, &format!("{PREFIX}.img_processor"), take)?;
        let img_projection_up = biased_linear(take, &format!("{PREFIX}.img_projection_up"))?;
        let img_projection_down = biased_linear(take, &format!("{PREFIX}.img_projection_down"))?;
        let mut get = |n: &str| take(&format!("{PREFIX}.{n}"));
        Ok(ImageEmbedding {
            img_processor,
            sub_img_feature_extensor: get("sub_img_feature_extensor")?.to_f32_vec(),
            global_img_feature_extensor: get("global_img_feature_extensor")?.to_f32_vec(),
            img_projection_up,
            img_projection_down,
        })
    }

    /// How activations meet the tower's and the projection's bf16 weights (see [`Bf16Acts`]).
    pub fn set_bf16_acts(&mut self, acts: Bf16Acts) {
        for l in self.img_processor.linears_mut() {
            l.set_bf16_acts(acts);
        }
        self.img_projection_up.set_bf16_acts(acts);
        self.img_projection_down.set_bf16_acts(acts);
    }

    /// Every tensor by its native name (layers past the feature layer are not held).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let vec = |name: String, v: &[f32], shape: Vec<usize>| (name, Tensor::from_f32(shape, v));
        let mut out = Vec::new();
        let mut linear = |name: String, l: &Linear, shape: Vec<usize>| {
            let mut w = l.weight().clone();
            w.shape = shape;
            out.push((format!("{name}.weight"), w));
            let b = l.bias().expect("the image embedding's layers have biases");
            out.push((format!("{name}.bias"), Tensor::from_f32(vec![b.len()], b)));
        };
        let t = &self.img_processor;
        let c = &t.config;
        let p = format!("{PREFIX}.img_processor");
        linear(
            format!("{p}.embeddings.patch_embedding"),
            &t.embeddings.patch_embedding,
            vec![c.hidden_size, c.num_channels, c.patch_size, c.patch_size],
        );
        for (l, layer) in t.layers.iter().enumerate() {
            let q = format!("{p}.encoder.layers.{l}");
            for (n, lin) in [
                ("self_attn.q_proj", &layer.self_attn.q_proj),
                ("self_attn.k_proj", &layer.self_attn.k_proj),
                ("self_attn.v_proj", &layer.self_attn.v_proj),
                ("self_attn.out_proj", &layer.self_attn.out_proj),
                ("mlp.fc1", &layer.mlp.fc1),
                ("mlp.fc2", &layer.mlp.fc2),
            ] {
                linear(format!("{q}.{n}"), lin, lin.weight().shape.clone());
            }
        }
        linear(
            format!("{PREFIX}.img_projection_up"),
            &self.img_projection_up,
            self.img_projection_up.weight().shape.clone(),
        );
        linear(
            format!("{PREFIX}.img_projection_down"),
            &self.img_projection_down,
            self.img_projection_down.weight().shape.clone(),
        );
        let hv = c.hidden_size;
        out.push(vec(
            format!("{p}.embeddings.position_embedding.weight"),
            &t.embeddings.position_embedding,
            vec![c.patches_per_side().pow(2), hv],
        ));
        for (l, layer) in t.layers.iter().enumerate() {
            let q = format!("{p}.encoder.layers.{l}");
            for (n, norm) in [
                ("layer_norm1", &layer.layer_norm1),
                ("layer_norm2", &layer.layer_norm2),
            ] {
                out.push(vec(format!("{q}.{n}.weight"), &norm.weight, vec![hv]));
                out.push(vec(format!("{q}.{n}.bias"), &norm.bias, vec![hv]));
            }
        }
        out.push(vec(
            format!("{PREFIX}.sub_img_feature_extensor"),
            &self.sub_img_feature_extensor,
            vec![1, 1, 1, hv],
        ));
        out.push(vec(
            format!("{PREFIX}.global_img_feature_extensor"),
            &self.global_img_feature_extensor,
            vec![1, 1, hv],
        ));
        out
    }

    /// The tower's feature layer, 2×2 average-pooled: `[views, (side/2)², vision hidden]`.
    pub fn pooled_features(&self, img: &ProcessedImage) -> Vec<f32> {
        let c = &self.img_processor.config;
        let views = img.views();
        let feats = self.img_processor.forward(&img.pixels, &img.masks, views);
        let (side, hv) = (c.patches_per_side(), c.hidden_size);
        let half = side / 2;
        let mut pooled = vec![0f32; views * half * half * hv];
        for v in 0..views {
            let f = &feats[v * side * side * hv..(v + 1) * side * side * hv];
            for y in 0..half {
                for x in 0..half {
                    let out = &mut pooled[((v * half + y) * half + x) * hv..][..hv];
                    let at =
                        |dy: usize, dx: usize| &f[((2 * y + dy) * side + 2 * x + dx) * hv..][..hv];
                    let (a, b, cc, d) = (at(0, 0), at(0, 1), at(1, 0), at(1, 1));
                    // AvgPool2d sums the window row by row, then divides.
                    for i in 0..hv {
                        out[i] = (a[i] + b[i] + cc[i] + d[i]) / 4.0;
                    }
                }
            }
        }
        pooled
    }

    /// The image's rows before projection, in prompt order (vision width).
    pub fn layout_features(&self, img: &ProcessedImage, pooled: &[f32]) -> Result<Vec<f32>> {
        let c = &self.img_processor.config;
        let hv = c.hidden_size;
        let half = c.patches_per_side() / 2;
        let l = &img.layout;
        let (r, cols) = l.useful_pooled();
        let mut out = Vec::with_capacity(img.num_tokens() * hv);
        let sub = &self.sub_img_feature_extensor;
        // The crops' pooled maps stitched into one (half·grid_h) × (half·grid_w) grid, cut to
        // the rows and columns that hold image, a separator after every row.
        for y in 0..r {
            for x in 0..cols {
                let crop = 1 + (y / half) * l.grid_w + x / half;
                let at = ((crop * half + y % half) * half + x % half) * hv;
                out.extend_from_slice(&pooled[at..at + hv]);
            }
            out.extend_from_slice(sub);
        }
        out.extend_from_slice(&self.global_img_feature_extensor);
        for y in 0..half {
            out.extend_from_slice(&pooled[y * half * hv..(y + 1) * half * hv]);
            out.extend_from_slice(sub);
        }
        ensure!(
            out.len() == img.num_tokens() * hv,
            "image layout produced {} rows for {} tokens",
            out.len() / hv,
            img.num_tokens()
        );
        Ok(out)
    }

    /// The image's embedding rows in the language model's width, one per image token.
    pub fn forward(&self, img: &ProcessedImage) -> Result<Vec<f32>> {
        let pooled = self.pooled_features(img);
        let rows = self.layout_features(img, &pooled)?;
        self.project(&rows)
    }

    /// `img_projection_down(gelu(img_projection_up(x)))`.
    pub fn project(&self, rows: &[f32]) -> Result<Vec<f32>> {
        let n = rows.len() / self.img_processor.config.hidden_size;
        let mut up = vec![0f32; n * self.img_projection_up.out_features];
        self.img_projection_up.forward(rows, &mut up);
        gelu_erf(&mut up);
        let mut out = vec![0f32; n * self.img_projection_down.out_features];
        self.img_projection_down.forward(&up, &mut out);
        Ok(out)
    }
}
