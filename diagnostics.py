"""diagnostics.py: does CoIN's contrastive term act? What each training step logs, and a run's curves.

A support module, read beside coin.py's training loop. The weight rule w = min(lambda, L_gen / L_ctr) makes
the term's value at most the generation loss's, but it can also make it nothing: when the pooled states of
an anchor and its positive are already far closer than its negatives, L_ctr is ~1e-6, w sits at the cap
lambda, and w * L_ctr is a rounding error beside L_gen. Three numbers tell which case a run is in, from its
first steps, at no cost beyond what the loss computes anyway:

    contrastive_share   w * L_ctr / (L_gen + w * L_ctr) over the step's groups: 0.5 when the term is as
                        large as the generation loss (the most the rule allows), ~0 when it is inert
    weight_capped       the share of the step's groups whose weight hit lambda
    cos_positive,       the mean cosine of each anchor (either view, to the other view's states) to its
    cos_negative,       positive and to its hardest (most similar) negative, and their difference: the margin
    cos_margin          the InfoNCE sees. A wide margin at step 1 means the task is solved before training

Each is in metrics.jsonl (a line per step) and on the progress bar. `python report.py OUT` prints a run's
first and last steps and draws training.png (losses, the diagnostics and the learning rate against the step)
when matplotlib is installed.
"""
from pathlib import Path
from statistics import mean

import torch

from data import IGNORE_INDEX
from files import read_jsonl
from plots import save_training_plot

# What micro_batch_loss sums over a micro-batch's groups (losses, weights, capped weights) or examples
# (cosines); train_step adds them up over the step and the processes.
SUMMED = ("loss", "gen", "ctr", "weight", "capped", "cos_positive", "cos_negative")
# The progress bar: its name -> the metrics.jsonl key
PROGRESS = dict(loss="loss", gen="gen", ctr="ctr", share="contrastive_share", margin="cos_margin",
                capped="weight_capped", lr="lr", tok_s="real_tokens_per_s")


def cosine_sums(sim_ab, sim_ba, labels, temperature):
    """{cos_positive, cos_negative}: over a micro-batch's B examples, the sum of the cosine of each anchor to
    its positive and to its hardest negative, averaged over the two directions. sim_ab, sim_ba (B, N):
    cosine / temperature, -inf where a column is no candidate; labels (B,): each row's positive column."""
    cosines = torch.cat([sim_ab, sim_ba]).detach() * temperature  # (2B, N)
    positive = labels.repeat(2)[:, None]  # (2B, 1)
    hardest = cosines.scatter(1, positive, float("-inf")).amax(1)  # (2B,): the positive left out
    return dict(cos_positive=cosines.gather(1, positive).sum().item() / 2,
                cos_negative=hardest.sum().item() / 2)


def step_counts(batches, within_groups, processes=1):
    """What a process's micro-batches of a step held, as sums that processes can add up: examples, their
    negatives and hard negatives, supervised, real and padding tokens. With --negatives batch, an anchor's
    negatives are every other row of the micro-batches the processes run side by side."""
    partners = torch.cat([torch.bincount(b["group_index"])[b["group_index"]] - 1 for b in batches])  # (N,)
    sizes = [len(b["ids"]) for b in batches]
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    others = sum(n * (n * processes - 1) for n in sizes)  # each row's, among all rows run side by side
    return dict(examples=len(partners), hard_negatives=int(partners.sum()),
                negatives=int(partners.sum()) if within_groups else others,
                supervised_tokens=sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches),
                real_tokens=real, padded_tokens=sum(b["computed_tokens"] for b in batches) - real)


def step_record(totals, step_groups, world_size, seconds, **extra):
    """metrics.jsonl's line for one step from `totals`, the step's sums over its micro-batches and processes
    (SUMMED and step_counts): losses and weights per group, cosines per example, the shares."""
    examples = totals["examples"]
    record = {key: totals.pop(key) / step_groups for key in ("loss", "gen", "ctr", "weight")}
    positive, negative = (totals.pop(key) / examples for key in ("cos_positive", "cos_negative"))
    return dict(record, contrastive_share=(record["loss"] - record["gen"]) / record["loss"] if record["loss"]
                else 0.0, weight_capped=totals.pop("capped") / step_groups, cos_positive=positive,
                cos_negative=negative, cos_margin=positive - negative, **extra, groups=step_groups,
                negatives_per_anchor=totals.pop("negatives") / examples, world_size=world_size,
                examples_per_process=examples / world_size,
                hard_negatives_per_anchor=totals.pop("hard_negatives") / examples, **totals,
                real_tokens_per_s=round(totals["real_tokens"] / seconds))


# -----------------------------------------------------------------------------
# A run's curves: python report.py OUT

def read_metrics(out):
    """The step records of out/metrics.jsonl, in order; a bad line is a ValueError naming path:line."""
    path, records = Path(out) / "metrics.jsonl", []
    for lineno, record, error in read_jsonl(path):
        if error:
            raise ValueError(f"{path}:{lineno}: not a JSON line ({error}); delete the line or rerun")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no step logged yet")
    return records


TRACKED = ("gen", "ctr", "weight", "contrastive_share", "weight_capped", "cos_margin")  # ends(): replicate.py


def ends(records, keys=TRACKED):
    """{key_first, key_last}: each key's mean over the first and over the last tenth of the steps (at least
    one step each): one step alone is noisy (a batch of easy or hard groups)."""
    n = max(1, len(records) // 10)
    return {f"{key}_{end}": mean(r[key] for r in part) for key in keys
            for end, part in (("first", records[:n]), ("last", records[-n:]))}


SHOWN = ("loss", "gen", "ctr", "weight", "contrastive_share", "weight_capped", "cos_positive", "cos_negative",
         "cos_margin", "lr")  # the rows of the printed summary


def training_table(records):
    """Markdown: the first and last logged step's losses, weight and diagnostics."""
    first, last = records[0], records[-1]
    rows = [f"| {key} | {first[key]:.4g} | {last[key]:.4g} |" for key in SHOWN if key in first]
    return "\n".join([f"| | step {first['step']} | step {last['step']} |", "|---|---|---|", *rows]) + "\n"


def training_report(out):
    """Print the run's first and last steps (training_table) and write out/training.png."""
    records = read_metrics(out)
    png = save_training_plot(records, Path(out) / "training.png")
    print(training_table(records) + (f"\nwrote {png}" if png else "\nno plot: pip install matplotlib to get "
                                     "training.png"))
    return records
