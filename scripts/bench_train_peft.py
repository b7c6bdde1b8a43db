#!/usr/bin/env python3
"""The PyTorch + PEFT peer of `phi4 bench --train`: one LoRA training step (r 8, alpha 32, every
projection, no dropout, every position labelled) on random weights of Phi-4-mini's shapes.

    python scripts/bench_train_peft.py --dtype bf16 --seq 512 [--layers 32] [--threads 2] [--runs 3]
                                       [--no-checkpointing]

Prints one JSON line: seconds per step (median), tokens/s, peak RSS. Not run in CI (torch is a
3 GB install); pinned versions in scripts/requirements-fixtures.txt (+ peft 0.21.2).
"""
import argparse
import json
import resource
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import Phi3Config, Phi3ForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
ap.add_argument("--seq", type=int, default=512)
ap.add_argument("--layers", type=int, default=32)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--runs", type=int, default=3)
ap.add_argument("--no-checkpointing", action="store_true")
a = ap.parse_args()
torch.set_num_threads(a.threads)
dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[a.dtype]
cfg = Phi3Config(vocab_size=200064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=a.layers,
                 num_attention_heads=24, num_key_value_heads=8, partial_rotary_factor=0.75,
                 tie_word_embeddings=True, max_position_embeddings=131072, pad_token_id=199999,
                 bos_token_id=199999, eos_token_id=199999)
torch.manual_seed(0)
model = Phi3ForCausalLM(cfg).to(dtype)
model.config.use_cache = False
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                         target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]))
if not a.no_checkpointing:
    # ms-swift's default (gradient_checkpointing=True); input grads so checkpointed layers backprop.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.1,
                        betas=(0.9, 0.95))
ids = torch.randint(0, 199999, (1, a.seq))


def step():
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


step()
times = []
for _ in range(a.runs):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
t = statistics.median(times)
print(json.dumps({"engine": f"torch {torch.__version__} + peft", "dtype": a.dtype, "seq": a.seq,
                  "layers": a.layers, "threads": a.threads, "gradient_checkpointing": not a.no_checkpointing,
                  "step_s": round(t, 3), "tokens_per_s": round(a.seq / t, 2),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
