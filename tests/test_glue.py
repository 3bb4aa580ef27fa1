"""glue.py: the label ids of HF glue, and the validation-file loaders (TSV, JSONL) with their errors."""
import json
from pathlib import Path

import pytest

from glue import ANSWERS, LABELS, TASKS, load_task

DEMO = Path(__file__).resolve().parents[1] / "examples" / "glue_demo"


def test_label_ids_follow_hf_glue():
    nli = ("entailment", "neutral", "contradiction")
    assert LABELS == {
        "cola": ("unacceptable", "acceptable"), "sst2": ("negative", "positive"),
        "mrpc": ("not_equivalent", "equivalent"), "qqp": ("not_equivalent", "equivalent"),
        "mnli": nli, "mnli_matched": nli, "mnli_mismatched": nli,
        "qnli": ("entailment", "not_entailment"), "rte": ("entailment", "not_entailment"),
        "wnli": ("not_entailment", "entailment")}


# promptbench/config.py's LABEL_TO_ID for the GLUE tasks (mnli's serves its parts), copied
COIN_LABEL_TO_ID = {
    'sst2': {'negative': 0, 'positive': 1, '0': 0, '1': 1},
    'mnli': {'entailment': 0, 'neutral': 1, 'contradiction': 2, '0': 0, '1': 1, '2': 2},
    'qqp': {'equivalent': 1, 'not_equivalent': 0, '0': 0, '1': 1},
    'qnli': {'entailment': 0, 'not_entailment': 1, '0': 0, '1': 1},
    'rte': {'entailment': 0, 'not_entailment': 1, '0': 0, '1': 1},
    'cola': {'unacceptable': 0, 'acceptable': 1, '0': 0, '1': 1},
    'mrpc': {'equivalent': 1, 'not_equivalent': 0, '0': 0, '1': 1},
    'wnli': {'entailment': 1, 'not_entailment': 0, '0': 0, '1': 1},
}


def test_answers_are_coins_label_set_with_its_ids():
    assert set(ANSWERS) == set(TASKS)
    for task, answers in ANSWERS.items():
        ids = COIN_LABEL_TO_ID["mnli" if task.startswith("mnli") else task]
        for answer, label in answers:  # "word'" never wins, and has no id of its own: the word's
            assert label == ids[answer.rstrip("'")], (task, answer)
    words = {task: [answer for answer, _ in answers] for task, answers in ANSWERS.items()}
    assert words["sst2"] == ["positive", "negative", "positive'", "negative'", "0", "1", "0'", "1'"]
    assert words["rte"] == words["qnli"] == words["wnli"] == [
        "entailment", "not_entailment", "entailment'", "not_entailment'", "0", "1", "0'", "1'"]
    assert words["mnli"] == words["mnli_matched"] == words["mnli_mismatched"] == [
        "entailment", "neutral", "contradiction", "entailment'", "neutral'", "contradiction'"]
    assert words["qqp"] == words["mrpc"] == ["equivalent", "not_equivalent", "equivalent'", "not_equivalent'"]
    assert words["cola"] == ["unacceptable", "acceptable", "unacceptable'", "acceptable'"]
    assert LABELS["wnli"][dict(ANSWERS["wnli"])["1"]] == "entailment"
    assert LABELS["rte"][dict(ANSWERS["rte"])["1"]] == "not_entailment"


def coin_content(task, row):
    """promptbench/dataload.py's GLUE.get_content_by_idx, re-expressed on one HF glue row."""
    if task == "sst2" or task == "cola":
        return row['sentence']
    if task == 'qqp':
        return 'Question 1: ' + row['question1'] + ' Question 2: ' + row['question2']
    if task in ('mnli', 'mnli_matched', 'mnli_mismatched'):
        return 'Premise: ' + row['premise'] + ' Hypothesis: ' + row['hypothesis']
    if task == 'qnli':
        return 'Question: ' + row['question'] + ' Context: ' + row['sentence']
    return 'Sentence 1: ' + row['sentence1'] + ' Sentence 2: ' + row['sentence2']  # rte, mrpc, wnli


HF_ROWS = {  # one validation row per file, spaces kept as HF glue has them (sst2's sentences end in one)
    "sst2": {"sentence": "it 's a charming  journey . ", "label": 1},
    "cola": {"sentence": " Odd spacing stays ", "label": 0},
    "qqp": {"question1": "Why?", "question2": " How? ", "label": 0},
    "mnli_matched": {"premise": "P one.", "hypothesis": "H one.", "label": 2},
    "mnli_mismatched": {"premise": "P two. ", "hypothesis": "H two.", "label": 0},
    "qnli": {"question": "Who?", "sentence": "He did.", "label": 1},
    "rte": {"sentence1": "S1.", "sentence2": "S2.", "label": 0},
    "mrpc": {"sentence1": "A b.", "sentence2": "B a.", "label": 1},
    "wnli": {"sentence1": "It fell.", "sentence2": "The cup fell.", "label": 1},
}


