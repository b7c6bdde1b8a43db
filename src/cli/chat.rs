use super::run::read_image;
use super::*;

#[derive(Args)]
pub(super) struct ChatArgs {
    #[command(flatten)]
    model: ModelArg,
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: Sampling,
}

pub(super) fn chat(a: ChatArgs) -> Result<()> {
    let params = a.sampling.params()?;
    let (mut engine, _) = a.model.load(true)?;
    engine.rope_policy = a.sampling.policy();
    let interactive = std::io::stdin().is_terminal();
    let mut history: Vec<Message> = Vec::new();
    let reset = |h: &mut Vec<Message>| {
        h.clear();
        if let Some(s) = &a.system {
            h.push(Message::new("system", s));
        }
    };
    reset(&mut history);
    if interactive {
        eprintln!(
            "phi4 chat: type a message; /image PATH and /audio PATH attach an image or an audio file to the next one, /reset clears the conversation, /exit or Ctrl-D quits."
        );
    }
    let mut pending: Vec<ImageSource> = Vec::new();
    let mut pending_audio: Vec<AudioSource> = Vec::new();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading stdin (is it UTF-8?)")?;
        let msg = line.trim();
        match msg {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                reset(&mut history);
                pending.clear();
                pending_audio.clear();
                continue;
            }
            _ => {}
        }
        if let Some(path) = msg.strip_prefix("/image ") {
            if engine.mm.is_none() {
                eprintln!(
                    "error: this model takes text only; images need a Phi-4-multimodal checkpoint"
                );
                continue;
            }
            match read_image(std::path::Path::new(path.trim())) {
                Ok(src) => {
                    pending.push(src);
                    if interactive {
                        eprintln!("[image {} attached to your next message]", pending.len());
                    }
                }
                Err(e) => eprintln!("error: {e:#}"),
            }
            continue;
        }
        if let Some(path) = msg.strip_prefix("/audio ") {
            let path = std::path::Path::new(path.trim());
            // Decoded now, so a file that cannot be used is reported before the turn.
            let checked = engine.multimodal().and_then(|_| {
                let bytes = std::fs::read(path)
                    .with_context(|| format!("reading audio {}", path.display()))?;
                let src = AudioSource::Bytes(std::sync::Arc::new(bytes));
                let w = engine.load_audio(&src)?;
                Ok((src, w.seconds()))
            });
            match checked {
                Ok((src, seconds)) => {
                    pending_audio.push(src);
                    if interactive {
                        eprintln!(
                            "[audio {} ({seconds:.1} s) attached to your next message]",
                            pending_audio.len()
                        );
                    }
                }
                Err(e) => eprintln!("error: {e:#}"),
            }
            continue;
        }
        history.push(Message::with_media(
            "user",
            msg,
            std::mem::take(&mut pending),
            std::mem::take(&mut pending_audio),
        ));
        let mut stdout = std::io::stdout().lock();
        let out = engine.chat_stream(&history, None, &params, &mut |ev| {
            write!(stdout, "{}", ev.text)
                .and_then(|_| stdout.flush())
                .is_ok()
        });
        match out {
            Ok(out) => {
                writeln!(stdout)?;
                history.push(Message::new("assistant", &out.text));
            }
            Err(e) => {
                // A turn that cannot run (context full, say) is reported; the chat goes on.
                history.pop();
                eprintln!("error: {e:#}");
            }
        }
    }
    Ok(())
}
