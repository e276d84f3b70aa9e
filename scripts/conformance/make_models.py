#!/usr/bin/env python3
"""Writes tiny random-weight GGUF models, one per architecture, for the llama.cpp conformance suite.

Everything is deterministic from --seed (numpy PCG64 `default_rng`). All tensors are F32; the
quantized variants are made from these files by `make_reference.sh` with llama-quantize.

Models (hidden 256, FFN 512, 4 heads, context 512):
  llama       2 layers, 2 KV heads, head 64, RoPE (normal/interleaved) base 10000, separate output.weight,
              GPT-2 byte-level BPE vocab (pre=llama-bpe)
  llama3rope  same shapes as llama, RoPE base 500000 plus a `rope_freqs.weight` tensor holding the
              Llama-3 frequency factors (factor 8, low 1, high 4, original context 8192) - this is how
              llama.cpp's converter stores Llama-3 rope scaling (no rope.scaling.* metadata)
  qwen2       2 layers, 2 KV heads, head 64, q/k/v biases, NEOX RoPE base 1e6, tied embeddings, pre=qwen2
  qwen3       2 layers, 2 KV heads, head 64, per-head attn_q_norm/attn_k_norm, NEOX RoPE 1e6, tied, pre=qwen2
  gemma3      7 layers, 1 KV head, key/value length 128 (so n_head*head = 512 != hidden 256),
              sliding window 8 (layers 0-4 and 6 local, layer 5 global: llama.cpp's default pattern 6),
              rope.freq_base 1e6 (global layers), local layers use llama.cpp's default 10000
              (gemma3.rope.freq_base_swa is not written, as the HF converter does not write it),
              tied embeddings, SentencePiece-style vocab with byte fallback (tokenizer.ggml.model=llama)

Usage: make_models.py OUT_DIR [--seed 1234]
"""
import argparse
import math
import os
from collections import Counter

import numpy as np
import gguf

HIDDEN = 256
FFN = 512
N_HEAD = 4
CTX = 512

# A small fixed corpus to train the tiny tokenizers on (English, code, digits, a little unicode).
CORPUS = """
The quick brown fox jumps over the lazy dog. The capital of France is Paris, and the capital of
Germany is Berlin. Once upon a time there was a little model that wanted to run on every machine.
It was small, it was fast, and it was honest about its numbers. The numbers were 12345 and 67890.
Hello world! hello world, héllo wörld. This is a test of the tokenizer: spaces, tabs and newlines.
def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

for i in range(10):
    print(i, fibonacci(i))

class Model:
    def __init__(self, layers, hidden):
        self.layers = layers
        self.hidden = hidden
	return self.forward(x)
What is the capital of France? The answer is Paris. What is the meaning of life? It is to learn.
In the beginning the model knew nothing; then it read the text, and the text was good.
the the the and and and of of to to in in is is it it that that was was for for on on with with
In 2024 there were 100 models, in 2025 there were 200 and by 2026 there were 300; 123 456 789 1000.
"""

# ---------------------------------------------------------------- tokenizers


