//! The `phi4` command: run, chat, serve, tokenize, bench.

use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use phi4::bench::{self, BenchOptions};
use phi4::config::Phi3Config;
use phi4::engine::{BatcherConfig, LocalMedia, RopePolicy, StreamEvent};
use phi4::hub::{resolve_model, DEFAULT_MODEL};
use phi4::kernels::bf16::Bf16Acts;
use phi4::model::{KvType, Phi3ForCausalLM, Recipe};
use phi4::server::ServerOptions;
use phi4::text::ImageSource;
use phi4::{Engine, Message, SamplingParams};

#[derive(Parser)]
#[command(
    name = "phi4",
    version,
    about = "Run Microsoft's Phi-4-mini on your CPU"
)]
struct Cli {
    /// Worker threads (default: every core).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate once from a prompt, streaming to stdout.
    Run(RunArgs),
    /// Interactive multi-turn chat.
    Chat(ChatArgs),
    /// Serve the model over an OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Print the token ids of the text on stdin.
    Tokenize(TokenizeArgs),
    /// Measure prefill and decode speed, time to first token and peak memory.
    Bench(BenchArgs),
    /// Write a block-quantized copy of a model (safetensors, memory-mapped at load).
    Quantize(QuantizeArgs),
}

#[derive(Args)]
struct QuantizeArgs {
    /// A local model directory or a Hugging Face repo id.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// Output directory (created; must not already hold a model.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// q8, q4, or q4-edge (4-bit with down_proj and the embeddings / LM head at 8 bits).
    #[arg(long, value_parser = parse_recipe, default_value = "q4-edge")]
    recipe: Recipe,
}

#[derive(Args)]
struct ModelArg {
    /// A local model directory, a Hugging Face repo id (downloaded to the hub cache if missing),
    /// or a llama.cpp / ollama GGUF file (`*.gguf`).
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// Quantize the weights at load: q8, q4 or q4-edge (4-bit, with down_proj and the
    /// embeddings / LM head at 8 bits). A checkpoint from `phi4 quantize` needs no flag.
    #[arg(long, value_parser = parse_recipe)]
    quant: Option<Recipe>,
    #[command(flatten)]
    opts: ModelOptions,
}

/// How a loaded model runs, whatever its weights: `run`, `chat`, `serve` and `bench` take these.
#[derive(Args)]
struct ModelOptions {
    /// How the KV cache stores keys and values: f32; f16 (half the memory and of the bytes
    /// decode attention reads; llama.cpp's default); or q8 (8-bit, a quarter, with a small
    /// loss of accuracy).
    #[arg(long, value_parser = KvType::parse, default_value = "f32")]
    kv_cache: KvType,
    /// With bf16 weights: f32 multiplies them with f32 activations (the reference's numbers);
    /// bf16 rounds activations to bf16 first, as llama.cpp does for BF16 weights: about twice
    /// the prefill speed on AVX-512 BF16, an error of up to 2^-8 per activation.
    #[arg(long, value_parser = Bf16Acts::parse, default_value = "f32")]
    bf16_acts: Bf16Acts,
}

impl ModelOptions {
    fn apply(&self, model: &mut Phi3ForCausalLM) {
        model.kv_cache = self.kv_cache;
        model.set_bf16_acts(self.bf16_acts);
    }

    /// [`ModelOptions::apply`] to an engine, its vision tower included.
    fn apply_engine(&self, engine: &mut Engine) {
        self.apply(&mut engine.model);
        if let Some(mm) = &mut engine.mm {
            mm.image_embed.set_bf16_acts(self.bf16_acts);
        }
    }
}

fn parse_recipe(s: &str) -> Result<Recipe> {
    Recipe::parse(s)
}

#[derive(Clone, Copy, ValueEnum)]
enum RopePolicyArg {
    /// transformers' rule: short factors up to the original context, then re-prefill with long.
    Dynamic,
    /// Long factors from the first token (vLLM's rule for long-context serving).
    StaticLong,
}

