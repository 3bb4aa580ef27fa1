"""evaluate.py: GLUE accuracy under clean and perturbed instructions: CoIN's evaluation (Table 2), exactly.

    cells    (task, group, prompt): 10 GLUE validation sets x the prompt file's groups (clean, deepwordbug,
             textfooler, checklist, semantic) x their instructions (6 each)
    samples  --protocol coin, CoIN's draws: per task, a Random(--seed 42) draws min(300, size) examples for
             each group in turn (clean, deepwordbug, textfooler, checklist, semantic, then the file's others),
             so a task's groups are scored on different examples. --protocol paired: one draw per task,
             shared by its groups, so that groups differ in wording only, not in examples. Saved, reused
    input    instruction + content + "### Response:", CoIN's string: nothing stripped, no space inserted (99
             of the paper's 240 instructions end without one); glue.CONTENT lays out a task's fields
             (--format train: data.PROMPT_TEMPLATE around "{instruction} {content}", what coin.py trains on)
    answer   greedy decoding of at most 7 new tokens, stopping at eos, batched by length into model.generate
             (in fp32 the same tokens as one input at a time, tested; in bf16, padding can flip near-ties)
    parsing  CoIN's: input and answer decoded together, lowercased, rid of "<pad>" and "</s>", split at the
             input; the rest, stripped of STRIP, is the first of glue.ANSWERS[task] it starts with ("1" is
             positive for sst2, "0." entailment for rte), else invalid: wrong, and reported as the invalid
             rate ("not entailment" too)
    score    accuracy per cell; mean and population std over a task x group's prompts, and over all of a
             group's cells (Table 2's Average); categories (Table 1); consistency: the fraction of a group's
             examples predicted alike by all its prompts

Outputs, in --out (default <ckpt>/results): samples.json, predictions.jsonl (a line per example), results.json
(percent) and table.md, rewritten atomically after each cell, where SIGTERM stops (--resume runs the rest).
--mode rank picks the label of highest log-likelihood; --hidden-report TASK compares hidden states to clean's.

    python evaluate.py --ckpt out/ --glue-dir examples/glue_demo
    python evaluate.py --base llama-7b-hf --adapter alpaca-lora-7b --glue-dir glue_data --out runs/alpaca
    python report.py runs/alpaca out/results        # the difference of two results dirs

Data: glue.py. Aggregates, tables and plots: report.py. Several processes: distributed.py. Shape legend: B
rows of a batch, T tokens, K labels, R = B*K rows, M label tokens. Next: read tests/test_evaluate.py.
"""
import json
import random
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

import torch
import torch.nn.functional as F
from tqdm import tqdm

from attack import ATTACKS, attack_set, run_attacks
from checkpoints import until_signal
from data import PROMPT_TEMPLATE
from distributed import World, finish, gather_objects, start as start_world
from files import read_json, read_jsonl, write_atomically
from flags import COUNT, SEED, choose, comma_list_of, opt, parse_flags, up_to
from glue import ANSWERS, LABELS, MNLI_PARTS, TASKS, is_instruction_table, load_task
from hf_io import load_adapter, load_model, load_tokenizer
from model import generate, prefill
from precision import DTYPE_NAMES, DTYPES, resolve_precision
from report import hidden_report, render_tables, summarize
from run_folder import claim, run_base

# -----------------------------------------------------------------------------
# 1. Configuration

DEFAULT_PROMPTS = Path(__file__).resolve().parent / "prompts" / "perturbed.json"  # written by perturb.py
# CoIN's draw order: postprocessing.py's ALL_PERTURB_METHODS, the attacks run_contrastive_llama.py loops over.
DRAW_ORDER = ("clean", "deepwordbug", "textfooler", "checklist", "semantic")
# What CoIN strips off an answer: inference.py's _process_cls_pred literal
# ",._\"\'-+=!?()&^%$#@:\\|\{\}[]<>/`\n\t\r\v\f\u200b " as Python reads it ("\{" is a backslash and a brace).
STRIP = ",._\"'-+=!?()&^%$#@:\\|{}[]<>/`" + "\n\t\r\v\f\u200b "


