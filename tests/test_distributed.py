"""Several processes (torchrun, gloo on CPU) compute what one process computes: the same LoRA weights after
a few steps, the same evaluation files; a group never straddles two processes; only rank 0 writes."""
import json
import os
import signal
import subprocess
import sys

import pytest

import coin
import evaluate
from conftest import ROOT
from data import epoch_steps
from distributed import World, shard
from hf_io import read_adapter_tensors

DEMO = ROOT / "examples" / "flan_coin_demo.jsonl"
TIMEOUT = 300


def torchrun(script, *argv, processes=2):
    """Run script under torchrun with `processes` CPU processes; fails with the output if it fails."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={processes}", script, *map(str, argv)],
                          cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def train_flags(stories, out, micro_batch_size=4, negatives="group"):
    flags = ("--data", DEMO, "--base", stories, "--out", out, "--dtype", "fp32", "--device", "cpu",
             "--batch-size", 8, "--micro-batch-size", micro_batch_size, "--cutoff", 128, "--max-steps", 3,
             "--lora-dropout", 0, "--negatives", negatives)
    return [str(flag) for flag in flags]


def assert_same_weights(one, two, rtol=1e-5):
    """The LoRA tensors of two adapters agree: |a - b| <= rtol |a| for each tensor (Frobenius norms). Not to
    the bit: one process adds its micro-batches' gradients one by one, DDP adds each process's total, and
    fp32 sums associate differently by about 1e-7, which Adam carries into the weights."""
    (_, expected), (_, actual) = read_adapter_tensors(one), read_adapter_tensors(two)
    assert expected.keys() == actual.keys()
    for name in expected:
        error = (expected[name] - actual[name]).norm().item()
        assert error <= rtol * expected[name].norm().item(), (name, error / expected[name].norm().item())


@pytest.mark.parametrize("negatives, micro_two, micro_one", [
    ("group", 4, 4),  # a micro-batch each, as one process's two micro-batches
    ("group", 2, 8),  # the objective is per group: any micro-batch size on either side
    ("batch", 2, 4),  # batch negatives span the micro-batches run side by side: one process at twice the size
])
def test_two_processes_train_the_weights_one_process_trains(tmp_path, stories_dir, negatives, micro_two,
                                                             micro_one):
    torchrun("coin.py", *train_flags(stories_dir, tmp_path / "one", micro_one, negatives), processes=1)
    torchrun("coin.py", *train_flags(stories_dir, tmp_path / "two", micro_two, negatives))
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    one, two = (tmp_path / "one", tmp_path / "two")
    assert {p.name for p in one.iterdir()} == {p.name for p in two.iterdir()}  # rank 0 alone wrote
    lines = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3] and all(r["world_size"] == 2 for r in lines)
    assert all(r["examples"] == 8 and r["examples_per_process"] == 4 for r in lines)
    for mine, theirs in zip(lines, expected):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
        assert mine["negatives_per_anchor"] == theirs["negatives_per_anchor"]
    assert json.loads((two / "config.json").read_text())["world_size"] == 2


def test_a_run_resumes_with_another_number_of_processes(tmp_path, stories_dir, monkeypatch):
    coin.main(train_flags(stories_dir, tmp_path / "straight"))
    real_step, steps = coin.train_step, []

    def step_then_ctrl_c(*args):  # one process, stopped by a Ctrl-C after its second step
        steps.append(real_step(*args))
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return steps[-1]
    monkeypatch.setattr(coin, "train_step", step_then_ctrl_c)
    coin.main(train_flags(stories_dir, tmp_path / "resumed"))
    assert (tmp_path / "resumed" / "checkpoint-000002").is_dir()
    torchrun("coin.py", "--out", tmp_path / "resumed", "--resume")  # two processes finish it
    assert_same_weights(tmp_path / "straight", tmp_path / "resumed")


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
    flags = ["--base", stories_dir, "--glue-dir", ROOT / "examples" / "glue_demo", "--samples", "4",
             "--tasks", "sst2,rte,cola", "--device", "cpu", "--max-new-tokens", "3"]
    evaluate.main([*map(str, flags), "--out", str(tmp_path / "one")])
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
