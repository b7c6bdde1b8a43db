//! Builds a Phi-4 `tokenizer.json` from the o200k_base ranks that the `tiktoken-rs` crate ships,
//! plus the Phi-4 added tokens: the same construction as scripts/make_fixtures.py (byte-level
//! BPE, id = rank, one merge per multi-byte token: the last merge tiktoken's BPE makes using only
//! lower ranks).

use std::collections::HashMap;

use serde_json::{json, Map, Value};

pub use phi4::text::tokenizer::O200K_PATTERN;

/// (id, content, special, rstrip), spec §2.2.
pub const PHI4_SPECIALS: &[(u32, &str, bool, bool)] = &[
    (199999, "<|endoftext|>", true, false),
    (200018, "<|endofprompt|>", true, false),
    (200019, "<|assistant|>", true, true),
    (200020, "<|end|>", true, true),
    (200021, "<|user|>", true, true),
    (200022, "<|system|>", true, true),
    (200023, "<|tool|>", false, true),
    (200024, "<|/tool|>", false, true),
    (200025, "<|tool_call|>", false, true),
    (200026, "<|/tool_call|>", false, true),
    (200027, "<|tool_response|>", false, true),
    (200028, "<|tag|>", false, true),
];

fn byte_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut map = vec!['\0'; 256];
    for (b, c) in bs.into_iter().zip(cs) {
        map[b as usize] = char::from_u32(c).unwrap();
    }
    map
}

/// rank -> bytes for every o200k_base rank.
pub fn o200k_ranks() -> Vec<Vec<u8>> {
    let bpe = tiktoken_rs::o200k_base().unwrap();
    (0..199_998u32)
        .map(|r| bpe.decode_bytes(&[r]).unwrap())
        .collect()
}

fn merge_for(token: &[u8], rank: u32, ranks: &HashMap<&[u8], u32>) -> (Vec<u8>, Vec<u8>) {
    let mut parts: Vec<Vec<u8>> = token.iter().map(|b| vec![*b]).collect();
    while parts.len() > 2 {
        let mut best: Option<(u32, usize)> = None;
        for i in 0..parts.len() - 1 {
            let joined = [parts[i].as_slice(), parts[i + 1].as_slice()].concat();
            if let Some(&r) = ranks.get(joined.as_slice()) {
                if r < rank && best.is_none_or(|(b, _)| r < b) {
                    best = Some((r, i));
                }
            }
        }
        let (_, i) = best.expect("every o200k token is reachable by lower-rank merges");
        let right = parts.remove(i + 1);
        parts[i].extend(right);
    }
    (parts[0].clone(), parts[1].clone())
}

/// tokenizer.json text over ranks `< n_ranks` plus `specials`.
pub fn build_tokenizer_json(
    ranks: &[Vec<u8>],
    n_ranks: usize,
    specials: &[(u32, String, bool, bool)],
) -> String {
    let b2u = byte_to_unicode();
    let enc = |bs: &[u8]| bs.iter().map(|b| b2u[*b as usize]).collect::<String>();
    let index: HashMap<&[u8], u32> = ranks
        .iter()
        .enumerate()
        .map(|(r, t)| (t.as_slice(), r as u32))
        .collect();
    let mut vocab = Map::new();
    let mut merges = Vec::new();
    for (r, t) in ranks.iter().enumerate().take(n_ranks) {
        vocab.insert(enc(t), json!(r));
        if t.len() >= 2 {
            let (a, b) = merge_for(t, r as u32, &index);
            merges.push(json!([enc(&a), enc(&b)]));
        }
    }
    let mut added = Vec::new();
    for (id, content, special, rstrip) in specials {
        vocab.insert(content.clone(), json!(id));
        added.push(
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": rstrip, "normalized": false, "special": special}),
        );
    }
    let v = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": O200K_PATTERN}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": true,
            "vocab": Value::Object(vocab), "merges": merges},
    });
    v.to_string()
}

/// The full Phi-4 specials, with placeholders for the ids the spec leaves unnamed.
pub fn full_phi4_specials() -> Vec<(u32, String, bool, bool)> {
    let mut v: Vec<(u32, String, bool, bool)> = PHI4_SPECIALS
        .iter()
        .map(|(i, c, s, r)| (*i, c.to_string(), *s, *r))
        .collect();
    v.push((199998, "<|reserved_199998|>".into(), true, false));
    for n in 0..18u32 {
        if !PHI4_SPECIALS.iter().any(|s| s.0 == 200000 + n) {
            v.push((200000 + n, format!("<|endoftext{n}|>"), true, false));
        }
    }
    v.sort();
    v
}
