r"""Random ops of the forward take their noise from the step, so that every call of the model in one step is one function.

The step calls the model more than once per batch: the forward of its forward/backward pass, and with
``lr="auto"`` a forward at the trial parameters :math:`\theta + \delta` (the Levenberg-Marquardt ratio
:math:`\rho = (h(\theta + \delta) - h(\theta)) / M(\delta)` and the test that rejects a step raising the
loss), the curvature products by forward mode where the backward cannot be differentiated, and
K-BFGS's forward and backward at the new parameters. Each compares or combines values of one
function :math:`h`. Dropout (``aten.native_dropout``) or noise (``randn_like``, ...) drawn anew in each
call makes them values of different functions: with ``Dropout(0.5)`` and a step scaled down to
:math:`10^{-6}`, about half the steps were rejected and the damping rose 1000-fold in 20 steps.

:func:`draws_from_inputs` replaces each random op of :data:`DRAWN` by the same function of a tensor of
uniform :math:`U[0, 1)` or standard normal values that becomes a placeholder of the forward (a
:class:`Draw`); the generated step draws those tensors once per step, before its first call of the
model, and passes the same ones to every call. Each op keeps its distribution:

* ``native_dropout(x, p, train=True)``: keep mask :math:`m = [u \ge p]` (kept with probability
  :math:`1 - p`; the step draws the mask itself, one byte per element), output :math:`x \cdot m / (1 - p)`
  (0 for :math:`p = 1`), and the mask;
* attention's own dropout (``_scaled_dot_product_attention_math`` with ``dropout_p > 0``, the form the
  attention pass writes ``scaled_dot_product_attention`` in): the same keep mask over the attention
  weights, applied to the op's weights at ``dropout_p = 0`` before they multiply ``v`` (with
  ``enable_gqa``, passed as the op's ``dropout_mask``);
* ``bernoulli(q)``: :math:`[u < q]` in ``q``'s dtype; ``bernoulli(x, p)``: :math:`[u < p]` in ``x``'s;
* ``rand``/``rand_like``: :math:`u`; ``randn``/``randn_like``: the normal draw itself.

Other random ops (``randint``, ``multinomial``, ``normal`` with tensor arguments, ...) stay as they are
and draw anew in every call.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
from torch.fx import Graph, Node

from ..plan import Shape
from ..trace import size
from .graph_utils import aten, insert_call, schema_args


@dataclass(frozen=True)
class Draw:
    """A tensor of random values the step draws once per step for one random op of the forward.

    Attributes:
        node: the random op's node in the traced graph.
        shape: its symbolic shape (ints, or sympy expressions in the input sizes).
        dtype: its dtype.
        normal: standard normal values if true, else uniform on ``[0, 1)``.
        keep_above: for a dropout mask, the draw is the boolean keep mask ``u >= keep_above`` of the uniform
            ``u`` (one byte per element where the uniform values would take four); ``None``: the values.
    """

    node: str
    shape: Shape
    dtype: torch.dtype
    normal: bool
    keep_above: float | None = None


def _kept(graph: Graph, before: Node, t: Node, keep: Node, p: float) -> Node:
    """``t * keep * 1/(1 - p)`` (0 for ``p = 1``), inserted before ``before``: dropout with the keep mask ``keep``."""
    kept = insert_call(graph, before, aten.mul.Tensor, (t, keep), meta_from=t)
    return insert_call(graph, before, aten.mul.Tensor, (kept, 1.0 / (1.0 - p) if p < 1 else 0.0), meta_from=t)


def _dropout(graph: Graph, node: Node, keep: Node) -> None:
    """``native_dropout(x, p, train)`` -> ``(x * keep * 1/(1 - p), keep)`` with the drawn keep mask."""
    args = schema_args(node)
    output = _kept(graph, node, args["input"], keep, float(args["p"]))
    for user in list(node.users):  # native_dropout's two outputs are read through getitem
        user.replace_all_uses_with(output if user.args[1] == 0 else keep)
        graph.erase_node(user)
    graph.erase_node(node)


def _attention_dropout(graph: Graph, node: Node, keep: Node) -> None:
    """``_scaled_dot_product_attention_math(q, k, v, ..., dropout_p=p)[0]`` -> ``(w * keep / (1 - p)) @ v`` with ``w`` the
    op's attention weights at ``dropout_p=0`` (its second output: softmax of the scores), as the op's own dropout.
    With ``enable_gqa`` (``v`` repeated over the query heads inside the op) the mask is passed as the op's
    ``dropout_mask`` instead, which makes torch warn once that the argument is meant for testing."""
    args = schema_args(node)
    p = float(args["dropout_p"])
    if args["enable_gqa"]:
        node.args = (args["query"], args["key"], args["value"], args["attn_mask"], p, args["is_causal"], keep)
        return
    node.args = (args["query"], args["key"], args["value"], args["attn_mask"], 0.0, args["is_causal"])
    outputs = [user for user in node.users if user.args[1] == 0]
    with graph.inserting_after(node):
        weights = graph.call_function(operator.getitem, (node, 1))
    weights.meta["val"] = _attention_weights(node)
    before = weights.next
    output = insert_call(graph, before, aten.matmul.default, (_kept(graph, before, weights, keep, p), args["value"]),
                         meta_from=outputs[0] if outputs else None)
    for user in outputs:
        user.replace_all_uses_with(output)
        graph.erase_node(user)


def _bernoulli(graph: Graph, node: Node, u: Node) -> None:
    """``bernoulli(q)`` -> ``(u < q).to(q.dtype)``; ``bernoulli(x, p)`` -> ``(u < p).to(x.dtype)``."""
    args = schema_args(node)
    probability = args.get("p", args["self"])
    below = insert_call(graph, node, aten.lt.Tensor if isinstance(probability, Node) else aten.lt.Scalar,
                        (u, probability))
    below.meta["val"] = u.meta["val"] < 0.5
    value = insert_call(graph, node, aten._to_copy.default, (below,), meta_from=node)
    value.kwargs = {"dtype": node.meta["val"].dtype}
    node.replace_all_uses_with(value)
    graph.erase_node(node)


def _drawn(graph: Graph, node: Node, u: Node) -> None:
    """``rand``/``randn`` (``_like`` too): the draw itself."""
    node.replace_all_uses_with(u)
    graph.erase_node(node)


@dataclass(frozen=True)
class RandomOp:
    """How a random op draws from the step.

    Attributes:
        normal: standard normal draws, else uniform.
        drawn: the node's random value (a fake tensor: its shape and dtype are the draw's), or ``None`` where this
            call draws nothing (dropout in eval mode).
        rewrite: ``(graph, node, draw)``: make the node a function of the placeholder ``draw``, erasing what it
            replaces.
        keep_above: for a dropout, the probability ``p`` of dropping an element: the draw is then the keep mask
            ``u >= p`` (:attr:`Draw.keep_above`); ``None`` for the other ops.
    """

    normal: bool
    drawn: Callable[[Node], torch.Tensor | None]
    rewrite: Callable[[Graph, Node, Node], None]
    keep_above: Callable[[Node], float] | None = None


def _own_value(node: Node) -> torch.Tensor:
    return node.meta["val"]


def _attention_weights(node: Node) -> torch.Tensor:
    """A tensor shaped like the attention weights of the math attention ``node``, ``(*q.shape[:-1], k.shape[-2])``."""
    args = schema_args(node)
    query, key = args["query"].meta["val"], args["key"].meta["val"]
    return query.new_empty((*query.shape[:-1], key.shape[-2]))


def _mask_draw(value: torch.Tensor, active: bool) -> torch.Tensor | None:
    """A float32 draw shaped like ``value`` (masks compare float32 draws, whatever the activations' dtype)."""
    return value.to(torch.float32) if active else None


#: The random ops the step draws for.
DRAWN: dict[object, RandomOp] = {
    aten.native_dropout.default: RandomOp(
        False, lambda n: _mask_draw(schema_args(n)["input"].meta["val"], schema_args(n)["train"] is not False),
        _dropout, lambda n: float(schema_args(n)["p"])),
    aten._scaled_dot_product_attention_math.default: RandomOp(
        False, lambda n: _mask_draw(_attention_weights(n), schema_args(n)["dropout_p"] > 0
                                    and schema_args(n)["dropout_mask"] is None), _attention_dropout,
        lambda n: float(schema_args(n)["dropout_p"])),
    aten.bernoulli.default: RandomOp(False, lambda n: _mask_draw(n.meta["val"], True), _bernoulli),
    aten.bernoulli.p: RandomOp(False, lambda n: _mask_draw(n.meta["val"], True), _bernoulli),
    aten.rand_like.default: RandomOp(False, _own_value, _drawn),
    aten.rand.default: RandomOp(False, _own_value, _drawn),
    aten.randn_like.default: RandomOp(True, _own_value, _drawn),
    aten.randn.default: RandomOp(True, _own_value, _drawn),
}


def draws_from_inputs(graph: Graph) -> tuple[list[Draw], list[Node]]:
    """Rewrite every random op of :data:`DRAWN` in ``graph`` to read its noise from a new placeholder.

    Returns the draws and their placeholders, in graph order; the placeholders are inserted before the
    first node that is not a placeholder (the caller orders the placeholders)."""
    draws: list[Draw] = []
    placeholders: list[Node] = []
    head = next(n for n in graph.nodes if n.op != "placeholder")
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in DRAWN:
            continue
        op = DRAWN[node.target]
        value = op.drawn(node)
        if value is None:
            continue
        keep_above = op.keep_above(node) if op.keep_above is not None else None
        with graph.inserting_before(head):
            u = graph.placeholder(f"draw_{len(draws)}")
        u.meta["val"] = value if keep_above is None else value >= keep_above
        draws.append(Draw(node.name, tuple(size(d) for d in value.shape), value.dtype, op.normal, keep_above))
        placeholders.append(u)
        op.rewrite(graph, node, u)
    return draws, placeholders
