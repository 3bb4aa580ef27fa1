"""The CoIN objective, pinned down as pure functions, and the training loop end to end on real tiny models."""
import json
import math
import os
import signal
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import coin
import plots
import report
from conftest import U, assert_same_gradients
from data import ContrastiveDataset, collate, load_examples
from official_coin import official_step
from checkpoints import STOPPED, restore_checkpoint, save_checkpoint
from diagnostics import PROGRESS
from hf_io import load_adapter, load_model, load_tokenizer, read_adapter_tensors, save_adapter
from model import POOLING, Llama, ModelArgs, apply_lora, bucketed_hidden_states, lora_state_dict, pool

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
# The loss rule, on tensors

ONE_GROUP, PAIRS = torch.zeros(6, dtype=torch.long), torch.tensor([0, 0, 1, 1, 2, 2])


def nce(*args, **kwargs):
    """info_nce's (G,) losses, without its cosine sums."""
    return coin.info_nce(*args, **kwargs)[0]


def test_identical_embeddings_give_log_of_the_candidates():
    h = torch.randn(1, 16).expand(6, 16)
    batch = nce(h, h, PAIRS, 0.05, within_groups=False)  # every row of the micro-batch a candidate
    assert torch.allclose(batch, torch.full((3,), math.log(6)))
    assert torch.allclose(nce(h, h, PAIRS, 0.05), torch.full((3,), math.log(2)))  # its group only


def reference_info_nce(a, b, temperature=0.05):
    """InfoNCE written from its definition: the mean over rows of the two directions' cross-entropies."""
    n = len(a)
    cos = torch.tensor([[F.cosine_similarity(a[i], b[j], dim=0).item() for j in range(n)] for i in range(n)])
    logits = cos / temperature
    forward = -torch.stack([logits[i].log_softmax(0)[i] for i in range(n)]).mean()
    backward = -torch.stack([logits[:, i].log_softmax(0)[i] for i in range(n)]).mean()
    return ((forward + backward) / 2).item()


def test_info_nce_per_group_equals_its_definition_on_each_group_alone():
    torch.manual_seed(0)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    groups = torch.tensor([0, 1, 0, 2, 1, 2])  # members need not be adjacent
    ours = nce(a, b, groups, 0.05)
    for g in range(3):
        rows = groups == g
        assert math.isclose(ours[g].item(), reference_info_nce(a[rows], b[rows]), rel_tol=1e-5)
    batch = nce(a, b, ONE_GROUP, 0.05, within_groups=False)
    assert math.isclose(batch.item(), reference_info_nce(a, b), rel_tol=1e-5)
    assert torch.allclose(nce(b, a, groups, 0.05), ours, rtol=1e-6)  # symmetric


def test_the_hard_negative_is_the_only_negative_in_group_mode():
    torch.manual_seed(0)
    originals = torch.randn(4, 8)
    paraphrases = originals + 0.1 * torch.randn(4, 8)  # each paraphrase close to its own original
    groups = torch.tensor([0, 0, 1, 1])
    easy = nce(originals, paraphrases, groups, 0.05)
    # Example 2 now looks like example 0 in both views: a confusable row, but of another group.
    originals[2] = originals[0] + 0.05 * torch.randn(8)
    paraphrases[2] = paraphrases[0] + 0.05 * torch.randn(8)
    assert torch.allclose(nce(originals, paraphrases, groups, 0.05)[0], easy[0], rtol=1e-5)
    assert nce(originals, paraphrases, groups, 0.05, within_groups=False)[0] > easy[0] + 0.25
    # ... and now example 1, its hard negative, looks like example 0.
    originals[1] = originals[0] + 0.05 * torch.randn(8)
    paraphrases[1] = paraphrases[0] + 0.05 * torch.randn(8)
    assert nce(originals, paraphrases, groups, 0.05)[0] > easy[0] + 0.25


def test_coin_weight_rescales_each_groups_contrastive_term_to_its_generation_loss():
    gen = torch.tensor([2.0, 3.0], requires_grad=True)
    ctr = torch.tensor([0.5, 0.1], requires_grad=True)
    total, weight = coin.coin_loss(gen, ctr, lam=1000.0)
    assert torch.allclose(weight, torch.tensor([4.0, 30.0])) and torch.allclose(total, 2 * gen.detach())
    d_gen, d_ctr = torch.autograd.grad(total.sum(), (gen, ctr))
    assert torch.equal(d_gen, torch.ones(2))  # the weight is a constant to autograd
    assert torch.allclose(d_ctr, weight)
    total, weight = coin.coin_loss(gen, ctr, lam=10.0)  # lambda is the upper bound of the weight
    assert torch.allclose(weight, torch.tensor([4.0, 10.0])) and math.isclose(total[1].item(), 4.0)


