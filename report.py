"""report.py: evaluate.py's results as the paper shows them: tables, a comparison of two runs, hidden states.

A support module, read after evaluate.py, whose predictions it aggregates (results.json) and presents.

    summarize        results.json: accuracy per cell, mean and population std per task x group, consistency,
                     Table 2's Average, categories
    render_tables    table.md: Table 2 (groups x tasks, mean ± std over prompts; Average: over all of a
                     group's cells), Table 1 (categories), consistency, invalid answers, PromptBench's
                     performance drop rate (PDR) and a row per prompt; `python report.py DIR` adds a box
                     plot per group (accuracy_boxplot.png, with matplotlib)
    compare_tables   B - A for every task x group two results dirs share
    hidden_report    paper §5.1, Fig. 4: how close each perturbed group's last-token hidden states stay to
                     clean ones, and a 2-D PCA of them (hidden_pca.png when matplotlib is installed)

The figures are drawn in plots.py.

    python report.py out/results                    # print a results dir's tables
    python report.py runs/alpaca out/results        # print out/results - runs/alpaca
    python report.py out                            # a training run: its first and last steps and
                                                    # training.png (diagnostics.py)

Shape legend: N examples, Q prompts of a group, D model dim, B rows of a batch, T tokens.
"""
import argparse
import json
from pathlib import Path
from collections import defaultdict
from statistics import mean, pstdev

import numpy as np
import torch
import torch.nn.functional as F

from diagnostics import training_report
from files import write_atomically
from glue import CATEGORIES, TASKS
from model import prefill
from plots import save_box_plot, save_scatter

# -----------------------------------------------------------------------------
# 1. Aggregation: accuracy per cell, mean and std per task x group, consistency, averages

def summarize(cells, records, protocol):
    """results.json: cells; per task x group mean and population std over prompts; consistency; averages."""
    out_cells, by_pair, answers = {}, defaultdict(list), defaultdict(lambda: defaultdict(set))
    by_group = defaultdict(list)  # group -> the accuracy of each of its cells, in table order
    for key, (task, group, p, instruction) in cells.items():
        out_cells[key] = dict(task=task, group=group, prompt_index=p, instruction=instruction,
                              n=len(records[key]),
                              accuracy=100 * mean(r["pred"] == r["gold"] for r in records[key]),
                              invalid_rate=100 * mean(r["pred"] is None for r in records[key]))
        by_pair[task, group].append(out_cells[key])
        by_group[group].append(out_cells[key]["accuracy"])
        for r in records[key]:
            answers[task, group][r["idx"]].add(r["pred"])  # null (invalid) counts as an answer too
    for cell in out_cells.values():  # PromptBench's drop rate, against the clean prompt of the same index
        clean = out_cells.get(f"{cell['task']}/clean/{cell['prompt_index']}")
        cell["pdr"] = (1 - cell["accuracy"] / clean["accuracy"]
                       if clean and clean["accuracy"] and cell["group"] != "clean" else None)
    summary, consistency = defaultdict(dict), defaultdict(dict)
    for (task, group), cs in by_pair.items():
        accs, pdrs = [c["accuracy"] for c in cs], [c["pdr"] for c in cs if c["pdr"] is not None]
        summary[task][group] = dict(mean=mean(accs), std=pstdev(accs), prompts=len(cs),
                                    invalid_rate=mean(c["invalid_rate"] for c in cs),
                                    pdr=mean(pdrs) if pdrs else None)
        consistency[task][group] = 100 * mean(len(a) == 1 for a in answers[task, group].values())
    return dict(protocol=protocol, units="percent", cells=out_cells, summary=summary, consistency=consistency,
                averages=averages(summary, by_group))


def averages(summary, by_group):
    """Per group: pooled, mean and population std over all its cells (task x prompt: Table 2's Average); the
    mean of its task stds; by_group and by_category, the mean of its (category's) task means; overall."""
    pooled, task_stds, task_means, by_category, all_means = {}, {}, {}, {}, []
    for g, accs in by_group.items():
        means = {t: summary[t][g]["mean"] for t in TASKS if g in summary.get(t, {})}  # task -> mean
        pooled[g] = dict(mean=mean(accs), std=pstdev(accs), cells=len(accs))
        task_stds[g] = mean(summary[t][g]["std"] for t in means)
        task_means[g], all_means = mean(means.values()), all_means + list(means.values())
        by_category[g] = {category: mean(means[t] for t in tasks if t in means)
                          for category, tasks in CATEGORIES.items() if any(t in means for t in tasks)}
    return dict(pooled=pooled, mean_of_task_stds=task_stds, by_group=task_means, by_category=by_category,
                overall=mean(all_means) if all_means else None)


