"""Tests for perturb.py: protected spans, determinism, strength, formats, the CLI and its errors, and
copying PromptBench's precomputed prompts out of its config.py.

Offline, no nltk.
"""
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import perturb
from glue import LABELS

ROOT = Path(__file__).resolve().parents[1]
CLEAN_FILE = ROOT / "prompts" / "clean.json"
PERTURBED_FILE = ROOT / "prompts" / "perturbed.json"
QUOTED = re.compile(r"'[^']+'")


def shipped():
    """[(task, instruction)] for every shipped clean instruction."""
    return [(task, s) for task, items in perturb.load_prompts(CLEAN_FILE).items() for s in items]


def changed_pairs(a, b):
    """Word pairs that differ between two instructions with the same number of words."""
    assert len(a.split()) == len(b.split()), (a, b)
    return [(x, y) for x, y in zip(a.split(), b.split()) if x != y]


# -----------------------------------------------------------------------------
# Shipped instructions and protected spans


def test_shipped_instructions_are_six_per_glue_task_and_quote_every_label_word():
    prompts = perturb.load_prompts(CLEAN_FILE)
    assert set(prompts) == {"cola", "sst2", "qqp", "mrpc", "mnli", "qnli", "rte", "wnli"}
    for task, items in prompts.items():
        assert len(items) == len(set(items)) == 6
        for s in items:
            assert all(f"'{w}'" in s for w in LABELS[task]), (task, s)


@pytest.mark.parametrize("level", perturb.LEVELS[1:])
def test_quoted_label_words_survive_1000_seeds_of_every_shipped_instruction(level):
    for task, s in shipped():
        options = sorted(QUOTED.findall(s))
        for seed in range(1000):
            out = perturb.perturb(s, level, seed, LABELS[task])
            assert sorted(QUOTED.findall(out)) == options, (level, seed, s, out)


def test_unquoted_label_words_placeholders_and_extra_spans_are_protected():
    s = ("Decide whether the {sentence} sounds Positive or negative to a careful reader, "
         "then classify its tone.")
    keep = ["{sentence}", "Positive", "negative", "careful reader"]
    for level in perturb.LEVELS[1:]:
        for seed in range(300):
            out = perturb.perturb(s, level, seed, protected="careful reader")  # one span, given as a str
            assert all(k in out for k in keep), (level, seed, out)


# -----------------------------------------------------------------------------
# Determinism and change


def test_output_is_fixed_by_instruction_level_and_seed_even_across_processes():
    s = shipped()[7][1]
    ours = [perturb.perturb(s, level, 3) for level in perturb.LEVELS]
    code = f"import perturb; print(repr([perturb.perturb({s!r}, l, 3) for l in perturb.LEVELS]))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a salted hash() would give a different result here
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                           check=True)
    assert other.stdout.strip() == repr(ours)
    assert ours == [perturb.perturb(s, level, 3) for level in perturb.LEVELS]


@pytest.mark.parametrize("level, at_least", [("deepwordbug", 18), ("textfooler", 12), ("checklist", 20),
                                             ("semantic", 3)])
def test_different_seeds_give_different_perturbations(level, at_least):
    for _, s in shipped()[::5]:
        assert len({perturb.perturb(s, level, seed) for seed in range(20)}) >= at_least, s


def test_every_level_changes_the_text_and_clean_is_the_identity():
    for _, s in shipped():
        for seed in range(30):
            assert perturb.perturb(s, "clean", seed) == s
            assert all(perturb.perturb(s, level, seed) != s for level in perturb.LEVELS[1:]), (seed, s)


# -----------------------------------------------------------------------------
# Each level does what it says


def test_checklist_token_is_10_alphanumerics_at_the_end_or_before_a_closing_colon_or_period():
    cases = shipped() + [("sst2", "Is the review 'positive' or 'negative'?")]
    assert {s[-1] for _, s in cases} == {":", ".", "?"}  # all three placements are exercised
    for _, s in cases:
        for seed in range(20):
            out = perturb.perturb(s, "checklist", seed)
            head, end = (s[:-1], s[-1]) if s[-1] in ":." else (s, "")
            assert re.fullmatch(re.escape(head) + r" [A-Za-z0-9]{10}" + re.escape(end), out), out


