"""Leaf modules (``leaf_modules=``): kept opaque in the captured graph, run eagerly inside the step (compiled
or not), their parameters trained by the first-order fallback with exact gradients.

Reference: ``torch.optim.Adam`` on a copy of the model (plain autograd through the
untraceable module).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import curvgraph


class DataDependent(nn.Module):
    """Python control flow on a tensor value: torch.export cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:
            return torch.tanh(h)
        return -h


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = DataDependent()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.inner(x))


@pytest.mark.parametrize("leaves", [["inner"], [DataDependent], "inner"])
@pytest.mark.parametrize("fisher", ["mc", "type2"])
def test_leaf_parameters_take_the_fallback_step_with_exact_gradients(leaves, fisher):
    torch.manual_seed(0)
    model = Outer()
    twin = copy.deepcopy(model)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    opt = curvgraph.compile(model, (x,), leaf_modules=leaves, fisher=fisher, fallback_lr=0.01, backend="eager")
    assert [b.name for b in opt.plan.blocks] == ["head"]
    assert opt.plan.fallback_params == ("inner.fc.weight", "inner.fc.bias")
    assert "in leaf module 'inner' (leaf_modules=)" in str(opt.plan)
    adam = torch.optim.Adam(twin.inner.parameters(), lr=0.01)
    before = copy.deepcopy(model.inner.state_dict())
    loss = opt.step(x, y)
    reference = nn.functional.cross_entropy(twin(x), y)
    reference.backward()
    adam.step()
    torch.testing.assert_close(loss, reference.detach())
    for name, value in model.inner.state_dict().items():
        assert not torch.equal(value, before[name]), name  # the leaf's parameters moved
        torch.testing.assert_close(value, twin.inner.state_dict()[name])  # by Adam's step on the exact gradient
    assert not torch.equal(model.head.weight, twin.head.weight)  # the head took the K-FAC step
    opt.step(torch.randn(9, 4), torch.randint(0, 3, (9,)))  # the leaf's output follows the batch size


def test_a_compiled_step_calls_the_leaf_as_opaque_ops_and_matches_the_eager_step():
    """``torch.compile(fullgraph=True)`` (AOT autograd, as Inductor uses it) compiles the step around the leaf, whose
    Python control flow runs eagerly at every call; the exact GGN (``type2``: one backward per class, the vmap rule)
    and the adaptive step (a forward-mode derivative through the leaf) give the eager step's losses and parameters,
    bitwise, also for a batch of another size."""
    torch.manual_seed(0)
    model = Outer()
    twin = copy.deepcopy(model)
    options = dict(leaf_modules=["inner"], fisher="type2", seed=0)
    x = torch.randn(5, 4)
    compiled = curvgraph.compile(model, (x,), backend="aot_eager", progress=False, **options)
    eager = curvgraph.compile(twin, (x,), backend="eager", **options)
    g = torch.Generator().manual_seed(1)
    for n in (5, 5, 9):
        x, y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
        assert torch.equal(compiled.step(x, y), eager.step(x, y))
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name


def test_leaf_with_integer_inputs_inside_a_keyword_model():
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10)

        def forward(self, input_ids):
            return self.head(self.emb(input_ids))

    torch.manual_seed(1)
    model = Tokens()
    ids, y = torch.randint(0, 10, (2, 7)), torch.randint(0, 10, (2, 7))
    opt = curvgraph.compile(model, {"input_ids": ids}, loss="token_cross_entropy", leaf_modules=["emb"],
                            backend="eager")
    before = model.emb.weight.clone()
    opt.step({"input_ids": ids}, y)
    assert opt.plan.fallback_params == ("emb.weight",)
    changed = (model.emb.weight != before).any(1)
    assert torch.equal(changed, torch.isin(torch.arange(10), ids))  # the rows looked up, and only those


