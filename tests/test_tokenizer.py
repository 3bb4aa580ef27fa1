"""The tokenizers: sentencepiece's on the real LLaMA tokenizer.model (its ids plus BOS, as Meta's code and
alpaca-lora), and tokenizer.json through the optional `tokenizers` package, byte-level BPE trained here,
against transformers' PreTrainedTokenizerFast (skipped, with the reason, where the extra is not installed)."""
import json
import random
import shutil
import sys
from pathlib import Path

from types import SimpleNamespace

import pytest
import sentencepiece as spm
import torch

import evaluate
from data import IGNORE_INDEX, PROMPT_TEMPLATE, VIEWS, collate, load_examples, tokenize_example, tokenize_view
from glue import LABELS
from hf_io import load_model, load_tokenizer
from model import Llama, ModelArgs
from model_config import hf_config
from tokenizer import EXTRA, JsonTokenizer, Tokenizer, read_tokenizer

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


# -----------------------------------------------------------------------------
# tokenizer.json: byte-level BPE as Llama 3 and Qwen2.5 ship it, trained here on the README and the prompts

ROOT = Path(__file__).resolve().parents[1]
# The pre-tokenizer patterns of Llama 3's and Qwen2.5's tokenizer.json (they differ in how digits group).
PATTERNS = dict(
    llama3=r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    qwen2=r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Their special tokens and tokenizer_config.json fields: Llama 3 names bos and eos and no pad; Qwen2.5 names
# no bos, and pads with its end of text.
SPECIALS = dict(llama3=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
                qwen2=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
CONFIGS = dict(llama3=dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"),
               qwen2=dict(bos_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                          unk_token=None))


def strings_in(value):
    """Every string inside a JSON value."""
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [s for item in items for s in strings_in(item)]


def reference_texts():
    """The README's lines, and every string of the shipped prompt files (prompts/*.json)."""
    prompts = [s for file in sorted((ROOT / "prompts").glob("*.json")) for s in strings_in(json.loads(
        file.read_text(encoding="utf-8")))]
    return (ROOT / "README.md").read_text(encoding="utf-8").splitlines() + prompts


def write_tokenizer_json(folder, style, vocab_size=None):
    """A byte-level BPE tokenizer.json trained on reference_texts(), with `style`'s special tokens and
    post-processor (Llama 3's adds <|begin_of_text|>; Qwen2.5's adds nothing), its tokenizer_config.json, and
    a config.json of vocab_size (default: the tokenizer's size). Returns folder."""
    tokenizers = pytest.importorskip("tokenizers", reason=f"tokenizer.json needs the extra ({EXTRA})")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(PATTERNS[style]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(reference_texts(), trainers.BpeTrainer(
        vocab_size=700, special_tokens=SPECIALS[style], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    after = [processors.ByteLevel(trim_offsets=False)]
    if style == "llama3":
        bos = SPECIALS[style][0]
        after.append(processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                   special_tokens=[(bos, tok.token_to_id(bos))]))
    tok.post_processor = processors.Sequence(after)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(CONFIGS[style],
                                                                  tokenizer_class="PreTrainedTokenizerFast")))
    vocab_size = vocab_size or tok.get_vocab_size(with_added_tokens=True)
    (folder / "config.json").write_text(json.dumps(hf_config(ModelArgs.tiny(vocab_size=vocab_size))))
    return folder


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def json_dir(request, tmp_path_factory):
    return write_tokenizer_json(tmp_path_factory.mktemp(request.param), request.param)


def test_json_ids_equal_transformers_fast_tokenizer(json_dir):
    transformers = pytest.importorskip("transformers", reason="transformers is the reference tokenizer")
    ours = load_tokenizer(json_dir)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(json_dir / "tokenizer.json"))
    texts = reference_texts() + corpus()
    assert len(texts) >= 1000 and not any("<|" in t for t in texts)  # special tokens typed in: tested below
    for text in texts:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], repr(text)  # BOS as the post-processor adds it
        assert ours.encode(text, bos=False) == theirs(text, add_special_tokens=False)["input_ids"], repr(text)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True) == text, repr(text)


