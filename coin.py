"""coin.py: Contrastive Instruction Tuning (CoIN, Yan et al., ACL Findings 2024): the loss, the training loop.

CoIN in ten lines. Every training example comes in two views: the original instruction and a paraphrase of
it (same input, same answer), and each example has a group: itself and its hard negative (same template,
different input and answer). The official code trains one group per micro-batch; we compute the same
objective per group g, batched, so the micro-batch size changes only speed and memory:
  - L_gen_g: next-token cross-entropy on the answer tokens, a token mean per view over the group's rows,
    summed over the two views;
  - L_ctr_g: symmetric InfoNCE between the final-norm hidden states at each row's last answer token (or, with
    --pooling, their mean or max over the row): each original should be closer (cosine / temperature) to its
    own paraphrase than to its group's other paraphrases, and vice versa (--negatives batch: to the whole
    micro-batch's, SimCSE-style);
  - loss_g = L_gen_g + w_g * L_ctr_g with w_g = min(lambda, detach(L_gen_g / L_ctr_g)): the contrastive term
    is rescaled to the size of the generation loss; lambda (1000) only caps the weight. A step's loss is the
    mean of loss_g over its groups. The paper's Eq. 3 writes max; its text ("lambda is the upper bound") and
    the official code (ContrastiveLlama.scale_contrastive_loss) make it min. Whether the term acts at all
    shows in diagnostics.py's numbers, logged every step: its share of the loss, the cosines it sees.

Runs:
    python coin.py --data examples/flan_coin_demo.jsonl --tiny --out out/ --epochs 5 --lr 1e-3   # CPU demo
    python coin.py --data flan_coin.jsonl --base llama-7b-hf --adapter alpaca-lora-7b --out out/  # the paper
    python memory.py --rows 32 --supervised 8   # the paper's run at micro-batch 16: ~16.4 GiB, fits 24 GB

Shape legend: B examples per micro-batch (2B rows), T tokens, D model dim, V vocab, K micro-batches per step.

Next: read `perturb.py`.
"""
import itertools
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoints import PATHS, Saves, clear_run, find_run, log_metrics, open_metrics, restore_checkpoint
from checkpoints import save_checkpoint, save_config, save_final, stop_run
from data import IGNORE_INDEX, ContrastiveDataset, collate, epoch_steps, load_examples
from diagnostics import PROGRESS, SUMMED, cosine_sums, step_counts, step_record
from distributed import World, accumulating, all_sum, finish, gather_rows as gather, shard, start, wrap
from flags import COUNT, FRACTION, NON_NEGATIVE, POSITIVE, PROBABILITY, SEED, comma_list_of, merge_saved, opt
from flags import parse_flags, up_to
from hf_io import load_adapter, load_model, load_tokenizer
from memory import training_summary
from model import LINEARS, POOLING, apply_lora, bucketed_hidden_states, merge_lora, pool
from precision import DTYPES, autocast, resolve_precision
from run_folder import claim
from tiny_base import build_tiny_base, install_tiny_base

# -----------------------------------------------------------------------------
# 1. Configuration: one dataclass, every default with its source


