"""replicate.py: see CoIN work: CoIN against continual instruction tuning, same base, data, steps, seeds.

The paper's experiment at laptop scale, in one command. Each stage's output is kept in --out, and a stage
whose output is there is skipped: an interrupted run continues where it stopped.

  1. data    each task's training rows (one per distinct text), shuffled once, cut into three disjoint parts:
             evaluation (or --eval-dir's), base and adapters; rendered with the templates (prepare_data.py)
  2. base    the "Alpaca stage": a small random LLaMA and a BPE tokenizer, instruction-tuned in full
  3. arms    per seed, two LoRA adapters on that base (coin.py), the same in all but one flag: continual
             instruction tuning (--no-contrastive) and CoIN
  4. scores  each adapter in evaluate.py's rank mode, coin.py's input format: under the prompt file's clean
             and perturbed instructions (never trained on), under three training templates (does the model
             do the task at all?); the hidden-state similarity of perturbed to clean inputs (paper §5.1)
  5. report  report.md, report.json, report.png (comparison.py)

    python replicate.py --out runs/quick      # toy sst2 and cola (examples/toy_glue): ~3 min on 2 cores
    python replicate.py --train-dir ../shared/glue/train --templates ../shared/flan/templates.json \\
        --tasks sst2 --out runs/glue ...      # real GLUE: the README gives the flags (~15 min)
"""
import itertools
import json
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from comparison import ARMS, write_report
from coin import TrainConfig, learning_rate, micro_batch_loss, train
from data import PROMPT_TEMPLATE, ContrastiveDataset, collate, epoch_steps, load_examples
from evaluate import DEFAULT_PROMPTS, EvalConfig, build_input, cell_records, load_prompt_set, plan_cells
from evaluate import predict
from files import read_json, write_atomically
from flags import COUNT, POSITIVE, comma_list_of, opt, parse_flags
from glue import CONTENT, LABELS, example, flan_row, label_id, labelled_rows
from hf_io import load_adapter, load_model, load_tokenizer, save_model
from model import ModelArgs, merge_lora
from prepare_data import build_examples, load_templates, render, write_examples
from report import hidden_report, summarize
from tiny_base import build_tiny_base

TOY = Path(__file__).resolve().parent / "examples" / "toy_glue"  # toy_data.py's tasks, in GLUE's layout
# task -> its template dataset. The prompt file's instructions ask for GLUE's label words, which only these
# tasks' FLAN templates answer with (negative / positive, unacceptable / acceptable; the others: yes / no).
FLAN_NAME = {"sst2": "sst2", "cola": "cola"}
SEEN = "seen template"  # the group of training templates: can the model do the task at all?
SEEDS = (lambda v: all(s.isdigit() for s in v.split(",")) and len(set(v.split(","))) == len(v.split(",")),
         "a comma list of distinct seeds, e.g. 0,1,2")

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
    seeds: str = opt("0,1,2", "one pair of adapters per seed", valid=SEEDS)
    out: str = opt("runs/replicate", "output dir")
    eval_rows: int = opt(60, "rows per task evaluated: held out, or drawn from --eval-dir", valid=COUNT)
    base_rows: int = opt(3000, "rows per task that instruction-tune the base", valid=COUNT)
    tune_groups: int = opt(400, "groups (anchor + hard negative) per task training the adapters", valid=COUNT)
    # The base: a small LLaMA trained in full
    dim: int = opt(128, "model width", valid=COUNT)
    layers: int = opt(2, "decoder layers", valid=COUNT)
    vocab: int = opt(1000, "BPE pieces of the tokenizer trained on the base's rows", valid=COUNT)
    base_steps: int = opt(500, "full-weight steps of the base", valid=COUNT)
    base_lr: float = opt(2e-3, "peak learning rate of the base", valid=POSITIVE)
    batch_size: int = opt(32, "examples per step, base and adapters", valid=COUNT)
    cutoff: int = opt(128, "max tokens per row", valid=COUNT)
    # The adapters; the rest is coin.py's defaults (LoRA r 16, alpha 16 on q, k, v, o; tau 0.05, lambda 1000)
    tune_steps: int = opt(40, "steps of each adapter", valid=COUNT)
    tune_lr: float = opt(1e-3, "peak learning rate of the adapters", valid=POSITIVE)
    eval_batch_size: int = opt(64, "inputs per evaluation batch", valid=COUNT)


