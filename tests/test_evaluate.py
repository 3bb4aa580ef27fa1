"""Tests for evaluate.py: CoIN's draws, inputs and parsing, batching, rank scoring, outputs, resume, errors.

End-to-end runs use the real tiny model ../shared/models/stories260K with a random LoRA adapter, the demo data
in examples/glue_demo and a small prompt file, so each takes about a second on a CPU. Where a test
re-expresses the official code (luka-group/CoIN's promptbench/), it names the file it copies.
"""
import ast
import json
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import evaluate
import perturb
import report
from data import IGNORE_INDEX, tokenize_view
from glue import LABELS, TASKS, load_task
from hf_io import load_model, load_tokenizer, save_adapter
from conftest import assert_decided_beyond_rounding
from model import apply_lora, generate
from tokenizer import Tokenizer

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
                   "--samples", str(samples), "--batch-size", "4", "--dtype", "fp32", *extra])


def read_predictions(results_dir):
    return [json.loads(line) for line in (results_dir / "predictions.jsonl").read_text().splitlines()]


# -----------------------------------------------------------------------------
# Parsing: CoIN's _process_cls_pred (promptbench/inference.py)

INPUT = "Is this review 'positive' or 'negative'?a dull film ### Response:"


def parse(task, answer, input_text=INPUT):
    """parse_answer on an answer decoded as CoIN decodes it: after its input."""
    return evaluate.parse_answer(task, input_text + answer, input_text, answer)


@pytest.mark.parametrize("task, answer, parsed", [
    ("rte", "Not_entailment.", "not_entailment"),
    ("cola", " 'Unacceptable'", "unacceptable"),
    ("cola", "acceptable", "acceptable"),
    ("mnli", " neutral, because", "neutral"),
    ("mnli_matched", "Contradiction", "contradiction"),
    ("mnli", "", None),
    ("sst2", '  "Positive"!\n### Instruction', "positive"),
    ("wnli", "entailment", "entailment"),
    ("qqp", "not_equivalent", "not_equivalent"),
    ("mrpc", "equivalent.", "equivalent"),
    ("rte", "not entailment", None),
    ("rte", "not-entailment", None),
    ("sst2", "The answer is positive", None),
    ("sst2", "...", None),
    # digits: CoIN's LABEL_SET takes '0'/'1' for sst2, qnli, rte and wnli only, as the HF glue ids
    ("sst2", " 1", "positive"), ("sst2", "0", "negative"), ("sst2", "10/10", "positive"),
    ("rte", " 0.", "entailment"), ("rte", "1", "not_entailment"), ("wnli", "1", "entailment"),
    ("qnli", "0", "entailment"), ("mnli", "2", None), ("mnli", "0", None), ("qqp", "1", None),
    ("mrpc", "0", None), ("cola", "1", None),
    # the strip set: backslash, braces and a zero-width space go; * ; ~ typographic quotes and nbsp stay
    ("sst2", "\u200b{\\positive}", "positive"), ("sst2", "*positive*", None), ("sst2", "; positive", None),
    ("sst2", "~positive", None), ("sst2", "\u201cpositive\u201d", None), ("sst2", "\u00a0positive", None),
])
def test_parse_answer(task, answer, parsed):
    assert parse(task, answer) == parsed


def test_parse_answer_reads_what_follows_the_input():
    # lowercased on both sides, so the input is found whatever its case; the instruction's label words are
    # never read, and the answer alone ("?") is not either
    assert evaluate.parse_answer("sst2", INPUT.upper() + " negative", INPUT, "?") == "negative"
    assert evaluate.parse_answer("sst2", INPUT + " Posi<pad>ti</s>ve", INPUT, "?") == "positive"
    # split(input)[1]: what follows the first copy of the input, up to the next one
    assert evaluate.parse_answer("sst2", INPUT + " " + INPUT + " negative", INPUT, "?") is None
    # no input in the decoded text (CoIN would crash): the answer alone
    assert evaluate.parse_answer("sst2", "garbled negative", INPUT, " Positive") == "positive"


