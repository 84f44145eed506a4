"""Rewrites every graph gets, whatever kinds are registered: ops the generated step cannot differentiate as needed,
and checks that compute nothing.

The step differentiates the forward in reverse mode (gradients, statistics) and, for
the quadratic model of ``lr="auto"``, its backward once more (or the forward in forward
mode, ``torch.func.jvp``). Some fused kernels have neither derivative, nor a batching
rule for their backward: :func:`attention_math_form` replaces them by their composite
form, which computes the same function from differentiable ops. Every graph gets it for
attention with dropout (:data:`GRAPH_REWRITES`: the dropout becomes a draw of the step,
:mod:`.draws`); a step that differentiates or vectorizes its backward gets it for every
call (:data:`TRANSFORMED_BACKWARD_REWRITES`). Elsewhere the fused call stays: its
backward recomputes the attention weights, where the math form keeps them, ``N x H x T
x T`` values per layer, from the forward to the backward.

:data:`STEP_REWRITES` run later, on the instrumented forward only (after the blocks are
matched on the canonical forms): they change how an op is spelled in the generated step,
not what the passes see. Some keep sizes symbolic where an op's derivative fixes them; one,
:func:`composite_forms`, gives ops whose backward torch cannot differentiate a form whose
backward it can, so that the curvature products can transpose the backward pass.
"""

from __future__ import annotations

import math
import operator
from typing import Callable

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.proxy_tensor import make_fx

from .graph_utils import aten, insert_call, ndim, schema_args

#: Fused attention ops (no forward-mode AD on CPU, no derivative of their backward): ``scaled_dot_product_attention``
#: dispatches to them.
FUSED_ATTENTION = (aten.scaled_dot_product_attention.default,)


def attention_math_form(graph: Graph, params: set[str]) -> int:
    """``scaled_dot_product_attention(q, k, v, mask, p, causal, scale=s)`` -> ``_scaled_dot_product_attention_math(...)[0]``,
    for every call.

    The math form is softmax(q kᵀ · s + mask) v written with matmuls (forward- and
    reverse-differentiable, and decomposed by Inductor like any other op); its second
    output (the attention weights) is unused. The fused kernels return their output in
    the query's memory layout, which ``view`` ops after them may rely on; the math form's
    output is contiguous, so those views become ``reshape`` (:func:`_reshape_views_of`).
    A boolean ``mask`` (``True``: attend) becomes the additive mask the fused op makes of it
    (:func:`_additive_mask`): the math form adds its mask to the scores as it is.
    Returns the number of rewritten nodes.
    """
    return _math_forms(graph, lambda dropout: True)


def dropout_attention_math_form(graph: Graph, params: set[str]) -> int:
    """:func:`attention_math_form` for the calls with dropout (``dropout_p`` not the constant 0) only: a random op,
    which :func:`curvgraph.passes.draws.draws_from_inputs` makes a function of the step's draw in its math form."""
    return _math_forms(graph, lambda dropout: not (isinstance(dropout, (int, float)) and dropout == 0))


def _math_forms(graph: Graph, rewritten: Callable[[object], bool]) -> int:
    """Rewrite every fused attention call whose ``dropout_p`` argument ``rewritten`` accepts into its math form
    (:func:`attention_math_form`); returns how many."""
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in FUSED_ATTENTION:
            continue
        args = schema_args(node)
        if not rewritten(args["dropout_p"]):
            continue
        mask = args["attn_mask"]
        if isinstance(mask, Node) and mask.meta["val"].dtype == torch.bool:
            mask = _additive_mask(graph, node, mask, args["query"].meta["val"].dtype)
        math_node = insert_call(graph, node, aten._scaled_dot_product_attention_math.default,
                                (args["query"], args["key"], args["value"], mask, args["dropout_p"],
                                 args["is_causal"]))
        math_node.kwargs = {"scale": args["scale"], "enable_gqa": args["enable_gqa"]}
        output = insert_call(graph, node, operator.getitem, (math_node, 0), meta_from=node)
        node.replace_all_uses_with(output)
        graph.erase_node(node)
        _reshape_views_of(output)
        count += 1
    return count


def _additive_mask(graph: Graph, attention: Node, mask: Node, dtype: torch.dtype) -> Node:
    """Nodes before ``attention`` that turn the boolean ``mask`` into ``0`` where it is ``True`` and ``-inf`` where it is
    ``False``, in ``dtype``: what ``scaled_dot_product_attention`` does to a boolean mask before its math kernel."""
    zeros = insert_call(graph, attention, aten.zeros_like.default, (mask,), meta_from=attention)
    zeros.kwargs = {"dtype": dtype}
    blocked = insert_call(graph, attention, aten.logical_not.default, (mask,), meta_from=attention)
    additive = insert_call(graph, attention, aten.masked_fill.Scalar, (zeros, blocked, -math.inf), meta_from=attention)
    value = mask.meta["val"]  # a fake tensor: ops on it give the new nodes' shapes
    zeros.meta["val"], blocked.meta["val"] = value.to(dtype), value.logical_not()
    additive.meta["val"] = zeros.meta["val"]
    return additive


