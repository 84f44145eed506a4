r"""Spatial subsampling of convolution statistics: the ``conv_stats_every`` option.

KFC's input factor averages :math:`\bar a \bar a^\top` over every output position of every
example (Grosse & Martens 2016), so its patches and its product cost ``L`` times a dense
layer's (``L`` output positions). With ``conv_stats_every = s`` the factor is averaged
over the positions on a grid of step ``s`` along each spatial dim only (the patches of the
same convolution with ``s`` times the stride): ``s^r`` times fewer patches, an estimate of
the same mean (spatial subsampling, as in SKFAC, Tang et al. 2021). The output-gradient
factor ``G`` keeps every position: it costs ``C_out^2`` per position, not ``(C_in K)^2``.

The pass marks the blocks of kinds that honour it (``BlockKind.subsamples_positions``:
conv) with ``layout["stats_every"]`` and recomputes their costs.
"""

from __future__ import annotations

from ..plan import Plan


def subsample_positions(plan: Plan, every: int) -> int:
    """Set ``layout["stats_every"] = every`` on every block whose kind subsamples positions; recompute
    those blocks' kind costs. Returns the number of blocks marked."""
    count = 0
    for block in plan.blocks:
        kind = plan.kinds[block.kind]
        if kind.subsamples_positions:
            block.layout = {**block.layout, "stats_every": every}
            block.cost = kind.cost(block)
            count += 1
    return count
