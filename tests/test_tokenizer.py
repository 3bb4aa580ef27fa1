"""The Tokenizer on the real LLaMA tokenizer.model:
sentencepiece's ids plus BOS, as Meta's code and alpaca-lora."""
import random
import shutil

import pytest
import sentencepiece as spm

from hf_io import load_tokenizer
from tokenizer import Tokenizer

BASE = [
    "Once upon a time", "Determine whether the sentence is positive or negative.", "Is the premise entailed?",
    "The movie was great!", "I can't believe it's not butter", "2 + 2 = 4", "Answer: yes",
    "OPTIONS:\n- yes\n- no", "naïve café résumé", "日本語のテキスト", "emoji 🙂 and 🚀",
    "Ünïcödé Straße", "tab\tseparated\tvalues",
    "Question 1: What is AI? Question 2: What is ML?", "Premise: A man sleeps. Hypothesis: A man rests.",
    "x\n\n### Response:\n", "### Instruction:\nClassify this.\n\n### Response:\n", "mid</s>dle", "<s>start",
    "a <unk> token", "trailing space ", "42", "3.14159", "e-mail: someone@example.com", "C++ / C# / F#",
]


def typo(text, rng):
    """Swap two adjacent characters, as a DeepWordBug-style typo."""
    if len(text) < 2:
        return text
    i = rng.randrange(len(text) - 1)
    return text[:i] + text[i + 1] + text[i] + text[i + 2:]


VARIANTS = [
    lambda s, rng: s,
    lambda s, rng: " " + s,
    lambda s, rng: "  " + s,
    lambda s, rng: s.replace(" ", "  "),
    lambda s, rng: s + "  ",
    lambda s, rng: typo(s, rng),
    lambda s, rng: s + f" {rng.randrange(10**6)}",
    lambda s, rng: s.upper(),
    lambda s, rng: s + "\n\n### Response:\n",
    lambda s, rng: "\n" + s + "\n",
    lambda s, rng: s + " </s>",
    lambda s, rng: s.replace("e", "é"),
]


def corpus():
    """A few hundred strings: every base string under every variant, seeded."""
    rng = random.Random(0)
    return [variant(s, rng) for s in BASE for variant in VARIANTS]


@pytest.fixture
def tokenizer(llama_tokenizer_path):
    return Tokenizer(llama_tokenizer_path)


def test_known_ids(tokenizer):
    # From ../shared/tokenizers/llama/PROVENANCE.md: "Once upon a time" -> [9038, 2501, 263, 931].
    assert tokenizer.encode("Once upon a time") == [1, 9038, 2501, 263, 931]
    assert tokenizer.encode("Once upon a time", bos=False, eos=True) == [9038, 2501, 263, 931, 2]
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size) == (1, 2, 0, 32000)


def test_ids_equal_bos_plus_sentencepiece(tokenizer, llama_tokenizer_path):
    reference = spm.SentencePieceProcessor(model_file=str(llama_tokenizer_path))
    strings = corpus()
    assert len(strings) >= 300
    for s in strings:
        assert tokenizer.encode(s) == [reference.bos_id()] + reference.encode(s), repr(s)


def test_repeated_spaces_are_kept(tokenizer):
    # transformers 5's tokenizers-based LlamaTokenizer differs here; sentencepiece (and we) keep every space.
    assert tokenizer.encode("a  b") == [1, 263, 29871, 289]
    assert tokenizer.encode("a  b") != tokenizer.encode("a b")


def test_decode_inverts_encode(tokenizer):
    for s in corpus():
        assert tokenizer.decode(tokenizer.encode(s, eos=True)) == s, repr(s)


def test_control_text_in_input_never_becomes_a_control_id(tokenizer):
    for s in ["</s>", "<s>", "<unk>", "stop here </s> and go on", "<s>[INST] hi [/INST]</s>"]:
        ids = tokenizer.encode(s, bos=False)
        assert not {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id} & set(ids), (s, ids)
        assert tokenizer.decode(ids) == s


def test_vocabulary_must_match_the_model(tmp_path, stories_dir, llama_tokenizer_path):
    shutil.copy(stories_dir / "config.json", tmp_path / "config.json")  # vocab_size 512
    shutil.copy(llama_tokenizer_path, tmp_path / "tokenizer.model")    # 32000 pieces
    with pytest.raises(ValueError) as e:
        load_tokenizer(tmp_path)
    message = str(e.value)
    assert "\n" not in message
    assert str(tmp_path / "tokenizer.model") in message and "32000" in message and "vocab_size=512" in message
    assert load_tokenizer(stories_dir).vocab_size == 512


def test_missing_or_corrupt_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="no sentencepiece tokenizer.model"):
        Tokenizer(tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer(tmp_path / "tokenizer.model")
