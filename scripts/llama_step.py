"""llama.cpp decoding through llama-cpp-python's low-level API, with token ids, as both phi4
benchmarks against it run it: `open_context` is the one set-up (context size, batch sizes,
threads) that scripts/bench_vs_llamacpp.py's child process and examples/decode_lockstep.rs use.

Run as a script (the llama.cpp side of examples/decode_lockstep.rs): loads a GGUF, decodes a
4-token prompt, prints "ready", then decodes one token per line of stdin and prints that
step's seconds."""
import sys
import time


def open_context(path, threads):
    """`(decode, argmax)`: `decode(token_ids)` runs them through the model, `argmax()` gives the
    arg-max of the last position's logits."""
    import llama_cpp as L
    import numpy as np

    L.llama_backend_init()
    model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
    cp = L.llama_context_default_params()
    cp.n_ctx = 1024
    cp.n_batch = 512
    cp.n_ubatch = 512
    cp.n_threads = threads
    cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cp)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))

    def decode(toks):
        arr = (L.llama_token * len(toks))(*toks)
        if L.llama_decode(ctx, L.llama_batch_get_one(arr, len(toks))) != 0:
            raise SystemExit("llama_decode failed")

    def argmax():
        logits = L.llama_get_logits_ith(ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(n_vocab,))))

    return decode, argmax


if __name__ == "__main__":
    decode, _ = open_context(sys.argv[1], int(sys.argv[2]))
    decode([1, 2, 3, 4])
    print("ready", flush=True)
    for line in sys.stdin:
        t = time.perf_counter()
        decode([int(line)])
        print(time.perf_counter() - t, flush=True)
