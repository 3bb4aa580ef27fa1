"""Tests for attack.py with fake scorers (what the search finds, protects, spends, repeats), then end to end:
evaluate.py --attack against the real stories260K, and the written prompts evaluated."""
import json
import subprocess
import sys

import pytest

import attack
import evaluate
from conftest import ROOT
from perturb import STOPWORDS, WORD_RE, edit_distance, mask

INSTRUCTION = ("Read the movie review below and classify its overall sentiment as 'positive' or 'negative' "
               "for the {sentence} given:")
TRIGGER = "review"


class FakeScorer:
    """Punishes instructions that lost the trigger word (score 1 -> 0.1) and, slightly, longer ones; records
    every batch it is asked to score."""

    def __init__(self, trigger=TRIGGER):
        self.trigger, self.batches = trigger, []

    def __call__(self, instructions):
        self.batches.append(list(instructions))
        return [1.0 - 0.9 * (self.trigger not in WORD_RE.findall(text)) - 1e-3 * len(text)
                for text in instructions]


@pytest.mark.parametrize("kind", ["deepwordbug", "textfooler"])
def test_the_planted_trigger_is_ranked_first_and_edited_first(kind):
    result = attack.attack(INSTRUCTION, kind, FakeScorer(), budget=500, seed=0)
    assert result["words_changed"][0][0] == TRIGGER
    assert TRIGGER not in WORD_RE.findall(result["attacked"])
    assert result["score_after"] < result["score_before"] - 0.8


@pytest.mark.parametrize("kind", attack.ATTACKS)
def test_protected_words_and_stopwords_are_never_edited(kind):
    result = attack.attack(INSTRUCTION, kind, FakeScorer(), budget=500, seed=3)
    for kept in ("'positive'", "'negative'", "{sentence}"):
        assert kept in result["attacked"]
    for old, _ in result["words_changed"]:
        assert old.lower() not in STOPWORDS and old not in ("positive", "negative", "sentence")
    if kind == "deepwordbug":
        assert edit_distance(INSTRUCTION, result["attacked"]) <= attack.MAX_EDIT_DISTANCE


@pytest.mark.parametrize("kind", attack.ATTACKS)
@pytest.mark.parametrize("budget", [1, 2, 7, 30])
def test_the_budget_bounds_the_queries(kind, budget):
    scorer = FakeScorer()
    result = attack.attack(INSTRUCTION, kind, scorer, budget=budget, seed=0)
    assert result["queries"] == sum(map(len, scorer.batches)) <= budget


def test_candidates_are_scored_in_batches():
    scorer = FakeScorer()
    attack.attack(INSTRUCTION, "deepwordbug", scorer, budget=500, seed=0)
    words = [w for w in WORD_RE.findall(mask(INSTRUCTION)[0]) if attack.eligible(w, "deepwordbug")]
    assert len(scorer.batches[1]) == len(words) == 8  # every word's removal in one call; labels are masked
    assert max(map(len, scorer.batches[2:])) > 1  # a word's candidates together


@pytest.mark.parametrize("kind", attack.ATTACKS)
def test_a_search_is_deterministic_for_its_seed(kind):
    runs = [attack.attack(INSTRUCTION, kind, FakeScorer(), budget=100, seed=s) for s in (5, 5, 6)]
    assert runs[0] == runs[1]
    if kind != "textfooler":  # synonym swaps draw nothing at random
        assert runs[0]["attacked"] != runs[2]["attacked"]


def test_checklist_keeps_the_worst_of_its_suffixes():
    batches = []

    def score(texts):  # a fake model that hates the letter z
        batches.append(texts)
        return [-text.lower().count("z") for text in texts]
    result = attack.attack(INSTRUCTION, "checklist", score, budget=50)
    candidates = batches[1]
    scores = score(candidates)
    assert len(candidates) == attack.CANDIDATES
    assert result["attacked"] == candidates[scores.index(min(scores))]
    suffix = result["words_changed"][0][1]
    assert len(suffix) == 10 and suffix.isalnum() and result["attacked"] == f"{INSTRUCTION[:-1]} {suffix}:"


def test_attack_then_evaluate_on_a_real_model(tmp_path, stories_dir):
    clean = {"clean": {"sst2": ["Is this movie review positive or negative? Say 'positive' or 'negative'."]}}
    (tmp_path / "clean.json").write_text(json.dumps(clean))
    out = tmp_path / "attacked"
    flags = ["--base", str(stories_dir), "--glue-dir", str(ROOT / "examples" / "glue_demo"),
             "--tasks", "sst2", "--samples", "4", "--device", "cpu", "--dtype", "fp32"]
    evaluate.main(flags + ["--prompts", str(tmp_path / "clean.json"), "--attack", "deepwordbug,checklist",
                           "--attack-budget", "12", "--attack-examples", "3", "--out", str(out)])
    log = [json.loads(line) for line in (out / "attack_log.jsonl").read_text().splitlines()]
    assert [(r["task"], r["group"]) for r in log] == [("sst2", "deepwordbug"), ("sst2", "checklist")]
    assert all(r["queries"] <= 12 for r in log) and log[0]["score_after"] <= log[0]["score_before"]
    (tmp_path / "typos.json").write_text(json.dumps({"typos": clean["clean"]}))
    with pytest.raises(SystemExit, match="unknown group 'clean'"):  # an attack starts from clean instructions
        evaluate.main(flags + ["--attack", "checklist", "--prompts", str(tmp_path / "typos.json")])
    prompts = json.loads((out / "prompts.json").read_text())
    assert set(prompts) == {"clean", "deepwordbug", "checklist"} and prompts["clean"] == clean["clean"]
    evaluate.main(flags + ["--prompts", str(out / "prompts.json"), "--out", str(tmp_path / "results")])
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert set(results["summary"]["sst2"]) == {"clean", "deepwordbug", "checklist"}


def test_attack_is_torch_free():
    code = "import sys, attack; assert 'torch' not in sys.modules, 'attack.py imported torch'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
