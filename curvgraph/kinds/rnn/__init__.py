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

The plan row shows each block's role (input, recurrent, projection), its gate count
(1 RNN, 3 GRU, 4 LSTM) and its sequence length ``T``.
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
        return f"rnn {role} {block.dims['in']} -> {block.dims['out']}{bias}{gates}, T={block.dims['steps']}"

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
    blocks = []
    for weight, linears in uses.items():
        name = traced.params[weight.name]
        prefix, _, leaf = name.rpartition(".")
        base, _, suffix = leaf.partition("_")  # weight_ih_l0_reverse -> ("weight", "ih_l0_reverse")
        role = _ROLES.get(f"{base}_{suffix[:2]}")
        foreign = _foreign_users(weight, linears)
        if role is None or foreign or any(ndim(lin.args[0]) != 2 for lin in linears):
            why = f"also used by node '{foreign[0].name}'" if foreign else "not a per-step (N, features) linear"
            claims.reject(weight.name, f"recurrent weight {why}; left to the dense pass or the fallback")
            continue
        sibling = lambda stem: placeholders.get(by_name.get(f"{prefix + '.' if prefix else ''}{stem}{suffix[2:]}", ""))  # noqa: E731
        hh, hr = sibling("weight_hh"), sibling("weight_hr")
        hidden = int((hr if hr is not None else hh).meta["val"].shape[1]) if hh is not None else None
        out_features, in_features = (int(s) for s in weight.meta["val"].shape)
        gates = 1 if role == "projection" or not hidden else out_features // hidden
        bias = _shared_bias(linears, params)
        layer_uses = [layer_use([lin.args[0]], [lin], sympy.Mul(*symbolic_shape(lin.args[0])[:-1]), trainable)
                      for lin in linears]
        blocks.append(new_block(traced, kind, (weight,) + ((bias,) if bias is not None else ()), layer_uses,
                                {"in": in_features, "out": out_features, "gates": gates, "steps": len(linears)},
                                bias=bias is not None, sharing=sharing, layout={"transposed": False, "role": role}))
    return blocks


register_block_kind(Rnn(), before="dense")
