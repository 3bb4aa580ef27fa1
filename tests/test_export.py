"""Tests for export.py: the merged directory loads in transformers and in coin with the logits of the unmerged
adapter, shards round-trip through their index, a killed export leaves nothing at --out that loads, and bad
input is one line before any model loads.

On the real tiny model ../shared/models/stories260K under a random non-zero LoRA adapter, fp32 on a CPU.
"""
import json
import signal
import subprocess
import sys

import pytest
import torch

import export
from conftest import ROOT, U
from hf_io import load_adapter, load_model, read_tensors, save_adapter
from model import apply_lora, merge_lora

transformers = pytest.importorskip("transformers", reason="transformers is the reference loader")

SHARD = "300KB"  # stories260K's 1.04 MB of fp32 weights in 4 shards


@pytest.fixture
def ckpt(tmp_path, stories_dir):
    """A coin.py-style output dir: a LoRA adapter on every projection, A and B random and non-zero."""
    model = load_model(stories_dir)
    apply_lora(model, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), r=4,
               alpha=8)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data.normal_(0, 0.1)
    out = tmp_path / "out"
    save_adapter(model, out)
    (out / "config.json").write_text(json.dumps({"base": str(stories_dir)}))
    return out


@pytest.fixture
def ids():
    return torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def unmerged_logits(stories_dir, ckpt, ids):
    model = load_model(stories_dir)
    load_adapter(model, ckpt)
    with torch.no_grad():
        return model(ids), model


def parity_bound(model, ids, logits, r=4):
    """How far merging may move a fp32 logit: L (D + I + T + 2r + 4) u max |logit|.

    x (W + s B A)^T and x W^T + s (x A^T) B^T sum the same products in other orders: within a layer, sums of
    D terms (the projections), T (attention) and I (down_proj) either way, 2r more on the LoRA path (B A, and
    (x A^T) B^T), and 4 single roundings (the merged weight, the scaling, two additions). However a sum of N
    fp32 terms is ordered, it errs by at most N u times their magnitudes (tests/conftest.py), for which
    max |logit| stands, as there; the L layers' errors add up along the residual stream. stories260K at
    T = 24: 5 (64 + 172 + 24 + 8 + 4) u 16.5 = 1.3e-3 (measured: 4.7e-5)."""
    a = model.args
    terms = a.n_layers * (a.dim + a.intermediate_size + ids.shape[1] + 2 * r + 4)
    return terms * U * logits.abs().max().item()


def hf_logits(folder, ids):
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits


# -----------------------------------------------------------------------------
# Parity: transformers and coin read the export, with the unmerged adapter's logits

def test_export_loads_in_transformers_and_coin_with_the_unmerged_logits(ckpt, stories_dir, tmp_path, ids):
    export.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "merged")])
    merged = tmp_path / "merged"
    assert sorted(p.name for p in merged.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.model", "tokenizer_config.json"]
    assert json.loads((merged / "config.json").read_text())["torch_dtype"] == "float32"  # the base's
    unmerged, model = unmerged_logits(stories_dir, ckpt, ids)
    bound = parity_bound(model, ids, unmerged)
    with torch.no_grad():
        ours = load_model(merged)(ids)
    theirs = hf_logits(merged, ids)
    assert (ours - unmerged).abs().max().item() <= bound
    assert (theirs - unmerged).abs().max().item() <= bound
    assert (theirs - ours).abs().max().item() <= 1e-4  # README: our logits vs transformers' (0 measured)
    assert (unmerged - load_model(stories_dir)(ids)).abs().max() > 100 * bound  # the adapter is there


def test_merge_is_in_place(stories_dir, ckpt):
    model = load_model(stories_dir)
    load_adapter(model, ckpt)
    q = model.model.layers[0].self_attn.q_proj
    pointer, expected = q.weight.data_ptr(), q.merged_weight()
    merge_lora(model)
    merged = model.model.layers[0].self_attn.q_proj.weight
    assert merged.data_ptr() == pointer and torch.equal(merged, expected) and not merged.requires_grad


def test_sharded_export_round_trips_through_its_index(ckpt, stories_dir, tmp_path, ids):
    export.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "one")])
    export.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "sharded"), "--shard-size", SHARD])
    sharded = tmp_path / "sharded"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    names = [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    assert sorted(set(index["weight_map"].values())) == names and not (sharded / "model.safetensors").exists()
    assert all((sharded / name).stat().st_size <= 300_000 + 10_000 for name in names)  # + the JSON header
    one, many = load_model(tmp_path / "one").state_dict(), load_model(sharded).state_dict()
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)
    assert index["metadata"]["total_size"] == sum(  # the stored tensors: lm_head is tied, stored once
        t.numel() * t.element_size() for k, t in one.items() if k != "lm_head.weight")
    assert set(index["weight_map"]) == set(one) - {"lm_head.weight"}
    assert torch.equal(hf_logits(sharded, ids), hf_logits(tmp_path / "one", ids))


