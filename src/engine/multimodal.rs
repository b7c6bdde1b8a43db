//! Prompts with images and audio for Phi-4-multimodal: placeholders, the rules for where media
//! may come from, the encoders' rows merged into the prompt, and the adapter and audio
//! projection the input mode routes to (spec §3.7).
//!
//! `<|image_N|>` in the prompt (N from 1, any order, each image once) stands for the N-th image
//! and expands to as many image tokens as the processor gives it; `<|audio_N|>` likewise for the
//! N-th audio (`ceil(frames / 8)` tokens). A prompt with media and no placeholder gets them in
//! front of the text. A literal image or audio token in the text is refused: it would take a
//! medium's place.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use base64::Engine as _;

use super::Engine;
use crate::config::multimodal::Phi4MMConfig;
use crate::media::{self, audio, dynamic_hd, log_mel, LogMel, ProcessedImage, RgbImage, Waveform};
use crate::model::phi4mm::audio_embed::{AudioEmbedding, Projection};
use crate::model::phi4mm::image_embed::ImageEmbedding;
use crate::model::phi4mm::{InputMode, Phi4MMForCausalLM};
use crate::model::{AdapterId, InputEmbeds, Phi3ForCausalLM};
use crate::text::{AudioSource, ImageSource, Message};

/// Encoder outputs of recent media, so that a chat resending its earlier images and audios each
/// turn (the CLI chat, OpenAI clients) runs the encoders once per medium rather than once per
/// turn. Keyed by a 64-bit hash of what the encoder reads (processed pixels or 16 kHz samples,
/// and the projection); least recently used entries go first beyond `max_bytes`.
pub struct EncoderCache {
    entries: std::sync::Mutex<std::collections::VecDeque<(u64, Arc<Vec<f32>>)>>,
    pub max_bytes: usize,
    hits: std::sync::atomic::AtomicUsize,
}

impl EncoderCache {
    pub fn new(max_bytes: usize) -> EncoderCache {
        EncoderCache {
            entries: Default::default(),
            max_bytes,
            hits: Default::default(),
        }
    }

    /// How many lookups found their rows.
    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn get_or_compute(
        &self,
        key: u64,
        compute: impl FnOnce() -> Result<Vec<f32>>,
    ) -> Result<Arc<Vec<f32>>> {
        {
            let mut e = self.entries.lock().expect("cache lock");
            if let Some(i) = e.iter().position(|(k, _)| *k == key) {
                let hit = e.remove(i).expect("found");
                let rows = hit.1.clone();
                e.push_back(hit);
                self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(rows);
            }
        }
        // Computed unlocked: an encoder pass takes seconds, other requests go on meanwhile.
        let rows = Arc::new(compute()?);
        let size = rows.len() * 4;
        if size <= self.max_bytes {
            let mut e = self.entries.lock().expect("cache lock");
            e.retain(|(k, _)| *k != key);
            e.push_back((key, rows.clone()));
            let mut total: usize = e.iter().map(|(_, r)| r.len() * 4).sum();
            while total > self.max_bytes {
                let (_, old) = e.pop_front().expect("non-empty while over");
                total -= old.len() * 4;
            }
        }
        Ok(rows)
    }
}

fn hash_floats(tag: &str, values: &[f32], extra: &[usize]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    tag.hash(&mut h);
    extra.hash(&mut h);
    values.len().hash(&mut h);
    for v in values {
        v.to_bits().hash(&mut h);
    }
    h.finish()
}

/// Encoder rows kept for reuse: a 10-minute recording's 7500 rows of 3072 floats are 92 MB.
pub const DEFAULT_ENCODER_CACHE_BYTES: usize = 512 << 20;

/// The parts of Phi-4-multimodal beyond its decoder.
pub struct Multimodal {
    pub config: Phi4MMConfig,
    pub image_embed: ImageEmbedding,
    pub audio_embed: Option<AudioEmbedding>,
    pub log_mel: LogMel,
    pub limits: MediaLimits,
    /// An adapter folded into the decoder's weights ([`Engine::load_merged`]): only its mode
    /// is served.
    pub merged: Option<AdapterId>,
    pub cache: EncoderCache,
}

