"""model_config.py: config.json <-> ModelArgs, for the base families coin reads: LLaMA (1, 2, 3.x and
TinyLlama), Mistral, and Qwen2 (Qwen2.5).

A support module beside hf_io.py, which loads the weights these settings describe. Read it after hf_io.py.

    read_model_args     config.json -> ModelArgs, refusing in one line what the decoder lacks
    sliding_window      Mistral's attention window, which hf_io.check_base compares with --cutoff
    hf_config           ModelArgs -> the config.json dict that reads back to it (and that transformers reads)

Mistral and Qwen2 checkpoints have LLaMA's layout and key names; each family's config differs in a field or
two, read here, so that model.py's math only grows a bias and a frequency rescale. A field coin lacks is
refused before any weight loads, in one line naming the file, the field and what is supported.

Next: read `tokenizer.py`.
"""
from pathlib import Path

from files import read_json
from model import ModelArgs

# -----------------------------------------------------------------------------
# 1. The families and their fields

# Our field -> the HF config.json key it is read from.
HF_CONFIG_KEYS = dict(
    dim="hidden_size", n_layers="num_hidden_layers", n_heads="num_attention_heads",
    n_kv_heads="num_key_value_heads", intermediate_size="intermediate_size", vocab_size="vocab_size",
    norm_eps="rms_norm_eps", rope_theta="rope_theta", head_dim="head_dim",
    tie_word_embeddings="tie_word_embeddings",
)
# model_type -> architecture; what each adds to LLaMA's decoder is in transformers' modeling_<type>.py
FAMILIES = dict(
    llama="LlamaForCausalLM",      # LLaMA 1 and 2, Llama 3.x, TinyLlama
    mistral="MistralForCausalLM",  # + a sliding window (v0.1: 4096 tokens; none from v0.2 on)
    qwen2="Qwen2ForCausalLM",      # + biases on q, k and v (Qwen2, Qwen2.5)
)
# rope_type -> the fields its frequencies need (transformers' modeling_rope_utils.py; model.rope_cos_sin)
ROPE_FIELDS = dict(
    default=(), linear=("factor",),
    llama3=("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
)


# -----------------------------------------------------------------------------
# 2. Reading config.json

def read_config(path):
    """(file, dict) of a config.json (or the directory holding it), its model_type checked."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: not found; point at a HF LLaMA directory (config.json + weights)")
    cfg = read_json(file)
    if cfg.get("model_type") not in FAMILIES:
        raise ValueError(f"{file}: model_type {cfg.get('model_type')!r} is not supported; "
                         f"coin reads {', '.join(FAMILIES)}")
    return file, cfg


def read_rope_scaling(file, cfg):
    """(rope_theta, rope_scaling: None or {"rope_type", its fields}). transformers 5 nests both in
    rope_parameters; older files keep rope_theta beside rope_scaling, whose type key is rope_type or type."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_FIELDS:
        raise ValueError(f"{file}: rope_scaling type {kind!r} is not supported; coin implements "
                         f"{', '.join(ROPE_FIELDS)}")
    missing = [field for field in ROPE_FIELDS[kind] if field not in rope]
    if missing:
        raise ValueError(f"{file}: rope_scaling {kind!r} lacks {missing[0]}; "
                         f"it needs {', '.join(ROPE_FIELDS[kind])}")
    theta = cfg.get("rope_theta") or rope.get("rope_theta", ModelArgs.rope_theta)
    scaling = dict(rope_type=kind, **{field: rope[field] for field in ROPE_FIELDS[kind]})
    return theta, scaling if kind != "default" else None


def read_model_args(path):
    """ModelArgs from a HF config.json (or the directory holding it); refuses what the decoder lacks."""
    file, cfg = read_config(path)
    family = cfg["model_type"]
    rope_theta, rope_scaling = read_rope_scaling(file, cfg)
    unsupported = {  # field -> (is it set, what coin supports)
        "hidden_act": (cfg.get("hidden_act", "silu") != "silu", "silu (SwiGLU)"),
        "attention_bias": (family == "llama" and cfg.get("attention_bias", False),
                           "false for llama (its bias is on o_proj too); q/k/v biases come with qwen2"),
        "mlp_bias": (cfg.get("mlp_bias", False), "false"),
    }
    for name, (bad, supported) in unsupported.items():
        if bad:
            raise ValueError(f"{file}: {name}={cfg[name]!r} is not supported; coin supports {supported}")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in cfg:
            raise ValueError(f"{file}: missing field {key!r}; is this a {family} config.json?")
    mapped = {ours: cfg[hf] for ours, hf in HF_CONFIG_KEYS.items() if cfg.get(hf) is not None}
    return ModelArgs(**dict(mapped, rope_theta=rope_theta), attention_bias=family == "qwen2",
                     rope_scaling=rope_scaling)


def sliding_window(path):
    """The attention window of config.json's model in tokens, or None. Mistral sets one for every layer (v0.1:
    4096); Qwen2 only with use_sliding_window (false in every Qwen2.5), for its upper layers. coin attends to
    every earlier token, which is exactly the windowed attention up to the window (tests/test_bases.py)."""
    _, cfg = read_config(path)
    if cfg["model_type"] == "mistral" or cfg.get("use_sliding_window"):
        return cfg.get("sliding_window")
    return None


# -----------------------------------------------------------------------------
# 3. Writing it

def hf_config(args):
    """The config.json dict that `read_model_args` (and transformers) reads back to `args`: qwen2 when q/k/v
    have biases, else llama (a Mistral without a window is LLaMA's math)."""
    cfg = {hf: getattr(args, ours) for ours, hf in HF_CONFIG_KEYS.items()}
    family = "qwen2" if args.attention_bias else "llama"
    rope = {"rope_scaling": dict(args.rope_scaling)} if args.rope_scaling else {}  # a copy: HF edits it
    return dict(cfg, architectures=[FAMILIES[family]], model_type=family, hidden_act="silu", **rope)
