"""Every input of every command line, tried as a new user would: boundary values of each flag, odd files.

One table per CLI: (argv, expected), where expected is a fragment of the one-line error, or None when the
input is acceptable. Each case must answer within TIMEOUT seconds (a hang fails instead of blocking CI); a
refused input exits with one line (no traceback) that contains the fragment, and leaves nothing new on disk.
The one multi-line answer is a data file's bad-line report: its summary line, then "path:line: reason" each.
"""
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import coin
import evaluate
import perturb
import prepare_data
from conftest import ROOT, record, shared, write_jsonl

TIMEOUT = 60  # seconds per case; the slowest acceptable case trains one step of stories260K
DEMO = ROOT / "examples" / "flan_coin_demo.jsonl"
GLUE_DEMO = ROOT / "examples" / "glue_demo"
CLEAN = ROOT / "prompts" / "clean.json"
HUGE = str(10**30)


def files_under(folder):
    return {path for path in Path(folder).rglob("*")}


def run_cli(main, argv, folder):
    """(the error line or None, the paths the call created under folder); fails on a hang or a traceback."""
    def hang(*_):
        raise TimeoutError(f"no answer within {TIMEOUT} s")
    before, previous = files_under(folder), signal.signal(signal.SIGALRM, hang)
    signal.alarm(TIMEOUT)
    try:
        main(argv)
        error = None
    except SystemExit as e:
        error = str(e.code) if e.code not in (None, 0) else None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return error, files_under(folder) - before


def check(main, argv, expected, folder):
    error, created = run_cli(main, [str(a) for a in argv], folder)
    if expected is None:
        assert error is None, (argv, error)
        return
    assert error is not None, (argv, "accepted, but should be refused with", expected)
    first, *report = error.split("\n")  # a data file's bad lines: a summary, then "path:line: reason" each
    assert first.startswith("error: ") and expected in error, (argv, error)
    assert all(line.startswith(first[7:].split(":")[0] + ":") for line in report), (argv, error)
    assert not created, (argv, "wrote", sorted(map(str, created)))


def odd_files(folder, good_text):
    """{name: path} of the file cases every reader must handle; good_text is a valid file's content."""
    folder.mkdir(exist_ok=True)
    files = {"missing": folder / "missing.txt", "directory": folder / "a_folder"}
    files["directory"].mkdir(exist_ok=True)
    for name, data in (("empty", b""), ("bom_crlf", ("\ufeff" + good_text).replace("\n", "\r\n").encode()),
                       ("latin1", good_text.encode() + "\ncaf\u00e9\n".encode("latin-1"))):
        files[name] = folder / name
        files[name].write_bytes(data)
    return files


def numeric_cases(flags, base_argv):
    """(argv, fragment) for 0, -1, a huge number, a word and (floats) nan/inf of each {flag: (kind, ok)},
    where ok lists which of 0, -1 and huge the flag accepts."""
    cases = []
    for flag, (kind, accepted) in flags.items():
        for value in ("0", "-1", HUGE):
            if value not in accepted:
                cases.append(([*base_argv, flag, value], f"argument {flag}: {value} is out of range"))
        word = "an integer" if kind is int else "a number"
        cases.append(([*base_argv, flag, "many"], f"argument {flag}: 'many' is not {word}"))
        if kind is float:
            cases += [([*base_argv, flag, v], f"argument {flag}: {v} is not a finite number")
                      for v in ("nan", "inf")]
    return cases


# -----------------------------------------------------------------------------
# coin.py

COIN_NUMBERS = {  # flag: (type, which of "0", "-1", HUGE it accepts)
    "--epochs": (int, ()), "--max-steps": (int, (HUGE,)), "--batch-size": (int, (HUGE,)),
    "--micro-batch-size": (int, (HUGE,)), "--lr": (float, (HUGE,)), "--warmup-ratio": (float, ("0",)),
    "--cutoff": (int, (HUGE,)), "--holdout": (int, ("0", HUGE)), "--lora-r": (int, ()),
    "--lora-alpha": (int, (HUGE,)), "--lora-dropout": (float, ("0",)), "--temperature": (float, (HUGE,)),
    "--lam": (float, (HUGE,)), "--save-every": (int, (HUGE,)), "--save-every-minutes": (float, (HUGE,)),
    "--seed": (int, ("0",)),
}


