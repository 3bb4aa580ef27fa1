"""precision.py: the device and the number format a run computes in, from --device and --dtype.

A support module for coin.py and evaluate.py. The defaults: cuda when a GPU is present, else cpu; bf16 on a
GPU (fp16 on GPUs without bf16), fp32 on a CPU, where bf16 is slow unless the CPU has bf16 units.
"""
import re
from contextlib import nullcontext

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # --dtype names


def resolve_precision(device, dtype):
    """(device, torch dtype) for the --device and --dtype given ("" or None: the default).

    Defaults: cuda when a GPU is present, else cpu; bf16 on a GPU, fp32 on a CPU. A GPU without bf16 (Turing,
    Pascal) falls back to fp16.
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
    dtype = DTYPES[dtype or ("bf16" if on_gpu else "fp32")]
    if dtype == torch.bfloat16 and on_gpu and not torch.cuda.is_bf16_supported():
        print("this GPU has no bf16: using fp16 instead")
        dtype = torch.float16
    return device, dtype


def autocast(device, dtype):
    """Mixed precision for `dtype` on `device`: autocast to bf16 or fp16, nothing for fp32."""
    return torch.autocast(device.split(":")[0], dtype) if dtype != torch.float32 else nullcontext()
