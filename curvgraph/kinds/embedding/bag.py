r"""``nn.EmbeddingBag`` written as a lookup and a reduction, so that the embedding pass matches its weight.

``nn.EmbeddingBag`` exports to one ``aten.embedding_bag`` op, which no pass matches and
which has no forward-mode derivative (so ``lr="auto"``'s curvature products could not go
through it). For bags given as the rows of a 2-D index tensor ``i`` of shape ``(N, L)``,
the same function is

.. math:: y_n = \operatorname{reduce}_{l:\, i_{nl} \ne p}\; w_{nl}\, E[i_{nl}]

(``reduce``: sum, mean or max over the bag's entries that are not the ``padding_idx``
``p``; ``w`` the optional ``per_sample_weights``, sum mode only; an empty bag gives 0), and
``E[i]`` is an ``aten.embedding`` lookup, which :mod:`curvgraph.kinds.embedding` makes a
block. Bags given as a flat index tensor ``i`` of ``T`` entries with ``offsets`` (:class:`Segments`)
are the same reduction over the entries of each segment, by ``index_add`` (``scatter_reduce`` for
``max``); the lookup ``E[i]`` is then one of ``T`` positions that have no batch dim, so the block
has no example rows (:attr:`curvgraph.plan.Block.per_example`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BagOfEmbeddings(nn.Module):
    """``nn.EmbeddingBag`` (same Parameter, same call signature and results) as ``F.embedding`` and a reduction."""

    def __init__(self, bag: nn.EmbeddingBag) -> None:
        super().__init__()
        for name in ("max_norm", "norm_type", "scale_grad_by_freq", "mode", "sparse", "include_last_offset",
                     "padding_idx", "training"):
            setattr(self, name, getattr(bag, name))
        self.register_parameter("weight", bag.weight)

    def forward(self, input: Tensor, offsets: Tensor | None = None,  # noqa: A002 -- nn.EmbeddingBag's name
                per_sample_weights: Tensor | None = None) -> Tensor:
        if input.dim() == 2 and offsets is None:
            bags = Rows()
        elif input.dim() == 1 and offsets is not None and offsets.dim() == 1:
            bags = Segments(offsets, input.shape[0], self.include_last_offset)
        else:  # torch's own op, and its own error for a shape it does not take
            return F.embedding_bag(input, self.weight, offsets, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                                   self.mode, self.sparse, per_sample_weights, self.include_last_offset,
                                   self.padding_idx)
        rows = F.embedding(input, self.weight, self.padding_idx, scale_grad_by_freq=self.scale_grad_by_freq)
        kept = torch.ones_like(input, dtype=torch.bool) if self.padding_idx is None else input != self.padding_idx
        if self.mode == "max":
            largest = bags.max(rows.masked_fill(~kept[..., None], float("-inf")))
            return torch.where(bags.sum(kept.to(rows.dtype))[:, None] > 0, largest, torch.zeros_like(largest))
        weights = kept.to(rows.dtype) if per_sample_weights is None else per_sample_weights * kept
        total = bags.sum(rows * weights[..., None])
        if self.mode == "sum":
            return total
        return total / bags.sum(kept.to(rows.dtype)).clamp(min=1)[:, None]


class Rows:
    """Bags as the rows of a 2-D index tensor ``(N, L)``: reductions over dim 1."""

    @staticmethod
    def sum(values: Tensor) -> Tensor:
        """``(N, L, ...) -> (N, ...)``: the sum over each bag."""
        return values.sum(1)

    @staticmethod
    def max(values: Tensor) -> Tensor:
        """``(N, L, ...) -> (N, ...)``: the largest entry of each bag."""
        return values.amax(1)


class Segments:
    r"""Bags as segments of a flat index tensor of ``T`` entries, bag ``n`` starting at ``offsets[n]``.

    Entry ``t`` belongs to bag :math:`b_t = \max\{n < N : o_n \le t\}`, so the last bag runs to the
    end. ``N = len(offsets)``, or ``len(offsets) - 1`` with ``include_last_offset`` (whose last offset
    is the number of entries; torch's CPU kernel, too, puts any entries after it into the last bag).
    A bag whose offset equals the next one's is empty. torch requires ``offsets[0] == 0``.
    """

    def __init__(self, offsets: Tensor, entries: int, include_last_offset: bool) -> None:
        self.bags = offsets.shape[0] - 1 if include_last_offset else offsets.shape[0]
        position = torch.arange(entries, device=offsets.device, dtype=offsets.dtype)
        self.bag = torch.searchsorted(offsets[: self.bags], position, right=True) - 1

    def sum(self, values: Tensor) -> Tensor:
        """``(T, ...) -> (N, ...)``: the sum over each bag (0 for an empty one)."""
        return values.new_zeros((self.bags, *values.shape[1:])).index_add(0, self.bag, values)

    def max(self, values: Tensor) -> Tensor:
        """``(T, ...) -> (N, ...)``: the largest entry of each bag (0 for an empty one)."""
        index = self.bag.reshape(-1, *[1] * (values.dim() - 1)).expand_as(values)
        return values.new_zeros((self.bags, *values.shape[1:])).scatter_reduce(0, index, values, "amax",
                                                                                include_self=False)


def bag_form(module: nn.Module) -> nn.Module | None:
    """The lookup-and-reduction form of an ``nn.EmbeddingBag`` (``None`` for other modules, and for a bag with
    ``max_norm``, whose lookups rewrite the weight in place)."""
    if type(module) is nn.EmbeddingBag and module.max_norm is None:
        return BagOfEmbeddings(module)
    return None
