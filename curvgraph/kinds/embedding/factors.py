r"""Kronecker factors of an embedding ``y = E[i]`` (``E`` of shape ``(V, d)``, token ids ``i``).

A lookup is a dense layer on one-hot inputs, :math:`y = E^\top e_i`, so the block
matrix is ``E`` itself, rows indexed by the token and columns by the feature:

* ``A`` (axis -2, over the ``V`` rows) is the second moment of the one-hot inputs,
  :math:`A = \frac1R \sum_r e_{i_r} e_{i_r}^\top = \operatorname{diag}(n_v / R)`, the
  token frequencies over the ``R`` looked-up positions (every position of every
  example, over every use). It is diagonal and stored as the vector of frequencies;
  a ``V x V`` matrix is never formed.
* ``G`` (axis -1, ``(d, d)``) is the scaled second moment of the output vectors,
  :math:`G = c \sum_r g_r g_r^\top`, exactly as for a dense layer
  (:func:`curvgraph.kinds.dense.factors.dense_grad_factor`).

``kron(A, G)`` approximates the curvature of ``E.flatten()`` (row-major). Positions
are always expanded (each looked-up position is a row): averaging one-hot inputs over
positions (the ``reduce`` approximation) would give a dense ``A``. A token that does
not occur in the batch has frequency 0, so its row is damped only; the row of the
``padding_idx`` token gets no gradient and no weight decay, so it stays untouched.
"""

from __future__ import annotations

import sympy
import torch
import torch.nn.functional as F
from torch import Tensor


def token_frequencies(indices: tuple[Tensor, ...], vocab: int, dtype: torch.dtype) -> Tensor:
    r"""``A`` as a vector: :math:`n_v / R`, the share of the looked-up positions holding token ``v``, shape ``(V,)``.

    A table of one row (RoBERTa's token types, ``type_vocab_size=1``) is read at every position: its share is 1,
    written as such, because torch 2.13's Inductor fails to generate the CPU code of a scatter into one element
    (``AssertionError`` in its vectorized ``store``).
    """
    if vocab == 1:
        return torch.ones(1, dtype=dtype, device=indices[0].device)
    flat = torch.cat([i.reshape(-1) for i in indices])
    counts = torch.zeros(vocab, dtype=dtype, device=flat.device).index_add(0, flat, torch.ones_like(flat, dtype=dtype))
    return counts / flat.numel()


def embedding_example_rows(indices: tuple[Tensor, ...], grads: tuple[Tensor, ...], vocab: int, batch: int,
                           dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    r"""Example rows ``(one-hot rows, G rows)``: :math:`M_n = \sum_p e_{i_{n,p}} g_{n,p}^\top`.

    Returns ``(N, P, V)`` one-hot rows (``N P V`` values: memory grows with the
    vocabulary) and ``(S*N, P, d)`` output vectors.
    """
    onehot = torch.cat([F.one_hot(i.reshape(batch, -1), vocab).to(dtype) for i in indices], 1)
    g = torch.cat([y.to(dtype).reshape(y.shape[0], -1, y.shape[-1]) for y in grads], 1)
    return onehot, g


def without_row(matrix: Tensor, row: int) -> Tensor:
    """``matrix`` with row ``row`` set to zero (no row when ``row`` is negative)."""
    if row < 0:
        return matrix
    keep = torch.ones(matrix.shape[0], 1, dtype=matrix.dtype, device=matrix.device)
    return matrix * keep.index_fill(0, torch.tensor([row], device=matrix.device), 0)


def cost(block) -> dict[str, sympy.Expr]:
    """FLOPs in the symbolic sizes; ``R`` looked-up positions: gather and scatter-add ``2 R d``, statistics
    ``R`` (counts) ``+ 2 R d^2``, no input gradient."""
    rows = block.rows
    d = block.dims["features"]
    return {"forward_backward": 2 * rows * d, "statistics": rows + 2 * rows * d**2, "backward_per_sample": sympy.Integer(0)}


def position_frequencies(output: Tensor, positions: int, dtype: torch.dtype) -> Tensor:
    r"""``A`` of a positional table read at the first ``T`` of its ``positions`` rows by an output ``(N, T, ..., d)``:
    each of those positions is one of the ``T`` positions of every example, :math:`1/T`; unread rows get 0."""
    used = output.shape[1]
    return (torch.arange(positions, device=output.device) < used).to(dtype) / used


def position_example_rows(output: Tensor, grads: tuple[Tensor, ...], positions: int, batch: int,
                          dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    r"""Example rows ``(one-hot position rows (N, T, positions), G rows (S*N, T, d))``: :math:`M_n = \sum_t e_t g_{n,t}^\top`."""
    used = output.shape[1]
    onehot = torch.eye(positions, dtype=dtype, device=output.device)[:used].expand(batch, used, positions)
    g = torch.cat([y.to(dtype).reshape(y.shape[0], used, -1) for y in grads], 1)
    return onehot, g