def test_learning_rate_is_hfs_linear_schedule_with_warmup():
    transformers = pytest.importorskip("transformers")
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1e-4)
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, num_warmup_steps=10,
                                                            num_training_steps=100)
    expected = []
    for _ in range(100):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    ours = [coin.learning_rate(step, 100, 1e-4, 10) for step in range(100)]
    assert ours == pytest.approx(expected, rel=1e-12, abs=0) and ours[0] == 0.0 and max(ours) == 1e-4
    assert [coin.learning_rate(step, 5, 1e-4, 0) for step in range(2)] == [1e-4, 1e-4 * 4 / 5]


# -----------------------------------------------------------------------------
# The objective on a real model: per group, whatever the micro-batch; equal to the official code

@pytest.fixture
def stories(stories_dir):
    """stories260K with a non-zero LoRA (no dropout) and 16 demo examples (eight groups) tokenized for it."""
    model, tokenizer = load_model(stories_dir), load_tokenizer(stories_dir)
    torch.manual_seed(0)  # before apply_lora: lora_A's init draws from it too
    apply_lora(model, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    examples, _ = load_examples(coin.Path(coin.__file__).parent / DEMO)
    dataset = ContrastiveDataset(examples[:40], tokenizer, cutoff=128)  # a few do not fit: take 16 that do
    return model, tokenizer, [dataset[i] for i in range(16)]


def test_generation_loss_on_supervised_positions_equals_full_vocabulary_ce(stories):
    model, tokenizer, items = stories
    batch = collate(items[:4], tokenizer.pad_id)  # two groups
    with torch.no_grad():
        ours = coin.generation_loss(model, model.hidden_states(batch["input_ids"]), batch["labels"],
                                    batch["group_index"])
        logits = model(batch["input_ids"])  # (2B, T, V): the usual way, every position
    for g, rows in enumerate(([0, 1], [2, 3])):
        expected = 0.0
        for view in (rows, [4 + r for r in rows]):  # a token mean per view, as CoIN
            labels = batch["labels"][view][:, 1:].flatten()
            expected += F.cross_entropy(logits[view][:, :-1].flatten(0, 1), labels)
        assert math.isclose(ours[g].item(), expected.item(), rel_tol=1e-5)


def step_loss_and_gradients(model, micro_batches, negatives="group", pooling="last"):
    """What one optimizer step accumulates: the step's loss and the LoRA gradients."""
    model.zero_grad()
    step_groups = sum(int(batch["group_index"].max()) + 1 for batch in micro_batches)
    total = 0.0
    for batch in micro_batches:
        loss, _ = coin.micro_batch_loss(model, batch, step_groups, 0.05, 1000.0, True, negatives == "group",
                                        pooling)
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("size, pooling", [(2, "last"), (4, "last"), (4, "mean"), (4, "max")])
def test_the_objective_does_not_depend_on_the_micro_batch_size(stories, size, pooling):
    model, tokenizer, items = stories
    whole = collate(items, tokenizer.pad_id, by_length=False)  # one padded rectangle
    whole_loss, whole_grads = step_loss_and_gradients(model, [whole], pooling=pooling)
    split = [collate(items[i:i + size], tokenizer.pad_id) for i in range(0, 16, size)]  # two buckets each
    assert all(batch["bucket"].max() == 1 for batch in split)
    split_loss, split_grads = step_loss_and_gradients(model, split, pooling=pooling)
    assert math.isclose(whole_loss, split_loss, rel_tol=1e-5)
    assert all(whole_grads[n].abs().sum() > 0 for n in whole_grads)
    tolerance = assert_same_gradients(split_grads, whole_grads, int(whole["attention_mask"].sum()))
    _, batch_grads = step_loss_and_gradients(model, split, "batch", pooling)  # SimCSE-style: it does depend
    if size > 2:  # on the gradients: uncapped, w * L_ctr = L_gen whatever the negatives, and so is the loss
        assert any((batch_grads[n] - whole_grads[n]).abs().max() > 100 * tolerance for n in whole_grads)


def test_the_objective_equals_the_official_contrastive_llama(stories, tmp_path, stories_dir):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model, tokenizer, items = stories
    save_adapter(model, tmp_path / "adapter")  # the same LoRA weights, loaded by peft
    hf_base = transformers.LlamaForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter", is_trainable=True)
    official = official_step(theirs, items, tokenizer.pad_id)
    official.backward()
    their_grads = {n.replace("base_model.model.", "", 1).replace(".default", ""): p.grad
                   for n, p in theirs.named_parameters() if p.requires_grad}
    ours, our_grads = step_loss_and_gradients(model, [collate(items[i:i + 2], tokenizer.pad_id)
                                                      for i in range(0, 16, 2)])
    assert math.isclose(ours, official.item(), rel_tol=1e-5)
    tokens = int(collate(items, tokenizer.pad_id)["attention_mask"].sum())
    assert_same_gradients(our_grads, their_grads, tokens)


def official_pooling(hidden, mode):
    """ContrastiveLlama.get_pooled_hidden_states re-expressed for unpadded rows hidden (R, L, D): its
    pooling_method last, average_all (our mean) or max."""
    return {"last": lambda: hidden[:, -1], "mean": lambda: hidden.mean(1),
            "max": lambda: hidden.max(1).values}[mode]()


@pytest.mark.parametrize("mode", POOLING)
def test_pooling_equals_the_official_on_each_row_alone_and_never_reads_a_pad(stories, mode):
    model, tokenizer, items = stories
    batch = collate(items, tokenizer.pad_id)  # right-padded rows of many lengths, in two buckets
    lengths = batch["attention_mask"].sum(1)
    with torch.no_grad():
        hidden = bucketed_hidden_states(model, batch["input_ids"], lengths, batch["bucket"])
        hidden[batch["attention_mask"] == 0] = 1e3  # a pad's state may be anything: it must never count
        pooled = pool(hidden, lengths, batch["last_index"], mode)  # (2B, D)
        for row, length in enumerate(lengths.tolist()):
            alone = model.hidden_states(batch["input_ids"][row:row + 1, :length])  # (1, L, D): no pad at all
            expected = official_pooling(alone, mode)[0]
            # batched, the row's sums over positions, the width and the MLP run in other orders
            bound = (length + model.args.dim + model.args.intermediate_size) * U * expected.abs().max()
            assert (pooled[row] - expected).abs().max() <= bound, (row, mode)


def test_cosine_sums_are_each_anchors_positive_and_hardest_negative():
    torch.manual_seed(0)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    groups = torch.tensor([0, 1, 0, 1, 0, 1])  # two negatives per anchor: the hardest is the larger cosine
    cos = F.cosine_similarity(a[:, None], b[None], dim=-1)  # (B, B): cos[i, j] = cos(a_i, b_j)
    for within_groups, candidate in ((True, groups[:, None] == groups[None, :]),
                                     (False, torch.ones(6, 6, dtype=torch.bool))):
        negative = candidate & ~torch.eye(6, dtype=torch.bool)
        hardest_ab = cos.masked_fill(~negative, -2).amax(1)  # each original's most similar other paraphrase
        hardest_ba = cos.masked_fill(~negative, -2).amax(0)  # each paraphrase's most similar other original
        _, sums = coin.info_nce(a, b, groups, 0.05, within_groups)
        assert math.isclose(sums["cos_positive"], cos.diag().sum().item(), rel_tol=1e-5)
        assert math.isclose(sums["cos_negative"], (hardest_ab.sum() + hardest_ba.sum()).item() / 2,
                            rel_tol=1e-5)


# -----------------------------------------------------------------------------
# The training loop

def test_fifty_steps_lower_both_losses(tmp_path, stories_dir):
    out = run(tmp_path, stories_dir, "--max-steps", "50", "--save-every", "1000")
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 51))
    first, last = records[:10], records[-10:]
    for key in ("gen", "ctr"):
        assert sum(r[key] for r in last) < 0.8 * sum(r[key] for r in first), key
    assert all(r["examples"] == 8 and r["groups"] == 4 for r in records)
    assert all(r["negatives_per_anchor"] == r["hard_negatives_per_anchor"] == 1 for r in records)


