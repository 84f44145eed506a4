"""FX passes that curvgraph adds to Inductor's own on the step's graph (after AOT autograd).

:class:`PruneUnusedOutputs`: a library op with an ``output_mask`` argument
(``aten.convolution_backward``: gradients of the input, the weight, the bias) computes
the outputs its mask selects. AOT autograd sets the mask from what the pass it traced
asked for, not from what the rest of the step reads. The sampled Fisher's backward
(``backprop(noise)``) is a vector-Jacobian product in every parameter and every layer
output, of which the step reads the layer outputs' gradients only: each of its
convolutions still computed its weight's gradient, a second convolution as costly as the
forward one, and dead code elimination cannot drop one output of a node with three.

:class:`RecomputeForLateReaders`: a large elementwise value that a later pass of the step
reads again is computed again there from values alive anyway, instead of being kept
(:func:`recompute_for_late_readers`).
"""

from __future__ import annotations

import operator

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from curvgraph.passes.graph_utils import schema_args, set_schema_arg


def prune_unused_outputs(graph: torch.fx.Graph) -> int:
    """Clear ``output_mask[i]`` of every masked op whose ``i``-th output no node reads; returns how many
    nodes changed. A node read other than through ``operator.getitem`` with a constant index is left
    as it is; a ``getitem`` that nothing reads is removed. The node's value metadata gets ``None`` for
    each output no longer computed, as the op returns."""
    changed = 0
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        mask = schema_args(node).get("output_mask")
        if not isinstance(mask, (list, tuple)) or not all(isinstance(m, bool) for m in mask):
            continue
        if not all(user.target is operator.getitem and isinstance(user.args[1], int) for user in node.users):
            continue
        read = {user.args[1] for user in node.users if user.users}
        pruned = [bool(m) and i in read for i, m in enumerate(mask)]
        if pruned == list(mask):
            continue
        for user in [user for user in node.users if not user.users]:
            graph.erase_node(user)
        set_schema_arg(node, "output_mask", pruned)
        value = node.meta.get("val")
        if isinstance(value, (list, tuple)) and len(value) == len(pruned):
            node.meta["val"] = type(value)(v if keep else None for v, keep in zip(value, pruned))
        changed += 1
    return changed


