"""Normalization passes: every spelling of a dense layer becomes ``aten.linear``.

A dense layer ``y = x W^T + b`` reaches the graph as ``aten.linear`` (``nn.Linear``,
``F.linear``), as ``aten.matmul``/``aten.mm`` with a (transposed) weight (``x @ W.T``,
``x @ W``), as ``aten.addmm`` (``torch.addmm``) or as ``aten.einsum``. Each pass below
rewrites one family into ``aten.linear(x, W)`` -- with ``W`` replaced by ``aten.t(W)``
when the parameter is stored ``(in, out)`` -- and :func:`fold_bias` then folds
``linear(x, W) + b`` into ``linear(x, W, b)``. The rewrites are numerically the same
computation; after them the dense pass has one pattern to match.

Each pass takes the graph and the names of trainable-parameter placeholders and
returns how many nodes it rewrote.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import Graph, Node

from ...passes.graph_utils import aten, insert_call, ndim, weight_view


@dataclass(frozen=True)
class MatmulForm:
    """An op whose ``args[x] @ args[rhs] (+ args[bias])`` is a dense layer when ``rhs`` is a weight."""

    target: object
    x: int
    rhs: int
    bias: int | None = None


MATMUL_FORMS = (
    MatmulForm(aten.matmul.default, x=0, rhs=1),
    MatmulForm(aten.mm.default, x=0, rhs=1),
    MatmulForm(aten.addmm.default, x=1, rhs=2, bias=0),
)


def matmul_to_linear(graph: Graph, params: set[str]) -> int:
    """``x @ W.T`` -> ``linear(x, W)``; ``x @ W`` -> ``linear(x, t(W))``; ``addmm(b, x, R)`` -> ``linear(x, ...) + b``."""
    forms = {f.target: f for f in MATMUL_FORMS}
    count = 0
    for node in list(graph.nodes):
        form = forms.get(node.target) if node.op == "call_function" else None
        if form is None or node.kwargs or ndim(node.args[form.x]) < 2:
            continue
        view = weight_view(node.args[form.rhs], params)
        if view is None:
            continue
        param, transposed = view
        # x @ param.T is PyTorch's (out, in) layout; x @ param stores the weight (in, out).
        _replace_with_linear(graph, node, node.args[form.x], param, stored_in_out=not transposed,
                             bias=node.args[form.bias] if form.bias is not None else None)
        count += 1
    return count


def einsum_to_linear(graph: Graph, params: set[str]) -> int:
    """``einsum('...i,oi->...o', x, W)`` (or ``'...i,io->...o'``) -> ``linear``."""
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.einsum.default or node.kwargs:
            continue
        equation, operands = node.args[0], node.args[1]
        if len(operands) != 2:
            continue
        match = parse_linear_einsum(equation)
        if match is None:
            continue
        x_index, w_index, operand_in_out = match
        view = weight_view(operands[w_index], params)
        if view is None or ndim(operands[x_index]) < 1:
            continue
        param, transposed = view
        _replace_with_linear(graph, node, operands[x_index], param, stored_in_out=operand_in_out != transposed)
        count += 1
    return count


def parse_linear_einsum(equation: str) -> tuple[int, int, bool] | None:
    """Recognize a two-operand einsum that is a dense layer.

    Returns ``(x_index, w_index, w_is_in_out)``: the operand positions of the input and
    of the 2-D weight operand, and whether that operand is laid out ``(in, out)``. The
    input's last subscript must be the contracted one and the output must be the
    input's other subscripts followed by the weight's free subscript.
    """
    equation = equation.replace(" ", "")
    if equation.count("->") != 1:
        return None
    lhs, out = equation.split("->")
    terms = lhs.split(",")
    if len(terms) != 2:
        return None
    for w_index in (0, 1):
        w, x = terms[w_index], terms[1 - w_index]
        if len(w) != 2 or "." in w or not x or x.endswith("."):
            continue
        contracted = x[-1]
        if contracted not in w or x.count(contracted) != 1 or w[0] == w[1]:
            continue
        free = w.replace(contracted, "")
        if free in x or out != x[:-1] + free:
            continue
        return 1 - w_index, w_index, w == contracted + free
    return None


def fold_bias(graph: Graph, params: set[str]) -> int:
    """``linear(x, W) + b`` -> ``linear(x, W, b)`` for a 1-D parameter ``b`` of the output size."""
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.add.Tensor or node.kwargs or len(node.args) != 2:
            continue
        for lin, bias in (node.args, node.args[::-1]):
            if not _is_bias_free_linear(lin) or len(lin.users) != 1:
                continue
            if not (isinstance(bias, Node) and bias.op == "placeholder" and bias.name in params and ndim(bias) == 1):
                continue
            if bias.meta["val"].shape[0] != lin.meta["val"].shape[-1]:
                continue
            new = insert_call(graph, node, aten.linear.default, (lin.args[0], lin.args[1], bias), meta_from=node)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            graph.erase_node(lin)
            count += 1
            break
    return count


LINEAR_PASSES = (matmul_to_linear, einsum_to_linear, fold_bias)


def _is_bias_free_linear(node: object) -> bool:
    return (
        isinstance(node, Node)
        and node.op == "call_function"
        and node.target == aten.linear.default
        and (len(node.args) < 3 or node.args[2] is None)
    )


def _replace_with_linear(graph: Graph, node: Node, x: Node, param: Node, *, stored_in_out: bool, bias=None) -> None:
    weight = insert_call(graph, node, aten.t.default, (param,)) if stored_in_out else param
    linear = insert_call(graph, node, aten.linear.default, (x, weight), meta_from=node)
    result = linear
    if bias is not None:
        result = insert_call(graph, node, aten.add.Tensor, (linear, bias), meta_from=node)
    node.replace_all_uses_with(result)
    graph.erase_node(node)
