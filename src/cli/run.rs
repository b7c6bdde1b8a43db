use super::*;

#[derive(Args)]
pub(super) struct RunArgs {
    #[command(flatten)]
    model: ModelArg,
    /// The prompt text.
    #[arg(long, conflicts_with = "prompt_file")]
    prompt: Option<String>,
    /// Read the prompt from a UTF-8 file ("-" for stdin).
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Use the prompt as-is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// System message (chat mode).
    #[arg(long, conflicts_with = "raw")]
    system: Option<String>,
    /// Print one JSON object (prompt_ids, generated_ids, text, finish_reason, timings).
    #[arg(long)]
    json: bool,
    /// An image for the prompt (repeatable; Phi-4-multimodal). `<|image_1|>`, `<|image_2|>`, …
    /// in the prompt place them; without placeholders they go before the text.
    #[arg(long = "image", value_name = "FILE")]
    images: Vec<PathBuf>,
    /// An audio file for the prompt (repeatable; Phi-4-multimodal): WAV, FLAC, MP3, OGG/Vorbis,
    /// M4A/AAC at any sample rate. `<|audio_1|>`, … place them; without placeholders they go
    /// before the text (after any images).
    #[arg(long = "audio", value_name = "FILE")]
    audios: Vec<PathBuf>,
    #[command(flatten)]
    sampling: Sampling,
}

pub(super) fn read_prompt(a: &RunArgs) -> Result<String> {
    match (&a.prompt, &a.prompt_file) {
        (Some(p), _) => Ok(p.clone()),
        (None, Some(f)) => {
            let bytes = if f.as_os_str() == "-" {
                let mut b = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut b)
                    .context("reading the prompt from stdin")?;
                b
            } else {
                std::fs::read(f).with_context(|| format!("reading prompt file {}", f.display()))?
            };
            String::from_utf8(bytes).map_err(|e| {
                anyhow::anyhow!("prompt file {} is not valid UTF-8 ({e})", f.display())
            })
        }
        (None, None) => bail!("give a prompt with --prompt TEXT or --prompt-file FILE"),
    }
}

/// An image file's bytes, read before the model loads so a wrong path fails at once.
pub(super) fn read_image(path: &std::path::Path) -> Result<ImageSource> {
    let bytes = std::fs::read(path).with_context(|| format!("reading image {}", path.display()))?;
    Ok(ImageSource::Bytes(std::sync::Arc::new(bytes)))
}

/// An audio file as a source that keeps its name (the extension is a decoding hint), checked
/// to exist before the model loads.
pub(super) fn audio_source(path: &std::path::Path) -> Result<AudioSource> {
    std::fs::metadata(path).with_context(|| format!("reading audio {}", path.display()))?;
    Ok(AudioSource::Url(path.to_string_lossy().into_owned()))
}

pub(super) fn run(a: RunArgs) -> Result<()> {
    let params = a.sampling.params()?;
    let prompt = read_prompt(&a)?;
    let sources: Vec<ImageSource> = a
        .images
        .iter()
        .map(|p| read_image(p))
        .collect::<Result<_>>()?;
    let audio_sources: Vec<AudioSource> = a
        .audios
        .iter()
        .map(|p| audio_source(p))
        .collect::<Result<_>>()?;
    let (mut engine, _) = a.model.load(true)?;
    engine.rope_policy = a.sampling.policy();
    let (ids, media) = if a.raw {
        let mut m = Message::with_media("user", &prompt, sources, audio_sources);
        let images = m
            .images
            .iter()
            .enumerate()
            .map(|(i, s)| {
                engine
                    .load_image(s)
                    .with_context(|| format!("image {}", a.images[i].display()))
            })
            .collect::<Result<Vec<_>>>()?;
        let audios = m
            .audios
            .iter()
            .enumerate()
            .map(|(i, s)| {
                engine
                    .load_audio(s)
                    .with_context(|| format!("audio {}", a.audios[i].display()))
            })
            .collect::<Result<Vec<_>>>()?;
        engine.encode_with_media(&std::mem::take(&mut m.content), &images, &audios)?
    } else {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(Message::new("system", s));
        }
        msgs.push(Message::with_media("user", &prompt, sources, audio_sources));
        engine.encode_chat(&msgs, None)?
    };
    let mut stdout = std::io::stdout().lock();
    let stream = !a.json;
    let out = engine.generate_media(&ids, media, &params, &mut |ev: &StreamEvent| {
        if stream {
            // A closed pipe (e.g. `| head`) ends generation instead of panicking.
            write!(stdout, "{}", ev.text)
                .and_then(|_| stdout.flush())
                .is_ok()
        } else {
            true
        }
    })?;
    if a.json {
        let v = json!({
            "prompt_ids": out.prompt_ids,
            "generated_ids": out.generated_ids,
            "text": out.text,
            "finish_reason": out.finish_reason,
            "timings": out.timings,
        });
        writeln!(stdout, "{v}")?;
    } else {
        writeln!(stdout).ok();
        eprintln!(
            "[{} prompt tokens, {} generated, finish: {:?}, prefill {:.1} tok/s, decode {:.1} tok/s]",
            out.prompt_ids.len(),
            out.generated_ids.len(),
            out.finish_reason,
            out.timings.prefill_tokens_per_s,
            out.timings.decode_tokens_per_s
        );
    }
    Ok(())
}
