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


def test_checkpoint_continues_identically():
    data = batches(9)
    original = model()
    opt = compile_(original)
    run(opt, data[:4])
    saved_model = copy.deepcopy(original.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    losses = run(opt, data[4:])

    resumed = model()
    resumed.load_state_dict(saved_model)
    opt2 = compile_(resumed)
    opt2.load_state_dict(saved_opt)
    assert run(opt2, data[4:]) == losses
    for a, b in zip(original.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert opt2.state_dict()["step_count"] == 9


def test_fresh_optimizer_does_not_continue_identically():
    """The control for the test above: without the optimizer state the run differs."""
    data = batches(9)
    original = model()
    opt = compile_(original)
    run(opt, data[:4])
    saved_model = copy.deepcopy(original.state_dict())
    losses = run(opt, data[4:])

    resumed = model()
    resumed.load_state_dict(saved_model)
    assert run(compile_(resumed), data[4:]) != losses