impl Multimodal {
    /// Splits a loaded model into the decoder (the engine's `model`) and the rest.
    pub fn split(m: Phi4MMForCausalLM) -> (Phi3ForCausalLM, Multimodal) {
        (
            m.lm,
            Multimodal {
                config: m.config,
                image_embed: m.image_embed,
                audio_embed: m.audio_embed,
                log_mel: LogMel::new(),
                limits: MediaLimits::default(),
                merged: None,
                cache: EncoderCache::new(DEFAULT_ENCODER_CACHE_BYTES),
            },
        )
    }

    /// Refuses a mode other than the merged adapter's, when one is merged.
    pub fn check_mode(&self, mode: InputMode) -> Result<()> {
        match self.merged {
            Some(id) if mode.adapter() != Some(id) => {
                let name = crate::model::phi4mm::ADAPTERS
                    .get(id)
                    .copied()
                    .unwrap_or("an");
                bail!(
                    "this engine has the {name} adapter merged into its weights and serves {name} requests only (this one is {mode:?})"
                )
            }
            _ => Ok(()),
        }
    }

    /// The speech encoder, or an error saying the checkpoint has none.
    pub fn audio_embed(&self) -> Result<&AudioEmbedding> {
        self.audio_embed.as_ref().context(
            "this checkpoint has no speech encoder (no model.embed_tokens_extend.audio_embed.* tensors)",
        )
    }

    /// The prompt rows of one 16 kHz waveform, through `projection`.
    pub fn embed_audio(&self, wave: &Waveform, projection: Projection) -> Result<Vec<f32>> {
        let enc = self.audio_embed()?;
        let features = self.log_mel.features(&wave.samples);
        Ok(enc.forward(&features, projection))
    }

    /// [`Multimodal::embed_audio`] through the [`EncoderCache`].
    pub fn embed_audio_cached(
        &self,
        wave: &Waveform,
        projection: Projection,
    ) -> Result<Arc<Vec<f32>>> {
        let key = hash_floats("audio", &wave.samples, &[projection as usize]);
        self.cache
            .get_or_compute(key, || self.embed_audio(wave, projection))
    }

    /// The image embedding's rows for one processed image, through the [`EncoderCache`].
    pub fn embed_image_cached(&self, img: &ProcessedImage) -> Result<Arc<Vec<f32>>> {
        let l = &img.layout;
        let key = hash_floats(
            "image",
            &img.pixels,
            &[l.grid_w, l.grid_h, l.resized_w, l.resized_h],
        );
        self.cache
            .get_or_compute(key, || self.image_embed.forward(img))
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
    /// Longest audio, in seconds (each audio of a request).
    pub max_audio_seconds: f64,
    pub max_audios: usize,
    /// Largest audio file, in bytes.
    pub max_audio_bytes: usize,
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
            max_audio_seconds: audio::DEFAULT_MAX_SECONDS,
            max_audios: 16,
            max_audio_bytes: 256 << 20,
            allow_remote: false,
            local: LocalMedia::Any,
        }
    }
}

/// What kind of medium a file is, for limits and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Image,
    Audio,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Image => "image",
            Kind::Audio => "audio",
        }
    }

    fn max_bytes(self, limits: &MediaLimits) -> usize {
        match self {
            Kind::Image => limits.max_image_bytes,
            Kind::Audio => limits.max_audio_bytes,
        }
    }
}

