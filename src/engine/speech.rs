//! Speech tasks on whole recordings: transcription, translation and summaries, with the prompts
//! Phi-4-multimodal was trained on, long audio cut into windows at its quietest points, and the
//! output formats of OpenAI's audio API (text, json, verbose_json with segments, srt, vtt).
//!
//! The speech encoder sees at most 500 frames (40 s) at once; the reference runs longer audio as
//! independent 40 s pieces cut wherever the count falls, mid-word included. For transcription and
//! translation we cut it ourselves first: windows of at most `window_seconds`, each ending at the
//! lowest-energy 100 ms of its last third, transcribed (up to 8 decoding together) and joined.
//! The cuts are the segment times. A summary needs the whole recording at once and is not cut.

use std::ops::Range;

use anyhow::{bail, Result};
use serde_json::{json, Value};

use super::{Engine, Generation, Request};
use crate::media::{audio::SAMPLE_RATE, Waveform};
use crate::text::Message;
use crate::SamplingParams;

/// The longest window: the encoder's 500 frames of 80 ms.
pub const MAX_WINDOW_SECONDS: f64 = 40.0;
/// Default window length (Whisper's, well inside the encoder's).
pub const DEFAULT_WINDOW_SECONDS: f64 = 30.0;
/// Windows decoded together at most: 8 KV caches of a 30 s window's ~500 positions (f32:
/// ~130 MB each at Phi-4-mini's size).
pub const MAX_PARALLEL_WINDOWS: usize = 8;

/// What to make of the audio.
#[derive(Debug, Clone, PartialEq)]
pub enum SpeechTask {
    Transcribe,
    /// Into `language` (a name such as "French"; ISO codes are turned into names).
    Translate {
        language: String,
    },
    Summarize,
}

/// Phi-4-multimodal's speech languages by ISO 639-1 code (model card).
const LANGUAGES: [(&str, &str); 8] = [
    ("en", "English"),
    ("zh", "Chinese"),
    ("de", "German"),
    ("fr", "French"),
    ("it", "Italian"),
    ("ja", "Japanese"),
    ("es", "Spanish"),
    ("pt", "Portuguese"),
];

/// A language name for a code or a name (`fr`, `FR`, `french` → "French"); anything else is
/// taken as written.
pub fn language_name(s: &str) -> String {
    let t = s.trim();
    LANGUAGES
        .iter()
        .find(|(code, name)| code.eq_ignore_ascii_case(t) || name.eq_ignore_ascii_case(t))
        .map_or_else(|| t.to_owned(), |(_, name)| (*name).to_owned())
}

/// The separator the translation prompt asks for between transcript and translation.
const SEP: &str = "<sep>";

impl SpeechTask {
    /// The instruction that follows the audio in the user turn (the model card's wording).
    pub fn instruction(&self) -> String {
        match self {
            SpeechTask::Transcribe => "Transcribe the audio clip into text.".into(),
            SpeechTask::Translate { language } => format!(
                "Transcribe the audio to text, and then translate the audio to {}. Use {SEP} as a separator between the original transcript and the translation.",
                language_name(language)
            ),
            SpeechTask::Summarize => "Summarize the audio clip.".into(),
        }
    }

    /// Whether long audio is cut into windows (a summary needs all of it).
    pub fn windowed(&self) -> bool {
        !matches!(self, SpeechTask::Summarize)
    }

    /// The answer in a window's output: for a translation, the part after the separator.
    fn answer(&self, out: &str) -> String {
        let out = out.trim();
        match self {
            SpeechTask::Translate { .. } => out
                .split_once(SEP)
                .map_or(out, |(_, t)| t)
                .trim()
                .to_owned(),
            _ => out.to_owned(),
        }
    }

    /// OpenAI's `task` field of verbose_json.
    pub fn name(&self) -> &'static str {
        match self {
            SpeechTask::Transcribe => "transcribe",
            SpeechTask::Translate { .. } => "translate",
            SpeechTask::Summarize => "summarize",
        }
    }
}

#[derive(Debug, Clone)]
pub struct SpeechOptions {
    pub task: SpeechTask,
    /// Extra text after the instruction (OpenAI's `prompt`: names, spellings, context).
    pub prompt: Option<String>,
    /// Sampling per window (greedy by default; `max_tokens` per window).
    pub params: SamplingParams,
    pub window_seconds: f64,
    /// The audio's language when the caller knows it (reported, not needed by the model).
    pub language: Option<String>,
}