# -----------------------------------------------------------------------------
# 2. Tables


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def group_rows(results, cell, extra=lambda g: []):
    """A row per group: its name, a cell per task ("-" where not evaluated), then the cells `extra(group)`."""
    summary, rows = results["summary"], []
    tasks = [t for t in TASKS if t in summary]
    for g in results["averages"]["by_group"]:
        rows.append([g] + [cell(t, g) if g in summary[t] else "-" for t in tasks] + extra(g))
    return rows


PROMPT_COLUMNS = ("task", "group", "#", "instruction", "accuracy", "PDR", "invalid")  # PromptBench's columns


def render_tables(results, per_prompt=True):
    """table.md: Table 2 (groups x tasks, mean ± std), Table 1 (categories), consistency, invalid rate, PDR,
    and (per_prompt) a row per prompt."""
    summary, averages = results["summary"], results["averages"]
    by_category, groups = averages["by_category"], list(averages["by_group"])
    tasks = [t for t in TASKS if t in summary]
    cats = list(dict.fromkeys(c for g in groups for c in by_category[g]))

    def table2_average(g):  # over all the group's cells, then the mean of its per-task stds
        pooled = averages["pooled"][g]
        return [f"{pooled['mean']:.1f} ± {pooled['std']:.1f}", f"{averages['mean_of_task_stds'][g]:.1f}"]
    table2 = group_rows(results, lambda t, g: f"{summary[t][g]['mean']:.1f} ± {summary[t][g]['std']:.1f}",
                        table2_average)
    table1 = [[g] + [f"{by_category[g][c]:.1f}" if c in by_category[g] else "-" for c in cats]
              for g in groups]
    consistency = group_rows(results, lambda t, g: f"{results['consistency'][t][g]:.1f}")
    invalid = group_rows(results, lambda t, g: f"{summary[t][g]['invalid_rate']:.1f}")
    pdr = group_rows(results, lambda t, g: number(summary[t][g].get("pdr"), ".2f"))
    prompts = [[c["task"], c["group"], str(c["prompt_index"]), one_line(c["instruction"]),
                f"{c['accuracy']:.1f}", number(c.get("pdr"), ".2f"), f"{c['invalid_rate']:.1f}"]
               for c in results["cells"].values()]
    return "\n".join([
        f"# Results ({results['protocol']['mode']}, protocol {results['protocol'].get('protocol')}): "
        "accuracy in %, mean ± population std over a group's prompts",
        "", "## Table 2: groups x tasks", "",
        markdown_table(["group", *tasks, "Average", "mean task std"], table2),
        "Average: mean ± population std over all of the group's cells (every task x prompt), as CoIN's "
        "Table 2 reports it; mean task std: the mean of the row's per-task stds (over prompts).", "",
        "## Table 1: task categories", "", markdown_table(["group", *cats], table1),
        "## Consistency: % of examples predicted the same under every instruction of the group", "",
        markdown_table(["group", *tasks], consistency),
        "## Invalid answers (%)", "", markdown_table(["group", *tasks], invalid),
        "## Performance drop rate", "", markdown_table(["group", *tasks], pdr),
        "PDR = 1 - acc_perturbed / acc_clean (PromptBench's definition), each perturbed prompt against the "
        "clean prompt of the same index; mean over a task x group's prompts.", "",
        *(["## Per prompt", "", markdown_table(PROMPT_COLUMNS, prompts)] if per_prompt else [])])


def number(value, spec):
    return "-" if value is None else format(value, spec)


def one_line(text):
    """text as one markdown table cell: a row is one line, and | separates cells."""
    return " ".join(text.split()).replace("|", r"\|")


