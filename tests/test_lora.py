"""Hand-written LoRA, proven against peft in both directions, plus merge and the bad-adapter errors."""
import json

import pytest
import torch
import torch.nn as nn

from hf_io import load_adapter, load_model, save_adapter
from model import Llama, LoRALinear, ModelArgs, apply_lora, lora_state_dict, merge_lora
from model_config import hf_config

transformers = pytest.importorskip("transformers", reason="transformers is the reference model")
peft = pytest.importorskip("peft", reason="peft is the reference LoRA")

TOLERANCE = 1e-4  # max |Δlogit| in fp32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def save_random_base(path, args=ModelArgs.tiny(), seed=0):
    """A random HF LLaMA saved to `path`; returns the directory."""
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(args)))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1)
    hf.save_pretrained(path)
    return path


def hf_base(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()  # the family config.json names


def randomize_lora(model, seed=1):
    """Non-zero A and B, so that a wrong key, scaling or transpose shows in the logits."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)


def make_peft_adapter(base_dir, adapter_dir, r=8, alpha=16):
    peft_model = peft.get_peft_model(hf_base(base_dir), peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM"))
    randomize_lora(peft_model)
    peft_model.save_pretrained(adapter_dir)
    return peft_model.eval()


@pytest.fixture
def base_dir(tmp_path):
    return save_random_base(tmp_path / "base")


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))


def test_peft_adapter_loads_with_equal_logits(tmp_path, base_dir, ids):
    peft_model = make_peft_adapter(base_dir, tmp_path / "adapter")
    ours = load_model(base_dir)
    names = load_adapter(ours, tmp_path / "adapter")
    assert len(names) == 2 * 4 and all(isinstance(ours.get_submodule(n), LoRALinear) for n in names)
    assert ours.get_submodule(names[0]).scaling == 16 / 8
    with torch.no_grad():
        assert (ours(ids) - peft_model(ids).logits).abs().max() <= TOLERANCE


def test_our_adapter_loads_in_peft_with_no_missing_or_unexpected_keys(tmp_path, base_dir, ids):
    ours = load_model(base_dir)
    apply_lora(ours, r=4, alpha=8)
    randomize_lora(ours)
    save_adapter(ours, tmp_path / "adapter")
    assert not list((tmp_path / "adapter").glob("*.tmp"))  # written atomically
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert ((config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"])
            == ("LORA", 4, 8, 0.05))
    assert (sorted(config["target_modules"]) == sorted(TARGETS)
            and config["base_model_name_or_path"] == str(base_dir))
    peft_model = peft.get_peft_model(hf_base(base_dir), peft.LoraConfig.from_pretrained(tmp_path / "adapter"))
    result = peft.set_peft_model_state_dict(peft_model, peft.utils.load_peft_weights(tmp_path / "adapter"))
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if "lora_" in k] == []
    with torch.no_grad():
        assert (ours(ids) - peft_model.eval()(ids).logits).abs().max() <= TOLERANCE
        reloaded = peft.PeftModel.from_pretrained(hf_base(base_dir), tmp_path / "adapter").eval()
        assert (ours(ids) - reloaded(ids).logits).abs().max() <= TOLERANCE


def test_legacy_alpaca_lora_bin_and_config(tmp_path, base_dir, ids):
    """tloen/alpaca-lora-7b ships adapter_model.bin
    and a config with the old keys enable_lora and merge_weights."""
    peft_model = make_peft_adapter(base_dir, tmp_path / "new")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    state = peft.utils.load_peft_weights(tmp_path / "new")
    # alpaca-lora saved fp16
    torch.save({k: v.half() for k, v in state.items()}, legacy / "adapter_model.bin")
    (legacy / "adapter_config.json").write_text(json.dumps(dict(
        base_model_name_or_path="decapoda-research/llama-7b-hf", bias="none", enable_lora=None,
        fan_in_fan_out=False, inference_mode=True, lora_alpha=16, lora_dropout=0.05, merge_weights=False,
        modules_to_save=None, peft_type="LORA", r=8, target_modules=TARGETS, task_type="CAUSAL_LM")))
    ours = load_model(base_dir)
    load_adapter(ours, legacy)
    assert all(p.dtype == torch.float32 for p in lora_state_dict(ours).values())
    with torch.no_grad():
        assert (ours(ids) - peft_model(ids).logits).abs().max() <= 1e-2  # fp16-rounded adapter weights


def test_save_load_round_trip(tmp_path, base_dir):
    ours = load_model(base_dir)
    apply_lora(ours)
    randomize_lora(ours)
    save_adapter(ours, tmp_path / "adapter")
    again = load_model(base_dir)
    load_adapter(again, tmp_path / "adapter")
    saved, loaded = lora_state_dict(ours), lora_state_dict(again)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_fresh_lora_changes_nothing_and_only_lora_trains(base_dir, ids):
    model = load_model(base_dir)
    with torch.no_grad():
        before = model(ids)
    names = apply_lora(model)
    assert names == [f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in TARGETS]
    assert not any(m.training for m in model.modules())  # new LoRA layers stay in eval mode: no dropout
    with torch.no_grad():
        assert torch.equal(model(ids), before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{m}.weight" for n in names for m in "AB"}


def test_merge_equals_unmerged(base_dir, ids):
    model = load_model(base_dir)
    apply_lora(model)
    randomize_lora(model)
    with torch.no_grad():
        unmerged = model(ids)
        merge_lora(model)
        merged = model(ids)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear) and not lora_state_dict(model)
    assert (merged - unmerged).abs().max() <= TOLERANCE


def test_merge_in_bf16_is_computed_in_fp32(base_dir):
    model = load_model(base_dir, dtype=torch.bfloat16)
    apply_lora(model)
    randomize_lora(model)
    layer = model.model.layers[0].self_attn.q_proj
    exact = layer.weight.float() + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    merge_lora(model)
    merged = model.model.layers[0].self_attn.q_proj.weight
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, exact.to(torch.bfloat16))  # one rounding, at the end


def test_llama_7b_lora_has_16_777_216_trainable_parameters():
    with torch.device("meta"):
        model = Llama(ModelArgs())
    apply_lora(model, r=16)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 16_777_216


# -----------------------------------------------------------------------------
# Bad adapters: one-line errors naming the file or key, and the model is left untouched

def error_of(call, kind=ValueError):
    with pytest.raises(kind) as e:
        call()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_adapter_for_another_model_size(tmp_path, base_dir):
    other = save_random_base(tmp_path / "wider", ModelArgs.tiny(dim=96, n_heads=6, n_kv_heads=3, head_dim=16))
    make_peft_adapter(other, tmp_path / "adapter")
    model = load_model(base_dir)
    message = error_of(lambda: load_adapter(model, tmp_path / "adapter"))
    assert "adapter_model.safetensors" in message and "another size" in message and "lora_A.weight" in message
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_adapter_for_a_deeper_model(tmp_path, base_dir):
    deeper = save_random_base(tmp_path / "deeper", ModelArgs.tiny(n_layers=3))
    make_peft_adapter(deeper, tmp_path / "adapter")
    message = error_of(lambda: load_adapter(load_model(base_dir), tmp_path / "adapter"))
    assert "unexpected key model.layers.2." in message


def test_rank_in_config_disagrees_with_tensors(tmp_path, base_dir):
    make_peft_adapter(base_dir, tmp_path / "adapter", r=8)
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), r=4)))
    message = error_of(lambda: load_adapter(load_model(base_dir), tmp_path / "adapter"))
    assert "rank 8 but adapter_config.json says r=4" in message


def test_adapter_missing_a_tensor(tmp_path, base_dir):
    make_peft_adapter(base_dir, tmp_path / "adapter")
    state = peft.utils.load_peft_weights(tmp_path / "adapter")
    del state["base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"]
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    torch.save(state, tmp_path / "adapter" / "adapter_model.bin")
    message = error_of(lambda: load_adapter(load_model(base_dir), tmp_path / "adapter"))
    assert "adapter_model.bin: lacks model.layers.1.self_attn.o_proj.lora_B.weight" in message


@pytest.mark.parametrize("field,value,expected", [
    ("peft_type", "PREFIX_TUNING", "only LORA"), ("use_dora", True, "use_dora=True is not supported"),
    ("use_rslora", True, "use_rslora=True is not supported")])
def test_adapter_kinds_we_do_not_implement(tmp_path, base_dir, field, value, expected):
    make_peft_adapter(base_dir, tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), **{field: value})))
    assert expected in error_of(lambda: load_adapter(load_model(base_dir), tmp_path / "adapter"))


def test_missing_adapter_files_and_double_lora(tmp_path, base_dir):
    model = load_model(base_dir)
    error = error_of(lambda: load_adapter(model, tmp_path), FileNotFoundError)
    assert "adapter_config.json: not found" in error
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(peft_type="LORA", r=8, lora_alpha=16,
                                                                  target_modules=TARGETS)))
    error = error_of(lambda: load_adapter(model, tmp_path), FileNotFoundError)
    assert "no adapter_model.safetensors" in error
    make_peft_adapter(base_dir, tmp_path / "adapter")
    apply_lora(model)
    assert "already has LoRA" in error_of(lambda: load_adapter(model, tmp_path / "adapter"))
    assert "apply_lora" in error_of(lambda: save_adapter(load_model(base_dir), tmp_path / "out"))
