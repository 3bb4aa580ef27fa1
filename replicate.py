"""replicate.py: see CoIN work: its arms against continual instruction tuning, same base, data, steps, seed.

The paper's experiment at laptop scale, in one command. Each stage's output is kept in --out, and a stage
whose output is there is skipped: an interrupted run continues where it stopped.

  1. data    each task's training rows (one per distinct text), shuffled once, cut into three disjoint parts:
             evaluation (or --eval-dir's), base and adapters; rendered with the templates (prepare_data.py)
  2. bases   the "Alpaca stage" (replicate_bases.py): small LLaMAs, instruction-tuned in full. By default
             the shipped ones (--bases: every CPU starts from the same weights); --base-seeds trains them here
  3. arms    per unit, one LoRA adapter per arm (coin.py), all with the same data, steps and seed, each with
             its own coin.py flags (--arms): by default continual instruction tuning (--no-contrastive) and
             CoIN. The unit of replication is a base (several bases, one adapter seed), or an adapter seed
             (one base, several --seeds)
  4. scores  each adapter in evaluate.py's rank mode, coin.py's input format: under the prompt file's clean
             and perturbed instructions (never trained on), under three training templates (does the model
             do the task at all?); the hidden-state similarity of perturbed to clean inputs (scoring.py)
  5. report  report.md, report.json, report.png: every arm against continual, over the units (comparison.py)

    python replicate.py --out runs/quick      # the toy tasks on the shipped bases: the README's Quickstart
    python replicate.py --train-dir ../shared/glue/train --templates ../shared/flan/templates.json \\
        --tasks sst2 --out runs/study --arms "..." ...    # real SST-2: docs/study.md gives the flags
"""
import itertools
import json
import random
import re
import shlex
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from comparison import BASELINE, write_report
from coin import TrainConfig, train
from diagnostics import ends, read_metrics
from evaluate import DEFAULT_PROMPTS, load_prompt_set, plan_cells
from files import read_json, write_atomically
from flags import COUNT, POSITIVE, comma_list_of, opt, parse_flags
from glue import CONTENT, flan_row, label_id, labelled_rows
from prepare_data import build_examples, load_templates, write_examples
from replicate_bases import (check_rows, over, plan_units, refuse_mixed, rows_digest, train_base,
                             write_manifest)
from scoring import FLAN_NAME, score_adapter

EXAMPLES = Path(__file__).resolve().parent / "examples"
TOY, TOY_BASES = EXAMPLES / "toy_glue", EXAMPLES / "toy_bases"  # toy_data.py's tasks; their shipped bases
SEEDS = (lambda v: all(s.isdigit() for s in v.split(",")) and len(set(v.split(","))) == len(v.split(",")),
         "a comma list of distinct seeds, e.g. 0,1,2")
ARMS = "continual=--no-contrastive; coin="  # the default arms: continual instruction tuning and CoIN
# coin.py's settings that replicate.py gives every arm alike (the same base, data, steps and seed), and
# which an arm's flags may therefore not set
SHARED = ("data", "base", "tiny", "adapter", "merge_adapter", "out", "seed", "max_steps", "epochs", "holdout",
          "resume", "overwrite")

# -----------------------------------------------------------------------------
# 1. Configuration

