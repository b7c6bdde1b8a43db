//! The engine: a loaded model with its tokenizer and chat template, sequences with their KV
//! caches, the LongRoPE policy, stopping rules and the public Rust API, shaped like vLLM's
//! offline API (`generate`, `chat`, and streaming forms taking a callback).

pub mod batcher;
pub mod calibrate;
pub mod constraint;
pub mod generation;
pub mod multimodal;
pub mod perplexity;
pub mod sampling;
pub mod speech;

use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::config::multimodal::Phi4MMConfig;
use crate::config::{GenerationConfig, Phi3Config};
use crate::model::gguf::GgufFile;
use crate::model::{AdapterId, BatchItem, KvCache, Logits, Phi3ForCausalLM, Recipe, RopeTable};
use crate::text::{ChatTemplate, Message, Tokenizer};
use crate::weights::Checkpoint;
pub use batcher::{Batcher, BatcherConfig, Event, SubmitError};
pub use constraint::{ConstraintFactory, Grammar};
pub use generation::{Generation, Request, Step, TokenLogprob, TopLogprob};
pub use multimodal::{LocalMedia, MediaInput, MediaLimits, Multimodal};
pub use sampling::{Sampler, SamplingParams};
pub use speech::{Segment, SpeechOptions, SpeechTask, Transcript};

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
    /// Built on first use: indexing a 200K vocabulary for grammars takes a moment.
    constraints: OnceLock<std::result::Result<ConstraintFactory, String>>,
    /// Phi-4-multimodal's vision and speech parts; `None` for a text model.
    pub mm: Option<Multimodal>,
    /// Names of the fine-tuned LoRA adapters riding unmerged on the decoder (index =
    /// [`AdapterId`]); a request picks one with [`Request::adapter`].
    pub adapters: Vec<String>,
    /// The adapter of requests that name none (`phi4 run|chat --adapters DIR`).
    pub default_adapter: Option<AdapterId>,
}

