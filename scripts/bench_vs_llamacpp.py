#!/usr/bin/env python3
"""Side-by-side CPU benchmark of phi4 and llama.cpp on the same synthetic full-size Phi-4-mini.

Not part of CI. Needs ~35 GB of disk under --work and ~20 minutes on a 2-core machine.

  python3 scripts/bench_vs_llamacpp.py [--work DIR] [--runs 3] [--threads 2]

Steps (each skipped when its output already exists):
 1. a venv under WORK with pinned llama-cpp-python (which builds llama.cpp from source), gguf
    and numpy; the script re-runs itself inside it;
 2. `phi4 bench --synthetic --save WORK/bf16`: random bf16 weights of the real shapes;
 3. the same tensors written as a phi3-architecture GGUF (BF16), with LongRoPE factors and a
    placeholder vocabulary of the right size (token ids are fed directly, so the tokenizer's
    merges do not matter), then llama.cpp's own quantizer makes Q8_0, Q6_K, Q5_K_M, Q4_K_M and
    Q4_0 (those the run needs);
 4. `phi4 quantize` makes the q8, q6, q5, q4m, q4 and q4-edge checkpoints it needs from
    WORK/bf16 (`--only` picks llama.cpp types, `--recipes` phi4 ones);
 5. every engine/format pair is run --runs times, alternating engines, each run a fresh process:
    a 512-token prompt (one prefill pass), then 128 greedy decode steps; peak RSS is each
    child's own VmHWM. Both keep the KV cache in f16 (llama.cpp's default; phi4's is f32).
The table printed at the end (medians, and phi4 / llama.cpp ratios) goes into BENCHMARKS.md.
"""

import argparse
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PINS = ["llama-cpp-python==0.3.36", "gguf==0.19.0", "numpy==2.4.6"]
PROMPT, GEN = 512, 128
# llama.cpp keeps its KV cache in f16 unless told otherwise; phi4 runs with the same.
KV_CACHE = "f16"

# (label, phi4 variant, llama.cpp file type). A variant is a `phi4 quantize` recipe, or bf16
# weights with f32 activations (phi4's default) or with activations rounded to bf16 as llama.cpp
# does for BF16 (`--bf16-acts bf16`).
PAIRS = [
    ("4-bit", "q4", "Q4_0"),
    ("4-bit", "q4-edge", "Q4_K_M"),
    ("4-bit", "q4", "Q4_K_M"),
    ("4-bit", "q4m", "Q4_K_M"),
    ("5-bit", "q5", "Q5_K_M"),
    ("6-bit", "q6", "Q6_K"),
    ("8-bit", "q8", "Q8_0"),
    ("16-bit", "bf16", "BF16"),
    ("16-bit", "bf16-acts", "BF16"),
]
RECIPES = ("q4", "q4-edge", "q4m", "q5", "q6", "q8")
# llama.cpp's LLAMA_FTYPE_MOSTLY_* numbers.
FTYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}


def ensure_venv(work):
    venv = work / "venv"
    py = venv / "bin" / "python"
    if Path(sys.prefix).resolve() == venv.resolve():
        return
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *PINS], check=True)
    os.execv(str(py), [str(py), *sys.argv])


def phi4_bin():
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True)
    return str(ROOT / "target" / "release" / "phi4")


def read_safetensors(path):
    import numpy as np

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        s, e = info["data_offsets"]
        dt = {"BF16": np.uint16, "F32": np.float32, "F16": np.float16}[info["dtype"]]
        count = (e - s) // np.dtype(dt).itemsize
        arr = np.memmap(path, dtype=dt, mode="r", offset=base + s, shape=(count,))
        out[name] = (info["dtype"], arr.reshape(info["shape"]))
    return out


