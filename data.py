r"""data.py: CoIN's contrastive instruction data: the flan_coin.jsonl record, exact label masks, and
micro-batches that keep each example's hard negative beside it.

Three things here fail silently when wrong, so each has one place and a test: which tokens are supervised (the
labels), which rows are positives (the two views of one line), and which rows are hard negatives (the group).

1. flan_coin.jsonl holds one example per line, six non-empty strings:

    {"id": "rte-0-anchor", "task": "rte", "original": "...", "paraphrase": "...", "target": "yes",
     "group": "rte-0"}

  original: instruction and input rendered with one FLAN template; paraphrase: the same input rendered
  with another template of the task (same target); target: the answer;
  group: lines kept in one micro-batch, an anchor and its hard negative(s) (CoIN §3.2: same task and
  original template, different input, different answer).
  `load_examples` reports each bad line as "path:line: reason" and refuses the file unless skip_bad.
  prepare_data.py builds such a file from FLAN templates, or imports the official CoIN CSV.

2. A view is tokenized as CoIN's generate_and_tokenize_prompt does (run_contrastive_llama.py): BOS + ids of
  prompt + target as one string, where prompt = PROMPT_TEMPLATE with the instruction; the labels mask the
  first len(BOS + ids(prompt)) positions. After "Response:\n" the answer starts a new piece, "yes" (no "▁"):

       input_ids   <s> Premise: ... OPTIONS:\n- yes\n- no\n\n### Response:\n  yes  pad   pad
       labels      -100 ...................................................  yes  -100  -100

  CoIN appends no EOS (add_eos_token False); --eos does, when the row is under the cutoff. The pooled state
  is each row's last answer token either way (pool_index), never EOS or a pad.
  Over the cutoff, truncation "right" keeps the first `cutoff` tokens, as CoIN's tokenizer call does: a long
  prompt can cut the answer. "middle" keeps the answer whole and cuts the prompt's middle instead: FLAN puts
  task words at the start or the end, the options and "### Response:" at the end. An example with no answer
  token left in a view is dropped and counted (CoIN would keep it, supervising nothing).

3. `micro_batches` shuffles whole groups per (seed, epoch) and packs them; `collate` stacks the two views:

       rows [0:B]   originals     a1  n1  a2  n2      B = 4: groups {a1, n1} and {a2, n2}
       rows [B:2B]  paraphrases   a1' n1' a2' n2'     row i and row B+i: the two views of one example
       -> input_ids, attention_mask, labels (2B, T), right-padded; last_index (2B,): each row's last
          answer token; group_index (B,): each example's group, numbered 0..G-1 within the micro-batch

Shape legend: B examples per micro-batch, T the longest row of the micro-batch.

Next: read `coin.py`.
"""
import json
import random
from collections import Counter
from dataclasses import dataclass, fields

import torch

from files import read_jsonl

# -----------------------------------------------------------------------------
# 1. The example record and flan_coin.jsonl

# label of unsupervised positions; the default ignore_index of F.cross_entropy (and HF, CoIN)
IGNORE_INDEX = -100
PROMPT_TEMPLATE = "{instruction}\n\n### Response:\n"  # CoIN's generate_flan_input (utils/common_utils.py)
CUTOFF = 256  # max tokens per row, BOS and EOS included: alpaca-lora's cutoff_len default (finetune.py)
MAX_REPORTED = 20  # bad lines listed in an error report


@dataclass(frozen=True)
class Example:
    """One line of flan_coin.jsonl (field order = the file's key order)."""
    id: str
    task: str
    original: str
    paraphrase: str
    target: str
    group: str


FIELDS = tuple(f.name for f in fields(Example))


def _parse_record(record, error):
    """One parsed line -> (Example, None), or (None, the reason it is bad and how to fix it)."""
    if error:
        return None, f"not JSON ({error}); each line must be one JSON object"
    if not isinstance(record, dict):
        return None, (f"a JSON {type(record).__name__}, not an object; "
                      f"each line must be {{{', '.join(FIELDS)}}}")
    for name in FIELDS:
        if name not in record:
            return None, f"missing field '{name}'; every line needs {', '.join(FIELDS)}"
        value = record[name]
        if not isinstance(value, str):
            return None, f"field '{name}' is {json.dumps(value)[:40]}, not a string; quote it"
        if not value.strip():
            return None, f"field '{name}' is empty; give it text"
    if record["original"] == record["paraphrase"]:
        return None, "original and paraphrase are identical; a positive pair needs two different instructions"
    return Example(**{name: record[name] for name in FIELDS}), None


def load_examples(path, skip_bad=False):
    """Read and validate flan_coin.jsonl. Returns (examples, problems): one "path:line: reason" per bad line.

    A duplicate id keeps its first line; a group left with one line cannot be contrasted, so that line is bad
    too. Any problem raises ValueError with a short report, unless skip_bad: then bad lines are dropped (and
    counted by len(problems)). Blank lines are skipped.
    """
    good, problems, first_line = [], [], {}
    for lineno, record, error in read_jsonl(path):
        example, reason = _parse_record(record, error)
        if example and example.id in first_line:
            example, reason = None, f"duplicate id '{example.id}' (first on line {first_line[example.id]})"
        if reason:
            problems.append((lineno, reason))
            continue
        first_line[example.id] = lineno
        good.append((lineno, example))
    sizes = Counter(example.group for _, example in good)
    problems += [(lineno, f"group '{ex.group}' has only this line (its partners are missing or bad); "
                  "a group needs at least 2 lines for contrastive training")
                 for lineno, ex in good if sizes[ex.group] < 2]
    problems = [f"{path}:{lineno}: {reason}" for lineno, reason in sorted(problems)]
    if problems and not skip_bad:
        raise ValueError("\n".join([f"{path}: {len(problems)} bad lines (first {MAX_REPORTED} below); "
                                    "fix them or pass --skip-bad"] + problems[:MAX_REPORTED]))
    examples = [example for _, example in good if sizes[example.group] >= 2]
    if not examples:
        raise ValueError(f"{path}: no usable examples")
    return examples, problems


