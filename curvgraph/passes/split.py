r"""Block-diagonal factors for large layers: the ``max_factor_dim`` and ``max_factor_memory`` options.

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
(``Method.splits_factors``: K-FAC) accept a split plan.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..errors import ConfigError
from ..plan import Plan, split_factor

if TYPE_CHECKING:
    from ..methods.base import Method


def split_factors(plan: Plan, max_dim: int, method: "Method") -> int:
    """Split every dense factor wider than ``max_dim`` of a block whose kind splits factors into
    ``ceil(d / max_dim)`` diagonal blocks; recompute the kind's cost of each block changed.

    Returns the number of factors split. Raises :class:`~curvgraph.ConfigError` if one
    would be split and ``method`` cannot apply block-diagonal factors.
    """
    count = 0
    for block in plan.blocks:
        kind = plan.kinds[block.kind]
        if not kind.splits_factors:
            continue
        factors = {name: split_factor(f, max_dim) for name, f in block.factors.items()}
        changed = sum(factors[name] is not f for name, f in block.factors.items())
        if not changed:
            continue
        if not method.splits_factors:
            raise ConfigError(
                f"curvgraph: max_factor_dim={max_dim} would split the factors of block {block.name!r} into diagonal "
                f"blocks, which method {method.name!r} does not support; use method='kfac', or a max_factor_dim of at "
                f"least {max(f.dim for f in block.factors.values() if not f.diagonal)}.")
        block.factors = factors
        block.cost = kind.cost(block)
        count += changed
    return count


def max_dim_for_memory(plan: Plan, budget: float, state_bytes: Callable[[Plan], float]) -> int | None:
    """The largest ``max_factor_dim`` (``None``: no split needed) whose split plan keeps ``state_bytes(plan)``,
    the curvature state in bytes, within ``budget``; a :class:`~curvgraph.ConfigError` if even blocks of one
    feature do not fit.

    The candidates are the factor sizes present and the powers of two below the largest; the plan is not
    changed (each candidate is tried on a copy of the factors).
    """
    if state_bytes(plan) <= budget:
        return None
    splittable = [f.dim for b in plan.blocks if plan.kinds[b.kind].splits_factors
                  for f in b.factors.values() if not f.diagonal]
    largest = max(splittable, default=1)
    candidates = sorted(set(splittable) | {2**i for i in range(largest.bit_length())}, reverse=True)
    originals = {id(b): (b.factors, b.cost) for b in plan.blocks}
    try:
        for candidate in candidates:
            for b in plan.blocks:
                b.factors, b.cost = originals[id(b)]
                if plan.kinds[b.kind].splits_factors:
                    b.factors = {name: split_factor(f, candidate) for name, f in b.factors.items()}
                    b.cost = dict(plan.kinds[b.kind].cost(b))
            if state_bytes(plan) <= budget:
                return candidate
    finally:
        for b in plan.blocks:
            b.factors, b.cost = originals[id(b)]
    raise ConfigError(f"curvgraph: max_factor_memory={budget:.3g} bytes is less than the curvature state needs even "
                      f"with every splittable factor split into blocks of 1; raise it.")
