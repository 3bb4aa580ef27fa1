"""Tests for replicate.py, comparison.py and toy_data.py: disjoint rows, the whole run in miniature, resume,
the report's structure, the toy data rebuilt byte for byte, and one-line errors for bad input."""
import itertools
import json
import math
from pathlib import Path
from statistics import mean

import pytest

import comparison
import plots
import quickstart_numbers
import replicate
import toy_data
from checkpoints import STOPPED
from conftest import ROOT, shared, write_jsonl
from data import load_examples
from diagnostics import read_metrics

TOY = ROOT / "examples" / "toy_glue"
# A run small enough for a test: one layer, few steps, few rows; the shipped toy data and prompt file.
ROWS = ["--eval-rows", "6", "--base-rows", "200", "--tune-groups", "20", "--batch-size", "8",
        "--tune-steps", "2"]
BASE = ["--dim", "32", "--layers", "1", "--vocab", "400", "--base-steps", "4"]  # how --base-seeds trains one


def run(out, *flags, base=BASE):
    replicate.main(["--out", str(out), *ROWS, *base, *flags])
    return json.loads((out / "report.json").read_text())


ARMS = "continual=--no-contrastive; coin=; mean8=--pooling mean --lam 1e8"  # three arms, one with its term on
SEED3 = ["--base-seeds", "0", "--seeds", "3"]  # one base trained here, one adapter seed: 3


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("replicate")
    return out, run(out, *SEED3, "--arms", ARMS)


def texts_of(path):
    return {json.loads(line)["sentence"] for line in Path(path).read_text().splitlines()}


# -----------------------------------------------------------------------------
# Rows: training and evaluation never overlap


@pytest.mark.parametrize("eval_dir", [False, True])
def test_training_and_evaluation_rows_never_overlap(tmp_path, eval_dir):
    flags = dict(train_dir=str(TOY), eval_rows=50, base_rows=300, tune_groups=40)
    if eval_dir:  # an evaluation dir that shares rows with the training split
        (tmp_path / "held").mkdir()
        lines = (TOY / "sst2.jsonl").read_text().splitlines()[:30]
        (tmp_path / "held" / "sst2.jsonl").write_text("\n".join(lines) + "\n")
        flags["eval_dir"] = str(tmp_path / "held")
    cfg = replicate.ReplicateConfig(tasks="sst2", out=str(tmp_path / "run"), base_seeds="0", **flags)
    parts = replicate.split_rows(cfg, "sst2")
    texts = {name: [r["sentence"] for r in rows] for name, rows in parts.items()}
    assert len(texts["eval"]) == (30 if eval_dir else 50) and len(texts["base"]) == 300
    assert len(texts["tune"]) == 80
    for a, b in (("eval", "base"), ("eval", "tune"), ("base", "tune")):
        assert not set(texts[a]) & set(texts[b]), (a, b)
    # and in the files the run trains on: no evaluated sentence is inside any rendered instruction
    _, _, _, templates, _, split, _ = replicate.check(cfg)
    assert split["sst2"] == parts
    replicate.build_data(cfg, split, templates, tmp_path / "data")
    evaluated = texts_of(tmp_path / "data" / "eval" / "sst2.jsonl")
    for name in ("base", "tune"):
        examples, _ = load_examples(tmp_path / "data" / f"{name}.jsonl")
        assert examples and not any(s in e.original or s in e.paraphrase for e in examples for s in evaluated)


def test_the_real_sst2_split_of_the_readme_run_is_disjoint(tmp_path):
    train_dir = shared("glue", "train")
    cfg = replicate.ReplicateConfig(train_dir=str(train_dir), tasks="sst2", out=str(tmp_path),
                                    eval_rows=300, base_rows=30000, tune_groups=1000)
    parts = replicate.split_rows(cfg, "sst2")
    texts = {name: {r["sentence"] for r in rows} for name, rows in parts.items()}
    assert [len(texts[n]) for n in ("eval", "tune", "base")] == [300, 2000, 30000]
    for a, b in (("eval", "tune"), ("eval", "base"), ("tune", "base")):
        assert not texts[a] & texts[b], (a, b)


def test_the_split_is_the_same_for_every_seed_and_run(tmp_path):
    cfg = replicate.ReplicateConfig(tasks="cola", out=str(tmp_path), eval_rows=20, base_rows=100,
                                    tune_groups=10)
    assert replicate.split_rows(cfg, "cola") == replicate.split_rows(cfg, "cola")


