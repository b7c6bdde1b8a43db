#!/usr/bin/env python3
"""Writes tests/fixtures/ggml_kquants.json: random Q4_K and Q6_K blocks and their values as the
`gguf` Python package (llama.cpp's own gguf-py, pinned below) decodes them, so the Rust decoder of
k-quant GGUF tensors is checked against an independent implementation. Never run by CI.

  pip install gguf==0.19.0 numpy==2.4.6 && python3 scripts/make_ggml_fixture.py
"""
import json
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

rng = np.random.default_rng(20261122)


def f16_bytes(vals):
    return np.asarray(vals, dtype=np.float16).tobytes()


def q4_k_block():
    d, dmin = rng.uniform(0.001, 0.05, 2)
    return f16_bytes([d, dmin]) + rng.integers(0, 256, 12, dtype=np.uint8).tobytes() + \
        rng.integers(0, 256, 128, dtype=np.uint8).tobytes()


def q6_k_block():
    return rng.integers(0, 256, 128 + 64, dtype=np.uint8).tobytes() + \
        rng.integers(-128, 128, 16, dtype=np.int8).tobytes() + f16_bytes([rng.uniform(0.001, 0.05)])


out = {}
for name, qtype, make in [("Q4_K", T.Q4_K, q4_k_block), ("Q6_K", T.Q6_K, q6_k_block)]:
    raw = b"".join(make() for _ in range(3))
    vals = dequantize(np.frombuffer(raw, dtype=np.uint8), qtype).reshape(-1)
    assert vals.size == 3 * 256
    out[name] = {"bytes": raw.hex(), "values": [float(v) for v in vals]}
path = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "ggml_kquants.json"
path.write_text(json.dumps(out) + "\n")
print("wrote", path)
