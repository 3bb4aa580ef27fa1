"""Faults injected into real coin.py and evaluate.py processes, each ended by what it costs.

Every fault ends with an adapter (or results.json) equal, bit for bit, to that of an uninterrupted run on this
machine (the same kernels in the same order: equality is what the resume guarantees), or with a one-line
refusal where nothing can be recovered. Each process runs under a time limit; none of these tests times
anything.
"""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoints
import coin
from checkpoints import ECHO_SECONDS, SIGNALS, STOPPED, StopOnSignal, save_checkpoint
from conftest import ROOT, shared
from hf_io import load_model, read_adapter_tensors
from model import apply_lora

DEMO = ROOT / "examples" / "flan_coin_demo.jsonl"
TIMEOUT = 300  # seconds a process may take: a run below takes ~20 s on a busy 2-core CPU
STEPS = 6


def train_flags(out, steps=STEPS, save_every=2):
    """coin.py on stories260K: 6 small steps, a checkpoint every 2, LoRA dropout on (the RNG is restored)."""
    flags = ["--data", DEMO, "--base", shared("models", "stories260K"), "--out", out, "--dtype", "fp32",
             "--device", "cpu", "--batch-size", 4, "--micro-batch-size", 4, "--cutoff", 128, "--lr", 1e-3,
             "--max-steps", steps, "--save-every", save_every, "--no-grad-checkpointing"]
    return [str(flag) for flag in flags]


def start(script, *argv):
    return subprocess.Popen([sys.executable, script, *map(str, argv)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait(process):
    """(exit status, stdout, stderr) of a process, which must end within TIMEOUT."""
    stdout, stderr = process.communicate(timeout=TIMEOUT)
    return process.returncode, stdout, stderr


def run(script, *argv):
    """(exit status, stdout, stderr) of a whole run of script."""
    return wait(start(script, *argv))


def when(process, ready):
    """Wait until ready() (polled every 20 ms) while the process runs; fails if it ends first."""
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        assert process.poll() is None, ("ended before the fault", process.communicate())
        assert time.monotonic() < deadline, "no progress within TIMEOUT"
        time.sleep(0.02)


def logged_steps(out):
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def at_step(process, out, step):
    """Wait until the process has logged optimizer step `step` (it is then inside step `step` + 1)."""
    when(process, lambda: logged_steps(out) >= step)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run, which every interrupted one must equal: (out, adapter tensors, losses)."""
    out = tmp_path_factory.mktemp("straight") / "out"
    status, _, stderr = run("coin.py", *train_flags(out))
    assert status == 0, stderr[-3000:]
    return out, read_adapter_tensors(out)[1], losses(out)


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_resumes_to(straight, out, *extra):
    """`coin.py --out out --resume` finishes with the uninterrupted run's adapter and metrics; its output."""
    status, stdout, stderr = run("coin.py", "--out", out, "--resume", *extra)
    assert status == 0, stderr[-3000:]
    expected, actual = straight[1], read_adapter_tensors(out)[1]
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    assert losses(out) == straight[2]
    return stdout + stderr


# -----------------------------------------------------------------------------
# coin.py


def test_a_signal_asks_to_stop_its_echo_is_ignored_and_a_second_one_stops_at_once():
    """A process started in a shell's background (`cmd &`) begins with SIGINT ignored, and Ctrl-C's handler
    is then no KeyboardInterrupt: the test sets Python's own first. Each signal is raised in this thread."""
    started_with = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous, seen = {sig: signal.getsignal(sig) for sig in SIGNALS}, []
    try:
        with pytest.raises(KeyboardInterrupt), StopOnSignal() as stop:
            signal.raise_signal(signal.SIGUSR1)
            seen.append(stop.received)
            signal.raise_signal(signal.SIGUSR1)  # at once: the same signal, forwarded by a launcher
            seen.append(stop.received)
            stop.first -= ECHO_SECONDS  # as if a second had passed: a second signal, from someone impatient
            signal.raise_signal(signal.SIGINT)  # Ctrl-C's own handler: KeyboardInterrupt
            seen.append("still running")
        assert seen == ["SIGUSR1", "SIGUSR1"]
        assert {sig: signal.getsignal(sig) for sig in SIGNALS} == previous
    finally:
        signal.signal(signal.SIGINT, started_with)


def test_sigterm_finishes_the_step_saves_it_and_exits_stopped(tmp_path, straight):
    out = tmp_path / "out"
    process = start("coin.py", *train_flags(out))
    at_step(process, out, 1)
    process.send_signal(signal.SIGTERM)
    status, stdout, _ = wait(process)
    saved = logged_steps(out)  # the step the signal came in, finished and logged
    assert status == STOPPED and 2 <= saved < STEPS
    assert f"SIGTERM: saved step {saved} in {out}; continue with --resume" in stdout
    assert (out / f"checkpoint-{saved:06d}").is_dir() and not (out / "adapter_model.safetensors").exists()
    assert_resumes_to(straight, out)


def sigkilled(tmp_path, step):
    """A run killed with SIGKILL (nothing to catch: a crash, the OOM killer) after it logged `step`."""
    out = tmp_path / "out"
    process = start("coin.py", *train_flags(out))
    at_step(process, out, step)
    process.kill()
    assert wait(process)[0] == -signal.SIGKILL
    return out


def test_sigkill_costs_the_steps_since_the_last_checkpoint(tmp_path, straight):
    assert_resumes_to(straight, sigkilled(tmp_path, 3))


def test_a_torn_metrics_line_is_dropped_with_a_note(tmp_path, straight):
    out = sigkilled(tmp_path, 3)
    torn = logged_steps(out) + 1
    with open(out / "metrics.jsonl", "a") as metrics:
        metrics.write(f'{{"step": {torn}, "loss": 19.78, "gen"')  # killed while appending a line
    output = assert_resumes_to(straight, out)
    assert f"{out / 'metrics.jsonl'}:{torn}: dropped a half-written last line" in output


def test_any_other_bad_metrics_line_is_a_one_line_error(tmp_path):
    out = tmp_path / "out"
    coin.main(train_flags(out, steps=2))
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:2] + ["not json\n"] + lines[2:]))
    with pytest.raises(SystemExit, match=r"^error: \S+metrics.jsonl:3: not a metrics line .*delete the line"):
        coin.main(["--out", str(out), "--resume"])


