"""The ``dense`` block kind: one K-FAC block per weight that only ``aten.linear`` uses.

After normalization (:mod:`.forms`) a dense layer is ``aten.linear(x, W', b)``
with ``W'`` a trainable 2-D parameter or its transpose. The pass groups those nodes by
parameter. A weight applied at several places (a shared/tied weight, or one linear
over several positions) is one block with one :class:`~curvgraph.plan.LayerUse` per
application; its statistics sum over the uses (see :mod:`.factors`).

A weight with any other consumer (an embedding lookup, a regularizer, ...) is left to
the fallback; so is a bias that is not the bias of every use of its weight. A layer over
flat positions that do not hold the batch size (the rows of ``nn.EmbeddingBag``'s
lookup over ``offsets``, before the model reduces them into bags) cannot group its
positions by example: its block has no example rows and shares by ``expand``
(:func:`curvgraph.kinds.base.positions_per_example`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import sympy
import torch
from torch.fx import Graph, Node

from ...codegen.writer import BlockVars, StepWriter, UseVars
from ...passes.graph_utils import aten, depends_on, is_transpose, ndim, weight_view
from ...passes.ledger import Claims
from ...plan import Block, Factor
from ...registry import register_block_kind
from ...trace import TracedModel, symbolic_shape
from ..base import BlockKind, layer_use, new_block, positions_per_example, split_blocks, weight_and_bias
from . import factors as dense_math
from .forms import LINEAR_PASSES


def ones_column_is_smaller(block: Block) -> bool:
    """Whether ``block``'s full input factor is formed from its rows with their ones column
    (:func:`~curvgraph.curvature.kronecker.input_moment`):
    a block with a bias whose rows at the example inputs (:attr:`~curvgraph.plan.Block.example_rows`) are at most
    its input features, so that the rows' copy is no larger than the ``(d, d)`` moment the bordered form holds
    beside the factor. MLP 784-512-512-256-10 at batch 512 (``benchmarks/peak_memory.py``, the first three layers):
    the defaults' step peaked at 38.4 MiB with the bordered form and 34.8 MiB with the ones column."""
    rows = block.example_rows
    return block.bias and block.sharing != "reduce" and rows is not None and rows <= block.dims["in"]


class Dense(BlockKind):
    """``y = x W^T + b`` in every spelling: factors ``A`` (inputs, axis -1) and ``G`` (output gradients, axis -2)."""

    name = "dense"
    rewrites = LINEAR_PASSES
    splits_factors = True
    cheap_example_rows = True
    color = "#9ecae1"

    def label(self, block: Block) -> str:
        bias = " + bias" if block.bias else ""
        return f"dense {block.dims['in']} -> {block.dims['out']}{bias}"

    def find(self, traced: TracedModel, claims: Claims, sharing: str) -> list[Block]:
        return find_dense_blocks(self, traced, claims, sharing)

    def factors(self, block: Block) -> dict[str, Factor]:
        d_in, d_out = block.dims["in"] + int(block.bias), block.dims["out"]
        return {"A": Factor((d_in, d_in), axis=-1), "G": Factor((d_out, d_out), axis=-2)}

    def cost(self, block: Block) -> dict[str, sympy.Expr]:
        return dense_math.cost(block)

    def write_batch_factors(self, w: StepWriter, b: BlockVars, dtype: torch.dtype) -> None:
        reduce = b.block.sharing == "reduce"
        acts, grads = w.pack(u.inputs[0] for u in b.uses), w.pack(u.grads[0] for u in b.uses)
        blocks = split_blocks(b.block)
        ones = (1, True) if not blocks["A"] and ones_column_is_smaller(b.block) else ()  # blocks=1, ones_column
        w.assign(b.batch_factors["A"],
                 w.call(dense_math.dense_input_factor, acts, b.block.bias, reduce, "batch", dtype, *blocks["A"], *ones))
        w.assign(b.batch_factors["G"],
                 w.call(dense_math.dense_grad_factor, grads, reduce, "examples", "scale", dtype, *blocks["G"]))

    def write_example_rows(self, w: StepWriter, b: BlockVars, uses: Sequence[UseVars], dtype: torch.dtype,
                           label: str = "rows") -> dict[str, str]:
        acts, grads = w.pack(u.inputs[0] for u in uses), w.pack(u.grads[0] for u in uses)
        rows = {f: b.var(f"{label}_{f}") for f in ("G", "A")}
        w.line(f"{rows['G']}, {rows['A']} = {w.call(dense_math.dense_example_rows, acts, grads, b.block.bias, 'batch', dtype)}")
        return rows

    def write_matrix(self, w: StepWriter, b: BlockVars, tensors: Sequence[str], dtype: torch.dtype) -> str:
        return w.call(dense_math.dense_gradient_matrix, *weight_and_bias(b, tensors), b.block.layout["transposed"], dtype)

    def write_split(self, w: StepWriter, b: BlockVars, matrix: str) -> str:
        return w.call(dense_math.dense_split, matrix, b.block.bias, b.block.layout["transposed"])


def find_dense_blocks(kind: BlockKind, traced: TracedModel, claims: Claims, sharing: str) -> list[Block]:
    """Dense blocks of ``traced``; records why rejected parameters fall back in ``claims``."""
    graph: Graph = traced.graph
    params = set(traced.params)
    uses: dict[Node, list[Node]] = defaultdict(list)
    for node in graph.nodes:
        if node.op == "call_function" and node.target == aten.linear.default and ndim(node.args[0]) >= 1:
            view = weight_view(node.args[1], params)
            if view is not None and not claims.is_claimed(view[0].name):
                uses[view[0]].append(node)

    trainable = depends_on(graph, params)
    blocks = []
    for weight, linears in uses.items():
        foreign = _foreign_users(weight, linears)
        if foreign:
            claims.reject(weight.name, f"also used by {foreign[0].target} at node '{foreign[0].name}'; no pass matches that use")
            continue
        if any(ndim(lin.args[0]) < 2 for lin in linears):
            claims.reject(weight.name, "a use has an input without a batch dimension")
            continue
        bias = _shared_bias(linears, params)
        transposed = is_transpose(linears[0].args[1])
        if any(is_transpose(lin.args[1]) != transposed for lin in linears):
            claims.reject(weight.name, "used both as W and as W.T; no single layout")
            continue
        out_features, in_features = weight.meta["val"].shape[::-1] if transposed else weight.meta["val"].shape
        layer_uses = [layer_use([lin.args[0]], [lin], sympy.Mul(*symbolic_shape(lin.args[0])[:-1]), trainable)
                      for lin in linears]
        per_example = positions_per_example(traced, layer_uses)
        blocks.append(new_block(traced, kind, (weight,) + ((bias,) if bias is not None else ()), layer_uses,
                                {"in": int(in_features), "out": int(out_features)}, bias=bias is not None,
                                sharing=sharing if per_example else "expand", layout={"transposed": transposed},
                                per_example=per_example))
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


register_block_kind(Dense())
