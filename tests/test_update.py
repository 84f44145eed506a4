"""The update rule against an independent computation: kron-matrix solves, torch.optim, schedulers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import curvgraph


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def natural_gradients(model: nn.Sequential, x, y, factors, damping: float, weight_decay: float) -> dict[str, torch.Tensor]:
    """(G_d kron A_d)^{-1} vec(M) per block, solved on the full Kronecker matrix (no factor inverses)."""
    model = copy.deepcopy(model)
    nn.functional.cross_entropy(model(x), y).backward()
    directions = {}
    for name in factors:
        layer = model.get_submodule(name)
        grad = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
        param = torch.cat([layer.weight, layer.bias[:, None]], 1).detach()
        M = grad + weight_decay * param
        A, G = factors[name]["A"], factors[name]["G"]
        pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
        A_d = A + pi * math.sqrt(damping) * torch.eye(A.shape[0])
        G_d = G + math.sqrt(damping) / pi * torch.eye(G.shape[0])
        directions[name] = (torch.linalg.solve(torch.kron(G_d, A_d), M.flatten()).reshape(M.shape), M)
    return directions


def block_change(after: nn.Sequential, before: nn.Sequential, name: str) -> torch.Tensor:
    a, b = after.get_submodule(name), before.get_submodule(name)
    return torch.cat([a.weight - b.weight, (a.bias - b.bias)[:, None]], 1).detach()


def test_step_is_the_damped_kronecker_natural_gradient(float64):
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(9, 4), torch.randint(0, 3, (9,))
    before = copy.deepcopy(model)
    lr, damping, wd = 0.3, 0.02, 0.01
    opt = curvgraph.compile(model, (x,), fisher="type2", ema=0.0, momentum=0.0, kl_clip=None, lr=lr,
                            damping=damping, weight_decay=wd, backend="eager")
    opt.step(x, y)
    expected = natural_gradients(before, x, y, opt.factors(), damping, wd)
    for name, (V, _) in expected.items():
        torch.testing.assert_close(block_change(model, before, name), -lr * V)


def test_kl_clipping_bounds_the_step(float64):
    torch.manual_seed(1)
    model = mlp()
    x, y = torch.randn(9, 4), torch.randint(0, 3, (9,))
    before = copy.deepcopy(model)
    lr, damping, kl_clip = 0.3, 0.02, 1e-6
    opt = curvgraph.compile(model, (x,), fisher="type2", ema=0.0, momentum=0.0, kl_clip=kl_clip, lr=lr,
                            damping=damping, backend="eager")
    opt.step(x, y)
    expected = natural_gradients(before, x, y, opt.factors(), damping, 0.0)
    inner = sum((V * M).sum() for V, M in expected.values())
    nu = min(1.0, math.sqrt(kl_clip / (lr**2 * inner)))
    assert nu < 0.5  # the clip is active in this test
    for name, (V, _) in expected.items():
        torch.testing.assert_close(block_change(model, before, name), -lr * nu * V)


def test_momentum_accumulates_directions(float64):
    torch.manual_seed(2)
    model = mlp()
    batches = [(torch.randn(9, 4), torch.randint(0, 3, (9,))) for _ in range(2)]
    lr, damping, mu = 0.2, 0.05, 0.9
    opt = curvgraph.compile(model, (batches[0][0],), fisher="type2", ema=0.0, momentum=mu, kl_clip=None, lr=lr,
                            damping=damping, invert_every=1, backend="eager")
    first = copy.deepcopy(model)
    opt.step(*batches[0])
    V1 = natural_gradients(first, *batches[0], opt.factors(), damping, 0.0)
    second = copy.deepcopy(model)
    opt.step(*batches[1])
    V2 = natural_gradients(second, *batches[1], opt.factors(), damping, 0.0)
    for name in V1:
        torch.testing.assert_close(block_change(model, second, name), -lr * (mu * V1[name][0] + V2[name][0]))


def test_stale_inverses_are_used_between_refreshes(float64):
    """With invert_every=2 the second step preconditions with the first step's inverses."""
    torch.manual_seed(3)
    model = mlp()
    batches = [(torch.randn(9, 4), torch.randint(0, 3, (9,))) for _ in range(2)]
    opt = curvgraph.compile(model, (batches[0][0],), fisher="type2", ema=0.0, momentum=0.0, kl_clip=None, lr=0.2,
                            damping=0.05, invert_every=2, backend="eager")
    opt.step(*batches[0])
    first_factors = opt.factors()
    second = copy.deepcopy(model)
    opt.step(*batches[1])
    stale = natural_gradients(second, *batches[1], first_factors, 0.05, 0.0)
    for name, (V, _) in stale.items():
        torch.testing.assert_close(block_change(model, second, name), -0.2 * V)


