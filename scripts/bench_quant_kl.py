#!/usr/bin/env python3
"""Quality per byte on real weights: phi4's recipes beside llama.cpp's quantization types,
each measured as `llama-perplexity --kl-divergence` measures it, in one run on one machine.

Inputs come from scripts/smollm2_phi3.py --f32-gguf (SmolLM2-135M-Instruct as a Phi-3 checkpoint for
phi4 and as an F32 GGUF for llama.cpp, the same values). Every engine scores the same token ids
(phi4's tokenizer, fed to llama.cpp as ids): non-overlapping windows of --ctx tokens, the second
half of each scored. Each engine's quantized runs are compared with its own float run (phi4 with
`phi4 perplexity --kl-base`, llama.cpp here with numpy), and transformers' perplexity on the same
windows is printed as the reference for both float runs.

    python scripts/bench_quant_kl.py --models /tmp/smol --text /usr/share/common-licenses/GPL-3 \
        --calibration /usr/share/common-licenses/Apache-2.0

Never run by CI. Needs llama-cpp-python (0.3.36), transformers, tokenizers, numpy.
"""

import argparse
import json
import math
import os
import pathlib
import shutil
import subprocess
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
PHI4 = ROOT / "target" / "release" / "phi4"
LLAMA_TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"]
PHI4_RECIPES = ["q8", "q6", "q5", "q4-edge", "q4", "q5+qkv_proj:q6+down_proj:q6+embed:q6",
                "q6+qkv_proj+down_proj+embed"]


def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def kl_stats(kl, same):
    s = np.sort(kl)
    return {
        "kl_mean": float(kl.mean()),
        "kl_median": float(np.quantile(s, 0.5)),
        "kl_p99": float(np.quantile(s, 0.99)),
        "same_top": float(same.mean()),
    }


def phi4_runs(a, n_params):
    base = a.work / "phi4-base.lp"
    common = ["perplexity", "--model", str(a.models / "phi3"), "--file", str(a.text),
              "--ctx", str(a.ctx), "--max-windows", str(a.windows), "--json"]
    rows = []
    out = json.loads(subprocess.run([PHI4, *common, "--save-logits", base],
                                    check=True, capture_output=True, text=True).stdout)
    rows.append(("phi4 f32", 32.0, out["perplexity"]["value"], None))
    # Each recipe plain, and with importance-weighted 4-bit scales from --calibration's text.
    variants = [(r, []) for r in PHI4_RECIPES]
    if a.calibration:
        variants += [(r, ["--calibration", str(a.calibration)]) for r in PHI4_RECIPES]
    for r, extra in variants:
        tag = f"{r}, calibrated" if extra else r
        qdir = a.work / f"phi4-{r}{'-cal' if extra else ''}"
        shutil.rmtree(qdir, ignore_errors=True)
        subprocess.run([PHI4, "quantize", "--model", str(a.models / "phi3"), "--out", str(qdir),
                        "--recipe", r, *extra], check=True, capture_output=True)
        bpw = (qdir / "model.safetensors").stat().st_size * 8 / n_params
        # i8: the activations' rounding of prefill (and of llama.cpp's products); i16: decode's
        # with 8-bit weights (`--quant-acts auto` picks it there).
        for acts in ("i8", "i16"):
            out = json.loads(subprocess.run([PHI4, *common[:2], str(qdir), *common[3:], "--kl-base", base,
                                             "--quant-acts", acts],
                                            check=True, capture_output=True, text=True).stdout)
            k = out["kl"]
            rows.append((f"phi4 {tag}, {acts} activations", bpw, out["perplexity"]["value"],
                         {"kl_mean": k["mean"]["value"], "kl_median": k["median"], "kl_p99": k["p99"],
                          "same_top": k["same_top"]}))
    return rows


def llama_logprobs(path, windows, ctx, threads):
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                n_threads=threads, verbose=False)
    first = ctx // 2
    out = []
    for w in windows:
        llm.reset()
        llm.eval(list(w))
        scores = np.array(llm.scores[first:ctx - 1], dtype=np.float32)
        out.append(log_softmax(scores).astype(np.float32))
    del llm
    return out


def nll_of(lps, windows, ctx):
    first = ctx // 2
    nll = [-lp[r, w[first + r + 1]] for lp, w in zip(lps, windows) for r in range(lp.shape[0])]
    return float(np.mean(nll))