@pytest.mark.parametrize("flags, share, capped", [
    (("--lam", "1e8"), 0.5, 0.0),  # never capped: w * L_ctr = L_gen in every group, half of the loss
    (("--lam", "1e-3"), None, 1.0),  # always capped: the term is a rounding error
    (("--no-contrastive",), 0.0, 0.0),  # continual tuning: no term, its cosines still logged
])
def test_every_step_logs_whether_the_term_acts(tmp_path, stories_dir, flags, share, capped):
    for r in metrics(run(tmp_path, stories_dir, *flags, "--pooling", "mean", "--max-steps", "2")):
        assert set(PROGRESS.values()) <= set(r)
        assert math.isclose(r["contrastive_share"], (r["loss"] - r["gen"]) / r["loss"], abs_tol=1e-12)
        assert r["contrastive_share"] == pytest.approx(share, abs=1e-6) if share is not None else \
            r["contrastive_share"] < 1e-3
        assert r["weight_capped"] == capped and (r["ctr"] == 0) == (flags[0] == "--no-contrastive")
        assert -1 <= r["cos_negative"] <= 1 and -1 <= r["cos_positive"] <= 1
        assert math.isclose(r["cos_margin"], r["cos_positive"] - r["cos_negative"], abs_tol=1e-12)


def test_report_prints_a_training_runs_first_and_last_steps_and_draws_its_curves(tmp_path, stories_dir,
                                                                               capsys, monkeypatch):
    out = run(tmp_path, stories_dir, "--max-steps", "2")
    monkeypatch.setattr(plots, "pyplot", lambda: None)  # matplotlib is an optional extra
    report.main([str(out)])
    text = capsys.readouterr().out
    assert "| | step 1 | step 2 |" in text and "| contrastive_share |" in text and "| cos_margin |" in text
    assert "no plot: pip install matplotlib" in text and not (out / "training.png").exists()
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    report.main([str(out)])
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_batch_negatives_are_every_other_row_of_the_micro_batch(tmp_path, stories_dir):
    records = metrics(run(tmp_path, stories_dir, "--negatives", "batch", "--max-steps", "2"))
    assert all(r["negatives_per_anchor"] == 3 and r["hard_negatives_per_anchor"] == 1 for r in records)


