"""glue.py: the GLUE tasks as data: their label words, how each source lays out their fields, and their files.

A torch-free support module: perturb.py reads the label words it must never perturb from here, evaluate.py the
tasks it scores, and prepare_data.py how FLAN renders a GLUE row. Read it beside evaluate.py.

    LABELS        task -> its label words, indexed by the HF `glue` label id
    ANSWERS       task -> the answers CoIN's evaluation accepts, in the order it tries them, with their ids
    CONTENT       task -> how CoIN's PromptBench lays out an example's fields after the instruction
    CATEGORIES    CoIN Table 1's grouping of the tasks
    FLAN_LAYOUTS  FLAN dataset -> how FLAN's templates name a HF glue row's fields and answers
    is_instruction_table  the shape of one group of a prompt file, {task: [instruction, ...]}
    load_task     a task's validation examples from <task>.jsonl files, the GLUE download script's TSV files,
                  or the HF `datasets` package when it is installed; labelled_rows: a <task>.jsonl's rows

Next: read `evaluate.py`.
"""
import csv
import io
from pathlib import Path

from files import read_jsonl, read_text

# -----------------------------------------------------------------------------
# 1. Tasks and labels

NLI3 = ("entailment", "neutral", "contradiction")
LABELS = {  # HF glue's label ids: LABELS[task][id] is the word the model must answer
    "cola": ("unacceptable", "acceptable"), "mnli": NLI3, "mnli_matched": NLI3, "mnli_mismatched": NLI3,
    "mrpc": ("not_equivalent", "equivalent"), "qnli": ("entailment", "not_entailment"),
    "qqp": ("not_equivalent", "equivalent"), "rte": ("entailment", "not_entailment"),
    "sst2": ("negative", "positive"), "wnli": ("not_entailment", "entailment"),
}
TASKS = tuple(LABELS)
MNLI_PARTS = ("mnli_matched", "mnli_mismatched")  # mnli = their validation sets concatenated, matched first
PAIR, NLI = "Sentence 1: {sentence1} Sentence 2: {sentence2}", "Premise: {premise} Hypothesis: {hypothesis}"
CONTENT = {  # CoIN's layout of each task's HF fields (promptbench/dataload.py, GLUE.get_content_by_idx)
    "cola": "{sentence}", "sst2": "{sentence}", "qqp": "Question 1: {question1} Question 2: {question2}",
    "mnli": NLI, "mnli_matched": NLI, "mnli_mismatched": NLI,
    "qnli": "Question: {question} Context: {sentence}", "rte": PAIR, "mrpc": PAIR, "wnli": PAIR,
}
# The answers CoIN accepts, in the order it tries them: promptbench/config.py's LABEL_SET, copied. Digits
# count for sst2, qnli, rte and wnli (ENTAIL_LABEL), not for mnli, qqp, mrpc and cola. A "word'" entry never
# wins (the word before it matches first) and config.py's LABEL_TO_ID has no id for it: it gets the word's.
MNLI_LABEL = ["entailment", "neutral", "contradiction", "entailment'", "neutral'", "contradiction'"]
EQ_LABEL = ["equivalent", "not_equivalent", "equivalent'", "not_equivalent'"]
ENTAIL_LABEL = ["entailment", "not_entailment", "entailment'", "not_entailment'", "0", "1", "0'", "1'"]
LABEL_SET = {
    "sst2": ["positive", "negative", "positive'", "negative'", "0", "1", "0'", "1'"],
    "mnli": MNLI_LABEL, "mnli_mismatched": MNLI_LABEL, "mnli_matched": MNLI_LABEL, "qqp": EQ_LABEL,
    "qnli": ENTAIL_LABEL, "rte": ENTAIL_LABEL,
    "cola": ["unacceptable", "acceptable", "unacceptable'", "acceptable'"], "mrpc": EQ_LABEL,
    "wnli": ENTAIL_LABEL,
}


def answer_id(task, answer):
    """config.py's LABEL_TO_ID: a digit is the HF glue id itself ('1': wnli entailment, rte not_entailment);
    a word is its id in LABELS, which LABEL_TO_ID's ids all equal."""
    word = answer.rstrip("'")
    return int(word) if word.isdigit() else LABELS[task].index(word)


ANSWERS = {task: tuple((answer, answer_id(task, answer)) for answer in answers)
           for task, answers in LABEL_SET.items()}
