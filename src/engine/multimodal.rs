//! Prompts with images for Phi-4-multimodal: placeholders, the rules for where an image may
//! come from, the vision tower's rows merged into the prompt, and the adapter the input mode
//! routes to (spec §3.7).
//!
//! `<|image_N|>` in the prompt (N from 1, any order, each image once) stands for the N-th image
//! and expands to as many image tokens as the processor gives it; a prompt with images and no
//! placeholder gets them in front of the text. A literal image or audio token in the text is
//! refused: it would take an image's place.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use base64::Engine as _;

use super::Engine;
use crate::config::multimodal::Phi4MMConfig;
use crate::media::{self, dynamic_hd, ProcessedImage, RgbImage};
use crate::model::phi4mm::image_embed::ImageEmbedding;
use crate::model::phi4mm::{InputMode, Phi4MMForCausalLM};
use crate::model::{AdapterId, InputEmbeds, Phi3ForCausalLM};
use crate::text::{ImageSource, Message};

/// The parts of Phi-4-multimodal beyond its decoder.
pub struct Multimodal {
    pub config: Phi4MMConfig,
    pub image_embed: ImageEmbedding,
    pub limits: MediaLimits,
}

impl Multimodal {
    /// Splits a loaded model into the decoder (the engine's `model`) and the rest.
    pub fn split(m: Phi4MMForCausalLM) -> (Phi3ForCausalLM, Multimodal) {
        (
            m.lm,
            Multimodal {
                config: m.config,
                image_embed: m.image_embed,
                limits: MediaLimits::default(),
            },
        )
    }
}

/// Which local files an image may be read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalMedia {
    /// Any path (the CLI and the library: the user names their own files).
    Any,
    /// Only files under this directory (the server's `--allowed-local-media-path`).
    Under(PathBuf),
    /// None (the server's default).
    Denied,
}

/// Limits on the media of one request.
#[derive(Debug, Clone)]
pub struct MediaLimits {
    pub max_image_pixels: u64,
    pub max_images: usize,
    /// `dynamic_hd`: the most crops an image is cut into.
    pub max_crops: usize,
    /// Largest image file, in bytes.
    pub max_image_bytes: usize,
    pub allow_remote: bool,
    pub local: LocalMedia,
}

impl Default for MediaLimits {
    fn default() -> MediaLimits {
        MediaLimits {
            max_image_pixels: media::image::DEFAULT_MAX_PIXELS,
            max_images: 16,
            max_crops: dynamic_hd::DEFAULT_MAX_CROPS,
            max_image_bytes: 64 << 20,
            allow_remote: false,
            local: LocalMedia::Any,
        }
    }
}

/// A request's media made ready for the decoder: the rows that replace its placeholder tokens
/// and the adapter its mode routes to.
#[derive(Debug, Clone)]
pub struct MediaInput {
    pub embeds: InputEmbeds,
    pub adapter: Option<AdapterId>,
    pub images: usize,
}

/// A placeholder found in prompt text: byte range and the 1-based index it names.
fn placeholders(text: &str, kind: &str) -> Vec<(std::ops::Range<usize>, usize)> {
    let open = format!("<|{kind}_");
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = text[from..].find(&open) {
        let start = from + i;
        let digits = &text[start + open.len()..];
        let n = digits.bytes().take_while(u8::is_ascii_digit).count();
        if n > 0 && digits[n..].starts_with("|>") {
            if let Ok(idx) = digits[..n].parse::<usize>() {
                let end = start + open.len() + n + 2;
                out.push((start..end, idx));
                from = end;
                continue;
            }
        }
        from = start + open.len();
    }
    out
}

impl Engine {
    /// The multimodal parts, or an error saying this model takes text only.
    pub fn multimodal(&self) -> Result<&Multimodal> {
        self.mm
            .as_ref()
            .context("this model takes text only; images need a Phi-4-multimodal checkpoint")
    }

