r"""Block-diagonal factors for large layers: the ``max_factor_dim`` and ``max_factor_memory`` options.

By default (``max_factor_dim="auto"``) K-FAC and EKFAC split the factors wider than
:data:`DEFAULT_MAX_FACTOR_DIM`; ``max_factor_dim=None`` keeps every factor whole.

A dense Kronecker factor of size ``d`` costs ``d^2`` floats twice (the factor and its
inverse), ``d^3`` FLOPs per refresh and ``2 numel(M) d`` FLOPs per step to apply; its
statistics cost ``2 R d^2`` for ``R`` input rows. Split into ``k`` diagonal blocks of
``b = ceil(d / k)`` (:func:`curvgraph.plan.split_factor`), the factor keeps only the
correlations inside each slice of ``b`` consecutive features (for a convolution, of a
group of input channels' patches), and these costs become ``k b^2``, ``k b^3``,
``2 numel(M) b`` and ``2 R d b``: for ResNet-18's ``4608``-wide input factors and
``b = 512``, 9x less memory and statistics and 81x less refresh.

The pass runs on the plan, after the block passes: it splits the factors of kinds
whose statistics honour the split (``BlockKind.splits_factors``: dense and conv) and
recomputes those blocks' costs. Only methods that apply block-diagonal inverses
(``Method.splits_factors``: K-FAC and EKFAC) accept a split plan.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..plan import Block, Plan, split_factor

if TYPE_CHECKING:
    from ..methods.base import Method

#: The ``max_factor_dim`` of ``max_factor_dim="auto"`` (the default) for methods that apply block-diagonal
#: factors. A factor of order ``d`` costs ``d^3`` FLOPs per refresh and ``8 d^2`` bytes with its inverse: at
#: 2048, 8.6 GFLOPs and 34 MB. Above it the defaults would form whole, e.g., ResNet-18's ``4608``-wide conv
#: input factors (98 GFLOPs per refresh and 181 MB each) or the ``32000``-wide output factor of a language
#: model's untied head (8.2 GB, 33 TFLOPs per refresh); split, those cost 3 blocks of 1536 and 16 of 2000.
DEFAULT_MAX_FACTOR_DIM = 2048


def resolve_max_factor_dim(value: int | str | None, method: "Method") -> int | None:
    """The ``max_factor_dim`` that ``value`` stands for under ``method``: :data:`DEFAULT_MAX_FACTOR_DIM` for
    ``"auto"`` where the method applies block-diagonal factors (``Method.splits_factors``), else no split
    (``None``); any other value as given."""
    if value == "auto":
        return DEFAULT_MAX_FACTOR_DIM if method.splits_factors else None
    return value


def wide_factors(plan: Plan, limit: int = DEFAULT_MAX_FACTOR_DIM) -> list[str]:
    """``"block 'name' factor F (d wide)"`` for every whole dense factor of ``plan`` wider than ``limit``: what a
    method without block-diagonal factors keeps whole at ``max_factor_dim="auto"``, in plan order."""
    return [f"block {b.name!r} factor {name} ({f.dim} wide)" for b in plan.blocks for name, f in b.factors.items()
            if not f.diagonal and f.split_dim is None and f.dim > limit]


def split_block(plan: Plan, block: Block, max_dim: int) -> Block:
    """``block`` with every dense factor wider than ``max_dim`` split (:func:`curvgraph.plan.split_factor`) and its
    kind's cost recomputed: a new :class:`~curvgraph.plan.Block`, or ``block`` itself where nothing splits (or its
    kind does not split factors)."""
    kind = plan.kinds[block.kind]
    if not kind.splits_factors:
        return block
    factors = {name: split_factor(f, max_dim) for name, f in block.factors.items()}
    if factors == block.factors:
        return block
    split = replace(block, factors=factors)
    split.cost = kind.cost(split)
    return split


def split_factors(plan: Plan, max_dim: int, method: "Method") -> int:
    """Split every dense factor wider than ``max_dim`` of a block whose kind splits factors into
    ``ceil(d / max_dim)`` diagonal blocks (:func:`split_block`), in place.

    Returns the number of blocks split. Raises :class:`~curvgraph.ConfigError` if one
    would be split and ``method`` cannot apply block-diagonal factors.
    """
    count = 0
    for i, block in enumerate(plan.blocks):
        split = split_block(plan, block, max_dim)
        if split is block:
            continue
        if not method.splits_factors:
            raise ConfigError(
                f"curvgraph: max_factor_dim={max_dim} would split the factors of block {block.name!r} into diagonal "
                f"blocks, which method {method.name!r} does not support; use method='kfac', or a max_factor_dim of at "
                f"least {max(f.dim for f in block.factors.values() if not f.diagonal)}.")
        block.factors, block.cost = split.factors, split.cost
        count += 1
    return count


def state_bytes(plan: Plan, blocks: list[Block], method: "Method") -> float:
    """The curvature state of ``blocks`` under ``method`` (its cost's ``state_bytes``), in bytes at the example sizes."""
    return sum(plan.at_example(method.cost(b).get("state_bytes", 0)) for b in blocks)


def max_dim_for_memory(plan: Plan, budget: float, method: "Method") -> int | None:
    """The largest ``max_factor_dim`` (``None``: no split needed) whose split plan keeps ``method``'s curvature
    state within ``budget`` bytes; a :class:`~curvgraph.ConfigError` if even blocks of one feature do not fit.

    The candidates are the factor sizes present and the powers of two below the largest; the plan is not
    changed (each candidate is tried on split copies of the blocks).
    """
    if state_bytes(plan, plan.blocks, method) <= budget:
        return None
    splittable = [f.dim for b in plan.blocks if plan.kinds[b.kind].splits_factors
                  for f in b.factors.values() if not f.diagonal]
    largest = max(splittable, default=1)
    for candidate in sorted(set(splittable) | {2**i for i in range(largest.bit_length())}, reverse=True):
        if state_bytes(plan, [split_block(plan, b, candidate) for b in plan.blocks], method) <= budget:
            return candidate
    least = state_bytes(plan, [split_block(plan, b, 1) for b in plan.blocks], method)
    raise ConfigError(f"curvgraph: max_factor_memory={budget:.3g} bytes is less than the curvature state needs even "
                      f"with every splittable factor split into blocks of 1 ({least:.3g} bytes); raise it to at "
                      f"least that.")


def factor_dim_limit(plan: Plan, method: "Method", max_dim: int | None, max_memory: float | None) -> int | None:
    """The ``max_factor_dim`` to split ``plan``'s factors at: ``max_dim``, or the largest that keeps ``method``'s
    curvature state within ``max_memory`` bytes (:func:`max_dim_for_memory`), or the smaller of the two; ``None``
    for no split."""
    limits = [] if max_dim is None else [max_dim]
    if max_memory is not None and (fitting := max_dim_for_memory(plan, max_memory, method)) is not None:
        limits.append(fitting)
    return min(limits, default=None)