#: Ops that only rearrange their first argument's elements.
SHAPE_OPS = (aten.permute.default, aten.transpose.int, aten.view.default, aten.reshape.default, aten.unsqueeze.default,
             aten.squeeze.dim, aten.expand.default, aten.clone.default)


def _reshape_views_of(node: Node) -> None:
    """Turn every ``view`` reached from ``node`` through :data:`SHAPE_OPS` into ``reshape``."""
    pending = [node]
    while pending:
        for user in list(pending.pop().users):
            if user.op != "call_function" or user.target not in SHAPE_OPS:
                continue
            if user.target is aten.view.default:
                user.target = aten.reshape.default
            pending.append(user)


def linear_as_2d(graph: Graph) -> int:
    """``aten.linear(x, W, b)`` with ``x`` of shape ``(*lead, d)``, not 2-D -> ``linear(x.reshape(-1, d), W, b)``
    reshaped back to ``(*lead, o)``: the same values, dtypes (under autocast too) and derivatives.

    Under ``torch.func`` transforms (the step differentiates its forward with
    ``torch.func.vjp``), ``aten.linear`` with a bias and an input that is not 2-D decomposes
    through a contiguity check of the functorch-wrapped input that reads its sizes as plain
    integers, and so fixes every dim of ``x`` to the example's: the step's graph would guard
    on the batch size and sequence length, and a batch of another size would compile the
    step again. A 2-D input goes to ``addmm`` directly, and the sizes stay symbolic.
    Returns the number of rewritten nodes.
    """
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.linear.default:
            continue
        args = schema_args(node)
        x, weight, bias = args["input"], args["weight"], args["bias"]
        rank = ndim(x)
        if bias is None or rank in (-1, 2):
            continue
        lead = [_size(graph, node, x, i) for i in range(rank - 1)]
        rows = insert_call(graph, node, aten.reshape.default, (x, [-1, _size(graph, node, x, -1)]))
        linear = insert_call(graph, node, aten.linear.default, (rows, weight, bias))
        output = insert_call(graph, node, aten.reshape.default, (linear, [*lead, _size(graph, node, weight, 0)]),
                             meta_from=node)
        node.replace_all_uses_with(output)
        graph.erase_node(node)
        count += 1
    return count


def _size(graph: Graph, before: Node, tensor: Node, dim: int) -> int | Node:
    """Size ``dim`` of ``tensor``: a static size as it is, a symbolic one read by a ``sym_size`` node before ``before``."""
    value = tensor.meta["val"].shape[dim]
    return value if isinstance(value, int) else insert_call(graph, before, aten.sym_size.int, (tensor, dim))


def embedding_as_index(graph: Graph) -> int:
    """``aten.embedding(W, i, padding_idx)`` -> ``W[i]``, with no gradient through the rows ``i == padding_idx``.

    The same values and the same first derivatives. What differs is the second: the
    curvature products of ``lr="auto"`` differentiate the backward pass, and the double
    backward of ``aten.embedding`` (torch 2.13's ``embedding_dense_double_backward``) reads
    the indices' sizes as plain integers, which fixes the batch size and sequence length
    of the compiled step to the example's; indexing's double backward keeps them symbolic.
    A ``padding_idx`` row gets no gradient from ``aten.embedding``; here the lookups of it
    are detached (``where(i == padding_idx, W[i].detach(), W[i])``). Lookups with
    ``scale_grad_by_freq`` or ``sparse`` stay as they are. Returns the number of rewritten nodes.
    """
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.embedding.default:
            continue
        args = schema_args(node)
        if args["scale_grad_by_freq"] or args["sparse"]:
            continue
        weight, indices, padding_idx = args["weight"], args["indices"], args["padding_idx"]
        rows = insert_call(graph, node, aten.index.Tensor, (weight, [indices]), meta_from=node)
        if padding_idx >= 0:
            value = indices.meta["val"]
            padding = insert_call(graph, node, aten.eq.Scalar, (indices, padding_idx))
            padding.meta["val"] = value == padding_idx
            column = insert_call(graph, node, aten.unsqueeze.default, (padding, -1))
            column.meta["val"] = padding.meta["val"].unsqueeze(-1)
            fixed = insert_call(graph, node, aten.detach.default, (rows,), meta_from=node)
            rows = insert_call(graph, node, aten.where.self, (column, fixed, rows), meta_from=node)
        node.replace_all_uses_with(rows)
        graph.erase_node(node)
        count += 1
    return count


