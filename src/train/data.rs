//! ms-swift's JSONL datasets, encoded as ms-swift's `phi3` template encodes them for training:
//! the token ids of the official chat template, with a loss on every assistant turn's text and
//! its `<|end|>` and on nothing else (system, user, tool turns, role tags; a message with
//! `"loss": false` is masked whole).
//!
//! A line is `{"messages": [...], "tools": ...}` with roles `system`, `user`, `assistant`,
//! `tool_call` (an assistant's call, `{"name", "arguments"}` as JSON text), `tool_response` /
//! `tool`. Tools are rendered in Phi-4's own format (the official template's `<|tool|>` block in
//! the system message, calls as `<|tool_call|>[...]<|/tool_call|>`), which ms-swift cannot do for
//! this model (its phi3 template registers no agent template).
//!
//! The ids come from rendering the conversation prefix by prefix: the text a message adds is
//! tokenized on its own (special tokens never merge with text, so this equals tokenizing the
//! whole render), and for an assistant turn the part after the generation prompt
//! (`<|assistant|>`) is the labelled part.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};

use super::backward::IGNORE;
use crate::text::{ChatTemplate, Message, Tokenizer};

/// One training example.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub input_ids: Vec<u32>,
    /// `IGNORE` where there is no loss; otherwise the token id itself (the loss shifts).
    pub labels: Vec<i32>,
    /// `file:line`, for messages.
    pub origin: String,
}

impl Sample {
    /// Positions whose next token carries a loss (what the loss is normalised by).
    pub fn labelled(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE).count()
    }
}

/// `--truncation-strategy`: what to do with a sample longer than `--max-length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncation {
    /// Skip it (ms-swift's default).
    Delete,
    /// Keep its last `max_length` tokens.
    Left,
    /// Keep its first `max_length` tokens.
    Right,
}

impl Truncation {
    pub fn parse(s: &str) -> Result<Truncation> {
        Ok(match s {
            "delete" => Truncation::Delete,
            "left" => Truncation::Left,
            "right" => Truncation::Right,
            _ => bail!("--truncation-strategy {s:?}: expected delete, left or right"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Truncation::Delete => "delete",
            Truncation::Left => "left",
            Truncation::Right => "right",
        }
    }
}

/// How to read datasets.
pub struct DataOptions {
    pub max_length: usize,
    pub truncation: Truncation,
    /// Any bad line stops the run (otherwise it is skipped and counted).
    pub strict: bool,
}

/// A line that was not used, and why.
#[derive(Debug, Clone)]
pub struct Skipped {
    pub origin: String,
    pub reason: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.origin, self.reason)
    }
}

/// `FILE` or `FILE#N` (N samples drawn from FILE: a shuffled subset, or the file repeated and
/// topped up when N exceeds its length, as ms-swift samples).
pub fn parse_dataset_spec(spec: &str) -> Result<(PathBuf, Option<usize>)> {
    if let Some((path, n)) = spec.rsplit_once('#') {
        if let Ok(n) = n.parse::<usize>() {
            if n == 0 {
                bail!("dataset {spec:?}: #0 samples");
            }
            return Ok((PathBuf::from(path), Some(n)));
        }
    }
    Ok((PathBuf::from(spec), None))
}

/// Encoder of conversations into training samples.
pub struct Encoder<'a> {
    pub tokenizer: &'a Tokenizer,
    pub template: &'a ChatTemplate,
    pub eos_token: String,
}

