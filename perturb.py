"""perturb.py: seeded character, word, sentence and semantic perturbations of instructions (CoIN §4.3).

CoIN, like PromptBench (Zhu et al., 2023), scores each GLUE task under clean and perturbed instructions:

    deepwordbug  character  ~40% of words get one or two typos (swap, substitute, delete or insert a letter)
    textfooler   word       ~30% of words swapped for a synonym ("Determine whether" -> "Decide if")
    checklist    sentence   a random 10-character [A-Za-z0-9] token at the end, or before a closing ':' or '.'
    semantic     meaning    a rule-based paraphrase: phrase swaps, clauses moved, imperative <-> question

Label words, quoted spans ('positive') and {placeholders} never change, or the model would be told the wrong
labels (PromptBench's LabelConstraint). PromptBench's own perturbed prompts come from adversarial *searches*
against a victim model (its semantic ones from humans); ours are seeded, non-adaptive and milder: they measure
sensitivity to noise, not worst-case robustness. For numbers comparable to the paper, `--from-promptbench`
copies the GLUE tasks of PromptBench's `PROMPT_SET_Promptbench_adv` as is; its config.py is parsed, not run.

    python perturb.py --prompts prompts/clean.json --out prompts/perturbed.json [--seed 0] [--n 6] \
        [--deepwordbug-rate 0.4] [--textfooler-rate 0.3] [--semantic FILE] [--wordnet]
    python perturb.py --from-promptbench config.py --out prompts.json

Next: read `evaluate.py`.
"""
import functools
import json
import random
import re
import string
from pathlib import Path
from statistics import mean

from files import read_json, read_python_literal, write_atomically
from flags import SEED, SHARE, ArgumentParser, checked, up_to
from glue import LABELS, TASKS, is_instruction_table

# -----------------------------------------------------------------------------
# Constants

LEVELS = ("clean", "deepwordbug", "textfooler", "checklist", "semantic")
ALL_LABEL_WORDS = tuple(sorted({word for words in LABELS.values() for word in words}))  # glue.LABELS

DEFAULT_RATES = {"deepwordbug": 0.4, "textfooler": 0.3}  # mean strength of the PromptBench prompts CoIN used
PROMPTBENCH_SET = "PROMPT_SET_Promptbench_adv"  # in PromptBench's config.py: the prompts CoIN scored
CHECKLIST_LEN = 10  # PromptBench's CheckList appends 10 random characters from [A-Za-z0-9]
CHECKLIST_CHARS = string.ascii_letters + string.digits
TYPO_LETTERS = string.ascii_letters  # TextAttack's DeepWordBug inserts and substitutes either case

# TextAttack's DeepWordBug and TextFooler recipes never edit stopwords; neither do we.
STOPWORDS = frozenset("""a an the and or but if of to in on at by for with as from into about is are was
were be been it its this that these those they them their one you your do does did not no yes so then than
there here how what which who can could would should will may must has have had both each neither""".split())

# The word-level table, {word: [synonym, ...]}, written for this project: single real words, no label word
# (tests check both), keeping "a"/"an" right in the shipped instructions. Context-free: "review" is a noun.
SYNONYMS = json.loads(Path(__file__).resolve().with_name("prompts").joinpath("synonyms.json").read_text())

# The paraphraser's rules. Phrases within a group are interchangeable; no phrase is in two groups.
PHRASE_GROUPS = (
    ("determine whether", "decide whether", "establish whether", "work out whether"),
    ("answer with", "respond with", "reply with"), ("as your answer", "as the answer", "as your response"),
    ("your answer must be", "the answer has to be", "you must answer"), ("choose", "pick", "select"),
    ("check", "inspect", "verify"), ("examine", "study", "look at"), ("the following", "the given"),
    ("classify it as", "categorize it as"), ("can you tell", "can you say"))