def test_json_special_ids_come_from_the_hf_files(json_dir, tmp_path):
    ours = load_tokenizer(json_dir)
    ids = {token: ours.token_id(token) for token in SPECIALS["llama3"] + SPECIALS["qwen2"]}
    if "<|begin_of_text|>" in ids and ids["<|begin_of_text|>"] is not None:  # Llama 3: no pad, no unk
        assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ids["<|begin_of_text|>"], ids["<|end_of_text|>"],
                                                           ids["<|end_of_text|>"])
        shutil.copytree(json_dir, tmp_path / "instruct")  # eos named by generation_config.json only
        (tmp_path / "instruct" / "tokenizer_config.json").write_text("{}")
        listed = [ids["<|eot_id|>"], ids["<|end_of_text|>"]]
        (tmp_path / "instruct" / "generation_config.json").write_text(json.dumps({"eos_token_id": listed}))
        assert load_tokenizer(tmp_path / "instruct").eos_id == ids["<|eot_id|>"]
    else:  # Qwen2.5: no BOS; pad named
        assert (ours.bos_id, ours.eos_id, ours.pad_id) == (None, ids["<|endoftext|>"], ids["<|endoftext|>"])
        assert ours.encode("yes") == ours.encode("yes", bos=False)
    assert ours.encode("yes", bos=False, eos=True)[-1] == ours.eos_id


def test_a_pad_that_is_eos_masks_no_eos(json_dir):
    """Llama 3 pads with its eos: labels and masks come from row lengths, so every eos --eos appends is still
    supervised, and every pad still masked."""
    tok = load_tokenizer(json_dir)
    examples, _ = load_examples(ROOT / "examples" / "flan_coin_demo.jsonl")
    items = [tokenize_example(example, tok, eos=True) for example in examples[:8]]
    batch = collate(items, tok.eos_id)  # pad_id = eos_id, whatever the layout names
    for row, (ids, _, _) in enumerate(item[view] for view in VIEWS for item in items):
        n = len(ids)
        assert batch["labels"][row, n - 1] == tok.eos_id and batch["attention_mask"][row, :n].all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all() and not batch["attention_mask"][row, n:].any()
    assert (batch["attention_mask"] == 0).any()  # some rows are padded


def test_json_special_text_stays_text(json_dir):
    ours = load_tokenizer(json_dir)
    specials = {ours.token_id(token) for style in SPECIALS.values() for token in style} - {None}
    for text in ["stop <|end_of_text|> here", "<|endoftext|>", "<|im_start|>user\nhi<|im_end|>"]:
        ids = ours.encode(text, bos=False)
        assert not specials & set(ids) and ours.decode(ids) == text, (text, ids)


def test_json_vocabulary_must_fit_the_model(json_dir, tmp_path):
    size = load_tokenizer(json_dir).vocab_size
    for vocab_size, fits in ((size - 1, False), (size, True), (size + 128, True)):  # Qwen2.5 pads its matrix
        folder = tmp_path / str(vocab_size)
        shutil.copytree(json_dir, folder)
        (folder / "config.json").write_text(json.dumps(hf_config(ModelArgs.tiny(vocab_size=vocab_size))))
        if fits:
            assert load_tokenizer(folder).vocab_size == size
            continue
        with pytest.raises(ValueError) as e:
            load_model(folder)  # before any weight: the folder has none
        message = str(e.value)
        assert "\n" not in message and str(folder / "tokenizer.json") in message, message
        assert f"{size} tokens" in message and f"vocab_size={vocab_size}" in message