impl From<RopePolicyArg> for RopePolicy {
    fn from(a: RopePolicyArg) -> RopePolicy {
        match a {
            RopePolicyArg::Dynamic => RopePolicy::Dynamic,
            RopePolicyArg::StaticLong => RopePolicy::StaticLong,
        }
    }
}

#[derive(Args)]
struct Sampling {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    temperature: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    presence_penalty: f32,
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    frequency_penalty: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop before this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    #[arg(long, value_enum, default_value = "dynamic")]
    rope_policy: RopePolicyArg,
}

impl Sampling {
    fn params(&self) -> Result<SamplingParams> {
        let p = SamplingParams {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            stop: self.stop.clone(),
            ignore_eos: false,
        };
        p.validate()?;
        Ok(p)
    }

    fn policy(&self) -> RopePolicy {
        self.rope_policy.into()
    }
}

#[derive(Args)]
struct RunArgs {
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
    #[command(flatten)]
    sampling: Sampling,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArg,
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: Sampling,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArg,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0 picks a free port (the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Name clients use for the model (default: the --model value).
    #[arg(long)]
    served_model_name: Option<String>,
    /// A key clients must send as `Authorization: Bearer KEY` on /v1 (repeatable). Keys also
    /// come from PHI4_API_KEY (comma-separated) and --api-key-file (one per line).
    #[arg(long)]
    api_key: Vec<String>,
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// Most sequences decoded together.
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// Most requests waiting for a slot; more get 429 with Retry-After.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Largest request body in bytes (413 beyond; default 4 MiB, 32 MiB for a multimodal
    /// model, whose images come as base64 data: URLs).
    #[arg(long)]
    max_body_bytes: Option<usize>,
    /// Longest prompt plus output per request (default: the model's context).
    #[arg(long)]
    max_model_len: Option<usize>,
    #[arg(long, value_enum, default_value = "dynamic")]
    rope_policy: RopePolicyArg,
    /// Fetch http(s) image URLs named in requests (off: only data: URLs, so the server makes
    /// no request of its own that a client asked for).
    #[arg(long)]
    allow_remote_media: bool,
    /// Let requests name local image files (file:// URLs or paths) under this directory.
    #[arg(long, value_name = "DIR")]
    allowed_local_media_path: Option<PathBuf>,
    /// Largest image accepted, in pixels (decoded size; 400 beyond).
    #[arg(long, default_value_t = phi4::media::image::DEFAULT_MAX_PIXELS)]
    max_image_pixels: u64,
    /// Most images in one request (400 beyond).
    #[arg(long, default_value_t = 16)]
    max_images_per_request: usize,
}

#[derive(Args)]
struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Print {"ids": [...]}.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    /// Benchmark this checkpoint (directory or repo id).
    #[arg(long, conflicts_with = "synthetic")]
    model: Option<String>,
    /// Random weights of the real Phi-4-mini shapes (bf16); no files needed.
    #[arg(long)]
    synthetic: bool,
    /// Quantize the weights first: q8, q4 or q4-edge.
    #[arg(long, value_parser = parse_recipe)]
    quant: Option<Recipe>,
    /// With --synthetic: write the (quantized, with --quant) weights and config.json to this
    /// directory instead of benchmarking, for `--model DIR` and other engines to read.
    #[arg(long, requires = "synthetic")]
    save: Option<PathBuf>,
    #[command(flatten)]
    opts: ModelOptions,
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long)]
    json: bool,
    /// Measure aggregate decode throughput of the continuous batcher at these numbers of
    /// simultaneous requests (e.g. 1,4,16) instead of the single-stream figures.
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Phi-4-multimodal's image path instead (repeatable, WIDTHxHEIGHT): time to first token
    /// for one image of each size with a --prompt-tokens text prompt, split into preprocess /
    /// vision tower / prefill. With --synthetic: random Phi-4-multimodal weights.
    #[arg(long = "image", value_parser = parse_size, value_name = "WxH")]
    images: Vec<(usize, usize)>,
    /// With --synthetic --save: Phi-4-multimodal weights (transformers' layout, bf16) instead.
    #[arg(long)]
    multimodal: bool,
}

