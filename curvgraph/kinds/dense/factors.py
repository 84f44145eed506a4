r"""Kronecker factors of a dense block ``y = x W^T + b``.

Conventions (shared with ``curvlinops.KFACLinearOperator(separate_weight_and_bias=False)``
and a mean-reduction loss):

* ``W`` is ``(out, in)``; with a bias the block's parameter matrix is
  :math:`\bar W = [W, b]` of shape ``(out, in + 1)`` and the input gains a ones
  column, :math:`\bar a = [a, 1]`.
* The loss is an average over :math:`K` loss terms (``K = N`` for ``(N, C)``
  outputs), :math:`L = \frac1K \sum_k \ell_k`, and the factors approximate the
  curvature of :math:`L`:

  .. math::  F \approx G \otimes A
             \quad\text{w.r.t.}\quad \operatorname{vec}_{\text{row}}(\bar W)
             = \texttt{torch.cat([W, b[:, None]], 1).flatten()},

  i.e. ``torch.kron(G, A)`` is directly comparable to the exact Fisher/GGN block.
* ``A`` (``(in+1, in+1)``) is the uncentred second moment of the layer inputs and
  ``G`` (``(out, out)``) the scaled second moment of backpropagated output vectors
  :math:`g = J_y^\top s` (``s`` a per-loss-term cotangent: a column of the loss
  Hessian's square root, a Monte-Carlo sample, or the per-term loss gradient):

  - **expand** (the default; Eschenhagen et al. 2023): every one of the :math:`R`
    input rows (``N`` examples times the positions the weight is applied at, over
    every use of a shared weight) is an example:
    :math:`A = \frac1R \sum_r \bar a_r \bar a_r^\top`,
    :math:`G = c \sum_r g_r g_r^\top`;
  - **reduce**: positions are averaged (inputs) or summed (gradients) per example
    first: :math:`A = \frac1N \sum_n \bar a_n \bar a_n^\top` with
    :math:`\bar a_n = \operatorname{mean}_p \bar a_{n,p}`,
    :math:`G = c \sum_n g_n g_n^\top` with :math:`g_n = \sum_p g_{n,p}`.

  The scale :math:`c` is :math:`1/K` for the MC and type-2 Fisher and :math:`K` for
  the empirical Fisher, whose ``g`` come from the loss gradient (already divided by
  ``K``); see :mod:`curvgraph.curvature.losses`.

For one layer and one example, ``kron(G, A)`` with the type-2 Fisher is the exact GGN
block.
"""

from __future__ import annotations

import sympy
import torch
from torch import Tensor

from ...curvature.kronecker import input_moment, output_moment, with_ones_column


def dense_input_factor(inputs: tuple[Tensor, ...], bias: bool, reduce: bool, batch: int, dtype: torch.dtype,
                       blocks: int = 1, ones_column: bool = False) -> Tensor:
    r"""Input factor ``A`` of one batch from the layer inputs of every use.

    Args:
        inputs: the layer inputs ``a`` of each use, shapes ``(N, ..., in)``.
        bias: append the ones column (the block holds a bias).
        reduce: KFAC-reduce (average over positions per example) instead of expand.
        batch: the number of examples ``N``.
        dtype: dtype of the factor (float32 or wider).
        blocks: ``k > 1``: only ``k`` diagonal blocks (:func:`curvgraph.plan.split_factor`).
        ones_column: form ``A`` from the rows with their ones column (:func:`input_moment`).

    Returns:
        ``A`` of shape ``(in + bias, in + bias)``:
        :math:`\frac1R \sum_r \bar a_r \bar a_r^\top` over the ``R`` rows; ``(k, b, b)`` when split.
    """
    d = inputs[0].shape[-1]
    if reduce:
        rows = (torch.cat([a.to(dtype).reshape(batch, -1, d) for a in inputs], 1).mean(1)[:, None, :],)
    else:
        rows = tuple(a.reshape(-1, 1, d) for a in inputs)
    return input_moment(rows, bias, dtype, blocks, ones_column)[0]


