"""Benchmark suite for one GPU (`bash benchmarks/gpu.sh` runs it): coin at LLaMA-7B shape, random weights.

1. training: one CoIN optimizer step of 64 examples (pairs of prompts of 40 to 250 tokens and 2 answer
   tokens, like CoIN's GLUE x FLAN mix): coin.train_step at its defaults (micro-batch 16, grouped by
   length, gradient checkpointing, bf16) against the official style (transformers + peft, one group per
   micro-batch, two forwards with full fp32 logits, left padding, HF's checkpointing): real tokens/s, peak
   memory, and model FLOPs utilisation (4N FLOPs per real token, forward and backward through frozen
   weights, N the decoder's parameters, against this GPU's measured bf16 matmul peak).
2. memory: one of our steps at micro-batch 16 of full 256-token rows (32 rows, the worst case) with
   checkpointing: torch.cuda.max_memory_allocated against memory.py's prediction.
3. evaluation: 64 prompts of about 80 tokens, 7 greedy tokens each: evaluate.generate_batched (batch 32)
   against transformers' generate, one prompt at a time: examples/s, and how many answers agree.

Both sides share the same frozen weights (one copy in memory). Prints one table; with --out (gpu.sh passes
$OUT) writes it to gpu_table.md there too. Usage: python benchmarks/bench_gpu.py [--shape 7b|small|tiny]
"""
import argparse
import random
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]
import coin  # noqa: E402
from bench_batching import build_models, official_peer, official_step, our_run, timed  # noqa: E402
from data import IGNORE_INDEX, VIEWS, epoch_steps  # noqa: E402
from evaluate import generate_batched  # noqa: E402
from memory import count_parameters, estimate_training_memory  # noqa: E402
from model import ModelArgs  # noqa: E402
from precision import resolve_precision  # noqa: E402

SHAPES = {"7b": ModelArgs(), "small": ModelArgs(dim=768, n_layers=12, n_heads=12, intermediate_size=2048),
          "tiny": ModelArgs.tiny(vocab_size=512)}
BATCH, MICRO_BATCH, CUTOFF = 64, 16, 256
GIB = 2**30


class Synthetic(list):
    """ContrastiveDataset's items, made up: groups of two examples whose two views differ in length by up to
    20 tokens; `full` makes every row CUTOFF tokens long."""

    def __init__(self, n_groups, vocab_size, full=False, seed=0):
        rng = random.Random(seed)
        super().__init__()
        self.groups, self.lengths, self.pad_id = [], [], 0
        for g in range(n_groups):
            for member in range(2):
                prompt = CUTOFF - 3 if full else rng.randint(40, 250)
                views = [self.row(prompt if full else max(20, prompt + rng.randint(-20, 20)), vocab_size,
                                  rng) for _ in range(2)]
                self.append(dict(id=f"{g}-{member}", group=str(g), original=views[0], paraphrase=views[1]))
            self.groups.append([2 * g, 2 * g + 1])
            self.lengths.append(max(len(self[i][v][0]) for i in self.groups[-1] for v in VIEWS))

    @staticmethod
    def row(prompt, vocab_size, rng):
        """(input_ids, labels, pool_index): BOS, `prompt` tokens, 2 answer tokens (the supervised ones)."""
        ids = [1] + [rng.randrange(3, vocab_size) for _ in range(prompt + 2)]
        labels = [IGNORE_INDEX] * (prompt + 1) + ids[prompt + 1:]
        return torch.tensor(ids, dtype=torch.int32), torch.tensor(labels, dtype=torch.int32), len(ids) - 1


def matmul_peak(device, dtype, n=8192, repeats=10):
    """FLOP/s of a large square matmul in dtype: what this device does at best."""
    n = n if device.startswith("cuda") else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds, _ = timed(lambda: [a @ b for _ in range(repeats)], device)
    return 2 * n**3 * repeats / seconds