fn parse_size(s: &str) -> Result<(usize, usize)> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .with_context(|| format!("image size {s:?} is not WIDTHxHEIGHT"))?;
    let (w, h): (usize, usize) = (
        w.parse().with_context(|| format!("image width in {s:?}"))?,
        h.parse()
            .with_context(|| format!("image height in {s:?}"))?,
    );
    if w == 0 || h == 0 || w * h > 100_000_000 {
        bail!("image size {s:?} must be between 1x1 and 100 Mpixel");
    }
    Ok((w, h))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting up the thread pool")?;
    }
    match cli.command {
        Command::Run(a) => run(a),
        Command::Chat(a) => chat(a),
        Command::Serve(a) => serve(a),
        Command::Tokenize(a) => tokenize(a),
        Command::Bench(a) => bench_cmd(a),
        Command::Quantize(a) => quantize_cmd(a),
    }
}

fn is_gguf(spec: &str) -> bool {
    spec.ends_with(".gguf") && Path::new(spec).is_file()
}

fn load_engine(spec: &str, quant: Option<Recipe>, opts: &ModelOptions) -> Result<Engine> {
    let mut engine = if is_gguf(spec) {
        Engine::load_gguf(Path::new(spec), quant)?
    } else {
        load_dir(&resolve_model(spec)?, quant)?
    };
    opts.apply_engine(&mut engine);
    Ok(engine)
}

fn quantize_cmd(a: QuantizeArgs) -> Result<()> {
    if is_gguf(&a.model) {
        bail!("phi4 quantize reads Hugging Face safetensors checkpoints; run a GGUF file directly (--model FILE.gguf, with --quant to re-quantize its float tensors)");
    }
    let dir = resolve_model(&a.model)?;
    if a.out.join("model.safetensors").exists() {
        bail!(
            "{} already holds a model.safetensors; choose an empty directory",
            a.out.display()
        );
    }
    eprintln!("quantizing {} ({})...", dir.display(), a.recipe.name());
    let config_text = std::fs::read_to_string(dir.join("config.json"))
        .with_context(|| format!("reading {}", dir.join("config.json").display()))?;
    if phi4::config::multimodal::Phi4MMConfig::is_multimodal(&config_text) {
        let cfg = phi4::config::multimodal::Phi4MMConfig::from_json(&config_text)?;
        phi4::model::phi4mm::write_quantized(&dir, cfg, a.recipe, &a.out)?;
        eprintln!(
            "wrote {} ({}: the decoder quantized; vision tower, projections, speech encoder and adapters as stored)",
            a.out.display(),
            a.recipe.name()
        );
        return Ok(());
    }
    let model = load_model(&dir, Some(a.recipe))?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    phi4::model::quantize::write_checkpoint(&model, Some(a.recipe), &a.out)?;
    // Everything but the weights travels unchanged: config, tokenizer, chat template.
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let is_weights = name.ends_with(".safetensors") || name == "model.safetensors.index.json";
        if path.is_file() && !is_weights {
            std::fs::copy(&path, a.out.join(name))
                .with_context(|| format!("copying {}", path.display()))?;
        }
    }
    let bytes = model.weight_bytes();
    eprintln!(
        "wrote {} ({}, {:.2} GB of weights read per token)",
        a.out.display(),
        a.recipe.name(),
        bytes as f64 / 1e9
    );
    Ok(())
}

/// The decoder alone (config.json and weights, no tokenizer), quantized if asked, its mapped
/// weights paged in otherwise.
fn load_model(dir: &Path, quant: Option<Recipe>) -> Result<Phi3ForCausalLM> {
    let config = Phi3Config::from_file(&dir.join("config.json"))?;
    let mut ckpt = phi4::weights::Checkpoint::open_dir(dir)?;
    Phi3ForCausalLM::load_ready(config, &mut ckpt, quant, dir, true, &mut |_| {})
}

