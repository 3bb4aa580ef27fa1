"""coin.py: Contrastive Instruction Tuning (CoIN, Yan et al., ACL Findings 2024): the loss, the training loop.

CoIN in ten lines. Every training example comes in two views: the original instruction and a paraphrase of it
(same input, same answer). One forward runs both views, stacked as 2B rows (data.py):
  - L_gen: next-token cross-entropy on the answer tokens, a token mean per view, summed over the two views;
  - L_ctr: InfoNCE between the final-norm hidden states at each row's last real token: each original should be
    closer (cosine / temperature) to its own paraphrase than to every other row of the micro-batch, and the
    micro-batch holds each example's hard negative (same template, different input and answer). Symmetric:
    original -> paraphrase and paraphrase -> original, averaged;
  - total = L_gen + w * L_ctr with w = min(lambda, detach(L_gen / L_ctr)): the contrastive term is rescaled to
    the size of the generation loss, and lambda (1000) is only the upper bound of that weight.
The paper's Eq. 3 writes max; its own text ("lambda is the upper bound") and the official code make it min.

Runs:
    python coin.py --data examples/flan_coin_demo.jsonl --tiny --out out/ --epochs 5 --lr 1e-3   # CPU demo
    python coin.py --data flan_coin.jsonl --base llama-7b-hf --adapter alpaca-lora-7b --out out/  # the paper

Memory of the paper's run on one 24 GB GPU (`python memory.py --rows 32` prints it; micro-batch 16 examples =
32 rows of 256 tokens, bf16 weights, gradient checkpointing): weights 12.55 GiB (6.74B x 2 bytes); LoRA r=16
on q,k,v,o: 16.8M fp32 parameters + gradients + AdamW moments = 0.25 GiB; activations 3.5 GiB (each layer
keeps only its input, one layer is recomputed at a time); logits only for answer tokens, < 0.1 GiB. About
16.4 GiB in all.

Shape legend: B examples per micro-batch (2B rows), T tokens, D model dim, V vocab, K micro-batches per step.

Next: read `perturb.py`.
"""
import itertools
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoints import StopOnCtrlC, clear_run, find_run, open_metrics, restore_checkpoint, save_checkpoint
from config import merge_saved, opt, parse_flags, resolve_precision
from data import IGNORE_INDEX, ContrastiveDataset, collate, load_examples, micro_batches
from files import write_atomically
from hf_io import load_adapter, load_model, load_tokenizer, save_adapter
from memory import estimate_training_memory
from model import apply_lora, merge_lora, pool_last_token
from tiny_base import build_tiny_base

# -----------------------------------------------------------------------------
# 1. Configuration: one dataclass, every default with its source


@dataclass
class TrainConfig:
    # What to train
    data: str | None = opt(None, "flan_coin.jsonl training file (data.py)")
    base: str | None = opt(None, "HF LLaMA directory: config.json, weights, tokenizer.model")
    tiny: bool = opt(False, "instead of --base: a tiny random LLaMA and a tokenizer trained on --data")
    adapter: str | None = opt(None, "peft LoRA adapter to continue training (CoIN continues alpaca-lora)")
    merge_adapter: bool = opt(False, "merge --adapter into the base and train a fresh LoRA on top instead")
    out: str = opt("out", "output directory: adapter, checkpoints, config.json, metrics.jsonl")
    # Optimisation (CoIN §4.1; alpaca-lora)
    epochs: int = opt(1, "passes over the data (CoIN: 1)")
    max_steps: int | None = opt(None, "optimizer steps; overrides --epochs")
    batch_size: int = opt(64, "examples per optimizer step (CoIN: 64)")
    micro_batch_size: int = opt(16, "examples per forward (2x rows); 16 fits 7B on 24 GB (python memory.py)")
    lr: float = opt(1e-4, "AdamW peak learning rate (CoIN: 1e-4)")
    warmup_ratio: float = opt(0.1, "linear warmup over this fraction of the steps, then linear decay to 0")
    cutoff: int = opt(256, "max tokens per row; prompts are cut, answers never (CoIN: 256)")
    eos: bool = opt(True, "append eos to every answer, so the model learns to stop")
    skip_bad: bool = opt(False, "drop bad lines of --data instead of refusing the file")
    # LoRA (alpaca-lora's adapter: r 16, alpha 16, dropout 0.05 on q, k, v, o); --adapter's config wins
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(16, "LoRA alpha; scaling = alpha / r")
    lora_dropout: float = opt(0.05, "dropout on the LoRA input")
    lora_targets: str = opt("q_proj,k_proj,v_proj,o_proj", "comma list of projections to adapt")
    # Contrastive loss (CoIN §3.2, §4.1)
    contrastive: bool = opt(True, "add L_ctr; --no-contrastive trains the continual-tuning baseline")
    temperature: float = opt(0.05, "InfoNCE temperature (CoIN: 0.05)")
    lam: float = opt(1000.0, "upper bound of the contrastive weight w = min(lam, L_gen / L_ctr) (CoIN: 1000)")
    # Machinery
    dtype: str | None = opt(None, "base weights and autocast (default: bf16 on a GPU, fp32 on a CPU; "
                                  "fp16 adds a GradScaler)", choices=("bf16", "fp16", "fp32"))
    device: str | None = opt(None, "cuda | cpu (default: cuda when there is a GPU)")
    grad_checkpointing: bool = opt(True, "recompute each layer in backward instead of keeping activations")
    save_every: int = opt(100, "checkpoint every N optimizer steps (and at the end)")
    seed: int = opt(0, "seed of the LoRA init, dropout and data order")
    resume: bool = opt(False, "continue the run in --out from its last checkpoint")
    overwrite: bool = opt(False, "delete the run in --out and start again")


