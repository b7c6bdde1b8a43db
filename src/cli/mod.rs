//! The `phi4` command: arguments shared by the commands, and a file per command (run, chat,
//! transcribe, serve, tokenize, bench, quantize, sft, export).

use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use phi4::bench::BenchOptions;
use phi4::config::Phi3Config;
use phi4::engine::{BatcherConfig, LocalMedia, RopePolicy, StreamEvent};
use phi4::hub::{resolve_model, DEFAULT_MODEL};
use phi4::kernels::bf16::Bf16Acts;
use phi4::kernels::wide_acts::QuantActs;
use phi4::model::{KvType, Phi3ForCausalLM, Recipe};
use phi4::server::ServerOptions;
use phi4::text::{AudioSource, ImageSource};
use phi4::{Engine, Message, SamplingParams};

mod bench;
mod chat;
mod export;
mod perplexity;
mod quantize;
mod run;
mod serve;
mod sft;
mod tokenize;
mod transcribe;

use self::bench::{bench_cmd, BenchArgs};
use self::chat::{chat, ChatArgs};
use self::export::{export, ExportArgs};
use self::perplexity::{perplexity_cmd, PerplexityArgs};
use self::quantize::{quantize_cmd, QuantizeArgs};
use self::run::{run, RunArgs};
use self::serve::{serve, ServeArgs};
use self::sft::{sft, SftArgs};
use self::tokenize::{tokenize, TokenizeArgs};
use self::transcribe::{transcribe, TranscribeArgs};

#[derive(Parser)]
#[command(
    name = "phi4",
    version,
    about = "Run Microsoft's Phi-4-mini and Phi-4-multimodal on your CPU: text, images, speech"
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
    /// Transcribe, translate or summarize an audio file (Phi-4-multimodal).
    Transcribe(TranscribeArgs),
    /// Serve the model over an OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Print the token ids of the text on stdin.
    Tokenize(TokenizeArgs),
    /// Measure prefill and decode speed, time to first token and peak memory.
    Bench(BenchArgs),
    /// Write a block-quantized copy of a model (safetensors, memory-mapped at load).
    Quantize(QuantizeArgs),
    /// Fine-tune a LoRA adapter on ms-swift JSONL (supervised; PEFT-format checkpoints).
    Sft(Box<SftArgs>),
    /// Merge a LoRA adapter into its base model and write the checkpoint.
    Export(ExportArgs),
    /// Perplexity of a text, and KL divergence against a saved base run (llama-perplexity's
    /// figures).
    Perplexity(PerplexityArgs),
}

#[derive(Args)]
struct ModelArg {
    /// A local model directory, a Hugging Face repo id (downloaded to the hub cache if missing),
    /// or a llama.cpp / ollama GGUF file (`*.gguf`).
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// Quantize the weights at load: q8, q6, q5m, q5, q4m, q4 or q4-edge (4-bit, with down_proj and the
    /// embeddings / LM head at 8 bits), or a format with named classes (or layers of a class)
    /// in another, as q4+qkv_proj+embed or q5+qkv_proj:q6+down_proj@0-9:q6 (see `phi4 quantize
    /// --help`). A checkpoint from `phi4 quantize` needs no flag.
    #[arg(long, value_parser = parse_recipe)]
    quant: Option<Recipe>,
    /// A LoRA adapter directory (`phi4 sft` checkpoint, PEFT or ms-swift), applied unmerged on
    /// top of the (possibly quantized) base. `serve` takes several, as NAME=DIR
    /// (`--lora-modules` is vLLM's name for the same): a request whose `model` is NAME uses it.
    #[arg(long = "adapters", alias = "lora-modules", num_args = 1.., value_name = "[NAME=]DIR")]
    adapters: Vec<String>,
    #[command(flatten)]
    opts: ModelOptions,
}

impl ModelArg {
    /// Loads the model and its adapters; with `default_adapter` (run, chat) the one adapter
    /// applies to every request. Returns the adapters' names.
    fn load(&self, default_adapter: bool) -> Result<(Engine, Vec<String>)> {
        self.load_reporting(default_adapter, &|_, _| {})
    }

