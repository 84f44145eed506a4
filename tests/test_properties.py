"""Property-based tests (hypothesis) over layer sizes, batch sizes, bias and dtype for dense and conv blocks.

For random shapes, the type-2 factors of one statistics step equal brute-force per-example
sums computed with torch.func from their definitions (``docs/conventions.md``):

* dense: :math:`A = \frac1N \sum_n \bar a_n \bar a_n^\top`,
  :math:`G = \frac1N \sum_n J_n^\top H_n J_n` (``J_n`` the Jacobian of example ``n``'s logits
  w.r.t. the layer output, ``H_n`` the Hessian of its loss term w.r.t. the logits);
* conv (expand): the same sums over examples *and* output positions, ``ā`` the patches;
* for one example, ``kron(G, A)`` is the exact GGN block of each dense layer;

and the step leaves every parameter finite. Float64 models run with float32 as the default
dtype (a float32 scalar of the default dtype once made the float64 ``G`` float32-accurate).
Every example compiles a model (about a second each, eager backend), so the example counts
are small and the runs derandomized.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import hessian, jacrev

import curvgraph
from helpers import exact_ggn_block

#: Few examples (each compiles a model), reproducible, no example database; no shrinking (minutes per failure).
PROPERTIES = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                      phases=(Phase.explicit, Phase.generate))
DTYPES = st.sampled_from([torch.float32, torch.float64])


def tolerances(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-12}


def type2_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """The factors of one type-2 statistics step on ``(x, y)`` (``ema=0``: exactly this batch's)."""
    opt = curvgraph.compile(model, (x,), fisher="type2", ema=0.0, lr=0.01, backend="eager")
    loss = opt.step(x, y)
    assert torch.isfinite(loss) and opt.skipped_steps == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return opt.factors()


def loss_hessians(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``H_n``: the Hessian of each example's cross-entropy term w.r.t. its logits, ``(N, C, C)``."""
    return torch.stack([hessian(lambda z: F.cross_entropy(z[None], y[n:n + 1]))(logits[n])
                        for n in range(len(y))])


def with_ones(a: torch.Tensor, bias: bool) -> torch.Tensor:
    return torch.cat([a, torch.ones_like(a[..., :1])], -1) if bias else a


@PROPERTIES
@given(d_in=st.integers(1, 5), hidden=st.integers(1, 5), classes=st.integers(2, 4), batch=st.integers(1, 5),
       bias=st.booleans(), dtype=DTYPES, seed=st.integers(0, 2**16))
def test_dense_factors_are_per_example_sums(d_in, hidden, classes, batch, bias, dtype, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, hidden, bias=bias), nn.Tanh(), nn.Linear(hidden, classes, bias=bias)).to(dtype)
    x = torch.randn(batch, d_in, dtype=dtype)
    y = torch.randint(0, classes, (batch,))
    reference = copy.deepcopy(model)
    factors = type2_step(model, x, y)

    with torch.no_grad():
        hidden_out = torch.tanh(reference[0](x))
        logits = reference[2](hidden_out)
    H = loss_hessians(logits, y)
    # J_n of the logits w.r.t. the first layer's output: W2 diag(1 - tanh^2)
    J = torch.stack([jacrev(lambda z: reference[2](torch.tanh(z)))(reference[0](x[n])) for n in range(batch)]).detach()
    expected = {
        "0": {"A": (with_ones(x, bias).mT @ with_ones(x, bias)) / batch,
              "G": torch.einsum("nci,ncd,ndj->ij", J, H, J) / batch},
        "2": {"A": (with_ones(hidden_out, bias).mT @ with_ones(hidden_out, bias)) / batch, "G": H.mean(0)},
    }
    for block, pair in expected.items():
        for name, value in pair.items():
            torch.testing.assert_close(factors[block][name], value, **tolerances(dtype))
    if batch == 1:  # one example: the Kronecker product is the exact GGN block of each layer
        for block in ("0", "2"):
            exact = exact_ggn_block(reference, "cross_entropy", x, y, f"{block}.weight", f"{block}.bias" if bias else None)
            torch.testing.assert_close(torch.kron(factors[block]["G"], factors[block]["A"]), exact, **tolerances(dtype))


@PROPERTIES
@given(c_in=st.integers(1, 3), c_out=st.integers(1, 3), kernel=st.integers(1, 3), extra=st.integers(0, 3),
       stride=st.integers(1, 2), batch=st.integers(1, 4), bias=st.booleans(), dtype=DTYPES, seed=st.integers(0, 2**16))
def test_conv_factors_are_per_example_and_position_sums(c_in, c_out, kernel, extra, stride, batch, bias, dtype, seed):
    torch.manual_seed(seed)
    length = kernel + extra
    positions = (length - kernel) // stride + 1
    conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, bias=bias)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(c_out * positions, 3)).to(dtype)
    x = torch.randn(batch, c_in, length, dtype=dtype)
    y = torch.randint(0, 3, (batch,))
    reference = copy.deepcopy(model)
    factors = type2_step(model, x, y)

    patches = x.unfold(2, kernel, stride).permute(0, 2, 1, 3).reshape(batch * positions, c_in * kernel)
    a = with_ones(patches, bias)
    with torch.no_grad():
        conv_out = reference[0](x)
        logits = reference[1:](conv_out)
    H = loss_hessians(logits, y)
    # J of example n's logits w.r.t. its conv output, (classes, c_out, positions)
    J = torch.stack([jacrev(lambda z: reference[1:](z[None])[0])(conv_out[n]) for n in range(batch)]).detach()
    G = torch.einsum("ncil,ncd,ndjl->ij", J, H, J) / batch
    torch.testing.assert_close(factors["0"]["A"], a.mT @ a / (batch * positions), **tolerances(dtype))
    torch.testing.assert_close(factors["0"]["G"], G, **tolerances(dtype))
