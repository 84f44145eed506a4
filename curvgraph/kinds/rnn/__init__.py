r"""The ``rnn`` block kind: K-FAC for the weights of ``nn.RNN``/``nn.LSTM``/``nn.GRU`` and their cells.

Before capture, :meth:`Rnn.substitute` swaps each recurrent module (and cell) for its
unrolled form (:mod:`.unrolled`): a loop over the time steps of ``F.linear`` calls on
the module's own Parameters, numerically the module's function. In the captured graph
each weight matrix (``weight_ih_l{k}``, ``weight_hh_l{k}``, ``_reverse`` ones, an LSTM's
projection ``weight_hr_l{k}``) is then ``T`` ``aten.linear`` nodes, one per time step;
this pass (which runs before the dense pass) makes each weight with its bias **one
block with T uses**: statistics shared over time. A cell called at ``T`` steps of a
user's loop is the same: one block per weight with ``T`` uses.

The block is a dense block (``y_t = W x_t + b`` at every step), so the factors,
statistics, example rows, block matrix and cost are the dense kind's
(:mod:`curvgraph.kinds.dense.factors`) over the ``T`` uses:

* ``expand`` (the default, the time-independent approximation; Martens, Ba & Johnson
  2018, "option 0"): every ``(example, step)`` row is an example,
  :math:`A = \frac{1}{NT}\sum_{n,t} \bar a_{n,t}\bar a_{n,t}^\top`,
  :math:`G = c\sum_{n,t} g_{n,t} g_{n,t}^\top`; ``F ≈ G ⊗ A`` assumes the per-step
  weight gradients :math:`g_t \bar a_t^\top` are uncorrelated across steps (exact for ``T = 1``);
* ``reduce`` (``kfac_approx="reduce"``): inputs averaged and gradients summed over steps
  per example first;
* ``temporal="option1"`` (K-FAC): the chain-structured approximation of Martens, Ba &
  Johnson (2018), option 1, from the lag-1 moments as well (:mod:`curvgraph.curvature.temporal`).

An LSTM's or RNN's input and recurrent weights have one output gradient: their outputs are summed into the
gates' pre-activations, :math:`z_t = W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh}`, so both terms' gradient is
:math:`\partial L / \partial z_t`. Both blocks read it at the sum (:func:`_gates`), and their ``G`` is one
product, computed once (:meth:`curvgraph.codegen.writer.StepWriter.assign`): for hidden 256 over 40 steps at
batch 64 it is 5.4 of the 11.1 GFLOPs of the two blocks' statistics. A GRU's new gate multiplies
:math:`W_{hn} h_{t-1} + b_{hn}` by its reset gate before the sum, so its two ``G`` differ and stay apart.

The plan row shows each block's role (input, recurrent, projection), its gate count
(1 RNN, 3 GRU, 4 LSTM), its sequence length ``T``, and for a recurrent weight whose ``G`` is the input
weight's, that it is.
"""

from __future__ import annotations

from collections import defaultdict

import sympy
import torch
from torch import nn
from torch.fx import Node

from ...codegen.writer import BlockVars, StepWriter
from ...curvature import temporal
from ...passes.graph_utils import aten, depends_on, ndim, weight_view
from ...passes.ledger import Claims
from ...plan import Block
from ...registry import register_block_kind
from ...trace import TracedModel, symbolic_shape
from ..base import layer_use, new_block
from ..dense import Dense, _foreign_users, _shared_bias
from .unrolled import UNROLLED, unrolled_form

_UNROLLED_TYPES = {f"{c.__module__}.{c.__qualname__}" for c in UNROLLED}
_ROLES = {"weight_ih": "input", "weight_hh": "recurrent", "weight_hr": "projection"}


class Rnn(Dense):
    """A recurrent weight shared over ``T`` time steps: a dense block with one use per step."""

    name = "rnn"
    rewrites = ()
    color = "#fdae6b"

    def label(self, block: Block) -> str:
        bias = " + bias" if block.bias else ""
        role = block.layout["role"]
        gates = f", {block.dims['gates']} gate{'s' if block.dims['gates'] > 1 else ''}" if role != "projection" else ""
        shared = ", G as the input weight's" if self._shares_g(block) else ""
        return f"rnn {role} {block.dims['in']} -> {block.dims['out']}{bias}{gates}, T={block.dims['steps']}{shared}"

    @staticmethod
    def _shares_g(block: Block) -> bool:
        """Whether ``block`` is a recurrent weight whose outputs are summed with the input weight's into the gates
        (:func:`_gates`): its ``G`` is the input block's, computed once (by the input block, which comes first)."""
        return block.layout["role"] == "recurrent" and block.layout["summed_gates"]

    def cost(self, block: Block) -> dict[str, sympy.Expr]:
        """The dense block's cost, without the ``G`` statistics of a recurrent block that shares them
        (:meth:`_shares_g`)."""
        cost = super().cost(block)
        if self._shares_g(block):
            g = block.factors["G"]
            cost["statistics"] -= 2 * block.rows * g.dim * g.block_dim
        return cost

    def substitute(self, module: nn.Module) -> nn.Module | None:
        return unrolled_form(module)

    def find(self, traced: TracedModel, claims: Claims, sharing: str) -> list[Block]:
        return find_rnn_blocks(self, traced, claims, sharing)

    def write_lag_moments(self, w: StepWriter, b: BlockVars, dtype: torch.dtype) -> dict[str, str]:
        acts, grads = w.pack(u.inputs[0] for u in b.uses), w.pack(u.grads[0] for u in b.uses)
        lags = {f: b.var(f"{f}_lag_batch") for f in ("A", "G")}
        call = w.call(temporal.rnn_lag_factors, acts, grads, b.block.bias, "examples", "scale", dtype)
        w.line(f"{lags['A']}, {lags['G']} = {call}")
        return lags