@dataclass
class TrainConfig:
    # What to train
    data: str | None = opt(None, "flan_coin.jsonl training file (data.py)")
    base: str | None = opt(None, "HF directory (llama, mistral, qwen2): config.json, weights, tokenizer")
    tiny: bool = opt(False, "instead of --base: a tiny random LLaMA and a tokenizer trained on --data")
    adapter: str | None = opt(None, "peft LoRA adapter to continue training (CoIN continues alpaca-lora)")
    merge_adapter: bool = opt(False, "merge --adapter into the base and train a fresh LoRA on top instead")
    out: str = opt("out", "output directory: adapter, checkpoints, config.json, metrics.jsonl")
    # Optimisation (CoIN §4.1; alpaca-lora)
    epochs: int = opt(1, "passes over the data (CoIN: 1)", valid=up_to(1000, "longer: --max-steps"))
    max_steps: int | None = opt(None, "optimizer steps; overrides --epochs", valid=COUNT)
    batch_size: int = opt(64, "examples per optimizer step (CoIN: 64)", valid=COUNT)
    micro_batch_size: int = opt(16, "examples per forward (2x rows): speed and memory only; 16 fits 7B on "
                                    "24 GB (python memory.py) (CoIN: 2, one group)", valid=COUNT)
    lr: float = opt(1e-4, "AdamW peak learning rate (CoIN: 1e-4)", valid=POSITIVE)
    warmup_ratio: float = opt(0.1, "warmup steps = int(examples / batch size * ratio), then linear decay "
                                   "to 0 (CoIN: 0.1)", valid=FRACTION)
    cutoff: int = opt(256, "max tokens per row (CoIN: 256)", valid=COUNT)
    truncation: str = opt("right", "over the cutoff: right cuts the row's end as CoIN does, answer included; "
                                   "middle cuts the prompt's middle", choices=("right", "middle"))
    eos: bool = opt(False, "append eos to every answer (CoIN: off)")
    shuffle: bool = opt(True, "reshuffle the groups every epoch; --no-shuffle keeps CoIN's file order")
    group_by_length: bool = opt(True, "steps and micro-batches of similar lengths: less padding")
    holdout: int = opt(0, "leave the last N examples of --data out of training (CoIN: 2000, its val split)",
                       valid=NON_NEGATIVE)
    skip_bad: bool = opt(False, "drop bad lines of --data instead of refusing the file")
    # LoRA (alpaca-lora's adapter: r 16, alpha 16, dropout 0.05 on q, k, v, o); --adapter's config wins
    lora_r: int = opt(16, "LoRA rank", valid=up_to(4096, "LLaMA-7B's width"))
    lora_alpha: int = opt(16, "LoRA alpha; scaling = alpha / r", valid=COUNT)
    lora_dropout: float = opt(0.05, "dropout on the LoRA input", valid=PROBABILITY)
    lora_targets: str = opt("q_proj,k_proj,v_proj,o_proj", "comma list of projections to adapt",
                            valid=comma_list_of(LINEARS))
    # Contrastive loss (CoIN §3.2, §4.1)
    contrastive: bool = opt(True, "add L_ctr; --no-contrastive trains the continual-tuning baseline")
    temperature: float = opt(0.05, "InfoNCE temperature (CoIN: 0.05)", valid=POSITIVE)
    lam: float = opt(1000.0, "upper bound of the contrastive weight w = min(lam, L_gen / L_ctr) (CoIN: 1000)",
                     valid=POSITIVE)
    negatives: str = opt("group", "group: each anchor's negatives are its group's (CoIN); batch: every other "
                                  "row of the micro-batch (SimCSE-style)", choices=("group", "batch"))
    pooling: str = opt("last", "the state InfoNCE compares: last, the last answer token (CoIN); mean or max "
                               "over each row's real tokens (CoIN's footnote 2)", choices=POOLING)
    # Machinery
    dtype: str | None = opt(None, "base weights and autocast (default: bf16 on a GPU or a CPU with bf16 "
                                  "units, else fp32; fp16 adds a GradScaler)", choices=tuple(DTYPES))
    device: str | None = opt(None, "cuda | cpu (default: cuda when there is a GPU)")
    grad_checkpointing: bool = opt(True, "recompute each layer in backward instead of keeping activations")
    save_every: int = opt(100, "checkpoint every N optimizer steps (and at the end)", valid=COUNT)
    save_every_minutes: float | None = opt(None, "also checkpoint N minutes after the last checkpoint "
                                                 "(preemptible machines; SIGTERM saves too)", valid=POSITIVE)
    seed: int = opt(42, "seed of the LoRA init, dropout and data order (CoIN: 42)", valid=SEED)
    resume: bool = opt(False, "continue the run in --out from its last checkpoint")
    overwrite: bool = opt(False, "delete the run in --out and start again")


# The flags that may change on --resume; the others must equal the run's config.json.
RESUMABLE = {"max_steps", "epochs", "save_every", "save_every_minutes", "device", "resume", "overwrite"}