/// A request's media made ready for the decoder: the rows that replace its placeholder tokens
/// and the adapter its mode routes to.
#[derive(Debug, Clone)]
pub struct MediaInput {
    pub embeds: InputEmbeds,
    pub adapter: Option<AdapterId>,
    /// The mode the media make (the adapter is its, unless merged into the weights).
    pub mode: InputMode,
    pub images: usize,
    pub audios: usize,
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
        self.mm.as_ref().context(
            "this model takes text only; images and audio need a Phi-4-multimodal checkpoint",
        )
    }

    /// Reads an image from where `src` says, under the engine's [`MediaLimits`].
    pub fn load_image(&self, src: &ImageSource) -> Result<RgbImage> {
        let limits = &self.multimodal()?.limits;
        let (bytes, _) = media_bytes(src, limits, Kind::Image)?;
        media::image::decode(&bytes, limits.max_image_pixels)
    }

    /// Reads an audio from where `src` says and makes it 16 kHz mono, under the engine's
    /// [`MediaLimits`].
    pub fn load_audio(&self, src: &AudioSource) -> Result<Waveform> {
        let mm = self.multimodal()?;
        mm.audio_embed()?;
        let (bytes, ext) = media_bytes(src, &mm.limits, Kind::Audio)?;
        audio::load(&bytes, ext.as_deref(), mm.limits.max_audio_seconds)
    }

    /// [`Engine::encode_with_media`] without audio.
    pub fn encode_with_images(
        &self,
        text: &str,
        images: &[RgbImage],
    ) -> Result<(Vec<u32>, Option<Arc<MediaInput>>)> {
        self.encode_with_media(text, images, &[])
    }

    /// Tokenizes prompt text, expanding `<|image_N|>` and `<|audio_N|>` for `images` and
    /// `audios`, and runs the encoders: the prompt ids and, when there are media, what the
    /// decoder needs for them (rows, adapter).
    pub fn encode_with_media(
        &self,
        text: &str,
        images: &[RgbImage],
        audios: &[Waveform],
    ) -> Result<(Vec<u32>, Option<Arc<MediaInput>>)> {
        let Some(mm) = &self.mm else {
            if !images.is_empty() || !audios.is_empty() {
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
        if audios.len() > mm.limits.max_audios {
            bail!(
                "{} audios in one request; the limit is {}",
                audios.len(),
                mm.limits.max_audios
            );
        }
        if !audios.is_empty() {
            mm.audio_embed()?;
        }
        // Every placeholder of either kind, in text order.
        let mut found: Vec<(std::ops::Range<usize>, Kind, usize)> = Vec::new();
        for (kind, count) in [(Kind::Image, images.len()), (Kind::Audio, audios.len())] {
            let name = kind.name();
            let list = placeholders(text, name);
            let mut seen = vec![false; count];
            for (_, idx) in &list {
                if *idx == 0 || *idx > count {
                    bail!(
                        "the prompt's placeholder <|{name}_{idx}|> has no {name} ({count} given)"
                    );
                }
                if std::mem::replace(&mut seen[idx - 1], true) {
                    bail!("the prompt names <|{name}_{idx}|> more than once");
                }
            }
            if let Some(i) = seen.iter().position(|s| !s) {
                bail!(
                    "{name} {} has no <|{name}_{}|> placeholder in the prompt",
                    i + 1,
                    i + 1
                );
            }
            found.extend(list.into_iter().map(|(r, i)| (r, kind, i - 1)));
        }
        found.sort_by_key(|(r, _, _)| r.start);
        let processed: Vec<ProcessedImage> = images
            .iter()
            .enumerate()
            .map(|(i, img)| {
                dynamic_hd::preprocess(img, mm.limits.max_crops)
                    .with_context(|| format!("image {}", i + 1))
            })
            .collect::<Result<_>>()?;
        let audio_tokens: Vec<usize> = audios
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let n = log_mel::num_tokens(a.samples.len());
                if n == 0 {
                    bail!(
                        "audio {} is too short ({:.1} ms; at least {} ms of sound is needed)",
                        i + 1,
                        a.seconds() * 1000.0,
                        1000 * log_mel::WIN_LENGTH / audio::SAMPLE_RATE as usize
                    );
                }
                Ok(n)
            })
            .collect::<Result<_>>()?;
        let (image_id, audio_id) = (mm.config.vision.image_token_id, mm.config.audio_token_id);
        let mut ids = Vec::new();
        let mut spans = Vec::new(); // (first token, kind, index)
        let mut at = 0;
        let text_ids = |piece: &str, ids: &mut Vec<u32>| -> Result<()> {
            let t = self.tokenizer.encode(piece)?;
            if let Some(bad) = t.iter().find(|&&i| i == image_id || i == audio_id) {
                let name = self.tokenizer.decode(&[*bad], false).unwrap_or_default();
                bail!(
                    "the prompt text contains {name} (token {bad}), which is reserved for image and audio input; write <|image_N|> or <|audio_N|> to place one"
                );
            }
            ids.extend(t);
            Ok(())
        };
        for (range, kind, idx) in &found {
            text_ids(&text[at..range.start], &mut ids)?;
            spans.push((ids.len(), *kind, *idx));
            let (id, n) = match kind {
                Kind::Image => (image_id, processed[*idx].num_tokens()),
                Kind::Audio => (audio_id, audio_tokens[*idx]),
            };
            ids.extend(std::iter::repeat_n(id, n));
            at = range.end;
        }
        text_ids(&text[at..], &mut ids)?;
        let mode = InputMode::of(images.len(), audios.len());
        mm.check_mode(mode)?;
        if images.is_empty() && audios.is_empty() {
            return Ok((ids, None));
        }
        let projection = if images.is_empty() {
            Projection::Speech
        } else {
            Projection::VisionSpeech
        };
        let h = self.model.config.hidden_size;
        let per_image: Vec<Arc<Vec<f32>>> = processed
            .iter()
            .map(|p| mm.embed_image_cached(p))
            .collect::<Result<_>>()?;
        let per_audio: Vec<Arc<Vec<f32>>> = audios
            .iter()
            .map(|a| mm.embed_audio_cached(a, projection))
            .collect::<Result<_>>()?;
        let mut positions = Vec::new();
        let mut rows = Vec::new();
        for (first, kind, idx) in spans {
            let (n, r) = match kind {
                Kind::Image => (processed[idx].num_tokens(), &per_image[idx]),
                Kind::Audio => (audio_tokens[idx], &per_audio[idx]),
            };
            positions.extend(first..first + n);
            rows.extend_from_slice(r);
        }
        let embeds = InputEmbeds::new(positions, rows, h)?;
        Ok((
            ids,
            Some(Arc::new(MediaInput {
                embeds,
                // A merged adapter is in the weights already.
                adapter: mode.adapter().filter(|a| Some(*a) != mm.merged),
                mode,
                images: images.len(),
                audios: audios.len(),
            })),
        ))
    }

    /// Renders a chat whose messages may carry images and audio: each message's placeholders
    /// are renumbered to count across the whole chat, then [`Engine::encode_with_media`].
    pub fn encode_chat(
        &self,
        messages: &[Message],
        tools: Option<&[serde_json::Value]>,
    ) -> Result<(Vec<u32>, Option<Arc<MediaInput>>)> {
        let total_images: usize = messages.iter().map(|m| m.images.len()).sum();
        let total_audios: usize = messages.iter().map(|m| m.audios.len()).sum();
        if total_images == 0 && total_audios == 0 {
            let prompt = self.render_chat(messages, tools)?;
            return self.encode_with_media(&prompt, &[], &[]);
        }
        let mm = self.multimodal()?;
        if total_images > mm.limits.max_images {
            bail!(
                "{total_images} images in one request; the limit is {}",
                mm.limits.max_images
            );
        }
        if total_audios > mm.limits.max_audios {
            bail!(
                "{total_audios} audios in one request; the limit is {}",
                mm.limits.max_audios
            );
        }
        let mut msgs = messages.to_vec();
        let mut images = Vec::with_capacity(total_images);
        let mut audios = Vec::with_capacity(total_audios);
        for m in &mut msgs {
            m.content = renumber(&m.content, &m.role, "image", m.images.len(), images.len())?;
            m.content = renumber(&m.content, &m.role, "audio", m.audios.len(), audios.len())?;
            for (i, src) in m.images.iter().enumerate() {
                images.push(
                    self.load_image(src)
                        .with_context(|| format!("image {} of a {} message", i + 1, m.role))?,
                );
            }
            for (i, src) in m.audios.iter().enumerate() {
                audios.push(
                    self.load_audio(src)
                        .with_context(|| format!("audio {} of a {} message", i + 1, m.role))?,
                );
            }
        }
        let prompt = self.render_chat(&msgs, tools)?;
        self.encode_with_media(&prompt, &images, &audios)
    }
}