@dataclass
class ReplicateConfig:
    # Data
    train_dir: str = opt(str(TOY), "GLUE-layout training splits: <task>.jsonl rows with HF glue's fields")
    templates: str = opt(str(TOY / "templates.json"), "training instruction templates (prepare_data.py)")
    eval_dir: str = opt("", "GLUE-layout evaluation files; empty: rows held out of --train-dir")
    prompts: str = opt(str(DEFAULT_PROMPTS), "unseen instructions to score, {group: {task: [...]}}")
    tasks: str = opt("sst2,cola", "comma list of tasks", valid=(comma_list_of(FLAN_NAME)[0], "a comma list "
                     "of sst2, cola: the tasks whose templates answer with GLUE's label words"))
    arms: str = opt(ARMS, "the adapters: 'name=coin.py flags' pairs separated by ';', one of them named "
                          f"{BASELINE}, which every other arm is compared with")
    out: str = opt("runs/replicate", "output dir")
    eval_rows: int = opt(60, "rows per task evaluated: held out, or drawn from --eval-dir", valid=COUNT)
    base_rows: int = opt(3000, "rows per task that instruction-tune the bases", valid=COUNT)
    tune_groups: int = opt(400, "groups (anchor + hard negative) per task training the adapters", valid=COUNT)
    # The bases, and the unit of replication
    bases: str = opt(str(TOY_BASES), "the bases: a folder of base<N>/ with bases.json (replicate_bases.py), "
                                     "or one base of it; ignored with --base-seeds")
    base_seeds: str = opt("", "train a base per seed here instead, e.g. 0 or 0,1,2",
                          valid=(lambda v: not v or SEEDS[0](v), "empty, or " + SEEDS[1]))
    seeds: str = opt("0", "adapter seeds: with one base, one adapter per arm and seed; with several bases, "
                          "one seed", valid=SEEDS)
    # How --base-seeds trains a base: a small LLaMA trained in full (replicate_bases.BASE_SETTINGS)
    dim: int = opt(128, "model width", valid=COUNT)
    layers: int = opt(2, "decoder layers", valid=COUNT)
    vocab: int = opt(1000, "BPE pieces of the tokenizer trained on the base's rows", valid=COUNT)
    base_steps: int = opt(2000, "full-weight steps of a base", valid=COUNT)
    base_lr: float = opt(1e-3, "peak learning rate of a base", valid=POSITIVE)
    batch_size: int = opt(32, "examples per step, bases and adapters", valid=COUNT)
    cutoff: int = opt(128, "max tokens per row", valid=COUNT)
    # The adapters; the rest is coin.py's defaults (LoRA r 16, alpha 16 on q, k, v, o; tau 0.05, lambda 1000)
    tune_steps: int = opt(40, "steps of each adapter", valid=COUNT)
    tune_lr: float = opt(1e-3, "peak learning rate of the adapters", valid=POSITIVE)
    eval_batch_size: int = opt(64, "inputs per evaluation batch", valid=COUNT)


def parse_arms(text):
    """{name: the coin.py flags it gives, as parse_flags returns them} of --arms: "name=flags; ...", each
    arm's flags checked by coin.py's own parser; a ValueError names the arm at fault."""
    arms = {}
    for pair in filter(str.strip, text.split(";")):
        name, equals, flags = (part.strip() for part in pair.partition("="))
        if not equals or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or name in arms:
            raise ValueError(f"--arms: {pair.strip()!r} is not name=flags with a new name of letters, "
                             "digits, '.', '_' or '-'")
        try:
            arms[name] = parse_flags(TrainConfig, shlex.split(flags))
        except (SystemExit, ValueError) as e:  # argparse's one-line error, or shlex's unclosed quote
            raise ValueError(f"--arms: arm {name}: {str(e).removeprefix('error: ')}") from None
        shared = sorted(set(arms[name]) & set(SHARED))
        if shared:
            raise ValueError(f"--arms: arm {name}: --{shared[0].replace('_', '-')} is replicate.py's to set, "
                             "the same for every arm")
    if BASELINE not in arms:
        raise ValueError(f"--arms: no arm named {BASELINE}, which every other arm is compared with")
    return arms


