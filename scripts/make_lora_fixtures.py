#!/usr/bin/env python3
"""Reference LoRA SFT run the Rust trainer (`phi4 sft`) must reproduce: tests/fixtures/lora/.

    python scripts/make_lora_fixtures.py [--swift]

Pinned environment: scripts/requirements-fixtures.txt with transformers==5.25.0, peft==0.21.2
(torch 2.15.0). `--swift` re-encodes data.jsonl with ms-swift's own phi3 template (ms-swift 4.6.0
needs transformers < 5.20: run it from a second venv); without it the committed samples.json is
used. Deterministic (8 s on 2 cores).

Written (all small, tiny-phi4 has 3 layers of width 96):
  samples.json            ms-swift's input_ids / labels for data.jsonl (-100 = no loss)
  init/, init_randB/      PEFT adapter dirs: PEFT's init (seed 1234, B = 0) and the same with
                          B ~ N(0, 0.05^2) (seed 99) so that the first gradient of A is not zero
  grads_randB.safetensors the pre-clip gradient of every LoRA tensor over the first window,
                          from init_randB (PEFT key names)
  trajectory.json         args, loss / grad_norm / lr / labelled tokens per step of the run below
  final/                  the adapter after that run (PEFT format)
  merged_logits.safetensors  input_ids and the logits of one prompt: base + final adapter unmerged (PeftModel),
                          merged (merge_and_unload) in f32 and rounded to bf16, for the export and --adapters tests

The run follows transformers 5.25's Trainer exactly (checked below by running the Trainer on the
same data): sequential order, right padding, per_device batch 2, gradient accumulation 2 with a
partial last window (9 samples -> 5 batches -> 3 updates per epoch), 3 epochs (T = 9), loss =
sum of token CE over the window / the window's labelled tokens, AdamW (wd 0.1, betas 0.9/0.95,
eps 1e-8), cosine schedule with warmup ratio 0.1 (W = ceil(0.9) = 1, so the first update has
lr 0), clip at 1.0 (grad_norm logged before clipping). LoRA r 8, alpha 32, dropout 0, targets
qkv_proj, o_proj, gate_up_proj, down_proj. The last sample has 107 tokens, past the tiny
model's original context of 64, so its batch runs on the long LongRoPE factors.
"""
import argparse
import json
import math
import os
import subprocess
import sys

import torch
from safetensors.torch import save_file

import peft
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "tests/fixtures/tiny-phi4")
OUT = os.path.join(ROOT, "tests/fixtures/lora")
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
ARGS = dict(r=8, alpha=32.0, lr=1e-3, wd=0.1, beta2=0.95, warmup_ratio=0.1, bs=2, ga=2, epochs=3,
            max_grad_norm=1.0, pad_id=500)

ap = argparse.ArgumentParser()
ap.add_argument("--swift", action="store_true", help="re-encode data.jsonl with ms-swift")
opts = ap.parse_args()
torch.set_num_threads(1)
print(f"torch {torch.__version__} transformers {transformers.__version__} peft {peft.__version__}")

if opts.swift:
    from swift import get_processor, get_template
    proc = get_processor(BASE, model_type="phi3")
    tmpl = get_template(proc)
    tmpl.set_mode("train")
    enc = [tmpl.encode(json.loads(line)) for line in open(os.path.join(OUT, "data.jsonl"))]
    samples = [{"input_ids": list(e["input_ids"]), "labels": list(e["labels"])} for e in enc]
    with open(os.path.join(OUT, "samples.json"), "w") as f:
        json.dump(samples, f)
samples = json.load(open(os.path.join(OUT, "samples.json")))
a = argparse.Namespace(**ARGS)


def load_base():
    m = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32, attn_implementation="sdpa")
    m.config.use_cache = False
    return m


def lora_model(init_dir=None):
    base = load_base()
    if init_dir is None:
        torch.manual_seed(1234)
        cfg = LoraConfig(task_type="CAUSAL_LM", r=a.r, lora_alpha=a.alpha, lora_dropout=0.0,
                         target_modules=TARGETS)
        return get_peft_model(base, cfg)
    return PeftModel.from_pretrained(base, init_dir, is_trainable=True)


def collate(batch):
    n = max(len(s["input_ids"]) for s in batch)
    ids = torch.full((len(batch), n), a.pad_id, dtype=torch.long)
    lab = torch.full((len(batch), n), -100, dtype=torch.long)
    att = torch.zeros((len(batch), n), dtype=torch.long)
    for i, s in enumerate(batch):
        k = len(s["input_ids"])
        ids[i, :k] = torch.tensor(s["input_ids"])
        lab[i, :k] = torch.tensor(s["labels"])
        att[i, :k] = 1
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


def ce_sum(model, b):
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             b["labels"][:, 1:].reshape(-1), ignore_index=-100,
                                             reduction="sum")


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def key(n):
    return n.replace(".default", "")


def window_step(model, window):
    n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
    total = 0.0
    for b in window:
        loss = ce_sum(model, b) / n
        loss.backward()
        total += loss.item()
    return total, n