@dataclass
class EvalConfig:
    # What to evaluate
    ckpt: str = opt("", "coin.py output dir: a peft adapter + config.json whose 'base' names the base model")
    base: str = opt("", "HF LLaMA dir: the checkpoint's base, or a model evaluated alone / with --adapter")
    adapter: str = opt("", "peft LoRA dir to put on --base (e.g. alpaca-lora-7b, the Alpaca baseline)")
    # Protocol (CoIN's PromptBench, §4.3)
    glue_dir: str = opt("", "GLUE download-script layout or <task>.jsonl files; empty: HF `datasets`")
    prompts: str = opt(str(DEFAULT_PROMPTS), "prompt file {group: {task: [instructions]}} (perturb.py's)")
    tasks: str = opt("all", "comma list of tasks")
    groups: str = opt("all", "comma list of the prompt file's groups")
    protocol: str = opt("coin", "coin: CoIN's draws; paired: one draw per task for all groups",
                        choices=("coin", "paired"))
    samples: int = opt(300, "examples per task and group: min(N, size) (CoIN: 300)", valid=COUNT)
    seed: int = opt(42, "seed of the sample draws (CoIN's seed_all(42))", valid=SEED)
    format: str = opt("coin", "coin: CoIN's input; train: coin.py's format", choices=("coin", "train"))
    max_new_tokens: int = opt(7, "greedy tokens per answer (CoIN: 7; not_entailment is 5 LLaMA tokens)",
                              valid=up_to(2048, "LLaMA's context"))
    mode: str = opt("generate", "generate (CoIN's) or rank (label likelihood)", choices=("generate", "rank"))
    # Outputs and the hidden-state report
    out: str = opt("", "results dir (default: <ckpt>/results, or results_rank)")
    resume: bool = opt(False, "skip the cells already complete in the results dir")
    hidden_report: str = opt("", "a task: hidden-state similarity to clean + PCA (paper Fig. 4), no accuracy")
    # Adversarial search against this model (attack.py), instead of scoring
    attack: str = opt("", "comma list of deepwordbug, textfooler, checklist: attack the prompt file's clean "
                          "instructions; writes prompts.json, attack_log.jsonl", valid=comma_list_of(ATTACKS))
    attack_budget: int = opt(200, "scored candidates per attacked instruction", valid=COUNT)
    attack_examples: int = opt(16, "examples scoring a candidate, none of them evaluated", valid=COUNT)
    # Machinery
    batch_size: int = opt(32, "inputs per batch (rank mode: each is one row per label)", valid=COUNT)
    dtype: str = opt("", "weights (default: bf16 on a GPU or bf16 CPU, else fp32)", choices=tuple(DTYPES))
    device: str = opt("", "cuda | cpu (default: cuda when there is a GPU)")


# -----------------------------------------------------------------------------
# 2. Samples: seeded draws per task and group, saved and reused

def draw_indices(protocol, task, size, n, seed, groups):
    """{group: example positions} for each of `groups`, drawn in their order."""
    if protocol == "paired":
        shared = sorted(random.Random(f"{seed}:{task}").sample(range(size), min(n, size)))
        return {group: shared for group in groups}
    # CoIN evaluates one task per process (scripts/eval_contrastive.sh): seed_all(42) seeds Python's `random`
    # (utils/common_utils.py), then each attack's dataload.GLUE(task, 300) keeps the order of random.sample(
    # range(len(data)), min(task_to_cnt[task], 300)) (task_to_cnt: the sizes). Our assumption: nothing else
    # in between draws from Python's `random` (loading and greedy decoding use torch's), so Random(seed)
    # replays it, one draw after another.
    rng = random.Random(seed)
    return {group: rng.sample(range(size), min(n, size)) for group in groups}


def load_or_draw_samples(path, sizes, groups, cfg, save=True):
    """{task: {group: indices}}: those saved in `path`, new draws for the others; saved back if `save`."""
    fresh = {"protocol": cfg.protocol, "seed": cfg.seed, "samples": cfg.samples, "tasks": {}}
    saved = json.loads(path.read_text()) if path.is_file() else fresh
    for flag in ("protocol", "seed", "samples"):
        if saved.get(flag) != fresh[flag]:
            raise ValueError(f"{path}: drawn with --{flag} {saved.get(flag, '(unset)')}; "
                             f"use the same --{flag}, or another --out")
    for task, size in sizes.items():
        entry = saved["tasks"].setdefault(task, {"size": size, "indices": {}})
        if entry["size"] != size:
            raise ValueError(f"{path}: {task} had {entry['size']} examples when drawn, now {size}; "
                             "use another --out")
        drawn = draw_indices(cfg.protocol, task, size, cfg.samples, cfg.seed, groups)
        entry["indices"] = {**drawn, **entry["indices"]}  # the saved draws stay
    if save:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(saved))
    return {task: saved["tasks"][task]["indices"] for task in sizes}