CATEGORIES = {"Sentiment": ("sst2",), "Grammar": ("cola",), "Paraphrase": ("qqp", "mrpc"),  # CoIN Table 1
              "NLI": ("mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli")}

# HF `glue` rows -> FLAN rows: (glue field -> FLAN field, FLAN's answer strings indexed by the glue label,
# FLAN's answer field), as flan/tasks.py's _process_<dataset> maps them. stsb's label is a 0.0-5.0 score,
# rounded as FLAN's as_string(precision=0) into answer_str "0".."5".
FLAN_LAYOUTS = {
    "cola": ({"sentence": "sentence"}, ["unacceptable", "acceptable"], "answer"),
    "sst2": ({"sentence": "sentence"}, ["negative", "positive"], "answer"),
    "glue_mrpc": ({"sentence1": "sentence1", "sentence2": "sentence2"}, ["no", "yes"], "answer"),
    "glue_qqp": ({"question1": "question1", "question2": "question2"}, ["no", "yes"], "answer"),
    "mnli": ({"premise": "premise", "hypothesis": "hypothesis"}, ["yes", "it is not possible to tell", "no"],
             "answer"),
    "qnli": ({"question": "question", "sentence": "sentence"}, ["yes", "no"], "answer"),
    "rte": ({"sentence1": "premise", "sentence2": "hypothesis"}, ["yes", "no"], "answer"),
    "wnli": ({"sentence1": "sentence1", "sentence2": "sentence2"}, ["no", "yes"], "answer"),
    "stsb": ({"sentence1": "sentence1", "sentence2": "sentence2"}, ["0", "1", "2", "3", "4", "5"],
             "answer_str"),
}


def flan_row(dataset, row, where):
    """An HF glue row (fields + integer label, or stsb's float score) -> the FLAN row its templates expect."""
    renames, options, answer_field = FLAN_LAYOUTS[dataset]
    missing = [name for name in renames if name not in row]
    if missing:
        raise ValueError(f"{where}: a glue-layout {dataset} row (it has 'label') needs '{missing[0]}'")
    label = row["label"]
    index = round(label) if answer_field == "answer_str" and isinstance(label, (int, float)) else label
    if isinstance(index, bool) or index not in range(len(options)):
        raise ValueError(f"{where}: label {label!r} is not a {dataset} label 0..{len(options) - 1} "
                         "(-1 marks an unlabelled test split; use the train split)")
    return {**{flan: row[glue] for glue, flan in renames.items()}, "options": list(options),
            answer_field: options[int(index)]}


def is_instruction_table(tasks):
    """True for {task: [instruction, ...]} with string keys and non-empty lists of non-empty strings: one
    group of a prompt file (evaluate.py reads them, perturb.py writes them)."""
    return isinstance(tasks, dict) and all(
        isinstance(task, str) and isinstance(instructions, list) and instructions
        and all(isinstance(s, str) and s.strip() for s in instructions)
        for task, instructions in tasks.items())


def label_id(task, value, where):
    """A gold label as its HF glue id: ids (or digit strings) stay,
    label words ("entailment") map to theirs."""
    labels = LABELS[task]
    if isinstance(value, str):
        text = value.strip()
        value = int(text) if text.lstrip("-").isdigit() else labels.index(text) if text in labels else value
    if value is None or value == -1:
        raise ValueError(f"{where}: no label (-1): test splits have none; evaluate the validation split")
    if type(value) is not int or not 0 <= value < len(labels):
        raise ValueError(f"{where}: label {value!r} is none of {task}'s ids 0..{len(labels) - 1} "
                         f"or words {labels}")
    return value


# -----------------------------------------------------------------------------
# 2. Validation files: <task>.jsonl, the GLUE download script's TSV files, or HF datasets

# The download script's dev files: task -> (file, {HF field: column}). CoLA's file has no header row.
COLA_HEADER = ["source", "label", "original_judgement", "sentence"]
S12, MNLI_TSV = {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}, {
    "premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"}
