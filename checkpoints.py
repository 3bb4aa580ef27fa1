"""checkpoints.py: what coin.py keeps in its output directory so that no run is lost, and how runs stop.

A support module, read after coin.py's training loop. --out holds:

    checkpoint-<step>/    the adapter (peft format), config.json and trainer_state.pt (optimizer, fp16 loss
                          scale, RNG, step); written to a temporary folder, flushed to the disk, read back and
                          then renamed into place, so a crash or a full disk leaves the older ones intact.
                          The two newest are kept: if the newest is damaged, --resume takes the one before
    metrics.jsonl         one line per optimizer step; on resume, lines after the checkpoint are dropped, and
                          so is a half-written last line (a kill or a full disk while it was appended)
    config.json           the run's settings (coin.py writes it); --resume reads them back. Its paths (PATHS)
                          inside --out are relative (run_folder.py), so the folder may move
    adapter_*             the finished run's adapter, for evaluate.py and peft, written after the last
                          checkpoint; adapter_config.json last, so that a kill leaves no pair that loads
    .lock                 while a process works in it (run_folder.claim): a second one is refused

A checkpoint is written every --save-every steps, --save-every-minutes after the last one, after the last
step, and when a signal asks the run to stop: SIGINT (Ctrl-C), SIGTERM (what SLURM, Kubernetes and spot
instances send before they kill) or SIGUSR1 (what SLURM's --signal sends ahead of time). The run finishes its
step, saves, and exits with status STOPPED (75), so a job script can tell "saved, run me again" from a
failure; evaluate.py stops the same way after its current cell. `--resume` restores the weights, the
optimizer, the loss scale and the RNG and skips the steps done: the resumed run equals an uninterrupted one
bit for bit. A write that finds no room exits with 74 instead (run_folder.IOERR), its temporaries removed;
a kill leaves some, which the next run removes (LEFTOVERS).
"""
import io
import json
import math
import pickle
import shutil
import signal
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

from distributed import all_sum, finish
from files import fsync, naming, write_atomically
from hf_io import read_adapter_tensors, save_adapter
from model import lora_state_dict
from run_folder import stored

KEEP = 2  # checkpoints kept: a damaged newest one costs the steps since the one before, not the run
STOPPED = 75  # the exit status of a run saved and stopped by a signal: sysexits.h's EX_TEMPFAIL, "try again"
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
ECHO_SECONDS = 1.0  # a signal repeated sooner is one signal delivered twice (StopOnSignal says why)
PATHS = ("data", "base", "adapter", "out")  # coin.py's settings that name files: stored as run_folder.py says
# What a write that a kill cut short leaves: save_checkpoint's folder, files.write_atomically's temporaries.
LEFTOVERS = (".checkpoint-*.tmp", "adapter_*.tmp", "config.json.*.tmp", "metrics.jsonl.*.tmp")

# -----------------------------------------------------------------------------
# 1. Checkpoints


def checkpoints(out):
    """The checkpoint-<step> folders in `out`, oldest first."""
    found = [path for path in out.glob("checkpoint-*") if path.name[11:].isdigit()]
    return sorted(found, key=lambda path: int(path.name[11:]))


def save_config(folder, cfg, **extra):
    """Write folder/config.json (the run's, in --out, or a checkpoint's): cfg's settings and `extra`, with the
    PATHS inside the run folder, cfg.out, relative to `folder`: the run folder may move (run_folder.py)."""
    settings = dict(asdict(cfg), **extra)
    for key in PATHS:
        settings[key] = stored(settings[key], folder, cfg.out)
    write_atomically(folder / "config.json", json.dumps(settings, indent=2))


