"""The generic pass machinery: from a traced graph to a :class:`~curvgraph.plan.Plan`.

The pipeline is data. Every registered block kind (:mod:`curvgraph.kinds`) brings
its *normalization rewrites* (each rewrites one family of spellings into the kind's
canonical op and returns how many nodes it rewrote) and its named *block passes*
(each returns the blocks it matched). :func:`build_plan` first runs the rewrites
every graph gets (:mod:`.forms`) and every kind's until none applies, then the block passes in registration order; the claims ledger
(:class:`~curvgraph.passes.ledger.Claims`) makes a second claim on a parameter an
error that names both passes. Whatever no pass claims goes to the first-order
fallback, with the reason recorded in the plan.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

from torch.fx import Graph

from .. import registry
from ..errors import ConfigError
from ..leaf import is_leaf_call, leaf_name
from ..plan import SHARING_MODES, Plan
from ..trace import TracedModel
from .attention import find_attention_groups
from .forms import GRAPH_REWRITES, TRANSFORMED_BACKWARD_REWRITES
from .ledger import Claims

Rewrite = Callable[[Graph, set[str]], int]

#: The group passes :func:`build_plan` runs after the block passes: ``(traced, blocks) -> groups``.
GROUP_PASSES = (find_attention_groups,)


def normalize(graph: Graph, params: set[str], rewrites: Sequence[Rewrite] | None = None) -> dict[str, int]:
    """Run ``rewrites`` (default: every registered kind's) until none rewrites anything.

    Returns the number of rewrites per pass name (the function's ``__name__``).
    """
    if rewrites is None:
        rewrites = [r for kind in registry.KINDS.values() for r in kind.rewrites]
    counts: dict[str, int] = {r.__name__: 0 for r in rewrites}
    changed = True
    while changed:
        changed = False
        for rewrite in rewrites:
            n = rewrite(graph, params)
            counts[rewrite.__name__] += n
            changed |= n > 0
    graph.eliminate_dead_code()  # rewrites leave the nodes they bypassed (e.g. a transpose) without users
    graph.lint()
    return counts


def build_plan(traced: TracedModel, kinds: Iterable = (), sharing: str = "expand", sizes: dict | None = None,
               transformed_backward: bool = True) -> Plan:
    """Normalize ``traced.graph`` in place and match its curvature blocks.

    Args:
        traced: the captured model (its graph is rewritten).
        kinds: the block kinds (:class:`~curvgraph.kinds.base.BlockKind`), in pass
            order; their rewrites normalize the graph, their passes claim blocks.
        sharing: ``"expand"`` or ``"reduce"``, the weight-sharing approximation of
            every block whose weight is applied at several positions or places.
        sizes: the value of each symbolic size at the example inputs (for costs).
        transformed_backward: the step differentiates the model's backward again or vectorizes it, so the graph
            gets :data:`~curvgraph.passes.forms.TRANSFORMED_BACKWARD_REWRITES` too (attention in its math form).
    """
    if sharing not in SHARING_MODES:
        raise ConfigError(f"curvgraph: kfac_approx must be one of {SHARING_MODES}, got {sharing!r}.")
    kinds = list(kinds)
    graph_rewrites = [*GRAPH_REWRITES, *(TRANSFORMED_BACKWARD_REWRITES if transformed_backward else ())]
    rewrites = normalize(traced.graph, set(traced.params), [*graph_rewrites, *(r for kind in kinds for r in kind.rewrites)])
    claims = Claims(traced.params)
    blocks, matches = [], {}
    for kind in kinds:
        for block_pass in kind.passes:
            if block_pass.name in matches:
                raise ConfigError(f"curvgraph: two block passes are called {block_pass.name!r}; pass names must be unique.")
            found = block_pass.find(traced, claims, sharing)
            for block in found:
                claims.claim(block, block_pass.name)
            blocks.extend(found)
            matches[block_pass.name] = len(found)

    in_blocks = {p for b in blocks for p in b.placeholders}
    fallback, reasons, numel = [], {}, 0
    for node in traced.graph.nodes:
        if node.op != "placeholder" or node.name not in traced.params or node.name in in_blocks:
            continue
        name = traced.params[node.name]
        fallback.append(name)
        numel += node.meta["val"].numel()
        reasons[name] = claims.reasons.get(node.name) or _default_reason(node)
    order = {node.name: i for i, node in enumerate(traced.graph.nodes)}
    blocks.sort(key=lambda b: min(order[n] for u in b.uses for n in u.outputs))
    for block in blocks:
        rows = block.rows.subs(sizes or {})
        block.example_rows = int(rows) if rows.is_number else None
    groups = [group for find_groups in GROUP_PASSES for group in find_groups(traced, blocks)]
    return Plan(
        model_name=traced.model_name,
        blocks=blocks,
        fallback_params=tuple(fallback),
        fallback_reasons=reasons,
        frozen_params=tuple(traced.frozen.values()),
        sizes=dict(sizes or {}),
        size_names=traced.dim_names(),
        fallback_numel=numel,
        matches=matches,
        groups=groups,
        rewrites=rewrites,
        traced=traced,
        kinds={kind.name: kind for kind in kinds},
    )


def _default_reason(node) -> str:
    if not node.users:
        return "not used by the forward pass"
    leaves = sorted({leaf_name(u.args[0]) for u in node.users if is_leaf_call(u)})
    if leaves:
        return f"in leaf module {', '.join(map(repr, leaves))} (leaf_modules=): run as one opaque call"
    users = sorted({f"{u.target}" for u in node.users})
    return f"used by {', '.join(users)}; no curvature pass matches it"
