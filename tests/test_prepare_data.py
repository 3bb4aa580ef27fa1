"""prepare_data.py: the FLAN builder, the official CSV import and the check command.

The template tests use the real FLAN templates, and the tokenization test the real LLaMA tokenizer,
from ../shared.
"""
import csv
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import data
import prepare_data
from conftest import record, write_jsonl
from data import IGNORE_INDEX, Example
from glue import FLAN_LAYOUTS

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "flan_coin_demo.jsonl"


@pytest.fixture
def flan(flan_templates_path):
    return prepare_data.load_templates(flan_templates_path)


# -----------------------------------------------------------------------------
# The demo file and the official CSV

def test_demo_file_is_exactly_what_the_documented_command_builds(tmp_path, monkeypatch, capsys):
    documented = (ROOT / "docs" / "training.md").read_text().replace("\\\n", " ")
    argv = shlex.split(re.search(r"python prepare_data\.py (build [^\n]*?--seed \d+)", documented, re.S)[1])
    argv[argv.index("--out") + 1] = str(tmp_path / "demo.jsonl")
    monkeypatch.chdir(ROOT)
    prepare_data.main(argv)
    assert (tmp_path / "demo.jsonl").read_bytes() == DEMO.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["demo.jsonl"]  # the atomic write left no temp file behind
    assert re.search(r"^total\s+132\s+264\s+0$", capsys.readouterr().out, re.M)  # the Table 3 printout


def write_coin_csv(path, rows, columns=("original_instruction", "paraphrased_instruction", "targets",
                                        "task_name", "kwargs")):
    with open(path, "w", newline="", encoding="utf-8-sig") as f:  # with a BOM, as spreadsheets write it
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def test_csv_import_groups_rows_2k_and_2k_plus_1(tmp_path, capsys):
    rows = [(f"Question {r}?\nOPTIONS:\n- yes\n- no", f"Ask: question {r}?", ["yes", "no"][r % 2], "rte",
             "{'template': 1}") for r in range(5)]
    csv_path = write_coin_csv(tmp_path / "coin.csv", rows)
    examples, dropped = prepare_data.read_coin_csv(csv_path)
    assert dropped == 1  # row 4 has no partner
    assert [(e.id, e.group) for e in examples] == [("csv-0", "0"), ("csv-1", "0"), ("csv-2", "1"),
                                                   ("csv-3", "1")]
    assert examples[3] == Example("csv-3", "rte", rows[3][0], rows[3][1], "no", "1")
    prepare_data.main(["convert", "--csv", str(csv_path), "--out", str(tmp_path / "out.jsonl")])
    assert "dropped CSV row 5" in capsys.readouterr().out
    assert data.load_examples(tmp_path / "out.jsonl") == (examples, [])


def test_csv_missing_column_is_a_one_line_error(tmp_path):
    path = write_coin_csv(tmp_path / "coin.csv", [("a", "b", "rte")], ("original_instruction",
                                                                      "paraphrased_instruction", "task_name"))
    with pytest.raises(ValueError, match=r"^[^\n]*: no column 'targets'[^\n]*$"):
        prepare_data.read_coin_csv(path)


def test_csv_parse_errors_name_the_file(tmp_path):
    path = write_coin_csv(tmp_path / "coin.csv", [("x" * 200_000, "b", "c", "rte", "")])
    with pytest.raises(ValueError, match=r"coin\.csv:\d+: field larger than field limit"):
        prepare_data.read_coin_csv(path)


# -----------------------------------------------------------------------------
# Templates: JSON, or FLAN's templates.py parsed with ast

def test_templates_py_is_parsed_never_executed(tmp_path):
    marker = tmp_path / "executed.txt"
    path = tmp_path / "templates.py"
    path.write_text(f'import pathlib\npathlib.Path({str(marker)!r}).write_text("ran")\n\nPATTERNS = {{\n'
                    '    "rte": [\n        ("{premise}\\n\\nIs it true that "\n'
                    '         "{hypothesis}?", "{answer}"),\n'
                    '        ("{premise}\\nCan we infer {hypothesis}?", "{answer}"),\n    ],\n}\n')
    assert prepare_data.load_templates(path) == {
        "rte": [("{premise}\n\nIs it true that {hypothesis}?", "{answer}"),
                ("{premise}\nCan we infer {hypothesis}?", "{answer}")]}
    assert not marker.exists()