def test_bf16_export_records_its_dtype(ckpt, tmp_path, ids):
    export.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "bf16"), "--dtype", "bf16"])
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    stored = read_tensors(tmp_path / "bf16" / "model.safetensors", "cpu")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "bf16")  # the dtype config.json records
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("size", ["5GB", "500MB", "10KB", "2GiB", "7MiB", "3KiB", "5Gb", "8kb", "1000"])
def test_shard_size_reads_as_transformers_reads_it(size):
    from transformers.utils.hub import convert_file_size_to_int
    assert export.parse_size(size) == convert_file_size_to_int(int(size) if size.isdigit() else size)


# -----------------------------------------------------------------------------
# Atomic: a killed export leaves nothing at --out that loads

KILL_AT_SECOND_SHARD = """
import os, signal, sys
import export, hf_io
written, save_file = [], hf_io.save_file
def dying_save_file(tensors, path, metadata=None):
    if written:  # the first shard is on disk: die as SIGKILL kills, with no clean-up
        os.kill(os.getpid(), signal.SIGKILL)
    written.append(path)
    save_file(tensors, path, metadata=metadata)
hf_io.save_file = dying_save_file
export.main(sys.argv[1:])
"""


def killed_export(*argv):
    return subprocess.run([sys.executable, "-c", KILL_AT_SECOND_SHARD, *map(str, argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def loads(folder):
    """Does either loader read `folder`?"""
    for load in (load_model, transformers.LlamaForCausalLM.from_pretrained):
        try:
            load(folder)
            return True
        except (OSError, ValueError):
            pass
    return False


def test_killed_export_leaves_nothing_that_loads_and_the_next_one_cleans_up(ckpt, tmp_path):
    out = tmp_path / "merged"
    done = killed_export("--ckpt", ckpt, "--out", out, "--shard-size", SHARD)
    assert done.returncode == -signal.SIGKILL, done.stderr
    partial = tmp_path / ".merged.partial"
    assert not out.exists() and (partial / "tokenizer.model").is_file()  # killed mid-write
    assert not loads(partial)  # not even the half-written folder: config.json comes last
    export.main(["--ckpt", str(ckpt), "--out", str(out), "--shard-size", SHARD])
    assert loads(out) and not partial.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "out"]


def test_killed_overwrite_keeps_the_old_export(ckpt, stories_dir, tmp_path):
    out = tmp_path / "merged"
    export.main(["--base", str(stories_dir), "--out", str(out)])  # the base alone, re-saved
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    done = killed_export("--ckpt", ckpt, "--out", out, "--shard-size", SHARD, "--overwrite")
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    export.main(["--ckpt", str(ckpt), "--out", str(out), "--overwrite"])
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "out"]  # no .partial, no .old


# -----------------------------------------------------------------------------
# Bad input: one line each, before any model loads

@pytest.mark.parametrize("argv, fragment", [
    (["--out", "{tmp}/m"], "give --ckpt OUT_DIR, or --base LLAMA_DIR"),
    (["--ckpt", "{tmp}/nowhere", "--out", "{tmp}/m"], "nowhere: checkpoint dir not found"),
    (["--ckpt", "{ckpt}", "--out", "{tmp}/taken"], "taken: already exists; pass --overwrite"),
    (["--ckpt", "{ckpt}", "--out", "{tmp}/file", "--overwrite"], "a file; give the path of a directory"),
    (["--ckpt", "{ckpt}", "--out", "{ckpt}", "--overwrite"], "which the export reads; write elsewhere"),
    (["--ckpt", "{ckpt}", "--out", "{tmp}/m", "--shard-size", "5 TB"], "--shard-size 5 TB: not a size"),
    (["--ckpt", "{ckpt}", "--out", "{tmp}/m", "--shard-size", "0"], "--shard-size 0: not a size"),
    (["--ckpt", "{ckpt}", "--out", "{tmp}/m", "--dtype", "int8"], "argument --dtype: invalid choice"),
    (["--ckpt", "{ckpt}"], "the following arguments are required: --out"),
])
def test_bad_input_is_one_line_before_any_model_loads(argv, fragment, ckpt, tmp_path, monkeypatch):
    (tmp_path / "taken").mkdir()
    (tmp_path / "file").write_text("x")

    def no_load(*_, **__):
        raise AssertionError("a model loaded before the input was checked")
    monkeypatch.setattr(export, "load_model", no_load)
    with pytest.raises(SystemExit) as e:
        export.main([a.format(tmp=tmp_path, ckpt=ckpt) for a in argv])
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message and fragment in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out", "taken"]  # nothing written
