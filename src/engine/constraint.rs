//! Constrained decoding: a grammar masks every token that could not continue a valid output, so
//! what comes out parses and matches its schema whatever the weights (random ones included).
//! The grammar engine is llguidance; this file only builds its token trie from our tokenizer
//! and turns the OpenAI request shapes (`response_format`, forced tool calls) into grammars.

use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use crate::text::Tokenizer;

/// What the output must be.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// One JSON value matching this JSON Schema.
    JsonSchema(Value),
    /// One Phi-4 tool-call block, `<|tool_call|>[{"name": …, "arguments": {…}}, …]<|/tool_call|>`,
    /// calling only these functions (name, JSON Schema of the arguments), at most `max_calls`
    /// of them: a bound keeps even a degenerate model from listing calls forever.
    ToolCalls {
        tools: Vec<(String, Value)>,
        max_calls: usize,
    },
    /// A grammar in llguidance's Lark dialect.
    Lark(String),
}

impl Grammar {
    /// Any JSON object (OpenAI's `response_format: json_object`).
    pub fn json_object() -> Grammar {
        Grammar::JsonSchema(json!({"type": "object"}))
    }

    fn to_llguidance(&self) -> Result<TopLevelGrammar> {
        Ok(match self {
            Grammar::JsonSchema(schema) => TopLevelGrammar::from_json_schema(with_style(schema)?),
            Grammar::ToolCalls { tools, max_calls } => {
                if tools.is_empty() || *max_calls == 0 {
                    bail!("a forced tool call needs at least one tool and one call");
                }
                let calls: Vec<Value> = tools
                    .iter()
                    .map(|(name, params)| {
                        json!({
                            "type": "object",
                            "properties": {"name": {"const": name}, "arguments": params},
                            "required": ["name", "arguments"],
                            "additionalProperties": false
                        })
                    })
                    .collect();
                let list = with_style(&json!({
                    "type": "array",
                    "items": {"anyOf": calls},
                    "minItems": 1,
                    "maxItems": max_calls
                }))?;
                TopLevelGrammar::from_lark(format!(
                    "start: \"<|tool_call|>\" calls \"<|/tool_call|>\"\ncalls: %json {list}\n"
                ))
            }
            Grammar::Lark(src) => TopLevelGrammar::from_lark(src.clone()),
        })
    }
}

/// Compact JSON in the spacing Python's `json.dumps` uses (and Phi-4 saw in training), with no
/// free whitespace: a random model could otherwise pad forever.
fn with_style(schema: &Value) -> Result<Value> {
    let Value::Object(map) = schema else {
        if let Value::Bool(_) = schema {
            return Ok(schema.clone());
        }
        bail!("a JSON Schema must be an object or a boolean");
    };
    let mut map = map.clone();
    map.entry("x-guidance").or_insert_with(
        || json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
    );
    Ok(Value::Object(map))
}

/// Token trie over the model's vocabulary; ids the tokenizer lacks (padding rows of the
/// embedding) get no bytes and are never allowed.
struct PhiTokEnv {
    trie: TokTrie,
}

impl TokenizerEnv for PhiTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }

    fn tokenize_is_canonical(&self) -> bool {
        // Greedy trie tokenization is not what BPE would produce; llguidance then never forces
        // multi-token sequences it could get wrong.
        false
    }
}

/// Builds matchers for one vocabulary; costly to make (it indexes every token), cheap to use.
pub struct ConstraintFactory {
    factory: ParserFactory,
}

impl ConstraintFactory {
    /// `stop_ids` are the ids that end a sequence; a finished grammar allows only those.
    pub fn new(tokenizer: &Tokenizer, vocab_size: usize, stop_ids: &[u32]) -> Result<Self> {
        let mut words: Vec<Vec<u8>> = tokenizer.token_bytes()?.to_vec();
        if words.len() > vocab_size {
            bail!(
                "the tokenizer has {} tokens but the model only {vocab_size}",
                words.len()
            );
        }
        words.resize(vocab_size, Vec::new());
        let eos = *stop_ids
            .first()
            .ok_or_else(|| anyhow!("constrained decoding needs an end-of-sequence token"))?;
        let info = TokRxInfo::new(vocab_size as u32, eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(stop_ids);
        let env: TokEnv = Arc::new(PhiTokEnv { trie });
        let mut factory = ParserFactory::new_simple(&env)?;
        factory.quiet();
        Ok(ConstraintFactory { factory })
    }

    /// A fresh matcher for `grammar`; an invalid grammar or schema is an error naming it.
    pub fn constraint(&self, grammar: &Grammar) -> Result<Constraint> {
        let parser = self
            .factory
            .create_parser(grammar.to_llguidance()?)
            .map_err(|e| anyhow!("invalid grammar: {e}"))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            bail!("invalid grammar: {e}");
        }
        Ok(Constraint { matcher })
    }
}

/// One sequence's grammar state.
pub struct Constraint {
    matcher: Matcher,
}

impl Constraint {
    /// Sets the logit of every token the grammar does not allow next to -inf.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| anyhow!("grammar: {e}"))?;
        for (i, l) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(i as TokenId) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances the grammar past a sampled token.
    pub fn commit(&mut self, tok: u32) -> Result<()> {
        self.matcher
            .consume_token(tok)
            .map_err(|e| anyhow!("grammar: {e}"))
    }

    /// The grammar is complete and allows nothing more.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}