    /// Reads an image from where `src` says, under the engine's [`MediaLimits`].
    pub fn load_image(&self, src: &ImageSource) -> Result<RgbImage> {
        let limits = &self.multimodal()?.limits;
        let bytes = match src {
            ImageSource::Bytes(b) => b.as_ref().clone(),
            ImageSource::Url(url) => fetch(url, limits)?,
        };
        if bytes.len() > limits.max_image_bytes {
            bail!(
                "image of {} bytes is larger than the limit of {} bytes",
                bytes.len(),
                limits.max_image_bytes
            );
        }
        media::image::decode(&bytes, limits.max_image_pixels)
    }

    /// Tokenizes prompt text, expanding `<|image_N|>` for `images`, and runs the vision tower:
    /// the prompt ids and, when there are images, what the decoder needs for them.
    pub fn encode_with_images(
        &self,
        text: &str,
        images: &[RgbImage],
    ) -> Result<(Vec<u32>, Option<Arc<MediaInput>>)> {
        let Some(mm) = &self.mm else {
            if !images.is_empty() {
                self.multimodal()?;
            }
            return Ok((self.tokenizer.encode(text)?, None));
        };
        if images.len() > mm.limits.max_images {
            bail!(
                "{} images in one request; the limit is {}",
                images.len(),
                mm.limits.max_images
            );
        }
        let found = placeholders(text, "image");
        let mut seen = vec![false; images.len()];
        for (_, idx) in &found {
            if *idx == 0 || *idx > images.len() {
                bail!(
                    "the prompt's placeholder <|image_{idx}|> has no image ({} given)",
                    images.len()
                );
            }
            if std::mem::replace(&mut seen[idx - 1], true) {
                bail!("the prompt names <|image_{idx}|> more than once");
            }
        }
        if let Some(i) = seen.iter().position(|s| !s) {
            bail!(
                "image {} has no <|image_{}|> placeholder in the prompt",
                i + 1,
                i + 1
            );
        }
        let processed: Vec<ProcessedImage> = images
            .iter()
            .enumerate()
            .map(|(i, img)| {
                dynamic_hd::preprocess(img, mm.limits.max_crops)
                    .with_context(|| format!("image {}", i + 1))
            })
            .collect::<Result<_>>()?;
        let (image_id, audio_id) = (mm.config.vision.image_token_id, mm.config.audio_token_id);
        let mut ids = Vec::new();
        let mut spans = Vec::new(); // (first token, image index)
        let mut at = 0;
        let text_ids = |piece: &str, ids: &mut Vec<u32>| -> Result<()> {
            let t = self.tokenizer.encode(piece)?;
            if let Some(bad) = t.iter().find(|&&i| i == image_id || i == audio_id) {
                let name = self.tokenizer.decode(&[*bad], false).unwrap_or_default();
                bail!(
                    "the prompt text contains {name} (token {bad}), which is reserved for image and audio input; write <|image_N|> to place an image"
                );
            }
            ids.extend(t);
            Ok(())
        };
        for (range, idx) in &found {
            text_ids(&text[at..range.start], &mut ids)?;
            spans.push((ids.len(), idx - 1));
            ids.extend(std::iter::repeat_n(
                image_id,
                processed[idx - 1].num_tokens(),
            ));
            at = range.end;
        }
        text_ids(&text[at..], &mut ids)?;
        if images.is_empty() {
            return Ok((ids, None));
        }
        let h = self.model.config.hidden_size;
        let per_image: Vec<Vec<f32>> = processed
            .iter()
            .map(|p| mm.image_embed.forward(p))
            .collect::<Result<_>>()?;
        let mut positions = Vec::new();
        let mut rows = Vec::new();
        for (first, img) in spans {
            let n = processed[img].num_tokens();
            positions.extend(first..first + n);
            rows.extend_from_slice(&per_image[img]);
        }
        let embeds = InputEmbeds::new(positions, rows, h)?;
        Ok((
            ids,
            Some(Arc::new(MediaInput {
                embeds,
                adapter: InputMode::of(images.len(), 0).adapter(),
                images: images.len(),
            })),
        ))
    }

