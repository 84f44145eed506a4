"""Norm blocks (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm) and per-channel scales (layer scales, NoNorm): exact per-channel GGN blocks, the update, BatchNorm statistics, eval mode."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from helpers import exact_ggn, make_targets, reference_copy


def bn_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5, 4))


def ln_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 4))


def gn_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 2), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9, 4))


def in_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 2), nn.InstanceNorm2d(4, affine=True), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 9, 4))


def in_cnn(track_running_stats: bool = False) -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 2), nn.InstanceNorm2d(4, affine=True, track_running_stats=track_running_stats),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9, 4))


def ln_sequence() -> nn.Module:
    """LayerNorm over the features of a (N, T, D) sequence: its parameters are shared over positions."""
    return nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6, bias=False), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 6, 4))


class HandRMSNorm(nn.Module):
    """LLaMA's RMSNorm written by hand: ``x * rsqrt(mean(x^2) + eps) * w`` (or ``w * ...``, ``x * x``)."""

    def __init__(self, features: int, weight_first: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(features))
        self.bias = None
        self.weight_first = weight_first

    def forward(self, x):
        if self.weight_first:
            return self.weight * (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6))
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def ln_flattened_rows() -> nn.Module:
    """LayerNorm on the ``(N*T, D)`` rows of a flattened sequence, as OPT's decoder layer applies it."""
    return nn.Sequential(nn.Linear(5, 6), nn.Flatten(0, 1), nn.LayerNorm(6), nn.Unflatten(0, (-1, 3)), nn.Tanh(),
                         nn.Flatten(), nn.Linear(3 * 6, 4))


class OffsetRMSNorm(nn.Module):
    """Gemma's RMSNorm: the scale is ``1 + w`` (``w`` starts at 0), computed in ``dtype`` (Gemma: ``.float()``)."""

    def __init__(self, features: int, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.randn(features))
        self.bias = None
        self.dtype = dtype

    def forward(self, x):
        out = x.to(self.dtype) * torch.rsqrt(x.to(self.dtype).pow(2).mean(-1, keepdim=True) + 1e-6)
        return (out * (1.0 + self.weight.to(self.dtype))).type_as(x)


def offset_rms(dtype: torch.dtype = torch.float64) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), OffsetRMSNorm(6, dtype), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 6, 4))


def rms_sequence() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.RMSNorm(6), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 6, 4))


def hand_rms(weight_first: bool):
    return lambda: nn.Sequential(nn.Linear(5, 6), HandRMSNorm(6, weight_first), nn.Tanh(), nn.Flatten(),
                                 nn.Linear(3 * 6, 4))


class LayerScale(nn.Module):
    """``x * weight (+ bias)`` with ``weight`` of ``shape``: a layer scale (ConvNeXt ``(C, 1, 1)``, CaiT ``(C,)``),
    ``NoNorm`` with a bias, a learned scalar with ``shape=()``; with ``unsqueezed=k``, ``weight`` unsqueezed ``k``
    times at the end first and on the left (PoolFormer's ``w.unsqueeze(-1).unsqueeze(-1) * x``)."""

    def __init__(self, shape: tuple[int, ...] | int, bias: bool = False, unsqueezed: int = 0) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.3 * torch.randn(shape))
        self.bias = nn.Parameter(0.1 * torch.randn(shape)) if bias else None
        self.unsqueezed = unsqueezed

    def forward(self, x):
        if self.unsqueezed:
            weight = self.weight
            for _ in range(self.unsqueezed):
                weight = weight.unsqueeze(-1)
            return weight * x
        scaled = x * self.weight
        return scaled + self.bias if self.bias is not None else scaled


def scaled(shape: tuple[int, ...] | int, bias: bool = False, conv: bool = False, unsqueezed: int = 0):
    if conv:
        return lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), LayerScale(shape, bias, unsqueezed), nn.Tanh(),
                                     nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    return lambda: nn.Sequential(nn.Linear(5, 6), LayerScale(shape, bias), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 6, 4))


