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


def gelu_mlp(seed: int) -> nn.Module:
    """The MNIST-1D MLP of the time-to-target benchmark: three GELU hidden layers of width 128."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 128),
                         nn.GELU(), nn.Linear(128, 10))


def test_defaults_reach_a_loss_fixed_lr_adam_does_not_on_mnist1d():
    """With default settings (quadratic-model step size, momentum and damping) K-FAC's training loss after
    240 steps is below what Adam reaches in as many steps at any of three fixed learning rates."""
    from curvgraph.demo import load_mnist1d

    data = load_mnist1d()
    x, y = data.x_train, data.y_train
    steps = batch_indices(len(x), 240, 100, seed=0)

    def full_loss(model: nn.Module) -> float:
        with torch.no_grad():
            return nn.functional.cross_entropy(model(x), y).item()

    adam_losses = []
    for lr in (1e-3, 3e-3, 1e-2):
        model = gelu_mlp(0)
        adam = torch.optim.Adam(model.parameters(), lr=lr)
        for idx in steps:
            adam.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            adam.step()
        adam_losses.append(full_loss(model))

    model = gelu_mlp(0)
    opt = curvgraph.compile(model, (x[:100],), backend="eager", seed=0)
    assert opt.method.adaptive  # the defaults are the adaptive mode
    for idx in steps:
        opt.step(x[idx], y[idx])
    kfac_loss = full_loss(model)
    assert opt.skipped_steps == 0
    assert kfac_loss < 0.5 * min(adam_losses), (kfac_loss, adam_losses)