def test_only_a_refresh_writes_the_inverses(float64):
    """The refresh writes the new inverses into the state in place and a step without one writes nothing there (the
    version counters of the state's inverses move in refresh steps only), while every step commits the factors."""
    torch.manual_seed(3)
    model = mlp()
    batches = [(torch.randn(9, 4), torch.randint(0, 3, (9,))) for _ in range(3)]
    opt = curvgraph.compile(model, (batches[0][0],), invert_every=2, backend="eager")
    state = opt._runner.state
    inverses = [key for key in state if key.endswith("_inv")]
    assert len(inverses) == 4
    versions = []
    for batch in batches:  # refresh, no refresh, refresh
        opt.step(*batch)
        versions.append({key: t._version for key, t in state.items()})
    assert opt.skipped_steps == 0
    assert [versions[1][k] - versions[0][k] for k in inverses] == [0] * 4
    assert all(versions[2][k] > versions[1][k] for k in inverses)
    assert all(versions[1][k] > versions[0][k] for k in ("0.A", "0.G", "2.A", "2.G"))


def test_statistics_and_refresh_from_finite_values_are_kept_when_the_update_overflows(float64):
    """The documented exception to "a skipped step changes nothing": the statistics and the refresh commit as soon as
    the loss, gradients and factors are known to be finite, so a step skipped afterwards for its update (an infinite
    learning rate) keeps this batch's factors and the inverses computed from them (the same as a step with a finite
    learning rate commits), while the parameters and momentum stay. The fixed-step mode: with ``lr="auto"`` the
    step refuses a multiplier of 2 or more before it runs (``test_adaptive``)."""
    torch.manual_seed(3)
    model = mlp()
    twin = copy.deepcopy(model)
    x, y = torch.randn(9, 4), torch.randint(0, 3, (9,))
    opt = curvgraph.compile(model, (x,), lr=0.1, invert_every=1, backend="eager")
    reference = curvgraph.compile(twin, (x,), lr=0.1, invert_every=1, backend="eager")
    opt.step(x, y)
    reference.step(x, y)
    state = opt._runner.state
    before = {key: t.clone() for key, t in state.items()}
    params = [p.clone() for p in model.parameters()]
    opt.param_groups[0]["lr"] = float("inf")
    with pytest.warns(curvgraph.NonFiniteStepWarning):
        opt.step(2 * x, y)
    reference.step(2 * x, y)
    assert opt.skipped_steps == 1 and reference.skipped_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    statistics = [key for key in state if key.endswith(("_inv", ".A", ".G"))]
    assert len(statistics) == 8
    for key in statistics:
        assert not torch.equal(state[key], before[key]), key
        torch.testing.assert_close(state[key], reference._runner.state[key], msg=key)
    assert all(torch.equal(state[k], before[k]) for k in state if k not in statistics)


@pytest.mark.parametrize("method", ("kfac", "ekfac"))
def test_a_batched_refresh_reads_the_previous_inverses_in_place(method):
    """Factors of one shape are inverted (K-FAC) or decomposed (EKFAC) in one batched call, and where one fails the
    previous inverse or eigenbasis is kept from the state entry itself (:func:`curvgraph.methods.kfac.kept_where_failed`,
    fused into the commit), not from a stacked copy of every previous one of the group (a copy of the group's size)."""
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = curvgraph.compile(model, (torch.randn(8, 6),), method=method, backend="eager")
    source = opt.source
    assert "one batched call" in source
    assert "kept_where_failed(" in source
    assert "torch.stack([state[" not in source