PHRASE_OF = {phrase: group for group in PHRASE_GROUPS for phrase in group}
PHRASE_RE = re.compile(r"\b(?:%s)\b" % "|".join(sorted(PHRASE_OF, key=len, reverse=True)), re.IGNORECASE)
LEADING_CLAUSE_RE = re.compile(r"^((?:Given|As an?) [^,]+), (.+?)([.?!:]?)$")  # "Given X, do Y.", "As a X,"
QUESTION_OPENERS = (("Can you ", ""), ("Could you ", ""),  # question opener -> imperative opener
                    ("Is it true that ", "Determine whether "), ("Do ", "Determine whether "))
IMPERATIVE_VERBS = frozenset("""analyze assess check choose classify compare decide describe determine
evaluate examine identify indicate judge label pick please read select tell""".split())

QUOTED_RE = r"(?<![A-Za-z])'[^'\n]+'(?![A-Za-z])|\"[^\"\n]+\""  # an apostrophe inside a word opens no quote
BRACED_RE = r"\{[^{}\n]*\}"
MARKER_RE = re.compile("\x00(\\d+)\x01")  # `mask`'s stand-in for a protected span: no letters, no spaces
WORD_RE = re.compile(r"[A-Za-z]+")
SENTENCE_RE = re.compile(r"[^.?!:]+[.?!:]?")

# -----------------------------------------------------------------------------
# Protected spans


def mask(text, protected=()):
    """Replace label words, quoted spans, {placeholders} and `protected` by markers: (masked, spans)."""
    words = sorted({*ALL_LABEL_WORDS, *(p for p in protected if p)}, key=len, reverse=True)
    pattern = rf"{QUOTED_RE}|{BRACED_RE}|(?<!\w)(?:{'|'.join(map(re.escape, words))})(?!\w)"
    spans = []

    def stash(m):
        spans.append(m.group())
        return f"\x00{len(spans) - 1}\x01"
    return re.sub(pattern, stash, text, flags=re.IGNORECASE), spans


def unmask(text, spans):
    return MARKER_RE.sub(lambda m: spans[int(m.group(1))], text)


def match_case(word, like):
    """`word` capitalised like `like`: ALL CAPS, Capitalised or lower case."""
    if len(like) > 1 and like.isupper():
        return word.upper()
    return upper_first(word) if like[:1].isupper() else word


def upper_first(text):
    return text[:1].upper() + text[1:]

# -----------------------------------------------------------------------------
# Character, word and sentence level (DeepWordBug-, TextFooler- and CheckList-style)


def edit_words(text, n_target, eligible, edit, rng):
    """Replace `n_target` random eligible words by `edit(word, rng)`; fewer if fewer words are eligible."""
    spots = [m.span() for m in WORD_RE.finditer(text) if eligible(m.group())]
    chosen = rng.sample(spots, min(n_target, len(spots)))
    for a, b in sorted(chosen, reverse=True):  # right to left, so earlier offsets stay valid
        text = text[:a] + edit(text[a:b], rng) + text[b:]
    return text


def typo_target(word):
    """DeepWordBug's eligible words: 3 letters or more, and no stopword."""
    return len(word) > 2 and word.lower() not in STOPWORDS


def typo(word, rng):
    """One or two of DeepWordBug's edits (swap, substitute, delete, insert), redone until the word changes."""
    new = word
    while new == word:
        new = word
        for _ in range(rng.randint(1, 2)):
            i, op = rng.randrange(len(new)), rng.choice(("swap", "substitute", "delete", "insert"))
            if op == "swap" and i < len(new) - 1:
                new = new[:i] + new[i + 1] + new[i] + new[i + 2:]
            elif op == "substitute":
                new = new[:i] + rng.choice(TYPO_LETTERS.replace(new[i], "")) + new[i + 1:]
            elif op == "delete" and len(new) > 1:
                new = new[:i] + new[i + 1:]
            elif op == "insert":
                new = new[:i] + rng.choice(TYPO_LETTERS) + new[i:]
    return new


def wordnet_synonyms(word):
    """Single-word WordNet lemmas of `word`; opt-in (--wordnet), so the default output needs no nltk data."""
    try:
        from nltk.corpus import wordnet
        lemmas = {lemma.name().lower() for synset in wordnet.synsets(word) for lemma in synset.lemmas()}
    except (ImportError, LookupError):
        raise ValueError("--wordnet needs nltk and its WordNet data: "
                         "pip install nltk && python -m nltk.downloader wordnet") from None
    return {lemma for lemma in lemmas if lemma.isalpha()}