PROGRESS_KEYS = ("loss", "gen", "ctr", "weight", "lr", "tokens_per_s")  # shown on the progress bar
RESUMABLE = {"max_steps", "epochs", "save_every", "device", "resume", "overwrite"}  # may change on --resume
PATHS = ("data", "base", "adapter", "out")  # saved as absolute paths, so a run resumes from any directory


def parse_config(argv=None):
    """TrainConfig from the command line. With --resume, flags not given take the run's saved config.json."""
    given = parse_flags(TrainConfig, argv, "CoIN training: LoRA with generation + contrastive loss")
    if given.get("resume"):
        given = merge_saved(given, Path(given.get("out", TrainConfig.out)) / "config.json", RESUMABLE, PATHS)
    return TrainConfig(**given)


# -----------------------------------------------------------------------------
# 2. The losses

def info_nce(a, b, temperature):
    """Symmetric InfoNCE: row i of a should match row i of b against every other row of b, and vice versa.

    a, b (B, D). sim (B, B) = cos(a_i, b_j) / temperature, in fp32; the diagonal holds the positives, and the
    off-diagonal entries are the in-batch negatives (each example's hard negative among them).
    """
    with torch.autocast(a.device.type, enabled=False):  # bf16 cosines / 0.05 would be off by several percent
        a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
        sim = a @ b.T / temperature  # (B, B)
        labels = torch.arange(sim.shape[0], device=sim.device)
        return (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels)) / 2


def coin_loss(h_orig, h_para, gen_loss, temperature, lam):
    """CoIN's objective: (total, ctr, weight) with total = gen + w * ctr and w = min(lam, detach(gen / ctr)).

    The weight is a constant to autograd: the contrastive term's value becomes the generation loss's (unless
    lam caps it), while its gradient is the InfoNCE gradient scaled by gen / ctr.
    """
    ctr = info_nce(h_orig, h_para, temperature)
    weight = torch.clamp(gen_loss.detach() / ctr.detach(), max=lam)
    return gen_loss + weight * ctr, ctr, weight


def supervised_ce_sum(model, hidden, labels):
    """Sum of next-token cross-entropy over the supervised tokens of rows hidden (R, T, D), labels (R, T).

    Logits are computed only where a label is supervised (typically a few answer tokens per row), never for
    all 2B x T x V positions: position t predicts label t + 1.
    """
    targets = labels[:, 1:]                       # (R, T-1)
    supervised = targets != IGNORE_INDEX          # (R, T-1)
    logits = model.lm_head(hidden[:, :-1][supervised]).float()  # (N, V), N = supervised tokens
    return F.cross_entropy(logits, targets[supervised], reduction="sum")