fn load_dir(dir: &Path, quant: Option<Recipe>) -> Result<Engine> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("loading {msg} [{bar:30}] {bytes}/{total_bytes}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(dir.display().to_string());
    let mut shown = false;
    let engine = Engine::load_with_progress(dir, quant, &mut |done, total| {
        // Small checkpoints load instantly; a bar would only flicker.
        if total >= 256 << 20 {
            if !shown {
                bar.set_length(total);
                shown = true;
            }
            bar.set_position(done);
        }
    });
    bar.finish_and_clear();
    engine
}

fn read_prompt(a: &RunArgs) -> Result<String> {
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
fn read_image(path: &std::path::Path) -> Result<ImageSource> {
    let bytes = std::fs::read(path).with_context(|| format!("reading image {}", path.display()))?;
    Ok(ImageSource::Bytes(std::sync::Arc::new(bytes)))
}

fn run(a: RunArgs) -> Result<()> {
    let params = a.sampling.params()?;
    let prompt = read_prompt(&a)?;
    let sources: Vec<ImageSource> = a
        .images
        .iter()
        .map(|p| read_image(p))
        .collect::<Result<_>>()?;
    let mut engine = load_engine(&a.model.model, a.model.quant, &a.model.opts)?;
    engine.rope_policy = a.sampling.policy();
    let (ids, media) = if a.raw {
        let mut m = Message::with_images("user", &prompt, sources);
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
        engine.encode_with_images(&std::mem::take(&mut m.content), &images)?
    } else {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(Message::new("system", s));
        }
        msgs.push(Message::with_images("user", &prompt, sources));
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

fn chat(a: ChatArgs) -> Result<()> {
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

fn api_keys(a: &ServeArgs) -> Result<Vec<String>> {
    let mut keys = a.api_key.clone();
    if let Ok(v) = std::env::var("PHI4_API_KEY") {
        keys.extend(v.split(',').map(str::to_string));
    }
    if let Some(f) = &a.api_key_file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("reading API key file {}", f.display()))?;
        keys.extend(text.lines().map(str::to_string));
    }
    let keys: Vec<String> = keys
        .into_iter()
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty())
        .collect();
    if a.api_key_file.is_some() && keys.is_empty() {
        bail!("the API key file holds no key");
    }
    Ok(keys)
}

fn serve(a: ServeArgs) -> Result<()> {
    if a.max_batch == 0 || a.max_queue == 0 {
        bail!("--max-batch and --max-queue must be at least 1");
    }
    let keys = api_keys(&a)?;
    let local_media = match &a.allowed_local_media_path {
        Some(d) => {
            if !d.is_dir() {
                bail!(
                    "--allowed-local-media-path {} is not a directory",
                    d.display()
                );
            }
            LocalMedia::Under(d.clone())
        }
        None => LocalMedia::Denied,
    };
    if a.max_images_per_request == 0 || a.max_image_pixels == 0 {
        bail!("--max-images-per-request and --max-image-pixels must be at least 1");
    }
    let addr = format!("{}:{}", a.host, a.port);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Bind before loading so a taken port fails fast.
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(&addr))
        .with_context(|| format!("cannot listen on {addr}"))?;
    let mut engine = load_engine(&a.model.model, a.model.quant, &a.model.opts)?;
    engine.rope_policy = a.rope_policy.into();
    if let Some(n) = a.max_model_len {
        let ctx = engine.model.config.max_position_embeddings;
        if n < 2 || n > ctx {
            bail!("--max-model-len must be between 2 and the model's context ({ctx})");
        }
        engine.max_model_len = n;
    }
    let multimodal = engine.mm.is_some();
    if let Some(mm) = &mut engine.mm {
        mm.limits.allow_remote = a.allow_remote_media;
        mm.limits.local = local_media;
        mm.limits.max_image_pixels = a.max_image_pixels;
        mm.limits.max_images = a.max_images_per_request;
    }
    let max_body_bytes = a
        .max_body_bytes
        .unwrap_or(if multimodal { 32 << 20 } else { 4 << 20 });
    let model_id = a.served_model_name.clone().unwrap_or(a.model.model.clone());
    let app = phi4::server::engine_router(
        std::sync::Arc::new(engine),
        BatcherConfig {
            max_batch: a.max_batch,
            max_queue: a.max_queue,
        },
        ServerOptions {
            model_id: model_id.clone(),
            api_keys: keys.clone(),
            max_body_bytes,
        },
    );
    let local = listener.local_addr()?;
    eprintln!(
        "phi4 serve: listening on http://{local} (model {model_id:?}, {})",
        if keys.is_empty() {
            "no API key".to_string()
        } else {
            format!("{} API key(s)", keys.len())
        }
    );
    runtime
        .block_on(phi4::server::serve(listener, app))
        .context("serving")
}

