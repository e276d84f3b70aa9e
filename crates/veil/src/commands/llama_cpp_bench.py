"""Times llama.cpp (through llama-cpp-python) the way `veil bench` times Veil.

Run by `veil bench --llama-cpp` with one JSON argument: {"model", "prompt" (token ids),
"tokens", "threads", "context"}. Prints one JSON line: prefill and decode tokens/s of one run,
and the greedy tokens, so the caller can check both engines ran the same model.
"""

import ctypes
import json
import sys
import time

import llama_cpp
import numpy as np


def main() -> None:
    args = json.loads(sys.argv[1])
    llm = llama_cpp.Llama(
        model_path=args["model"],
        n_ctx=args["context"],
        n_batch=512,
        n_threads=args["threads"],
        n_threads_batch=args["threads"],
        verbose=False,
    )
    vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:
        pointer = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(vocab,))

    prompt = args["prompt"]
    # One untimed prefill first, as `veil bench --llama-cpp` gives Veil and candle.
    llm.eval(prompt)
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    generated = []
    for _ in range(args["tokens"]):
        token = int(np.argmax(last_logits()))
        generated.append(token)
        llm.eval([token])
    t2 = time.perf_counter()
    print(
        json.dumps(
            {
                "prefill_tokens_per_second": len(prompt) / (t1 - t0),
                "decode_tokens_per_second": args["tokens"] / (t2 - t1),
                "tokens": generated,
            }
        )
    )


if __name__ == "__main__":
    main()
