r"""The ``bias`` block kind: a trainable bias whose layer's weight is in no block with it.

Matches a trainable parameter all of whose consumers are bias uses (:data:`BIAS_FORMS`):

* the ``bias`` argument of ``aten.linear`` or convolution nodes (:data:`~curvgraph.kinds.conv.CONV_OPS`) whose
  weight is not in a block with it: a frozen weight (``requires_grad=False``), a constant, or a weight another pass
  claimed without the bias (a tied weight whose head has its own bias, a shared weight whose uses have different
  biases);
* the shift of a normalization layer (BatchNorm, GroupNorm, LayerNorm, RMSNorm, hand-written RMSNorm) whose scale is
  not in a block with it (frozen, a constant, absent): ``h + b`` with ``h`` the normalized output, possibly times
  the scale (:func:`~curvgraph.kinds.norm.split_norm_affine` moves a trainable shift out of the fused op).

Such a bias is an affine shift of the layer's outputs, so its curvature needs the output side only: one factor
``G`` over the output channels, acting on the bias itself (the block matrix is the bias flattened, ``(out,)``; the
factor is on its axis ``-1``). The bias's entries lie along the output dims ``layout["channel_dims"]`` (``(-1,)``
for a linear layer, ``(1,)`` for a convolution or a channels-first norm, the trailing normalized dims of a
LayerNorm), ``out`` entries in all.

``G`` is the dense/conv block's ``G`` (:func:`curvgraph.kinds.dense.factors.dense_grad_factor`)
over the layer's output vectors (channel dims moved last and flattened), summed over every use of the bias:

* **expand**: :math:`G = c \sum_r g_r g_r^\top` over all rows (examples times positions, every use);
* **reduce**: :math:`G = c \sum_n g_n g_n^\top` with :math:`g_n` the sum over the example's positions.

It is the bias block of the dense/conv block's ``kron(G, A)`` (whose ones column gives the
bias corner :math:`A_{\text{bias}} = 1`); for a norm's shift it adds the cross-channel terms to the norm block's
per-channel ``F`` of the shift (its diagonal with ``kfac_approx="reduce"``). For a bias applied once per example
(outputs ``(N, out)``) or with ``kfac_approx="reduce"`` at a single use, :math:`g_n = J_{b,n}^\top s` and ``G`` with
the type-2 Fisher is exactly the GGN of the batch-mean loss w.r.t. the bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import sympy
import torch
from torch import Tensor
from torch.fx import Node

from ...codegen.writer import BlockVars, StepWriter, UseVars
from ...passes.graph_utils import aten, depends_on, ndim, schema_args
from ...passes.ledger import Claims
from ...plan import Block, Factor
from ...registry import register_block_kind
from ...trace import TracedModel, symbolic_shape
from ..base import BlockKind, layer_use, new_block
from ..conv import CONV_OPS
from ..dense.factors import dense_grad_factor
from ..norm import scaled_norm

#: The ops whose ``bias`` argument the kind matches, with the dim of their output that holds the channels.
BIAS_OPS: dict[object, int] = {aten.linear.default: -1, **{op: 1 for op in CONV_OPS}}


@dataclass(frozen=True)
class BiasUse:
    """One use of a bias: the node whose output it shifts, and the dims of that output its entries lie along."""

    output: Node
    channel_dims: tuple[int, ...]


def layer_bias(user: Node, param: Node) -> BiasUse | None:
    """``param`` is the ``bias`` argument, and no other argument, of the :data:`BIAS_OPS` node ``user``."""
    if user.op != "call_function" or user.target not in BIAS_OPS or ndim(param) != 1:
        return None
    args = schema_args(user)
    if args.get("bias") is not param or any(v is param for k, v in args.items() if k != "bias"):
        return None
    return BiasUse(user, (BIAS_OPS[user.target],))


def norm_shift(user: Node, param: Node) -> BiasUse | None:
    """``param`` is the shift of a normalization layer: ``user`` is ``h + param`` (the trailing dims) or
    ``view(param, [1, -1, 1, ...])`` feeding only ``h + view`` (dim 1), with ``h`` a normalized output, possibly
    scaled (:func:`~curvgraph.kinds.norm.scaled_norm`)."""
    add, shift = user, param
    if user.target is aten.view.default:
        if len(user.users) != 1 or ndim(param) != 1:
            return None
        (add,), shift = user.users, user
    if (add.target is not aten.add.Tensor or len(add.args) != 2 or add.kwargs or add.args[1] is not shift
            or scaled_norm(add.args[0]) is None):
        return None
    output, k = symbolic_shape(add), ndim(param)
    if shift is param:  # broadcast along the trailing dims: they must be the parameter's, none of size 1 stretched
        return BiasUse(add, tuple(range(-k, 0))) if tuple(output[-k:]) == tuple(param.meta["val"].shape) else None
    sizes = list(shift.args[1])
    channels = [d for d, size in enumerate(sizes) if size != 1]
    return BiasUse(add, (channels[0],)) if len(sizes) == len(output) and len(channels) == 1 else None


#: The bias uses the kind matches: each ``(consumer, parameter) -> BiasUse | None``.
BIAS_FORMS: tuple[Callable[[Node, Node], BiasUse | None], ...] = (layer_bias, norm_shift)


def channels_last(grads: tuple[Tensor, ...], channel_dims: tuple[int, ...]) -> tuple[Tensor, ...]:
    """Each output vector tensor with its channel dims moved last and flattened into one, ``(..., out)``."""
    k = len(channel_dims)
    return tuple(g.movedim(channel_dims, tuple(range(-k, 0))).flatten(-k) for g in grads)


def bias_factor(grads: tuple[Tensor, ...], channel_dims: tuple[int, ...], reduce: bool, examples: int,
                scale: Tensor, dtype: torch.dtype) -> Tensor:
    r"""``G`` of one batch, ``(out, out)``: :func:`~curvgraph.kinds.dense.factors.dense_grad_factor` of the output
    vectors of every use, ``(S*N, ..., out)`` once the channel dims ``channel_dims`` are moved last."""
    return dense_grad_factor(channels_last(grads, channel_dims), reduce, examples, scale, dtype)


def bias_example_rows(grads: tuple[Tensor, ...], channel_dims: tuple[int, ...], examples: int,
                      dtype: torch.dtype) -> Tensor:
    r"""The example rows ``(S*N, P, out)`` (one factor): the output vectors of every use and position; their sum over
    positions is example ``n``'s bias gradient, :math:`M_n = \sum_p g_{n,p}`."""
    rows = [g.to(dtype).reshape(examples, -1, g.shape[-1]) for g in channels_last(grads, channel_dims)]
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
        rows = block.rows
        out = block.dims["out"]
        return {"forward_backward": 2 * rows * out, "statistics": 2 * rows * out**2,
                "backward_per_sample": sympy.Integer(0)}

    def write_batch_factors(self, w: StepWriter, b: BlockVars, dtype: torch.dtype) -> None:
        grads = w.pack(u.grads[0] for u in b.uses)
        call = w.call(bias_factor, grads, b.block.layout["channel_dims"], b.block.sharing == "reduce", "examples",
                      "scale", dtype)
        w.assign(b.batch_factors["G"], call)

    def write_example_rows(self, w: StepWriter, b: BlockVars, uses: Sequence[UseVars], dtype: torch.dtype,
                           label: str = "rows") -> dict[str, str]:
        rows = b.var(f"{label}_G")
        grads = w.pack(u.grads[0] for u in uses)
        examples = f"{uses[0].grads[0]}.shape[0]"
        w.line(f"{rows} = {w.call(bias_example_rows, grads, b.block.layout['channel_dims'], examples, dtype)}")
        return {"G": rows}

    def write_matrix(self, w: StepWriter, b: BlockVars, tensors: Sequence[str], dtype: torch.dtype) -> str:
        return f"{tensors[0]}.reshape(-1).to({dtype})"

    def write_split(self, w: StepWriter, b: BlockVars, matrix: str) -> str:
        return w.pack([f"({matrix}).reshape({b.block.layout['shape']})"])