def supervised_tokens(batch):
    """(originals, paraphrases): the supervised tokens of each view of a collated batch, as supervised_ce_sum
    counts them."""
    B = len(batch["ids"])
    supervised = batch["labels"][:, 1:] != IGNORE_INDEX  # (2B, T-1)
    return int(supervised[:B].sum()), int(supervised[B:].sum())


def micro_batch_loss(model, batch, window_tokens, k, temperature, lam, contrastive=True):
    """One forward over the 2B rows of `batch`; returns (the loss to backpropagate, metrics).

    window_tokens: (originals, paraphrases) supervised tokens over the whole window of k micro-batches, so the
    generation terms summed over the window are its token means, exactly as one big batch would give. The
    CoIN rule sees this micro-batch's L_gen at the scale of a whole step (times k), and each micro-batch's
    total is divided by k: the step's loss is L_gen(window) + the mean over micro-batches of w * L_ctr.
    """
    B = batch["input_ids"].shape[0] // 2
    hidden = model.hidden_states(batch["input_ids"])  # (2B, T, D): right-padded, so causal attention is exact
    labels = batch["labels"]
    gen = k * (supervised_ce_sum(model, hidden[:B], labels[:B]) / window_tokens[0]
               + supervised_ce_sum(model, hidden[B:], labels[B:]) / window_tokens[1])
    if not contrastive:
        return gen / k, dict(gen=gen.item(), ctr=0.0, weight=0.0)
    pooled = pool_last_token(hidden, batch["last_index"])  # (2B, D)
    total, ctr, weight = coin_loss(pooled[:B], pooled[B:], gen, temperature, lam)
    return total / k, dict(gen=gen.item(), ctr=ctr.item(), weight=weight.item())


def learning_rate(step, total_steps, peak_lr, warmup_ratio):
    """Linear warmup over warmup_ratio of the steps, then linear decay to 0 (HF's default schedule)."""
    warmup = max(1, math.ceil(warmup_ratio * total_steps))
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    return peak_lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


# -----------------------------------------------------------------------------
# 3. Model and data. Precision: bf16 weights and autocast where supported, fp16 + GradScaler otherwise, fp32
# when asked (config.resolve_precision). LoRA weights and AdamW state stay fp32 whatever the choice
# (model.py); RMSNorm, softmax and the losses run in fp32.

