"""coin.py with each optimizer step's gradients recorded: what several processes must agree on with one.

    python tests/step_gradients.py GRADIENTS.pt [--frozen] COIN_FLAGS...      (or under torchrun)

Rank 0 saves [{LoRA parameter: gradient}] per step to GRADIENTS.pt: the gradients the optimizer receives,
summed over the step's micro-batches and, under torchrun, reduced over the processes. --frozen runs every
step at learning rate 0, so that AdamW leaves the weights as they were (an update of 0 x anything) and every
step's gradient is taken at the same weights in any number of processes.
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import coin  # noqa: E402


def main(path, frozen, argv):
    steps, train_step = [], coin.train_step

    def recorded(run, batches, step_groups, lr):
        names = {p: n for n, p in run.model.named_parameters() if p.requires_grad}
        hook = run.optimizer.register_step_pre_hook(
            lambda *_: steps.append({n: p.grad.clone() for p, n in names.items()}))
        try:
            return train_step(run, batches, step_groups, 0.0 if frozen else lr)
        finally:
            hook.remove()
    coin.train_step = recorded  # train() calls it by its module name
    coin.main(argv)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(steps, path)


if __name__ == "__main__":
    frozen = "--frozen" in sys.argv
    main(sys.argv[1], frozen, [a for a in sys.argv[2:] if a != "--frozen"])
