//! The Conformer speech encoder of Phi-4-multimodal (`…audio_embed.encoder`, spec §3.6): global
//! mean/variance normalisation of the log-mel features, NeMo's depthwise-striding ×8 subsampling,
//! then Conformer blocks (half FFN, self-attention with a T5-style relative bias, a GLU
//! convolution module with a causal depthwise convolution, half FFN, LayerNorm). Sequences longer
//! than 500 frames run as independent 500-frame windows, the last one zero-padded, exactly as the
//! reference does for a single audio (its padding is not masked).

use anyhow::{Context, Result};
use rayon::prelude::*;

use super::siglip::{biased_linear, LayerNorm};
use crate::config::multimodal::AudioConfig;
use crate::kernels::encoder::{attention_full, swish, RelativeBias};
use crate::model::linear::Linear;
use crate::weights::{Expected, Tensor};

/// The reference's attention window: longer inputs are cut into windows of this many frames.
pub const MAX_SEQ_LEN: usize = 500;
const EPS: f32 = 1e-5;
/// Final frames per subsampling tile (bounded memory for hour-long audio).
const TILE: usize = 32;

/// A depthwise convolution: `[channels][taps]` weights and a bias per channel.
pub struct Depthwise {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// FFN with the value-then-gate split: `W2 · (a ⊙ swish(g)) + b2`, `[a ; g] = W1 · LN(x) + b1`.
pub struct FeedForward {
    pub layer_norm: LayerNorm,
    pub gate_up_proj: Linear,
    pub down_proj: Linear,
}

pub struct SelfAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
}

pub struct ConvModule {
    pub layer_norm: LayerNorm,
    /// GLU pointwise convolution to `[p ; g]`, then `(p + b1) ⊙ swish(g + b2)`.
    pub glu_pw: Linear,
    pub glu_b1: Vec<f32>,
    pub glu_b2: Vec<f32>,
    pub dw_conv: Depthwise,
    pub pw_conv: Linear,
    pub ext_pw_conv: Linear,
}

pub struct ConformerBlock {
    pub feed_forward_in: FeedForward,
    pub self_attn: SelfAttention,
    pub layer_norm_att: LayerNorm,
    pub conv: ConvModule,
    pub feed_forward_out: FeedForward,
    pub layer_norm: LayerNorm,
}

/// NeMo's `dw_striding` subsampling: a full 3×3 stride-2 convolution from one channel, then
/// (depthwise 3×3 stride 2, pointwise 1×1, ReLU) per further halving, and a linear layer over the
/// flattened (channel, frequency) map.
pub struct Subsampling {
    /// The first convolution as a matrix over the 9 taps, `[channels, 9]`.
    pub conv0: Linear,
    pub stages: Vec<(Depthwise, Linear)>,
    pub out: Linear,
}

pub struct ConformerEncoder {
    pub config: AudioConfig,
    pub global_mean: Vec<f32>,
    pub global_invstd: Vec<f32>,
    pub embed: Subsampling,
    /// `[heads][2 · bias_max_distance]` (transposed from the checkpoint's `[2 · max, heads]`).
    pub relative_bias: Vec<f32>,
    pub blocks: Vec<ConformerBlock>,
}

const BLOCK_LINEARS: [&str; 10] = [
    "feed_forward_in.gate_up_proj",
    "feed_forward_in.down_proj",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "conv.glu.ext_pw_conv_1d",
    "conv.dw_sep_conv_1d.pw_conv",
    "conv.ext_pw_conv_1d",
    "feed_forward_out.gate_up_proj",
];

