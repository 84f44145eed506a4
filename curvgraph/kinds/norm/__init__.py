"""The ``norm`` block kind: split a normalization layer's affine part off, then one block per weight.

:func:`split_norm_affine` (a normalization pass) rewrites
``norm(x, weight, bias)`` into ``norm(x, None, None) * weight + bias`` (``weight`` and
``bias`` viewed to broadcast along the channel dim), so that the normalized input
``x_hat`` is an ordinary layer input and ``y`` a layer output the instrumentation can
probe. Normalization statistics (BatchNorm's running mean and variance) are computed
by the same op as before, so they update exactly as in eager PyTorch.

:func:`find_norm_blocks` then matches ``x_hat * weight (+ bias)`` with ``x_hat`` the
output of a normalization op. Patterns are data: :data:`NORM_FORMS`. The same math holds for
any ``y = x * weight (+ bias)`` whose ``x`` does not depend on ``weight``: a parameter that
scales another tensor per channel (ConvNeXt's and CaiT's layer scales, ``(C, 1, 1)`` or
``(C,)``; MobileBERT's ``NoNorm``, ``x * w + b``; a learned scalar) is a norm block too, with
``x`` in the role of ``x_hat`` (:func:`channel_layout`).
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import sympy
import torch
from torch.fx import Graph, Node

from ...codegen.writer import BlockVars, StepWriter, UseVars
from ...passes.graph_utils import aten, depends_on, insert_call, ndim, schema_args, set_schema_arg
from ...passes.ledger import Claims
from ...plan import Block, Factor
from ...registry import register_block_kind
from ...trace import TracedModel, symbolic_shape
from ..base import BlockKind, layer_use, new_block, positions_per_example, weight_and_bias
from . import factors as norm_math


@dataclass(frozen=True)
class NormForm:
    """A normalization op with an affine weight/bias.

    ``output``: the index of the normalized tensor in the op's result tuple (``None``
    if it returns one tensor); ``channels_first``: the affine parameters scale dim 1
    (BatchNorm, GroupNorm) rather than the trailing normalized dims (LayerNorm).
    """

    target: object
    output: int | None
    channels_first: bool


NORM_FORMS = (
    NormForm(aten._native_batch_norm_legit_functional.default, 0, True),
    NormForm(aten._native_batch_norm_legit.no_stats, 0, True),
    NormForm(aten._native_batch_norm_legit_no_training.default, 0, True),
    NormForm(aten.group_norm.default, None, True),
    NormForm(aten.layer_norm.default, None, False),
    NormForm(aten.rms_norm.default, None, False),
)
_FORMS = {f.target: f for f in NORM_FORMS}


def split_norm_affine(graph: Graph, params: set[str]) -> int:
    """``norm(x, w, b)`` -> ``norm(x, None, None) * w + b`` for trainable ``w``, and ``norm(x, w, None) + b`` for a
    trainable ``b`` whose ``w`` is not (frozen, a constant or absent: the shift alone is then a ``bias`` block, see
    :mod:`curvgraph.kinds.bias`); returns the rewrite count."""
    count = 0
    for node in list(graph.nodes):
        form = _FORMS.get(node.target) if node.op == "call_function" else None
        if form is None:
            continue
        args = schema_args(node)
        weight, bias = args.get("weight"), args.get("bias")
        scaled = isinstance(weight, Node) and weight.name in params
        if not (scaled or isinstance(bias, Node) and bias.name in params):
            continue
        normalized = _normalized_output(node, form)
        if normalized is None:
            continue
        anchor = normalized.next
        rank = ndim(normalized)
        view = [1, -1] + [1] * (rank - 2) if form.channels_first else None
        inserted = [normalized]  # the chain normalized -> (* w) -> (+ b); the old users read its end
        if scaled:
            set_schema_arg(node, "weight", None)
            scale = insert_call(graph, anchor, aten.view.default, (weight, view)) if view else weight
            inserted.append(insert_call(graph, anchor, aten.mul.Tensor, (normalized, scale), meta_from=normalized))
        if bias is not None:
            set_schema_arg(node, "bias", None)
            shift = insert_call(graph, anchor, aten.view.default, (bias, view)) if view else bias
            inserted.append(insert_call(graph, anchor, aten.add.Tensor, (inserted[-1], shift), meta_from=normalized))
        normalized.replace_all_uses_with(inserted[-1], delete_user_cb=lambda user: user is not inserted[1])
        count += 1
    return count


@dataclass(frozen=True)
class AffineMatch:
    """``output = x_hat * weight (+ bias)``, ``x_hat`` a normalization's output (``after_norm``) or another tensor
    that ``weight`` scales per channel."""

    weight: Node
    bias: Node | None
    normalized: Node
    mul: Node
    output: Node
    channels_first: bool
    after_norm: bool


class Norm(BlockKind):
    """BatchNorm/LayerNorm/GroupNorm affine parameters (InstanceNorm is captured as a GroupNorm, see
    :func:`curvgraph.trace._instance_norm`), and per-channel scales of other tensors (layer scales, ``NoNorm``):
    one exact ``k x k`` block ``F`` per channel."""

    name = "norm"
    rewrites = (split_norm_affine,)
    color = "#fdd49e"

    def label(self, block: Block) -> str:
        what = "norm affine" if block.layout["after_norm"] else "channel scale"
        return f"{what}, {block.dims['channels']} channels{' (scale, shift)' if block.bias else ' (scale)'}"

    def find(self, traced: TracedModel, claims: Claims, sharing: str) -> list[Block]:
        return find_norm_blocks(self, traced, claims)

    def factors(self, block: Block) -> dict[str, Factor]:
        k = 1 + int(block.bias)
        return {"F": Factor((block.dims["channels"], k, k), axis=-1)}

    def cost(self, block: Block) -> dict[str, sympy.Expr]:
        return norm_math.cost(block)

    def write_batch_factors(self, w: StepWriter, b: BlockVars, dtype: torch.dtype) -> None:
        acts, grads = w.pack(u.inputs[0] for u in b.uses), w.pack(u.grads[0] for u in b.uses)
        call = w.call(norm_math.norm_factor, acts, grads, b.block.dims["channels"], b.block.layout["channels_first"],
                      b.block.bias, "batch", "scale", dtype)
        w.assign(b.batch_factors["F"], call)

    def write_example_rows(self, w: StepWriter, b: BlockVars, uses: Sequence[UseVars], dtype: torch.dtype,
                           label: str = "rows") -> dict[str, str]:
        """One factor: the rows are the per-channel gradients :math:`v_{nc}` themselves, ``(S*N, 1, C, k)``."""
        acts, grads = w.pack(u.inputs[0] for u in uses), w.pack(u.grads[0] for u in uses)
        call = w.call(norm_math.norm_example_gradients, acts, grads, b.block.dims["channels"],
                      b.block.layout["channels_first"], b.block.bias, "batch", dtype)
        rows = b.var(f"{label}_F")
        w.line(f"{rows} = {call}[:, None]")
        return {"F": rows}

    def write_matrix(self, w: StepWriter, b: BlockVars, tensors: Sequence[str], dtype: torch.dtype) -> str:
        return w.call(norm_math.norm_gradient_matrix, *weight_and_bias(b, tensors), dtype)

    def write_split(self, w: StepWriter, b: BlockVars, matrix: str) -> str:
        return w.call(norm_math.norm_split, matrix, b.block.bias, b.block.layout["shape"])


def find_norm_blocks(kind: BlockKind, traced: TracedModel, claims: Claims) -> list[Block]:
    """Norm blocks: ``x_hat * weight (+ bias)`` after a normalization op, grouped by weight."""
    params = set(traced.params)
    matches: dict[Node, list[AffineMatch]] = defaultdict(list)
    for node in traced.graph.nodes:
        match = _affine(node, params)
        if match is not None and not claims.is_claimed(match.weight.name):
            matches[match.weight].append(match)

    trainable = depends_on(traced.graph, params)
    blocks = []
    for weight, found in matches.items():
        if not _only_used_by(weight, {m.mul for m in found}) or len({m.channels_first for m in found}) != 1:
            claims.reject(weight.name, "the norm weight or scale has other consumers")
            continue
        biases = {m.bias for m in found}
        bias = biases.pop() if len(biases) == 1 else None
        if bias is not None and (not _only_used_by(bias, {m.output for m in found}) or claims.is_claimed(bias.name)
                                 or bias.meta["val"].shape != weight.meta["val"].shape):
            bias = None
        shape = tuple(weight.meta["val"].shape)
        channels = int(sympy.Mul(*shape))
        layer_uses = [layer_use([m.normalized], [m.output if bias is not None else m.mul],
                                symbolic_shape(m.normalized)[0], trainable) for m in found]
        if not positions_per_example(traced, layer_uses):
            claims.reject(weight.name, f"it scales '{found[0].normalized.name}', which has no batch dim")
            continue
        blocks.append(new_block(traced, kind, (weight,) + ((bias,) if bias is not None else ()), layer_uses,
                                {"channels": channels}, bias=bias is not None,
                                layout={"channels_first": found[0].channels_first, "shape": shape,
                                        "after_norm": all(m.after_norm for m in found)}))
    return blocks


def _normalized_output(node: Node, form: NormForm) -> Node | None:
    if form.output is None:
        return node
    items = [u for u in node.users if u.target is operator.getitem and u.args[1] == form.output]
    return items[0] if len(items) == 1 else None


#: A hand-written RMSNorm, ``x * rsqrt(mean(x^2, -1, keepdim=True) + eps)``: normalizes the last dim.
HANDWRITTEN_RMS = NormForm("x * rsqrt(mean(x^2, -1) + eps)", None, False)
_SQUARES = {aten.pow.Tensor_Scalar: lambda n: n.args[1] == 2, aten.square.default: lambda n: True,
            aten.mul.Tensor: lambda n: n.args[0] is n.args[1]}


def _handwritten_rms(node: Node) -> bool:
    """``node`` is ``x * rsqrt(mean(square(x), [-1], keepdim=True) + eps)`` (either operand order; ``x`` squared by
    ``pow(x, 2)``, ``square(x)`` or ``x * x``)."""
    if node.target is not aten.mul.Tensor or len(node.args) != 2:
        return False
    for x, root in (node.args, node.args[::-1]):
        if not (isinstance(root, Node) and root.target is aten.rsqrt.default):
            continue
        shifted = root.args[0]
        if not (isinstance(shifted, Node) and shifted.target is aten.add.Tensor and isinstance(shifted.args[1], float)):
            continue
        mean = shifted.args[0]
        if not (isinstance(mean, Node) and mean.target is aten.mean.dim and list(mean.args[1]) in ([-1], [ndim(x) - 1])
                and (mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False))):
            continue
        square = mean.args[0]
        if (isinstance(square, Node) and square.target in _SQUARES and _uncast(square.args[0]) is _uncast(x)
                and _SQUARES[square.target](square)):
            return True
    return False


def _norm_form_of(node: Node) -> NormForm | None:
    """The form whose normalized output ``node`` is (the op itself or its getitem)."""
    if node.op != "call_function":
        return None
    if _handwritten_rms(node):
        return HANDWRITTEN_RMS
    if node.target is operator.getitem:
        form = _FORMS.get(node.args[0].target) if isinstance(node.args[0], Node) else None
        return form if form is not None and form.output == node.args[1] else None
    form = _FORMS.get(node.target)
    return form if form is not None and form.output is None else None


def scaled_norm(node: object) -> NormForm | None:
    """The form of the normalization whose output ``node`` is, directly or times a scale (``x_hat * w`` or
    ``w * x_hat``, whatever ``w`` is): the ``h`` of a shift ``h + b`` that is a normalization layer's."""
    if not isinstance(node, Node):
        return None
    form = _norm_form_of(node)
    if form is None and node.target is aten.mul.Tensor and len(node.args) == 2:
        form = next((f for f in (_norm_form_of(a) for a in node.args if isinstance(a, Node)) if f is not None), None)
    return form


