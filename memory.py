"""memory.py: how much GPU memory one LoRA training step needs, predicted from the shapes alone.

A support module: coin.py prints this estimate before its first step, and `python memory.py` prints it for any
config, so a user knows before renting a GPU whether a micro-batch fits. Read it after coin.py.

    python memory.py                               # LLaMA-7B, 8 rows of 256 tokens, a 24 GB GPU
    python memory.py --config llama-7b-hf --rows 32 --budget-gib 24
    python memory.py --config llama-3-8b --rows 32 --supervised 8   # a base of BASES, answers of 8 tokens

The model: bf16 weights under CUDA bf16 autocast, fp32 LoRA weights and AdamW state, and the activations
autograd saves, which tests/test_memory.py checks byte for byte against a real backward at LLaMA-7B width.

What one decoder layer saves for backward, in bytes per token (a = activation bytes, 2 in bf16):
  2 RMSNorms        2 * (4*D + 4)       their fp32 input and 1/rms
  attention         4*a*H*Hd + 4*H      q, k, v (repeated to H heads), output; fp32 logsumexp
                    + 4*a*Hd            cos/sin cast for q and for k
  MLP               3*a*I               gate, up and silu(gate)
  each LoRA target  d_in*(m + l) + l*r  dropout mask (m bytes), A's input (l bytes), B's input
The frozen base matmuls save nothing: no weight gradient is needed. Under CUDA autocast l = 2 and m = 1
(a bool mask), and each layer also keeps autocast's bf16 copies of A and B; on CPU without autocast l = m = 4.
Layer 0 saves less: its input needs no gradient, so its first RMSNorm, the q/k/v dropout masks and q/k/v's
copies of A are not kept. With checkpointing a layer keeps only its input (a*D), and backward recomputes
one layer at a time. Logits cost (a + 4 + 4)*V per supervised token:
lm_head's output, its fp32 copy and the fp32 log-softmax.

On a CPU the same counts hold under bf16 autocast, with two things left out. The shards' file pages, which
the kernel maps while the weights load and may drop (9.4 GiB at LLaMA-7B), are not the process's own memory.
glibc's heaps would keep freed activations; load_model calls return_freed_memory so that they go back. Then
benchmarks/rehearse_7b.py measured a LLaMA-7B CoIN step's peak 2% under this prediction.
"""
import argparse
import ctypes
import os
import sys
from pathlib import Path

import torch

from model_config import read_model_args
from model import LORA_TARGETS, ModelArgs
from precision import DTYPE_NAMES

M_MMAP_THRESHOLD = -3  # glibc's mallopt() parameter (malloc.h)
GPU_OVERHEAD_GIB = 1.0  # CUDA context, cuBLAS workspace, allocator slack: outside what PyTorch counts
# The README's bases (their config.json on the Hugging Face Hub); tests/test_memory.py checks each one's
# published parameter count. rope_scaling, a sliding window and tied embeddings' absence change no memory.
BASES = {
    "llama-7b": ModelArgs(),  # huggyllama/llama-7b: alpaca-lora's and CoIN's base
    "llama-3-8b": ModelArgs(n_kv_heads=8, intermediate_size=14336, vocab_size=128256, norm_eps=1e-5,
                            rope_theta=500000.0),  # meta-llama/Meta-Llama-3-8B; 3.1-8B: the same shapes
    "mistral-7b": ModelArgs(n_kv_heads=8, intermediate_size=14336, vocab_size=32768, norm_eps=1e-5,
                            rope_theta=1e6),  # mistralai/Mistral-7B-v0.3
    "qwen2.5-7b": ModelArgs(dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, intermediate_size=18944,
                            vocab_size=152064, rope_theta=1e6, attention_bias=True),  # Qwen/Qwen2.5-7B
    "tinyllama-1.1b": ModelArgs(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, intermediate_size=5632,
                                norm_eps=1e-5),  # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
}


def count_parameters(args):
    attn = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads)
    attn += args.attention_bias * args.head_dim * (args.n_heads + 2 * args.n_kv_heads)  # Qwen2's q/k/v biases
    layer = attn + 3 * args.dim * args.intermediate_size + 2 * args.dim
    return (args.n_layers * layer + (1 if args.tie_word_embeddings else 2) * args.vocab_size * args.dim
            + args.dim)