def test_the_first_answer_in_coins_order_wins(monkeypatch):
    monkeypatch.setitem(evaluate.ANSWERS, "mnli", (("neutral", 1), ("neutral, because", 2)))
    assert parse("mnli", "neutral, because") == "neutral"  # not the longest
    monkeypatch.setitem(evaluate.ANSWERS, "mnli", (("neutral, because", 2), ("neutral", 1)))
    assert parse("mnli", "neutral, because") == "contradiction"


# The argument of _process_cls_pred's strip() in promptbench/inference.py, as source text.
COIN_STRIP = r'''",._\"\'-+=!?()&^%$#@:\\|\{\}[]<>/`\n\t\r\v\f\u200b "'''


def test_strip_is_coins_literal_as_python_reads_it():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "\{" is an invalid escape: Python warns and keeps the backslash
        coin = ast.literal_eval(COIN_STRIP)
    assert set(evaluate.STRIP) == set(coin) and len(set(coin)) == 36
    assert {"\\", "{", "}", "\u200b", "\v"} <= set(coin) and not {"*", ";", "~", "\u00a0"} & set(coin)


def test_generated_answers_are_decoded_after_their_input(llama_tokenizer_path, monkeypatch):
    tok = Tokenizer(llama_tokenizer_path)
    answers = ["Positive.", "1", "The film is positive", "</s>Negative"]  # the last one: "</s>" as text

    def fake_generate(model, prompts, *args):  # each prompt's answer, then eos
        return [tok.encode(answers[i], bos=False) + [tok.eos_id] for i in range(len(prompts))]
    monkeypatch.setattr(evaluate, "generate_batched", fake_generate)
    texts = [evaluate.build_input("Answer 'positive' or 'negative':", "it 's a fine film . ")] * 4
    assert all(t.lower() in tok.decode(tok.encode(t)).lower() for t in texts)  # the split finds the input
    out = evaluate.predict(None, tok, texts, "sst2", evaluate.EvalConfig())
    assert out == [("Positive.", "positive"), ("1", "positive"), ("The film is positive", None),
                   ("</s>Negative", "negative")]  # CoIN removes "</s>" from the decoded input + answer


# -----------------------------------------------------------------------------
# Samples

def coin_draws(size, n=300, seed=42):
    """CoIN's draws for one task (evaluate.draw_indices' comment): seed_all(42), then, attack by attack,
    promptbench/dataload.py's GLUE(task, n): random.sample(range(len(data)), min(task_to_cnt[task], n))."""
    state, draws = random.getstate(), {}
    random.seed(seed)
    for method in ["clean", "deepwordbug", "textfooler", "checklist", "semantic"]:
        draws[method] = random.sample(range(size), min(size, n))
    random.setstate(state)
    return draws


def test_coin_protocol_replays_coins_draws_for_every_task_and_group(tmp_path):
    sizes = {"rte": 277, "sst2": 872, "qqp": 40430}
    groups = [*evaluate.DRAW_ORDER, "mine"]  # a group CoIN lacks is drawn after CoIN's five
    samples = evaluate.load_or_draw_samples(tmp_path / "s.json", sizes, groups, evaluate.EvalConfig())
    for task, size in sizes.items():
        mine = samples[task].pop("mine")
        assert samples[task] == coin_draws(size)  # every group, in drawn order
        assert len(set(mine)) == min(size, 300) and mine not in samples[task].values()
    assert samples["sst2"]["clean"] != sorted(samples["sst2"]["clean"])
    assert sorted(samples["rte"]["clean"]) == list(range(277))  # min(size, 300)
    saved = json.loads((tmp_path / "s.json").read_text())
    assert (saved["protocol"], saved["seed"], saved["samples"]) == ("coin", 42, 300)
    assert saved["tasks"]["rte"]["size"] == 277 and list(saved["tasks"]["rte"]["indices"]) == groups