def test_json_post_processor_adding_eos_is_refused(json_dir, tmp_path):
    data = json.loads((json_dir / "tokenizer.json").read_text())
    data["post_processor"] = {"type": "TemplateProcessing", "single": [
        {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<|im_end|>", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_end|>": {"id": "<|im_end|>", "ids": [2], "tokens": ["<|im_end|>"]}}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError) as e:
        JsonTokenizer(tmp_path / "tokenizer.json")
    assert "\n" not in str(e.value) and "post_processor" in str(e.value) and "at most one BOS" in str(e.value)


def test_json_without_the_extra_is_refused_in_one_line(tmp_path, monkeypatch):
    """Runs with or without `tokenizers` installed: it hides the package."""
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` now raises ImportError
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(ModelArgs.tiny())))
    for read in (read_tokenizer, load_tokenizer, load_model):  # load_model: before any weight (there is none)
        with pytest.raises(ValueError) as e:
            read(tmp_path)
        message = str(e.value)
        assert "\n" not in message and str(tmp_path / "tokenizer.json") in message, message
        assert f"pip install -r {EXTRA}" in message and (ROOT / EXTRA).is_file()


def test_a_directory_without_a_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
        read_tokenizer(tmp_path)


# -----------------------------------------------------------------------------
# Byte-level BPE and word starts: " positive" is not "positive". The training masks, rank mode's label tokens,
# generation's stop and the evaluator's parser, each on the tokenizer.json above.

def test_training_masks_with_byte_level_bpe(json_dir):
    """The masked positions are the prompt's own ids, and the supervised ones spell the answer, which starts a
    line after "Response:\\n" (no leading space), at any cutoff and either truncation."""
    tok, cut = load_tokenizer(json_dir), 0
    examples, _ = load_examples(ROOT / "examples" / "flan_coin_demo.jsonl")
    for example in examples:
        prompt = PROMPT_TEMPLATE.format(instruction=example.original)
        ids, labels, pool_index = tokenize_view(tok, prompt, example.target, cutoff=10_000)
        n_prompt = labels.count(IGNORE_INDEX)
        assert ids[:n_prompt] == tok.encode(prompt) and tok.decode(ids[n_prompt:]) == example.target
        assert pool_index == len(ids) - 1
        middle = tokenize_view(tok, prompt, example.target, cutoff=40, truncation="middle")
        if len(ids) > 40 and middle:  # the prompt's middle cut, the answer whole
            ids, labels, pool_index = middle
            cut += 1
            assert len(ids) == 40 and tok.decode(ids[labels.count(IGNORE_INDEX):]) == example.target
    assert cut >= 50


class Recorder:
    """evaluate.rank_scores in place: records the continuations it is asked to score."""
    def __init__(self):
        self.continuations = None

    def __call__(self, model, prompts, continuations, pad_id):
        self.continuations = continuations
        return torch.zeros(len(prompts), len(continuations))


def test_rank_mode_scores_the_tokens_each_label_takes(json_dir, monkeypatch):
    tok, recorder = load_tokenizer(json_dir), Recorder()
    monkeypatch.setattr(evaluate, "rank_scores", recorder)
    labels = list(LABELS["sst2"])
    prompt = evaluate.build_input("Is the review positive or negative? ", "A gripping, funny film.\n")
    evaluate.label_scores(None, tok, [tok.encode(prompt)], "sst2", 8, "coin")
    after = len(tok.encode(prompt, bos=False))  # a label: the word after "### Response:", space included
    assert recorder.continuations == [tok.encode(prompt + " " + label, bos=False)[after:] for label in labels]
    assert recorder.continuations != [tok.encode(label, bos=False) for label in labels]  # the space matters
    evaluate.label_scores(None, tok, [tok.encode(prompt)], "sst2", 8, "train")
    trained = [tokenize_view(tok, PROMPT_TEMPLATE.format(instruction="x"), label) for label in labels]
    assert recorder.continuations == [ids[labels_.count(IGNORE_INDEX):] for ids, labels_, _ in trained]


def chain_model(vocab_size, chain):
    """A Llama whose greedy next token depends on the current token only: chain[i] -> chain[i + 1], each with
    probability ~1. Every layer adds zero, so the final state is the current token's normalised embedding."""
    torch.manual_seed(0)
    model = Llama(ModelArgs.tiny(vocab_size=vocab_size)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.zero_()
        embedding = model.model.embed_tokens.weight.normal_()
        for current, following in zip(chain, chain[1:]):
            model.lm_head.weight[following] += 8 * embedding[current] / embedding[current].norm()  # logit ~64
    return model


@pytest.mark.parametrize("mode", ["generate", "rank"])
def test_evaluator_answers_with_byte_level_bpe(json_dir, mode):
    """A model that answers " positive", eos, then "Z": generation stops at the base's eos, the parser reads
    the label, and rank mode gives it probability ~1."""
    tok = load_tokenizer(json_dir)
    text = evaluate.build_input("Is the review positive or negative? ", "A gripping, funny film.\n")
    chain = tok.encode(text)[-1:] + tok.encode_word("positive") + [tok.eos_id] + tok.encode("Z", bos=False)
    assert len(set(chain)) == len(chain)
    cfg = SimpleNamespace(mode=mode, batch_size=4, max_new_tokens=7, format="coin")
    [(raw, pred)] = evaluate.predict(chain_model(tok.vocab_size, chain), tok, [text], "sst2", cfg)
    assert pred == "positive"
    if mode == "generate":
        assert raw == " positive"  # eos ended it (and decodes to nothing): no "Z"
    else:
        assert raw["positive"] > -0.01 and raw["negative"] < -10
