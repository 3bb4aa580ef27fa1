"""The paper's run at full size, rehearsed: LLaMA-7B + an alpaca-lora adapter, end to end, random weights.

A benchmark, not a test: it needs 20 GB of disk and 20 GiB of memory, and an hour on a 2-core CPU.

It writes once, into --work (reused by later runs), what a user downloads: a random LLaMA-7B in
huggyllama/llama-7b's layout (its config.json, fp16 safetensors in two shards of 10 GB and 3.5 GB with
model.safetensors.index.json, and the real LLaMA tokenizer from ../shared), beside it a random adapter shaped
like tloen/alpaca-lora-7b (the legacy fp16 adapter_model.bin, peft's legacy config keys), and a slice of
flan_coin.jsonl that `prepare_data.py build` makes from ../shared's GLUE and FLAN files. Then it runs the
README's full-scale commands on them, each as its own process, changed only by flags that shorten them:

    memory.py                      the predicted memory of the run
    coin.py --adapter ...          SIGTERM during step 2 (exit 75, saved), then --resume to the end
    evaluate.py --ckpt out/        generate mode, the official protocol, a few samples of one task
    evaluate.py --base --adapter   the Alpaca baseline, the same samples

and prints one table per command: wall time, time to load, peak host memory (the process's own anonymous
memory, and its resident file pages: the memory-mapped shards, which the kernel can drop and read again)
against the bf16 weights and memory.py's prediction, seconds from SIGTERM to exit, each training step's
real tokens/s and model FLOPs utilisation (4N FLOPs per real token, N the decoder layers' weights, against
the bf16 matmul peak measured in the same run), and evaluation examples/s. On a GPU (benchmarks/gpu.sh) the
GPU's peak memory (nvidia-smi, per process) stands in for the host's.

    python benchmarks/rehearse_7b.py                      # LLaMA-7B (--work runs/rehearsal-7b)
    python benchmarks/rehearse_7b.py --shape tiny         # the same path in a minute (test_benchmarks.py)
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
from memory import count_parameters, estimate_training_memory  # noqa: E402
from model_config import read_model_args  # noqa: E402

SHARED = ROOT.parent / "shared"
GIB = 2**30
# huggyllama/llama-7b's config.json, as downloaded (LLaMA-7B in HF layout: alpaca-lora's and CoIN's base)
LLAMA_7B = dict(architectures=["LlamaForCausalLM"], bos_token_id=1, eos_token_id=2, hidden_act="silu",
                hidden_size=4096, initializer_range=0.02, intermediate_size=11008,
                max_position_embeddings=2048, max_sequence_length=2048, model_type="llama",
                num_attention_heads=32, num_hidden_layers=32,
                pad_token_id=0, rms_norm_eps=1e-06, tie_word_embeddings=False, torch_dtype="float16",
                transformers_version="4.28.0.dev0", use_cache=True, vocab_size=32000)
SHAPES = {"7b": LLAMA_7B,  # the tiny shape keeps the real tokenizer's 32,000 pieces
          "tiny": dict(LLAMA_7B, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                       num_attention_heads=4)}
FIRST_SHARD = 10 / 13.5  # huggyllama's shards: 10 GB and 3.5 GB
# tloen/alpaca-lora-7b's adapter_config.json: peft 0.2's keys (enable_lora, merge_weights)
ALPACA_LORA = dict(base_model_name_or_path="decapoda-research/llama-7b-hf", bias="none", enable_lora=None,
                   fan_in_fan_out=False, inference_mode=True, lora_alpha=16, lora_dropout=0.05,
                   merge_weights=False, modules_to_save=None, peft_type="LORA", r=16,
                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
TOKENIZER_CONFIG = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=2048,
                        tokenizer_class="LlamaTokenizer")  # huggyllama's, trimmed to what readers use

# -----------------------------------------------------------------------------
# 1. The files a user downloads, written once with random weights


def hf_keys(config):
    """[(key, shape)] of a LLaMA checkpoint in LlamaForCausalLM's state_dict order."""
    D, I, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    keys = [("model.embed_tokens.weight", (V, D))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        keys += [(p + f"self_attn.{n}_proj.weight", (D, D)) for n in "qkvo"]
        keys += [(p + "mlp.gate_proj.weight", (I, D)), (p + "mlp.up_proj.weight", (I, D)),
                 (p + "mlp.down_proj.weight", (D, I))]
        keys += [(p + "input_layernorm.weight", (D,)), (p + "post_attention_layernorm.weight", (D,))]
    return keys + [("model.norm.weight", (D,)), ("lm_head.weight", (V, D))]


def write_safetensors(path, keys, make):
    """Stream fp16 tensors make(key, shape) into a safetensors file, one at a time: the header (a JSON of
    dtypes, shapes and byte offsets, padded to 8 bytes) first, then each tensor's bytes. A 10 GB shard never
    sits in memory whole, as safetensors.save_file would need."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in keys:
        size = 2 * torch.Size(shape).numel()
        header[key] = dict(dtype="F16", shape=list(shape), data_offsets=[offset, offset + size])
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for key, shape in keys:
            f.write(make(key, shape).to(torch.float16).numpy().tobytes())
    tmp.rename(path)  # a killed writer leaves no shard that looks complete
    return offset


def random_weight(key, shape):
    """HF's initialisation: normal(0, 0.02) matrices, RMSNorm weights 1."""
    return torch.ones(shape) if len(shape) == 1 else torch.randn(shape) * 0.02


def write_base(folder, config):
    """A random LLaMA in HF layout: config.json, two fp16 shards + index, tokenizer files."""
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    keys, total = hf_keys(config), 0
    sizes = [2 * torch.Size(shape).numel() for _, shape in keys]
    split = next(i for i in range(len(keys)) if sum(sizes[:i + 1]) > FIRST_SHARD * sum(sizes))
    shards = {"model-00001-of-00002.safetensors": keys[:split],
              "model-00002-of-00002.safetensors": keys[split:]}
    torch.manual_seed(0)
    for name, part in shards.items():
        print(f"writing {folder / name} ({sum(2 * torch.Size(s).numel() for _, s in part) / 1e9:.1f} GB)")
        total += write_safetensors(folder / name, part, random_weight)
    shutil.copy(SHARED / "tokenizers" / "llama" / "tokenizer.model", folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    index = dict(metadata=dict(total_size=total),
                 weight_map={key: name for name, part in shards.items() for key, _ in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))  # last: "complete"
    return folder


def write_adapter(folder, config):
    """A random adapter shaped like tloen/alpaca-lora-7b: adapter_model.bin (fp16, peft's prefixed keys, a
    weights-only pickle of tensors, as torch.save writes it) and its legacy adapter_config.json."""
    if (folder / "adapter_config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    D, r, generator = config["hidden_size"], ALPACA_LORA["r"], torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(config["num_hidden_layers"]):
        for n in "qkvo":
            key = f"base_model.model.model.layers.{i}.self_attn.{n}_proj"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(r, D, generator=generator) / D**0.5).half()
            tensors[f"{key}.lora_B.weight"] = (torch.randn(D, r, generator=generator) * 0.01).half()
    torch.save(tensors, folder / "adapter_model.bin")
    (folder / "adapter_config.json").write_text(json.dumps(ALPACA_LORA, indent=2))
    return folder


def write_data(path, per_task):
    """flan_coin.jsonl from ../shared's GLUE training rows and FLAN templates (prepare_data.py build), each
    source file under the name of its FLAN dataset."""
    if not path.is_file():
        source = path.parent / "glue_source"
        source.mkdir(exist_ok=True)
        for task, flan in dict(cola="cola", sst2="sst2", mrpc="glue_mrpc", rte="rte", wnli="wnli").items():
            (source / f"{flan}.jsonl").unlink(missing_ok=True)
            (source / f"{flan}.jsonl").symlink_to(SHARED / "glue" / "train" / f"{task}.jsonl")
        subprocess.run([sys.executable, "prepare_data.py", "build", "--templates",
                        str(SHARED / "flan" / "templates.json"), "--source", str(source), "--out", str(path),
                        "--per-task", str(per_task)], cwd=ROOT, check=True)
    return path


# -----------------------------------------------------------------------------
# 2. Running a command as a user would, and watching its memory


def memory_of(pid, gpu):
    """{anon, file, rss} bytes now resident for process `pid` (/proc/PID/status), or {gpu} on a GPU."""
    if gpu:
        query = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,"
                                "nounits"], capture_output=True, text=True).stdout
        used = [int(m) for p, m in (line.split(",") for line in query.splitlines()) if int(p) == pid]
        return dict(gpu=sum(used) * 2**20)
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {name: int(fields[key].split()[0]) * 1024 for name, key in  # the kernel counts kB
            (("anon", "RssAnon"), ("file", "RssFile"), ("rss", "VmRSS"))}


