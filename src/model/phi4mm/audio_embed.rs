//! `model.embed_tokens_extend.audio_embed`: the Conformer encoder, then one of two GELU
//! projections into the language model's width: `speech` for audio alone, `vision_speech` when an
//! image is in the prompt too (spec §3.6–3.7).

use anyhow::Result;

use super::conformer::ConformerEncoder;
use super::siglip::biased_linear;
use crate::config::multimodal::AudioConfig;
use crate::kernels::bf16::Bf16Acts;
use crate::kernels::encoder::gelu_erf;
use crate::model::linear::Linear;
use crate::weights::{Expected, Tensor};

/// Native tensor names under this prefix (the remote layout's are renamed on load).
pub const PREFIX: &str = "model.embed_tokens_extend.audio_embed";

/// Which projection an audio's rows go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projection {
    Speech,
    VisionSpeech,
}

pub struct AudioEmbedding {
    pub encoder: ConformerEncoder,
    pub up_proj_for_speech: Linear,
    pub down_proj_for_speech: Linear,
    pub up_proj_for_vision_speech: Linear,
    pub down_proj_for_vision_speech: Linear,
}

const PROJECTIONS: [&str; 4] = [
    "up_proj_for_speech",
    "down_proj_for_speech",
    "up_proj_for_vision_speech",
    "down_proj_for_vision_speech",
];

impl AudioEmbedding {
    pub fn expected_tensors(c: &AudioConfig, lm_hidden: usize) -> Vec<Expected> {
        let mut out = ConformerEncoder::expected_tensors(c, &format!("{PREFIX}.encoder"));
        for name in PROJECTIONS {
            let cols = if name.starts_with("up_") {
                c.hidden_size
            } else {
                lm_hidden
            };
            out.push(Expected {
                name: format!("{PREFIX}.{name}.weight"),
                shape: vec![lm_hidden, cols],
                optional: false,
            });
            out.push(Expected {
                name: format!("{PREFIX}.{name}.bias"),
                shape: vec![lm_hidden],
                optional: false,
            });
        }
        out
    }

    pub fn load(c: &AudioConfig, take: &mut dyn FnMut(&str) -> Result<Tensor>) -> Result<Self> {
        let encoder = ConformerEncoder::load(c, &format!("{PREFIX}.encoder"), take)?;
        let mut lin = |n: &str| biased_linear(take, &format!("{PREFIX}.{n}"));
        Ok(AudioEmbedding {
            encoder,
            up_proj_for_speech: lin("up_proj_for_speech")?,
            down_proj_for_speech: lin("down_proj_for_speech")?,
            up_proj_for_vision_speech: lin("up_proj_for_vision_speech")?,
            down_proj_for_vision_speech: lin("down_proj_for_vision_speech")?,
        })
    }

    pub fn set_bf16_acts(&mut self, acts: Bf16Acts) {
        for l in self.encoder.linears_mut() {
            l.set_bf16_acts(acts);
        }
        for l in [
            &mut self.up_proj_for_speech,
            &mut self.down_proj_for_speech,
            &mut self.up_proj_for_vision_speech,
            &mut self.down_proj_for_vision_speech,
        ] {
            l.set_bf16_acts(acts);
        }
    }

    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = self.encoder.named_tensors(&format!("{PREFIX}.encoder"));
        for (name, l) in PROJECTIONS.iter().zip([
            &self.up_proj_for_speech,
            &self.down_proj_for_speech,
            &self.up_proj_for_vision_speech,
            &self.down_proj_for_vision_speech,
        ]) {
            out.push((format!("{PREFIX}.{name}.weight"), l.weight().clone()));
            let b = l.bias().expect("the projections have biases");
            out.push((
                format!("{PREFIX}.{name}.bias"),
                Tensor::from_f32(vec![b.len()], b),
            ));
        }
        out
    }

    /// Encoder states `[frames, audio hidden]` through one projection: `[frames, lm hidden]`.
    pub fn project(&self, states: &[f32], projection: Projection) -> Vec<f32> {
        let (up, down) = match projection {
            Projection::Speech => (&self.up_proj_for_speech, &self.down_proj_for_speech),
            Projection::VisionSpeech => (
                &self.up_proj_for_vision_speech,
                &self.down_proj_for_vision_speech,
            ),
        };
        let rows = states.len() / up.in_features;
        let mut mid = vec![0f32; rows * up.out_features];
        up.forward(states, &mut mid);
        gelu_erf(&mut mid);
        let mut out = vec![0f32; rows * down.out_features];
        down.forward(&mid, &mut out);
        out
    }

    /// `[frames, 80]` log-mel features to the prompt rows of one audio, `[ceil(frames/8), lm hidden]`.
    pub fn forward(&self, features: &[f32], projection: Projection) -> Vec<f32> {
        self.project(&self.encoder.forward(features), projection)
    }
}
