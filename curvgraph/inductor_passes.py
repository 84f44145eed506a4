"""An FX pass that curvgraph adds to Inductor's own on the step's graph (after AOT autograd).

:class:`PruneUnusedOutputs`: a library op with an ``output_mask`` argument
(``aten.convolution_backward``: gradients of the input, the weight, the bias) computes
the outputs its mask selects. AOT autograd sets the mask from what the pass it traced
asked for, not from what the rest of the step reads. The sampled Fisher's backward
(``backprop(noise)``) is a vector-Jacobian product in every parameter and every layer
output, of which the step reads the layer outputs' gradients only: each of its
convolutions still computed its weight's gradient, a second convolution as costly as the
forward one, and dead code elimination cannot drop one output of a node with three.
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