def run(command, log, gpu=False, on_start=None):
    """Run `python command...` from the repository root (on_start(process) once it started); returns wall
    seconds, exit status, the output lines with their times, and the peak of each memory_of() field, sampled
    every 0.1 s."""
    started, peaks, done = time.perf_counter(), {}, threading.Event()
    process = subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def sample():
        while not done.is_set():
            try:
                for name, value in memory_of(process.pid, gpu).items():
                    peaks[name] = max(peaks.get(name, 0), value)
            except (OSError, ValueError, KeyError):  # the process is exiting
                pass
            done.wait(0.1)

    threading.Thread(target=sample, daemon=True).start()
    if on_start:
        on_start(process)
    log.write(f"$ python {' '.join(command)}\n")
    lines = []
    for line in output_lines(process.stdout):
        lines.append((time.perf_counter() - started, line))
        log.write(line + "\n")
        log.flush()
    status = process.wait()
    done.set()
    return dict(started=started, seconds=time.perf_counter() - started, status=status, lines=lines,
                peaks=peaks)


def output_lines(stream):
    """A child's output lines as they come. tqdm ends each update with \r, and a text stream would hold such
    a line back until the next character shows whether a \n follows: a whole training step later."""
    pending = b""
    while chunk := os.read(stream.fileno(), 1 << 16):
        *lines, pending = re.split(rb"[\r\n]", pending + chunk)
        yield from (line.decode(errors="replace") for line in lines if line)
    if pending:
        yield pending.decode(errors="replace")


