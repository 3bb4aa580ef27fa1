"""Benchmark: evaluate.py's batched greedy decoding against the official protocol's style, in examples/s.

Both sides get the same random "small" LLaMA (D 768, 12 layers, 12 heads, I 2048, V 32000), the same 64
sst2-like inputs of about 80 tokens from the real LLaMA tokenizer, and decode greedily at most 7 new tokens:

  peer  transformers LlamaForCausalLM.generate, one example at a time, as PromptBench's loop calls it
  ours  evaluate.generate_batched: --batch-size inputs of similar length per model.generate call, left-padded,
        a KV cache, a prefill that computes the last position's logits only, and the batch's common prefix
        (the instruction, about 30 of the 80 tokens) computed once and shared

Targets: ours >= 3x the peer on a CPU, >= 20x on a GPU. The script also counts the examples whose new tokens
are identical on both sides (all of them in fp32, barring exact near-ties).

Usage: python benchmarks/bench_evaluate.py [--batch-size 32] [--n 64] [--device cpu|cuda] [--dtype fp32|bf16]
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from evaluate import build_input, generate_batched  # noqa: E402
from precision import DTYPES  # noqa: E402
from glue import load_task  # noqa: E402
from hf_io import load_model  # noqa: E402
from model import ModelArgs  # noqa: E402
from model_config import hf_config  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

SMALL = ModelArgs(dim=768, n_layers=12, n_heads=12, intermediate_size=2048, vocab_size=32000)
TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "llama" / "tokenizer.model"
TARGET_TOKENS, MAX_NEW_TOKENS = 80, 7  # input length of the setup; the protocol's answer budget


def sst2_like_inputs(tokenizer, n):
    """n token-id inputs: a shipped sst2 instruction + review sentences of the demo set,
    about 80 tokens each."""
    instruction = json.loads((ROOT / "prompts" / "perturbed.json").read_text())["clean"]["sst2"][0]
    sentences = [ex["content"] for ex in load_task("sst2", ROOT / "examples" / "glue_demo")]
    inputs = []
    for i in range(n):  # add review sentences until the input reaches about TARGET_TOKENS
        content, j = sentences[i % len(sentences)], i
        while len(tokenizer.encode(build_input(instruction, content))) < TARGET_TOKENS - 12 + i % 16:
            j += 7
            content += ", and " + sentences[j % len(sentences)]
        inputs.append(tokenizer.encode(build_input(instruction, content)))
    return inputs


def build_pair(dtype, device):
    """(ours, peer): the same random weights, in eval mode."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(SMALL)))
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = load_model(tmp, dtype=dtype, device=device)
    return ours, hf.to(device, dtype).eval()


def run_peer(hf, inputs, eos_id, pad_id):
    """New ids per input: HF generate on one example at a time (greedy), trimmed after eos as ours are."""
    outputs = []
    for ids in inputs:
        x = torch.tensor([ids], device=hf.device)
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_NEW_TOKENS,
                          do_sample=False, eos_token_id=eos_id, pad_token_id=pad_id)[0, len(ids):].tolist()
        outputs.append(out[:out.index(eos_id) + 1] if eos_id in out else out)
    return outputs


def timed(fn, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32, help="our inputs per generate call")
    parser.add_argument("--n", type=int, default=64, help="inputs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    args = parser.parse_args()
    tokenizer = Tokenizer(TOKENIZER)
    inputs = sst2_like_inputs(tokenizer, args.n)
    ours, peer = build_pair(DTYPES[args.dtype], args.device)
    eos, pad = tokenizer.eos_id, tokenizer.pad_id
    lengths = sorted(map(len, inputs))
    print(f"{args.n} inputs of {lengths[0]}-{lengths[-1]} tokens (mean {sum(lengths) / len(lengths):.0f}), "
          f"{MAX_NEW_TOKENS} new tokens, {args.device} {args.dtype}, {torch.get_num_threads()} threads")
    run_peer(peer, inputs[:2], eos, pad)  # warm-up: kernels, allocator, lazy inits
    generate_batched(ours, inputs[:args.batch_size], args.batch_size, MAX_NEW_TOKENS, eos, pad)
    with torch.no_grad():
        mine, t_ours = timed(lambda: generate_batched(ours, inputs, args.batch_size,
                                                      MAX_NEW_TOKENS, eos, pad), args.device)
        theirs, t_peer = timed(lambda: run_peer(peer, inputs, eos, pad), args.device)
    for name, t in (("transformers generate, 1 at a time", t_peer),
                    (f"evaluate.py, batches of {args.batch_size}", t_ours)):
        print(f"{name:<50} {args.n / t:7.2f} examples/s ({t:5.1f} s, {t_peer / t:4.1f}x)")
    target = 20 if args.device.startswith("cuda") else 3
    print(f"speed-up {t_peer / t_ours:.1f}x (target >= {target}x); identical new tokens: "
          f"{sum(a == b for a, b in zip(mine, theirs))}/{args.n}")


if __name__ == "__main__":
    main()