def bytes_to_unicode():
    """GPT-2's byte -> printable unicode char map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def train_bpe(words, n_merges):
    """Plain BPE on a Counter of words (each a tuple of symbols). Ties broken lexicographically so it
    is deterministic. Returns the list of (a, b) merges in order."""
    words = {tuple(w): c for w, c in words.items()}
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for w, c in words.items():
            for i in range(len(w) - 1):
                pairs[(w[i], w[i + 1])] += c
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]  # most frequent, then smallest pair
        merges.append(best)
        new = {}
        for w, c in words.items():
            out = []
            i = 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] = new.get(tuple(out), 0) + c
        words = new
    return merges


BPE_SPECIALS = [("<think>", 4), ("<|endoftext|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3)]
BPE_VOCAB = 512


def gpt2_vocab():
    """512 tokens: ids 0..255 the byte-level chars (byte value order), then merges, then specials.
    Returns tokens, token types, merges (as 'a b' strings)."""
    import regex

    b2u = bytes_to_unicode()
    # digits grouped by up to 3 (as Llama 3's pre-tokenizer does) so that the vocabulary has some
    # multi-digit tokens: llama-bpe then groups digits, qwen2 splits them one by one
    pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    words = Counter()
    for piece in pat.findall(CORPUS):
        words[tuple(b2u[b] for b in piece.encode("utf-8"))] += 1
    n_merges = BPE_VOCAB - 256 - len(BPE_SPECIALS)
    merges = train_bpe(words, n_merges)
    assert len(merges) == n_merges, len(merges)
    tokens = [b2u[b] for b in range(256)]
    seen = set(tokens)
    for a, b in merges:
        assert a + b not in seen
        tokens.append(a + b)
        seen.add(a + b)
    types = [1] * len(tokens)
    for t, ty in BPE_SPECIALS:
        tokens.append(t)
        types.append(ty)
    assert len(tokens) == BPE_VOCAB
    return tokens, types, [f"{a} {b}" for a, b in merges]


SPM_VOCAB = 512
SPM_SPECIALS = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 3), ("<start_of_turn>", 3), ("<end_of_turn>", 3),
                ("\n", 4), ("\n\n", 4)]


def spm_vocab():
    """Gemma-like SentencePiece BPE vocab: 0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, 4/5 turn markers,
    6/7 user-defined newline pieces (as in Gemma 3), 8..263 byte fallback <0x00>..<0xFF> (score 0),
    then normal pieces: merges in order with scores 0, -1, -2, ... followed by the single chars.
    Spaces are U+2581; no space prefix is added (tokenizer.ggml.add_space_prefix = false)."""
    tokens = [t for t, _ in SPM_SPECIALS]
    types = [ty for _, ty in SPM_SPECIALS]
    scores = [-1000.0] * len(SPM_SPECIALS)
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(6)
        scores.append(0.0)
    text = CORPUS.replace(" ", "\u2581")
    chars = sorted(set(text) - {"\n"})
    words = Counter()
    import regex

    for w in regex.findall(r"\u2581*[^\u2581\n]+|\u2581+", text):
        words[tuple(w)] += 1
    n_norm = SPM_VOCAB - len(tokens)
    n_merges = n_norm - len(chars)
    merges = train_bpe(words, n_merges)
    pieces = [a + b for a, b in merges]
    seen = set(tokens)
    out = []
    for p in pieces + chars:
        if p not in seen:
            seen.add(p)
            out.append(p)
    for i, p in enumerate(out):
        tokens.append(p)
        types.append(1)
        scores.append(float(-i))
    assert len(tokens) <= SPM_VOCAB
    # pad with unused control tokens to a round size (like Gemma's <unusedN>)
    k = 0
    while len(tokens) < SPM_VOCAB:
        tokens.append(f"<unused{k}>")
        types.append(3)
        scores.append(-1000.0)
        k += 1
    return tokens, types, scores


# ---------------------------------------------------------------- weights


class Gen:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def mat(self, rows, cols, std):
        # numpy shape (rows=out, cols=in) -> ggml ne = {in, out}
        return (self.rng.standard_normal((rows, cols)) * std).astype(np.float32)

    def vec(self, n, mean, std):
        return (mean + self.rng.standard_normal(n) * std).astype(np.float32)


def llama3_rope_factors(base, dim, factor=8.0, low=1.0, high=4.0, old_ctx=8192):
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wl, high_wl = old_ctx / low, old_ctx / high
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            s = (old_ctx / wl - low) / (high - low)
            out.append(1.0 / ((1 - s) / factor + s))
    return np.array(out, dtype=np.float32)


def write_model(path, name, seed):
    g = Gen(seed)
    arch = "llama" if name.startswith("llama") else name
    cfg = {
        "llama": dict(layers=2, kv=2, head=64, base=10000.0, eps=1e-5, tied=False),
        "llama3rope": dict(layers=2, kv=2, head=64, base=500000.0, eps=1e-5, tied=False),
        "qwen2": dict(layers=2, kv=2, head=64, base=1000000.0, eps=1e-6, tied=True),
        "qwen3": dict(layers=2, kv=2, head=64, base=1000000.0, eps=1e-6, tied=True),
        "gemma3": dict(layers=7, kv=1, head=128, base=1000000.0, eps=1e-6, tied=True),
    }[name]
    L, kv, hd = cfg["layers"], cfg["kv"], cfg["head"]
    w = gguf.GGUFWriter(path, arch)
    w.add_string("general.name", f"veil-conformance-{name}")
    w.add_uint32("general.file_type", 0)  # ALL_F32
    w.add_uint32(f"{arch}.context_length", CTX)
    w.add_uint32(f"{arch}.embedding_length", HIDDEN)
    w.add_uint32(f"{arch}.block_count", L)
    w.add_uint32(f"{arch}.feed_forward_length", FFN)
    w.add_uint32(f"{arch}.attention.head_count", N_HEAD)
    w.add_uint32(f"{arch}.attention.head_count_kv", kv)
    w.add_float32(f"{arch}.rope.freq_base", cfg["base"])
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg["eps"])
    if arch == "gemma3":
        w.add_uint32(f"{arch}.attention.key_length", hd)
        w.add_uint32(f"{arch}.attention.value_length", hd)
        w.add_uint32(f"{arch}.attention.sliding_window", 8)
    else:
        w.add_uint32(f"{arch}.rope.dimension_count", hd)

    # tokenizer
    if arch == "gemma3":
        toks, types, scores = spm_vocab()
        w.add_string("tokenizer.ggml.model", "llama")
        w.add_string("tokenizer.ggml.pre", "default")
        w.add_array("tokenizer.ggml.tokens", toks)
        w.add_array("tokenizer.ggml.scores", scores)
        w.add_array("tokenizer.ggml.token_type", types)
        w.add_uint32("tokenizer.ggml.bos_token_id", 2)
        w.add_uint32("tokenizer.ggml.eos_token_id", 1)
        w.add_uint32("tokenizer.ggml.unknown_token_id", 3)
        w.add_uint32("tokenizer.ggml.padding_token_id", 0)
        w.add_bool("tokenizer.ggml.add_bos_token", True)
        w.add_bool("tokenizer.ggml.add_eos_token", False)
        w.add_bool("tokenizer.ggml.add_space_prefix", False)
    else:
        toks, types, merges = gpt2_vocab()
        w.add_string("tokenizer.ggml.model", "gpt2")
        w.add_string("tokenizer.ggml.pre", "llama-bpe" if arch == "llama" else "qwen2")
        w.add_array("tokenizer.ggml.tokens", toks)
        w.add_array("tokenizer.ggml.token_type", types)
        w.add_array("tokenizer.ggml.merges", merges)
        eot = toks.index("<|endoftext|>")
        if arch == "llama":
            w.add_uint32("tokenizer.ggml.bos_token_id", eot)
            w.add_uint32("tokenizer.ggml.eos_token_id", eot)
            w.add_bool("tokenizer.ggml.add_bos_token", True)
        else:
            w.add_uint32("tokenizer.ggml.bos_token_id", eot)
            w.add_uint32("tokenizer.ggml.eos_token_id", toks.index("<|im_end|>"))
            w.add_uint32("tokenizer.ggml.padding_token_id", eot)
            w.add_bool("tokenizer.ggml.add_bos_token", False)
    n_vocab = len(toks)

    # weights: std ~ 1/sqrt(fan_in) for projections into attention/FFN, smaller for residual writers
    s_in = 1.0 / math.sqrt(HIDDEN)
    emb_std = 0.1
    w.add_tensor("token_embd.weight", g.mat(n_vocab, HIDDEN, emb_std))
    if name == "llama3rope":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg["base"], hd))
    for i in range(L):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", g.vec(HIDDEN, 1.0, 0.1))
        w.add_tensor(p + "attn_q.weight", g.mat(N_HEAD * hd, HIDDEN, s_in))
        w.add_tensor(p + "attn_k.weight", g.mat(kv * hd, HIDDEN, s_in))
        w.add_tensor(p + "attn_v.weight", g.mat(kv * hd, HIDDEN, s_in))
        if arch == "qwen2":
            w.add_tensor(p + "attn_q.bias", g.vec(N_HEAD * hd, 0.0, 0.1))
            w.add_tensor(p + "attn_k.bias", g.vec(kv * hd, 0.0, 0.1))
            w.add_tensor(p + "attn_v.bias", g.vec(kv * hd, 0.0, 0.1))
        if arch in ("qwen3", "gemma3"):
            w.add_tensor(p + "attn_q_norm.weight", g.vec(hd, 1.0, 0.1))
            w.add_tensor(p + "attn_k_norm.weight", g.vec(hd, 1.0, 0.1))
        w.add_tensor(p + "attn_output.weight", g.mat(HIDDEN, N_HEAD * hd, 0.5 / math.sqrt(N_HEAD * hd)))
        if arch == "gemma3":
            w.add_tensor(p + "post_attention_norm.weight", g.vec(HIDDEN, 1.0, 0.1))
        w.add_tensor(p + "ffn_norm.weight", g.vec(HIDDEN, 1.0, 0.1))
        w.add_tensor(p + "ffn_gate.weight", g.mat(FFN, HIDDEN, s_in))
        w.add_tensor(p + "ffn_up.weight", g.mat(FFN, HIDDEN, s_in))
        w.add_tensor(p + "ffn_down.weight", g.mat(HIDDEN, FFN, 0.5 / math.sqrt(FFN)))
        if arch == "gemma3":
            w.add_tensor(p + "post_ffw_norm.weight", g.vec(HIDDEN, 1.0, 0.1))
    w.add_tensor("output_norm.weight", g.vec(HIDDEN, 1.0, 0.1))
    if not cfg["tied"]:
        w.add_tensor("output.weight", g.mat(n_vocab, HIDDEN, emb_std))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


MODELS = ["llama", "llama3rope", "qwen2", "qwen3", "gemma3"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--only", nargs="*", default=MODELS)
    a = ap.parse_args()
    os.makedirs(a.out_dir, exist_ok=True)
    for k, name in enumerate(MODELS):
        if name not in a.only:
            continue
        path = os.path.join(a.out_dir, f"tiny-{name}-f32.gguf")
        write_model(path, name, a.seed + 1000 * k)
        print(path, os.path.getsize(path))


if __name__ == "__main__":
    main()
