"""The GPU suite (benchmarks/gpu.sh) runs on a CPU too, at a tiny shape, so that it does not rot between the
sessions that have a GPU: a smoke test of its code paths, not of its numbers (benchmarks print those)."""
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, shared


def test_the_gpu_suite_runs_at_a_tiny_shape_on_cpu(tmp_path):
    for peer in ("transformers", "peft"):
        pytest.importorskip(peer, reason="the GPU suite measures coin against transformers + peft")
    done = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--shape", "tiny", "--device", "cpu",
                           "--dtype", "fp32", "--steps", "1", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "gpu_table.md").read_text()
    for row in ("memory: micro-batch 16 x 256 tokens", "CoIN step of 64 examples: real tokens/s",
                "model FLOPs utilisation", "evaluation: examples/s", "identical answers"):
        assert row in table, row


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU gpu.sh runs the 7B suite: run it by hand")
def test_gpu_sh_says_when_there_is_no_gpu():
    done = subprocess.run(["bash", "benchmarks/gpu.sh"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0
    assert "no CUDA GPU here" in done.stdout or "coin GPU benchmarks" in done.stdout


def test_the_7b_rehearsal_runs_at_a_tiny_shape(tmp_path):
    """benchmarks/rehearse_7b.py end to end on a 2-layer model with the real tokenizer: every command runs,
    SIGTERM during step 2 saves and exits 75, --resume finishes, both evaluations answer."""
    shared("tokenizers", "llama", "tokenizer.model")
    done = subprocess.run([sys.executable, "benchmarks/rehearse_7b.py", "--shape", "tiny", "--work",
                           str(tmp_path), "--samples", "2", "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (tmp_path / "rehearsal_table.md").read_text()
    for row in ("| coin.py | SIGTERM during step 2 -> exit |", "status 75 and 'saved step 2': met",
                "| coin.py --resume | exit status, wall | 0,", "| coin.py | step 3:",
                "| evaluate.py --ckpt | answers generated, examples/s after loading | 12,",
                "| evaluate.py --base --adapter | answers generated, examples/s after loading | 12,"):
        assert row in table, (row, table)