@pytest.mark.parametrize("damaged", ["adapter_model.safetensors", "trainer_state.pt"])
def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(tmp_path, straight, damaged):
    out = sigkilled(tmp_path, 5)  # in step 6: checkpoints 2 and 4 are written
    older, newest = sorted(out.glob("checkpoint-*"))
    file = newest / damaged
    file.write_bytes(file.read_bytes()[:len(file.read_bytes()) // 2])  # a disk or copy failure
    output = assert_resumes_to(straight, out)
    assert f"warning: {file}: cannot be read" in output
    assert f"set aside as {newest.name}.unreadable; resuming from the checkpoint before it" in output
    assert (out / f"{newest.name}.unreadable").is_dir()


def test_no_readable_checkpoint_is_a_one_line_refusal(tmp_path):
    out = tmp_path / "out"
    coin.main(train_flags(out, steps=2))
    for checkpoint in out.glob("checkpoint-*"):
        (checkpoint / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"^error: \S+trainer_state.pt: cannot be read .* start the run over "
                                         r"with --overwrite$"):
        coin.main(["--out", str(out), "--resume"])


def test_save_every_minutes_saves_by_the_clock_and_may_change_on_resume(tmp_path):
    """A tiny interval makes every step due: the clock, not --save-every 100, wrote checkpoints 2 and 3."""
    out = tmp_path / "out"
    coin.main(train_flags(out, steps=3, save_every=100) + ["--save-every-minutes", "1e-9"])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000003"]
    resumed = coin.parse_config(["--out", str(out), "--resume", "--save-every-minutes", "30"])
    assert resumed.save_every_minutes == 30


def test_the_two_newest_checkpoints_stay_and_one_that_does_not_read_back_replaces_none(tmp_path, monkeypatch):
    model = load_model(shared("models", "stories260K"))
    apply_lora(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scaler, cfg = torch.amp.GradScaler("cpu", enabled=False), coin.TrainConfig()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, model, optimizer, scaler, cfg, step, skipped=0)
    kept = ["checkpoint-000002", "checkpoint-000003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == kept
    real = checkpoints.read_adapter_tensors

    def garbled(folder, fix):  # a disk that returns other bytes than it was given
        file, tensors = real(folder, fix)
        return file, {key: tensor + 1 for key, tensor in tensors.items()}
    monkeypatch.setattr(checkpoints, "read_adapter_tensors", garbled)
    with pytest.raises(ValueError, match=r"checkpoint-000004.tmp: reads back other weights than were "
                                         "written, so the disk may be full or failing: the older ones"):
        save_checkpoint(tmp_path, model, optimizer, scaler, cfg, 4, skipped=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == kept


# -----------------------------------------------------------------------------
# evaluate.py


def eval_flags():
    """evaluate.py on stories260K: sst2 and rte under the clean prompts, 4 examples each, 3 new tokens."""
    return ["--base", shared("models", "stories260K"), "--glue-dir", ROOT / "examples" / "glue_demo",
            "--groups", "clean", "--tasks", "sst2,rte", "--samples", 4, "--max-new-tokens", 3,
            "--device", "cpu", "--dtype", "fp32"]


def test_sigterm_stops_evaluate_after_a_cell_and_resume_completes_it(tmp_path):
    flags = eval_flags()
    status, _, stderr = run("evaluate.py", *flags, "--out", tmp_path / "straight")
    assert status == 0, stderr[-3000:]
    out = tmp_path / "stopped"
    process = start("evaluate.py", *flags, "--out", out)
    when(process, (out / "results.json").exists)  # the first cell is written
    process.send_signal(signal.SIGTERM)
    status, stdout, _ = wait(process)
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert status == STOPPED and f"SIGTERM: the cells done are in {out}; continue with --resume" in stdout
    assert 0 < len(cells) < len(json.loads((tmp_path / "straight" / "results.json").read_text())["cells"])
    status, _, stderr = run("evaluate.py", *flags, "--out", out, "--resume")
    assert status == 0, stderr[-3000:]
    for name in ("results.json", "predictions.jsonl", "table.md"):
        assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
