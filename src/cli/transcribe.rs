use phi4::engine::speech::{SpeechOptions, SpeechTask, DEFAULT_WINDOW_SECONDS};
use phi4::hub::DEFAULT_MULTIMODAL_MODEL;

use super::*;

#[derive(Clone, Copy, ValueEnum)]
pub(super) enum TranscriptFormat {
    Text,
    Json,
    VerboseJson,
    Srt,
    Vtt,
}

#[derive(Args)]
pub(super) struct TranscribeArgs {
    /// The audio file: WAV, FLAC, MP3, OGG/Vorbis, M4A/AAC, at any sample rate.
    file: PathBuf,
    /// A Phi-4-multimodal directory or Hugging Face repo id.
    #[arg(long, default_value = DEFAULT_MULTIMODAL_MODEL)]
    model: String,
    /// Quantize the decoder at load: a `phi4 quantize` recipe (q8, q6, q5m, q5, q4m, q4, q4-edge or a mix).
    #[arg(long, value_parser = parse_recipe)]
    quant: Option<Recipe>,
    #[command(flatten)]
    opts: ModelOptions,
    /// Fold the speech adapter into the decoder's weights at load (before --quant): decoding
    /// then reads no adapter, at the cost of a slower load and of the other modes.
    #[arg(long)]
    merge_adapter: bool,
    /// Translate the speech into this language (a name or an ISO code: French, fr, ...).
    #[arg(long, value_name = "LANG", conflicts_with = "summarize")]
    translate_to: Option<String>,
    /// Summarize the recording instead of transcribing it (the whole recording at once).
    #[arg(long)]
    summarize: bool,
    /// Output: text, json, verbose-json (segments with times), srt or vtt subtitles.
    #[arg(long, value_enum, default_value = "text")]
    format: TranscriptFormat,
    /// Extra text after the built-in instruction (names, spellings, context).
    #[arg(long)]
    prompt: Option<String>,
    /// Longest window of audio per request, in seconds (at most 40, the encoder's); longer
    /// recordings are cut at their quietest points.
    #[arg(long, default_value_t = DEFAULT_WINDOW_SECONDS)]
    window_seconds: f64,
    /// Most tokens generated per window.
    #[arg(long, default_value_t = 1024)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long)]
    seed: Option<u64>,
}

pub(super) fn transcribe(a: TranscribeArgs) -> Result<()> {
    let bytes =
        std::fs::read(&a.file).with_context(|| format!("reading audio {}", a.file.display()))?;
    let task = match (&a.translate_to, a.summarize) {
        (Some(lang), _) => SpeechTask::Translate {
            language: lang.clone(),
        },
        (None, true) => SpeechTask::Summarize,
        (None, false) => SpeechTask::Transcribe,
    };
    let mut opts = SpeechOptions::new(task);
    opts.prompt = a.prompt.clone();
    opts.window_seconds = a.window_seconds;
    opts.params = SamplingParams {
        temperature: a.temperature,
        seed: a.seed,
        ..SamplingParams::greedy(a.max_tokens)
    };
    opts.params.validate()?;
    let engine = if a.merge_adapter {
        let dir = phi4::hub::resolve_model(&a.model)?;
        let mut e =
            Engine::load_merged(&dir, a.quant, phi4::model::phi4mm::SPEECH, &mut |_, _| {})?;
        a.opts.apply_engine(&mut e);
        e
    } else {
        load_engine(&a.model, a.quant, &a.opts)?
    };
    let wave = engine
        .load_audio(&AudioSource::Bytes(std::sync::Arc::new(bytes)))
        .with_context(|| format!("audio {}", a.file.display()))?;
    let t0 = std::time::Instant::now();
    let transcript = engine.transcribe(&wave, &opts)?;
    let secs = t0.elapsed().as_secs_f64();
    let mut stdout = std::io::stdout().lock();
    match a.format {
        TranscriptFormat::Text => writeln!(stdout, "{}", transcript.text)?,
        TranscriptFormat::Json => writeln!(stdout, "{}", transcript.to_json())?,
        TranscriptFormat::VerboseJson => writeln!(stdout, "{}", transcript.to_verbose_json())?,
        TranscriptFormat::Srt => write!(stdout, "{}", transcript.to_srt())?,
        TranscriptFormat::Vtt => write!(stdout, "{}", transcript.to_vtt())?,
    }
    eprintln!(
        "[{:.1} s of audio, {} segment{}, {:.1} s: real-time factor {:.2}]",
        transcript.duration,
        transcript.segments.len(),
        if transcript.segments.len() == 1 {
            ""
        } else {
            "s"
        },
        secs,
        secs / transcript.duration.max(1e-9)
    );
    Ok(())
}