def check(cfg):
    """(tasks, units, arms, templates, prompt set, rows split, base rows' digest): every file, row, name and
    arm, and that shipped bases learned from this run's base rows, before any writing. A rerun may add
    seeds and arms to a run; anything else must be as before."""
    tasks, arms, units = cfg.tasks.split(","), parse_arms(cfg.arms), plan_units(cfg)
    templates, prompt_set = load_templates(cfg.templates), load_prompt_set(cfg.prompts)
    for task in tasks:
        for folder, flag in ((cfg.train_dir, "--train-dir"), (cfg.eval_dir, "--eval-dir")):
            if folder and not (Path(folder) / f"{task}.jsonl").is_file():
                raise FileNotFoundError(f"{Path(folder) / f'{task}.jsonl'}: no {task} split in {flag}; give "
                                        f"a folder of GLUE-layout <task>.jsonl files, or drop {task} from "
                                        "--tasks")
        if FLAN_NAME[task] not in templates:
            raise ValueError(f"{cfg.templates}: no templates for {FLAN_NAME[task]!r} ({task})")
        plan_cells(prompt_set, [task], list(prompt_set))  # every group has instructions for the task
    if "clean" not in prompt_set:
        raise ValueError(f"{cfg.prompts}: no 'clean' group, which the perturbed groups are compared with")
    if Path(cfg.out).is_file():
        raise ValueError(f"--out {cfg.out}: a file, not a directory; give a directory for the run")
    saved, free = Path(cfg.out) / "replicate.json", ("seeds", "arms")
    if saved.is_file() and any(read_json(saved).get(k) != v for k, v in asdict(cfg).items() if k not in free):
        raise ValueError(f"{saved}: made with other settings; give another --out, or the same flags")
    for (unit, _, _), (name, flags) in itertools.product(units, arms.items()):
        trained = Path(cfg.out) / unit / name / "arm.json"
        if trained.is_file() and read_json(trained) != flags:
            raise ValueError(f"{trained}: arm {name} was trained with other flags ({read_json(trained)}); "
                             "give the arm another name, or its flags as before")
    parts = {task: split_rows(cfg, task) for task in tasks}
    digest = rows_digest(rendered(cfg, parts, templates, "base"))
    if not cfg.base_seeds:
        check_rows(cfg.bases, digest)
    return tasks, units, arms, templates, prompt_set, parts, digest


# -----------------------------------------------------------------------------
# 2. Data: disjoint parts of each training split

def split_rows(cfg, task):
    """{eval, tune, base}: disjoint rows of the task's training split, one per distinct input text, in a fixed
    shuffled order (the same for every seed): --eval-rows, then twice --tune-groups (anchors and their hard
    negatives), then at most --base-rows. With --eval-dir, --eval-rows of its rows drawn with a fixed seed
    are evaluated instead, and no training row has the text of one of its rows."""
    evaluated = labelled_rows(Path(cfg.eval_dir) / f"{task}.jsonl", task) if cfg.eval_dir else []
    unseen = {CONTENT[task].format(**r) for r in evaluated}
    rows = {CONTENT[task].format(**r): r for r in labelled_rows(Path(cfg.train_dir) / f"{task}.jsonl", task)}
    order = sorted(rows.keys() - unseen)
    random.Random("split").shuffle(order)  # one seed for all tasks: tasks on the same sentences split alike
    held = 0 if cfg.eval_dir else cfg.eval_rows
    ends = list(itertools.accumulate([held, 2 * cfg.tune_groups, cfg.base_rows]))
    if len(order) < ends[1] + 100:
        raise ValueError(f"{cfg.train_dir}/{task}.jsonl: {len(order)} distinct rows leave fewer than 100 "
                         "for the base after --eval-rows and twice --tune-groups; lower them")
    parts = dict(eval=order[:ends[0]], tune=order[ends[0]:ends[1]], base=order[ends[1]:ends[2]])
    parts = {name: [rows[text] for text in texts] for name, texts in parts.items()}
    if cfg.eval_dir:  # a seeded draw of --eval-rows of them
        parts["eval"] = random.Random(f"eval:{task}").sample(evaluated, min(cfg.eval_rows, len(evaluated)))
    return parts


def build_data(cfg, parts, templates, folder):
    """Write eval/<task>.jsonl (GLUE layout), base.jsonl and tune.jsonl (coin.py's data) under folder."""
    (folder / "eval").mkdir(parents=True, exist_ok=True)
    sizes = {}
    for t, rows in parts.items():
        write_atomically(folder / "eval" / f"{t}.jsonl", "".join(json.dumps(r) + "\n" for r in rows["eval"]))
        labels = Counter(label_id(t, r["label"], t) for r in rows["eval"])
        sizes[t] = dict({name: len(part) for name, part in rows.items()},
                        eval_majority=100 * max(labels.values()) / len(rows["eval"]))
    for name in ("base", "tune"):
        write_examples(folder / f"{name}.jsonl", rendered(cfg, parts, templates, name))
    return sizes