    /// Renders a chat whose messages may carry images: each message's placeholders are
    /// renumbered to count across the whole chat, then [`Engine::encode_with_images`].
    pub fn encode_chat(
        &self,
        messages: &[Message],
        tools: Option<&[serde_json::Value]>,
    ) -> Result<(Vec<u32>, Option<Arc<MediaInput>>)> {
        let total: usize = messages.iter().map(|m| m.images.len()).sum();
        if total == 0 {
            let prompt = self.render_chat(messages, tools)?;
            return self.encode_with_images(&prompt, &[]);
        }
        let mm = self.multimodal()?;
        if total > mm.limits.max_images {
            bail!(
                "{total} images in one request; the limit is {}",
                mm.limits.max_images
            );
        }
        let mut msgs = messages.to_vec();
        let mut images = Vec::with_capacity(total);
        for m in &mut msgs {
            let offset = images.len();
            let n = m.images.len();
            let mut out = String::with_capacity(m.content.len());
            let mut at = 0;
            for (range, idx) in placeholders(&m.content, "image") {
                if idx == 0 || idx > n {
                    bail!(
                        "a {} message names <|image_{idx}|> but carries {n} image{}",
                        m.role,
                        if n == 1 { "" } else { "s" }
                    );
                }
                out.push_str(&m.content[at..range.start]);
                out.push_str(&format!("<|image_{}|>", offset + idx));
                at = range.end;
            }
            out.push_str(&m.content[at..]);
            m.content = out;
            for (i, src) in m.images.iter().enumerate() {
                images.push(
                    self.load_image(src)
                        .with_context(|| format!("image {} of a {} message", i + 1, m.role))?,
                );
            }
        }
        let prompt = self.render_chat(&msgs, tools)?;
        self.encode_with_images(&prompt, &images)
    }
}

/// The bytes behind an image URL, under `limits`.
fn fetch(url: &str, limits: &MediaLimits) -> Result<Vec<u8>> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .context("a data: URL needs a comma before its data")?;
        if !meta.ends_with(";base64") {
            bail!("only base64 data: URLs are supported for images");
        }
        let max_b64 = limits.max_image_bytes.div_ceil(3) * 4 + 4;
        if data.len() > max_b64 {
            bail!(
                "image data of about {} bytes is larger than the limit of {} bytes",
                data.len() / 4 * 3,
                limits.max_image_bytes
            );
        }
        return base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .context("the data: URL is not valid base64");
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        if !limits.allow_remote {
            bail!("image URLs are not fetched unless the server runs with --allow-remote-media; send the image as a data: URL");
        }
        return fetch_remote(url, limits.max_image_bytes);
    }
    let path = Path::new(url.strip_prefix("file://").unwrap_or(url));
    if url.contains("://") && !url.starts_with("file://") {
        bail!("unsupported image URL scheme in {url:?} (data:, http(s)://, file:// or a path)");
    }
    match &limits.local {
        LocalMedia::Denied => bail!(
            "local image files are not read unless the server runs with --allowed-local-media-path DIR"
        ),
        LocalMedia::Under(root) => {
            let real = path
                .canonicalize()
                .with_context(|| format!("image file {}", path.display()))?;
            let root = root
                .canonicalize()
                .with_context(|| format!("media directory {}", root.display()))?;
            if !real.starts_with(&root) {
                bail!(
                    "image file {} is outside the allowed media directory",
                    path.display()
                );
            }
            read_limited(&real, limits.max_image_bytes)
        }
        LocalMedia::Any => read_limited(path, limits.max_image_bytes),
    }
}

fn read_limited(path: &Path, max: usize) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).with_context(|| format!("image file {}", path.display()))?;
    if meta.len() > max as u64 {
        bail!(
            "image file {} has {} bytes; the limit is {max}",
            path.display(),
            meta.len()
        );
    }
    std::fs::read(path).with_context(|| format!("reading image file {}", path.display()))
}

fn fetch_remote(url: &str, max: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let resp = ureq::get(url)
        .timeout(std::time::Duration::from_secs(30))
        .call()
        .with_context(|| format!("fetching {url}"))?;
    let mut bytes = Vec::new();
    resp.into_reader()
        .take(max as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {url}"))?;
    if bytes.len() > max {
        bail!("the image at {url} is larger than the limit of {max} bytes");
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_found_with_their_indices() {
        let p = placeholders("a<|image_2|>b<|image_|><|image_10|><|audio_1|>", "image");
        assert_eq!(p, vec![(1..12, 2), (23..35, 10)]);
        assert!(placeholders("<|image_x|>", "image").is_empty());
    }
}
