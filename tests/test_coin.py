"""The CoIN objective, pinned down as pure functions, and the training loop end to end on real tiny models."""
import json
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F

import coin
from data import ContrastiveDataset, collate, load_examples
from hf_io import load_adapter, load_model, load_tokenizer, read_adapter_tensors, save_adapter
from model import Llama, ModelArgs, apply_lora, lora_state_dict

DEMO = "examples/flan_coin_demo.jsonl"


def run(tmp_path, stories_dir, *flags, out="out"):
    """coin.py on stories260K with small, fast settings; returns the output directory."""
    base = ["--data", str(coin.Path(coin.__file__).parent / DEMO), "--base", str(stories_dir),
            "--out", str(tmp_path / out), "--dtype", "fp32", "--device", "cpu", "--batch-size", "8",
            "--micro-batch-size", "4", "--cutoff", "128", "--lr", "1e-3", "--max-steps", "4"]
    coin.main(base + list(flags))
    return tmp_path / out


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# -----------------------------------------------------------------------------
# The loss rule

def test_identical_embeddings_give_log_b():
    h = torch.randn(1, 16).expand(6, 16)
    assert math.isclose(coin.info_nce(h, h, 0.05).item(), math.log(6), rel_tol=1e-6)


def test_info_nce_matches_its_definition_and_is_symmetric():
    torch.manual_seed(0)
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    cos = torch.tensor([[F.cosine_similarity(a[i], b[j], dim=0).item() for j in range(5)] for i in range(5)])
    logits = cos / 0.05
    forward = -torch.stack([logits[i].log_softmax(0)[i] for i in range(5)]).mean()
    backward = -torch.stack([logits[:, i].log_softmax(0)[i] for i in range(5)]).mean()
    assert math.isclose(coin.info_nce(a, b, 0.05).item(), ((forward + backward) / 2).item(), rel_tol=1e-5)
    assert math.isclose(coin.info_nce(a, b, 0.05).item(), coin.info_nce(b, a, 0.05).item(), rel_tol=1e-6)


def test_the_other_rows_of_the_micro_batch_are_the_negatives():
    torch.manual_seed(0)
    originals = torch.randn(4, 8)
    paraphrases = originals + 0.1 * torch.randn(4, 8)  # each paraphrase close to its own original
    easy = coin.info_nce(originals, paraphrases, 0.05)
    # A hard negative: example 1 now looks like example 0 in both views, so each is confused with the other.
    originals[1], paraphrases[1] = (originals[0] + 0.05 * torch.randn(8),
                                    paraphrases[0] + 0.05 * torch.randn(8))
    assert coin.info_nce(originals, paraphrases, 0.05) > easy + 0.25


def test_coin_weight_rescales_the_contrastive_term_to_the_generation_loss():
    torch.manual_seed(0)
    h_orig, h_para = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    gen = torch.tensor(2.0, requires_grad=True)
    total, ctr, weight = coin.coin_loss(h_orig, h_para, gen, 0.05, lam=1000.0)
    assert math.isclose(weight.item(), 2.0 / ctr.item(), rel_tol=1e-6)
    assert math.isclose(total.item(), 4.0, rel_tol=1e-6)  # gen + (gen / ctr) * ctr
    d_gen, d_h = torch.autograd.grad(total, (gen, h_orig))
    assert d_gen.item() == 1.0  # the weight is a constant to autograd
    d_ctr = torch.autograd.grad(coin.info_nce(h_orig, h_para, 0.05), h_orig)[0]
    assert torch.allclose(d_h, weight * d_ctr, rtol=1e-5, atol=1e-7)


def test_lambda_is_the_upper_bound_of_the_weight():
    torch.manual_seed(0)
    h_orig, h_para = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
    gen = torch.tensor(50.0, requires_grad=True)
    total, ctr, weight = coin.coin_loss(h_orig, h_para, gen, 0.05, lam=0.5)
    assert weight.item() == 0.5 and math.isclose(total.item(), 50.0 + 0.5 * ctr.item(), rel_tol=1e-6)
    d_h = torch.autograd.grad(total, h_orig)[0]
    assert torch.allclose(d_h, 0.5 * torch.autograd.grad(coin.info_nce(h_orig, h_para, 0.05), h_orig)[0])


