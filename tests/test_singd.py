"""SINGD (method="singd") against the ``singd`` package's ``SINGD`` optimizer, and its own properties.

The reference is ``singd.optim.optimizer.SINGD`` run on a copy of the same model, data and
hyper-parameters; its structures that singd does not ship under a name (small block sizes,
small hierarchical blocks, triangular matrices) are built from singd's own templates.
"""

from __future__ import annotations

import copy
import functools
import re
import warnings

import pytest
import torch
from torch import nn

import curvgraph
from curvgraph.methods.singd import STRUCTURES, structure

singd_optimizer = pytest.importorskip("singd.optim.optimizer")
from singd.structures import blockdiagonal, hierarchical  # noqa: E402
from singd.structures.blockdiagonal import Block3DiagonalMatrix  # noqa: E402
from singd.structures.dense import DenseMatrix  # noqa: E402
from singd.structures.hierarchical import HierarchicalMatrixTemplate  # noqa: E402
from singd.structures.recursive import RecursiveBottomLeftMatrixTemplate, RecursiveTopRightMatrixTemplate  # noqa: E402

SINGD = singd_optimizer.SINGD


class Hierarchical2_3(HierarchicalMatrixTemplate):
    """singd's hierarchical matrix with a 2x2 top-left and a 3x3 bottom-right block."""

    MAX_K1 = 2
    MAX_K2 = 3


def _triangular(template: type, levels: int = 12) -> type:
    """A triangular matrix of size <= ``levels`` from singd's recursive templates: a 1x1 dense block, a dense
    row/column, and a triangular matrix one smaller (singd's projection doubles the off-diagonal block)."""
    cls = DenseMatrix
    for _ in range(levels):
        cls = type("Triangular", (template,), {"MAX_DIMS": (1, float("inf")), "CLS_A": DenseMatrix, "CLS_C": cls,
                                               "WARN_NAIVE": False})
    return cls


#: curvgraph structure name -> (the singd class, or None for a class singd ships under that name).
ORACLE_STRUCTURES = {
    "block3diagonal": Block3DiagonalMatrix,
    "hierarchical2_3": Hierarchical2_3,
    "lower_triangular": _triangular(RecursiveBottomLeftMatrixTemplate),
    "upper_triangular": _triangular(RecursiveTopRightMatrixTemplate),
}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4, bias=False), nn.Tanh(), nn.Linear(4, 3))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 2, stride=2, bias=False),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))


def batches(model: str, n: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    shape = (8, 5) if model == "mlp" else (6, 2, 4, 4)
    return [(torch.randn(shape, generator=g), torch.randint(0, 3, (shape[0],), generator=g)) for _ in range(n)]


MODELS = {"mlp": mlp, "cnn": cnn}
HYPER = dict(lr=0.05, momentum=0.6, damping=0.01, alpha1=0.5, weight_decay=0.01, T=2, lr_cov=0.2)


def singd_run(model: nn.Module, data, **hyper) -> nn.Module:
    """``model`` (a copy) after one ``singd`` SINGD step per batch."""
    model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kfac_like's alpha1 notice; naive-implementation notices of the templates
        opt = SINGD(model, **hyper)
        for x, y in data:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model


def curvgraph_run(model: nn.Module, data, **hyper) -> tuple[nn.Module, curvgraph.CurvatureOptimizer]:
    model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt = curvgraph.compile(model, data[0][0], method="singd", backend="eager", **hyper)
    for x, y in data:
        opt.step(x, y)
    return model, opt


def assert_same_parameters(ours: nn.Module, reference: nn.Module, start: nn.Module) -> None:
    """Equal within 1e-5 relative, and the run moved the parameters (so the comparison means something)."""
    for (name, a), b, s in zip(ours.named_parameters(), reference.parameters(), start.parameters()):
        assert (b - s).abs().max() > 1e-3, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=name)


CASES = {
    "dense": dict(structures=("dense", "dense")),
    "diagonal": dict(structures=("diagonal", "diagonal")),
    "kfac_like": dict(structures=("dense", "dense"), kfac_like=True),
    "kfac_like-diagonal": dict(structures=("diagonal", "diagonal"), kfac_like=True),
    "mixed-normalized": dict(structures=("diagonal", "dense"), normalize_lr_cov=True, lr_cov=2.0),
    "reduce": dict(structures=("dense", "dense"), kfac_approx="reduce"),  # a compile option of the same name
}


