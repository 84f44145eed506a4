"""Training: K-FAC with default hyper-parameters against Adam on a real data set."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn

import curvgraph


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def batch_indices(n: int, steps: int, batch: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g)
        out += [perm[i : i + batch] for i in range(0, n - batch + 1, batch)]
    return out[:steps]


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


def test_kfac_beats_adam_on_digits_in_100_steps():
    x, y = digits()
    steps = batch_indices(len(x), 100, 64, seed=0)

    adam_model = make_model(0)
    adam = torch.optim.Adam(adam_model.parameters(), lr=1e-3)
    for idx in steps:
        adam.zero_grad()
        nn.functional.cross_entropy(adam_model(x[idx]), y[idx]).backward()
        adam.step()

    kfac_model = make_model(0)
    kfac = curvgraph.compile(kfac_model, (x[:64],), loss="cross_entropy", backend="eager")
    for idx in steps:
        kfac.step(x[idx], y[idx])

    with torch.no_grad():
        adam_loss = nn.functional.cross_entropy(adam_model(x), y).item()
        kfac_loss = nn.functional.cross_entropy(kfac_model(x), y).item()
    assert kfac.skipped_steps == 0
    assert kfac_loss < 0.5 * adam_loss, (kfac_loss, adam_loss)
