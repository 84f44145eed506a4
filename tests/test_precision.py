"""Precision: mixed precision under ``torch.autocast`` with float32 factors, float64 and bfloat16 models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.registry import METHODS

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def batch(dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 4, generator=g).to(dtype), torch.randint(0, 3, (32,), generator=g)


def test_compile_inside_autocast_runs_the_forward_in_bf16_and_keeps_float32_factors():
    model = mlp()
    x, y = batch()
    with torch.autocast(**BF16):
        opt = curvgraph.compile(model, (x,), backend="eager", lr=0.01)
        with torch.no_grad():
            mixed = F.cross_entropy(model(x).float(), y)
    with torch.no_grad():
        full = F.cross_entropy(model(x), y)
    assert [b.kind for b in opt.plan.blocks] == ["dense", "dense"] and opt.plan.fallback_params == ()
    assert opt.autocast == ("cpu", torch.bfloat16)
    with torch.autocast(**BF16):  # the usual AMP loop; the same autocast is accepted
        losses = [opt.step(x, y) for _ in range(10)]
    torch.testing.assert_close(losses[0], mixed, rtol=1e-3, atol=0)
    assert abs(losses[0] - full) > 1e-5  # the step did run in bf16
    assert losses[-1] < 0.9 * losses[0]
    assert all(t.dtype == torch.float32 for t in opt.state_dict()["state"].values())
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_the_autocast_option_is_the_context():
    x, y = batch()
    with torch.autocast(**BF16):
        in_context = curvgraph.compile(mlp(), (x,), backend="eager", lr=0.01)
    option = curvgraph.compile(mlp(), (x,), backend="eager", lr=0.01, autocast=torch.bfloat16)
    assert in_context.source == option.source
    assert [in_context.step(x, y).item() for _ in range(3)] == [option.step(x, y).item() for _ in range(3)]


def test_autocast_mismatch_at_step_and_bad_values_are_errors():
    x, y = batch()
    opt = curvgraph.compile(mlp(), (x,), backend="eager")
    with torch.autocast(**BF16), pytest.raises(curvgraph.InputError, match="compiled with no autocast"):
        opt.step(x, y)
    with pytest.raises(curvgraph.ConfigError, match="autocast must be torch.bfloat16, torch.float16 or None"):
        curvgraph.compile(mlp(), (x,), backend="eager", autocast=torch.float64)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_float64_models_keep_everything_in_float64(float64, method):
    """Factors, inverses, momenta and parameters in float64 (the references in test_factors and the methods'
    tests run in float64 too)."""
    model = mlp(torch.float64)
    x, y = batch(torch.float64)
    opt = curvgraph.compile(model, (x,), method=method, backend="eager")
    losses = [opt.step(x, y).item() for _ in range(6)]
    assert losses[-1] < losses[0]
    assert all(t.dtype == torch.float64 for t in opt.state_dict()["state"].values() if t.is_floating_point())
    assert all(p.dtype == torch.float64 for p in model.parameters())


@pytest.mark.parametrize("method", ("kfac", "ekfac", "kbfgs"))
def test_bfloat16_models_step_with_float32_factors(method):
    """Parameters in bf16 (no float32 master copy): the factors are float32; the methods' extra passes at other
    parameters (the quadratic model, K-BFGS's pairs) cast back to bf16."""
    model = mlp(torch.bfloat16)
    x, y = batch(torch.bfloat16)
    opt = curvgraph.compile(model, (x,), method=method, backend="eager")
    losses = [opt.step(x, y).item() for _ in range(6)]
    assert all(torch.isfinite(p).all() and p.dtype == torch.bfloat16 for p in model.parameters())
    assert losses[-1] < losses[0]
    assert {f.dtype for factors in opt.factors().values() for f in factors.values()} == {torch.float32}


@pytest.mark.parametrize("method", ("kfac", "ekfac", "kbfgs"))
def test_float16_parameters_that_would_overflow_are_not_written(method):
    """A float16 parameter holds at most 65504. An update whose new parameters are finite in float32 (the factor
    dtype the step computes them in) but not in float16 is skipped, and the parameters keep their values."""
    model = mlp(torch.float16)
    x, y = batch(torch.float16)
    opt = curvgraph.compile(model, (x,), method=method, backend="eager", lr=1e7, momentum=0.0,
                            **({"kl_clip": None} if method != "kbfgs" else {}))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(curvgraph.NonFiniteStepWarning, match="step 1 skipped"):
        opt.step(x, y)
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_float16_models_train():
    """The same model at a usual step size trains, with float16 parameters and float32 factors."""
    model = mlp(torch.float16)
    x, y = batch(torch.float16)
    opt = curvgraph.compile(model, (x,), backend="eager")
    losses = [opt.step(x, y).item() for _ in range(6)]
    assert all(torch.isfinite(p).all() and p.dtype == torch.float16 for p in model.parameters())
    assert losses[-1] < losses[0]
