"""The FX pass curvgraph adds to Inductor's: outputs of ``output_mask`` ops that nothing reads are not computed."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import curvgraph
from curvgraph.inductor_passes import PruneUnusedOutputs, prune_unused_outputs

aten = torch.ops.aten
STRIDE, PADDING, DILATION = [1, 1], [1, 1], [1, 1]


def conv_grads(mask, read):
    """``f(g, x, w)``: the gradients ``read`` (indices) of a ``3 x 3`` convolution, computed with ``mask``."""
    def f(g, x, w):
        grads = aten.convolution_backward(g, x, w, [4], STRIDE, PADDING, DILATION, False, [0, 0], 1, mask)
        return tuple(grads[i] for i in read)
    return f


def masks(gm: torch.fx.GraphModule) -> list[list[bool]]:
    return [list(n.args[-1]) for n in gm.graph.nodes if n.target is aten.convolution_backward.default]


@pytest.fixture
def operands():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 3, 5, 5, generator=g),
            torch.randn(4, 3, 3, 3, generator=g))


@pytest.mark.parametrize("read, pruned", [((0,), [True, False, False]), ((1,), [False, True, False]),
                                          ((2, 0), [True, False, True]), ((0, 1, 2), [True, True, True])])
def test_outputs_nothing_reads_are_masked_off_with_the_same_values(operands, read, pruned):
    gm = make_fx(conv_grads([True, True, True], read))(*operands)
    expected = gm(*operands)
    assert prune_unused_outputs(gm.graph) == int(pruned != [True, True, True])
    gm.recompile()
    assert masks(gm) == [pruned]
    for node in gm.graph.nodes:  # the value metadata says what the op now returns
        if node.target is aten.convolution_backward.default:
            assert [v is not None for v in node.meta["val"]] == pruned
    for a, b in zip(gm(*operands), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_node_read_whole_is_left_as_it_is(operands):
    def f(g, x, w):
        grads = aten.convolution_backward(g, x, w, [4], STRIDE, PADDING, DILATION, False, [0, 0], 1,
                                          [True, True, False])
        return grads[0], grads

    gm = make_fx(f)(*operands)
    assert prune_unused_outputs(gm.graph) == 0
    assert masks(gm) == [[True, True, False]]


def test_the_pass_is_keyed_for_inductors_caches():
    """Inductor's FX graph cache bypasses a graph compiled with a custom pass that has no ``uuid``."""
    key = PruneUnusedOutputs().uuid()
    assert isinstance(key, bytes) and key and key == PruneUnusedOutputs().uuid()


def two_convolutions() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 3, 3, padding=1), nn.Tanh(),
                         nn.Flatten(), nn.Linear(3 * 4 * 4, 4))


def test_the_sampled_fishers_backward_computes_no_weight_gradient():
    """In the step's graph (after AOT autograd, where Inductor runs the pass), the second convolution's
    backward in the sampled Fisher's pass computed its weight's gradient, which nothing reads; pruned, the
    weight gradients are computed once per convolution (the loss's backward), and the step is unchanged."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.registry import register_backend

    seen = []

    def pruned_forward(gm: torch.fx.GraphModule, _):
        before = masks(gm)
        changed = prune_unused_outputs(gm.graph)
        gm.recompile()
        seen.append((before, changed, masks(gm)))
        return gm.forward

    name = f"curvgraph_prune_check_{id(pruned_forward):x}"
    register_backend(name=name)(aot_autograd(fw_compiler=pruned_forward))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 2, 4, 4, generator=g), torch.randint(0, 4, (6,), generator=g)) for _ in range(3)]
    models = {backend: two_convolutions() for backend in (name, "eager")}
    opts = {backend: curvgraph.compile(model, (batches[0][0],), backend=backend, lr=0.05, invert_every=1,
                                       progress=False)  # the fixed step: every step is taken
            for backend, model in models.items()}
    for x, y in batches:
        losses = [opt.step(x, y) for opt in opts.values()]
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for a, b, initial in zip(models[name].parameters(), models["eager"].parameters(), two_convolutions().parameters(),
                             strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(a, initial, rtol=0, atol=1e-4)  # the steps moved every parameter
    (before, changed, after), = [s for s in seen if s[0]]  # the step's graph: the one with convolutions
    weight_gradients = sum(m[1] for m in after)
    assert changed == 1 and sum(m[1] for m in before) == 3 and weight_gradients == 2