def test_deepwordbug_gives_about_40_percent_of_words_one_or_two_character_edits():
    n_words, pairs = 0, []
    for _, s in shipped():
        for seed in range(10):
            pairs += changed_pairs(s, perturb.perturb(s, "deepwordbug", seed))
            n_words += len(s.split())
    assert 0.35 <= len(pairs) / n_words <= 0.45
    distances = [perturb.edit_distance(a, b) for a, b in pairs]
    assert all(1 <= d <= 4 for d in distances)  # a swap costs 2, so two edits cost at most 4
    # One edit costs at most 2 and changes the length by at most 1; some words must show a second edit.
    assert any(d >= 3 or abs(len(a) - len(b)) == 2 for d, (a, b) in zip(distances, pairs))


def test_textfooler_replaces_about_30_percent_of_words_with_table_synonyms():
    n_words = n_changed = 0
    for _, s in shipped():
        for seed in range(10):
            pairs = changed_pairs(s, perturb.perturb(s, "textfooler", seed))
            for a, b in pairs:
                a, b = re.sub(r"\W", "", a), re.sub(r"\W", "", b)
                assert b.lower() in perturb.SYNONYMS[a.lower()] and b[0].isupper() == a[0].isupper(), (a, b)
            n_words, n_changed = n_words + len(s.split()), n_changed + len(pairs)
    assert 0.25 <= n_changed / n_words <= 0.35


def test_rate_is_a_fraction_of_all_words_capped_by_the_eligible_ones():
    s = shipped()[0][1]  # 20 words: 11 can take a typo, 6 are in the synonym table

    def n_changed(level, rate):
        return len(changed_pairs(s, perturb.perturb(s, level, 0, rate=rate)))
    assert [n_changed("deepwordbug", rate) for rate in (0.1, 0.5, 1.0)] == [2, 10, 11]
    assert [n_changed("textfooler", rate) for rate in (0.1, 0.2, 0.5)] == [2, 4, 6]
    with pytest.raises(ValueError, match=r"rate for textfooler must be in \(0, 1\], got 1.5"):
        perturb.perturb(s, "textfooler", 0, rate=1.5)


def test_synonym_table_covers_instruction_vocabulary_with_real_words_that_are_not_label_words():
    vocabulary = """determine analyze classify evaluate identify sentence statement text respond answer given
    following whether decide label pair question provide choose select indicate assess judge examine review
    check read please input passage meaning""".split()
    assert set(vocabulary) <= set(perturb.SYNONYMS)
    for word, options in perturb.SYNONYMS.items():
        for option in options:
            assert option.isalpha() and option.islower() and option != word, (word, option)
            assert option not in perturb.ALL_LABEL_WORDS


def test_semantic_reorders_clauses_switches_mood_and_swaps_phrases():
    # no final .
    s = "Given a premise and a hypothesis, decide whether it holds. Answer with 'entailment' or 'neutral'"
    outs = {perturb.perturb(s, "semantic", seed) for seed in range(60)}
    assert any(o.endswith(", given a premise and a hypothesis.") for o in outs)  # clause moved
    assert any(o.split(". ")[0].endswith("'neutral'") for o in outs)  # answer format moved first
    assert any(re.search(r"(Can|Could) you decide .*\?", o) for o in outs)  # imperative -> question
    assert any(re.search(r"\b(work out|establish|determine) whether\b", o) for o in outs)  # phrase swap
    question = "Is it true that the sentence is grammatical? Answer 'acceptable' or 'unacceptable'."
    # question -> imperative
    assert any(o.startswith("Determine whether the sentence is grammatical.")
               for o in {perturb.perturb(question, "semantic", seed) for seed in range(60)})
    # With no rule to apply, a framing sentence still makes the instruction differ.
    framed = perturb.perturb("'positive' or 'negative'", "semantic", 0)
    assert framed == "Here is the task. 'positive' or 'negative'"


def test_edit_distance_counts_characters_or_words():
    assert perturb.edit_distance("kitten", "sitting") == 3
    assert perturb.edit_distance("a b c".split(), "a x c d".split()) == 2


# -----------------------------------------------------------------------------
# Prompt files and the CLI