def parse_config(argv=None):
    """TrainConfig from the command line. With --resume, flags not given take the run's saved config.json."""
    given = parse_flags(TrainConfig, argv, "CoIN training: LoRA with generation + contrastive loss")
    if given.get("resume"):  # --overwrite is this command's own, not the saved run's (that may have had it)
        given = dict(merge_saved(given, Path(given.get("out", TrainConfig.out)) / "config.json", RESUMABLE,
                                 PATHS), overwrite=given.get("overwrite", False))
    given.pop("world_size", None)  # recorded by the run, and free to change on --resume
    return TrainConfig(**given)


# -----------------------------------------------------------------------------
# 2. The losses

def info_nce(a, b, group_index, temperature, within_groups=True, world=World()):
    """Symmetric InfoNCE per group, and what it sees: ((G,) losses, cosine sums). a, b (B, D): the two views'
    pooled states; group_index (B,).

    sim (B, B) = cos(a_i, b_j) / temperature, in fp32; the diagonal holds the positives. within_groups masks
    the pairs of different groups, so each anchor's negatives are its group's other rows (its hard negative):
    exactly the official micro-batch of one group. Row i's loss averages original -> paraphrase and
    paraphrase -> original; a group's loss is the mean over its rows, as in ContrastiveLoss. The cosine sums
    (diagnostics.py) come free with the similarities."""
    with torch.autocast(a.device.type, enabled=False):  # bf16 cosines / 0.05 would be off by several percent
        a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
        a_all, first = (a, 0) if within_groups else gather(a, world)  # (N, D): N = B in one process
        b_all, _ = (b, 0) if within_groups else gather(b, world)
        sim_ab, sim_ba = a @ b_all.T / temperature, b @ a_all.T / temperature  # (B, N) each
        if within_groups:
            other = group_index[:, None] != group_index[None, :]  # (B, B): pairs of two groups
            sim_ab, sim_ba = (sim.masked_fill(other, float("-inf")) for sim in (sim_ab, sim_ba))
        labels = first + torch.arange(len(a), device=a.device)  # each row's positive among the N columns
        rows = (F.cross_entropy(sim_ab, labels, reduction="none")
                + F.cross_entropy(sim_ba, labels, reduction="none")) / 2  # (B,)
        losses = group_mean(rows, group_index, int(group_index.max()) + 1)  # (G,)
        return losses, cosine_sums(sim_ab, sim_ba, labels, temperature)


def group_mean(values, index, size):
    """values (N,) -> (size,): the mean of the entries of each index 0..size-1."""
    sums = values.new_zeros(size).index_add(0, index, values)
    return sums / values.new_zeros(size).index_add(0, index, torch.ones_like(values))


def coin_loss(gen, ctr, lam):
    """CoIN's objective per group: (gen + w * ctr, w) with w = min(lam, detach(gen / ctr)); gen, ctr (G,).

    The weight is a constant to autograd: the contrastive term's value becomes the generation loss's (unless
    lam caps it), while its gradient is the InfoNCE gradient scaled by gen / ctr. The official code scales
    ctr by lam first and then by min(lam, gen / (lam ctr)) when lam ctr > gen: the same w.
    """
    weight = torch.clamp(gen.detach() / ctr.detach(), max=lam)
    return gen + weight * ctr, weight


def generation_loss(model, hidden, labels, group_index):
    """(G,): per group, the token-mean cross-entropy of its originals plus that of its paraphrases.

    hidden (2B, T, D), labels (2B, T), group_index (B,). Logits are computed only where a label is supervised
    (a few answer tokens per row), never for all 2B x T x V positions: position t predicts label t + 1.
    """
    B = len(group_index)
    targets = labels[:, 1:]                                    # (2B, T-1)
    supervised = targets != IGNORE_INDEX                       # (2B, T-1)
    logits = model.lm_head(hidden[:, :-1][supervised]).float()  # (N, V), N supervised tokens
    token_loss = F.cross_entropy(logits, targets[supervised], reduction="none")  # (N,)
    row = supervised.nonzero()[:, 0]                           # (N,): each token's row
    G = int(group_index.max()) + 1
    view_group = group_index.repeat(2)[row] + G * (row >= B)  # (N,): originals 0..G-1, paraphrases G..2G-1
    per_view = group_mean(token_loss, view_group, 2 * G)       # (2G,)
    return per_view[:G] + per_view[G:]