def check(cfg):
    """(tasks, seeds, templates, prompt set, rows split): every file, row and name, before any writing."""
    tasks, seeds = cfg.tasks.split(","), [int(s) for s in cfg.seeds.split(",")]
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
    saved = Path(cfg.out) / "replicate.json"
    if saved.is_file() and read_json(saved) != asdict(cfg):
        raise ValueError(f"{saved}: made with other settings; give another --out, or the same flags")
    return tasks, seeds, templates, prompt_set, {task: split_rows(cfg, task) for task in tasks}


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
    random.Random(f"split:{task}").shuffle(order)
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
    """Write eval/<task>.jsonl (GLUE layout), base.jsonl and tune.jsonl (coin.py's data) under folder. Only
    the templates that answer with the label are used: the ones that ask for a text are another task."""
    (folder / "eval").mkdir(parents=True, exist_ok=True)
    sizes = {}
    for t, rows in parts.items():
        write_atomically(folder / "eval" / f"{t}.jsonl", "".join(json.dumps(r) + "\n" for r in rows["eval"]))
        labels = Counter(label_id(t, r["label"], t) for r in rows["eval"])
        sizes[t] = dict({name: len(part) for name, part in rows.items()},
                        eval_majority=100 * max(labels.values()) / len(rows["eval"]))
    answering = {FLAN_NAME[t]: [pair for pair in templates[FLAN_NAME[t]] if pair[1] == "{answer}"]
                 for t in parts}
    for name, per_task in (("base", None), ("tune", cfg.tune_groups)):
        sources = {FLAN_NAME[t]: [flan_row(FLAN_NAME[t], r, t) for r in parts[t][name]] for t in parts}
        write_examples(folder / f"{name}.jsonl", build_examples(answering, sources, per_task, seed=0)[0])
    return sizes


# -----------------------------------------------------------------------------
# 3. The base: a small LLaMA instruction-tuned in full ("Alpaca stage")

