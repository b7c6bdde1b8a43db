//! Decode speed against llama.cpp one token at a time: this process decodes a token, then a
//! llama.cpp child (scripts/llama_step.py) decodes one, alternating which goes first, and the
//! ratio of each pair of step times is kept. Both see the same moment of the host's memory
//! bandwidth, which on a shared VM moves by ±30 % between whole-process runs.
//!
//! ```sh
//! cargo run --release --example decode_lockstep -- PHI4_MODEL_DIR LLAMA.gguf [--steps N]
//!     [--threads T] [--bf16-acts bf16] [--python PY]
//! ```
//! Both engines use T threads (default 2). llama.cpp runs with `OMP_WAIT_POLICY=PASSIVE`, so
//! that its threads do not spin on the cores while this process decodes; that costs it some
//! speed of its own (ggml's barriers sleep too), so the ratio leans towards phi4 by that much.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use phi4::config::Phi3Config;
use phi4::kernels::bf16::Bf16Acts;
use phi4::model::{KvType, Logits, Phi3ForCausalLM, RopeTable};
use phi4::weights::Checkpoint;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut pos, mut steps, mut threads) = (vec![], 40usize, 2usize);
    let (mut acts, mut python) = (Bf16Acts::F32, "python3".to_string());
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--steps" => steps = val()?.parse()?,
            "--threads" => threads = val()?.parse()?,
            "--bf16-acts" => acts = Bf16Acts::parse(&val()?).map_err(anyhow::Error::msg)?,
            "--python" => python = val()?,
            _ => pos.push(a),
        }
    }
    let [dir, gguf] = <[String; 2]>::try_from(pos)
        .map_err(|_| anyhow::anyhow!("usage: decode_lockstep PHI4_MODEL_DIR LLAMA.gguf [...]"))?;
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()?;
    let dir = PathBuf::from(&dir);
    let config = Phi3Config::from_file(&dir.join("config.json"))?;
    let mut ckpt = Checkpoint::open_dir(&dir)?;
    let mut model = Phi3ForCausalLM::load_ready(config, &mut ckpt, None, &dir, true, &mut |_| {})?;
    model.set_bf16_acts(acts);
    model.kv_cache = KvType::F16;

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/llama_step.py");
    let mut child = Command::new(&python)
        .arg(&script)
        .arg(&gguf)
        .arg(threads.to_string())
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {python} {}", script.display()))?;
    let mut to_llama = child.stdin.take().context("child stdin")?;
    let mut from_llama = BufReader::new(child.stdout.take().context("child stdout")?);
    let mut line = String::new();
    let mut read_line = |line: &mut String| -> Result<()> {
        line.clear();
        if from_llama.read_line(line)? == 0 {
            bail!("the llama.cpp child exited (is llama-cpp-python installed for {python}?)");
        }
        Ok(())
    };
    read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("unexpected first line from the llama.cpp child: {line:?}");
    }

    let mut cache = model.new_cache();
    let mut logits = Vec::new();
    let step = |tok: u32, cache: &mut _, logits: &mut Vec<f32>| {
        model.forward_into(&[tok], cache, RopeTable::Short, Logits::Last, None, logits)
    };
    for tok in [1, 2, 3, 4] {
        step(tok, &mut cache, &mut logits)?;
    }
    let (mut ours, mut theirs) = (vec![], vec![]);
    for i in 0..steps {
        let tok = (i * 7919 % 100_000) as u32;
        for phi4_first in [i % 2 == 0, i % 2 == 1] {
            if phi4_first {
                let t = Instant::now();
                step(tok, &mut cache, &mut logits)?;
                ours.push(t.elapsed().as_secs_f64());
            } else {
                writeln!(to_llama, "{tok}")?;
                to_llama.flush()?;
                read_line(&mut line)?;
                theirs.push(line.trim().parse::<f64>().context("llama.cpp step time")?);
            }
        }
    }
    drop(to_llama);
    child.wait()?;
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let ratios: Vec<f64> = ours.iter().zip(&theirs).map(|(a, b)| b / a).collect();
    println!(
        "{{\"phi4_decode\": {:.3}, \"llama_decode\": {:.3}, \"pair_ratio\": {:.3}, \"steps\": {steps}, \"threads\": {threads}}}",
        1.0 / median(&ours),
        1.0 / median(&theirs),
        median(&ratios)
    );
    Ok(())
}
