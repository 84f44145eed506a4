r"""Kronecker factors of a tied embedding / output-head weight ``E`` of shape ``(V, d)``.

The weight is looked up (``y = E[i]``, :mod:`curvgraph.kinds.embedding`) and applied as
the output head (``z = h E^T``). In the block matrix ``E`` (rows: tokens, columns:
features) the two uses contribute two Kronecker products of opposite roles:

.. math:: F \approx X_1 \otimes Y_1 + X_2 \otimes Y_2, \qquad
          X_1 = \operatorname{diag}(n_v/R),\ Y_1 = G_{\text{lookup}},\quad
          X_2 = \operatorname{diag}(G_{\text{head}}),\ Y_2 = A_{\text{head}}

(token frequencies and the lookup's output-vector factor; the head's output-vector
factor over the vocabulary -- kept to its diagonal, a ``V x V`` matrix is never formed
-- and the head's input factor). The block's two factors are the best approximation
of that sum by *one* Kronecker product in the Frobenius norm (Van Loan & Pitsianis
1993): with :math:`P_{ij} = \langle X_i, X_j\rangle`, :math:`Q_{ij} = \langle Y_i, Y_j\rangle`
and ``a`` the top eigenvector of :math:`QP` normalized to :math:`a^\top P a = 1`,

.. math:: R = \sum_i a_i X_i \quad(\text{diagonal, axis -2}),\qquad
          F = \sum_j (Pa)_j\, Y_j \quad(d \times d,\ \text{axis -1}).

``P`` and ``Q`` have non-negative entries (inner products of PSD matrices), so ``a`` is
non-negative (Perron-Frobenius) and ``R``, ``F`` are PSD; with one use the result is
that use's own ``X ⊗ Y``.
"""

from __future__ import annotations

import sympy
import torch
import torch.nn.functional as F
from torch import Tensor

from ..dense.factors import dense_grad_factor, dense_input_factor
from ..embedding.factors import token_frequencies


def nearest_kronecker(xs: tuple[Tensor, ...], ys: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    r"""``(R, F)`` with :math:`R \otimes F` the Frobenius-nearest Kronecker product to :math:`\sum_i X_i \otimes Y_i`.

    ``xs`` are diagonal factors stored as vectors ``(V,)``, ``ys`` dense ``(d, d)``; see the module docstring.
    """
    x = torch.stack(xs)
    y = torch.stack([m.flatten() for m in ys])
    p, q = x @ x.T, y @ y.T
    jitter = 1e-12 * p.diagonal().sum().clamp_min(torch.finfo(p.dtype).tiny)
    # cholesky_ex, not cholesky: no error check in the graph (a check is an effect, and torch 2.13's FX graph cache
    # stores no graph with one); a P that is not finite gives factors that are not, which the step reports and skips
    chol = torch.linalg.cholesky_ex(p + jitter * torch.eye(len(xs), dtype=p.dtype, device=p.device))[0]
    _, vectors = torch.linalg.eigh(chol.T @ q @ chol)
    top = vectors[:, -1] * torch.sign(vectors[:, -1].sum())
    a = torch.linalg.solve_triangular(chol.T, top[:, None], upper=True)[:, 0]
    return a @ x, ((p @ a) @ y).reshape(ys[0].shape)


def tied_factors(indices: tuple[Tensor, ...], lookup_grads: tuple[Tensor, ...], head_inputs: tuple[Tensor, ...],
                 head_grads: tuple[Tensor, ...], vocab: int, batch: int, examples: int, scale: Tensor,
                 dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """This batch's ``(R, F)`` from the lookups' token ids and output vectors and the heads' inputs and output vectors."""
    x1 = token_frequencies(indices, vocab, dtype)
    y1 = dense_grad_factor(lookup_grads, False, examples, scale, dtype)
    x2 = sum(g.to(dtype).reshape(-1, vocab).square().sum(0) for g in head_grads) * scale
    y2 = dense_input_factor(head_inputs, False, False, batch, dtype)
    return nearest_kronecker((x1, x2), (y1, y2))


def tied_example_rows(indices: tuple[Tensor, ...], lookup_grads: tuple[Tensor, ...], head_inputs: tuple[Tensor, ...],
                      head_grads: tuple[Tensor, ...], vocab: int, batch: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    r"""Example rows ``(token-side (S*N, P, V), feature-side (S*N, P, d))``:
    :math:`M_n = \sum_p e_{i_{n,p}} g_{n,p}^\top + \sum_q g^{\text{head}}_{n,q} h_{n,q}^\top`."""
    samples = lookup_grads[0].shape[0] // batch

    def per_sample(t: Tensor) -> Tensor:  # (N, P, k) -> (S*N, P, k), the same rows for every sample
        return t.expand(samples, *t.shape).reshape(-1, *t.shape[1:])

    onehots = [per_sample(F.one_hot(i.reshape(batch, -1), vocab).to(dtype)) for i in indices]
    inputs = [per_sample(h.to(dtype).reshape(batch, -1, h.shape[-1])) for h in head_inputs]
    token_side = onehots + [g.to(dtype).reshape(g.shape[0], -1, vocab) for g in head_grads]
    feature_side = [g.to(dtype).reshape(g.shape[0], -1, g.shape[-1]) for g in lookup_grads] + inputs
    return torch.cat(token_side, 1), torch.cat(feature_side, 1)


def cost(block) -> dict[str, sympy.Expr]:
    """FLOPs: the lookups as an embedding (``2 R d``), the heads as dense layers (``6 R V d``); statistics
    ``R_lookup (1 + 2 d^2) + R_head (V + 2 d^2)``."""
    d, vocab, n = block.dims["features"], block.dims["vocab"], block.layout["lookups"]
    lookups = sympy.Add(*(u.rows for u in block.uses[:n]))
    heads = sympy.Add(*(u.rows for u in block.uses[n:]))
    return {"forward_backward": 2 * lookups * d + 6 * heads * vocab * d,
            "statistics": lookups * (1 + 2 * d**2) + heads * (vocab + 2 * d**2),
            "backward_per_sample": 2 * heads * vocab * d}
