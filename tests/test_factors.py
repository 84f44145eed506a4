"""Kronecker factors against independent references: exact GGN (torch.func) and curvlinops."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import curvgraph
from helpers import curvlinops_factors, exact_ggn_block, make_targets
from models import FunctionalMLP, ModuleMLP, SequenceMLP, SharedMLP

LOSSES = ("cross_entropy", "mse", "bce_with_logits")


def batch_factors(model, x, y, loss, fisher="type2", **options):
    """The factors of one batch: ``ema=0`` keeps exactly that batch's statistics."""
    opt = curvgraph.compile(model, (x,), loss=loss, fisher=fisher, ema=0.0, backend="eager", **options)
    opt.step(x, y)
    return opt.factors(), opt


class TransposedLinear(nn.Module):
    """``x @ W + b`` with the weight stored (in, out)."""

    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(4, 3))
        self.b = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return x @ self.W + self.b


class Fork(nn.Module):
    """Two layers on one input (as a decoder's ``q`` and ``k``): the step computes their ``A`` once."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.q(x) * torch.tanh(self.k(x))


EXACT_CASES = {
    "linear": (lambda: nn.Linear(4, 3), [("weight", "bias", False)]),
    "linear-no-bias": (lambda: nn.Linear(4, 3, bias=False), [("weight", None, False)]),
    "x@W+b": (TransposedLinear, [("W", "b", True)]),
    "mlp": (lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)),
            [("0.weight", "0.bias", False), ("2.weight", "2.bias", False)]),
    "fork": (Fork, [("q.weight", "q.bias", False), ("k.weight", "k.bias", False)]),
}


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("case", EXACT_CASES)
def test_type2_factors_are_the_exact_ggn_for_one_example(float64, case, loss):
    """For a single example, every dense block's GGN is exactly kron(G, A) (type-2 Fisher)."""
    torch.manual_seed(0)
    make, blocks = EXACT_CASES[case]
    model = make()
    x = torch.randn(1, 4)
    y = make_targets(loss, (1, 3))
    reference = copy.deepcopy(model)
    factors, opt = batch_factors(model, x, y, loss)
    for weight, bias, transposed in blocks:
        name = weight.removesuffix(".weight") if weight.endswith(".weight") else weight
        exact = exact_ggn_block(reference, loss, x, y, weight, bias, transposed)
        kron = torch.kron(factors[name]["G"], factors[name]["A"])
        torch.testing.assert_close(kron, exact, rtol=1e-10, atol=1e-12)


def test_layers_on_one_input_share_the_input_factor(float64):
    """The step computes the fork's ``A`` once, and it is the mean outer product of the extended inputs."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    factors, opt = batch_factors(Fork(), x, y, "cross_entropy")
    assert "A_batch_k = A_batch_q" in opt.source
    extended = torch.cat([x, torch.ones(6, 1)], 1)
    for name in ("q", "k"):
        torch.testing.assert_close(factors[name]["A"], extended.T @ extended / 6)


def test_type2_factors_are_not_the_ggn_for_a_batch(float64):
    """Sanity check of the reference: with several examples K-FAC is an approximation."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    exact = exact_ggn_block(copy.deepcopy(model), "cross_entropy", x, y, "0.weight", "0.bias")
    factors, _ = batch_factors(model, x, y, "cross_entropy")
    assert (torch.kron(factors["0"]["G"], factors["0"]["A"]) - exact).abs().max() > 1e-4


CURVLINOPS_MODELS = {
    "module-tanh-relu": (ModuleMLP, (7, 5)),
    "functional-relu": (FunctionalMLP, (7, 5)),
    "shared-weight": (SharedMLP, (7, 2, 5)),
    "sequence": (SequenceMLP, (7, 4, 5)),
    "module-few-rows": (ModuleMLP, (6, 5)),  # 6 rows: the 8-wide layers form A from rows with their ones column
}


