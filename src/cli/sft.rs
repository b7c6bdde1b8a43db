//! `phi4 sft`: LoRA supervised fine-tuning with ms-swift's flags, data format, defaults and
//! output layout (`swift sft --tuner_type lora ...`); underscore spellings are accepted too.

use std::time::Instant;

use phi4::train::data::{split, Skipped};
use phi4::train::output::{self, Log, State};
use phi4::train::{
    DataOptions, Encoder, LoraParams, LoraSettings, Schedule, TargetModules, TrainConfig, Trainer,
    Truncation,
};

use super::*;

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(format!("expected true or false, not {s:?}")),
    }
}

#[derive(Args)]
pub(super) struct SftArgs {
    /// The base model: a local directory or a Hugging Face repo id.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// Train on a quantized base (QLoRA-style): a `phi4 quantize` recipe (q8, q6, q5m, q5, q4m, q4,
    /// q4-edge or a mix). The adapter stays f32.
    #[arg(long, value_parser = parse_recipe)]
    quant: Option<Recipe>,
    /// ms-swift JSONL files (`FILE#N` draws N samples); repeatable.
    #[arg(long, required = true, num_args = 1.., alias = "datasets")]
    dataset: Vec<String>,
    /// Validation JSONL files.
    #[arg(long, num_args = 1.., alias = "val_dataset")]
    val_dataset: Vec<String>,
    /// Fraction of the training data split off for validation (when no --val-dataset).
    #[arg(long, default_value_t = 0.0, alias = "split_dataset_ratio")]
    split_dataset_ratio: f64,
    /// Longest sample in tokens (default: the model's context).
    #[arg(long, alias = "max_length")]
    max_length: Option<usize>,
    /// delete (skip the sample), left or right (cut it there).
    #[arg(
        long,
        default_value = "delete",
        alias = "truncation",
        alias = "truncation_strategy"
    )]
    truncation_strategy: String,
    /// Stop at the first bad line instead of skipping it.
    #[arg(long)]
    strict: bool,
    /// Only `lora` (ms-swift's default); `--train-type` is the 3.x name.
    #[arg(
        long,
        default_value = "lora",
        alias = "tuner_type",
        alias = "train-type",
        alias = "train_type"
    )]
    tuner_type: String,
    /// Start from this adapter (PEFT / ms-swift checkpoint dir) instead of a fresh init.
    #[arg(long)]
    adapters: Option<PathBuf>,
    #[arg(long, default_value_t = 8, alias = "lora_rank")]
    lora_rank: usize,
    #[arg(long, default_value_t = 32.0, alias = "lora_alpha")]
    lora_alpha: f64,
    #[arg(long, default_value_t = 0.05, alias = "lora_dropout")]
    lora_dropout: f32,
    /// Scale alpha/sqrt(r) instead of alpha/r.
    #[arg(long, default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set, alias = "use_rslora")]
    use_rslora: bool,
    /// all-linear (qkv_proj, o_proj, gate_up_proj, down_proj), some of them, or a regex.
    #[arg(long, num_args = 1.., default_value = "all-linear", alias = "target_modules")]
    target_modules: Vec<String>,
    #[arg(long, default_value_t = 1e-4, alias = "learning_rate")]
    learning_rate: f64,
    #[arg(long, default_value_t = 3.0, alias = "num_train_epochs")]
    num_train_epochs: f64,
    /// Total updates (overrides the epochs).
    #[arg(long, alias = "max_steps")]
    max_steps: Option<u64>,
    #[arg(
        long,
        default_value_t = 1,
        alias = "per_device_train_batch_size",
        alias = "batch-size"
    )]
    per_device_train_batch_size: usize,
    /// Default: ceil(16 / batch size), as ms-swift.
    #[arg(long, alias = "gradient_accumulation_steps")]
    gradient_accumulation_steps: Option<usize>,
    #[arg(long, default_value_t = 0.1, alias = "weight_decay")]
    weight_decay: f64,
    #[arg(long, default_value_t = 0.9, alias = "adam_beta1")]
    adam_beta1: f64,
    #[arg(long, default_value_t = 0.95, alias = "adam_beta2")]
    adam_beta2: f64,
    #[arg(long, default_value_t = 1e-8, alias = "adam_epsilon")]
    adam_epsilon: f64,
    /// cosine, linear or constant.
    #[arg(long, default_value = "cosine", alias = "lr_scheduler_type")]
    lr_scheduler_type: String,
    #[arg(long, default_value_t = 0.0, alias = "warmup_ratio")]
    warmup_ratio: f64,
    #[arg(long, alias = "warmup_steps")]
    warmup_steps: Option<u64>,
    #[arg(long, default_value_t = 1.0, alias = "max_grad_norm")]
    max_grad_norm: f64,
    /// Seeds the adapter init, the dropout and the per-epoch shuffle.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Seeds the dataset sampling and split.
    #[arg(long, default_value_t = 42, alias = "data_seed")]
    data_seed: u64,
    /// Shuffle the samples every epoch (false: file order).
    #[arg(long, default_value = "true", value_parser = parse_bool, action = clap::ArgAction::Set, alias = "train_dataloader_shuffle", alias = "dataset-shuffle", alias = "dataset_shuffle")]
    train_dataloader_shuffle: bool,
    /// Keep only each layer's input between the passes (one more forward, far less memory).
    #[arg(long, default_value = "true", value_parser = parse_bool, action = clap::ArgAction::Set, alias = "gradient_checkpointing")]
    gradient_checkpointing: bool,
    #[arg(long, default_value_t = 5, alias = "logging_steps")]
    logging_steps: u64,
    #[arg(long, default_value_t = 500, alias = "save_steps")]
    save_steps: u64,
    #[arg(long, alias = "save_total_limit")]
    save_total_limit: Option<usize>,
    /// Default: --save-steps.
    #[arg(long, alias = "eval_steps")]
    eval_steps: Option<u64>,
    #[arg(long, default_value = "output", alias = "output_dir")]
    output_dir: PathBuf,
    /// Write into OUTPUT/vN-TIMESTAMP/ (false: OUTPUT itself).
    #[arg(long, default_value = "true", value_parser = parse_bool, action = clap::ArgAction::Set, alias = "add_version")]
    add_version: bool,
    /// Continue a run from one of its checkpoints (the same data and settings).
    #[arg(long, alias = "resume_from_checkpoint")]
    resume_from_checkpoint: Option<PathBuf>,
}