def seconds_to(result, pattern):
    """When the first output line matching `pattern` appeared (seconds after the start), or None."""
    return next((t for t, line in result["lines"] if re.search(pattern, line)), None)


def matmul_peak(device):
    """bf16 FLOP/s of the matmuls a LLaMA-7B step is made of ((2048 x 4096) @ (4096 x 11008) and square),
    the best of a few repeats: what this machine does at best, measured beside the run it judges."""
    best = 0.0
    for m, k, n in ((2048, 4096, 11008), (2048, 4096, 4096), (4096, 4096, 4096)):
        a = torch.randn(m, k, dtype=torch.bfloat16, device=device)
        b = torch.randn(k, n, dtype=torch.bfloat16, device=device)
        for _ in range(3):
            if device != "cpu":
                torch.cuda.synchronize()
            started = time.perf_counter()
            a @ b
            if device != "cpu":
                torch.cuda.synchronize()
            best = max(best, 2 * m * k * n / (time.perf_counter() - started))
    return best


# -----------------------------------------------------------------------------
# 3. The rehearsal: the README's commands, one process each


def sigterm_during_step_2(out, times):
    """A thread that SIGTERMs a coin.py process as soon as its out/metrics.jsonl holds step 1 (written when
    the step ends; 0.2 s later the process is inside step 2): the worst case, a whole step to finish before
    the save. times: [when it was sent]. The progress bar cannot tell: tqdm may print a step's end late."""
    def watch(process):
        metrics = out / "metrics.jsonl"
        while process.poll() is None and not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
            time.sleep(0.05)
        time.sleep(0.2)
        if process.poll() is None:
            times.append(time.perf_counter())
            process.send_signal(signal.SIGTERM)
    return lambda process: threading.Thread(target=watch, args=(process,), daemon=True).start()


def met(ok):
    return "met" if ok else "NOT met"