def test_micro_batch_2_and_16_log_the_same_first_step(tmp_path, stories_dir):
    first = [metrics(run(tmp_path, stories_dir, "--batch-size", "16", "--micro-batch-size", size,
                         "--max-steps", "1", out=f"micro{size}"))[0] for size in ("2", "16")]
    for key in ("loss", "gen", "ctr", "weight"):
        assert math.isclose(first[0][key], first[1][key], rel_tol=1e-5), key
    assert first[0]["real_tokens"] == first[1]["real_tokens"] > 0  # the same step, whatever the micro-batch
    assert all(0 <= record["padded_tokens"] < record["real_tokens"] for record in first)


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
    with pytest.raises(SystemExit) as stopped:
        run(tmp_path, stories_dir, *flags, out="resumed")
    resumed = tmp_path / "resumed"
    assert stopped.value.code == STOPPED and (resumed / "checkpoint-000003").is_dir()
    assert not (resumed / "adapter_model.safetensors").exists()
    monkeypatch.undo()
    coin.main(["--out", str(resumed), "--resume"])  # every other setting comes from resumed/config.json
    _, expected = read_adapter_tensors(straight)
    _, actual = read_adapter_tensors(resumed)
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in metrics(straight)]


def test_a_signal_during_the_last_step_lets_the_run_finish(tmp_path, stories_dir, monkeypatch):
    interrupt_after(monkeypatch, 4)  # of 4: stopping would save what finishing saves, and exit 75 for nothing
    out = run(tmp_path, stories_dir)
    assert (out / "adapter_model.safetensors").is_file()


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
    (["--data", DEMO, "--base", "BASE", "--cutoff", "8"], "no group left to train on; raise --cutoff"),
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
                             "--merge-adapter", "--device", "cpu", "--dtype", "fp32"])
    merged, _, _ = coin.build_model(cfg, "cpu", torch.float32)
    assert all(not p.any() for n, p in lora_state_dict(merged).items() if "lora_B" in n)  # a fresh LoRA
    plain = load_model(stories_dir)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], plain.state_dict()[q])  # on the merged base


