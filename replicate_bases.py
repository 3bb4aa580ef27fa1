"""replicate_bases.py: replicate.py's bases (trained here, or shipped), and its unit of replication.

A support module, read after replicate.py. A base is the "Alpaca stage" of the paper's experiment: a small
random LLaMA and a BPE tokenizer, every weight instruction-tuned on the base rows. Trained here, it is a
different base on every CPU: the kernels (AVX2 or AVX-512, the number of threads) round each step's sums
differently, and 2,000 full-weight steps carry those last bits into other weights and other answers. So the
Quickstart ships its bases (examples/toy_bases) and trains only the adapters on them: every CPU starts from
the same weights.

    train_base        the Alpaca stage, on the run's data/base.jsonl, written as a HF directory (hf_io.py)
    bases.json        beside a run's bases: what they were built with, and the SHA-256 of the base rows
                      (the examples of data/base.jsonl) they learned from. A run on shipped bases checks,
                      before it writes anything, that its own base rows are those: then no base has seen the
                      run's evaluation or adapter rows, which the split keeps apart (replicate.split_rows)
    find_bases        the bases of a folder: its base<N>/ folders, or the folder itself when it is one base
    plan_units        the unit of replication: each base, when there are several (every adapter has the one
                      seed of --seeds), or each adapter seed of --seeds on one base; the report's 95%
                      intervals are over the units, so over bases they hold the base-to-base variation

The shipped toy bases are rebuilt by a run that builds them and trains the continual arm on each (its seen
template accuracy is the rule that chose them), then a copy (docs/quickstart.md):

    python replicate.py --base-seeds 0,1,2 --arms "continual=--no-contrastive" --out runs/toy_bases
    cp -r runs/toy_bases/bases examples/toy_bases
"""
import hashlib
import itertools
import json
from dataclasses import asdict
from pathlib import Path

import torch

from coin import learning_rate, micro_batch_loss
from data import ContrastiveDataset, collate, epoch_steps, load_examples
from files import read_json, write_atomically
from hf_io import load_model, load_tokenizer, save_model
from model import ModelArgs
from tiny_base import build_tiny_base

MANIFEST = "bases.json"
# replicate.py's settings that made the bases' rows (checked by their digest), and the bases' own
DATA_SETTINGS = ("tasks", "eval_rows", "base_rows", "tune_groups")
BASE_SETTINGS = ("dim", "layers", "vocab", "base_steps", "base_lr")  # batch_size, cutoff: the adapters' too

# -----------------------------------------------------------------------------
# The Alpaca stage: a small LLaMA instruction-tuned in full


