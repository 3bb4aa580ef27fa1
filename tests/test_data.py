"""data.py: the flan_coin.jsonl record and its validation, label masks and group batching.

The tokenizer tests use the real LLaMA tokenizer from ../shared.
"""
import json
import random
import re
from pathlib import Path

import pytest
import torch

import data
from conftest import record, write_jsonl
from data import IGNORE_INDEX, Example

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "flan_coin_demo.jsonl"


# -----------------------------------------------------------------------------
# flan_coin.jsonl: loading and validation

def test_demo_file_loads_without_problems():
    examples, problems = data.load_examples(DEMO)
    assert problems == [] and len(examples) == 264
    sizes = {}
    for example in examples:
        sizes[example.group] = sizes.get(example.group, 0) + 1
    assert set(sizes.values()) == {2}


BAD_LINES = [  # (third line of a file whose first two lines are a good group, the reason reported for it)
    ('{"id": "c", "task": "rte"', r"not JSON \(.*\); each line must be one JSON object"),
    ("[1, 2]", r"a JSON list, not an object"),
    ({k: v for k, v in record("c", "h").items() if k != "target"}, r"missing field 'target'"),
    (record("c", "h", target="  "), r"field 'target' is empty"),
    ({**record("c", "h"), "group": 3}, r"field 'group' is 3, not a string"),
    (record("a", "g"), r"duplicate id 'a' \(first on line 1\)"),
    (record("c", "h", paraphrase="Is c true?"), r"original and paraphrase are identical"),
    (record("c", "lonely"), r"group 'lonely' has only this line"),
]


@pytest.mark.parametrize("bad, reason", BAD_LINES)
def test_each_bad_line_is_reported_with_its_line_number(tmp_path, bad, reason):
    path = tmp_path / "train.jsonl"
    lines = [json.dumps(record("a", "g")), json.dumps(record("b", "g")), bad if isinstance(bad, str) else
             json.dumps(bad)]
    path.write_text("\n".join(lines) + "\n")
    first = re.escape(f"{path}: 1 bad lines (first 20 below); fix them or pass --skip-bad")
    with pytest.raises(ValueError, match=rf"^{first}\n{re.escape(str(path))}:3: {reason}"):
        data.load_examples(path)
    examples, problems = data.load_examples(path, skip_bad=True)
    assert [e.id for e in examples] == ["a", "b"]
    assert len(problems) == 1 and problems[0].startswith(f"{path}:3: ")


def test_report_lists_the_first_20_bad_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(f"not json {i}\n" for i in range(25)))
    with pytest.raises(ValueError, match=r": 25 bad lines") as error:
        data.load_examples(path)
    assert len(str(error.value).splitlines()) == 1 + 20


def test_skip_bad_drops_the_partner_of_a_bad_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([json.dumps(record("a", "g")), "{oops", json.dumps(record("c", "h")),
                               json.dumps(record("d", "h"))]) + "\n\n")  # the blank line is skipped
    examples, problems = data.load_examples(path, skip_bad=True)
    assert [e.id for e in examples] == ["c", "d"]
    assert [p.split(": ")[0] for p in problems] == [f"{path}:1", f"{path}:2"]


def test_a_file_without_usable_examples_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no usable examples"):
        data.load_examples(write_jsonl(tmp_path / "empty.jsonl", []))


# -----------------------------------------------------------------------------
# Tokenization and label masks (real LLaMA tokenizer)

@pytest.mark.parametrize("prompt", ["Review: a gem.\n\n### Response:\n", "Review: a gem. Sentiment:"])
def test_a_view_is_prompt_plus_target_as_one_string_with_the_prompt_masked(tok, prompt):
    input_ids, labels, pool_index = data.tokenize_view(tok, prompt, "positive")
    n_prompt = len(tok.encode(prompt))  # BOS + prompt: the positions CoIN masks
    assert input_ids == tok.encode(prompt + "positive")  # one string, no EOS (CoIN's add_eos_token False)
    assert labels == [IGNORE_INDEX] * n_prompt + input_ids[n_prompt:] and pool_index == len(input_ids) - 1
    if prompt.endswith("\n"):  # after the response marker the answer is a new piece: "pos..." without "▁"
        assert input_ids[:n_prompt] == tok.encode(prompt)
        assert tok.sp.id_to_piece(input_ids[n_prompt]) != tok.sp.id_to_piece(tok.encode("positive")[1])


