"""Train/eval mode and frozen parameters behave as in PyTorch.

The step runs the model in the modes its modules are in when it is called: train mode
(the default) applies dropout and BatchNorm's batch statistics and updates its running
statistics; eval mode turns dropout off and normalizes with the running statistics, which it
leaves alone. The model is captured once per set of modes it is stepped in; the captures
share the optimizer state (one schedule, one checkpoint) and, when the modes do not change
the graph, the compiled step. A parameter frozen or unfrozen since the capture is a clear
error instead of a silent mismatch.
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
    close_to(opt.step(x, y), expected)  # dropout off, running statistics: deterministic
    assert torch.equal(model[1].running_mean, running[0]) and torch.equal(model[1].running_var, running[1])
    assert [b.name for b in opt.plan.blocks] == ["0", "1", "4"]
    assert not model.training


def close_to(loss: torch.Tensor, expected: torch.Tensor) -> None:
    """The step's loss is the reference forward's up to the order of its sums (``rtol=1e-6``): with dropout (p=0.5)
    or batch statistics instead of the running ones, it differs by far more."""
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)


def eval_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The model's own loss in eval mode (its mode is left as it was)."""
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        return F.cross_entropy(reference(x), y)


def counting_captures(opt) -> list[int]:
    """Count the optimizer's captures of the model (one entry each)."""
    captures, capture = [], opt._capture_fn
    opt._capture_fn = lambda *args: captures.append(1) or capture(*args)
    return captures


def test_the_step_follows_model_eval_and_model_train_after_the_capture():
    model = model_with_modes()
    x, y = batch()
    opt = curvgraph.compile(model, (x,), backend="eager")
    captures = counting_captures(opt)
    bn = model[1]
    opt.step(x, y)
    model.eval()
    running, weight = (bn.running_mean.clone(), bn.running_var.clone()), model[0].weight.clone()
    expected = eval_loss(model, x, y)
    close_to(opt.step(x, y), expected)  # dropout off (p=0.5), running statistics: the eval graph
    assert torch.equal(bn.running_mean, running[0]) and torch.equal(bn.running_var, running[1])
    assert not torch.equal(model[0].weight, weight)  # a step in eval mode still trains
    assert not model.training and captures == [1]
    model.train()
    opt.step(x, y)
    assert not torch.equal(bn.running_mean, running[0])  # the train graph again: batch statistics, running update
    model.eval()
    expected = eval_loss(model, x, y)
    close_to(opt.step(x, y), expected)
    assert captures == [1] and opt.state_dict()["step_count"] == 4  # one capture per modes, one schedule


def test_the_modes_share_the_optimizer_state_and_its_checkpoint():
    model = model_with_modes()
    x, y = batch()
    opt = curvgraph.compile(model, (x,), backend="eager", seed=0)
    opt.step(x, y)
    after_train = opt.factors()["4"]["A"]
    model.eval()
    opt.step(x, y)
    assert not torch.equal(opt.factors()["4"]["A"], after_train)  # the eval step updated the same factors
    saved, twin = opt.state_dict(), copy.deepcopy(model).train()
    resumed = curvgraph.compile(twin, (x,), backend="eager")
    resumed.load_state_dict(saved)
    for mode in ("train", "eval"):  # the state saved in eval mode continues in both modes, in both optimizers
        getattr(model, mode)(), getattr(twin, mode)()
        losses = []
        for optimizer in (opt, resumed):
            torch.manual_seed(5)  # the same dropout masks
            losses.append(optimizer.step(x, y))
        assert torch.equal(*losses)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


def test_modes_that_do_not_change_the_graph_share_its_step():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3))
    x, y = batch()
    opt = curvgraph.compile(model, (x,), backend="eager")
    model.eval()
    assert torch.isfinite(opt.step(x, y))
    assert len(opt._captures) == 2 and len(opt._steps) == 1  # captured in eval mode too, the same step: compiled once


def test_capture_in_the_current_modes_and_again_is_an_error():
    model = model_with_modes()
    x, y = batch()
    opt = curvgraph.compile(model, (x,), backend="eager")
    model.eval()
    opt.capture(x)
    expected = eval_loss(model, x, y)
    close_to(opt.step(x, y), expected)
    with pytest.raises(curvgraph.ConfigError, match=r"captured already in these modes \(eval mode\)"):
        opt.capture(x)


class ExtraInTraining(nn.Module):
    """A layer that only runs in train mode (its parameters have no block in eval mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.extra, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.head(self.extra(h) if self.training else h)


def test_modes_whose_graph_has_other_blocks_are_an_error_naming_them():
    torch.manual_seed(4)
    model = ExtraInTraining()
    x, y = batch()
    opt = curvgraph.compile(model, (x,), backend="eager")
    model.eval()
    model.head.train()
    with pytest.raises(curvgraph.ConfigError, match=r"in its current modes \(eval mode, 'head' in train mode\) captures "
                                                    r"to other blocks .*then \['body \(dense\)', 'extra"):
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


@pytest.mark.parametrize("change, match", [
    (lambda m: m.__setitem__(2, nn.Linear(8, 3)), r"parameter '2.weight' is another Parameter object"),
    (lambda m: setattr(m[2], "bias", nn.Parameter(torch.zeros(3))), r"parameter '2.bias' is another Parameter object"),
    (lambda m: delattr(m[2], "bias") or m[2].register_parameter("bias", None), r"parameter '2.bias' was removed"),
    (lambda m: m.double(), r"parameter '0.weight' is torch.float64 on cpu but was torch.float32"),
], ids=["module-replaced", "parameter-replaced", "parameter-removed", "model-cast"])
def test_changing_the_model_s_parameters_after_compile_is_an_error(change, match):
    """The step holds the captured Parameter objects, dtypes and devices: it would train the old ones, or fail."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = batch()
    opt = curvgraph.compile(model, (x,), backend="eager")
    opt.step(x, y)
    change(model)
    with pytest.raises(curvgraph.InputError, match=match + ".* Compile again"):
        opt.step(x.to(next(model.parameters()).dtype), y)


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
