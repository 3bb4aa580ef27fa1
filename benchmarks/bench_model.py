"""Benchmark: one LoRA training step of model.py against transformers + peft, in tokens/s.

Both sides get the same random weights (a "small" LLaMA: D 768, 12 layers, 12 heads, I 2048, V 32000), bf16
(or --dtype fp32) base weights, fp32 LoRA r=16 on q,k,v,o, AdamW, and the same batch of 4 x 256 tokens. Two
workloads:

  lm    every token supervised: the same FLOPs on both sides, so the ratio measures overhead (target >= 0.95x)
  coin  only the last 8 tokens of each row supervised, as with CoIN's short answers. The peer computes its
        loss the usual HF way (labels -100 elsewhere, full-vocabulary logits everywhere); we compute logits
        only where a label is supervised (target >= 1.15x with gradient checkpointing on)

It also reports the fraction of this device's measured matmul peak (in --dtype) that each step reaches,
counting 2N FLOPs per token forward, 2N backward (the frozen weights' input gradients) and 2N again for the
layers recomputed under checkpointing, where N counts the decoder layers, plus lm_head per supervised token.

Usage: python benchmarks/bench_model.py [--steps 7] [--device cpu|cuda] [--dtype bf16|fp32]
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import peft
import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_io import load_model  # noqa: E402
from memory import count_parameters  # noqa: E402
from model import ModelArgs, apply_lora  # noqa: E402
from model_config import hf_config  # noqa: E402

SMALL = ModelArgs(dim=768, n_layers=12, n_heads=12, intermediate_size=2048, vocab_size=32000)
BATCH, SEQ_LEN, COIN_SUPERVISED = 4, 256, 8
LORA = dict(r=16, alpha=16, dropout=0.05)


def build_pair(device, dtype):
    """(ours, peer): the same random base weights in `dtype`, LoRA r=16 on q,k,v,o, in train mode."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(SMALL)))
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = load_model(tmp, dtype=dtype, device=device)
    apply_lora(ours, **LORA)
    peer = peft.get_peft_model(hf.to(device, dtype), peft.LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"))
    return ours.train(), peer.train()


def set_checkpointing(ours, peer, on):
    ours.grad_checkpointing = on
    if on:
        peer.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        peer.gradient_checkpointing_disable()


def our_loss(model, ids, labels):
    """Logits only where a label is supervised: lm_head on those hidden states alone, CE in fp32."""
    hidden = model.hidden_states(ids)[:, :-1]  # (B, T-1, D): position t predicts token t+1
    targets = labels[:, 1:]
    supervised = targets != -100
    return F.cross_entropy(model.lm_head(hidden[supervised]).float(), targets[supervised])


def peer_loss(model, ids, labels):
    return model(input_ids=ids, labels=labels).loss  # full-vocabulary logits, HF's shifted CE


def time_steps(runs, ids, labels, steps, device):
    """Median seconds of one optimizer step for each (model, loss_fn) in runs, after one warm-up step each.

    The runs take turns step by step, so a slow spell of the machine slows both sides alike.
    """
    optimizers = [torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
                  for model, _ in runs]
    times = [[] for _ in runs]
    for _ in range(steps + 1):
        for (model, loss_fn), optimizer, record in zip(runs, optimizers, times):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model, ids, labels).backward()
            optimizer.step()
            if device == "cuda":
                torch.cuda.synchronize()
            record.append(time.perf_counter() - start)
    return [statistics.median(record[1:]) for record in times]


def matmul_peak(dtype, device, n=4096, repeats=5):
    """FLOP/s of a large square matmul: what this device can do at best."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def step_flops(supervised_tokens, checkpointing):
    layers = count_parameters(SMALL) - 2 * SMALL.vocab_size * SMALL.dim - SMALL.dim  # decoder layers only
    tokens = BATCH * SEQ_LEN
    passes = 3 if checkpointing else 2  # forward + backward (+ the recomputed forward)
    return 2 * layers * tokens * passes + 2 * SMALL.dim * SMALL.vocab_size * supervised_tokens * 2


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=7, help="timed steps per cell (after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"),
                        help="base weights (fp32 on CPUs without bf16 units, where bf16 is emulated)")
    opts = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[opts.dtype]
    peak = matmul_peak(dtype, opts.device)
    print(f"device {opts.device}: matmul peak {opts.dtype} {peak / 1e12:.2f} TFLOP/s; "
          f"{torch.get_num_threads()} threads")
    ours, peer = build_pair(opts.device, dtype)
    ids = torch.randint(0, SMALL.vocab_size, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    ids = ids.to(opts.device)
    coin_labels = torch.full_like(ids, -100)
    coin_labels[:, -COIN_SUPERVISED:] = ids[:, -COIN_SUPERVISED:]
    print(f"{'workload':<8}{'ckpt':<6}{'ours tok/s':>12}{'peer tok/s':>12}{'ratio':>8}{'ours % peak':>13}")
    for workload, labels in (("lm", ids), ("coin", coin_labels)):
        supervised = int((labels[:, 1:] != -100).sum())
        for checkpointing in (False, True):
            set_checkpointing(ours, peer, checkpointing)
            t_ours, t_peer = time_steps([(ours, our_loss), (peer, peer_loss)],
                                        ids, labels, opts.steps, opts.device)
            achieved = step_flops(supervised, checkpointing) / t_ours
            print(f"{workload:<8}{'on' if checkpointing else 'off':<6}{BATCH * SEQ_LEN / t_ours:>12.0f}"
                  f"{BATCH * SEQ_LEN / t_peer:>12.0f}{t_peer / t_ours:>7.2f}x{100 * achieved / peak:>12.1f}%")


if __name__ == "__main__":
    main()