def _unview(node: object) -> object:
    return node.args[0] if isinstance(node, Node) and node.target is aten.view.default else node


def _is_cast(node: object) -> bool:
    """``node`` is ``x.to(dtype)`` (``aten._to_copy`` with a dtype only)."""
    return (isinstance(node, Node) and node.target is aten._to_copy.default and len(node.args) == 1
            and set(node.kwargs) == {"dtype"})


def _uncast(node: object) -> object:
    """The tensor ``node`` is a dtype cast of (``x.float()``), or ``node``."""
    while _is_cast(node):
        node = node.args[0]
    return node


def _passes_scale(node: Node) -> bool:
    """``node`` is an op between a norm weight ``w`` and its product with ``x_hat`` that leaves the block's math as
    it is: a view or an unsqueeze (PoolFormer's ``w.unsqueeze(-1).unsqueeze(-1) * x``), a dtype cast, or an offset
    by a constant (Gemma's ``x_hat * (1 + w.float())``: ``w``'s gradient and curvature are those of the scale
    ``1 + w``, and its update the scale's)."""
    return node.target in (aten.view.default, aten.unsqueeze.default) or _is_cast(node) or (
        node.target is aten.add.Tensor and len(node.args) == 2 and isinstance(node.args[1], (int, float))
        and not node.kwargs)