fn tokenize(a: TokenizeArgs) -> Result<()> {
    let dir = resolve_model(&a.model.model)?;
    let tok = phi4::text::Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    let mut bytes = Vec::new();
    std::io::stdin()
        .read_to_end(&mut bytes)
        .context("reading stdin")?;
    let text =
        String::from_utf8(bytes).map_err(|e| anyhow::anyhow!("stdin is not valid UTF-8 ({e})"))?;
    let ids = tok.encode(&text)?;
    if a.json {
        println!("{}", json!({ "ids": ids }));
    } else {
        println!(
            "{}",
            ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
        );
    }
    Ok(())
}

fn bench_cmd(a: BenchArgs) -> Result<()> {
    if a.prompt_tokens == 0 || a.gen_tokens == 0 || a.runs == 0 {
        bail!("--prompt-tokens, --gen-tokens and --runs must be at least 1");
    }
    if !a.images.is_empty() || a.multimodal {
        return bench_images(a);
    }
    let mut engine = None;
    let mut synthetic = None;
    let (model, label): (&Phi3ForCausalLM, String) = match (&a.model, a.synthetic) {
        (Some(m), _) if !a.concurrency.is_empty() => {
            let e: &Engine = engine.insert(load_engine(m, a.quant, &a.opts)?);
            (&e.model, m.clone())
        }
        (Some(m), _) if is_gguf(m) => {
            let mut model = phi4::model::gguf::GgufFile::open(Path::new(m))?.model(a.quant)?;
            a.opts.apply(&mut model);
            (synthetic.insert(model), m.clone())
        }
        (Some(m), _) => {
            // Single-stream figures need only the weights: no tokenizer or template.
            let mut model = load_model(&resolve_model(m)?, a.quant)?;
            a.opts.apply(&mut model);
            (synthetic.insert(model), m.clone())
        }
        (None, true) => {
            eprintln!("building synthetic Phi-4-mini weights (bf16, random)...");
            let mut m = Phi3ForCausalLM::synthetic(Phi3Config::phi4_mini(), 1);
            let format = match a.quant {
                Some(r) => {
                    eprintln!("quantizing ({})...", r.name());
                    m.quantize(r)?;
                    r.name()
                }
                None => "bf16",
            };
            if let Some(dir) = &a.save {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                std::fs::write(dir.join("config.json"), phi4::config::PHI4_MINI_CONFIG)?;
                phi4::model::quantize::write_checkpoint(&m, a.quant, dir)?;
                eprintln!("wrote {} ({format})", dir.display());
                return Ok(());
            }
            a.opts.apply(&mut m);
            let s: &Phi3ForCausalLM = synthetic.insert(m);
            (s, format!("synthetic Phi-4-mini {format}"))
        }
        (None, false) => bail!("give --model M or --synthetic"),
    };
    let ctx = model.config.max_position_embeddings;
    if a.prompt_tokens + a.gen_tokens > ctx {
        bail!("--prompt-tokens plus --gen-tokens exceed the model's context ({ctx})");
    }
    if !a.concurrency.is_empty() {
        return bench_batched(a, engine_for_batching(engine, synthetic)?);
    }
    let report = bench::run(
        model,
        &BenchOptions {
            prompt_tokens: a.prompt_tokens,
            gen_tokens: a.gen_tokens,
            runs: a.runs,
        },
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("model: {label}, threads: {}", report.threads);
        println!(
            "prefill ({} tokens): {:.2} tok/s   time to first token: {:.0} ms",
            report.prompt_tokens, report.prefill_tokens_per_s, report.time_to_first_token_ms
        );
        println!(
            "decode ({} tokens): {:.2} tok/s   ceiling {:.2} tok/s ({:.1} GB/s over {:.2} GB of weights) = {:.0}%",
            report.gen_tokens,
            report.decode_tokens_per_s,
            report.decode_ceiling_tokens_per_s,
            report.memory_bandwidth_gb_s,
            report.weight_bytes_per_token as f64 / 1e9,
            100.0 * report.decode_fraction_of_ceiling
        );
        if let (Some(read), Some(frac)) = (
            report.weight_read_gb_s,
            report.decode_fraction_of_weight_read,
        ) {
            println!(
                "decode vs a plain read of the same weights beside every {}th step ({read:.1} GB/s): {:.0}%",
                bench::READ_EVERY,
                100.0 * frac
            );
        }
        if let Some(rss) = report.peak_rss_mb {
            println!("peak RSS: {rss:.0} MB");
        }
        println!(
            "KV cache: {} ({:.1} MB)   activations against bf16 weights: {}",
            report.kv_cache, report.kv_cache_mb, report.bf16_acts
        );
        println!(
            "runs (median reported): {:?}",
            report
                .runs
                .iter()
                .map(|r| (r.prefill_tokens_per_s * 10.0).round() / 10.0)
                .collect::<Vec<_>>()
        );
    }
    Ok(())
}