def coin_cases(tmp_path, stories):
    out = tmp_path / "out"
    ok = ["--data", DEMO, "--base", stories, "--out", out, "--dtype", "fp32", "--device", "cpu",
          "--batch-size", "4", "--micro-batch-size", "4", "--cutoff", "128", "--max-steps", "1"]
    files = odd_files(tmp_path / "files", "".join(json.dumps(record(f"e{i}", f"g{i // 2}")) + "\n"
                                                  for i in range(8)))
    truncated = tmp_path / "files" / "truncated.jsonl"
    truncated.write_text(files["bom_crlf"].read_text(encoding="utf-8-sig")[:-40])
    (tmp_path / "a_file").write_text("not a folder")
    data = ok.index("--data") + 1
    with_data = lambda path: ok[:data] + [path] + ok[data + 1:]  # noqa: E731
    return numeric_cases(COIN_NUMBERS, ok) + [
        (ok + ["--micro-batch-size", "3"], "--batch-size 4 is not a multiple of --micro-batch-size 3"),
        (ok + ["--micro-batch-size", HUGE], "is not a multiple of --micro-batch-size"),
        (ok + ["--negatives", "all"], "argument --negatives: invalid choice: 'all'"),
        (ok + ["--pooling", "average_all"], "argument --pooling: invalid choice: 'average_all'"),
        (ok + ["--truncation", "left"], "argument --truncation: invalid choice: 'left'"),
        (ok + ["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
        (ok + ["--dtype", "fp16"], "--dtype fp16 needs a CUDA GPU"),
        (ok + ["--device", "tpu"], "--device tpu: not a device"),
        (ok + ["--device", "cuda:7"], "--device cuda:7: "),
        (ok + ["--lora-targets", "qkv_proj"], "argument --lora-targets: qkv_proj is out of range"),
        (ok + ["--lora-targets", ""], "argument --lora-targets:  is out of range"),
        (ok + ["--holdout", "264"], "--holdout 264: "),
        (ok + ["--cutoff", "8"], "no group left to train on; raise --cutoff"),
        (ok + ["--tiny"], "give either --base LLAMA_DIR"),
        (with_data(DEMO)[:2] + ["--tiny"] + ok[4:] + ["--cutoff", "2"], "no group left to train on"),
        (ok[2:], "--data is required"),
        (ok + ["--unknown"], "unrecognized arguments: --unknown"),
        (with_data(files["missing"]), "missing.txt: no such file"),
        (with_data(files["directory"]), "a_folder: a directory, not a file"),
        (with_data(files["empty"]), "empty: no usable examples"),
        (with_data(files["latin1"]), "latin1:10: byte 0xe9 is not UTF-8 text; save the file as UTF-8"),
        (with_data(truncated), "truncated.jsonl:8: not JSON"),
        (with_data(truncated) + ["--skip-bad"], None),
        (with_data(files["bom_crlf"]), None),
        (ok[:3] + [tmp_path / "nowhere"] + ok[4:], "nowhere: not found; point at a HF LLaMA directory"),
        (ok[:3] + [tmp_path / "a_file"] + ok[4:], "a_file: a file; give the HF LLaMA directory"),
        (ok + ["--adapter", tmp_path / "nowhere"], "adapter_config.json: not found"),
        (ok[:5] + [tmp_path / "a_file"] + ok[6:], "--out "),
        (ok, None),
    ]


def test_coin_refuses_every_bad_input_in_one_line_before_writing(tmp_path, stories_dir):
    scratch = set(Path(tempfile.gettempdir()).glob("coin-tiny-base-*"))
    for argv, expected in coin_cases(tmp_path, stories_dir):
        check(coin.main, argv, expected, tmp_path)
        shutil.rmtree(tmp_path / "out", ignore_errors=True)  # after a run that worked, start the next afresh
    assert set(Path(tempfile.gettempdir()).glob("coin-tiny-base-*")) == scratch  # --tiny's scratch base too


# -----------------------------------------------------------------------------
# evaluate.py

EVAL_NUMBERS = {"--samples": (int, (HUGE,)), "--batch-size": (int, (HUGE,)), "--max-new-tokens": (int, ()),
                "--seed": (int, ("0",))}


def evaluate_cases(tmp_path, stories):
    out = tmp_path / "results"
    clean = {"clean": {"sst2": json.loads(CLEAN.read_text())["sst2"][:1]}}
    ok = ["--base", stories, "--glue-dir", GLUE_DEMO, "--tasks", "sst2", "--samples", "2", "--out", out,
          "--max-new-tokens", "2", "--device", "cpu", "--dtype", "fp32"]
    files = odd_files(tmp_path / "files", json.dumps(clean, indent=1) + "\n")
    bad_json = tmp_path / "files" / "bad.json"
    bad_json.write_text('{"clean": {"sst2": ["Positive or negative?"]}\n')
    (tmp_path / "a_file").write_text("not a folder")
    prompts = lambda path: ok + ["--prompts", path]  # noqa: E731
    return numeric_cases(EVAL_NUMBERS, prompts(files["bom_crlf"])) + [
        (ok + ["--mode", "vote"], "argument --mode: invalid choice: 'vote'"),
        (ok + ["--protocol", "mine"], "argument --protocol: invalid choice: 'mine'"),
        (ok + ["--format", "chat"], "argument --format: invalid choice: 'chat'"),
        (ok + ["--tasks", "sst3"], "unknown task 'sst3'"),
        (ok + ["--groups", "typos"], "typos"),
        (ok + ["--hidden-report", "sst3"], "sst3"),
        (ok + ["--device", "tpu"], "--device tpu: not a device"),
        (ok + ["--attack", "hotflip"], "argument --attack: hotflip is out of range"),
        (prompts(files["bom_crlf"]) + ["--attack", "checklist", "--samples", "20"],
         "no example is left for the attack set: lower --samples"),
        (prompts(files["missing"]), "missing.txt: no such file"),
        (prompts(files["directory"]), "a_folder: a directory, not a file"),
        (prompts(files["empty"]), "empty:1: not JSON"),
        (prompts(files["latin1"]), "byte 0xe9 is not UTF-8 text"),
        (prompts(bad_json), "bad.json:2: not JSON"),
        (prompts(files["bom_crlf"]) + ["--glue-dir", tmp_path / "nowhere"], "nowhere: no sst2.jsonl"),
        (prompts(files["bom_crlf"]) + ["--glue-dir", tmp_path / "a_file"], "a_file: no sst2.jsonl"),
        (prompts(files["bom_crlf"]) + ["--out", tmp_path / "a_file"], "a_file: a file, not a directory"),
        (prompts(files["bom_crlf"]) + ["--ckpt", tmp_path / "a_file"], "a_file: checkpoint dir not found"),
        (prompts(files["bom_crlf"]), None),
    ]


def test_evaluate_refuses_every_bad_input_in_one_line_before_writing(tmp_path, stories_dir):
    for argv, expected in evaluate_cases(tmp_path, stories_dir):
        check(evaluate.main, argv, expected, tmp_path)
    assert (tmp_path / "results" / "results.json").is_file()  # the acceptable case ran


# -----------------------------------------------------------------------------
# perturb.py and prepare_data.py

PERTURB_NUMBERS = {"--n": (int, ()), "--deepwordbug-rate": (float, ()), "--textfooler-rate": (float, ()),
                   "--seed": (int, ("0",))}


def perturb_cases(tmp_path):
    out = tmp_path / "out" / "prompts.json"
    files = odd_files(tmp_path / "files", CLEAN.read_text())
    ok = ["--prompts", files["bom_crlf"], "--out", out]
    with_prompts = lambda path: ["--prompts", path, "--out", out]  # noqa: E731
    return numeric_cases(PERTURB_NUMBERS, ok) + [
        (ok + ["--deepwordbug-rate", "1.5"], "argument --deepwordbug-rate: 1.5 is out of range"),
        (["--out", out], "one of the arguments --prompts --from-promptbench is required"),
        (ok + ["--from-promptbench", files["missing"]], "not allowed with argument --prompts"),
        (["--from-promptbench", files["missing"], "--out", out], "missing.txt: no such file"),
        (["--from-promptbench", files["bom_crlf"], "--out", out, "--n", "3"], "--from-promptbench copies"),
        (with_prompts(files["missing"]), "missing.txt: no such file"),
        (with_prompts(files["directory"]), "a_folder: a directory, not a file"),
        (with_prompts(files["empty"]), "empty:1: not JSON"),
        (with_prompts(files["latin1"]), "byte 0xe9 is not UTF-8 text"),
        (["--prompts", files["bom_crlf"], "--out", files["directory"]], "a_folder: a directory; give"),
        (ok, None),
    ]


def test_perturb_refuses_every_bad_input_in_one_line_before_writing(tmp_path):
    for argv, expected in perturb_cases(tmp_path):
        check(perturb.main, argv, expected, tmp_path)
    assert json.loads((tmp_path / "out" / "prompts.json").read_text())["clean"]


def prepare_cases(tmp_path):
    out = tmp_path / "out" / "flan_coin.jsonl"
    templates = shared("flan", "templates.json")
    source = tmp_path / "source"
    source.mkdir()
    write_jsonl(source / "sst2.jsonl", [{"idx": i, "sentence": f"film {i}", "label": i % 2}
                                        for i in range(6)])
    lines = "".join(json.dumps(record(f"e{i}", f"g{i // 2}")) + "\n" for i in range(8))
    files = odd_files(tmp_path / "files", lines)
    truncated = tmp_path / "files" / "truncated.jsonl"
    truncated.write_text(lines[:-40])
    csv = odd_files(tmp_path / "csv", "original_instruction,paraphrased_instruction,targets,task_name\n"
                                      "a,b,yes,rte\nc,d,no,rte\n")
    build = ["build", "--templates", templates, "--source", source, "--out", out]
    return [
        (build + ["--per-task", "0"], "argument --per-task: 0 is out of range"),
        (build + ["--per-task", "-1"], "argument --per-task: -1 is out of range"),
        (build + ["--per-task", "x"], "argument --per-task: 'x' is not an integer"),
        (build + ["--seed", "-1"], "argument --seed: -1 is out of range"),
        (build[:2] + [files["missing"]] + build[3:], "missing.txt: no such file"),
        (build[:2] + [files["directory"]] + build[3:], "a_folder: a directory, not a file"),
        (build[:2] + [files["latin1"]] + build[3:], "byte 0xe9 is not UTF-8 text"),
        (build[:4] + [files["empty"]] + build[5:], "empty: no <dataset>.jsonl source files"),
        (build[:4] + [files["directory"]] + build[5:], "a_folder: no <dataset>.jsonl source files"),
        (build[:6] + [files["directory"]], "a_folder: a directory; give the path"),
        (["check", files["missing"]], "missing.txt: no such file"),
        (["check", files["directory"]], "a_folder: a directory, not a file"),
        (["check", files["empty"]], "empty: no usable examples"),
        (["check", files["latin1"]], "latin1:10: byte 0xe9 is not UTF-8 text"),
        (["check", truncated], "truncated.jsonl:8: not JSON"),
        (["check", truncated, "--skip-bad"], None),
        (["check", files["bom_crlf"]], None),
        (["convert", "--csv", csv["missing"], "--out", out], "missing.txt: no such file"),
        (["convert", "--csv", csv["latin1"], "--out", out], "byte 0xe9 is not UTF-8 text"),
        (["convert", "--csv", csv["empty"], "--out", out], "empty: no column 'original_instruction'"),
        (["convert", "--csv", csv["bom_crlf"], "--out", out], None),
        (["reshape"], "argument command: invalid choice: 'reshape'"),
        (build, None),
    ]


def test_prepare_data_refuses_every_bad_input_in_one_line_before_writing(tmp_path):
    for argv, expected in prepare_cases(tmp_path):
        check(prepare_data.main, argv, expected, tmp_path)


# -----------------------------------------------------------------------------
# The real thing: a process, its exit code and its stderr


@pytest.mark.parametrize("script, argv", [
    ("coin.py", ["--data", "examples/flan_coin_demo.jsonl", "--tiny", "--batch-size", "0"]),
    ("evaluate.py", ["--ckpt", "nowhere"]),
    ("perturb.py", ["--prompts", "prompts/clean.json", "--out", "x.json", "--n", "-1"]),
    ("prepare_data.py", ["check", "nowhere.jsonl"]),
])
def test_a_refused_input_is_one_line_on_stderr_and_a_failing_exit_code(script, argv):
    done = subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 1 and done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
