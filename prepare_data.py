"""prepare_data.py: making flan_coin.jsonl, the file coin.py trains on: from FLAN templates, or from the
official CoIN CSV; and checking one.

A support module beside data.py (which defines the record and reads it). Read it after data.py.

Building follows CoIN §4.1 and Appendix A. Each source row of a dataset is an anchor in turn (seeded order,
at most --per-task). Its original uses a random template. The paraphrase uses a random *other* template with
the same output (so the same target) that lists the options whenever the original does (same answer space).
The hard negative is another row of the dataset rendered with the anchor's original template, with a
different input and a different answer. Datasets are interleaved round-robin, so each gets an equal share.
The official CoIN CSV pairs rows instead: rows 2k and 2k+1 form group k, 2k+1 being the hard negative of 2k.

    python prepare_data.py build --templates ../shared/flan/templates.json --source DIR --out flan_coin.jsonl
    python prepare_data.py convert --csv contrastive_flan_data.csv --out flan_coin.jsonl
    python prepare_data.py check flan_coin.jsonl [--skip-bad]

Next: read `coin.py`.
"""
import csv
import io
import json
import random
import re
from collections import Counter, defaultdict
from dataclasses import asdict
from itertools import zip_longest
from pathlib import Path

from data import MAX_REPORTED, Example, load_examples
from files import read_json, read_jsonl, read_python_literal, read_text, write_atomically
from flags import COUNT, SEED, ArgumentParser, checked
from glue import FLAN_LAYOUTS, flan_row

# -----------------------------------------------------------------------------
# 1. Formats: FLAN's options and the official CSV

OPTIONS_PREFIX = "OPTIONS:\n- "  # {options_} is "OPTIONS:\n- a\n- b" (flan/preprocessors.py format_options)
CSV_COLUMNS = ("original_instruction", "paraphrased_instruction", "targets", "task_name")  # + kwargs, unused


def write_examples(path, examples):
    """Write examples as JSONL, atomically: never a half-written training file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, "".join(json.dumps(asdict(example), ensure_ascii=False) + "\n"
                                   for example in examples))


def read_coin_csv(path):
    """The official CoIN CSV -> (examples, dropped). Rows 2k and 2k+1 form group k (2k+1 is the hard negative
    of 2k). An odd last row has no partner: it is dropped (dropped = 1). kwargs (informational) is ignored."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))  # a spreadsheet's BOM is dropped
    missing = [column for column in CSV_COLUMNS if column not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path}: no column '{missing[0]}'; "
                         f"the CoIN CSV has {', '.join(CSV_COLUMNS)}, kwargs")
    try:
        rows = list(reader)
    except csv.Error as e:
        raise ValueError(f"{path}:{reader.line_num}: {e}") from None
    paired = len(rows) - len(rows) % 2
    examples = [Example(id=f"csv-{r}", task=row["task_name"], original=row["original_instruction"],
                        paraphrase=row["paraphrased_instruction"], target=row["targets"], group=f"{r // 2}")
                for r, row in enumerate(rows[:paired])]
    return examples, len(rows) - paired


# -----------------------------------------------------------------------------
# 2. FLAN templates and source rows

PLACEHOLDER = re.compile(r"\{(\w+)\}")  # FLAN fills {field} by name; other braces are literal text


def render(template, row):
    """Fill a template's {field}s from a FLAN row; {options_} is the row's options list as FLAN prints it."""
    def fill(match):
        return OPTIONS_PREFIX + "\n- ".join(row["options"]) if match[1] == "options_" else row[match[1]]
    return PLACEHOLDER.sub(fill, template)


def _patterns_from_py(path):
    """The `PATTERNS = {...}` literal of FLAN's templates.py, read with ast: the file is parsed, never run."""
    return read_python_literal(path, "PATTERNS")


def load_templates(path):
    """dataset -> [(input_template, output_template), ...] from JSON (flat, or ../shared/flan's
    {"patterns": ...} with provenance notes beside it) or from FLAN's templates.py."""
    path = Path(path)
    if path.suffix == ".py":
        patterns = _patterns_from_py(path)
    else:
        patterns = read_json(path)
        if isinstance(patterns, dict) and isinstance(patterns.get("patterns"), dict):
            patterns = patterns["patterns"]
    shape = f"{path}: templates must map dataset -> [[input_template, output_template], ...] (strings)"
    if not isinstance(patterns, dict) or not patterns:
        raise ValueError(shape)
    for name, pairs in patterns.items():
        for pair in pairs if isinstance(pairs, (list, tuple)) else [None]:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                    and all(isinstance(t, str) for t in pair)):
                raise ValueError(f"{shape}; {name!r} is not")
    return {name: [tuple(pair) for pair in pairs] for name, pairs in patterns.items()}