pub(super) fn sft(a: SftArgs) -> Result<()> {
    if a.tuner_type != "lora" {
        bail!(
            "--tuner-type {:?} is not supported: phi4 sft trains LoRA adapters (lora)",
            a.tuner_type
        );
    }
    let dir = resolve_model(&a.model)?;
    let config_text = std::fs::read_to_string(dir.join("config.json"))
        .with_context(|| format!("reading {}", dir.join("config.json").display()))?;
    if phi4::config::multimodal::Phi4MMConfig::is_multimodal(&config_text) {
        bail!(
            "{} is Phi-4-multimodal; phi4 sft trains Phi-4-mini (Phi3ForCausalLM) adapters for now",
            dir.display()
        );
    }
    let model = load_model(&dir, a.quant)?;
    let tok = phi4::text::Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    let tmpl = phi4::text::ChatTemplate::from_model_dir(&dir)?;
    let enc = Encoder {
        tokenizer: &tok,
        template: &tmpl,
        eos_token: tmpl.eos_token().to_string(),
    };
    let opts = DataOptions {
        max_length: a.max_length.unwrap_or(model.config.max_position_embeddings),
        truncation: Truncation::parse(&a.truncation_strategy)?,
        strict: a.strict,
    };
    if opts.max_length > model.config.max_position_embeddings {
        bail!(
            "--max-length {} exceeds the model's context ({})",
            opts.max_length,
            model.config.max_position_embeddings
        );
    }
    let (mut train, mut skipped) = enc.load(&a.dataset, &opts, a.data_seed)?;
    let mut val = Vec::new();
    if !a.val_dataset.is_empty() {
        let (v, s) = enc.load(&a.val_dataset, &opts, a.data_seed)?;
        val = v;
        skipped.extend(s);
    } else if a.split_dataset_ratio > 0.0 {
        (train, val) = split(train, a.split_dataset_ratio, a.data_seed)?;
    }
    report_skipped(&skipped);
    let ga = a.gradient_accumulation_steps.unwrap_or_else(|| {
        16usize
            .div_ceil(a.per_device_train_batch_size.max(1))
            .max(1)
    });
    let cfg = TrainConfig {
        learning_rate: a.learning_rate,
        num_train_epochs: a.num_train_epochs,
        max_steps: a.max_steps,
        per_device_train_batch_size: a.per_device_train_batch_size,
        gradient_accumulation_steps: ga,
        weight_decay: a.weight_decay,
        adam_beta1: a.adam_beta1,
        adam_beta2: a.adam_beta2,
        adam_epsilon: a.adam_epsilon,
        lr_scheduler_type: Schedule::parse(&a.lr_scheduler_type)?,
        warmup_ratio: a.warmup_ratio,
        warmup_steps: a.warmup_steps,
        max_grad_norm: a.max_grad_norm,
        seed: a.seed,
        shuffle: a.train_dataloader_shuffle,
        gradient_checkpointing: a.gradient_checkpointing,
    };
    let settings = LoraSettings {
        r: a.lora_rank,
        alpha: a.lora_alpha,
        dropout: a.lora_dropout,
        use_rslora: a.use_rslora,
        targets: TargetModules::parse(&a.target_modules)?,
    };
    let params = match &a.adapters {
        Some(d) => LoraParams::load_peft(&model, d)?,
        None => LoraParams::init(&model, settings.clone(), a.seed)?,
    };
    let settings = params.settings.clone();
    let mut trainer = Trainer::new(&model, cfg.clone(), params, train.len())?;
    let mut history = Vec::new();
    let run_dir = match &a.resume_from_checkpoint {
        Some(ckpt) => {
            let (params, state) = output::load_checkpoint(&model, ckpt, &mut trainer.opt)?;
            if state.n_samples != train.len() || state.max_steps != trainer.plan.total_steps {
                bail!(
                    "{} was saved by a run of {} samples and {} updates; this one has {} and {} (resume with the same data and settings)",
                    ckpt.display(),
                    state.n_samples,
                    state.max_steps,
                    train.len(),
                    trainer.plan.total_steps
                );
            }
            if state.global_step != trainer.opt.step {
                bail!(
                    "{}: trainer state and optimizer disagree on the step",
                    ckpt.display()
                );
            }
            trainer.params = params;
            history = state.log_history;
            ckpt.parent()
                .map(Path::to_path_buf)
                .context("the checkpoint has no parent directory")?
        }
        None if a.add_version => output::versioned_dir(&a.output_dir)?,
        None => a.output_dir.clone(),
    };
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let base_name = if Path::new(&a.model).exists() {
        dir.display().to_string()
    } else {
        a.model.clone()
    };
    let args_json = json!({
        "model": base_name,
        "model_type": "phi3",
        "template": "phi3",
        "tuner_type": "lora",
        "quant": a.quant.map(|q| q.name()),
        "dataset": a.dataset,
        "val_dataset": a.val_dataset,
        "split_dataset_ratio": a.split_dataset_ratio,
        "max_length": opts.max_length,
        "truncation_strategy": opts.truncation.name(),
        "lora_rank": settings.r,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "use_rslora": settings.use_rslora,
        "target_modules": a.target_modules,
        "learning_rate": cfg.learning_rate,
        "num_train_epochs": cfg.num_train_epochs,
        "max_steps": trainer.plan.total_steps,
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "weight_decay": cfg.weight_decay,
        "adam_beta1": cfg.adam_beta1,
        "adam_beta2": cfg.adam_beta2,
        "adam_epsilon": cfg.adam_epsilon,
        "lr_scheduler_type": cfg.lr_scheduler_type.name(),
        "warmup_ratio": cfg.warmup_ratio,
        "warmup_steps": trainer.plan.warmup_steps,
        "max_grad_norm": cfg.max_grad_norm,
        "seed": cfg.seed,
        "data_seed": a.data_seed,
        "train_dataloader_shuffle": cfg.shuffle,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "logging_steps": a.logging_steps,
        "save_steps": a.save_steps,
        "save_total_limit": a.save_total_limit,
        "eval_steps": a.eval_steps.unwrap_or(a.save_steps),
        "output_dir": run_dir.display().to_string(),
        "train_samples": train.len(),
        "val_samples": val.len(),
        "skipped_samples": skipped.len(),
        "phi4_version": env!("CARGO_PKG_VERSION"),
    });
    lora_write(&run_dir.join("args.json"), &args_json)?;
    let mut log = Log::open(&run_dir)?;
    let plan = trainer.plan;
    eprintln!(
        "training {} samples ({} validation, {} skipped): {} updates of {} × {} samples, LoRA r {} on {} projections ({} parameters) → {}",
        train.len(),
        val.len(),
        skipped.len(),
        plan.total_steps,
        cfg.per_device_train_batch_size,
        cfg.gradient_accumulation_steps,
        settings.r,
        trainer.params.modules.len(),
        trainer.params.len(),
        run_dir.display()
    );
    let bar = ProgressBar::new(plan.total_steps);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed} < {eta}] {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_position(trainer.opt.step);
    let started = Instant::now();
    let first = trainer.opt.step;
    let (mut loss_acc, mut acc_n, mut tokens) = (0.0, 0u64, 0usize);
    let eval_every = a.eval_steps.unwrap_or(a.save_steps).max(1);
    let save_every = a.save_steps.max(1);
    let mut last_saved = None;
    while trainer.opt.step < plan.total_steps {
        let s = trainer.step(&train)?;
        loss_acc += s.loss;
        acc_n += 1;
        tokens += s.tokens;
        let elapsed = started.elapsed().as_secs_f64();
        let done = s.step - first;
        let tps = tokens as f64 / elapsed.max(1e-9);
        bar.set_position(s.step);
        bar.set_message(format!("loss {:.4} {:.1} tok/s", s.loss, tps));
        if s.step % a.logging_steps.max(1) == 0 || s.step == plan.total_steps {
            let remaining = elapsed / done as f64 * (plan.total_steps - s.step) as f64;
            let line = json!({
                "loss": round(loss_acc / acc_n as f64),
                "grad_norm": round(s.grad_norm),
                "learning_rate": s.learning_rate,
                "epoch": round(s.epoch),
                "global_step/max_steps": format!("{}/{}", s.step, plan.total_steps),
                "percentage": format!("{:.2}%", 100.0 * s.step as f64 / plan.total_steps as f64),
                "elapsed_time": hms(elapsed),
                "remaining_time": hms(remaining),
                "train_speed(s/it)": round(elapsed / done as f64),
                "tokens/s": round(tps),
                "memory(GiB)": phi4::bench::peak_rss_mb().map(|m| round(m / 1024.0)),
            });
            log.write(&line)?;
            bar.suspend(|| eprintln!("{line}"));
            history.push(line);
            (loss_acc, acc_n) = (0.0, 0);
        }
        let last = s.step == plan.total_steps;
        if !val.is_empty() && (s.step % eval_every == 0 || last) {
            let eval_loss = trainer.evaluate(&val)?;
            let line = json!({"eval_loss": round(eval_loss), "global_step": s.step, "epoch": round(s.epoch)});
            log.write(&line)?;
            bar.suspend(|| eprintln!("{line}"));
            history.push(line);
        }
        if s.step % save_every == 0 || last {
            let state = State {
                global_step: s.step,
                max_steps: plan.total_steps,
                n_samples: train.len(),
                log_history: history.clone(),
            };
            let dir = output::save_checkpoint(
                &run_dir,
                &trainer.params,
                &trainer.opt,
                &state,
                &args_json,
                &base_name,
                a.save_total_limit,
            )?;
            last_saved = Some(dir);
        }
    }
    bar.finish_and_clear();
    let summary = json!({
        "last_model_checkpoint": last_saved.as_ref().map(|p| p.display().to_string()),
        "global_step": trainer.opt.step,
        "train_runtime": round(started.elapsed().as_secs_f64()),
        "train_tokens": tokens,
        "memory(GiB)": phi4::bench::peak_rss_mb().map(|m| round(m / 1024.0)),
    });
    log.write(&summary)?;
    eprintln!("{summary}");
    for p in phi4::train::plot::write_run_curves(&run_dir, &history)? {
        eprintln!("wrote {}", p.display());
    }
    if let Some(d) = last_saved {
        println!("{}", d.display());
    }
    Ok(())
}

fn lora_write(path: &Path, v: &serde_json::Value) -> Result<()> {
    phi4::train::lora::write_atomic(path, serde_json::to_string_pretty(v)?.as_bytes())
}

fn report_skipped(skipped: &[Skipped]) {
    if skipped.is_empty() {
        return;
    }
    eprintln!(
        "skipped {} samples (--strict makes this an error):",
        skipped.len()
    );
    for s in skipped.iter().take(20) {
        eprintln!("  {s}");
    }
    if skipped.len() > 20 {
        eprintln!("  ... and {} more", skipped.len() - 20);
    }
}

fn round(v: f64) -> f64 {
    (v * 1e8).round() / 1e8
}

fn hms(secs: f64) -> String {
    let s = secs.round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s % 3600 / 60, s % 60)
}
