"""model.py: the LLaMA decoder from scratch (Mistral's and Qwen2's too), hand-written LoRA, greedy generation.

This file is the foundation of coin and the first stop of the tutorial. Read it top to bottom: each section
only uses what came before it.

    config -> RMSNorm -> rotary embeddings -> KV cache -> attention -> MLP -> decoder layer -> Llama
    -> LoRA -> generation

Parameter names are the HF checkpoint keys (`model.layers.0.self_attn.q_proj.weight`, ...), so loading a
checkpoint is a loop plus validation, with no mapping table (hf_io.py does it). LoRA keys are peft's keys
minus the prefix `base_model.model.`, so an alpaca-lora adapter loads as it is, and ours load in peft.

Dtype policy: the frozen base weights are bf16, fp16 or fp32 (hf_io.load_model(dtype=...)); LoRA weights are
always fp32 (they are trained, and AdamW updates of 1e-4 * 1e-3 vanish in bf16); RMSNorm computes in fp32;
attention uses PyTorch's scaled_dot_product_attention, whose kernels accumulate the softmax in fp32.

Shape legend:
    B batch, T tokens in this call, S key slots (cached + new), D model dim, H query heads,
    Hk key/value heads, Hd head dim, I MLP hidden dim, V vocab, r LoRA rank, L layers

References: LLaMA (Touvron et al. 2023); LoRA (Hu et al. 2021, §4.1 for the scaling alpha/r); HF
`modeling_llama.py` for key names; transformers#25199 for the "rotate-half" RoPE layout of HF checkpoints.

Next: read `data.py`.
"""
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# 1. Config


@dataclass(frozen=True)
class ModelArgs:
    """The architecture. Defaults are LLaMA-7B's (params.json of the original release);
    model_config.read_model_args reads them from a HF config.json."""
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None     # None: = n_heads (multi-head); fewer: grouped-query attention (GQA)
    intermediate_size: int = 11008    # SwiGLU hidden size I
    vocab_size: int = 32000
    norm_eps: float = 1e-6            # LLaMA-1 uses 1e-6, Llama-2 1e-5
    rope_theta: float = 10000.0       # RoPE base (RoFormer)
    head_dim: int | None = None       # None: = dim // n_heads
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix (small models)
    attention_bias: bool = False      # q/k/v projections with a bias (Qwen2)
    rope_scaling: dict | None = None  # long-context RoPE: {"rope_type": "linear" | "llama3", ...} (hf_io.py)

    def __post_init__(self):  # derived fields (a frozen dataclass, hence object.__setattr__)
        object.__setattr__(self, "n_kv_heads", self.n_kv_heads or self.n_heads)
        object.__setattr__(self, "head_dim", self.head_dim or self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @classmethod
    def tiny(cls, **overrides):
        """A 2-layer model small enough for unit tests (GQA, so both attention paths are exercised)."""
        return cls(**dict(dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128,
                               vocab_size=128), **overrides))


# -----------------------------------------------------------------------------
# 2. RMSNorm

class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019): LLaMA's LayerNorm without mean or bias."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 (a mean of squares loses too much in bf16), cast back, then scale: HF's order.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# -----------------------------------------------------------------------------
# 3. Rotary position embeddings (RoPE)
#
# HF checkpoints use the "rotate-half" layout: dimension i of a head is rotated together with dimension
# i + Hd/2 (GPT-NeoX style), not with its neighbour i + 1 as in Meta's original code. HF's conversion script
# permuted the q/k rows to make this so (transformers#25199), so we follow HF and permute nothing: neither the
# base weights nor peft's lora_B. Real-valued cos/sin arithmetic, no complex numbers (as llama2.c).

