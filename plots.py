"""plots.py: the figures, drawn with matplotlib when it is installed (an optional extra, never required).

A support module: each function takes numbers another module computed and writes one PNG atomically, or
returns None without matplotlib, so a run never fails for want of a plot.

    save_box_plot        evaluate.py's results: a box per group over its cells (report.py)
    save_scatter         the hidden-state PCA of each group (report.hidden_report, paper Fig. 4)
    save_training_plot   a training run's losses, diagnostics and learning rate against the step
                         (diagnostics.py, `python report.py OUT`)
    save_arms_plot       replicate.py's arms: accuracy per group, and each arm's diagnostics (comparison.py)
"""
from collections import defaultdict

import numpy as np

from files import write_atomically


def pyplot():
    """matplotlib.pyplot drawing to files, or None: matplotlib is an optional dependency."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(plt, fig, path):
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=150))
    plt.close(fig)
    return path


def save_box_plot(results, path):
    """accuracy_boxplot.png: a box per group over its cells' accuracies (every task x prompt), or None
    without matplotlib."""
    plt, by_group = pyplot(), defaultdict(list)
    if plt is None:
        return None
    for cell in results["cells"].values():
        by_group[cell["group"]].append(cell["accuracy"])
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(by_group), 4))
    ax.boxplot(list(by_group.values()))
    ax.set_xticks(range(1, len(by_group) + 1), list(by_group))  # boxplot's labels= is gone in matplotlib 3.11
    ax.set(ylabel="accuracy (%)", title="accuracy over each group's prompts and tasks")
    return save_figure(plt, fig, path)


def save_scatter(pca, title, path):
    """hidden_pca.png, or None without matplotlib (an optional dependency)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 6))
    for g, points in pca.items():
        ax.scatter(*np.array(points).T, s=6, alpha=0.6, label=g)
    ax.set(title=title, xlabel="PC 1", ylabel="PC 2")
    ax.legend()
    return save_figure(plt, fig, path)


# (title, metrics.jsonl keys, log scale): the panels of training.png; w * L_ctr is loss - gen
PANELS = (("losses per group", ("loss", "gen", "ctr", "w*ctr"), True),
          ("does the term act?", ("contrastive_share", "weight_capped"), False),
          ("cosines the InfoNCE sees", ("cos_positive", "cos_negative", "cos_margin"), False),
          ("learning rate", ("lr",), False))


def save_training_plot(records, path):
    """training.png: PANELS against the step; None without matplotlib (an optional extra)."""
    plt = pyplot()
    if plt is None:
        return None
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (title, keys, log) in zip(axes.flat, PANELS):
        for key in keys:
            values = [r["loss"] - r["gen"] if key == "w*ctr" else r[key] for r in records]
            if any(values):  # continual tuning logs no L_ctr: nothing to draw
                ax.plot(steps, values, label=key)
        if log:
            ax.set_yscale("log", nonpositive="mask")
        ax.set(title=title, xlabel="step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(plt, fig, path)


def save_arms_plot(report, path):
    """report.png of replicate.py (comparison.py): per group, each arm's accuracy (error bars: the std over
    prompts), and each arm's difference to continual (error bars: the 95% interval over the units: bases or
    adapter seeds); beside them, each arm's contrastive share and cosine margin over the first and the last
    tenth of its steps. None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    groups, arms = report["groups"], report["arms"]
    width, names = 0.8 / len(arms), [f"{d}_{end}" for d in ("contrastive_share", "cosine_margin")
                                     for end in ("first", "last")]
    fig = plt.figure(figsize=(max(10, 1.2 * len(groups) * len(arms) ** 0.5), 8))
    acc, diff, diag = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 2, 3), fig.add_subplot(2, 2, 4)
    for k, (arm, a) in enumerate(arms.items()):
        style = dict(color=f"C{k % 10}", label=arm)  # an arm's colour, the same in every panel
        offset = (k - (len(arms) - 1) / 2) * width  # the arm's bar beside the others, in every panel
        x = [i + offset for i in range(len(groups))]
        acc.bar(x, [a["groups"][g]["mean"] for g in groups], width, capsize=2,
                yerr=[a["groups"][g]["std"] for g in groups], **style)
        if arm in report["minus_continual"]:
            d = [report["minus_continual"][arm][g]["mean"] for g in groups]  # {mean, ci95 or None}
            half = [v["ci95"][1] - v["mean"] if v["ci95"] else 0 for v in d]  # t intervals are symmetric
            diff.errorbar(x, [v["mean"] for v in d], yerr=half, fmt="o", capsize=2, **style)
        diag.bar([i + offset for i in range(len(names))],
                 [a["diagnostics"][n] for n in names], width, **style)
    for ax, title in ((acc, "accuracy (%)"), (diff, "minus continual (points)")):
        ax.set_xticks(range(len(groups)), groups, rotation=20)
        ax.set(title=f"{title}, mean over {len(report['units'])} {report['unit']}")
    diff.axhline(0, color="grey", lw=0.8)
    diag.set_xticks(range(4), ["share, first", "share, last", "margin, first", "margin, last"], rotation=20)
    diag.set(title="is the contrastive term active?")
    acc.legend(fontsize=7, ncol=min(len(arms), 6))
    fig.tight_layout()
    return save_figure(plt, fig, path)
