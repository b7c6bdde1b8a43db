//! One request's generation as a state machine: sample from the logits a forward pass produced,
//! decide whether to stop, hand back the text that became final. The single-sequence loop
//! ([`Engine::generate_ids`]) and the batcher drive the same machine, so both stop, detokenize
//! and hold back stop strings identically.

use anyhow::{bail, Result};
use serde::Serialize;

use super::constraint::{Constraint, Grammar};
use super::sampling::{Sampler, SamplingParams};
use super::{Engine, FinishReason, Sequence};
use crate::text::{IncrementalDecoder, Tokenizer};

/// Most alternatives `logprobs` may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// What to generate.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Output must follow this grammar.
    pub grammar: Option<Grammar>,
    /// Report each sampled token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
    /// The prompt's images, ready for the decoder ([`Engine::encode_with_images`]).
    pub media: Option<std::sync::Arc<super::MediaInput>>,
    /// A fine-tuned adapter ([`Engine::add_adapter`]); `None`: the base weights.
    pub adapter: Option<crate::model::AdapterId>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// Log-probabilities from the model's raw distribution (before penalties, temperature and
/// grammar masking), as OpenAI and vLLM report them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenLogprob {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    pub top: Vec<TopLogprob>,
}

/// One sampled token.
#[derive(Debug, Clone)]
pub struct Step {
    pub token: u32,
    /// Text that became final with this token (may be empty).
    pub text: String,
    pub logprob: Option<TokenLogprob>,
    /// Set on the last step.
    pub finish: Option<FinishReason>,
}

pub struct Generation {
    pub seq: Sequence,
    pub params: SamplingParams,
    sampler: Sampler,
    constraint: Option<Constraint>,
    logprobs: Option<usize>,
    decoder: IncrementalDecoder,
    /// Text so far (a stop string and what follows it removed).
    pub text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    /// Every sampled id; the last one is not in `seq.tokens` until the next forward pass.
    pub generated: Vec<u32>,
    pub finish: Option<FinishReason>,
    pub prompt_len: usize,
}

impl Generation {
    /// Ends the generation early; returns text that was still held back.
    pub fn cancel(&mut self, tok: &Tokenizer) -> Result<String> {
        self.finish = Some(FinishReason::Cancelled);
        let rest = self.decoder.flush(tok)?;
        self.text.push_str(&rest);
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        Ok(out)
    }
}

