"""Degenerate factors never crash a step, never write non-finite parameters, and are reported per block.

Degenerate inputs (issue #14): the MLP of the issue on inputs of scale 1e6 (it used to raise
``LinAlgError`` in ``cholesky_inverse``), all-zero and constant inputs, a dead ReLU layer, and
inputs whose factors overflow float32. Every method, eager here; ``test_compiled_steps_survive``
runs the decompositions that can raise (Cholesky, eigh) compiled. SINGD and K-BFGS, which invert
nothing, name the updates they could not make (a factor update that is not finite, a zero or
non-finite curvature pair) and keep the previous state.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import curvgraph
from curvgraph.registry import METHODS

STEPS = 3


def issue_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))


def dead_relu_mlp() -> nn.Module:
    """Its ReLU is dead on negative inputs (positive weights, negative bias): the next layer sees zeros."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        model[0].weight.abs_()
        model[0].bias.fill_(-0.1)
    return model


def batches(kind: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    make = {
        "scale-1e6": lambda: 1e6 * torch.randn(8, 6, generator=g),
        "zeros": lambda: torch.zeros(8, 6),
        "constant": lambda: torch.full((8, 6), 3.0),
        "dead-relu": lambda: -1 - torch.rand(8, 6, generator=g),
        "overflow": lambda: 1e19 * torch.randn(8, 6, generator=g),  # x x^T overflows float32
    }[kind]
    return [make() for _ in range(STEPS)]


def schedule(method: str) -> dict:
    """Statistics and a refresh every step (SINGD's period is its ``T``)."""
    return {"T": 1} if method == "singd" else {"invert_every": 1}


def step_twice_warned_once(opt: curvgraph.CurvatureOptimizer, x: torch.Tensor, y: torch.Tensor, match: str) -> None:
    """Two steps on ``(x, y)``: the first warns a DegenerateBlockWarning matching ``match``, the second (the same
    cause again) is counted but not warned."""
    with pytest.warns(curvgraph.DegenerateBlockWarning, match=match):
        opt.step(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", curvgraph.DegenerateBlockWarning)
        opt.step(x, y)


def train_targets() -> torch.Tensor:
    """The targets of every batch that :func:`train` steps on."""
    return torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(2))


def train(model: nn.Module, data: list[torch.Tensor], method: str, backend: str = "eager", **options):
    """One step per batch of ``data``; returns the optimizer and the DegenerateBlockWarnings."""
    opt = curvgraph.compile(model, (data[0],), method=method, backend=backend, progress=False, **schedule(method),
                            **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x in data:
            loss = opt.step(x, train_targets())
            assert torch.isfinite(loss)
    return opt, [w for w in caught if issubclass(w.category, curvgraph.DegenerateBlockWarning)]


def assert_finite(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("kind", ("scale-1e6", "zeros", "constant", "dead-relu"))
def test_degenerate_inputs_train_with_finite_parameters(method, kind):
    model = dead_relu_mlp() if kind == "dead-relu" else issue_mlp()
    before = [p.clone() for p in model.parameters()]
    opt, _ = train(model, batches(kind), method)
    assert_finite(model)
    assert opt.skipped_steps == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_overflowing_statistics_skip_the_step_and_name_the_block(method):
    """Inputs of scale 1e19 make the first layer's ``A`` overflow: every step is skipped, parameters keep their
    values, the first layer is reported (one warning, every step counted) and its inverses keep their start."""
    model = issue_mlp()
    before = [p.clone() for p in model.parameters()]
    opt, caught = train(model, batches("overflow"), method)
    assert opt.skipped_steps == STEPS
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    report = opt.diagnostics()
    assert report["0"]["kind"] == "dense"
    overflow = [cause for cause in report["0"]["degenerate"] if cause.startswith("factor A of the batch is not finite")]
    assert len(overflow) == 1 and report["0"]["degenerate"][overflow[0]] == STEPS
    assert report["0"]["last_degenerate_step"] == STEPS
    assert not report["4"]["degenerate"]  # the last layer's statistics are finite
    messages = [str(w.message) for w in caught]
    assert sum(m.startswith("curvgraph: step 1: block '0' (dense): factor A of the batch is not finite")
               for m in messages) == 1
    assert all(m.startswith("curvgraph: step ") and ": block '0'" in m for m in messages)  # only the first layer


def test_failed_inverse_keeps_the_previous_one_and_warns_once():
    """A factor that Cholesky rejects (made indefinite through the state dict, in refresh-only steps) keeps
    the previous inverse while the block's other factor is refreshed; the block is named once."""
    model = issue_mlp()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    opt = curvgraph.compile(model, (x,), factor_every=10, invert_every=1, lr=0.01, backend="eager")
    opt.step(x, y)  # statistics and the first refresh
    state = opt.state_dict()
    state["state"]["2.A"] = -torch.eye(65)
    state["state"]["2.G"] = 2 * state["state"]["2.G"]
    opt.load_state_dict(state)
    step_twice_warned_once(opt, x, y, r"block '2' \(dense\): factor A could not be inverted")
    after = opt.state_dict()["state"]
    assert torch.equal(after["2.A_inv"], state["state"]["2.A_inv"])
    assert not torch.allclose(after["2.G_inv"], state["state"]["2.G_inv"])
    assert_finite(model)
    report = opt.diagnostics()
    assert list(report["2"]["degenerate"].values()) == [2]
    assert report["2"]["last_degenerate_step"] == 3
    assert all(not entry["degenerate"] for name, entry in report.items() if name != "2")


def test_a_first_inverse_that_fails_leaves_the_identity():
    """Before any successful refresh the kept inverse is the initial one: the identity (documented)."""
    model = issue_mlp()
    opt, _ = train(model, batches("overflow"), "kfac")
    state = opt.state_dict()["state"]
    assert torch.equal(state["0.A_inv"], torch.eye(7))
    assert torch.equal(state["0.G_inv"], torch.eye(64))


def write_state(opt: curvgraph.CurvatureOptimizer, values: dict[str, torch.Tensor], keys: tuple[str, ...]) -> None:
    """Write ``values[key]`` into the optimizer's state in place for each of ``keys``: a non-finite value, which no step
    commits and ``load_state_dict`` rejects, stands for one that a method's own update made non-finite."""
    for key in keys:
        opt._runner.state[key].copy_(values[key])


def test_eigh_of_a_non_finite_factor_keeps_the_previous_basis():
    """EKFAC's eigendecomposition of a NaN factor (a refresh-only step) neither raises nor changes the basis."""
    model = issue_mlp()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    opt = curvgraph.compile(model, (x,), method="ekfac", factor_every=10, invert_every=1, lr=0.01, backend="eager")
    opt.step(x, y)
    state = opt.state_dict()
    state["state"]["2.G"] = torch.full((64, 64), float("nan"))
    state["state"]["2.A"] = 2 * state["state"]["2.A"]
    write_state(opt, state["state"], ("2.G", "2.A"))
    with pytest.warns(curvgraph.DegenerateBlockWarning, match=r"block '2' \(dense\): factor G could not be decomposed"):
        opt.step(x, y)
    after = opt.state_dict()["state"]
    assert torch.equal(after["2.G_basis"], state["state"]["2.G_basis"])
    assert torch.equal(after["2.G_eigenvalues"], state["state"]["2.G_eigenvalues"])
    torch.testing.assert_close(after["2.A_eigenvalues"], 2 * state["state"]["2.A_eigenvalues"])  # refreshed
    assert_finite(model)


def test_singd_keeps_a_factor_whose_update_is_not_finite_and_names_it():
    """A SINGD factor update that is not finite (a NaN momentum ``m_K``, through the state dict) keeps the block's
    previous ``K`` and ``m_K`` while its ``C`` updates and the step is taken; the block is named once."""
    model = issue_mlp()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    opt = curvgraph.compile(model, (x,), method="singd", T=1, backend="eager")
    opt.step(x, y)
    state = opt.state_dict()
    state["state"]["2.m_K"] = torch.full_like(state["state"]["2.m_K"], float("nan"))
    write_state(opt, state["state"], ("2.m_K",))
    before = [p.clone() for p in model.parameters()]
    step_twice_warned_once(opt, x, y,
                           r"block '2' \(dense\): preconditioner factor K \(on A\) or its momentum m_K is not finite")
    after = opt.state_dict()["state"]
    assert torch.equal(after["2.K"], state["state"]["2.K"])
    assert not torch.equal(after["2.C"], state["state"]["2.C"])
    assert opt.skipped_steps == 0
    assert_finite(model)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    report = opt.diagnostics()
    assert list(report["2"]["degenerate"].values()) == [2]
    assert all(not entry["degenerate"] for name, entry in report.items() if name != "2")


#: How each K-BFGS variant says that the update of its output side was skipped.
KBFGS_PAIR_SKIPPED = {"kbfgs": "the BFGS update of G_inv was skipped",
                      "kbfgs_l": "the damped pre-activation pair was not stored"}


@pytest.mark.parametrize("method", sorted(KBFGS_PAIR_SKIPPED))
def test_kbfgs_names_a_saturated_layer_whose_pair_is_zero(method):
    """Inputs of scale 1e6 saturate the first tanh: that layer's outputs do not change and its gradients vanish, so its
    pre-activation pair is zero and the update of its output side is skipped, every step; the other layers train."""
    model = issue_mlp()
    opt, caught = train(model, batches("scale-1e6"), method)
    assert_finite(model)
    assert opt.skipped_steps == 0
    report = opt.diagnostics()
    causes = [c for c in report["0"]["degenerate"] if c.startswith(KBFGS_PAIR_SKIPPED[method])]
    assert len(causes) == 1 and report["0"]["degenerate"][causes[0]] == STEPS
    assert not report["2"]["degenerate"] and not report["4"]["degenerate"]
    assert len(caught) == 1
    assert str(caught[0].message).startswith(f"curvgraph: step 1: block '0' (dense): {KBFGS_PAIR_SKIPPED[method]}")
    assert torch.equal(opt.state_dict()["state"]["0.s"], torch.zeros(64))  # the averaged pair: zero


@pytest.mark.parametrize("method", sorted(KBFGS_PAIR_SKIPPED))
def test_kbfgs_names_a_zero_action_and_keeps_the_input_side(method):
    """All-zero inputs to a layer without bias: the Hessian-action vector (the mean input) is zero, so ``A_inv``
    keeps its start (``I / damping_A`` after the first statistics step) and the block is named."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16, bias=False), nn.Tanh(), nn.Linear(16, 3))
    opt, caught = train(model, batches("zeros"), method)
    assert_finite(model)
    report = opt.diagnostics()
    causes = list(report["0"]["degenerate"])
    assert len(causes) == 1 and causes[0].startswith("the Hessian-action BFGS update of A_inv was skipped")
    assert report["0"]["degenerate"][causes[0]] == STEPS and not report["2"]["degenerate"]
    start = torch.eye(6) / opt.param_groups[0]["damping"] ** 0.5
    torch.testing.assert_close(opt.state_dict()["state"]["0.A_inv"], start)
    assert len(caught) == 1 and str(caught[0].message).startswith(f"curvgraph: step 1: block '0' (dense): {causes[0]}")


class LogFeatures(nn.Module):
    """``head(log(fc(x)))`` with ``fc(x) = 0.05`` at the start: a step that drives ``fc(x)`` below zero makes the next
    forward (K-BFGS's extra pass at the updated parameters) NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(6, 4), nn.Linear(4, 3)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.bias.fill_(0.05)

    def forward(self, x):
        return self.head(torch.log(self.fc(x)))


@pytest.mark.parametrize("method", sorted(KBFGS_PAIR_SKIPPED))
def test_kbfgs_keeps_its_pairs_when_the_extra_pass_is_not_finite(method):
    """The extra forward/backward at the updated parameters is NaN: no pair is averaged in (the pair state stays
    finite instead of turning NaN for good), the output sides keep their start and both blocks are named."""
    torch.manual_seed(0)
    model = LogFeatures()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    opt = curvgraph.compile(model, (x,), method=method, lr=1.0, backend="eager")
    with pytest.warns(curvgraph.DegenerateBlockWarning, match=KBFGS_PAIR_SKIPPED[method]):
        assert torch.isfinite(opt.step(x, y))
    assert not torch.isfinite(torch.log(model.fc(x))).all()  # the premise: the step left log's domain
    state = opt.state_dict()["state"]
    for block in ("fc", "head"):
        assert torch.equal(state[f"{block}.s"], torch.zeros(4 if block == "fc" else 3))
        assert torch.equal(state[f"{block}.y"], torch.zeros_like(state[f"{block}.s"]))
        assert any(c.startswith(KBFGS_PAIR_SKIPPED[method]) for c in opt.diagnostics()[block]["degenerate"])
    assert_finite(model)


def test_stable_eigh_matches_eigh_at_any_scale():
    from curvgraph.curvature.linalg import stable_eigh

    torch.manual_seed(0)
    x = torch.randn(5, 5, dtype=torch.float64)
    factor = x @ x.T
    for scale in (1e-30, 1.0, 1e30):
        values, vectors, good = stable_eigh(scale * factor)
        assert good
        torch.testing.assert_close(vectors * values @ vectors.T, scale * factor, rtol=1e-10, atol=0)
    batch = torch.stack([factor, torch.full((5, 5), float("inf")), torch.zeros(5, 5, dtype=torch.float64)])
    values, vectors, good = stable_eigh(batch)
    assert good.tolist() == [True, False, True]
    assert torch.equal(values[2], torch.zeros(5, dtype=torch.float64))



@pytest.mark.parametrize("compiled", (False, True))
def test_finite_entries_is_isfinite_all_also_where_a_sum_overflows(compiled):
    """The refresh's finiteness check (its eager form reads the sums first) against ``isfinite(...).all()``:
    matrices with a NaN, an inf, infs of both signs (whose sum is NaN), finite entries whose sum overflows
    (finite: the sum alone would call it not), and clean ones."""
    from curvgraph.curvature.linalg import finite_entries

    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, 6)
    x[0, 1, 2, 3] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    x[1, 3, 1, 1], x[1, 3, 2, 2] = float("inf"), -float("inf")
    x[2, 2, 4, 4] = x[2, 2, 4, 5] = 3e38  # finite entries, an infinite sum
    check = torch.compile(finite_entries, backend="eager", fullgraph=True) if compiled else finite_entries
    for tensor, dims in ((x, 2), (x[..., 0, :], 1)):
        expected = torch.isfinite(tensor).flatten(-dims).all(-1)
        assert expected.any() and not expected.all()
        assert torch.equal(check(tensor, dims), expected)
    assert torch.isinf(x[2, 2].sum()) and check(x[2, 2], 2)  # the sum overflows, every entry is finite

@pytest.mark.parametrize("method", ("kfac", "ekfac"))
def test_compiled_steps_survive_overflow_and_rank_deficiency(method):
    """Compiled (one graph: statistics and refresh every step), the Cholesky and eigh paths see factors that
    are not finite (skipped, reported) and rank-deficient ones (trained). The skipped steps leave the whole
    state as it was (the compiled step commits the statistics in a ``torch.cond``, the eager one by a
    selection), and the taken step writes the factors the eager step writes."""
    data = batches("overflow")[:2] + batches("zeros")[:1]
    start = curvgraph.compile(issue_mlp(), (data[0],), method=method, backend="eager", progress=False,
                              **schedule(method)).state_dict()["state"]
    states = {}
    for backend in ("inductor", "eager"):
        model = issue_mlp()
        opt, caught = train(model, data[:2], method, backend)
        skipped = opt.state_dict()["state"]
        assert set(skipped) == set(start) and all(torch.equal(skipped[k], start[k]) for k in start)
        opt.step(data[2], train_targets())
        assert opt.skipped_steps == 2
        assert_finite(model)
        assert opt.diagnostics()["0"]["degenerate"]
        assert caught
        states[backend] = opt.state_dict()["state"]
    factors = [k for k in start if k.endswith((".A", ".G"))]
    assert factors and all(not torch.equal(states["eager"][k], start[k]) for k in factors)
    for key in factors:  # inverses and eigenbases of these rank-deficient factors agree less closely
        torch.testing.assert_close(states["inductor"][key], states["eager"][key], rtol=1e-5, atol=1e-7)


class ScaledMLP(nn.Module):
    """The issue's MLP divided by a learned per-class divisor (no pass matches it: the fallback rule's parameter; a
    scale would be a norm block)."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = issue_mlp()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.mlp(x) / self.scale


@pytest.mark.parametrize("group", (0, 1))  # the curvature blocks' learning rate, the fallback's
@pytest.mark.parametrize("method", sorted(METHODS))
def test_an_update_that_overflows_skips_the_step(method, group):
    """An infinite learning rate (a schedule gone wrong; K-FAC's default ``lr="auto"`` multiplies its quadratic
    model's step by it) makes the update overflow although the loss, gradients and directions are finite: the step
    is skipped with a NonFiniteStepWarning and no parameter changes (they used to become inf or nan). Where the
    curvature group's ``lr`` multiplies a quadratic model's step (``lr="auto"``), the step refuses it before it
    runs instead (a multiplier must be below 2), and nothing changes either."""
    model = ScaledMLP()
    x, targets = torch.randn(8, 6), torch.randint(0, 3, (8,))
    opt = curvgraph.compile(model, (x,), method=method, backend="eager", progress=False, **schedule(method))
    assert opt.plan.fallback_params == ("scale",)
    opt.step(x, targets)
    before = [p.clone() for p in model.parameters()]
    opt.param_groups[group]["lr"] = float("inf")
    if group == 0 and getattr(opt.method, "adaptive", False):
        with pytest.raises(curvgraph.ConfigError, match=r"must be in \[0, 2\)"):
            opt.step(x, targets)
        assert opt.skipped_steps == 0
    else:
        with pytest.warns(curvgraph.NonFiniteStepWarning):
            opt.step(x, targets)
        assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
