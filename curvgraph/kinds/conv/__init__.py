"""The ``conv`` block kind: one KFC block (Grosse & Martens 2016) per convolution weight.

Patterns are data: :data:`CONV_OPS` maps each ATen convolution op to its spatial rank
(``None``: read it from the weight). The pass reads stride, padding (integers,
``"same"`` or ``"valid"``), dilation and groups from the op's schema arguments, and
groups the ops by weight: a weight applied several times with the same geometry is
one block with several uses. A transposed convolution (``nn.ConvTranspose*``) is the block of
the direct convolution it equals (:func:`.factors.direct_inputs`): stride 1 over its inputs with
``stride - 1`` zeros inserted between elements, padding :math:`d (k - 1) - p` (plus
``output_padding`` after), and the weight with input and output channels swapped and the kernel
flipped (:func:`.factors.direct_weight`; the layout's ``weight_shape`` is that weight's, its
``inserted`` the zeros' stride). Weights with other consumers, and weights used with different
geometries fall back. The layout also keeps each use's
input shape at the example inputs (``example_inputs``): the statistics choose between
patches and shifted correlations by it (:func:`.factors.shifted_statistics`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

import sympy
import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import optimization_hint

from ...codegen.writer import BlockVars, StepWriter, UseVars
from ...passes.graph_utils import aten, depends_on, schema_args
from ...passes.ledger import Claims
from ...plan import Block, Factor
from ...registry import register_block_kind
from ...trace import TracedModel, symbolic_shape
from ..base import BlockKind, layer_use, new_block, split_blocks, weight_and_bias
from . import factors as conv_math

CONV_OPS: dict[object, int | None] = {
    aten.conv1d.default: 1,
    aten.conv2d.default: 2,
    aten.conv3d.default: 3,
    aten.conv1d.padding: 1,
    aten.conv2d.padding: 2,
    aten.conv3d.padding: 3,
    aten.convolution.default: None,
    aten.conv_transpose1d.default: 1,
    aten.conv_transpose2d.input: 2,
    aten.conv_transpose3d.input: 3,
}
#: The ops of :data:`CONV_OPS` that are transposed convolutions (``aten.convolution`` says so in an argument).
TRANSPOSED_OPS = frozenset({aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input})


class Conv(BlockKind):
    """Convolutions of any spatial rank: per group, ``A`` over input patches (axis -1) and ``G`` (axis -2)."""

    name = "conv"
    color = "#a1d99b"
    splits_factors = True
    subsamples_positions = True

    def label(self, block: Block) -> str:
        shape, layout = block.layout["weight_shape"], block.layout
        kernel = "x".join(map(str, layout["kernel"]))
        groups = f", groups={layout['groups']}" if layout["groups"] > 1 else ""
        bias = " + bias" if block.bias else ""
        shifts = ", A from shifts" if conv_math.shifted_statistics(block) else ""  # no patch matrix
        kind = "transposed conv" if layout.get("inserted") else "conv"
        return f"{kind} {shape[1] * layout['groups']} -> {shape[0]}, kernel {kernel}{groups}{bias}{shifts}"

    def find(self, traced: TracedModel, claims: Claims, sharing: str) -> list[Block]:
        return find_conv_blocks(self, traced, claims, sharing)

    def factors(self, block: Block) -> dict[str, Factor]:
        d_in, d_out, groups = block.dims["in"] + int(block.bias), block.dims["out"], block.dims["groups"]
        lead = () if groups == 1 else (groups,)
        return {"A": Factor(lead + (d_in, d_in), axis=-1), "G": Factor(lead + (d_out, d_out), axis=-2)}

    def cost(self, block: Block) -> dict[str, sympy.Expr]:
        return conv_math.cost(block)

    def write_batch_factors(self, w: StepWriter, b: BlockVars, dtype: torch.dtype) -> None:
        layout, reduce = b.block.layout, b.block.sharing == "reduce"
        acts, grads = _direct(w, b, w.pack(u.inputs[0] for u in b.uses)), w.pack(u.grads[0] for u in b.uses)
        geometry = [layout[k] for k in ("kernel", "stride", "padding", "dilation", "groups")]
        blocks, every = split_blocks(b.block), layout.get("stats_every", 1)
        if conv_math.shifted_statistics(b.block):
            subsample = (1, 1, True)  # trailing (blocks, every, shifted) arguments
        else:
            subsample = (*(blocks["A"] or (1,)), every) if every > 1 else blocks["A"]
        a = w.call(conv_math.conv_input_factor, acts, *geometry, b.block.bias, reduce, "batch", dtype, *subsample)
        g = w.call(conv_math.conv_grad_factor, grads, layout["groups"], reduce, "examples", "scale", dtype,
                   *blocks["G"])
        w.assign(b.batch_factors["A"], a)
        w.assign(b.batch_factors["G"], g)

    def write_example_rows(self, w: StepWriter, b: BlockVars, uses: Sequence[UseVars], dtype: torch.dtype,
                           label: str = "rows") -> dict[str, str]:
        acts, grads = _direct(w, b, w.pack(u.inputs[0] for u in uses)), w.pack(u.grads[0] for u in uses)
        geometry = [b.block.layout[k] for k in ("kernel", "stride", "padding", "dilation", "groups")]
        rows = {f: b.var(f"{label}_{f}") for f in ("G", "A")}
        call = w.call(conv_math.conv_example_rows, acts, grads, *geometry, b.block.bias, "batch", dtype)
        w.line(f"{rows['G']}, {rows['A']} = {call}")
        return rows

    def write_matrix(self, w: StepWriter, b: BlockVars, tensors: Sequence[str], dtype: torch.dtype) -> str:
        weight, bias = weight_and_bias(b, tensors)
        groups = b.block.layout["groups"]
        if b.block.layout.get("inserted"):
            weight = w.call(conv_math.direct_weight, weight, groups)
        return w.call(conv_math.conv_gradient_matrix, weight, bias, groups, dtype)

    def write_split(self, w: StepWriter, b: BlockVars, matrix: str) -> str:
        parts = w.call(conv_math.conv_split, matrix, b.block.bias, b.block.layout["weight_shape"])
        if b.block.layout.get("inserted"):
            parts = w.call(conv_math.transposed_parts, parts, b.block.layout["groups"])
        return parts


def _direct(w: StepWriter, b: BlockVars, inputs: str) -> str:
    """The expression for a block's layer inputs ``inputs`` as its direct convolution takes them: zero-inserted
    for a transposed convolution (:func:`.factors.direct_inputs`), else as they are."""
    inserted = b.block.layout.get("inserted")
    return w.call(conv_math.direct_inputs, inputs, inserted) if inserted else inputs


def find_conv_blocks(kind: BlockKind, traced: TracedModel, claims: Claims, sharing: str) -> list[Block]:
    """Convolution blocks of ``traced``; records why rejected parameters fall back in ``claims``."""
    params = set(traced.params)
    uses: dict[Node, list[tuple[Node, dict]]] = defaultdict(list)
    for node in traced.graph.nodes:
        if node.op != "call_function" or node.target not in CONV_OPS:
            continue
        args = schema_args(node)
        weight = args["weight"]
        if not (isinstance(weight, Node) and weight.name in params) or claims.is_claimed(weight.name):
            continue
        transposed = node.target in TRANSPOSED_OPS or bool(args.get("transposed"))
        geometry = _transposed_geometry(weight, args) if transposed else _geometry(weight, args)
        if any(lo < 0 or hi < 0 for lo, hi in geometry["padding"]):
            claims.reject(weight.name, f"transposed convolution at node '{node.name}' with padding larger than "
                                       "dilation * (kernel - 1)")
            continue
        uses[weight].append((node, geometry))

    trainable = depends_on(traced.graph, params)
    blocks = []
    for weight, convs in uses.items():
        nodes = [n for n, _ in convs]
        foreign = [u for u in weight.users if u not in nodes or schema_args(u)["weight"] is not weight]
        if foreign:
            claims.reject(weight.name, f"also used by {foreign[0].target} at node '{foreign[0].name}'")
            continue
        geometry = convs[0][1]
        if any(g != geometry for _, g in convs):
            claims.reject(weight.name, "applied with different strides/paddings/dilations/groups")
            continue
        bias = _shared_bias(nodes, params)
        groups = geometry["groups"]
        shape = tuple(weight.meta["val"].shape)
        inserted = geometry.get("inserted")
        if inserted:  # the direct convolution's weight: (C_out, C_in/g, k...)
            shape = (shape[1] * groups, shape[0] // groups, *shape[2:])
        dims = {"in": math.prod(shape[1:]), "out": shape[0] // groups, "groups": groups}
        layer_uses = [layer_use([n.args[0]], [n], sympy.Mul(*(d for i, d in enumerate(symbolic_shape(n)) if i != 1)),
                                trainable) for n in nodes]
        examples = tuple(tuple(int(optimization_hint(d)) for d in n.args[0].meta["val"].shape) for n in nodes)
        if inserted:  # the direct convolution's inputs, zeros inserted
            examples = tuple(e[:2] + tuple((n - 1) * st + 1 for n, st in zip(e[2:], inserted)) for e in examples)
        blocks.append(new_block(traced, kind, (weight,) + ((bias,) if bias is not None else ()), layer_uses, dims,
                                bias=bias is not None, sharing=sharing,
                                layout={**geometry, "weight_shape": shape, "example_inputs": examples}))
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


def _transposed_geometry(weight: Node, args: dict) -> dict:
    """The geometry of the direct convolution that equals a transposed one (:func:`.factors.direct_inputs`):
    stride 1, padding ``(d (k - 1) - p, d (k - 1) - p + output_padding)``, the same dilation and groups, and
    ``inserted``, the stride of the zeros inserted into its inputs."""
    direct = _geometry(weight, {**args, "padding": args.get("padding", 0)})
    rank = len(direct["kernel"])
    output_padding = args.get("output_padding", 0)
    extra = [output_padding] * rank if isinstance(output_padding, int) else list(output_padding)
    extra = extra * rank if len(extra) == 1 else extra
    padding = tuple((d * (k - 1) - lo, d * (k - 1) - hi + int(e))
                    for (lo, hi), k, d, e in zip(direct["padding"], direct["kernel"], direct["dilation"], extra))
    return {**direct, "stride": (1,) * rank, "padding": padding, "inserted": direct["stride"]}


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


register_block_kind(Conv())
