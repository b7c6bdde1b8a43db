//! A training run's directory, laid out as ms-swift lays it out:
//!
//! ```text
//! OUTPUT/v0-20261204-153012/
//!   args.json          every setting of the run
//!   logging.jsonl      one line per logging step (loss, grad_norm, learning_rate, tokens/s, memory)
//!   checkpoint-N/      adapter_config.json + adapter_model.safetensors (PEFT), args.json,
//!                      optimizer.safetensors (AdamW moments), trainer_state.json
//! ```
//!
//! A checkpoint is written into `checkpoint-N.tmp/` and renamed when complete, so a killed run
//! never leaves a half-written one; `--resume-from-checkpoint` reads it back.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::lora::{save_f32_tensors, write_atomic, LoraParams};
use super::optim::AdamW;
use crate::model::Phi3ForCausalLM;
use crate::weights::open_safetensors;

/// `OUTPUT/v{N}-{YYYYMMDD-HHMMSS}` with N one past the highest existing version.
pub fn versioned_dir(output: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(output).with_context(|| format!("creating {}", output.display()))?;
    let mut next = 0;
    for e in std::fs::read_dir(output)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix('v')
            .and_then(|r| r.split('-').next())
            .and_then(|n| n.parse::<u64>().ok())
        {
            next = next.max(n + 1);
        }
    }
    Ok(output.join(format!("v{next}-{}", timestamp())))
}

/// UTC `YYYYMMDD-HHMMSS`.
pub fn timestamp() -> String {
    let t = crate::time::Utc::now();
    format!(
        "{:04}{:02}{:02}-{:02}{:02}{:02}",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

/// Appends one JSON object per line to `logging.jsonl`.
pub struct Log {
    file: std::fs::File,
}

impl Log {
    pub fn open(run_dir: &Path) -> Result<Log> {
        let path = run_dir.join("logging.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Log { file })
    }

    pub fn write(&mut self, v: &Value) -> Result<()> {
        writeln!(self.file, "{v}")?;
        self.file.flush()?;
        Ok(())
    }
}

/// What a checkpoint records besides the adapter.
#[derive(Debug, Clone)]
pub struct State {
    pub global_step: u64,
    pub max_steps: u64,
    pub n_samples: usize,
    pub log_history: Vec<Value>,
}

/// Writes `run_dir/checkpoint-{step}/` atomically; keeps at most `limit` checkpoints (oldest
/// removed first).
pub fn save_checkpoint(
    run_dir: &Path,
    params: &LoraParams,
    opt: &AdamW,
    state: &State,
    args: &Value,
    base_model: &str,
    limit: Option<usize>,
) -> Result<PathBuf> {
    let name = format!("checkpoint-{}", state.global_step);
    let dir = run_dir.join(&name);
    let tmp = run_dir.join(format!("{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    params.save_peft(&tmp, base_model)?;
    let n = opt.m.len();
    save_f32_tensors(
        &tmp.join("optimizer.safetensors"),
        &[
            ("exp_avg".into(), vec![n], &opt.m),
            ("exp_avg_sq".into(), vec![n], &opt.v),
        ],
    )?;
    let trainer_state = json!({
        "global_step": state.global_step,
        "max_steps": state.max_steps,
        "n_samples": state.n_samples,
        "optimizer_step": opt.step,
        "log_history": state.log_history,
    });
    write_atomic(
        &tmp.join("trainer_state.json"),
        serde_json::to_string_pretty(&trainer_state)?.as_bytes(),
    )?;
    write_atomic(
        &tmp.join("args.json"),
        serde_json::to_string_pretty(args)?.as_bytes(),
    )?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::rename(&tmp, &dir).with_context(|| format!("writing {}", dir.display()))?;
    if let Some(limit) = limit {
        prune(run_dir, limit.max(1))?;
    }
    Ok(dir)
}

/// The checkpoints of a run, oldest first.
pub fn checkpoints(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(run_dir)? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(n) = name
            .strip_prefix("checkpoint-")
            .and_then(|n| n.parse::<u64>().ok())
        {
            if p.is_dir() {
                out.push((n, p));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn prune(run_dir: &Path, limit: usize) -> Result<()> {
    let all = checkpoints(run_dir)?;
    if all.len() > limit {
        for (_, p) in &all[..all.len() - limit] {
            std::fs::remove_dir_all(p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    Ok(())
}

/// Reads a checkpoint back: the adapter, the optimizer moments and the trainer state.
pub fn load_checkpoint(
    model: &Phi3ForCausalLM,
    dir: &Path,
    opt: &mut AdamW,
) -> Result<(LoraParams, State)> {
    let params = LoraParams::load_peft(model, dir)?;
    let state_path = dir.join("trainer_state.json");
    let v: Value = serde_json::from_str(
        &std::fs::read_to_string(&state_path)
            .with_context(|| format!("{} is not a phi4 sft checkpoint", dir.display()))?,
    )
    .with_context(|| format!("{} is not valid JSON", state_path.display()))?;
    let num = |k: &str| -> Result<u64> {
        v.get(k)
            .and_then(Value::as_u64)
            .with_context(|| format!("{}: no {k}", state_path.display()))
    };
    let state = State {
        global_step: num("global_step")?,
        max_steps: num("max_steps")?,
        n_samples: num("n_samples")? as usize,
        log_history: v
            .get("log_history")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
    };
    let tensors = open_safetensors(&dir.join("optimizer.safetensors"))
        .with_context(|| format!("reading the optimizer state of {}", dir.display()))?;
    for (k, t) in tensors {
        let dst = match k.as_str() {
            "exp_avg" => &mut opt.m,
            "exp_avg_sq" => &mut opt.v,
            _ => continue,
        };
        if t.numel() != dst.len() {
            bail!(
                "{}: optimizer state has {} values, the adapter {}",
                dir.display(),
                t.numel(),
                dst.len()
            );
        }
        t.read_f32(0, dst);
    }
    opt.step = num("optimizer_step")?;
    Ok((params, state))
}