def _in_unrolled(node: Node) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return bool(stack) and str(list(stack.values())[-1][1]) in _UNROLLED_TYPES


def find_rnn_blocks(kind: Rnn, traced: TracedModel, claims: Claims, sharing: str) -> list[Block]:
    """One block per recurrent weight (with its bias) over its per-step ``aten.linear`` uses."""
    graph = traced.graph
    params = set(traced.params)
    by_name = {name: p for p, name in traced.params.items()}
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    uses: dict[Node, list[Node]] = defaultdict(list)
    for node in graph.nodes:
        if node.op == "call_function" and node.target == aten.linear.default and _in_unrolled(node):
            view = weight_view(node.args[1], params)
            if view is not None and not view[1] and not claims.is_claimed(view[0].name):
                uses[view[0]].append(node)
    trainable = depends_on(graph, params)
    roles = {}
    for weight, linears in uses.items():
        prefix, _, leaf = traced.params[weight.name].rpartition(".")
        base, _, suffix = leaf.partition("_")  # weight_ih_l0_reverse -> ("weight", "ih_l0_reverse")
        role = _ROLES.get(f"{base}_{suffix[:2]}")
        foreign = _foreign_users(weight, linears)
        if role is None or foreign or any(ndim(lin.args[0]) != 2 for lin in linears):
            why = f"also used by node '{foreign[0].name}'" if foreign else "not a per-step (N, features) linear"
            claims.reject(weight.name, f"recurrent weight {why}; left to the dense pass or the fallback")
            continue
        roles[weight] = (role, prefix, suffix)
    recurrent = {lin for weight in roles for lin in uses[weight]}  # the linears of the blocks made below
    blocks = []
    for weight, (role, prefix, suffix) in roles.items():
        linears = uses[weight]
        sibling = lambda stem: placeholders.get(by_name.get(f"{prefix + '.' if prefix else ''}{stem}{suffix[2:]}", ""))  # noqa: E731
        hh, hr = sibling("weight_hh"), sibling("weight_hr")
        hidden = int((hr if hr is not None else hh).meta["val"].shape[1]) if hh is not None else None
        out_features, in_features = (int(s) for s in weight.meta["val"].shape)
        gates = 1 if role == "projection" or not hidden else out_features // hidden
        bias = _shared_bias(linears, params)
        outputs = [_gates(lin, recurrent) for lin in linears]
        layer_uses = [layer_use([lin.args[0]], [out], sympy.Mul(*symbolic_shape(lin.args[0])[:-1]), trainable)
                      for lin, out in zip(linears, outputs)]
        blocks.append(new_block(traced, kind, (weight,) + ((bias,) if bias is not None else ()), layer_uses,
                                {"in": in_features, "out": out_features, "gates": gates, "steps": len(linears)},
                                bias=bias is not None, sharing=sharing,
                                layout={"transposed": False, "role": role,
                                        "summed_gates": all(out is not lin for lin, out in zip(linears, outputs))}))
    return blocks


def _gates(linear: Node, recurrent: set[Node]) -> Node:
    """Where ``linear``'s output gradient is read: the sum ``W_ih x_t + W_hh h_{t-1}`` (with biases) of the gates'
    pre-activations where ``linear`` is one of its two terms (LSTM, RNN), else ``linear`` itself (a GRU's new gate
    multiplies ``W_hn h`` by its reset gate first; a projection feeds no sum).

    Both terms of the sum have its gradient as theirs, so the input and the recurrent block read the same output
    gradients, and their ``G`` (computed once, :meth:`curvgraph.codegen.writer.StepWriter.assign`) is the same."""
    users = list(linear.users)
    if len(users) != 1 or users[0].target != aten.add.Tensor or users[0].kwargs.get("alpha", 1) != 1:
        return linear
    terms = users[0].args[:2]
    if all(isinstance(t, Node) and t in recurrent and len(t.users) == 1 for t in terms) and terms[0] is not terms[1]:
        return users[0]
    return linear


register_block_kind(Rnn(), before="dense")