def find_bias_blocks(kind: BlockKind, traced: TracedModel, claims: Claims, sharing: str) -> list[Block]:
    """Bias blocks: unclaimed trainable parameters all of whose consumers are bias uses (:data:`BIAS_FORMS`)
    along the same channel dims."""
    params = set(traced.params)
    trainable = depends_on(traced.graph, params)
    blocks = []
    for node in traced.graph.nodes:
        if node.op != "placeholder" or node.name not in params or claims.is_claimed(node.name) or not node.users:
            continue
        found = [next((u for u in (form(user, node) for form in BIAS_FORMS) if u is not None), None)
                 for user in node.users]
        if None in found or len({u.channel_dims for u in found}) != 1:
            continue
        uses = []
        for use in found:
            shape = symbolic_shape(use.output)
            channels = {d % len(shape) for d in use.channel_dims}
            rows = sympy.Mul(*(d for i, d in enumerate(shape) if i not in channels))
            uses.append(layer_use([], [use.output], rows, trainable))
        shape = tuple(node.meta["val"].shape)
        blocks.append(new_block(traced, kind, (node,), uses, {"out": math.prod(shape)}, sharing=sharing,
                                layout={"channel_dims": found[0].channel_dims, "shape": shape}))
    return blocks


register_block_kind(Bias())