def memory_rows(ours, args, device, dtype):
    """One step at micro-batch 16 of full-length rows: (measured peak GiB, predicted GiB)."""
    full = Synthetic(MICRO_BATCH // 2, args.vocab_size, full=True)
    run = our_run(ours, full, device, dtype)
    step = [list(range(MICRO_BATCH))]  # one micro-batch
    coin.train_step(run, *coin.step_batches(run, step), 1e-4)  # a warm-up, which also makes AdamW's state
    _, peak = timed(lambda: coin.train_step(run, *coin.step_batches(run, step), 1e-4), device)
    predicted = estimate_training_memory(args, 2 * MICRO_BATCH, CUTOFF, supervised_per_row=2,
                                         weight_bytes=torch.finfo(dtype).bits // 8)
    run.optimizer.zero_grad(set_to_none=True)
    return [("memory: micro-batch 16 x 256 tokens, checkpointing", f"{peak:.2f} GiB measured",
             f"{sum(predicted.values()) / GIB:.2f} GiB predicted",
             f"{100 * (peak * GIB / sum(predicted.values()) - 1):+.1f}%")]


def training_rows(ours, peer, args, device, dtype, steps):
    """Ours vs the official style on the same 64 examples per step; (label, ours, peer, ratio) rows."""
    dataset = Synthetic(BATCH // 2 * (steps + 1), args.vocab_size)
    run = our_run(ours, dataset, device, dtype)
    windows = epoch_steps(dataset.groups, BATCH, MICRO_BATCH, 42, 0, True, dataset.lengths)
    ours_s, peer_s, real, peaks = 0.0, 0.0, 0, [0.0, 0.0]
    for i, window in enumerate(windows[:steps + 1]):  # the first step of each side warms up
        flat = [j for batch in window for j in batch]
        t_ours, p_ours = timed(lambda: coin.train_step(run, *coin.step_batches(run, window), 1e-4), device)
        t_peer, p_peer = timed(lambda: official_step(peer, dataset, flat, dtype), device)
        if i:
            ours_s, peer_s = ours_s + t_ours, peer_s + t_peer
            real += sum(len(dataset[j][v][0]) for j in flat for v in VIEWS)
            peaks = [max(peaks[0], p_ours), max(peaks[1], p_peer)]
    n = count_parameters(args) - 2 * args.vocab_size * args.dim  # the decoder layers' parameters
    mfu = 4 * n * real / ours_s / matmul_peak(device, dtype)
    return [("CoIN step of 64 examples: real tokens/s", f"{real / ours_s:.0f}", f"{real / peer_s:.0f}",
             f"{peer_s / ours_s:.2f}x"),
            ("CoIN step: peak memory", f"{peaks[0]:.1f} GiB", f"{peaks[1]:.1f} GiB", ""),
            ("CoIN step: model FLOPs utilisation (ours)", f"{100 * mfu:.1f}%", "", "")]


def evaluation_rows(ours, peer, args, device):
    """Batched greedy decoding vs transformers' generate one prompt at a time."""
    rng = random.Random(1)
    instruction = [1] + [rng.randrange(3, args.vocab_size) for _ in range(40)]
    prompts = [instruction + [rng.randrange(3, args.vocab_size) for _ in range(rng.randint(20, 60))]
               for _ in range(64)]
    ours.eval()
    answers = []  # each side's new ids per prompt
    with torch.no_grad():
        t_ours, _ = timed(lambda: answers.append(generate_batched(ours, prompts, 32, 7, None, 0)), device)
        t_peer, _ = timed(lambda: answers.append([
            peer.generate(input_ids=torch.tensor([p], device=device), max_new_tokens=7, min_new_tokens=7,
                          do_sample=False, pad_token_id=0)[0, len(p):].tolist() for p in prompts]), device)
    agree = sum(a == b for a, b in zip(*answers))
    return [("evaluation: examples/s (64 prompts, 7 tokens)", f"{64 / t_ours:.1f}", f"{64 / t_peer:.1f}",
             f"{t_peer / t_ours:.1f}x"), ("evaluation: identical answers", f"{agree}/64", "", "")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="7b", choices=tuple(SHAPES))
    parser.add_argument("--steps", type=int, default=2, help="timed steps per side (after one warm-up)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=("bf16", "fp32"))
    parser.add_argument("--out", default=None, help="folder to write gpu_table.md into")
    opts = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    device, dtype = resolve_precision(opts.device, opts.dtype)
    args = SHAPES[opts.shape]
    started = time.perf_counter()
    ours, hf = build_models(args, device, dtype)
    rows = memory_rows(ours, args, device, dtype)
    peer = official_peer(hf)
    rows += training_rows(ours, peer.train(), args, device, dtype, opts.steps)
    rows += evaluation_rows(ours, peer.eval(), args, device)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    table = "\n".join([f"coin GPU benchmarks: {opts.shape} LLaMA, random weights, {name}, "
                       f"{str(dtype).split('.')[-1]}, torch {torch.__version__}, "
                       f"{time.perf_counter() - started:.0f} s", "",
                       "| measure | ours | official style / transformers | ratio |", "|---|---|---|---|"]
                      + [f"| {' | '.join(row)} |" for row in rows])
    print(table)
    if opts.out:
        Path(opts.out).mkdir(parents=True, exist_ok=True)
        (Path(opts.out) / "gpu_table.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
