"""The base families beyond LLaMA-1: Llama 3.x (rope_scaling llama3 and linear), Mistral (sliding window)
and Qwen2.5 (q/k/v biases, tied embeddings), proven against transformers and peft on random tiny configs
built here, in fp32: logits with no / left / right padding, adapters both ways, greedy generation. And their
bad configs, each refused in one line before any weight loads."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import coin
from hf_io import load_adapter, load_model, save_adapter
from model import Llama, ModelArgs, apply_lora, generate
from model_config import hf_config, read_model_args

# Before the helpers below, which need them too: the skip then says why here.
transformers = pytest.importorskip("transformers", reason="transformers is the reference for each family")
peft = pytest.importorskip("peft", reason="peft is the reference LoRA")
from test_lora import TARGETS, hf_base, make_peft_adapter, randomize_lora  # noqa: E402
from test_model import assert_one_line_error, logit_error, random_hf_model, save_hf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# max |Δlogit| in fp32. The logits are of order 1 and every value is a sum of at most a few hundred fp32
# products (eps 1.2e-7), so two correct implementations that order their sums differently agree to ~1e-6;
# 1e-4 leaves a margin of 100, and a layout, bias or frequency mistake moves the logits by 1e-2 or more.
TOLERANCE = 1e-4

# Llama 3.1's rope_scaling at this scale: head dim 16 and theta 500,000 give wavelengths from 6 to 6e5 tokens,
# so an old context of 64 puts frequencies in each of llama3's three regimes (kept, blended, divided by 8).
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)
WINDOW = 24  # Mistral's sliding window here: above the 13 tokens of the parity batches
FAMILIES = {  # id -> (ModelArgs, what transformers' config adds)
    "llama3": (ModelArgs.tiny(rope_theta=500000.0, rope_scaling=LLAMA3), {}),
    "linear": (ModelArgs.tiny(rope_scaling=dict(rope_type="linear", factor=4.0)), {}),
    "mistral": (ModelArgs.tiny(), dict(model_type="mistral", sliding_window=WINDOW)),
    "qwen2": (ModelArgs.tiny(attention_bias=True, rope_theta=1e6, tie_word_embeddings=True), {}),
}


@pytest.fixture(params=FAMILIES)
def family(request, tmp_path):
    """(transformers' model, our model loaded from its save_pretrained, the directory, ModelArgs)."""
    args, config = FAMILIES[request.param]
    hf = random_hf_model(args, **config)
    base = save_hf(hf, tmp_path / "base")
    return hf, load_model(base), base, args


# -----------------------------------------------------------------------------
# Parity with transformers and peft

@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_logits_match_transformers(family, padding):
    hf, ours, base, args = family
    assert type(hf).__name__ == json.loads((base / "config.json").read_text())["architectures"][0]
    assert logit_error(ours, hf, padding, args.vocab_size) <= TOLERANCE


# Mistral below its window is LLaMA's math, with no feature to switch off (test_sliding_window: the window).
@pytest.mark.parametrize("family", ["llama3", "linear", "qwen2"], indirect=True)
def test_each_family_feature_changes_the_logits(family):
    """The scaling or the biases really are exercised: without them the logits move far past TOLERANCE."""
    hf, ours, base, args = family
    plain = Llama(replace(args, rope_scaling=None, attention_bias=False))
    plain.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.endswith(".bias")})
    assert logit_error(plain.eval(), hf, "none", args.vocab_size) > 100 * TOLERANCE


