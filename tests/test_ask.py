"""Tests for ask.py: the greedy answer is model.generate's, streaming prints exactly the answer, sampling cuts
to HF's top-p nucleus, the robustness table holds perturb.py's variants answered with and without the adapter,
the loop reads piped input until its end, and every bad input is one line before any model loads.

All on the real tiny model ../shared/models/stories260K under a random non-zero LoRA adapter, fp32 on a CPU.
"""
import io
import json
import subprocess
import sys

import pytest
import torch

import ask
from conftest import ROOT
from evaluate import build_input, generate_batched
from hf_io import load_adapter, load_model, load_tokenizer, save_adapter
from model import apply_lora, generate
from perturb import LEVELS, perturb

INSTRUCTION, INPUT = "Is this review positive or negative?", "A gorgeous, witty film."
FP32 = ["--dtype", "fp32", "--device", "cpu"]


def random_adapter(base, out, seed, targets=("q_proj", "v_proj")):
    """A peft adapter on `base` with A as apply_lora draws it and a non-zero B (N(0, 0.05): it changes the
    answers and leaves them text), saved to `out`."""
    model = load_model(base)
    apply_lora(model, targets, r=4, alpha=8)
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    save_adapter(model, out)
    return out


@pytest.fixture
def ckpt(tmp_path, stories_dir):
    """A coin.py-style output dir: the adapter + config.json naming the base."""
    out = random_adapter(stories_dir, tmp_path / "out", seed=0)
    (out / "config.json").write_text(json.dumps({"base": str(stories_dir)}))
    return out


def tuned_model(stories_dir, adapter):
    model = load_model(stories_dir)
    load_adapter(model, adapter)
    return model


# -----------------------------------------------------------------------------
# One answer: greedy is model.generate's, streamed exactly

def test_greedy_answer_is_model_generate_on_the_training_format(ckpt, stories_dir, capsys):
    ask.main(["--ckpt", str(ckpt), INSTRUCTION, "--input", INPUT, "--max-new-tokens", "24", *FP32])
    printed = capsys.readouterr().out
    tokenizer = load_tokenizer(stories_dir)
    prompt = tokenizer.encode(build_input(INSTRUCTION, INPUT, "train"))  # evaluate.py --format train
    assert ask.prompt_ids(tokenizer, INSTRUCTION, INPUT) == prompt
    expected = generate(tuned_model(stories_dir, ckpt), [prompt], 24, tokenizer.eos_id, tokenizer.pad_id)[0]
    args = ask.parse_args(["x", "--max-new-tokens", "24"])
    text, ids = ask.answer(tuned_model(stories_dir, ckpt), tokenizer, prompt, args, None, io.StringIO())
    assert ids == expected  # tokens
    assert printed == tokenizer.decode(expected) + "\n" == text + "\n"


def test_no_input_is_the_instruction_alone_in_the_template(stories_dir):
    tokenizer = load_tokenizer(stories_dir)
    assert tokenizer.decode(ask.prompt_ids(tokenizer, " Name a color. ", "")) == (
        "Name a color.\n\n### Response:\n")


class Writes(list):
    """A stdout that records each write."""

    def write(self, text):
        self.append(text)

    def flush(self):
        pass


def test_streaming_prints_the_answer_whole_characters_only(stories_dir):
    tokenizer = load_tokenizer(stories_dir)  # byte fallback: a snowman is three byte tokens
    ids = tokenizer.encode("Once, café ☃ ok. The end", bos=False) + [tokenizer.eos_id]
    out = Writes()
    streamer = ask.Streamer(tokenizer, out)
    for token in ids:
        streamer.add(token)
    assert streamer.finish() == "".join(out) == tokenizer.decode(ids) == "Once, café ☃ ok. The end"
    assert len([w for w in out if w]) >= 8 and not any("\ufffd" in w for w in out)  # streamed, never broken
    assert "".join(out[:7]).endswith("café ") and "☃" in out[7]


