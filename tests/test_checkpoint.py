"""state_dict -> fresh optimizer -> load_state_dict continues exactly like the original, for every method,
through a file; checkpoints of another method or architecture are rejected."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import curvgraph
from curvgraph.registry import METHODS


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


def method_options(method: str) -> dict:
    """The MC Fisher everywhere (its noise comes from the optimizer's generator), a refresh every 2 steps."""
    return {"T": 2} if method == "singd" else {"invert_every": 2}


def compile_for(method: str, m: nn.Module) -> curvgraph.CurvatureOptimizer:
    return curvgraph.compile(m, (torch.randn(10, 6),), method=method, fisher="mc", seed=7, backend="eager",
                             **method_options(method))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_checkpoint_file_resumes_bit_for_bit(tmp_path, method):
    """3 steps, torch.save, a fresh model and optimizer from torch.load(weights_only=True), 3 more steps: the same
    losses and parameters, bit for bit, as 6 uninterrupted steps (the MC sampler's generator included)."""
    data = batches(6)
    uninterrupted = model()
    opt = compile_for(method, uninterrupted)
    expected = run(opt, data)

    first = model()
    opt = compile_for(method, first)
    losses = run(opt, data[:3])
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, tmp_path / "checkpoint.pt")
    del first, opt

    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    resumed = model()
    resumed.load_state_dict(checkpoint["model"])
    opt = compile_for(method, resumed)
    opt.load_state_dict(checkpoint["opt"])
    losses += run(opt, data[3:])
    assert losses == expected
    for a, b in zip(uninterrupted.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_checkpoint_of_another_method_is_rejected(method):
    others = sorted(set(METHODS) - {method})
    saved = compile_for(others[0], model())
    saved.step(*batches(1)[0])
    opt = compile_for(method, model())
    with pytest.raises(curvgraph.ConfigError, match=rf"state_dict is for method '{others[0]}', this optimizer runs "
                                                    rf"'{method}'"):
        opt.load_state_dict(saved.state_dict())


def test_a_checkpoint_of_another_architecture_is_rejected():
    """Same block names, other widths: the first mismatching state entry is named."""
    saved = compile_for("kfac", model()).state_dict()
    torch.manual_seed(0)
    wider = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.LayerNorm(9), nn.Linear(9, 4))
    with pytest.raises(curvgraph.ConfigError, match=r"state '0\.G' has shape \(8, 8\) in the state_dict, \(9, 9\) here"):
        compile_for("kfac", wider).load_state_dict(saved)


def test_a_checkpoint_from_before_the_adaptive_bookkeeping_loads(tmp_path):
    """``lr="auto"`` checkpoints saved before the bookkeeping entries existed (the damping alone) load into the
    optimizer and into an exported step: the damping and everything else are the checkpoint's, the bookkeeping starts
    again from zero (growth 0: the next rejection doubles; not calibrated; no rejections counted), and training goes
    on. A checkpoint without the damping is still refused: its restart would change the steps."""
    data = batches(5)
    original = model()
    saved = compile_(original)
    run(saved, data[:3])
    checkpoint = copy.deepcopy(saved.state_dict())
    bookkeeping = [k for k in checkpoint["state"] if k.startswith("kfac.") and k != "kfac.damping"]
    assert "kfac.damping_calibrated" in bookkeeping and "kfac.rho_next_batch" in bookkeeping
    for key in bookkeeping:
        del checkpoint["state"][key]
    resumed = model()
    resumed.load_state_dict(original.state_dict())
    opt = compile_(resumed)
    run(opt, data[:1])  # the bookkeeping is not at its start any more, so the load must reset it
    opt.load_state_dict(checkpoint)
    stats = opt.stats()
    assert stats["damping"] == saved.stats()["damping"] > 0
    assert all(stats[saved.method.adaptive_state[key]] == 0 for key in bookkeeping), stats
    assert torch.equal(opt.state_dict()["state"]["0.A"], checkpoint["state"]["0.A"])
    assert all(math.isfinite(loss) for loss in run(opt, data[3:]))
    assert opt.stats()["steps"] == checkpoint["step_count"] + 2
    opt.export(tmp_path / "step.py")
    exported = curvgraph.load_step(tmp_path / "step.py", resumed, backend="eager")
    exported.load_state_dict(checkpoint)
    assert torch.equal(exported.state_dict()["state"]["kfac.damping"], checkpoint["state"]["kfac.damping"])
    assert not exported.state_dict()["state"]["kfac.damping_calibrated"].any()
    del checkpoint["state"]["kfac.damping"]
    with pytest.raises(curvgraph.ConfigError, match=r"missing \['kfac\.damping'\], unexpected \[\]"):
        opt.load_state_dict(checkpoint)
