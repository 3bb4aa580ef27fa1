"""Tests for evaluate.py: parsing, samples, batching, rank scoring, outputs, resume and errors.

End-to-end runs use the real tiny model ../shared/models/stories260K with a random LoRA adapter, the demo data
in examples/glue_demo and a small prompt file, so each takes about a second on a CPU.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import evaluate
import perturb
import report
from glue import LABELS, TASKS, load_task
from hf_io import load_model, load_tokenizer, save_adapter
from model import apply_lora, generate

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "glue_demo"
PROMPTS = {  # two groups, two instructions per task; mnli's serve mnli_matched and mnli_mismatched
    "clean": {"sst2": ["Is this review 'positive' or 'negative'?",
                       "Classify the tone: 'positive' or 'negative'."],
              "rte": ["Answer 'entailment' or 'not_entailment'.", "Does sentence 1 entail sentence 2?"],
              "mnli": ["Answer 'entailment', 'neutral' or 'contradiction'."]},
    "checklist": {"sst2": ["Is this review 'positive' or 'negative'? Xq3TtV0pLm",
                           "Classify the tone Ab12Cd34Ef:"],
                  "rte": ["Answer 'entailment' or 'not_entailment'. zz91KKq0aa",
                          "Does sentence 1 entail it? K"],
                  "mnli": ["Answer 'entailment', 'neutral' or 'contradiction'. 0aB1cD2eF3"]},
}


@pytest.fixture
def ckpt(tmp_path, stories_dir):
    """A coin.py-style output dir: a peft adapter (random, non-zero B) + config.json naming the base model."""
    model = load_model(stories_dir)
    apply_lora(model, r=4, alpha=8)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    out = tmp_path / "out"
    save_adapter(model, out)
    (out / "config.json").write_text(json.dumps({"base": str(stories_dir)}))
    return out


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(PROMPTS))
    return path


def run_main(ckpt, prompts, *extra, tasks="sst2,rte", samples=3):
    evaluate.main(["--ckpt", str(ckpt), "--glue-dir", str(DEMO), "--prompts", str(prompts), "--tasks", tasks,
                   "--samples", str(samples), "--batch-size", "4", *extra])


def read_predictions(results_dir):
    return [json.loads(line) for line in (results_dir / "predictions.jsonl").read_text().splitlines()]


# -----------------------------------------------------------------------------
# Labels and parsing


@pytest.mark.parametrize("generated, labels, parsed", [
    ("Not_entailment.", LABELS["rte"], "not_entailment"),
    ("'Unacceptable'", LABELS["cola"], "unacceptable"),
    ("acceptable", LABELS["cola"], "acceptable"),
    ("neutral, because", LABELS["mnli"], "neutral"),
    ("", LABELS["mnli"], None),
    ("  \"Positive\"!\n### Instruction", LABELS["sst2"], "positive"),
    ("entailment", LABELS["wnli"], "entailment"),
    ("not_equivalent", LABELS["qqp"], "not_equivalent"),
    ("equivalent.", LABELS["mrpc"], "equivalent"),
    ("not entailment", LABELS["rte"], None),  # the strict reading (module docstring)
    ("not-entailment", LABELS["rte"], None),
    ("The answer is positive", LABELS["sst2"], None),
    ("...", LABELS["sst2"], None),
])
def test_parse_label(generated, labels, parsed):
    assert evaluate.parse_label(generated, labels) == parsed


def test_parse_label_tries_the_longest_label_first():
    assert evaluate.parse_label("ab", ("a", "ab")) == "ab"
    assert evaluate.parse_label("a b", ("a", "ab")) == "a"


# -----------------------------------------------------------------------------
# Samples

def test_samples_are_stable_across_processes_and_independent_of_other_tasks(tmp_path):
    here = evaluate.draw_indices("rte", 1000, 300, 0)
    code = "import evaluate; print(evaluate.draw_indices('rte', 1000, 300, 0))"
    env = dict(os.environ, PYTHONHASHSEED="123")  # hash() would differ; the string-seeded RNG must not
    there = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                           check=True)
    assert json.loads(there.stdout) == here
    assert len(here) == len(set(here)) == 300 and here == sorted(here)
    assert evaluate.draw_indices("rte", 20, 300, 0) == list(range(20))  # min(300, size)
    assert evaluate.draw_indices("rte", 1000, 300, 1) != here
    both = evaluate.load_or_draw_samples(tmp_path / "a.json", {"rte": 1000, "sst2": 900}, 300, 0)
    alone = evaluate.load_or_draw_samples(tmp_path / "b.json", {"sst2": 900}, 300, 0)
    assert both["rte"] == here and both["sst2"] == alone["sst2"]
    with pytest.raises(ValueError, match="drawn with --seed 0"):
        evaluate.load_or_draw_samples(tmp_path / "a.json", {"rte": 1000}, 300, 1)
    with pytest.raises(ValueError, match="rte had 1000 examples when drawn, now 999"):
        evaluate.load_or_draw_samples(tmp_path / "a.json", {"rte": 999}, 300, 0)


# -----------------------------------------------------------------------------
# Prompts and inputs


def test_inputs_in_the_paper_and_training_formats():
    paper = evaluate.build_input("Classify it: ", "a fine film", "paper")
    assert paper == "Classify it: a fine film ### Response:"
    assert evaluate.build_input("Classify it:", "a fine film", "train") == \
        "Classify it: a fine film\n\n### Response:\n"


def test_mnli_instructions_serve_its_parts_and_bad_prompt_files_are_refused(tmp_path):
    assert evaluate.instructions(PROMPTS, "clean", "mnli_matched") == PROMPTS["clean"]["mnli"]
    shipped = evaluate.load_prompt_set(evaluate.DEFAULT_PROMPTS)
    assert set(shipped) == set(perturb.LEVELS)
    assert len(evaluate.plan_cells(shipped, TASKS, list(shipped))) == 10 * 5 * 6
    for bad in ({"clean": ["a list, not a dict of tasks"]}, {"clean": {"sst2": []}}, {"clean": {"sst2": [3]}},
                []):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="expected {group: {task: "):
            evaluate.load_prompt_set(tmp_path / "bad.json")


# -----------------------------------------------------------------------------
# Batched generation and rank scoring on a real model


def test_batched_generation_matches_one_at_a_time_token_for_token(stories_dir):
    model, tok = load_model(stories_dir), load_tokenizer(stories_dir)
    examples = load_task("rte", DEMO)[:6] + load_task("sst2", DEMO)[:6]
    prompts = [tok.encode(evaluate.build_input(PROMPTS["clean"]["rte"][0], ex["content"])) for ex in examples]
    prompts.append(tok.encode("A different instruction: no shared prefix beyond BOS"))
    assert len({len(p) for p in prompts}) > 6  # lengths differ, so batches are left-padded
    # the reference: model.py, one prompt at a time
    reference = [generate(model, [p], 7, tok.eos_id, tok.pad_id)[0] for p in prompts]
    for batch_size in (1, 4, 13):  # 13: one batch, whose common prefix is BOS alone
        assert evaluate.generate_batched(model, prompts, batch_size, 7, tok.eos_id, tok.pad_id) == reference
    assert all(len(new) == 7 or new[-1] == tok.eos_id for new in reference)


def test_rank_scores_equal_the_log_likelihood_of_each_row_alone(stories_dir):
    model, tok = load_model(stories_dir), load_tokenizer(stories_dir)
    prompts = [tok.encode("Once upon a time"), tok.encode("The cat sat on the mat. ### Response:")]
    labels = [tok.encode(w, bos=False) for w in ("entailment", "neutral", "not_entailment")]
    scores = evaluate.rank_scores(model, prompts, labels, tok.pad_id)
    for b, p in enumerate(prompts):
        for k, c in enumerate(labels):
            logp = F.log_softmax(model(torch.tensor([p + c])), dim=-1)[0]  # (T, V)
            expected = sum(logp[len(p) - 1 + j, t] for j, t in enumerate(c))
            assert scores[b, k].item() == pytest.approx(expected.item(), abs=1e-4)


# -----------------------------------------------------------------------------
# End to end: outputs, resume, other modes


def test_end_to_end_writes_predictions_results_and_tables(ckpt, prompts, capsys):
    run_main(ckpt, prompts)
    out = ckpt / "results"  # the default: inside the checkpoint dir
    preds = read_predictions(out)
    assert len(preds) == 2 * 2 * 2 * 3  # tasks x groups x prompts x samples
    assert set(preds[0]) == {"task", "group", "prompt_index", "idx", "raw", "pred", "gold"}
    assert all(p["pred"] in (None, *LABELS[p["task"]]) for p in preds)
    results = json.loads((out / "results.json").read_text())
    assert len(results["cells"]) == 8 and results["protocol"]["mode"] == "generate"
    cell = results["cells"]["sst2/clean/1"]
    assert cell["n"] == 3 and cell["instruction"] == PROMPTS["clean"]["sst2"][1]
    accs = [results["cells"][f"rte/checklist/{p}"]["accuracy"] for p in range(2)]
    assert results["summary"]["rte"]["checklist"]["mean"] == pytest.approx(sum(accs) / 2)
    assert set(results["averages"]["by_category"]["clean"]) == {"Sentiment", "NLI"}
    table = (out / "table.md").read_text()
    assert "| group | rte | sst2 | Average |" in table and "## Table 1" in table and " ± " in table
    assert "## Table 2" in capsys.readouterr().out


def test_samples_are_the_same_across_runs_and_subsets_of_groups(ckpt, prompts):
    run_main(ckpt, prompts, "--out", str(ckpt / "both"))
    run_main(ckpt, prompts, "--out", str(ckpt / "one"), "--groups", "checklist")
    both, one = (json.loads((ckpt / d / "samples.json").read_text()) for d in ("both", "one"))
    assert both == one
    same = [p for p in read_predictions(ckpt / "both") if p["group"] == "checklist"]
    assert same == read_predictions(ckpt / "one")  # same examples, same answers


def test_resume_recomputes_only_unfinished_cells(ckpt, prompts, monkeypatch):
    run_main(ckpt, prompts)
    out = ckpt / "results"
    first = read_predictions(out)
    kept = [p for p in first if (p["task"], p["group"], p["prompt_index"]) != ("rte", "checklist", 1)]
    (out / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in kept))  # as if interrupted
    generated = []

    def counting_generate(model, prompts, *args):
        generated.extend(prompts)
        return real_generate(model, prompts, *args)
    real_generate = evaluate.generate
    monkeypatch.setattr(evaluate, "generate", counting_generate)
    run_main(ckpt, prompts, "--resume")
    assert len(generated) == 3  # one cell of 3 examples
    assert read_predictions(out) == first
    run_main(ckpt, prompts, "--resume", "--tasks", "sst2")  # nothing left to do; rte's cells are kept
    assert len(generated) == 3 and read_predictions(out) == first
    with pytest.raises(SystemExit, match="made with max_new_tokens=7, now 3"):
        run_main(ckpt, prompts, "--resume", "--max-new-tokens", "3")


def test_rank_mode_is_reported_separately_and_never_invalid(ckpt, prompts):
    run_main(ckpt, prompts, "--mode", "rank", tasks="mnli")
    results = json.loads((ckpt / "results_rank" / "results.json").read_text())
    table = (ckpt / "results_rank" / "table.md").read_text()
    assert results["protocol"]["mode"] == "rank" and "rank" in table
    preds = read_predictions(ckpt / "results_rank")
    assert len(preds) == 2 * 1 * 3 and all(p["pred"] in LABELS["mnli"] for p in preds)
    assert all(p["pred"] == max(p["raw"], key=p["raw"].get) for p in preds)
    assert not (ckpt / "results").exists()


def test_hidden_report_pairs_each_group_with_clean(ckpt, prompts):
    run_main(ckpt, prompts, "--hidden-report", "sst2", tasks="all")
    report = json.loads((ckpt / "results" / "hidden_report.json").read_text())
    cosine = report["cosine_to_clean"]
    assert set(cosine) == {"checklist"} and -1 <= cosine["checklist"] <= 1
    assert {g: len(xy) for g, xy in report["pca"].items()} == {"clean": 2 * 3, "checklist": 2 * 3}
    assert 0 < sum(report["pca_explained_variance"]) <= 1


# -----------------------------------------------------------------------------
# Aggregation on hand-made records


def records_for(cells, answers):
    """{cell key: records} from {cell key: [(pred, gold), ...]}."""
    return {k: [dict(task=cells[k][0], group=cells[k][1], prompt_index=cells[k][2], idx=i, raw="", pred=p,
                     gold=g)
                for i, (p, g) in enumerate(answers[k])] for k in cells}


def test_summary_means_population_std_consistency_and_categories():
    cells = {"sst2/clean/0": ("sst2", "clean", 0, "a"), "sst2/clean/1": ("sst2", "clean", 1, "b"),
             "rte/clean/0": ("rte", "clean", 0, "c")}
    answers = {"sst2/clean/0": [("positive", "positive"), ("negative", "positive")],  # 50%
               "sst2/clean/1": [("positive", "positive"), (None, "positive")],  # 50%, one invalid
               "rte/clean/0": [("entailment", "entailment"), ("entailment", "entailment")]}  # 100%
    results = evaluate.summarize(cells, records_for(cells, answers), {"mode": "generate"})
    assert results["summary"]["sst2"]["clean"] == dict(mean=50.0, std=0.0, prompts=2, invalid_rate=25.0)
    # example 0 agrees under both prompts, example 1 not
    assert results["consistency"]["sst2"]["clean"] == 50.0
    assert results["averages"]["by_category"]["clean"] == {"Sentiment": 50.0, "NLI": 100.0}
    assert results["averages"]["overall"] == 75.0
    answers["sst2/clean/1"] = [("negative", "positive")] * 2  # 0%: std over prompts is 25 (population)
    results = evaluate.summarize(cells, records_for(cells, answers), {"mode": "generate"})
    assert results["summary"]["sst2"]["clean"]["std"] == 25.0
    assert "| clean | 100.0 ± 0.0 | 25.0 ± 25.0 | 62.5 ± 12.5 |" in report.render_tables(results)


# -----------------------------------------------------------------------------
# Bad input: one line, non-zero exit


def test_bad_input_gives_a_one_line_error(ckpt, prompts, tmp_path):
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text("{}")
    (tmp_path / "flat.json").write_text(json.dumps({"sst2": ["a list where a group should be"]}))
    (tmp_path / "test_split").mkdir()
    (tmp_path / "test_split" / "sst2.jsonl").write_text('{"sentence": "x", "label": -1, "idx": 0}\n')
    sst2 = ["--ckpt", str(ckpt), "--prompts", str(prompts), "--tasks", "sst2"]
    cases = [
        (["--ckpt", str(tmp_path / "bare")], "lacks adapter_config.json and adapter_model.safetensors"),
        (["--ckpt", str(tmp_path / "nowhere")], "checkpoint dir not found"),
        (["--ckpt", str(ckpt), "--prompts", str(tmp_path / "none.json")], "prompt file not found"),
        (["--ckpt", str(ckpt), "--prompts", str(tmp_path / "flat.json")], "expected {group: {task:"),
        (["--ckpt", str(ckpt), "--prompts", str(prompts), "--tasks", "sst3"], "unknown task 'sst3'"),
        (["--ckpt", str(ckpt), "--prompts", str(prompts), "--tasks", "cola"], "no instructions for cola"),
        ([*sst2, "--glue-dir", str(tmp_path / "test_split")], "no label (-1): test splits have none"),
        ([*sst2, "--glue-dir", str(tmp_path)], "no sst2.jsonl nor SST-2/dev.tsv"),
        (["--base", str(tmp_path / "nowhere"), "--prompts", str(prompts), "--tasks", "sst2",
          "--glue-dir", str(DEMO)],
         "not found"),
        ([], "give --ckpt OUT_DIR, or --base"),
        (["--ckpt", str(ckpt), "--samples", "0"], "must be at least 1"),
        (["--ckpt", str(ckpt), "--mode", "vote"], "argument --mode: invalid choice: 'vote'"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            evaluate.main(argv)
        text = str(info.value.code)
        assert text.startswith("error: ") and "\n" not in text and message in text, (argv, text)
