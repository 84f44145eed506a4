"""The ``position`` block kind: a trainable table added to the token stream (learned positional embeddings).

``h + pos`` or ``h + pos[:, :T]`` with a trainable ``pos`` of shape ``(1, T_max, d)``
(or ``(T_max, d)``) and ``h`` of shape ``(N, T, d)``: the table is an embedding looked
up at the positions ``0..T-1`` of every example, so it gets the embedding's factors
(:mod:`curvgraph.kinds.embedding.factors`): ``A`` the diagonal of position
frequencies (:math:`1/T` for each read position, axis -2 over the ``T_max`` rows) and
``G`` over the features, shared over positions (one ``d x d`` factor from every
position's output vector; a factor per position would cost ``T_max`` inversions).
The table's block matrix is ``pos`` viewed as ``(T_max, d)``.

Class tokens concatenated in front of the sequence, ``cat([cls.expand(N, -1, -1), h], 1)``
with a trainable ``cls`` of shape ``(1, k, d)`` (ViT's class token; ``k > 1`` register
tokens), or ``(d,)`` expanded to ``(N, 1, d)`` (CLIP's), are the same: a table of ``k`` rows read
at ``k`` positions of every example's output ``(N, k + T, d)``, so ``A`` is :math:`1/k` per row
and ``G`` the factor of the output vectors at those positions. The tokens may follow other
tokens of a fixed count in the same concatenation (DeiT's distillation token after the class
token): the layout's ``offset`` is their first position. For ``k = 1`` and the type-2 Fisher
``kron(G, A)`` is the token's exact GGN block. In both forms the statistics read the output
vectors at positions ``[:, offset:offset + rows]`` (every position of an added table, the
tokens' own of a concatenation).
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
        what = "prepended tokens" if block.layout["prepended"] else "positional table"
        return f"{what} {block.dims['positions']} x {block.dims['features']}"

    def find(self, traced: TracedModel, claims: Claims, sharing: str) -> list[Block]:
        return find_position_blocks(self, traced, claims)

    def factors(self, block: Block) -> dict[str, Factor]:
        positions, d = block.dims["positions"], block.dims["features"]
        return {"A": Factor((positions,), axis=-2, diagonal=True), "G": Factor((d, d), axis=-1)}

    def cost(self, block: Block) -> dict[str, sympy.Expr]:
        rows = block.rows
        d = block.dims["features"]
        return {"forward_backward": 2 * rows * d, "statistics": 2 * rows * d**2, "backward_per_sample": sympy.Integer(0)}

    @staticmethod
    def _read(b: BlockVars, uses: Sequence[UseVars]) -> list[str]:
        """The output vectors of each use at the positions the table is read at."""
        start = b.block.layout.get("offset", 0)
        return [f"{u.grads[0]}[:, {start}:{start + b.block.dims['positions']}]" for u in uses]

    def write_batch_factors(self, w: StepWriter, b: BlockVars, dtype: torch.dtype) -> None:
        grads = w.pack(self._read(b, b.uses))
        output = f"{self._read(b, b.uses)[0]}[:batch]"
        w.assign(b.batch_factors["A"], w.call(embedding_math.position_frequencies, output, b.block.dims["positions"], dtype))
        w.assign(b.batch_factors["G"], w.call(dense_math.dense_grad_factor, grads, False, "examples", "scale", dtype))

    def write_example_rows(self, w: StepWriter, b: BlockVars, uses: Sequence[UseVars], dtype: torch.dtype,
                           label: str = "rows") -> dict[str, str]:
        grads = w.pack(self._read(b, uses))
        rows = {f: b.var(f"{label}_{f}") for f in ("A", "G")}
        call = w.call(embedding_math.position_example_rows, f"{self._read(b, uses)[0]}[:batch]", grads,
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


def _prepended(param: Node) -> tuple[Node, int] | None:
    """The ``cat([..., param.expand(N, k, d), ..., h], 1)`` that puts ``param`` in front of a sequence, after tokens
    of a fixed count, and the position its rows start at; ``None`` otherwise."""
    if len(param.users) != 1:
        return None
    (expand,) = param.users
    if expand.target is not aten.expand.default or len(expand.users) != 1 or ndim(expand) != 3:
        return None
    (cat,) = expand.users
    parts = cat.args[0] if cat.target is aten.cat.default else ()
    if sum(a is expand for a in parts) != 1 or parts[-1] is expand:
        return None
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    before = [a.meta["val"].shape[1] for a in parts[:parts.index(expand)]]
    if ndim(cat) != 3 or dim not in (1, -2) or not all(isinstance(k, int) for k in before):
        return None
    return cat, sum(before)


def find_position_blocks(kind: BlockKind, traced: TracedModel, claims: Claims) -> list[Block]:
    """Position blocks: a trainable ``(1, T_max, d)`` table added to a ``(N, T, d)`` stream, or ``(1, k, d)`` (or
    ``(d,)``) tokens concatenated in front of it."""
    params = set(traced.params)
    trainable = depends_on(traced.graph, params)
    blocks = []
    for node in traced.graph.nodes:
        if node.op != "placeholder" or node.name not in params or claims.is_claimed(node.name):
            continue
        shape = tuple(int(s) for s in node.meta["val"].shape)
        table = len(shape) == 3 and shape[0] == 1
        add = _read_positions(node) if table else None
        prepended = _prepended(node) if table or len(shape) == 1 else None
        if add is None and prepended is None:
            continue
        positions, features = (shape[1], shape[2]) if table else (1, shape[0])
        if add is not None:
            output, rows, offset = add, sympy.Mul(*symbolic_shape(add)[:2]), 0
        else:
            (output, offset), rows = prepended, symbolic_shape(prepended[0])[0] * positions
        use = layer_use([], [output], rows, trainable)
        blocks.append(new_block(traced, kind, (node,), [use], {"positions": positions, "features": features},
                                layout={"shape": shape, "prepended": prepended is not None, "offset": offset}))
    return blocks


register_block_kind(Position())