def read_results(results_dir):
    path = Path(results_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; pass a results dir written by evaluate.py")
    return json.loads(path.read_text())


def compare_tables(dir_a, dir_b):
    """Markdown: B - A for every task x group both results dirs hold, and each group's average."""
    a, b = read_results(dir_a)["summary"], read_results(dir_b)["summary"]
    tasks = [t for t in TASKS if t in a and t in b]
    groups = list(dict.fromkeys(g for t in tasks for g in a[t] if g in b[t]))
    if not groups:
        raise ValueError(f"{dir_a} and {dir_b} share no task x group")
    rows = []
    for g in groups:
        delta = {t: b[t][g]["mean"] - a[t][g]["mean"] for t in tasks if g in a[t] and g in b[t]}
        rows.append([g] + [f"{delta[t]:+.1f}" if t in delta else "-" for t in tasks]
                    + [f"{mean(delta.values()):+.1f}"])
    return f"Δ accuracy (points), B - A: A = {dir_a}, B = {dir_b}\n\n" + markdown_table(
        ["group", *tasks, "Average"], rows)


# -----------------------------------------------------------------------------
# 3. Hidden-state report (paper §5.1, Fig. 4)

@torch.no_grad()
def last_token_states(model, tokenizer, texts, batch_size):
    """(N, D) fp32: the final-norm hidden state at each text's last token, the one that predicts the answer.
    Texts of similar length share a batch (little padding), each run by model.prefill."""
    ids = [tokenizer.encode(t, bos=True) for t in texts]
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), ids[i]))  # equal lengths: alike prefixes
    states = torch.zeros(len(ids), model.args.dim)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        _, hidden = prefill(model, [ids[i] for i in rows], 0, tokenizer.pad_id)  # (B, 1, D)
        states[rows] = hidden[:, 0].float().cpu()
    return states


def pca_2d(states):
    """{group: [[x, y], ...]} on the two leading principal axes of all groups' states,
    and their variance shares."""
    flat = torch.cat([s.flatten(0, 1) for s in states.values()]).double().numpy()  # (sum of Q*N, D)
    centred = flat - flat.mean(0)
    _, sv, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T  # (sum of Q*N, 2)
    ends = np.cumsum([s.shape[0] * s.shape[1] for s in states.values()])[:-1]
    pca = {g: part.round(4).tolist() for g, part in zip(states, np.split(xy, ends))}
    return pca, (sv[:2] ** 2 / (sv ** 2).sum()).tolist()


def hidden_report(model, tokenizer, task, texts, n_examples, batch_size, out_dir):
    """Each perturbed group's mean cosine similarity to clean, paired by (prompt, example), and a 2-D PCA.

    texts: {group: the model inputs, prompt-major: Q prompts x n_examples}; "clean" must be among them.
    Prints each similarity; returns (the report written to hidden_report.json, the PNG path or None).
    """
    states = {}  # group -> (Q, N, D)
    for g, group_texts in texts.items():
        flat = last_token_states(model, tokenizer, group_texts, batch_size)
        states[g] = flat.view(-1, n_examples, model.args.dim)
    clean = states["clean"]
    cosine = {g: F.cosine_similarity(s[:len(clean)], clean[:len(s)], dim=-1).mean().item()  # (Q, N) -> mean
              for g, s in states.items() if g != "clean"}  # prompts beyond the shorter group have no partner
    pca, explained = pca_2d(states)
    report = dict(task=task, examples=n_examples, state="final norm, last input token",
                  cosine_to_clean=cosine, pca_explained_variance=explained, pca=pca)
    write_atomically(out_dir / "hidden_report.json", json.dumps(report))
    png = save_scatter(pca, f"{task}: last-token hidden states", out_dir / "hidden_pca.png")
    for g, similarity in cosine.items():
        print(f"{task} {g:<12} mean cosine similarity to clean {similarity:.4f}")
    print(f"wrote {out_dir / 'hidden_report.json'}" +
          (f" and {png}" if png else " (no PNG: pip install matplotlib to get the scatter)"))
    return report, png


# -----------------------------------------------------------------------------
# 4. Command line

def main(argv=None):
    parser = argparse.ArgumentParser(description="Print evaluate.py's tables, compare two results dirs, or "
                                                 "show a training run's curves.")
    parser.add_argument("dirs", nargs="+", metavar="DIR",
                        help="one results dir: its tables; two (A B): B - A; a coin.py --out: its curves")
    opts = parser.parse_args(argv)
    if len(opts.dirs) > 2:
        parser.error("give one results dir, or two to compare")
    try:
        if len(opts.dirs) == 2:
            return print(compare_tables(*opts.dirs))
        if (Path(opts.dirs[0]) / "metrics.jsonl").is_file():  # a training run's folder
            return training_report(opts.dirs[0])
        results = read_results(opts.dirs[0])
        print(render_tables(results))
        png = save_box_plot(results, Path(opts.dirs[0]) / "accuracy_boxplot.png")
        print(f"wrote {png}" if png else "no box plot: pip install matplotlib to get one")
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