@pytest.mark.parametrize("method", ("kfac", "ekfac"))
def test_a_group_larger_than_the_stacking_budget_is_cut_into_calls_with_the_same_result(float64, method, monkeypatch):
    """A group of same-shape factors is stacked at most :data:`curvgraph.methods.base.MAX_STACKED_NUMEL` elements
    at a time (stacking copies its members): with the budget at two ``7x7`` factors, the three ``A`` of this MLP
    are refreshed in a call of two and a call of one, and the steps are those of one call of three (to rounding:
    LAPACK's batched and single factorizations may round differently)."""
    from curvgraph.methods import base

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
    batches = [(torch.randn(8, 6), torch.randint(0, 6, (8,))) for _ in range(3)]
    runs = {}
    for budget in (base.MAX_STACKED_NUMEL, 2 * 49):
        monkeypatch.setattr(base, "MAX_STACKED_NUMEL", budget)
        twin = copy.deepcopy(model)
        opt = curvgraph.compile(twin, (batches[0][0],), method=method, backend="eager", invert_every=1, progress=False)
        losses = [opt.step(*batch) for batch in batches]
        runs[budget] = (opt.source, losses, twin.state_dict())
    (whole, losses, params), (cut, cut_losses, cut_params) = runs.values()
    assert "3 factors of shape 7x7: one batched call" in whole
    assert "3 factors of shape 7x7" not in cut and "2 factors of shape 7x7: one batched call" in cut
    torch.testing.assert_close(torch.stack(cut_losses), torch.stack(losses), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cut_params, params, rtol=1e-10, atol=1e-12)


