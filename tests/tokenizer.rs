//! The tokenizer against tiktoken o200k_base (ids recorded by Python tiktoken, and tiktoken-rs
//! live) and against HF `tokenizers` for strings with Phi-4 special tokens.

mod common;

use std::sync::OnceLock;

use common::o200k::{build_tokenizer_json, full_phi4_specials, o200k_ranks};
use common::{fixtures, tiny_dir};
use phi4::text::Tokenizer;
use serde_json::Value;

fn full() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let ranks = o200k_ranks();
        let json = build_tokenizer_json(&ranks, ranks.len(), &full_phi4_specials());
        Tokenizer::from_bytes(json.as_bytes()).unwrap()
    })
}

fn cases() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokenizer_cases.json")).unwrap())
        .unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn ids_equal_python_tiktoken_on_the_mixed_corpus() {
    let c = cases();
    let list = c["tiktoken"].as_array().unwrap();
    assert!(list.len() >= 25);
    for case in list {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            full().encode(text).unwrap(),
            ids(&case["ids"]),
            "text {text:?}"
        );
        // Round trip: byte-level BPE loses nothing.
        assert_eq!(full().decode(&ids(&case["ids"]), false).unwrap(), text);
    }
}

#[test]
fn ids_equal_tiktoken_rs_on_random_strings() {
    let bpe = tiktoken_rs::o200k_base().unwrap();
    let alphabet: Vec<&str> = vec![
        "a", "b", "Z", "0", "9", " ", "  ", "\t", "\n", "\r\n", ".", "'s", "'LL", "é", "ß", "ж",
        "中", "😀", "👍🏽", "_", "/", "\\", "\"", "-", "١", "क्",
    ];
    let mut s: u64 = 42;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as usize
    };
    for _ in 0..2000 {
        let len = 1 + next() % 30;
        let text: String = (0..len)
            .map(|_| alphabet[next() % alphabet.len()])
            .collect();
        let want: Vec<u32> = bpe.encode_ordinary(&text);
        assert_eq!(full().encode(&text).unwrap(), want, "text {text:?}");
    }
}

#[test]
fn special_tokens_match_hf_tokenizers() {
    let c = cases();
    for case in c["phi4_special"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids"]);
        assert_eq!(full().encode(text).unwrap(), want, "text {text:?}");
        assert_eq!(
            full().decode(&want, false).unwrap(),
            case["decoded"].as_str().unwrap()
        );
        assert_eq!(
            full().decode(&want, true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap()
        );
    }
    // Role tags strip the whitespace after them; tool markers survive skip-special decoding.
    let t = full();
    assert_eq!(
        t.encode("<|user|>\nHi").unwrap(),
        t.encode("<|user|>Hi").unwrap()
    );
    let call = t.encode("<|tool_call|>[]<|/tool_call|><|end|>").unwrap();
    assert_eq!(
        t.decode(&call, true).unwrap(),
        "<|tool_call|>[]<|/tool_call|>"
    );
    assert_eq!(t.token_id("<|end|>"), Some(200020));
    assert_eq!(t.token_id("<|endoftext|>"), Some(199999));
}

#[test]
fn tiny_fixture_tokenizer_encodes_the_reference_prompt() {
    let r = common::Reference::load();
    let tok = Tokenizer::from_file(&tiny_dir().join("tokenizer.json")).unwrap();
    let text = r.meta["chat"]["rendered"].as_str().unwrap();
    assert_eq!(tok.encode(text).unwrap(), r.ids("chat", "prompt"));
}

#[test]
fn token_bytes_equal_those_read_from_the_tokenizer_file() {
    // The engine derives token bytes from the loaded tokenizer on first use; they must be what
    // llguidance reads from the file itself.
    let path = tiny_dir().join("tokenizer.json");
    let file: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let want = llguidance::token_bytes_from_tokenizer_json(&file).unwrap();
    let tok = Tokenizer::from_file(&path).unwrap();
    assert_eq!(tok.token_bytes().unwrap(), &want[..]);
    assert_eq!(
        tok.bytes_of(503).unwrap(),
        b"<|end|>",
        "special marker stripped"
    );
    assert_eq!(tok.bytes_of(508).unwrap(), b"<|tool_call|>");
    assert_eq!(tok.token_bytes().unwrap()[503][0], 0xFF);
    let full = full();
    let v = full.token_bytes().unwrap();
    assert!(v.len() >= 200_029, "{}", v.len());
    let text = "Hello wörld, 你好";
    let joined: Vec<u8> = full
        .encode(text)
        .unwrap()
        .iter()
        .flat_map(|&id| full.bytes_of(id).unwrap().to_vec())
        .collect();
    assert_eq!(joined, text.as_bytes());
}