fn bench_images(a: BenchArgs) -> Result<()> {
    use phi4::config::multimodal::Phi4MMConfig;
    use phi4::model::phi4mm::Phi4MMForCausalLM;
    let mut synthetic = None;
    let mut engine = None;
    let (lm, image_embed, image_id, label) = match (&a.model, a.synthetic) {
        (None, true) => {
            eprintln!(
                "building synthetic Phi-4-multimodal weights (bf16, random, both adapters)..."
            );
            let mut m = Phi4MMForCausalLM::synthetic(Phi4MMConfig::phi4_multimodal(), 1)?;
            if let Some(dir) = &a.save {
                if a.quant.is_some() {
                    bail!("--save with --multimodal writes bf16 weights (for transformers); leave out --quant");
                }
                phi4::model::phi4mm::write_native(&m, dir)?;
                eprintln!("wrote {} (transformers' layout, bf16)", dir.display());
                return Ok(());
            }
            let format = match a.quant {
                Some(r) => {
                    eprintln!("quantizing the decoder ({})...", r.name());
                    m.lm.quantize(r)?;
                    r.name()
                }
                None => "bf16",
            };
            a.opts.apply(&mut m.lm);
            m.image_embed.set_bf16_acts(a.opts.bf16_acts);
            let m = synthetic.insert(m);
            let id = m.image_token_id();
            (
                &m.lm,
                &m.image_embed,
                id,
                format!("synthetic Phi-4-multimodal {format}"),
            )
        }
        (Some(path), _) => {
            let e: &Engine = engine.insert(load_engine(path, a.quant, &a.opts)?);
            let mm = e.multimodal()?;
            (
                &e.model,
                &mm.image_embed,
                mm.config.vision.image_token_id,
                path.clone(),
            )
        }
        (None, false) => bail!("give --model M or --synthetic"),
    };
    if a.images.is_empty() {
        bail!("give the image sizes to time with --image WIDTHxHEIGHT (e.g. 448x448)");
    }
    bench::reset_peak_rss();
    let results = bench::run_images(
        lm,
        image_embed,
        image_id,
        &a.images,
        a.prompt_tokens,
        a.runs,
    )?;
    let peak_gmacs = bench::bf16_matmul_peak_gmacs(a.opts.bf16_acts)?;
    let tensor_bytes = |v: Vec<(String, phi4::weights::Tensor)>| -> usize {
        v.iter().map(|(_, t)| t.nbytes()).sum()
    };
    let lora_bytes: usize = lm
        .model
        .layers
        .iter()
        .flat_map(|l| l.linears())
        .flat_map(|(_, lin)| lin.lora().iter())
        .map(|d| d.a.weight().nbytes() + d.b.weight().nbytes())
        .sum();
    let weights_mb = (tensor_bytes(lm.named_tensors())
        + lora_bytes
        + tensor_bytes(image_embed.named_tensors())) as f64
        / 1e6;
    let peak = bench::peak_rss_mb();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "model": label, "threads": rayon::current_num_threads(),
                "text_tokens": a.prompt_tokens, "images": results,
                "weights_mb": weights_mb, "adapters_mb": lora_bytes as f64 / 1e6,
                "peak_rss_mb": peak, "bf16_matmul_peak_gmacs": peak_gmacs,
                "bf16_acts": a.opts.bf16_acts.name(),
            }))?
        );
    } else {
        println!("model: {label}, threads: {}", rayon::current_num_threads());
        for r in &results {
            println!(
                "{}x{}: {} views, {} image + {} text tokens: time to first token {:.0} ms = preprocess {:.0} + vision {:.0} ({:.1} G MAC/s, {:.0}% of the bf16 product peak) + prefill {:.0} ms (median of {})",
                r.width, r.height, r.views, r.image_tokens, r.prompt_tokens - r.image_tokens,
                r.time_to_first_token_ms, r.preprocess_ms, r.vision_ms, r.vision_gmacs,
                100.0 * r.vision_gmacs / peak_gmacs, r.prefill_ms, r.runs
            );
        }
        println!(
            "bf16 matrix-product peak ({} activations): {peak_gmacs:.1} G MAC/s",
            a.opts.bf16_acts.name()
        );
        println!(
            "weights {weights_mb:.0} MB (adapters {:.0} MB, unmerged); peak RSS {}",
            lora_bytes as f64 / 1e6,
            peak.map_or("n/a".into(), |p| format!("{p:.0} MB"))
        );
    }
    Ok(())
}