NORMS = {
    "layer-scale-tokens": (scaled(6), (6, 3, 5), "1"),
    "layer-scale-channels-first": (scaled((3, 1, 1), conv=True), (6, 2, 4, 4), "1"),
    "layer-scale-unsqueezed": (scaled(3, conv=True, unsqueezed=2), (6, 2, 4, 4), "1"),
    "nonorm-scale-shift": (scaled(6, bias=True), (6, 3, 5), "1"),
    "learned-scalar": (scaled(()), (6, 3, 5), "1"),
    "rmsnorm": (rms_sequence, (6, 3, 5), "1"),
    "rmsnorm-handwritten": (hand_rms(False), (6, 3, 5), "1"),
    "rmsnorm-handwritten-weight-first": (hand_rms(True), (6, 3, 5), "1"),
    "rmsnorm-offset-scale": (offset_rms, (6, 3, 5), "1"),
    "batchnorm": (bn_cnn, (6, 2, 7), "1"),
    "layernorm": (ln_mlp, (6, 5), "1"),
    "groupnorm": (gn_cnn, (6, 2, 4, 4), "1"),
    "instancenorm": (in_cnn, (6, 2, 4, 4), "1"),
    "layernorm-no-bias-shared": (ln_sequence, (6, 3, 5), "1"),
    "layernorm-flattened-rows": (ln_flattened_rows, (6, 3, 5), "2"),
}


@pytest.mark.parametrize("loss", ("cross_entropy", "mse"))
@pytest.mark.parametrize("case", NORMS)
def test_norm_factor_is_the_exact_per_channel_ggn_block(float64, case, loss):
    torch.manual_seed(0)
    make, shape, name = NORMS[case]
    model = make()
    x = torch.randn(shape)
    y = make_targets(loss, (shape[0], 4))
    reference = reference_copy(model)
    opt = curvgraph.compile(model, (x,), loss=loss, fisher="type2", ema=0.0, backend="eager")
    opt.step(x, y)
    block = opt.plan.block(name)
    assert block.kind == "norm"
    F_ours = opt.factors()[name]["F"]

    norm = reference[int(name)]
    params = [norm.weight] + ([norm.bias] if getattr(norm, "bias", None) is not None else [])
    theta = torch.stack([p.detach().flatten() for p in params], -1).flatten()

    def unpack(t):
        columns = t.reshape(-1, len(params))
        out = {f"{name}.weight": columns[:, 0].reshape(norm.weight.shape)}
        if len(params) == 2:
            out[f"{name}.bias"] = columns[:, 1].reshape(norm.bias.shape)
        return out

    exact = exact_ggn(reference, loss, x, y, theta, unpack)
    k = len(params)
    diagonal_blocks = torch.stack([exact[c * k:(c + 1) * k, c * k:(c + 1) * k] for c in range(F_ours.shape[0])])
    torch.testing.assert_close(F_ours, diagonal_blocks, rtol=1e-10, atol=1e-12)


def test_a_norm_computed_in_another_dtype_is_a_norm_block():
    """``x.float() * rsqrt(x.float().pow(2).mean(-1) + eps) * (1 + w.float())`` of a bfloat16 or float64 model (Gemma):
    each ``.float()`` is a cast of its own, and the scale is the cast weight offset by 1."""
    for model_dtype, norm_dtype in ((torch.float32, torch.float64), (torch.bfloat16, torch.float32)):
        model = offset_rms(norm_dtype).to(model_dtype)
        plan = curvgraph.compile(model, (torch.randn(6, 3, 5, dtype=model_dtype),), backend="eager").plan
        assert [(b.name, b.kind) for b in plan.blocks] == [("0", "dense"), ("1", "norm"), ("4", "dense")]


def test_norm_update_is_the_damped_per_channel_solve(float64):
    torch.manual_seed(1)
    model = ln_mlp()
    x, y = torch.randn(8, 5), torch.randint(0, 4, (8,))
    before = copy.deepcopy(model)
    lr, damping = 0.5, 0.03
    opt = curvgraph.compile(model, (x,), fisher="type2", ema=0.0, momentum=0.0, kl_clip=None, lr=lr,
                            damping=damping, backend="eager")
    opt.step(x, y)
    nn.functional.cross_entropy(before(x), y).backward()
    grads = torch.stack([before[1].weight.grad, before[1].bias.grad], -1)
    F_ = opt.factors()["1"]["F"]
    expected = torch.linalg.solve(F_ + damping * torch.eye(2), grads[..., None])[..., 0]
    change = torch.stack([model[1].weight - before[1].weight, model[1].bias - before[1].bias], -1).detach()
    torch.testing.assert_close(change, -lr * expected)


def test_plan_of_norm_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.GroupNorm(2, 4, affine=False),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.LayerNorm(6, elementwise_affine=False))
    plan = curvgraph.compile(model, (torch.randn(2, 3, 6, 6),), backend="eager").plan
    assert [(b.name, b.kind) for b in plan.blocks] == [("0", "conv"), ("1", "norm"), ("5", "dense")]
    assert plan.block("1").factor_shapes == {"F": (4, 2, 2)} and plan.block("1").layout["channels_first"]
    assert plan.fallback_params == ()