impl Encoder<'_> {
    /// Reads every dataset spec, in order. Bad lines are skipped and returned (or, with
    /// `strict`, the first one is an error).
    pub fn load(
        &self,
        specs: &[String],
        opts: &DataOptions,
        seed: u64,
    ) -> Result<(Vec<Sample>, Vec<Skipped>)> {
        let mut all = Vec::new();
        let mut skipped = Vec::new();
        for spec in specs {
            let (path, n) = parse_dataset_spec(spec)?;
            let mut samples = self.load_file(&path, opts, &mut skipped)?;
            if let Some(n) = n {
                samples = sample_n(samples, n, seed, &path)?;
            }
            all.extend(samples);
        }
        Ok((all, skipped))
    }

    fn load_file(
        &self,
        path: &Path,
        opts: &DataOptions,
        skipped: &mut Vec<Skipped>,
    ) -> Result<Vec<Sample>> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading dataset {}", path.display()))?;
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let origin = format!("{}:{}", path.display(), i + 1);
            match self.encode_line(line).and_then(|s| truncate(s, opts)) {
                Ok(mut s) => {
                    s.origin = origin;
                    out.push(s);
                }
                Err(e) if opts.strict => bail!("{origin}: {e:#}"),
                Err(e) => skipped.push(Skipped {
                    origin,
                    reason: format!("{e:#}"),
                }),
            }
        }
        if out.is_empty() {
            bail!(
                "dataset {} has no usable sample ({} lines skipped{})",
                path.display(),
                skipped.len(),
                skipped
                    .first()
                    .map(|s| format!("; first: {s}"))
                    .unwrap_or_default()
            );
        }
        Ok(out)
    }

    /// One JSONL line.
    pub fn encode_line(&self, line: &str) -> Result<Sample> {
        let v: Value = serde_json::from_str(line).context("not valid JSON")?;
        let obj = v.as_object().context("a line must be a JSON object")?;
        for key in ["images", "audios", "videos"] {
            if obj
                .get(key)
                .is_some_and(|m| m.as_array().is_some_and(|a| !a.is_empty()))
            {
                bail!("the sample has {key}; training on media is not supported for a text model");
            }
        }
        let msgs = obj
            .get("messages")
            .and_then(Value::as_array)
            .context("no \"messages\" list")?;
        let tools = match obj.get("tools") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.trim().is_empty() => None,
            Some(Value::String(s)) => Some(
                serde_json::from_str::<Value>(s).context("\"tools\" is a string but not JSON")?,
            ),
            Some(v) => Some(v.clone()),
        };
        let tools: Option<Vec<Value>> = match tools {
            None => None,
            Some(Value::Array(a)) => Some(a),
            Some(v @ Value::Object(_)) => Some(vec![v]),
            Some(_) => bail!("\"tools\" must be a list of tool declarations"),
        };
        let (messages, loss) = to_messages(msgs)?;
        self.encode(&messages, &loss, tools.as_deref())
    }

    /// Token ids and labels of a conversation; `loss[i]` says whether message `i` (an assistant
    /// turn) is learned.
    pub fn encode(
        &self,
        messages: &[Message],
        loss: &[bool],
        tools: Option<&[Value]>,
    ) -> Result<Sample> {
        if !messages
            .iter()
            .zip(loss)
            .any(|(m, &l)| m.role == "assistant" && l)
        {
            bail!("no assistant turn with a loss: nothing to learn");
        }
        let strip = |s: String| -> String {
            match s.strip_suffix(&self.eos_token) {
                Some(t) => t.to_owned(),
                None => s,
            }
        };
        let (mut ids, mut labels) = (Vec::new(), Vec::new());
        let mut prev = String::new();
        let mut push = |text: &str, learn: bool| -> Result<()> {
            let toks = self.tokenizer.encode(text)?;
            labels.extend(toks.iter().map(|&t| if learn { t as i32 } else { IGNORE }));
            ids.extend(toks);
            Ok(())
        };
        for (i, m) in messages.iter().enumerate() {
            let full = strip(self.template.render(&messages[..=i], tools, false)?);
            let Some(added) = full.strip_prefix(prev.as_str()) else {
                bail!("the chat template does not render this conversation prefix by prefix");
            };
            if m.role == "assistant" && loss[i] {
                if i == 0 {
                    bail!("the conversation starts with an assistant turn");
                }
                let head = self.template.render(&messages[..i], tools, true)?;
                let Some(role) = head.strip_prefix(prev.as_str()) else {
                    bail!("the chat template's generation prompt does not extend the conversation");
                };
                let Some(content) = added.strip_prefix(role) else {
                    bail!("the chat template's assistant turn does not start with its generation prompt");
                };
                push(role, false)?;
                push(content, true)?;
            } else {
                push(added, false)?;
            }
            prev = full;
        }
        if let Some(l) = labels.first_mut() {
            *l = IGNORE;
        }
        Ok(Sample {
            input_ids: ids,
            labels,
            origin: String::new(),
        })
    }
}