def dense_grad_factor(grads: tuple[Tensor, ...], reduce: bool, examples: int, scale: Tensor, dtype: torch.dtype,
                      blocks: int = 1) -> Tensor:
    r"""Output-gradient factor ``G`` of one batch: :math:`c \sum g g^\top`.

    Args:
        grads: backpropagated output vectors of each use, shapes ``(S*N, ..., out)``
            (``S`` backward samples stacked in front of the batch).
        reduce: sum over positions per example first (KFAC-reduce).
        examples: ``S * N``, the number of leading rows that are examples.
        scale: the Fisher type's scale ``c`` (a 0-d tensor).
        dtype: dtype of the factor.
        blocks: ``k > 1``: only ``k`` diagonal blocks (:func:`curvgraph.plan.split_factor`).

    Returns:
        ``G`` of shape ``(out, out)``; ``(k, b, b)`` when split.
    """
    d = grads[0].shape[-1]
    if reduce:
        rows = (sum(g.to(dtype).reshape(examples, -1, d).sum(1) for g in grads)[:, None, :],)
    else:
        rows = tuple(g.reshape(-1, 1, d) for g in grads)
    return output_moment(rows, scale, dtype, blocks)[0]


def dense_example_rows(inputs: tuple[Tensor, ...], grads: tuple[Tensor, ...], bias: bool, batch: int,
                       dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    r"""Example rows ``(G rows, A rows)``: :math:`M_n = \sum_p g_{n,p} \bar a_{n,p}^\top` over every use's positions.

    Args:
        inputs: the layer inputs ``a`` of each use, ``(N, ..., in)``.
        grads: the output vectors of each use, ``(S*N, ..., out)``.
        bias: append the ones column (:math:`\bar a = [a, 1]`).
        batch: ``N``.

    Returns:
        ``(S*N, P, out)`` and ``(N, P, in + bias)``, ``P`` the positions of all uses. Rows are
        grouped by example when the batch is the inputs' first dim; a layer applied to a
        sequence-first tensor (inside ``nn.MultiheadAttention``) gets rows grouped by its
        first dim instead, which sums and means over rows do not see.
    """
    a_rows = [x.to(dtype).reshape(batch, -1, x.shape[-1]) for x in inputs]
    g = torch.cat([y.to(dtype).reshape(-1, a.shape[1], y.shape[-1]) for y, a in zip(grads, a_rows)], 1)
    return g, with_ones_column(torch.cat(a_rows, 1), bias)


def dense_gradient_matrix(weight: Tensor, bias: Tensor | None, transposed: bool, dtype: torch.dtype) -> Tensor:
    """The block's parameter (or gradient) matrix ``[W, b]`` of shape ``(out, in + bias)``.

    ``transposed`` marks a weight stored ``(in, out)``.
    """
    w = weight.T if transposed else weight
    matrix = w if bias is None else torch.cat([w, bias[:, None]], 1)
    return matrix.to(dtype)


def dense_split(matrix: Tensor, bias: bool, transposed: bool) -> tuple[Tensor, ...]:
    """Inverse of :func:`dense_gradient_matrix`: ``(W-shaped tensor,)`` or ``(W-shaped, b-shaped)``."""
    w = matrix[:, :-1] if bias else matrix
    return ((w.T if transposed else w),) + ((matrix[:, -1],) if bias else ())


def cost(block) -> dict[str, sympy.Expr]:
    """FLOP counts of a dense block as sympy expressions in the symbolic input sizes.

    ``R`` is the total number of input rows over all uses. Forward and backward are
    three ``R x in x out`` products (6 R in out), two where the input needs no
    gradient; the statistics are ``2 R (in+1)^2 + 2 R out^2`` (``2 R d b`` for a factor split into
    blocks of ``b``); an extra backward needs the input gradient only (``2 R in out``, nothing for a
    first layer).
    """
    rows = block.rows
    grad_rows = sympy.Add(*(u.rows for u in block.uses if u.input_grad))
    a, g = block.factors["A"], block.factors["G"]
    n_in, n_out = block.dims["in"], block.dims["out"]
    return {
        "forward_backward": (4 * rows + 2 * grad_rows) * n_in * n_out,
        "statistics": 2 * rows * (a.dim * a.block_dim + g.dim * g.block_dim),
        "backward_per_sample": 2 * grad_rows * n_in * n_out,
    }
