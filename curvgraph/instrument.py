"""Instrumentation: rewrite the graph so one forward also exposes ``a`` and, under
``torch.func.vjp``, ``g`` for every curvature block.

For every use of a block (a layer application), the rewrite

* adds a zero *probe* ``p`` to the layer output, ``y' = y + p``: the vjp of the
  forward with respect to ``p`` is the output gradient ``g = dL/dy``, for any
  cotangent pulled back through the model, in the same backward pass that yields the
  parameter gradients;
* returns the layer input ``a`` as auxiliary output.

Its random ops read their noise from *draws* the step makes once per step
(:mod:`curvgraph.passes.draws`), so that every call of the model in one step is the same function.

The instrumented forward returns ``(output, (buffer_updates, activations))`` and takes
``(*params, *frozen, *buffers, *constants, *probes, *draws, *inputs)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from .errors import TraceError
from .passes.draws import Draw, draws_from_inputs
from .passes.forms import STEP_REWRITES
from .plan import Plan, Shape
from .trace import TracedModel, symbolic_shape

aten = torch.ops.aten


@dataclass(frozen=True)
class Probe:
    """A zero tensor added to a layer output: its node, symbolic shape and dtype."""

    node: str
    shape: Shape
    dtype: torch.dtype


@dataclass
class InstrumentedForward:
    """The rewritten forward as Python source, and the order of its arguments and outputs.

    Attributes:
        source: ``def forward(...)`` (FX-generated code, runs with torch alone).
        globals: names the source needs besides ``torch`` (e.g. ``inf``), with values.
        params, frozen, buffers, constants, inputs: placeholder names in argument order.
        names: parameter/buffer placeholder -> the model's name for it.
        param_shapes: trainable-parameter placeholder -> (shape, dtype).
        probes: the probes, one per probed layer-output node, in argument order;
            ``probe_index[node]`` finds one.
        draws: the random values the step draws for the forward's random ops, in argument order.
        activations: layer-input nodes returned, each once; ``activation_index[node]``
            finds one.
        buffer_updates: buffer placeholders whose new values are returned, in order.
        output_shape: symbolic shape of the model output.
    """

    source: str
    globals: dict[str, object]
    params: list[str]
    names: dict[str, str]
    param_shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]
    frozen: list[str]
    buffers: list[str]
    constants: list[str]
    inputs: list[str]
    probes: list[Probe]
    draws: list[Draw]
    activations: list[str]
    buffer_updates: list[str]
    output_shape: Shape

    @property
    def probe_index(self) -> dict[str, int]:
        return {p.node: i for i, p in enumerate(self.probes)}

    @property
    def activation_index(self) -> dict[str, int]:
        return {a: i for i, a in enumerate(self.activations)}


def instrument(traced: TracedModel, plan: Plan) -> InstrumentedForward:
    """Copy ``traced.graph`` with probes and activation outputs for every block use."""
    graph = Graph()
    nodes: dict[str, Node] = {}
    value_map: dict[Node, Node] = {}
    graph.graph_copy(traced.graph, value_map)
    for old, new in value_map.items():
        nodes[old.name] = new

    probes: list[Probe] = []
    probe_nodes: list[Node] = []
    probed_value: dict[Node, Node] = {}
    activations: list[str] = []
    for block in plan.blocks:
        for use in block.uses:
            for name in use.outputs:
                layer = nodes[name]
                if layer in probed_value:
                    continue
                value = layer.meta["val"]
                with graph.inserting_after(layer):
                    probe = graph.placeholder(f"probe_{len(probes)}")
                probe.meta["val"] = value
                with graph.inserting_after(layer):
                    probed = graph.call_function(aten.add.Tensor, (layer, probe))
                probed.meta.update(layer.meta)
                layer.replace_all_uses_with(probed, delete_user_cb=lambda user: user is not probed)
                probed_value[layer] = probed
                probes.append(Probe(name, symbolic_shape(layer), value.dtype))
                probe_nodes.append(probe)
            for name in use.inputs:
                if name not in activations:
                    activations.append(name)

    def value(name: str) -> Node:  # a probed layer's consumers see its probed output
        node = nodes[name]
        return probed_value.get(node, node)

    output = value(traced.output.name)
    output_shape = symbolic_shape(output)
    updates = [value(traced.returned(traced.buffer_updates[b]).name) for b in traced.buffers if b in traced.buffer_updates]
    graph.output((output, (tuple(updates), tuple(value(a) for a in activations))))
    draws, draw_nodes = draws_from_inputs(graph)  # after the output: a random op's result may be returned
    order = (
        [nodes[n] for n in traced.params]
        + [nodes[n] for n in traced.frozen]
        + [nodes[n] for n in traced.buffers]
        + [nodes[n] for n in traced.constants]
        + probe_nodes
        + draw_nodes
        + [nodes[s.name] for s in traced.inputs]
    )
    _move_placeholders_first(graph, order)
    for rewrite in STEP_REWRITES:
        rewrite(graph)
    graph.eliminate_dead_code()
    graph.lint()

    attributes = [n for n in graph.nodes if n.op in ("get_attr", "call_module", "call_method")]
    if attributes:
        raise TraceError(f"curvgraph: the instrumented forward still reads module attribute '{attributes[0].target}' "
                         f"(node '{attributes[0].name}'); please report this model.")
    code = graph.python_code(root_module="self")
    source = code.src.replace("def forward(self, ", "def forward(", 1).strip() + "\n"
    return InstrumentedForward(
        source=source,
        globals={k: v for k, v in code.globals.items() if k != "torch"},
        params=list(traced.params),
        names={**traced.params, **traced.frozen, **traced.buffers},
        param_shapes={p: (tuple(nodes[p].meta["val"].shape), nodes[p].meta["val"].dtype) for p in traced.params},
        frozen=list(traced.frozen),
        buffers=list(traced.buffers),
        constants=list(traced.constants),
        inputs=[s.name for s in traced.inputs],
        probes=probes,
        draws=draws,
        activations=activations,
        buffer_updates=[b for b in traced.buffers if b in traced.buffer_updates],
        output_shape=output_shape,
    )


def _move_placeholders_first(graph: Graph, order: list[Node]) -> None:
    """Put the placeholders in ``order`` at the top of the graph, in that order."""
    head = next(n for n in graph.nodes if n.op != "placeholder")
    for node in order:
        head.prepend(node)
