"""precision.py: the device and the number format a run computes in, from --device and --dtype.

A support module for coin.py and evaluate.py. The defaults: cuda when a GPU is present, else cpu; bf16 on a
GPU (fp16 on GPUs without bf16); on a CPU, bf16 where it has bf16 matrix units (Intel AMX, or AVX512_BF16 on
Intel and AMD), which multiply bf16 2 to 4 times faster than fp32 and halve the weights (LLaMA-7B: 12.6 GiB
instead of 25), else fp32, which such a CPU computes faster than emulated bf16. The choice is printed, so a
run says which it made; every comparison across machines (the tests, the Quickstart, the study) names its
dtype, so this default changes none of their numbers.
"""
import os
import re
import sys
from contextlib import nullcontext

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # --dtype names
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
BF16_UNITS = ("amx_tile", "avx512_bf16")  # torch.cpu._is_<unit>_supported: the CPU capabilities torch reports


def cpu_bf16_unit():
    """The CPU's bf16 matrix unit that torch reports ("amx_tile" or "avx512_bf16"), or None."""
    return next((unit for unit in BF16_UNITS if getattr(torch.cpu, f"_is_{unit}_supported", bool)()), None)


def resolve_precision(device, dtype):
    """(device, torch dtype) for the --device and --dtype given ("" or None: the default).

    Defaults: cuda when a GPU is present, else cpu; bf16 on a GPU and on a CPU with bf16 units, else fp32. A
    GPU without bf16 (Turing, Pascal) falls back to fp16. The choice is printed.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"--device {device}: not a device; give cpu, cuda or cuda:N")
    on_gpu = device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU here; use --device cpu")
    if on_gpu and int(device.partition(":")[2] or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} GPUs, "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    unit = None if on_gpu else cpu_bf16_unit()
    why = ("--dtype" if dtype else "the default on a GPU" if on_gpu else f"the default on a CPU with "
           f"{unit.upper()} units" if unit else "the default on a CPU without bf16 units")
    dtype = dtype or ("bf16" if on_gpu or unit else "fp32")
    if dtype == "bf16" and on_gpu and not torch.cuda.is_bf16_supported():
        dtype, why = "fp16", "this GPU has no bf16"
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone says it
        print(f"precision: {dtype} on {device} ({why})", file=sys.stderr)  # stdout: the command's output
    return device, DTYPES[dtype]


def autocast(device, dtype):
    """Mixed precision for `dtype` on `device`: autocast to bf16 or fp16, nothing for fp32."""
    return torch.autocast(device.split(":")[0], dtype) if dtype != torch.float32 else nullcontext()