def test_cli_writes_the_evaluator_file_prints_strength_and_matches_the_shipped_file(tmp_path, capsys):
    out = tmp_path / "new" / "prompts.json"
    perturb.main(["--prompts", str(CLEAN_FILE), "--out", str(out)])
    written = json.loads(out.read_text())
    assert list(written) == list(perturb.LEVELS)
    assert written["clean"] == perturb.load_prompts(CLEAN_FILE)
    assert written == json.loads(PERTURBED_FILE.read_text())  # the shipped file is this CLI's default output
    assert os.listdir(out.parent) == ["prompts.json"]  # no temporary file left behind
    report = capsys.readouterr().out
    assert "changed words" in report and "char edit distance" in report
    for level, (words, chars) in perturb.strength_report(written).items():
        assert re.search(rf"^{level} +{words:.2f} +{chars:.2f}$", report, re.MULTILINE)
    again = tmp_path / "again.json"  # the evaluator file can be fed back in: its clean group is read
    perturb.main(["--prompts", str(out), "--out", str(again)])
    assert json.loads(again.read_text()) == written


def test_cli_uses_a_user_semantic_file_and_per_level_rates(tmp_path):
    clean = {"sst2": ["Say 'positive' or 'negative' for this review.",
                      "Is this review 'positive' or 'negative'?"]}
    mine = {"sst2": ["Tell me: 'positive' or 'negative'?", "Reply 'positive' or 'negative'."]}
    for name, data in (("clean.json", clean), ("mine.json", mine)):
        (tmp_path / name).write_text(json.dumps(data))
    out = tmp_path / "out.json"
    perturb.main(["--prompts", str(tmp_path / "clean.json"), "--out", str(out), "--n", "2",
                  "--semantic", str(tmp_path / "mine.json"), "--deepwordbug-rate", "0.9", "--seed", "4"])
    written = json.loads(out.read_text())
    assert written["semantic"] == mine
    assert written["deepwordbug"]["sst2"][0] == perturb.perturb(clean["sst2"][0], "deepwordbug", 4, rate=0.9)


@pytest.mark.parametrize("content, message", [
    ("{not json", r":1: not JSON"),
    ("[1, 2]", r"expected a non-empty \{task: \[instruction, \.\.\.\]\} object"),
    ("{}", r"expected a non-empty"),
    ('{"sst2": "Say positive or negative."}',
     r"task 'sst2' must map to a list of non-empty instruction strings"),
    ('{"sst2": [3]}', r"task 'sst2' must map to a list"),
    ('{"imdb": ["positive or negative"]}', r"unknown task 'imdb': use one of cola, mnli"),
    ('{"sst2": ["Say positive or negative.", "Rate the film."]}',
     r"task 'sst2' instruction 1 contains none of the label words negative, positive: add them"),
])
def test_bad_prompt_files_give_a_one_line_error(tmp_path, content, message):
    path = tmp_path / "prompts.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        perturb.load_prompts(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(SystemExit, match="^error: .*" + message) as exit_:
        perturb.main(["--prompts", str(path), "--out", str(tmp_path / "out.json")])
    assert "\n" not in str(exit_.value.code)