/// One sequence being generated: its tokens, its cache, and its prompt's media (kept for a
/// re-prefill when the LongRoPE table changes).
pub struct Sequence {
    pub tokens: Vec<u32>,
    cache: KvCache,
    media: Option<std::sync::Arc<MediaInput>>,
    /// The LoRA adapter of every row (a media prompt's mode decides it otherwise).
    adapter: Option<AdapterId>,
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
        Self::load_with_progress(dir, None, &mut |_, _| {})
    }

    /// As [`Engine::load`], with the weight matrices quantized by `quant` if given, reporting
    /// (bytes read, total bytes) while the weights are paged in.
    pub fn load_with_progress(
        dir: &Path,
        quant: Option<Recipe>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Engine> {
        for f in ["config.json", "tokenizer.json"] {
            if !dir.join(f).exists() {
                bail!(
                    "{} has no {f}; is it a Hugging Face model directory?",
                    dir.display()
                );
            }
        }
        let config_path = dir.join("config.json");
        let config_text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?;
        if Phi4MMConfig::is_multimodal(&config_text) {
            return Self::load_multimodal(dir, &config_text, quant, None, progress);
        }
        let config = Phi3Config::from_file(&config_path)?;
        let gen = Self::generation_config(dir)?;
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
        let template = ChatTemplate::from_model_dir(dir)?;
        let mut ckpt = Checkpoint::open_dir(dir)?;
        let total = ckpt.mapped_bytes();
        // Quantizing reads every weight once; the mapping is released when `ckpt` goes.
        let model =
            Phi3ForCausalLM::load_ready(config, &mut ckpt, quant, dir, true, &mut |done| {
                progress(done, total)
            })?;
        Ok(Engine::new(model, tokenizer, template, &gen))
    }

    /// A Phi-4-multimodal engine with adapter `merge` folded into the decoder's weights before
    /// quantization ([`crate::model::phi4mm::merge_adapter`]): requests of that adapter's mode
    /// run at the base model's speed, and requests of any other mode are refused. For a
    /// transcription-only deployment (`phi4 transcribe --merge-adapter`).
    pub fn load_merged(
        dir: &Path,
        quant: Option<Recipe>,
        merge: AdapterId,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Engine> {
        let config_path = dir.join("config.json");
        let config_text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?;
        if !Phi4MMConfig::is_multimodal(&config_text) {
            bail!("only a Phi-4-multimodal checkpoint has adapters to merge");
        }
        Self::load_multimodal(dir, &config_text, quant, Some(merge), progress)
    }

    /// [`Engine::load_with_progress`] for a Phi-4-multimodal directory (either layout).
    fn load_multimodal(
        dir: &Path,
        config_text: &str,
        quant: Option<Recipe>,
        merge: Option<AdapterId>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Engine> {
        let config = Phi4MMConfig::from_json(config_text)
            .with_context(|| format!("in {}", dir.join("config.json").display()))?;
        let gen = Self::generation_config(dir)?;
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
        let template = ChatTemplate::from_model_dir(dir)?;
        let total = std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        let model = crate::model::phi4mm::Phi4MMForCausalLM::load_dir_merged(
            dir,
            config,
            quant,
            merge,
            &mut |d| progress(d, total),
        )?;
        let (lm, mut mm) = Multimodal::split(model);
        mm.merged = merge;
        let mut engine = Engine::new(lm, tokenizer, template, &gen);
        engine.mm = Some(mm);
        Ok(engine)
    }

    fn generation_config(dir: &Path) -> Result<GenerationConfig> {
        let gen_path = dir.join("generation_config.json");
        if gen_path.exists() {
            GenerationConfig::from_file(&gen_path)
        } else {
            Ok(GenerationConfig::default())
        }
    }

    /// Loads a llama.cpp / ollama GGUF file (architecture `phi3`): config, tokenizer, chat
    /// template and weights from the one file ([`crate::model::gguf`]).
    pub fn load_gguf(path: &Path, quant: Option<Recipe>) -> Result<Engine> {
        let g = GgufFile::open(path)?;
        let tok = g.tokenizer_json(crate::text::tokenizer::O200K_PATTERN)?;
        let tokenizer = Tokenizer::from_bytes(&serde_json::to_vec(&tok)?)
            .context("building the tokenizer from the GGUF vocabulary")?;
        let (bos, eos) = g.bos_eos();
        let name = |id: Option<i64>| id.and_then(|i| g.token(i)).unwrap_or("<|endoftext|>");
        let template = ChatTemplate::new(
            g.chat_template()
                .unwrap_or(crate::text::chat::PHI4_CHAT_TEMPLATE),
            name(bos),
            name(eos),
        )?;
        let model = g.model(quant)?;
        Ok(Engine::new(
            model,
            tokenizer,
            template,
            &GenerationConfig::default(),
        ))
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
            constraints: OnceLock::new(),
            mm: None,
            adapters: Vec::new(),
            default_adapter: None,
        }
    }

    /// Loads a PEFT LoRA adapter (ours, PEFT's or an ms-swift checkpoint directory) onto the
    /// decoder, unmerged, under `name`; requests asking for it get its deltas on their rows,
    /// and requests with different adapters still decode in one batch. Returns its id.
    pub fn add_adapter(&mut self, name: &str, dir: &Path) -> Result<AdapterId> {
        if self.mm.is_some() {
            bail!("fine-tuned adapters on Phi-4-multimodal are not supported yet (its vision and speech adapters are built in)");
        }
        if self.adapters.iter().any(|n| n == name) {
            bail!("two adapters are named {name:?}");
        }
        let params = crate::train::LoraParams::load_peft(&self.model, dir)
            .with_context(|| format!("loading adapter {}", dir.display()))?;
        let id = self.adapters.len();
        params.attach(&mut self.model, id)?;
        self.adapters.push(name.to_string());
        Ok(id)
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
        let (ids, media) = self.encode_chat(messages, tools)?;
        self.generate_media(&ids, media, params, on_event)
    }

    /// The grammar engine for this vocabulary.
    pub fn constraint_factory(&self) -> Result<&ConstraintFactory> {
        self.constraints
            .get_or_init(|| {
                ConstraintFactory::new(
                    &self.tokenizer,
                    self.model.config.vocab_size,
                    &self.stop_ids,
                )
                .map_err(|e| format!("{e:#}"))
            })
            .as_ref()
            .map_err(|e| anyhow::anyhow!("constrained decoding is unavailable: {e}"))
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
        self.start_with(prompt, None)
    }

    /// [`Engine::start`] for a prompt with media (image rows and the adapter they route to).
    pub fn start_with(
        &self,
        prompt: &[u32],
        media: Option<std::sync::Arc<MediaInput>>,
    ) -> Result<(Sequence, Vec<f32>)> {
        self.start_adapter(prompt, media, None)
    }

    /// [`Engine::start_with`] on fine-tuned adapter `adapter` ([`Engine::add_adapter`]).
    pub fn start_adapter(
        &self,
        prompt: &[u32],
        media: Option<std::sync::Arc<MediaInput>>,
        adapter: Option<AdapterId>,
    ) -> Result<(Sequence, Vec<f32>)> {
        let adapter = media.as_ref().and_then(|m| m.adapter).or(adapter);
        let mut seq = Sequence {
            tokens: prompt.to_vec(),
            cache: self.model.new_cache(),
            media,
            adapter,
        };
        let table = self.table_for(prompt.len());
        let mut logits = Vec::new();
        let item = BatchItem {
            adapter: seq.adapter,
            embeds: seq.media.as_ref().map(|m| &m.embeds),
            ..BatchItem::new(prompt, &mut seq.cache, table)
        };
        self.model
            .forward_item(item, Logits::Last, None, &mut logits)?;
        Ok((seq, logits))
    }

    /// Appends one token and returns the logits that follow it. Applies the LongRoPE policy.
    pub fn extend(&self, seq: &mut Sequence, tok: u32) -> Result<Vec<f32>> {
        seq.tokens.push(tok);
        let mut out = self.forward_pending(&mut [seq])?;
        Ok(out.pop().expect("one sequence in, one out"))
    }

    /// Runs the last token of each sequence (already appended to its `tokens`) through one
    /// batched forward pass and returns the logits that follow, one vector per sequence. A
    /// sequence that just crossed the LongRoPE threshold has its cache dropped and joins the
    /// pass with all its tokens (the same re-prefill transformers does).
    pub fn forward_pending(&self, seqs: &mut [&mut Sequence]) -> Result<Vec<Vec<f32>>> {
        let mut items: Vec<BatchItem> = Vec::with_capacity(seqs.len());
        for seq in seqs.iter_mut() {
            let table = self.table_for(seq.tokens.len());
            let Sequence {
                tokens,
                cache,
                media,
                adapter,
            } = &mut **seq;
            let new = if cache.table.is_some_and(|t| t != table) {
                // Keys rotated with the short table cannot be reused.
                cache.clear();
                &tokens[..]
            } else {
                &tokens[tokens.len() - 1..]
            };
            items.push(BatchItem {
                adapter: *adapter,
                embeds: media.as_ref().map(|m| &m.embeds),
                ..BatchItem::new(new, cache, table)
            });
        }
        self.model.forward_batch(&mut items)
    }

    /// Generates from prompt ids.
    pub fn generate_ids(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        on_event: &mut dyn FnMut(&StreamEvent) -> bool,
    ) -> Result<Output> {
        self.generate_media(prompt, None, params, on_event)
    }

    /// Generates from prompt ids with the prompt's media ([`Engine::encode_with_images`]).
    pub fn generate_media(
        &self,
        prompt: &[u32],
        media: Option<std::sync::Arc<MediaInput>>,
        params: &SamplingParams,
        on_event: &mut dyn FnMut(&StreamEvent) -> bool,
    ) -> Result<Output> {
        let t0 = Instant::now();
        let (mut g, mut logits) = self.begin(Request {
            prompt: prompt.to_vec(),
            params: params.clone(),
            media,
            ..Default::default()
        })?;
        let prefill = t0.elapsed();
        let mut timings = Timings {
            prefill_ms: prefill.as_secs_f64() * 1e3,
            time_to_first_token_ms: prefill.as_secs_f64() * 1e3,
            prefill_tokens_per_s: prompt.len() as f64 / prefill.as_secs_f64(),
            ..Default::default()
        };
        let t1 = Instant::now();
        loop {
            let step = self.sample_next(&mut g, &mut logits)?;
            let keep_going = on_event(&StreamEvent {
                token: step.token,
                text: &step.text,
            });
            if step.finish.is_some() {
                break;
            }
            if !keep_going {
                let rest = g.cancel(&self.tokenizer)?;
                if !rest.is_empty() {
                    on_event(&StreamEvent {
                        token: step.token,
                        text: &rest,
                    });
                }
                break;
            }
            logits = self.extend_generation(&mut g)?;
        }
        let decode = t1.elapsed();
        timings.decode_ms = decode.as_secs_f64() * 1e3;
        if g.generated.len() > 1 {
            timings.decode_tokens_per_s = (g.generated.len() - 1) as f64 / decode.as_secs_f64();
        }
        Ok(Output {
            prompt_ids: prompt.to_vec(),
            finish_reason: g.finish.unwrap_or(FinishReason::Cancelled),
            text: g.text,
            generated_ids: g.generated,
            timings,
        })
    }
}