def lora_shapes(args, targets=LORA_TARGETS):
    """(in_features, out_features) of each LoRA-wrapped projection of one layer."""
    D, I = args.dim, args.intermediate_size
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    shapes = dict(q_proj=(D, q), k_proj=(D, kv), v_proj=(D, kv), o_proj=(q, D),
                  gate_proj=(D, I), up_proj=(D, I), down_proj=(I, D))
    return {t: shapes[t] for t in targets}


def saved_activation_bytes(args, tokens, grad_checkpointing=True, targets=LORA_TARGETS, r=16, act_bytes=2,
                           autocast=True, mask_bytes=1, layers=None):
    """Bytes that hidden_states() keeps for backward over `tokens` (= B*T) tokens: the table above."""
    a, L, norm = act_bytes, args.n_layers if layers is None else layers, 4 * args.dim + 4
    if grad_checkpointing:  # layer inputs, the fp32 cos/sin the checkpoints share, the final norm
        return tokens * (L * a * args.dim + 2 * 4 * args.head_dim + norm)
    shapes = lora_shapes(args, targets)
    l = a if autocast else 4  # A's input: autocast's low-precision copy, or our explicit fp32 cast
    lora = sum(d_in * (mask_bytes + l) + l * r for d_in, _ in shapes.values())
    layer = (2 * norm + 4 * a * args.n_heads * args.head_dim + 4 * args.n_heads + 4 * a * args.head_dim
             + 3 * a * args.intermediate_size + lora)
    qkv_in = sum(shapes[t][0] for t in ("q_proj", "k_proj", "v_proj") if t in shapes)
    weight_copies = (a * r * (L * sum(d_in + d_out for d_in, d_out in shapes.values()) - qkv_in)
                     if autocast else 0)
    return tokens * (L * layer - (norm + mask_bytes * qkv_in) + norm) + weight_copies


def estimate_training_memory(args, rows, seq_len, supervised_per_row=None, grad_checkpointing=True,
                             targets=LORA_TARGETS, r=16, weight_bytes=2):
    """Predicted peak bytes of one LoRA training step on CUDA with bf16 autocast, by component.

    rows sequences of seq_len tokens (CoIN's micro-batch of B examples is 2B rows); supervised_per_row:
    the tokens per row that get logits (default: all of them).
    """
    tokens = rows * seq_len
    activations = saved_activation_bytes(args, tokens, grad_checkpointing, targets, r, weight_bytes)
    if grad_checkpointing:  # the one layer being recomputed (a later layer: layer 0 keeps less)
        activations += (saved_activation_bytes(args, tokens, False, targets, r, weight_bytes, layers=2)
                        - saved_activation_bytes(args, tokens, False, targets, r, weight_bytes, layers=1))
    n_lora = args.n_layers * r * sum(d_in + d_out for d_in, d_out in lora_shapes(args, targets).values())
    supervised = rows * (seq_len if supervised_per_row is None else supervised_per_row)
    return dict(weights=count_parameters(args) * weight_bytes,
                lora_params_grads_adamw=n_lora * 4 * 4,  # fp32 parameter, gradient, exp_avg, exp_avg_sq
                activations=activations,
                logits=supervised * args.vocab_size * (weight_bytes + 4 + 4))


def largest_micro_batch(args, seq_len, budget_gib=24.0, **kwargs):
    """The most rows per micro-batch whose predicted peak fits in a GPU of budget_gib (0 if none)."""
    budget, rows = (budget_gib - GPU_OVERHEAD_GIB) * 2**30, 0
    while sum(estimate_training_memory(args, rows + 1, seq_len, **kwargs).values()) <= budget:
        rows += 1
    return rows


def print_memory_estimate(args, rows=8, seq_len=256, supervised=None, budget_gib=24.0):
    print(f"{count_parameters(args) / 1e9:.2f}B parameters, LoRA r=16 on {', '.join(LORA_TARGETS)}")
    for checkpointing in (True, False):
        parts = estimate_training_memory(args, rows, seq_len, supervised, checkpointing)
        print(f"gradient checkpointing {'on' if checkpointing else 'off'}, {rows} rows x {seq_len} tokens:")
        for name, n in dict(parts, predicted_peak=sum(parts.values())).items():
            print(f"  {name:<26}{n / 2**30:8.2f} GiB")
        best = largest_micro_batch(args, seq_len, budget_gib, supervised_per_row=supervised,
                                   grad_checkpointing=checkpointing)
        print(f"  largest micro-batch in {budget_gib:g} GiB: {best} rows = {best // 2} CoIN examples")