def byte_level_tokens():
    """GPT-2's byte-to-unicode table: llama.cpp looks up e.g. the newline byte token by it."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def write_gguf(src, dst):
    import gguf
    import numpy as np

    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    t = read_safetensors(src / "model.safetensors")
    w = gguf.GGUFWriter(str(dst), "phi3")
    w.add_name("phi4 synthetic Phi-4-mini")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    w.add_rope_dimension_count(int(head_dim * cfg.get("partial_rotary_factor", 1.0)))
    w.add_rope_freq_base(cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))
    orig = cfg["original_max_position_embeddings"]
    scale = cfg["max_position_embeddings"] / orig
    w.add_rope_scaling_orig_ctx_len(orig)
    w.add_rope_scaling_attn_factors(float(np.sqrt(1 + np.log(scale) / np.log(orig))))
    w.add_file_type(32)  # MOSTLY_BF16
    vocab = cfg["vocab_size"]
    tokens = byte_level_tokens() + [f"<t{i}>" for i in range(256, vocab)]
    types = [1] * vocab
    for i in range(199999, vocab):
        types[i] = 3
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-4o")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["Ġ Ġ"])
    w.add_bos_token_id(199999)
    w.add_eos_token_id(199999)
    w.add_pad_token_id(199999)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.qkv_proj.weight": "attn_qkv.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for l in range(cfg["num_hidden_layers"]):
        for k, v in per_layer.items():
            names[f"model.layers.{l}.{k}"] = f"blk.{l}.{v}"
    for name, (dt, arr) in t.items():
        if dt == "BF16":
            w.add_tensor(names[name], arr, raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            w.add_tensor(names[name], np.asarray(arr, dtype=np.float32))
    w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
    w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()


def llama_quantize(src, dst, ftype, threads):
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = FTYPES[ftype]
    p.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), p)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize {ftype} failed ({rc})")


LLAMA_CHILD = r"""
import json, sys, time
import numpy as np
scripts, path, threads, prompt_n, gen_n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
sys.path.insert(0, scripts)
from llama_step import open_context
decode, argmax = open_context(path, threads)
def step(toks):
    decode(toks)
    return argmax()
rng = np.random.default_rng(0x12345678)
prompt = [int(x) for x in rng.integers(0, 199999, prompt_n)]
t0 = time.perf_counter(); tok = step(prompt); t1 = time.perf_counter()
for _ in range(gen_n):
    tok = step([tok])
t2 = time.perf_counter()
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"prefill": prompt_n / (t1 - t0), "decode": gen_n / (t2 - t1),
                  "rss_mb": int(hwm.split()[1]) / 1024}))