def test_paired_protocol_shares_one_sorted_draw_per_task_in_every_process(tmp_path):
    here = evaluate.draw_indices("paired", "rte", 1000, 300, 0, ["clean", "checklist"])
    code = "import evaluate; print(evaluate.draw_indices('paired', 'rte', 1000, 300, 0, ['a'])['a'])"
    env = dict(os.environ, PYTHONHASHSEED="123")  # hash() would differ; the string-seeded RNG must not
    there = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                           check=True)
    assert json.loads(there.stdout) == here["clean"] == here["checklist"]
    assert len(set(here["clean"])) == 300 and here["clean"] == sorted(here["clean"])
    assert evaluate.draw_indices("paired", "rte", 1000, 300, 1, ["a"])["a"] != here["clean"]
    cfg, groups = evaluate.EvalConfig(protocol="paired", seed=0), ["clean", "checklist"]
    both = evaluate.load_or_draw_samples(tmp_path / "a.json", {"rte": 1000, "sst2": 900}, groups, cfg)
    alone = evaluate.load_or_draw_samples(tmp_path / "b.json", {"sst2": 900}, groups, cfg)
    assert both["rte"] == here and both["sst2"] == alone["sst2"]


def test_samples_json_refuses_other_flags_and_sizes(tmp_path):
    path, groups = tmp_path / "samples.json", ["clean"]
    evaluate.load_or_draw_samples(path, {"rte": 1000}, groups, evaluate.EvalConfig())
    for flags, message in (({"protocol": "paired"}, "drawn with --protocol coin; use the same --protocol"),
                           ({"seed": 1}, "drawn with --seed 42"),
                           ({"samples": 30}, "drawn with --samples 300")):
        with pytest.raises(ValueError, match=message):
            evaluate.load_or_draw_samples(path, {"rte": 1000}, groups, evaluate.EvalConfig(**flags))
    with pytest.raises(ValueError, match="rte had 1000 examples when drawn, now 999"):
        evaluate.load_or_draw_samples(path, {"rte": 999}, groups, evaluate.EvalConfig())
    path.write_text(json.dumps({"seed": 42, "samples": 300, "tasks": {}}))  # an older evaluate.py's
    with pytest.raises(ValueError, match="drawn with --protocol [(]unset[)]"):
        evaluate.load_or_draw_samples(path, {"rte": 1000}, groups, evaluate.EvalConfig())


# -----------------------------------------------------------------------------
# Prompts and inputs

def coin_cls_input(prompt, content):
    """promptbench/inference.py's _process_cls_input for contrastive_llama with shot 0, re-expressed."""
    input_text = prompt
    input_text += (content + '### Response:')
    return input_text


def test_coin_input_is_coins_string_byte_for_byte():
    unspaced = "Classify the sentiment as 'positive' or 'negative':"  # 99 of the paper's 240 end so
    sentence = "it 's a charming and often affecting journey . "  # HF glue's sst2 sentences end in a space
    assert evaluate.build_input(unspaced, sentence) == coin_cls_input(unspaced, sentence) == \
        "Classify the sentiment as 'positive' or 'negative':it 's a charming and often affecting journey . " \
        "### Response:"
    spaced, pair = "Does the first entail the second? ", "Sentence 1: A man sings. Sentence 2: He sings."
    assert evaluate.build_input(spaced, pair, "coin") == coin_cls_input(spaced, pair) == \
        "Does the first entail the second? Sentence 1: A man sings. Sentence 2: He sings.### Response:"
    assert evaluate.build_input("Classify it: ", "a fine film", "train") == \
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
    assert_decided_beyond_rounding(model, prompts, reference)
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


