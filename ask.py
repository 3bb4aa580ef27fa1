"""ask.py: ask a tuned model your own instruction, and see how one instruction's answer survives perturbation.

alpaca-lora's generate.py for coin's checkpoints, plus the question CoIN asks of an instruction: does the
answer survive a typo, a synonym, a paraphrase?

    python ask.py --ckpt out/ "Is this review positive or negative?" --input "A gorgeous, witty film."
    python ask.py --base llama-7b-hf --adapter alpaca-lora-7b "Name three primary colors."
    python ask.py --ckpt out/ "..." --temperature 0.7 --top-p 0.75 --seed 1     # sampled
    python ask.py --ckpt out/ "..." --input "..." --robustness 3 --max-new-tokens 7
    python ask.py --ckpt out/                     # a loop: an instruction, an input, the answer; Ctrl-D ends

The model: --ckpt (coin.py's output dir, whose config.json names the base) or --base [--adapter], resolved by
evaluate.py's resolve_paths, as evaluate.py takes them.

The prompt: coin.py's training format (evaluate.py --format train): BOS, then data.PROMPT_TEMPLATE around
the instruction, a space and the input; with no input, the instruction alone. It is CoIN's format, not
alpaca-lora's Alpaca template ("Below is an instruction ... ### Instruction:").

Decoding: greedy by default, through model.generate. --temperature T > 0 samples from softmax(logits / T),
cut to the top-p nucleus (the smallest set of tokens whose probability reaches p, as HF's TopPLogitsWarper
that alpaca-lora's GenerationConfig uses), from a generator seeded by --seed. An answer ends at eos or after
--max-new-tokens. It is streamed: after each token, all of the answer's ids so far are decoded and the new
end of the text is printed, so sentencepiece's spaces come out right, and a character of several byte tokens
waits until it is whole. What is printed is the answer, decoded once at the end.

--robustness N: the clean instruction and N versions of it from each of perturb.py's perturbers (deepwordbug,
textfooler, checklist, semantic; version i uses seed --seed + i), each with the same --input, answered
greedily in batches through model.generate by the tuned model and by the model without it: the base (its
LoRA layers switched off, one load), or, with --ckpt and --adapter, the model under that baseline adapter.
LoRALinear holds one adapter, so the baseline then loads the base again, after the tuned model is freed:
memory stays at one model, time pays for two loads. Under the table, for each model, how many perturbed
instructions got exactly its answer to the clean one.

Next: read export.py.
"""
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from data import PROMPT_TEMPLATE
from evaluate import EvalConfig, build_input, generate_batched, resolve_paths
from flags import COUNT, NON_NEGATIVE, SEED, SHARE, ArgumentParser, checked, up_to
from hf_io import load_adapter, load_model, load_tokenizer, read_adapter_config
from model import LoRALinear, generate
from perturb import LEVELS, perturb
from precision import DTYPES, resolve_precision

# -----------------------------------------------------------------------------
# 1. Flags: alpaca-lora's generate.py defaults, except greedy decoding


def parse_args(argv=None):
    p = ArgumentParser(description="Ask a tuned model an instruction; --robustness N: under perturbations.")
    p.add_argument("instruction", nargs="?", help="the instruction (none: ask in a loop until Ctrl-D)")
    p.add_argument("--input", default="", help="the input the instruction is about (default: none)")
    p.add_argument("--ckpt", default="", help="coin.py output dir: adapter + config.json naming the base")
    p.add_argument("--base", default="", help="HF LLaMA dir: the checkpoint's base, or a model asked alone")
    p.add_argument("--adapter", default="", help="peft LoRA dir on --base; with --ckpt: the baseline that "
                                                 "--robustness compares with (default: the base)")
    p.add_argument("--temperature", type=checked(float, NON_NEGATIVE), default=0.0,
                   help="0: greedy (default); above 0: sampling (alpaca-lora: 0.1)")
    p.add_argument("--top-p", type=checked(float, SHARE), default=0.75,
                   help="sample from the top-p nucleus (alpaca-lora: 0.75)")
    p.add_argument("--max-new-tokens", type=checked(int, up_to(2048, "LLaMA's context")), default=128,
                   help="tokens per answer at most (alpaca-lora: 128)")
    p.add_argument("--seed", type=checked(int, SEED), default=0, help="seeds sampling and the perturbations")
    p.add_argument("--robustness", type=checked(int, up_to(100, "versions per perturber")), default=None,
                   help="N versions of the instruction per perturber, answered with and without the adapter")
    p.add_argument("--batch-size", type=checked(int, COUNT), default=32,
                   help="--robustness prompts per batch")
    p.add_argument("--dtype", choices=tuple(DTYPES),
                   help="weights (default: bf16 on a GPU or a bf16 CPU, else fp32)")
    p.add_argument("--device", default="", help="cuda | cpu (default: cuda when there is a GPU)")
    return p.parse_args(argv)


