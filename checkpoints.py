"""checkpoints.py: what coin.py keeps in its output directory so that no run is ever lost.

A support module, read after coin.py's training loop. --out holds:

    checkpoint-<step>/    the adapter (peft format), config.json and trainer_state.pt (optimizer, fp16 loss
                          scale, RNG, step); written to a temporary folder and renamed into place, so a crash
                          leaves the previous checkpoint intact; only the newest is kept
    metrics.jsonl         one line per optimizer step; on resume, lines after the checkpoint are dropped
    config.json           the run's settings (coin.py writes it); --resume reads them back
    adapter_*             the finished run's adapter, for evaluate.py and peft

Ctrl-C asks the loop to save and stop after the current step (`StopOnCtrlC`); `--resume` restores the
weights, the optimizer, the loss scale and the RNG and skips the steps done, so the resumed run equals an
uninterrupted one bit for bit.
"""
import json
import shutil
import signal
from dataclasses import asdict

import torch

from data import IGNORE_INDEX
from files import write_atomically
from hf_io import read_adapter_tensors, save_adapter

# -----------------------------------------------------------------------------
# 1. Checkpoints


def save_checkpoint(out, model, optimizer, scaler, cfg, step, skipped):
    """Write out/checkpoint-<step> (unless it exists) and delete the older ones; returns its path."""
    final = out / f"checkpoint-{step:06d}"
    if final.exists():
        return final
    tmp = out / f".checkpoint-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp, cfg.base)
    (tmp / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    torch.save(dict(step=step, skipped=skipped, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                    rng=torch.get_rng_state(), cuda_rng=cuda_rng), tmp / "trainer_state.pt")
    tmp.rename(final)
    for old in out.glob("checkpoint-*"):
        if old != final:
            shutil.rmtree(old)
    return final


def restore_checkpoint(checkpoint, model, optimizer, scaler):
    """Load a checkpoint's LoRA weights, optimizer, fp16 loss scale and RNG state into the freshly built run;
    returns the state."""
    _, tensors = read_adapter_tensors(checkpoint)
    unexpected = model.load_state_dict(tensors, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{checkpoint}: {unexpected[0]} does not fit this model; was --base changed?")
    state = torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])  # the fp16 loss scale and its growth tracker: exact resume
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state


def find_run(out, resume, overwrite):
    """The checkpoint to resume from (or None);
    refuses to touch a run in `out` unless --resume or --overwrite."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file, not a directory; give a directory for the run")
    checkpoints = sorted(out.glob("checkpoint-*"))
    finished = (out / "adapter_model.safetensors").exists()
    if (checkpoints or finished) and not (resume or overwrite):
        raise ValueError(f"{out} already holds a {'finished' if finished else 'started'} run; "
                         "pass --resume to continue it or --overwrite to start over")
    if resume and not checkpoints:
        print(f"{out}: no checkpoint to resume from; starting at step 0")
    return checkpoints[-1] if resume and checkpoints and not overwrite else None


def clear_run(out):
    """--overwrite: remove what an earlier run wrote to `out` (only coin's own files)."""
    for path in out.glob("checkpoint-*"):
        shutil.rmtree(path)
    for name in ("adapter_model.safetensors", "adapter_config.json", "metrics.jsonl"):
        (out / name).unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# 2. Metrics and Ctrl-C


def step_counts(batches, within_groups, processes=1):
    """What a process's micro-batches of a step held, as sums that processes can add up: examples, their
    negatives and hard negatives, supervised, real and padding tokens. With --negatives batch, an anchor's
    negatives are every other row of the micro-batches the processes run side by side."""
    partners = torch.cat([torch.bincount(b["group_index"])[b["group_index"]] - 1 for b in batches])  # (N,)
    sizes = [len(b["ids"]) for b in batches]
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    others = sum(n * (n * processes - 1) for n in sizes)  # each row's, among all rows run side by side
    return dict(examples=len(partners), hard_negatives=int(partners.sum()),
                negatives=int(partners.sum()) if within_groups else others,
                supervised_tokens=sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches),
                real_tokens=real, padded_tokens=sum(b["computed_tokens"] for b in batches) - real)


def open_metrics(out, step):
    """out/metrics.jsonl for appending, without the lines a killed run logged after its last checkpoint."""
    path = out / "metrics.jsonl"
    kept = [line for line in (path.read_text().splitlines() if path.exists() else [])
            if json.loads(line)["step"] <= step]
    write_atomically(path, "".join(line + "\n" for line in kept))
    return open(path, "a")


class StopOnCtrlC:
    """Ctrl-C asks the loop to save and stop after the current step; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)

    def __bool__(self):
        return self.requested

    def restore(self):
        signal.signal(signal.SIGINT, self.previous)