def test_rank_mode_in_train_format_scores_the_labels_as_coin_py_trained_them(stories_dir):
    """After "Response:\n" coin.py trained a label as one string with the prompt, without a leading "▁"
    (data.py): rank mode with --format train scores exactly those tokens."""
    model, tok = load_model(stories_dir), load_tokenizer(stories_dir)
    text = evaluate.build_input("Is the review positive or negative?", "What a fine film.", "train")
    scores = evaluate.label_scores(model, tok, [tok.encode(text)], "sst2", 8, "train")[0]  # (K,)
    for k, label in enumerate(LABELS["sst2"]):
        ids, labels, _ = tokenize_view(tok, text, label)
        assert ids[len(tok.encode(text)):] != tok.encode(label, bos=False)  # a word of its own differs
        logp = F.log_softmax(model(torch.tensor([ids])), dim=-1)[0]  # (T, V)
        expected = sum(logp[t - 1, ids[t]] for t in range(len(ids)) if labels[t] != IGNORE_INDEX)
        assert scores[k].item() == pytest.approx(expected.item(), abs=1e-4)


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
    assert (results["protocol"]["protocol"], results["protocol"]["format"]) == ("coin", "coin")
    cell = results["cells"]["sst2/clean/1"]
    assert cell["n"] == 3 and cell["instruction"] == PROMPTS["clean"]["sst2"][1]
    accs = [results["cells"][f"rte/checklist/{p}"]["accuracy"] for p in range(2)]
    assert results["summary"]["rte"]["checklist"]["mean"] == pytest.approx(sum(accs) / 2)
    assert set(results["averages"]["by_category"]["clean"]) == {"Sentiment", "NLI"}
    assert results["averages"]["pooled"]["clean"]["cells"] == 4
    table = (out / "table.md").read_text()
    assert "| group | rte | sst2 | Average | mean task std |" in table and "## Table 1" in table
    assert "## Table 2" in capsys.readouterr().out


def test_groups_of_a_task_get_coins_draws_in_full_runs_and_subsets(ckpt, prompts):
    run_main(ckpt, prompts, "--out", str(ckpt / "both"))
    run_main(ckpt, prompts, "--out", str(ckpt / "one"), "--groups", "checklist")
    both, one = (json.loads((ckpt / d / "samples.json").read_text()) for d in ("both", "one"))
    assert both == one
    for task in ("sst2", "rte"):  # CoIN's draws, every one of them, for any --groups
        assert both["tasks"][task]["indices"] == coin_draws(len(load_task(task, DEMO)), n=3)
    preds = read_predictions(ckpt / "both")
    for task, group in (("sst2", "clean"), ("sst2", "checklist"), ("rte", "checklist")):  # in drawn order
        idx = [p["idx"] for p in preds if (p["task"], p["group"], p["prompt_index"]) == (task, group, 1)]
        assert idx == both["tasks"][task]["indices"][group]
    assert both["tasks"]["sst2"]["indices"]["clean"] != both["tasks"]["sst2"]["indices"]["checklist"]
    same = [p for p in preds if p["group"] == "checklist"]
    assert same == read_predictions(ckpt / "one")  # same examples, same answers


def test_paired_protocol_scores_every_group_on_the_same_examples(ckpt, prompts):
    run_main(ckpt, prompts, "--protocol", "paired", "--groups", "checklist")
    indices = json.loads((ckpt / "results" / "samples.json").read_text())["tasks"]["sst2"]["indices"]
    assert list(indices) == list(evaluate.DRAW_ORDER) and all(i == indices["clean"] for i in indices.values())
    preds = read_predictions(ckpt / "results")
    assert [p["idx"] for p in preds if p["task"] == "sst2"] == indices["clean"] * 2  # two prompts
    results = json.loads((ckpt / "results" / "results.json").read_text())
    assert results["protocol"]["protocol"] == "paired"


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
    with pytest.raises(SystemExit, match="^error: .*drawn with --protocol coin; use the same --protocol"):
        run_main(ckpt, prompts, "--resume", "--protocol", "paired")


def test_rank_mode_is_reported_separately_and_never_invalid(ckpt, prompts):
    run_main(ckpt, prompts, "--mode", "rank", tasks="mnli")
    results = json.loads((ckpt / "results_rank" / "results.json").read_text())
    table = (ckpt / "results_rank" / "table.md").read_text()
    assert results["protocol"]["mode"] == "rank" and "rank" in table
    preds = read_predictions(ckpt / "results_rank")
    assert len(preds) == 2 * 1 * 3 and all(p["pred"] in LABELS["mnli"] for p in preds)
    assert all(p["pred"] == max(p["raw"], key=p["raw"].get) for p in preds)
    assert not (ckpt / "results").exists()


