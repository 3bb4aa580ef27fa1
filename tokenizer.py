"""tokenizer.py: text <-> token ids for every base coin reads: sentencepiece's tokenizer.model (LLaMA 1 and 2,
Mistral, TinyLlama), or a tokenizer.json through HF's `tokenizers` (Llama 3.x and Qwen2.5: byte-level BPE).

A support module beside hf_io.py, whose load_tokenizer reads a model directory's tokenizer with
`read_tokenizer` and checks it against config.json. Read it after model_config.py.

    Tokenizer        tokenizer.model through sentencepiece, as Meta's code and alpaca-lora's LlamaTokenizer
    JsonTokenizer    tokenizer.json through `tokenizers`: an optional extra, imported here and only when a
                     tokenizer.json is read (pip install -r requirements-tokenizers.txt)
    read_tokenizer   a model directory's tokenizer, with bos, eos and pad as its HF files name them

Both give encode(text, bos, eos) and encode_word(word) -> ids, decode(ids) -> text (control ids dropped, as
transformers' skip_special_tokens), vocab_size, bos_id (None where a base has none: Qwen2.5), eos_id, pad_id.

Which file: tokenizer.model when there is one. LLaMA 2, Mistral and TinyLlama ship it beside a tokenizer.json,
and sentencepiece's ids are those alpaca-lora and CoIN trained on (tests/test_data.py). A tokenizer.json alone
(Llama 3, Qwen2.5) goes through `tokenizers`, whose ids equal transformers' PreTrainedTokenizerFast (tested).

The special ids, from the model directory's HF files:
  bos  what the tokenizer itself puts before a text, as transformers does: sentencepiece's <s>, or a
       tokenizer.json's post-processor (Llama 3: <|begin_of_text|>; Qwen2.5: nothing)
  eos  tokenizer_config.json's eos_token, else generation_config.json's eos_token_id (the first of a list),
       else sentencepiece's </s>: what --eos appends, and where generation stops
  pad  tokenizer_config.json's pad_token (Qwen2.5: <|endoftext|>), else its unk_token or sentencepiece's
       <unk> (LLaMA, Mistral, TinyLlama: id 0, alpaca-lora's pad), else eos (Llama 3 names neither). Any id
       is exact: coin builds labels and attention masks from row lengths, never by comparing an id with
       pad_id, so a pad reaches no loss and no attention score, even when it is eos (tests/test_tokenizer.py).

Word starts. sentencepiece marks a word start inside the piece ("▁positive") and adds one before every text,
so "positive" alone encodes as the word. Byte-level BPE spells a word start as a leading space: " positive"
and "positive" are different ids. After coin.py's "### Response:\n" an answer starts a line, with no space, in
both (data.py); after CoIN's "### Response:" a label is a word of its own, which encode_word spells.

Control text. Like sentencepiece, a tokenizer.json here never parses special tokens out of a text
(`tokenizers`' encode_special_tokens): "<|end_of_text|>" typed in an instruction stays text and cannot end a
sequence. transformers would parse it (the one difference); no README text or shipped prompt holds one.

Next: read `data.py`.
"""
from pathlib import Path

import sentencepiece as spm

from files import read_json

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # in order of preference
EXTRA = "requirements-tokenizers.txt"  # the optional `tokenizers` package, pinned

# -----------------------------------------------------------------------------
# 1. tokenizer.model: sentencepiece
#
# We call sentencepiece directly, as Meta's reference code and the slow (legacy) HF LlamaTokenizer that
# alpaca-lora used do. transformers 5's tokenizers-based LlamaTokenizer differs on repeated spaces; we match
# sentencepiece. sentencepiece never parses control pieces out of text, so "</s>" typed in an instruction
# stays four characters and can never end a sequence.


class Tokenizer:
    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{path}: no sentencepiece tokenizer.model here")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path}: not a sentencepiece model ({e})") from None
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.pad_id = self.unk_id  # alpaca-lora's; read_tokenizer takes the base's own pad where it names one

    def token_id(self, piece):
        """The id of `piece`, or None when the vocabulary lacks it (sentencepiece would give unk's id)."""
        found = self.sp.piece_to_id(piece)
        return found if self.sp.id_to_piece(found) == piece else None

    def encode(self, text, bos=True, eos=False):
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def encode_word(self, word):
        """`word` as a word of its own after other text: sentencepiece's dummy prefix "▁" marks its start."""
        return self.sp.encode(word)

    def decode(self, ids):
        return self.sp.decode(list(ids))  # control ids (bos, eos) decode to nothing


