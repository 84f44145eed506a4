"""Pattern-matching passes: from a traced graph to a :class:`~curvgraph.plan.Plan`.

The pipeline is data: first the normalization passes rewrite the graph into a
canonical op vocabulary (each pass one rewrite), then each block pass claims the
parameters it recognizes. Whatever no block pass claims goes to the first-order
fallback, with the reason recorded in the plan.
"""

from __future__ import annotations

from typing import Callable

from torch.fx import Graph

from ..errors import ConfigError
from ..plan import SHARING_MODES, Block, Plan
from ..trace import TracedModel
from .conv import find_conv_blocks
from .dense import find_dense_blocks
from .linear_forms import LINEAR_PASSES
from .norm import find_norm_blocks, split_norm_affine

BlockPass = Callable[[TracedModel, str, dict[str, str]], list[Block]]

#: Rewrites into the canonical op vocabulary, run until none applies.
NORMALIZATION_PASSES = LINEAR_PASSES + (split_norm_affine,)

#: Block passes in the order they claim parameters.
BLOCK_PASSES: tuple[BlockPass, ...] = (find_dense_blocks, find_conv_blocks, find_norm_blocks)


def normalize(graph: Graph, params: set[str]) -> dict[str, int]:
    """Run every normalization pass until none rewrites anything; returns rewrite counts."""
    counts: dict[str, int] = {p.__name__: 0 for p in NORMALIZATION_PASSES}
    changed = True
    while changed:
        changed = False
        for rewrite in NORMALIZATION_PASSES:
            n = rewrite(graph, params)
            counts[rewrite.__name__] += n
            changed |= n > 0
    graph.lint()
    return counts


def build_plan(traced: TracedModel, sharing: str = "expand", sizes: dict | None = None) -> Plan:
    """Normalize ``traced.graph`` in place and match its curvature blocks.

    Args:
        traced: the captured model (its graph is rewritten).
        sharing: ``"expand"`` or ``"reduce"``, the weight-sharing approximation of
            every block whose weight is applied at several positions or places.
        sizes: the value of each symbolic size at the example inputs (for costs).
    """
    if sharing not in SHARING_MODES:
        raise ConfigError(f"curvgraph: kfac_approx must be one of {SHARING_MODES}, got {sharing!r}.")
    normalize(traced.graph, set(traced.params))
    claimed: dict[str, str] = {}
    blocks: list[Block] = []
    for block_pass in BLOCK_PASSES:
        blocks.extend(block_pass(traced, sharing, claimed))

    in_blocks = {p for b in blocks for p in b.placeholders}
    fallback, reasons, numel = [], {}, 0
    for node in traced.graph.nodes:
        if node.op != "placeholder" or node.name not in traced.params or node.name in in_blocks:
            continue
        name = traced.params[node.name]
        fallback.append(name)
        numel += node.meta["val"].numel()
        reasons[name] = claimed.get(node.name) or _default_reason(node)
    order = {node.name: i for i, node in enumerate(traced.graph.nodes)}
    blocks.sort(key=lambda b: min(order[u.node] for u in b.uses))
    return Plan(
        model_name=traced.model_name,
        blocks=blocks,
        fallback_params=tuple(fallback),
        fallback_reasons=reasons,
        frozen_params=tuple(traced.frozen.values()),
        sizes=dict(sizes or {}),
        size_names=traced.dim_names(),
        fallback_numel=numel,
    )


def _default_reason(node) -> str:
    if not node.users:
        return "not used by the forward pass"
    users = sorted({f"{u.target}" for u in node.users})
    return f"used by {', '.join(users)}; no curvature pass matches it"
