"""The decoder, checkpoint loading and generation, proven against transformers and real pretrained weights."""
import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_decided_beyond_rounding
from hf_io import load_model, load_tokenizer
from memory import count_parameters
from model import KVCache, Llama, ModelArgs, apply_lora, generate
from model_config import hf_config

transformers = pytest.importorskip("transformers", reason="transformers is the reference for logit parity")

TOLERANCE = 1e-4  # max |Δlogit| in fp32 against HF

# The golden greedy continuation of BOS + "Once upon a time" (../shared/models/stories260K/PROVENANCE.md).
STORIES_PROMPT = [1, 403, 407, 261, 378]
STORIES_GOLDEN = [432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408,
                  419, 292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394, 261, 370, 432, 352,
                  266, 268, 388, 426, 338, 391, 266, 267, 337, 335, 312, 432, 398, 312, 286, 267, 414, 270,
                  333, 415, 426, 13, 438, 310]


def random_hf_model(args, seed=0, **config):
    """A transformers model of hf_config(args)'s family (LlamaForCausalLM, Qwen2ForCausalLM; `config` may
    override it, e.g. model_type="mistral"), with random weights big enough that layout mistakes show."""
    torch.manual_seed(seed)
    hf_cfg = transformers.AutoConfig.for_model(**dict(hf_config(args), **config))
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.5 * torch.rand_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return hf


def save_hf(hf, path, **kwargs):
    hf.save_pretrained(path, **kwargs)
    return path


def padded_batch(lengths, vocab_size, side, seed=0):
    """Random ids (B, T) with `lengths` real tokens per row, padded on `side`, and the (B, T) 1/0 mask."""
    T = max(lengths)
    ids = torch.randint(1, vocab_size, (len(lengths), T), generator=torch.Generator().manual_seed(seed))
    slots, n = torch.arange(T), torch.tensor(lengths)[:, None]
    return ids, ((slots >= T - n) if side == "left" else (slots < n)).long()


def logit_error(ours, hf, padding, vocab_size):
    """max |Δlogit| between two models over the real tokens of 3 random rows, padded: none, left or right."""
    lengths = [13, 13, 13] if padding == "none" else [13, 5, 9]
    ids, mask = padded_batch(lengths, vocab_size, "left" if padding == "none" else padding)
    # HF's forward numbers positions 0..T-1 whatever the mask; only its generate() derives them from the mask.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, position_ids=positions).logits
        actual = ours(ids, mask)
    real = mask.bool()
    return (actual[real] - expected[real]).abs().max().item()