def test_peft_adapters_load_both_ways(family, tmp_path):
    hf, ours, base, args = family
    ids = torch.randint(0, args.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    theirs = make_peft_adapter(base, tmp_path / "theirs")
    load_adapter(ours, tmp_path / "theirs")
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() <= TOLERANCE
    mine = load_model(base)
    apply_lora(mine, TARGETS, r=4, alpha=8)
    randomize_lora(mine, seed=2)
    save_adapter(mine, tmp_path / "mine")
    reloaded = peft.PeftModel.from_pretrained(hf_base(base), tmp_path / "mine").eval()
    with torch.no_grad():
        assert (mine(ids) - reloaded(ids).logits).abs().max() <= TOLERANCE


def test_greedy_generation_matches_transformers(family):
    """Batched and left-padded here, one row at a time in transformers, stopping at an eos both see."""
    hf, ours, base, args = family
    prompts = [[1, 17, 93, 5, 60, 2], [1, 44], [1, 8, 8, 120, 77, 31, 9, 64, 3]]
    free = generate(ours, prompts, 10)
    eos = free[0][4]  # a token row 0 really produces: rows that produce it stop there, in both
    assert eos in free[0][:free[0].index(eos) + 1] and free[0].index(eos) < 9  # so the stop is seen
    expected = []
    for prompt in prompts:
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=eos,
                          pad_token_id=0)[0, len(prompt):].tolist()
        expected.append(out[:out.index(eos) + 1] if eos in out else out)
    assert generate(ours, prompts, 10, eos_id=eos) == expected
    assert expected[0] == free[0][:free[0].index(eos) + 1]


def test_sliding_window_is_exact_below_it_and_refused_above_it(tmp_path):
    hf = random_hf_model(ModelArgs.tiny(), model_type="mistral", sliding_window=WINDOW)
    ours = load_model(save_hf(hf, tmp_path), max_tokens=WINDOW)
    ids = torch.randint(1, 128, (1, WINDOW + 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = hf(ids).logits[0], ours(ids)[0]
    assert (actual[:WINDOW] - expected[:WINDOW]).abs().max() <= TOLERANCE  # within the window: exact
    assert (actual[WINDOW:] - expected[WINDOW:]).abs().max() > 100 * TOLERANCE  # past it Mistral differs
    with pytest.raises(ValueError) as e:
        load_model(tmp_path, max_tokens=WINDOW + 1)
    assert_one_line_error(e, str(tmp_path / "config.json"), f"sliding_window={WINDOW}", "--cutoff 24 or less")


def test_coin_refuses_a_cutoff_above_the_window_before_any_weight(tmp_path):
    base = tmp_path / "mistral"  # a config.json and no weights: an error about weights would come too late
    base.mkdir()
    config = dict(hf_config(ModelArgs.tiny()), model_type="mistral", sliding_window=WINDOW)
    (base / "config.json").write_text(json.dumps(config))
    argv = ["--data", str(ROOT / "examples" / "flan_coin_demo.jsonl"), "--base", str(base), "--out",
            str(tmp_path / "out"), "--cutoff", "128", "--device", "cpu", "--dtype", "fp32"]
    with pytest.raises(SystemExit) as e:
        coin.main(argv)
    assert "\n" not in str(e.value)
    assert "sliding_window=24 is below the 128 tokens of --cutoff" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_configs_read_back(tmp_path):
    """hf_config(args), as transformers saves it, reads back to args: rope_scaling and biases included."""
    for name, (args, config) in FAMILIES.items():
        transformers.AutoConfig.for_model(**dict(hf_config(args), **config)).save_pretrained(tmp_path / name)
        assert read_model_args(tmp_path / name) == args, name


# -----------------------------------------------------------------------------
# Bad configs: one line naming the file, the field and what is supported, before any weight loads (the
# directories below hold a config.json and no weights: an error about weights would mean it came too late)

@pytest.mark.parametrize("change,fragments", [
    (dict(model_type="gemma"), ["model_type 'gemma' is not supported", "llama, mistral, qwen2"]),
    (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)),
     ["rope_scaling type 'yarn' is not supported", "default, linear, llama3"]),
    (dict(rope_scaling=dict(type="dynamic", factor=2.0)), ["rope_scaling type 'dynamic'", "linear, llama3"]),
    (dict(rope_scaling=dict(rope_type="llama3", factor=8.0)), ["rope_scaling 'llama3' lacks low_freq_fac"]),
    (dict(hidden_act="gelu"), ["hidden_act='gelu' is not supported", "silu"]),
    (dict(attention_bias=True), ["attention_bias=True is not supported", "qwen2"]),
    (dict(mlp_bias=True), ["mlp_bias=True is not supported"]),
])
def test_unsupported_config(tmp_path, change, fragments):
    (tmp_path / "config.json").write_text(json.dumps(dict(hf_config(ModelArgs.tiny()), **change)))
    with pytest.raises(ValueError) as e:
        load_model(tmp_path)
    assert_one_line_error(e, str(tmp_path / "config.json"), *fragments)