def micro_batch_loss(model, batch, step_groups, temperature, lam, contrastive=True, within_groups=True,
                     pooling="last", world=World()):
    """One forward over the 2B rows of `batch`; returns (the loss to backpropagate, metric sums).

    The loss is the sum of this micro-batch's loss_g divided by step_groups, the groups of the whole step, so
    that the gradients accumulated over a step are those of the mean over its groups: the same for any
    micro-batch size. Metric sums are over the micro-batch's groups (diagnostics.SUMMED). InfoNCE runs in
    both arms: without --contrastive its cosines are the control, and its loss is not trained.
    """
    group_index, lengths = batch["group_index"], batch["attention_mask"].sum(1)  # (B,), (2B,)
    hidden = bucketed_hidden_states(model, batch["input_ids"], lengths, batch["bucket"])  # (2B, T, D)
    gen = generation_loss(model, hidden, batch["labels"], group_index)  # (G,)
    pooled = pool(hidden, lengths, batch["last_index"], pooling)  # (2B, D)
    ctr, cosines = info_nce(*pooled.chunk(2), group_index, temperature, within_groups, world)  # (G,)
    total, weight = coin_loss(gen, ctr, lam)
    if not contrastive:  # continual instruction tuning: the generation loss alone
        total, ctr, weight = gen, torch.zeros_like(gen), torch.zeros_like(gen)
    parts = {name: value.sum().item() for name, value in
             dict(loss=total, gen=gen, ctr=ctr, weight=weight, capped=weight >= lam).items()}
    return total.sum() / step_groups, dict(parts, **cosines, groups=len(gen))


def learning_rate(step, total_steps, peak_lr, warmup_steps):
    """The learning rate of optimizer step `step` (0-based): HF's get_linear_schedule_with_warmup, which the
    official Trainer uses: linear from 0 over warmup_steps (so the first update has lr 0), then linear decay
    to 0 at total_steps."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    return peak_lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


# -----------------------------------------------------------------------------
# 3. Model and data. Precision: bf16 weights and autocast where supported, fp16 + GradScaler otherwise, fp32
# when asked (config.resolve_precision). LoRA weights and AdamW state stay fp32 whatever the choice
# (model.py); RMSNorm, softmax and the losses run in fp32.

def build_model(cfg, device, dtype):
    """(model, tokenizer, lora): the base with a trainable LoRA, continued from --adapter or fresh (on a base
    that --merge-adapter made). lora: the LoRA settings in use, which an --adapter's own config decides."""
    model = load_model(cfg.base, dtype=dtype, device=device, max_tokens=cfg.cutoff)
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


def steps_of_epoch(dataset, cfg, epoch):
    """The micro-batches (lists of dataset indices) of each optimizer step of one epoch (data.epoch_steps)."""
    return epoch_steps(dataset.groups, cfg.batch_size, cfg.micro_batch_size, cfg.seed, epoch, cfg.shuffle,
                       dataset.lengths if cfg.group_by_length else None)


def count_steps(dataset, cfg):
    return cfg.max_steps or sum(len(steps_of_epoch(dataset, cfg, epoch)) for epoch in range(cfg.epochs))


# -----------------------------------------------------------------------------
# 4. The training loop

@dataclass
class Run:
    """What a training run builds once, before its first step."""
    cfg: TrainConfig
    model: torch.nn.Module
    dataset: ContrastiveDataset
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: str
    dtype: torch.dtype
    world: World
    loss: torch.nn.Module  # micro_batch_loss(model, ...) as a module: under DDP with several processes