@pytest.mark.parametrize("args", [ModelArgs.tiny(), ModelArgs.tiny(n_kv_heads=4),
                                  ModelArgs.tiny(n_kv_heads=1)], ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_logits_match_transformers(tmp_path, args, padding):
    hf = random_hf_model(args)
    ours = load_model(save_hf(hf, tmp_path, max_shard_size="100KB"), dtype=torch.float32)
    assert json.loads((tmp_path / "model.safetensors.index.json").read_text())  # the save really is sharded
    assert logit_error(ours, hf, padding, args.vocab_size) <= TOLERANCE


def test_hidden_states_are_the_input_of_lm_head(tmp_path):
    hf = random_hf_model(ModelArgs.tiny())
    ours = load_model(save_hf(hf, tmp_path))
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        hidden = ours.hidden_states(ids)
        # HF's last entry is after the final norm
        expected = hf(ids, output_hidden_states=True).hidden_states[-1]
        assert hidden.shape == (2, 7, 64)
        assert (hidden - expected).abs().max() <= TOLERANCE
        assert torch.equal(ours.lm_head(hidden), ours(ids))


@pytest.mark.parametrize("store_lm_head", [True, False])
def test_tied_embeddings_with_or_without_a_stored_lm_head(tmp_path, store_lm_head):
    args = ModelArgs.tiny(tie_word_embeddings=True)
    hf = random_hf_model(args)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if store_lm_head:
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    else:
        state.pop("lm_head.weight", None)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(args)))
    save_file(state, tmp_path / "model.safetensors")
    ours = load_model(tmp_path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= TOLERANCE


def test_pytorch_bin_checkpoint_with_rotary_buffers_loads(tmp_path):
    hf = random_hf_model(ModelArgs.tiny())
    state = dict(hf.state_dict())
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # what older HF checkpoints carry
    (tmp_path / "config.json").write_text(json.dumps(hf_config(ModelArgs.tiny())))
    torch.save(state, tmp_path / "pytorch_model.bin")
    ours = load_model(tmp_path)
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= TOLERANCE


def test_bf16_load_keeps_norm_math_in_fp32(tmp_path):
    hf = random_hf_model(ModelArgs.tiny())
    ours = load_model(save_hf(hf, tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        ours_logits, hf_logits = ours(ids).float(), hf(ids).logits
    assert (ours_logits - hf_logits).abs().max() < 0.15 * hf_logits.abs().max()  # bf16: close, not equal


# -----------------------------------------------------------------------------
# The real pretrained tiny model

def test_stories260k_greedy_output_equals_golden(stories_dir):
    model, tokenizer = load_model(stories_dir), load_tokenizer(stories_dir)
    assert tokenizer.encode("Once upon a time") == STORIES_PROMPT
    assert_decided_beyond_rounding(model, [STORIES_PROMPT], [STORIES_GOLDEN])  # so equal on any CPU
    assert generate(model, [STORIES_PROMPT], 60) == [STORIES_GOLDEN]


def test_generation_stops_at_eos_and_keeps_it(stories_dir):
    model = load_model(stories_dir)
    first = STORIES_GOLDEN.index(426)
    assert generate(model, [STORIES_PROMPT], 60, eos_id=426) == [STORIES_GOLDEN[:first + 1]]
    assert generate(model, [STORIES_PROMPT], 3) == [STORIES_GOLDEN[:3]]


def test_batched_generation_equals_one_at_a_time(stories_dir):
    model, tokenizer = load_model(stories_dir), load_tokenizer(stories_dir)
    texts = ["Once upon a time", "Lily", "The cat sat on the mat and", "One day, a little boy named Tom went",
             "She", "The sun was shining and the birds were singing. A dog", "Tim had a red ball.", "There"]
    prompts = [tokenizer.encode(t) for t in texts]
    assert len({len(p) for p in prompts}) >= 6
    reference = [generate(model, [p], 30, eos_id=tokenizer.eos_id)[0] for p in prompts]
    assert_decided_beyond_rounding(model, prompts, reference)
    assert generate(model, prompts, 30, eos_id=tokenizer.eos_id) == reference


def test_the_shared_prefix_runs_once(stories_dir, monkeypatch):
    model, tok = load_model(stories_dir), load_tokenizer(stories_dir)
    prompts = [tok.encode("Say yes or no: " + text)
               for text in ("the sky is blue", "cats bark", "ice is cold")]
    prefix = len(tok.encode("Say yes or no:"))  # ":" and " the" do not merge into one piece
    seen = []
    real = model.hidden_states
    monkeypatch.setattr(model, "hidden_states",
                        lambda ids, *a: seen.append(tuple(ids.shape)) or real(ids, *a))
    generate(model, prompts, 2, tok.eos_id, tok.pad_id)
    width = max(len(p) for p in prompts) - prefix
    assert seen == [(1, prefix), (3, width), (3, 1)]  # prefix once, the left-padded rest, one decoding step


def test_kv_cache_decoding_equals_full_forward(stories_dir):
    model = load_model(stories_dir)
    full_ids = torch.tensor([STORIES_PROMPT + STORIES_GOLDEN[:20]])
    short = [1, 403, 407]  # a second, shorter row: left-padded by 2 in the cache
    ids = torch.tensor([full_ids[0].tolist(), [0, 0] + short + STORIES_GOLDEN[:20]])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        expected = model(ids, mask)
        cache = KVCache(model.args, 2, ids.shape[1], torch.float32, "cpu")
        steps = [model(ids[:, :5], mask[:, :5], cache)]
        for t in range(5, ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], mask[:, t:t + 1], cache))
    actual = torch.cat(steps, dim=1)
    assert (actual[mask.bool()] - expected[mask.bool()]).abs().max() <= TOLERANCE


def test_padding_does_not_change_real_token_logits(stories_dir):
    model = load_model(stories_dir)
    row = torch.tensor([STORIES_PROMPT + STORIES_GOLDEN[:10]])
    with torch.no_grad():
        alone = model(row)[0]
        for side in ("left", "right"):
            pad = torch.zeros(1, 6, dtype=torch.long)
            ids = torch.cat([pad, row], 1) if side == "left" else torch.cat([row, pad], 1)
            mask = (torch.arange(ids.shape[1]) >= 6) if side == "left" else (torch.arange(ids.shape[1]) < 15)
            padded = model(ids, mask[None].long())[0][mask]
            assert (padded - alone).abs().max() <= TOLERANCE, side
        right_unmasked = model(torch.cat([row, torch.zeros(1, 6, dtype=torch.long)], 1))[0, :15]
        # causal attention alone is exact for right pads
        assert (right_unmasked - alone).abs().max() <= TOLERANCE


# -----------------------------------------------------------------------------
# Gradient checkpointing

def lora_grads(model, ids, seed):
    torch.manual_seed(seed)  # the same dropout masks in both runs
    model.zero_grad()
    logits = model(ids)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_equal_lora_gradients(stories_dir):
    model = load_model(stories_dir)
    apply_lora(model, dropout=0.05)
    model.train()
    ids = torch.tensor([STORIES_PROMPT + STORIES_GOLDEN[:30]] * 2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    lora_grads(model, ids, seed=0)
    optimizer.step()  # B starts at zero, so A's gradient is zero until B has moved once
    plain = lora_grads(model, ids, seed=1)
    model.grad_checkpointing = True
    checkpointed = lora_grads(model, ids, seed=1)
    assert plain.keys() == checkpointed.keys() and len(plain) == 5 * 4 * 2
    for name in plain:
        assert (plain[name] - checkpointed[name]).abs().max() <= 1e-5, name
        assert checkpointed[name].abs().sum() > 0, f"{name} got no gradient"


# -----------------------------------------------------------------------------
# Bad input: one line each, naming the file or key and what to do

def assert_one_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_model(tmp_path)
    assert_one_line_error(e, str(tmp_path / "config.json"), "point at a HF LLaMA directory")


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_config(ModelArgs.tiny())))
    with pytest.raises(FileNotFoundError) as e:
        load_model(tmp_path)
    assert_one_line_error(e, str(tmp_path), "no model.safetensors")