@pytest.mark.parametrize("fisher", ("type2", "empirical"))
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("name", CURVLINOPS_MODELS)
def test_factors_match_curvlinops(float64, name, loss, fisher):
    torch.manual_seed(1)
    make, input_shape = CURVLINOPS_MODELS[name]
    model = make()
    x = torch.randn(input_shape)
    y = make_targets(loss, (input_shape[0], 3))
    A_ref, G_ref = curvlinops_factors(model.twin(), loss, x, y, fisher)
    factors, opt = batch_factors(model, x, y, loss, fisher)
    assert sorted(factors) == sorted(model.twin_names)
    for ours, theirs in model.twin_names.items():
        torch.testing.assert_close(factors[ours]["A"], A_ref[theirs], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(factors[ours]["G"], G_ref[theirs], rtol=1e-10, atol=1e-12)


def test_layers_with_no_more_rows_than_inputs_form_A_from_rows_with_the_ones_column(float64):
    """Which form of ``A`` each dense layer's step takes (``module-few-rows`` above checks the values): the first
    layer of ``ModuleMLP`` has 5 inputs and the batch's 6 rows, the border added to the moment; the two 8-wide
    layers the ones column (:func:`curvgraph.kinds.dense.ones_column_is_smaller`)."""
    opt = curvgraph.compile(ModuleMLP(), (torch.randn(6, 5),), loss="cross_entropy", backend="eager")
    calls = re.findall(r"dense_input_factor\((.*)\)\n", opt.source)
    assert [call.endswith(", 1, True") for call in calls] == [False, True, True]


@pytest.mark.parametrize("name", ("shared-weight", "sequence"))
def test_reduce_factors_match_curvlinops(float64, name):
    torch.manual_seed(2)
    make, input_shape = CURVLINOPS_MODELS[name]
    model = make()
    x = torch.randn(input_shape)
    y = make_targets("cross_entropy", (input_shape[0], 3))
    A_ref, G_ref = curvlinops_factors(model.twin(), "cross_entropy", x, y, "type2", kfac_approx="reduce")
    factors, opt = batch_factors(model, x, y, "cross_entropy", kfac_approx="reduce")
    assert all(b.sharing == "reduce" for b in opt.plan.blocks)
    for ours, theirs in model.twin_names.items():
        torch.testing.assert_close(factors[ours]["A"], A_ref[theirs], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(factors[ours]["G"], G_ref[theirs], rtol=1e-10, atol=1e-12)
    expand, _ = batch_factors(make(), x, y, "cross_entropy")
    assert not torch.allclose(expand[next(iter(model.twin_names))]["A"], factors[next(iter(model.twin_names))]["A"])


@pytest.mark.parametrize("loss", LOSSES)
def test_mc_fisher_is_unbiased(float64, loss):
    """Averaged over many draws, the MC Fisher's G equals the type-2 G (A does not depend on the Fisher)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(3, 4)
    y = make_targets(loss, (3, 3))
    repeats = 4000
    exact, _ = batch_factors(copy.deepcopy(model), x, y, loss, "type2")
    mc, _ = batch_factors(model, x.repeat(repeats, 1), y.repeat(repeats, *([1] * (y.dim() - 1))), loss, "mc", seed=0)
    for block in ("0", "2"):
        torch.testing.assert_close(mc[block]["A"], exact[block]["A"])
        G_mc, G_exact = mc[block]["G"], exact[block]["G"]
        assert (G_mc - G_exact).norm() < 0.08 * G_exact.norm(), (block, G_mc, G_exact)


def test_ema_averages_batch_factors(float64):
    """After a first step (which sets the factors), each step blends in its batch with weight 1 - ema."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x1, x2 = torch.randn(6, 4), torch.randn(6, 4)
    y1, y2 = torch.randint(0, 3, (6,)), torch.randint(0, 3, (6,))
    opt = curvgraph.compile(model, (x1,), fisher="type2", ema=0.75, backend="eager")
    opt.step(x1, y1)
    first = opt.factors()
    second_batch, _ = batch_factors(copy.deepcopy(model), x2, y2, "cross_entropy")
    opt.step(x2, y2)
    for block in ("0", "2"):
        for f in ("A", "G"):
            expected = 0.75 * first[block][f] + 0.25 * second_batch[block][f]
            torch.testing.assert_close(opt.factors()[block][f], expected)


@pytest.mark.parametrize("groups", (1, 3))
def test_input_moment_with_bias_is_the_mean_outer_product_of_the_extended_inputs(float64, groups):
    r""":math:`\frac1R \sum_r \bar a_r \bar a_r^\top` with :math:`\bar a = [a, 1]` materialized, against
    ``input_moment``, which appends the column sums and the count to :math:`\sum a a^\top` without it
    (:func:`curvgraph.curvature.kronecker.bordered`), over two uses of 5 and 7 rows."""
    from curvgraph.curvature.kronecker import input_moment

    torch.manual_seed(0)
    rows = (torch.randn(5, groups, 4), torch.randn(7, groups, 4))
    extended = torch.cat([torch.cat([r, torch.ones(r.shape[:-1] + (1,))], -1) for r in rows])
    expected = torch.einsum("rgi,rgj->gij", extended, extended) / 12
    torch.testing.assert_close(input_moment(rows, True, torch.float64), expected)


@pytest.mark.parametrize("uses", (1, 2, 10))
@pytest.mark.parametrize("blocks", (1, 3))
def test_moments_over_many_uses_are_the_moments_of_all_rows(float64, uses, blocks):
    r"""``input_moment`` and ``output_moment`` over ``uses`` tensors of rows (each use's product added in place into
    the first's, :func:`curvgraph.curvature.kronecker.accumulated_gram`) against one product over all rows, each
    use's rows of its own count; whole factors and ``blocks`` diagonal blocks of 3 features."""
    from curvgraph.curvature.kronecker import input_moment, output_moment

    torch.manual_seed(0)
    rows = tuple(torch.randn(3 + u, 2, 8) for u in range(uses))
    joined = torch.cat(rows)
    extended = torch.cat([joined, torch.ones(joined.shape[:-1] + (1,))], -1)
    scale = torch.tensor(0.5, dtype=torch.float64)

    def blocked(x):  # the diagonal blocks of b = ceil(D / k) consecutive features, zero-padded
        size = -(-x.shape[-1] // blocks)
        padded = torch.nn.functional.pad(x, (0, blocks * size - x.shape[-1]))
        split = padded.reshape(x.shape[:-1] + (blocks, size))
        return torch.einsum("rgki,rgkj->gkij", split, split)

    full = (lambda x: torch.einsum("rgi,rgj->gij", x, x)) if blocks == 1 else blocked
    for ones_column in (False, True):  # the bordered moment, or one product of the rows with their ones column
        torch.testing.assert_close(input_moment(rows, True, torch.float64, blocks, ones_column),
                                   full(extended) / joined.shape[0])
    torch.testing.assert_close(input_moment(rows, False, torch.float64, blocks), full(joined) / joined.shape[0])
    torch.testing.assert_close(output_moment(rows, scale, torch.float64, blocks), full(joined) * scale)


def test_moments_over_many_uses_compile_to_the_same_values():
    """Compiled (Inductor writes the custom op's additions in place into the first product), the moments over 10
    uses equal the eager ones, and the rows, which the step reads again elsewhere, are unchanged."""
    from curvgraph.curvature.kronecker import input_moment, output_moment

    torch.manual_seed(0)
    rows = tuple(torch.randn(3 + u, 2, 8) for u in range(10))
    copies = [r.clone() for r in rows]
    scale = torch.tensor(0.5)

    def moments(rows):
        return (input_moment(rows, True, torch.float32), input_moment(rows, True, torch.float32, 1, True),
                output_moment(tuple(r * 2 for r in rows), scale, torch.float32))

    compiled = torch.compile(moments, fullgraph=True, dynamic=True)(rows)
    for ours, eager in zip(compiled, moments(rows)):
        torch.testing.assert_close(ours, eager)
    assert all(torch.equal(r, c) for r, c in zip(rows, copies))
