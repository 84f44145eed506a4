"""Kinds and methods are plug-ins: a kind and a method registered from outside the package,
helpers of one name from two owners in one module, double claims, pass match counts."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import curvgraph
from curvgraph.codegen.writer import StepWriter, helper_sources
from curvgraph.methods import kfac
from curvgraph.passes.graph_utils import aten
from extending import DiagonalFisher, Scale, factor_diagonal
from helpers import exact_ggn, make_targets


@pytest.fixture
def registered():
    """The example kind and method, registered for one test."""
    curvgraph.register_block_kind(Scale(), before="norm")  # ahead of the built-in norm kind, which takes scales too
    curvgraph.register_method(DiagonalFisher)
    yield
    curvgraph.unregister_block_kind("scale")
    curvgraph.unregister_method("diag_fisher")


class ScaledMLP(nn.Module):
    """Dense -> tanh -> elementwise scale (applied at every position) -> mean over positions -> dense."""

    def __init__(self, features: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(features, features)
        self.s = nn.Parameter(1 + 0.3 * torch.randn(features))
        self.head = nn.Linear(features, classes)

    def forward(self, x):
        return self.head((torch.tanh(self.fc(x)) * self.s).mean(1))


def test_new_kind_is_found_and_shown_in_the_plan(registered):
    opt = curvgraph.compile(ScaledMLP(), (torch.randn(4, 5, 6),), backend="eager")
    plan = opt.plan
    assert [(b.name, b.kind, b.found_by) for b in plan.blocks] == [("fc", "dense", "dense"), ("s", "scale", "scale"),
                                                                    ("head", "dense", "dense")]
    assert plan.matches == {"rnn": 0, "dense": 2, "conv": 0, "scale": 1, "norm": 0, "embedding": 0, "position": 0,
                            "packed": 0, "tied": 0, "bias": 0}
    block = plan.block("s")
    assert block.factors["F"] == curvgraph.Factor((6,), axis=-1, diagonal=True) and block.matrix_shape == (6,)
    text = str(plan)
    assert "block passes (matches): rnn 0, dense 2, conv 0, scale 1, norm 0, embedding 0, position 0, packed 0, tied 0, bias 0" in text and "F:6(diag)" in text


def test_without_registration_the_built_in_norm_kind_takes_the_scale():
    """The built-in ``norm`` kind takes per-channel scales too, with the same curvature per channel (``k = 1``)."""
    plan = curvgraph.compile(ScaledMLP(), (torch.randn(4, 5, 6),), backend="eager").plan
    assert "scale" not in plan.matches and plan.block("s").kind == "norm" and plan.fallback_params == ()


@pytest.mark.parametrize("loss", ("cross_entropy", "mse"))
def test_new_kind_statistics_equal_the_exact_ggn_diagonal(registered, float64, loss):
    torch.manual_seed(0)
    model = ScaledMLP()
    x = torch.randn(5, 4, 6)
    y = make_targets(loss, (5, 3))
    opt = curvgraph.compile(copy.deepcopy(model), (x,), loss=loss, fisher="type2", backend="eager")
    opt.step(x, y)  # the first statistics step keeps this batch's factor alone
    exact = exact_ggn(model, loss, x, y, model.s.detach().clone(), lambda theta: {"s": theta})
    torch.testing.assert_close(opt.factors()["s"]["F"], exact.diagonal())
    assert exact.diagonal().min() > 0  # the check compares something


def test_kfac_preconditions_the_diagonal_block(registered, float64):
    torch.manual_seed(1)
    model = ScaledMLP()
    x, y = torch.randn(5, 4, 6), torch.randint(0, 3, (5,))
    reference = copy.deepcopy(model)
    before = model.s.detach().clone()
    opt = curvgraph.compile(model, (x,), fisher="type2", lr=0.1, damping=0.01, momentum=0.0, kl_clip=None,
                            backend="eager")
    opt.step(x, y)
    grad = torch.func.grad(lambda s: nn.functional.cross_entropy(
        torch.func.functional_call(reference, {"s": s}, (x,)), y))(before)
    F = opt.factors()["s"]["F"]
    torch.testing.assert_close(model.s.detach(), before - 0.1 * grad / (F + 0.01))


def test_new_method_update_and_static_option(registered, float64):
    torch.manual_seed(2)
    model = ScaledMLP()
    x, y = torch.randn(5, 4, 6), torch.randint(0, 3, (5,))
    before = copy.deepcopy(model)
    opt = curvgraph.compile(model, (x,), method="diag_fisher", fisher="type2", lr=0.05, power=1.0, backend="eager")
    assert "method=diag_fisher(power=1.0)" in opt.source
    assert "power" not in opt.param_groups[0] and opt.param_groups[0]["lr"] == 0.05
    opt.step(x, y)
    factors = opt.factors()
    before_out = nn.functional.cross_entropy(before(x), y)
    grads = dict(zip([n for n, _ in before.named_parameters()], torch.autograd.grad(before_out, before.parameters())))
    head = torch.cat([grads["head.weight"], grads["head.bias"][:, None]], 1)
    diag = factors["head"]["G"].diagonal()[:, None] * factors["head"]["A"].diagonal()[None, :]
    moved = torch.cat([model.head.weight - before.head.weight, (model.head.bias - before.head.bias)[:, None]], 1)
    torch.testing.assert_close(moved.detach(), -0.05 * head / (diag + 1e-8))
    torch.testing.assert_close((model.s - before.s).detach(), -0.05 * grads["s"] / (factors["s"]["F"] + 1e-8))


def test_new_method_options_are_validated(registered):
    with pytest.raises(curvgraph.ConfigError, match=r"power must be one of \[0.5, 1.0\]"):
        curvgraph.compile(ScaledMLP(), (torch.randn(4, 5, 6),), method="diag_fisher", power=2, backend="eager")
    with pytest.raises(curvgraph.ConfigError, match="unknown option.*kl_clip"):
        curvgraph.compile(ScaledMLP(), (torch.randn(4, 5, 6),), method="diag_fisher", kl_clip=1e-3, backend="eager")


def digits_batches(steps: int, batch: int = 64):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        index = torch.randint(0, len(x), (batch,), generator=generator)
        yield x[index].reshape(batch, 8, 8), y[index]


class DigitsScaled(nn.Module):
    """Rows of an 8x8 digit as 8 positions: dense per row, a learned scale, mean over rows, head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 32)
        self.s = nn.Parameter(torch.ones(32))
        self.head = nn.Linear(32 * 8, 10)

    def forward(self, x):
        return self.head((torch.tanh(self.fc(x)) * self.s).flatten(1))