# -----------------------------------------------------------------------------
# The whole run in miniature


def test_report_has_every_arm_group_and_task_and_paired_differences(tiny_run):
    out, report = tiny_run
    groups = ["seen template", "clean", "deepwordbug", "textfooler", "checklist", "semantic"]
    assert report["groups"] == groups and report["tasks"] == ["sst2", "cola"] and report["units"] == ["seed3"]
    assert list(report["arms"]) == ["continual", "coin", "mean8"]
    for arm, body in report["arms"].items():
        for g in groups:
            assert 0 <= body["groups"][g]["mean"] <= 100 and body["groups"][g]["std"] >= 0
            assert all(0 <= body["tasks"][t][g]["mean"] <= 100 for t in report["tasks"])
            assert 0 <= body["consistency"][g] <= 100
        assert set(body["hidden_cosine_to_clean"]) == set(groups) - {"seen template", "clean"}
        assert set(body["diagnostics"]) == {f"{name}_{end}" for end in ("first", "last") for name in
                                            ("contrastive_share", "cosine_margin", "weight_capped")}
    assert list(report["minus_continual"]) == ["coin", "mean8"]
    for arm, g in itertools.product(("coin", "mean8"), groups):  # one seed: a difference and no interval
        diff = report["minus_continual"][arm][g]["mean"]
        ours, continual = (report["arms"][a]["groups"][g]["mean"] for a in (arm, "continual"))
        assert diff["ci95"] is None and diff["mean"] == pytest.approx(ours - continual)
    text = (out / "report.md").read_text()
    assert "- continual [95% CI]" in text and "## seen template" in text and "Stages " in text
    assert "| mean8 | `--pooling mean --lam 1e+08` |" in text
    diagnostics = {arm: report["arms"][arm]["diagnostics"] for arm in report["arms"]}
    assert diagnostics["continual"]["contrastive_share_first"] == 0
    assert diagnostics["mean8"]["contrastive_share_first"] == pytest.approx(0.5, abs=1e-6)  # never capped


def test_the_arms_differ_in_their_own_flags_alone(tiny_run):
    out, _ = tiny_run
    arms = ("continual", "coin", "mean8")
    configs = {arm: json.loads((out / "seed3" / arm / "config.json").read_text()) for arm in arms}

    def differing(a, b):
        return {k for k in configs[a] if configs[a][k] != configs[b][k]}
    assert differing("coin", "continual") == {"contrastive"} and configs["coin"]["contrastive"]
    assert differing("mean8", "coin") == {"pooling", "lam"} and configs["mean8"]["lam"] == 1e8
    assert all(config["out"] == "." for config in configs.values())  # each arm's own folder, stored relative
    assert configs["coin"]["base"] == str((out / "bases" / "base0").resolve())
    assert configs["coin"]["seed"] == 3
    metrics = {arm: read_metrics(out / "seed3" / arm) for arm in arms}
    assert all(m["ctr"] == 0 for m in metrics["continual"]) and all(m["ctr"] > 0 for m in metrics["coin"])
    # the same base, data and steps: the first step's generation loss is the same in every arm
    for arm in ("coin", "mean8"):
        assert metrics[arm][0]["gen"] == pytest.approx(metrics["continual"][0]["gen"], rel=1e-6)
        assert len(metrics[arm]) == len(metrics["continual"]) == 2


def test_a_rerun_resumes_from_the_stages_already_done(tiny_run, capsys):
    out, report = tiny_run
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json")
              if not p.name.startswith(("report", "replicate"))}  # the run's own record is rewritten
    again = run(out, *SEED3, "--arms", ARMS)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing recomputed
    assert again["arms"] == report["arms"]
    more = run(out, *SEED3, "--arms", ARMS + "; lam1=--lam 1")  # an arm added: only it is trained
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (out / "seed3" / "lam1" / "trained.json").is_file()
    assert list(more["arms"]) == ["continual", "coin", "mean8", "lam1"]
    assert more["arms"]["coin"] == report["arms"]["coin"]


