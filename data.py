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

3. `epoch_steps` shuffles whole groups per (seed, epoch) into steps and micro-batches of similar lengths;
  `collate` stacks the two views and cuts the rows into two length buckets, each run as its own forward:

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
VIEWS = ("original", "paraphrase")  # the two instructions of an example


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
    item = {"id": example.id, "group": example.group}
    for view in VIEWS:
        prompt = PROMPT_TEMPLATE.format(instruction=getattr(example, view))
        tokenized = tokenize_view(tokenizer, prompt, example.target, cutoff, eos, truncation)
        if tokenized is None:
            return None
        ids, labels, pool_index = tokenized
        item[view] = torch.tensor(ids, dtype=torch.int32), torch.tensor(labels, dtype=torch.int32), pool_index
    return item


class ContrastiveDataset:
    """Tokenized examples, regrouped: items of a group are contiguous, groups[g] lists their indices and
    lengths[g] holds its longest row. dropped counts examples with no answer token within the cutoff; orphans
    counts examples dropped because their group was left with one member (it could not be contrasted)."""

    def __init__(self, examples, tokenizer, cutoff=CUTOFF, eos=False, truncation="right"):
        by_group, self.dropped, self.pad_id = {}, 0, tokenizer.pad_id  # pad_id: for collate
        for example in examples:
            item = tokenize_example(example, tokenizer, cutoff, eos, truncation)
            self.dropped += item is None
            if item is not None:
                by_group.setdefault(example.group, []).append(item)
        self.orphans = sum(len(members) for members in by_group.values() if len(members) < 2)
        self.items, self.groups, self.lengths = [], [], []
        for members in by_group.values():
            if len(members) >= 2:
                self.groups.append(list(range(len(self.items), len(self.items) + len(members))))
                self.lengths.append(max(len(m[view][0]) for m in members for view in VIEWS))
                self.items += members

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]

# -----------------------------------------------------------------------------
# 3. Batching: whole groups per step and per micro-batch, similar lengths together

MEGA_STEPS = 50  # steps sorted by length together (HF's group_by_length sorts 50 batches at a time)


def pack(order, sizes, capacity):
    """Group numbers, in `order` -> lists of them holding at most `capacity` examples, filled greedily: when
    the next group does not fit, the current list closes short."""
    packed = []
    for g in order:
        if not packed or sum(sizes[h] for h in packed[-1]) + sizes[g] > capacity:
            packed.append([])
        packed[-1].append(g)
    return packed


def epoch_steps(groups, batch_size, micro_batch_size, seed, epoch, shuffle=True, lengths=None):
    """Dataset indices of each micro-batch of each optimizer step of one epoch: [[[i, ...], ...], ...].

    Groups, shuffled by (seed, epoch) or in file order as CoIN reads them, are packed whole into steps of at
    most batch_size examples, then micro_batch_size. A last step short of batch_size is not taken (HF's
    Trainer). With `lengths` (each group's longest row) and shuffle, every MEGA_STEPS steps' worth of groups
    is sorted by length before packing, each step too; the steps are shuffled, the longest first (an
    out-of-memory shows at step 1). A step's groups, hence its loss, never depend on micro_batch_size.
    Deterministic: a resumed run recomputes the list and skips the steps it has done."""
    sizes = [len(group) for group in groups]
    if max(sizes, default=0) > micro_batch_size:
        raise ValueError(f"a group has {max(sizes)} examples but the micro-batch size is {micro_batch_size}; "
                         f"raise --micro-batch-size to at least {max(sizes)} "
                         "so every group fits in one micro-batch")
    rng, order = random.Random(f"{seed}:{epoch}"), list(range(len(groups)))  # str seed: never salted hash()
    by_length = shuffle and lengths is not None
    if shuffle:
        rng.shuffle(order)
    steps = pack(order, sizes, batch_size)
    if len(steps) > 1 and sum(sizes[g] for g in steps[-1]) < batch_size:
        steps.pop()  # the groups left out are the shuffled order's last, with or without lengths
    if by_length:
        span = MEGA_STEPS * batch_size // 2  # groups (of 2 examples or more) in MEGA_STEPS steps at most
        kept = [g for step in steps for g in step]
        steps = pack([g for start in range(0, len(kept), span)
                      for g in sorted(kept[start:start + span], key=lengths.__getitem__)], sizes, batch_size)
        rng.shuffle(steps)
        longest = max(range(len(steps)), key=lambda s: max(lengths[g] for g in steps[s]))
        steps = [sorted(step, key=lengths.__getitem__) for step in [steps.pop(longest)] + steps]
    return [[[i for g in micro for i in groups[g]] for micro in pack(step, sizes, micro_batch_size)]
            for step in steps]


def length_buckets(lengths):
    """(bucket of each row, token positions computed). The rows sorted by length are cut in two where the
    two rectangles, rows x their longest row, cover the fewest positions; bucket 0 holds the shorter rows
    (all of them when a cut saves nothing). coin.py runs each bucket as its own forward."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    n, longest = len(order), lengths[order[-1]]
    cost = {cut: cut * lengths[order[cut - 1]] + (n - cut) * longest for cut in range(1, n + 1)}
    cut = min(cost, key=lambda c: (cost[c], -c))  # on a tie, the later cut: fewer forwards
    rank = {row: r for r, row in enumerate(order)}
    return [int(rank[row] >= cut) for row in range(n)], cost[cut]


def collate(items, pad_id, by_length=True):
    """Dataset items -> one batch of 2B right-padded rows: originals in [0:B], paraphrases in [B:2B].

    input_ids, attention_mask, labels: (2B, T) long; last_index: (2B,) long, each row's last answer token;
    group_index: (B,) long, groups numbered 0..G-1 in order of appearance; ids: the B example ids; bucket:
    (2B,) long, each row's length bucket (all 0 unless by_length); computed_tokens: positions computed."""
    rows = [item[view] for view in VIEWS for item in items]
    lengths = [len(input_ids) for input_ids, _, _ in rows]
    bucket, computed = length_buckets(lengths) if by_length else ([0] * len(rows), len(rows) * max(lengths))
    input_ids = torch.full((len(rows), max(lengths)), pad_id, dtype=torch.long)  # (2B, T)
    labels = torch.full_like(input_ids, IGNORE_INDEX)  # (2B, T): pads unsupervised
    attention_mask = torch.zeros_like(input_ids)  # (2B, T)
    for r, (ids, row_labels, _) in enumerate(rows):
        input_ids[r, :len(ids)] = torch.as_tensor(ids)
        labels[r, :len(ids)] = torch.as_tensor(row_labels)
        attention_mask[r, :len(ids)] = 1
    number = {}  # group name -> its number in this micro-batch
    group_index = [number.setdefault(item["group"], len(number)) for item in items]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "last_index": torch.tensor([pool_index for _, _, pool_index in rows]),
            "group_index": torch.tensor(group_index), "bucket": torch.tensor(bucket),
            "computed_tokens": computed, "ids": [item["id"] for item in items]}
