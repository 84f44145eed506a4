"""Block-diagonal factors (``max_factor_dim``, ``max_factor_memory``) against brute-force references:
the diagonal blocks of the full factors, the dense block-diagonal matrix, and the Kronecker solve."""

from __future__ import annotations

import copy
import re
import math
import warnings

import pytest
import torch
from torch import nn

import curvgraph
from curvgraph.errors import ConfigError
from curvgraph.methods.kfac import kfac_precondition
from curvgraph.passes.split import DEFAULT_MAX_FACTOR_DIM
from curvgraph.plan import Factor, split_factor


def diagonal_blocks(full: torch.Tensor, blocks: int) -> torch.Tensor:
    """The ``blocks`` diagonal blocks ``(..., k, b, b)`` of ``full`` ``(..., d, d)``, zero-padded to ``k b``."""
    d = full.shape[-1]
    size = -(-d // blocks)
    padded = torch.nn.functional.pad(full, (0, blocks * size - d, 0, blocks * size - d))
    return torch.stack([padded[..., i * size:(i + 1) * size, i * size:(i + 1) * size] for i in range(blocks)], -3)


def block_mask(d: int, blocks: int) -> torch.Tensor:
    """``(d, d)``: 1 where row and column fall in the same slice of ``ceil(d / blocks)``."""
    size = -(-d // blocks)
    index = torch.arange(d) // size
    return (index[:, None] == index[None, :]).to(torch.get_default_dtype())


def test_split_factor_shapes():
    f = split_factor(Factor((2, 19, 19), axis=-1), 7)
    assert (f.shape, f.dim, f.blocks, f.block_dim, f.lead) == ((2, 3, 7, 7), 19, 3, 7, (2,))
    assert f.label == "2x3x7x7(split 19)"
    assert split_factor(Factor((7, 7), axis=-1), 7) == Factor((7, 7), axis=-1)  # small enough: unchanged
    assert split_factor(Factor((9,), axis=-2, diagonal=True), 4) == Factor((9,), axis=-2, diagonal=True)


@pytest.mark.parametrize("axis", [-1, -2])
@pytest.mark.parametrize("lead", [(), (2,)])
def test_block_diagonal_inverse_applies_like_the_dense_matrix(float64, axis, lead):
    torch.manual_seed(0)
    rows, cols, blocks = 5, 11, 3
    matrix = torch.randn(lead + (rows, cols))
    d = cols if axis == -1 else rows
    split = split_factor(Factor(lead + (d, d), axis), -(-d // blocks))
    inverse = torch.randn(split.shape)
    # the same operator as a dense (d, d) matrix: the blocks on the diagonal, cut to d
    dense = torch.stack([torch.block_diag(*inv.unbind(0))[:d, :d] for inv in inverse.reshape((-1,) + split.shape[-3:])])
    dense = dense.reshape(lead + (d, d))
    got = kfac_precondition(matrix, (inverse,), (axis,), (False,), (True,))
    expected = matrix @ dense if axis == -1 else dense.mT @ matrix
    torch.testing.assert_close(got, expected)


def conv_net() -> nn.Sequential:
    """At a batch of 8 and ``max_factor_dim=5`` K-FAC preconditions the 150 -> 40 layer from its gradient rows."""
    return nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 5 * 5, 40),
                         nn.Tanh(), nn.Linear(40, 3))


def test_split_statistics_are_the_diagonal_blocks_of_the_full_factors(float64):
    torch.manual_seed(0)
    model = conv_net()
    x, y = torch.randn(8, 4, 5, 5), torch.randint(0, 3, (8,))
    full = curvgraph.compile(copy.deepcopy(model), (x,), fisher="type2", lr=0.1, backend="eager", progress=False)
    split = curvgraph.compile(copy.deepcopy(model), (x,), fisher="type2", lr=0.1, backend="eager", progress=False,
                              max_factor_dim=5)
    full.step(x, y)  # one step: the statistics of a second would depend on the first's (different) update
    split.step(x, y)
    checked = 0
    for block in split.plan.blocks:
        for name, factor in block.factors.items():
            reference = full.factors()[block.name][name]
            got = split.factors()[block.name][name]
            if factor.split_dim is None:
                torch.testing.assert_close(got, reference)
            else:
                checked += 1
                torch.testing.assert_close(got, diagonal_blocks(reference, factor.blocks))
    assert checked == 4  # conv A (19 per group; G: 3); the first dense A (151) and G (7); the second A (8; G: 3)


def test_split_step_is_the_block_diagonal_natural_gradient(float64):
    """One step with fixed lr: ``-lr (G_bd kron A_bd)^{-1} vec(M)``, the block-diagonal parts of the full factors
    damped with the full factors' traces, solved on the Kronecker matrix."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(9, 6), torch.randint(0, 3, (9,))
    before = copy.deepcopy(model)
    lr, damping = 0.3, 0.02
    options = dict(fisher="type2", ema=0.0, momentum=0.0, kl_clip=None, lr=lr, damping=damping, backend="eager",
                   progress=False)
    full = curvgraph.compile(copy.deepcopy(model), (x,), **options)
    full.step(x, y)
    opt = curvgraph.compile(model, (x,), max_factor_dim=2, **options)
    opt.step(x, y)
    reference = copy.deepcopy(before)
    nn.functional.cross_entropy(reference(x), y).backward()
    for index in ("0", "2"):
        layer, new = reference[int(index)], model[int(index)]
        M = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
        A, G = full.factors()[index]["A"], full.factors()[index]["G"]
        pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
        blocks = {f.dim: f.blocks for f in opt.plan.blocks[int(index) // 2].factors.values()}
        A_d = A * block_mask(A.shape[0], blocks[A.shape[0]]) + pi * math.sqrt(damping) * torch.eye(A.shape[0])
        G_d = G * block_mask(G.shape[0], blocks[G.shape[0]]) + math.sqrt(damping) / pi * torch.eye(G.shape[0])
        V = torch.linalg.solve(torch.kron(G_d, A_d), M.flatten()).reshape(M.shape)
        change = torch.cat([new.weight - layer.weight, (new.bias - layer.bias)[:, None]], 1).detach()
        torch.testing.assert_close(change, -lr * V)
        assert not torch.allclose(A_d, A + pi * math.sqrt(damping) * torch.eye(A.shape[0]))  # the split changes A


def test_compiled_split_step_matches_eager():
    """Also with the conv input factor from every second position (``conv_stats_every``) and a split layer
    preconditioned from its gradient rows, sharing the compile."""
    torch.manual_seed(2)
    model = conv_net()
    x, y = torch.randn(8, 4, 5, 5), torch.randint(0, 3, (8,))
    models = {backend: copy.deepcopy(model) for backend in ("eager", "inductor")}
    opts = {backend: curvgraph.compile(m, (x,), backend=backend, max_factor_dim=5, invert_every=2, progress=False,
                                       seed=0, conv_stats_every=2) for backend, m in models.items()}
    assert [opts["inductor"].method.from_rows(b) for b in opts["inductor"].plan.blocks] == [False, True, False]
    for _ in range(3):
        losses = {backend: float(opt.step(x, y)) for backend, opt in opts.items()}
        assert losses["eager"] == pytest.approx(losses["inductor"], rel=1e-4)
    for p, q in zip(models["eager"].parameters(), models["inductor"].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_max_factor_memory_chooses_the_largest_split_that_fits():
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    x = torch.randn(4, 64)

    def compiled(**options):
        return curvgraph.compile(copy.deepcopy(model), (x,), backend="eager", progress=False, **options)

    def state(opt) -> float:
        return sum(opt.plan.block_state_bytes(b) for b in opt.plan.blocks)

    budget = 0.6 * state(compiled())
    opt = compiled(max_factor_memory=budget)
    assert state(opt) <= budget
    # the same plan as some max_factor_dim: the largest candidate (a factor size, or a power of two) that fits
    fitting = [d for d in (65, 64, 48, 32, 16, 11, 10, 8, 4, 2, 1) if state(compiled(max_factor_dim=d)) <= budget]
    chosen = compiled(max_factor_dim=fitting[0])
    assert [b.factors for b in opt.plan.blocks] == [b.factors for b in chosen.plan.blocks]
    assert any(f.split_dim is not None for b in opt.plan.blocks for f in b.factors.values())
    roomy = compiled(max_factor_memory=1e9)
    assert all(f.split_dim is None for b in roomy.plan.blocks for f in b.factors.values())
    least = state(compiled(max_factor_dim=1))
    with pytest.raises(ConfigError, match=rf"max_factor_memory.*blocks of 1 \({re.escape(f'{least:.3g}')} bytes\); raise it"):
        compiled(max_factor_memory=100)
    assert state(compiled(max_factor_memory=least)) == least


@pytest.mark.parametrize("method", ["singd", "kbfgs"])
def test_methods_without_block_diagonal_factors_say_so(method):
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ConfigError, match=f"max_factor_dim=4 .*block '0'.*method '{method}'"):
        curvgraph.compile(model, (torch.randn(4, 12),), method=method, backend="eager", progress=False,
                          max_factor_dim=4)


def test_the_default_splits_factors_wider_than_2048_where_the_method_can():
    """``max_factor_dim="auto"`` (the default): K-FAC and EKFAC split the ``2101``-wide input factor into blocks of
    at most 2048 and keep the small ones whole; ``None`` keeps every factor whole; methods without block-diagonal
    factors keep them whole instead of refusing to compile."""
    model = nn.Sequential(nn.Linear(2100, 30), nn.ReLU(), nn.Linear(30, 3))
    x = torch.randn(4, 2100)

    def factors(**options):
        plan = curvgraph.compile(model, (x,), backend="eager", progress=False, **options).plan
        return {(b.name, name): f for b in plan.blocks for name, f in b.factors.items()}

    with warnings.catch_warnings():  # K-FAC and EKFAC split them: nothing to warn about
        warnings.simplefilter("error", UserWarning)
        split = factors()
        assert factors(method="ekfac") == split
    assert DEFAULT_MAX_FACTOR_DIM == 2048
    assert split["0", "A"] == split_factor(Factor((2101, 2101), axis=-1), 2048)
    assert (split["0", "A"].blocks, split["0", "A"].block_dim) == (2, 1051)
    assert [f.split_dim for key, f in split.items() if key != ("0", "A")] == [None, None, None]
    assert factors(max_factor_dim="auto") == split
    whole = factors(max_factor_dim=None)
    assert all(f.split_dim is None for f in whole.values()) and whole["0", "A"].shape == (2101, 2101)
    with pytest.warns(UserWarning, match=r"method 'singd' keeps every factor whole, including 1 wider than 2048: "
                                         r"block '0' factor A \(2101 wide\)"):
        assert all(f.split_dim is None for f in factors(method="singd").values())


def test_a_state_saved_with_whole_factors_names_the_split_it_does_not_fit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2100, 30), nn.ReLU(), nn.Linear(30, 3))
    x, y = torch.randn(8, 2100), torch.randint(0, 3, (8,))
    whole = curvgraph.compile(model, (x,), backend="eager", progress=False, max_factor_dim=None)
    whole.step(x, y)
    split = curvgraph.compile(model, (x,), backend="eager", progress=False)
    with pytest.raises(ConfigError, match=r"state '0\.A' has shape \(2101, 2101\) in the state_dict, \(2, 1051, 1051\) "
                                          r"here: .*factors split differently \(max_factor_dim"):
        split.load_state_dict(whole.state_dict())


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "big"])
def test_max_factor_dim_must_be_a_positive_integer(value):
    with pytest.raises(ConfigError, match="max_factor_dim must be a positive integer.*Or 'auto'"):
        curvgraph.compile(nn.Linear(3, 2), (torch.randn(2, 3),), backend="eager", max_factor_dim=value)


def test_exported_split_step_matches_the_optimizer(tmp_path):
    from curvgraph.export import load_step

    torch.manual_seed(3)
    model = conv_net()
    copy_ = copy.deepcopy(model)
    x, y = torch.randn(8, 4, 5, 5), torch.randint(0, 3, (8,))
    opt = curvgraph.compile(model, (x,), backend="eager", max_factor_dim=5, conv_stats_every=2, progress=False,
                            seed=0)
    opt.export(tmp_path / "split_step.py")
    exported = load_step(tmp_path / "split_step.py", copy_, backend="eager", seed=0)
    for _ in range(3):
        assert torch.equal(opt.step(x, y), exported.step(x, y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), copy_.parameters()))
