"""hf_io.py: reading and writing the files of the HF and peft worlds:
config.json, weights, adapters, tokenizer.

A support module beside model.py: model.py defines the network, this file fills it. Read it after model.py.

    load_model / save_model         a HF model directory (safetensors or .bin, sharded or not) <-> Llama
    load_adapter / save_adapter     a peft LoRA adapter directory (alpaca-lora's included) <-> LoRA layers
    load_tokenizer                  tokenizer.model or tokenizer.json (tokenizer.py), checked against config

config.json itself is read by model_config.py, which maps each family's fields onto ModelArgs.

Our parameter names are the HF keys, and our LoRA keys are peft's minus `base_model.model.`, so every loader
is a loop that checks each key and shape and says which one is wrong. Nothing here unpickles code:
safetensors, or `torch.load(weights_only=True)` for legacy .bin files.

Next: read `model_config.py`.
"""
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as serialize, save_file

from files import read_json, write_atomically
from memory import check_fits, return_freed_memory
from model import Llama, LoRALinear, apply_lora, is_lora_target, lora_state_dict
from model_config import hf_config, read_model_args, sliding_window
from precision import DTYPE_NAMES
from tokenizer import TOKENIZER_FILES, JsonTokenizer, read_tokenizer

# -----------------------------------------------------------------------------
# 1. Loading HF checkpoints
#
# The model is built on the meta device (shapes, no memory), then each tensor is read from disk, cast, and
# assigned in place of its meta placeholder. Peak memory is the model plus one tensor, not twice the model.