impl ConformerEncoder {
    /// The tensors the encoder needs under `prefix` (`…audio_embed.encoder`), native names.
    pub fn expected_tensors(c: &AudioConfig, prefix: &str) -> Vec<Expected> {
        let (h, i, ch, k) = (
            c.hidden_size,
            c.intermediate_size,
            c.nemo_conv_channels,
            c.kernel_size,
        );
        let e = |name: String, shape: Vec<usize>| Expected {
            name: format!("{prefix}.{name}"),
            shape,
            optional: false,
        };
        let mut out = vec![
            e("encoder_embedding.global_mean".into(), vec![c.input_size]),
            e("encoder_embedding.global_invstd".into(), vec![c.input_size]),
            e("embed.conv.0.weight".into(), vec![ch, 1, 3, 3]),
            e("embed.conv.0.bias".into(), vec![ch]),
            e("embed.out.weight".into(), vec![h, ch * c.nemo_final_size()]),
            e("embed.out.bias".into(), vec![h]),
            e(
                "relative_attention_bias_layer.bias_values.weight".into(),
                vec![2 * c.bias_max_distance, c.num_attention_heads],
            ),
        ];
        for s in 1..c.subsampling_stages() {
            let (dw, pw) = (3 * s - 1, 3 * s);
            out.push(e(format!("embed.conv.{dw}.weight"), vec![ch, 1, 3, 3]));
            out.push(e(format!("embed.conv.{dw}.bias"), vec![ch]));
            out.push(e(format!("embed.conv.{pw}.weight"), vec![ch, ch, 1, 1]));
            out.push(e(format!("embed.conv.{pw}.bias"), vec![ch]));
        }
        for b in 0..c.num_blocks {
            let q = format!("encoders.{b}");
            for name in BLOCK_LINEARS
                .iter()
                .copied()
                .chain(["feed_forward_out.down_proj"])
            {
                let shape = match name {
                    n if n.ends_with("gate_up_proj") => vec![2 * i, h],
                    n if n.ends_with("down_proj") => vec![h, i],
                    "conv.glu.ext_pw_conv_1d" => vec![2 * h, h, 1],
                    n if n.starts_with("conv.") => vec![h, h, 1],
                    _ => vec![h, h],
                };
                out.push(e(format!("{q}.{name}.bias"), vec![shape[0]]));
                out.push(e(format!("{q}.{name}.weight"), shape));
            }
            for norm in [
                "feed_forward_in.layer_norm",
                "feed_forward_out.layer_norm",
                "layer_norm_att",
                "conv.layer_norm",
                "layer_norm",
            ] {
                out.push(e(format!("{q}.{norm}.weight"), vec![h]));
                out.push(e(format!("{q}.{norm}.bias"), vec![h]));
            }
            out.push(e(format!("{q}.conv.glu.b1"), vec![1, h, 1]));
            out.push(e(format!("{q}.conv.glu.b2"), vec![1, h, 1]));
            out.push(e(
                format!("{q}.conv.dw_sep_conv_1d.dw_conv.weight"),
                vec![h, 1, k],
            ));
            out.push(e(format!("{q}.conv.dw_sep_conv_1d.dw_conv.bias"), vec![h]));
        }
        out
    }

