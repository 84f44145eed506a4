r"""Curvature of a normalization layer's affine parameters (BatchNorm, LayerNorm, GroupNorm).

The normalization passes split ``y = norm(x) * weight + bias`` so that the normalized
input :math:`\hat x` is a layer input and ``y`` a layer output. For channel ``c``
(BatchNorm/GroupNorm: dim 1; LayerNorm: each normalized element) and example ``n`` the
gradient of the two parameters is

.. math:: v_{nc} = \Big[\sum_p g_{ncp}\,\hat x_{ncp},\ \sum_p g_{ncp}\Big]

summed over the positions ``p`` the parameter is shared across (spatial positions,
sequence positions), and the block is the per-channel ``2 x 2`` matrix (``1 x 1``
without bias)

.. math:: F_c = c \sum_n v_{nc} v_{nc}^\top ,

over the backpropagated vectors of the Fisher type (``c`` as for the Kronecker
factors). With the type-2 Fisher this is *exactly* the per-channel diagonal block of the
GGN (no Kronecker approximation is involved); ``F`` has shape ``(C, k, k)``.
"""

from __future__ import annotations

import sympy
import torch
from torch import Tensor


def channels_last(t: Tensor, channels: int, channels_first: bool) -> Tensor:
    """``t`` as ``(rows, positions, channels)``: channels from dim 1 or from the trailing dims."""
    if channels_first:
        t = t.movedim(1, -1)
    return t.reshape(t.shape[0], -1, channels)


def norm_example_gradients(normalized: tuple[Tensor, ...], grads: tuple[Tensor, ...], channels: int,
                           channels_first: bool, bias: bool, batch: int, dtype: torch.dtype) -> Tensor:
    r"""The per-example, per-channel gradients :math:`v_{nc}`, shape ``(S*N, C, k)``, summed over the uses.

    Args:
        normalized: :math:`\hat x` of each use, ``(N, ...)``, or ``(N*T, ...)`` where the layer normalizes
            the rows of a flattened ``(N, T, ...)`` tensor (example-major).
        grads: output vectors of each use, ``(S*N, ...)`` or ``(S*N*T, ...)`` (``S`` backward samples).
        channels, channels_first: the layout (see :func:`channels_last`).
        bias: the block holds a bias (``k = 2``) or not (``k = 1``).
        batch: ``N``.
    """
    total = 0
    for x, g in zip(normalized, grads):  # rows example-major: (N, ...), or (N * T, ...) for a layer on flattened rows
        x = channels_last(x.to(dtype), channels, channels_first).reshape(batch, -1, channels)
        g = channels_last(g.to(dtype), channels, channels_first).reshape(-1, batch, x.shape[1], channels)
        parts = [(g * x).sum(2)] + ([g.sum(2)] if bias else [])
        total = total + torch.stack(parts, -1).flatten(0, 1)  # uses share the parameters: gradients add
    return total


def norm_factor(normalized: tuple[Tensor, ...], grads: tuple[Tensor, ...], channels: int, channels_first: bool,
                bias: bool, batch: int, scale: Tensor, dtype: torch.dtype) -> Tensor:
    r""":math:`F_c = c \sum_n v_{nc} v_{nc}^\top`, shape ``(C, k, k)`` (arguments as for :func:`norm_example_gradients`)."""
    total = norm_example_gradients(normalized, grads, channels, channels_first, bias, batch, dtype)
    return torch.einsum("rci,rcj->cij", total, total) * scale


def norm_gradient_matrix(weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``(C, k)``: the weight (and bias) of every channel side by side."""
    columns = [weight.reshape(-1)] + ([bias.reshape(-1)] if bias is not None else [])
    return torch.stack(columns, -1).to(dtype)


def norm_split(matrix: Tensor, bias: bool, shape: tuple[int, ...]) -> tuple[Tensor, ...]:
    """Inverse of :func:`norm_gradient_matrix`: ``(weight,)`` or ``(weight, bias)``."""
    return (matrix[:, 0].reshape(shape),) + ((matrix[:, 1].reshape(shape),) if bias else ())


def cost(block) -> dict[str, sympy.Expr]:
    """FLOPs: the affine layer's forward/backward (about 6 per element) and the statistics (about 4 per element)."""
    elements = sympy.Add(*(sympy.Mul(*shape) for u in block.uses for shape in u.output_shapes))
    return {"forward_backward": 6 * elements, "statistics": 4 * elements, "backward_per_sample": 2 * elements}
