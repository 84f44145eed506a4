"""EKFAC against independent references: brute force, the exact GGN, curvlinops, K-FAC.

Brute force: the eigenbases by ``torch.linalg.eigh`` of the factors curvgraph reports,
each example's gradient by ``torch.func.vmap(grad)`` (empirical Fisher) or the exact GGN
block by ``torch.func`` (type-2), the scaling as the diagonal of that Fisher in the
Kronecker eigenbasis, and the direction
:math:`V = K[(K^\\top M) / (S + \\lambda)]K^\\top` with :math:`K = Q_G \\otimes Q_A`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import curvgraph
from helpers import assert_export_resumes, exact_ggn
from test_example_rows import LayerNormMLP

BATCH = 12
LR, DAMPING = 0.1, 0.05


class GroupedCNN(nn.Module):
    """A grouped convolution (positions: P > 1), then a dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 2, stride=2, groups=2)
        self.head = nn.Linear(6 * 2 * 2, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class SequenceMLP(nn.Module):
    """A dense layer over 3 positions (P > 1 for a dense block), averaged, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)).mean(1))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


# model, input shape, blocks (name, kind)
CASES = {
    "mlp": (mlp, (BATCH, 4), [("0", "dense"), ("2", "dense")]),
    "cnn": (GroupedCNN, (BATCH, 4, 4, 4), [("conv", "conv"), ("head", "dense")]),
    "layernorm": (LayerNormMLP, (BATCH, 4), [("fc", "dense"), ("norm", "norm"), ("head", "dense")]),
    "sequence": (SequenceMLP, (BATCH, 3, 3), [("fc", "dense"), ("head", "dense")]),
}


def block_matrix(kind: str, params: dict[str, torch.Tensor], name: str, lead: int = 0) -> torch.Tensor:
    """The block matrix of ``params`` in the kind's layout, with ``lead`` leading (example) dims kept."""
    weight, bias = params[f"{name}.weight"], params.get(f"{name}.bias")
    front = weight.shape[:lead]
    if kind == "dense":
        return weight if bias is None else torch.cat([weight, bias[..., None]], -1)
    if kind == "conv":
        groups = 2
        rows = weight.reshape(front + (groups, weight.shape[lead] // groups, -1))
        return torch.cat([rows, bias.reshape(front + (groups, -1, 1))], -1)
    return torch.stack([weight, bias], -1)


def rotate(m: torch.Tensor, q: torch.Tensor, axis: int, back: bool = False) -> torch.Tensor:
    """Fibers of ``m`` ``(n, *lead, d_1, ..., d_r)`` along ``axis`` times ``Q^T`` (``back``: times ``Q``)."""
    lead = q.dim() - 2
    rank = m.dim() - 1 - lead
    L, A = "abc"[:lead], "pqrs"[:rank]
    src = A[rank + axis]
    out = A.replace(src, "z")
    q_term = f"{L}z{src}" if back else f"{L}{src}z"
    return torch.einsum(f"n{L}{A},{q_term}->n{L}{out}", m, q)


def ekfac_direction(M: torch.Tensor, bases: list[tuple[torch.Tensor, int]], S: torch.Tensor) -> torch.Tensor:
    """:math:`K[(K^T M) / (S + \\lambda)]K^T` for one block matrix ``M`` (no example dim)."""
    m = M[None]
    for q, axis in bases:
        m = rotate(m, q, axis)
    m = m / (S + DAMPING)
    for q, axis in bases:
        m = rotate(m, q, axis, back=True)
    return m[0]


def factor_bases(opt, name: str) -> list[tuple[torch.Tensor, int]]:
    """Eigenbases (``torch.linalg.eigh`` of the reported factors) with the axis each acts on."""
    block = opt.plan.block(name)
    factors = opt.factors()[name]
    return [(torch.linalg.eigh(factors[f]).eigenvectors, spec.axis) for f, spec in block.factors.items()]


def one_step(case: str, fisher: str):
    """One EKFAC step (ema 0, no momentum or clipping): (model before, model after, optimizer, x, y)."""
    make, shape, blocks = CASES[case]
    torch.manual_seed(0)
    model = make()
    x, y = torch.randn(shape), torch.randint(0, 3, (BATCH,))
    before = copy.deepcopy(model)
    opt = curvgraph.compile(model, (x,), method="ekfac", fisher=fisher, lr=LR, momentum=0.0, kl_clip=None,
                            damping=DAMPING, backend="eager")
    assert [(b.name, b.kind) for b in opt.plan.blocks] == blocks
    opt.step(x, y)
    return before, model, opt, x, y


def change(before: nn.Module, after: nn.Module, kind: str, name: str) -> torch.Tensor:
    old, new = dict(before.named_parameters()), dict(after.named_parameters())
    return block_matrix(kind, {k: (new[k] - old[k]).detach() for k in old}, name)


def per_example_gradients(model: nn.Module, x, y) -> dict[str, torch.Tensor]:
    """Each example's loss gradient :math:`\\nabla \\ell_n` by ``torch.func.vmap(grad)``, by parameter name."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def example_loss(p, xn, yn):
        return nn.functional.cross_entropy(functional_call(model, p, (xn[None],)), yn[None])

    return vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, y)


def empirical_scaling(per_example: dict[str, torch.Tensor], kind: str, name: str,
                      bases: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """The empirical Fisher's diagonal in the eigenbasis: :math:`\\frac1N \\sum_n (K^\\top \\operatorname{vec} \\nabla\\ell_n)^2`."""
    rotated = block_matrix(kind, per_example, name, lead=1)
    for q, axis in bases:
        rotated = rotate(rotated, q, axis)
    return rotated.square().mean(0)


@pytest.mark.parametrize("case", list(CASES))
def test_one_step_is_the_brute_force_ekfac_direction_empirical(float64, case):
    """Empirical Fisher: S = (1/N) sum_n (K^T vec grad l_n)^2 from per-example gradients by vmap(grad)."""
    before, after, opt, x, y = one_step(case, "empirical")
    per_example = per_example_gradients(before, x, y)
    mean = {k: v.mean(0) for k, v in per_example.items()}
    for name, kind in CASES[case][2]:
        bases = factor_bases(opt, name)
        S = empirical_scaling(per_example, kind, name, bases)
        expected = ekfac_direction(block_matrix(kind, mean, name), bases, S)
        torch.testing.assert_close(change(before, after, kind, name), -LR * expected)
        torch.testing.assert_close(opt.state_dict()["state"][f"{name}.scaling"], S)


def test_between_refreshes_the_scaling_averages_in_the_stale_basis(float64):
    """invert_every=2: the second step rotates by the first step's bases and averages the scaling,
    S = ema S_1 + (1 - ema) S_2, with S_2 measured in those bases on the second batch."""
    torch.manual_seed(6)
    model = mlp()
    batches = [(torch.randn(BATCH, 4), torch.randint(0, 3, (BATCH,))) for _ in range(2)]
    opt = curvgraph.compile(model, (batches[0][0],), method="ekfac", fisher="empirical", lr=LR, momentum=0.0,
                            kl_clip=None, damping=DAMPING, ema=0.5, invert_every=2, backend="eager")
    opt.step(*batches[0])
    bases = {name: factor_bases(opt, name) for name in ("0", "2")}
    first = {name: opt.state_dict()["state"][f"{name}.scaling"] for name in ("0", "2")}
    second = copy.deepcopy(model)
    opt.step(*batches[1])
    per_example = per_example_gradients(second, *batches[1])
    mean = {k: v.mean(0) for k, v in per_example.items()}
    for name in ("0", "2"):
        S = 0.5 * first[name] + 0.5 * empirical_scaling(per_example, "dense", name, bases[name])
        expected = ekfac_direction(block_matrix("dense", mean, name), bases[name], S)
        torch.testing.assert_close(change(second, model, "dense", name), -LR * expected)


SPLIT_CASES = {  # model, input, max_factor_dim, the factors' labels
    "mlp": (lambda: nn.Sequential(nn.Linear(11, 8), nn.Tanh(), nn.Linear(8, 3)), (16, 11), 6,
            {("0", "A"): "2x6x6(split 12)", ("0", "G"): "2x4x4(split 8)", ("2", "A"): "2x5x5(split 9)",
             ("2", "G"): "3x3"}),
    "cnn": (GroupedCNN, (16, 4, 4, 4), 5,
            {("conv", "A"): "2x2x5x5(split 9)", ("conv", "G"): "2x3x3", ("head", "A"): "5x5x5(split 25)",
             ("head", "G"): "3x3"}),
}


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_block_diagonal_factors_give_the_ekfac_direction_of_the_block_diagonal_matrix(float64, case, tmp_path):
    """``max_factor_dim`` splits factors into diagonal blocks, some zero-padded (``9 = 5 + 4``): the step is the
    brute-force EKFAC direction in the eigenbasis of the ``d x d`` block-diagonal matrix of the blocks curvgraph
    reports (``torch.linalg.eigh`` of the whole matrix, per group of a grouped convolution; the scaling from
    per-example gradients), so the padding's eigen-coordinates carry nothing; the exported step continues it
    bitwise."""
    make, shape, max_dim, labels = SPLIT_CASES[case]
    torch.manual_seed(0)
    model = make()
    x, y = torch.randn(shape), torch.randint(0, 3, (shape[0],))
    before = copy.deepcopy(model)
    opt = curvgraph.compile(model, (x,), method="ekfac", fisher="empirical", lr=LR, momentum=0.0, kl_clip=None,
                            damping=DAMPING, backend="eager", max_factor_dim=max_dim)
    assert {(b.name, f): spec.label for b in opt.plan.blocks for f, spec in b.factors.items()} == labels
    opt.step(x, y)
    assert opt.skipped_steps == 0
    per_example = per_example_gradients(before, x, y)
    mean = {k: v.mean(0) for k, v in per_example.items()}
    for block in opt.plan.blocks:
        stored = opt.factors()[block.name]
        bases = []
        for f, spec in block.factors.items():
            whole = stored[f]
            if spec.split_dim is not None:  # the blocks as one d x d matrix, per leading index
                d, groups = spec.dim, whole.reshape((-1,) + whole.shape[-3:])
                whole = torch.stack([torch.block_diag(*blocks)[:d, :d] for blocks in groups])
                whole = whole.reshape(spec.lead + (d, d))
            bases.append((torch.linalg.eigh(whole).eigenvectors, spec.axis))
        S = empirical_scaling(per_example, block.kind, block.name, bases)
        expected = ekfac_direction(block_matrix(block.kind, mean, block.name), bases, S)
        torch.testing.assert_close(change(before, model, block.kind, block.name), -LR * expected)
    assert_export_resumes(opt, model, [(x, y), (2 * x, y)], tmp_path / "ekfac_split.py")


def exact_block(model: nn.Module, kind: str, name: str, x, y) -> torch.Tensor:
    """The exact type-2 GGN of the mean loss in the block's coordinates (its block matrix, row-major)."""
    params = dict(model.named_parameters())
    matrix = block_matrix(kind, {k: v.detach() for k, v in params.items()}, name)
    weight_shape = params[f"{name}.weight"].shape

    def unpack(theta: torch.Tensor) -> dict[str, torch.Tensor]:
        m = theta.reshape(matrix.shape)
        if kind == "norm":
            return {f"{name}.weight": m[:, 0], f"{name}.bias": m[:, 1]}
        new = {f"{name}.weight": (m[..., :-1] if f"{name}.bias" in params else m).reshape(weight_shape)}
        if f"{name}.bias" in params:
            new[f"{name}.bias"] = m[..., -1].reshape(-1)
        return new

    return exact_ggn(model, "cross_entropy", x, y, matrix.flatten(), unpack)


def kronecker_matrix(ordered: list[torch.Tensor], lead: tuple[int, ...]) -> torch.Tensor:
    """``kron`` of per-axis matrices in axis order (row-major vec), block-diagonal over one leading dim."""
    if lead:
        return torch.block_diag(*[kronecker_matrix([m[i] for m in ordered], ()) for i in range(lead[0])])
    k = ordered[0]
    for m in ordered[1:]:
        k = torch.kron(k, m)
    return k


@pytest.mark.parametrize("case", ["mlp", "cnn", "layernorm", "sequence"])
def test_type2_scaling_is_the_exact_ggn_diagonal_and_beats_kfac(float64, case):
    """Type-2: S = diag(K^T F K) for the exact GGN block F; the step is the brute-force direction; and
    ||F - K diag(S) K^T||_F <= ||F - G kron A||_F (EKFAC's scaling is the best diagonal in K-FAC's basis)."""
    before, after, opt, x, y = one_step(case, "type2")
    grads = dict(zip([n for n, _ in before.named_parameters()],
                     torch.autograd.grad(nn.functional.cross_entropy(before(x), y), list(before.parameters()))))
    for name, kind in CASES[case][2]:
        block = opt.plan.block(name)
        lead = next(iter(block.factors.values())).lead
        F = exact_block(before, kind, name, x, y)
        bases = factor_bases(opt, name)
        K = kronecker_matrix([q for q, _ in sorted(bases, key=lambda b: b[1])], lead)
        S = torch.diagonal(K.T @ F @ K).reshape(block.matrix_shape)
        torch.testing.assert_close(opt.state_dict()["state"][f"{name}.scaling"], S)
        M = block_matrix(kind, grads, name)
        torch.testing.assert_close(change(before, after, kind, name), -LR * ekfac_direction(M, bases, S))

        ekfac_error = torch.linalg.matrix_norm(F - K @ torch.diag(S.flatten()) @ K.T)
        factors = opt.factors()[name]
        kfac = kronecker_matrix([factors[f] for f in sorted(block.factors, key=lambda f: block.factors[f].axis)], lead)
        kfac_error = torch.linalg.matrix_norm(F - kfac)
        assert ekfac_error <= kfac_error * (1 + 1e-10) + 1e-12, (name, ekfac_error, kfac_error)
        if kind == "dense" and case != "sequence":
            assert ekfac_error < 0.999 * kfac_error  # strictly better on these blocks: the test can fail


def test_matches_curvlinops_ekfac(float64):
    """curvlinops' EKFACLinearOperator (type-2, weight and bias joint): the same EKFAC matrix per block."""
    from curvlinops import EKFACLinearOperator

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    twin = copy.deepcopy(model)
    reference = EKFACLinearOperator(twin, nn.CrossEntropyLoss(), list(twin.parameters()), [(x, y)],
                                    fisher_type="type-2", separate_weight_and_bias=False, check_deterministic=False)
    reference._maybe_compute_ekfac()
    opt = curvgraph.compile(model, (x,), method="ekfac", fisher="type2", lr=LR, momentum=0.0, kl_clip=None,
                            backend="eager")
    opt.step(x, y)
    state = opt.state_dict()["state"]
    for name in ("0", "2", "4"):
        ours_K = torch.kron(state[f"{name}.G_basis"], state[f"{name}.A_basis"])
        ours = ours_K @ torch.diag(state[f"{name}.scaling"].flatten()) @ ours_K.T
        theirs_K = torch.kron(reference._gradient_covariances_eigenvectors[name],
                              reference._input_covariances_eigenvectors[name])
        theirs = theirs_K @ torch.diag(reference._corrected_eigenvalues[name].flatten()) @ theirs_K.T
        torch.testing.assert_close(ours, theirs)


def run(opt, data) -> list[float]:
    return [opt.step(x, y).item() for x, y in data]


def checkpoint_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4, 6), nn.LayerNorm(6),
                         nn.Linear(6, 3))


def test_checkpoint_resumes_identically():
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 2, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(8)]

    def compile_(m):  # MC Fisher (RNG), momentum, stale bases between refreshes, scaling every other step
        return curvgraph.compile(m, (data[0][0],), method="ekfac", fisher="mc", lr=0.01, factor_every=2,
                                 invert_every=3, seed=7, backend="eager")

    original = checkpoint_model()
    opt = compile_(original)
    run(opt, data[:3])
    checkpoint = copy.deepcopy({"model": original.state_dict(), "opt": opt.state_dict()})
    losses = run(opt, data[3:])
    resumed = checkpoint_model()
    resumed.load_state_dict(checkpoint["model"])
    opt2 = compile_(resumed)
    opt2.load_state_dict(checkpoint["opt"])
    assert run(opt2, data[3:]) == losses
    for a, b in zip(original.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    fresh = checkpoint_model()
    fresh.load_state_dict(checkpoint["model"])
    assert run(compile_(fresh), data[3:]) != losses  # the control: without the optimizer state it differs


def test_kind_without_example_rows_gets_kfacs_rule(float64):
    """The example kind ``scale`` (examples/extending.py) has no example rows: its block is preconditioned
    with its factor's eigenvalues, i.e. exactly K-FAC's 1 / (F + damping)."""
    from extending import Scale

    curvgraph.register_block_kind(Scale(), before="norm")  # ahead of the built-in that takes scales too
    try:
        class Scaled(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.fc = nn.Linear(4, 5)
                self.s = nn.Parameter(torch.rand(5) + 0.5)
                self.head = nn.Linear(5, 3)

            def forward(self, x):
                return self.head(torch.tanh(self.fc(x)) * self.s)

        torch.manual_seed(4)
        model = Scaled()
        x, y = torch.randn(BATCH, 4), torch.randint(0, 3, (BATCH,))
        updates, sources = {}, {}
        for method in ("ekfac", "kfac"):
            m = copy.deepcopy(model)
            opt = curvgraph.compile(m, (x,), method=method, fisher="type2", lr=LR, momentum=0.0, kl_clip=None,
                                    damping=DAMPING, backend="eager")
            assert opt.plan.block("s").kind == "scale"
            opt.step(x, y)
            sources[method] = opt.source
            updates[method] = {k: (v - model.get_parameter(k)).detach() for k, v in m.named_parameters()}
        torch.testing.assert_close(updates["ekfac"]["s"], updates["kfac"]["s"])
        assert not torch.allclose(updates["ekfac"]["fc.weight"], updates["kfac"]["fc.weight"])
        assert "s: kind 'scale' has no example rows" in sources["ekfac"]  # the generated step says which rule
    finally:
        curvgraph.unregister_block_kind("scale")


def test_cost_counts_eigendecompositions_and_rotations():
    from curvgraph.methods.ekfac import EIGH_FLOPS

    opt = curvgraph.compile(mlp(), (torch.randn(BATCH, 4),), method="ekfac", backend="eager")
    kfac = curvgraph.compile(mlp(), (torch.randn(BATCH, 4),), backend="eager")
    block, kblock = opt.plan.block("0"), kfac.plan.block("0")
    assert block.cost["inversion"] == EIGH_FLOPS * (5**3 + 5**3)  # A: 4 inputs + bias, G: 5 outputs
    assert block.cost["precondition"] == 2 * (2 * 25 * 5 + 2 * 25 * 5) + 2 * 25
    assert opt.plan.at_example(block.cost["statistics"]) > opt.plan.at_example(kblock.cost["statistics"])
    assert block.cost["state_bytes"] > kblock.cost["state_bytes"]  # eigenbases and the scaling on top


@pytest.fixture(scope="module")
def compiled_run():
    """Default (adaptive) EKFAC through torch.compile on a tiny classification problem."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.LayerNorm(12), nn.Linear(12, 3))
    x = torch.randn(32, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    opt = curvgraph.compile(model, (x,), method="ekfac", invert_every=1)  # one graph to compile
    return [opt.step(x, y).item() for _ in range(12)], opt


def test_compiled_ekfac_trains(compiled_run):
    losses, opt = compiled_run
    assert opt.skipped_steps == 0
    assert losses[-1] < 0.7 * losses[0], losses