    pub fn load(
        c: &AudioConfig,
        prefix: &str,
        take: &mut dyn FnMut(&str) -> Result<Tensor>,
    ) -> Result<ConformerEncoder> {
        let mut get = |n: &str| take(&format!("{prefix}.{n}"));
        let global_mean = get("encoder_embedding.global_mean")?.to_f32_vec();
        let global_invstd = get("encoder_embedding.global_invstd")?.to_f32_vec();
        let table = get("relative_attention_bias_layer.bias_values.weight")?.to_f32_vec();
        let heads = c.num_attention_heads;
        let rows = 2 * c.bias_max_distance;
        let mut relative_bias = vec![0f32; rows * heads];
        for r in 0..rows {
            for h in 0..heads {
                relative_bias[h * rows + r] = table[r * heads + h];
            }
        }
        let ch = c.nemo_conv_channels;
        let conv0 = conv_matrix(take, &format!("{prefix}.embed.conv.0"), 9)?;
        let mut stages = Vec::new();
        for s in 1..c.subsampling_stages() {
            let (dw, pw) = (3 * s - 1, 3 * s);
            let dw_w = take(&format!("{prefix}.embed.conv.{dw}.weight"))?.to_f32_vec();
            let dw_b = take(&format!("{prefix}.embed.conv.{dw}.bias"))?.to_f32_vec();
            let pw = conv_matrix(take, &format!("{prefix}.embed.conv.{pw}"), ch)?;
            stages.push((
                Depthwise {
                    weight: dw_w,
                    bias: dw_b,
                },
                pw,
            ));
        }
        let out = biased_linear(take, &format!("{prefix}.embed.out"))?;
        let mut blocks = Vec::with_capacity(c.num_blocks);
        for b in 0..c.num_blocks {
            let q = format!("{prefix}.encoders.{b}");
            let mut lin = |n: &str| -> Result<Linear> {
                let mut w = take(&format!("{q}.{n}.weight"))?;
                w.shape.truncate(2);
                let bias = take(&format!("{q}.{n}.bias"))?.to_f32_vec();
                Linear::with_bias(w, bias).with_context(|| format!("{q}.{n}"))
            };
            let ffn_in = (
                lin("feed_forward_in.gate_up_proj")?,
                lin("feed_forward_in.down_proj")?,
            );
            let ffn_out = (
                lin("feed_forward_out.gate_up_proj")?,
                lin("feed_forward_out.down_proj")?,
            );
            let self_attn = SelfAttention {
                q_proj: lin("self_attn.q_proj")?,
                k_proj: lin("self_attn.k_proj")?,
                v_proj: lin("self_attn.v_proj")?,
                o_proj: lin("self_attn.o_proj")?,
            };
            let (glu_pw, pw_conv, ext_pw_conv) = (
                lin("conv.glu.ext_pw_conv_1d")?,
                lin("conv.dw_sep_conv_1d.pw_conv")?,
                lin("conv.ext_pw_conv_1d")?,
            );
            let mut vec =
                |n: &str| -> Result<Vec<f32>> { Ok(take(&format!("{q}.{n}"))?.to_f32_vec()) };
            let mut norm = |n: &str| -> Result<LayerNorm> {
                Ok(LayerNorm {
                    weight: vec(&format!("{n}.weight"))?,
                    bias: vec(&format!("{n}.bias"))?,
                })
            };
            let ln_ffn_in = norm("feed_forward_in.layer_norm")?;
            let ln_ffn_out = norm("feed_forward_out.layer_norm")?;
            let layer_norm_att = norm("layer_norm_att")?;
            let ln_conv = norm("conv.layer_norm")?;
            let layer_norm = norm("layer_norm")?;
            let conv = ConvModule {
                layer_norm: ln_conv,
                glu_pw,
                glu_b1: vec("conv.glu.b1")?,
                glu_b2: vec("conv.glu.b2")?,
                dw_conv: Depthwise {
                    weight: vec("conv.dw_sep_conv_1d.dw_conv.weight")?,
                    bias: vec("conv.dw_sep_conv_1d.dw_conv.bias")?,
                },
                pw_conv,
                ext_pw_conv,
            };
            blocks.push(ConformerBlock {
                feed_forward_in: FeedForward {
                    layer_norm: ln_ffn_in,
                    gate_up_proj: ffn_in.0,
                    down_proj: ffn_in.1,
                },
                self_attn,
                layer_norm_att,
                conv,
                feed_forward_out: FeedForward {
                    layer_norm: ln_ffn_out,
                    gate_up_proj: ffn_out.0,
                    down_proj: ffn_out.1,
                },
                layer_norm,
            });
        }
        Ok(ConformerEncoder {
            config: c.clone(),
            global_mean,
            global_invstd,
            embed: Subsampling { conv0, stages, out },
            relative_bias,
            blocks,
        })
    }