def test_a_run_started_with_overwrite_resumes_instead_of_starting_over(tmp_path, stories_dir,
                                                                       monkeypatch):
    """--overwrite is the command's, not the run's: `--resume` must not take it from config.json, where it
    would start the run over and delete its checkpoints (benchmarks/rehearse_7b.py met this at 7B)."""
    out = tmp_path / "out"
    coin.main(["--data", DEMO, "--base", str(stories_dir), "--out", str(out), "--dtype", "fp32", "--device",
               "cpu", "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "2", "--overwrite"])
    saved = (out / "checkpoint-000002" / "trainer_state.pt").read_bytes()
    steps, real_step = [], coin.train_step
    monkeypatch.setattr(coin, "train_step", lambda *args: steps.append(1) or real_step(*args))
    coin.main(["--out", str(out), "--resume", "--max-steps", "3"])
    assert len(steps) == 1  # step 3 alone, from checkpoint 2
    assert (out / "checkpoint-000002" / "trainer_state.pt").read_bytes() == saved
    logged = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in logged] == [1, 2, 3]


def test_the_tiny_default_builds_its_own_base_and_tokenizer(tmp_path):
    out = tmp_path / "out"
    coin.main(["--data", DEMO, "--tiny", "--out", str(out), "--dtype", "fp32", "--device", "cpu",
               "--max-steps", "2", "--batch-size", "8", "--micro-batch-size", "4"])
    config = json.loads((out / "config.json").read_text())
    assert config["base"] == "base" and config["tiny"]  # inside the run folder: relative, so it may move
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
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    with torch.autocast("cpu", torch.bfloat16):
        mixed = nce(a.bfloat16(), b.bfloat16(), groups, 0.05)
    assert mixed.dtype == torch.float32
    exact = nce(a.bfloat16().float(), b.bfloat16().float(), groups, 0.05)
    assert torch.allclose(mixed, exact, rtol=1e-6)


def test_the_fp16_loss_scale_is_saved_and_restored(tmp_path, stories_dir):
    model = load_model(stories_dir)
    apply_lora(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0, growth_interval=7)
    checkpoint = save_checkpoint(tmp_path, model, optimizer, scaler, coin.TrainConfig(), step=3, skipped=1)
    fresh = torch.amp.GradScaler("cpu")
    state = restore_checkpoint(checkpoint, model, optimizer, fresh)
    assert (state["step"], state["skipped"], fresh.get_scale()) == (3, 1, 512.0)
    assert fresh.state_dict() == scaler.state_dict()


def test_holdout_leaves_the_files_last_examples_out(tmp_path, stories_dir):
    flags = ["--data", str(coin.Path(coin.__file__).parent / DEMO), "--base", str(stories_dir), "--out",
             str(tmp_path / "out"), "--dtype", "fp32", "--device", "cpu"]
    cfg = coin.parse_config(flags + ["--holdout", "100"])
    trained = {item["id"] for item in coin.set_up(cfg, *coin.check_flags(cfg))[0].dataset}
    held_out = {e.id for e in load_examples(coin.Path(coin.__file__).parent / DEMO)[0][-100:]}
    assert trained and not trained & held_out
    cfg = coin.parse_config(flags + ["--holdout", "264"])
    with pytest.raises(ValueError, match="--holdout 264: .* has 264 examples; hold out fewer"):
        coin.set_up(cfg, *coin.check_flags(cfg))


@pytest.mark.parametrize("groups, micro_batch_size, steps",
                         [(127, 16, 3), (132, 16, 4), (127, 2, 3), (20, 4, 1)])
def test_steps_per_epoch_are_hf_trainers_at_the_official_micro_batch(groups, micro_batch_size, steps):
    """HF's Trainer at micro-batch 2 (one group) and 32 accumulation steps takes floor(groups / 32) steps an
    epoch (one if the epoch is shorter than a step): so must we, at any micro-batch size."""
    pairs = SimpleNamespace(groups=[[2 * g, 2 * g + 1] for g in range(groups)], lengths=list(range(groups)))
    for group_by_length in (True, False):
        cfg = coin.TrainConfig(batch_size=64, micro_batch_size=micro_batch_size,
                               group_by_length=group_by_length)
        windows = coin.steps_of_epoch(pairs, cfg, epoch=0)
        assert len(windows) == steps == coin.count_steps(pairs, cfg)
        assert all(sum(map(len, window)) == 64 for window in windows) or steps == 1