init_dir, randb_dir = os.path.join(OUT, "init"), os.path.join(OUT, "init_randB")
m = lora_model()
m.save_pretrained(init_dir)
g = torch.Generator().manual_seed(99)
with torch.no_grad():
    for n, p in m.named_parameters():
        if "lora_B" in n:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
m.save_pretrained(randb_dir)
del m

batches = [collate(samples[i:i + a.bs]) for i in range(0, len(samples), a.bs)]
windows = [batches[i:i + a.ga] for i in range(0, len(batches), a.ga)]

# 1. One window's pre-clip gradients from init_randB.
m = lora_model(randb_dir)
m.train()
loss, n = window_step(m, windows[0])
grads = {key(k): p.grad.detach().clone().contiguous() for k, p in trainable(m)}
save_file(grads, os.path.join(OUT, "grads_randB.safetensors"), metadata={"format": "pt"})
gnorm = torch.sqrt(sum((x ** 2).sum() for x in grads.values())).item()
grad_fixture = {"loss": loss, "n_tokens": n, "grad_norm": gnorm}
print(f"[grads] loss {loss:.6f} N {n} grad_norm {gnorm:.6f}")
del m

# 2. The training run, as transformers' Trainer runs it.
per_epoch = len(windows)
T = per_epoch * a.epochs
W = math.ceil(T * a.warmup_ratio)


def lr_lambda(s):
    if s < W:
        return s / max(1, W)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (s - W) / max(1, T - W))))


m = lora_model(init_dir)
m.train()
params = [p for _, p in trainable(m)]
opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, a.beta2), eps=1e-8, weight_decay=a.wd,
                        foreach=False)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
traj = []
for epoch in range(a.epochs):
    for w in windows:
        loss, n = window_step(m, w)
        gn = torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm).item()
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        traj.append({"step": len(traj) + 1, "lr": lr, "loss": loss, "grad_norm": gn, "n_tokens": n})
        print(f"[run] step {len(traj)}/{T} lr {lr:.6e} loss {loss:.6f} grad_norm {gn:.6f} N {n}")
m.save_pretrained(os.path.join(OUT, "final"))
final = {key(k): p.detach().clone() for k, p in trainable(m)}

# 3. The same run through transformers.Trainer: the loop above is its semantics.
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainingArguments


class SeqTrainer(Trainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class DS(torch.utils.data.Dataset):
    def __len__(self):
        return len(samples)

    def __getitem__(self, i):
        return samples[i]


tmp = os.path.join("/tmp", "phi4-lora-fixture-trainer")
ta = TrainingArguments(output_dir=tmp, per_device_train_batch_size=a.bs, gradient_accumulation_steps=a.ga,
                       num_train_epochs=a.epochs, learning_rate=a.lr, weight_decay=a.wd, adam_beta2=a.beta2,
                       lr_scheduler_type="cosine", warmup_steps=a.warmup_ratio, max_grad_norm=a.max_grad_norm,
                       optim="adamw_torch", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                       seed=42, dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)
tr = SeqTrainer(model=lora_model(init_dir), args=ta, train_dataset=DS(), data_collator=collate)
tr.train()
hf = [h for h in tr.state.log_history if "loss" in h]
assert len(hf) == T, (len(hf), T)
worst = max(abs(x["loss"] - h["loss"]) / abs(x["loss"]) for x, h in zip(traj, hf))
dmax = max((p.detach() - final[key(k)]).abs().max().item() for k, p in trainable(tr.model))
print(f"[trainer vs loop] max rel loss diff {worst:.2e}, max |adapter diff| {dmax:.2e}")
assert worst < 1e-5 and dmax < 1e-5

# 4. Logits of one prompt with the final adapter, unmerged and merged.
prompt = samples[3]["input_ids"]
ids = torch.tensor([prompt])
with torch.no_grad():
    pm = PeftModel.from_pretrained(load_base(), os.path.join(OUT, "final"))
    unmerged = pm(input_ids=ids).logits[0]
    mm = pm.merge_and_unload()
    merged = mm(input_ids=ids).logits[0]
    # What a bf16 merged checkpoint computes (swift export / save_pretrained in bf16): the
    # parameters rounded (not the rotary buffers, which a checkpoint does not hold).
    for p in mm.parameters():
        p.data = p.data.to(torch.bfloat16).to(torch.float32)
    merged_bf16 = mm(input_ids=ids).logits[0]
    base = load_base()(input_ids=ids).logits[0]
print(f"[merge] max |merged - unmerged| {(merged - unmerged).abs().max().item():.2e}, "
      f"max |adapter effect| {(unmerged - base).abs().max().item():.2e}")
save_file({"input_ids": ids[0].float(), "unmerged": unmerged.contiguous(), "merged": merged.contiguous(),
           "merged_bf16": merged_bf16.contiguous(),
           "base": base.contiguous()}, os.path.join(OUT, "merged_logits.safetensors"))

json.dump({"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "peft": peft.__version__},
           "args": ARGS, "targets": TARGETS, "total_steps": T, "warmup_steps": W,
           "grads_randB": grad_fixture, "trajectory": traj},
          open(os.path.join(OUT, "trajectory.json"), "w"), indent=1)
for d in ("init", "init_randB", "final"):
    readme = os.path.join(OUT, d, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
print("wrote", OUT)