class PruneUnusedOutputs(CustomGraphPass):
    """:func:`prune_unused_outputs` as an Inductor post-grad pass (``post_grad_custom_post_pass``),
    keyed for Inductor's caches by this file's contents."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        prune_unused_outputs(graph)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))


def recompute_for_late_readers(graph: torch.fx.Graph, gap: int = 64, min_bytes: int = 1 << 20,
                               max_ops: int = 8) -> int:
    """Compute a large elementwise value again for its late readers instead of keeping it for them; returns how
    many values got a recomputation.

    The step reads each layer's values in up to four passes: the forward, the loss's backward,
    the sampled Fisher's backward and, with ``lr="auto"``, the curvature products. In one graph
    a value is alive from the forward to its last reader. A transformer's GELU output
    ``a = gelu(h)`` (``N x T x 4d``) is read last by the curvature products, while ``h`` is kept
    until then for GELU's own derivative: both were alive at the step's peak, in the loss's
    backward. For each value of at least ``min_bytes`` made by an elementwise op
    (``torch.Tag.pointwise``, not random), its readers (through view ops) are cut into runs,
    a new run wherever two readers lie more than ``gap`` nodes apart. Each run after the
    first gets its own copy of the value, computed just before the run's first reader from
    values alive there anyway (read at or after it, or graph inputs that nothing writes
    before it) by at most ``max_ops`` elementwise ops; where that is not possible, the value
    stays as it is.

    Inductor fuses elementwise work that reads the same buffer into one kernel: the copy,
    which reads ``h``, would join an earlier kernel that reads ``h`` (GELU's derivative in
    the loss's backward) and exist from there on. So the copy is multiplied by a 0-d
    ``True`` made from one element of another input of the run's first reader
    (:func:`_times_true_after`), which exists only where that input does. Values are
    unchanged, bit for bit.
    """
    nodes = list(graph.nodes)
    position: dict[torch.fx.Node, float] = {n: i for i, n in enumerate(nodes)}
    changed = 0
    for node in nodes:
        if not _elementwise(node) or _tensor_bytes(node) < min_bytes:
            continue
        for run in _runs(node, position, gap)[1:]:
            first = run[0][0]
            ops = _recomputation(node, position[first], position, max_ops)
            read = {path[-1] if path else node for _, path in run}
            tie = max((x for x in first.all_input_nodes if x.op != "placeholder" and x not in read
                       and _tensor_bytes(x) > 0), key=position.__getitem__, default=None)
            if ops is None or tie is None:
                continue
            copies: dict[torch.fx.Node, torch.fx.Node] = {}
            with graph.inserting_before(first):
                for op in ops:
                    copies[op] = graph.node_copy(op, lambda x: copies.get(x, x))
                copies[node] = _times_true_after(graph, copies[node], tie)
                for reader, path in run:
                    for view in path:
                        if view not in copies:
                            copies[view] = graph.node_copy(view, lambda x: copies.get(x, x))
                    read_from = path[-1] if path else node
                    reader.replace_input_with(read_from, copies[read_from])
            made = first.prev
            while made not in position:  # the nodes just inserted, before ``first``
                position[made] = position[first] - 0.5
                made = made.prev
            changed += 1
    if changed:
        graph.eliminate_dead_code()
    return changed


def _elementwise(node: torch.fx.Node) -> bool:
    """Whether ``node`` is an elementwise ATen op (``torch.Tag.pointwise``) that draws no random numbers."""
    target = node.target
    return (node.op == "call_function" and isinstance(target, torch._ops.OpOverload)
            and torch.Tag.pointwise in target.tags and torch.Tag.nondeterministic_seeded not in target.tags)


def _tensor_bytes(node: torch.fx.Node) -> int:
    """The bytes of ``node``'s tensor value at the example's sizes (0 for a value that is not a tensor)."""
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return 0
    numel = value.numel()
    hint = numel if isinstance(numel, int) else numel.node.hint
    return int(hint) * value.element_size() if hint is not None else 0


def _runs(node: torch.fx.Node, position: dict[torch.fx.Node, float], gap: int
          ) -> list[list[tuple[torch.fx.Node, tuple[torch.fx.Node, ...]]]]:
    """``node``'s readers as ``(reader, views)`` (``views``: the view ops from ``node`` to the reader), in graph
    order, cut into runs wherever two readers lie more than ``gap`` nodes apart."""
    views = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.reshape.default,
             torch.ops.aten.permute.default, torch.ops.aten.t.default, torch.ops.aten.transpose.int,
             torch.ops.aten.expand.default, torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.default,
             torch.ops.aten.unsqueeze.default, torch.ops.aten.alias.default)
    readers = []
    pending: list[tuple[torch.fx.Node, tuple[torch.fx.Node, ...]]] = [(node, ())]
    while pending:
        source, path = pending.pop()
        for user in source.users:
            if user.op == "call_function" and user.target in views and user.args[0] is source:
                pending.append((user, (*path, user)))
            else:
                readers.append((user, path))
    readers.sort(key=lambda r: position[r[0]])
    runs: list[list[tuple[torch.fx.Node, tuple[torch.fx.Node, ...]]]] = []
    for reader in readers:
        if not runs or position[reader[0]] - position[runs[-1][-1][0]] > gap:
            runs.append([])
        runs[-1].append(reader)
    return runs


def _recomputation(node: torch.fx.Node, at: float, position: dict[torch.fx.Node, float], limit: int
                   ) -> list[torch.fx.Node] | None:
    """The elementwise ops that compute ``node`` again at position ``at`` from values alive there anyway (a reader
    at or after ``at``, as the graph is now), in graph order; ``None`` if that takes more than ``limit`` ops, an op
    that is not elementwise, or an input that a node before ``at`` may write into."""
    ops: list[torch.fx.Node] = []
    pending = [node]
    while pending:
        op = pending.pop()
        if op in ops:
            continue
        ops.append(op)
        if len(ops) > limit:
            return None
        for source in op.all_input_nodes:
            alive = any(position[user] >= at for user in source.users)
            if source.op in ("placeholder", "get_attr") or alive or _tensor_bytes(source) == 0:
                if any(_may_write(user) and position[user] < at for user in source.users):
                    return None
            elif _elementwise(source):
                pending.append(source)
            else:
                return None
    return sorted(ops, key=position.__getitem__)


def _may_write(node: torch.fx.Node) -> bool:
    """Whether ``node`` may write into one of its inputs: an op whose schema says so, or any call that is not an
    ATen-style op (a higher-order op such as ``torch.cond``) other than ``getitem``."""
    if node.op != "call_function" or node.target is operator.getitem:
        return False
    target = node.target
    return not isinstance(target, torch._ops.OpOverload) or target._schema.is_mutable


def _times_true_after(graph: torch.fx.Graph, value: torch.fx.Node, tie: torch.fx.Node) -> torch.fx.Node:
    """``value * (isnan(x) | (x == x))`` for ``x = tie.flatten()[0]``: ``value`` exactly (the factor is ``True`` for
    any ``x``), computed by a kernel that needs ``tie``."""
    aten = torch.ops.aten

    def call(op: torch._ops.OpOverload, *args: object) -> torch.fx.Node:
        made = graph.call_function(op, args)
        if op is aten.mul.Tensor:  # the value's shape and dtype (its fake tensor may be of another fake mode)
            made.meta["val"] = torch.empty_like(value.meta["val"])
        else:
            made.meta["val"] = op(*(a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args))
        return made

    x = call(aten.select.int, call(aten.reshape.default, tie, [-1]), 0, 0)
    true = call(aten.logical_or.default, call(aten.isnan.default, x), call(aten.eq.Tensor, x, x))
    return call(aten.mul.Tensor, value, true)


class RecomputeForLateReaders(CustomGraphPass):
    """:func:`recompute_for_late_readers` as an Inductor post-grad pass, with the settings below; keyed for
    Inductor's caches by this file's contents and the settings."""

    gap = 64
    min_bytes = 1 << 20
    max_ops = 8

    def __call__(self, graph: torch.fx.Graph) -> None:
        recompute_for_late_readers(graph, self.gap, self.min_bytes, self.max_ops)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,)) + repr((self.gap, self.min_bytes, self.max_ops)).encode()
