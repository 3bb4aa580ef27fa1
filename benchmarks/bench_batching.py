"""Benchmark: the compute spent on padding, and CoIN training speed against the official style, on CoIN's
real workload.

The workload: groups of four GLUE tasks (cola, sst2, mrpc, rte from ../shared/glue/train) rendered with the
real FLAN templates by prepare_data.py, as CoIN mixes its datasets; tokenized with the LLaMA tokenizer at
cutoff 256 (prompts of about 40 to 250 tokens).

1. Padding: the share of the token positions the forwards compute that are padding, over one epoch of
   coin.py's steps (batch 64), at micro-batch 2, 8, 16, 32: with --no-group-by-length (random groups, one
   padded rectangle per micro-batch), with groups sorted by length but one rectangle, and with
   --group-by-length (sorted, and two length buckets per micro-batch). Then the evaluator's batches (rank
   rows, generation prefill) in input order against its length order.
2. Speed: real (non-padding) tokens/s of one training step on a small LLaMA (D 768, 12 layers, V 32000, or
   --shape 7b on a GPU) with random weights, LoRA r 16 on q,k,v,o, gradient checkpointing: coin.train_step
   at its defaults (micro-batch 16, grouped by length), and at --no-group-by-length, against the official
   style (transformers + peft, ContrastiveLlama's loss, one group per micro-batch, two forwards with full
   fp32 logits, accumulated over the same 16 examples). The sides take turns, step by step.

Usage: python benchmarks/bench_batching.py [--steps 3] [--per-task 1000] [--dtype fp32] [--shape small]
"""
import argparse
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import peft
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import coin  # noqa: E402
from data import VIEWS, ContrastiveDataset, collate, epoch_steps  # noqa: E402
from distributed import Forward, World  # noqa: E402
from evaluate import build_input  # noqa: E402
from glue import load_task  # noqa: E402
from model import Llama, ModelArgs, apply_lora  # noqa: E402
from model_config import hf_config  # noqa: E402
from official_coin import official_group_loss  # noqa: E402
from precision import resolve_precision  # noqa: E402
from prepare_data import build_examples, load_source, load_templates  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

SHARED = ROOT.parent / "shared"
TASKS = {"cola": "cola", "sst2": "sst2", "glue_mrpc": "mrpc", "rte": "rte"}  # FLAN dataset -> GLUE file
SHAPES = {"small": ModelArgs(dim=768, n_layers=12, n_heads=12, intermediate_size=2048, vocab_size=32000),
          "7b": ModelArgs()}
BATCH, MICRO_BATCH = 64, 16  # coin.py's defaults at the paper's batch


def build_dataset(tokenizer, per_task):
    templates = load_templates(SHARED / "flan" / "templates.json")
    sources = {name: load_source(SHARED / "glue" / "train" / f"{glue}.jsonl", name, templates[name])
               for name, glue in TASKS.items()}
    examples, _ = build_examples(templates, sources, per_task=per_task, seed=0)
    return ContrastiveDataset(examples, tokenizer)


def training_padding(dataset, micro_batch_size, order):
    """Padding share of one epoch. order: "random", "sorted" (one rectangle) or "bucketed" (the default)."""
    lengths = None if order == "random" else dataset.lengths
    real = computed = 0
    for step in epoch_steps(dataset.groups, BATCH, micro_batch_size, 42, 0, True, lengths):
        for indices in step:
            batch = collate([dataset[i] for i in indices], 0, by_length=order == "bucketed")
            real, computed = real + int(batch["attention_mask"].sum()), computed + batch["computed_tokens"]
    return 1 - real / computed


def evaluation_padding(prompts, batch_size, sort, labels=None):
    """Padding share of the evaluator's batches: rank rows (prompt + each label, right-padded) or generation
    prefill (the batch's common prefix once, the rest left-padded)."""
    order = sorted(prompts, key=len, reverse=True) if sort else prompts
    real = computed = 0
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        if labels:
            rows = [len(p) + len(label) for p in batch for label in labels]
            real, computed = real + sum(rows), computed + len(rows) * max(rows)
        else:
            shared = next((j for j, ids in enumerate(zip(*batch)) if len(set(ids)) > 1), min(map(len, batch)))
            tails = [len(p) - shared for p in batch]
            real, computed = real + shared + sum(tails), computed + shared + len(batch) * max(tails)
    return 1 - real / computed


def print_padding(dataset, tokenizer):
    print(f"{len(dataset)} examples in {len(dataset.groups)} groups; rows of "
          f"{min(dataset.lengths)}..{max(dataset.lengths)} tokens (longest of each group)")
    print("training: padding share of computed positions, one epoch, batch 64")
    print(f"{'micro-batch':>12}{'random':>9}{'sorted':>9}{'bucketed':>10}")
    for size in (2, 8, 16, 32):
        shares = [training_padding(dataset, size, order) for order in ("random", "sorted", "bucketed")]
        print(f"{size:>12}" + "".join(f"{100 * s:>8.1f}%" for s in shares[:2]) + f"{100 * shares[2]:>9.1f}%")
    rows = load_task("sst2", SHARED / "glue" / "train")[:300]
    prompts = [tokenizer.encode(build_input("Is this review positive or negative?", row["content"]))
               for row in rows]
    labels = [tokenizer.encode(label, bos=False) for label in ("negative", "positive")]
    print("evaluation, 300 SST-2 rows (the first of the training split), batch 32: padding share")
    for mode, label_ids in (("rank", labels), ("generate prefill", None)):
        shares = [evaluation_padding(prompts, 32, sort, label_ids) for sort in (False, True)]
        print(f"  {mode:<17} input order {100 * shares[0]:.1f}%, length order (ours) {100 * shares[1]:.1f}%")