    /// [`ModelArg::load`], telling `progress` the weight bytes read of the total as it goes.
    fn load_reporting(
        &self,
        default_adapter: bool,
        progress: &dyn Fn(u64, u64),
    ) -> Result<(Engine, Vec<String>)> {
        let mut engine = load_engine_reporting(&self.model, self.quant, &self.opts, progress)?;
        if default_adapter && self.adapters.len() > 1 {
            bail!("run and chat take one --adapters directory; serve several with --lora-modules NAME=DIR");
        }
        let mut names = Vec::new();
        for spec in &self.adapters {
            let (name, dir) = match spec.split_once('=') {
                Some((n, d)) if !n.is_empty() && !Path::new(spec).exists() => {
                    (n.to_string(), PathBuf::from(d))
                }
                _ => {
                    let dir = PathBuf::from(spec);
                    let name = dir
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|| "adapter".into());
                    (name, dir)
                }
            };
            if name == self.model {
                bail!("adapter name {name:?} is the base model's name");
            }
            let id = engine.add_adapter(&name, &dir)?;
            if default_adapter {
                engine.default_adapter = Some(id);
            }
            names.push(name);
        }
        Ok((engine, names))
    }
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
    /// With quantized weights: auto rounds activations to 16 bits where that costs no speed
    /// (8-bit weights in decode and batches of up to 4 rows, whose pace the weights' memory
    /// traffic sets) and to 8 bits elsewhere (prefill, 4- to 6-bit weights); i8 rounds them to
    /// 8 bits everywhere (llama.cpp's Q8_0 / Q4_0 products: q8 loses 3x more to its
    /// reference); i16 to 16 bits everywhere (a prefill rounds as decode does, more slowly).
    #[arg(long, value_parser = QuantActs::parse, default_value = "auto")]
    quant_acts: QuantActs,
}

impl ModelOptions {
    fn apply(&self, model: &mut Phi3ForCausalLM) {
        model.kv_cache = self.kv_cache;
        model.set_bf16_acts(self.bf16_acts);
        model.set_quant_acts(self.quant_acts);
    }

    /// [`ModelOptions::apply`] to an engine, its vision and speech encoders included.
    fn apply_engine(&self, engine: &mut Engine) {
        self.apply(&mut engine.model);
        if let Some(mm) = &mut engine.mm {
            mm.image_embed.set_bf16_acts(self.bf16_acts);
            if let Some(a) = &mut mm.audio_embed {
                a.set_bf16_acts(self.bf16_acts);
            }
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

pub fn main() -> ExitCode {
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
        Command::Transcribe(a) => transcribe(a),
        Command::Serve(a) => serve(a),
        Command::Tokenize(a) => tokenize(a),
        Command::Bench(a) => bench_cmd(a),
        Command::Quantize(a) => quantize_cmd(a),
        Command::Sft(a) => sft(*a),
        Command::Export(a) => export(a),
        Command::Perplexity(a) => perplexity_cmd(a),
    }
}

fn is_gguf(spec: &str) -> bool {
    spec.ends_with(".gguf") && Path::new(spec).is_file()
}

fn load_engine(spec: &str, quant: Option<Recipe>, opts: &ModelOptions) -> Result<Engine> {
    load_engine_reporting(spec, quant, opts, &|_, _| {})
}

fn load_engine_reporting(
    spec: &str,
    quant: Option<Recipe>,
    opts: &ModelOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<Engine> {
    let mut engine = if is_gguf(spec) {
        Engine::load_gguf(Path::new(spec), quant)?
    } else {
        load_dir(&resolve_model(spec)?, quant, progress)?
    };
    opts.apply_engine(&mut engine);
    Ok(engine)
}

/// The decoder alone (config.json and weights, no tokenizer), quantized if asked, its mapped
/// weights paged in otherwise.
fn load_model(dir: &Path, quant: Option<Recipe>) -> Result<Phi3ForCausalLM> {
    let config = Phi3Config::from_file(&dir.join("config.json"))?;
    let mut ckpt = phi4::weights::Checkpoint::open_dir(dir)?;
    Phi3ForCausalLM::load_ready(config, &mut ckpt, quant, dir, true, &mut |_| {})
}

fn load_dir(dir: &Path, quant: Option<Recipe>, progress: &dyn Fn(u64, u64)) -> Result<Engine> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("loading {msg} [{bar:30}] {bytes}/{total_bytes}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(dir.display().to_string());
    let mut shown = false;
    let engine = Engine::load_with_progress(dir, quant, &mut |done, total| {
        progress(done, total);
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