def rope_cos_sin(positions, args):
    """positions (B, T) integer -> cos, sin (B, T, Hd) in fp32, frequencies lowered as rope_scaling says."""
    Hd, s = args.head_dim, args.rope_scaling or {}
    inv_freq = 1.0 / args.rope_theta ** (torch.arange(0, Hd, 2, device=positions.device).float() / Hd)
    keep = 0.0  # the share of each frequency left unscaled: none with "linear" (position interpolation)
    if s.get("rope_type") == "llama3":  # keep the fast, divide the slow, blend: _compute_llama3_parameters
        ratio = s["original_max_position_embeddings"] / (2 * torch.pi / inv_freq)  # old context / wavelength
        keep = ((ratio - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])).clamp(0, 1)
    inv_freq = (1 - keep) * inv_freq / s.get("factor", 1.0) + keep * inv_freq  # (Hd/2,)
    angles = positions.float()[..., None] * inv_freq  # (B, T, 1) * (Hd/2,) -> (B, T, Hd/2)
    angles = torch.cat([angles, angles], dim=-1)      # (B, T, Hd): dims i and i + Hd/2 share an angle
    return angles.cos(), angles.sin()


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    """x (B, heads, T, Hd) rotated by its positions' angles; cos/sin (B, T, Hd)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (B, 1, T, Hd): broadcast over heads
    return x * cos + rotate_half(x) * sin


# -----------------------------------------------------------------------------
# 4. KV cache (generation only: training passes cache=None)

class KVCache:
    """Preallocated keys and values of every layer, so each decoding step computes one new token only.

    k, v: (L, B, Hk, Tmax, Hd). key_mask (B, Tmax): which slots hold real (non-pad) tokens.
    length: the number of slots filled so far; the model advances it after each forward.
    """

    def __init__(self, args, batch_size, max_len, dtype, device):
        shape = (args.n_layers, batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0

    def repeat_rows(self, times):
        """Copy each row's slots `times` times, in place: row b becomes rows b*times .. b*times + times-1."""
        self.k, self.v = self.k.repeat_interleave(times, 1), self.v.repeat_interleave(times, 1)
        self.key_mask = self.key_mask.repeat_interleave(times, 0)

    def update(self, layer, pos, k, v):
        """Store k, v (B, Hk, T, Hd) in slots pos..pos+T; return their filled prefixes (B, Hk, pos+T, Hd)."""
        end = pos + k.shape[2]
        self.k[layer, :, :, pos:end] = k
        self.v[layer, :, :, pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def attention_layout(key_mask, start):
    """Positions and attention mask for queries in slots start..S-1, given key_mask (B, S) of real slots.

    positions (B, T): each token's index among its row's real tokens, so left padding shifts no RoPE angle.
    mask (B, 1, T, S): query i may see key j if j is a real token at or before it. A pad query also sees
    itself, so no softmax row is empty (which some PyTorch versions turn into NaN).
    """
    S = key_mask.shape[1]
    positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]  # (B, T)
    q_slot = torch.arange(start, S, device=key_mask.device)[:, None]      # (T, 1)
    k_slot = torch.arange(S, device=key_mask.device)[None, :]             # (1, S)
    mask = ((k_slot <= q_slot) & key_mask[:, None, :]) | (k_slot == q_slot)  # (B, T, S)
    return positions, mask[:, None]


# -----------------------------------------------------------------------------
# 5. Attention (multi-head, or grouped-query when Hk < H)

class Attention(nn.Module):
    def __init__(self, args, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx  # which slice of the KV cache is ours
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.attention_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.attention_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.attention_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache=None):
        """x (B, T, D) -> (B, T, D). mask None means plain causal attention over these T tokens."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, T, Hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hk, T, Hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hk, T, Hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, cache.length, k, v)  # (B, Hk, S, Hd)
        if self.n_kv_heads != self.n_heads:
            # GQA: each key/value head serves n_rep consecutive query heads, as HF's repeat_kv.
            n_rep = self.n_heads // self.n_kv_heads
            k, v = (t[:, :, None].expand(-1, -1, n_rep, -1, -1).flatten(1, 2)  # (B, H, S, Hd)
                    for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)  # (B, H, T, Hd)
        # (B, H, T, Hd) -> (B, T, H*Hd) -> (B, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


# -----------------------------------------------------------------------------
# 6. MLP

class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x)), D -> I -> D."""

    def __init__(self, args):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# -----------------------------------------------------------------------------
# 7. Decoder layer

class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, args, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------
# 8. The model