def test_the_plot_is_drawn_with_matplotlib_and_skipped_without(tiny_run, monkeypatch, tmp_path):
    _, report = tiny_run
    monkeypatch.setattr(plots, "pyplot", lambda: None)  # matplotlib is an optional extra
    assert plots.save_arms_plot(report, tmp_path / "report.png") is None
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    assert plots.save_arms_plot(report, tmp_path / "report.png") == tmp_path / "report.png"
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_with_other_settings_or_a_file_as_out_is_refused(tiny_run, tmp_path):
    out, _ = tiny_run
    with pytest.raises(SystemExit, match="replicate.json: made with other settings; give another --out"):
        run(out, *SEED3, "--arms", ARMS, "--tune-steps", "3")
    with pytest.raises(SystemExit, match="mean8/arm.json: arm mean8 was trained with other flags"):
        run(out, *SEED3, "--arms", "continual=--no-contrastive; mean8=--pooling max")
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit, match="a file, not a directory"):
        run(tmp_path / "a_file", "--base-seeds", "0")


def test_an_interrupted_adapter_stops_the_run_and_is_not_marked_trained(tmp_path, monkeypatch):
    def interrupted(cfg):  # coin.train after a signal: a checkpoint, no adapter, exit status STOPPED
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        raise SystemExit(STOPPED)
    monkeypatch.setattr(replicate, "train", interrupted)
    with pytest.raises(SystemExit) as stopped:
        run(tmp_path, "--base-seeds", "0")
    assert stopped.value.code == STOPPED  # a job script can tell "run me again" from a failure
    assert (tmp_path / "bases" / "base0" / "done.json").is_file()
    assert not (tmp_path / "seed0" / "continual" / "trained.json").exists()


# -----------------------------------------------------------------------------
# Over bases: each base a unit; bases trained here, or loaded as shipped


@pytest.fixture(scope="module")
def two_bases(tmp_path_factory):
    out = tmp_path_factory.mktemp("bases")
    return out, run(out / "built", "--base-seeds", "0,1", "--arms", TWO_ARMS)


TWO_ARMS = "continual=--no-contrastive; coin="


def test_over_several_bases_each_base_is_a_unit_of_the_intervals(two_bases):
    out, report = two_bases
    assert report["units"] == ["base0", "base1"] and report["unit"] == "bases"
    assert report["over"].startswith("2 bases (base0, base1, trained here), adapter seed 0")
    each = report["per_unit"]
    for g in report["groups"]:  # the paired differences are per base, and their interval is over the bases
        diff = report["minus_continual"]["coin"][g]["mean"]
        per_base = [each[u]["coin"]["groups"][g] - each[u]["continual"]["groups"][g] for u in each]
        assert diff["per_unit"] == pytest.approx(per_base) and diff["ci95"] == pytest.approx(
            comparison.interval(per_base)["ci95"])
    units = ("base0", "base1")
    configs = [json.loads((out / "built" / u / "coin" / "config.json").read_text()) for u in units]
    assert [c["base"] for c in configs] == [str((out / "built" / "bases" / u).resolve()) for u in units]
    assert [c["seed"] for c in configs] == [0, 0]  # one adapter seed for every base
    manifest = json.loads((out / "built" / "bases" / "bases.json").read_text())
    assert manifest["settings"] == dict(tasks="sst2,cola", eval_rows=6, base_rows=200, tune_groups=20,
                                        dim=32, layers=1, vocab=400, base_steps=4, base_lr=1e-3, batch_size=8,
                                        cutoff=128)
    text = (out / "built" / "report.md").read_text()
    assert "Over 2 bases (base0, base1, trained here)" in text and "## Per unit: each of the bases" in text


def test_bases_loaded_as_shipped_give_the_numbers_of_the_run_that_trained_them(two_bases):
    out, built = two_bases
    shipped = run(out / "shipped", "--bases", str(out / "built" / "bases"), "--arms", TWO_ARMS, base=[])
    assert shipped["units"] == built["units"] and shipped["over"].startswith("2 bases (base0, base1, in ")
    for key in ("arms", "minus_continual", "per_unit"):  # the same weights, seed and CPU: the same numbers
        assert shipped[key] == built[key], key
    assert shipped["seconds"]["bases"] == {}  # nothing trained but the adapters
    one = run(out / "one", "--bases", str(out / "built" / "bases" / "base1"), "--seeds", "0,5", "--arms",
              TWO_ARMS, base=[])  # one base of them: the unit is the adapter seed
    assert one["units"] == ["seed0", "seed5"] and one["unit"] == "adapter seeds"
    assert one["over"].startswith("2 adapter seeds (seed0, seed5) on one base (")
    assert one["per_unit"]["seed0"] == built["per_unit"]["base1"]