impl Engine {
    /// Rejects a request the engine cannot run, naming the problem.
    pub fn check_request(&self, req: &Request) -> Result<()> {
        req.params.validate()?;
        let prompt = &req.prompt;
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
        if let Some(mm) = &self.mm {
            // Image and audio ids stand for media rows: a prompt holds them exactly where its
            // media's rows go (a literal one in text or ids would take a medium's place).
            let (image_id, audio_id) = (mm.config.vision.image_token_id, mm.config.audio_token_id);
            let rows = req.media.as_ref().map_or(0, |m| m.embeds.len());
            let slots = prompt
                .iter()
                .filter(|&&t| t == image_id || t == audio_id)
                .count();
            if slots != rows {
                bail!(
                    "the prompt holds {slots} media tokens (image id {image_id}, audio id {audio_id}) for {rows} media rows; place media with <|image_N|> and <|audio_N|>"
                );
            }
            mm.check_mode(
                req.media
                    .as_ref()
                    .map_or(crate::model::phi4mm::InputMode::Language, |m| m.mode),
            )?;
            if let Some(m) = &req.media {
                if let Some(&p) = m.embeds.positions().iter().find(|&&p| {
                    p >= prompt.len() || (prompt[p] != image_id && prompt[p] != audio_id)
                }) {
                    bail!("media row at position {p} does not stand on an image or audio token");
                }
            }
        } else if req.media.is_some() {
            self.multimodal()?;
        }
        if let Some(a) = req.adapter {
            if a >= self.adapters.len() {
                bail!(
                    "adapter {a} is not loaded ({} adapters)",
                    self.adapters.len()
                );
            }
        }
        if req.logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
            bail!("top_logprobs must be at most {MAX_TOP_LOGPROBS}");
        }
        Ok(())
    }

    /// Checks the request, compiles its grammar and prefills its prompt; returns the state and
    /// the logits of the prompt's last position.
    pub fn begin(&self, req: Request) -> Result<(Generation, Vec<f32>)> {
        self.check_request(&req)?;
        let constraint = match &req.grammar {
            Some(g) => Some(self.constraint_factory()?.constraint(g)?),
            None => None,
        };
        let (seq, logits) = self.start_adapter(
            &req.prompt,
            req.media.clone(),
            req.adapter.or(self.default_adapter),
        )?;
        let g = Generation {
            seq,
            sampler: Sampler::new(&req.params, &req.prompt),
            params: req.params,
            constraint,
            logprobs: req.logprobs,
            decoder: IncrementalDecoder::new(true),
            text: String::new(),
            emitted: 0,
            generated: Vec::new(),
            finish: None,
            prompt_len: req.prompt.len(),
        };
        Ok((g, logits))
    }

    /// Samples the next token from `logits` (modified in place) and applies the stopping rules.
    pub fn sample_next(&self, g: &mut Generation, logits: &mut [f32]) -> Result<Step> {
        if g.finish.is_some() {
            bail!("generation already finished");
        }
        let raw = g.logprobs.map(|_| logits.to_vec());
        if let Some(c) = g.constraint.as_mut() {
            c.mask(logits)?;
        }
        let tok = g.sampler.sample(logits);
        g.sampler.accept(tok);
        if let Some(c) = g.constraint.as_mut() {
            c.commit(tok)?;
        }
        g.generated.push(tok);
        let logprob = match (raw, g.logprobs) {
            (Some(raw), Some(n)) => Some(self.logprobs_of(&raw, tok, n)?),
            _ => None,
        };
        let stops = &g.params.stop;
        let is_eos = !g.params.ignore_eos && self.stop_ids.contains(&tok);
        let mut stopped = is_eos;
        if !is_eos {
            g.text.push_str(&g.decoder.push(&self.tokenizer, tok)?);
            if !stops.is_empty() {
                // Text before `emitted` cannot hold the start of a stop string: any such
                // start would have been held back.
                if let Some(cut) = find_stop(&g.text, g.emitted, stops) {
                    g.text.truncate(cut);
                    stopped = true;
                }
            }
            // A complete grammar that allows nothing more ends the output even if the model
            // would not sample an end token (ignore_eos).
            if g.constraint.as_ref().is_some_and(Constraint::is_finished) {
                stopped = true;
            }
        }
        let finish = if stopped {
            Some(FinishReason::Stop)
        } else if g.generated.len() >= g.params.max_tokens
            || g.seq.tokens.len() + 1 >= self.max_model_len
        {
            Some(FinishReason::Length)
        } else {
            None
        };
        if finish == Some(FinishReason::Length) {
            let rest = g.decoder.flush(&self.tokenizer)?;
            g.text.push_str(&rest);
        }
        // Hold back a tail that may still become a stop string.
        let safe = if finish.is_some() {
            g.text.len()
        } else {
            g.text.len() - held_back(&g.text, stops)
        };
        let text = g.text[g.emitted..safe].to_string();
        g.emitted = safe;
        g.finish = finish;
        Ok(Step {
            token: tok,
            text,
            logprob,
            finish,
        })
    }

    /// Feeds the token `g` sampled last and returns the logits that follow it.
    pub fn extend_generation(&self, g: &mut Generation) -> Result<Vec<f32>> {
        let tok = *g.generated.last().expect("a token was sampled");
        self.extend(&mut g.seq, tok)
    }

    /// As [`Engine::extend_generation`] for many generations in one batched pass.
    pub fn extend_generations(&self, gens: &mut [&mut Generation]) -> Result<Vec<Vec<f32>>> {
        let mut seqs: Vec<&mut Sequence> = Vec::with_capacity(gens.len());
        for g in gens.iter_mut() {
            let tok = *g.generated.last().expect("a token was sampled");
            g.seq.tokens.push(tok);
            seqs.push(&mut g.seq);
        }
        self.forward_pending(&mut seqs)
    }

    fn logprobs_of(&self, raw: &[f32], tok: u32, n_top: usize) -> Result<TokenLogprob> {
        let max = raw.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = max + raw.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
        let entry = |id: u32| -> Result<TopLogprob> {
            let bytes = self.tokenizer.bytes_of(id)?.to_vec();
            Ok(TopLogprob {
                token: String::from_utf8_lossy(&bytes).into_owned(),
                bytes,
                logprob: raw[id as usize] - lse,
            })
        };
        let mut top = Vec::new();
        if n_top > 0 {
            let mut ids: Vec<u32> = (0..raw.len() as u32).collect();
            let k = n_top.min(ids.len());
            ids.select_nth_unstable_by(k - 1, |&a, &b| raw[b as usize].total_cmp(&raw[a as usize]));
            ids.truncate(k);
            ids.sort_by(|&a, &b| raw[b as usize].total_cmp(&raw[a as usize]));
            top = ids.into_iter().map(entry).collect::<Result<_>>()?;
        }
        let e = entry(tok)?;
        Ok(TokenLogprob {
            token: e.token,
            bytes: e.bytes,
            logprob: e.logprob,
            top,
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
