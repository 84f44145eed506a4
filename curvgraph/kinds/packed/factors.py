r"""Kronecker factors of a *packed* projection: row blocks of one weight applied to different inputs.

``nn.MultiheadAttention`` packs the query, key and value projections into one
``in_proj_weight`` ``(3d, d_in)`` (and ``in_proj_bias``). For cross-attention it splits
the weight by rows, ``[W_q; W_kv]``, and applies the pieces to different inputs (the
target sequence, the memory); with ``kdim``/``vdim`` it splits the bias alone between
three separate weights. Each piece is a dense layer, so the block is a stack of
``J`` *members* of ``c`` rows each (``c`` the greatest common divisor of the pieces'
row counts; a piece of ``k c`` rows holds ``k`` members that share its input):

* the block matrix is ``(J, c, d_in + 1)`` (``[W, b]`` per member; ``(J, c, d_in)``
  without a bias; ``(J, c, 1)`` for a bias alone);
* per member ``j`` of the piece applied to input ``a``: :math:`A_j` is the dense input
  factor of ``a`` (:func:`curvgraph.kinds.dense.factors.dense_input_factor`; the
  constant :math:`[1]` for a bias alone, whose input is the ones column), and
  :math:`G_j = c \sum_r g_{r,j} g_{r,j}^\top` over the member's rows of the output
  vectors. The curvature is block-diagonal over members (three ``d x d`` factors
  instead of one ``3d x 3d``, as K-FAC treats separate q/k/v projections).
"""

from __future__ import annotations

import sympy
import torch
from torch import Tensor

from ...curvature.kronecker import output_moment, with_ones_column
from ..dense.factors import dense_input_factor


def packed_input_factor(inputs: tuple[Tensor, ...], members: tuple[int, ...], bias: bool, reduce: bool, batch: int,
                        dtype: torch.dtype, like: Tensor) -> Tensor:
    """``A``: ``(J, d_in + 1, d_in + 1)``, each piece's input factor repeated for its members; ``(J, 1, 1)`` ones
    (on ``like``'s device) when ``inputs`` is empty (a bias alone)."""
    if not inputs:
        return torch.ones(sum(members), 1, 1, dtype=dtype, device=like.device)
    return torch.cat([dense_input_factor((a,), bias, reduce, batch, dtype).expand(k, -1, -1)
                      for a, k in zip(inputs, members)])


def packed_grad_factor(grads: tuple[Tensor, ...], members: tuple[int, ...], reduce: bool, examples: int, scale: Tensor,
                       dtype: torch.dtype) -> Tensor:
    r"""``G``: ``(J, c, c)``, :math:`c \sum_r g_{r,j} g_{r,j}^\top` per member over its piece's output vectors."""
    factors = []
    for g, k in zip(grads, members):
        rows = g.to(dtype).reshape(examples, -1, k, g.shape[-1] // k)
        rows = rows.sum(1) if reduce else rows.reshape(-1, k, rows.shape[-1])
        factors.append(output_moment((rows,), scale, dtype))
    return torch.cat(factors)


def packed_example_rows(inputs: tuple[Tensor, ...], grads: tuple[Tensor, ...], members: tuple[int, ...], bias: bool,
                        batch: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    r"""Example rows ``(G rows (S*N, P, J, c), A rows (N, P, J, d_in + 1))``, zero for the members a position's piece
    does not hold: :math:`M_{n,j} = \sum_p g_{n,p,j} \bar a_{n,p,j}^\top`.

    Rows are grouped by example when the batch is the first dim of the pieces' inputs
    (see :func:`curvgraph.kinds.dense.factors.dense_example_rows`); a bias alone groups its
    output vectors into ``N`` rows (by example for batch-first outputs and one sample).
    """
    total, start = sum(members), 0
    g_rows, a_rows = [], []
    for i, (g, k) in enumerate(zip(grads, members)):
        if inputs:
            a = with_ones_column(inputs[i].to(dtype).reshape(batch, -1, inputs[i].shape[-1]), bias)
            g = g.to(dtype).reshape(-1, a.shape[1], k, g.shape[-1] // k)
        else:  # a bias alone: its input is the constant 1 at every position
            g = g.to(dtype).reshape(batch, -1, k, g.shape[-1] // k)
            a = torch.ones(batch, g.shape[1], 1, dtype=dtype, device=g.device)
        pad = (0, 0, start, total - start - k)
        g_rows.append(torch.nn.functional.pad(g, pad))
        a_rows.append(torch.nn.functional.pad(a[:, :, None, :].expand(-1, -1, k, -1), pad))
        start += k
    return torch.cat(g_rows, 1), torch.cat(a_rows, 1)


def packed_matrix(weight: Tensor | None, bias: Tensor | None, members: int, dtype: torch.dtype) -> Tensor:
    """``(J, c, d_in + 1)``: each member's rows of ``[W, b]`` (``(J, c, 1)`` for a bias alone)."""
    parts = ([weight.reshape(members, -1, weight.shape[-1])] if weight is not None else [])
    parts += [bias.reshape(members, -1, 1)] if bias is not None else []
    return torch.cat(parts, -1).to(dtype)


def packed_split(matrix: Tensor, weight: bool, bias: bool) -> tuple[Tensor, ...]:
    """Inverse of :func:`packed_matrix`: ``(W,)``, ``(W, b)`` or ``(b,)``."""
    rows = matrix.shape[0] * matrix.shape[1]
    out = (matrix[..., : matrix.shape[-1] - int(bias)].reshape(rows, -1),) if weight else ()
    return out + ((matrix[..., -1].reshape(rows),) if bias else ())


def cost(block) -> dict[str, sympy.Expr]:
    """FLOPs of the pieces' dense layers (as :func:`curvgraph.kinds.dense.factors.cost`, per piece's rows)."""
    c, d_in = block.dims["chunk"], block.dims["in"]
    members = block.layout["members"]
    fb, stats, back = 0, 0, 0
    for use, k in zip(block.uses, members):
        grad_rows = use.rows if use.input_grad else 0
        fb += (4 * use.rows + 2 * grad_rows) * d_in * k * c
        stats += 2 * use.rows * ((d_in + 1) ** 2 + k * c**2)
        back += 2 * grad_rows * d_in * k * c
    return {"forward_backward": sympy.sympify(fb), "statistics": sympy.sympify(stats),
            "backward_per_sample": sympy.sympify(back)}