def build_models(args, device, dtype):
    """(ours with a fresh LoRA r 16 on q,k,v,o, the transformers model): the same random weights, once."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in dtype with any transformers; fp32 first would cost 27 GB at 7B
    try:
        with torch.device(device):
            hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(args)))
    finally:
        torch.set_default_dtype(default)
    with torch.device("meta"):
        ours = Llama(args)
    ours.load_state_dict(hf.state_dict(), assign=True)  # ours holds hf's tensors, not copies
    apply_lora(ours, r=16, alpha=16, dropout=0.05)
    ours.grad_checkpointing = True
    return ours.train(), hf


def official_peer(hf):
    """The transformers model with peft's LoRA (alpaca-lora's r 16 on q,k,v,o) and HF's checkpointing."""
    peer = peft.get_peft_model(hf, peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05,
                                                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                   task_type="CAUSAL_LM"))
    peer.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return peer


def our_run(model, dataset, device, dtype, by_length=True):
    """A coin.Run for coin.train_step at its defaults (in one process), --group-by-length as asked."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    return coin.Run(coin.TrainConfig(group_by_length=by_length), model, dataset, optimizer, scaler, device,
                    dtype, World(), Forward(model, coin.micro_batch_loss))


def our_step(run, indices):
    """coin.train_step on one step of these examples (16 = one micro-batch at the default)."""
    return coin.train_step(run, *coin.step_batches(run, [indices]), 1e-4)


def official_step(peer, dataset, indices, dtype):
    """The official style over the same examples: one group per micro-batch, a backward each, then AdamW."""
    optimizer = torch.optim.AdamW([p for p in peer.parameters() if p.requires_grad], lr=1e-4)
    groups = [indices[i:i + 2] for i in range(0, len(indices), 2)]
    for group in groups:
        with torch.autocast(peer.device.type, dtype, enabled=dtype != torch.float32):
            official_group_loss(peer, [dataset[i] for i in group], 0, len(groups)).backward()
    torch.nn.utils.clip_grad_norm_([p for p in peer.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(fn, device):
    """(seconds fn takes, peak GPU memory in GiB meanwhile; nan on a CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return time.perf_counter() - start, peak


def print_speed(dataset, opts):
    device, dtype = resolve_precision(opts.device, opts.dtype)
    ours, hf = build_models(SHAPES[opts.shape], device, dtype)
    peer = official_peer(hf).train()
    runs = {by_length: our_run(ours, dataset, device, dtype, by_length) for by_length in (True, False)}
    rng = random.Random(0)
    bucketed = [b for step in epoch_steps(dataset.groups, BATCH, MICRO_BATCH, 42, 0, True, dataset.lengths)
                for b in step]
    plain = [b for step in epoch_steps(dataset.groups, BATCH, MICRO_BATCH, 42, 0, True) for b in step]
    picks = [(rng.choice(bucketed), rng.choice(plain)) for _ in range(opts.steps + 1)]
    seconds = {"coin.py defaults": [], "coin.py --no-group-by-length": [], "official style": []}
    tokens = {name: [] for name in seconds}
    for grouped, random_groups in picks:  # the first round warms up
        for name, indices, fn in (
                ("coin.py defaults", grouped, lambda: our_step(runs[True], grouped)),
                ("coin.py --no-group-by-length", random_groups,
                 lambda: our_step(runs[False], random_groups)),
                ("official style", grouped, lambda: official_step(peer, dataset, grouped, dtype))):
            seconds[name].append(timed(fn, device)[0])
            tokens[name].append(sum(len(dataset[i][view][0]) for i in indices for view in VIEWS))
    print(f"speed: {opts.shape} LLaMA, {device}, {str(dtype).split('.')[-1]}, gradient checkpointing, "
          f"steps of {MICRO_BATCH} examples, {opts.steps} timed after a warm-up; real tokens/s (median)")
    rates = {name: statistics.median(t / s for t, s in zip(tokens[name][1:], seconds[name][1:]))
             for name in seconds}
    for name, rate in rates.items():
        print(f"  {name:<30}{rate:>8.0f}{rate / rates['official style']:>7.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side (after one warm-up)")
    parser.add_argument("--per-task", type=int, default=1000, help="anchors per task (2 examples each)")
    parser.add_argument("--shape", default="small", choices=tuple(SHAPES))
    parser.add_argument("--device", default=None, help="cuda | cpu (default: cuda when there is a GPU)")
    parser.add_argument("--dtype", default=None, choices=("bf16", "fp32"),
                        help="base weights (default: bf16 on a GPU, fp32 on a CPU)")
    parser.add_argument("--padding-only", action="store_true", help="skip the speed measurement")
    opts = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames, not ours to fix
    tokenizer = Tokenizer(SHARED / "tokenizers" / "llama" / "tokenizer.model")
    dataset = build_dataset(tokenizer, opts.per_task)
    print_padding(dataset, tokenizer)
    if not opts.padding_only:
        print_speed(dataset, opts)


if __name__ == "__main__":
    main()