def train_base(cfg, data, folder):
    """Train every weight of a random LLaMA on both views of data's examples, with cross-entropy on the
    answers alone (coin.py's generation loss), AdamW, linear warmup and decay; write it and its tokenizer."""
    examples, _ = load_examples(data)
    args = ModelArgs(dim=cfg.dim, n_layers=cfg.layers, n_heads=max(1, cfg.dim // 32), vocab_size=cfg.vocab,
                     intermediate_size=cfg.dim * 8 // 3, norm_eps=1e-5, tie_word_embeddings=True)
    scratch = build_tiny_base(examples, seed=0, args=args)  # random weights, a tokenizer trained on examples
    model, tokenizer = load_model(scratch.name), load_tokenizer(scratch.name)
    dataset = ContrastiveDataset(examples, tokenizer, cfg.cutoff)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.base_lr, weight_decay=0.0)
    windows = (step for epoch in itertools.count()
               for step in epoch_steps(dataset.groups, cfg.batch_size, cfg.batch_size, 0, epoch,
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
    tokenizer_bytes = (Path(scratch.name) / "tokenizer.model").read_bytes()
    write_atomically(folder / "tokenizer.model", lambda tmp: tmp.write_bytes(tokenizer_bytes))
    return dict(last_answer_loss=round(parts["gen"] / groups, 4))


def arm_config(cfg, data, base, seed, arm, out):
    """coin.py's settings of one adapter: the two arms differ in `contrastive` alone."""
    return TrainConfig(data=str(data), base=str(base), out=str(out), max_steps=cfg.tune_steps,
                       batch_size=cfg.batch_size, micro_batch_size=cfg.batch_size, lr=cfg.tune_lr,
                       cutoff=cfg.cutoff, seed=seed, contrastive=arm == "coin", grad_checkpointing=False,
                       device="cpu", dtype="fp32", save_every=20, resume=True)


def train_arm(tune):
    """Train one adapter (coin.py); return its first and last steps' losses and weight (metrics.jsonl)."""
    out = train(tune)  # a signal: coin.py saves, then exits with checkpoints.STOPPED; a rerun continues
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {f"{key}_{end}": steps[i][key] for key in ("gen", "ctr", "weight") for end, i in (("first", 0),
                                                                                              ("last", -1))}


# -----------------------------------------------------------------------------
# 4. Scores: unseen instructions (clean and perturbed), seen templates, hidden states

def seen_records(model, tokenizer, templates, rows, task, ecfg):
    """(cells, records) of the SEEN group: the rows rendered with the first three training templates that
    list the options, in coin.py's format."""
    listing = [t for t in templates[FLAN_NAME[task]] if "{options_}" in t[0] and t[1] == "{answer}"][:3]
    gold = [LABELS[task][label_id(task, r["label"], task)] for r in rows]
    cells, records = {}, {}
    for p, (text, _) in enumerate(listing):
        key = f"{task}/{SEEN}/{p}"
        cells[key] = (task, SEEN, p, text)
        inputs = [PROMPT_TEMPLATE.format(instruction=render(text, flan_row(FLAN_NAME[task], r, task)))
                  for r in rows]
        records[key] = [dict(task=task, group=SEEN, prompt_index=p, idx=i, raw=raw, pred=pred, gold=gold[i])
                        for i, (raw, pred) in enumerate(predict(model, tokenizer, inputs, task, ecfg))]
    return cells, records


def score_arm(cfg, base, adapter, tasks, templates, prompt_set):
    """results.json's content (report.summarize) for one adapter on the evaluation rows build_data wrote,
    plus its hidden-state similarities."""
    eval_dir = Path(cfg.out) / "data" / "eval"
    model, tokenizer = load_model(base), load_tokenizer(base)
    load_adapter(model, adapter)
    merge_lora(model)  # the same scores (tests/test_lora.py), without the adapter's extra matmuls
    ecfg = EvalConfig(mode="rank", format="train", batch_size=cfg.eval_batch_size)
    rows = {t: labelled_rows(eval_dir / f"{t}.jsonl", t) for t in tasks}
    data = {t: [example(t, r, t) for r in rows[t]] for t in tasks}  # [{content, label}], as load_task's
    samples = {t: {g: list(range(len(rows[t]))) for g in prompt_set} for t in tasks}  # every group, every row
    cells, records = {}, {}
    for t in tasks:  # task by task: the seen templates, then the prompt file's groups
        seen_cells, seen = seen_records(model, tokenizer, templates, rows[t], t, ecfg)
        unseen_cells = plan_cells(prompt_set, [t], list(prompt_set))
        cells.update(seen_cells | unseen_cells)
        records.update(seen | {key: cell_records(model, tokenizer, data, samples, cell, ecfg)
                               for key, cell in unseen_cells.items()})
    results = summarize(cells, records, dict(mode="rank", format="train", adapter=str(adapter)))
    first = tasks[0]  # paper §5.1: one task's last-token states, each group's inputs prompt-major
    texts = {g: [build_input(instruction, ex["content"], "train") for t, group, _, instruction
                 in cells.values() if t == first and group == g for ex in data[first]] for g in prompt_set}
    hidden, _ = hidden_report(model, tokenizer, first, texts, len(data[first]), cfg.eval_batch_size, adapter)
    return dict(results, hidden_cosine_to_clean=hidden["cosine_to_clean"], hidden_task=first)


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
    tasks, seeds, templates, prompt_set, parts = check(cfg)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "replicate.json").is_file():
        write_atomically(out / "replicate.json", json.dumps(asdict(cfg), indent=1))
    data, base = out / "data", out / "base"
    sizes = stage(data / "sizes.json", lambda: build_data(cfg, parts, templates, data))
    seconds = dict(data=sizes.pop("seconds"))
    print("rows per task: " + "; ".join(f"{t} {json.dumps(s)}" for t, s in sizes.items()))
    seconds["base"] = stage(base / "done.json", lambda: train_base(cfg, data / "base.jsonl", base))["seconds"]
    scores = {}
    for seed, arm in itertools.product(seeds, ARMS):
        arm_dir = out / f"seed{seed}" / arm
        tune = arm_config(cfg, data / "tune.jsonl", base, seed, arm, arm_dir)
        trained = stage(arm_dir / "trained.json", lambda: train_arm(tune))
        scores[seed, arm] = stage(arm_dir / "scores.json",
                                  lambda: score_arm(cfg, base, arm_dir, tasks, templates, prompt_set))
        scores[seed, arm]["training"] = trained
        seconds[f"seed{seed}/{arm}"] = dict(train=trained["seconds"], score=scores[seed, arm]["seconds"])
    write_report(out, dict(config=asdict(cfg), rows=sizes, seconds=seconds), scores, seeds,
                 time.perf_counter() - started)


def main(argv=None):
    cfg = ReplicateConfig(**parse_flags(ReplicateConfig, argv, "CoIN vs continual instruction tuning"))
    try:
        replicate(cfg)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