def test_sampling_keeps_hf_top_p_nucleus_and_is_seeded():
    transformers = pytest.importorskip("transformers", reason="HF's TopPLogitsWarper is the reference")
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    for top_p in (0.1, 0.5, 0.75, 0.95):
        kept = transformers.TopPLogitsWarper(top_p)(None, logits / 0.7).isfinite()  # (4, 50)
        draws = torch.stack([ask.sampler(0.7, top_p, torch.Generator().manual_seed(s))(logits)
                             for s in range(300)])  # (300, 4)
        for row in range(4):
            assert set(draws[:, row].tolist()) == set(kept[row].nonzero()[:, 0].tolist()), (top_p, row)
    again = [ask.sampler(1.0, 0.9, torch.Generator().manual_seed(7))(logits) for _ in range(2)]
    assert torch.equal(*again)


def test_sampled_answer_is_seeded_and_streams_what_it_returns(ckpt, stories_dir):
    tokenizer, model = load_tokenizer(stories_dir), tuned_model(stories_dir, ckpt)
    prompt, args = ask.prompt_ids(tokenizer, "Tell a story.", ""), ask.parse_args(
        ["x", "--temperature", "1.0", "--top-p", "0.9", "--max-new-tokens", "30"])
    runs = []
    for _ in range(2):
        out = io.StringIO()
        text, ids = ask.answer(model, tokenizer, prompt, args, torch.Generator().manual_seed(3), out)
        assert out.getvalue() == text == tokenizer.decode(ids)
        runs.append(ids)
    assert runs[0] == runs[1]
    greedy = generate(model, [prompt], 30, tokenizer.eos_id, tokenizer.pad_id)[0]
    assert runs[0] != greedy  # temperature 1 over 512 tokens: a sampled story differs from the greedy one


# -----------------------------------------------------------------------------
# Robustness: perturb.py's variants, answered with and without the adapter

def table_rows(printed):
    """[[perturber, instruction, with, without]] of the printed table, and the count lines."""
    lines = printed.strip().split("\n")
    rows = [line[2:-2].split(" | ") for line in lines[2:] if line.startswith("| ")]
    return rows, [line for line in lines if " perturbed instructions answered as the clean one" in line]


def batched(model, tokenizer, texts, max_new_tokens=6):
    prompts = [ask.prompt_ids(tokenizer, text, INPUT) for text in texts]
    new = generate_batched(model, prompts, 32, max_new_tokens, tokenizer.eos_id, tokenizer.pad_id)
    return [ask.cell(tokenizer.decode(ids)) for ids in new]


def check_counts(rows, counts):
    for column, line in zip((2, 3), counts):
        same = sum(row[column] == rows[0][column] for row in rows[1:])
        assert line.endswith(f": {same} of {len(rows) - 1} perturbed instructions answered as the clean one")


def test_robustness_table_is_perturb_variants_with_and_without_the_adapter(ckpt, stories_dir, capsys):
    ask.main(["--ckpt", str(ckpt), INSTRUCTION, "--input", INPUT, "--robustness", "2", "--seed", "5",
              "--max-new-tokens", "6", *FP32])
    rows, counts = table_rows(capsys.readouterr().out)
    expected = [["clean", INSTRUCTION]] + [[level, perturb(INSTRUCTION, level, 5 + i)]
                                          for level in LEVELS[1:] for i in range(2)]
    assert [row[:2] for row in rows] == expected and len(rows) == 1 + 4 * 2
    texts, tokenizer = [text for _, text in expected], load_tokenizer(stories_dir)
    assert [row[2] for row in rows] == batched(tuned_model(stories_dir, ckpt), tokenizer, texts)
    base = batched(load_model(stories_dir), tokenizer, texts)
    assert [row[3] for row in rows] == base != [row[2] for row in rows]  # the adapter changes answers
    check_counts(rows, counts)