"""


def run_child(cmd):
    # Peak RSS is read by each child from its own VmHWM: wait4's ru_maxrss would include the
    # memory of this (forking) Python process from before the exec.
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if p.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed with status {p.returncode}")
    text = p.stdout.decode().strip()
    return json.loads(text[text.find("{"):])  # phi4 prints one JSON object, the llama child one line


def phi4_model(work, variant):
    """The checkpoint directory and extra flags of a phi4 variant."""
    if variant in RECIPES:
        return work / f"phi4-{variant}", []
    return work / "bf16", (["--bf16-acts", "bf16"] if variant == "bf16-acts" else [])


def phi4_run(phi4, work, variant, threads):
    model_dir, flags = phi4_model(work, variant)
    r = run_child([phi4, "--threads", str(threads), "bench", "--model", str(model_dir),
                   "--prompt-tokens", str(PROMPT), "--gen-tokens", str(GEN), "--runs", "1",
                   "--kv-cache", KV_CACHE, "--json"] + flags)
    return {"prefill": r["prefill_tokens_per_s"], "decode": r["decode_tokens_per_s"],
            "rss_mb": r["peak_rss_mb"], "bw": r["memory_bandwidth_gb_s"],
            "weights_gb": r["weight_bytes_per_token"] / 1e9,
            "vs_read": r["decode_fraction_of_weight_read"]}


def llama_run(path, threads):
    return run_child([sys.executable, "-c", LLAMA_CHILD, str(ROOT / "scripts"), str(path),
                      str(threads), str(PROMPT), str(GEN)])


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=ROOT / "target" / "bench-vs-llamacpp")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", help="comma-separated llama.cpp types to run (e.g. Q4_K_M,Q8_0)")
    ap.add_argument("--recipes", help="comma-separated phi4 variants to run (e.g. q4m,q5)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ensure_venv(args.work)
    phi4 = phi4_bin()
    w = args.work
    if not (w / "bf16" / "model.safetensors").exists():
        subprocess.run([phi4, "bench", "--synthetic", "--save", str(w / "bf16")], check=True)
    gguf_bf16 = w / "llama-BF16.gguf"
    if not gguf_bf16.exists():
        print("writing", gguf_bf16, flush=True)
        write_gguf(w / "bf16", gguf_bf16)
    pairs = [p for p in PAIRS if not args.only or p[2] in args.only.split(",")]
    pairs = [p for p in pairs if not args.recipes or p[1] in args.recipes.split(",")]
    for _, recipe, ftype in pairs:
        g = w / f"llama-{ftype}.gguf"
        if ftype != "BF16" and not g.exists():
            print("llama.cpp quantize", ftype, flush=True)
            llama_quantize(gguf_bf16, g, ftype, args.threads)
        if recipe in RECIPES and not (w / f"phi4-{recipe}" / "model.safetensors").exists():
            subprocess.run([phi4, "quantize", "--model", str(w / "bf16"), "--out",
                            str(w / f"phi4-{recipe}"), "--recipe", recipe], check=True)
    rows = []
    for label, recipe, ftype in pairs:
        ours, theirs = [], []
        for i in range(args.runs):
            ours.append(phi4_run(phi4, w, recipe, args.threads))
            theirs.append(llama_run(w / f"llama-{ftype}.gguf", args.threads))
            print(f"{recipe} vs {ftype} run {i + 1}: phi4 {ours[-1]} llama.cpp {theirs[-1]}",
                  flush=True)
        m = lambda runs, k: median([r[k] for r in runs])
        rows.append({
            "bits": label, "phi4": recipe, "llama.cpp": ftype,
            "phi4_prefill": m(ours, "prefill"), "llama_prefill": m(theirs, "prefill"),
            "phi4_decode": m(ours, "decode"), "llama_decode": m(theirs, "decode"),
            "phi4_rss_mb": m(ours, "rss_mb"), "llama_rss_mb": m(theirs, "rss_mb"),
            "phi4_weights_gb": ours[0]["weights_gb"], "bw_gb_s": m(ours, "bw"),
            "phi4_decode_vs_read": m(ours, "vs_read"),
            "llama_file_gb": (w / f"llama-{ftype}.gguf").stat().st_size / 1e9,
            "phi4_decode_runs": [round(r["decode"], 2) for r in ours],
            "llama_decode_runs": [round(r["decode"], 2) for r in theirs],
            # Runs alternate engines, so each pair saw about the same machine: the median of
            # the pairs' ratios is steadier than the ratio of medians on a noisy host.
            "decode_pair_ratio": median([a["decode"] / b["decode"] for a, b in zip(ours, theirs)]),
            "prefill_pair_ratio": median([a["prefill"] / b["prefill"] for a, b in zip(ours, theirs)]),
        })
    print()
    print(f"phi4 KV cache {KV_CACHE}; ratios: of the medians, then the median of per-run pairs")
    print("| bits | phi4 | llama.cpp | decode tok/s phi4 / llama.cpp (ratio; pairs) | prefill tok/s "
          "phi4 / llama.cpp (ratio; pairs) | decode vs ceiling phi4 / llama.cpp | "
          "phi4 decode vs interleaved read of its weights | peak RSS MB phi4 / llama.cpp |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        # Each engine's ceiling is the measured bandwidth over the bytes it reads per token.
        ceiling = r["bw_gb_s"] / r["phi4_weights_gb"]
        theirs = r["bw_gb_s"] / r["llama_file_gb"]
        print(f"| {r['bits']} | {r['phi4']} | {r['llama.cpp']} | {r['phi4_decode']:.2f} / "
              f"{r['llama_decode']:.2f} ({r['phi4_decode'] / r['llama_decode']:.2f}×; "
              f"{r['decode_pair_ratio']:.2f}×) | "
              f"{r['phi4_prefill']:.1f} / {r['llama_prefill']:.1f} "
              f"({r['phi4_prefill'] / r['llama_prefill']:.2f}×; {r['prefill_pair_ratio']:.2f}×) | "
              f"{100 * r['phi4_decode'] / ceiling:.0f} % of {ceiling:.1f} / "
              f"{100 * r['llama_decode'] / theirs:.0f} % of {theirs:.1f} | "
              f"{100 * r['phi4_decode_vs_read']:.0f} % | "
              f"{r['phi4_rss_mb']:.0f} / {r['llama_rss_mb']:.0f} |")
    (w / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