def test_a_trailing_space_merges_into_the_answer_and_coins_mask_covers_that_piece(tok):
    # CoIN masks len(ids(prompt)) positions: "Answer: " ends with a "▁" piece, which prompt + target merges
    # into "▁positive", so the mask swallows the answer's first piece. CoIN's template ends with "\n":
    # no merge there.
    input_ids, labels, _ = data.tokenize_view(tok, "Answer: ", "positive review")
    assert input_ids == tok.encode("Answer: positive review")
    assert labels == [IGNORE_INDEX] * len(tok.encode("Answer: ")) + input_ids[len(tok.encode("Answer: ")):]
    assert data.tokenize_view(tok, "Answer: ", "positive") is None  # nothing left to supervise


def test_eos_is_appended_on_request_and_never_pooled(tok):
    plain, _, plain_pool = data.tokenize_view(tok, "Is it true?\n", "yes")
    input_ids, labels, pool_index = data.tokenize_view(tok, "Is it true?\n", "yes", eos=True)
    assert input_ids == plain + [tok.eos_id] and labels[-1] == tok.eos_id and pool_index == plain_pool
    cut, _, _ = data.tokenize_view(tok, "Is it true?\n", "yes", cutoff=len(plain), eos=True)
    assert cut == plain  # as CoIN: no room under the cutoff, no EOS
    assert data.tokenize_view(tok, "Is it true?", "") is None  # no token would be supervised


def test_right_truncation_keeps_the_first_tokens_as_coins_tokenizer_call(tok):
    prompt = "Read the passage. " + "The river runs past the mill. " * 10 + "\n\n### Response:\n"
    target = "yes, the mill stands by the river"
    whole, _, _ = data.tokenize_view(tok, prompt, target, cutoff=1000)
    n_prompt = len(tok.encode(prompt))
    input_ids, labels, pool_index = data.tokenize_view(tok, prompt, target, cutoff=n_prompt + 2)
    assert input_ids == whole[:n_prompt + 2] and labels[n_prompt:] == whole[n_prompt:n_prompt + 2]
    assert pool_index == n_prompt + 1  # the last answer token that survived
    assert data.tokenize_view(tok, prompt, target, cutoff=n_prompt) is None  # the answer is cut entirely


