"""attack.py: adversarial instructions searched against the model under evaluation, as PromptBench does.

perturb.py edits instructions blindly; PromptBench's DeepWordBug, TextFooler and CheckList prompts were found
by searching against a victim model, and a prompt found against one model loses most of its bite on another.
So a robustness claim is only as strong as the attack on the model itself. This module searches, in the
spirit of TextAttack's greedy word swap with word-importance ranking:

    score       the model under attack rates an instruction on an attack set of examples: the mean over the
                set of log p(gold label) - max over the other labels of log p(label) (evaluate.py's
                `margin_scorer`, from rank mode's label log-likelihoods). Lower is a stronger attack. The
                attack set is disjoint from the examples the attacked instruction is evaluated on.
    rank        each modifiable word by how much the score drops when it is deleted (TextFooler) or replaced
                by UNK (DeepWordBug)
    swap        in that order, score the word's candidates: DeepWordBug, CANDIDATES seeded typos from
                perturb.py's four character edits; TextFooler, its synonyms (perturb.py's table, WordNet
                with --wordnet); keep the best one if it lowers the score. A word is edited once at most.
    checklist   score CANDIDATES seeded 10-character suffixes (perturb.py's), keep the worst for the model
    protected   label words, quoted options, {placeholders} (perturb.mask) and stopwords never change;
                DeepWordBug's edits total at most MAX_EDIT_DISTANCE characters (PromptBench's constraints)
    budget      every scored instruction is a query; a search stops when the next batch would exceed it

A search is torch-free and deterministic for (kind, seed, instruction): it only calls score(instructions),
which scores a whole batch of candidates at once. The tests drive it with fake scorers.

    python evaluate.py --ckpt out/ --attack deepwordbug,textfooler,checklist --out attacked/

writes attacked/prompts.json (clean and attacked instructions, usable as --prompts for any model: the
transfer setting) and attacked/attack_log.jsonl (one line per attacked instruction).

Next: read `evaluate.py`.
"""
import json
import random
import re

from files import write_atomically
from perturb import (STOPWORDS, add_checklist_token, edit_distance, mask, match_case, synonyms, typo,
                     typo_target, unmask)

ATTACKS = ("deepwordbug", "textfooler", "checklist")
CANDIDATES = 8  # typos per word (DeepWordBug) and suffixes (CheckList) scored
MAX_EDIT_DISTANCE = 30  # PromptBench's DeepWordBug constraint: total Levenshtein distance to the clean text
UNKNOWN = "UNK"  # what a word becomes when DeepWordBug ranks it

# -----------------------------------------------------------------------------
# 1. The search


class Budget:
    """score(instructions), counting the queries: no more than `limit` in all. A batch that would go over is
    cut short (its first instructions are scored), and after that every call scores nothing."""

    def __init__(self, score, limit):
        self.score, self.limit, self.used = score, limit, 0

    def __call__(self, instructions):
        instructions = instructions[:max(0, self.limit - self.used)]
        self.used += len(instructions)
        return list(self.score(instructions)) if instructions else []


def with_word(pieces, k, new):
    """pieces (re.split of the text around its words: words at odd k) with word k replaced by `new`; ""
    deletes the word and one space beside it."""
    pieces = list(pieces)
    pieces[k] = new
    if not new and pieces[k + 1].startswith(" "):
        pieces[k + 1] = pieces[k + 1][1:]
    elif not new and pieces[k - 1].endswith(" "):
        pieces[k - 1] = pieces[k - 1][:-1]
    return pieces


def eligible(word, kind, wordnet=False):
    """Whether an attack may edit `word`: never a stopword; DeepWordBug, 3 letters or more; TextFooler, a
    word that has synonyms."""
    return typo_target(word) if kind == "deepwordbug" else (word.lower() not in STOPWORDS
                                                             and bool(synonyms(word, wordnet)))


def candidates(word, kind, rng, wordnet=False):
    """What `word` may become: distinct seeded typos (DeepWordBug) or its synonyms, cased like it."""
    if kind == "deepwordbug":
        return list(dict.fromkeys(typo(word, rng) for _ in range(CANDIDATES)))
    return [match_case(s, word) for s in synonyms(word, wordnet)]


