"""Tiny models for the tests, each with a module-only twin that curvlinops can read."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FunctionalMLP(nn.Module):
    """A ReLU MLP whose layers are spelled four ways: F.linear, x @ W (weight stored (in, out),
    no bias), torch.addmm with W.T, and einsum (no bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.W1 = nn.Parameter(torch.randn(6, 5) / 5**0.5)
        self.b1 = nn.Parameter(torch.randn(6) / 5)
        self.W2 = nn.Parameter(torch.randn(6, 7) / 6**0.5)
        self.W3 = nn.Parameter(torch.randn(4, 7) / 7**0.5)
        self.b3 = nn.Parameter(torch.randn(4) / 5)
        self.W4 = nn.Parameter(torch.randn(3, 4) / 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(F.linear(x, self.W1, self.b1))
        h = torch.relu(h @ self.W2)
        h = torch.relu(torch.addmm(self.b3, h, self.W3.T))
        return torch.einsum("bi,oi->bo", h, self.W4)

    def twin(self) -> nn.Module:
        """The same function built from nn.Linear modules (names '0', '2', '4', '6')."""
        net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 7, bias=False), nn.ReLU(),
                            nn.Linear(7, 4), nn.ReLU(), nn.Linear(4, 3, bias=False))
        with torch.no_grad():
            net[0].weight.copy_(self.W1)
            net[0].bias.copy_(self.b1)
            net[2].weight.copy_(self.W2.T)
            net[4].weight.copy_(self.W3)
            net[4].bias.copy_(self.b3)
            net[6].weight.copy_(self.W4)
        return net

    twin_names = {"W1": "0", "W2": "2", "W3": "4", "W4": "6"}


class SharedMLP(nn.Module):
    """One linear layer applied to both halves of the input (a shared weight, two uses)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 2, 5)
        return self.head(torch.tanh(self.shared(x[:, 0])) + torch.tanh(self.shared(x[:, 1])))

    def twin(self) -> nn.Module:
        """The same function with the shared layer applied once over a position axis."""
        return _Stacked(self)

    twin_names = {"shared": "shared", "head": "head"}


class _Stacked(nn.Module):
    def __init__(self, shared: SharedMLP) -> None:
        super().__init__()
        self.shared = nn.Linear(5, 6)
        self.head = nn.Linear(6, 3)
        self.load_state_dict(shared.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.shared(x)).sum(1))


class SequenceMLP(nn.Module):
    """A linear layer over (N, T, features), averaged over positions, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(x)).mean(1))

    def twin(self) -> nn.Module:
        return self

    twin_names = {"embed": "embed", "head": "head"}


def module_mlp() -> nn.Sequential:
    """A tanh/ReLU MLP of nn.Linear modules with biases."""
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


class ModuleMLP(nn.Module):
    """Wrapper giving :func:`module_mlp` the twin interface."""

    def __init__(self) -> None:
        super().__init__()
        self.net = module_mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def twin(self) -> nn.Module:
        return self

    twin_names = {"net.0": "net.0", "net.2": "net.2", "net.4": "net.4"}
