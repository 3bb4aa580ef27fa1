"""config.py: how the scripts' settings become command-line flags, and what --device and --dtype default to.

A support module for coin.py and evaluate.py. Each script keeps all of its settings in one commented dataclass
(`TrainConfig`, `EvalConfig`) whose fields are built with `opt(default, help, choices)`. `parse_flags` turns
such a dataclass into a command line by one rule:

    field micro_batch_size: int = 16      ->  --micro-batch-size N
    field resume: bool = False            ->  --resume                (switches it on)
    field contrastive: bool = True        ->  --no-contrastive        (switches it off)
    field base: str | None = None         ->  --base TEXT
    opt(..., choices=("a", "b"))          ->  argparse refuses any other value

It returns only the flags that were given, so a caller can tell a default from an explicit choice: coin.py's
--resume puts them on top of the run's saved config.json with `merge_saved`; `TrainConfig(**given)` fills in
the rest.
"""
import argparse
import json
import types
from contextlib import nullcontext
from dataclasses import field, fields
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # --dtype names


def opt(default, help, choices=None):
    """A dataclass field carrying its --help text and, for enumerated values, its argparse choices."""
    return field(default=default, metadata=dict(help=help, choices=choices))


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """A bad flag is one line that names it ("argument --mode: invalid choice: ..."),
        not usage + error."""
        raise SystemExit(f"error: {message} (see --help)")


def parse_flags(config_class, argv=None, description=None):
    """{field name: value} of the flags given in argv (sys.argv when None); flags not given are absent."""
    parser = ArgumentParser(description=description)
    for f in fields(config_class):
        name, help = f.name.replace("_", "-"), f.metadata["help"]
        if f.type is bool:
            parser.add_argument(f"--no-{name}" if f.default else f"--{name}", dest=f.name,
                                action="store_false" if f.default else "store_true",
                                default=argparse.SUPPRESS, help=help)
            continue
        kind = f.type
        if isinstance(kind, types.UnionType):  # `str | None`: the flag takes a str
            kind = next(t for t in kind.__args__ if t is not type(None))
        parser.add_argument(f"--{name}", type=kind, choices=f.metadata["choices"], default=argparse.SUPPRESS,
                            help=f"{help} (default: {f.default})")
    return vars(parser.parse_args(argv))


def merge_saved(given, saved_file, may_change=(), paths=()):
    """The flags `given` on top of the settings saved in `saved_file` (a JSON dict), if that file exists.

    A resumed run keeps its settings: a given flag whose value differs from the saved one is an error, unless
    its field is in may_change. Fields in `paths` compare as resolved paths, so a run resumes from any folder.
    """
    if not Path(saved_file).is_file():
        return given
    saved = json.loads(Path(saved_file).read_text())
    for key, value in given.items():
        if key in paths and saved.get(key):
            same = Path(value).resolve() == Path(saved[key]).resolve()
        else:
            same = value == saved.get(key)
        if key not in may_change and not same:
            raise ValueError(f"--{key.replace('_', '-')} {value} differs from {saved_file} "
                             f"({saved.get(key)}); a resumed run keeps its config: "
                             "drop the flag, or start over with --overwrite")
    return {**saved, **given}


def resolve_precision(device, dtype):
    """(device, torch dtype) for the --device and --dtype given ("" or None: the default).

    Defaults: cuda when a GPU is present, else cpu; bf16 on a GPU, fp32 on a CPU. A GPU without bf16 (Turing,
    Pascal) falls back to fp16.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU here; use --device cpu")
    dtype = DTYPES[dtype or ("bf16" if on_gpu else "fp32")]
    if dtype == torch.bfloat16 and on_gpu and not torch.cuda.is_bf16_supported():
        print("this GPU has no bf16: using fp16 instead")
        dtype = torch.float16
    return device, dtype


def autocast(device, dtype):
    """Mixed precision for `dtype` on `device`: autocast to bf16 or fp16, nothing for fp32."""
    return torch.autocast(device.split(":")[0], dtype) if dtype != torch.float32 else nullcontext()