impl SpeechOptions {
    pub fn new(task: SpeechTask) -> SpeechOptions {
        SpeechOptions {
            task,
            prompt: None,
            params: SamplingParams::greedy(1024),
            window_seconds: DEFAULT_WINDOW_SECONDS,
            language: None,
        }
    }
}

/// One window's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub id: usize,
    /// Seconds from the start of the recording.
    pub start: f64,
    pub end: f64,
    pub text: String,
    /// The generated ids (the end token excluded).
    pub tokens: Vec<u32>,
    /// Mean log-probability of the generated tokens.
    pub avg_logprob: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Transcript {
    pub task: &'static str,
    pub language: Option<String>,
    /// Seconds of audio.
    pub duration: f64,
    pub text: String,
    pub segments: Vec<Segment>,
    pub temperature: f32,
}

/// What running one window's request gave.
#[derive(Debug, Clone, Default)]
pub struct WindowOutput {
    pub tokens: Vec<u32>,
    pub text: String,
    pub logprobs: Vec<f32>,
}

/// Cuts `n` samples into windows of at most `window` samples, each (but the last) ending at the
/// quietest 100 ms (lowest mean square, 10 ms steps) in the last third of its span.
pub fn windows(samples: &[f32], window: usize) -> Vec<Range<usize>> {
    let n = samples.len();
    let window = window.max(1);
    if n <= window {
        return std::iter::once(0..n).collect();
    }
    let mut energy = Vec::with_capacity(n + 1);
    energy.push(0f64);
    let mut acc = 0f64;
    for &s in samples {
        acc += f64::from(s) * f64::from(s);
        energy.push(acc);
    }
    let frame = (SAMPLE_RATE as usize / 10).min(window / 3).max(1);
    let hop = (SAMPLE_RATE as usize / 100).max(1);
    let mut out = Vec::new();
    let mut start = 0;
    while n - start > window {
        let lo = start + window * 2 / 3;
        let hi = start + window; // the cut may fall at hi at the latest
        let mut best = (f64::INFINITY, hi);
        let mut f = lo;
        while f + frame <= hi {
            let e = energy[f + frame] - energy[f];
            if e < best.0 {
                best = (e, f + frame / 2);
            }
            f += hop;
        }
        let cut = best.1.clamp(start + 1, hi);
        out.push(start..cut);
        start = cut;
    }
    out.push(start..n);
    out
}

impl Engine {
    /// The request for one window: a user turn holding the audio, the task's instruction and the
    /// caller's prompt, rendered by the chat template.
    pub fn speech_request(&self, wave: &Waveform, opts: &SpeechOptions) -> Result<Request> {
        let mut text = format!("<|audio_1|>{}", opts.task.instruction());
        if let Some(p) = opts.prompt.as_deref().filter(|p| !p.trim().is_empty()) {
            text.push(' ');
            text.push_str(p.trim());
        }
        let prompt = self.render_chat(&[Message::new("user", &text)], None)?;
        let (ids, media) = self.encode_with_media(&prompt, &[], std::slice::from_ref(wave))?;
        Ok(Request {
            prompt: ids,
            params: opts.params.clone(),
            media,
            logprobs: Some(0),
            ..Default::default()
        })
    }