# -----------------------------------------------------------------------------
# 3. Prompts and inputs

def load_prompt_set(path):
    """{group: {task: [instruction, ...]}}, checked for that shape."""
    data = read_json(path)
    if not (isinstance(data, dict) and data and all(map(is_instruction_table, data.values()))):
        raise ValueError(f"{path}: expected {{group: {{task: [instruction, ...]}}}}, perturb.py's format")
    return data


def instructions(prompt_set, group, task):
    table = prompt_set[group]
    key = "mnli" if task in MNLI_PARTS and task not in table else task  # mnli's instructions serve its parts
    if key not in table:
        raise ValueError(f"the prompt file's group {group!r} has no instructions for {task}")
    return table[key]


def build_input(instruction, content, fmt="coin"):
    """The model's input. coin: CoIN's, byte for byte (inference.py's _process_cls_input, zero-shot: nothing
    stripped, no space inserted); train: coin.py's format."""
    if fmt == "coin":
        return instruction + content + "### Response:"
    return PROMPT_TEMPLATE.format(instruction=f"{instruction.strip()} {content}")


# -----------------------------------------------------------------------------
# 4. Predictions: generate and parse, or rank the labels

def parse_answer(task, decoded, input_text, answer):
    """The label word CoIN's _process_cls_pred (inference.py) reads, or None (invalid). decoded: the input
    and answer ids decoded together, as CoIN decodes generate's output; answer: the answer ids alone."""
    text, marker = decoded.lower().replace("<pad>", "").replace("</s>", ""), input_text.lower()
    # CoIN takes text.split(marker)[1]; where decoding does not give the input back it would crash with an
    # IndexError, and we read the answer alone instead.
    text = (text.split(marker)[1] if marker in text else answer.lower()).strip(STRIP)
    return next((LABELS[task][label] for word, label in ANSWERS[task] if text.startswith(word)), None)


