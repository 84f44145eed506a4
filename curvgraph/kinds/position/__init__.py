"""The ``position`` block kind: a trainable table added to the token stream (learned positional embeddings).

``h + pos`` or ``h + pos[:, :T]`` with a trainable ``pos`` of shape ``(1, T_max, d)``
(or ``(T_max, d)``) and ``h`` of shape ``(N, T, d)``: the table is an embedding looked
up at the positions ``0..T-1`` of every example, so it gets the embedding's factors
(:mod:`curvgraph.kinds.embedding.factors`): ``A`` the diagonal of position
frequencies (:math:`1/T` for each read position, axis -2 over the ``T_max`` rows) and
``G`` over the features, shared over positions (one ``d x d`` factor from every
position's output vector; a factor per position would cost ``T_max`` inversions).
The table's block matrix is ``pos`` viewed as ``(T_max, d)``.

A class token concatenated in front of the sequence (``cat([cls.expand(N, -1, -1), h], 1)``)
is not matched yet and goes to the fallback.
"""

from __future__ import annotations

from typing import Sequence

import sympy
import torch
from torch.fx import Node

from ...codegen.writer import BlockVars, StepWriter, UseVars
from ...passes.graph_utils import aten, depends_on, ndim
from ...passes.ledger import Claims
from ...plan import Block, Factor
from ...registry import register_block_kind
from ...trace import TracedModel, symbolic_shape
from ..base import BlockKind, layer_use, new_block
from ..dense import factors as dense_math
from ..embedding import factors as embedding_math


class Position(BlockKind):
    """``h + pos[:, :T]``: a diagonal ``A`` of position frequencies (axis -2) and ``G`` over the features (axis -1)."""

    name = "position"
    color = "#dadaeb"

    def label(self, block: Block) -> str:
        return f"positional table {block.dims['positions']} x {block.dims['features']}"

    def find(self, traced: TracedModel, claims: Claims, sharing: str) -> list[Block]:
        return find_position_blocks(self, traced, claims)

    def factors(self, block: Block) -> dict[str, Factor]:
        positions, d = block.dims["positions"], block.dims["features"]
        return {"A": Factor((positions,), axis=-2, diagonal=True), "G": Factor((d, d), axis=-1)}

    def cost(self, block: Block) -> dict[str, sympy.Expr]:
        rows = sympy.Add(*(u.rows for u in block.uses))
        d = block.dims["features"]
        return {"forward_backward": 2 * rows * d, "statistics": 2 * rows * d**2, "backward_per_sample": sympy.Integer(0)}

    def write_batch_factors(self, w: StepWriter, b: BlockVars, dtype: torch.dtype) -> None:
        grads = w.pack(u.grads[0] for u in b.uses)
        output = f"{b.uses[0].grads[0]}[:batch]"
        w.line(f"{b.batch_factors['A']} = "
               f"{w.call(embedding_math.position_frequencies, output, b.block.dims['positions'], dtype)}")
        w.line(f"{b.batch_factors['G']} = {w.call(dense_math.dense_grad_factor, grads, False, 'examples', 'scale', dtype)}")

    def write_example_rows(self, w: StepWriter, b: BlockVars, uses: Sequence[UseVars], dtype: torch.dtype,
                           label: str = "rows") -> dict[str, str]:
        grads = w.pack(u.grads[0] for u in uses)
        rows = {f: b.var(f"{label}_{f}") for f in ("A", "G")}
        call = w.call(embedding_math.position_example_rows, f"{uses[0].grads[0]}[:batch]", grads,
                      b.block.dims["positions"], "batch", dtype)
        w.line(f"{rows['A']}, {rows['G']} = {call}")
        return rows

    def write_matrix(self, w: StepWriter, b: BlockVars, tensors: Sequence[str], dtype: torch.dtype) -> str:
        return f"{tensors[0]}.reshape({b.block.dims['positions']}, {b.block.dims['features']}).to({dtype})"

    def write_split(self, w: StepWriter, b: BlockVars, matrix: str) -> str:
        return w.pack([f"({matrix}).reshape({b.block.layout['shape']})"])


def _read_positions(param: Node) -> Node | None:
    """The ``add`` that ``param`` (or its only ``slice`` from 0 along dim 1, or alias) is added to; ``None`` otherwise."""
    node = param
    if len(node.users) != 1:
        return None
    (user,) = node.users
    if user.target is aten.alias.default and len(user.users) == 1:  # a slice of every row
        node, (user,) = user, user.users
    elif user.target is aten.slice.Tensor:
        dim, start = (list(user.args[1:3]) + [0, 0])[:2] if len(user.args) > 1 else (0, 0)
        step = user.args[4] if len(user.args) > 4 else 1
        if dim != 1 or (start or 0) != 0 or step != 1 or len(user.users) != 1:
            return None
        node, (user,) = user, user.users
    if user.target is not aten.add.Tensor or len(user.args) != 2 or user.kwargs:
        return None
    other = user.args[1] if user.args[0] is node else user.args[0]
    return user if isinstance(other, Node) and ndim(other) == 3 else None


def find_position_blocks(kind: BlockKind, traced: TracedModel, claims: Claims) -> list[Block]:
    """Position blocks: a trainable ``(1, T_max, d)`` table (or ``(T_max, d)``) added to a ``(N, T, d)`` stream."""
    params = set(traced.params)
    trainable = depends_on(traced.graph, params)
    blocks = []
    for node in traced.graph.nodes:
        if node.op != "placeholder" or node.name not in params or claims.is_claimed(node.name):
            continue
        shape = tuple(int(s) for s in node.meta["val"].shape)
        if not (len(shape) == 3 and shape[0] == 1):
            continue
        add = _read_positions(node)
        if add is None:
            continue
        output_shape = symbolic_shape(add)
        use = layer_use([], [add], sympy.Mul(*output_shape[:2]), trainable)
        blocks.append(new_block(traced, kind, (node,), [use], {"positions": shape[1], "features": shape[2]},
                                layout={"shape": shape}))
    return blocks


register_block_kind(Position())
