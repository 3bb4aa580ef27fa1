"""comparison.py: replicate.py's report: every arm against continual instruction tuning, over the units.

A support module, read after replicate.py, which gives it one results.json content (scoring.score_adapter)
per unit and arm, with the arm's training diagnostics (diagnostics.ends). A unit is a base (each arm's
adapter on each of several bases, one adapter seed) or an adapter seed (one base). What it writes to the
run's folder and prints:

    per arm, group and task   accuracy mean and population std over the prompts, each unit's, then averaged
                              over the units; a group's row pools its tasks (Table 2's Average)
    arm - continual           per unit, the difference of a group's pooled mean accuracy (and of its std);
                              their mean over the units and a 95% Student-t interval (with one unit, none)
    consistency               the share of a group's examples that all its prompts answer alike
    hidden similarity         paper §5.1: the mean cosine of the last-token states under each perturbed
                              group's prompts to those under the clean ones, same prompt index and example
    diagnostics               does the arm's contrastive term act? Its share of the loss, the cosine margin
                              and the share of groups whose weight hit lambda, each the mean over the first
                              and over the last tenth of the steps (diagnostics.py); and L_gen, L_ctr, weight
    per unit                  each unit's accuracies and diagnostics, arm by arm: does the reading hold on
                              each base (or adapter seed)?

report.md (for people), report.json (for programs) and report.png (with matplotlib, an optional extra).
"""
import json
import math
from statistics import mean, stdev

from files import write_atomically
from plots import save_arms_plot
from report import markdown_table

BASELINE = "continual"  # the arm every other arm is compared with: no contrastive term
# report.json's diagnostics -> the key diagnostics.ends summarizes (metrics.jsonl's)
DIAGNOSTICS = dict(contrastive_share="contrastive_share", cosine_margin="cos_margin",
                   weight_capped="weight_capped")
# Student's t 0.975 quantiles by degrees of freedom (units - 1); beyond 30 the normal's 1.96 is near enough.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def interval(values):
    """{mean, ci95: [low, high] or None, per_unit} of per-unit values: a t interval over the units."""
    m = mean(values)
    if len(values) < 2:
        return dict(mean=m, ci95=None, per_unit=values)
    half = (T975[len(values) - 2] if len(values) <= 31 else 1.96) * stdev(values) / math.sqrt(len(values))
    return dict(mean=m, ci95=[m - half, m + half], per_unit=values)


def arm_summary(runs, groups, tasks):
    """One arm's results over its units' runs: accuracies, consistency, hidden similarity, training."""
    first = runs[0]
    training = {k: mean(r["training"][k] for r in runs) for k in first["training"] if k != "seconds"}
    return dict(
        groups={g: {k: mean(r["averages"]["pooled"][g][k] for r in runs) for k in ("mean", "std")}
                for g in groups},
        tasks={t: {g: {k: mean(r["summary"][t][g][k] for r in runs) for k in ("mean", "std")} for g in groups}
               for t in tasks},
        consistency={g: mean(mean(r["consistency"][t][g] for t in tasks) for r in runs) for g in groups},
        hidden_cosine_to_clean={g: mean(r["hidden_cosine_to_clean"][g] for r in runs)
                                for g in first["hidden_cosine_to_clean"]},
        training=training, diagnostics={f"{name}_{end}": training[f"{key}_{end}"]
                                        for name, key in DIAGNOSTICS.items() for end in ("first", "last")})


def combine(scores, units, arms):
    """report.json's content from {(unit, arm): results}: per arm (with its flags) the unit-averaged
    accuracies, consistency, hidden similarity and diagnostics; per other arm, group (and task) the paired
    differences arm - continual; per unit and arm, its accuracies and diagnostics."""
    first = scores[units[0], BASELINE]
    groups, tasks = list(first["averages"]["pooled"]), list(first["summary"])  # in table order
    summaries = {arm: dict(flags=flags, **arm_summary([scores[u, arm] for u in units], groups, tasks))
                 for arm, flags in arms.items()}
    per_unit = {u: {arm: dict(groups={g: scores[u, arm]["averages"]["pooled"][g]["mean"] for g in groups},
                              diagnostics=arm_summary([scores[u, arm]], groups, tasks)["diagnostics"])
                    for arm in arms} for u in units}

    def paired(arm, pick):  # arm - continual of pick(results), per unit, with its interval
        return interval([pick(scores[u, arm]) - pick(scores[u, BASELINE]) for u in units])
    others = [arm for arm in arms if arm != BASELINE]
    difference = {arm: {g: {k: paired(arm, lambda r: r["averages"]["pooled"][g][k]) for k in ("mean", "std")}
                        for g in groups} for arm in others}
    by_task = {arm: {t: {g: paired(arm, lambda r: r["summary"][t][g]["mean"]) for g in groups} for t in tasks}
               for arm in others}
    return dict(units=units, tasks=tasks, groups=groups, hidden_task=first["hidden_task"], arms=summaries,
                minus_continual=difference, minus_continual_by_task=by_task, per_unit=per_unit)


# -----------------------------------------------------------------------------
# report.md

def signed(value, ci):
    return f"{value:+.1f}" + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "")


def first_last(diagnostics, name, spec):
    return f"{diagnostics[name + '_first']:{spec}} -> {diagnostics[name + '_last']:{spec}}"


