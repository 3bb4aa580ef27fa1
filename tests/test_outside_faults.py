"""Faults from outside a run, injected into real coin.py and evaluate.py processes: a moved run folder, a
second launch on the same folder, a file size limit (to a write, a full disk), a SIGKILL during the final
save. run_folder.py says what each costs.

As in test_faults.py, each ends with the adapter (or results) of an uninterrupted run, bit for bit, or with a
one-line refusal that loses nothing; none of these tests times anything.
"""
import json
import resource
import shutil
import signal
import subprocess
import sys

import pytest

import coin
import evaluate
from conftest import ROOT, shared
from hf_io import load_adapter, load_model
from run_folder import IOERR
from test_faults import DEMO, assert_resumes_to, at_step, eval_flags, run, sigkilled, start, train_flags, wait
from test_faults import straight, when  # noqa: F401 (straight: the fixture of the uninterrupted run)


def start_child(command, *argv):
    """A process that runs `command` (the Python after `-c`) with argv; stdout and stderr are kept."""
    return subprocess.Popen([sys.executable, "-c", command, *map(str, argv)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run_limited(size, script, *argv):
    """(exit status, stdout, stderr) of a whole run of script that may write no file past `size` bytes:
    RLIMIT_FSIZE, with SIGXFSZ ignored, so that a write past it fails with EFBIG, as on a full disk."""
    def limit():  # in the child, before it runs Python
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return wait(subprocess.Popen([sys.executable, script, *map(str, argv)], cwd=ROOT, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limit))


def contents(folder):
    """{relative path: bytes} of every file under folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -----------------------------------------------------------------------------
# coin.py


def test_a_moved_run_folder_resumes_to_the_same_adapter_and_evaluate_finds_its_base(tmp_path, straight):
    """The base inside the run folder, where --tiny builds it; the folder moved after a SIGKILL."""
    out = tmp_path / "scratch" / "out"
    shutil.copytree(shared("models", "stories260K"), out / "base")
    flags = train_flags(out)
    flags[flags.index("--base") + 1] = str(out / "base")
    process = start("coin.py", *flags)
    at_step(process, out, 3)
    process.kill()
    assert wait(process)[0] == -signal.SIGKILL
    config = json.loads((out / "config.json").read_text())
    assert (config["out"], config["base"], config["data"]) == (".", "base", str(DEMO.resolve()))
    assert json.loads((out / "checkpoint-000002" / "config.json").read_text())["base"] == "../base"
    moved = tmp_path / "home" / "moved"
    moved.parent.mkdir()
    out.rename(moved)
    assert_resumes_to(straight, moved)
    for ckpt in (moved, moved / "checkpoint-000006"):
        assert evaluate.resolve_paths(evaluate.EvalConfig(ckpt=str(ckpt)))[0].resolve() == moved / "base"
    (moved / "base").rename(tmp_path / "base")  # a path gone since the run started: named, with its flag
    with pytest.raises(ValueError, match=rf"^{moved / 'base'}: not found, and {moved / 'config.json'} names "
                                         r"it as the run's base .*; give its new place with --base$"):
        coin.parse_config(["--out", str(moved), "--resume"])
    resumed = coin.parse_config(["--out", str(moved), "--resume", "--base", str(tmp_path / "base")])
    assert resumed.base == str(tmp_path / "base") and resumed.out == str(moved)


def test_a_second_launch_is_refused_while_the_first_runs_and_allowed_after_a_sigkill(tmp_path, straight):
    out = tmp_path / "out"
    first = start("coin.py", *train_flags(out))
    at_step(first, out, 1)
    first.send_signal(signal.SIGSTOP)  # it holds the folder however long the second one takes to start
    try:
        before = contents(out)
        status, _, stderr = run("coin.py", *train_flags(out), "--resume")
        assert status == 1 and stderr.splitlines()[-1] == (
            f"error: {out}: in use by another process (pid {first.pid}); wait for it to end, or give another "
            "folder")
        assert contents(out) == before  # nothing written, nothing removed
    finally:
        first.kill()
    assert wait(first)[0] == -signal.SIGKILL
    assert (out / ".lock").read_text() == f"{first.pid}\n"  # the file stays; its lock went with the process
    assert_resumes_to(straight, out)
    assert not (out / ".lock").exists()


def test_a_file_size_limit_stops_a_metrics_append_and_a_checkpoint_with_74_losing_nothing(tmp_path, straight):
    out = sigkilled(tmp_path, 3)  # in step 4: checkpoint-000002 is written
    older = contents(out / "checkpoint-000002")
    lines = (straight[0] / "metrics.jsonl").read_text().splitlines(keepends=True)
    # 1. Step 3's line crosses the limit; what the resume writes before it (config.json, metrics.jsonl cut
    # back to steps 1-2) stays below it.
    limit = len("".join(lines[:2])) + 100
    assert (straight[0] / "config.json").stat().st_size < limit
    status, _, stderr = run_limited(limit, "coin.py", "--out", out, "--resume")
    line = stderr.splitlines()[-1]
    assert status == IOERR and line.startswith(f"error: {out / 'metrics.jsonl'}: File too large (over the "
                                               f"file size limit of {limit} bytes: ulimit -f); ")
    assert line.endswith(" GiB free on its disk; the checkpoints written before it are kept: make room, then "
                         f"--resume (exit status {IOERR})")
    assert contents(out / "checkpoint-000002") == older
    # 2. Above the adapter's size, below trainer_state.pt's: checkpoint-000004 fails at its last file.
    sizes = [(straight[0] / "checkpoint-000006" / name).stat().st_size
             for name in ("adapter_model.safetensors", "trainer_state.pt")]
    status, stdout, stderr = run_limited(sum(sizes) // 2, "coin.py", "--out", out, "--resume")
    assert f"{out / 'metrics.jsonl'}:3: dropped a half-written last line" in stdout  # the append cut short
    assert status == IOERR and stderr.splitlines()[-1].startswith(
        f"error: {out / '.checkpoint-000004.tmp' / 'trainer_state.pt'}: File too large")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-000002", "config.json", "metrics.jsonl"]
    assert contents(out / "checkpoint-000002") == older
    assert_resumes_to(straight, out)


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_sigkill_in_the_final_save_leaves_no_adapter_that_loads_and_resume_ends_equal(tmp_path, straight,
                                                                                         name):
    """The child is coin.py in a process whose os.replace kills it just before the final adapter's `name` is
    renamed into place: the test's fault, with no code for it in coin."""
    out = tmp_path / "out"
    kill_before_rename = (
        "import os, runpy, signal, sys\n"
        "replace = os.replace\n"
        "def killing(src, dst):\n"
        f"    if os.path.abspath(dst) == {str(out / name)!r}:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    replace(src, dst)\n"
        "os.replace = killing\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    process = start_child(kill_before_rename, "coin.py", *train_flags(out))
    assert wait(process)[0] == -signal.SIGKILL
    assert (out / "checkpoint-000006").is_dir() and not (out / "adapter_config.json").exists()
    assert len(list(out.glob(f"{name}.*.tmp"))) == 1  # the write the kill cut short
    with pytest.raises(FileNotFoundError, match="adapter_config.json: not found"):
        load_adapter(load_model(shared("models", "stories260K")), out)
    assert_resumes_to(straight, out)
    assert not list(out.glob("*.tmp"))
    assert (out / "adapter_config.json").read_bytes() == (straight[0] / "adapter_config.json").read_bytes()


# -----------------------------------------------------------------------------
# evaluate.py


def test_evaluate_refuses_a_second_launch_and_stops_74_on_a_full_disk_then_resumes_equal(tmp_path):
    flags = eval_flags()
    status, _, stderr = run("evaluate.py", *flags, "--out", tmp_path / "straight")
    assert status == 0, stderr[-3000:]
    straight_files = contents(tmp_path / "straight")
    out = tmp_path / "out"
    first = start("evaluate.py", *flags, "--out", out)
    when(first, lambda: (out / ".lock").is_file() and (out / ".lock").read_text())  # held, its pid written
    first.send_signal(signal.SIGSTOP)
    try:
        status, _, stderr = run("evaluate.py", *flags, "--out", out)
        assert status == 1 and stderr.splitlines()[-1].startswith(
            f"error: {out}: in use by another process (pid {first.pid})")
    finally:
        first.kill()
    wait(first)
    # The first cell's files: samples.json (~400 bytes of indices), predictions.jsonl (~460), then
    # results.json (~1,050: the protocol, the scores): twice samples.json's size lets the first two through.
    limit = 2 * len(straight_files["samples.json"])
    status, _, stderr = run_limited(limit, "evaluate.py", *flags, "--out", out)
    line = stderr.splitlines()[-1]
    assert status == IOERR and line.startswith(f"error: {out / 'results.json'}: File too large")
    assert "the results written before it are kept" in stderr and (out / "predictions.jsonl").is_file()
    status, _, stderr = run("evaluate.py", *flags, "--out", out, "--resume")
    assert status == 0, stderr[-3000:]
    assert contents(out) == straight_files
