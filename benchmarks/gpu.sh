#!/usr/bin/env bash
# coin's GPU benchmark suite: benchmarks/bench_gpu.py at LLaMA-7B shape with random weights (no download, no
# install: it needs torch, transformers, peft, sentencepiece and safetensors, as the device machines have).
# Prints one table in a few minutes on one H100, and writes it to $OUT/gpu_table.md when OUT is set.
# Without a CUDA GPU it says so and exits 0. Extra arguments go to bench_gpu.py (e.g. --shape small).
set -euo pipefail
cd "$(dirname "$0")/.."
python=$(command -v python3 || command -v python)
if ! "$python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "benchmarks/gpu.sh: no CUDA GPU here, so nothing to measure"
    exit 0
fi
"$python" benchmarks/bench_gpu.py --shape 7b ${OUT:+--out "$OUT"} "$@"