# -----------------------------------------------------------------------------
# 2. tokenizer.json: HF's `tokenizers` library (the optional extra)

class JsonTokenizer:
    """A tokenizer.json; read_tokenizer sets its eos_id and pad_id from the model directory's HF files."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            import tokenizers  # the optional extra: imported only when a tokenizer.json is read
        except ImportError:
            raise ValueError(f"{path}: a tokenizer.json needs the optional `tokenizers` package: "
                             f"pip install -r {EXTRA} (without it coin reads tokenizer.model only)") from None
        try:
            self.tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # `tokenizers` raises a bare Exception for a file it cannot parse
            raise ValueError(f"{path}: not a tokenizer.json that `tokenizers` reads "
                             f"({str(e).splitlines()[0]})") from None
        self.tok.encode_special_tokens = True  # "<|end_of_text|>" in a text stays text (module docstring)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        # What the post-processor adds around a text, as transformers applies it: at most one id before it.
        plain, framed = (self.tok.encode("a", add_special_tokens=add).ids for add in (False, True))
        added = len(framed) - len(plain)
        if added > 1 or framed[added:] != plain:
            raise ValueError(f"{path}: post_processor turns 'a' {plain} into {framed}; coin supports "
                             "a tokenizer that adds at most one BOS, before the text")
        self.bos_id = framed[0] if added else None
        self.eos_id = self.pad_id = self.unk_id = None  # named by the HF files: read_tokenizer

    def token_id(self, token):
        """The id of `token`, or None when the vocabulary lacks it."""
        return self.tok.token_to_id(token)

    def encode(self, text, bos=True, eos=False):
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * (bos and self.bos_id is not None) + ids + [self.eos_id] * eos

    def encode_word(self, word):
        """`word` as a word of its own after other text: byte-level BPE marks its start by a leading space."""
        return self.encode(" " + word, bos=False)

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=True)  # no transformers space clean-up: exact


# -----------------------------------------------------------------------------
# 3. A model directory's tokenizer and its special ids

def special_ids(model_dir, tokenizer):
    """(eos_id, pad_id) as model_dir's tokenizer_config.json and generation_config.json name them (module
    docstring), each checked to be in the tokenizer's vocabulary."""
    files = [model_dir / "tokenizer_config.json", model_dir / "generation_config.json"]
    config, generation = (read_json(file) if file.is_file() else {} for file in files)

    def named(field):  # the id of the token tokenizer_config.json names in `field`, or None
        token = config.get(field)
        token = token.get("content") if isinstance(token, dict) else token  # older files: {"content": ...}
        if not token:  # absent, null, or "" (early LLaMA conversions wrote empty strings)
            return None
        if tokenizer.token_id(token) is None:
            raise ValueError(f"{files[0]}: {field} {token!r} is not in {tokenizer.path.name}; "
                             "use the tokenizer files that came with this model")
        return tokenizer.token_id(token)

    listed = generation.get("eos_token_id")
    listed = listed[0] if isinstance(listed, list) and listed else listed
    eos = next((i for i in (named("eos_token"), listed, tokenizer.eos_id) if i is not None), None)
    if eos is None or not 0 <= eos < tokenizer.vocab_size:
        raise ValueError(f"{model_dir}: no eos among the {tokenizer.vocab_size} ids (tokenizer_config.json's "
                         "eos_token, generation_config.json's eos_token_id); name the base's end of text")
    pad = next(i for i in (named("pad_token"), named("unk_token"), tokenizer.unk_id, eos) if i is not None)
    return eos, pad


def read_tokenizer(model_dir):
    """The tokenizer of a model directory: tokenizer.model, else tokenizer.json, with bos, eos and pad as its
    HF files say. hf_io.load_tokenizer also checks it against config.json."""
    model_dir = Path(model_dir)
    file = next((model_dir / name for name in TOKENIZER_FILES if (model_dir / name).is_file()), None)
    if file is None:
        raise FileNotFoundError(f"{model_dir}: no tokenizer.model or tokenizer.json; "
                                "copy the base model's tokenizer files here")
    tokenizer = Tokenizer(file) if file.suffix == ".model" else JsonTokenizer(file)
    tokenizer.eos_id, tokenizer.pad_id = special_ids(model_dir, tokenizer)
    return tokenizer
