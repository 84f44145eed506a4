"""A GRU classifier on MNIST-1D: curvgraph K-FAC against Adam, same initialization and batches.

    python examples/mnist1d_gru.py --steps 1000 --hidden 64

Each MNIST-1D example (40 values) is a sequence of 40 scalar inputs; a one-layer GRU
reads it and a linear head classifies its last hidden state (the MNIST-1D paper reports
about 91% test accuracy for a GRU). curvgraph unrolls the GRU over the 40 steps and
preconditions ``weight_ih_l0`` and ``weight_hh_l0`` (with their biases) as two rnn blocks
with 40 uses each (``print(opt.plan)``); Adam runs at its best of three learning rates.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import curvgraph
from curvgraph.demo import batches, load_mnist1d


class GRUClassifier(nn.Module):
    """``(N, 40)`` signals -> GRU over 40 steps of 1 feature -> linear head on the last hidden state."""

    def __init__(self, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x.unsqueeze(-1))
        return self.head(out[:, -1])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def compare(steps: int, batch: int = 100, hidden: int = 64, seed: int = 0, backend: str = "inductor",
            adam_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2), **options) -> dict[str, float]:
    """Test accuracy after ``steps`` steps: curvgraph (``options`` go to ``curvgraph.compile``) and Adam per lr."""
    data = load_mnist1d()
    indices = batches(len(data.x_train), batch, steps, seed)
    results = {}
    for lr in adam_lrs:
        torch.manual_seed(seed)
        model = GRUClassifier(hidden)
        adam = torch.optim.Adam(model.parameters(), lr=lr)
        for idx in indices:
            adam.zero_grad()
            nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            adam.step()
        results[f"adam {lr:g}"] = accuracy(model, data.x_test, data.y_test)
    torch.manual_seed(seed)
    model = GRUClassifier(hidden)
    start = time.perf_counter()
    opt = curvgraph.compile(model, (data.x_train[:batch],), backend=backend, seed=seed, **options)
    for idx in indices:
        opt.step(data.x_train[idx], data.y_train[idx])
    results["curvgraph"] = accuracy(model, data.x_test, data.y_test)
    results["curvgraph seconds"] = time.perf_counter() - start
    results["skipped"] = opt.skipped_steps
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="inductor")
    args = parser.parse_args()
    results = compare(args.steps, args.batch, args.hidden, args.seed, args.backend)
    for name, value in results.items():
        print(f"{name:>20}: {value:.4g}")


if __name__ == "__main__":
    main()
