"""The ``embedding`` block kind: one block per weight that only ``aten.embedding`` reads.

``nn.Embedding`` and ``F.embedding`` export to ``aten.embedding(weight, indices,
padding_idx, ...)``. The pass groups those nodes by weight; a weight looked up at
several places is one block with one use per lookup; a 2-D parameter indexed along dim 0
by one integer tensor, ``W[i]``, is such a lookup too (:func:`index_as_embedding`). A weight with any other consumer
(a tied output head, a regularizer) is left to later passes or the fallback; so is a
weight looked up with different ``padding_idx``. ``nn.EmbeddingBag`` is captured as such a
lookup and a reduction (:mod:`.bag`); over flat indices with ``offsets`` the lookup's positions
have no batch dim, and the block has no example rows (:attr:`curvgraph.plan.Block.per_example`).
Factors: :mod:`.factors`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import sympy
import torch
from torch.fx import Graph, Node

from ...codegen.writer import BlockVars, StepWriter, UseVars
from ...passes.graph_utils import aten, depends_on, insert_call, schema_args
from ...passes.ledger import Claims
from ...plan import Block, Factor
from ...registry import register_block_kind
from ...trace import TracedModel, symbolic_shape
from ..base import BlockKind, layer_use, new_block, positions_per_example
from ..dense import factors as dense_math
from . import factors as embedding_math
from .bag import bag_form


def index_as_embedding(graph: Graph, params: set[str]) -> int:
    """``W[i]`` -> ``aten.embedding(W, i)`` for a 2-D parameter ``W`` indexed along dim 0 by one integer tensor ``i``:
    the same lookup, spelled as the embedding pass matches it (e.g. Swin's relative position bias,
    ``table[index.view(-1)]``). The generated step spells it as indexing again
    (:func:`curvgraph.passes.forms.embedding_as_index`). Returns the number of rewritten nodes."""
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.index.Tensor:
            continue
        weight, indices = node.args[0], node.args[1]
        if not (isinstance(weight, Node) and weight.name in params and weight.meta["val"].dim() == 2
                and len(indices) == 1 and isinstance(indices[0], Node)
                and indices[0].meta["val"].dtype in (torch.int64, torch.int32)):
            continue
        lookup = insert_call(graph, node, aten.embedding.default, (weight, indices[0]), meta_from=node)
        node.replace_all_uses_with(lookup)
        graph.erase_node(node)
        count += 1
    return count


class Embedding(BlockKind):
    """``y = E[i]``: a diagonal ``A`` of token frequencies (axis -2) and ``G`` over the features (axis -1)."""

    name = "embedding"
    color = "#bcbddc"
    rewrites = (index_as_embedding,)

    def label(self, block: Block) -> str:
        return f"embedding {block.dims['vocab']} tokens x {block.dims['features']}"

    def substitute(self, module: torch.nn.Module) -> torch.nn.Module | None:
        return bag_form(module)

    def find(self, traced: TracedModel, claims: Claims, sharing: str) -> list[Block]:
        return find_embedding_blocks(self, traced, claims)

    def factors(self, block: Block) -> dict[str, Factor]:
        vocab, d = block.dims["vocab"], block.dims["features"]
        return {"A": Factor((vocab,), axis=-2, diagonal=True), "G": Factor((d, d), axis=-1)}

    def cost(self, block: Block) -> dict[str, sympy.Expr]:
        return embedding_math.cost(block)

    def write_batch_factors(self, w: StepWriter, b: BlockVars, dtype: torch.dtype) -> None:
        indices, grads = w.pack(u.inputs[0] for u in b.uses), w.pack(u.grads[0] for u in b.uses)
        w.assign(b.batch_factors["A"], w.call(embedding_math.token_frequencies, indices, b.block.dims["vocab"], dtype))
        w.assign(b.batch_factors["G"], w.call(dense_math.dense_grad_factor, grads, False, "examples", "scale", dtype))

    def write_example_rows(self, w: StepWriter, b: BlockVars, uses: Sequence[UseVars], dtype: torch.dtype,
                           label: str = "rows") -> dict[str, str]:
        indices, grads = w.pack(u.inputs[0] for u in uses), w.pack(u.grads[0] for u in uses)
        rows = {f: b.var(f"{label}_{f}") for f in ("A", "G")}
        call = w.call(embedding_math.embedding_example_rows, indices, grads, b.block.dims["vocab"], "batch", dtype)
        w.line(f"{rows['A']}, {rows['G']} = {call}")
        return rows

    def write_matrix(self, w: StepWriter, b: BlockVars, tensors: Sequence[str], dtype: torch.dtype) -> str:
        return f"{tensors[0]}.to({dtype})"

    def write_decayed(self, w: StepWriter, b: BlockVars, matrix: str) -> str:
        return w.call(embedding_math.without_row, matrix, b.block.layout["padding_idx"])

    def write_split(self, w: StepWriter, b: BlockVars, matrix: str) -> str:
        return w.pack([matrix])


def find_embedding_blocks(kind: BlockKind, traced: TracedModel, claims: Claims) -> list[Block]:
    """Embedding blocks of ``traced``; records why rejected weights fall back in ``claims``."""
    params = set(traced.params)
    lookups: dict[Node, list[Node]] = defaultdict(list)
    for node in traced.graph.nodes:
        if node.op == "call_function" and node.target is aten.embedding.default:
            weight = node.args[0]
            if isinstance(weight, Node) and weight.name in params and not claims.is_claimed(weight.name):
                lookups[weight].append(node)

    trainable = depends_on(traced.graph, params)
    blocks = []
    for weight, nodes in lookups.items():
        foreign = [u for u in weight.users if u not in nodes or u.args[0] is not weight]
        if foreign:
            claims.reject(weight.name, f"also used by {foreign[0].target} at node '{foreign[0].name}' (a tied weight?)")
            continue
        padding = {int(schema_args(n)["padding_idx"]) for n in nodes}
        if len(padding) != 1:
            claims.reject(weight.name, "looked up with different padding_idx values")
            continue
        vocab, features = (int(s) for s in weight.meta["val"].shape)
        uses = [layer_use([n.args[1]], [n], sympy.Mul(*symbolic_shape(n.args[1])), trainable) for n in nodes]
        padding_idx = padding.pop()
        blocks.append(new_block(traced, kind, (weight,), uses, {"vocab": vocab, "features": features},
                                layout={"padding_idx": padding_idx % vocab if padding_idx >= 0 else -1},
                                per_example=positions_per_example(traced, uses)))
    return blocks


register_block_kind(Embedding())