def check_flags(cfg):
    """(world, device, dtype), or a ValueError naming the flag at fault."""
    if not cfg.data:
        raise ValueError("--data is required: a flan_coin.jsonl file (see data.py)")
    if not cfg.base and not cfg.tiny or cfg.base and cfg.tiny and not cfg.resume:
        raise ValueError("give either --base LLAMA_DIR (a HF LLaMA directory) or --tiny (a tiny demo model)")
    device, dtype = resolve_precision(cfg.device, cfg.dtype)
    if dtype == torch.float16 and not device.startswith("cuda"):
        raise ValueError("--dtype fp16 needs a CUDA GPU; use bf16 or fp32 on a CPU")
    world, device = start(device)
    if cfg.batch_size % (cfg.micro_batch_size * world.size):
        raise ValueError(f"--batch-size {cfg.batch_size} is not a multiple of --micro-batch-size "
                         f"{cfg.micro_batch_size}" + f" x {world.size} processes" * (world.size > 1))
    return world, device, dtype


def set_up(cfg, world, device, dtype):
    """(run, checkpoint to resume or None). Everything that can be wrong with the input (flags, data, base,
    adapter) is checked before anything in --out is written or removed; --tiny's base is built aside first."""
    out = Path(cfg.out)
    examples, problems = load_examples(cfg.data, skip_bad=cfg.skip_bad)
    if problems:
        print(f"{cfg.data}: skipped {len(problems)} bad lines (--skip-bad); first: {problems[0]}")
    if not 0 <= cfg.holdout < len(examples):
        raise ValueError(f"--holdout {cfg.holdout}: {cfg.data} has {len(examples)} examples; hold out fewer")
    examples = examples[:len(examples) - cfg.holdout]  # CoIN's validation split: the file's last rows
    checkpoint = find_run(out, cfg.resume, cfg.overwrite)
    scratch = build_tiny_base(examples, cfg.seed) if cfg.tiny and not cfg.base else None
    cfg = replace(cfg, base=scratch.name) if scratch else cfg
    cfg = replace(cfg, **{key: str(Path(getattr(cfg, key)).resolve()) for key in PATHS if getattr(cfg, key)})
    model, tokenizer, lora = build_model(cfg, device, dtype)
    cfg = replace(cfg, **lora)  # recorded in config.json
    dataset = ContrastiveDataset(examples, tokenizer, cfg.cutoff, cfg.eos, cfg.truncation)
    print(f"{len(dataset)} examples in {len(dataset.groups)} groups; dropped {dataset.dropped} with no "
          f"answer token within --cutoff {cfg.cutoff} and {dataset.orphans} left without a group partner")
    if not dataset.groups:
        raise ValueError(f"{cfg.data}: no group left to train on; raise --cutoff or use --truncation middle")
    if world.main:
        clear_run(out, cfg.overwrite)
    if scratch and world.main:
        cfg = replace(cfg, base=str(install_tiny_base(scratch, out / "base")))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=0.0)  # HF Trainer's defaults, as in alpaca-lora
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    loss = wrap(model, micro_batch_loss, world, device)
    return Run(cfg, model, dataset, optimizer, scaler, device, dtype, world, loss), checkpoint


def step_batches(run, window):
    """(this process's collated micro-batches of a step, the step's number of groups over all processes)."""
    groups = len({run.dataset[i]["group"] for indices in window for i in indices})
    return [collate([run.dataset[i] for i in indices], run.dataset.pad_id, run.cfg.group_by_length)
            for indices in shard(window, run.world)], groups


def train_step(run, batches, step_groups, lr):
    """One optimizer step over this process's collated micro-batches of a step of step_groups groups (over
    all processes); returns the step's metrics, summed over the processes (skipped: fp16 overflow)."""
    started, cfg, world = time.perf_counter(), run.cfg, run.world
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    sums, bad = dict.fromkeys(SUMMED, 0.0), ""  # over this process's groups
    for i, batch in enumerate(batches):
        with accumulating(run.loss, last=i == len(batches) - 1):  # several processes: sync on the last only
            with autocast(run.device, run.dtype):
                device_batch = {key: v.to(run.device) for key, v in batch.items() if torch.is_tensor(v)}
                loss, parts = run.loss(device_batch, step_groups / world.size, cfg.temperature, cfg.lam,
                                       cfg.contrastive, cfg.negatives == "group", cfg.pooling, world)
            run.scaler.scale(loss).backward()
        if not (bad or math.isfinite(loss.item())):
            bad = f"(gen {parts['gen']}, ctr {parts['ctr']}) on examples {', '.join(batch['ids'])}"
        sums = {key: sums[key] + parts[key] for key in sums}
    counts = step_counts(batches, cfg.negatives == "group", world.size)
    totals = all_sum(dict(sums, **counts, bad=bool(bad)), world)
    if totals.pop("bad"):  # every process stops, before the optimizer step, not only the one that saw it
        raise FloatingPointError(f"non-finite loss {bad or 'in another process'}")
    run.scaler.unscale_(run.optimizer)
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, 1.0)  # HF Trainer's max_grad_norm
    scale = run.scaler.get_scale()
    run.scaler.step(run.optimizer)  # skipped by the scaler when fp16 gradients overflowed
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return step_record(totals, step_groups, world.size, time.perf_counter() - started, lr=lr,
                       grad_norm=grad_norm.item(),
                       skipped=int(run.scaler.is_enabled() and run.scaler.get_scale() < scale))


