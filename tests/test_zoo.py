"""A zoo of architectures (tests/zoo.py) compiles, its plan accounts for every parameter, and the defaults train it.

For every model: ``curvgraph.compile`` at its defaults (eager backend: the generated step
is the same source ``torch.compile`` compiles; test_compiled.py covers compilation) captures
it; every trainable parameter is in a curvature block or in the fallback with a reason,
every frozen one is listed as frozen; and 50 steps on minibatches of a fixed training set
lower the training loss (whole set, eval mode) without it ever exceeding 1.5x its initial
value.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import curvgraph
from helpers import assert_plan_covers
from zoo import ZOO

LOSSES = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss,
          "token_cross_entropy": lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten())}


def predict(model: torch.nn.Module, inputs, output=None) -> torch.Tensor:
    """The model's prediction on positional (tuple) or keyword (dict) inputs, picked as ``output=`` would."""
    result = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    if output is None:
        return result
    return result[output] if isinstance(output, int) or isinstance(result, dict) else getattr(result, output)


def training_loss(model: torch.nn.Module, inputs, targets: torch.Tensor, loss: str, output=None) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        value = LOSSES[loss](predict(model, inputs, output), targets).item()
    model.train(was_training)
    return value


def select(inputs, rows: torch.Tensor, batch_dim: int):
    """The rows ``rows`` of every input (a tuple or a dict of tensors)."""
    if isinstance(inputs, dict):
        return {k: v.index_select(batch_dim, rows) for k, v in inputs.items()}
    return tuple(x.index_select(batch_dim, rows) for x in inputs)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_compiles_covers_and_trains(name):
    case = ZOO[name]
    torch.manual_seed(0)
    model = case.make()
    inputs, targets = case.data(torch.Generator().manual_seed(1))
    batch_dim = 1 if name.endswith("time-major") else 0
    examples = targets.shape[0]
    g = torch.Generator().manual_seed(2)
    order = torch.cat([torch.randperm(examples, generator=g) for _ in range(32 * 50 // examples + 1)])

    def batch(i: int):
        rows = order[32 * i: 32 * (i + 1)]
        return select(inputs, rows, batch_dim), targets[rows]

    opt = curvgraph.compile(model, batch(0)[0], loss=case.loss, backend="eager", seed=0, output=case.output)
    assert_plan_covers(opt.plan, model)

    initial = training_loss(model, inputs, targets, case.loss, case.output)
    losses = []
    for i in range(50):
        x, y = batch(i)
        opt.step(x, y)
        if i % 5 == 4:
            losses.append(training_loss(model, inputs, targets, case.loss, case.output))
    assert losses[-1] < initial and max(losses) <= 1.5 * initial, (initial, losses)
