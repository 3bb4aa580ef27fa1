"""Several processes (torchrun, gloo on CPU) compute what one process computes: each step's gradients, to what
the order of fp32 sums can change, and the same evaluation files; a group never straddles two processes; only
rank 0 writes; a signal stops every process after the same step."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import coin
from checkpoints import STOPPED
from conftest import ROOT, U, assert_same_gradients
from data import epoch_steps
from distributed import World, shard

DEMO = ROOT / "examples" / "flan_coin_demo.jsonl"
TIMEOUT = 300


def torchrun(script, *argv, processes=2):
    """Run script under torchrun with `processes` CPU processes; fails with the output if it fails. Each
    process runs one thread (torchrun's default for several), so runs in 1 and 2 processes use one kernel."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={processes}", script, *map(str, argv)],
                          cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def train_flags(stories, out, micro_batch_size=4, negatives="group"):
    flags = ("--data", DEMO, "--base", stories, "--out", out, "--dtype", "fp32", "--device", "cpu",
             "--batch-size", 8, "--micro-batch-size", micro_batch_size, "--cutoff", 128, "--max-steps", 3,
             "--lora-dropout", 0, "--negatives", negatives)
    return [str(flag) for flag in flags]


def step_gradients(out, flags, processes=2, frozen=False):
    """Each optimizer step's LoRA gradients in a coin.py run of `processes` processes (step_gradients.py)."""
    path = out.with_name(out.name + "-gradients.pt")
    torchrun("tests/step_gradients.py", path, *(["--frozen"] if frozen else []), *flags, processes=processes)
    return torch.load(path)


def assert_same_steps(one, two, tokens):
    """Each step's gradients of two runs, taken at the same weights, agree (assert_same_gradients)."""
    assert len(one) == len(two) == len(tokens)
    tolerances = [assert_same_gradients(b, a, n) for a, b, n in zip(one, two, tokens)]
    if len(one) > 1:  # a step compared with the wrong step would fail: they differ far beyond the tolerance
        assert max((one[0][k] - one[1][k]).abs().max().item() for k in one[0]) > 10 * tolerances[0]


@pytest.mark.parametrize("negatives, micro_two, micro_one", [
    ("group", 4, 4),  # a micro-batch each, as one process's two micro-batches
    ("group", 2, 8),  # the objective is per group: any micro-batch size on either side
    ("batch", 2, 4),  # batch negatives span the micro-batches run side by side: one process at twice the size
])
def test_two_processes_compute_the_gradients_one_process_computes(tmp_path, stories_dir, negatives, micro_two,
                                                                 micro_one):
    """Every step at the same weights (--frozen: learning rate 0, so AdamW leaves them as they were; LoRA B
    stays 0, so only B has gradients), the step's data, loss and gradients equal one process's."""
    one, two = tmp_path / "one", tmp_path / "two"
    expected = step_gradients(one, train_flags(stories_dir, one, micro_one, negatives), 1, frozen=True)
    actual = step_gradients(two, train_flags(stories_dir, two, micro_two, negatives), 2, frozen=True)
    assert {p.name for p in one.iterdir()} == {p.name for p in two.iterdir()}  # rank 0 alone wrote
    lines = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3] and all(r["world_size"] == 2 for r in lines)
    assert all(r["examples"] == 8 and r["examples_per_process"] == 4 for r in lines)
    for mine, reference in zip(lines, theirs):
        assert mine["real_tokens"] == reference["real_tokens"]  # the same examples in each step
        assert mine["loss"] == pytest.approx(reference["loss"], rel=mine["real_tokens"] * U, abs=0)
        assert mine["negatives_per_anchor"] == reference["negatives_per_anchor"]
    assert_same_steps(expected, actual, [r["real_tokens"] for r in theirs])
    assert json.loads((two / "config.json").read_text())["world_size"] == 2


def stopped_after_two_steps(stories_dir, out, monkeypatch):
    """One process, stopped by a Ctrl-C after its second step of three: checkpoint-000002."""
    real_step, steps = coin.train_step, []

    def step_then_ctrl_c(*args):
        steps.append(real_step(*args))
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return steps[-1]
    monkeypatch.setattr(coin, "train_step", step_then_ctrl_c)
    with pytest.raises(SystemExit) as stopped:
        coin.main(train_flags(stories_dir, out))
    monkeypatch.undo()
    assert stopped.value.code == STOPPED and (out / "checkpoint-000002").is_dir()


