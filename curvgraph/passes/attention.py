r"""The attention pass: group the projections around every attention core into one ``attention`` group.

An attention core is a call of ``scaled_dot_product_attention``, fused or in its math form
(which :mod:`.forms` writes it in where the step needs it), or the hand-written pattern

.. math:: \operatorname{softmax}(\,\text{elementwise}(q\,k^\top)\,)\;v

(``matmul`` -> scaling, masking -> ``softmax`` -> optional dropout -> ``matmul``; the score product may be
``baddbmm(mask, q, kᵀ)``, which adds an additive mask, as ``nn.MultiheadAttention`` computes it when asked for
its attention weights with a mask). From the
core's ``q``, ``k`` and ``v`` operands the pass walks back through layout ops (views,
transposes, head splits, ``split``/``chunk``/``unbind``/``select`` of a fused projection)
and scalings by a constant (``q * d**-0.5``) to the ``aten.linear`` that produced each, and from the core's output forward through
layout ops to the output projection. Each projection found is a *member* of the group:
its role (``q``, ``k``, ``v``, ``out``), the curvature block that owns the linear, and,
for a fused projection (one ``nn.Linear(d, 3d)`` or ``nn.MultiheadAttention``'s packed
``in_proj_weight``), which part of its output the member is (``(index, count)``).

The group changes no math: each member's curvature is its owning block's (a dense block,
or a packed block when one weight is split by rows between inputs), so the curvature of
an attention layer is block-diagonal over its projections, as in K-FAC for transformers
(Eschenhagen et al. 2023) and kfac-jax. A fused ``q|k|v`` projection keeps one
``3d x 3d`` output factor ``G`` (the cross-covariances of the q, k and v output
gradients), which a split into three ``d x d`` factors would drop; ``docs/getting-started.md``
gives the measured accuracy and cost of both. The group records what was found, for the
plan's table and for drawings.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from typing import Iterable, Iterator

from torch.fx import Node

from ..plan import Block, BlockGroup, GroupMember
from ..trace import TracedModel, module_path
from .forms import FUSED_ATTENTION, SHAPE_OPS
from .graph_utils import aten

#: Ops that move a tensor's elements without computing (walked through in both directions).
LAYOUT_OPS = frozenset(SHAPE_OPS) | {
    aten._unsafe_view.default, aten.t.default, aten.squeeze.default, aten.contiguous.default, aten.alias.default,
    aten.flatten.using_ints, aten.unflatten.int, aten.dropout.default, aten.native_dropout.default,
    aten._to_copy.default,
}
#: Ops that take one part of a fused projection's output: ``select(x, dim, i)`` and the items of a split.
SPLITS = frozenset({aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int})
#: Elementwise ops between the score product and the softmax (scaling, masking, biases).
SCORE_OPS = frozenset({aten.div.Tensor, aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.masked_fill.Scalar,
                       aten.masked_fill.Tensor, aten.where.self, aten._to_copy.default})
MATMULS = frozenset({aten.matmul.default, aten.bmm.default})
#: The ops that compute attention scores, with the positions of their ``q`` and ``kᵀ`` operands.
SCORE_PRODUCTS = {aten.matmul.default: (0, 1), aten.bmm.default: (0, 1), aten.baddbmm.default: (1, 2)}
#: Ops that scale a tensor; walked through from ``q``, ``k`` or ``v`` to its projection when the factor is a constant.
SCALINGS = frozenset({aten.mul.Tensor, aten.div.Tensor})
SOFTMAXES = frozenset({aten.softmax.int, aten._softmax.default})
SDPA_MATH = aten._scaled_dot_product_attention_math.default


def find_attention_groups(traced: TracedModel, blocks: Iterable[Block]) -> list[BlockGroup]:
    """One :class:`~curvgraph.plan.BlockGroup` of kind ``"attention"`` per attention core in ``traced.graph``.

    A core whose projections are not found (e.g. attention over inputs that no linear
    produced) gives a group with the members that are; a core with none gives no group.
    """
    owners: dict[str, list[str]] = defaultdict(list)
    for block in blocks:
        for use in block.uses:
            for output in use.outputs:
                owners[output].append(block.name)
    groups = []
    for core, (q, k, v), result in _cores(traced):
        found = [(role, *producer) for role, operand in (("q", q), ("k", k), ("v", v))
                 if (producer := _producer(operand)) is not None]
        out = _consumer(result)
        if out is not None:
            found.append(("out", out, None))
        members = tuple(GroupMember(role, layer.name, tuple(owners[layer.name]), part)
                        for role, layer, part in found if layer.name in owners)
        if members:
            name = module_path(result) or module_path(core) or _common_prefix([m.blocks[0] for m in members]) or core.name
            groups.append(BlockGroup("attention", name, core.name, members))
    return groups


def _common_prefix(names: list[str]) -> str:
    """The longest module path that every dotted name in ``names`` starts with."""
    parts = [name.split(".")[:-1] for name in names]
    prefix = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        prefix.append(level[0])
    return ".".join(prefix)


def _cores(traced: TracedModel) -> Iterator[tuple[Node, tuple[Node, Node, Node], Node]]:
    """``(core node, (q, k, v) operands, output node)`` of every attention core, in graph order."""
    for node in traced.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in FUSED_ATTENTION:
            yield node, tuple(node.args[:3]), node
        elif node.target is SDPA_MATH:
            outputs = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
            if outputs:
                yield node, tuple(node.args[:3]), outputs[0]
        elif node.target in SOFTMAXES:
            scores = _walk_up(node.args[0], SCORE_OPS)
            value_product = _single_user_through(node, LAYOUT_OPS)
            if (scores is not None and scores.target in SCORE_PRODUCTS and value_product is not None
                    and value_product.target in MATMULS):
                q, k = (scores.args[i] for i in SCORE_PRODUCTS[scores.target])
                yield node, (q, _untranspose(k), value_product.args[1]), value_product


def _walk_up(node: object, through: frozenset) -> Node | None:
    """The first node above ``node`` (itself included) that is not in ``through``, following each op's first operand
    computed by the graph (an op's ``call_function`` argument, not a placeholder or a constant)."""
    while isinstance(node, Node) and node.op == "call_function" and node.target in through:
        operands = [a for a in node.args if isinstance(a, Node) and a.op == "call_function"]
        if not operands:
            return None
        node = operands[0]
    return node if isinstance(node, Node) else None


def _single_user_through(node: Node, through: frozenset) -> Node | None:
    """Follow ``node``'s only user through ``through`` ops; the first user that is not one of them."""
    while len(node.users) == 1:
        (user,) = node.users
        if user.target not in through:
            return user
        node = user
    return None


def _untranspose(node: Node) -> Node:
    """``k`` from ``k.transpose(-2, -1)`` (the score product's right operand)."""
    return node.args[0] if isinstance(node, Node) and node.target in (aten.transpose.int, aten.permute.default,
                                                                       aten.t.default) else node


def _producer(operand: object) -> tuple[Node, tuple[int, int] | None] | None:
    """The ``aten.linear`` that ``operand`` is (a part of) a layout of, possibly scaled by a constant, and which part:
    ``(index, count)`` of the first split of its output on the way (``None`` if the whole output)."""
    part = None
    node = operand
    while isinstance(node, Node) and node.op == "call_function":
        if node.target is aten.linear.default:
            return node, part
        if node.target is aten.select.int:
            part = (int(node.args[2]), int(node.args[0].meta["val"].shape[node.args[1]]))
        elif node.target is operator.getitem and isinstance(node.args[0], Node) and node.args[0].target in SPLITS:
            part = (int(node.args[1]), len(node.args[0].meta["val"]))
            node = node.args[0]
        elif node.target not in LAYOUT_OPS and not (node.target in SCALINGS and not isinstance(node.args[1], Node)):
            return None
        node = node.args[0]
    return None


def _consumer(result: Node) -> Node | None:
    """The ``aten.linear`` that takes ``result`` (through layout ops) as its input, if that is its only use."""
    user = _single_user_through(result, LAYOUT_OPS)
    return user if user is not None and user.target is aten.linear.default and user.args[0] in _layouts(result) else None


def _layouts(node: Node) -> set[Node]:
    """``node`` and the chain of single-user layout ops below it."""
    chain = {node}
    while len(node.users) == 1 and next(iter(node.users)).target in LAYOUT_OPS:
        node = next(iter(node.users))
        chain.add(node)
    return chain
