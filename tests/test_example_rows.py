"""Every built-in kind's example rows rebuild each example's gradient matrix exactly.

Reference: per-example gradients of the mean loss by ``torch.func.vmap(grad)``, arranged
as the block matrix with the kind's own layout (the layout itself is checked against
exact curvature elsewhere). The rows reach the generated step through a probe method
registered here, which stores :func:`example_matrices` of the rows built from the loss
gradients (``BlockVars.gradient_uses``) and leaves the parameters unchanged.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import curvgraph
from curvgraph.codegen.writer import StateSpec
from curvgraph.curvature.kronecker import example_matrices

BATCH = 5


class ExampleProbe(curvgraph.Method):
    """Stores every example's gradient matrix (from the kinds' example rows) in the state; never moves."""

    name = "example_probe"
    hyper = {"weight_decay": curvgraph.Hyper(0.0, lambda name, v: v)}

    def preconditioner(self, block):
        return ()

    def state(self, block):
        return {"examples": StateSpec((BATCH,) + tuple(block.matrix_shape))}

    def write_statistics(self, w, blocks):
        pass

    def write_refresh(self, w, blocks):
        pass

    def write_direction(self, w, blocks):
        for b in blocks:
            rows = b.kind.write_example_rows(w, b, b.gradient_uses, torch.float64)
            order = sorted(b.block.factors, key=lambda f: b.block.factors[f].axis)
            w.commit(b.state("examples"), w.call(example_matrices, w.pack(rows[f] for f in order), "batch"))
            w.line(f"{b.direction} = torch.zeros_like({b.grad})")

    def cost(self, block):
        return {}


class SharedSequence(nn.Module):
    """A dense weight applied twice over a sequence (two uses, positions), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        return self.head(self.fc(torch.tanh(self.fc(x))).mean(1))


class GroupedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.head = nn.Linear(6 * 3 * 3, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


class LayerNormMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.norm(self.fc(x)))


class TokenBag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.pos = nn.Parameter(0.1 * torch.randn(1, 8, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, tokens):
        return self.head(torch.tanh(self.emb(tokens) + self.pos[:, : tokens.shape[1]]).mean(1))


class PackedProjection(nn.Module):
    """A packed (3*4, 4) weight split [q; kv] between two different inputs (cross-attention's in-projection)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(0.3 * torch.randn(12, 4))
        self.b = nn.Parameter(0.1 * torch.randn(12))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        w_q, w_kv = self.w.split([4, 8])
        b_q, b_kv = self.b.split([4, 8])
        k, v = nn.functional.linear(torch.tanh(x), w_kv, b_kv).chunk(2, -1)
        return self.head(nn.functional.scaled_dot_product_attention(nn.functional.linear(x, w_q, b_q), k, v).mean(1))


class TiedTokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.fc = nn.Linear(4, 4)

    def forward(self, tokens):
        return (torch.tanh(self.fc(self.emb(tokens))) @ self.emb.weight.T).mean(1)


def matrix_of(kind: str, params: dict[str, torch.Tensor], block: str) -> torch.Tensor:
    """The block matrix of per-example gradients ``params`` (leading example dim) in the kind's layout."""
    weight = params[f"{block}.weight"] if f"{block}.weight" in params else params[block]
    bias = params.get(f"{block}.bias")
    n = weight.shape[0]
    if kind == "packed":
        return torch.cat([params["w"].reshape(n, 3, 4, 4), params["b"].reshape(n, 3, 4, 1)], -1)
    if kind in ("embedding", "tied"):
        return weight
    if kind == "position":
        return weight[:, 0]
    if kind == "dense":
        return weight if bias is None else torch.cat([weight, bias[..., None]], -1)
    if kind == "conv":
        groups = 2
        rows = weight.reshape(n, groups, weight.shape[1] // groups, -1)
        return torch.cat([rows, bias.reshape(n, groups, -1, 1)], -1)
    return torch.stack([weight, bias], -1)


CASES = [
    (SharedSequence, (BATCH, 3, 4), [("fc", "dense"), ("head", "dense")]),
    (GroupedConv, (BATCH, 4, 5, 5), [("conv", "conv"), ("head", "dense")]),
    (LayerNormMLP, (BATCH, 4), [("fc", "dense"), ("norm", "norm"), ("head", "dense")]),
    (TokenBag, (BATCH, 6), [("emb", "embedding"), ("pos", "position"), ("head", "dense")]),
    (PackedProjection, (BATCH, 3, 4), [("w", "packed"), ("head", "dense")]),
    (TiedTokens, (BATCH, 6), [("emb", "tied"), ("fc", "dense")]),
]


@pytest.fixture(scope="module", autouse=True)
def probe_method():
    curvgraph.register_method(ExampleProbe)
    yield
    curvgraph.unregister_method("example_probe")


@pytest.mark.parametrize("model_cls,shape,blocks", CASES, ids=[c[0].__name__ for c in CASES])
def test_example_rows_rebuild_per_example_gradients(model_cls, shape, blocks):
    torch.manual_seed(0)
    model = model_cls().double()
    x = torch.randint(0, 7, shape) if model_cls in (TokenBag, TiedTokens) else torch.randn(shape, dtype=torch.float64)
    y = torch.randint(0, 7 if model_cls is TiedTokens else 3, (BATCH,))
    opt = curvgraph.compile(model, (x,), method="example_probe", backend="eager")
    assert [(b.name, b.kind) for b in opt.plan.blocks] == blocks
    opt.step(x, y)

    params = {k: v.detach() for k, v in model.named_parameters()}

    def example_loss(p, xn, yn):
        out = functional_call(model, p, (xn[None],))
        return nn.functional.cross_entropy(out, yn[None]) / BATCH  # its share of the mean loss

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, y)
    for name, kind in blocks:
        expected = matrix_of(kind, per_example, name)
        got = opt.state_dict()["state"][f"{name}.examples"]
        torch.testing.assert_close(got, expected.reshape(got.shape), rtol=1e-9, atol=1e-12)