    /// Every matrix of the encoder, for quantization, bf16 settings and memory accounting.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = vec![&mut self.embed.conv0, &mut self.embed.out];
        for (_, pw) in &mut self.embed.stages {
            out.push(pw);
        }
        for b in &mut self.blocks {
            out.extend([
                &mut b.feed_forward_in.gate_up_proj,
                &mut b.feed_forward_in.down_proj,
                &mut b.self_attn.q_proj,
                &mut b.self_attn.k_proj,
                &mut b.self_attn.v_proj,
                &mut b.self_attn.o_proj,
                &mut b.conv.glu_pw,
                &mut b.conv.pw_conv,
                &mut b.conv.ext_pw_conv,
                &mut b.feed_forward_out.gate_up_proj,
                &mut b.feed_forward_out.down_proj,
            ]);
        }
        out
    }

    /// Every tensor by its native name, under `prefix`.
    pub fn named_tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let c = &self.config;
        let mut out = Vec::new();
        let mut vec = |name: String, v: &[f32], shape: Vec<usize>| {
            out.push((format!("{prefix}.{name}"), Tensor::from_f32(shape, v)))
        };
        vec(
            "encoder_embedding.global_mean".into(),
            &self.global_mean,
            vec![c.input_size],
        );
        vec(
            "encoder_embedding.global_invstd".into(),
            &self.global_invstd,
            vec![c.input_size],
        );
        let heads = c.num_attention_heads;
        let rows = 2 * c.bias_max_distance;
        let mut table = vec![0f32; rows * heads];
        for r in 0..rows {
            for h in 0..heads {
                table[r * heads + h] = self.relative_bias[h * rows + r];
            }
        }
        vec(
            "relative_attention_bias_layer.bias_values.weight".into(),
            &table,
            vec![rows, heads],
        );
        let (h, k) = (c.hidden_size, c.kernel_size);
        for (s, (dw, _)) in self.embed.stages.iter().enumerate() {
            let i = 3 * (s + 1) - 1;
            let ch = dw.bias.len();
            vec(
                format!("embed.conv.{i}.weight"),
                &dw.weight,
                vec![ch, 1, 3, 3],
            );
            vec(format!("embed.conv.{i}.bias"), &dw.bias, vec![ch]);
        }
        for (b, blk) in self.blocks.iter().enumerate() {
            let q = format!("encoders.{b}");
            for (n, norm) in [
                (
                    "feed_forward_in.layer_norm",
                    &blk.feed_forward_in.layer_norm,
                ),
                (
                    "feed_forward_out.layer_norm",
                    &blk.feed_forward_out.layer_norm,
                ),
                ("layer_norm_att", &blk.layer_norm_att),
                ("conv.layer_norm", &blk.conv.layer_norm),
                ("layer_norm", &blk.layer_norm),
            ] {
                vec(format!("{q}.{n}.weight"), &norm.weight, vec![h]);
                vec(format!("{q}.{n}.bias"), &norm.bias, vec![h]);
            }
            vec(format!("{q}.conv.glu.b1"), &blk.conv.glu_b1, vec![1, h, 1]);
            vec(format!("{q}.conv.glu.b2"), &blk.conv.glu_b2, vec![1, h, 1]);
            vec(
                format!("{q}.conv.dw_sep_conv_1d.dw_conv.weight"),
                &blk.conv.dw_conv.weight,
                vec![h, 1, k],
            );
            vec(
                format!("{q}.conv.dw_sep_conv_1d.dw_conv.bias"),
                &blk.conv.dw_conv.bias,
                vec![h],
            );
        }
        let mut linear = |name: String, l: &Linear, shape: Vec<usize>| {
            let mut w = l.weight().clone();
            w.shape = shape;
            out.push((format!("{prefix}.{name}.weight"), w));
            let b = l.bias().expect("the encoder's layers have biases");
            out.push((
                format!("{prefix}.{name}.bias"),
                Tensor::from_f32(vec![b.len()], b),
            ));
        };
        let ch = c.nemo_conv_channels;
        linear("embed.conv.0".into(), &self.embed.conv0, vec![ch, 1, 3, 3]);
        for (s, (_, pw)) in self.embed.stages.iter().enumerate() {
            linear(
                format!("embed.conv.{}", 3 * (s + 1)),
                pw,
                vec![ch, ch, 1, 1],
            );
        }
        linear(
            "embed.out".into(),
            &self.embed.out,
            self.embed.out.weight().shape.clone(),
        );
        for (b, blk) in self.blocks.iter().enumerate() {
            let q = format!("encoders.{b}");
            for (n, l) in [
                (
                    "feed_forward_in.gate_up_proj",
                    &blk.feed_forward_in.gate_up_proj,
                ),
                ("feed_forward_in.down_proj", &blk.feed_forward_in.down_proj),
                ("self_attn.q_proj", &blk.self_attn.q_proj),
                ("self_attn.k_proj", &blk.self_attn.k_proj),
                ("self_attn.v_proj", &blk.self_attn.v_proj),
                ("self_attn.o_proj", &blk.self_attn.o_proj),
                (
                    "feed_forward_out.gate_up_proj",
                    &blk.feed_forward_out.gate_up_proj,
                ),
                (
                    "feed_forward_out.down_proj",
                    &blk.feed_forward_out.down_proj,
                ),
            ] {
                linear(format!("{q}.{n}"), l, l.weight().shape.clone());
            }
            for (n, l) in [
                ("conv.glu.ext_pw_conv_1d", &blk.conv.glu_pw),
                ("conv.dw_sep_conv_1d.pw_conv", &blk.conv.pw_conv),
                ("conv.ext_pw_conv_1d", &blk.conv.ext_pw_conv),
            ] {
                let s = l.weight().shape.clone();
                linear(format!("{q}.{n}"), l, vec![s[0], s[1], 1]);
            }
        }
        out
    }

    /// Encoder frames for `frames` feature frames (`ceil(frames / 8)`).
    pub fn output_frames(&self, frames: usize) -> usize {
        let mut t = frames;
        for _ in 0..self.config.subsampling_stages() {
            t = t.div_ceil(2);
        }
        t
    }

    /// CMVN and subsampling of `[frames, 80]` features: `[output_frames, hidden]`.
    pub fn subsample(&self, features: &[f32]) -> Vec<f32> {
        let c = &self.config;
        let f0 = c.input_size;
        let frames = features.len() / f0;
        let mut x = features.to_vec();
        for row in x.chunks_mut(f0) {
            for ((v, m), s) in row
                .iter_mut()
                .zip(&self.global_mean)
                .zip(&self.global_invstd)
            {
                *v = (*v - m) * s;
            }
        }
        let stages = c.subsampling_stages();
        // Frames and frequency bins at the input of each stage, 0 = the features.
        let mut t_at = vec![frames];
        let mut f_at = vec![f0];
        for s in 0..stages {
            t_at.push(t_at[s].div_ceil(2));
            f_at.push(f_at[s].div_ceil(2));
        }
        let t_out = t_at[stages];
        let ch = c.nemo_conv_channels;
        let f_last = f_at[stages];
        let h = c.hidden_size;
        let mut out = vec![0f32; t_out * h];
        // Tiles of final frames; each computes the frames of every stage it depends on (a 3-tap
        // stride-2 convolution's output t reads inputs 2t−1 ..= 2t+1), reading zeros outside a
        // stage's frames as the reference's padding does.
        out.par_chunks_mut(TILE * h)
            .enumerate()
            .for_each(|(tile, out_rows)| {
                let a = tile * TILE;
                let b = (a + TILE).min(t_out);
                // Frame ranges needed at each stage's output, from the last stage back.
                let mut ranges = vec![(0usize, 0usize); stages + 1];
                ranges[stages] = (a, b);
                for s in (0..stages).rev() {
                    let (lo, hi) = ranges[s + 1];
                    ranges[s] = ((2 * lo).saturating_sub(1), (2 * hi).min(t_at[s]));
                }
                // Stage 1: the full convolution from one channel, as a matrix over 9 taps.
                let (lo, hi) = ranges[1];
                let f1 = f_at[1];
                let mut taps = vec![0f32; (hi - lo) * f1 * 9];
                for (r, t) in (lo..hi).enumerate() {
                    for f in 0..f1 {
                        let row = &mut taps[(r * f1 + f) * 9..][..9];
                        for dt in 0..3 {
                            let ti = (2 * t + dt) as isize - 1;
                            if ti < 0 || ti as usize >= frames {
                                continue;
                            }
                            for df in 0..3 {
                                let fi = (2 * f + df) as isize - 1;
                                if fi < 0 || fi as usize >= f0 {
                                    continue;
                                }
                                row[dt * 3 + df] = x[ti as usize * f0 + fi as usize];
                            }
                        }
                    }
                }
                let mut cur = vec![0f32; (hi - lo) * f1 * ch];
                self.embed.conv0.forward(&taps, &mut cur);
                relu(&mut cur);
                let mut cur_range = (lo, hi);
                for (s, (dw, pw)) in self.embed.stages.iter().enumerate() {
                    let s = s + 1; // input of this stage is stage s's output
                    let (fi_n, fo_n) = (f_at[s], f_at[s + 1]);
                    let (olo, ohi) = ranges[s + 1];
                    let mut mid = vec![0f32; (ohi - olo) * fo_n * ch];
                    for (r, t) in (olo..ohi).enumerate() {
                        for f in 0..fo_n {
                            let o = &mut mid[(r * fo_n + f) * ch..][..ch];
                            o.copy_from_slice(&dw.bias);
                            for dt in 0..3 {
                                let ti = (2 * t + dt) as isize - 1;
                                if ti < 0 || ti as usize >= t_at[s] {
                                    continue;
                                }
                                let ti = ti as usize - cur_range.0;
                                for df in 0..3 {
                                    let fi = (2 * f + df) as isize - 1;
                                    if fi < 0 || fi as usize >= fi_n {
                                        continue;
                                    }
                                    let inp = &cur[(ti * fi_n + fi as usize) * ch..][..ch];
                                    let tap = dt * 3 + df;
                                    for ((o, i), w) in
                                        o.iter_mut().zip(inp).zip(dw.weight.chunks_exact(9))
                                    {
                                        *o += w[tap] * i;
                                    }
                                }
                            }
                        }
                    }
                    let mut next = vec![0f32; mid.len()];
                    pw.forward(&mid, &mut next);
                    relu(&mut next);
                    cur = next;
                    cur_range = (olo, ohi);
                }
                // [t, f, c] → [t, c·F + f], the reference's channel-major flatten.
                let n = b - a;
                let mut flat = vec![0f32; n * ch * f_last];
                for t in 0..n {
                    for f in 0..f_last {
                        for cc in 0..ch {
                            flat[t * ch * f_last + cc * f_last + f] =
                                cur[(t * f_last + f) * ch + cc];
                        }
                    }
                }
                self.embed.out.forward(&flat, &mut out_rows[..n * h]);
            });
        out
    }

    /// Subsampled frames through the Conformer blocks: `[frames, hidden]` in, same shape out.
    pub fn blocks_forward(&self, x: &[f32]) -> Vec<f32> {
        let c = &self.config;
        let h = c.hidden_size;
        let frames = x.len() / h;
        // One window, or windows of 500 with the last zero-padded (and its padding attended).
        let (win, groups) = if frames > MAX_SEQ_LEN {
            (MAX_SEQ_LEN, frames.div_ceil(MAX_SEQ_LEN))
        } else {
            (frames, 1)
        };
        let n = win * groups;
        let mut x = {
            let mut v = x.to_vec();
            v.resize(n * h, 0.0);
            v
        };
        let heads = c.num_attention_heads;
        let hd = c.head_dim();
        let scale = 1.0 / (hd as f32).sqrt();
        let bias = RelativeBias {
            table: &self.relative_bias,
            max: c.bias_max_distance,
        };
        let i = c.intermediate_size;
        let mut normed = vec![0f32; n * h];
        let mut wide = vec![0f32; n * 2 * i.max(h)];
        let mut narrow = vec![0f32; n * i.max(h)];
        let (mut q, mut k, mut v) = (vec![0f32; n * h], vec![0f32; n * h], vec![0f32; n * h]);
        let mut attn = vec![0f32; n * h];
        let mut proj = vec![0f32; n * h];
        for blk in &self.blocks {
            blk.feed_forward_in
                .forward(&x, &mut normed, &mut wide, &mut narrow, &mut proj);
            for (a, b) in x.iter_mut().zip(&proj) {
                *a += 0.5 * b;
            }
            blk.layer_norm_att.forward_rows(&x, &mut normed, EPS);
            // The reference adds the attention to the normalised input's residual, `x` itself.
            blk.self_attn.q_proj.forward(&normed, &mut q);
            blk.self_attn.k_proj.forward(&normed, &mut k);
            blk.self_attn.v_proj.forward(&normed, &mut v);
            attention_full(
                &q,
                &k,
                &v,
                &[],
                groups,
                win,
                heads,
                hd,
                scale,
                Some(&bias),
                &mut attn,
            );
            blk.self_attn.o_proj.forward(&attn, &mut proj);
            for (a, b) in x.iter_mut().zip(&proj) {
                *a += b;
            }
            blk.conv
                .forward(&x, groups, win, &mut normed, &mut wide, &mut proj);
            for (a, b) in x.iter_mut().zip(&proj) {
                *a += b;
            }
            blk.feed_forward_out
                .forward(&x, &mut normed, &mut wide, &mut narrow, &mut proj);
            for (a, b) in x.iter_mut().zip(&proj) {
                *a += 0.5 * b;
            }
            blk.layer_norm.forward_rows(&x, &mut normed, EPS);
            std::mem::swap(&mut x, &mut normed);
        }
        x.truncate(frames * h);
        x
    }

    /// `[frames, 80]` log-mel features to `[ceil(frames / 8), hidden]` encoder states.
    pub fn forward(&self, features: &[f32]) -> Vec<f32> {
        self.blocks_forward(&self.subsample(features))
    }
}