def synonyms(word, wordnet=False):
    """Sorted candidates to replace `word`: the table's, plus WordNet's if asked; never a label word."""
    key = word.lower()
    found = set(SYNONYMS.get(key, ()))
    if wordnet and key not in STOPWORDS:
        found |= wordnet_synonyms(key)
    return sorted(found - {key, *ALL_LABEL_WORDS})


def add_checklist_token(text, rng):
    """Add a random 10-character token at the end, or just before a closing ':' or '.' as PromptBench does."""
    token = "".join(rng.choice(CHECKLIST_CHARS) for _ in range(CHECKLIST_LEN))
    body = text.rstrip()
    return f"{body[:-1]} {token}{body[-1]}" if body.endswith((":", ".")) else f"{body} {token}"

# -----------------------------------------------------------------------------
# Semantic level: a rule-based paraphraser. A rule returns the text unchanged where it does not apply.


def swap_phrases(text, rng):
    """Swap a random non-empty subset of the known phrases for another phrase of their group."""
    matches = list(PHRASE_RE.finditer(text))
    for m in sorted(rng.sample(matches, rng.randint(1, len(matches))) if matches else [],
                    key=lambda m: m.start(), reverse=True):
        old = m.group().lower()
        new = rng.choice([p for p in PHRASE_OF[old] if p != old])
        text = text[:m.start()] + match_case(new, m.group()) + text[m.end():]
    return text


def move_leading_clause(sentence):
    """"Given X, do Y." -> "Do Y, given X." (the same for "As a X, ...")."""
    m = LEADING_CLAUSE_RE.match(sentence)
    return [f"{upper_first(m[2])}, {m[1][0].lower()}{m[1][1:]}{m[3]}"] if m else []


def flip_mood(sentence):
    """Imperative <-> question: "Decide X." -> "Can you decide X?", "Do X?" -> "Determine whether X."."""
    body, end = (sentence[:-1], sentence[-1]) if sentence[-1] in ".?!:" else (sentence, "")
    for question, imperative in QUESTION_OPENERS:
        if end == "?" and body.startswith(question):
            return [upper_first(imperative + body[len(question):]) + "."]
    if end in (".", ":", "") and body.split(" ", 1)[0].lower() in IMPERATIVE_VERBS:
        return [f"{opener}{body[0].lower()}{body[1:]}?" for opener in ("Can you ", "Could you ")]
    return []


def rewrite_one_sentence(rule, text, rng):
    """Apply one of the rewrites `rule(sentence)` lists, chosen at random among all sentences."""
    sentences = [s.strip() for s in SENTENCE_RE.findall(text) if s.strip()]
    options = [(i, new) for i, s in enumerate(sentences) for new in rule(s)]
    if not options:
        return text
    i, new = rng.choice(options)
    return " ".join(sentences[:i] + [new] + sentences[i + 1:])


def rotate_sentences(text, rng):
    """Move the last sentence (usually the answer format) to the front; a closing ':' becomes '.'."""
    sentences = [s.strip() for s in SENTENCE_RE.findall(text) if s.strip()]
    if len(sentences) < 2:
        return text
    last = sentences.pop().rstrip(":")
    return " ".join([last if last.endswith((".", "?", "!")) else last + "."] + sentences)


def paraphrase(text, rng):
    """Apply each rule with probability 1/2. If that changed nothing, force the first rule (in random order)
    that applies, and if none does, prepend a framing sentence, so the result always differs from `text`."""
    rules = [swap_phrases, functools.partial(rewrite_one_sentence, move_leading_clause),
             functools.partial(rewrite_one_sentence, flip_mood), rotate_sentences]
    out = text
    for rule in rules:
        if rng.random() < 0.5:
            out = rule(out, rng)
    for rule in rng.sample(rules, len(rules)):
        if out != text:
            break
        out = rule(text, rng)
    return out if out != text else "Here is the task. " + text

# -----------------------------------------------------------------------------
# The entry point