def test_learning_rate_warms_up_then_decays_to_zero():
    lrs = [coin.learning_rate(step, 100, 1e-4, 0.1) for step in range(100)]
    assert lrs[0] == 1e-5 and lrs[9] == lrs[10] == 1e-4 == max(lrs)  # 10 warmup steps, then the decay
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(1e-4 / 90)


# -----------------------------------------------------------------------------
# The generation loss on a real model: logits only where supervised, and accumulation

@pytest.fixture
def stories(stories_dir):
    """stories260K with a non-zero LoRA (no dropout) and four demo examples (two groups) tokenized for it."""
    model, tokenizer = load_model(stories_dir), load_tokenizer(stories_dir)
    apply_lora(model, dropout=0.0)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    examples, _ = load_examples(coin.Path(coin.__file__).parent / DEMO)
    dataset = ContrastiveDataset(examples[:4], tokenizer, cutoff=128)
    return model, tokenizer, [dataset[i] for i in range(4)]


def test_ce_on_supervised_positions_equals_full_vocabulary_ce(stories):
    model, tokenizer, items = stories
    batch = collate(items, tokenizer.pad_id)
    with torch.no_grad():
        ours = coin.supervised_ce_sum(model, model.hidden_states(batch["input_ids"]), batch["labels"])
        logits = model(batch["input_ids"])  # (2B, T, V): the usual way, every position
        full = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                               reduction="sum")
    assert math.isclose(ours.item(), full.item(), rel_tol=1e-5)


def lora_gradients(model, batches, contrastive):
    model.zero_grad()
    window_tokens = [sum(counts) for counts in zip(*map(coin.supervised_tokens, batches))]
    for batch in batches:
        loss, _ = coin.micro_batch_loss(model, batch, window_tokens, len(batches), 0.05, 1000.0, contrastive)
        loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_accumulating_two_micro_batches_equals_one_big_batch(stories):
    model, tokenizer, items = stories
    big = lora_gradients(model, [collate(items, tokenizer.pad_id)], contrastive=False)
    accumulated = lora_gradients(model, [collate(items[:2], tokenizer.pad_id),
                                         collate(items[2:], tokenizer.pad_id)], contrastive=False)
    assert all(big[n].abs().sum() > 0 for n in big)
    for name in big:
        assert torch.allclose(big[name], accumulated[name], rtol=1e-5, atol=1e-6), name


def test_pooling_takes_each_rows_last_real_token(stories):
    model, tokenizer, items = stories
    batch = collate(items, tokenizer.pad_id)
    hidden = torch.randn(*batch["input_ids"].shape, 8)
    pooled = coin.pool_last_token(hidden, batch["last_index"])
    for row in range(hidden.shape[0]):
        last = int(batch["attention_mask"][row].nonzero().max())
        assert torch.equal(pooled[row], hidden[row, last])


# -----------------------------------------------------------------------------
# The training loop

def test_fifty_steps_lower_both_losses(tmp_path, stories_dir):
    out = run(tmp_path, stories_dir, "--max-steps", "50", "--save-every", "1000")
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 51))
    first, last = records[:10], records[-10:]
    for key in ("gen", "ctr"):
        assert sum(r[key] for r in last) < 0.8 * sum(r[key] for r in first), key
    assert all(r["examples"] == 8 and r["negatives_per_anchor"] == 3 for r in records)


def test_the_adapter_loads_in_peft_with_equal_logits(tmp_path, stories_dir):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    out = run(tmp_path, stories_dir)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                    "checkpoint-000004", "config.json", "metrics.jsonl"]
    assert json.loads((out / "config.json").read_text())["base"] == str(stories_dir.resolve())
    ours = load_model(stories_dir)
    load_adapter(ours, out)
    hf_base = transformers.LlamaForCausalLM.from_pretrained(stories_dir)
    theirs = peft.PeftModel.from_pretrained(hf_base, out).eval()
    ids = torch.tensor([[1, 403, 407, 261, 378, 432, 383]])
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() <= 1e-4