def arms_table(report):
    """A row per arm: its flags and what its training did, first -> last tenth of the steps."""
    rows = [[arm, f"`{flags_text(a['flags'])}`"]
            + [first_last(a["diagnostics"], name, ".3f") for name in ("contrastive_share", "cosine_margin")]
            + [first_last(a["diagnostics"], "weight_capped", ".2f"), first_last(a["training"], "gen", ".3g"),
               first_last(a["training"], "ctr", ".3g")] for arm, a in report["arms"].items()]
    return markdown_table(["arm", "coin.py flags", "contrastive share", "cosine margin", "groups at lambda",
                           "L_gen", "L_ctr"], rows)


def flags_text(flags):
    """An arm's coin.py flags (parse_flags's dict) as a command line."""
    words = []
    for key, value in flags.items():
        name = key.replace("_", "-")
        words.append(f"--{name}" if value is True else f"--no-{name}" if value is False
                     else f"--{name} {value:g}" if isinstance(value, float) else f"--{name} {value}")
    return " ".join(words) or "(coin.py's defaults)"


def group_table(report, g):
    """A row per arm under group g: accuracy, its difference to continual, consistency, hidden similarity,
    and the arm's diagnostics beside them."""
    rows = []
    for arm, a in report["arms"].items():
        diff = report["minus_continual"].get(arm, {}).get(g)
        cos = a["hidden_cosine_to_clean"].get(g)
        rows.append([arm, f"{a['groups'][g]['mean']:.1f} ± {a['groups'][g]['std']:.1f}",
                     signed(diff["mean"]["mean"], diff["mean"]["ci95"]) if diff else "-",
                     signed(diff["std"]["mean"], diff["std"]["ci95"]) if diff else "-",
                     f"{a['consistency'][g]:.1f}", "-" if cos is None else f"{cos:.3f}",
                     first_last(a["diagnostics"], "contrastive_share", ".3f"),
                     first_last(a["diagnostics"], "cosine_margin", ".3f")])
    return markdown_table(["arm", "accuracy", f"- {BASELINE} [95% CI]", f"std: - {BASELINE}", "consistency",
                           f"hidden cos to clean, {report['hidden_task']}", "contrastive share",
                           "cosine margin"], rows)


def unit_table(report):
    """A row per unit and arm: its accuracy per group (pooled over tasks), and what its training did."""
    rows = [[unit, arm] + [f"{a['groups'][g]:.1f}" for g in report["groups"]]
            + [first_last(a["diagnostics"], name, spec) for name, spec in
               (("contrastive_share", ".3f"), ("cosine_margin", ".3f"), ("weight_capped", ".2f"))]
            for unit, arms in report["per_unit"].items() for arm, a in arms.items()]
    return markdown_table(["unit", "arm"] + report["groups"]
                          + ["contrastive share", "cosine margin", "groups at lambda"], rows)


def tables(report):
    """report.md's tables: the arms, one table per group (pooled over tasks), accuracy per task, then each
    unit's accuracy and diagnostics."""
    per_task = [[t, arm] + [f"{a['tasks'][t][g]['mean']:.1f}" for g in report["groups"]]
                for t in report["tasks"] for arm, a in report["arms"].items()]
    return "\n".join(["## Arms (training: first -> last tenth of the steps)", "", arms_table(report)]
                     + [f"## {g}\n\n{group_table(report, g)}" for g in report["groups"]]
                     + ["## Accuracy per task", "", markdown_table(["task", "arm"] + report["groups"],
                                                                  per_task),
                        f"## Per unit: each of the {report['unit']}", "", unit_table(report)])


def time_line(seconds):
    """What the run's stages took (their seconds, kept in each stage's JSON), so that a rerun that only
    rewrites the report still says what the run cost."""
    arms = [s for key, s in seconds.items() if "/" in key]
    span = lambda k: f"{min(s[k] for s in arms):.0f} to {max(s[k] for s in arms):.0f} s"  # noqa: E731
    bases = sum(seconds["bases"].values())  # none when the bases were shipped
    total = seconds["data"] + bases + sum(s["train"] + s["score"] for s in arms)
    return (f"Stages {total / 60:.1f} min: data {seconds['data']:.0f} s, bases trained here {bases:.0f} s, "
            f"{len(arms)} adapters {span('train')} each to train and {span('score')} to score.")


def write_report(out, setup, scores, units, arms, wall_s):
    """Write report.json, report.md and report.png (when matplotlib is there) to out; print report.md.
    setup's `over` says what the units are (replicate.over), its `unit` names them (bases, adapter seeds)."""
    report = dict(setup, **combine(scores, units, arms), wall_s=round(wall_s))
    write_atomically(out / "report.json", json.dumps(report, indent=1))
    png = save_arms_plot(report, out / "report.png")
    majority = ", ".join(f"{t} {setup['rows'][t]['eval_majority']:.1f}%" for t in report["tasks"])
    text = (f"# CoIN's arms against continual instruction tuning\n\nOver {setup['over']}: accuracy in % on "
            f"the held-out rows (majority class: {majority}), rank mode; mean ± std over prompts, averaged "
            f"over the {setup['unit']}; differences paired by unit, 95% t intervals over the units. "
            f"{time_line(setup['seconds'])} This run: {wall_s / 60:.1f} min."
            f"\n\n{tables(report)}\n"
            + (f"Plot: {png.name}\n" if png else "No plot: pip install matplotlib to get report.png\n"))
    write_atomically(out / "report.md", text)
    print(text + f"\nwrote {out / 'report.md'} and {out / 'report.json'}")
    return report