@pytest.mark.parametrize("shape, channels_first", [((3,), False), ((3, 3), False), ((4, 1, 1), True),
                                                    ((4, 1, 3), None)])
def test_a_scale_is_a_block_where_it_spans_channels(shape, channels_first):
    """``x * w`` of an ``(N, 4, 3, 3)`` tensor: a per-channel scale where ``w``'s shape, after leading 1s, is ``x``'s
    trailing dims (``(3,)``, ``(3, 3)``) or dim 1 alone (``(4, 1, 1)``); a ``(4, 1, 3)`` scale spans dims apart and
    is left to the fallback."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), LayerScale(shape), nn.Tanh(), nn.Flatten(), nn.Linear(36, 2))
    plan = curvgraph.compile(model, (torch.randn(2, 3, 3, 3),), backend="eager").plan
    if channels_first is None:
        assert plan.fallback_params == ("1.weight",) and "1" not in {b.name for b in plan.blocks}
        return
    block = plan.block("1")
    channels = math.prod(shape)
    assert block.kind == "norm" and block.layout["channels_first"] is channels_first
    assert f"channel scale, {channels} channels (scale)" in str(plan) and plan.fallback_params == ()


def cnn_with_bn() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2),
                         nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))


def test_batchnorm_running_statistics_match_eager_pytorch_step_by_step():
    """A shadow copy of each BatchNorm, fed the same inputs in plain PyTorch, tracks the same statistics."""
    model = cnn_with_bn()
    opt = curvgraph.compile(model, (torch.randn(5, 2, 6, 6),), backend="eager")
    shadows = {i: copy.deepcopy(model[i]) for i in (1, 4)}
    g = torch.Generator().manual_seed(3)
    for _ in range(6):
        x, y = torch.randn(5, 2, 6, 6, generator=g), torch.randint(0, 3, (5,), generator=g)
        with torch.no_grad():  # the layer inputs the model's BatchNorms see in this step
            h = model[0](x)
            shadows[1](h)
            bn = model[1]
            normalized = F.batch_norm(h, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
            shadows[4](model[3](model[2](normalized)))
        opt.step(x, y)
        for i, shadow in shadows.items():
            torch.testing.assert_close(model[i].running_mean, shadow.running_mean)
            torch.testing.assert_close(model[i].running_var, shadow.running_var)
            assert model[i].num_batches_tracked == shadow.num_batches_tracked


def test_instancenorm_running_statistics_match_eager_pytorch_and_eval_mode_uses_them():
    """``aten.instance_norm`` updates its running statistics inside the op; the captured graph writes the update
    out, so the adaptive step's extra passes of the model (trial forward, curvature products) do not repeat it."""
    torch.manual_seed(4)
    model = in_cnn(track_running_stats=True)
    opt = curvgraph.compile(model, (torch.randn(5, 2, 4, 4),), backend="eager")
    assert [(b.name, b.kind) for b in opt.plan.blocks] == [("0", "conv"), ("1", "norm"), ("4", "dense")]
    shadow = copy.deepcopy(model[1])
    g = torch.Generator().manual_seed(5)
    for _ in range(4):
        x, y = torch.randn(5, 2, 4, 4, generator=g), torch.randint(0, 4, (5,), generator=g)
        with torch.no_grad():
            shadow(model[0](x))
        opt.step(x, y)
        torch.testing.assert_close(model[1].running_mean, shadow.running_mean)
        torch.testing.assert_close(model[1].running_var, shadow.running_var)
    model.eval()
    x, y = torch.randn(5, 2, 4, 4, generator=g), torch.randint(0, 4, (5,), generator=g)
    with torch.no_grad():
        expected = F.cross_entropy(model(x), y)
        assert not torch.allclose(expected, F.cross_entropy(copy.deepcopy(model).train()(x), y))
    torch.testing.assert_close(opt.step(x, y), expected)
    torch.testing.assert_close(model[1].running_mean, shadow.running_mean)


def test_eval_mode_after_training_uses_the_running_statistics():
    model = cnn_with_bn()
    opt = curvgraph.compile(model, (torch.randn(5, 2, 6, 6),), backend="eager")
    for _ in range(3):
        opt.step(torch.randn(5, 2, 6, 6), torch.randint(0, 3, (5,)))
    model.eval()
    x = torch.randn(4, 2, 6, 6)
    with torch.no_grad():
        h = model[0](x)
        bn = model[1]
        expected = F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)
        torch.testing.assert_close(model[1](h), expected)
        assert not torch.allclose(model[1](h), model[1].train()(h))
    assert math.isfinite(model.eval()(x).sum().item())