@pytest.mark.parametrize("args, message", [
    (["--n", "7"], r"error: .*task 'cola' has 6 instructions but --n is 7: use 1 <= --n <= 6"),
    (["--n", "0"], r"argument --n: 0 is out of range: it must be between 1 and 1000"),
    (["--textfooler-rate", "1.5"], r"error: argument --textfooler-rate: 1.5 is out of range"),
    (["--textfooler-rate", "0"], r"error: argument --textfooler-rate: 0 is out of range"),
    (["--semantic", str(ROOT / "tests" / "missing.json")], r"error: .*missing.json: no such file"),
])
def test_bad_cli_arguments_exit_with_a_one_line_error(tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        perturb.main(["--prompts", str(CLEAN_FILE), "--out", str(tmp_path / "out.json")] + args)
    assert not (tmp_path / "out.json").exists()


def test_semantic_file_missing_a_task_is_an_error(tmp_path):
    (tmp_path / "mine.json").write_text(json.dumps({"sst2": ["'positive' or 'negative'?"] * 6}))
    with pytest.raises(SystemExit, match=r"--semantic file: task 'cola' has 0 instructions"):
        perturb.main(["--prompts", str(CLEAN_FILE), "--out", str(tmp_path / "o.json"),
                      "--semantic", str(tmp_path / "mine.json")])


# -----------------------------------------------------------------------------
# PromptBench's precomputed prompts: --from-promptbench

PROMPTBENCH_CONFIG = """\
# Copyright (c) Microsoft Corporation.
import os
import pathlib

LABEL_SET = {'sst2': ['positive', 'negative']}
MODEL_SET = [name for name in os.environ]


def attack():
    pathlib.Path(MARKER).write_text('ran')


attack()

PROMPT_SET_Promptbench_adv = {
    'clean': {
        'sst2': ["Read the excerpt and choose between 'positive' and 'negative': ",
                 'Is this na\\u00efve review positive or negative?'],
        'squad_v2': ['Answer from the context; if unanswerable, say "unanswerable". '],
        'mnli': ["Does the premise entail it? Answer 'entailment', 'neutral' or "
                 "'contradiction': "],
    },
    'deepwordbug': {
        'mnli': ["Dose the premsie entail it? Answer 'entailment', 'neutral' or 'contradiction':"],
        'sst2': ["Raed the excerpt and chosoe between 'positive' and 'negative':  "],
    },
}
LANGUAGES = {'en': 'English'}
"""
PROMPTBENCH_GLUE = {  # the fixture's literal without squad_v2, in file order, every trailing space kept
    "clean": {
        "sst2": ["Read the excerpt and choose between 'positive' and 'negative': ",
                 "Is this na\u00efve review positive or negative?"],
        "mnli": ["Does the premise entail it? Answer 'entailment', 'neutral' or 'contradiction': "],
    },
    "deepwordbug": {
        "mnli": ["Dose the premsie entail it? Answer 'entailment', 'neutral' or 'contradiction':"],
        "sst2": ["Raed the excerpt and chosoe between 'positive' and 'negative':  "],
    },
}


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "perturb.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_from_promptbench_copies_the_glue_prompts_byte_for_byte_and_never_runs_the_file(tmp_path, capsys):
    marker, config, out = tmp_path / "ran.txt", tmp_path / "config.py", tmp_path / "new" / "prompts.json"
    config.write_text(PROMPTBENCH_CONFIG.replace("MARKER", repr(str(marker))), encoding="utf-8")
    perturb.main(["--from-promptbench", str(config), "--out", str(out)])
    expected = json.dumps(PROMPTBENCH_GLUE, indent=2, ensure_ascii=False) + "\n"
    assert out.read_text(encoding="utf-8") == expected and "na\u00efve" in expected
    assert list(json.loads(expected)["deepwordbug"]) == ["mnli", "sst2"]  # file order, not sorted
    assert not marker.exists() and os.listdir(out.parent) == ["prompts.json"]
    assert capsys.readouterr().out == (f"wrote {out}: 2 groups (clean, deepwordbug), 2 tasks (sst2, mnli), "
                                       "5 instructions; dropped (not GLUE): squad_v2\n")
    assert perturb.load_promptbench(config) == (PROMPTBENCH_GLUE, ["squad_v2"])


NOT_A_SET = (r"PATH: PROMPT_SET_Promptbench_adv must be \{group: \{task: \[instruction, \.\.\.\]\}\} "
             r"of non-empty strings; ")
BAD_GROUP = NOT_A_SET + "group 'clean' is not"


@pytest.mark.parametrize("config, message", [
    (None, r"PATH: no such file: give the path of your copy of PromptBench's config\.py"),
    ("PROMPT_SET = {}\n",
     r"PATH: no top-level `PROMPT_SET_Promptbench_adv = \{\.\.\.\}` assignment: give the file that"),
    ("import os\nPROMPT_SET_Promptbench_adv = {'clean': {'sst2': [os.sep]}}\n",
     r"PATH:2: PROMPT_SET_Promptbench_adv is not a plain literal \(.+\): write it out as literals only"),
    ("PROMPT_SET_Promptbench_adv = {\n    'clean': {\n", r"PATH:\d+: not valid Python \(.+\): fix it"),
    ("PROMPT_SET_Promptbench_adv = ['Say positive or negative.']\n",
     NOT_A_SET + r"it is \['Say positive or negative\.'\]"),
    ("PROMPT_SET_Promptbench_adv = {}\n", NOT_A_SET + r"it is \{\}"),
    ("PROMPT_SET_Promptbench_adv = {'clean': ['Say positive or negative.']}\n", BAD_GROUP),
    ("PROMPT_SET_Promptbench_adv = {'clean': {'sst2': 'Say positive or negative.'}}\n", BAD_GROUP),
    ("PROMPT_SET_Promptbench_adv = {'clean': {'sst2': [1]}}\n", BAD_GROUP),
    ("PROMPT_SET_Promptbench_adv = {'clean': {'sst2': []}}\n", BAD_GROUP),
    ("PROMPT_SET_Promptbench_adv = {'clean': {'sst2': ['Say it.', '  ']}}\n", BAD_GROUP),
    ("PROMPT_SET_Promptbench_adv = {'clean': {1: ['Say it.']}}\n", BAD_GROUP),
])
def test_bad_promptbench_configs_give_a_one_line_error_and_write_nothing(tmp_path, config, message):
    path = tmp_path / "config.py"
    if config is not None:
        path.write_text(config)
    message = message.replace("PATH", re.escape(str(path)))
    with pytest.raises(ValueError) as error:
        perturb.load_promptbench(path)
    assert re.match(message, str(error.value)) and "\n" not in str(error.value)
    result = run_cli("--from-promptbench", path, "--out", tmp_path / "out" / "prompts.json")
    assert result.returncode != 0 and result.stdout == ""
    assert re.fullmatch("error: " + message + r"[^\n]*\n", result.stderr)  # no traceback
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    ([], r"one of the arguments --prompts --from-promptbench is required"),
    (["--prompts", CLEAN_FILE, "--from-promptbench", "config.py"], r"not allowed with argument"),
    (["--from-promptbench", "config.py", "--seed", "3"], r"--from-promptbench copies, it does not perturb"),
    (["--from-promptbench", "config.py", "--wordnet"], r"drop the perturbation flags"),
])
def test_one_of_prompts_or_from_promptbench_which_takes_no_perturbation_flag(tmp_path, args, message):
    out = tmp_path / "out.json"
    with pytest.raises(SystemExit) as exit_:
        perturb.main([*map(str, args), "--out", str(out)])
    assert re.search(message, str(exit_.value.code)) and "\n" not in str(exit_.value.code)
    assert not out.exists()