class WideOverPositions(nn.Module):
    """``inner`` applied at two positions of every example: at a batch of two it has fewer gradient rows than
    features, like ``out`` (K-FAC then preconditions both from their rows, :func:`curvgraph.methods.kfac.rows_precondition`)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.out = nn.Linear(6, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.inner(x)).mean(1))


@pytest.mark.parametrize("weight_decay", (0.0, 0.01))  # 0: from the rows; not 0: the matrix branch of the torch.cond
def test_step_from_gradient_rows_is_the_damped_kronecker_natural_gradient(float64, weight_decay):
    torch.manual_seed(4)
    model = WideOverPositions()
    x, y = torch.randn(2, 2, 6), torch.randint(0, 3, (2,))
    before = copy.deepcopy(model)
    lr, damping = 0.3, 0.02
    opt = curvgraph.compile(model, (x,), fisher="type2", ema=0.0, momentum=0.0, kl_clip=None, lr=lr,
                            damping=damping, weight_decay=weight_decay, backend="eager")
    assert [opt.method.from_rows(b) for b in opt.plan.blocks] == [True, True]
    opt.step(x, y)
    expected = natural_gradients(before, x, y, opt.factors(), damping, weight_decay)
    for name, (V, _) in expected.items():
        torch.testing.assert_close(block_change(model, before, name), -lr * V)


@pytest.mark.parametrize("structure", ("dense", "diagonal", "split"))
def test_rows_precondition_equals_the_matrix_products(float64, structure):
    """:func:`rows_precondition` on the rows of ``M = sum_r g_r a_r^T`` against :func:`kfac_precondition` on ``M``,
    for dense, diagonal and block-diagonal (split) inverses."""
    from curvgraph.methods.kfac import kfac_precondition, rows_precondition

    torch.manual_seed(5)
    g, a = torch.randn(3, 2, 7), torch.randn(3, 2, 10)  # (N, P, d): six rows
    M = torch.einsum("npo,npi->oi", g, a)

    def spd(d):
        x = torch.randn(d, d)
        return x @ x.T + torch.eye(d)

    if structure == "dense":
        inverses = (spd(7), spd(10))
    elif structure == "diagonal":
        inverses = (torch.rand(7) + 0.5, torch.rand(10) + 0.5)
    else:
        inverses = (torch.stack([spd(4), spd(4)]), torch.stack([spd(5), spd(5)]))  # 7 -> 2 x 4 (padded), 10 -> 2 x 5
    diagonal = (structure == "diagonal",) * 2
    split = (structure == "split",) * 2
    expected = kfac_precondition(M, inverses, (-2, -1), diagonal, split)
    torch.testing.assert_close(rows_precondition((g, a), inverses, diagonal, split), expected)
    if structure == "dense":  # and against the Kronecker product itself
        torch.testing.assert_close(expected.flatten(), torch.kron(*inverses) @ M.flatten())


class ElementwiseScale(nn.Module):
    """``x / s`` with a vector ``s``: no built-in pass matches it (``x * s`` is a norm block's channel scale)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(1 + 0.3 * torch.randn(features))

    def forward(self, x):
        return x / self.scale


def fallback_model() -> nn.Module:
    """No curvature block: every parameter goes to the fallback rule."""
    return nn.Sequential(ElementwiseScale(4), nn.PReLU(), nn.Tanh())


@pytest.mark.parametrize(
    "rule, reference",
    [
        ("adam", lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.01)),
        ("sgd", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01)),
    ],
)
def test_fallback_rules_match_torch_optim(float64, rule, reference):
    torch.manual_seed(4)
    model = fallback_model()
    twin = copy.deepcopy(model)
    ids = torch.randn(5, 3, 4)
    opt = curvgraph.compile(model, (ids,), loss="mse", fallback=rule, fallback_lr=0.05, backend="eager")
    opt.param_groups[1]["weight_decay"] = 0.01  # the fallback group (the curvature group is empty)
    ref = reference(twin.parameters())
    assert opt.plan.blocks == [] and opt.plan.fallback_params == ("0.scale", "1.weight")
    for _ in range(4):
        ids, target = torch.randn(5, 3, 4), torch.randn(5, 3, 4)
        opt.step(ids, target)
        ref.zero_grad()
        nn.functional.mse_loss(twin(ids), target).backward()
        ref.step()
    for ours, theirs in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(ours, theirs)