@pytest.mark.parametrize("method, options, backend", [("kfac", {}, "inductor"), ("diag_fisher", {}, "eager")])
def test_model_with_the_new_kind_trains(registered, method, options, backend):
    torch.manual_seed(0)
    model = DigitsScaled()
    x0, _ = next(digits_batches(1))
    opt = curvgraph.compile(model, (x0,), method=method, backend=backend, seed=0, **options)
    assert opt.plan.block("s").kind == "scale"
    start = model.s.detach().clone()
    losses = [opt.step(x, y).item() for x, y in digits_batches(60)]
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5
    assert not torch.equal(model.s.detach(), start) and opt.skipped_steps == 0


class Greedy(curvgraph.BlockKind):
    """Claims every linear weight again: the ledger must refuse the second claim."""

    name = "greedy"
    factors = curvgraph.kinds.dense.Dense.factors
    cost = curvgraph.kinds.dense.Dense.cost
    write_batch_factors = write_matrix = write_split = None

    def find(self, traced, claims, sharing):
        linears = [n for n in traced.graph.nodes if n.target is aten.linear.default]
        return [curvgraph.new_block(traced, self, [n.args[1]], [], {"in": 6, "out": 6}) for n in linears[:1]]


def test_a_second_claim_names_both_passes():
    curvgraph.register_block_kind(Greedy())
    try:
        with pytest.raises(curvgraph.PlanError, match=r"'fc.weight' is claimed twice: by pass 'dense'.*by pass 'greedy'"):
            curvgraph.compile(ScaledMLP(), (torch.randn(4, 5, 6),), backend="eager")
    finally:
        curvgraph.unregister_block_kind("greedy")


