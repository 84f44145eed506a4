"""Small helpers the passes share: recognising parameters and views of them."""

from __future__ import annotations

import networkx as nx
import torch
from torch.fx import Graph, Node

aten = torch.ops.aten

# Ops that swap the two dimensions of a 2-D tensor, with the extra arguments that make
# them a plain transpose (``None``: no extra arguments needed).
TRANSPOSES: dict[object, tuple[tuple[int, ...], ...] | None] = {
    aten.t.default: None,
    aten.numpy_T.default: None,
    aten.permute.default: (([1, 0],),),
    aten.transpose.int: ((0, 1), (1, 0), (-1, -2), (-2, -1), (0, -1), (-1, 0), (1, -2), (-2, 1)),
}


def is_transpose(node: Node) -> bool:
    """Whether ``node`` transposes a 2-D tensor."""
    if node.op != "call_function" or node.target not in TRANSPOSES:
        return False
    allowed = TRANSPOSES[node.target]
    if allowed is None:
        return True
    extra = tuple(list(a) if isinstance(a, (list, tuple)) else a for a in node.args[1:])
    return any(tuple(list(x) if isinstance(x, (list, tuple)) else x for x in a) == extra for a in allowed)


def weight_view(node: Node, params: set[str]) -> tuple[Node, bool] | None:
    """If ``node`` is a 2-D trainable parameter or its transpose: ``(placeholder, transposed)``."""
    transposed = False
    if is_transpose(node):
        node, transposed = node.args[0], True
    if isinstance(node, Node) and node.op == "placeholder" and node.name in params and ndim(node) == 2:
        return node, transposed
    return None


def ndim(node: Node) -> int:
    """Number of dimensions of the tensor ``node`` produces (-1 if unknown)."""
    value = node.meta.get("val") if isinstance(node, Node) else None
    return value.dim() if isinstance(value, torch.Tensor) else -1


def insert_call(graph: Graph, before: Node, target, args: tuple, meta_from: Node | None = None) -> Node:
    """Insert ``target(*args)`` before ``before``, copying shape and module metadata from ``meta_from``."""
    with graph.inserting_before(before):
        node = graph.call_function(target, args)
    if meta_from is not None:
        for key in ("val", "nn_module_stack", "stack_trace"):
            if key in meta_from.meta:
                node.meta[key] = meta_from.meta[key]
    return node


def dataflow(graph: Graph) -> nx.DiGraph:
    """The FX graph as a networkx DiGraph of nodes, with an edge from each input to its consumer."""
    flow = nx.DiGraph()
    flow.add_nodes_from(graph.nodes)
    flow.add_edges_from((arg, node) for node in graph.nodes for arg in node.all_input_nodes)
    return flow


def depends_on(graph: Graph, sources: set[str]) -> set[Node]:
    """Nodes whose value depends on a placeholder named in ``sources`` (those included)."""
    flow = dataflow(graph)
    roots = [n for n in graph.nodes if n.op == "placeholder" and n.name in sources]
    return set(roots).union(*(nx.descendants(flow, r) for r in roots))


def schema_args(node: Node) -> dict[str, object]:
    """The op's arguments by schema name, defaults filled in."""
    values: dict[str, object] = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            values[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            values[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            values[arg.name] = arg.default_value
    return values


def set_schema_arg(node: Node, name: str, value: object) -> None:
    """Set the op argument called ``name`` (positional or keyword) to ``value``."""
    names = [a.name for a in node.target._schema.arguments]
    index = names.index(name)
    if index < len(node.args):
        node.update_arg(index, value)
    else:
        node.update_kwarg(name, value)
