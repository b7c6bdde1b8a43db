use super::*;

use phi4::engine::perplexity::{self, BaseReader, BaseWriter, Tally};

#[derive(Args)]
pub(super) struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArg,
    /// The text to score (UTF-8), e.g. wikitext-2's test split.
    #[arg(long)]
    file: PathBuf,
    /// Tokens per window; the second half of each window is scored (llama-perplexity's -c).
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Score at most this many windows (llama-perplexity's --chunks).
    #[arg(long)]
    max_windows: Option<usize>,
    /// Write this run's log-probabilities (f16, full rows) for later --kl-base runs.
    #[arg(long, value_name = "FILE", conflicts_with = "kl_base")]
    save_logits: Option<PathBuf>,
    /// Compare with a base run saved by --save-logits: KL divergence and top-token agreement.
    #[arg(long, value_name = "FILE")]
    kl_base: Option<PathBuf>,
    /// Print the figures as one JSON object.
    #[arg(long)]
    json: bool,
}

pub(super) fn perplexity_cmd(a: PerplexityArgs) -> Result<()> {
    if a.ctx < 8 {
        bail!("--ctx must be at least 8 tokens");
    }
    if a.max_windows == Some(0) {
        bail!("--max-windows must be at least 1");
    }
    let bytes = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| anyhow::anyhow!("{} is not valid UTF-8 ({e})", a.file.display()))?;
    let (engine, _) = a.model.load(false)?;
    if engine.mm.is_some() {
        bail!("perplexity runs the text decoder of a text model; Phi-4-multimodal's adapters are per mode, so score its base (a text-only export) instead");
    }
    if a.ctx > engine.max_model_len {
        bail!(
            "--ctx {} is longer than the model's context ({})",
            a.ctx,
            engine.max_model_len
        );
    }
    let ids = engine.tokenizer.encode(&text)?;
    let mut windows = ids.len() / a.ctx;
    if windows == 0 {
        bail!(
            "{} has {} tokens; --ctx {} needs at least that many",
            a.file.display(),
            ids.len(),
            a.ctx
        );
    }
    if let Some(m) = a.max_windows {
        windows = windows.min(m);
    }
    let ids = &ids[..windows * a.ctx];
    let vocab = engine.model.config.vocab_size;
    let mut save = match &a.save_logits {
        Some(p) => Some(BaseWriter::create(p, vocab, a.ctx, ids)?),
        None => None,
    };
    let mut base = match &a.kl_base {
        Some(p) => Some(BaseReader::open(p, vocab, a.ctx, ids)?),
        None => None,
    };
    let mut tally = Tally::default();
    let t0 = std::time::Instant::now();
    let bar = ProgressBar::new(windows as u64);
    bar.set_style(
        ProgressStyle::with_template("scoring [{bar:30}] {pos}/{len} windows {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    for window in ids.chunks_exact(a.ctx) {
        let lp = engine.window_logprobs(window)?;
        let b = match &mut base {
            Some(r) => Some(r.next(lp.rows)?),
            None => None,
        };
        perplexity::score(&mut tally, window, &lp, b.as_ref());
        if let Some(w) = &mut save {
            w.push(&lp)?;
        }
        bar.inc(1);
        bar.set_message(format!("ppl {:.4}", tally.perplexity()));
    }
    bar.finish_and_clear();
    if let Some(w) = save {
        w.finish()?;
    }
    let s = tally.summary();
    let secs = t0.elapsed().as_secs_f64();
    if a.json {
        let mut v = serde_json::to_value(&s)?;
        v["windows"] = json!(windows);
        v["ctx"] = json!(a.ctx);
        v["seconds"] = json!(secs);
        println!("{v}");
        return Ok(());
    }
    println!(
        "{} windows of {} tokens, {} scored, {:.1} s ({:.0} tokens/s)",
        windows,
        a.ctx,
        s.tokens,
        secs,
        ids.len() as f64 / secs
    );
    println!(
        "perplexity: {:.4} ± {:.4}   (mean NLL {:.6} ± {:.6})",
        s.perplexity.value, s.perplexity.stderr, s.mean_nll.value, s.mean_nll.stderr
    );
    if let Some(k) = &s.kl {
        println!(
            "KL divergence: mean {:.6} ± {:.6}, median {:.6}, 99th percentile {:.6}, max {:.6}",
            k.mean.value, k.mean.stderr, k.median, k.p99, k.max
        );
        println!("same top token: {:.3} %", 100.0 * k.same_top);
    }
    Ok(())
}