@dataclass(frozen=True)
class Plan:
    """What the flags name, resolved and checked before any model loads."""
    base: Path
    tuned: Path | None     # the adapter asked
    baseline: Path | None  # --robustness's other model: None is the base alone
    device: str
    dtype: torch.dtype


def check_flags(args):
    """A Plan and the base's tokenizer, or a ValueError / FileNotFoundError naming the flag at fault."""
    if args.instruction is not None and not args.instruction.strip():
        raise ValueError("the instruction is empty; give one, or none to ask in a loop")
    if args.robustness and args.instruction is None:
        raise ValueError("--robustness N perturbs the instruction given: add one")
    ckpt_alone = EvalConfig(ckpt=args.ckpt, base=args.base, adapter="" if args.ckpt else args.adapter)
    base, tuned, _ = resolve_paths(ckpt_alone)
    baseline = Path(args.adapter) if args.ckpt and args.adapter else None
    if args.robustness and tuned is None:
        raise ValueError("--robustness compares answers with and without an adapter: "
                         "give --ckpt, or --adapter")
    for adapter in (tuned, baseline):
        if adapter:
            read_adapter_config(adapter)  # a missing or non-LoRA adapter is refused now, not after the base
    tokenizer = load_tokenizer(base)  # and config.json
    return Plan(base, tuned, baseline, *resolve_precision(args.device, args.dtype)), tokenizer


def load(plan, adapter):
    """The base of `plan` in eval mode, under `adapter` if one is given."""
    model = load_model(plan.base, plan.dtype, plan.device)
    if adapter:
        load_adapter(model, adapter)
    return model


# -----------------------------------------------------------------------------
# 2. One answer: the prompt, the next-token choice, streaming

def prompt_ids(tokenizer, instruction, input_text):
    """BOS + the ids of coin.py's training format (module docstring)."""
    if input_text.strip():
        return tokenizer.encode(build_input(instruction, input_text, "train"))
    return tokenizer.encode(PROMPT_TEMPLATE.format(instruction=instruction.strip()))


def greedy(logits):
    """(B, V) -> (B,): the argmax, as model.generate takes it."""
    return logits.argmax(-1)


def sampler(temperature, top_p, generator):
    """choose(logits (B, V)) -> (B,) ids drawn from softmax(logits / temperature) cut to the top-p nucleus."""
    def choose(logits):
        probs = (logits.float() / temperature).softmax(-1)
        sorted_probs, order = probs.sort(-1, descending=True)  # (B, V) each
        # A token stays if the tokens more likely than it hold less than top_p: the first always stays.
        sorted_probs[sorted_probs.cumsum(-1) - sorted_probs >= top_p] = 0.0
        drawn = torch.multinomial(sorted_probs, 1, generator=generator)  # (B, 1), renormalised by torch
        return order.gather(-1, drawn)[:, 0]
    return choose


