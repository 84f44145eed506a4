r"""The ``bias`` block kind: a trainable bias whose layer's weight is in no block with it.

Matches a trainable parameter whose only consumers are the ``bias`` argument of
``aten.linear`` or convolution nodes (:data:`~curvgraph.kinds.conv.CONV_OPS`) whose weight
is not in a block with it: a frozen weight (``requires_grad=False``), a constant, or a
weight another pass claimed without the bias (a tied weight whose head has its own bias,
a shared weight whose uses have different biases). Such a bias is an affine shift of the
layer's outputs, so its curvature needs the output side only: one factor ``G`` over the
output channels, acting on the bias itself (the block matrix is the bias vector,
``(out,)``; the factor is on its axis ``-1``).

``G`` is the dense/conv block's ``G`` (:func:`curvgraph.kinds.dense.factors.dense_grad_factor`)
over the layer's output vectors (channels last), summed over every use of the bias:

* **expand**: :math:`G = c \sum_r g_r g_r^\top` over all rows (examples times positions, every use);
* **reduce**: :math:`G = c \sum_n g_n g_n^\top` with :math:`g_n` the sum over the example's positions.

It is the bias block of the dense/conv block's ``kron(G, A)`` (whose ones column gives the
bias corner :math:`A_{\text{bias}} = 1`). For a bias applied once per example (inputs
``(N, in)``) or with ``kfac_approx="reduce"`` at a single use, :math:`g_n = J_{b,n}^\top s`
and ``G`` with the type-2 Fisher is exactly the GGN of the batch-mean loss w.r.t. the bias.
"""

from __future__ import annotations

from typing import Sequence

import sympy
import torch
from torch import Tensor
from torch.fx import Node

from ...codegen.writer import BlockVars, StepWriter, UseVars
from ...passes.graph_utils import aten, depends_on, schema_args
from ...passes.ledger import Claims
from ...plan import Block, Factor
from ...registry import register_block_kind
from ...trace import TracedModel, symbolic_shape
from ..base import BlockKind, layer_use, new_block
from ..conv import CONV_OPS
from ..dense.factors import dense_grad_factor

#: The ops whose ``bias`` argument the kind matches, with the dim of their output that holds the channels.
BIAS_OPS: dict[object, int] = {aten.linear.default: -1, **{op: 1 for op in CONV_OPS}}


def channels_last(grads: tuple[Tensor, ...], channel_dim: int) -> tuple[Tensor, ...]:
    """Each output vector tensor with its channel dim moved last."""
    return tuple(g.movedim(channel_dim, -1) for g in grads)


def bias_factor(grads: tuple[Tensor, ...], channel_dim: int, reduce: bool, examples: int, scale: Tensor,
                dtype: torch.dtype) -> Tensor:
    r"""``G`` of one batch, ``(out, out)``: :func:`~curvgraph.kinds.dense.factors.dense_grad_factor` of the output
    vectors of every use, ``(S*N, ..., out)`` once the channel dim ``channel_dim`` is moved last."""
    return dense_grad_factor(channels_last(grads, channel_dim), reduce, examples, scale, dtype)


def bias_example_rows(grads: tuple[Tensor, ...], channel_dim: int, examples: int, dtype: torch.dtype) -> Tensor:
    r"""The example rows ``(S*N, P, out)`` (one factor): the output vectors of every use and position; their sum over
    positions is example ``n``'s bias gradient, :math:`M_n = \sum_p g_{n,p}`."""
    rows = [g.to(dtype).reshape(examples, -1, g.shape[-1]) for g in channels_last(grads, channel_dim)]
    return torch.cat(rows, 1)


class Bias(BlockKind):
    """A bias without its weight (frozen, constant or in another block): one factor ``G`` (axis -1) over the outputs."""

    name = "bias"
    color = "#c7e9c0"

    def label(self, block: Block) -> str:
        return f"bias {block.dims['out']} (output side only)"

    def find(self, traced: TracedModel, claims: Claims, sharing: str) -> list[Block]:
        return find_bias_blocks(self, traced, claims, sharing)

    def factors(self, block: Block) -> dict[str, Factor]:
        return {"G": Factor((block.dims["out"], block.dims["out"]), axis=-1)}

    def cost(self, block: Block) -> dict[str, sympy.Expr]:
        """Adding the bias and summing its gradient (``2 R out``), the statistics ``2 R out^2``; an extra backward
        does not pass through the bias."""
        rows = sympy.Add(*(u.rows for u in block.uses))
        out = block.dims["out"]
        return {"forward_backward": 2 * rows * out, "statistics": 2 * rows * out**2,
                "backward_per_sample": sympy.Integer(0)}

    def write_batch_factors(self, w: StepWriter, b: BlockVars, dtype: torch.dtype) -> None:
        grads = w.pack(u.grads[0] for u in b.uses)
        call = w.call(bias_factor, grads, b.block.layout["channel_dim"], b.block.sharing == "reduce", "examples",
                      "scale", dtype)
        w.line(f"{b.batch_factors['G']} = {call}")

    def write_example_rows(self, w: StepWriter, b: BlockVars, uses: Sequence[UseVars], dtype: torch.dtype,
                           label: str = "rows") -> dict[str, str]:
        rows = b.var(f"{label}_G")
        grads = w.pack(u.grads[0] for u in uses)
        examples = f"{uses[0].grads[0]}.shape[0]"
        w.line(f"{rows} = {w.call(bias_example_rows, grads, b.block.layout['channel_dim'], examples, dtype)}")
        return {"G": rows}

    def write_matrix(self, w: StepWriter, b: BlockVars, tensors: Sequence[str], dtype: torch.dtype) -> str:
        return f"{tensors[0]}.to({dtype})"

    def write_split(self, w: StepWriter, b: BlockVars, matrix: str) -> str:
        return w.pack([matrix])


def find_bias_blocks(kind: BlockKind, traced: TracedModel, claims: Claims, sharing: str) -> list[Block]:
    """Bias blocks: unclaimed trainable parameters used only as the ``bias`` of :data:`BIAS_OPS` nodes."""
    params = set(traced.params)
    trainable = depends_on(traced.graph, params)
    blocks = []
    for node in traced.graph.nodes:
        if node.op != "placeholder" or node.name not in params or claims.is_claimed(node.name) or not node.users:
            continue
        layers = [u for u in node.users if u.op == "call_function" and u.target in BIAS_OPS]
        if len(layers) != len(node.users) or not all(_bias_only(u, node) for u in layers):
            continue
        channel_dims = {BIAS_OPS[u.target] for u in layers}
        if len(channel_dims) != 1 or len(node.meta["val"].shape) != 1:
            continue
        (channel_dim,) = channel_dims
        uses = []
        for layer in layers:
            shape = symbolic_shape(layer)
            rows = sympy.Mul(*(d for i, d in enumerate(shape) if i != channel_dim % len(shape)))
            uses.append(layer_use([], [layer], rows, trainable))
        blocks.append(new_block(traced, kind, (node,), uses, {"out": int(node.meta["val"].shape[0])},
                                sharing=sharing, layout={"channel_dim": channel_dim}))
    return blocks


def _bias_only(layer: Node, param: Node) -> bool:
    """Whether ``param`` is ``layer``'s bias and none of its other arguments."""
    args = schema_args(layer)
    return args.get("bias") is param and all(v is not param for k, v in args.items() if k != "bias")


register_block_kind(Bias())
