"""Bad input gets a curvgraph error that names the culprit; non-finite steps change nothing."""

from __future__ import annotations

import copy
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import curvgraph


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(40, 16), nn.Tanh(), nn.Linear(16, 10))


X = torch.randn(8, 40)


@pytest.mark.parametrize(
    "loss, match",
    [
        ("hinge", "unsupported loss 'hinge'"),
        (nn.L1Loss(), "unsupported loss L1Loss"),
        (nn.CrossEntropyLoss(reduction="none"), "reduction=.none."),
        (nn.CrossEntropyLoss(label_smoothing=0.1), "label smoothing"),
    ],
)
def test_unsupported_loss(loss, match):
    with pytest.raises(curvgraph.ConfigError, match=match):
        curvgraph.compile(mlp(), (X,), loss=loss, backend="eager")


@pytest.mark.parametrize(
    "options, match",
    [
        ({"learning_rate": 0.1}, "unknown option"),
        ({"lr": -1.0}, "lr must be a positive finite number"),
        ({"damping": float("inf")}, "damping must be a positive finite number, got inf"),
        ({"momentum": 1.5}, r"momentum must be in \[0, 1\)"),
        ({"damping_decay": 0.0}, r"damping_decay must be in \(0, 1\]"),
        ({"damping_decay": 1.05}, r"damping_decay must be in \(0, 1\]"),
        ({"fisher": "exact"}, "fisher must be one of"),
        ({"invert_every": 0}, "invert_every must be a positive integer"),
        ({"fallback": "rmsprop"}, "fallback must be one of"),
        ({"dynamic": True}, r"dynamic must be one of \['all', 'batch'\]"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(curvgraph.ConfigError, match=match):
        curvgraph.compile(mlp(), (X,), backend="eager", **options)


def test_unknown_method():
    with pytest.raises(curvgraph.ConfigError, match="method must be one of"):
        curvgraph.compile(mlp(), (X,), method="newton", backend="eager")


def test_wrong_example_inputs_name_the_module():
    with pytest.raises(curvgraph.ConfigError, match=r"first batch given to step\) \[\(8, 30\) torch.float32\] in module '0' \(Linear\)") as info:
        curvgraph.compile(mlp(), (torch.randn(8, 30),), backend="eager")
    assert "[8, 30]" in str(info.value) and not re.search(r"\bs\d+\b", str(info.value))  # sizes, not symbols


def test_example_inputs_must_be_tensors():
    with pytest.raises(curvgraph.ConfigError, match="example_inputs must be a tensor"):
        curvgraph.compile(mlp(), [[1.0, 2.0]], backend="eager")


def test_model_must_return_one_tensor():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x), x

    with pytest.raises(curvgraph.ConfigError, match=r"one prediction tensor, but Two returned a tuple of 2 .*output=0"):
        curvgraph.compile(Two(), (torch.randn(3, 4),), backend="eager")


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:
            return h
        return -h


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = DataDependent()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.inner(x))


def test_untraceable_model_names_module_and_line(capfd):
    with pytest.raises(curvgraph.TraceError) as info:
        curvgraph.compile(Outer(), (torch.randn(3, 4),), backend="eager")
    message = str(info.value)
    assert "module 'inner'" in message
    assert "test_errors.py" in message and "if h.sum() > 0:" in message
    assert "torch.where" in message
    assert "leaf_modules=['inner']" in message  # the other option: keep the module opaque
    assert "Traceback" not in capfd.readouterr().err  # export's own dumps are not printed


class NumpyMask(nn.Module):
    """A mask built with numpy from the batch size (as Hugging Face's Wav2Vec2 builds its SpecAugment mask): numpy holds
    the symbolic size as a Python object, and fails."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        n = x.shape[0]
        keep = np.ones((n, 4), dtype=bool)
        np.put_along_axis(keep, np.array([[n - n]] * n), False, axis=1)
        return self.head(self.inner(x) * torch.from_numpy(keep))


def test_numpy_in_the_forward_is_named_as_such():
    """An error raised inside numpy while the model is captured is a TraceError that says numpy met symbolic sizes,
    not a complaint about the inputs."""
    with pytest.raises(curvgraph.TraceError) as info:
        curvgraph.compile(NumpyMask(), (torch.randn(3, 4),), backend="eager")
    message = str(info.value)
    assert "IndexError in numpy" in message and "np.put_along_axis(keep" in message
    assert "symbolic" in message and "inputs it was captured from" not in message


def test_non_finite_batch_is_skipped_and_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 10))
    # a fixed step size: every finite step moves the weights (an adaptive step may be declined)
    opt = curvgraph.compile(model, (X,), backend="eager", lr=0.01)
    y = torch.randint(0, 10, (8,))
    opt.step(X, y)
    params = copy.deepcopy(model.state_dict())
    state = opt.state_dict()
    bad = X.clone()
    bad[3, 7] = float("nan")
    with pytest.warns(curvgraph.NonFiniteStepWarning, match="step 2 skipped"):
        loss = opt.step(bad, y)
    assert not torch.isfinite(loss)
    assert opt.skipped_steps == 1 and opt.state_dict()["skipped_steps"] == 1
    for key, value in model.state_dict().items():
        assert torch.equal(value, params[key]), key
    for key, value in opt.state_dict()["state"].items():
        assert torch.equal(value, state["state"][key]), key
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(X, y)
    assert not torch.equal(model[0].weight, params["0.weight"])


def test_state_dict_of_another_model_is_rejected():
    opt = curvgraph.compile(mlp(), (X,), backend="eager")
    other = curvgraph.compile(nn.Sequential(nn.Linear(40, 10)), (X,), backend="eager")
    with pytest.raises(curvgraph.ConfigError, match="does not match"):
        opt.load_state_dict(other.state_dict())


def test_state_dict_with_non_finite_state_is_rejected_and_leaves_the_state_alone():
    """A step commits only finite state, so a non-finite entry means a damaged checkpoint: loaded, it would make
    every later step non-finite (and skipped). It is rejected by name, before anything is loaded."""
    opt = curvgraph.compile(mlp(), (X,), backend="eager", lr=0.01)
    y = torch.randint(0, 10, (8,))
    opt.step(X, y)
    saved = opt.state_dict()
    damaged = copy.deepcopy(saved)
    key = sorted(damaged["state"])[0]
    damaged["state"][key].view(-1)[0] = float("inf")
    with pytest.raises(curvgraph.ConfigError, match=rf"state '{re.escape(key)}' holds non-finite values"):
        opt.load_state_dict(damaged)
    for name, value in opt.state_dict()["state"].items():
        assert torch.equal(value, saved["state"][name]), name
    opt.load_state_dict(saved)  # the undamaged one loads


class RadialBasis(nn.Module):
    """Distances to learned centres by ``torch.cdist``, which has neither a derivative of its backward nor forward
    mode in torch 2.13."""

    def __init__(self) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(5, 4))

    def forward(self, x):
        return torch.exp(-torch.cdist(x, self.centers) ** 2)


def test_a_model_without_curvature_products_is_told_to_use_a_fixed_step_size():
    """``lr="auto"`` needs ``J v``; where neither way to take it works, compile says so (it was torch's
    ``NotImplementedError`` from the first step) and the fixed-step mode it recommends trains."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), RadialBasis(), nn.Linear(5, 2))
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    with pytest.raises(curvgraph.ConfigError, match=r"curvgraph: lr='auto'.*_cdist_forward.*lr=2e-3"):
        curvgraph.compile(model, x, backend="eager", progress=False)
    opt = curvgraph.compile(model, x, lr=2e-3, backend="eager", progress=False)
    losses = [opt.step(x, y).item() for _ in range(5)]
    assert losses[-1] < losses[0]


class RenormalizedEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.c = nn.Embedding(20, 8, max_norm=1.0), nn.Linear(8, 3)

    def forward(self, ids):
        return self.c(self.e(ids).mean(1))


def test_a_forward_that_writes_a_parameter_in_place_names_it_and_the_leaf_module_way_out():
    torch.manual_seed(3)
    model, ids, y = RenormalizedEmbedding(), torch.randint(0, 20, (8, 5)), torch.randint(0, 3, (8,))
    with pytest.raises(curvgraph.TraceError, match=r"forward writes into its parameter 'e\.weight' in place .*"
                                                   r"leaf_modules=\['e'\]"):
        curvgraph.compile(model, (ids,), backend="eager")
    opt = curvgraph.compile(model, (ids,), backend="eager", leaf_modules=["e"])  # the way out the message names
    assert torch.isfinite(opt.step(ids, y)) and opt.plan.fallback_params == ("e.weight",)


class StraightThrough(torch.autograd.Function):
    """``round`` forward, identity backward: not the derivative of its forward."""

    @staticmethod
    def forward(x):
        return torch.round(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad


class Quantize(nn.Module):
    def forward(self, x):
        return StraightThrough.apply(x)


def test_an_autograd_function_in_forward_is_named_and_a_leaf_module_keeps_its_backward():
    """torch.export captures a Function's forward (``round``, zero derivative) and drops its backward: the warning
    says so; as a leaf module the function runs with its own backward, and the layer before it trains."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    moved = {}
    for leaves in (None, ["1"]):
        model = nn.Sequential(nn.Linear(4, 8), Quantize(), nn.Linear(8, 3))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = curvgraph.compile(model, (x,), backend="eager", lr=1e-2, momentum=0.0, kl_clip=None,
                                    leaf_modules=leaves)
        named = [w for w in caught if "torch.autograd.Function" in str(w.message)]
        assert len(named) == (leaves is None) and all("StraightThrough" in str(w.message) for w in named)
        before = model[0].weight.detach().clone()
        opt.step(x, y)
        moved[leaves is None] = (model[0].weight - before).abs().max().item()
    assert moved[True] == 0.0 < moved[False]


class OldStyleTanh(torch.autograd.Function):
    """``forward(ctx, x)`` without ``setup_context`` (as BLOOM's ``GeLUFunction``): ``torch.func`` rejects it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1 - torch.tanh(x) ** 2)


class OldStyleActivation(nn.Module):
    def forward(self, x):
        return OldStyleTanh.apply(x)


def test_lr_auto_takes_a_model_with_an_old_style_autograd_function():
    """The check that the curvature products can be taken runs the model as captured, the function's forward
    inlined; before, torch.func's refusal of the function itself made lr='auto' a ConfigError."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    model = nn.Sequential(nn.Linear(4, 8), OldStyleActivation(), nn.Linear(8, 3))
    with pytest.warns(UserWarning, match="OldStyleTanh"):
        opt = curvgraph.compile(model, (x,), backend="eager")
    losses = [opt.step(x, y).item() for _ in range(8)]
    assert opt.skipped_steps == 0 and losses[-1] < 0.8 * losses[0], losses
