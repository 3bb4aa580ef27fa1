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
                                 {"mode": "generate", "protocol": "coin"})
    (tmp_path / "results.json").write_text(json.dumps(results))
    report.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert out.startswith("# Results (generate, protocol coin)")
    assert "| group | rte | Average | mean task std |" in out
    assert "| clean | 100.0 ± 0.0 | 100.0 ± 0.0 | 0.0 |" in out


def test_table2_average_pools_all_cells_of_a_group():
    """CoIN's Table 2 Average: mean ± population std over every task x prompt cell, not the mean of the
    task stds."""
    cells = {"sst2/clean/0": ("sst2", "clean", 0, "a"), "sst2/clean/1": ("sst2", "clean", 1, "b"),
             "rte/clean/0": ("rte", "clean", 0, "c"), "rte/clean/1": ("rte", "clean", 1, "d")}
    right = ("positive", "positive")
    answers = {"sst2/clean/0": [right] * 4, "sst2/clean/1": [right] * 4,  # 100, 100: std 0
               "rte/clean/0": [("entailment", "entailment")] * 2 + [(None, "entailment")] * 2,  # 50
               "rte/clean/1": [(None, "entailment")] * 4}  # 0: rte's std is 25
    results = evaluate.summarize(cells, records_for(cells, answers), {"mode": "generate"})
    # cells 100, 100, 50, 0: mean 62.5; deviations 37.5, 37.5, -12.5, -62.5: variance
    # (1406.25 * 2 + 156.25 + 3906.25) / 4 = 1718.75, std 41.46; mean of task stds (0 + 25) / 2 = 12.5
    table = report.render_tables(results)
    assert "| clean | 25.0 ± 25.0 | 100.0 ± 0.0 | 62.5 ± 41.5 | 12.5 |" in table