def greedy(instruction, kind, budget, rng, wordnet=False):
    """Greedy word swap with word-importance ranking: (attacked, [(word, new word)], score before, after)."""
    masked, spans = mask(instruction)  # label words, quotes and {placeholders} become letterless markers
    pieces = re.split(r"([A-Za-z]+)", masked)

    def text(pieces):
        return unmask("".join(pieces), spans)
    before = budget([instruction])[0]
    words = [k for k in range(1, len(pieces), 2) if eligible(pieces[k], kind, wordnet)]
    blank = "" if kind == "textfooler" else UNKNOWN
    drops = [before - s for s in budget([text(with_word(pieces, k, blank)) for k in words])]
    ranked = [k for _, k in sorted(zip(drops, words), key=lambda pair: -pair[0])]  # most important first
    score, changed = before, []
    for k in ranked:
        options = [with_word(pieces, k, new) for new in candidates(pieces[k], kind, rng, wordnet)]
        if kind == "deepwordbug":
            options = [o for o in options if edit_distance(instruction, text(o)) <= MAX_EDIT_DISTANCE]
        scores = budget([text(o) for o in options])
        if scores and min(scores) < score:
            best = scores.index(min(scores))
            changed.append((pieces[k], options[best][k]))
            pieces, score = options[best], scores[best]
        if budget.used >= budget.limit:
            break
    return text(pieces), changed, before, score


def checklist(instruction, budget, rng):
    """The worst for the model of CANDIDATES seeded suffixes: (attacked, [("", suffix)], before, after)."""
    before = budget([instruction])[0]
    options = [add_checklist_token(instruction, rng) for _ in range(CANDIDATES)]
    scores = budget(options)
    if not scores:
        return instruction, [], before, before
    best = scores.index(min(scores))
    suffix = options[best].split()[-1].rstrip(":.")  # the token goes last, or just before a closing : or .
    return options[best], [("", suffix)], before, scores[best]


def attack(instruction, kind, score, budget=200, seed=0, wordnet=False):
    """One search against `score` within `budget` queries: a dict for attack_log.jsonl."""
    rng = random.Random(f"{kind}:{seed}:{instruction}")  # a str seed: SHA-512, never the salted hash()
    queries = Budget(score, budget)
    if kind == "checklist":
        attacked, changed, before, after = checklist(instruction, queries, rng)
    else:
        attacked, changed, before, after = greedy(instruction, kind, queries, rng, wordnet)
    return dict(clean=instruction, attacked=attacked, words_changed=changed, queries=queries.used,
                score_before=before, score_after=after)

# -----------------------------------------------------------------------------
# 2. Attacking a prompt file's clean instructions


def attack_set(examples, drawn, kinds, n, seed=0):
    """n of a task's examples that neither clean nor the attacks (`kinds`) are evaluated on (drawn: {group:
    example indices}), picked by a Random(seed); a ValueError when none is left."""
    taken = {i for group in ("clean", *kinds) for i in drawn.get(group, ())}
    free = [i for i in range(len(examples)) if i not in taken]
    if not free:
        raise ValueError("no example is left for the attack set: lower --samples")
    return [examples[i] for i in random.Random(f"attack:{seed}").sample(free, min(n, len(free)))]


def run_attacks(kinds, clean, make_scorer, out_dir, budget=200, seed=0, wordnet=False):
    """Attack every clean instruction ({task: [...]}) with each kind, scored by make_scorer(task); write
    out_dir/prompts.json ({"clean": clean, kind: {task: [...]}}, the evaluator's shape) and
    out_dir/attack_log.jsonl; returns the prompt set."""
    prompt_set, log = {"clean": clean}, []
    for task, instructions in clean.items():
        score = make_scorer(task)
        for kind in kinds:
            results = [attack(text, kind, score, budget, seed, wordnet) for text in instructions]
            prompt_set.setdefault(kind, {})[task] = [r["attacked"] for r in results]
            log += [dict(task=task, group=kind, prompt_index=p, **r) for p, r in enumerate(results)]
            before, after = (sum(r[key] for r in results) / len(results) for key in ("score_before",
                                                                                      "score_after"))
            print(f"{task} {kind}: mean score {before:.3f} -> {after:.3f}, "
                  f"{sum(r['queries'] for r in results)} queries")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(out_dir / "prompts.json", json.dumps(prompt_set, indent=2, ensure_ascii=False) + "\n")
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in log]
    write_atomically(out_dir / "attack_log.jsonl", "".join(lines))
    return prompt_set