def test_content_is_laid_out_as_coins_promptbench(tmp_path):
    for name, row in HF_ROWS.items():
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
    for task in TASKS:
        parts = ("mnli_matched", "mnli_mismatched") if task == "mnli" else (task,)
        expected = [coin_content(task, HF_ROWS[part]) for part in parts]
        assert [ex["content"] for ex in load_task(task, tmp_path)] == expected, task


GLUE_FILES = {  # the GLUE download script's layout: a header row except for CoLA, labels as ids or words
    "CoLA/dev.tsv": "gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.\n",
    "SST-2/dev.tsv": "sentence\tlabel\na fine film \t1\na \"dull\" one\t0\n",
    "MRPC/dev.tsv": "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA b.\tB a.\n0\t3\t4\tC.\tD.\n",
    "QQP/dev.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n7\t1\t2\tWhy?\tHow?\t0\n",
    "MNLI/dev_matched.tsv": "index\tsentence1\tsentence2\tlabel1\tgold_label\n"
                            "0\tP1.\tH1.\tneutral\tneutral\n",
    "MNLI/dev_mismatched.tsv": "index\tsentence1\tsentence2\tlabel1\tgold_label\n"
                               "0\tP2.\tH2.\tx\tcontradiction\n",
    "QNLI/dev.tsv": "index\tquestion\tsentence\tlabel\n0\tWho?\tHe did.\tentailment\n",
    "RTE/dev.tsv": "index\tsentence1\tsentence2\tlabel\n0\tS1.\tS2.\tnot_entailment\n",
    "WNLI/dev.tsv": "index\tsentence1\tsentence2\tlabel\n0\tIt fell.\tThe cup fell.\t1\n",
}


def write_glue(root, files=GLUE_FILES):
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_tsv_loader_reads_the_glue_layout(tmp_path):
    glue = write_glue(tmp_path)
    load = lambda task: load_task(task, glue)  # noqa: E731
    assert load("cola") == [{"content": "The cat sat.", "label": 1}, {"content": "Cat the sat.", "label": 0}]
    assert load("sst2")[1] == {"content": 'a "dull" one', "label": 0}  # quotes kept as they are (QUOTE_NONE)
    assert load("mrpc")[0] == {"content": "Sentence 1: A b. Sentence 2: B a.", "label": 1}
    assert load("qqp") == [{"content": "Question 1: Why? Question 2: How?", "label": 0}]
    assert load("mnli") == [{"content": "Premise: P1. Hypothesis: H1.", "label": 1},   # matched first
                            {"content": "Premise: P2. Hypothesis: H2.", "label": 2}]
    assert load("mnli_mismatched") == load("mnli")[1:]
    assert load("qnli") == [{"content": "Question: Who? Context: He did.", "label": 0}]
    assert load("rte") == [{"content": "Sentence 1: S1. Sentence 2: S2.", "label": 1}]
    assert load("wnli") == [{"content": "Sentence 1: It fell. Sentence 2: The cup fell.", "label": 1}]


def test_jsonl_loader_reads_hf_fields_and_concatenates_mnli(tmp_path):
    rows = {"mnli_matched": [{"premise": "P.", "hypothesis": "H.", "label": 2, "idx": 0}],
            "mnli_mismatched": [{"premise": "Q.", "hypothesis": "G.", "label": 0, "idx": 0}],
            "qnli": [{"question": "Who?", "sentence": "Me.", "label": 1, "idx": 0}]}
    for task, items in rows.items():
        (tmp_path / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    assert load_task("mnli", tmp_path) == [{"content": "Premise: P. Hypothesis: H.", "label": 2},
                                                     {"content": "Premise: Q. Hypothesis: G.", "label": 0}]
    assert load_task("qnli", tmp_path) == [{"content": "Question: Who? Context: Me.", "label": 1}]


def test_the_demo_data_loads_for_every_task():
    sizes = {task: len(load_task(task, DEMO)) for task in TASKS}
    assert sizes["mnli"] == sizes["mnli_matched"] + sizes["mnli_mismatched"]
    assert all(20 <= n <= 42 for n in sizes.values()), sizes
    for task in TASKS:  # every class present
        assert {ex["label"] for ex in load_task(task, DEMO)} == set(range(len(LABELS[task])))


@pytest.mark.parametrize("files, message", [
    ({"rte.jsonl": '{"sentence1": "a", "sentence2": "b", "label": -1, "idx": 0}\n'}, "test splits have none"),
    ({"rte.jsonl": '{"sentence1": "a", "label": 0, "idx": 0}\n'}, "no field 'sentence2'"),
    ({"rte.jsonl": '{"sentence1": "a", "sentence2": "b", "label": 5}\n'}, "label 5 is none of"),
    ({"rte.jsonl": "{not json\n"}, "rte.jsonl:1: not JSON"),
    ({"RTE/dev.tsv": "index\tsentence1\tsentence2\n0\ta\tb\n"}, "no column 'label'"),
    ({"RTE/dev.tsv": "index\tsentence1\tsentence2\tlabel\n0\ta\n"}, "dev.tsv:2: 2 tab-separated columns"),
    ({}, "no rte.jsonl nor RTE/dev.tsv"),
])
def test_bad_data_files_give_one_line_errors(tmp_path, files, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_task("rte", write_glue(tmp_path, files))