/// A message's `<|{kind}_N|>` placeholders (N counting its own `n` media) renumbered to count
/// across the chat, after `offset` earlier ones.
fn renumber(content: &str, role: &str, kind: &str, n: usize, offset: usize) -> Result<String> {
    let mut out = String::with_capacity(content.len());
    let mut at = 0;
    for (range, idx) in placeholders(content, kind) {
        if idx == 0 || idx > n {
            bail!(
                "a {role} message names <|{kind}_{idx}|> but carries {n} {kind}{}",
                if n == 1 { "" } else { "s" }
            );
        }
        out.push_str(&content[at..range.start]);
        out.push_str(&format!("<|{kind}_{}|>", offset + idx));
        at = range.end;
    }
    out.push_str(&content[at..]);
    Ok(out)
}

/// A medium's bytes from where `src` says, under `limits`, with the file type when the source
/// names one (a data: URL's `audio/mp3`, a path's extension).
fn media_bytes(
    src: &crate::text::MediaSource,
    limits: &MediaLimits,
    kind: Kind,
) -> Result<(Vec<u8>, Option<String>)> {
    let (bytes, ext) = match src {
        crate::text::MediaSource::Bytes(b) => (b.as_ref().clone(), None),
        crate::text::MediaSource::Url(url) => (fetch(url, limits, kind)?, extension_of(url)),
    };
    let max = kind.max_bytes(limits);
    if bytes.len() > max {
        bail!(
            "{} of {} bytes is larger than the limit of {max} bytes",
            kind.name(),
            bytes.len()
        );
    }
    Ok((bytes, ext))
}

