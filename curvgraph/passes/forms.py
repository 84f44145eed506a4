"""Rewrites every graph gets, whatever kinds are registered: ops the generated step cannot differentiate as needed.

The step differentiates the forward in reverse mode (gradients, statistics) and, for
the quadratic model of ``lr="auto"``, in forward mode (``torch.func.jvp``). Some fused
kernels have no forward-mode derivative; :func:`attention_math_form` replaces them by
their composite form, which computes the same function from differentiable ops.
"""

from __future__ import annotations

import operator

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
    Returns the number of rewritten nodes.
    """
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in FUSED_ATTENTION:
            continue
        args = schema_args(node)
        math_node = insert_call(graph, node, aten._scaled_dot_product_attention_math.default,
                                (args["query"], args["key"], args["value"], args["attn_mask"], args["dropout_p"],
                                 args["is_causal"]))
        math_node.kwargs = {"scale": args["scale"], "enable_gqa": args["enable_gqa"]}
        output = insert_call(graph, node, operator.getitem, (math_node, 0), meta_from=node)
        node.replace_all_uses_with(output)
        graph.erase_node(node)
        _reshape_views_of(output)
        count += 1
    return count


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