def save_checkpoint(out, model, optimizer, scaler, cfg, step, skipped):
    """Write out/checkpoint-<step>, check that it reads back, then delete all but the KEEP newest; returns
    its path. A failure (a full disk) removes what it wrote: the older ones stay as they were."""
    final, tmp = out / f"checkpoint-{step:06d}", out / f".checkpoint-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    state = io.BytesIO()  # torch.save's own file writer would hide the OSError of a full disk
    torch.save(dict(step=step, skipped=skipped, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                    rng=torch.get_rng_state(), cuda_rng=cuda_rng), state)
    try:
        save_adapter(model, tmp, stored(cfg.base, tmp, cfg.out))
        save_config(tmp, cfg)
        write_atomically(tmp / "trainer_state.pt", state.getvalue())
        check_written(tmp, model, step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(final)
    fsync(out)  # the rename itself
    for old in checkpoints(out)[:-KEEP]:
        shutil.rmtree(old)
    return final


def check_written(folder, model, step):
    """Flush a new checkpoint to the disk (its files, then its folder), read it back and compare it with the
    model's LoRA weights; a ValueError if it differs (save_checkpoint removes it; the older ones stay)."""
    for path in folder.iterdir():
        fsync(path)
    fsync(folder)
    fix = "so the disk may be full or failing: the older ones are kept; free space or fix it, then --resume"
    tensors, state = read_checkpoint(folder, fix)
    expected = {key: value.detach().float().cpu() for key, value in lora_state_dict(model).items()}
    if state["step"] != step or tensors.keys() != expected.keys() or not all(
            torch.equal(tensors[key], expected[key]) for key in expected):
        raise ValueError(f"{folder}: reads back other weights than were written, {fix}")


def save_final(out, model, cfg):
    """Write the finished run's adapter into --out itself, a peft adapter folder, after the last checkpoint.

    Two files cannot be renamed into place at once, so adapter_config.json, which every loader (load_adapter,
    peft) reads first, marks the pair as whole: it is removed first and written last. A kill in between leaves
    no pair that loads, and find_run sees a started run: --resume restores the last checkpoint (the last
    step's) and writes the adapter again."""
    (out / "adapter_config.json").unlink(missing_ok=True)
    save_adapter(model, out, stored(cfg.base, out, cfg.out))  # the tensors, then the config: each atomically
    for path in (out / "adapter_model.safetensors", out / "adapter_config.json", out):
        fsync(path)


def read_checkpoint(checkpoint, fix):
    """(LoRA tensors, trainer state) of a checkpoint, or a ValueError that names the file it cannot read and
    ends in `fix`: what to do about it."""
    try:
        _, tensors = read_adapter_tensors(checkpoint, fix)
    except FileNotFoundError as e:
        raise ValueError(f"{e}; {fix}") from None
    file = checkpoint / "trainer_state.pt"
    try:
        return tensors, torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{file}: cannot be read ({reason}); it is truncated or corrupt, {fix}") from None


def restore_checkpoint(checkpoint, model, optimizer, scaler, main=True):
    """Load the newest readable checkpoint, `checkpoint` or one before it, into the freshly built run: the
    LoRA weights, the optimizer, the fp16 loss scale and the RNG state; returns its trainer state.

    An unreadable one gets a one-line warning and is set aside as checkpoint-<step>.unreadable (by the main
    process); when none is left, the ValueError says to start over."""
    found = checkpoints(checkpoint.parent)
    found = found[:found.index(checkpoint) + 1]
    for i in reversed(range(len(found))):
        fix = (f"set aside as {found[i].name}.unreadable; resuming from the checkpoint before it" if i else
               "and no checkpoint before it is readable: start the run over with --overwrite")
        try:
            tensors, state = read_checkpoint(found[i], fix)
            break
        except ValueError as e:
            if not i:
                raise
            print(f"warning: {e}")
            if main:
                aside = found[i].with_name(found[i].name + ".unreadable")
                shutil.rmtree(aside, ignore_errors=True)
                found[i].rename(aside)
    unexpected = model.load_state_dict(tensors, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{found[i]}: {unexpected[0]} does not fit this model; was --base changed?")
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])  # the fp16 loss scale and its growth tracker: exact resume
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state


def find_run(out, resume, overwrite):
    """The newest checkpoint to resume from (or None);
    refuses to touch a run in `out` unless --resume or --overwrite."""
    found = checkpoints(out)
    finished = (out / "adapter_config.json").exists()  # written last (save_final)
    if (found or finished) and not (resume or overwrite):
        raise ValueError(f"{out} already holds a {'finished' if finished else 'started'} run; "
                         "pass --resume to continue it or --overwrite to start over")
    if resume and not found:
        print(f"{out}: no checkpoint to resume from; starting at step 0")
    return found[-1] if resume and found and not overwrite else None


def clear_run(out, overwrite):
    """Remove the temporaries of writes that a kill cut short and, with --overwrite, what an earlier run wrote
    to `out`: coin's own files alone. Safe: this process holds the folder (run_folder.claim)."""
    patterns = LEFTOVERS + (("checkpoint-*", "adapter_*", "metrics.jsonl") if overwrite else ())
    for path in [path for pattern in patterns for path in out.glob(pattern)]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