def perturb(instruction, level, seed, protected=(), rate=None, wordnet=False):
    """`instruction` at `level`, fixed by (instruction, level, seed, rate, wordnet). Label words, quoted
    spans, {placeholders} and `protected` stay verbatim. `rate`: the fraction of words changed."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}: choose one of {', '.join(LEVELS)}")
    rate = DEFAULT_RATES.get(level, 0.0) if rate is None else rate
    if level in DEFAULT_RATES and not 0 < rate <= 1:
        raise ValueError(f"rate for {level} must be in (0, 1], got {rate}")
    if level == "clean":
        return instruction
    protected = [protected] if isinstance(protected, str) else protected  # one span, not its characters
    rng = random.Random(f"{level}:{seed}:{instruction}")  # a str seed: SHA-512, not the salted hash()
    text, spans = mask(instruction, protected)
    n_target = max(1, round(rate * len(instruction.split())))
    if level == "deepwordbug":
        text = edit_words(text, n_target, typo_target, typo, rng)
    elif level == "textfooler":
        text = edit_words(text, n_target, lambda w: bool(synonyms(w, wordnet)),
                          lambda w, r: match_case(r.choice(synonyms(w, wordnet)), w), rng)
    elif level == "checklist":
        text = add_checklist_token(text, rng)
    else:
        text = paraphrase(text, rng)
    return unmask(text, spans)

# -----------------------------------------------------------------------------
# Prompt files


def load_prompts(path):
    """Read and check `{task: [instruction, ...]}`, or the "clean" group of a {group: {task: [...]}} file."""
    data = read_json(path)
    if isinstance(data, dict) and isinstance(data.get("clean"), dict):
        data = data["clean"]  # a prompt-set file: start again from its clean group
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a non-empty {{task: [instruction, ...]}} object, "
                         f"got {data!r:.40}")
    for task, instructions in data.items():
        if task not in LABELS:
            raise ValueError(f"{path}: unknown task {task!r}: use one of {', '.join(LABELS)}")
        if not isinstance(instructions, list) or not all(isinstance(s, str) and s.strip()
                                                         for s in instructions):
            raise ValueError(f"{path}: task {task!r} must map to a list of non-empty instruction strings")
        for i, s in enumerate(instructions):
            if not any(re.search(rf"(?<!\w){w}(?!\w)", s, re.IGNORECASE) for w in LABELS[task]):
                raise ValueError(f"{path}: task {task!r} instruction {i} contains none of the label words "
                                 f"{', '.join(LABELS[task])}: add them so the model knows the answer space")
    return data


def first_n(prompts, tasks, n, source):
    """The first `n` instructions of each task in `tasks`; a ValueError names a task that has fewer."""
    for task in tasks:
        have = len(prompts.get(task, []))
        if n < 1 or have < n:
            raise ValueError(f"{source}: task {task!r} has {have} instructions but --n is {n}: "
                             f"use 1 <= --n <= {have} or add instructions")
    return {task: prompts[task][:n] for task in tasks}


def build_prompt_set(clean, seed=0, n=6, rates=None, semantic=None, wordnet=False, source="prompts"):
    """{group: {task: [instructions]}} for every level; `semantic` ({task: [...]}) replaces ours."""
    clean = first_n(clean, clean, n, source)
    prompt_set = {"clean": clean}
    for level in LEVELS[1:]:
        if level == "semantic" and semantic is not None:
            prompt_set[level] = first_n(semantic, clean, n, "--semantic file")
            continue
        prompt_set[level] = {task: [perturb(s, level, seed, LABELS[task], (rates or {}).get(level), wordnet)
                                    for s in instructions] for task, instructions in clean.items()}
    return prompt_set


def load_promptbench(path):
    """PromptBench's prompts from its config.py: ({group: {task: [...]}} of glue.TASKS, the tasks dropped)."""
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such file: give the path of your copy of PromptBench's config.py")
    data = read_python_literal(path, PROMPTBENCH_SET)
    shape = f"{path}: {PROMPTBENCH_SET} must be {{group: {{task: [instruction, ...]}}}} of non-empty strings"
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{shape}; it is {data!r:.40}")
    prompt_set, dropped = {}, []
    for group, tasks in data.items():
        if not (isinstance(group, str) and is_instruction_table(tasks)):
            raise ValueError(f"{shape}; group {group!r} is not")
        prompt_set[group] = {task: instructions for task, instructions in tasks.items() if task in TASKS}
        dropped += [task for task in tasks if task not in TASKS and task not in dropped]
    return prompt_set, dropped