def test_no_contrastive_trains_on_the_generation_loss_alone(tmp_path, stories_dir):
    records = metrics(run(tmp_path, stories_dir, "--no-contrastive"))
    assert all(r["ctr"] == 0.0 and r["weight"] == 0.0 and r["loss"] == pytest.approx(r["gen"])
               for r in records)


def interrupt_after(monkeypatch, step):
    """Press Ctrl-C (a real SIGINT) right after optimizer step `step`."""
    real_step, steps = coin.train_step, []

    def step_then_ctrl_c(*args):
        record = real_step(*args)
        steps.append(record)
        if len(steps) == step:
            os.kill(os.getpid(), signal.SIGINT)
        return record
    monkeypatch.setattr(coin, "train_step", step_then_ctrl_c)


def test_ctrl_c_saves_and_resume_reproduces_the_uninterrupted_run(tmp_path, stories_dir, monkeypatch):
    flags = ("--max-steps", "6", "--save-every", "100")
    straight = run(tmp_path, stories_dir, *flags, out="straight")
    interrupt_after(monkeypatch, 3)
    resumed = run(tmp_path, stories_dir, *flags, out="resumed")
    assert (resumed / "checkpoint-000003").is_dir() and not (resumed / "adapter_model.safetensors").exists()
    monkeypatch.undo()
    coin.main(["--out", str(resumed), "--resume"])  # every other setting comes from resumed/config.json
    _, expected = read_adapter_tensors(straight)
    _, actual = read_adapter_tensors(resumed)
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in metrics(straight)]


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, stories_dir,
                                                                             monkeypatch):
    real_loss, calls = coin.micro_batch_loss, []

    def nan_on_step_two(*args):
        loss, parts = real_loss(*args)
        calls.append(1)
        return (loss * float("nan"), parts) if len(calls) == 3 else (loss, parts)  # 2 micro-batches a step
    monkeypatch.setattr(coin, "micro_batch_loss", nan_on_step_two)
    with pytest.raises(SystemExit, match=r"step 2: non-finite loss .* on examples \S+-(anchor|negative)"):
        run(tmp_path, stories_dir, "--save-every", "1")
    assert [p.name for p in (tmp_path / "out").glob("checkpoint-*")] == ["checkpoint-000001"]
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_a_finished_run_is_not_overwritten_unless_asked(tmp_path, stories_dir):
    out = run(tmp_path, stories_dir)
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="already holds a finished run; pass --resume .* or --overwrite"):
        run(tmp_path, stories_dir, "--seed", "1")
    assert (out / "adapter_model.safetensors").read_bytes() == before
    run(tmp_path, stories_dir, "--seed", "1", "--overwrite", "--max-steps", "2")
    assert (out / "adapter_model.safetensors").read_bytes() != before
    steps = [r["step"] for r in metrics(out)]
    assert steps == [1, 2] and sorted(out.glob("checkpoint-*"))[-1].name.endswith("2")