def test_middle_truncation_cuts_the_prompts_middle_never_the_target(tok):
    prompt = ("Read the passage. " + "The river runs past the mill. " * 40
              + "OPTIONS:\n- yes\n- no\n\n### Response:\n")
    target = "yes, the mill stands by the river"
    whole = tok.encode(prompt + target)
    n_prompt = len(tok.encode(prompt))
    answer = whole[n_prompt:]
    input_ids, labels, pool_index = data.tokenize_view(tok, prompt, target, cutoff=40, truncation="middle")
    room = 40 - 1 - len(answer)
    assert len(input_ids) == 40 and input_ids[0] == tok.bos_id and pool_index == 39
    assert input_ids[1:1 + room // 2] == whole[1:1 + room // 2]  # the task words at the start stay
    # options + response marker stay
    assert input_ids[1 + room // 2:1 + room] == whole[n_prompt - (room - room // 2):n_prompt]
    assert input_ids[-len(answer):] == labels[-len(answer):] == answer
    assert labels[:1 + room] == [IGNORE_INDEX] * (1 + room)
    # no room for a prompt token
    assert data.tokenize_view(tok, prompt, target, cutoff=len(answer) + 1, truncation="middle") is None


def test_dataset_drops_examples_that_cannot_fit_and_their_lone_partners(tok):
    long = "a very long answer " * 30
    examples = [Example("a", "t", "Q a?", "Ask a?", "yes", "g"),
                Example("b", "t", "Q b?", "Ask b?", "no", "g"),
                Example("c", "t", "Q c?", "Ask c?", "yes", "h"),
                Example("d", "t", "Q d?" * 40, "Ask d?", long, "h"),
                Example("e", "t", "Q e?" * 40, "Ask e?", long, "k")]
    dataset = data.ContrastiveDataset(examples, tok, cutoff=64)
    assert (dataset.dropped, dataset.orphans, len(dataset), dataset.groups) == (2, 1, 2, [[0, 1]])
    assert [dataset[i]["id"] for i in range(len(dataset))] == ["a", "b"]


def test_every_demo_row_has_supervised_tokens(tok):
    dataset = data.ContrastiveDataset(data.load_examples(DEMO)[0], tok)
    assert (dataset.dropped, dataset.orphans, len(dataset)) == (0, 0, 264)
    for item in dataset.items:
        for input_ids, labels, pool_index in (item["original"], item["paraphrase"]):
            supervised = labels[labels != IGNORE_INDEX]
            assert len(supervised) >= 1 and pool_index == len(input_ids) - 1
            assert torch.equal(supervised, input_ids[-len(supervised):])


def test_training_ids_equal_hfs_sentencepiece_llama_tokenizer_on_every_demo_line(tok, llama_tokenizer_path):
    """CoIN tokenized with transformers' slow LlamaTokenizer (4.30, legacy): BOS + sentencepiece over the
    prompt + target string, add_eos_token False, and -100 over len(tokenizer(prompt)) positions."""
    backends = pytest.importorskip("transformers.tokenization_utils_sentencepiece")
    hf = backends.SentencePieceBackend(vocab_file=str(llama_tokenizer_path), legacy=True, bos_token="<s>",
                                       eos_token="</s>", unk_token="<unk>")

    def hf_ids(text):  # LlamaTokenizer's build_inputs_with_special_tokens: BOS, then the pieces
        return [hf.bos_token_id] + hf(text, add_special_tokens=False)["input_ids"]
    examples = data.load_examples(DEMO)[0]
    for example in examples:
        item = data.tokenize_example(example, tok, cutoff=10_000)
        for view, text in (("original", example.original), ("paraphrase", example.paraphrase)):
            prompt = data.PROMPT_TEMPLATE.format(instruction=text)
            full, n_prompt = hf_ids(prompt + example.target), len(hf_ids(prompt))
            input_ids, labels, _ = item[view]
            assert input_ids.tolist() == full, (example.id, view)
            assert labels.tolist() == [IGNORE_INDEX] * n_prompt + full[n_prompt:], (example.id, view)
    assert len(examples) == 264


# -----------------------------------------------------------------------------
# Batching

GROUPS = [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9], [10, 11], [12, 13]]
LENGTHS = [40, 12, 90, 7, 33, 90]  # each group's longest row


def steps(batch_size, micro_batch_size, seed=0, epoch=0, lengths=None, groups=GROUPS):
    return data.epoch_steps(groups, batch_size, micro_batch_size, seed, epoch, lengths=lengths)


PAIRS = [[2 * g, 2 * g + 1] for g in range(2000)]
PAIR_LENGTHS = [random.Random(g).randrange(20, 250) for g in range(2000)]


@pytest.mark.parametrize("lengths", [None, PAIR_LENGTHS[:40]])
def test_steps_are_deterministic_per_seed_and_epoch(lengths):
    def run(seed, epoch):
        return steps(8, 4, seed, epoch, lengths, PAIRS[:40])
    assert run(0, 0) == run(0, 0)
    assert len({str(run(0, e)) for e in range(8)}) > 1 and len({str(run(s, 0)) for s in range(8)}) > 1


@pytest.mark.parametrize("lengths", [None, LENGTHS])
@pytest.mark.parametrize("batch_size, size", [(3, 3), (4, 4), (5, 5), (8, 4), (16, 8)])
def test_steps_keep_groups_whole_and_visit_every_group_once(lengths, batch_size, size):
    sizes = {i: len(group) for group in GROUPS for i in group}
    for epoch in range(4):
        micro = [batch for step in steps(batch_size, size, 1, epoch, lengths) for batch in step]
        seen = [i for batch in micro for i in batch]
        assert len(seen) == len(set(seen)) and all(2 <= len(batch) <= size for batch in micro)
        for group in GROUPS:  # each group in one micro-batch, or left out with the epoch's short last step
            assert any(set(group) <= set(batch) for batch in micro) or not set(group) & set(seen)
        assert len(seen) >= 14 - batch_size + 1
        assert all(sum(map(len, step)) <= batch_size for step in steps(batch_size, size, 1, epoch, lengths))
        if lengths is None:  # greedy packing: a micro-batch closes early only when the next group won't fit
            assert all(len(batch) + sizes[after[0]] > size for batch, after in zip(micro, micro[1:]))


@pytest.mark.parametrize("lengths", [None, PAIR_LENGTHS[:301]])
def test_a_step_holds_the_same_groups_at_every_micro_batch_size(lengths):
    def step_sets(size):
        return [sorted(i for batch in step for i in batch)
                for step in steps(64, size, 3, 1, lengths, PAIRS[:301])]
    assert step_sets(2) == step_sets(16) == step_sets(64)


def test_grouping_by_length_leaves_out_the_same_random_groups_and_puts_the_longest_step_first():
    def seen(lengths):
        return {i for step in steps(64, 16, 5, 0, lengths, PAIRS[:301]) for batch in step for i in batch}
    assert seen(None) == seen(PAIR_LENGTHS[:301]) and len(seen(None)) == 9 * 64  # 602 examples
    first = steps(64, 16, 0, 0, PAIR_LENGTHS, PAIRS)[0]
    assert max(PAIR_LENGTHS[i // 2] for batch in first for i in batch) == max(PAIR_LENGTHS)


def test_grouping_by_length_leaves_little_padding():
    def padding(lengths):  # the share of rows x each micro-batch's longest group that is padding
        micro = [batch for step in steps(64, 16, 0, 0, lengths, PAIRS) for batch in step]
        longest = [[PAIR_LENGTHS[i // 2] for i in batch] for batch in micro]
        return 1 - sum(map(sum, longest)) / sum(len(b) * max(b) for b in longest)
    assert padding(PAIR_LENGTHS) < 0.05 < 0.3 < padding(None)


def test_a_group_larger_than_the_micro_batch_is_an_error():
    with pytest.raises(ValueError, match="raise --micro-batch-size to at least 3"):
        steps(4, 2)


@pytest.mark.parametrize("lengths, bucket, computed", [
    ([5, 5, 5, 5], [0, 0, 0, 0], 20),           # equal rows: one bucket
    ([10, 3, 2, 10], [1, 0, 0, 1], 2 * 3 + 2 * 10),
    ([9, 1, 8, 7, 100], [0, 0, 0, 0, 1], 4 * 9 + 100),
    ([4, 6], [0, 1], 10),
])
def test_length_buckets_cut_where_the_fewest_positions_are_computed(lengths, bucket, computed):
    assert data.length_buckets(lengths) == (bucket, computed)


def test_collate_stacks_originals_then_paraphrases_right_padded(tok):
    dataset = data.ContrastiveDataset(data.load_examples(DEMO)[0], tok)
    indices = steps(6, 6, groups=dataset.groups)[0][0]
    items = [dataset[i] for i in indices]
    batch = data.collate(items, tok.pad_id)
    B = len(items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 2 * B and batch["last_index"].shape == (2 * B,)
    assert batch["ids"] == [item["id"] for item in items]
    for i, item in enumerate(items):  # row i and row B+i: the two views of one example
        for row, (input_ids, labels, pool_index) in ((i, item["original"]), (B + i, item["paraphrase"])):
            n = len(input_ids)
            assert batch["input_ids"][row, :n].tolist() == input_ids.tolist()
            assert batch["labels"][row, :n].tolist() == labels.tolist()
            assert (batch["input_ids"][row, n:] == tok.pad_id).all()
            assert (batch["labels"][row, n:] == -100).all()
            assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
            assert batch["last_index"][row] == pool_index == n - 1
    groups = [item["group"] for item in items]
    assert batch["group_index"].tolist() == [sorted(set(groups), key=groups.index).index(g) for g in groups]
    assert all(t.dtype == torch.long for t in batch.values() if torch.is_tensor(t))
    lengths = batch["attention_mask"].sum(1).tolist()
    assert (batch["bucket"].tolist(), batch["computed_tokens"]) == data.length_buckets(lengths)
    one = data.collate(items, tok.pad_id, by_length=False)
    assert one["bucket"].tolist() == [0] * 2 * B and one["computed_tokens"] == one["input_ids"].numel()


def test_groups_survive_shuffling_into_collated_batches(tok):
    dataset = data.ContrastiveDataset(data.load_examples(DEMO)[0], tok)
    group_of = {item["id"]: item["id"].rsplit("-", 1)[0] for item in dataset.items}
    seen = []
    for indices in [batch for step in steps(8, 4, 7, 2, dataset.lengths, dataset.groups) for batch in step]:
        ids = data.collate([dataset[i] for i in indices], tok.pad_id)["ids"]
        groups = [group_of[i] for i in ids]
        assert all(groups.count(g) == 2 for g in groups)  # both members of every group are in this batch
        seen += ids
    assert sorted(seen) == sorted(group_of)