def train_rows(result, resumed, signalled, steps, args, peak_flops):
    """Table rows of the interrupted coin.py run and its --resume; signalled: perf_counter at the SIGTERM."""
    to_exit = result["started"] + result["seconds"] - signalled if signalled else float("nan")
    saved = seconds_to(result, "saved step 2") is not None and result["status"] == 75
    decoder = count_parameters(args) - 2 * args.vocab_size * args.dim  # N: the decoder layers' weights
    loaded = seconds_to(result, "^loaded ") or 0
    rows = [("coin.py", "time to load the base (and the adapter)", f"{loaded:.0f} s", ""),
            ("coin.py", "SIGTERM during step 2 -> exit", f"{to_exit:.0f} s, status {result['status']}",
             f"status 75 and 'saved step 2': {met(saved)}")]
    for record in steps:
        mfu = 4 * decoder * record["real_tokens_per_s"] / peak_flops
        rows.append(("coin.py", f"step {record['step']}: {record['real_tokens']:,.0f} real tokens "
                     f"({record['padded_tokens']:,.0f} pads)",
                     f"{record['real_tokens_per_s']} tokens/s, MFU {100 * mfu:.0f}%",
                     f">= 50%: {met(mfu >= 0.5)}"))
    rows.append(("coin.py --resume", "exit status, wall", f"{resumed['status']}, {resumed['seconds']:.0f} s",
                 f"0: {met(resumed['status'] == 0)}"))
    return rows


def step_activations(args, steps):
    """memory.py's predicted activations, logits and LoRA state (GiB) of the run's largest step: its
    computed positions (real tokens and pads) as one long row, and its supervised tokens."""
    largest = max(steps, key=lambda record: record["real_tokens"] + record["padded_tokens"])
    tokens = largest["real_tokens"] + largest["padded_tokens"]
    parts = estimate_training_memory(args, 1, tokens, supervised_per_row=largest["supervised_tokens"])
    return (parts["activations"] + parts["logits"] + parts["lora_params_grads_adamw"]) / GIB


def memory_rows(name, results, goal, predicted, gpu):
    """Peak memory rows of a command (the peak over its processes `results`) against its goal and, for
    coin.py, memory.py's prediction (GiB)."""
    peaks = {key: max(r["peaks"].get(key, 0) for r in results) / GIB
             for key in ("anon", "file", "rss", "gpu")}
    own = peaks["gpu"] if gpu else peaks["anon"]
    rows = [(name, "peak GPU memory (nvidia-smi)" if gpu else "peak anonymous memory (its own)",
             f"{own:.2f} GiB", f"<= {goal:.2f} GiB: {met(own <= goal)}")]
    if predicted:
        error = own / predicted - 1
        rows.append((name, "memory.py's prediction; the measured peak against it",
                     f"{predicted:.2f} GiB; {100 * error:+.0f}%", f"within 10%: {met(abs(error) <= 0.1)}"))
    if not gpu:
        rows += [(name, "peak resident file pages (the shards: the kernel may drop them)",
                  f"{peaks['file']:.2f} GiB", "reported, not counted"),
                 (name, "peak RSS (both, sampled)", f"{peaks['rss']:.2f} GiB", "")]
    return rows


def evaluate_rows(name, result, results_dir):
    examples = len((results_dir / "predictions.jsonl").read_text().splitlines())
    loaded = seconds_to(result, "^loaded ") or 0
    per_s = examples / (result["seconds"] - loaded)
    return [(name, "time to load, wall", f"{loaded:.0f} s, {result['seconds']:.0f} s", ""),
            (name, "answers generated, examples/s after loading", f"{examples}, {per_s:.2f}", "")]


