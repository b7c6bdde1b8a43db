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
    let mut engine = load_engine(&a.model.model, a.model.quant, &a.model.opts)?;
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
            "phi4 chat: type a message; /image PATH attaches an image to the next one, /reset clears the conversation, /exit or Ctrl-D quits."
        );
    }
    let mut pending: Vec<ImageSource> = Vec::new();
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
        history.push(Message::with_images(
            "user",
            msg,
            std::mem::take(&mut pending),
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