    /// Runs `opts.task` over a recording: its windows' requests go to `run` in groups of up to
    /// [`MAX_PARALLEL_WINDOWS`], which decodes each group together (the server hands them to its
    /// batcher; [`Engine::transcribe`] steps them here). Decode reads every weight once per
    /// step whatever the batch, so a long recording's windows cost little more than one.
    pub fn transcribe_with(
        &self,
        wave: &Waveform,
        opts: &SpeechOptions,
        run: &mut dyn FnMut(Vec<Request>) -> Result<Vec<WindowOutput>>,
    ) -> Result<Transcript> {
        if !(1.0..=MAX_WINDOW_SECONDS).contains(&opts.window_seconds) {
            bail!(
                "the window must be between 1 and {MAX_WINDOW_SECONDS} seconds, not {}",
                opts.window_seconds
            );
        }
        let rate = SAMPLE_RATE as f64;
        let mut spans = if opts.task.windowed() {
            windows(&wave.samples, (opts.window_seconds * rate) as usize)
        } else {
            std::iter::once(0..wave.samples.len()).collect()
        };
        // A tail too short for one feature frame carries no speech.
        if spans.len() > 1
            && crate::media::log_mel::num_tokens(spans.last().map_or(0, |s| s.len())) == 0
        {
            spans.pop();
        }
        let mut segments = Vec::with_capacity(spans.len());
        for group in spans.chunks(MAX_PARALLEL_WINDOWS) {
            let requests = group
                .iter()
                .map(|span| {
                    let piece = Waveform {
                        samples: wave.samples[span.clone()].to_vec(),
                    };
                    self.speech_request(&piece, opts)
                })
                .collect::<Result<Vec<_>>>()?;
            let outs = run(requests)?;
            if outs.len() != group.len() {
                bail!("{} window results for {} windows", outs.len(), group.len());
            }
            for (span, out) in group.iter().zip(outs) {
                let mut tokens = out.tokens;
                if tokens.last().is_some_and(|t| self.stop_ids.contains(t)) {
                    tokens.pop();
                }
                let avg_logprob = if out.logprobs.is_empty() {
                    0.0
                } else {
                    out.logprobs.iter().map(|&l| f64::from(l)).sum::<f64>()
                        / out.logprobs.len() as f64
                };
                segments.push(Segment {
                    id: segments.len(),
                    start: span.start as f64 / rate,
                    end: span.end as f64 / rate,
                    text: opts.task.answer(&out.text),
                    tokens,
                    avg_logprob,
                });
            }
        }
        let text = segments
            .iter()
            .map(|s| s.text.as_str())
            .filter(|t| !t.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        Ok(Transcript {
            task: opts.task.name(),
            language: opts.language.clone(),
            duration: wave.seconds(),
            text,
            segments,
            temperature: opts.params.temperature,
        })
    }

    /// [`Engine::transcribe_with`], generating on this thread: each group's windows prefilled
    /// one by one, then decoded together in batched steps.
    pub fn transcribe(&self, wave: &Waveform, opts: &SpeechOptions) -> Result<Transcript> {
        self.transcribe_with(wave, opts, &mut |requests| self.decode_together(requests))
    }

    /// Runs requests to the end, decoding them in one batch.
    fn decode_together(&self, requests: Vec<Request>) -> Result<Vec<WindowOutput>> {
        let mut gens = Vec::with_capacity(requests.len());
        let mut logits = Vec::with_capacity(requests.len());
        for r in requests {
            let (g, l) = self.begin(r)?;
            gens.push(g);
            logits.push(l);
        }
        let mut outs = vec![WindowOutput::default(); gens.len()];
        let mut active: Vec<usize> = (0..gens.len()).collect();
        while !active.is_empty() {
            let mut going = Vec::with_capacity(active.len());
            for &i in &active {
                let step = self.sample_next(&mut gens[i], &mut logits[i])?;
                outs[i].tokens.push(step.token);
                if let Some(l) = &step.logprob {
                    outs[i].logprobs.push(l.logprob);
                }
                if step.finish.is_none() {
                    going.push(i);
                }
            }
            if going.is_empty() {
                break;
            }
            let mut batch: Vec<&mut Generation> = gens
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| going.binary_search(i).is_ok())
                .map(|(_, g)| g)
                .collect();
            let next = self.extend_generations(&mut batch)?;
            for (i, l) in going.iter().zip(next) {
                logits[*i] = l;
            }
            active = going;
        }
        for (o, g) in outs.iter_mut().zip(&gens) {
            o.text = g.text.clone();
        }
        Ok(outs)
    }
}

