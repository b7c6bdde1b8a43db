#!/usr/bin/env python3
"""transformers on torch CPU, the peer of `phi4 bench --image` and `phi4 bench --audio`: time to
first token for one image with a short text prompt, split into preprocess / vision tower /
prefill; and for speech, time to first token and real-time factor for a clip with
`--gen-tokens` output tokens, split into features / encoder / prefill / decode; on the same
synthetic full-size weights.

    phi4 bench --synthetic --multimodal --save DIR        # our random weights, transformers' layout
    python3 scripts/bench_mm_transformers.py --model DIR --image 448x448 --image 1344x896
    python3 scripts/bench_mm_transformers.py --model DIR --audio 30 --gen-tokens 100

Speech: the native feature extractor (16 kHz), the audio embedding (Conformer + speech
projection), the decoder over the prompt with the speech LoRA active, then greedy decode steps
with the KV cache, as ours.

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
    ap.add_argument("--image", action="append", default=[], help="WIDTHxHEIGHT")
    ap.add_argument("--audio", action="append", default=[], type=float, help="seconds")
    ap.add_argument("--gen-tokens", type=int, default=100)
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
    adapter = "speech" if args.audio else "vision"
    model.load_adapter(args.model, adapter_name=adapter, adapter_kwargs={"subfolder": f"{adapter}-lora"})
    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            m.enable_adapters(True)
            m.set_adapter(adapter)
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
    audio_results = bench_audio(model, args) if args.audio else []
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"engine": f"transformers {__import__('transformers').__version__} torch {torch.__version__}",
                      "attn": args.attn, "threads": args.threads, "images": results, "audio": audio_results,
                      "peak_rss_mb": peak}, indent=1))


def bench_audio(model, args):
    from transformers import Phi4MultimodalFeatureExtractor

    fe = Phi4MultimodalFeatureExtractor()
    audio_id = model.config.audio_config.audio_token_id
    sub = model.model.embed_tokens_extend
    out = []
    for secs in args.audio:
        n = int(secs * 16000)
        rng = np.random.default_rng(0)
        env = np.sin(np.arange(n) % 8000 / 8000 * np.pi)
        wave = ((rng.random(n) - 0.5) * 0.3 * env).astype(np.float32)
        f_ms, e_ms, p_ms, d_ms = [], [], [], []
        for r in range(args.runs):
            with torch.inference_mode():
                t0 = time.perf_counter()
                feats = fe(wave, sampling_rate=16000, return_tensors="pt")
                t1 = time.perf_counter()
                k = int(feats["audio_embed_sizes"][0])
                text = torch.from_numpy(np.random.default_rng(11 + r).integers(0, 199999, 9))
                ids = torch.cat([torch.tensor([200021]), torch.full((k,), audio_id), text,
                                 torch.tensor([200020, 200019])]).unsqueeze(0)
                base = model.model.embed_tokens(ids)
                embeds = sub.audio_embed(ids, base, audio_input_features=feats["audio_input_features"],
                                         audio_embed_sizes=feats["audio_embed_sizes"],
                                         audio_projection_mode="speech")
                t2 = time.perf_counter()
                o = model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
                tok = o.logits[0, -1].argmax().view(1, 1)
                past = o.past_key_values
                t3 = time.perf_counter()
                for _ in range(args.gen_tokens - 1):
                    o = model(input_ids=tok, past_key_values=past, use_cache=True)
                    tok = o.logits[0, -1].argmax().view(1, 1)
                    past = o.past_key_values
                t4 = time.perf_counter()
            f_ms.append((t1 - t0) * 1e3)
            e_ms.append((t2 - t1) * 1e3)
            p_ms.append((t3 - t2) * 1e3)
            d_ms.append((t4 - t3) * 1e3)
            print(f"{secs} s run {r}: features {f_ms[-1]:.0f} encoder {e_ms[-1]:.0f} prefill {p_ms[-1]:.0f} "
                  f"decode {d_ms[-1]:.0f} ms", flush=True)
        med = statistics.median
        total = [a + b + c + d for a, b, c, d in zip(f_ms, e_ms, p_ms, d_ms)]
        out.append({"seconds": secs, "audio_tokens": k, "prompt_tokens": ids.shape[1],
                    "gen_tokens": args.gen_tokens, "features_ms": med(f_ms), "encoder_ms": med(e_ms),
                    "prefill_ms": med(p_ms), "decode_ms": med(d_ms),
                    "time_to_first_token_ms": med([a + b + c for a, b, c in zip(f_ms, e_ms, p_ms)]),
                    "real_time_factor": med(total) / 1e3 / secs, "runs": args.runs})
    return out


if __name__ == "__main__":
    main()
