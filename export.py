"""export.py: merge a LoRA adapter into its base and write one HF model directory, to serve the tuned model
anywhere: alpaca-lora's export_hf_checkpoint.py (peft's merge_and_unload), for coin's checkpoints.

    python export.py --ckpt out/ --out merged/ [--dtype bf16] [--shard-size 5GB] [--overwrite]
    python export.py --base llama-7b-hf --adapter alpaca-lora-7b --out alpaca-7b-merged/

--ckpt (coin.py's output dir, whose config.json names the base) or --base [--adapter] are resolved by
evaluate.py's resolve_paths, as evaluate.py takes them; --base alone re-saves the base (in another dtype,
or sharded).

What --out holds, as transformers' save_pretrained writes it, so that transformers' from_pretrained and
coin's hf_io.load_model both read it:
    config.json                  hf_io.save_model's (model_config.hf_config), with torch_dtype
    model.safetensors            or, over --shard-size, model-00001-of-0000N.safetensors ... and
                                 model.safetensors.index.json (metadata.total_size, weight_map)
    tokenizer files              copied from the base: tokenizer.model / tokenizer.json, and
                                 tokenizer_config.json, special_tokens_map.json, generation_config.json

Precision: the base loads in --dtype (default: the torch_dtype its config.json records); model.merge_lora
adds (alpha/r) B A to each adapted weight in fp32 and rounds once to --dtype. (Exporting to a dtype narrower
than the stored weights rounds W once more, as it is read.)
Memory: one copy of the weights. The merge is in place, and hf_io.save_model serializes a shard at a time.

Atomic: the directory is built in a hidden sibling, .NAME.partial, config.json last, so that even it does not
load; every file is fsynced, then it is renamed onto --out. A killed export leaves no --out (or the old one,
with --overwrite); the next export removes its .partial. --overwrite moves the old --out to .NAME.old, renames
the new one in, then deletes the old.

Next: read the tests, tests/test_export.py.
"""
import os
import re
import shutil
import time
from pathlib import Path

import torch

from checkpoints import fsync
from evaluate import EvalConfig, resolve_paths
from flags import ArgumentParser
from hf_io import load_adapter, load_model, load_tokenizer, read_adapter_config, save_model
from model import merge_lora
from model_config import read_config
from precision import DTYPES
from tokenizer import TOKENIZER_FILES

# Copied beside the weights when the base has them: the tokenizer and what names its special tokens.
TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
# transformers' convert_file_size_to_int: GiB/MiB/KiB are powers of 2, GB/MB/KB of 10; "Gb" (lower-case b)
# counts bits. Plain digits are bytes.
SIZE_UNITS = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "": 1}

# -----------------------------------------------------------------------------
# 1. Flags, checked before anything loads


def parse_args(argv=None):
    p = ArgumentParser(description="Merge a LoRA adapter into its base; write a HF model directory.")
    p.add_argument("--ckpt", default="", help="coin.py output dir: adapter + config.json naming the base")
    p.add_argument("--base", default="", help="HF LLaMA dir: the checkpoint's base, or one to merge into")
    p.add_argument("--adapter", default="", help="peft LoRA dir to merge into --base (e.g. alpaca-lora-7b)")
    p.add_argument("--out", required=True, help="the HF model directory to write")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="weights (default: the base's torch_dtype)")
    p.add_argument("--shard-size", default="5GB", help="largest shard: 5GB, 500MB, 2GiB or bytes "
                                                       "(transformers' max_shard_size; default: 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p.parse_args(argv)


def parse_size(text):
    """Bytes of a size as transformers' max_shard_size reads it ("5GB", "500MB", "2GiB", "10KB", "1000")."""
    m = re.fullmatch(r"(\d+)((?:[KMG]i?)?[Bb])?", text.strip(), flags=re.IGNORECASE)
    unit = (m[2] or "").upper() if m else ""
    if not m or (unit and unit not in SIZE_UNITS) or int(m[1]) == 0:
        raise ValueError(f"--shard-size {text}: not a size; give bytes, or a number and a unit: "
                         "5GB, 500MB, 10KB, 2GiB")
    size = int(m[1]) * SIZE_UNITS[unit]
    return size // 8 if unit in ("GB", "MB", "KB") and m[2].endswith("b") else size


def default_dtype(base):
    """The dtype base's config.json records (torch_dtype, or transformers 5's dtype); fp32 if none."""
    _, cfg = read_config(base)
    dtype = getattr(torch, str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"), None)
    return dtype if dtype in DTYPES.values() else torch.float32


def check_flags(args):
    """(base, adapter or None, out, dtype, shard bytes), or a ValueError (FileNotFoundError) naming the
    flag at fault."""
    base, adapter, _ = resolve_paths(EvalConfig(ckpt=args.ckpt, base=args.base, adapter=args.adapter))
    out, shard_bytes = Path(args.out), parse_size(args.shard_size)
    if out.exists() and not (out.is_dir() and args.overwrite):
        raise ValueError(f"--out {out}: already exists; pass --overwrite to replace it, or choose another"
                         if out.is_dir() else f"--out {out}: a file; give the path of a directory to write")
    for source in (base, adapter):
        if source and (out.resolve() == source.resolve() or out.resolve() in source.resolve().parents):
            raise ValueError(f"--out {out}: holds {source}, which the export reads; write elsewhere")
    if adapter:
        read_adapter_config(adapter)
    load_tokenizer(base)  # config.json and the tokenizer, checked with no weight loaded
    return base, adapter, out, DTYPES[args.dtype] if args.dtype else default_dtype(base), shard_bytes


# -----------------------------------------------------------------------------
# 2. Merging and writing, atomically

def write_merged(base, adapter, folder, dtype, shard_bytes):
    """Write base + adapter, merged, into `folder` (created): tokenizer files first, config.json last."""
    model = load_model(base, dtype, "cpu")
    if adapter:
        load_adapter(model, adapter)
        merge_lora(model)
    folder.mkdir(parents=True)
    for name in TOKENIZER_FILES + TOKENIZER_EXTRAS:
        if (base / name).is_file():
            shutil.copyfile(base / name, folder / name)
    save_model(model, folder, shard_bytes)  # config.json is its last file


def export(base, adapter, out, dtype, shard_bytes):
    """Build --out beside itself, sync it, rename it into place (module docstring)."""
    partial, old = (out.with_name(f".{out.name}.{suffix}") for suffix in ("partial", "old"))
    shutil.rmtree(partial, ignore_errors=True)  # a killed export's
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_merged(base, adapter, partial, dtype, shard_bytes)
        for file in partial.iterdir():
            fsync(file)
        fsync(partial)
        if out.exists():  # --overwrite: a directory cannot be renamed over a non-empty one
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        os.replace(partial, out)
        fsync(out.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def main(argv=None):
    args = parse_args(argv)
    try:
        base, adapter, out, dtype, shard_bytes = check_flags(args)
        start = time.perf_counter()
        export(base, adapter, out, dtype, shard_bytes)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    files = sorted(out.iterdir())
    shards = [f for f in files if f.suffix == ".safetensors"]
    size = sum(f.stat().st_size for f in shards)
    merged = f"merged {adapter} into {base}" if adapter else f"re-saved {base}"
    print(f"{merged}: wrote {out} in {time.perf_counter() - start:.1f} s: {len(files)} files, "
          f"{str(dtype).removeprefix('torch.')} weights of {size / 1e6:.1f} MB in {len(shards)} "
          f"shard{'s' * (len(shards) > 1)}")

if __name__ == "__main__":
    main()
