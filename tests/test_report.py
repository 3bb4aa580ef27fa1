"""report.py: the comparison of two results dirs, and its command line."""
import json

import pytest

import evaluate
import report


def records_for(cells, answers):
    """{cell key: records} from {cell key: [(pred, gold), ...]}."""
    return {k: [dict(task=cells[k][0], group=cells[k][1], prompt_index=cells[k][2], idx=i, raw="",
                     pred=p, gold=g)
                for i, (p, g) in enumerate(answers[k])] for k in cells}


def test_compare_prints_the_difference_of_two_results_dirs(tmp_path):
    cells = {"sst2/clean/0": ("sst2", "clean", 0, "a")}
    for name, pred in (("a", "negative"), ("b", "positive")):
        results = evaluate.summarize(cells, records_for(cells, {"sst2/clean/0": [(pred, "positive")]}),
                                     {"mode": "g"})
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    table = report.compare_tables(tmp_path / "a", tmp_path / "b")
    assert "| clean | +100.0 | +100.0 |" in table
    with pytest.raises(SystemExit, match="^error: .*results.json: not found"):
        report.main([str(tmp_path / "a"), str(tmp_path / "nowhere")])


def test_one_results_dir_prints_its_tables(tmp_path, capsys):
    cells = {"rte/clean/0": ("rte", "clean", 0, "a")}
    results = evaluate.summarize(cells, records_for(cells, {"rte/clean/0": [("entailment", "entailment")]}),
                                 {"mode": "generate"})
    (tmp_path / "results.json").write_text(json.dumps(results))
    report.main([str(tmp_path)])
    assert "| clean | 100.0 ± 0.0 | 100.0 ± 0.0 |" in capsys.readouterr().out