def test_truncated_safetensors(tmp_path):
    save_hf(random_hf_model(ModelArgs.tiny()), tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(ValueError) as e:
        load_model(tmp_path)
    assert_one_line_error(e, str(file), "truncated or corrupt", "download it again")


def test_missing_shard(tmp_path):
    save_hf(random_hf_model(ModelArgs.tiny()), tmp_path, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_model(tmp_path)
    assert_one_line_error(e, str(shard), "missing")


def test_weight_of_the_wrong_shape(tmp_path):
    args = ModelArgs.tiny()
    save_hf(random_hf_model(args), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(ModelArgs.tiny(intermediate_size=96))))
    with pytest.raises(ValueError) as e:
        load_model(tmp_path)
    assert_one_line_error(e, "model.layers.0.mlp.down_proj.weight has shape (64, 128)",
                          "(64, 96)", "disagree")


def test_unexpected_and_missing_keys(tmp_path):
    args = ModelArgs.tiny()
    state = {k: v.contiguous() for k, v in random_hf_model(args).state_dict().items()}
    (tmp_path / "config.json").write_text(json.dumps(hf_config(args)))
    save_file(dict(state, **{"model.layers.9.mlp.up_proj.weight": torch.zeros(2)}),
              tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as e:
        load_model(tmp_path)
    assert_one_line_error(e, "unexpected key model.layers.9.mlp.up_proj.weight")
    del state["model.norm.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as e:
        load_model(tmp_path)
    assert_one_line_error(e, "lacks model.norm.weight")


def test_meta_construction_uses_no_memory():
    with torch.device("meta"):
        model = Llama(ModelArgs())  # LLaMA-7B
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == count_parameters(ModelArgs()) == 6_738_415_616
