r"""Kronecker factors of a convolution (KFC, Grosse & Martens 2016), any spatial rank.

A convolution with weight ``(C_out, C_in/g, k_1, ..., k_d)`` applies, at each of the
``L`` output positions, a dense layer to the input *patch* under the kernel. With the
patch ``a`` flattened in the weight's ``(c, k_1, ..., k_d)`` order, a group ``j`` of a
grouped convolution is a dense layer ``(C_out/g) x (C_in/g * K)`` on its channels'
patches, and each group gets its own Kronecker block (block-diagonal across groups,
as the exact curvature is for a single layer). With ``g = 1`` the factors are 2-D,
otherwise ``(g, ., .)``.

* **expand** (KFC; default): every position of every example is a row:
  :math:`A = \frac1{NL}\sum_{n,l} \bar a_{nl}\bar a_{nl}^\top`,
  :math:`G = c\sum_{n,l} g_{nl} g_{nl}^\top`;
* **reduce**: :math:`A = \frac1N \sum_n \bar a_n \bar a_n^\top` with patches averaged over
  positions, :math:`G = c\sum_n g_n g_n^\top` with output gradients summed over them.

The block matrix is ``[W.reshape(C_out, -1), b]`` (per group), so ``kron(G, A)`` is
about ``torch.cat([W.flatten(1), b[:, None]], 1).flatten()`` -- curvlinops' convention.

**Memory.** The patches of one batch are materialized once per statistics step
(``N * L * C_in * K`` values in the factor dtype, e.g. 75 M floats = 300 MB for a
3x3 convolution with 64 input channels on a batch of 128 32x32 images), never more:
they are reduced to ``A`` right away. Steps that do not update statistics
(``factor_every > 1``) do not build them.
"""

from __future__ import annotations

import math

import sympy
import torch
import torch.nn.functional as F
from torch import Tensor

from ...curvature.kronecker import input_moment, output_moment, with_ones_column


def conv_patches(x: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[tuple[int, int], ...],
                 dilation: tuple[int, ...]) -> Tensor:
    """Input patches ``(N, L, C * K)`` of a convolution, in the weight's ``(c, k_1, ..., k_d)`` order.

    ``padding`` holds ``(before, after)`` zeros per spatial dim; ``L`` is the number of
    output positions (row-major over the spatial dims, like the output).
    """
    rank = len(kernel)
    x = F.pad(x, [p for pair in reversed(padding) for p in pair])
    for i in range(rank):
        span = (kernel[i] - 1) * dilation[i] + 1
        x = x.unfold(2 + i, span, stride[i])[..., :: dilation[i]]
    order = (0,) + tuple(range(2, 2 + rank)) + (1,) + tuple(range(2 + rank, 2 + 2 * rank))
    return x.permute(order).reshape(x.shape[0], -1, x.shape[1] * math.prod(kernel))


def conv_input_factor(inputs: tuple[Tensor, ...], kernel: tuple[int, ...], stride: tuple[int, ...],
                      padding: tuple[tuple[int, int], ...], dilation: tuple[int, ...], groups: int, bias: bool,
                      reduce: bool, batch: int, dtype: torch.dtype, blocks: int = 1, every: int = 1) -> Tensor:
    """Input factor ``A`` of one batch: ``(d, d)``, or ``(groups, d, d)`` with ``d = C_in/groups * K + bias``;
    ``blocks = k > 1``: its ``k`` diagonal blocks ``(k, b, b)`` or ``(groups, k, b, b)``
    (:func:`curvgraph.plan.split_factor`). ``every = s > 1``: from the patches of every ``s``-th output
    position along each spatial dim only (spatial subsampling: ``s^r`` times fewer patches; the
    mean over them estimates the mean over all positions)."""
    strided = tuple(st * every for st in stride)
    patches = [conv_patches(x.to(dtype), kernel, strided, padding, dilation) for x in inputs]
    patches = [p.reshape(batch, p.shape[1], groups, -1) for p in patches]
    if reduce:
        rows = (torch.cat(patches, 1).mean(1),)
    else:
        rows = tuple(p.reshape(-1, groups, p.shape[-1]) for p in patches)
    factor = input_moment(rows, bias, dtype, blocks)
    return factor[0] if groups == 1 else factor


