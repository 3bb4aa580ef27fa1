"""The precision a run computes in when --dtype is not given, and the refusal of a base that cannot fit.

A CPU with bf16 matrix units (AMX, AVX512_BF16) defaults to bf16, another CPU to fp32; the choice is printed.
A base whose weights alone exceed the memory available in the chosen dtype is refused from its config.json,
in one line that names the dtype that fits, before any weight is read and before --out is touched.
"""
import os
import platform
import subprocess
import sys

import pytest
import torch

import coin
import evaluate
import hf_io
import memory
import precision
from conftest import ROOT
from memory import check_fits, count_parameters
from model import ModelArgs

DEMO = str(ROOT / "examples" / "flan_coin_demo.jsonl")


@pytest.mark.parametrize("unit, expected, why", [
    ("amx_tile", torch.bfloat16, "the default on a CPU with AMX_TILE units"),
    ("avx512_bf16", torch.bfloat16, "the default on a CPU with AVX512_BF16 units"),
    (None, torch.float32, "the default on a CPU without bf16 units"),
])
def test_the_cpu_default_follows_the_bf16_units_and_says_so(monkeypatch, capsys, unit, expected, why):
    monkeypatch.setattr(precision, "cpu_bf16_unit", lambda: unit)
    assert precision.resolve_precision("cpu", None) == ("cpu", expected)
    assert capsys.readouterr().err == f"precision: {precision.DTYPE_NAMES[expected]} on cpu ({why})\n"
    assert precision.resolve_precision("cpu", "fp32") == ("cpu", torch.float32)  # --dtype wins
    assert capsys.readouterr().err == "precision: fp32 on cpu (--dtype)\n"


def test_the_bf16_unit_is_what_torch_reports():
    reported = [unit for unit in precision.BF16_UNITS if getattr(torch.cpu, f"_is_{unit}_supported")()]
    assert precision.cpu_bf16_unit() == (reported[0] if reported else None)


def test_a_base_that_cannot_fit_is_refused_with_the_dtype_that_fits():
    args = ModelArgs.tiny()
    n = count_parameters(args)
    check_fits(args, torch.float32, "cpu", "config.json", available=4 * n)  # exactly fits
    with pytest.raises(ValueError, match=r"^config.json: 0.00B weights need 0.0 GiB in fp32 but cpu has "
                                         r"0.0 GiB available; use --dtype bf16 \(0.0 GiB\)$"):
        check_fits(args, torch.float32, "cpu", "config.json", available=4 * n - 1)
    with pytest.raises(ValueError, match="in bf16 but .* use a machine with more memory"):
        check_fits(args, torch.bfloat16, "cpu", "config.json", available=2 * n - 1)
    with pytest.raises(ValueError, match="in fp32 .* use a machine with more memory"):
        check_fits(args, torch.float32, "cpu", "config.json", available=2 * n - 1)


def test_llama_7b_in_fp32_does_not_fit_24_gib_and_bf16_does():
    with pytest.raises(ValueError, match=r"6.74B weights need 25.1 GiB in fp32 .* --dtype bf16 \(12.6 GiB\)"):
        check_fits(ModelArgs(), torch.float32, "cpu", "config.json", available=22 * 2**30)
    check_fits(ModelArgs(), torch.bfloat16, "cpu", "config.json", available=22 * 2**30)


def test_the_memory_available_is_a_positive_number_of_bytes():
    assert 0 < memory.available_memory("cpu") < 2**50


FREE_A_BLOCK = """
import sys
from pathlib import Path
import torch
import memory
def anon():
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["RssAnon"].split()[0]) * 1024
if sys.argv[1] == "returned":
    memory.return_freed_memory("cpu")
torch.ones(2**22).sum()  # a 16 MiB tensor, freed: glibc's default threshold rises past its size
before = anon()
block, kept = torch.ones(2**22), torch.ones(256)  # under glibc's default, kept lies above block in a heap
del block
print(anon() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="return_freed_memory tunes glibc's malloc")
@pytest.mark.parametrize("mode, most_kept", [("returned", 2**20), ("default", None)])
def test_a_freed_tensor_goes_back_to_the_system(mode, most_kept):
    """What gradient checkpointing does at 7B width, in miniature: a block freed below a live one stays in
    the process under glibc's default (the test shows the default keeps it, so it can fail), and goes back
    once load_model has called return_freed_memory. Run in a fresh process: its allocator is untouched."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}  # a user's choice is kept
    kept = int(subprocess.run([sys.executable, "-c", FREE_A_BLOCK, mode], cwd=ROOT, check=True, env=env,
                              capture_output=True, text=True).stdout)
    if most_kept:
        assert kept <= most_kept
    elif kept < 8 * 2**20:  # most of the 16 MiB kept: what the fix must return
        pytest.skip(f"this glibc returns the block by default ({kept} bytes kept): the fix is not needed")


@pytest.fixture
def no_memory(monkeypatch):
    """A machine with 1 KiB available, whose weights are never read."""
    monkeypatch.setattr(memory, "available_memory", lambda device: 1024)

    def read_tensors(*args, **kwargs):
        raise AssertionError("a weight was read before the refusal")
    monkeypatch.setattr(hf_io, "read_tensors", read_tensors)


def test_coin_and_evaluate_refuse_before_loading_or_writing(no_memory, tmp_path, stories_dir):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"^error: .*stories260K/config.json: 0.00B weights need 0.0 GiB in "
                                         r"fp32 but cpu has 0.0 GiB available; use a machine"):
        coin.main(["--data", DEMO, "--base", str(stories_dir), "--out", str(out), "--dtype", "fp32",
                   "--device", "cpu"])
    assert not out.exists()
    with pytest.raises(SystemExit, match=r"^error: .*stories260K/config.json: .* in fp32 but cpu has"):
        evaluate.main(["--base", str(stories_dir), "--glue-dir", str(ROOT / "examples" / "glue_demo"),
                       "--tasks", "sst2", "--samples", "2", "--out", str(out), "--dtype", "fp32",
                       "--device", "cpu"])
    assert not out.exists()