def test_robustness_baseline_adapter_beside_the_checkpoint(ckpt, stories_dir, tmp_path, capsys):
    baseline = random_adapter(stories_dir, tmp_path / "baseline", seed=1, targets=("k_proj", "o_proj"))
    ask.main(["--ckpt", str(ckpt), "--adapter", str(baseline), INSTRUCTION, "--input", INPUT,
              "--robustness", "1", "--max-new-tokens", "6", *FP32])
    printed = capsys.readouterr().out
    rows, counts = table_rows(printed)
    assert printed.startswith("| perturber | instruction | with out | with baseline |")
    texts, tokenizer = [row[1] for row in rows], load_tokenizer(stories_dir)
    assert [row[3] for row in rows] == batched(tuned_model(stories_dir, baseline), tokenizer, texts)
    assert [row[2] for row in rows] == batched(tuned_model(stories_dir, ckpt), tokenizer, texts)
    check_counts(rows, counts)


# -----------------------------------------------------------------------------
# The loop, with piped input

def test_loop_answers_piped_questions_until_end_of_input(ckpt, stories_dir):
    questions = [("Tell a story.", ""), (INSTRUCTION, INPUT)]
    piped = "".join(f"{q}\n{i}\n" for q, i in questions) + "\n"  # a last empty instruction is asked again
    done = subprocess.run([sys.executable, "ask.py", "--ckpt", str(ckpt), "--max-new-tokens", "12", *FP32],
                          input=piped, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    tokenizer, model = load_tokenizer(stories_dir), tuned_model(stories_dir, ckpt)
    answers = [tokenizer.decode(generate(model, [ask.prompt_ids(tokenizer, q, i)], 12, tokenizer.eos_id,
                                         tokenizer.pad_id)[0]) for q, i in questions]
    assert done.stdout == "".join(f"Instruction: Input: Response: {a}\n\n" for a in answers) + (
        "Instruction: (an empty instruction: type one)\nInstruction: \n")
    assert "Ctrl-D ends" in done.stderr and "Traceback" not in done.stderr


# -----------------------------------------------------------------------------
# Bad input: one line each, before any model loads

@pytest.mark.parametrize("argv, fragment", [
    ([INSTRUCTION], "give --ckpt OUT_DIR, or --base LLAMA_DIR"),
    (["--ckpt", "{tmp}/nowhere", INSTRUCTION], "nowhere: checkpoint dir not found"),
    (["--ckpt", "{ckpt}", "  "], "the instruction is empty"),
    (["--ckpt", "{ckpt}", INSTRUCTION, "--robustness", "0"], "--robustness: 0 is out of range"),
    (["--ckpt", "{ckpt}", "--robustness", "2"], "--robustness N perturbs the instruction given"),
    (["--base", "{base}", INSTRUCTION, "--robustness", "2"], "with and without an adapter"),
    (["--ckpt", "{ckpt}", "--adapter", "{tmp}/nowhere", INSTRUCTION], "adapter_config.json: not found"),
    (["--ckpt", "{ckpt}", INSTRUCTION, "--temperature", "-1"], "--temperature: -1 is out of range"),
    (["--ckpt", "{ckpt}", INSTRUCTION, "--temperature", "nan"], "--temperature: nan is not a finite number"),
    (["--ckpt", "{ckpt}", INSTRUCTION, "--top-p", "0"], "--top-p: 0 is out of range"),
    (["--ckpt", "{ckpt}", INSTRUCTION, "--top-p", "1.5"], "--top-p: 1.5 is out of range"),
    (["--ckpt", "{ckpt}", INSTRUCTION, "--device", "tpu"], "--device tpu: not a device"),
])
def test_bad_input_is_one_line_before_any_model_loads(argv, fragment, ckpt, stories_dir, tmp_path,
                                                      monkeypatch):
    def no_load(*_, **__):
        raise AssertionError("a model loaded before the input was checked")
    monkeypatch.setattr(ask, "load_model", no_load)
    argv = [a.format(tmp=tmp_path, ckpt=ckpt, base=stories_dir) for a in argv]
    with pytest.raises(SystemExit) as e:
        ask.main(argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message and fragment in message, message
