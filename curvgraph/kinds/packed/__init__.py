"""The ``packed`` block kind: a weight (and/or bias) split by rows between linear layers with different inputs.

Matches ``split``/``split_with_sizes`` along dim 0 of a trainable parameter whose pieces
are each the weight (or each the bias) of ``aten.linear`` nodes, as
``nn.MultiheadAttention`` does for cross-attention (``[W_q; W_kv]`` applied to the
target and to the memory) and, for a bias alone, with ``kdim``/``vdim``. A packed weight
takes the packed bias split at the same rows with it; a packed bias whose weights are
separate parameters is a block of its own (those weights are dense blocks without
bias). Factors: :mod:`.factors`.
"""

from __future__ import annotations

import math
import operator
from typing import Sequence

import sympy
import torch
from torch.fx import Node

from ...codegen.writer import BlockVars, StepWriter, UseVars
from ...passes.graph_utils import aten, depends_on
from ...passes.ledger import Claims
from ...plan import Block, Factor
from ...registry import register_block_kind
from ...trace import TracedModel, symbolic_shape
from ..base import BlockKind, layer_use, new_block
from . import factors as packed_math

#: Ops that split a tensor into row blocks: ``op(tensor, sizes, dim=0)``.
ROW_SPLITS = (aten.split.Tensor, aten.split_with_sizes.default)


class Packed(BlockKind):
    """Row blocks of one weight applied to different inputs: per member ``A`` (axis -1) and ``G`` (axis -2)."""

    name = "packed"
    color = "#c6dbef"

    def label(self, block: Block) -> str:
        what = "weight" if block.layout["weight"] else "bias"
        return f"packed {what}: {sum(block.layout['members'])} members of {block.dims['chunk']} rows"

    def find(self, traced: TracedModel, claims: Claims, sharing: str) -> list[Block]:
        return find_packed_blocks(self, traced, claims, sharing)

    def factors(self, block: Block) -> dict[str, Factor]:
        members, c, d = sum(block.layout["members"]), block.dims["chunk"], block.dims["in"] + int(block.bias)
        return {"A": Factor((members, d, d), axis=-1), "G": Factor((members, c, c), axis=-2)}

    def cost(self, block: Block) -> dict[str, sympy.Expr]:
        return packed_math.cost(block)

    def _inputs(self, w: StepWriter, b: BlockVars, uses: Sequence[UseVars]) -> str:
        return w.pack(u.inputs[0] for u in uses) if b.block.layout["weight"] else "()"

    def write_batch_factors(self, w: StepWriter, b: BlockVars, dtype: torch.dtype) -> None:
        members, reduce = b.block.layout["members"], b.block.sharing == "reduce"
        grads = w.pack(u.grads[0] for u in b.uses)
        call = w.call(packed_math.packed_input_factor, self._inputs(w, b, b.uses), members, b.block.bias, reduce, "batch", dtype,
                      b.uses[0].grads[0])
        w.assign(b.batch_factors["A"], call)
        w.assign(b.batch_factors["G"], w.call(packed_math.packed_grad_factor, grads, members, reduce, "examples", "scale", dtype))

    def write_example_rows(self, w: StepWriter, b: BlockVars, uses: Sequence[UseVars], dtype: torch.dtype,
                           label: str = "rows") -> dict[str, str]:
        rows = {f: b.var(f"{label}_{f}") for f in ("G", "A")}
        call = w.call(packed_math.packed_example_rows, self._inputs(w, b, uses), w.pack(u.grads[0] for u in uses),
                      b.block.layout["members"], b.block.bias, "batch", dtype)
        w.line(f"{rows['G']}, {rows['A']} = {call}")
        return rows

    def write_matrix(self, w: StepWriter, b: BlockVars, tensors: Sequence[str], dtype: torch.dtype) -> str:
        weight = tensors[0] if b.block.layout["weight"] else None
        bias = tensors[-1] if b.block.bias else None
        return w.call(packed_math.packed_matrix, weight, bias, sum(b.block.layout["members"]), dtype)

    def write_split(self, w: StepWriter, b: BlockVars, matrix: str) -> str:
        return w.call(packed_math.packed_split, matrix, b.block.layout["weight"], b.block.bias)


def _pieces(param: Node) -> list[Node] | None:
    """The row pieces of ``param`` (the ``getitem``s of its only user, a row split), in row order; else ``None``."""
    if len(param.users) != 1:
        return None
    (split,) = param.users
    if split.target not in ROW_SPLITS or (split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)) != 0:
        return None
    items = sorted(split.users, key=lambda n: n.args[1])
    if any(n.target is not operator.getitem for n in items) or [n.args[1] for n in items] != list(range(len(items))):
        return None
    return items


def _linears(pieces: list[Node], role: int) -> list[Node] | None:
    """The linear node each piece is argument ``role`` of (1: weight, 2: bias), if that is its only use."""
    found = []
    for piece in pieces:
        users = list(piece.users)
        if len(users) != 1 or users[0].target is not aten.linear.default or len(users[0].args) <= role:
            return None
        if users[0].args[role] is not piece or sum(a is piece for a in users[0].args) != 1:
            return None
        found.append(users[0])
    return found


def find_packed_blocks(kind: BlockKind, traced: TracedModel, claims: Claims, sharing: str) -> list[Block]:
    """Packed blocks: packed weights (with the bias packed at the same rows) first, then packed biases alone."""
    params = {n.name: n for n in traced.graph.nodes if n.op == "placeholder" and n.name in traced.params}
    trainable = depends_on(traced.graph, set(params))
    blocks = []
    for role in (1, 2):  # weights first: a packed bias goes with its packed weight if there is one
        for node in params.values():
            if claims.is_claimed(node.name) or any(node.name in b.placeholders for b in blocks):
                continue
            pieces = _pieces(node)
            linears = _linears(pieces, role) if pieces else None
            if linears is None:
                continue
            rows = [int(p.meta["val"].shape[0]) for p in pieces]
            chunk = math.gcd(*rows)
            bias = None
            if role == 1:
                biases = [lin.args[2] if len(lin.args) > 2 else None for lin in linears]
                bias_param = biases[0].args[0].args[0] if isinstance(biases[0], Node) and biases[0].target is operator.getitem else None
                if (bias_param is not None and bias_param.name in params and not claims.is_claimed(bias_param.name)
                        and _pieces(bias_param) == biases):
                    bias = bias_param
            d_in = int(node.meta["val"].shape[1]) if role == 1 else 0
            uses = [layer_use([lin.args[0]] if role == 1 else [], [lin], sympy.Mul(*symbolic_shape(lin.args[0])[:-1]),
                              trainable) for lin in linears]
            placeholders = (node,) + ((bias,) if bias is not None else ())
            blocks.append(new_block(traced, kind, placeholders, uses, {"in": d_in, "chunk": chunk},
                                    bias=role == 2 or bias is not None, sharing=sharing,
                                    layout={"members": tuple(r // chunk for r in rows), "weight": role == 1}))
    return blocks


register_block_kind(Packed())