def test_templates_py_holds_the_same_templates_as_the_json(tmp_path, flan):
    path = tmp_path / "templates.py"
    path.write_text('"""FLAN templates."""\n\nPATTERNS = ' + repr(flan) + "\n")
    assert prepare_data.load_templates(path) == flan
    assert len(flan) == 61 and all(len(pairs) >= 2 for pairs in flan.values())


@pytest.mark.parametrize("name, text, message", [
    ("templates.py", "TEMPLATES = {}\n", r"no top-level `PATTERNS = \{\.\.\.\}` assignment"),
    ("templates.py", "PATTERNS = dict(rte=[])\n", r"templates\.py:1: PATTERNS is not a plain literal"),
    ("templates.py", "PATTERNS = {\n", r"templates\.py:1: not valid Python"),
    ("templates.json", '{"rte": ["one string"]}', r"templates must map dataset -> \[\[input_template"),
    ("templates.json", '{"rte": [', r"templates\.json:1: not JSON"),
])


def test_bad_template_files_are_refused(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        prepare_data.load_templates(tmp_path / name)


# -----------------------------------------------------------------------------
# Building from the real FLAN templates

RTE = [("The bridge opened in 1932.", "The bridge is old.", "yes"),
       ("Snow closed the pass.", "It was open.", "no"),
       ("The team won the final.", "The team played the final.", "yes"),
       ("She never drove.", "She drove a bus.", "no"),
       ("Prices rose after the frost.", "Fruit got cheaper.", "no"),
       ("He wrote two novels.", "He is a writer.", "yes")]
SST2 = [("a warm and funny film", 1), ("a dull mess", 0), ("sharp and moving", 1), ("tired and loud", 0),
        ("a small gem", 1), ("an empty sequel", 0)]


@pytest.fixture
def source_dir(tmp_path):
    """Small source files: rte in FLAN's layout, sst2, glue_mrpc and stsb in HF glue's layout."""
    source = tmp_path / "source"
    source.mkdir()
    write_jsonl(source / "rte.jsonl", [{"premise": p, "hypothesis": h, "options": ["yes", "no"], "answer": a}
                                       for p, h, a in RTE])
    write_jsonl(source / "sst2.jsonl", [{"idx": i, "sentence": s, "label": label}
                                        for i, (s, label) in enumerate(SST2)])
    write_jsonl(source / "glue_mrpc.jsonl", [{"sentence1": p, "sentence2": h, "label": i % 2}
                                             for i, (p, h, _) in enumerate(RTE)])
    write_jsonl(source / "stsb.jsonl", [{"sentence1": p, "sentence2": h, "label": i * 0.9}
                                        for i, (p, h, _) in enumerate(RTE)])
    return source


def build(flan, source_dir, **kwargs):
    sources = prepare_data.load_sources(source_dir, flan)
    return sources, *prepare_data.build_examples(flan, sources, **kwargs)


def matching_templates(text, rows, templates):
    """{(row, template)} whose rendered instruction is `text`
    (unusable templates may lack fields: KeyError)."""
    hits = set()
    for r, row in enumerate(rows):
        for i, (instruction, _) in enumerate(templates):
            try:
                hits |= {(r, i)} if prepare_data.render(instruction, row) == text else set()
            except KeyError:
                pass
    return hits


def test_build_is_deterministic_for_a_seed(flan, source_dir):
    _, first, skipped = build(flan, source_dir, seed=3)
    _, again, _ = build(flan, source_dir, seed=3)
    _, other, _ = build(flan, source_dir, seed=4)
    assert first == again and first != other
    assert skipped == {"glue_mrpc": 0, "rte": 0, "sst2": 0, "stsb": 0}


def test_paraphrase_uses_another_template_of_the_same_input_and_target(flan, source_dir):
    sources, examples, _ = build(flan, source_dir)
    assert len(examples) == 2 * 6 * 4
    for example in examples:
        templates, rows = flan[example.task], sources[example.task]
        original = matching_templates(example.original, rows, templates)
        paraphrase = matching_templates(example.paraphrase, rows, templates)
        texts = {templates[i][0] for _, i in original}
        # another template, not a copy of it
        assert texts and not texts & {templates[i][0] for _, i in paraphrase}
        # one source row rendered by both templates, each with this target (reverse templates such as "Write a
        # {answer} movie review." render alike for many rows, hence the sets)
        assert {(r, prepare_data.render(templates[i][1], rows[r])) for r, i in original} & \
            {(r, prepare_data.render(templates[i][1], rows[r])) for r, i in paraphrase} & \
            {(r, example.target) for r in range(len(rows))}
        if "OPTIONS:\n- " in example.original:
            assert "OPTIONS:\n- " in example.paraphrase  # the same answer space


def test_hard_negative_shares_the_template_with_another_input_and_answer(flan, source_dir):
    sources, examples, _ = build(flan, source_dir)
    for anchor, negative in zip(examples[::2], examples[1::2]):
        assert anchor.group == negative.group and anchor.task == negative.task
        assert (anchor.id, negative.id) == (f"{anchor.group}-anchor", f"{anchor.group}-negative")
        assert anchor.target != negative.target and anchor.original != negative.original
        templates, rows = flan[anchor.task], sources[anchor.task]
        assert ({i for _, i in matching_templates(anchor.original, rows, templates)} &
                {i for _, i in matching_templates(negative.original, rows, templates)})


def test_per_task_and_round_robin_order(flan, source_dir, capsys):
    _, examples, skipped = build(flan, source_dir, per_task=2)
    assert [e.task for e in examples[::2]] == ["glue_mrpc", "rte", "sst2", "stsb"] * 2
    table = prepare_data.table3(examples, skipped)
    assert table.splitlines()[0].split() == ["task", "groups", "examples", "skipped"]
    assert table.splitlines()[-1].split() == ["total", "8", "16", "0"]


def test_options_render_exactly_as_flan(flan, source_dir):
    rows = prepare_data.load_sources(source_dir, flan)["rte"]
    assert prepare_data.render(flan["rte"][2][0], rows[0]) == ("The bridge opened in 1932.\n\n"
                                                               "Can we draw the following conclusion?\n"
                                                               "The bridge is old.\n\nOPTIONS:\n- yes\n- no")


FLAN_ANSWER_OF_LABEL_1 = {  # flan/tasks.py: _process_<dataset> options[label]
    "cola": "acceptable", "sst2": "positive", "glue_mrpc": "yes", "glue_qqp": "yes", "qnli": "no",
    "rte": "no", "wnli": "yes", "mnli": "it is not possible to tell", "stsb": "1"}


@pytest.mark.parametrize("dataset", sorted(FLAN_LAYOUTS))
def test_glue_rows_map_to_flan_fields_and_answers(tmp_path, flan, dataset):
    renames = FLAN_LAYOUTS[dataset][0]
    # stsb: a score, rounded (not cut) as FLAN's as_string(precision=0)
    label = 0.6 if dataset == "stsb" else 1
    path = write_jsonl(tmp_path / f"{dataset}.jsonl", [{**{glue: f"text {glue}" for glue in renames},
                                                        "label": label, "idx": 0}])
    rows = prepare_data.load_source(path, dataset, flan[dataset])
    answer = rows[0].get("answer", rows[0].get("answer_str"))
    assert answer == FLAN_ANSWER_OF_LABEL_1[dataset] and answer in rows[0]["options"]
    # the classification templates all render from the mapped row
    for instruction, output in flan[dataset][:8]:
        assert "text " in prepare_data.render(instruction, rows[0])
        assert prepare_data.render(output, rows[0]) == answer


@pytest.mark.parametrize("rows, message", [
    ([{"premise": "p", "options": ["yes", "no"], "answer": "yes"}],
     r"rte\.jsonl:1: rte template 0 uses \{hypothesis\} but this row's 'hypothesis' is missing"),
    ([{"premise": "p", "hypothesis": "h", "options": ["yes", "no"], "answer": 1}], r"'answer' is 1"),
    ([{"premise": "p", "hypothesis": "h", "options": "yes or no", "answer": "yes"}],
     r"'options' is \"yes or no\""),
    ([{"sentence1": "p", "sentence2": "h", "label": -1}],
     r"rte\.jsonl:1: label -1 is not a rte label 0\.\.1"),
    ([{"sentence1": "p", "label": 0}], r"a glue-layout rte row \(it has 'label'\) needs 'sentence2'"),
    (["premise"], r"rte\.jsonl:1: not a JSON object"),
    ([], r"rte\.jsonl: no rows"),
])


def test_bad_source_rows_are_refused(tmp_path, flan, rows, message):
    path = write_jsonl(tmp_path / "rte.jsonl", rows)
    with pytest.raises(ValueError, match=message):
        prepare_data.load_source(path, "rte", flan["rte"])


def test_source_files_must_be_named_after_template_datasets(tmp_path, flan):
    with pytest.raises(ValueError, match="no <dataset>.jsonl source files"):
        prepare_data.load_sources(tmp_path, flan)
    write_jsonl(tmp_path / "qqp.jsonl", [{"question1": "a", "question2": "b", "label": 0}])
    with pytest.raises(ValueError, match=r"qqp\.jsonl: no templates for dataset 'qqp'.*glue_qqp\.jsonl"):
        prepare_data.load_sources(tmp_path, flan)


def test_a_dataset_without_paraphrase_partners_is_refused():
    templates = [("Summarize: {text}", "{summary}"), ("Expand: {summary}", "{text}")]
    with pytest.raises(ValueError, match="toy: no template has a paraphrase partner"):
        prepare_data.build_examples({"toy": templates}, {"toy": [{"text": "a", "summary": "b"}] * 2})


def test_paraphrase_partners_of_real_flan_templates(flan):
    paws = prepare_data.paraphrase_partners(flan["paws_wiki"])
    # 9 lists no options: never the paraphrase of one that does
    assert all(9 not in partners for partners in paws[:9])
    assert paws[9] == list(range(9))  # but the others may paraphrase it
    cola = prepare_data.paraphrase_partners(flan["cola"])
    assert 3 not in cola[0] and 0 not in cola[3]  # FLAN's cola templates 0 and 3 are the same text
    # the two reverse templates ("Generate ... {answer}" -> "{sentence}")
    assert cola[8] == [9] and cola[9] == [8]
    # "Generate a context and a hypothesis." has no partner
    assert prepare_data.paraphrase_partners(flan["rte"])[9] == []


def test_anchors_without_a_hard_negative_are_skipped_and_counted(flan):
    rows = [{"premise": f"p{i}", "hypothesis": "h", "options": ["yes", "no"], "answer": "yes"}
            for i in range(5)]
    assert prepare_data.build_examples(flan, {"rte": rows}) == ([], {"rte": 5})  # one answer everywhere
    same_input = [{"premise": "p", "hypothesis": "h", "options": ["yes", "no"], "answer": answer}
                  for answer in ("yes", "no")]
    # answers differ, inputs do not
    assert prepare_data.build_examples(flan, {"rte": same_input}) == ([], {"rte": 2})


# -----------------------------------------------------------------------------
# Built examples tokenize as data.py says

def test_training_view_is_prompt_template_and_target_as_one_string(tok, flan, source_dir):
    _, examples, _ = build(flan, source_dir, per_task=1)
    for example in examples:
        item = data.tokenize_example(example, tok)
        for view, text in (("original", example.original), ("paraphrase", example.paraphrase)):
            input_ids, labels = (t.tolist() for t in item[view][:2])
            prompt = text + "\n\n### Response:\n"
            n_prompt = len(tok.encode(prompt))
            assert input_ids == tok.encode(prompt + example.target)
            assert labels == [IGNORE_INDEX] * n_prompt + input_ids[n_prompt:]


# -----------------------------------------------------------------------------
# Command line

def test_cli_check_refuses_a_bad_file_and_skip_bad_reports_counts(tmp_path, capsys):
    path = write_jsonl(tmp_path / "train.jsonl", [record("a", "g"), record("b", "g"), record("c", "h")])
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(path))}: 1 bad lines \(first 20 below\)"):
        prepare_data.main(["check", str(path)])
    prepare_data.main(["check", str(path), "--skip-bad"])
    out = capsys.readouterr().out
    assert f"{path}: dropped 1 bad lines" in out and re.search(r"^rte\s+1\s+2$", out, re.M)


def test_cli_build_reports_errors_in_one_line(tmp_path, flan_templates_path):
    with pytest.raises(SystemExit, match=r"^error: .*: no <dataset>\.jsonl source files; give --source"):
        prepare_data.main(["build", "--templates", str(flan_templates_path), "--source", str(tmp_path),
                           "--out", str(tmp_path / "out.jsonl")])
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_exits_nonzero_with_the_error(tmp_path):
    command = [sys.executable, str(ROOT / "prepare_data.py"), "check", str(tmp_path / "missing.jsonl")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "missing.jsonl" in result.stderr