class ScaleNamedDense(Scale):
    name = "dense"


def test_registering_a_taken_name_needs_replace():
    with pytest.raises(curvgraph.ConfigError, match="'dense' is registered already"):
        curvgraph.register_block_kind(ScaleNamedDense())
    with pytest.raises(curvgraph.ConfigError, match="must declare the numeric hyper-parameter 'weight_decay'"):
        curvgraph.register_method(type("NoDecay", (DiagonalFisher,), {"name": "no_decay", "hyper": {}}))


def test_a_method_state_entry_named_like_a_factor_is_an_error():
    """A method's state entry and a kind's factor of one name would share one state key and one variable."""
    clashing = type("Clashing", (DiagonalFisher,), {"name": "clashing",
                                                  "state": lambda self, block: {"A": curvgraph.StateSpec((1,))}})
    curvgraph.register_method(clashing)
    try:
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        with pytest.raises(curvgraph.CompileError, match=r"method 'clashing' names state entries \['A'\] of block '0'"):
            curvgraph.compile(model, (torch.randn(5, 3),), method="clashing", backend="eager")
    finally:
        curvgraph.unregister_method("clashing")


def ema(total, new, weight):
    """A weighted running sum, named like K-FAC's ``ema`` helper on purpose."""
    return total + weight * new


def smoothed(x, decay):
    """Calls this module's ``ema``, which must stay distinct from K-FAC's in one generated module."""
    return ema(x, 2 * x, decay)


def test_two_helpers_of_one_name_compile_into_one_module():
    w = StepWriter()
    first = w.call(kfac.ema, "a", "b", "d")
    second = w.call(smoothed, "a", "d")
    names = dict(w.helpers)
    namespace: dict = {}
    exec("import math\nimport torch\nfrom torch import Tensor\n\n" + "\n\n".join(helper_sources(w)), namespace)
    assert names[kfac.ema] == "ema" and first.startswith("ema(")
    assert w.helpers[ema] != "ema" and w.helpers[ema] in namespace  # this module's ema, qualified
    a, b, d = torch.tensor(1.0), torch.tensor(3.0), torch.tensor(0.25)
    torch.testing.assert_close(eval(first, namespace, {"a": a, "b": b, "d": d}), kfac.ema(a, b, d))
    torch.testing.assert_close(eval(second, namespace, {"a": a, "d": d}), smoothed(a, d))
    assert eval(first, namespace, {"a": a, "b": b, "d": d}) != ema(a, b, d)  # the two really differ


def test_assign_reuses_an_expression_of_this_block_or_an_enclosing_one_only():
    """``assign`` writes a repeated expression as the earlier variable where that variable is in scope: in the same
    indented block or one enclosing it, not in a sibling block (an ``if`` and its ``else``)."""
    w = StepWriter()
    w.assign("a", "f(x)")
    w.assign("b", "f(x)")
    w.assign("c", "f(y)")
    with w.indent("if cond:"):
        w.assign("d", "f(x)")
        w.assign("e", "g(x)")
    with w.indent("else:"):
        w.assign("h", "g(x)")
    assert [line.strip() for line in w.lines] == ["a = f(x)", "b = a", "c = f(y)", "if cond:", "d = a", "e = g(x)",
                                                  "else:", "h = g(x)"]


def test_factor_diagonal_matches_kron(float64):
    G, A = torch.randn(3, 3), torch.randn(4, 4)
    expected = torch.kron(G, A).diagonal().reshape(3, 4)
    torch.testing.assert_close(factor_diagonal((G, A), (-2, -1), (False, False)), expected)
    grouped = factor_diagonal((torch.stack([G, 2 * G]), torch.stack([A, A])), (-2, -1), (False, False))
    torch.testing.assert_close(grouped, torch.stack([expected, 2 * expected]))
    assert math.isclose(float(factor_diagonal((torch.arange(3.0),), (-1,), (True,)).sum()), 3.0)