def train(cfg):
    """Train a CoIN LoRA adapter as `cfg` says; returns the output directory (a signal: SystemExit(75); a full
    disk: SystemExit(74), run_folder.py)."""
    world, device, dtype = check_flags(cfg)
    with claim(cfg.out, world.main, "the checkpoints written before it are kept"):  # one process per --out
        run, checkpoint = set_up(cfg, world, device, dtype)
        cfg, out, model = run.cfg, Path(run.cfg.out), run.model
        state = (restore_checkpoint(checkpoint, model, run.optimizer, run.scaler, world.main) if checkpoint
                 else {})
        step, skipped = state.get("step", 0), state.get("skipped", 0)
        total_steps = count_steps(run.dataset, cfg)
        warmup_steps = int(len(run.dataset) / cfg.batch_size * cfg.warmup_ratio)  # the official count
        if world.main:  # the other processes print nothing and write nothing (distributed.py)
            save_config(out, cfg, world_size=world.size)
        print(training_summary(model, 2 * cfg.micro_batch_size, cfg.cutoff, cfg.grad_checkpointing,
                               cfg.lora_targets.split(","), cfg.lora_r))
        windows = (step for epoch in itertools.count() for step in steps_of_epoch(run.dataset, cfg, epoch))
        bar = tqdm(itertools.islice(windows, step, total_steps), total=total_steps, initial=step, desc="coin",
                   dynamic_ncols=True, disable=not world.main)
        metrics = open_metrics(out, step) if world.main else None
        saves, started = Saves(cfg.save_every, cfg.save_every_minutes, world), time.perf_counter()
        with saves:  # the signal handlers, until the adapter is written
            for window in bar:
                try:
                    lr = learning_rate(step, total_steps, cfg.lr, warmup_steps)
                    record = train_step(run, *step_batches(run, window), lr)
                except FloatingPointError as e:
                    raise FloatingPointError(f"step {step + 1}: {e}; stopped, the last good checkpoint is "
                                             f"kept in {out}") from None
                step, skipped = step + 1, skipped + record.pop("skipped")
                log_metrics(metrics, dict(step=step, **record, skipped_steps=skipped))
                bar.set_postfix({name: f"{record[key]:.3g}" for name, key in PROGRESS.items()})
                if step == 1 and run.device.startswith("cuda"):
                    peak = torch.cuda.max_memory_allocated() / 2**30
                    bar.write(f"measured peak GPU memory after step 1: {peak:.2f} GiB")
                save, stopping = saves.after(step, total_steps)  # alike in all processes
                if world.main and save:
                    save_checkpoint(out, model, run.optimizer, run.scaler, cfg, step, skipped)
                if stopping:
                    raise stop_run(saves.received, world, f"saved step {step} in {out}")
            if world.main:
                save_final(out, model, cfg)  # the finished run: out/ itself is a peft adapter directory
    print(f"done: steps {total_steps}, {time.perf_counter() - started:.0f} s, skipped (fp16 overflow) "
          f"{skipped}; the adapter is in {out}")
    return finish(world, out)


# -----------------------------------------------------------------------------
# 5. Command line

def main(argv=None):
    try:
        train(parse_config(argv))
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
