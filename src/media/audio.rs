//! Audio files to the 16 kHz mono waveform the speech encoder's features are made from.
//!
//! `symphonia` demuxes and decodes (WAV with 8/16/24/32-bit PCM or float, FLAC, MP3, OGG/Vorbis,
//! M4A/AAC, MKV/WebM audio, AIFF); channels are averaged to mono (what Microsoft's processor does);
//! any other rate is converted to 16 kHz with `rubato`'s FFT resampler, a band-limited
//! (windowed-sinc) converter. The references cannot help here: the remote processor decimates by
//! an integer factor (`fs // 16000`, so 44.1 kHz comes out at 22.05 kHz and aliased) and
//! transformers 5.25 refuses anything but 16 kHz mono (spec §3.5, P12).

use std::io::Cursor;

use anyhow::{bail, Context, Result};
use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler, WindowFunction};
use symphonia::core::codecs::audio::AudioDecoderOptions;
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, TrackType};
use symphonia::core::io::{MediaSourceStream, MediaSourceStreamOptions};
use symphonia::core::meta::MetadataOptions;

/// The rate the feature extractor works at.
pub const SAMPLE_RATE: u32 = 16_000;

/// The containers and codecs [`decode`] reads, by the names users know.
pub const SUPPORTED: &str = "WAV (PCM 8/16/24/32-bit, float), FLAC, MP3, OGG/Vorbis, M4A/AAC, \
                             MKV/WebM (Vorbis, FLAC, AAC), AIFF";

/// Longest audio accepted by default, in seconds (one hour).
pub const DEFAULT_MAX_SECONDS: f64 = 3600.0;

/// Lowest input rate accepted: below it there is no speech band left to resample.
pub const MIN_SOURCE_RATE: u32 = 4_000;

/// Gapless trimming off: it cuts encoder delay and padding by the container's sample counts,
/// which some encoders write wrongly (FFmpeg's Vorbis encoder: all but 2 of 20 packets trimmed to
/// nothing). Untrimmed, a file keeps a few milliseconds of codec silence, which speech does not
/// mind; trimmed wrongly, it loses its words.
fn decoder_options() -> AudioDecoderOptions {
    let mut o = AudioDecoderOptions::default();
    o.gapless = false;
    o
}

/// A decoded file before resampling: interleaved samples in [-1, 1].
#[derive(Clone, Debug)]
pub struct Decoded {
    pub rate: u32,
    pub channels: usize,
    pub interleaved: Vec<f32>,
}

impl Decoded {
    pub fn frames(&self) -> usize {
        self.interleaved.len() / self.channels.max(1)
    }

    pub fn seconds(&self) -> f64 {
        self.frames() as f64 / self.rate as f64
    }

    /// The channel mean per frame.
    pub fn mono(&self) -> Vec<f32> {
        mix_down(&self.interleaved, self.channels)
    }
}

/// Mono 16 kHz samples, the extractor's input.
#[derive(Clone, Debug, PartialEq)]
pub struct Waveform {
    pub samples: Vec<f32>,
}

impl Waveform {
    pub fn seconds(&self) -> f64 {
        self.samples.len() as f64 / SAMPLE_RATE as f64
    }
}

/// Averages interleaved channels into one.
pub fn mix_down(interleaved: &[f32], channels: usize) -> Vec<f32> {
    if channels <= 1 {
        return interleaved.to_vec();
    }
    let inv = 1.0 / channels as f32;
    interleaved
        .chunks_exact(channels)
        .map(|frame| frame.iter().sum::<f32>() * inv)
        .collect()
}

