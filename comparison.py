"""comparison.py: replicate.py's report: CoIN against continual instruction tuning, over seeds.

A support module, read after replicate.py, which gives it one results.json content (report.summarize) per
seed and arm. What it writes to the run's folder and prints:

    per arm, group and task   accuracy mean and population std over the prompts, each seed's, then averaged
                              over the seeds; a group's row pools its tasks (Table 2's Average)
    CoIN - continual          per seed, the difference of a group's pooled mean accuracy (and of its std);
                              their mean over the seeds and a 95% Student-t interval (with one seed, none)
    consistency               the share of a group's examples that all its prompts answer alike
    training                  each arm's first and last step's L_gen (and CoIN's L_ctr and weight)
    hidden similarity         paper §5.1: the mean cosine of the last-token states under each perturbed
                              group's prompts to those under the clean ones, same prompt index and example

report.md (for people), report.json (for programs) and report.png (with matplotlib, an optional extra).
"""
import json
import math
from statistics import mean, stdev

from files import write_atomically
from plots import pyplot, save_figure
from report import markdown_table

ARMS = ("continual", "coin")
# Student's t 0.975 quantiles by degrees of freedom (seeds - 1); beyond 30 the normal's 1.96 is near enough.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def interval(values):
    """{mean, ci95: [low, high] or None, per_seed} of per-seed values: a t interval over the seeds."""
    m = mean(values)
    if len(values) < 2:
        return dict(mean=m, ci95=None, per_seed=values)
    half = (T975[len(values) - 2] if len(values) <= 31 else 1.96) * stdev(values) / math.sqrt(len(values))
    return dict(mean=m, ci95=[m - half, m + half], per_seed=values)


def combine(scores, seeds):
    """report.json's content from {(seed, arm): results}: per arm the seed-averaged accuracies, consistency
    and hidden similarity; per group the paired differences CoIN - continual."""
    first = scores[seeds[0], ARMS[0]]
    groups, tasks = list(first["averages"]["pooled"]), list(first["summary"])  # in table order
    arms = {}
    for arm in ARMS:
        runs = [scores[s, arm] for s in seeds]
        arms[arm] = dict(
            groups={g: {k: mean(r["averages"]["pooled"][g][k] for r in runs) for k in ("mean", "std")}
                    for g in groups},
            tasks={t: {g: {k: mean(r["summary"][t][g][k] for r in runs) for k in ("mean", "std")}
                       for g in groups} for t in tasks},
            consistency={g: mean(mean(r["consistency"][t][g] for t in tasks) for r in runs) for g in groups},
            hidden_cosine_to_clean={g: mean(r["hidden_cosine_to_clean"][g] for r in runs)
                                    for g in first["hidden_cosine_to_clean"]},
            training={k: mean(r["training"][k] for r in runs) for k in first["training"] if k != "seconds"})

    def paired(pick):  # CoIN - continual of pick(results), per seed, with its interval
        return interval([pick(scores[s, "coin"]) - pick(scores[s, "continual"]) for s in seeds])
    difference = {g: {k: paired(lambda r: r["averages"]["pooled"][g][k]) for k in ("mean", "std")}
                  for g in groups}
    by_task = {t: {g: paired(lambda r: r["summary"][t][g]["mean"]) for g in groups} for t in tasks}
    return dict(seeds=seeds, tasks=tasks, groups=groups, hidden_task=first["hidden_task"], arms=arms,
                coin_minus_continual=difference, coin_minus_continual_by_task=by_task)


def signed(value, ci):
    return f"{value:+.1f}" + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "")


def tables(report):
    """The markdown tables: per group (pooled over tasks), then per task."""
    arms, diff = report["arms"], report["coin_minus_continual"]
    rows = []
    for g in report["groups"]:
        cos = [arms[a]["hidden_cosine_to_clean"].get(g) for a in ARMS]
        rows.append([g] + [f"{arms[a]['groups'][g]['mean']:.1f} ± {arms[a]['groups'][g]['std']:.1f}"
                           for a in ARMS]
                    + [signed(diff[g]["mean"]["mean"], diff[g]["mean"]["ci95"]),
                       signed(diff[g]["std"]["mean"], diff[g]["std"]["ci95"]),
                       " / ".join(f"{arms[a]['consistency'][g]:.1f}" for a in ARMS),
                       " / ".join("-" if c is None else f"{c:.3f}" for c in cos)])
    header = ["group", "continual", "CoIN", "CoIN - continual [95% CI]", "std: CoIN - continual",
              "consistency (cont. / CoIN)", f"hidden cos to clean, {report['hidden_task']} (cont. / CoIN)"]
    per_task = [[t] + [" / ".join(f"{arms[a]['tasks'][t][g]['mean']:.1f}" for a in ARMS)
                       for g in report["groups"]] for t in report["tasks"]]
    return (markdown_table(header, rows) + "\n\nPer task, accuracy (continual / CoIN):\n\n"
            + markdown_table(["task"] + report["groups"], per_task))


def save_plot(report, path):
    """report.png: per group, both arms' accuracy with the std over prompts as error bars; None without
    matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    groups, arms = report["groups"], report["arms"]
    fig, ax = plt.subplots(figsize=(1.5 + 1.3 * len(groups), 4))
    for k, arm in enumerate(ARMS):  # two bars a group, side by side
        bars = [arms[arm]["groups"][g] for g in groups]
        ax.bar([i + (k - 0.5) * 0.38 for i in range(len(groups))], [b["mean"] for b in bars], 0.38,
               yerr=[b["std"] for b in bars], capsize=3, label=arm)
    ax.set_xticks(range(len(groups)), groups, rotation=20)
    ax.set(ylabel="accuracy (%)", title=f"CoIN vs continual tuning, mean over {len(report['seeds'])} seeds")
    ax.legend()
    return save_figure(plt, fig, path)


def training_line(report):
    """What the two arms' training did: first and last step's losses, mean over the seeds."""
    cont, coin = (report["arms"][arm]["training"] for arm in ARMS)
    return (f"Training, first -> last step, mean over seeds: L_gen {cont['gen_first']:.3f} -> "
            f"{cont['gen_last']:.3f} (continual), {coin['gen_first']:.3f} -> {coin['gen_last']:.3f} (CoIN); "
            f"CoIN's L_ctr {coin['ctr_first']:.2e} -> {coin['ctr_last']:.2e}, its weight "
            f"{coin['weight_first']:.0f} -> {coin['weight_last']:.0f}.")


def write_report(out, setup, scores, seeds, wall_s):
    """Write report.json, report.md and report.png (when matplotlib is there) to out; print report.md."""
    report = dict(setup, **combine(scores, seeds), wall_s=round(wall_s))
    write_atomically(out / "report.json", json.dumps(report, indent=1))
    png = save_plot(report, out / "report.png")
    majority = ", ".join(f"{t} {setup['rows'][t]['eval_majority']:.1f}%" for t in report["tasks"])
    text = (f"# CoIN vs continual instruction tuning\n\nSeeds {', '.join(map(str, seeds))}; accuracy in % on "
            f"the held-out rows (majority class: {majority}), rank mode; mean ± std over prompts, averaged "
            f"over seeds. Wall time {wall_s / 60:.1f} min.\n\n{tables(report)}\n\n{training_line(report)}\n\n"
            + (f"Plot: {png.name}\n" if png else "No plot: pip install matplotlib to get report.png\n"))
    write_atomically(out / "report.md", text)
    print(text + f"\nwrote {out / 'report.md'} and {out / 'report.json'}")
    return report
