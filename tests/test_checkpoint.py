"""state_dict -> fresh optimizer -> load_state_dict continues exactly like the original."""

from __future__ import annotations

import copy

import torch
from torch import nn

import curvgraph


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 4))


def batches(n: int):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(10, 6, generator=g), torch.randint(0, 4, (10,), generator=g)) for _ in range(n)]


def compile_(m: nn.Module) -> curvgraph.CurvatureOptimizer:
    # MC Fisher (consumes the optimizer's RNG), momentum, Adam fallback, a refresh every 3 steps.
    return curvgraph.compile(m, (torch.randn(10, 6),), fisher="mc", invert_every=3, seed=123, backend="eager")


def run(opt, data) -> list[float]:
    return [opt.step(x, y).item() for x, y in data]


def checkpoint_run():
    """Train 4 steps, checkpoint model and optimizer, train 5 more: (model, checkpoint, later losses, data)."""
    data = batches(9)
    original = model()
    opt = compile_(original)
    run(opt, data[:4])
    checkpoint = copy.deepcopy({"model": original.state_dict(), "opt": opt.state_dict()})
    return original, checkpoint, run(opt, data[4:]), data


def test_checkpoint_continues_identically():
    original, checkpoint, losses, data = checkpoint_run()
    resumed = model()
    resumed.load_state_dict(checkpoint["model"])
    opt = compile_(resumed)
    opt.load_state_dict(checkpoint["opt"])
    assert run(opt, data[4:]) == losses
    for a, b in zip(original.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert opt.state_dict()["step_count"] == 9


def test_fresh_optimizer_does_not_continue_identically():
    """The control for the test above: without the optimizer state the run differs."""
    _, checkpoint, losses, data = checkpoint_run()
    resumed = model()
    resumed.load_state_dict(checkpoint["model"])
    assert run(compile_(resumed), data[4:]) != losses
