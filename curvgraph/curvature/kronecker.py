r"""Second moments shared by every Kronecker-factored block kind (dense, conv).

A block kind turns its layer inputs into *rows* ``(R, g, d)`` -- ``R`` input vectors
(examples times positions), ``g`` independent groups (grouped convolutions; 1
otherwise), ``d`` features -- and its output gradients into rows ``(R', g, o)``. The
factors are then

.. math:: A_j = \frac1R \sum_r \bar a_{r,j} \bar a_{r,j}^\top,\qquad
          G_j = c \sum_r g_{r,j} g_{r,j}^\top

per group ``j``, with :math:`\bar a = [a, 1]` when the block holds a bias. Results are
``(g, d + bias, d + bias)`` and ``(g, o, o)``; with ``blocks = k > 1`` only the ``k``
diagonal blocks of each (a block-diagonal factor, :func:`curvgraph.plan.split_factor`):
``(g, k, b, b)`` with ``b = ceil(D / k)``, ``D`` the full size, the features cut into
consecutive slices of ``b`` and the last slice padded with zero features.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .custom_ops import CustomOp


def block_rows(rows: Tensor, blocks: int) -> Tensor:
    """``rows`` ``(R, g, D)`` as ``(R, g, k, b)``: ``k = blocks`` consecutive slices of ``b = ceil(D / k)`` features,
    the last padded with zeros."""
    size = -(-rows.shape[-1] // blocks)
    padded = torch.nn.functional.pad(rows, (0, blocks * size - rows.shape[-1]))
    return padded.reshape(rows.shape[:-1] + (blocks, size))


def _add_gram(gram: Tensor, rows: Tensor) -> None:
    r"""``gram += ``:math:`\sum_r x_r x_r^\top` per group, in place: ``gram`` ``(g, d, d)``, ``rows`` ``(R, g, d)``."""
    gram.baddbmm_(rows.permute(1, 2, 0), rows.transpose(0, 1))


add_gram_ = CustomOp("curvgraph::add_gram_", _add_gram, ("gram",))


def accumulated_gram(rows: tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
    r""":math:`\sum_r x_r x_r^\top` per group over the rows of every use, ``(R_u, g, d)`` each, in ``dtype``:
    ``(g, d, d)``.

    The first product is one ``einsum``; each further use's product is added into it in place, by the custom op
    :func:`add_gram_` (one matrix product with ``beta = 1``), so the compiled step holds one ``d x d`` sum and
    no copy of the rows. Out-of-place, each ``baddbmm`` wrote a new sum beside the previous one (the LSTM's
    ``1024 x 1024`` output factor: 4 MiB more at the step's memory peak), a sum ``a + b + ...`` formed every
    product before adding them, and rows joined to fewer, larger products were copies. The uses are taken
    from the last back: the backward pass through a recurrence makes the last step's output gradients first,
    so the compiled step can add them, and free them, while the backward goes on."""
    uses = [r.to(dtype) for r in rows[::-1]]
    gram = torch.einsum("rgi,rgj->gij", uses[0], uses[0])
    for r in uses[1:]:
        add_gram_(gram, r)
    return gram


def blocked_gram(rows: tuple[Tensor, ...], blocks: int, dtype: torch.dtype) -> Tensor:
    """The ``blocks`` diagonal blocks of :func:`accumulated_gram`, ``(g, k, b, b)`` (:func:`block_rows`)."""
    split = tuple(block_rows(r, blocks).flatten(1, 2) for r in rows)
    gram = accumulated_gram(split, dtype)
    return gram.reshape(rows[0].shape[1:2] + (blocks,) + gram.shape[-2:])


def input_moment(rows: tuple[Tensor, ...], bias: bool, dtype: torch.dtype, blocks: int = 1,
                 ones_column: bool = False) -> Tensor:
    r""":math:`\frac1R \sum_r \bar a_r \bar a_r^\top` per group over the rows of every tensor in ``rows``
    (each ``(R_u, g, d)``); its ``blocks`` diagonal blocks ``(g, k, b, b)`` when ``blocks > 1``.

    For a full factor the ones column of :math:`\bar a` is not materialized unless ``ones_column``: its row
    and column are the column sums of ``a`` and its corner is ``R`` (:func:`bordered`), which copies no rows
    but holds the ``(d, d)`` moment beside the ``(d + 1, d + 1)`` factor. With ``ones_column`` the factor is
    one product of the rows :math:`\bar a` (``R x (d + 1)``, a copy), so no moment is held beside it: less
    memory where there are fewer rows than features (``R <= d``).
    """
    rows = tuple(r.to(dtype) for r in rows)
    count = sum(r.shape[0] for r in rows)
    if blocks > 1:
        return blocked_gram(tuple(with_ones_column(r, bias) for r in rows), blocks, dtype) / count
    if ones_column:
        return accumulated_gram(tuple(with_ones_column(r, bias) for r in rows), dtype) / count
    return normalized_moment(accumulated_gram(rows, dtype), sum(r.sum(0) for r in rows), count, bias)


def normalized_moment(moment: Tensor, total: Tensor, count: int, bias: bool) -> Tensor:
    r""":math:`\frac1R \sum_r \bar a_r \bar a_r^\top` from :math:`\sum_r a_r a_r^\top` ``(g, d, d)``, :math:`\sum_r a_r`
    ``(g, d)`` and ``count = R``: with the ones column's border when ``bias`` (:func:`bordered`)."""
    return (bordered(moment, total, count) if bias else moment) / count


def bordered(moment: Tensor, total: Tensor, count: int) -> Tensor:
    r"""``[[moment, total], [total^T, count]]`` per group: ``moment`` ``(g, d, d)`` with ``total`` ``(g, d)`` appended
    as its last row and column and ``count`` in the corner, ``(g, d + 1, d + 1)``.

    Written as one elementwise selection over the padded ``moment`` rather than two concatenations, so that
    the compiled step writes the result in one pass instead of materializing a ``(g, d, d + 1)`` intermediate.
    """
    border = torch.cat([total, total.new_full((total.shape[0], 1), count)], 1)  # (g, d + 1)
    last = torch.arange(border.shape[1], device=moment.device) == total.shape[1]
    padded = torch.nn.functional.pad(moment, (0, 1, 0, 1))
    return torch.where(last[:, None], border[:, None, :], torch.where(last, border[:, :, None], padded))


def output_moment(rows: tuple[Tensor, ...], scale: Tensor, dtype: torch.dtype, blocks: int = 1) -> Tensor:
    r""":math:`c \sum_r g_r g_r^\top` per group over the rows of every tensor in ``rows`` (each ``(R_u, g, o)``);
    its ``blocks`` diagonal blocks ``(g, k, b, b)`` when ``blocks > 1``."""
    return (blocked_gram(rows, blocks, dtype) if blocks > 1 else accumulated_gram(rows, dtype)) * scale


def with_ones_column(rows: Tensor, bias: bool) -> Tensor:
    """``rows`` with a column of ones appended on the last dim (:math:`\\bar a = [a, 1]`) when ``bias``."""
    return torch.cat([rows, rows.new_ones(rows.shape[:-1] + (1,))], -1) if bias else rows


def example_matrices(rows: tuple[Tensor, ...], batch: int) -> Tensor:
    r"""Per-example block matrices :math:`M_n = \sum_p r^{(1)}_{n,p} \otimes \cdots \otimes r^{(k)}_{n,p}`.

    Args:
        rows: a block's example rows in axis order (rows first), each ``(R_f, P, *lead, d_f)``
            with ``R_f`` either ``N`` or ``S*N`` (see
            :meth:`curvgraph.BlockKind.write_example_rows`).
        batch: ``N``.

    Returns:
        ``(S*N, *lead, d_1, ..., d_k)``, ``S`` the largest sample count among the rows. This
        materializes every example's gradient: a reference for tests and small blocks.
    """
    samples = max(r.shape[0] for r in rows) // batch
    lead = rows[0].dim() - 3
    letters = "ijkl"  # up to four block-matrix axes
    lead_idx = "abcdefgh"[:lead]
    terms = [f"snp{lead_idx}{letters[i]}" for i in range(len(rows))]
    expanded = [r.reshape((-1, batch) + r.shape[1:]).expand((samples, batch) + r.shape[1:]) for r in rows]
    out = f"sn{lead_idx}{letters[:len(rows)]}"
    return torch.einsum(f"{','.join(terms)}->{out}", *expanded).flatten(0, 1)