def test_bases_are_refused_for_rows_other_than_those_they_learned_from(two_bases, tmp_path):
    out, _ = two_bases
    for flags in (["--base-rows", "300"], ["--eval-rows", "8"], ["--tune-groups", "21"], ["--tasks", "sst2"]):
        argv = ["--out", str(tmp_path / "run"), *ROWS, "--bases", str(out / "built" / "bases"), *flags]
        with pytest.raises(SystemExit, match=r"learned from other rows than this run's base rows \(they were "
                                             "built with --tasks sst2,cola --eval-rows 6 --base-rows 200"):
            replicate.main(argv)
        assert not (tmp_path / "run").exists()  # refused before anything is written


def test_intervals_over_units_are_students_t():
    values = [1.0, 2.0, 4.0]
    out = comparison.interval(values)
    half = 4.303 * math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2) / math.sqrt(3)
    assert out["mean"] == pytest.approx(7 / 3) and out["ci95"] == pytest.approx([7 / 3 - half, 7 / 3 + half])
    assert comparison.interval([2.0])["ci95"] is None


# -----------------------------------------------------------------------------
# A shipped base gives every CPU the committed numbers, within what rounding can change


@pytest.fixture(scope="module")
def base0_runs(tmp_path_factory):
    """The numbers of a two-arm run on examples/toy_bases/base0 as it is, and with every layer, logit and
    cross-entropy moved by its rounding bound: another CPU, emulated (tests/quickstart_numbers.py)."""
    plain, moved = tmp_path_factory.mktemp("plain"), tmp_path_factory.mktemp("moved")
    replicate.main(["--out", str(plain), *quickstart_numbers.ARGS])
    with quickstart_numbers.moved_rounding():
        replicate.main(["--out", str(moved), *quickstart_numbers.ARGS])
    return quickstart_numbers.numbers(plain), quickstart_numbers.numbers(moved)


def test_a_shipped_base_gives_the_committed_answers_within_what_rounding_changes(base0_runs):
    """Each answer's margin and each cell's accuracy, against the file written by the same code
    (tests/quickstart_numbers.py). A CPU that rounds as far as fp32 lets it moves an arm's margins by D
    (plain against moved); two CPUs differ by at most 2D. So an answer whose committed margin is beyond 2D
    keeps its sign, and an accuracy may differ only by the answers within 2D of zero."""
    plain, moved = base0_runs
    expected = json.loads(quickstart_numbers.EXPECTED.read_text())
    assert plain.keys() == expected.keys() == {"continual", "coin"}
    free = total = 0
    for arm, want in expected.items():
        got, far = plain[arm], moved[arm]
        d = max(max(abs(x - y) for x, y in zip(got["margins"][cell], far["margins"][cell]))
                for cell in got["margins"])
        assert 0 < d < 0.5, (arm, d)  # rounding moves the answers, by less than most are decided by
        for cell, margins in want["margins"].items():
            near = [abs(m) <= 2 * d for m in margins]  # the answers another CPU's rounding may flip
            kept = [(m > 0) == (g > 0) for m, g in zip(margins, got["margins"][cell])]
            assert all(k or n for k, n in zip(kept, near)), (arm, cell, 2 * d)
            moved_by = abs(got["accuracy"][cell] - want["accuracy"][cell])
            assert moved_by <= 100 * sum(near) / len(margins) + 1e-9, (arm, cell)
            free, total = free + sum(near), total + len(margins)
    assert free <= 0.1 * total, (free, total)  # the tolerance leaves nine answers in ten decided: it can fail


# -----------------------------------------------------------------------------
# The toy data and bad input


def test_toy_data_is_rebuilt_byte_for_byte(tmp_path):
    toy_data.main(["--out", str(tmp_path), "--rows", "4000", "--seed", "0"])
    for task in ("sst2", "cola"):
        assert (tmp_path / f"{task}.jsonl").read_bytes() == (TOY / f"{task}.jsonl").read_bytes()


def grammatical(clause):
    """The toy grammar, re-expressed: a clause is a subject, a verb, then the rest."""
    return any(clause.startswith(f"{subject} {verb} ") for subject in toy_data.SUBJECTS
               for verb in toy_data.VERBS)


