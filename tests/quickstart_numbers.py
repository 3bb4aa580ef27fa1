"""The answers a Quickstart run on a shipped base must give on every CPU; another CPU's rounding, emulated.

tests/test_replicate.py runs replicate.py on examples/toy_bases/base0 with two of the Quickstart's arms and
compares each answer's rank margin and each cell's accuracy with expected_toy_base0.json, which this file
writes from the same code path:

    python tests/quickstart_numbers.py      # rewrites tests/expected_toy_base0.json (about a minute)

What another CPU changes. Every CPU starts from the same weights (the shipped base, the adapter's seeded
initialisation), and its kernels add the same terms in another order: on the same weights a logit moves by at
most (T + I) u max |logit| (conftest.assert_decided_beyond_rounding). Over 40 AdamW steps no such bound holds
(an entry whose gradient is within rounding of zero moves by lr one way or the other), so the test measures
how far rounding carries instead: moved_rounding() moves every layer's output, every logit and every
cross-entropy by its whole rounding bound with random signs, a CPU that rounds as far as fp32 allows
everywhere. How far that moves an answer's margin (D) is what one CPU's rounding can do; two CPUs differ by at
most 2D. An answer whose committed margin is within 2D of zero may flip; every other answer may not.
"""
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import replicate  # noqa: E402
from model import DecoderLayer  # noqa: E402
from model_config import read_model_args  # noqa: E402

BASE = replicate.TOY_BASES / "base0"
EXPECTED = ROOT / "tests" / "expected_toy_base0.json"
ARGS = ["--bases", str(BASE), "--arms", "continual=--no-contrastive; coin="]
U = 2.0**-24  # fp32's unit roundoff


def numbers(out):
    """{arm: {margins, accuracy}} of a run in out: each example's rank margin per cell (scoring.margin) and
    each cell's accuracy."""
    found = {}
    for arm_dir in sorted(Path(out).glob("seed0/*/")):
        scores = json.loads((arm_dir / "scores.json").read_text())
        found[arm_dir.name] = dict(margins=scores["margins"],
                                   accuracy={key: cell["accuracy"] for key, cell in scores["cells"].items()})
    return found


@contextlib.contextmanager
def moved_rounding(seed=0):
    """Within it, the model computes as a CPU that rounds otherwise: each decoder layer's output moves by
    (T + D + I) u max |x| (its longest sums: attention over T = --cutoff 128 positions, the projections over
    the width D, the MLP over its I units), each logit of lm_head by (T + I) u max |logit|, each logsumexp
    of a cross-entropy or log-softmax over n classes by sqrt(n) u, all with random signs. A cross-entropy
    stays at least 0, as in any IEEE arithmetic (its sum includes exp(0) = 1)."""
    args = read_model_args(BASE / "config.json")
    layer_bound = (128 + args.dim + args.intermediate_size) * U
    logit_bound = (128 + args.intermediate_size) * U
    signs, functional = torch.Generator().manual_seed(seed), torch.nn.functional
    cross_entropy, log_softmax = functional.cross_entropy, functional.log_softmax

    def sign(shape):
        return torch.randint(0, 2, shape, generator=signs).float() * 2 - 1

    def move_outputs(module, inputs, x):  # lm_head alone maps to the vocabulary
        if isinstance(module, DecoderLayer):
            return x + sign(x.shape) * layer_bound * x.detach().abs().max()
        if isinstance(module, torch.nn.Linear) and module.out_features == args.vocab_size:
            return x + sign(x.shape) * logit_bound * x.detach().abs().max()

    def moved_cross_entropy(logits, target, **kwargs):  # (N, n): the value and its gradient, as the sum moves
        lse, moved = torch.logsumexp(logits, -1), sign(logits.shape[:-1]) * logits.shape[-1] ** 0.5 * U
        loss = cross_entropy(logits, target, **kwargs)
        return (loss + moved * (1 + lse - lse.detach())).clamp(min=0)

    def moved_log_softmax(logits, dim=-1, **kwargs):  # rank mode: each row's log-probabilities shift alike
        shift = sign(logits.shape[:-1]).unsqueeze(-1) * logits.shape[-1] ** 0.5 * U
        return log_softmax(logits, dim=dim, **kwargs) + shift
    handle = torch.nn.modules.module.register_module_forward_hook(move_outputs)
    functional.cross_entropy, functional.log_softmax = moved_cross_entropy, moved_log_softmax
    try:
        yield
    finally:
        handle.remove()
        functional.cross_entropy, functional.log_softmax = cross_entropy, log_softmax


def main():
    with tempfile.TemporaryDirectory() as out:
        replicate.main(["--out", out, *ARGS])
        found = numbers(out)
    for arm in found.values():  # 1e-6 is far below any tolerance the test allows
        arm["margins"] = {key: [round(m, 6) for m in ms] for key, ms in arm["margins"].items()}
    EXPECTED.write_text(json.dumps(found) + "\n")
    print(f"wrote {EXPECTED}")


if __name__ == "__main__":
    main()