# -----------------------------------------------------------------------------
# 2. Metrics


def open_metrics(out, step):
    """The path of out/metrics.jsonl, rid of the lines a killed run logged after its last checkpoint.

    A last line cut short (no newline, not JSON: a kill or a full disk while it was appended) is dropped with
    a note; any other line that is not a metrics record is a ValueError naming path:line."""
    path = out / "metrics.jsonl"
    text = path.read_text(errors="replace") if path.exists() else ""
    lines, kept = text.splitlines(), []
    for lineno, line in enumerate(lines, 1):
        try:
            logged = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError) as e:
            if lineno == len(lines) and not text.endswith("\n"):
                print(f"{path}:{lineno}: dropped a half-written last line (a kill or a full disk while it "
                      "was written)")
                break
            raise ValueError(f"{path}:{lineno}: not a metrics line ({e}); delete the line, or start over "
                             "with --overwrite") from None
        if logged <= step:
            kept.append(line)
    write_atomically(path, "".join(line + "\n" for line in kept))
    return path


def log_metrics(path, record):
    """Append a step's record to metrics.jsonl at `path` (None: a process that logs nothing) and close it, so
    that a kill loses no logged step. An OSError (a full disk) names the file."""
    if path:
        with naming(path), open(path, "a") as metrics:
            metrics.write(json.dumps(record) + "\n")


# -----------------------------------------------------------------------------
# 3. Stopping on a signal: after the current step (coin.py) or cell (evaluate.py), in every process


class StopOnSignal:
    """A context in which SIGINT, SIGTERM and SIGUSR1 ask a loop to stop at its next safe point (`received`
    names the signal); a second one stops at once, through the signal's previous handler (Ctrl-C twice: a
    KeyboardInterrupt).

    A second signal counts only ECHO_SECONDS after the first. Sooner, it is the first delivered again: SLURM
    signals every process of a job step, a terminal its whole foreground process group, and torchrun forwards
    what it received to its workers, so each worker gets the one signal twice, milliseconds apart."""

    def __enter__(self):
        self.received, self.first = None, 0.0
        self.previous = {sig: signal.signal(sig, self.handle) for sig in SIGNALS}
        return self

    def handle(self, signum, frame):
        if not self.received:
            self.received, self.first = signal.Signals(signum).name, time.monotonic()
        elif time.monotonic() - self.first > ECHO_SECONDS:
            self.__exit__()
            signal.raise_signal(signum)  # to the previous handler, now restored

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler or signal.SIG_DFL)  # None: a handler not set from Python


def stop_run(received, world, kept):
    """The SystemExit(STOPPED) that ends a run stopped by a signal, once every process is here; it says what
    the run `kept`, and how to continue."""
    tqdm.write(f"{received or 'a signal to another process'}: {kept}; continue with --resume "
               f"(exit status {STOPPED})")
    finish(world)
    return SystemExit(STOPPED)


class Saves(StopOnSignal):
    """When coin.py's loop writes a checkpoint: every `every` steps, `minutes` after the last checkpoint,
    after the last step, and after a step in which a signal came (the run then stops). Every process decides
    alike: one all-reduce per step sums the processes' signals and rank 0's clock."""

    def __init__(self, every, minutes, world):
        self.every, self.seconds, self.world = every, 60 * minutes if minutes else math.inf, world
        self.last = time.monotonic()

    def after(self, step, total_steps):
        """(save, stop) after optimizer step `step` of total_steps (1-based)."""
        late = self.world.main and time.monotonic() - self.last >= self.seconds
        votes = all_sum(dict(stop=bool(self.received), late=late), self.world)
        stop = votes["stop"] > 0 and step < total_steps  # a signal during the last step: the run finishes
        save = stop or votes["late"] > 0 or step % self.every == 0 or step == total_steps
        if save:
            self.last = time.monotonic()
        return save, stop


def until_signal(items, world, kept):
    """Yield `items`, one at a time, until a signal comes to any process (evaluate.py's rounds of cells):
    then, before the next one, stop with STOPPED. A signal during the last one lets the loop finish."""
    with StopOnSignal() as stop:
        for i, item in enumerate(items):
            if i and all_sum(dict(stop=bool(stop.received)), world)["stop"] > 0:
                raise stop_run(stop.received, world, kept)
            yield item
