//! The engine: a loaded model with its tokenizer and chat template, sequences with their KV
//! caches, the LongRoPE policy, stopping rules and the public Rust API, shaped like vLLM's
//! offline API (`generate`, `chat`, and streaming forms taking a callback).

pub mod sampling;

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::config::{GenerationConfig, Phi3Config};
use crate::model::{KvCache, Logits, Phi3ForCausalLM, RopeTable};
use crate::text::{ChatTemplate, IncrementalDecoder, Message, Tokenizer};
use crate::weights::Checkpoint;
pub use sampling::{Sampler, SamplingParams};

/// Which LongRoPE table a sequence uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RopePolicy {
    /// transformers' rule: short factors while the sequence fits the original context; when it
    /// first grows past it, the KV cache is discarded and the whole sequence re-prefilled with
    /// the long factors (never mixing tables in one cache).
    #[default]
    Dynamic,
    /// Long factors for every position from the start (vLLM's rule for long-context serving).
    StaticLong,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached, or the context is full.
    Length,
    /// The stream callback asked to stop.
    Cancelled,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub time_to_first_token_ms: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Output {
    pub prompt_ids: Vec<u32>,
    /// Every sampled id, the end-of-sequence id that stopped generation included.
    pub generated_ids: Vec<u32>,
    /// Text of the generated ids: special tokens and anything from a stop string on removed.
    pub text: String,
    pub finish_reason: FinishReason,
    pub timings: Timings,
}

/// One step of a stream: the sampled id and the text that became final with it (often empty
/// while a multi-byte character or a possible stop string is incomplete).
pub struct StreamEvent<'a> {
    pub token: u32,
    pub text: &'a str,
}

pub struct Engine {
    pub model: Phi3ForCausalLM,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// Ids that end generation.
    pub stop_ids: Vec<u32>,
    pub rope_policy: RopePolicy,
    /// Longest sequence (prompt + output) accepted; defaults to the model's context.
    pub max_model_len: usize,
}

/// One sequence being generated: its tokens and its cache.
pub struct Sequence {
    pub tokens: Vec<u32>,
    cache: KvCache,
}

impl Sequence {
    /// The rotary table the cached keys were built with.
    pub fn rope_table(&self) -> Option<RopeTable> {
        self.cache.table
    }
}

impl Engine {
    /// Loads a model directory in the Hugging Face layout.
    pub fn load(dir: &Path) -> Result<Engine> {
        Self::load_with_progress(dir, &mut |_, _| {})
    }