def hardsigmoid_composite(x: torch.Tensor) -> torch.Tensor:
    """``hardsigmoid(x) = min(max(x + 3, 0), 6) / 6`` as ``hardtanh(x + 3, 0, 6) / 6``, in float32 for half inputs.

    The same values as the kernel (which also computes half inputs in float32) and the same
    derivative, ``1/6`` where ``-3 < x < 3`` (``hardtanh``'s mask is strict, as
    ``hardsigmoid_backward``'s), but twice differentiable: torch 2.13 has no derivative for
    ``hardsigmoid_backward``.
    """
    half = x.dtype in (torch.float16, torch.bfloat16)
    value = aten.div.Tensor(aten.hardtanh.default(aten.add.Tensor(x.float() if half else x, 3), 0.0, 6.0), 6)
    return value.to(x.dtype) if half else value


#: Elementwise ops whose backward torch 2.13 cannot differentiate, the ``torch.nn.functional`` function that
#: calls each, and the same function from ops whose backward it can: ``(op, functional, composite)``.
#: :func:`composite_forms` writes the composites into the step, and
#: :func:`curvgraph.methods.quadratic.transposes_backward` runs the functionals as them.
COMPOSITES = ((aten.hardsigmoid.default, torch.nn.functional.hardsigmoid, hardsigmoid_composite),)


def composite_forms(graph: Graph) -> int:
    """Each op of :data:`COMPOSITES` -> its composite's ATen ops, so that the default mode's curvature products can
    differentiate the backward pass (instead of running the model again in forward mode, which also fixes the batch
    size). Returns the number of rewritten nodes."""
    composites = {op: composite for op, _, composite in COMPOSITES}
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in composites:
            continue
        value = _inline(graph, node, composites[node.target], node.args[0])
        value.meta.update(node.meta)
        node.replace_all_uses_with(value)
        graph.erase_node(node)
        count += 1
    return count


def _inline(graph: Graph, before: Node, fn, x: Node) -> Node:
    """The ATen ops of the elementwise ``fn`` applied to ``x``, inserted before ``before`` (traced on an empty tensor
    of ``x``'s dtype: an elementwise function's ops do not depend on the shape). Returns the result's node."""
    traced = make_fx(fn)(torch.empty(0, dtype=x.meta["val"].dtype))
    placeholder = next(iter(traced.graph.find_nodes(op="placeholder")))
    with graph.inserting_before(before):
        return graph.graph_copy(traced.graph, {placeholder: x})


def without_metadata_checks(graph: Graph, params: set[str]) -> int:
    """Erase ``aten._assert_tensor_metadata`` nodes; returns how many.

    ``torch.export`` records ``t.float()`` or ``t.to(dtype)`` of a tensor already of that dtype as such a
    check: no value, nothing the step computes. Erased, a parameter it reads has only its computing
    consumers (e.g. Gemma's ``x_hat * (1.0 + self.weight.float())``, a norm block).
    """
    checks = list(graph.find_nodes(op="call_function", target=aten._assert_tensor_metadata.default))
    for node in checks:
        graph.erase_node(node)
    return len(checks)


#: The rewrites :func:`curvgraph.passes.build_plan` runs before the kinds' own.
GRAPH_REWRITES = (without_metadata_checks, dropout_attention_math_form)

#: What :func:`curvgraph.passes.build_plan` adds to :data:`GRAPH_REWRITES` for a step that differentiates the model's
#: backward again (``lr="auto"``) or vectorizes it (``fisher="type2"``): the fused attention kernels' backward has
#: no derivative and no batching rule.
TRANSFORMED_BACKWARD_REWRITES = (attention_math_form,)


def fused_attention_reshapes(graph: Graph) -> int:
    """Every ``view`` after a fused attention call that the step keeps -> ``reshape`` (:func:`_reshape_views_of`);
    returns the number of fused calls.

    ``scaled_dot_product_attention`` returns its output in the memory layout of the kernel
    it picks at run time: the flash kernel's in the query's layout (``(N, T, H, d)`` in memory
    for the usual ``(N, T, H, d).transpose(1, 2)`` query), the math kernel's contiguous. The
    captured graph holds the ``view`` that fitted the example's kernel, and the step may pick
    another: an attention mask computed from a parameter (BEiT's and Swin's relative
    position bias) requires a gradient in the step but not at the capture, and torch's CPU
    dispatch takes the math kernel for such a mask. ``reshape`` is the same ``view`` wherever
    the layout allows one.
    """
    calls = [node for node in graph.nodes if node.op == "call_function" and node.target in FUSED_ATTENTION]
    for node in calls:
        _reshape_views_of(node)
    return len(calls)


#: The rewrites :func:`curvgraph.instrument.instrument` runs on the instrumented forward: ``graph -> count``.
STEP_REWRITES = (linear_as_2d, embedding_as_index, composite_forms, fused_attention_reshapes)