def test_perturb_is_torch_free():
    code = "import sys, perturb; assert 'torch' not in sys.modules, 'perturb.py imported torch'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_wordnet_adds_single_word_lemmas_that_are_not_label_words(monkeypatch):
    lemmas = [types.SimpleNamespace(name=lambda n=n: n) for n in ("Sieve", "sort_out", "neutral", "sort")]
    corpus = types.ModuleType("nltk.corpus")
    synset = types.SimpleNamespace(lemmas=lambda: lemmas)
    corpus.wordnet = types.SimpleNamespace(synsets=lambda word: [synset])
    monkeypatch.setitem(sys.modules, "nltk", types.ModuleType("nltk"))
    monkeypatch.setitem(sys.modules, "nltk.corpus", corpus)
    assert perturb.synonyms("sort", wordnet=True) == ["sieve"]
    assert perturb.synonyms("sort") == []
    swapped = perturb.perturb("Sort it as 'positive' or 'negative'.", "textfooler", 0, wordnet=True)
    assert swapped.startswith("Sieve")


def test_unknown_level_and_missing_wordnet_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"^unknown level 'typo': choose one of clean, deepwordbug, "
                                         r"textfooler, checklist, semantic$"):
        perturb.perturb("Say 'positive' or 'negative'.", "typo", 0)
    monkeypatch.setitem(sys.modules, "nltk", None)  # makes `import nltk` fail even where it is installed
    with pytest.raises(ValueError, match=r"--wordnet needs nltk and its WordNet data"):
        perturb.perturb("Classify the review as 'positive' or 'negative'.", "textfooler", 0, wordnet=True)