def llama_runs(a, windows, n_params):
    import llama_cpp
    f32 = a.models / "smollm2-f32.gguf"
    base = llama_logprobs(f32, windows, a.ctx, a.threads)
    rows = [("llama.cpp F32", 32.0, math.exp(nll_of(base, windows, a.ctx)), None)]
    for t in LLAMA_TYPES:
        out = a.work / f"llama-{t}.gguf"
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{t}")
        p.nthread = a.threads
        rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), p)
        assert rc == 0, (t, rc)
        lps = llama_logprobs(out, windows, a.ctx, a.threads)
        kl = np.concatenate([(np.exp(b) * (b - q)).sum(-1) for b, q in zip(base, lps)])
        same = np.concatenate([b.argmax(-1) == q.argmax(-1) for b, q in zip(base, lps)])
        bpw = out.stat().st_size * 8 / n_params
        rows.append((f"llama.cpp {t}", bpw, math.exp(nll_of(lps, windows, a.ctx)), kl_stats(kl, same)))
    return rows


def transformers_ppl(a, windows):
    import torch
    from transformers import Phi3ForCausalLM
    m = Phi3ForCausalLM.from_pretrained(a.models / "phi3", dtype=torch.float32).eval()
    first = a.ctx // 2
    nll = []
    with torch.no_grad():
        for w in windows:
            lp = torch.log_softmax(m(torch.tensor([list(w)])).logits[0].double(), -1)
            nll += [-lp[j, w[j + 1]].item() for j in range(first, a.ctx - 1)]
    return math.exp(sum(nll) / len(nll))


def torch_w8_only(a, windows):
    """q8's weight rounding alone (blocks of 32 inputs, scale max|w|/127 stored as f16, codes
    round(w/d)) with f32 activations, in transformers: what an activation-exact 8-bit path
    would lose. Returns (perplexity, KL figures against transformers' own f32 run)."""
    import torch
    from transformers import Phi3ForCausalLM
    m = Phi3ForCausalLM.from_pretrained(a.models / "phi3", dtype=torch.float32).eval()
    first = a.ctx // 2

    def logprobs():
        out = []
        with torch.no_grad():
            for w in windows:
                out.append(torch.log_softmax(m(torch.tensor([list(w)])).logits[0, first:a.ctx - 1].double(), -1))
        return out

    base = logprobs()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() != 2:
                continue
            rows, cols = p.shape
            pad = (-cols) % 32
            w = torch.nn.functional.pad(p.data, (0, pad)).view(rows, -1, 32)
            d = (w.abs().amax(-1, keepdim=True) / 127).half().float()
            q = torch.where(d > 0, torch.round(w / torch.where(d > 0, d, 1)), 0) * d
            p.data.copy_(q.view(rows, -1)[:, :cols])
    lps = logprobs()
    kl = np.concatenate([(b.exp() * (b - q)).sum(-1).numpy() for b, q in zip(base, lps)])
    same = np.concatenate([(b.argmax(-1) == q.argmax(-1)).numpy() for b, q in zip(base, lps)])
    nll = [-lp[r, w[first + r + 1]].item() for lp, w in zip(lps, windows) for r in range(lp.shape[0])]
    return math.exp(sum(nll) / len(nll)), kl_stats(kl, same)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=pathlib.Path, required=True)
    ap.add_argument("--text", type=pathlib.Path, required=True)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/bench-quant-kl"))
    ap.add_argument("--calibration", type=pathlib.Path,
                    help="also quantize each recipe with `phi4 quantize --calibration` on this text "
                         "(choose one other than --text)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    from safetensors import safe_open
    from tokenizers import Tokenizer
    with safe_open(a.models / "phi3" / "model.safetensors", "np") as f:
        n_params = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    tok = Tokenizer.from_file(str(a.models / "phi3" / "tokenizer.json"))
    ids = tok.encode(a.text.read_text(), add_special_tokens=False).ids
    n = min(len(ids) // a.ctx, a.windows)
    windows = [ids[i * a.ctx:(i + 1) * a.ctx] for i in range(n)]
    t0 = time.time()
    rows = phi4_runs(a, n_params) + llama_runs(a, windows, n_params)
    ref = transformers_ppl(a, windows)
    w8_ppl, w8_kl = torch_w8_only(a, windows)
    rows.append(("w8 only (q8's weight rounding, f32 activations; transformers)", 8.5, w8_ppl, w8_kl))
    print(f"{n_params / 1e6:.1f} M parameters, {n} windows of {a.ctx}, "
          f"{n * (a.ctx - 1 - a.ctx // 2)} scored tokens; transformers f32 perplexity {ref:.4f}; "
          f"{time.time() - t0:.0f} s")
    print("| format | bits/weight | perplexity | mean KL | median KL | p99 KL | same top |")
    print("|---|---|---|---|---|---|---|")
    for name, bpw, ppl, k in rows:
        if k is None:
            print(f"| {name} | {bpw:.2f} | {ppl:.4f} | – | – | – | – |")
        else:
            print(f"| {name} | {bpw:.2f} | {ppl:.4f} | {k['kl_mean']:.5f} | {k['kl_median']:.5f} "
                  f"| {k['kl_p99']:.4f} | {100 * k['same_top']:.2f} % |")


if __name__ == "__main__":
    main()
