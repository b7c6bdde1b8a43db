"""llama.cpp side of examples/decode_lockstep.rs: loads a GGUF, decodes a 4-token prompt, prints
"ready", then decodes one token per line of stdin and prints that step's seconds."""
import sys
import time

import llama_cpp as L

path, threads = sys.argv[1], int(sys.argv[2])
L.llama_backend_init()
model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
cp = L.llama_context_default_params()
cp.n_ctx = 1024
cp.n_batch = 512
cp.n_ubatch = 512
cp.n_threads = threads
cp.n_threads_batch = threads
ctx = L.llama_init_from_model(model, cp)


def decode(toks):
    arr = (L.llama_token * len(toks))(*toks)
    if L.llama_decode(ctx, L.llama_batch_get_one(arr, len(toks))) != 0:
        raise SystemExit("llama_decode failed")


decode([1, 2, 3, 4])
print("ready", flush=True)
for line in sys.stdin:
    t = time.perf_counter()
    decode([int(line)])
    print(time.perf_counter() - t, flush=True)
