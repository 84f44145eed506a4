"""Dense pass: one ``"dense"`` block per weight that only ``aten.linear`` uses.

After normalization (:mod:`.linear_forms`) a dense layer is ``aten.linear(x, W', b)``
with ``W'`` a trainable 2-D parameter or its transpose. The pass groups those nodes by
parameter. A weight applied at several places (a shared/tied weight, or one linear
over several positions) is one block with one :class:`~curvgraph.plan.LayerUse` per
application; its statistics sum over the uses (see :mod:`curvgraph.curvature.dense`).

A weight with any other consumer (an embedding lookup, a regularizer, ...) is left to
the fallback; so is a bias that is not the bias of every use of its weight.
"""

from __future__ import annotations

from collections import defaultdict

import sympy

from torch.fx import Graph, Node

from ..curvature import dense as dense_math
from ..plan import Block, LayerUse
from ..trace import TracedModel, symbolic_shape
from .blocks import claim_block
from .graph_utils import aten, depends_on, is_transpose, ndim, weight_view


def find_dense_blocks(traced: TracedModel, sharing: str, claimed: dict[str, str]) -> list[Block]:
    """Dense blocks of ``traced``; records why rejected parameters fall back in ``claimed``."""
    graph: Graph = traced.graph
    params = set(traced.params)
    uses: dict[Node, list[Node]] = defaultdict(list)
    for node in graph.nodes:
        if node.op == "call_function" and node.target == aten.linear.default and ndim(node.args[0]) >= 1:
            view = weight_view(node.args[1], params)
            if view is not None:
                uses[view[0]].append(node)

    trainable = depends_on(graph, params)
    blocks = []
    for weight, linears in uses.items():
        foreign = _foreign_users(weight, linears)
        if foreign:
            claimed[weight.name] = f"also used by {foreign[0].target} at node '{foreign[0].name}'; no pass matches that use"
            continue
        if any(ndim(lin.args[0]) < 2 for lin in linears):
            claimed[weight.name] = "a use has an input without a batch dimension"
            continue
        bias = _shared_bias(linears, params)
        transposed = is_transpose(linears[0].args[1])
        if any(is_transpose(lin.args[1]) != transposed for lin in linears):
            claimed[weight.name] = "used both as W and as W.T; no single layout"
            continue
        out_features, in_features = weight.meta["val"].shape[::-1] if transposed else weight.meta["val"].shape
        layer_uses = tuple(
            LayerUse(node=lin.name, input=lin.args[0].name, input_shape=symbolic_shape(lin.args[0]),
                     output_shape=symbolic_shape(lin), rows=sympy.Mul(*symbolic_shape(lin.args[0])[:-1]),
                     input_grad=lin.args[0] in trainable)
            for lin in linears
        )
        blocks.append(claim_block(traced, claimed, kind="dense", math=dense_math, weight=weight, bias=bias,
                                  uses=layer_uses, dims={"in": int(in_features), "out": int(out_features)},
                                  sharing=sharing, weight_transposed=transposed))
    return blocks


def _foreign_users(weight: Node, linears: list[Node]) -> list[Node]:
    """Users of ``weight`` other than the weight argument of ``linears`` (directly or via a transpose)."""
    allowed = set(linears)
    foreign = []
    for user in weight.users:
        if user in allowed and user.args[1] is weight and weight not in user.args[:1] + user.args[2:]:
            continue
        if is_transpose(user) and all(u in allowed and u.args[1] is user for u in user.users):
            continue
        foreign.append(user)
    return foreign


def _shared_bias(linears: list[Node], params: set[str]) -> Node | None:
    """The bias parameter every use shares and nothing else uses, if there is one."""
    biases = {lin.args[2] if len(lin.args) > 2 else None for lin in linears}
    if len(biases) != 1:
        return None
    (bias,) = biases
    if not (isinstance(bias, Node) and bias.op == "placeholder" and bias.name in params):
        return None
    if any(user not in linears or user.args[2] is not bias or bias in user.args[:2] for user in bias.users):
        return None
    return bias