# -----------------------------------------------------------------------------
# Strength report and CLI


def edit_distance(a, b):
    """Levenshtein distance between two sequences: strings (of characters) or lists (of words)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def strength_report(prompt_set):
    """{level: (mean changed words, mean character edit distance)}, each instruction against its clean one."""
    clean, report = prompt_set["clean"], {}
    for level, tasks in prompt_set.items():
        pairs = [(a, b) for task in clean for a, b in zip(clean[task], tasks[task])]
        report[level] = (mean(edit_distance(a.split(), b.split()) for a, b in pairs),
                         mean(edit_distance(a, b) for a, b in pairs))
    return report


def main(argv=None):
    parser = ArgumentParser(description="Write perturbed instruction sets for evaluate.py.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", help="clean instructions, {task: [instruction, ...]}")
    source.add_argument("--from-promptbench", metavar="CONFIG_PY",
                        help=f"copy the GLUE tasks of {PROMPTBENCH_SET} in PromptBench's config.py, as is")
    parser.add_argument("--out", required=True, help="prompt-set file to write, {group: {task: [...]}}")
    parser.add_argument("--seed", type=checked(int, SEED), default=0)
    parser.add_argument("--n", type=checked(int, up_to(1000, "per task")), default=6,
                        help="instructions per task (PromptBench uses 6)")
    for level, rate in DEFAULT_RATES.items():
        parser.add_argument(f"--{level}-rate", type=checked(float, SHARE), default=rate,
                            help="fraction of words to change")
    parser.add_argument("--semantic", help="your own paraphrases, {task: [instruction, ...]}, used as is")
    parser.add_argument("--wordnet", action="store_true", help="add WordNet synonyms (nltk + wordnet data)")
    args = parser.parse_args(argv)
    perturbing = {k: v for k, v in vars(args).items() if k not in ("prompts", "from_promptbench", "out")}
    if args.from_promptbench and any(v != parser.get_default(k) for k, v in perturbing.items()):
        parser.error("--from-promptbench copies, it does not perturb: drop the perturbation flags")
    if Path(args.out).is_dir():
        parser.error(f"--out {args.out}: a directory; give the path of the prompt file to write")
    try:
        if args.from_promptbench:
            prompt_set, dropped = load_promptbench(args.from_promptbench)
        else:
            semantic = load_prompts(args.semantic) if args.semantic else None
            rates = {level: getattr(args, f"{level}_rate") for level in DEFAULT_RATES}
            prompt_set = build_prompt_set(load_prompts(args.prompts), args.seed, args.n, rates, semantic,
                                          args.wordnet, source=args.prompts)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(args.out, json.dumps(prompt_set, indent=2, ensure_ascii=False) + "\n")
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    if args.from_promptbench:
        tasks = list(dict.fromkeys(task for tasks in prompt_set.values() for task in tasks))
        n = sum(len(instructions) for tasks in prompt_set.values() for instructions in tasks.values())
        print(f"wrote {args.out}: {len(prompt_set)} groups ({', '.join(prompt_set)}), {len(tasks)} tasks "
              f"({', '.join(tasks)}), {n} instructions; dropped (not GLUE): {', '.join(dropped) or 'none'}")
        return
    clean = [s for instructions in prompt_set["clean"].values() for s in instructions]
    words = mean(len(s.split()) for s in clean)
    print(f"{len(clean)} instructions, {words:.1f} words on average; wrote {args.out}")
    print(f"{'level':<12} {'changed words':>14} {'char edit distance':>19}")
    for level, (words, chars) in strength_report(prompt_set).items():
        print(f"{level:<12} {words:>14.2f} {chars:>19.2f}")


if __name__ == "__main__":
    main()