def rehearse(opts, work, log):
    """Run every command; returns the table's rows."""
    gpu = opts.device.startswith("cuda")
    base = write_base(work / "llama-7b-hf", SHAPES[opts.shape])
    adapter = write_adapter(work / "alpaca-lora-7b", SHAPES[opts.shape])
    data = write_data(work / "flan_coin.jsonl", opts.per_task)
    args, peak_flops = read_model_args(base), matmul_peak(opts.device)
    weights = count_parameters(args) * 2 / GIB  # bf16
    rows = [("this machine", "bf16 matmul peak (measured)", f"{peak_flops / 1e12:.2f} TFLOP/s", ""),
            ("the base", "bf16 weights", f"{weights:.2f} GiB", "")]
    rows_per_step = 2 * opts.batch_size
    memory = run(["memory.py", "--config", str(base), "--rows", str(rows_per_step), "--supervised", "8"], log)
    worst = re.search(r"predicted_peak\s+([\d.]+) GiB", "\n".join(line for _, line in memory["lines"]))
    rows.append(("memory.py", f"predicted peak at {rows_per_step} rows x 256 tokens", f"{worst[1]} GiB", ""))
    out, times = work / "out", []
    train = ["coin.py", "--data", str(data), "--base", str(base), "--adapter", str(adapter),
             "--out", str(out), "--batch-size", str(opts.batch_size),
             "--micro-batch-size", str(opts.batch_size),
             "--max-steps", str(opts.steps), "--device", opts.device]
    out.joinpath("metrics.jsonl").unlink(missing_ok=True)  # the watch reads this run's
    result = run(train + ["--overwrite"], log, gpu, sigterm_during_step_2(out, times))
    resumed = run(train + ["--resume"], log, gpu)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows += train_rows(result, resumed, times[0] if times else None, steps, args, peak_flops)
    activations = step_activations(args, steps)
    goal = 1.1 * weights + activations + 1.5
    rows += memory_rows("coin.py", [result, resumed], goal, weights + activations, gpu)
    evaluated = ["--glue-dir", "examples/glue_demo", "--tasks", "sst2", "--groups", "clean", "--samples",
                 str(opts.samples), "--device", opts.device]
    for name, command, results in (
            ("evaluate.py --ckpt", ["--ckpt", str(out)], out / "results"),
            ("evaluate.py --base --adapter", ["--base", str(base), "--adapter", str(adapter), "--out",
                                              str(work / "alpaca")], work / "alpaca")):
        result = run(["evaluate.py", *command, *evaluated], log, gpu)
        rows += evaluate_rows(name, result, results)
        rows += memory_rows(name, [result], 1.1 * weights + 1.5, None, gpu)
    return rows


def enough_room(work, shape):
    """None, or why this machine cannot rehearse `shape`: it needs ../shared (the real tokenizer, GLUE rows
    and FLAN templates), and for 7b 20 GB of disk (unless the base is written) and 20 GiB of memory."""
    if not (SHARED / "tokenizers" / "llama" / "tokenizer.model").is_file():
        return f"{SHARED} is absent: the real LLaMA tokenizer, GLUE rows and FLAN templates come from there"
    if shape != "7b":
        return None
    written = (work / "llama-7b-hf" / "model.safetensors.index.json").is_file()
    free = shutil.disk_usage(work).free / 1e9
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    if not written and free < 20:
        return f"{free:.0f} GB free under {work}, and the base needs 13.5 GB plus room for checkpoints"
    if memory < 20:
        return f"{memory:.0f} GiB of memory, and LLaMA-7B's bf16 weights alone are 12.6 GiB"
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="7b")
    parser.add_argument("--work", help="the files and runs, reused (default: runs/rehearsal-SHAPE)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps of coin.py")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step (one micro-batch)")
    parser.add_argument("--per-task", type=int, default=8, help="groups per GLUE task in flan_coin.jsonl")
    parser.add_argument("--samples", type=int, default=8, help="sst2 examples per prompt evaluated")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="also write the table to OUT/rehearsal_table.md (gpu.sh's $OUT)")
    opts = parser.parse_args()
    work = Path(opts.work or ROOT / "runs" / f"rehearsal-{opts.shape}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    why_not = enough_room(work, opts.shape)
    if why_not:
        print(f"rehearse_7b.py: a benchmark, not a test; skipped: {why_not}")
        return
    with open(work / "rehearsal.log", "w") as log:
        rows = rehearse(opts, work, log)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?") if Path("/proc/cpuinfo").exists() else "?"
    where = (torch.cuda.get_device_name() if opts.device.startswith("cuda")
             else f"{cpu}, {os.cpu_count()} cores")
    table = "\n".join([f"Rehearsal at shape {opts.shape} on {where}, torch {torch.__version__}", "",
                       "| command | what | measured | goal |", "|---|---|---|---|"]
                      + [f"| {' | '.join(row)} |" for row in rows])
    print(table)
    (work / "rehearsal_table.md").write_text(table + "\n")
    if opts.out:
        Path(opts.out).mkdir(parents=True, exist_ok=True)
        (Path(opts.out) / "rehearsal_table.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