@pytest.mark.parametrize("model, case", [("mlp", case) for case in CASES] +
                         [("cnn", case) for case in ("dense", "diagonal", "kfac_like", "reduce")])
def test_five_steps_equal_the_singd_package(float64, model, case):
    start, data = MODELS[model](), batches(model)
    hyper = {**HYPER, **CASES[case]}
    ours, opt = curvgraph_run(start, data, **hyper)
    assert opt.fisher == "empirical" and opt.factor_every == opt.invert_every == 2
    assert_same_parameters(ours, singd_run(start, data, **hyper), start)


@pytest.fixture
def singd_float64(float64, monkeypatch):
    """Let singd's block-diagonal and hierarchical matrices multiply in float64: they pick a compute dtype with
    ``lowest_precision``, which knows float16/bfloat16/float32 only (a dtype guard; the math is unchanged)."""
    for module in (blockdiagonal, hierarchical):
        monkeypatch.setattr(module, "lowest_precision", lambda *dtypes: functools.reduce(torch.promote_types, dtypes))


@pytest.mark.parametrize("name", ORACLE_STRUCTURES)
def test_other_structures_equal_singd_with_that_structure(singd_float64, monkeypatch, name):
    monkeypatch.setitem(SINGD.SUPPORTED_STRUCTURES, name, ORACLE_STRUCTURES[name])
    start, data = mlp(), batches("mlp")
    hyper = {**HYPER, "structures": (name, name)}
    ours, opt = curvgraph_run(start, data, **hyper)
    assert_same_parameters(ours, singd_run(start, data, **hyper), start)


def test_named_structures_are_singd_s(singd_float64):
    """``block_diagonal`` and ``hierarchical`` are singd's ``block30diagonal`` and ``hierarchical15_15``
    (a layer of 40 inputs spans more than one block and every hierarchical part)."""
    torch.manual_seed(0)
    start = nn.Sequential(nn.Linear(40, 33), nn.Tanh(), nn.Linear(33, 3))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(50, 40, generator=g), torch.randint(0, 3, (50,), generator=g)) for _ in range(3)]
    ours, _ = curvgraph_run(start, data, **{**HYPER, "structures": ("block_diagonal", "hierarchical")})
    reference = singd_run(start, data, **{**HYPER, "structures": ("block30diagonal", "hierarchical15_15")})
    assert_same_parameters(ours, reference, start)


@pytest.mark.parametrize("name", list(STRUCTURES) + ["block3diagonal", "hierarchical2_3"])
def test_structure_operations_against_dense_matrices(float64, name):
    """Each structure's compact operations equal the dense matrix algebra they stand for: the identity,
    the projections of K^T X K and K^T K onto the structure, products and K V, K^T V, with a leading dim."""
    st, d = structure(name), 7
    g = torch.Generator().manual_seed(0)
    eye = st.identity(torch.zeros(()), d, st.spec)
    assert torch.equal(st.matrix(eye, d, st.spec), torch.eye(d))

    def masked(flat: torch.Tensor) -> torch.Tensor:  # triangular storage is the full matrix, the other triangle zero
        if "triangular" not in name:
            return flat
        triangle = torch.tril if name.startswith("lower") else torch.triu
        return triangle(flat.unflatten(-1, (d, d))).flatten(-2)

    k = eye + masked(0.3 * torch.randn((2, st.size(d)), generator=g))
    m = masked(0.3 * torch.randn((2, st.size(d)), generator=g))
    dense_k, dense_m = st.matrix(k, d, st.spec), st.matrix(m, d, st.spec)
    mask = st.matrix(masked(torch.ones(st.size(d))), d, st.spec) != 0
    assert ((dense_k != 0) <= mask).all()
    x = torch.randn(2, d, d, generator=g)
    x = x @ x.mT
    v = torch.randn(2, d, 3, generator=g)
    torch.testing.assert_close(st.matrix(st.product(k, m, d, st.spec), d, st.spec), dense_k @ dense_m)
    torch.testing.assert_close(st.apply(k, v, False, d, st.spec), dense_k @ v)
    torch.testing.assert_close(st.apply(k, v, True, d, st.spec), dense_k.mT @ v)
    for got, full in ((st.inner(k, x, d, st.spec), dense_k.mT @ x @ dense_k),
                      (st.inner(k, None, d, st.spec), dense_k.mT @ dense_k)):
        # the projection of a symmetric matrix: its entries on the structure, twice where the mirrored entry
        # is not part of the structure (singd's rule: the mirrored entry is folded in)
        expected = torch.where(mask, full + torch.where(mask.mT, torch.zeros(()), full.mT), torch.zeros(()))
        torch.testing.assert_close(st.matrix(got, d, st.spec), expected)