@pytest.mark.parametrize("flags, message", [
    (["--base", "BASE"], "--data is required"),
    (["--data", DEMO], "give either --base"),
    (["--data", DEMO, "--base", "BASE", "--tiny"], "give either --base"),
    (["--data", DEMO, "--base", "BASE", "--batch-size", "6", "--micro-batch-size", "4"], "not a multiple"),
    (["--data", DEMO, "--base", "BASE", "--dtype", "fp16", "--device", "cpu"], "fp16 needs a CUDA GPU"),
])
def test_bad_flags(tmp_path, stories_dir, flags, message):
    flags = [str(stories_dir) if f == "BASE" else f for f in flags]
    with pytest.raises(SystemExit, match=message):
        coin.main(flags + ["--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_bad_data_file_shows_the_report_and_writes_nothing(tmp_path, stories_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\nnot json\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl: 2 bad lines[\s\S]*bad.jsonl:2: not JSON"):
        coin.main(["--data", str(bad), "--base", str(stories_dir), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_an_adapter_for_another_base_is_refused_before_writing(tmp_path, stories_dir):
    other = Llama(ModelArgs.tiny(dim=96, n_heads=6, n_kv_heads=3))  # stories260K has dim 64
    apply_lora(other)
    save_adapter(other, tmp_path / "adapter")
    with pytest.raises(SystemExit, match="has shape .* but this model needs .* base model of another size"):
        run(tmp_path, stories_dir, "--adapter", str(tmp_path / "adapter"))
    assert not (tmp_path / "out").exists()


def test_continuing_an_adapter_starts_from_its_weights(tmp_path, stories_dir):
    first = run(tmp_path, stories_dir, "--max-steps", "2", out="first")
    cfg = coin.parse_config(["--data", DEMO, "--base", str(stories_dir), "--adapter", str(first),
                             "--dtype", "fp32", "--lora-r", "4", "--device", "cpu"])
    model, _, lora = coin.build_model(cfg, "cpu", torch.float32)
    _, saved = read_adapter_tensors(first)
    current = lora_state_dict(model)
    # the adapter's r wins
    assert all(torch.equal(current[k], saved[k]) for k in saved) and lora["lora_r"] == 16
    cfg = coin.parse_config(["--data", DEMO, "--base", str(stories_dir), "--adapter", str(first),
                             "--merge-adapter", "--device", "cpu"])
    merged, _, _ = coin.build_model(cfg, "cpu", torch.float32)
    assert all(not p.any() for n, p in lora_state_dict(merged).items() if "lora_B" in n)  # a fresh LoRA
    plain = load_model(stories_dir)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], plain.state_dict()[q])  # on the merged base


def test_the_tiny_default_builds_its_own_base_and_tokenizer(tmp_path):
    out = tmp_path / "out"
    coin.main(["--data", DEMO, "--tiny", "--out", str(out), "--dtype", "fp32", "--device", "cpu",
               "--max-steps", "2", "--batch-size", "8", "--micro-batch-size", "4"])
    config = json.loads((out / "config.json").read_text())
    assert config["base"] == str((out / "base").resolve()) and config["tiny"]
    tokenizer = load_tokenizer(out / "base")  # checked against the bundled config's vocab_size
    assert tokenizer.decode(tokenizer.encode("Premise: Is it 42?")) == "Premise: Is it 42?"
    model = load_model(out / "base")
    load_adapter(model, out)
    first_tokenizer = (out / "base" / "tokenizer.model").read_bytes()
    coin.main(["--out", str(out), "--overwrite", "--data", DEMO, "--tiny", "--dtype", "fp32",
               "--device", "cpu", "--max-steps", "1", "--batch-size", "8", "--micro-batch-size", "4"])
    assert (out / "base" / "tokenizer.model").read_bytes() == first_tokenizer  # deterministic


def test_resume_keeps_the_saved_config(tmp_path, stories_dir):
    out = run(tmp_path, stories_dir, "--max-steps", "2")
    with pytest.raises(ValueError, match="--lr 0.5 differs from .*config.json"):
        coin.parse_config(["--out", str(out), "--resume", "--lr", "0.5"])
    cfg = coin.parse_config(["--out", str(out), "--resume", "--max-steps", "3"])
    assert (cfg.max_steps, cfg.lr, cfg.batch_size, cfg.grad_checkpointing) == (3, 1e-3, 8, True)
    assert coin.parse_config(["--no-grad-checkpointing", "--no-contrastive"]).grad_checkpointing is False


def test_cosines_stay_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    a, b = torch.randn(8, 64), torch.randn(8, 64)
    with torch.autocast("cpu", torch.bfloat16):
        mixed = coin.info_nce(a.bfloat16(), b.bfloat16(), 0.05)
    assert mixed.dtype == torch.float32
    assert math.isclose(mixed.item(), coin.info_nce(a.bfloat16().float(), b.bfloat16().float(), 0.05).item(),
                        rel_tol=1e-6)
