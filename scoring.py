"""scoring.py: replicate.py's scores of one adapter: what it answers under seen and unseen instructions.

A support module, read after replicate.py, which calls score_adapter once per seed and arm. The model answers
in rank mode (evaluate.py: the log-likelihood of each label word after the input), in coin.py's input format,
so no answer is invalid and a wrong answer is a wrong label, never a malformed one:

    seen template   the evaluation rows rendered with three of the training templates that list the options:
                    does the model do the task at all?
    clean, ...      the prompt file's groups (prompts/perturbed.json: clean and perturbed instructions that
                    training never sees), each instruction followed by the row
    hidden states   paper §5.1: the mean cosine of the last-token states under each perturbed group's prompts
                    to those under the clean ones, same prompt index and example (report.hidden_report)
    margins         per cell and example, how far its answer is from flipping (tests/test_replicate.py
                    checks a run of a shipped base against its committed numbers with them)
"""
from data import PROMPT_TEMPLATE
from evaluate import EvalConfig, build_input, cell_records, plan_cells, predict
from glue import LABELS, example, flan_row, label_id, labelled_rows
from hf_io import load_adapter, load_model, load_tokenizer
from model import merge_lora
from prepare_data import render
from report import hidden_report, summarize

# task -> its template dataset. The prompt file's instructions ask for GLUE's label words, which only these
# tasks' FLAN templates answer with (negative / positive, unacceptable / acceptable; the others: yes / no).
FLAN_NAME = {"sst2": "sst2", "cola": "cola"}
SEEN = "seen template"  # the group of training templates: can the model do the task at all?


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


def score_adapter(base, adapter, eval_dir, tasks, templates, prompt_set, batch_size):
    """results.json's content (report.summarize) for one adapter on eval_dir's <task>.jsonl rows, plus its
    hidden-state similarities."""
    model, tokenizer = load_model(base), load_tokenizer(base)
    load_adapter(model, adapter)
    merge_lora(model)  # the same scores (tests/test_lora.py), without the adapter's extra matmuls
    ecfg = EvalConfig(mode="rank", format="train", batch_size=batch_size)
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
    hidden, _ = hidden_report(model, tokenizer, first, texts, len(data[first]), batch_size, adapter)
    return dict(results, hidden_cosine_to_clean=hidden["cosine_to_clean"], hidden_task=first,
                margins={key: [margin(r) for r in rs] for key, rs in records.items()})


def margin(record):
    """How far a rank-mode answer is from flipping: log p(gold label) minus the largest log p of another
    label (> 0: right). Another CPU's rounding can change only the answers whose margin it can cross."""
    gold, scores = record["gold"], record["raw"]  # raw: {label: log-likelihood}
    return scores[gold] - max(v for label, v in scores.items() if label != gold)