/// Decodes an audio file's bytes (any supported container; `extension` is only a hint, the
/// content decides). Refuses empty, unknown, corrupt and over-long input with a message that
/// says which.
pub fn decode(bytes: &[u8], extension: Option<&str>, max_seconds: f64) -> Result<Decoded> {
    if bytes.is_empty() {
        bail!("the audio is empty (0 bytes)");
    }
    let mut hint = Hint::new();
    if let Some(ext) = extension {
        hint.with_extension(ext);
    }
    let source = MediaSourceStream::new(
        Box::new(Cursor::new(bytes.to_vec())),
        MediaSourceStreamOptions::default(),
    );
    let mut format = symphonia::default::get_probe()
        .probe(
            &hint,
            source,
            FormatOptions::default(),
            MetadataOptions::default(),
        )
        .map_err(|e| match e {
            SymphoniaError::Unsupported(_) => {
                anyhow::anyhow!("not a supported audio file (supported: {SUPPORTED})")
            }
            e => anyhow::anyhow!("the audio file could not be read: {e}"),
        })?;
    let track = format
        .default_track(TrackType::Audio)
        .context("the file has no audio track")?;
    let track_id = track.id;
    let params = track
        .codec_params
        .as_ref()
        .and_then(|p| p.audio())
        .context("the file's audio track has no codec parameters")?
        .clone();
    let mut decoder = symphonia::default::get_codecs()
        .make_audio_decoder(&params, &decoder_options())
        .map_err(|e| anyhow::anyhow!("the audio codec is not supported ({e})"))?;

    let mut interleaved: Vec<f32> = Vec::new();
    let mut rate = params.sample_rate.unwrap_or(0);
    let mut channels = params.channels.as_ref().map(|c| c.count()).unwrap_or(0);
    let mut chunk: Vec<f32> = Vec::new();
    let mut bad_packets = 0usize;
    loop {
        let packet = match format.next_packet() {
            Ok(Some(p)) => p,
            Ok(None) => break,
            // A file cut short ends where its data ends; what was decoded is kept.
            Err(SymphoniaError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break
            }
            Err(e) => bail!("the audio file is corrupt: {e}"),
        };
        if packet.track_id != track_id {
            continue;
        }
        let buf = match decoder.decode(&packet) {
            Ok(buf) => buf,
            // Lossy streams may carry a damaged frame; players skip it, and so do we, but a file
            // of nothing else is corrupt.
            Err(SymphoniaError::DecodeError(_)) => {
                bad_packets += 1;
                continue;
            }
            Err(e) => bail!("the audio could not be decoded: {e}"),
        };
        let spec = buf.spec();
        if rate == 0 {
            rate = spec.rate();
        }
        let c = spec.channels().count();
        if channels == 0 {
            channels = c;
        }
        if c != channels || spec.rate() != rate {
            bail!("the audio changes its channel count or sample rate mid-stream; not supported");
        }
        chunk.resize(buf.samples_interleaved(), 0.0);
        buf.copy_to_slice_interleaved(&mut chunk);
        interleaved.extend_from_slice(&chunk);
        if channels > 0
            && rate > 0
            && (interleaved.len() / channels) as f64 > max_seconds * rate as f64
        {
            bail!("the audio is longer than the limit of {max_seconds} s");
        }
    }
    if rate == 0 || channels == 0 {
        bail!("the audio file does not say its sample rate or channels");
    }
    if interleaved.is_empty() {
        if bad_packets > 0 {
            bail!("the audio file is corrupt: none of its {bad_packets} packets decoded");
        }
        bail!("the audio holds no samples");
    }
    if rate < MIN_SOURCE_RATE {
        bail!(
            "audio sampled at {rate} Hz is below the lowest supported rate ({MIN_SOURCE_RATE} Hz)"
        );
    }
    if let Some(bad) = interleaved.iter().find(|v| !v.is_finite()) {
        bail!("the audio holds a non-finite sample ({bad})");
    }
    Ok(Decoded {
        rate,
        channels,
        interleaved,
    })
}

/// The resampler's settings: rubato's synchronous FFT resampler (overlap-add of windowed FFT
/// blocks; the anti-aliasing low-pass is a windowed sinc, Blackman-Harris², as long as the block).
/// One sub-chunk of 4096 input frames gives the longest filter, so the sharpest edge: rubato puts
/// the cutoff at 7.84–7.97 kHz for 22.05–48 kHz input (3.99 kHz for 8 kHz input, whose band ends
/// there), keeping 0–7 kHz within 0.5 % and removing tones above 8.5 kHz to below −50 dB
/// (tests/speech.rs measures both). The block's delay is irrelevant offline; `process_all`
/// trims it, so output sample k is at time k / 16000 (within half a sample: at 96 kHz the
/// output leads by 0.5; tested sample for sample at 9 rates). Other chunk sizes are not safe:
/// rubato 5.1 then shifts some ratios by hundreds of samples (2048 at 44.1 kHz: −477, 26 dB).
const RESAMPLE_CHUNK: usize = 4096;
const RESAMPLE_SUB_CHUNKS: usize = 1;

/// Converts mono samples from `rate` to 16 kHz (a copy when already 16 kHz).
pub fn resample_to_16k(samples: &[f32], rate: u32) -> Result<Vec<f32>> {
    if rate == SAMPLE_RATE || samples.is_empty() {
        return Ok(samples.to_vec());
    }
    let mut resampler = Fft::<f32>::new_custom(
        rate as usize,
        SAMPLE_RATE as usize,
        RESAMPLE_CHUNK,
        RESAMPLE_SUB_CHUNKS,
        1,
        WindowFunction::BlackmanHarris2,
        FixedSync::Input,
    )
    .with_context(|| format!("no resampler from {rate} Hz to {SAMPLE_RATE} Hz"))?;
    let input = InterleavedSlice::new(samples, 1, samples.len())
        .map_err(|e| anyhow::anyhow!("resampler input: {e:?}"))?;
    let out = resampler
        .process_all(&input, samples.len(), None)
        .map_err(|e| anyhow::anyhow!("resampling failed: {e}"))?;
    Ok(out.take_data())
}

/// File bytes to the extractor's input: decode, mix down, resample.
pub fn load(bytes: &[u8], extension: Option<&str>, max_seconds: f64) -> Result<Waveform> {
    let decoded = decode(bytes, extension, max_seconds)?;
    let samples = resample_to_16k(&decoded.mono(), decoded.rate)?;
    Ok(Waveform { samples })
}
