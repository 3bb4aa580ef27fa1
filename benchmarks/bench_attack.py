"""Benchmark: scoring an attack's candidates in batches, as attack.py asks evaluate.margin_scorer to, against
one candidate at a time and one (candidate, example) row at a time.

The model under attack is the real stories260K (../shared/models/stories260K, fp32, CPU); the candidates
are the 8 seeded DeepWordBug typos of each word of an SST-2 instruction (one call per word, as the search
makes them), each scored on an attack set of 16 demo SST-2 examples.

Usage: python benchmarks/bench_attack.py [--examples 16] [--batch-size 32]
"""
import argparse
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from attack import candidates, eligible  # noqa: E402
from evaluate import EvalConfig, margin_scorer  # noqa: E402
from glue import load_task  # noqa: E402
from hf_io import load_model, load_tokenizer  # noqa: E402
from perturb import WORD_RE, mask  # noqa: E402

INSTRUCTION = "Read the movie review below and classify its overall sentiment as 'positive' or 'negative': "


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    opts = parser.parse_args()
    stories = ROOT.parent / "shared" / "models" / "stories260K"
    model, tokenizer = load_model(stories), load_tokenizer(stories)
    examples = load_task("sst2", ROOT / "examples" / "glue_demo")[:opts.examples]
    cfg = EvalConfig(batch_size=opts.batch_size)
    batched = margin_scorer(model, tokenizer, "sst2", examples, cfg)
    rng, masked = random.Random(0), mask(INSTRUCTION)[0]
    calls = [[INSTRUCTION.replace(word, typo, 1) for typo in candidates(word, "deepwordbug", rng)]
             for word in WORD_RE.findall(masked) if eligible(word, "deepwordbug")]
    single_rows = [margin_scorer(model, tokenizer, "sst2", [ex], EvalConfig(batch_size=1)) for ex in examples]
    ways = {"batched (ours)": lambda texts: batched(texts),
            "one candidate at a time": lambda texts: [batched([t])[0] for t in texts],
            "one row at a time": lambda texts: [sum(s([t])[0] for s in single_rows) / len(examples)
                                                for t in texts]}
    with torch.no_grad():
        batched(calls[0])  # warm-up
        seconds, scores = {}, {}
        for name, score in ways.items():
            start = time.perf_counter()
            scores[name] = [s for texts in calls for s in score(texts)]
            seconds[name] = time.perf_counter() - start
    n = sum(map(len, calls))
    agree = max(abs(a - b) for a, b in zip(scores["batched (ours)"], scores["one row at a time"]))
    print(f"{n} candidates in {len(calls)} calls x {len(examples)} examples, stories260K, fp32, "
          f"{torch.get_num_threads()} threads; largest score difference between the ways: {agree:.1e}")
    for name, s in seconds.items():
        ratio = seconds[name] / seconds["batched (ours)"]
        print(f"  {name:<26}{n / s:>8.1f} candidates/s{ratio:>7.1f}x the time")


if __name__ == "__main__":
    main()