def paraphrase_partners(templates):
    """For each template, the templates its paraphrase may use: a different input text, the same output
    template (so the same target), and {options_} whenever the original has it (the same answer space)."""
    return [[j for j, (other, other_out) in enumerate(templates)
             if other != text and other_out == out and ("{options_}" in other or "{options_}" not in text)]
            for text, out in templates]


def _used_fields(templates):
    """field -> the first usable template (one with a paraphrase partner) that reads it."""
    used = {}
    for i, partners in enumerate(paraphrase_partners(templates)):
        for field in PLACEHOLDER.findall("\n".join(templates[i])) if partners else ():
            used.setdefault(field, i)
    return used


def load_source(path, dataset, templates):
    """The rows of one source file as FLAN rows. A row with 'label' and no 'options' of a dataset in
    glue.FLAN_LAYOUTS is in HF glue layout and is mapped; any other row must already carry the FLAN fields."""
    rows, used = [], _used_fields(templates)
    for lineno, row, _ in read_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: not a JSON object; source files hold one row object per line")
        if dataset in FLAN_LAYOUTS and "label" in row and "options" not in row:
            row = flan_row(dataset, row, where)
        for field, i in used.items():  # checked up front, so that no build fails halfway
            key = "options" if field == "options_" else field
            value, kind = row.get(key), "a list of strings" if key == "options" else "a string"
            if not (value and isinstance(value, list) and all(isinstance(o, str) for o in value)
                    if key == "options" else isinstance(value, str)):
                shown = "missing" if value is None else json.dumps(value)[:40]
                raise ValueError(f"{where}: {dataset} template {i} uses {{{field}}} but this row's "
                                 f"'{key}' is {shown}; every row needs {kind}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def load_sources(source_dir, templates):
    """dataset -> FLAN rows, one <dataset>.jsonl each, named as in the templates (e.g. glue_qqp.jsonl)."""
    paths = sorted(Path(source_dir).glob("*.jsonl"))
    if not paths:
        raise ValueError(f"{source_dir}: no <dataset>.jsonl source files; "
                         "give --source the folder that holds them")
    for path in paths:
        if path.stem not in templates:
            raise ValueError(f"{path}: no templates for dataset '{path.stem}'; name source files after the "
                             "template file's datasets (e.g. glue_qqp.jsonl, rte.jsonl)")
    return {path.stem: load_source(path, path.stem, templates[path.stem]) for path in paths}

# -----------------------------------------------------------------------------
# 3. Building flan_coin.jsonl: originals, paraphrases and hard negatives


def _hard_negative(rows, anchor, template, order, rng):
    """Another row whose input and answer both differ under `template`, scanning a shuffled order from a
    random start; None when there is none. NOTE: O(rows) per anchor if such rows are rare (a skewed label)."""
    text, out = template
    anchor_text, anchor_out = render(text, rows[anchor]), render(out, rows[anchor])
    start = rng.randrange(len(order))
    for k in range(len(order)):
        j = order[(start + k) % len(order)]
        if render(out, rows[j]) != anchor_out and render(text, rows[j]) != anchor_text:
            return j
    return None


def _build_task(dataset, templates, rows, per_task, seed):
    """One dataset's groups [anchor, hard negative], and how many anchors had no hard negative."""
    partners = paraphrase_partners(templates)
    usable = [i for i, p in enumerate(partners) if p]
    if not usable:
        raise ValueError(f"{dataset}: no template has a paraphrase partner (another template with the "
                         "same output, listing options if the first one does)")
    varied = {out: any(render(out, row) != render(out, rows[0]) for row in rows)
              for out in {templates[i][1] for i in usable}}  # False: one answer for all rows, no O(n^2) scan
    rng = random.Random(f"{seed}:{dataset}")  # a str seed is hashed with sha512: the same in every process
    order = list(range(len(rows)))
    rng.shuffle(order)
    groups, skipped = [], 0
    for anchor in order:
        if per_task is not None and len(groups) == per_task:
            break
        t = rng.choice(usable)
        negative = _hard_negative(rows, anchor, templates[t], order, rng) if varied[templates[t][1]] else None
        if negative is None:
            skipped += 1
            continue
        group = f"{dataset}-{len(groups)}"
        groups.append([Example(id=f"{group}-{role}", task=dataset, original=render(templates[t][0], rows[r]),
                               paraphrase=render(templates[rng.choice(partners[t])][0], rows[r]),
                               target=render(templates[t][1], rows[r]), group=group)
                       for role, r in (("anchor", anchor), ("negative", negative))])
    return groups, skipped


def build_examples(templates, sources, per_task=None, seed=0):
    """Examples from dataset -> FLAN rows, interleaved round-robin over datasets (sorted by name). Returns
    (examples, skipped): skipped[dataset] counts anchors with no hard negative. Deterministic per seed."""
    built = {dataset: _build_task(dataset, templates[dataset], rows, per_task, seed)
             for dataset, rows in sorted(sources.items())}
    examples = []
    for one_round in zip_longest(*(groups for groups, _ in built.values())):  # a group per dataset, or None
        for group in filter(None, one_round):
            examples += group
    return examples, {dataset: skipped for dataset, (_, skipped) in built.items()}


def table3(examples, skipped=None):
    """Per-task counts of groups and examples, laid out like the paper's Table 3; with `skipped` (from
    build_examples) a fourth column counts the anchors that had no hard negative."""
    groups, counts = defaultdict(set), Counter(example.task for example in examples)
    for example in examples:
        groups[example.task].add(example.group)
    skip = skipped or {}
    table = [["task", "groups", "examples", "skipped"]]
    tasks = sorted(counts.keys() | skip.keys())
    table += [[task, len(groups[task]), counts[task], skip.get(task, 0)] for task in tasks]
    table += [["total", sum(map(len, groups.values())), len(examples), sum(skip.values())]]
    width = 3 if skipped is None else 4
    return "\n".join(f"{row[0]:<28}" + "".join(f"{cell:>10}" for cell in row[1:width]) for row in table)


# -----------------------------------------------------------------------------
# 4. Command line: convert, build, check


def convert(args):
    examples, dropped = read_coin_csv(args.csv)
    write_examples(args.out, examples)
    print(f"wrote {len(examples)} examples in {len(examples) // 2} groups to {args.out}" +
          (f"; dropped CSV row {len(examples) + 1}, the last, which has no partner" if dropped else ""))
    print(f"validate it with: python prepare_data.py check {args.out}")


def build(args):
    templates = load_templates(args.templates)
    sources = load_sources(args.source, templates)
    examples, skipped = build_examples(templates, sources, args.per_task, args.seed)
    write_examples(args.out, examples)
    print(table3(examples, skipped))
    print(f"wrote {len(examples)} examples to {args.out}")


def check(args):
    examples, problems = load_examples(args.file, skip_bad=args.skip_bad)
    print("\n".join([f"{args.file}: dropped {len(problems)} bad lines"] + problems[:MAX_REPORTED]))
    print(table3(examples))


def main(argv=None):
    parser = ArgumentParser(description="Build, import and check CoIN's flan_coin.jsonl.")
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("convert", help="import the official CoIN CSV")
    sub.add_argument("--csv", required=True)
    sub.add_argument("--out", required=True)
    sub.set_defaults(run=convert)
    sub = commands.add_parser("build", help="build from FLAN templates and source rows")
    sub.add_argument("--templates", required=True,
                     help="templates.json, or FLAN's templates.py (parsed, not run)")
    sub.add_argument("--source", required=True, help="directory of <dataset>.jsonl source rows")
    sub.add_argument("--out", required=True)
    sub.add_argument("--per-task", type=checked(int, COUNT), default=None,
                     help="groups per dataset (default: every row once)")
    sub.add_argument("--seed", type=checked(int, SEED), default=0)
    sub.set_defaults(run=build)
    sub = commands.add_parser("check", help="validate a training file and print its counts")
    sub.add_argument("file")
    sub.add_argument("--skip-bad", action="store_true", help="drop bad lines instead of refusing the file")
    sub.set_defaults(run=check)
    args = parser.parse_args(argv)
    if getattr(args, "out", None) and Path(args.out).is_dir():
        parser.error(f"--out {args.out}: a directory; give the path of the .jsonl file to write")
    try:
        args.run(args)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