fn engine_for_batching(
    engine: Option<Engine>,
    synthetic: Option<Phi3ForCausalLM>,
) -> Result<Engine> {
    match (engine, synthetic) {
        (Some(e), _) => Ok(e),
        (None, Some(m)) => bench::bench_engine(m),
        (None, None) => bail!("no model to benchmark"),
    }
}

fn bench_batched(a: BenchArgs, engine: Engine) -> Result<()> {
    if a.concurrency.contains(&0) {
        bail!("--concurrency levels must be at least 1");
    }
    let engine = std::sync::Arc::new(engine);
    let mut results = Vec::new();
    for &c in &a.concurrency {
        let mut runs = Vec::new();
        for _ in 0..a.runs {
            runs.push(bench::run_batched(
                engine.clone(),
                c,
                a.prompt_tokens,
                a.gen_tokens,
            )?);
        }
        runs.sort_by(|x, y| {
            x.aggregate_decode_tokens_per_s
                .total_cmp(&y.aggregate_decode_tokens_per_s)
        });
        let median = runs[runs.len() / 2].clone();
        if !a.json {
            println!(
                "concurrency {c:>3}: aggregate decode {:.2} tok/s ({:.2} per request), runs {:?}",
                median.aggregate_decode_tokens_per_s,
                median.per_request_decode_tokens_per_s,
                runs.iter()
                    .map(|r| (r.aggregate_decode_tokens_per_s * 100.0).round() / 100.0)
                    .collect::<Vec<_>>()
            );
        }
        results.push(median);
    }
    let base = results[0].aggregate_decode_tokens_per_s;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        for r in &results[1..] {
            println!(
                "concurrency {} / concurrency {}: {:.2}x",
                r.concurrency,
                results[0].concurrency,
                r.aggregate_decode_tokens_per_s / base
            );
        }
    }
    Ok(())
}