    /// As [`Engine::load`], reporting (bytes read, total bytes) while the weights are paged in.
    pub fn load_with_progress(dir: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<Engine> {
        for f in ["config.json", "tokenizer.json"] {
            if !dir.join(f).exists() {
                bail!(
                    "{} has no {f}; is it a Hugging Face model directory?",
                    dir.display()
                );
            }
        }
        let config = Phi3Config::from_file(&dir.join("config.json"))?;
        let gen_path = dir.join("generation_config.json");
        let gen = if gen_path.exists() {
            GenerationConfig::from_file(&gen_path)?
        } else {
            GenerationConfig::default()
        };
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
        let template = ChatTemplate::from_model_dir(dir)?;
        let ckpt = Checkpoint::open_dir(dir)?;
        let total = ckpt.mapped_bytes();
        let model = Phi3ForCausalLM::load(config, &ckpt)
            .with_context(|| format!("loading weights from {}", dir.display()))?;
        ckpt.prefault(|done| progress(done, total));
        Ok(Engine::new(model, tokenizer, template, &gen))
    }

    pub fn new(
        model: Phi3ForCausalLM,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        gen: &GenerationConfig,
    ) -> Engine {
        // Stop on every eos id either config names, and always on <|end|> and <|endoftext|>:
        // the configs alone miss <|end|> in some releases (spec P6).
        let mut stop_ids: Vec<u32> = Vec::new();
        for ids in [&gen.eos_token_id, &model.config.eos_token_id]
            .into_iter()
            .flatten()
        {
            stop_ids.extend(ids.to_vec());
        }
        for (token, id) in [("<|end|>", 200020), ("<|endoftext|>", 199999)] {
            match tokenizer.token_id(token) {
                Some(i) => stop_ids.push(i),
                None if (id as usize) < model.config.vocab_size => stop_ids.push(id),
                None => {}
            }
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let max_model_len = model.config.max_position_embeddings;
        Engine {
            model,
            tokenizer,
            template,
            stop_ids,
            rope_policy: RopePolicy::Dynamic,
            max_model_len,
        }
    }

    /// Renders a chat to prompt text with the generation prompt appended.
    pub fn render_chat(&self, messages: &[Message], tools: Option<&[Value]>) -> Result<String> {
        self.template.render(messages, tools, true)
    }

    /// Completes raw prompts (no chat template), one output per prompt.
    pub fn generate(&self, prompts: &[&str], params: &SamplingParams) -> Result<Vec<Output>> {
        prompts
            .iter()
            .map(|p| {
                let ids = self.tokenizer.encode(p)?;
                self.generate_ids(&ids, params, &mut |_| true)
            })
            .collect()
    }

    /// Answers a chat.
    pub fn chat(&self, messages: &[Message], params: &SamplingParams) -> Result<Output> {
        self.chat_stream(messages, None, params, &mut |_| true)
    }

    /// Answers a chat, calling `on_event` for every generated token; return false to stop.
    pub fn chat_stream(
        &self,
        messages: &[Message],
        tools: Option<&[Value]>,
        params: &SamplingParams,
        on_event: &mut dyn FnMut(&StreamEvent) -> bool,
    ) -> Result<Output> {
        let prompt = self.render_chat(messages, tools)?;
        let ids = self.tokenizer.encode(&prompt)?;
        self.generate_ids(&ids, params, on_event)
    }

    /// The table a sequence of `len` tokens uses under the current policy.
    fn table_for(&self, len: usize) -> RopeTable {
        match self.rope_policy {
            RopePolicy::Dynamic => self.model.rope.table_for_len(len),
            RopePolicy::StaticLong
                if self.model.rope.original_max_position_embeddings.is_some() =>
            {
                RopeTable::Long
            }
            RopePolicy::StaticLong => RopeTable::Short,
        }
    }

    /// Starts a sequence: prefills `prompt` and returns the logits of its last position.
    pub fn start(&self, prompt: &[u32]) -> Result<(Sequence, Vec<f32>)> {
        let mut seq = Sequence {
            tokens: prompt.to_vec(),
            cache: self.model.new_cache(),
        };
        let logits = self.step(&mut seq, prompt.len())?;
        Ok((seq, logits))
    }

    /// Appends one token and returns the logits that follow it. Applies the LongRoPE policy.
    pub fn extend(&self, seq: &mut Sequence, tok: u32) -> Result<Vec<f32>> {
        seq.tokens.push(tok);
        self.step(seq, 1)
    }

    /// Feeds `new` (already appended to `seq.tokens`) and returns the last position's logits.
    fn step(&self, seq: &mut Sequence, new: usize) -> Result<Vec<f32>> {
        let table = self.table_for(seq.tokens.len());
        if seq.cache.table.is_some_and(|t| t != table) {
            // The LongRoPE switch: keys rotated with the short table cannot be reused.
            seq.cache.clear();
            return self
                .model
                .forward(&seq.tokens, &mut seq.cache, table, Logits::Last, None);
        }
        let start = seq.tokens.len() - new;
        self.model.forward(
            &seq.tokens[start..],
            &mut seq.cache,
            table,
            Logits::Last,
            None,
        )
    }

    /// Generates from prompt ids.
    pub fn generate_ids(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        on_event: &mut dyn FnMut(&StreamEvent) -> bool,
    ) -> Result<Output> {
        params.validate()?;
        if prompt.is_empty() {
            bail!("the prompt is empty");
        }
        if prompt.len() >= self.max_model_len {
            bail!(
                "the prompt has {} tokens; the context holds {} (prompt plus at least one generated token)",
                prompt.len(),
                self.max_model_len
            );
        }
        if let Some(&bad) = prompt
            .iter()
            .find(|&&t| t as usize >= self.model.config.vocab_size)
        {
            bail!("prompt token id {bad} is outside the model's vocabulary");
        }
        let t0 = Instant::now();
        let mut sampler = Sampler::new(params, prompt);
        let (mut seq, mut logits) = self.start(prompt)?;
        let prefill = t0.elapsed();
        let mut timings = Timings {
            prefill_ms: prefill.as_secs_f64() * 1e3,
            time_to_first_token_ms: prefill.as_secs_f64() * 1e3,
            prefill_tokens_per_s: prompt.len() as f64 / prefill.as_secs_f64(),
            ..Default::default()
        };
        let t1 = Instant::now();
        let mut decoder = IncrementalDecoder::new(true);
        let mut text = String::new();
        let mut emitted = 0;
        let mut generated = Vec::new();
        let finish = loop {
            let tok = sampler.sample(&mut logits);
            sampler.accept(tok);
            generated.push(tok);
            let is_eos = !params.ignore_eos && self.stop_ids.contains(&tok);
            let mut stopped = is_eos;
            if !is_eos {
                text.push_str(&decoder.push(&self.tokenizer, tok)?);
                if !params.stop.is_empty() {
                    // Text before `emitted` cannot hold the start of a stop string: any such
                    // start would have been held back.
                    if let Some(cut) = find_stop(&text, emitted, &params.stop) {
                        text.truncate(cut);
                        stopped = true;
                    }
                }
            }
            // Hold back a tail that may still become a stop string.
            let safe = if stopped {
                text.len()
            } else {
                text.len() - held_back(&text, &params.stop)
            };
            let piece = &text[emitted..safe];
            let keep_going = on_event(&StreamEvent {
                token: tok,
                text: piece,
            });
            emitted = safe;
            if stopped {
                break FinishReason::Stop;
            }
            if !keep_going {
                break FinishReason::Cancelled;
            }
            if generated.len() >= params.max_tokens || seq.tokens.len() + 1 >= self.max_model_len {
                break FinishReason::Length;
            }
            logits = self.extend(&mut seq, tok)?;
        };
        if finish != FinishReason::Stop {
            let rest = decoder.flush(&self.tokenizer)?;
            text.push_str(&rest);
            if emitted < text.len() {
                on_event(&StreamEvent {
                    token: *generated.last().unwrap(),
                    text: &text[emitted..],
                });
            }
        }
        let decode = t1.elapsed();
        timings.decode_ms = decode.as_secs_f64() * 1e3;
        if generated.len() > 1 {
            timings.decode_tokens_per_s = (generated.len() - 1) as f64 / decode.as_secs_f64();
        }
        Ok(Output {
            prompt_ids: prompt.to_vec(),
            generated_ids: generated,
            text,
            finish_reason: finish,
            timings,
        })
    }
}

/// Byte offset of the earliest stop string starting at or after `from`.
fn find_stop(text: &str, from: usize, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i))
        .min()
}

/// Length of the longest tail of `text` that is a proper prefix of some stop string.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for s in stops {
        for k in (1..s.len()).rev() {
            if k <= best {
                break;
            }
            if s.is_char_boundary(k) && text.ends_with(&s[..k]) {
                best = k;
                break;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_string_helpers() {
        let stops = vec!["END".to_string(), "\n\n".to_string()];
        assert_eq!(find_stop("abc END x", 0, &stops), Some(4));
        assert_eq!(find_stop("a\n\nEND", 0, &stops), Some(1));
        assert_eq!(held_back("hello EN", &stops), 2);
        assert_eq!(held_back("hello\n", &stops), 1);
        assert_eq!(held_back("hello", &stops), 0);
    }
}