/// A convolution's `[out, in, k…]` weight read as a `[out, cols]` matrix, with its bias.
fn conv_matrix(
    take: &mut dyn FnMut(&str) -> Result<Tensor>,
    name: &str,
    cols: usize,
) -> Result<Linear> {
    let mut w = take(&format!("{name}.weight"))?;
    w.shape = vec![w.shape[0], cols];
    let b = take(&format!("{name}.bias"))?.to_f32_vec();
    Linear::with_bias(w, b).context(name.to_owned())
}

fn relu(x: &mut [f32]) {
    for v in x {
        *v = v.max(0.0);
    }
}

impl FeedForward {
    /// `out = W2 · (a ⊙ swish(g)) + b2` of `LN(x)`; the buffers are scratch.
    fn forward(
        &self,
        x: &[f32],
        normed: &mut [f32],
        wide: &mut [f32],
        narrow: &mut [f32],
        out: &mut [f32],
    ) {
        let h = self.layer_norm.weight.len();
        let rows = x.len() / h;
        let i = self.down_proj.in_features;
        self.layer_norm.forward_rows(x, normed, EPS);
        let wide = &mut wide[..rows * 2 * i];
        self.gate_up_proj.forward(normed, wide);
        let narrow = &mut narrow[..rows * i];
        narrow
            .par_chunks_mut(i)
            .zip(wide.par_chunks_mut(2 * i))
            .for_each(|(o, w)| {
                let (a, g) = w.split_at_mut(i);
                for ((o, a), g) in o.iter_mut().zip(a.iter()).zip(g.iter()) {
                    *o = a * (g / (1.0 + (-g).exp()));
                }
            });
        self.down_proj.forward(narrow, out);
    }
}

