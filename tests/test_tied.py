"""Tied embedding / output-head weights: one block, factors the nearest Kronecker product to both uses.

Reference for the factors: the best Frobenius approximation of ``sum_i diag(x_i) ⊗ Y_i``
by one Kronecker product, computed by brute force from the SVD of the rearranged
matrix (Van Loan & Pitsianis), on random PSD inputs and on the factors a step stores.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvgraph
from curvgraph.kinds.tied.factors import nearest_kronecker

V, D = 9, 5


def brute_force_nearest(xs, ys):
    """``kron(diag(R), C)`` of the nearest Kronecker product, from the SVD of ``sum_i x_i vec(Y_i)^T``."""
    rearranged = sum(torch.outer(x, y.flatten()) for x, y in zip(xs, ys))
    u, s, vh = torch.linalg.svd(rearranged)
    return torch.kron(torch.diag(s[0] * u[:, 0]), vh[0].reshape(ys[0].shape))


def random_psd(n, generator):
    m = torch.randn(n, n, generator=generator, dtype=torch.float64)
    return m @ m.T


@pytest.mark.parametrize("terms", [1, 2, 3])
def test_nearest_kronecker_is_the_svd_solution(terms):
    g = torch.Generator().manual_seed(terms)
    xs = tuple(torch.rand(V, generator=g, dtype=torch.float64) for _ in range(terms))
    ys = tuple(random_psd(D, g) for _ in range(terms))
    r, c = nearest_kronecker(xs, ys)
    torch.testing.assert_close(torch.kron(torch.diag(r), c), brute_force_nearest(xs, ys))
    assert (r >= 0).all() and torch.linalg.eigvalsh(c).min() > -1e-10  # PSD factors
    if terms == 1:
        torch.testing.assert_close(torch.kron(torch.diag(r), c), torch.kron(torch.diag(xs[0]), ys[0]))


class TiedLM(nn.Module):
    def __init__(self, transpose_spelling: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.fc = nn.Linear(D, D)
        self.transpose_spelling = transpose_spelling
        if not transpose_spelling:
            self.head = nn.Linear(D, V, bias=False)
            self.head.weight = self.emb.weight

    def forward(self, tokens):
        h = torch.tanh(self.fc(self.emb(tokens)))
        return h @ self.emb.weight.T if self.transpose_spelling else self.head(h)


@pytest.mark.parametrize("transpose_spelling", [False, True], ids=["head.weight=emb.weight", "h@emb.weight.T"])
def test_tied_weight_is_one_block_that_trains(transpose_spelling):
    torch.manual_seed(0)
    x = torch.randint(0, V, (4, 6))
    y = torch.randint(0, V, (4, 6))
    opt = curvgraph.compile(TiedLM(transpose_spelling), (x,), loss="token_cross_entropy", backend="eager")
    block = opt.plan.block("emb")
    assert block.kind == "tied" and len(block.uses) == 2 and opt.plan.fallback_params == ()
    assert block.factors["R"] == curvgraph.Factor((V,), axis=-2, diagonal=True)
    losses = [opt.step(x, y).item() for _ in range(12)]
    assert losses[-1] < 0.6 * losses[0], losses


def test_stored_factors_are_the_nearest_kronecker_of_the_two_uses():
    """With ema=0 the stored factors are the batch's: check them against the brute force on the uses' terms."""
    torch.manual_seed(1)
    model = TiedLM().double()
    x, y = torch.randint(0, V, (3, 4)), torch.randint(0, V, (3, 4))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}  # before the step
    opt = curvgraph.compile(model, (x,), loss="token_cross_entropy", fisher="type2", backend="eager", lr=0.1)
    opt.step(x, y)
    f = opt.factors()["emb"]
    # the two uses' terms, recomputed by hand
    emb_out = params["emb.weight"][x]
    h = torch.tanh(emb_out @ params["fc.weight"].T + params["fc.bias"])
    logits = h @ params["emb.weight"].T
    p = logits.softmax(-1)
    counted = x.numel()
    # type-2 output vectors of the head: rows of diag(sqrt p) - p sqrt(p)^T per token
    # column c of S = diag(sqrt p) - p sqrt(p)^T is sqrt(p_c) (e_c - p): s[token, c, :]
    s = (torch.diag_embed(p.sqrt()) - p[..., :, None] * p.sqrt()[..., None, :]).transpose(-1, -2).reshape(-1, V, V)
    x2 = s.square().sum((0, 1)) / counted
    y2 = h.reshape(-1, D).T @ h.reshape(-1, D) / counted
    # lookup: output vectors J^T s through the head and fc back to the embedding output
    jac = (params["emb.weight"][None, None] * (1 - h.square())[:, :, None, :]) @ params["fc.weight"]  # (N, T, V, D)
    g_lookup = torch.einsum("ntcv,ntvd->ntcd", s.reshape(3, 4, V, V), jac).reshape(-1, D)
    y1 = g_lookup.T @ g_lookup / counted
    x1 = torch.bincount(x.flatten(), minlength=V).double() / counted
    expected = brute_force_nearest((x1, x2), (y1, y2))
    torch.testing.assert_close(torch.kron(torch.diag(f["R"]), f["F"]), expected, rtol=1e-6, atol=1e-10)
