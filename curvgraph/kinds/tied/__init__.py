"""The ``tied`` block kind: one weight that is both an embedding table and the output head.

Matches a trainable ``(V, d)`` weight whose only consumers are ``aten.embedding``
lookups (the weight as table) and ``aten.linear`` nodes (the weight as ``(V, d)``
weight: ``z = h E^T``), as in ``self.head.weight = self.emb.weight`` or
``h @ self.emb.weight.T``. The block accumulates every use; its factors are the
nearest single Kronecker product to the uses' sum (:mod:`.factors`). A bias of the
head is not part of the block: it gets a block of its own, output side only
(:mod:`curvgraph.kinds.bias`). A ``padding_idx`` row gets no
gradient from the lookups but does from the head (its logit), so unlike a plain
embedding's it is trained like every other row.
"""

from __future__ import annotations

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
from . import factors as tied_math


class Tied(BlockKind):
    """Tied embedding / head ``E (V, d)``: a diagonal token-side factor ``R`` (axis -2) and ``F`` over the features."""

    name = "tied"
    color = "#9e9ac8"

    def label(self, block: Block) -> str:
        return f"tied embedding/head {block.dims['vocab']} x {block.dims['features']}"

    def find(self, traced: TracedModel, claims: Claims, sharing: str) -> list[Block]:
        return find_tied_blocks(self, traced, claims)

    def factors(self, block: Block) -> dict[str, Factor]:
        vocab, d = block.dims["vocab"], block.dims["features"]
        return {"R": Factor((vocab,), axis=-2, diagonal=True), "F": Factor((d, d), axis=-1)}

    def cost(self, block: Block) -> dict[str, sympy.Expr]:
        return tied_math.cost(block)

    def _parts(self, w: StepWriter, b: BlockVars, uses: Sequence[UseVars]) -> list[str]:
        n = b.block.layout["lookups"]
        lookups, heads = uses[:n], uses[n:]
        return [w.pack(u.inputs[0] for u in lookups), w.pack(u.grads[0] for u in lookups),
                w.pack(u.inputs[0] for u in heads), w.pack(u.grads[0] for u in heads)]

    def write_batch_factors(self, w: StepWriter, b: BlockVars, dtype: torch.dtype) -> None:
        call = w.call(tied_math.tied_factors, *self._parts(w, b, b.uses), b.block.dims["vocab"], "batch", "examples",
                      "scale", dtype)
        w.assign(f"{b.batch_factors['R']}, {b.batch_factors['F']}", call)

    def write_example_rows(self, w: StepWriter, b: BlockVars, uses: Sequence[UseVars], dtype: torch.dtype,
                           label: str = "rows") -> dict[str, str]:
        rows = {f: b.var(f"{label}_{f}") for f in ("R", "F")}
        call = w.call(tied_math.tied_example_rows, *self._parts(w, b, uses), b.block.dims["vocab"], "batch", dtype)
        w.line(f"{rows['R']}, {rows['F']} = {call}")
        return rows

    def write_matrix(self, w: StepWriter, b: BlockVars, tensors: Sequence[str], dtype: torch.dtype) -> str:
        return f"{tensors[0]}.to({dtype})"

    def write_split(self, w: StepWriter, b: BlockVars, matrix: str) -> str:
        return w.pack([matrix])


def find_tied_blocks(kind: BlockKind, traced: TracedModel, claims: Claims) -> list[Block]:
    """Tied blocks: weights read only by embedding lookups and by linear layers as their ``(V, d)`` weight."""
    params = set(traced.params)
    trainable = depends_on(traced.graph, params)
    blocks = []
    for weight in traced.graph.nodes:
        if weight.op != "placeholder" or weight.name not in params or claims.is_claimed(weight.name):
            continue
        lookups = [u for u in weight.users if u.target is aten.embedding.default and u.args[0] is weight
                   and weight not in u.args[1:]]
        heads = [u for u in weight.users if u.target is aten.linear.default and u.args[1] is weight
                 and weight not in u.args[:1] + u.args[2:]]
        if not lookups or not heads or len(lookups) + len(heads) != len(weight.users):
            continue
        vocab, features = (int(s) for s in weight.meta["val"].shape)
        uses = ([layer_use([n.args[1]], [n], sympy.Mul(*symbolic_shape(n.args[1])), trainable) for n in lookups]
                + [layer_use([n.args[0]], [n], sympy.Mul(*symbolic_shape(n.args[0])[:-1]), trainable) for n in heads])
        blocks.append(new_block(traced, kind, (weight,), uses, {"vocab": vocab, "features": features},
                                layout={"lookups": len(lookups)}))
    return blocks


register_block_kind(Tied())
