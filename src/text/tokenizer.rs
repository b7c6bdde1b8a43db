//! The checkpoint's `tokenizer.json`, read by the `tokenizers` crate (the same engine
//! transformers uses), so added-token flags such as `rstrip` on the role tags behave exactly as
//! in the reference.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, Context, Result};

/// The o200k_base pre-tokenizer split (tiktoken's pattern), used to build a `tokenizer.json`
/// from a vocabulary that carries only tokens and merges (GGUF files).
pub const O200K_PATTERN: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    "|",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    "|",
    r"\p{N}{1,3}",
    "|",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    "|",
    r"\s*[\r\n]+",
    "|",
    r"\s+(?!\S)",
    "|",
    r"\s+",
);

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The bytes each id stands for; special tokens carry a leading 0xFF (toktrie's marker).
    /// Only grammars and logprobs need them, so they are worked out on first use, not at load.
    token_bytes: OnceLock<Result<Vec<Vec<u8>>, String>>,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let bytes =
            std::fs::read(path).with_context(|| format!("reading tokenizer {}", path.display()))?;
        Self::from_bytes(&bytes).with_context(|| format!("in {}", path.display()))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| anyhow!("not a valid tokenizer.json: {e}"))?;
        Ok(Tokenizer {
            inner,
            token_bytes: OnceLock::new(),
        })
    }

    /// Token ids of `text`. Phi-4 adds no BOS: prompts start at `<|system|>` or `<|user|>`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizing failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`. With `skip_special`, tokens flagged special are dropped; the Phi-4 tool
    /// markers are not flagged special and so survive, as tool-call parsers need.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| anyhow!("detokenizing failed: {e}"))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Bytes of every token id (index = id), special tokens prefixed with 0xFF.
    pub fn token_bytes(&self) -> Result<&[Vec<u8>]> {
        self.token_bytes
            .get_or_init(|| {
                let json = serde_json::to_value(&self.inner).map_err(|e| e.to_string())?;
                llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| e.to_string())
            })
            .as_deref()
            .map_err(|e| anyhow!("reading token bytes from tokenizer.json: {e}"))
    }

    /// The bytes `id` stands for, without the special marker (empty if unknown).
    pub fn bytes_of(&self, id: u32) -> Result<&[u8]> {
        Ok(
            match self.token_bytes()?.get(id as usize).map(Vec::as_slice) {
                Some([0xFF, rest @ ..]) => rest,
                Some(b) => b,
                None => &[],
            },
        )
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Turns a growing list of generated ids into text pieces, holding back bytes that do not yet
/// form whole characters (a multi-byte character often spans several byte-level tokens).
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special: bool,
}

impl IncrementalDecoder {
    pub fn new(skip_special: bool) -> IncrementalDecoder {
        IncrementalDecoder {
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            skip_special,
        }
    }

    /// Adds one id and returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        // Decoding a window that starts a few tokens back keeps the byte-level decoder's view of
        // word boundaries identical to decoding the whole sequence.
        let prefix = tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let piece = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is still held back (an incomplete character at the end of generation).
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<String> {
        let prefix = tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}