def rendered(cfg, parts, templates, name):
    """coin.py's examples of one part (base, tune) of every task's rows, rendered with the templates that
    answer with the label (the ones that ask for a text are another task); tune: --tune-groups per task."""
    answering = {FLAN_NAME[t]: [pair for pair in templates[FLAN_NAME[t]] if pair[1] == "{answer}"]
                 for t in parts}
    sources = {FLAN_NAME[t]: [flan_row(FLAN_NAME[t], r, t) for r in parts[t][name]] for t in parts}
    return build_examples(answering, sources, cfg.tune_groups if name == "tune" else None, seed=0)[0]


# -----------------------------------------------------------------------------
# 3. The bases and the arms

def train_bases(cfg, out, digest):
    """{base: seconds} of --base-seeds' bases, each trained here unless done (replicate_bases.train_base),
    recorded in out/bases/bases.json with their rows' digest; none with shipped bases."""
    rows, folder = out / "data" / "base.jsonl", out / "bases"
    seconds = {f"base{s}": stage(folder / f"base{s}" / "done.json", lambda: train_base(
        cfg, int(s), rows, folder / f"base{s}"))["seconds"] for s in filter(None, cfg.base_seeds.split(","))}
    if seconds and not (folder / "bases.json").is_file():
        write_manifest(cfg, folder, digest)
    return seconds


def arm_config(cfg, data, base, seed, flags, out):
    """coin.py's settings of one adapter: replicate.py's, the same for every arm, then the arm's own flags."""
    shared = dict(data=str(data), base=str(base), out=str(out), max_steps=cfg.tune_steps, seed=seed,
                  batch_size=cfg.batch_size, micro_batch_size=cfg.batch_size, lr=cfg.tune_lr,
                  cutoff=cfg.cutoff, grad_checkpointing=False, device="cpu", dtype="fp32", save_every=20,
                  resume=True)
    return TrainConfig(**dict(shared, **flags))


def train_arm(tune, flags):
    """Train one adapter (coin.py), its flags recorded first in arm.json; return its losses and diagnostics
    over the first and the last tenth of the steps (diagnostics.ends). On a signal coin.py saves, then exits
    with checkpoints.STOPPED: a rerun continues."""
    Path(tune.out).mkdir(parents=True, exist_ok=True)
    write_atomically(Path(tune.out) / "arm.json", json.dumps(flags))
    return ends(read_metrics(train(tune)))


# -----------------------------------------------------------------------------
# 5. The run

def stage(path, make):
    """The JSON at path: make()'s dict and its seconds, written there first unless done before."""
    if not path.is_file():
        started = time.perf_counter()
        done = dict(make() or {}, seconds=round(time.perf_counter() - started, 1))
        write_atomically(path, json.dumps(done, indent=1))  # make() has made the folder
    return read_json(path)


def replicate(cfg):
    """Run the stages (the module's docstring), each skipped when done; write and print the report."""
    started, out = time.perf_counter(), Path(cfg.out)
    tasks, units, arms, templates, prompt_set, parts, digest = check(cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "replicate.json", json.dumps(asdict(cfg), indent=1))
    data = out / "data"
    sizes = stage(data / "sizes.json", lambda: build_data(cfg, parts, templates, data))
    seconds = dict(data=sizes.pop("seconds"), bases=train_bases(cfg, out, digest))
    print("rows per task: " + "; ".join(f"{t} {json.dumps(s)}" for t, s in sizes.items()))
    scores = {}
    for (unit, base, seed), (arm, flags) in itertools.product(units, arms.items()):
        arm_dir = out / unit / arm
        tune = arm_config(cfg, data / "tune.jsonl", base, seed, flags, arm_dir)
        trained = stage(arm_dir / "trained.json", lambda: train_arm(tune, flags))
        scores[unit, arm] = stage(arm_dir / "scores.json", lambda: score_adapter(
            base, arm_dir, data / "eval", tasks, templates, prompt_set, cfg.eval_batch_size))
        scores[unit, arm]["training"] = trained
        seconds[f"{unit}/{arm}"] = dict(train=trained["seconds"], score=scores[unit, arm]["seconds"])
    write_report(out, dict(config=asdict(cfg), rows=sizes, seconds=seconds, **over(cfg, units)), scores,
                 [unit for unit, _, _ in units], arms, time.perf_counter() - started)


def main(argv=None):
    given = parse_flags(ReplicateConfig, argv, "CoIN vs continual instruction tuning")
    try:
        refuse_mixed(given)
        replicate(ReplicateConfig(**given))
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