def test_a_run_resumes_with_another_number_of_processes(tmp_path, stories_dir, monkeypatch):
    """Two processes resume a one-process run: step 3 starts from the checkpoint's weights, optimizer and
    schedule, and computes the gradients one process computes from the same checkpoint."""
    for name in ("one", "two"):  # the same run twice: the same weights, bit for bit, in both
        stopped_after_two_steps(stories_dir, tmp_path / name, monkeypatch)
    one = step_gradients(tmp_path / "one", ["--out", tmp_path / "one", "--resume"], 1)
    two = step_gradients(tmp_path / "two", ["--out", tmp_path / "two", "--resume"], 2)
    lines = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["world_size"]) for r in lines] == [(1, 1), (2, 1), (3, 2)]
    assert_same_steps(one, two, [lines[2]["real_tokens"]])
    assert (tmp_path / "two" / "adapter_model.safetensors").is_file()


def workers(pid):
    """The processes that process `pid` started (Linux's /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = stat.read_text().rsplit(")", 1)[1].split()[1]
        except (OSError, IndexError):  # the process ended meanwhile
            continue
        found += [int(stat.parent.name)] * (parent == str(pid))
    return found


def test_sigterm_to_every_process_of_a_job_stops_every_rank_after_the_same_step(tmp_path, stories_dir):
    """SLURM signals every process of a job step, torchrun forwards what it gets to its workers: each worker
    gets SIGTERM twice, milliseconds apart. That is one signal (checkpoints.StopOnSignal), not the second
    that stops at once: every rank finishes the step, rank 0 saves it, and the run stops."""
    out = tmp_path / "out"
    flags = train_flags(stories_dir, out)
    flags[flags.index("--max-steps") + 1] = "100"
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc_per_node=2", "coin.py", *flags], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + TIMEOUT
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.02)
    for pid in workers(launcher.pid) + [launcher.pid]:
        os.kill(pid, signal.SIGTERM)
    stdout, stderr = launcher.communicate(timeout=TIMEOUT)
    saved = len((out / "metrics.jsonl").read_text().splitlines())
    assert f"SIGTERM: saved step {saved} in {out}; continue with --resume (exit status 75)" in stdout, stderr
    assert (out / f"checkpoint-{saved:06d}").is_dir() and saved < 100


def test_each_process_takes_whole_micro_batches_in_turn():
    groups = [[2 * g, 2 * g + 1] for g in range(40)]
    for step in epoch_steps(groups, 16, 4, seed=1, epoch=0):
        shards = [shard(step, World(rank, 2)) for rank in range(2)]
        assert shards == [step[0::2], step[1::2]]
        for batch in step:  # so a group is in one micro-batch, hence one process
            assert all({2 * (i // 2), 2 * (i // 2) + 1} <= set(batch) for i in batch)
    with pytest.raises(ValueError, match="a step of 3 micro-batches does not split over 2 processes"):
        shard([[0, 1], [2, 3], [4, 5]], World(0, 2))


def test_sharded_evaluation_writes_what_one_process_writes(tmp_path, stories_dir):
    """Byte for byte: a process computes each cell alone, in the same batches, on one thread either way."""
    flags = ["--base", stories_dir, "--glue-dir", ROOT / "examples" / "glue_demo", "--samples", "4",
             "--tasks", "sst2,rte,cola", "--device", "cpu", "--dtype", "fp32", "--max-new-tokens", "3"]
    torchrun("evaluate.py", *flags, "--out", tmp_path / "one", processes=1)
    torchrun("evaluate.py", *flags, "--out", tmp_path / "two")
    for name in ("results.json", "predictions.jsonl", "table.md", "samples.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert {p.name for p in (tmp_path / "two").iterdir()} == {p.name for p in (tmp_path / "one").iterdir()}


def test_gathered_rows_get_the_gradient_summed_over_processes(tmp_path):
    """distributed.GatherRows against its definition: in one process, each rank's loss on all rows."""
    script = tmp_path / "gather.py"
    script.write_text(f"""import sys, torch, torch.distributed as dist
sys.path.insert(0, {str(ROOT)!r})
from distributed import World, finish, gather_rows, start
world, _ = start("cpu")
torch.manual_seed(0)
every = torch.randn(5, 3)  # rank 0 holds rows 0..2, rank 1 rows 3..4
mine = every[:3] if world.rank == 0 else every[3:]
mine.requires_grad_(True)
rows, first = gather_rows(mine, world)
weights = torch.arange(15.0).view(5, 3) * (world.rank + 1)  # each rank's own loss over all rows
(rows * weights).sum().backward()
expected = (torch.arange(15.0).view(5, 3) * 3)[first:first + len(mine)]  # sum over ranks of (rank + 1)
assert torch.equal(rows.detach(), every) and first == (0 if world.rank == 0 else 3)
assert torch.allclose(mine.grad, expected), (mine.grad, expected)
open({str(tmp_path)!r} + f"/passed-{{world.rank}}", "w").close()
finish(world)
""")
    torchrun(script)  # fails if either process's assertions failed
    assert {p.name for p in tmp_path.glob("passed-*")} == {"passed-0", "passed-1"}
