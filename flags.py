"""flags.py: how the scripts' settings become command-line flags, each value checked as it is parsed.

A support module, torch-free so that perturb.py and prepare_data.py use it too. coin.py and evaluate.py keep
all of their settings in one commented dataclass (`TrainConfig`, `EvalConfig`) whose fields are built with
`opt(default, help, choices, valid)`. `parse_flags` turns such a dataclass into a command line by one rule:

    field micro_batch_size: int = 16      ->  --micro-batch-size N
    field resume: bool = False            ->  --resume                (switches it on)
    field contrastive: bool = True        ->  --no-contrastive        (switches it off)
    field base: str | None = None         ->  --base TEXT
    opt(..., choices=("a", "b"))          ->  argparse refuses any other value
    opt(..., valid=COUNT)                 ->  --micro-batch-size 0 is refused: it must be at least 1

Every bad value is refused while the flags are parsed, before anything loads, in one line that names the flag,
the value and what it must be. It returns only the flags that were given, so a caller can tell a default from
an explicit choice: coin.py's --resume puts them on top of the run's saved config.json with `merge_saved`;
`TrainConfig(**given)` fills in the rest.
"""
import argparse
import math
import types
from dataclasses import field, fields
from pathlib import Path

from files import read_json

# What a number must be, as (test, what it says). A float must also be finite: nan and inf are refused.
COUNT = (lambda v: v >= 1, "at least 1")
NON_NEGATIVE = (lambda v: v >= 0, "at least 0")
POSITIVE = (lambda v: v > 0, "greater than 0")
PROBABILITY = (lambda v: 0 <= v < 1, "at least 0 and below 1")
FRACTION = (lambda v: 0 <= v <= 1, "between 0 and 1")
SHARE = (lambda v: 0 < v <= 1, "above 0 and at most 1")
SEED = (lambda v: 0 <= v < 2**63, "between 0 and 2**63 - 1")  # what torch.manual_seed and random take


def up_to(limit, why):
    """A count of at most `limit`: a bigger value is a typo or a run that would never end (`why`)."""
    return lambda v: 1 <= v <= limit, f"between 1 and {limit} ({why})"


def comma_list_of(names):
    """A comma list of some of `names`, none unknown."""
    return lambda v: bool(v) and set(v.split(",")) <= set(names), f"a comma list of {', '.join(names)}"


def checked(kind, valid=None):
    """An argparse type: `kind` (int, float, str) whose value passes `valid` (one of the rules above)."""
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if valid and not valid[0](value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {valid[1]}")
        return value
    convert.__name__ = kind.__name__  # argparse names the type in its own messages
    return convert


def choose(text, allowed, what):
    """The names of a comma list flag ("all": every allowed one); an unknown name is a ValueError."""
    names = list(allowed) if text == "all" else [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in allowed]
    if unknown or not names:
        raise ValueError(f"unknown {what} {unknown[0] if unknown else text!r}; "
                         f"choose from {', '.join(allowed)}")
    return names


def opt(default, help, choices=None, valid=None):
    """A dataclass field carrying its --help text, its argparse choices and the rule its value must pass."""
    return field(default=default, metadata=dict(help=help, choices=choices, valid=valid))


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
        parser.add_argument(f"--{name}", type=checked(kind, f.metadata["valid"]), default=argparse.SUPPRESS,
                            choices=f.metadata["choices"], help=f"{help} (default: {f.default})")
    return vars(parser.parse_args(argv))


def merge_saved(given, saved_file, may_change=(), paths=()):
    """The flags `given` on top of the settings saved in `saved_file` (a JSON dict), if that file exists.

    A resumed run keeps its settings: a given flag whose value differs from the saved one is an error, unless
    its field is in may_change. Fields in `paths` compare as resolved paths, so a run resumes from any folder;
    a relative one is relative to saved_file's folder (run_folder.stored), and one that no longer exists must
    be given anew: the flag names its new place.
    """
    if not Path(saved_file).is_file():
        return given
    saved = read_json(saved_file)
    for key in paths:
        saved[key] = saved.get(key) and str(Path(saved_file).parent / saved[key])
    gone = [key for key in paths if saved[key] and not Path(saved[key]).exists()]
    for key, value in given.items():
        if key in paths and saved.get(key):
            same = key in gone or Path(value).resolve() == Path(saved[key]).resolve()
        else:
            same = value == saved.get(key)
        if key not in may_change and not same:
            raise ValueError(f"--{key.replace('_', '-')} {value} differs from {saved_file} "
                             f"({saved.get(key)}); a resumed run keeps its config: "
                             "drop the flag, or start over with --overwrite")
    for key in gone:
        if key not in given:
            raise ValueError(f"{saved[key]}: not found, and {saved_file} names it as the run's {key} (moved "
                             f"or deleted since the run started?); give its new place with --{key}")
    return {**saved, **given}