def available_memory(device):
    """Bytes this process can still fill on `device`: the GPU's free memory, or the host's MemAvailable (free
    pages plus the page cache the kernel can drop), capped by a cgroup's memory.max (a container's limit)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    available = int(meminfo["MemAvailable"].split()[0]) * 1024
    limit = Path("/sys/fs/cgroup/memory.max")
    text = limit.read_text().strip() if limit.is_file() else "max"
    return min(available, int(text)) if text.isdigit() else available


def return_freed_memory(device):
    """On a CPU under glibc, serve every host allocation over 1 MiB by its own mmap, so that a freed tensor's
    memory goes back to the system at once. By default glibc raises that threshold as blocks are freed (up to
    32 MiB) and keeps freed blocks under it in its heaps for reuse; gradient checkpointing frees and allocates
    each layer's recomputed activations, and the heaps grew with the layers: at LLaMA-7B a CoIN step peaked at
    19.8 GiB, 14.7 with this against 15.0 predicted. The price is the page faults of fresh pages: that step
    ran about 15% slower. A user who prefers the speed sets MALLOC_MMAP_THRESHOLD_=33554432, which is kept."""
    chosen = "MALLOC_MMAP_THRESHOLD_" in os.environ  # glibc read it at start: the user's choice stands
    if device.startswith("cpu") and sys.platform.startswith("linux") and not chosen:
        try:
            ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20)
        except (OSError, AttributeError):  # not glibc (musl): its own allocator, left as it is
            pass


def check_fits(args, dtype, device, config, available=None):
    """Refuse a base whose weights alone (from config.json's shapes) cannot fit `device`'s memory in `dtype`,
    before any weight loads: a ValueError naming config.json, both sizes and the --dtype that fits."""
    available = available_memory(device) if available is None else available
    count = count_parameters(args)
    need, half = count * dtype.itemsize, count * 2
    if need <= available:
        return
    fix = ("use --dtype bf16 (" + f"{half / 2**30:.1f} GiB)" if dtype.itemsize > 2 and half <= available else
           "use a machine with more memory: coin has no 8-bit or 4-bit weights")
    raise ValueError(f"{config}: {count / 1e9:.2f}B weights need {need / 2**30:.1f} GiB in "
                     f"{DTYPE_NAMES[dtype]} but {device} has {available / 2**30:.1f} GiB available; {fix}")


def training_summary(model, rows, seq_len, grad_checkpointing, targets, r):
    """What coin.py prints before its first step: trainable and frozen parameters, their dtypes, and the
    predicted peak memory of a step of `rows` rows of seq_len tokens on a GPU."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    frozen = sum(p.numel() for p in params if not p.requires_grad)
    dtypes = sorted({(str(p.dtype), p.requires_grad) for p in params})
    memory = estimate_training_memory(model.args, rows, seq_len, grad_checkpointing=grad_checkpointing,
                                      targets=targets, r=r, weight_bytes=model.lm_head.weight.element_size())
    gib = {name: n / 2**30 for name, n in memory.items()}
    return "\n".join([
        f"trainable parameters: {trainable:,} ({100 * trainable / (trainable + frozen):.2f}%) in LoRA "
        f"r={r} on {', '.join(targets)}; frozen: {frozen:,}",
        "parameter dtypes: " + ", ".join(f"{d} ({'trainable' if t else 'frozen'})" for d, t in dtypes),
        f"predicted peak memory on a GPU ({rows} rows x {seq_len} tokens): {sum(gib.values()):.2f} GiB ("
        + ", ".join(f"{name} {n:.2f}" for name, n in gib.items()) + ")"])


def main(argv=None):
    parser = argparse.ArgumentParser(description="Predicted peak memory of LoRA training (bf16, CUDA)")
    parser.add_argument("--config", help=f"HF config.json or model directory, or one of {', '.join(BASES)} "
                                         "(default: llama-7b)")
    parser.add_argument("--rows", type=int, default=8,
                        help="sequences per micro-batch; CoIN uses 2 per example")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per row (CoIN's cutoff)")
    parser.add_argument("--supervised", type=int, help="tokens per row that get logits (default: all)")
    parser.add_argument("--budget-gib", type=float, default=24.0, help="GPU memory to fit into")
    opts = parser.parse_args(argv)
    try:
        model_args = BASES.get(opts.config or "llama-7b") or read_model_args(opts.config)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    print_memory_estimate(model_args, opts.rows, opts.seq_len, opts.supervised, opts.budget_gib)


if __name__ == "__main__":
    main()