def in_length_order(prompts, batch_size, run_batch, on_batch=None):
    """run_batch(prompts) -> one result per prompt, over batches of prompts of similar length (longest first:
    an out-of-memory shows at once), so padding costs little; the results come back in input order."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        for i, result in zip(rows, run_batch([prompts[i] for i in rows])):
            out[i] = result
        if on_batch:
            on_batch(len(rows))
    return out


def generate_batched(model, prompts, batch_size, max_new_tokens, eos_id, pad_id, on_batch=None):
    """Greedy new ids of each prompt (ids), in input order; prompts of similar length share a batch."""
    return in_length_order(prompts, batch_size, lambda batch: generate(model, batch, max_new_tokens, eos_id,
                                                                          pad_id), on_batch)


@torch.no_grad()
def rank_scores(model, prompts, continuations, pad_id):
    """(B, K) log-likelihood of each continuation (ids) after each prompt (ids).

    The prompts run once (model.prefill: their shared prefix once); their cache is copied for each of the K
    continuations, and the R = B*K continuation rows (right-padded to M tokens) run through it. Token j of
    a continuation is predicted by the state before it: the prompt's last one for j = 0, else token j - 1.
    """
    K, M, device = len(continuations), max(map(len, continuations)), model.lm_head.weight.device
    cache, last = prefill(model, prompts, M, pad_id)  # last (B, 1, D)
    cache.repeat_rows(K)  # row b*K + k: prompt b, then continuation k
    ids = torch.tensor([c + [pad_id] * (M - len(c)) for c in continuations] * len(prompts), device=device)
    real = torch.tensor([[j < len(c) for j in range(M)] for c in continuations] * len(prompts), device=device)
    hidden = last.repeat_interleave(K, 0)  # (R, 1, D)
    if M > 1:  # the continuations' own states predict their next tokens: (R, M, D)
        hidden = torch.cat([hidden, model.hidden_states(ids[:, :-1], real[:, :-1].long(), cache)], 1)
    logp = F.log_softmax(model.lm_head(hidden).float(), dim=-1).gather(-1, ids[..., None])[..., 0]  # (R, M)
    return (logp * real).sum(1).view(len(prompts), K).cpu()  # (B, K): pads add nothing


def label_scores(model, tokenizer, prompts, task, batch_size, fmt="coin", on_batch=None):
    """[(K,) log-likelihood of each of the task's label words] per prompt (ids), in length-sorted batches.
    A label is scored as the tokens it is after the input: coin's input ends in "Response:", after which a
    label is a word of its own (encode_word: "▁positive", or " positive" in byte-level BPE); train's ends in
    "Response:\n", after which coin.py trained it as one string with the prompt: no "▁" or space (data.py)."""
    cue = tokenizer.encode(build_input("", "", fmt), bos=False)
    label_ids = [tokenizer.encode(build_input("", "", fmt) + label, bos=False)[len(cue):] if fmt == "train"
                 else tokenizer.encode_word(label) for label in LABELS[task]]
    return in_length_order(prompts, batch_size, lambda batch: rank_scores(model, batch, label_ids,
                                                                           tokenizer.pad_id), on_batch)


def margin_scorer(model, tokenizer, task, examples, cfg):
    """attack.py's score(instructions): per instruction, the mean over `examples` of log p(gold label) minus
    the largest log p of another label, every instruction x example scored in length-sorted batches."""
    def score(texts):
        prompts = [tokenizer.encode(build_input(text, ex["content"], cfg.format)) for text in texts
                   for ex in examples]
        scores = label_scores(model, tokenizer, prompts, task, cfg.batch_size, cfg.format)
        rows = [s.tolist() for s in scores]
        margins = [row[ex["label"]] - max(row[:ex["label"]] + row[ex["label"] + 1:])
                   for row, ex in zip(rows, examples * len(texts))]
        return [mean(margins[i:i + len(examples)]) for i in range(0, len(margins), len(examples))]
    return score


def predict(model, tokenizer, texts, task, cfg, on_batch=None):
    """[(raw, pred)] per input. raw: the decoded answer (generate) or {label: log-likelihood} (rank); pred: a
    label word, or None."""
    labels, prompts = LABELS[task], [tokenizer.encode(t, bos=True) for t in texts]
    if cfg.mode == "generate":
        new = generate_batched(model, prompts, cfg.batch_size, cfg.max_new_tokens, tokenizer.eos_id,
                               tokenizer.pad_id, on_batch)
        raws = [tokenizer.decode(ids) for ids in new]  # decode drops control ids, as skip_special_tokens does
        return [(raw, parse_answer(task, tokenizer.decode(prompt + ids), text, raw))
                for prompt, ids, text, raw in zip(prompts, new, texts, raws)]
    scores = label_scores(model, tokenizer, prompts, task, cfg.batch_size, cfg.format, on_batch)
    return [(dict(zip(labels, s.tolist())), labels[int(s.argmax())]) for s in scores]  # s: (K,)


# -----------------------------------------------------------------------------
# 5. Cells, resume and atomic outputs

def plan_cells(prompt_set, tasks, groups):
    """{"task/group/p": (task, group, p, instruction)} in table order; errors name a group lacking a task."""
    cells = {}
    for task in tasks:
        for group in groups:
            for p, instruction in enumerate(instructions(prompt_set, group, task)):
                cells[f"{task}/{group}/{p}"] = (task, group, p, instruction)
    return cells


def previous_cells(out_dir, protocol, cells, samples):
    """(cells, records) complete in out_dir's earlier run: this plan's unchanged ones, and all other cells."""
    results, preds = out_dir / "results.json", out_dir / "predictions.jsonl"
    if not results.is_file() or not preds.is_file():
        return {}, {}
    old = json.loads(results.read_text())
    changed = [k for k in protocol if old["protocol"].get(k) != protocol[k]]
    if changed:
        raise ValueError(f"{results}: made with {changed[0]}={old['protocol'].get(changed[0])!r}, now "
                         f"{protocol[changed[0]]!r}; --resume needs the same protocol (or another --out)")
    records = defaultdict(list)
    for _, r, _ in read_jsonl(preds):
        records[f"{r['task']}/{r['group']}/{r['prompt_index']}"].append(r)
    kept_cells, kept_records = {}, {}
    for key, c in old["cells"].items():
        cell = (c["task"], c["group"], c["prompt_index"], c["instruction"])
        # A cell of this plan is kept only if its instruction and its examples (in order) are unchanged.
        unchanged = key not in cells or (cells[key] == cell and [r["idx"] for r in records[key]] ==
                                         samples[c["task"]][c["group"]])
        if key in records and unchanged:
            kept_cells[key], kept_records[key] = cell, records[key]
    return kept_cells, kept_records


def cell_records(model, tokenizer, data, samples, cell, cfg, on_batch=None):
    """The prediction records of one cell (task, group, prompt index, instruction), in sample order."""
    task, group, p, instruction = cell
    examples = [data[task][i] for i in samples[task][group]]
    texts = [build_input(instruction, ex["content"], cfg.format) for ex in examples]
    answers = predict(model, tokenizer, texts, task, cfg, on_batch)
    return [dict(task=task, group=group, prompt_index=p, idx=i, raw=raw, pred=pred,
                 gold=LABELS[task][ex["label"]])
            for i, ex, (raw, pred) in zip(samples[task][group], examples, answers)]


def evaluate(model, tokenizer, data, samples, cells, cfg, out_dir, protocol, world=World()):
    """Run every cell not complete yet, writing the outputs after each round; return results.json's content.
    In a round, each process (distributed.py) runs one cell; rank 0 gathers the records and writes them."""
    old_cells, records = previous_cells(out_dir, protocol, cells, samples) if cfg.resume else ({}, {})
    all_cells, todo = {**old_cells, **cells}, [key for key in cells if key not in records]
    total = sum(len(samples[cells[k][0]][cells[k][1]]) for k in todo[world.rank::world.size])
    rounds = until_signal(range(0, len(todo), world.size), world, f"the cells done are in {out_dir}")
    with tqdm(total=total, unit="ex", desc="evaluate", file=sys.stderr, disable=not world.main) as bar:
        for first in rounds:  # the bar is closed before an error's line, not printed again after it
            mine = todo[first:first + world.size][world.rank:world.rank + 1]  # none in a short last round
            new = {k: cell_records(model, tokenizer, data, samples, cells[k], cfg, bar.update) for k in mine}
            for part in gather_objects(new, world):
                records.update(part)
            if world.main:  # after every round: a crash loses one round at most
                write_outputs(out_dir, all_cells, records, protocol)
    return write_outputs(out_dir, all_cells, records, protocol, world.main)


def write_outputs(out_dir, cells, records, protocol, write=True):
    """results.json's content for the cells done; written, with predictions.jsonl and table.md, if write."""
    done = [key for key in cells if key in records]
    results = summarize({k: cells[k] for k in done}, records, protocol)
    if write:
        lines = [json.dumps(r) + "\n" for key in done for r in records[key]]  # cell by cell, in table order
        write_atomically(out_dir / "predictions.jsonl", "".join(lines))
        write_atomically(out_dir / "results.json", json.dumps(results, indent=1))
        write_atomically(out_dir / "table.md", render_tables(results))
    return results


# -----------------------------------------------------------------------------
# 6. Command line

def resolve_paths(cfg):
    """(base dir, adapter dir or None, results dir) from --ckpt / --base / --adapter / --out."""
    leaf = "attacked" if cfg.attack else "results_rank" if cfg.mode == "rank" else "results"
    if not cfg.ckpt:
        if not cfg.base:
            raise ValueError("give --ckpt OUT_DIR, or --base LLAMA_DIR [--adapter PEFT_DIR]")
        name = Path(cfg.adapter or cfg.base).resolve().name
        out_dir = Path(cfg.out or f"runs/eval-{name}/{leaf}")
        return Path(cfg.base), Path(cfg.adapter) if cfg.adapter else None, out_dir
    ckpt = Path(cfg.ckpt)
    if cfg.adapter:
        raise ValueError("give --ckpt or --adapter, not both: a checkpoint's adapter is the one inside it")
    if not ckpt.is_dir():
        raise FileNotFoundError(f"{ckpt}: checkpoint dir not found")
    has_weights = any((ckpt / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin"))
    lacking = [n for n, ok in (("adapter_config.json", (ckpt / "adapter_config.json").is_file()),
                               ("adapter_model.safetensors (or .bin)", has_weights)) if not ok]
    if lacking:
        raise ValueError(f"{ckpt}: no adapter here (it lacks {' and '.join(lacking)}); "
                         "pass coin.py's output dir")
    base = Path(cfg.base) if cfg.base else run_base(ckpt)  # the base coin.py trained on, wherever ckpt is now
    return base, ckpt, Path(cfg.out) if cfg.out else ckpt / leaf


@dataclass(frozen=True)
class Run:
    """What the flags name, resolved and checked before any model loads."""
    base: Path
    adapter: Path | None
    out_dir: Path
    device: str
    dtype: torch.dtype
    prompt_set: dict
    tasks: list
    groups: list
    world: World


def check_flags(cfg):
    """A Run, or a ValueError naming the flag at fault: nothing is loaded or written before this passes."""
    base, adapter, out_dir = resolve_paths(cfg)
    device, dtype = resolve_precision(cfg.device, cfg.dtype)
    world, device = start_world(device)
    if (cfg.hidden_report or cfg.attack) and world.size > 1:
        raise ValueError("--hidden-report and --attack run in one process: use python, not torchrun")
    prompt_set = load_prompt_set(cfg.prompts)
    tasks = choose(cfg.hidden_report or cfg.tasks, TASKS, "task")
    groups = choose("clean" if cfg.attack else cfg.groups, prompt_set, "group")  # attacks start from clean
    if cfg.hidden_report and len(tasks) != 1:
        raise ValueError(f"--hidden-report {cfg.hidden_report}: name one task")
    if cfg.hidden_report and "clean" not in groups:
        raise ValueError("--hidden-report compares each group with 'clean': include it in --groups")
    plan_cells(prompt_set, tasks, groups)  # every (group, task) has instructions, or an error now
    return Run(base, adapter, out_dir, device, dtype, prompt_set, tasks, groups, world)


def protocol_of(cfg, run):
    """What the predictions depend on: --resume refuses to mix runs that differ in any of these."""
    return dict(mode=cfg.mode, protocol=cfg.protocol, format=cfg.format, seed=cfg.seed, samples=cfg.samples,
                max_new_tokens=cfg.max_new_tokens, dtype=DTYPE_NAMES[run.dtype], base=str(run.base.resolve()),
                adapter=str(run.adapter.resolve()) if run.adapter else None,
                glue_dir=str(Path(cfg.glue_dir).resolve()) if cfg.glue_dir else "hf:glue")


def main(argv=None):
    cfg = EvalConfig(**parse_flags(EvalConfig, argv,
                                   "GLUE robustness evaluation under perturbed instructions"))
    try:
        run = check_flags(cfg)
        with claim(run.out_dir, run.world.main, "the results written before it are kept"):  # one process
            data = {task: load_task(task, cfg.glue_dir) for task in run.tasks}
            model, tokenizer = load_model(run.base, run.dtype, run.device), load_tokenizer(run.base)
            if run.adapter:
                load_adapter(model, run.adapter)
            sizes = {task: len(data[task]) for task in run.tasks}
            # All groups are drawn in CoIN's order, whatever --groups picks: a subset sees a full run's draws.
            groups = list(dict.fromkeys(DRAW_ORDER + tuple(run.prompt_set)))
            samples = load_or_draw_samples(run.out_dir / "samples.json", sizes, groups, cfg,
                                           save=not cfg.attack)
            cells = plan_cells(run.prompt_set, run.tasks, run.groups)
            if cfg.hidden_report:  # every group on clean's examples: example i pairs with clean's example i
                task, texts = run.tasks[0], defaultdict(list)  # group -> its inputs, prompt-major
                examples = [data[task][i] for i in samples[task]["clean"]]
                for _, group, _, instruction in cells.values():
                    texts[group] += [build_input(instruction, ex["content"], cfg.format) for ex in examples]
                hidden_report(model, tokenizer, task, dict(texts), len(examples), cfg.batch_size, run.out_dir)
                return
            if cfg.attack:  # each task's attack set: examples that clean and the attacks are not scored on
                kinds = cfg.attack.split(",")
                clean = {t: instructions(run.prompt_set, "clean", t) for t in run.tasks}
                sets = {t: attack_set(data[t], samples[t], kinds, cfg.attack_examples, cfg.seed)
                        for t in run.tasks}  # all checked before the first search starts
                return run_attacks(kinds, clean, lambda t: margin_scorer(model, tokenizer, t, sets[t], cfg),
                                   run.out_dir, cfg.attack_budget, cfg.seed)
            results = evaluate(model, tokenizer, data, samples, cells, cfg, run.out_dir,
                               protocol_of(cfg, run), run.world)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(render_tables(results, per_prompt=False))
    print(f"wrote {run.out_dir}/predictions.jsonl, results.json and table.md (with a row per prompt)")
    finish(run.world)


if __name__ == "__main__":
    main()