class Streamer:
    """Prints an answer as its ids come: all of them decoded, the text not yet printed printed. A text ending
    in U+FFFD (an incomplete character of byte tokens) waits for the next id."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out, self.ids, self.shown = tokenizer, out, [], ""

    def add(self, token):
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd") and text.startswith(self.shown):
            self.show(text)

    def show(self, text):
        self.out.write(text[len(self.shown):])
        self.out.flush()
        self.shown = text

    def finish(self):
        """The answer, decoded once; whatever of it is not printed yet is printed now."""
        text = self.tokenizer.decode(self.ids)
        self.show(text)
        return text


def answer(model, tokenizer, ids, args, generator, out=None):
    """The answer to one prompt (ids), printed to `out` as it is generated: returns (its text, its ids)."""
    pick = sampler(args.temperature, args.top_p, generator) if args.temperature else greedy
    streamer = Streamer(tokenizer, out or sys.stdout)

    def choose(logits):  # (1, V) -> (1,)
        token = pick(logits)
        streamer.add(token.item())
        return token
    generate(model, [ids], args.max_new_tokens, tokenizer.eos_id, tokenizer.pad_id, choose)
    return streamer.finish(), streamer.ids


# -----------------------------------------------------------------------------
# 3. Robustness: one instruction under perturbation, with and without the adapter

def variants(instruction, n, seed):
    """[(perturber, text)]: ("clean", instruction), then n versions per perturber, version i at seed + i."""
    return [("clean", instruction)] + [(level, perturb(instruction, level, seed + i))
                                       for level in LEVELS[1:] for i in range(n)]


def answers(model, tokenizer, instructions, args):
    """Greedy answers (text) to each instruction with --input, in batches through model.generate."""
    prompts = [prompt_ids(tokenizer, instruction, args.input) for instruction in instructions]
    new = generate_batched(model, prompts, args.batch_size, args.max_new_tokens, tokenizer.eos_id,
                           tokenizer.pad_id)
    return [tokenizer.decode(ids) for ids in new]


def switch_lora(model, on):
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.disabled = not on


def cell(text):
    """Text as one markdown table cell."""
    return text.replace("|", "\\|").replace("\n", "\\n")


def robustness(plan, tokenizer, args):
    """Print the table (perturber, instruction, answer with the adapter, answer without) and the counts."""
    rows = variants(args.instruction, args.robustness, args.seed)
    texts = [text for _, text in rows]
    model = load(plan, plan.tuned)
    tuned = answers(model, tokenizer, texts, args)
    if plan.baseline is None:  # the base: the same model, every LoRA layer switched off
        switch_lora(model, on=False)
    else:  # another adapter: free the tuned model first, so that one model is in memory at a time
        model = None
        model = load(plan, plan.baseline)
    other = answers(model, tokenizer, texts, args)
    names = (f"with {plan.tuned.resolve().name}",
             f"with {plan.baseline.resolve().name}" if plan.baseline else "base (adapter off)")
    print(f"| perturber | instruction | {names[0]} | {names[1]} |\n|---|---|---|---|")
    for (kind, text), a, b in zip(rows, tuned, other):
        print(f"| {kind} | {cell(text)} | {cell(a)} | {cell(b)} |")
    print()
    for name, got in zip(names, (tuned, other)):
        same = sum(a == got[0] for a in got[1:])
        print(f"{name}: {same} of {len(got) - 1} perturbed instructions answered as the clean one")


# -----------------------------------------------------------------------------
# 4. The loop, and the command line

def ask_in_a_loop(model, tokenizer, args, generator):
    """Read an instruction and an input (empty: none), answer, repeat; end of input (Ctrl-D) ends it."""
    print("Type an instruction, then its input (or nothing); Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            instruction = input("Instruction: ").strip()
            if not instruction:
                print("(an empty instruction: type one)")
                continue
            input_text = input("Input: ")
        except EOFError:
            print()
            return
        print("Response: ", end="")
        answer(model, tokenizer, prompt_ids(tokenizer, instruction, input_text), args, generator)
        print("\n")


def main(argv=None):
    args = parse_args(argv)
    try:
        plan, tokenizer = check_flags(args)
        if args.robustness:
            return robustness(plan, tokenizer, args)
        model = load(plan, plan.tuned)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    generator = torch.Generator(plan.device).manual_seed(args.seed)
    if args.instruction is None:
        return ask_in_a_loop(model, tokenizer, args, generator)
    answer(model, tokenizer, prompt_ids(tokenizer, args.instruction, args.input), args, generator)
    print()


if __name__ == "__main__":
    main()
