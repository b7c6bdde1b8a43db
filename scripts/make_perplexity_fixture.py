#!/usr/bin/env python3
"""Reference for `phi4 perplexity`: transformers' per-token negative log-likelihoods on the tiny
fixture model over tests/fixtures/perplexity.txt, in llama-perplexity's windows.

Each window is `ctx` consecutive tokens of the text (non-overlapping, the last partial one
dropped), run through the model in one pass; the tokens of its second half are scored (positions
ctx/2 .. ctx-2 predict tokens ctx/2+1 .. ctx-1), as llama.cpp's perplexity tool does. ctx 48 stays
within the fixture's original context (64, short LongRoPE factors); ctx 96 is past it (long
factors), so both RoPE tables are covered.

Pinned in scripts/requirements-fixtures.txt (transformers 5.25 as for the other references). CI
never runs this; its output, tests/fixtures/perplexity.json, is committed:

    .venv-fixtures/bin/python scripts/make_perplexity_fixture.py
"""

import json
import math
import pathlib

import torch
from tokenizers import Tokenizer
from transformers import Phi3ForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"


def main():
    model_dir = FIX / "tiny-phi4"
    model = Phi3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = (FIX / "perplexity.txt").read_text()
    ids = tok.encode(text, add_special_tokens=False).ids
    out = {"text": "perplexity.txt", "n_tokens": len(ids), "ids": ids, "runs": {}}
    for ctx in (48, 96):
        first = ctx // 2
        windows = len(ids) // ctx
        nlls, tops, heads = [], [], []
        for w in range(windows):
            chunk = torch.tensor([ids[w * ctx:(w + 1) * ctx]])
            with torch.no_grad():
                logits = model(chunk).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            for j in range(first, ctx - 1):
                nlls.append(-logp[j, ids[w * ctx + j + 1]].item())
                tops.append(int(torch.argmax(logp[j]).item()))
            heads.append([round(v, 7) for v in logp[first, :8].tolist()])
        mean = sum(nlls) / len(nlls)
        out["runs"][str(ctx)] = {
            "windows": windows,
            "scored": len(nlls),
            "mean_nll": mean,
            "perplexity": math.exp(mean),
            "nll": nlls,
            "top1": tops,
            "first_row_head": heads,
        }
        print(f"ctx {ctx}: {windows} windows, {len(nlls)} scored, perplexity {math.exp(mean):.4f}")
    (FIX / "perplexity.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