def _scale_source(node: object) -> object:
    """The node ``node`` scales by, through :func:`_passes_scale` ops."""
    while isinstance(node, Node) and node.op == "call_function" and _passes_scale(node):
        node = node.args[0]
    return node


def channel_layout(x: Node, scale: Node) -> bool | None:
    """How ``scale`` spans the channels of ``x`` in ``x * scale``, as a norm block's ``channels_first``: ``False``
    where its shape, after leading 1s, is ``x``'s trailing dims (``(C,)`` against ``(N, T, C)``, a scalar against
    anything), ``True`` where it spans dim 1 only (``(C, 1, 1)`` against ``(N, C, H, W)``), ``None`` otherwise (it
    would scale the batch dim, or dims apart)."""
    shape = symbolic_shape(x)
    scaled = tuple(scale.meta["val"].shape)
    if not shape or len(scaled) > len(shape):
        return None
    aligned = (1,) * (len(shape) - len(scaled)) + scaled
    if any(all(a == 1 for a in aligned[:k]) and aligned[k:] == tuple(shape[k:]) for k in range(1, len(shape) + 1)):
        return False
    if len(shape) > 2 and aligned[0] == 1 and aligned[1] == shape[1] and all(a == 1 for a in aligned[2:]):
        return True
    return None


def _affine(node: Node, params: set[str]) -> AffineMatch | None:
    """Match ``mul(x_hat, w)`` (``w`` possibly viewed or offset by a constant, :func:`_passes_scale`), with the
    ``add(., b)`` after it if there is one: ``x_hat`` a normalization's output, or any tensor that ``w`` scales per
    channel (:func:`channel_layout`: a layer scale, ``NoNorm``, a learned scalar)."""
    if node.op != "call_function" or node.target is not aten.mul.Tensor or len(node.args) != 2:
        return None
    for normalized, scale in (node.args, node.args[::-1]):  # x_hat * w or w * x_hat
        weight = _scale_source(scale)
        if not (isinstance(normalized, Node) and isinstance(weight, Node) and weight.name in params):
            continue
        form = _norm_form_of(normalized)
        channels_first = form.channels_first if form is not None else channel_layout(normalized, scale)
        if channels_first is not None:
            break
    else:
        return None
    output, bias = node, None
    if len(node.users) == 1:
        (user,) = node.users
        candidate = _unview(user.args[1]) if user.target is aten.add.Tensor and len(user.args) == 2 else None
        if user.args[0] is node and isinstance(candidate, Node) and candidate.name in params and not user.kwargs:
            output, bias = user, candidate
    return AffineMatch(weight, bias, normalized, node, output, channels_first, form is not None)


def _only_used_by(param: Node, consumers: set[Node]) -> bool:
    """Every use of ``param`` is by ``consumers``, directly or through :func:`_passes_scale` ops only they use."""
    for user in param.users:
        if user.op == "call_function" and _passes_scale(user):
            if not _only_used_by(user, consumers):
                return False
        elif user not in consumers:
            return False
    return True


register_block_kind(Norm())
