"""Rewrites every graph gets, whatever kinds are registered: ops the generated step cannot differentiate as needed.

The step differentiates the forward in reverse mode (gradients, statistics) and, for
the quadratic model of ``lr="auto"``, in forward mode (``torch.func.jvp``). Some fused
kernels have no forward-mode derivative; :func:`attention_math_form` replaces them by
their composite form, which computes the same function from differentiable ops.
"""

from __future__ import annotations

import math
import operator

import torch
from torch.fx import Graph, Node

from .graph_utils import aten, insert_call, schema_args

#: Fused attention ops (no forward-mode AD on CPU): ``scaled_dot_product_attention`` dispatches to them.
FUSED_ATTENTION = (aten.scaled_dot_product_attention.default,)


def attention_math_form(graph: Graph, params: set[str]) -> int:
    """``scaled_dot_product_attention(q, k, v, mask, p, causal, scale=s)`` -> ``_scaled_dot_product_attention_math(...)[0]``.

    The math form is softmax(q kᵀ · s + mask) v written with matmuls (forward- and
    reverse-differentiable, and decomposed by Inductor like any other op); its second
    output (the attention weights) is unused. The fused kernels return their output in
    the query's memory layout, which ``view`` ops after them may rely on; the math form's
    output is contiguous, so those views become ``reshape`` (:func:`_reshape_views_of`).
    A boolean ``mask`` (``True``: attend) becomes the additive mask the fused op makes of it
    (:func:`_additive_mask`): the math form adds its mask to the scores as it is.
    Returns the number of rewritten nodes.
    """
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in FUSED_ATTENTION:
            continue
        args = schema_args(node)
        mask = args["attn_mask"]
        if isinstance(mask, Node) and mask.meta["val"].dtype == torch.bool:
            mask = _additive_mask(graph, node, mask, args["query"].meta["val"].dtype)
        math_node = insert_call(graph, node, aten._scaled_dot_product_attention_math.default,
                                (args["query"], args["key"], args["value"], mask, args["dropout_p"],
                                 args["is_causal"]))
        math_node.kwargs = {"scale": args["scale"], "enable_gqa": args["enable_gqa"]}
        output = insert_call(graph, node, operator.getitem, (math_node, 0), meta_from=node)
        node.replace_all_uses_with(output)
        graph.erase_node(node)
        _reshape_views_of(output)
        count += 1
    return count


def _additive_mask(graph: Graph, attention: Node, mask: Node, dtype: torch.dtype) -> Node:
    """Nodes before ``attention`` that turn the boolean ``mask`` into ``0`` where it is ``True`` and ``-inf`` where it is
    ``False``, in ``dtype``: what ``scaled_dot_product_attention`` does to a boolean mask before its math kernel."""
    zeros = insert_call(graph, attention, aten.zeros_like.default, (mask,), meta_from=attention)
    zeros.kwargs = {"dtype": dtype}
    blocked = insert_call(graph, attention, aten.logical_not.default, (mask,), meta_from=attention)
    additive = insert_call(graph, attention, aten.masked_fill.Scalar, (zeros, blocked, -math.inf), meta_from=attention)
    value = mask.meta["val"]  # a fake tensor: ops on it give the new nodes' shapes
    zeros.meta["val"], blocked.meta["val"] = value.to(dtype), value.logical_not()
    additive.meta["val"] = zeros.meta["val"]
    return additive


#: Ops that only rearrange their first argument's elements.
SHAPE_OPS = (aten.permute.default, aten.transpose.int, aten.view.default, aten.reshape.default, aten.unsqueeze.default,
             aten.squeeze.dim, aten.expand.default, aten.clone.default)


def _reshape_views_of(node: Node) -> None:
    """Turn every ``view`` reached from ``node`` through :data:`SHAPE_OPS` into ``reshape``."""
    pending = [node]
    while pending:
        for user in list(pending.pop().users):
            if user.op != "call_function" or user.target not in SHAPE_OPS:
                continue
            if user.target is aten.view.default:
                user.target = aten.reshape.default
            pending.append(user)


#: The rewrites :func:`curvgraph.passes.build_plan` runs before the kinds' own.
GRAPH_REWRITES = (attention_math_form,)