/// `data:audio/mp3;base64,…` → "mp3"; `…/clip.flac` → "flac".
fn extension_of(url: &str) -> Option<String> {
    if let Some(rest) = url.strip_prefix("data:") {
        let mime = rest.split([';', ',']).next()?;
        return mime
            .split('/')
            .nth(1)
            .map(|s| s.trim_start_matches("x-").to_owned());
    }
    let name = url.rsplit('/').next()?;
    let ext = name.rsplit_once('.')?.1;
    (!ext.is_empty() && ext.len() <= 5).then(|| ext.to_ascii_lowercase())
}

/// The bytes behind a medium's URL, under `limits`.
fn fetch(url: &str, limits: &MediaLimits, kind: Kind) -> Result<Vec<u8>> {
    let (what, max) = (kind.name(), kind.max_bytes(limits));
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .context("a data: URL needs a comma before its data")?;
        if !meta.ends_with(";base64") {
            bail!("only base64 data: URLs are supported for {what}");
        }
        let max_b64 = max.div_ceil(3) * 4 + 4;
        if data.len() > max_b64 {
            bail!(
                "{what} data of about {} bytes is larger than the limit of {max} bytes",
                data.len() / 4 * 3,
            );
        }
        return base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .context("the data: URL is not valid base64");
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        if !limits.allow_remote {
            bail!("{what} URLs are not fetched unless the server runs with --allow-remote-media; send the {what} as a data: URL");
        }
        return fetch_remote(url, max, what);
    }
    let path = Path::new(url.strip_prefix("file://").unwrap_or(url));
    if url.contains("://") && !url.starts_with("file://") {
        bail!("unsupported {what} URL scheme in {url:?} (data:, http(s)://, file:// or a path)");
    }
    match &limits.local {
        LocalMedia::Denied => bail!(
            "local {what} files are not read unless the server runs with --allowed-local-media-path DIR"
        ),
        LocalMedia::Under(root) => {
            let real = path
                .canonicalize()
                .with_context(|| format!("{what} file {}", path.display()))?;
            let root = root
                .canonicalize()
                .with_context(|| format!("media directory {}", root.display()))?;
            if !real.starts_with(&root) {
                bail!(
                    "{what} file {} is outside the allowed media directory",
                    path.display()
                );
            }
            read_limited(&real, max, what)
        }
        LocalMedia::Any => read_limited(path, max, what),
    }
}

fn read_limited(path: &Path, max: usize, what: &str) -> Result<Vec<u8>> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("{what} file {}", path.display()))?;
    if meta.len() > max as u64 {
        bail!(
            "{what} file {} has {} bytes; the limit is {max}",
            path.display(),
            meta.len()
        );
    }
    std::fs::read(path).with_context(|| format!("reading {what} file {}", path.display()))
}

fn fetch_remote(url: &str, max: usize, what: &str) -> Result<Vec<u8>> {
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
        bail!("the {what} at {url} is larger than the limit of {max} bytes");
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
        assert_eq!(placeholders("x<|audio_3|>", "audio"), vec![(1..12, 3)]);
    }

    #[test]
    fn file_types_come_from_data_urls_and_paths() {
        assert_eq!(
            extension_of("data:audio/mp3;base64,AAAA").as_deref(),
            Some("mp3")
        );
        assert_eq!(
            extension_of("data:audio/x-wav;base64,AAAA").as_deref(),
            Some("wav")
        );
        assert_eq!(extension_of("/tmp/a.b/clip.FLAC").as_deref(), Some("flac"));
        assert_eq!(extension_of("https://x.org/speech").as_deref(), None);
    }
}
