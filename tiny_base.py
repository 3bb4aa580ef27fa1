"""tiny_base.py: a tiny random LLaMA and a tokenizer trained on the data: the base of `coin.py --tiny`,
and the starting point of replicate.py's base.

A support module: `python coin.py --tiny` calls it when no --base is given, so the whole pipeline runs on a
laptop with no download. It writes a HF directory (config.json, model.safetensors, tokenizer.model) that the
rest of coin loads like any downloaded model. Read it after coin.py.

A random model learns little in a few minutes, so with this base alone the pipeline runs but the scores mean
nothing: replicate.py instruction-tunes it in full first.
"""
import io
import shutil
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch

from files import write_atomically
from hf_io import save_model
from model import Llama
from model_config import read_model_args

TINY_CONFIG = Path(__file__).resolve().parent / "examples" / "tiny" / "config.json"  # 4 layers, vocab 2000


def train_tokenizer(texts, vocab_size):
    """The bytes of a sentencepiece BPE model trained on `texts`, with LLaMA's settings and special ids."""
    model_bytes = io.BytesIO()
    spm.SentencePieceTrainer.train(  # byte fallback, digits split, no normalising: as LLaMA's tokenizer
        sentence_iterator=iter(texts), model_writer=model_bytes, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2)
    return model_bytes.getvalue()


def build_tiny_base(examples, seed, args=None):
    """Write the tiny base (or a random LLaMA of `args`) to a scratch folder, a TemporaryDirectory: it is
    deleted when dropped, so a run refused after this leaves nothing behind. Deterministic per seed."""
    args = args or read_model_args(TINY_CONFIG)
    scratch = tempfile.TemporaryDirectory(prefix="coin-tiny-base-", ignore_cleanup_errors=True)
    folder = Path(scratch.name)
    texts = [text for e in examples for text in (e.original, e.paraphrase, e.target)]
    torch.manual_seed(seed)
    model = Llama(args)
    with torch.no_grad():  # HF's LLaMA init: N(0, 0.02) matrices, unit norms
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() == 2 else p.fill_(1.0)
    save_model(model, folder)
    (folder / "tokenizer.model").write_bytes(train_tokenizer(texts, args.vocab_size))
    return scratch


def install_tiny_base(scratch, base_dir):
    """Copy a built base to base_dir (replacing what is there: a base left by a run that died before its first
    checkpoint) and return base_dir, resolved. A file at a time, atomically: a full disk names the file."""
    shutil.rmtree(base_dir, ignore_errors=True)
    base_dir.mkdir(parents=True)
    for file in sorted(Path(scratch.name).iterdir()):
        write_atomically(base_dir / file.name, file.read_bytes())
    return base_dir.resolve()