def conv_grad_factor(grads: tuple[Tensor, ...], groups: int, reduce: bool, examples: int, scale: Tensor,
                     dtype: torch.dtype, blocks: int = 1) -> Tensor:
    """Output-gradient factor ``G``: ``(o, o)`` or ``(groups, o, o)`` with ``o = C_out/groups``
    (``blocks = k > 1``: its ``k`` diagonal blocks, as for :func:`conv_input_factor`).

    ``grads`` are ``(S*N, C_out, *spatial)`` output gradients of each use.
    """
    per_example = [g.to(dtype).movedim(1, -1).reshape(examples, -1, groups, g.shape[1] // groups) for g in grads]
    if reduce:
        rows = (sum(g.sum(1) for g in per_example),)
    else:
        rows = tuple(g.reshape(-1, groups, g.shape[-1]) for g in per_example)
    factor = output_moment(rows, scale, dtype, blocks)
    return factor[0] if groups == 1 else factor


def conv_example_rows(inputs: tuple[Tensor, ...], grads: tuple[Tensor, ...], kernel: tuple[int, ...],
                      stride: tuple[int, ...], padding: tuple[tuple[int, int], ...], dilation: tuple[int, ...],
                      groups: int, bias: bool, batch: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    r"""Example rows ``(G rows, A rows)``: per group, :math:`M_n = \sum_l g_{n,l} \bar a_{n,l}^\top` over output positions.

    ``inputs`` are each use's ``(N, C_in, *spatial)`` inputs, ``grads`` its
    ``(S*N, C_out, *spatial_out)`` output vectors. Returns ``(S*N, L, o)`` and
    ``(N, L, d)``, or ``(S*N, L, groups, o)`` and ``(N, L, groups, d)`` for grouped
    convolutions (``d = C_in/groups * K + bias``, ``L`` the positions of all uses).
    """
    patches = [conv_patches(x.to(dtype), kernel, stride, padding, dilation) for x in inputs]
    a = with_ones_column(torch.cat([p.reshape(batch, p.shape[1], groups, -1) for p in patches], 1), bias)
    g = torch.cat([y.to(dtype).movedim(1, -1).reshape(y.shape[0], -1, groups, y.shape[1] // groups) for y in grads], 1)
    return (g[:, :, 0], a[:, :, 0]) if groups == 1 else (g, a)


def conv_gradient_matrix(weight: Tensor, bias: Tensor | None, groups: int, dtype: torch.dtype) -> Tensor:
    """``[W.reshape(C_out, -1), b]`` per group: ``(C_out, d)`` or ``(groups, C_out/groups, d)``."""
    out = weight.shape[0]
    matrix = weight.reshape(groups, out // groups, -1)
    if bias is not None:
        matrix = torch.cat([matrix, bias.reshape(groups, out // groups, 1)], 2)
    matrix = matrix.to(dtype)
    return matrix[0] if groups == 1 else matrix


def conv_split(matrix: Tensor, bias: bool, weight_shape: tuple[int, ...]) -> tuple[Tensor, ...]:
    """Inverse of :func:`conv_gradient_matrix`: ``(W-shaped tensor,)`` or ``(W-shaped, b-shaped)``."""
    rows = matrix.reshape(weight_shape[0], -1)
    weight = (rows[:, :-1] if bias else rows).reshape(weight_shape)
    return (weight,) + ((rows[:, -1],) if bias else ())


def cost(block) -> dict[str, sympy.Expr]:
    """FLOPs of a convolution block in the symbolic sizes; ``R`` = examples x output positions.

    Per group a dense layer on ``R`` rows: forward/backward ``(4 + 2) R in out`` (no input
    gradient for a first layer), statistics ``2 R (in+1)^2 + 2 R out^2`` (``2 R d b`` for a
    factor split into blocks of ``b``), an extra
    backward ``2 R in out``; ``workspace_bytes`` is the batch of patches the statistics
    materialize (4 bytes per float). With ``layout["stats_every"] = s`` (spatial subsampling) ``A``'s
    rows and the patches are about ``R / s^r``.
    """
    groups = block.dims["groups"]
    rows = block.rows
    grad_rows = sympy.Add(*(u.rows for u in block.uses if u.input_grad))
    n_in, n_out = block.dims["in"], block.dims["out"]
    a, g = block.factors["A"], block.factors["G"]
    a_rows = rows / block.layout.get("stats_every", 1) ** len(block.layout["kernel"])  # spatial subsampling of A
    return {
        "forward_backward": groups * (4 * rows + 2 * grad_rows) * n_in * n_out,
        "statistics": groups * 2 * (a_rows * a.dim * a.block_dim + rows * g.dim * g.block_dim),
        "backward_per_sample": groups * 2 * grad_rows * n_in * n_out,
        "workspace_bytes": 4 * a_rows * groups * n_in,
    }
