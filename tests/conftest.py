"""Shared test fixtures: the repo root on sys.path, the real material in ../shared, small data helpers."""
import json
import sys
from pathlib import Path

import pytest

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