class Llama(nn.Module):
    """LLaMA as HF's LlamaForCausalLM lays out its weights: `model.{embed_tokens,layers,norm}` and `lm_head`.

    model(input_ids, attention_mask) -> logits (B, T, V).
    model.hidden_states(input_ids, attention_mask) -> the final-norm hidden states (B, T, D), the input of
    lm_head. CoIN pools them at each row's last real token, and computes logits only where labels are
    supervised: model.lm_head(hidden[supervised]).

    attention_mask (B, T) is 1 on real tokens and 0 on pads, on either side. Positions come from the mask, so
    real-token outputs do not depend on padding. With right padding the mask may be omitted (every pad comes
    after every real token, so causal attention alone is exact for the real ones), which keeps the fast
    is_causal attention kernels: that is what training does.
    """

    def __init__(self, args):
        super().__init__()
        self.args = args
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(args.vocab_size, args.dim),
            layers=nn.ModuleList(DecoderLayer(args, i) for i in range(args.n_layers)),
            norm=RMSNorm(args.dim, args.norm_eps),
        ))
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.grad_checkpointing = False  # True: recompute each layer in backward (see hidden_states)
        self.name_or_path = ""           # where the base weights came from; recorded in saved adapters

    def hidden_states(self, input_ids, attention_mask=None, cache=None):
        """input_ids (B, T) -> final-norm hidden states (B, T, D); with a cache, they follow its tokens."""
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if cache is None and (attention_mask is None or attention_mask.all()):  # training: no mask to build
            positions, mask = torch.arange(T, device=input_ids.device).expand(B, T), None
        else:
            real = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                    else attention_mask.bool())
            if cache is not None:
                cache.key_mask[:, start:start + T] = real
                real = cache.key_mask[:, :start + T]  # (B, S): the mask of every key slot so far
            positions, mask = attention_layout(real, start)
        cos, sin = rope_cos_sin(positions, self.args)  # (B, T, Hd) each, shared by layers
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        for layer in self.model.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only each layer's input; recompute its insides during backward. Non-reentrant: the
                # embeddings are frozen, so x does not require grad, and the reentrant variant would then give
                # the LoRA weights inside no gradient at all (transformers#21381, #26221).
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def forward(self, input_ids, attention_mask=None, cache=None):
        """input_ids (B, T) -> logits (B, T, V)."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, cache))


POOLING = ("last", "mean", "max")  # CoIN's pooling_method: last, average_all, max (its footnote 2)


def pool(hidden, lengths, last_index, mode="last"):
    """hidden (R, T, D) right-padded rows of `lengths` (R,) real tokens -> (R, D), one state per row.

    last: the state at last_index (R,) (CoIN's default, the last answer token); mean, max: over the row's
    real tokens, never a pad. The mean sums in fp32: bf16 would round 256 states' sum to 3 digits."""
    if mode == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index]
    real = torch.arange(hidden.shape[1], device=hidden.device) < lengths[:, None]  # (R, T)
    if mode == "mean":
        return (hidden.float() * real[..., None]).sum(1) / lengths[:, None]
    return hidden.masked_fill(~real[..., None], float("-inf")).amax(1)


def bucketed_hidden_states(model, input_ids, lengths, bucket):
    """(R, T, D) final hidden states of right-padded rows (R, T) with `lengths` real tokens, one forward per
    length bucket (R,) (data.collate forms them): a bucket's rows are cut to its longest row, so a short row
    beside long ones costs little padding. Causal attention alone is exact on right-padded rows; positions
    past a bucket's width stay 0 (no loss reads them)."""
    hidden = None
    for b in range(int(bucket.max()) + 1):
        rows = (bucket == b).nonzero()[:, 0]  # (R_b,)
        width = int(lengths[rows].max())
        part = model.hidden_states(input_ids[rows, :width])  # (R_b, width, D)
        if hidden is None:
            hidden = part.new_zeros(*input_ids.shape, part.shape[-1])
        hidden[rows, :width] = part
    return hidden


# -----------------------------------------------------------------------------
# 9. LoRA
#
#   x ──► W (frozen, out x in) ───────────────────────────► + ──► y
#   └──► dropout ──► A (r x in) ──► B (out x r) ──► * alpha/r ┘
#
# For LLaMA-7B's q_proj with r=16: W has 4096*4096 = 16.8M weights, A and B together 2*16*4096 = 131k.

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # alpaca-lora's targets (tloen/alpaca-lora-7b)
LINEARS = LORA_TARGETS + ("gate_proj", "up_proj", "down_proj")  # every linear layer of a decoder layer


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: y = x W^T + b + (alpha/r) * dropout(x) A^T B^T.

    It owns the base layer's `weight` Parameter (no copy), so its keys are `q_proj.weight`,
    `q_proj.lora_A.weight` and `q_proj.lora_B.weight`: peft's saved keys without their prefix.
    """

    def __init__(self, weight, r, alpha, dropout, bias=None):
        super().__init__()
        out_features, in_features = weight.shape
        self.weight, self.bias = weight, bias  # the base layer's (frozen) Parameters; bias: Qwen2's q/k/v
        # LoRA §4.1: alpha/r keeps lr meaningful across r
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        # fp32 even over a bf16 base: these are trained. A keeps nn.Linear's Kaiming-uniform init;
        # B = 0 makes a fresh adapter an exact no-op (LoRA §4.1, as in loralib and peft).
        self.lora_A = nn.Linear(in_features, r, bias=False, device=weight.device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=weight.device, dtype=torch.float32)
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout)
        self.disabled = False  # True: the base layer alone (ask.py's answers without the adapter)

    def forward(self, x):
        base = F.linear(x, self.weight, self.bias)
        if self.disabled:
            return base
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))) * self.scaling
        return base + update.to(base.dtype)

    def merged_weight(self):
        """W + (alpha/r) B A, computed in fp32 and cast back to W's dtype."""
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()  # (out, r) @ (r, in) -> (out, in)
        return (self.weight.float() + self.scaling * delta).to(self.weight.dtype)