def test_lr_scheduler_drives_the_step():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 5), nn.PReLU(), nn.Linear(5, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt = curvgraph.compile(model, (x,), lr=0.002, backend="eager")  # the fixed-step mode
    assert [g["role"] for g in opt.param_groups] == ["curvature", "fallback"]
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.0 if epoch == 0 else 1.0)
    before = copy.deepcopy(model.state_dict())
    opt.step(x, y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    schedule.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.002)
    opt.step(x, y)
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_frozen_parameters_stay_frozen():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    model[0].requires_grad_(False)
    frozen = model[0].weight.clone()
    opt = curvgraph.compile(model, (torch.randn(8, 4),), backend="eager")
    for _ in range(3):
        opt.step(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    assert torch.equal(model[0].weight, frozen)
    assert [b.name for b in opt.plan.blocks] == ["2"]


class NoGradGate(nn.Module):
    """A gate evaluated under ``torch.no_grad()`` in ``forward``: eager PyTorch gives ``gate`` no gradient."""

    def __init__(self):
        super().__init__()
        self.a, self.gate, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        with torch.no_grad():
            g = torch.sigmoid(self.gate(h))
        return self.c(h * g)


def test_parameters_used_only_under_no_grad_in_forward_are_not_trained():
    torch.manual_seed(7)
    model = NoGradGate()
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    nn.functional.cross_entropy(model(x), y).backward()
    assert model.gate.weight.grad is None and model.a.weight.grad is not None  # eager's semantics
    model.zero_grad(set_to_none=True)
    before = copy.deepcopy(model.state_dict())
    opt = curvgraph.compile(model, (x,), backend="eager", weight_decay=1e-2)  # no decay either, as torch.optim
    assert [b.name for b in opt.plan.blocks] == ["a", "c"]
    assert "frozen (no gradient: used only under torch.no_grad() or through .detach() in forward): gate.weight, gate.bias" in str(opt.plan)
    with torch.no_grad():
        expected = nn.functional.cross_entropy(model(x), y)
    assert torch.allclose(opt.step(x, y), expected)
    for _ in range(2):
        opt.step(x, y)
    state = model.state_dict()
    assert torch.equal(state["gate.weight"], before["gate.weight"]) and torch.equal(state["gate.bias"], before["gate.bias"])
    assert not torch.equal(state["a.weight"], before["a.weight"]) and not torch.equal(state["c.weight"], before["c.weight"])


@pytest.mark.parametrize("order", [1, 3, 32, 64, 65])
def test_damped_inverse_is_the_inverse_of_the_shifted_factor_with_and_without_padding(order):
    """``damped_inverse`` factors a factor whose order is a multiple of 32 padded by one: its inverses equal
    ``inv(F + s I)`` (float64, batched) with and without the padding, and a factor that is indefinite only in its
    last row, next to the padding, is still reported as failed."""
    from curvgraph.methods.kfac import damped_inverse

    torch.manual_seed(order)
    x = torch.randn(3, order, order + 2, dtype=torch.float64)
    factor = x @ x.transpose(-1, -2) / order
    shift = torch.tensor([1e-4, 0.1, 2.0], dtype=torch.float64)
    inverse, failed = damped_inverse(factor, shift)
    expected = torch.linalg.inv(factor + shift[:, None, None] * torch.eye(order, dtype=torch.float64))
    torch.testing.assert_close(inverse, expected, rtol=1e-9, atol=1e-9)
    assert not failed.any()
    indefinite = torch.eye(order, dtype=torch.float64)
    indefinite[-1, -1] = -5.0
    assert damped_inverse(torch.stack([indefinite, torch.eye(order, dtype=torch.float64)]),
                          torch.tensor([0.0, 0.0], dtype=torch.float64))[1].tolist() == [True, False]


def test_damped_inverse_compiled_equals_eager_and_leaves_the_factor_alone():
    """Eagerly ``damped_inverse`` factors and inverts in its own padded buffer (in place); compiled it cannot
    (Dynamo takes no non-contiguous ``out=``) and takes the out-of-place path: both give ``inv(F + s I)``, report
    the same failures, and neither writes into the factor."""
    from curvgraph.methods.kfac import damped_inverse

    torch.manual_seed(0)
    x = torch.randn(3, 32, 40, dtype=torch.float64)
    factor = torch.cat([x @ x.transpose(-1, -2) / 40, -torch.eye(32, dtype=torch.float64)[None]])
    original = factor.clone()
    shift = torch.tensor([1e-3, 0.1, 1.0, 0.0], dtype=torch.float64)
    eager = damped_inverse(factor, shift)
    compiled = torch.compile(damped_inverse, fullgraph=True)(factor, shift)
    assert torch.equal(factor, original)
    assert eager[1].tolist() == compiled[1].tolist() == [False, False, False, True]
    expected = torch.linalg.inv(factor[:3] + shift[:3, None, None] * torch.eye(32, dtype=torch.float64))
    for inverse, _ in (eager, compiled):
        torch.testing.assert_close(inverse[:3], expected, rtol=1e-9, atol=1e-9)


def test_failed_factorization_keeps_the_previous_inverse():
    """An indefinite factor (cholesky_ex reports failure) keeps the previous inverse instead of raising."""
    from curvgraph.methods.kfac import damped_inverse, kept_where_failed

    factor = torch.stack([torch.diag(torch.tensor([-5.0, 1.0, 1.0])), torch.eye(3)])
    previous = torch.full((2, 3, 3), 7.0)
    inverse, failed = damped_inverse(factor, torch.tensor([0.0, 1.0]))
    inverse = kept_where_failed(inverse, failed, previous, False)
    torch.testing.assert_close(inverse[0], previous[0])
    torch.testing.assert_close(inverse[1], torch.eye(3) / 2)
    assert failed.tolist() == [True, False]