/// ms-swift messages to the template's, with each one's loss flag: `tool_call` messages join
/// the assistant turn they belong to (as its `tool_calls`), `tool_response` becomes `tool`.
fn to_messages(msgs: &[Value]) -> Result<(Vec<Message>, Vec<bool>)> {
    let mut out: Vec<Message> = Vec::new();
    let mut loss = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .with_context(|| format!("message {} has no \"role\"", i + 1))?;
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) => String::new(),
            Some(_) => bail!("message {} content must be a string", i + 1),
        };
        let learn = m.get("loss").and_then(Value::as_bool).unwrap_or(true);
        match role {
            "system" | "user" => {
                out.push(Message::new(role, &content));
                loss.push(false);
            }
            "assistant" => {
                if content.is_empty() && m.get("tool_calls").is_none() {
                    bail!("message {} is an empty assistant turn", i + 1);
                }
                let mut msg = Message::new("assistant", &content);
                if let Some(tc) = m.get("tool_calls") {
                    msg.extra.insert("tool_calls".into(), tc.clone());
                }
                out.push(msg);
                loss.push(learn);
            }
            "tool_call" => {
                let call: Value = serde_json::from_str(&content).with_context(|| {
                    format!("message {} (tool_call) is not a JSON object", i + 1)
                })?;
                let call = json!({"function": {"name": call.get("name").cloned().unwrap_or(Value::Null),
                    "arguments": call.get("arguments").cloned().unwrap_or(Value::Object(Map::new()))}});
                // Consecutive calls (and a preceding assistant text) are one assistant turn.
                match out.last_mut() {
                    Some(last) if last.role == "assistant" => {
                        let calls = last
                            .extra
                            .entry("tool_calls")
                            .or_insert_with(|| Value::Array(Vec::new()));
                        if let Value::Array(a) = calls {
                            a.push(call);
                        }
                        let l = loss.last_mut().expect("one flag per message");
                        *l = *l && learn;
                    }
                    _ => {
                        let mut msg = Message::new("assistant", "");
                        msg.extra.insert("tool_calls".into(), json!([call]));
                        out.push(msg);
                        loss.push(learn);
                    }
                }
            }
            "tool" | "tool_response" => {
                out.push(Message::new("tool", &content));
                loss.push(false);
            }
            other => bail!(
                "message {} has role {other:?} (expected system, user, assistant, tool_call, tool_response or tool)",
                i + 1
            ),
        }
    }
    if out.is_empty() {
        bail!("\"messages\" is empty");
    }
    Ok((out, loss))
}

fn truncate(mut s: Sample, opts: &DataOptions) -> Result<Sample> {
    let n = s.input_ids.len();
    if n > opts.max_length {
        match opts.truncation {
            Truncation::Delete => bail!(
                "{n} tokens, over --max-length {} (--truncation-strategy delete)",
                opts.max_length
            ),
            Truncation::Right => {
                s.input_ids.truncate(opts.max_length);
                s.labels.truncate(opts.max_length);
            }
            Truncation::Left => {
                s.input_ids.drain(..n - opts.max_length);
                s.labels.drain(..n - opts.max_length);
                s.labels[0] = IGNORE;
            }
        }
        if s.labelled() == 0 {
            bail!(
                "no labelled token left after truncating {n} tokens to {}",
                opts.max_length
            );
        }
    }
    Ok(s)
}

fn sample_n(samples: Vec<Sample>, n: usize, seed: u64, path: &Path) -> Result<Vec<Sample>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..samples.len()).collect();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        order.shuffle(&mut rng);
        let take = (n - out.len()).min(order.len());
        out.extend(order[..take].iter().map(|&i| samples[i].clone()));
    }
    if out.is_empty() {
        bail!("dataset {} gave no samples", path.display());
    }
    Ok(out)
}

/// Splits off the last `ratio` of `samples` (after a seeded shuffle) as a validation set.
pub fn split(
    mut samples: Vec<Sample>,
    ratio: f64,
    seed: u64,
) -> Result<(Vec<Sample>, Vec<Sample>)> {
    if !(0.0..1.0).contains(&ratio) {
        bail!("--split-dataset-ratio must be in [0, 1)");
    }
    if ratio == 0.0 {
        return Ok((samples, Vec::new()));
    }
    samples.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let n_val = ((samples.len() as f64 * ratio).round() as usize).max(1);
    if n_val >= samples.len() {
        bail!("--split-dataset-ratio {ratio} leaves no training sample");
    }
    let val = samples.split_off(samples.len() - n_val);
    Ok((samples, val))
}
