"""Random ops of the forward draw once per step (:mod:`curvgraph.passes.draws`).

The adaptive step (``lr="auto"``, the default) evaluates the loss again at the trial parameters and rejects a
step that raises it. With dropout drawn anew in that forward, the comparison is between two different
functions, and steps the model would accept were rejected at random.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import curvgraph
from curvgraph.passes.draws import draws_from_inputs


def rejected_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 8) -> int:
    """Steps of the default (adaptive) K-FAC step, scaled by 1e-6, that left the parameters unchanged. A step that small
    lowers the loss of the function it was computed for: in float64 no rounding can hide the decrease."""
    opt = curvgraph.compile(model, (x,), backend="eager", progress=False)
    opt.param_groups[0]["lr"] = 1e-6  # a multiplier on the quadratic model's step
    rejected = 0
    for _ in range(steps):
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(x, y)
        rejected += all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    return rejected


@pytest.mark.parametrize("case", ["dropout", "attention-dropout", "noise"])
def test_the_trial_forward_sees_the_same_random_draws(case):
    torch.manual_seed(0)
    if case == "dropout":
        model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))
        x = torch.randn(16, 10)
    elif case == "attention-dropout":  # the attention's own dropout and the layer's
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.5, batch_first=True)
        model = nn.Sequential(layer, nn.Flatten(), nn.Linear(5 * 8, 3))
        x = torch.randn(16, 5, 8)
    else:
        class Noisy(nn.Module):  # reparameterized noise and a Bernoulli gate
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Linear(10, 16), nn.Linear(16, 3)

            def forward(self, x):
                h = self.a(x)
                h = h + torch.randn_like(h) * 0.5 + torch.rand_like(h)
                return self.b(h * torch.bernoulli(torch.full_like(h, 0.7)))

        model = Noisy()
        x = torch.randn(16, 10)
    model.double()
    x, y = x.double(), torch.randint(0, 3, (16,))
    assert rejected_steps(model, x, y) == 0


def test_dropout_in_the_step_keeps_its_distribution():
    """The rewritten dropout keeps where the drawn keep mask ``u >= p`` is true (probability 1 - p), scales what it
    keeps by 1/(1 - p) and returns the mask, as ``aten.native_dropout`` does."""
    p = 0.3
    graph = make_fx(lambda x: torch.ops.aten.native_dropout.default(x, p, True))(torch.ones(400, 250)).graph
    draws, placeholders = draws_from_inputs(graph)
    assert [(d.shape, d.dtype, d.normal, d.keep_above) for d in draws] == [((400, 250), torch.float32, False, p)]
    names = [n.name for n in graph.nodes if n.op == "placeholder"]
    rewritten = torch.fx.GraphModule({}, graph)
    x, u = torch.randn(400, 250), torch.rand(400, 250)
    arguments = {placeholders[0].name: u >= p, next(n for n in names if n != placeholders[0].name): x}  # as drawn
    output, keep = rewritten(*(arguments[n] for n in names))
    assert torch.equal(keep, u >= p)
    torch.testing.assert_close(output, x * keep / (1 - p))
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01  # 1e5 elements: the standard error is 0.0015
    torch.manual_seed(0)
    reference = F.dropout(torch.ones(400, 250), p)
    assert abs((reference != 0).float().mean().item() - keep.float().mean().item()) < 0.01


def test_dropout_in_eval_mode_draws_nothing():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).eval()
    x = torch.randn(6, 4)
    opt = curvgraph.compile(model, (x,), backend="eager", progress=False)
    assert "draws = (" not in opt.source
    model.train()
    opt.step(x, torch.randint(0, 3, (6,)))
    assert "draws = (" in opt.source and "native_dropout" in opt.source


def test_attention_dropout_in_the_step_is_the_ops_own_with_that_mask():
    """Attention's own dropout, rewritten: the weights at ``dropout_p=0`` masked and scaled, times ``v``, equals the math
    op's dropout with the same keep mask (the op's ``dropout_mask`` argument, meant for testing)."""
    p = 0.25
    math = torch.ops.aten._scaled_dot_product_attention_math.default
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 4)
    graph = torch.fx.Graph()  # the op as the attention pass writes it (make_fx would decompose it)
    inputs = []
    for name, value in zip("qkv", (q, k, v)):
        inputs.append(graph.placeholder(name))
        inputs[-1].meta["val"] = value
    attention = graph.call_function(math, (*inputs, None, p, False))
    graph.output(graph.call_function(operator.getitem, (attention, 0)))
    draws, placeholders = draws_from_inputs(graph)
    assert [(d.shape, d.keep_above) for d in draws] == [((2, 3, 5, 6), p)]
    names = [n.name for n in graph.nodes if n.op == "placeholder"]
    u = torch.rand(2, 3, 5, 6)
    given = dict(zip([n for n in names if n != placeholders[0].name], (q, k, v)), **{placeholders[0].name: u >= p})
    output = torch.fx.GraphModule({}, graph)(*(given[n] for n in names))
    expected = math(q, k, v, None, p, False, u >= p)[0]
    torch.testing.assert_close(output, expected)