def test_the_toy_tasks_share_their_sentences_and_each_label_follows_its_rule():
    sst2, cola = ([json.loads(line) for line in (TOY / f"{task}.jsonl").read_text().splitlines()]
                  for task in ("sst2", "cola"))
    assert [r["sentence"] for r in sst2] == [r["sentence"] for r in cola]  # only the instruction differs
    for sentiment, grammar in zip(sst2, cola):
        text = sentiment["sentence"].removesuffix(" .")
        clauses = text.removeprefix("although ").split(", ") if text.startswith("although ") else [text]
        assert any(w in clauses[-1].split() for w in toy_data.POSITIVE) == (sentiment["label"] == 1), text
        assert all(map(grammatical, clauses)) == (grammar["label"] == 1), text
    for rows in (sst2, cola):  # balanced labels, and sentiment and grammar independent of each other
        assert 0.45 < mean(r["label"] for r in rows) < 0.55
    both = mean(s["label"] == 1 and c["label"] == 1 for s, c in zip(sst2, cola))
    assert abs(both - 0.25) < 0.03


def test_tasks_on_the_same_sentences_split_them_alike(tmp_path):
    cfg = replicate.ReplicateConfig(out=str(tmp_path))  # the toy tasks: the same sentences
    parts = {task: replicate.split_rows(cfg, task) for task in ("sst2", "cola")}
    for name in ("eval", "tune", "base"):
        assert [r["sentence"] for r in parts["sst2"][name]] == [r["sentence"] for r in parts["cola"][name]]


def bad_cases(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "unlabelled").mkdir()
    write_jsonl(tmp_path / "unlabelled" / "sst2.jsonl", [{"sentence": "a fine film", "label": -1}])
    (tmp_path / "other.json").write_text(json.dumps({"rte": [["{premise}", "{answer}"]]}))
    (tmp_path / "typos.json").write_text(json.dumps({"typos": {"sst2": ["Good?"], "cola": ["Right?"]}}))
    return [
        (["--train-dir", str(tmp_path / "empty")], "empty/sst2.jsonl: no sst2 split in --train-dir"),
        (["--eval-dir", str(tmp_path / "unlabelled"), "--tasks", "sst2"],
         "unlabelled/sst2.jsonl:1: no label (-1)"),
        (["--tasks", "mrpc"], "--tasks: mrpc is out of range: it must be a comma list of sst2, cola: the"),
        (["--seeds", "1,1"], "argument --seeds: 1,1 is out of range"),
        (["--templates", str(tmp_path / "other.json")], "other.json: no templates for 'sst2'"),
        (["--eval-rows", "5000"], "leave fewer than 100 for the base"),
        (["--prompts", str(tmp_path / "typos.json")], "typos.json: no 'clean' group"),
        (["--arms", "coin=; mean=--pooling mean"], "--arms: no arm named continual, which every other arm"),
        (["--arms", "continual=--no-contrastive; a/b=--lam 10"], "--arms: 'a/b=--lam 10' is not name=flags"),
        (["--arms", "continual=--no-contrastive; coin=; coin=--lam 1"], "'coin=--lam 1' is not name=flags"),
        (["--arms", "continual=--no-contrastive; x=--lam 0"], "arm x: argument --lam: 0 is out of range"),
        (["--arms", "continual=--no-contrastive; x=--unknown 1"], "arm x: unrecognized arguments: --unknown"),
        (["--arms", "continual=--seed 3"], "arm continual: --seed is replicate.py's to set, the same for"),
        (["--arms", "continual=--lr '1e-3"], "arm continual: No closing quotation"),
        (["--seeds", "0,1"], "--seeds 0,1: over 3 bases each base is a unit, and its adapters all have one"),
        (["--base-seeds", "0,0"], "argument --base-seeds: 0,0 is out of range"),
        (["--dim", "64"], "--dim: sets how --base-seeds trains a base; the bases of --bases were built"),
        (["--base-seeds", "0", "--bases", str(TOY)], "--bases and --base-seeds: give one"),
        (["--bases", str(tmp_path / "empty")], "empty: no base<N>/ folders with bases.json beside them"),
        (["--base-rows", "2000"], "toy_bases: its bases learned from other rows than this run's base rows"),
    ]


def test_bad_input_gives_a_one_line_error_before_any_work(tmp_path):
    for flags, message in bad_cases(tmp_path):
        with pytest.raises(SystemExit) as error:
            replicate.main(["--out", str(tmp_path / "run"), *flags])
        text = str(error.value)
        assert text.startswith("error: ") and message in text and "\n" not in text, (flags, text)
        assert not (tmp_path / "run").exists()