impl ConvModule {
    /// The convolution module over `groups` independent windows of `win` frames each.
    fn forward(
        &self,
        x: &[f32],
        groups: usize,
        win: usize,
        normed: &mut [f32],
        wide: &mut [f32],
        out: &mut [f32],
    ) {
        let h = self.layer_norm.weight.len();
        let rows = x.len() / h;
        self.layer_norm.forward_rows(x, normed, EPS);
        let wide = &mut wide[..rows * 2 * h];
        self.glu_pw.forward(normed, wide);
        // GLU into `normed` (free again): (p + b1) ⊙ swish(g + b2).
        normed
            .par_chunks_mut(h)
            .zip(wide.par_chunks(2 * h))
            .for_each(|(o, w)| {
                let (p, g) = w.split_at(h);
                for c in 0..h {
                    let g = g[c] + self.glu_b2[c];
                    o[c] = (p[c] + self.glu_b1[c]) * (g / (1.0 + (-g).exp()));
                }
            });
        // Causal depthwise convolution inside each window: y[t] = b + Σ_k w[k] · x[t − (K−1) + k].
        let k = self.dw_conv.weight.len() / h;
        let dw = &mut wide[..rows * h];
        dw.par_chunks_mut(h).enumerate().for_each(|(r, o)| {
            let (g, t) = (r / win, r % win);
            o.copy_from_slice(&self.dw_conv.bias);
            for tap in 0..k {
                let Some(src) = (t + tap).checked_sub(k - 1) else {
                    continue;
                };
                let inp = &normed[(g * win + src) * h..][..h];
                for ((o, i), w) in o
                    .iter_mut()
                    .zip(inp)
                    .zip(self.dw_conv.weight.chunks_exact(k))
                {
                    *o += w[tap] * i;
                }
            }
        });
        let _ = groups;
        let mid = &mut normed[..rows * h];
        self.pw_conv.forward(dw, mid);
        swish(mid);
        self.ext_pw_conv.forward(mid, out);
    }
}