def build_model(cfg, device, dtype):
    """(model, tokenizer, lora): the base with a trainable LoRA, continued from --adapter or fresh (on a base
    that --merge-adapter made). lora: the LoRA settings in use, which an --adapter's own config decides."""
    model = load_model(cfg.base, dtype=dtype, device=device)
    tokenizer = load_tokenizer(cfg.base)
    if cfg.adapter and cfg.merge_adapter:
        load_adapter(model, cfg.adapter)
        merge_lora(model)
    if cfg.adapter and not cfg.merge_adapter:
        names = load_adapter(model, cfg.adapter)
        first = model.get_submodule(names[0])
        lora = dict(lora_r=first.r, lora_alpha=first.alpha, lora_dropout=first.dropout.p,
                    lora_targets=",".join(sorted({name.rsplit(".", 1)[-1] for name in names})))
    else:
        torch.manual_seed(cfg.seed)  # LoRA A's init
        apply_lora(model, cfg.lora_targets.split(","), cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        lora = dict(lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                    lora_targets=cfg.lora_targets)
    model.grad_checkpointing = cfg.grad_checkpointing
    return model.train(), tokenizer, lora


def training_steps(groups, batch_size, micro_batch_size, seed):
    """Yield the micro-batches (lists of dataset indices) of each optimizer step, epoch after epoch.

    A step is a window of batch_size // micro_batch_size micro-batches; the last window of an epoch may be
    shorter. Each epoch reshuffles the groups (data.micro_batches), deterministically, so a resumed run just
    skips the steps it has done.
    """
    k = batch_size // micro_batch_size
    for epoch in itertools.count():
        batches = micro_batches(groups, micro_batch_size, seed, epoch)
        for start in range(0, len(batches), k):
            yield batches[start:start + k]


def count_steps(groups, cfg):
    if cfg.max_steps:
        return cfg.max_steps
    k = cfg.batch_size // cfg.micro_batch_size
    return sum(math.ceil(len(micro_batches(groups, cfg.micro_batch_size, cfg.seed, e)) / k)
               for e in range(cfg.epochs))


def autocast(device, dtype):
    return torch.autocast(device.split(":")[0], dtype) if dtype != torch.float32 else nullcontext()


# -----------------------------------------------------------------------------
# 4. The training loop

@dataclass
class Run:
    """What a training run builds once, before its first step."""
    cfg: TrainConfig
    model: torch.nn.Module
    dataset: ContrastiveDataset
    pad_id: int
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: str
    dtype: torch.dtype


def check_flags(cfg):
    """(device, dtype), or a ValueError naming the flag at fault."""
    if not cfg.data:
        raise ValueError("--data is required: a flan_coin.jsonl file (see data.py)")
    if not cfg.base and not cfg.tiny or cfg.base and cfg.tiny and not cfg.resume:
        raise ValueError("give either --base LLAMA_DIR (a HF LLaMA directory) or --tiny (a tiny demo model)")
    if cfg.batch_size % cfg.micro_batch_size:
        raise ValueError(f"--batch-size {cfg.batch_size} is not a multiple of --micro-batch-size "
                         f"{cfg.micro_batch_size}")
    device, dtype = resolve_precision(cfg.device, cfg.dtype)
    if dtype == torch.float16 and not device.startswith("cuda"):
        raise ValueError("--dtype fp16 needs a CUDA GPU; use bf16 or fp32 on a CPU")
    return device, dtype


def set_up(cfg):
    """(run, checkpoint to resume or None). Everything that can be wrong with the input (flags, data, base,
    adapter) is checked before anything in --out is written or removed."""
    out = Path(cfg.out)
    device, dtype = check_flags(cfg)
    examples, problems = load_examples(cfg.data, skip_bad=cfg.skip_bad)
    if problems:
        print(f"{cfg.data}: skipped {len(problems)} bad lines (--skip-bad); first: {problems[0]}")
    checkpoint = find_run(out, cfg.resume, cfg.overwrite)
    if cfg.tiny and not cfg.base:
        cfg = replace(cfg, base=str(build_tiny_base(out / "base", examples, cfg.seed)))
    cfg = replace(cfg, **{key: str(Path(getattr(cfg, key)).resolve()) for key in PATHS if getattr(cfg, key)})
    model, tokenizer, lora = build_model(cfg, device, dtype)
    cfg = replace(cfg, **lora)  # recorded in config.json
    if cfg.overwrite:
        clear_run(out)
    dataset = ContrastiveDataset(examples, tokenizer, cfg.cutoff, cfg.eos)
    print(f"{len(dataset)} examples in {len(dataset.groups)} groups; dropped {dataset.dropped} that do not "
          f"fit --cutoff {cfg.cutoff} and {dataset.orphans} left without a group partner")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=0.0)  # HF Trainer's defaults, as in alpaca-lora
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    return Run(cfg, model, dataset, tokenizer.pad_id, optimizer, scaler, device, dtype), checkpoint


def describe_setup(run):
    """Trainable parameters, dtypes and the predicted peak memory, printed before the first step."""
    params, cfg = list(run.model.parameters()), run.cfg
    trainable = sum(p.numel() for p in params if p.requires_grad)
    frozen = sum(p.numel() for p in params if not p.requires_grad)
    dtypes = sorted({(str(p.dtype), p.requires_grad) for p in params})
    rows = 2 * cfg.micro_batch_size
    memory = estimate_training_memory(run.model.args, rows, cfg.cutoff, targets=cfg.lora_targets.split(","),
                                      grad_checkpointing=cfg.grad_checkpointing, r=cfg.lora_r,
                                      weight_bytes=run.model.lm_head.weight.element_size())
    gib = {name: n / 2**30 for name, n in memory.items()}
    return "\n".join([
        f"trainable parameters: {trainable:,} ({100 * trainable / (trainable + frozen):.2f}%) in LoRA "
        f"(r={cfg.lora_r}, alpha={cfg.lora_alpha}, on {cfg.lora_targets}); frozen: {frozen:,}",
        "parameter dtypes: " + ", ".join(f"{d} ({'trainable' if t else 'frozen'})" for d, t in dtypes),
        f"predicted peak memory on a GPU ({rows} rows x {cfg.cutoff} tokens): {sum(gib.values()):.2f} GiB ("
        + ", ".join(f"{name} {n:.2f}" for name, n in gib.items()) + ")"])


