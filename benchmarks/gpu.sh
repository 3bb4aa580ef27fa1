#!/usr/bin/env bash
# coin's GPU benchmark suite: benchmarks/bench_gpu.py at LLaMA-7B shape with random weights (no download, no
# install: it needs torch, transformers, peft, sentencepiece and safetensors, as the device machines have).
# Prints one table in a few minutes on one H100, and writes it to $OUT/gpu_table.md when OUT is set; then
# benchmarks/rehearse_7b.py runs the README's full-scale commands on a random LLaMA-7B it writes to disk
# (13.5 GB) and prints their table ($OUT/rehearsal_table.md).
# Without a CUDA GPU it says so and exits 0. Extra arguments go to bench_gpu.py (e.g. --shape small).
set -euo pipefail
cd "$(dirname "$0")/.."
python=$(command -v python3 || command -v python)
if ! "$python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "benchmarks/gpu.sh: no CUDA GPU here, so nothing to measure"
    exit 0
fi
"$python" benchmarks/bench_gpu.py --shape 7b ${OUT:+--out "$OUT"} "$@"
# The paper's run rehearsed end to end (needs ../shared; GPU memory sampled with nvidia-smi)
"$python" benchmarks/rehearse_7b.py ${OUT:+--out "$OUT"}
