#!/usr/bin/env python3
"""transformers on torch CPU, the peer of `phi4 bench --image`: time to first token for one
image with a short text prompt, split into preprocess / vision tower / prefill, on the same
synthetic full-size weights.

    phi4 bench --synthetic --multimodal --save DIR        # our random weights, transformers' layout
    python3 scripts/bench_mm_transformers.py --model DIR --image 448x448 --image 1344x896

Same work as ours: the native image processor, the vision tower with its projection (the
`image_embed` module), then the decoder over the whole prompt with the vision LoRA active
(PEFT, unmerged) to the last position's logits. bf16 weights and activations (transformers'
dtype), `--threads` torch threads (default 2, the project's machines). The attention is
transformers' default (SDPA) unless --attn eager is given. Not run by CI.
"""

import argparse
import json
import os
import resource
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", action="append", required=True, help="WIDTHxHEIGHT")
    ap.add_argument("--text-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", default="sdpa")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from peft.tuners.tuners_utils import BaseTunerLayer
    from PIL import Image
    from transformers import Phi4MultimodalForCausalLM, Phi4MultimodalImageProcessor

    t = time.time()
    model = Phi4MultimodalForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16,
                                                      attn_implementation=args.attn).eval()
    model.load_adapter(args.model, adapter_name="vision", adapter_kwargs={"subfolder": "vision-lora"})
    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            m.enable_adapters(True)
            m.set_adapter("vision")
    print(f"loaded in {time.time() - t:.0f} s", flush=True)
    proc = Phi4MultimodalImageProcessor()
    image_id = model.config.vision_config.image_token_id
    sub = model.model.embed_tokens_extend
    results = []
    for size in args.image:
        w, h = (int(v) for v in size.lower().split("x"))
        rng = np.random.default_rng(0)
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        pre, vis, fill = [], [], []
        for r in range(args.runs):
            with torch.inference_mode():
                t0 = time.perf_counter()
                px = proc(images=[img], return_tensors="pt")
                t1 = time.perf_counter()
                n = int(px["num_img_tokens"][0])
                text = torch.from_numpy(np.random.default_rng(7 + r).integers(0, 199999, args.text_tokens))
                ids = torch.cat([torch.full((n,), image_id), text]).unsqueeze(0)
                base = model.model.embed_tokens(ids)
                embeds = sub.image_embed(ids, base, image_pixel_values=px["image_pixel_values"],
                                         image_sizes=px["image_sizes"],
                                         image_attention_mask=px["image_attention_mask"])
                t2 = time.perf_counter()
                logits = model(inputs_embeds=embeds, logits_to_keep=1).logits
                int(logits[0, -1].argmax())
                t3 = time.perf_counter()
            pre.append((t1 - t0) * 1e3)
            vis.append((t2 - t1) * 1e3)
            fill.append((t3 - t2) * 1e3)
            print(f"{w}x{h} run {r}: preprocess {pre[-1]:.0f} vision {vis[-1]:.0f} prefill {fill[-1]:.0f} ms", flush=True)
        med = statistics.median
        res = {"width": w, "height": h, "image_tokens": n, "prompt_tokens": n + args.text_tokens,
               "preprocess_ms": med(pre), "vision_ms": med(vis), "prefill_ms": med(fill),
               "time_to_first_token_ms": med([a + b + c for a, b, c in zip(pre, vis, fill)]), "runs": args.runs}
        results.append(res)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"engine": f"transformers {__import__('transformers').__version__} torch {torch.__version__}",
                      "attn": args.attn, "threads": args.threads, "images": results, "peak_rss_mb": peak}, indent=1))


if __name__ == "__main__":
    main()