# -----------------------------------------------------------------------------
# 2. Tokenization and label masks


def tokenize_view(tokenizer, prompt, target, cutoff=CUTOFF, eos=False, truncation="right"):
    """(input_ids, labels, pool_index) of one view, or None when no answer token fits (section 2 above).

    labels[t] is the token at t (HF convention; the loss shifts); pool_index: the last answer token.
    """
    n_prompt = len(tokenizer.encode(prompt))  # BOS + prompt: the positions CoIN masks
    ids = tokenizer.encode(prompt + target)  # one string, as CoIN tokenizes it
    if truncation == "middle" and len(ids) + eos > cutoff:
        room = cutoff - eos - 1 - (len(ids) - n_prompt)  # prompt tokens that fit after BOS
        if room < 1:
            return None
        head = room // 2  # keep the first and the last half of the room
        ids, n_prompt = ids[:1 + head] + ids[n_prompt - (room - head):], 1 + room
    ids = ids[:cutoff]
    if len(ids) <= n_prompt:
        return None
    pool_index = len(ids) - 1
    if eos and len(ids) < cutoff:
        ids = ids + [tokenizer.eos_id]
    return ids, [IGNORE_INDEX] * n_prompt + ids[n_prompt:], pool_index


def tokenize_example(example, tokenizer, cutoff=CUTOFF, eos=False, truncation="right"):
    """{"id", "group", "original": (input_ids, labels, pool_index), "paraphrase": (...)}, or None when a view
    has no answer token left. ids and labels are int32 tensors: 4 bytes a token, where a list costs ~36."""
    views = []
    for text in (example.original, example.paraphrase):
        view = tokenize_view(tokenizer, PROMPT_TEMPLATE.format(instruction=text), example.target, cutoff, eos,
                             truncation)
        if view is None:
            return None
        ids, labels, pool_index = view
        views.append((torch.tensor(ids, dtype=torch.int32), torch.tensor(labels, dtype=torch.int32),
                      pool_index))
    return {"id": example.id, "group": example.group, "original": views[0], "paraphrase": views[1]}


class ContrastiveDataset:
    """Tokenized examples, regrouped: items of a group are contiguous, and groups[g] lists their indices.

    dropped counts examples with no answer token within the cutoff; orphans counts examples dropped because
    their group was left with one member (it could not be contrasted).
    """

    def __init__(self, examples, tokenizer, cutoff=CUTOFF, eos=False, truncation="right"):
        by_group, self.dropped = {}, 0
        for example in examples:
            item = tokenize_example(example, tokenizer, cutoff, eos, truncation)
            self.dropped += item is None
            if item is not None:
                by_group.setdefault(example.group, []).append(item)
        self.orphans = sum(len(members) for members in by_group.values() if len(members) < 2)
        self.items, self.groups = [], []
        for members in by_group.values():
            if len(members) >= 2:
                self.groups.append(list(range(len(self.items), len(self.items) + len(members))))
                self.items += members

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]

# -----------------------------------------------------------------------------
# 3. Batching: whole groups per micro-batch, originals then paraphrases


def micro_batches(groups, micro_batch_size, seed, epoch, shuffle=True):
    """Dataset indices per micro-batch for one epoch: the groups shuffled with a Random seeded by
    (seed, epoch), or in file order as CoIN reads them (shuffle False), then packed greedily in that order.
    A group is never split: when the next group does not fit, the current micro-batch closes short and a new
    one starts, so micro-batches hold 2..micro_batch_size examples. Pure and deterministic, so a resumed run
    recomputes the same list and skips to micro-batch k."""
    largest = max(map(len, groups), default=0)
    if largest > micro_batch_size:
        raise ValueError(f"a group has {largest} examples but the micro-batch size is {micro_batch_size}; "
                         f"raise --micro-batch-size to at least {largest} "
                         "so every group fits in one micro-batch")
    order = list(range(len(groups)))
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)  # str seed: sha512, never Python's salted hash()
    batches, current = [], []
    for g in order:
        if len(current) + len(groups[g]) > micro_batch_size:
            batches.append(current)
            current = []
        current = current + list(groups[g])
    return batches + [current] if current else batches


def collate(items, pad_id):
    """Dataset items -> one batch of 2B right-padded rows: originals in [0:B], paraphrases in [B:2B].

    input_ids, attention_mask, labels: (2B, T) long; last_index: (2B,) long, each row's last answer token;
    group_index: (B,) long, groups numbered 0..G-1 in order of appearance; ids: the B example ids.
    """
    rows = [item["original"] for item in items] + [item["paraphrase"] for item in items]
    width = max(len(input_ids) for input_ids, _, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (2B, T)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (2B, T): pads unsupervised
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (2B, T)
    for r, (ids, row_labels, _) in enumerate(rows):
        input_ids[r, :len(ids)] = torch.as_tensor(ids)
        labels[r, :len(ids)] = torch.as_tensor(row_labels)
        attention_mask[r, :len(ids)] = 1
    number = {}  # group name -> its number in this micro-batch
    group_index = [number.setdefault(item["group"], len(number)) for item in items]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "last_index": torch.tensor([pool_index for _, _, pool_index in rows]),
            "group_index": torch.tensor(group_index), "ids": [item["id"] for item in items]}