def test_norm_blocks_get_one_sided_singd(float64):
    """A norm block's single factor F (C, 2, 2) gets SINGD on K alone; one step equals the dense
    computation K = I - lr_cov/2 (F + damping I - I), V = M K K^T per channel; and the model trains."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    before = copy.deepcopy(model)
    hyper = dict(lr=0.1, momentum=0.0, damping=0.01, lr_cov=0.3, T=1)
    opt = curvgraph.compile(model, x, method="singd", backend="eager", **hyper)
    assert re.search(r"# 1 \(norm\): one-sided SINGD.*K on F", opt.source)
    opt.step(x, y)
    F = opt.factors()["1"]["F"]
    K = torch.eye(2) - 0.3 * 0.5 * (F + 0.01 * torch.eye(2) - torch.eye(2))
    ln = before[1]
    loss = nn.functional.cross_entropy(before(x), y)
    gw, gb = torch.autograd.grad(loss, [ln.weight, ln.bias])
    M = torch.stack([gw, gb], -1)[:, None, :]                           # (C, 1, 2)
    V = (M @ K @ K.mT)[:, 0]
    torch.testing.assert_close(model[1].weight, ln.weight - 0.1 * V[:, 0])
    torch.testing.assert_close(model[1].bias, ln.bias - 0.1 * V[:, 1])

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))
    opt = curvgraph.compile(model, x, method="singd", backend="eager", lr=0.05, lr_cov=0.01, T=1)
    losses = [opt.step(x, y).item() for _ in range(40)]
    assert losses[-1] < 0.2 * losses[0] and opt.skipped_steps == 0


class TwoConvolutions(nn.Module):
    """A grouped convolution (2 groups) written as two convolutions on the two halves of the channels."""

    def __init__(self, grouped: nn.Conv2d) -> None:
        super().__init__()
        c_in, c_out = grouped.in_channels // 2, grouped.out_channels // 2
        self.halves = nn.ModuleList(nn.Conv2d(c_in, c_out, grouped.kernel_size) for _ in range(2))
        for i, conv in enumerate(self.halves):
            conv.weight.data.copy_(grouped.weight.data[i * c_out:(i + 1) * c_out])
            conv.bias.data.copy_(grouped.bias.data[i * c_out:(i + 1) * c_out])

    def forward(self, x):
        return torch.cat([conv(part) for conv, part in zip(self.halves, x.chunk(2, 1))], 1)


def test_grouped_convolution_gets_one_preconditioner_per_group(float64):
    """Per-group SINGD: equal to singd on the same layer written as one convolution per group."""
    torch.manual_seed(0)
    grouped = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(24, 3))
    split = nn.Sequential(TwoConvolutions(grouped[0]), *copy.deepcopy(grouped[1:]))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 4, 4, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(5)]
    hyper = {**HYPER, "structures": ("dense", "diagonal")}
    ours, opt = curvgraph_run(grouped, data, **hyper)
    state = opt.state_dict()["state"]
    assert state["0.K"].shape == (2, 19 * 19) and state["0.C"].shape == (2, 3)
    reference = singd_run(split, data, **hyper)
    weight = torch.cat([conv.weight for conv in reference[0].halves])
    bias = torch.cat([conv.bias for conv in reference[0].halves])
    torch.testing.assert_close(ours[0].weight, weight, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours[0].bias, bias, rtol=1e-5, atol=1e-7)
    assert (weight - grouped[0].weight).abs().max() > 1e-3
    torch.testing.assert_close(ours[3].weight, reference[3].weight, rtol=1e-5, atol=1e-7)


def test_state_dict_round_trip_resumes_identically():
    data = batches("mlp", 9)
    original = mlp()
    hyper = dict(HYPER, T=3, structures=("block3diagonal", "hierarchical2_3"))
    opt = curvgraph.compile(original, data[0][0], method="singd", backend="eager", **hyper)
    for x, y in data[:4]:
        opt.step(x, y)
    checkpoint = copy.deepcopy({"model": original.state_dict(), "opt": opt.state_dict()})
    later = [opt.step(x, y).item() for x, y in data[4:]]

    resumed = mlp()
    resumed.load_state_dict(checkpoint["model"])
    opt2 = curvgraph.compile(resumed, data[0][0], method="singd", backend="eager", **hyper)
    opt2.load_state_dict(checkpoint["opt"])
    assert [opt2.step(x, y).item() for x, y in data[4:]] == later
    for a, b in zip(original.parameters(), resumed.parameters()):
        assert torch.equal(a, b)

    fresh = mlp()  # the control: without the optimizer state the run differs
    fresh.load_state_dict(checkpoint["model"])
    opt3 = curvgraph.compile(fresh, data[0][0], method="singd", backend="eager", **hyper)
    assert [opt3.step(x, y).item() for x, y in data[4:]] != later


def test_no_inversion_or_decomposition_in_the_generated_step():
    names = ["dense", "diagonal", "block_diagonal", "lower_triangular", "upper_triangular", "hierarchical"]
    model = nn.Sequential(nn.Conv2d(2, 3, 3, groups=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3))
    forbidden = re.compile(r"linalg|inverse|\binv\b|cholesky|eigh?\b|eigvals|svd|\bsolve|\bqr\b|\blu\b|pinv|lstsq")
    for k_name, c_name in zip(names[:3], names[:2:-1]):  # every structure once
        opt = curvgraph.compile(model, torch.randn(4, 2, 4, 4), method="singd", backend="eager",
                                structures=(k_name, c_name))
        assert not forbidden.search(opt.source), (k_name, c_name)
    kfac = curvgraph.compile(model, torch.randn(4, 2, 4, 4), backend="eager")
    assert forbidden.search(kfac.source)  # the control: K-FAC's step does invert


def test_bfloat16_preconditioner_trains_and_stores_bfloat16():
    torch.manual_seed(0)
    model = mlp()
    data = batches("mlp", 1) * 40
    opt = curvgraph.compile(model, data[0][0], method="singd", backend="eager", lr=0.05, T=1,
                            preconditioner_dtype=torch.bfloat16)
    losses = [opt.step(x, y).item() for x, y in data]
    state = opt.state_dict()["state"]
    assert state["0.K"].dtype == state["0.m_C"].dtype == torch.bfloat16 and state["0.momentum"].dtype == torch.float32
    assert losses[-1] < 0.5 * losses[0] and opt.skipped_steps == 0


def test_options_are_checked():
    model, x = mlp(), torch.randn(8, 5)
    with pytest.raises(curvgraph.ConfigError, match="factor_every"):
        curvgraph.compile(model, x, method="singd", T=5, factor_every=2, backend="eager")
    with pytest.raises(curvgraph.ConfigError, match="structure"):
        curvgraph.compile(model, x, method="singd", structures=("dense", "triltoeplitz"), backend="eager")
    with pytest.raises(curvgraph.ConfigError, match="lr_cov"):
        curvgraph.compile(model, x, method="singd", lr_cov=lambda step: 0.1, backend="eager")
    with pytest.raises(curvgraph.ConfigError, match="preconditioner_dtype"):
        curvgraph.compile(model, x, method="singd", preconditioner_dtype=torch.int32, backend="eager")
    with pytest.warns(UserWarning, match="alpha1"):
        opt = curvgraph.compile(model, x, method="singd", kfac_like=True, backend="eager")
    assert opt.param_groups[0]["alpha1"] == 0.0
    assert curvgraph.compile(model, x, method="singd", fisher="mc", backend="eager").fisher == "mc"


@pytest.fixture(scope="module")
def compiled_and_eager():
    """The same 4 SINGD steps with torch.compile and eager (float64, hierarchical and block-diagonal sides), each
    updating K and C (T=1: one compiled graph, the slowest compile of the suite otherwise)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        data = batches("cnn", 4)
        hyper = dict(HYPER, T=1, structures=("hierarchical2_3", "block3diagonal"))
        runs = []
        for backend in ("inductor", "eager"):
            model = cnn()
            opt = curvgraph.compile(model, data[0][0], method="singd", backend=backend, **hyper)
            runs.append(([opt.step(x, y).item() for x, y in data], model))
        return runs
    finally:
        torch.set_default_dtype(previous)


def test_compiled_step_equals_eager(compiled_and_eager):
    (compiled_losses, compiled), (eager_losses, eager) = compiled_and_eager
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-10)
    for a, b in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
