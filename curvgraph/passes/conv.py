"""Convolution pass: one ``"conv"`` block (KFC) per convolution weight.

Patterns are data: :data:`CONV_OPS` maps each ATen convolution op to its spatial rank
(``None``: read it from the weight). The pass reads stride, padding (integers,
``"same"`` or ``"valid"``), dilation and groups from the op's schema arguments, and
groups the ops by weight: a weight applied several times with the same geometry is
one block with several uses. Transposed convolutions, weights with other consumers,
and weights used with different geometries fall back.
"""

from __future__ import annotations

import math
from collections import defaultdict

import sympy
from torch.fx import Node

from ..curvature import conv as conv_math
from ..plan import Block, LayerUse
from ..trace import TracedModel, symbolic_shape
from .blocks import claim_block
from .graph_utils import aten, depends_on, schema_args

CONV_OPS: dict[object, int | None] = {
    aten.conv1d.default: 1,
    aten.conv2d.default: 2,
    aten.conv3d.default: 3,
    aten.conv1d.padding: 1,
    aten.conv2d.padding: 2,
    aten.conv3d.padding: 3,
    aten.convolution.default: None,
}


def find_conv_blocks(traced: TracedModel, sharing: str, claimed: dict[str, str]) -> list[Block]:
    """Convolution blocks of ``traced``; records why rejected parameters fall back in ``claimed``."""
    params = set(traced.params)
    uses: dict[Node, list[tuple[Node, dict]]] = defaultdict(list)
    for node in traced.graph.nodes:
        if node.op != "call_function" or node.target not in CONV_OPS:
            continue
        args = schema_args(node)
        weight = args["weight"]
        if not (isinstance(weight, Node) and weight.name in params):
            continue
        if args.get("transposed"):
            claimed[weight.name] = f"transposed convolution at node '{node.name}' is not supported yet"
            continue
        uses[weight].append((node, _geometry(weight, args)))

    trainable = depends_on(traced.graph, params)
    blocks = []
    for weight, convs in uses.items():
        nodes = [n for n, _ in convs]
        foreign = [u for u in weight.users if u not in nodes or schema_args(u)["weight"] is not weight]
        if foreign:
            claimed.setdefault(weight.name, f"also used by {foreign[0].target} at node '{foreign[0].name}'")
            continue
        geometry = convs[0][1]
        if any(g != geometry for _, g in convs):
            claimed[weight.name] = "applied with different strides/paddings/dilations/groups"
            continue
        bias = _shared_bias(nodes, params)
        shape = tuple(weight.meta["val"].shape)
        groups = geometry["groups"]
        dims = {"in": math.prod(shape[1:]), "out": shape[0] // groups, "groups": groups}
        layer_uses = tuple(
            LayerUse(node=n.name, input=n.args[0].name, input_shape=symbolic_shape(n.args[0]),
                     output_shape=symbolic_shape(n), rows=sympy.Mul(*(d for i, d in enumerate(symbolic_shape(n)) if i != 1)),
                     input_grad=n.args[0] in trainable)
            for n in nodes
        )
        blocks.append(claim_block(traced, claimed, kind="conv", math=conv_math, weight=weight, bias=bias,
                                  uses=layer_uses, dims=dims, sharing=sharing,
                                  layout={**geometry, "weight_shape": shape}))
    return blocks


def _geometry(weight: Node, args: dict) -> dict:
    """Kernel, stride, padding as (before, after) pairs, dilation and groups of one convolution."""
    kernel = tuple(int(k) for k in weight.meta["val"].shape[2:])
    rank = len(kernel)

    def per_dim(value) -> tuple[int, ...]:
        values = [value] if isinstance(value, int) else list(value)
        return tuple(int(v) for v in (values * rank if len(values) == 1 else values))

    stride, dilation = per_dim(args["stride"]), per_dim(args["dilation"])
    padding = args["padding"]
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        pairs = tuple((t // 2, t - t // 2) for t in totals)
    elif padding == "valid":
        pairs = tuple((0, 0) for _ in kernel)
    else:
        pairs = tuple((p, p) for p in per_dim(padding))
    return {"kernel": kernel, "stride": stride, "padding": pairs, "dilation": dilation, "groups": int(args["groups"])}


def _shared_bias(convs: list[Node], params: set[str]) -> Node | None:
    biases = {schema_args(n)["bias"] for n in convs}
    if len(biases) != 1:
        return None
    (bias,) = biases
    if not (isinstance(bias, Node) and bias.name in params):
        return None
    if any(u not in convs or schema_args(u)["bias"] is not bias for u in bias.users):
        return None
    return bias