def train_step(run, batches, lr):
    """One optimizer step over collated micro-batches; returns its metrics (skipped: fp16 overflow)."""
    started, cfg, k = time.perf_counter(), run.cfg, len(batches)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    window_tokens = [sum(counts) for counts in zip(*map(supervised_tokens, batches))]
    record = dict(loss=0.0, gen=0.0, ctr=0.0, weight=0.0)
    for batch in batches:
        with autocast(run.device, run.dtype):
            device_batch = {key: v.to(run.device) for key, v in batch.items() if torch.is_tensor(v)}
            loss, parts = micro_batch_loss(run.model, device_batch, window_tokens, k, cfg.temperature,
                                           cfg.lam, cfg.contrastive)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"non-finite loss (gen {parts['gen']}, ctr {parts['ctr']}) on examples "
                                     f"{', '.join(batch['ids'])}")
        run.scaler.scale(loss).backward()
        record["loss"] += loss.item()
        for key, value in parts.items():
            record[key] += value / k
    run.scaler.unscale_(run.optimizer)
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    scale = run.scaler.get_scale()
    run.scaler.step(run.optimizer)  # skipped by the scaler when fp16 gradients overflowed
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    tokens, seconds = sum(int(b["attention_mask"].sum()) for b in batches), time.perf_counter() - started
    return dict(**record, lr=lr, grad_norm=grad_norm.item(), examples=sum(len(b["ids"]) for b in batches),
                negatives_per_anchor=sum(len(b["ids"]) - 1 for b in batches) / k,
                supervised_tokens=sum(window_tokens), tokens_per_s=round(tokens / seconds),
                skipped=int(run.scaler.is_enabled() and run.scaler.get_scale() < scale))


def train(cfg):
    """Train a CoIN LoRA adapter as `cfg` says; returns the output directory."""
    run, checkpoint = set_up(cfg)
    cfg, out, model = run.cfg, Path(run.cfg.out), run.model
    state = restore_checkpoint(checkpoint, model, run.optimizer) if checkpoint else dict(step=0, skipped=0)
    step, skipped, total_steps = state["step"], state["skipped"], count_steps(run.dataset.groups, cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "config.json", json.dumps(asdict(cfg), indent=2))
    print(describe_setup(run))
    windows = training_steps(run.dataset.groups, cfg.batch_size, cfg.micro_batch_size, cfg.seed)
    bar = tqdm(itertools.islice(windows, step, total_steps), total=total_steps, initial=step, desc="coin",
               dynamic_ncols=True)
    metrics, stop, started = open_metrics(out, step), StopOnCtrlC(), time.perf_counter()
    try:
        for window in bar:
            batches = [collate([run.dataset[i] for i in indices], run.pad_id) for indices in window]
            try:
                record = train_step(run, batches, learning_rate(step, total_steps, cfg.lr, cfg.warmup_ratio))
            except FloatingPointError as e:
                raise FloatingPointError(f"step {step + 1}: {e}; stopped, the last good checkpoint is kept "
                                         f"in {out}") from None
            step, skipped = step + 1, skipped + record.pop("skipped")
            metrics.write(json.dumps(dict(step=step, **record, skipped_steps=skipped)) + "\n")
            metrics.flush()
            bar.set_postfix({key: f"{record[key]:.4g}" for key in PROGRESS_KEYS})
            if step == 1 and run.device.startswith("cuda"):
                peak = torch.cuda.max_memory_allocated() / 2**30
                bar.write(f"measured peak GPU memory after step 1: {peak:.2f} GiB")
            if step % cfg.save_every == 0 or step == total_steps or stop:
                save_checkpoint(out, model, run.optimizer, cfg, step, skipped)
            if stop:
                bar.write(f"interrupted: saved step {step} in {out}; continue with --resume")
                return out
    finally:
        stop.restore()
        metrics.close()
    save_adapter(model, out, cfg.base)  # the finished run: out/ itself is a peft adapter directory
    print(f"done: steps {total_steps}, {time.perf_counter() - started:.0f} s, skipped (fp16 overflow) "
          f"{skipped}; the adapter is in {out}")
    return out


# -----------------------------------------------------------------------------
# 5. Command line

def main(argv=None):
    try:
        train(parse_config(argv))
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