def train_base(cfg, seed, data, folder):
    """Train every weight of a random LLaMA (seed: its weights and data order) on both views of data's
    examples, with cross-entropy on the answers alone (coin.py's generation loss), AdamW, linear warmup and
    decay; write it and its tokenizer to folder."""
    examples, _ = load_examples(data)
    args = ModelArgs(dim=cfg.dim, n_layers=cfg.layers, n_heads=max(1, cfg.dim // 32), vocab_size=cfg.vocab,
                     intermediate_size=cfg.dim * 8 // 3, norm_eps=1e-5, tie_word_embeddings=True)
    scratch = build_tiny_base(examples, seed, args)  # random weights, a tokenizer trained on them
    model, tokenizer = load_model(scratch.name), load_tokenizer(scratch.name)
    dataset = ContrastiveDataset(examples, tokenizer, cfg.cutoff)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.base_lr, weight_decay=0.0)
    windows = (step for epoch in itertools.count()
               for step in epoch_steps(dataset.groups, cfg.batch_size, cfg.batch_size, seed, epoch,
                                       lengths=dataset.lengths))
    model.train()
    for step, (indices,) in enumerate(itertools.islice(windows, cfg.base_steps)):  # one micro-batch a step
        batch = collate([dataset[i] for i in indices], dataset.pad_id)
        groups = int(batch["group_index"].max()) + 1
        loss, parts = micro_batch_loss(model, batch, groups, 1.0, 1.0, contrastive=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg.base_steps, cfg.base_lr, cfg.base_steps // 10)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == cfg.base_steps - 1:
            print(f"base step {step + 1}/{cfg.base_steps}: answer cross-entropy {parts['gen'] / groups:.3f}")
    save_model(model, folder)
    write_atomically(folder / "tokenizer.model", (Path(scratch.name) / "tokenizer.model").read_bytes())
    return dict(seed=seed, last_answer_loss=round(parts["gen"] / groups, 4))


# -----------------------------------------------------------------------------
# bases.json: what the bases were built with, and the rows they learned from


def rows_digest(examples):
    """The SHA-256 of a run's base rows (data.Example each): the same digest, the same rows in one order."""
    return hashlib.sha256(json.dumps([asdict(e) for e in examples], ensure_ascii=False).encode()).hexdigest()


def write_manifest(cfg, folder, digest):
    """Write folder/bases.json for the bases built there: their settings, the machine and torch that built
    them (another CPU builds another base), and their rows' digest."""
    settings = {key: getattr(cfg, key) for key in DATA_SETTINGS + BASE_SETTINGS + ("batch_size", "cutoff")}
    built_on = dict(torch=torch.__version__, cpu=torch.backends.cpu.get_cpu_capability(),
                    threads=torch.get_num_threads())
    write_atomically(folder / MANIFEST, json.dumps(dict(settings=settings, built_on=built_on,
                                                        base_rows_sha256=digest), indent=1))


def find_bases(folder):
    """({name: path} of folder's bases in seed order, its bases.json's content): folder holds base<N>/
    folders and bases.json, or is one such base folder."""
    folder = Path(folder)
    if (folder / "config.json").is_file():  # one base of a folder of bases
        bases, manifest = {folder.name: folder}, folder.parent / MANIFEST
    else:
        found = [p for p in folder.glob("base*") if p.name[4:].isdigit() and (p / "config.json").is_file()]
        bases, manifest = {p.name: p for p in sorted(found, key=lambda p: int(p.name[4:]))}, folder / MANIFEST
    if not bases or not manifest.is_file():
        raise FileNotFoundError(f"--bases {folder}: no base<N>/ folders with {MANIFEST} beside them; give "
                                "the shipped examples/toy_bases, one of its bases, or build bases with "
                                "--base-seeds")
    return bases, read_json(manifest)


def check_rows(folder, digest):
    """A ValueError unless this run's base rows (rows_digest) are the ones folder's bases learned from."""
    manifest = find_bases(folder)[1]
    if manifest["base_rows_sha256"] != digest:
        built = " ".join(f"--{k.replace('_', '-')} {manifest['settings'][k]}" for k in DATA_SETTINGS)
        raise ValueError(f"--bases {folder}: its bases learned from other rows than this run's base rows "
                         f"(they were built with {built}, on their own data and templates); give the flags "
                         "they were built with, or train bases for this data with --base-seeds")


# -----------------------------------------------------------------------------
# The unit of replication: a base, or an adapter seed on one base

def plan_units(cfg):
    """[(unit, base folder, adapter seed)]: with several bases each base is a unit, its adapters all with
    the one seed of --seeds; with one base, each seed of --seeds is a unit."""
    seeds = [int(s) for s in cfg.seeds.split(",")]
    if cfg.base_seeds:
        bases = {f"base{s}": Path(cfg.out) / "bases" / f"base{s}" for s in cfg.base_seeds.split(",")}
    else:
        bases = find_bases(cfg.bases)[0]
    if len(bases) > 1 and len(seeds) > 1:
        raise ValueError(f"--seeds {cfg.seeds}: over {len(bases)} bases each base is a unit, and its "
                         "adapters all have one seed; give one seed, or one base")
    if len(bases) > 1:
        return [(name, folder, seeds[0]) for name, folder in bases.items()]
    return [(f"seed{s}", next(iter(bases.values())), s) for s in seeds]


def refuse_mixed(given):
    """A ValueError for a flag given that would do nothing: a base's settings, with bases built already."""
    if given.get("base_seeds") and "bases" in given:
        raise ValueError("--bases and --base-seeds: give one, the bases to load or the seeds of new ones")
    unused = [key for key in BASE_SETTINGS if key in given and not given.get("base_seeds")]
    if unused:
        raise ValueError(f"--{unused[0].replace('_', '-')}: sets how --base-seeds trains a base; the bases "
                         "of --bases were built already (their bases.json says how)")


def over(cfg, units):
    """{unit, over}: what the report's intervals are over, bases or adapter seeds on one base."""
    names = ", ".join(unit for unit, _, _ in units)
    if len({base for _, base, _ in units}) > 1:
        where = "trained here" if cfg.base_seeds else f"in {cfg.bases}"
        return dict(unit="bases", over=f"{len(units)} bases ({names}, {where}), adapter seed {units[0][2]}")
    base = f"{units[0][1]}{', trained here' if cfg.base_seeds else ''}"
    return dict(unit="adapter seeds", over=f"{len(units)} adapter seed{'s' * (len(units) > 1)} ({names}) on "
                f"one base ({base})")
