"""Train/eval mode and frozen parameters behave as in PyTorch.

The step runs the graph captured in the modes the modules were in at ``compile``: train mode
(the default) applies dropout and BatchNorm's batch statistics and updates its running
statistics; eval mode turns dropout off and normalizes with the running statistics, which it
leaves alone. A mode-dependent module in another mode at ``step``, or a parameter frozen or
unfrozen since ``compile``, is a clear error instead of a silent mismatch.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph


def model_with_modes() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)


def test_train_mode_step_applies_dropout_and_batch_statistics():
    model = model_with_modes()
    x, y = batch()
    reference = copy.deepcopy(model).eval()
    opt = curvgraph.compile(model, (x,), backend="eager")
    running = model[1].running_mean.clone()
    loss = opt.step(x, y)
    assert loss != F.cross_entropy(reference(x), y)  # dropout on, batch statistics
    assert not torch.equal(model[1].running_mean, running)
    assert model.training


def test_eval_mode_step_is_the_eval_forward_and_keeps_running_statistics():
    model = model_with_modes().eval()
    x, y = batch()
    reference = copy.deepcopy(model)
    opt = curvgraph.compile(model, (x,), backend="eager")
    running = (model[1].running_mean.clone(), model[1].running_var.clone())
    with torch.no_grad():
        expected = F.cross_entropy(reference(x), y)
    assert torch.equal(opt.step(x, y), expected)  # dropout off, running statistics: deterministic
    assert torch.equal(model[1].running_mean, running[0]) and torch.equal(model[1].running_var, running[1])
    assert [b.name for b in opt.plan.blocks] == ["0", "1", "4"]
    assert not model.training


def test_a_mode_change_since_compile_is_an_error_and_switching_back_works():
    model = model_with_modes()
    x, y = batch()
    opt = curvgraph.compile(model, (x,), backend="eager")
    model.eval()
    with pytest.raises(curvgraph.InputError, match=r"module '1' \(BatchNorm1d\) in train mode .* Call model.train\(\)"):
        opt.step(x, y)
    model.train()
    assert torch.isfinite(opt.step(x, y))


def test_compile_keeps_each_modules_mode():
    model = model_with_modes()
    model[1].eval()  # frozen BatchNorm statistics inside a model in train mode
    x, y = batch()
    opt = curvgraph.compile(model, (x,), backend="eager")
    assert model.training and model[3].training and not model[1].training
    running = model[1].running_mean.clone()
    opt.step(x, y)
    assert torch.equal(model[1].running_mean, running)


def test_a_model_without_mode_dependent_modules_steps_in_either_mode():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3))
    x, y = batch()
    opt = curvgraph.compile(model, (x,), backend="eager")
    model.eval()
    assert torch.isfinite(opt.step(x, y))


def test_freezing_a_parameter_after_compile_is_an_error_and_a_new_compile_respects_it():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = batch()
    opt = curvgraph.compile(model, (x,), backend="eager")
    model[0].weight.requires_grad_(False)
    with pytest.raises(curvgraph.InputError, match=r"parameter '0.weight' has requires_grad=False .* Compile again"):
        opt.step(x, y)
    opt = curvgraph.compile(model, (x,), backend="eager")
    assert {b.name: b.kind for b in opt.plan.blocks} == {"0.bias": "bias", "2": "dense"}
    frozen = model[0].weight.clone()
    opt.step(x, y)
    assert torch.equal(model[0].weight, frozen)
    model[0].weight.requires_grad_(True)  # unfreezing: also a new compile
    with pytest.raises(curvgraph.InputError, match="requires_grad=True"):
        opt.step(x, y)
