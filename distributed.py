"""distributed.py: one training or evaluation run on several devices, a process each, with torch.distributed.

A support module, read after coin.py. `torchrun --nproc_per_node N coin.py ...` starts N processes (ranks);
launched without torchrun, a script is the one rank of a world of one, and nothing here communicates. A rank

  - joins the process group (NCCL on GPUs, gloo on CPU) and takes the GPU of its local rank (`start`);
  - computes the same global steps (data.epoch_steps is deterministic for the seed and the epoch) and runs
    its share of each (`shard`): micro-batches r, r + N, r + 2N, ... of the step, so no group straddles ranks;
  - runs its micro-batches through DistributedDataParallel (`wrap`), which averages the LoRA gradients over
    the ranks in the backward of the step's last micro-batch and leaves the others alone (`accumulating`);
  - with --negatives batch, sees every rank's pooled states (`gather_rows`), so that the InfoNCE softmax
    spans the micro-batches the ranks run side by side: the rows of one process at N times the micro-batch.

coin.py divides each rank's loss by the step's groups over N: DDP's average then gives the mean over all the
step's groups, as one process computes it. Rank 0 alone prints and writes metrics and checkpoints (the other
ranks' stdout goes to /dev/null; `World.main` guards the writes).
"""
import atexit
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class World:
    """This process's rank among `size` processes; a world of one without torchrun."""
    rank: int = 0
    size: int = 1

    @property
    def main(self):
        return self.rank == 0


def start(device):
    """(world, device): join torchrun's process group, if torchrun started us; a GPU rank takes the GPU of
    its local rank (LOCAL_RANK), so `--device cuda` means one GPU per process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    # A process that exits with its group alive can abort in the backend's threads (SIGABRT): on an error
    # path too, leave the group at exit.
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    if dist.get_rank():
        sys.stdout = open(os.devnull, "w")  # rank 0 alone prints; errors still reach stderr
    return World(dist.get_rank(), size), device


def finish(world, result=None):
    """Wait for every rank (rank 0 may still be writing), leave the process group; returns result."""
    if world.size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def shard(step, world):
    """This rank's micro-batches of one optimizer step (a list of micro-batches): every world.size-th."""
    if len(step) % world.size:
        raise ValueError(f"a step of {len(step)} micro-batches does not split over {world.size} processes; "
                         "use groups of one size (prepare_data.py makes pairs) or another --micro-batch-size")
    return step[world.rank::world.size]


class Forward(nn.Module):
    """model and a function of it as one module, for DDP, which hooks module calls: coin's loss calls
    model.hidden_states and model.lm_head, never model.forward."""

    def __init__(self, model, function):
        super().__init__()
        self.model, self.function = model, function

    def forward(self, *args):
        return self.function(self.model, *args)


def wrap(model, function, world, device):
    """function(model, ...) as a module: under DDP when the world has several ranks. DDP broadcasts rank 0's
    weights at the start (each rank loaded the same ones) and reduces only the trainable (LoRA) gradients."""
    module = Forward(model, function)
    if world.size == 1:
        return module
    return DistributedDataParallel(module, device_ids=[torch.device(device)] if device != "cpu" else None)


def accumulating(module, last):
    """The context of one micro-batch's forward and backward: without gradient sync, unless it is the step's
    last micro-batch (DDP then all-reduces everything accumulated)."""
    return module.no_sync() if isinstance(module, DistributedDataParallel) and not last else nullcontext()


class GatherRows(torch.autograd.Function):
    """Forward: every rank's rows (N_r, D) -> (sum of N_r, D), in rank order. Backward: each rank's loss used
    every gathered row, so the gradient of this rank's rows is the sum over all ranks of their gradients for
    these rows (lightly-ai/lightly #1528 is what forgetting that sum does)."""

    @staticmethod
    def forward(ctx, rows, sizes, rank):
        padded = rows.new_zeros(max(sizes), rows.shape[1])  # all_gather needs one shape on every rank
        padded[:len(rows)] = rows
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        ctx.start, ctx.count = sum(sizes[:rank]), len(rows)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # the sum over ranks
        return grad[ctx.start:ctx.start + ctx.count], None, None


def gather_rows(rows, world):
    """(every rank's rows in rank order, the index of this rank's first row among them); (rows, 0) alone."""
    if world.size == 1:
        return rows, 0
    sizes = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(world.size)]
    dist.all_gather(sizes, torch.tensor([len(rows)], device=rows.device))
    sizes = [int(n) for n in sizes]
    return GatherRows.apply(rows, sizes, world.rank), sum(sizes[:world.rank])


def gather_objects(value, world):
    """[every rank's value] in rank order ([value] alone). all_gather_object pickles: only for values these
    processes made themselves (evaluate.py's prediction records), never for data read from a file."""
    if world.size == 1:
        return [value]
    values = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def all_sum(values, world):
    """{name: number} summed over the ranks, in one all-reduce; as floats."""
    if world.size == 1:
        return {key: float(value) for key, value in values.items()}
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor([float(value) for value in values.values()], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return dict(zip(values, total.tolist()))