CHECKPOINT_LAYOUTS = (  # (index file listing the shards, single-file name), in order of preference
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def checkpoint_files(path):
    """The weight files of a HF checkpoint directory, checked to exist."""
    for index_name, single_name in CHECKPOINT_LAYOUTS:
        if (path / index_name).is_file():
            shards = sorted(set(json.loads((path / index_name).read_text())["weight_map"].values()))
            for shard in shards:
                if not (path / shard).is_file():
                    raise FileNotFoundError(f"{path / shard}: shard listed in {index_name} "
                                            "is missing; download it")
            return [path / shard for shard in shards]
        if (path / single_name).is_file():
            return [path / single_name]
    raise FileNotFoundError(f"{path}: no model.safetensors, sharded safetensors or pytorch_model*.bin found")


def read_tensors(file, device, fix="download it again"):
    """{key: tensor} of one weight file, on `device`; a ValueError ending in `fix` if it cannot be read.
    Never unpickles code: safetensors, or weights_only torch.load."""
    try:
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt", device=str(device)) as f:
                return {key: f.get_tensor(key) for key in f.keys()}
        return torch.load(file, map_location=device, weights_only=True, mmap=True)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise ValueError(f"{file}: cannot be read ({str(e).splitlines()[0]}); it is truncated or corrupt, "
                         f"{fix}") from None


def check_base(path, max_tokens=None):
    """ModelArgs of a HF model directory, after every check that needs no weights: config.json
    (read_model_args); max_tokens, the longest row the caller will run (coin.py: --cutoff), against a sliding
    window; and the tokenizer, when the directory has one (load_tokenizer): its package, ids, vocabulary."""
    args, window = read_model_args(path), sliding_window(path)
    if window and max_tokens and max_tokens > window:
        raise ValueError(f"{path / 'config.json'}: sliding_window={window} is below the {max_tokens} tokens "
                         f"of --cutoff; coin is exact within the window only: use --cutoff {window} or less")
    if any((path / name).is_file() for name in TOKENIZER_FILES):
        load_tokenizer(path)
    return args


def load_model(path, dtype=torch.float32, device="cpu", max_tokens=None):
    """Build a Llama from a HF model directory (config.json + weights), in eval mode.

    `check_base` runs first: a bad config, window or tokenizer costs no weight loading. Every key is checked:
    a missing, unexpected or mis-shaped tensor is an error naming it. HF's cached `rotary_emb.inv_freq`
    buffers are ignored (we compute RoPE per forward), and so is a stored lm_head.weight when the config ties
    it to the embedding.
    """
    path, started = Path(path), time.perf_counter()
    if path.is_file():
        raise ValueError(f"{path}: a file; give the HF LLaMA directory (config.json, weights, tokenizer)")
    args = check_base(path, max_tokens)
    check_fits(args, dtype, str(device), path / "config.json")
    return_freed_memory(str(device))  # before the weights: the loaded shards' buffers go back too
    with torch.device("meta"):
        model = Llama(args)
    expected = model.state_dict()  # key -> meta tensor: names and shapes only
    for file in checkpoint_files(path):
        tensors = read_tensors(file, device)
        for key in list(tensors):
            if key.endswith("rotary_emb.inv_freq") or (args.tie_word_embeddings and key == "lm_head.weight"):
                del tensors[key]
            elif key not in expected:
                raise ValueError(f"{file}: unexpected key {key}; "
                                 "is this a checkpoint of the model config.json describes?")
            elif tensors[key].shape != expected[key].shape:
                raise ValueError(f"{file}: {key} has shape {tuple(tensors[key].shape)} "
                                 f"but config.json implies {tuple(expected[key].shape)}; "
                                 "the config and the weights disagree")
            else:
                tensors[key] = tensors[key].to(dtype)
        model.load_state_dict(tensors, strict=False, assign=True)
        del tensors  # this file's tensors now live in the model only
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True replaced the tied Parameter
    missing = [key for key, t in model.state_dict().items() if t.is_meta]
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {missing[0]} ({len(missing)} keys missing); "
                         "is it complete and does it match config.json?")
    model.name_or_path = str(path)
    count = sum(p.numel() for p in model.parameters())
    size = f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.2f}M"
    print(f"loaded {path}: {size} weights in "
          f"{DTYPE_NAMES[dtype]} on {device}, {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return model.eval()


def plan_shards(tensors, max_bytes):
    """Lists of keys, in order, each shard holding at most max_bytes (None: one shard), as huggingface_hub's
    split_torch_state_dict_into_shards fills them: a tensor over the limit gets a shard of its own."""
    shards, size = [[]], 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_bytes is not None and shards[-1] and size + nbytes > max_bytes:
            shards, size = shards + [[]], 0
        shards[-1].append(key)
        size += nbytes
    return shards


def save_model(model, out_dir, max_shard_bytes=None):
    """Write a HF directory that `load_model` and transformers read: config.json (with torch_dtype) and
    model.safetensors, or, over max_shard_bytes, shards named as transformers names them
    (model-00001-of-00003.safetensors) and model.safetensors.index.json mapping each key to its shard. Each
    shard is serialized alone, so the memory it takes beside the model is one shard's."""
    out_dir = Path(out_dir)
    tied = {"lm_head.weight"} if model.args.tie_word_embeddings else set()  # HF stores a tied matrix once
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
    shards = plan_shards(tensors, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, keys in zip(names, shards):
        shard = {k: tensors[k] for k in keys}
        write_atomically(out_dir / name, lambda tmp: save_file(shard, tmp, metadata={"format": "pt"}))
    if len(shards) > 1:
        index = dict(metadata=dict(total_size=sum(t.numel() * t.element_size() for t in tensors.values())),
                     weight_map={k: name for name, keys in zip(names, shards) for k in keys})
        write_atomically(out_dir / "model.safetensors.index.json", json.dumps(index, indent=2))
    dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")  # "bfloat16", as transformers writes it
    write_atomically(out_dir / "config.json", json.dumps(dict(hf_config(model.args), torch_dtype=dtype),
                                                         indent=2))


# -----------------------------------------------------------------------------
# 2. Adapter I/O in peft's format
#
# adapter_config.json holds r, lora_alpha, lora_dropout and target_modules; adapter_model.safetensors (or the
# legacy adapter_model.bin of alpaca-lora) holds `base_model.model.<our key>` tensors.

PEFT_PREFIX = "base_model.model."
# Config fields of peft variants we do not implement, and the values that mean "plain LoRA".
PLAIN_LORA = dict(use_rslora=(None, False), use_dora=(None, False), fan_in_fan_out=(None, False),
                  bias=(None, "none"), modules_to_save=(None, []), rank_pattern=(None, {}),
                  alpha_pattern=(None, {}), layers_to_transform=(None,))


def save_adapter(model, out_dir, base_model_name_or_path=None):
    """Write the adapter as peft does: adapter_config.json + adapter_model.safetensors."""
    out_dir = Path(out_dir)
    loras = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not loras:
        raise ValueError("the model has no LoRA layers: call apply_lora or load_adapter first")
    first = next(iter(loras.values()))
    config = dict(
        peft_type="LORA", task_type="CAUSAL_LM", r=first.r, lora_alpha=first.alpha,
        lora_dropout=first.dropout.p, target_modules=sorted({name.rsplit(".", 1)[-1] for name in loras}),
        bias="none", fan_in_fan_out=False, use_rslora=False, inference_mode=True, modules_to_save=None,
        base_model_name_or_path=base_model_name_or_path or model.name_or_path,
    )
    tensors = {PEFT_PREFIX + k: v.detach().float().cpu().contiguous()
               for k, v in lora_state_dict(model).items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(out_dir / "adapter_model.safetensors",  # bytes: save_file would hide a full disk's errno
                     serialize(tensors, metadata={"format": "pt"}))
    write_atomically(out_dir / "adapter_config.json", json.dumps(config, indent=2))


def read_adapter_config(adapter_dir):
    """adapter_config.json, checked to describe plain LoRA.
    Legacy keys (enable_lora, merge_weights) are ignored."""
    file = Path(adapter_dir) / "adapter_config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: not found; point at a peft LoRA adapter directory")
    cfg = read_json(file)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters are supported")
    for field, plain in PLAIN_LORA.items():
        if cfg.get(field) not in plain:
            raise ValueError(f"{file}: {field}={cfg[field]!r} is not supported; "
                             "coin implements plain LoRA only")
    return cfg


def read_adapter_tensors(adapter_dir, fix="download it again"):
    """(file, {our key: tensor}) from adapter_model.safetensors, or from a legacy adapter_model.bin."""
    adapter_dir = Path(adapter_dir)
    for file in (adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"):
        if file.is_file():
            return file, {k.removeprefix(PEFT_PREFIX): t for k, t in read_tensors(file, "cpu", fix).items()}
    raise FileNotFoundError(f"{adapter_dir}: no adapter_model.safetensors or adapter_model.bin")


def load_adapter(model, adapter_dir):
    """Wrap `model` in LoRA as the adapter's config says, and load its weights. Returns the wrapped names.

    r, lora_alpha, lora_dropout and target_modules come from adapter_config.json. Every tensor is validated
    before the model is touched: a missing or unexpected key, or a wrong shape, is an error naming it.
    """
    cfg = read_adapter_config(adapter_dir)
    file, tensors = read_adapter_tensors(adapter_dir)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA layers: load the adapter into a fresh base model")
    r, targets = cfg["r"], cfg["target_modules"]
    expected = {}  # our key -> shape, from the base layers the adapter will wrap
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and is_lora_target(name, targets):
            expected[f"{name}.lora_A.weight"] = (r, m.in_features)
            expected[f"{name}.lora_B.weight"] = (m.out_features, r)
    for key, t in sorted(tensors.items()):
        if key not in expected:
            raise ValueError(f"{file}: unexpected key {key}; "
                             "the adapter was made for another model or targets")
        rank = t.shape[0] if ".lora_A." in key else t.shape[-1]
        if rank != r:
            raise ValueError(f"{file}: {key} has rank {rank} "
                             f"but adapter_config.json says r={r}; they disagree")
        if tuple(t.shape) != expected[key]:
            raise ValueError(f"{file}: {key} has shape {tuple(t.shape)} "
                             f"but this model needs {expected[key]}; "
                             "the adapter was trained on a base model of another size")
    missing = sorted(expected.keys() - tensors.keys())
    if missing:
        raise ValueError(f"{file}: lacks {missing[0]} ({len(missing)} keys missing) for targets {targets}")
    names = apply_lora(model, targets, r, cfg["lora_alpha"], cfg.get("lora_dropout", 0.0))
    model.load_state_dict(tensors, strict=False)  # copies into the fp32 LoRA parameters
    return names


# -----------------------------------------------------------------------------
# 3. Tokenizer (tokenizer.py reads it), checked against config.json

def load_tokenizer(model_dir):
    """The tokenizer of a model directory, checked to fit config.json's vocab_size: exactly for a
    tokenizer.model; at most for a tokenizer.json, as a base may pad its embedding matrix beyond its
    tokenizer (Qwen2.5-7B: 151,665 tokens, vocab_size 152,064, a multiple of 128)."""
    model_dir = Path(model_dir)
    vocab_size = read_model_args(model_dir).vocab_size
    tokenizer = read_tokenizer(model_dir)
    padded = isinstance(tokenizer, JsonTokenizer) and tokenizer.vocab_size < vocab_size
    if tokenizer.vocab_size != vocab_size and not padded:
        raise ValueError(f"{tokenizer.path}: {tokenizer.vocab_size} tokens but config.json says "
                         f"vocab_size={vocab_size}; use the tokenizer that came with this model")
    return tokenizer
