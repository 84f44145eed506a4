r"""``nn.EmbeddingBag`` written as a lookup and a reduction, so that the embedding pass matches its weight.

``nn.EmbeddingBag`` exports to one ``aten.embedding_bag`` op, which no pass matches and
which has no forward-mode derivative (so ``lr="auto"``'s curvature products could not go
through it). For bags given as the rows of a 2-D index tensor ``i`` of shape ``(N, L)``,
the same function is

.. math:: y_n = \operatorname{reduce}_{l:\, i_{nl} \ne p}\; w_{nl}\, E[i_{nl}]

(``reduce``: sum, mean or max over the bag's entries that are not the ``padding_idx``
``p``; ``w`` the optional ``per_sample_weights``, sum mode only; an empty bag gives 0), and
``E[i]`` is an ``aten.embedding`` lookup, which :mod:`curvgraph.kinds.embedding` makes a
block. Bags given as a flat index tensor with ``offsets`` keep the op (and fall back to
first order, with the reason in the plan).
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
        if input.dim() != 2 or offsets is not None:
            return F.embedding_bag(input, self.weight, offsets, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                                   self.mode, self.sparse, per_sample_weights, self.include_last_offset,
                                   self.padding_idx)
        rows = F.embedding(input, self.weight, self.padding_idx, scale_grad_by_freq=self.scale_grad_by_freq)
        kept = torch.ones_like(input, dtype=torch.bool) if self.padding_idx is None else input != self.padding_idx
        if self.mode == "max":
            largest = rows.masked_fill(~kept[..., None], float("-inf")).amax(1)
            return torch.where(kept.any(1, keepdim=True), largest, torch.zeros_like(largest))
        weights = kept.to(rows.dtype) if per_sample_weights is None else per_sample_weights * kept
        total = (rows * weights[..., None]).sum(1)
        if self.mode == "sum":
            return total
        return total / kept.sum(1, keepdim=True).clamp(min=1).to(rows.dtype)


def bag_form(module: nn.Module) -> nn.Module | None:
    """The lookup-and-reduction form of an ``nn.EmbeddingBag`` (``None`` for other modules, and for a bag with
    ``max_norm``, whose lookups rewrite the weight in place)."""
    if type(module) is nn.EmbeddingBag and module.max_norm is None:
        return BagOfEmbeddings(module)
    return None
