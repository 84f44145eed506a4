"""The zoo of tests/zoo.py: coverage, loss after 50 steps at the defaults against AdamW, time to first step.

Usage::

    python benchmarks/zoo.py                   # every model, compiled (Inductor)
    python benchmarks/zoo.py --backend eager   # the loss columns only, quickly

For every model, from the same initialization and on the same 50 minibatches of 32
(the training set and batches of tests/test_zoo.py): curvgraph at its defaults, and
``torch.optim.AdamW`` at learning rates 3e-4, 1e-3 and 3e-3 (the best final loss counts).
Reported: the share of trainable parameter entries in curvature blocks, the training
loss (whole set, eval mode) before and after 50 steps, and curvgraph's time to first
step (``curvgraph.compile`` and the first step, in this process; the Inductor cache as
it is).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import curvgraph  # noqa: E402
from test_zoo import LOSSES, predict, select, training_loss  # noqa: E402
from zoo import ZOO  # noqa: E402

ADAMW_LRS = (3e-4, 1e-3, 3e-3)
STEPS, BATCH = 50, 32


def minibatches(name: str):
    case = ZOO[name]
    inputs, targets = case.data(torch.Generator().manual_seed(1))
    batch_dim = 1 if name.endswith("time-major") else 0
    examples = targets.shape[0]
    g = torch.Generator().manual_seed(2)
    order = torch.cat([torch.randperm(examples, generator=g) for _ in range(BATCH * STEPS // examples + 1)])
    batches = [(select(inputs, order[BATCH * i: BATCH * (i + 1)], batch_dim), targets[order[BATCH * i: BATCH * (i + 1)]])
               for i in range(STEPS)]
    return inputs, targets, batch_dim, batches


def run_curvgraph(name: str, backend: str) -> dict:
    case = ZOO[name]
    inputs, targets, batch_dim, batches = minibatches(name)
    torch.manual_seed(0)
    model = case.make()
    initial = training_loss(model, inputs, targets, case.loss, case.output)
    start = time.perf_counter()
    opt = curvgraph.compile(model, batches[0][0], loss=case.loss, backend=backend, seed=0, progress=False,
                            batch_dim=batch_dim, output=case.output)
    opt.step(*batches[0])
    first = time.perf_counter() - start
    for x, y in batches[1:]:
        opt.step(x, y)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    covered = sum(model.get_parameter(p).numel() for b in opt.plan.blocks for p in b.params)
    return {"initial": initial, "final": training_loss(model, inputs, targets, case.loss, case.output),
            "first_step_s": first,
            "covered": covered / trainable, "skipped": opt.skipped_steps}


def run_adamw(name: str, lr: float) -> float:
    case = ZOO[name]
    inputs, targets, _, batches = minibatches(name)
    torch.manual_seed(0)
    model = case.make()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for x, y in batches:
        loss = LOSSES[case.loss](predict(model, x, case.output), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return training_loss(model, inputs, targets, case.loss, case.output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(ZOO), choices=list(ZOO))
    parser.add_argument("--backend", default="inductor")
    args = parser.parse_args()
    print(f"{'model':<34} {'in blocks':>9} {'initial':>8} {'curvgraph':>9} {'AdamW best':>10} {'(lr)':>7} "
          f"{'first step s':>12}")
    for name in args.models:
        ours = run_curvgraph(name, args.backend)
        adamw = {lr: run_adamw(name, lr) for lr in ADAMW_LRS}
        best = min(adamw, key=adamw.get)
        print(f"{name:<34} {100 * ours['covered']:>8.1f}% {ours['initial']:>8.3f} {ours['final']:>9.3g} "
              f"{adamw[best]:>10.3g} {best:>7g} {ours['first_step_s']:>12.1f}", flush=True)


if __name__ == "__main__":
    main()