/// `HH:MM:SS{sep}mmm`.
fn timestamp(seconds: f64, sep: char) -> String {
    let ms = (seconds.max(0.0) * 1000.0).round() as u64;
    format!(
        "{:02}:{:02}:{:02}{sep}{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

impl Transcript {
    /// SubRip subtitles, one cue per segment.
    pub fn to_srt(&self) -> String {
        let mut out = String::new();
        for (i, s) in self.segments.iter().enumerate() {
            out.push_str(&format!(
                "{}\n{} --> {}\n{}\n\n",
                i + 1,
                timestamp(s.start, ','),
                timestamp(s.end, ','),
                s.text
            ));
        }
        out
    }

    /// WebVTT subtitles.
    pub fn to_vtt(&self) -> String {
        let mut out = String::from("WEBVTT\n\n");
        for s in &self.segments {
            out.push_str(&format!(
                "{} --> {}\n{}\n\n",
                timestamp(s.start, '.'),
                timestamp(s.end, '.'),
                s.text
            ));
        }
        out
    }

    /// OpenAI's `json` response.
    pub fn to_json(&self) -> Value {
        json!({ "text": self.text })
    }

    /// OpenAI's `verbose_json` response. `seek` is the segment's start in 10 ms frames;
    /// `compression_ratio` is the text's length over its zlib-free estimate, here characters per
    /// token; `no_speech_prob` is not modelled by Phi-4 and reported as 0.
    pub fn to_verbose_json(&self) -> Value {
        let segments: Vec<Value> = self
            .segments
            .iter()
            .map(|s| {
                json!({
                    "id": s.id,
                    "seek": (s.start * 100.0).round() as u64,
                    "start": s.start,
                    "end": s.end,
                    "text": s.text,
                    "tokens": s.tokens,
                    "temperature": self.temperature,
                    "avg_logprob": s.avg_logprob,
                    "compression_ratio": if s.tokens.is_empty() { 0.0 } else { s.text.len() as f64 / s.tokens.len() as f64 },
                    "no_speech_prob": 0.0,
                })
            })
            .collect();
        json!({
            "task": self.task,
            "language": self.language.clone().unwrap_or_else(|| "unknown".into()),
            "duration": self.duration,
            "text": self.text,
            "segments": segments,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_and_subtitles() {
        assert_eq!(timestamp(3725.0456, ','), "01:02:05,046");
        assert_eq!(timestamp(0.0, '.'), "00:00:00.000");
        let t = Transcript {
            task: "transcribe",
            language: None,
            duration: 4.0,
            text: "a b".into(),
            segments: vec![
                Segment {
                    id: 0,
                    start: 0.0,
                    end: 2.5,
                    text: "a".into(),
                    tokens: vec![1],
                    avg_logprob: -0.5,
                },
                Segment {
                    id: 1,
                    start: 2.5,
                    end: 4.0,
                    text: "b".into(),
                    tokens: vec![2],
                    avg_logprob: -0.25,
                },
            ],
            temperature: 0.0,
        };
        assert_eq!(
            t.to_srt(),
            "1\n00:00:00,000 --> 00:00:02,500\na\n\n2\n00:00:02,500 --> 00:00:04,000\nb\n\n"
        );
        assert_eq!(
            t.to_vtt(),
            "WEBVTT\n\n00:00:00.000 --> 00:00:02.500\na\n\n00:00:02.500 --> 00:00:04.000\nb\n\n"
        );
        assert_eq!(t.to_verbose_json()["segments"][1]["seek"], 250);
    }

    #[test]
    fn translation_answers_and_language_names() {
        let t = SpeechTask::Translate {
            language: "fr".into(),
        };
        assert!(t.instruction().contains("translate the audio to French"));
        assert_eq!(t.answer(" Hello <sep> Bonjour "), "Bonjour");
        assert_eq!(t.answer("Bonjour"), "Bonjour");
        assert_eq!(language_name("GERMAN"), "German");
        assert_eq!(language_name("Klingon"), "Klingon");
    }

    #[test]
    fn windows_cut_at_the_quietest_point() {
        // 10 s of noise with a silent 200 ms at 4.5 s and at 8.5 s; windows of 5 s: the first
        // window's last third [3.33 s, 5 s] holds the first silence, the second's the other.
        let rate = SAMPLE_RATE as usize;
        let mut x: Vec<f32> = (0..10 * rate)
            .map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.2)
            .collect();
        for quiet in [4.5f64, 8.5] {
            let at = (quiet * rate as f64) as usize;
            x[at..at + rate / 5].fill(0.0);
        }
        let w = windows(&x, 5 * rate);
        assert_eq!(w.len(), 3, "{w:?}");
        assert_eq!(w[0].start, 0);
        assert_eq!(w[2].end, x.len());
        for pair in w.windows(2) {
            assert_eq!(pair[0].end, pair[1].start);
        }
        for (r, want) in w.iter().zip([4.6, 8.6]) {
            let cut = r.end as f64 / rate as f64;
            assert!(
                (cut - want).abs() <= 0.05,
                "cut at {cut} s, silence centred at {want} s"
            );
        }
        assert_eq!(windows(&x[..rate], 5 * rate), vec![0..rate]);
    }
}