GLUE_TSV = {
    "cola": ("CoLA/dev.tsv", {"sentence": "sentence", "label": "label"}),
    "sst2": ("SST-2/dev.tsv", {"sentence": "sentence", "label": "label"}),
    "mrpc": ("MRPC/dev.tsv", {"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"}),
    "qqp": ("QQP/dev.tsv", {"question1": "question1", "question2": "question2", "label": "is_duplicate"}),
    "mnli_matched": ("MNLI/dev_matched.tsv", MNLI_TSV),
    "mnli_mismatched": ("MNLI/dev_mismatched.tsv", MNLI_TSV),
    "qnli": ("QNLI/dev.tsv", {"question": "question", "sentence": "sentence", "label": "label"}),
    "rte": ("RTE/dev.tsv", S12), "wnli": ("WNLI/dev.tsv", S12),
}


def read_jsonl_rows(path):
    """[(where, row)] of a JSONL file; the first bad line is an error naming it."""
    rows = []
    for lineno, row, error in read_jsonl(path):
        if error:
            raise ValueError(f"{path}:{lineno}: not JSON ({error})")
        rows.append((f"{path}:{lineno}", row))
    return rows


def read_tsv(path, part):
    """[(where, {field: text})] of a GLUE dev file. QUOTE_NONE: GLUE sentences hold unbalanced quotes."""
    table = list(csv.reader(io.StringIO(read_text(path), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    header = COLA_HEADER if part == "cola" else table.pop(0) if table else []
    absent = [c for c in GLUE_TSV[part][1].values() if c not in header]
    if absent:
        raise ValueError(f"{path}: no column {absent[0]!r} (test files have no labels: use the dev files)")
    cols = {k: header.index(c) for k, c in GLUE_TSV[part][1].items()}
    rows = []
    for n, row in enumerate(table, 1 if part == "cola" else 2):
        if len(row) <= max(cols.values()):
            raise ValueError(f"{path}:{n}: {len(row)} tab-separated columns, {len(header)} expected")
        rows.append((f"{path}:{n}", {k: row[i] for k, i in cols.items()}))
    return rows


def task_files(glue_dir, task):
    """[(file, part)] holding `task`'s validation rows: <task>.jsonl files, else the GLUE TSV layout."""
    parts = MNLI_PARTS if task == "mnli" and not (glue_dir / "mnli.jsonl").is_file() else (task,)
    for found in ([(glue_dir / f"{p}.jsonl", p) for p in parts],
                  [(glue_dir / GLUE_TSV[p][0], p) for p in parts]):
        if all(path.is_file() for path, _ in found):
            return found
    raise FileNotFoundError(f"{glue_dir}: no {' + '.join(p + '.jsonl' for p in parts)} nor "
                            f"{' + '.join(GLUE_TSV[p][0] for p in parts)} for task {task}")


def hf_validation_rows(task):
    """[(where, row)] of `task`'s validation split from the HF `datasets` package (which may download it)."""
    try:
        import datasets
    except ImportError:
        raise ValueError("no --glue-dir, and the `datasets` package is not installed: "
                         "pass --glue-dir") from None
    rows = []
    for part in MNLI_PARTS if task == "mnli" else (task,):
        for i, row in enumerate(datasets.load_dataset("glue", part, split="validation")):
            rows.append((f"glue/{part}/validation[{i}]", row))
    return rows


def example(task, row, where):
    """{content, label} of one row: its fields laid out as CoIN does, its label id; errors name `where`."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: not a JSON object; GLUE-layout files hold one row object per line")
    try:
        content = CONTENT[task].format(**row)
    except KeyError as e:
        raise ValueError(f"{where}: no field {e} (HF glue names: {CONTENT[task]})") from None
    return {"content": content, "label": label_id(task, row.get("label"), where)}


def load_task(task, glue_dir=""):
    """`task`'s validation examples [{content, label}], in file order (mnli: matched, then mismatched)."""
    if not glue_dir:
        rows = hf_validation_rows(task)
    else:
        rows = []
        for path, part in task_files(Path(glue_dir), task):
            rows += read_jsonl_rows(path) if path.suffix == ".jsonl" else read_tsv(path, part)
    if not rows:
        raise ValueError(f"{task}: the validation set is empty")
    return [example(task, row, where) for where, row in rows]


def labelled_rows(path, task):
    """The rows of a GLUE-layout <task>.jsonl file (HF glue's fields and label), each checked by example."""
    rows = read_jsonl_rows(path)
    if not rows:
        raise ValueError(f"{path}: no rows")
    for where, row in rows:
        example(task, row, where)  # an error at the first bad row
    return [row for _, row in rows]