def test_hidden_report_pairs_each_group_with_clean_on_cleans_examples(ckpt, prompts, monkeypatch, capsys):
    given = {}

    def recording_report(model, tokenizer, task, texts, *args):
        given.update(texts)
        return real_report(model, tokenizer, task, texts, *args)
    real_report = evaluate.hidden_report
    monkeypatch.setattr(evaluate, "hidden_report", recording_report)
    run_main(ckpt, prompts, "--hidden-report", "sst2", tasks="all")
    clean = json.loads((ckpt / "results" / "samples.json").read_text())["tasks"]["sst2"]["indices"]["clean"]
    examples = [load_task("sst2", DEMO)[i]["content"] for i in clean]
    for group in ("clean", "checklist"):  # prompt-major, every group on clean's examples
        assert given[group] == [evaluate.build_input(instruction, content)
                                for instruction in PROMPTS[group]["sst2"] for content in examples]
    report = json.loads((ckpt / "results" / "hidden_report.json").read_text())
    cosine = report["cosine_to_clean"]
    assert set(cosine) == {"checklist"} and -1 <= cosine["checklist"] <= 1
    assert {g: len(xy) for g, xy in report["pca"].items()} == {"clean": 2 * 3, "checklist": 2 * 3}
    assert 0 < sum(report["pca_explained_variance"]) <= 1
    assert "sst2 checklist    mean cosine similarity to clean" in capsys.readouterr().out


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
    results = report.summarize(cells, records_for(cells, answers), {"mode": "generate"})
    assert results["summary"]["sst2"]["clean"] == dict(mean=50.0, std=0.0, prompts=2, invalid_rate=25.0,
                                                       pdr=None)
    # example 0 agrees under both prompts, example 1 not
    assert results["consistency"]["sst2"]["clean"] == 50.0
    assert results["averages"]["by_category"]["clean"] == {"Sentiment": 50.0, "NLI": 100.0}
    assert results["averages"]["overall"] == 75.0
    answers["sst2/clean/1"] = [("negative", "positive")] * 2  # 0%: std over prompts is 25 (population)
    results = report.summarize(cells, records_for(cells, answers), {"mode": "generate"})
    assert results["summary"]["sst2"]["clean"]["std"] == 25.0
    # Table 2's Average pools the group's cells 50, 0 and 100: mean 50, population std
    # sqrt((0² + 50² + 50²) / 3) = 40.82; the mean of the task stds is (25 + 0) / 2 = 12.5
    averages = results["averages"]
    assert averages["pooled"]["clean"] == dict(mean=50.0, std=pytest.approx((5000 / 3) ** 0.5), cells=3)
    assert averages["mean_of_task_stds"]["clean"] == 12.5 and averages["by_group"]["clean"] == 62.5
    assert "| clean | 100.0 ± 0.0 | 25.0 ± 25.0 | 50.0 ± 40.8 | 12.5 |" in report.render_tables(results)


def test_pdr_is_promptbenchs_drop_against_the_clean_prompt_of_the_same_index():
    cells = {f"sst2/{g}/{p}": ("sst2", g, p, f"{g} {p}") for g in ("clean", "typos") for p in (0, 1)}
    answers = {"sst2/clean/0": [("positive", "positive")] * 3 + [("negative", "positive")],  # 75%
               "sst2/clean/1": [("negative", "positive")] * 4,  # 0%: no drop rate can be defined
               "sst2/typos/0": [("positive", "positive")] * 2 + [("negative", "positive")] * 2,  # 50%
               "sst2/typos/1": [("positive", "positive")] * 4}  # 100%
    results = report.summarize(cells, records_for(cells, answers), {"mode": "generate"})
    assert results["cells"]["sst2/typos/0"]["pdr"] == pytest.approx(1 - 50 / 75)
    assert results["cells"]["sst2/typos/1"]["pdr"] is None and results["cells"]["sst2/clean/0"]["pdr"] is None
    assert results["summary"]["sst2"]["typos"]["pdr"] == pytest.approx(1 / 3)
    table = report.render_tables(results)
    assert "| typos | 0.33 |" in table and "| sst2 | typos | 0 | typos 0 | 50.0 | 0.33 | 0.0 |" in table


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
        (["--ckpt", str(ckpt), "--prompts", str(tmp_path / "none.json")], "none.json: no such file"),
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