def is_lora_target(name, targets):
    """peft's rule: a regex string must match the whole module name; a list entry must match its tail."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _swap_modules(model, should_swap, make):
    """Replace every submodule for which should_swap(name, module) holds by make(module); return the names."""
    swapped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if should_swap(name, child):
                setattr(parent, child_name, make(child).train(child.training))  # keep eval mode (no dropout)
                swapped.append(name)
    return swapped


def apply_lora(model, targets=LORA_TARGETS, r=16, alpha=16, dropout=0.05):
    """Wrap every nn.Linear named by `targets` in a LoRALinear and freeze all else. Returns the wrapped names.

    Defaults are alpaca-lora's (r 16, alpha 16, dropout 0.05 on q, k, v, o), which CoIN continues training.
    """
    names = _swap_modules(model, lambda name, m: isinstance(m, nn.Linear) and is_lora_target(name, targets),
                          lambda m: LoRALinear(m.weight, r, alpha, dropout, m.bias))
    if not names:
        raise ValueError(f"no linear layer matches LoRA targets {targets}; use names such as {LORA_TARGETS}")
    for name, p in model.named_parameters():
        p.requires_grad = ".lora_" in name
    return names


def lora_state_dict(model):
    """The adapter's tensors only, under our keys."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its base weight, in place (peak memory: the model plus one fp32 matrix), and
    turn each LoRALinear back into a plain nn.Linear that shares that weight."""
    def merged_linear(lora):
        lora.weight.requires_grad_(False).copy_(lora.merged_weight())
        linear = nn.Linear(lora.weight.shape[1], lora.weight.shape[0], bias=False, device="meta")
        linear.weight, linear.bias = lora.weight, lora.bias
        return linear
    _swap_modules(model, lambda name, m: isinstance(m, LoRALinear), merged_linear)
    return model


# -----------------------------------------------------------------------------
# 10. Generation: batched greedy decoding with a KV cache

@torch.no_grad()
def prefill(model, prompts, room, pad_id=0):
    """Run `prompts` (lists of token ids, any lengths) into a KV cache with `room` free slots after them.
    Returns (cache, hidden (B, 1, D): the final-norm state at each prompt's last token).

    The prompts' common prefix (an evaluation batch shares its instruction) runs once, and its keys and
    values are copied into every row's cache. The rest of each prompt is left-padded after it, so every
    row's next token sits in the same (last) slot: pads in the middle are harmless, as positions count
    real slots only and the mask hides pads.
    """
    if not prompts or not all(prompts):
        raise ValueError("prefill needs at least one prompt, and no empty prompt (start each with BOS)")
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    shortest = min(map(len, prompts))
    P = next((j for j, ids in enumerate(zip(*prompts)) if len(set(ids)) > 1), shortest)
    P = min(P, shortest - 1)  # each row keeps at least one token of its own, to predict from
    tails = [list(p[P:]) for p in prompts]
    width = max(map(len, tails))
    cache = KVCache(model.args, len(prompts), P + width + room, dtype, device)
    if P:
        shared = KVCache(model.args, 1, P, dtype, device)
        model.hidden_states(torch.tensor([prompts[0][:P]], device=device), None, shared)
        # (L, 1, Hk, P, Hd) -> (L, B, Hk, P, Hd)
        cache.k[:, :, :, :P], cache.v[:, :, :, :P] = shared.k, shared.v
        cache.key_mask[:, :P], cache.length = True, P
    ids = torch.tensor([[pad_id] * (width - len(t)) + t for t in tails], device=device)     # (B, T)
    mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in tails], device=device)  # (B, T)
    return cache, model.hidden_states(ids, mask, cache)[:, -1:]  # only the last slot is needed


@torch.no_grad()
def generate(model, prompts, max_new_tokens, eos_id=None, pad_id=0, choose=None):
    """Greedy continuations of `prompts` (lists of token ids, any lengths). Returns the new ids of each row.

    `prefill` runs the prompts, computing logits for the last slot only; each later step feeds one token
    per row through the cache. A row stops after producing eos_id (kept in its output), or after
    max_new_tokens. choose(logits (B, V)) -> next ids (B,) replaces the argmax: ask.py samples and streams.
    """
    cache, hidden = prefill(model, prompts, max_new_tokens, pad_id)  # hidden (B, 1, D)
    outputs, done = [[] for _ in prompts], [False] * len(prompts)
    for step in range(max_new_tokens):
        logits = model.lm_head(hidden)[:, -1]  # (B, V)
        next_ids = choose(logits) if choose else logits.argmax(-1)  # (B,)
        for row, token in enumerate(next_ids.tolist()):
            if not done[row]:
                outputs[row].append(token)
                done[row] = token == eos_id
        if all(done) or step == max_new_tokens - 1:
            break
        next_mask = torch.ones_like(next_ids[:, None])
        hidden = model.hidden_states(next_ids[:, None], next_mask, cache)  # (B, 1, D)
    return outputs
