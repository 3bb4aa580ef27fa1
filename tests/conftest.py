"""Shared test fixtures: the repo root on sys.path, the real material in ../shared, small data helpers."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))


def shared(*parts):
    """A path under ../shared, or a skip that says why
    (the folder sits beside the repo for developers and CI)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: these tests need the ../shared folder beside the repo")
    return path


@pytest.fixture
def stories_dir():
    """The real pretrained tiny LLaMA (GQA, 5 layers, vocab 512) in HF format, with its tokenizer."""
    return shared("models", "stories260K")


@pytest.fixture
def llama_tokenizer_path():
    """The real 32000-piece LLaMA sentencepiece model."""
    return shared("tokenizers", "llama", "tokenizer.model")


@pytest.fixture
def flan_templates_path():
    """The real FLAN instruction templates (61 datasets)."""
    return shared("flan", "templates.json")


@pytest.fixture
def tok(llama_tokenizer_path):
    """The real LLaMA tokenizer, as coin uses it."""
    from tokenizer import Tokenizer
    return Tokenizer(llama_tokenizer_path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def record(id, group, **changes):
    """One valid flan_coin.jsonl line, with `changes` applied."""
    return {"id": id, "task": "rte", "original": f"Is {id} true?", "paraphrase": f"Tell me: is {id} true?",
            "target": "yes", "group": group, **changes}


U = 2.0**-24  # fp32's unit roundoff


def assert_same_gradients(actual, expected, tokens):
    """One step's gradients {name: tensor}, computed two ways at the same weights, agree to what the order of
    fp32 sums can change: |a - b| <= N u |g| entry by entry, for a step of N real tokens and gradient norm
    |g|. Returns that tolerance.

    The two ways add the same per-token terms in other orders and groupings: micro-batches accumulated one
    after the other or all-reduced over processes, GEMMs of other shapes over other padding, another
    implementation of the same formulas. However a sum of N fp32 terms is ordered, it errs by at most
    (N - 1) u times the sum of their magnitudes (Higham, Accuracy and Stability of Numerical Algorithms,
    §4.2); the gradient norm stands in for that sum. Weights after AdamW steps have no such bound: Adam's
    first update is about lr for every entry whatever its gradient's size, so an entry whose gradient is
    within rounding of zero moves by lr one way or the other, by how the CPU's kernels round.
    """
    assert actual.keys() == expected.keys()
    tolerance = tokens * U * torch.cat([g.flatten() for g in expected.values()]).norm().item()
    for name in expected:
        error = (actual[name] - expected[name]).abs().max().item()
        assert error <= tolerance, (name, error, tolerance)
    return tolerance


def assert_decided_beyond_rounding(model, prompts, answers):
    """Each greedy choice wins by more than the order of fp32 sums can move a logit: batches of other shapes
    and padding then pick the same tokens on any CPU. A logit's longest sums run over the sequence's T
    positions and the MLP's I units; reordered, they err by at most (T + I) u max |logit| (the bound of
    assert_same_gradients)."""
    for prompt, answer in zip(prompts, answers):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer]))[0, len(prompt) - 1:-1]  # (answer, V)
        top = logits.topk(2).values  # (answer, 2)
        assert logits.argmax(-1).tolist() == answer
        bound = (len(prompt) + len(answer) + model.args.intermediate_size) * U * logits.abs().max().item()
        assert (top[:, 0] - top[:, 1]).min().item() > bound, "a near tie: pick prompts without one"