class NormalizedFeatures(nn.Module):
    """BatchNorm (float running statistics, an integer batch counter, both updated in place in training mode)
    before a linear layer, with a data-dependent branch: it has to be a leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        h = self.fc(self.norm(x))
        return torch.tanh(h) if h.sum() > 0 else -h


def test_leaf_with_buffers_updated_in_place_trains_with_exact_gradients_and_leaves_the_buffers_alone():
    """A leaf's buffers are read, never written, and never differentiated: an integer buffer cannot be, and
    BatchNorm's in-place update of its running statistics would mutate a tensor the step's transforms capture.
    Compiling says so; the leaf's parameters still take Adam's step on the exact gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(NormalizedFeatures(), nn.Linear(6, 3))
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    buffers = copy.deepcopy(dict(model[0].named_buffers()))
    with pytest.warns(UserWarning, match=r"leaf module '0' has buffers \(norm.running_mean, norm.running_var, "
                                         r"norm.num_batches_tracked\); the step reads them but never updates them"):
        opt = curvgraph.compile(model, (x,), leaf_modules=["0"], fallback_lr=0.01, backend="eager")
        loss = opt.step(x, y)
    reference = nn.functional.cross_entropy(twin(x), y)  # batch statistics in training mode, as the step's forward
    reference.backward()
    torch.optim.Adam(twin[0].parameters(), lr=0.01).step()
    torch.testing.assert_close(loss, reference.detach())
    for name, value in model[0].named_parameters():
        torch.testing.assert_close(value, dict(twin[0].named_parameters())[name], msg=name)
    assert all(torch.equal(buffers[name], value) for name, value in model[0].named_buffers())
    assert int(model[0].norm.num_batches_tracked) == 0 and int(twin[0].norm.num_batches_tracked) == 1


def test_leaf_module_errors():
    x = torch.randn(5, 4)
    with pytest.raises(curvgraph.ConfigError, match=r"leaf_modules names \['innr'\], which are not submodules .*'inner'"):
        curvgraph.compile(Outer(), (x,), leaf_modules=["innr"], backend="eager")
    with pytest.raises(curvgraph.ConfigError, match=r"lists \['Conv2d'\], but Outer has no such submodule"):
        curvgraph.compile(Outer(), (x,), leaf_modules=[nn.Conv2d], backend="eager")
    opt = curvgraph.compile(Outer(), (x,), leaf_modules=["inner"], backend="eager")
    with pytest.raises(curvgraph.ConfigError, match="cannot be exported"):
        opt.export("never.py")

    class KeywordCall(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = DataDependent()

        def forward(self, x):
            return self.inner(x=x)

    with pytest.raises(curvgraph.ConfigError, match=r"leaf module 'inner' is called with \['x='\]; .*positional tensors"):
        curvgraph.compile(KeywordCall(), (x,), leaf_modules=["inner"], backend="eager")


def test_the_leaf_backward_differentiated_in_its_output_gradient_is_the_forward_mode_derivative():
    """The adaptive step's curvature products differentiate the step's backward in its output vector
    (:func:`curvgraph.methods.quadratic.output_jvps`); through a leaf that gives ``J v`` of the module, as forward
    mode on the module itself does."""
    from curvgraph.leaf import leaf_call, register

    torch.manual_seed(1)
    module = DataDependent()
    key = register("transposed", module)
    x = torch.randn(5, 4)
    names = [name for name, _ in module.named_parameters()]
    params = tuple(p.detach() for p in module.parameters())
    output, backprop = torch.func.vjp(lambda *tensors: leaf_call(key, list(tensors), [x]), *params)
    _, transposed = torch.func.vjp(lambda u: backprop(u), torch.zeros_like(output))
    v = tuple(torch.randn_like(p) for p in params)
    expected = torch.func.jvp(lambda *tensors: torch.func.functional_call(module, dict(zip(names, tensors)), (x,)),
                              params, v)[1]
    torch.testing.assert_close(transposed(v)[0], expected)
