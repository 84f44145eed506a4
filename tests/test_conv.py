"""Convolutions (KFC): factors against the exact GGN and curvlinops, plans, training on MNIST-1D."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from helpers import curvlinops_factors, exact_ggn, make_targets


class ChannelsLast(nn.Module):
    """A single convolution whose output has channels last: every position is an MSE loss term.

    For this model KFC-expand is exact (Eschenhagen et al. 2023): the GGN of the
    convolution is ``(2/C) I kron mean_l(patch patch^T)``.
    """

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x).movedim(1, -1)


EXACT = {
    "conv1d-stride-pad": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), (2, 3, 9)),
    "conv1d-no-bias-dilated": (lambda: nn.Conv1d(2, 3, 2, dilation=3, bias=False), (3, 2, 10)),
    "conv2d-same-even-kernel": (lambda: nn.Conv2d(2, 4, (2, 3), padding="same", dilation=(1, 2)), (2, 2, 5, 6)),
    "conv3d-groups": (lambda: nn.Conv3d(2, 4, 2, stride=(1, 2, 1), groups=2), (2, 2, 3, 4, 3)),
    "conv3d-depthwise-pad": (lambda: nn.Conv3d(3, 3, (1, 2, 2), padding=1, groups=3), (1, 3, 2, 3, 3)),
}


def kfc_after_one_step(make, shape: tuple[int, ...]):
    """One type-2 step of ``ChannelsLast(make())`` on random data: ``(reference copy, x, y, A, G)``, the factors as
    ``(groups, d, d)``."""
    torch.manual_seed(0)
    model = ChannelsLast(make())
    x = torch.randn(shape)
    y = torch.randn(model(x).shape)
    reference = copy.deepcopy(model)
    opt = curvgraph.compile(model, (x,), loss="mse", fisher="type2", ema=0.0, backend="eager")
    opt.step(x, y)
    (block,) = opt.plan.blocks
    assert block.kind == "conv" and block.layout["groups"] == reference.conv.groups and opt.plan.fallback_params == ()
    factors = opt.factors()["conv"]
    A, G = factors["A"], factors["G"]
    return (reference, x, y, A, G) if A.dim() == 3 else (reference, x, y, A[None], G[None])


@pytest.mark.parametrize("case", EXACT)
def test_kfc_expand_is_the_exact_ggn_of_a_linear_convolution(float64, case):
    reference, x, y, A, G = kfc_after_one_step(*EXACT[case])

    weight, bias = reference.conv.weight.detach(), reference.conv.bias
    groups, per_group = reference.conv.groups, weight.shape[0] // reference.conv.groups
    matrix = weight.reshape(groups, per_group, -1)
    if bias is not None:
        matrix = torch.cat([matrix, bias.detach().reshape(groups, per_group, 1)], 2)

    def unpack(theta):
        m = theta.reshape(groups, per_group, -1)
        new = {"conv.weight": (m[..., :-1] if bias is not None else m).reshape(weight.shape)}
        if bias is not None:
            new["conv.bias"] = m[..., -1].reshape(-1)
        return new

    exact = exact_ggn(reference, "mse", x, y, matrix.flatten(), unpack)
    kron = torch.block_diag(*[torch.kron(G[j], A[j]) for j in range(groups)])
    torch.testing.assert_close(kron, exact, rtol=1e-10, atol=1e-12)


TRANSPOSED = {
    "conv-transpose1d-stride-output-padding": (lambda: nn.ConvTranspose1d(3, 4, 3, stride=2, padding=1,
                                                                          output_padding=1), (2, 3, 4)),
    "conv-transpose2d-dilated-no-bias": (lambda: nn.ConvTranspose2d(2, 3, (2, 3), stride=(2, 1), dilation=(1, 2),
                                                                    bias=False), (2, 2, 3, 3)),
    "conv-transpose2d-groups": (lambda: nn.ConvTranspose2d(4, 2, 2, stride=2, padding=1, groups=2), (1, 4, 3, 3)),
    "conv-transpose3d": (lambda: nn.ConvTranspose3d(2, 2, 2, stride=(1, 2, 1)), (1, 2, 2, 2, 2)),
}


@pytest.mark.parametrize("case", TRANSPOSED)
def test_kfc_of_a_transposed_convolution_is_the_exact_ggn(float64, case):
    """A transposed convolution is the direct one over zero-inserted inputs, with the kernel's channels swapped and
    flipped: KFC-expand of that convolution is exact here too, in the direct weight's coordinates."""
    reference, x, y, A, G = kfc_after_one_step(*TRANSPOSED[case])

    weight, bias, groups = reference.conv.weight.detach(), reference.conv.bias, reference.conv.groups
    c_in, per_group, kernel = weight.shape[0], weight.shape[1], weight.shape[2:]
    flip = tuple(range(3, 3 + len(kernel)))
    # the direct weight (C_out, C_in/g, k...): per group, channels swapped and the kernel flipped
    direct = weight.reshape(groups, c_in // groups, per_group, *kernel).transpose(1, 2).flip(flip)
    matrix = direct.reshape(groups, per_group, -1)
    if bias is not None:
        matrix = torch.cat([matrix, bias.detach().reshape(groups, per_group, 1)], 2)

    def unpack(theta):
        m = theta.reshape(groups, per_group, -1)
        d = (m[..., :-1] if bias is not None else m).reshape(groups, per_group, c_in // groups, *kernel)
        new = {"conv.weight": d.flip(flip).transpose(1, 2).reshape(weight.shape)}
        if bias is not None:
            new["conv.bias"] = m[..., -1].reshape(-1)
        return new

    assert torch.equal(unpack(matrix.flatten())["conv.weight"], weight)
    exact = exact_ggn(reference, "mse", x, y, matrix.flatten(), unpack)
    kron = torch.block_diag(*[torch.kron(G[j], A[j]) for j in range(groups)])
    torch.testing.assert_close(kron, exact, rtol=1e-10, atol=1e-12)


def test_transposed_convolution_update_is_the_direct_convolution_s_update(float64):
    """The step maps the preconditioned direct-weight update back to the transposed weight: one step of a
    ``ConvTranspose2d`` model equals one step of the same model with the transposed convolution written as the
    direct convolution of zero-inserted inputs (its weight kept in the transposed layout is not a conv block, so
    the direct model holds the direct weight as its parameter)."""
    torch.manual_seed(1)
    transposed = nn.Sequential(nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1), nn.Tanh(),
                               nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    t = transposed[0]
    direct_conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        direct_conv.weight.copy_(t.weight.transpose(0, 1).flip((2, 3)))
        direct_conv.bias.copy_(t.bias)

    class ZerosBetween(nn.Module):
        """One zero between neighbouring pixels, then the padding ``d (k - 1) - p = 1`` before and 2 after."""

        def forward(self, x):
            n, c, h, w = x.shape
            columns = torch.stack([x, torch.zeros_like(x)], -1).reshape(n, c, h, 2 * w)[..., :-1]
            rows = torch.stack([columns, torch.zeros_like(columns)], 3).reshape(n, c, 2 * h, 2 * w - 1)[:, :, :-1]
            return F.pad(rows, (1, 2, 1, 2))

    direct = nn.Sequential(ZerosBetween(), direct_conv, *copy.deepcopy(transposed[1:]))
    x, y = torch.randn(6, 3, 3, 3), torch.randint(0, 5, (6,))
    torch.testing.assert_close(direct(x), transposed(x))
    options = dict(lr=0.1, ema=0.0, momentum=0.0, kl_clip=None, fisher="type2", backend="eager")
    opts = [curvgraph.compile(m, (x,), **options) for m in (transposed, direct)]
    assert [b.kind for b in opts[0].plan.blocks] == [b.kind for b in opts[1].plan.blocks] == ["conv", "dense"]
    for opt in opts:
        opt.step(x, y)
    torch.testing.assert_close(t.weight.transpose(0, 1).flip((2, 3)), direct_conv.weight)
    torch.testing.assert_close(t.bias, direct_conv.bias)


def cnn_strided() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, stride=2, bias=False),
                         nn.Flatten(), nn.Linear(3 * 3 * 3, 5))


def cnn_dilated() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 2, dilation=2, padding=2), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 5))


def cnn_rectangular() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, (3, 1), stride=(2, 1), padding=(1, 0)), nn.ReLU(), nn.Conv2d(4, 4, 1),
                         nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 4 * 7, 5))


CNNS = {"strided": cnn_strided, "dilated": cnn_dilated, "rectangular": cnn_rectangular}


@pytest.mark.parametrize("kfac_approx", ("expand", "reduce"))
@pytest.mark.parametrize("fisher", ("type2", "empirical"))
@pytest.mark.parametrize("name", CNNS)
def test_conv2d_factors_match_curvlinops(float64, name, fisher, kfac_approx):
    torch.manual_seed(1)
    model = CNNS[name]()
    x = torch.randn(3, 2, 7, 7)
    y = make_targets("cross_entropy", (3, 5))
    A_ref, G_ref = curvlinops_factors(model, "cross_entropy", x, y, fisher, kfac_approx)
    opt = curvgraph.compile(model, (x,), fisher=fisher, kfac_approx=kfac_approx, ema=0.0, backend="eager")
    opt.step(x, y)
    factors = opt.factors()
    assert sorted(factors) == sorted(A_ref)
    for block in factors:
        torch.testing.assert_close(factors[block]["A"], A_ref[block], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(factors[block]["G"], G_ref[block], rtol=1e-10, atol=1e-12)


class Functional(nn.Module):
    """Functional convolutions with a shared weight, and a conv whose weight is also regularized."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Parameter(torch.randn(3, 3, 3) / 3)
        self.first = nn.Conv1d(1, 3, 3, padding=1)
        self.odd = nn.Conv1d(3, 3, 1)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.relu(self.first(x))
        h = torch.relu(F.conv1d(h, self.shared, padding=1))
        h = torch.relu(F.conv1d(h, self.shared, padding=1))
        h = self.odd(h) + self.odd.weight.sum()
        return self.head(h.mean(2))


def test_conv_plan_shapes_costs_and_sharing():
    plan = curvgraph.compile(Functional(), (torch.randn(4, 1, 10),), backend="eager").plan
    blocks = {b.name: b for b in plan.blocks}
    assert sorted(blocks) == ["first", "head", "odd.bias", "shared"]  # odd.weight's foreign use leaves its bias alone
    assert blocks["odd.bias"].kind == "bias"
    shared = blocks["shared"]
    assert shared.kind == "conv" and len(shared.uses) == 2 and shared.params == ("shared",)
    assert shared.factor_shapes == {"A": (9, 9), "G": (3, 3)}
    assert blocks["first"].factor_shapes == {"A": (4, 4), "G": (3, 3)}
    assert "odd.weight" in plan.fallback_params and "sum" in plan.fallback_reasons["odd.weight"]
    assert plan.at_example(shared.cost["workspace_bytes"]) == 4 * 2 * 4 * 10 * 9
    assert plan.at_example(shared.cost["workspace_bytes"], {"N": 8, "x_2": 20}) == 4 * 2 * 8 * 20 * 9
    assert plan.at_example(blocks["first"].cost["forward_backward"]) == 4 * 4 * 10 * 3 * 3


def test_depthwise_convolution_has_one_block_per_channel():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=4), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    plan = curvgraph.compile(model, (torch.randn(2, 4, 6, 6),), backend="eager").plan
    assert plan.blocks[0].factor_shapes == {"A": (4, 10, 10), "G": (4, 2, 2)}
    assert plan.blocks[0].matrix_shape == (4, 2, 10)
    assert "A:4x10x10" in str(plan)


def test_kfac_trains_the_mnist1d_cnn_better_than_adam():
    from curvgraph.demo import accuracy, adam_step, batches, cnn, load_mnist1d

    data = load_mnist1d()
    steps = batches(len(data.x_train), 100, 300, seed=0)
    adam_model = cnn(0)
    step = adam_step(adam_model)
    for idx in steps:
        step(data.x_train[idx], data.y_train[idx])

    kfac_model = cnn(0)
    opt = curvgraph.compile(kfac_model, (data.x_train[:100],), backend="eager")
    assert [b.kind for b in opt.plan.blocks] == ["conv", "conv", "conv", "dense"]
    for idx in steps:
        opt.step(data.x_train[idx], data.y_train[idx])

    kfac_accuracy, adam_accuracy = accuracy(kfac_model, data), accuracy(adam_model, data)
    assert kfac_accuracy > adam_accuracy + 0.1, (kfac_accuracy, adam_accuracy)
    assert kfac_accuracy > 0.8


SHIFTED = {  # (input shape, kernel, padding, dilation, groups): stride-1 geometries for the shifted correlations
    "conv1d": ((2, 3, 9), (3,), ((1, 1),), (1,), 1),
    "conv1d-dilated-valid": ((3, 2, 10), (2,), ((0, 0),), (3,), 1),
    "conv2d-asymmetric": ((2, 2, 5, 6), (2, 3), ((0, 1), (2, 2)), (1, 2), 1),
    "conv2d-same-32": ((2, 8, 32, 32), (3, 3), ((1, 1), (1, 1)), (1, 1), 1),
    "conv2d-wide-kernel": ((3, 4, 7, 9), (5, 3), ((2, 2), (0, 3)), (1, 1), 1),
    "conv2d-kernel-over-image": ((3, 4, 2, 2), (3, 3), ((1, 1), (1, 1)), (1, 1), 1),
    "conv3d-groups": ((2, 4, 3, 4, 3), (2, 2, 2), ((0, 0), (1, 1), (0, 0)), (1, 1, 1), 2),
    "conv3d-depthwise": ((1, 3, 2, 3, 3), (1, 2, 2), ((1, 1), (1, 1), (1, 1)), (1, 1, 1), 3),
}


@pytest.mark.parametrize("bias", (False, True))
@pytest.mark.parametrize("case", SHIFTED)
def test_shifted_correlations_give_the_patches_moment(float64, case, bias):
    """``A`` from shifted correlations equals ``A`` from the materialized patches, for two uses of different
    sizes (a shared weight), with and without the bias border."""
    from curvgraph.kinds.conv.factors import conv_input_factor

    shape, kernel, padding, dilation, groups = SHIFTED[case]
    torch.manual_seed(0)
    inputs = (torch.randn(shape), torch.randn(shape[:2] + tuple(s + 2 for s in shape[2:])))
    args = (kernel, (1,) * len(kernel), padding, dilation, groups, bias, False, shape[0], torch.float64)
    patches = conv_input_factor(inputs, *args)
    shifted = conv_input_factor(inputs, *args, 1, 1, True)
    torch.testing.assert_close(shifted, patches, rtol=1e-12, atol=1e-12)


def cnn_shifted() -> nn.Module:
    """Convolutions whose statistics take the shifted correlations: at least 8 channels, stride 1, 16x16 images
    (a frame of 60 of 256 positions); a dilated one (a frame of 112)."""
    return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                         nn.Tanh(), nn.Conv2d(16, 4, (3, 2), padding="same", dilation=(1, 2), bias=False),
                         nn.AvgPool2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))


def test_shifted_statistics_match_curvlinops(float64):
    from curvgraph.kinds.conv.factors import shifted_statistics

    torch.manual_seed(1)
    model = cnn_shifted()
    x = torch.randn(3, 8, 16, 16)
    y = make_targets("cross_entropy", (3, 5))
    A_ref, G_ref = curvlinops_factors(model, "cross_entropy", x, y, "type2", "expand")
    opt = curvgraph.compile(model, (x,), fisher="type2", ema=0.0, backend="eager")
    assert [shifted_statistics(b) for b in opt.plan.blocks if b.kind == "conv"] == [True, True, True]
    assert "shifted_input_moment(" in opt.source
    opt.step(x, y)
    factors = opt.factors()
    for block in factors:
        torch.testing.assert_close(factors[block]["A"], A_ref[block], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(factors[block]["G"], G_ref[block], rtol=1e-10, atol=1e-12)


def test_the_statistics_take_shifted_correlations_where_they_are_cheaper():
    """Stride-1 convolutions with 8 or more channels on images whose border is a small part take the shifted
    correlations, and the plan counts their FLOPs; strided ones, 3-channel inputs, small images, split
    factors and spatial subsampling keep the patches."""
    from curvgraph.kinds.conv.factors import shifted_statistics

    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                          nn.AvgPool2d(2), nn.Conv2d(32, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    x = torch.randn(16, 3, 16, 16)
    plan = curvgraph.compile(model, (x,), backend="eager").plan
    convs = [b for b in plan.blocks if b.kind == "conv"]
    assert [shifted_statistics(b) for b in convs] == [False, True, False, False, False]  # 8x8 and 4x4 images
    assert str(plan).count("kernel 3x3 + bias, A from shifts") == 1  # the plan's label says so
    shifted = convs[1]
    patches_flops = 2 * 16 * 16 * 16 * (16 * 9) ** 2  # 2 R d^2 for A, R = N L
    statistics_a = plan.at_example(shifted.cost["statistics"]) - 2 * 16 * 16 * 16 * 16 ** 2
    assert statistics_a < patches_flops / 3
    split = curvgraph.compile(model, (x,), backend="eager", max_factor_dim=64).plan
    subsampled = curvgraph.compile(model, (x,), backend="eager", conv_stats_every=2).plan
    assert not any(shifted_statistics(b) for p in (split, subsampled) for b in p.blocks if b.kind == "conv")


def test_shifted_statistics_under_torch_compile_fix_the_image_size_and_follow_a_new_one():
    """Under ``torch.compile`` (Dynamo and AOT autograd), on a model that leaves the image size symbolic (global
    pooling): ``A`` equals the mean of ``[patch, 1] [patch, 1]^T`` over ``F.unfold``'s patches, at the captured
    image size and at another one (a second graph)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 3))
    opt = curvgraph.compile(model, (torch.randn(4, 8, 16, 16),), ema=0.0, backend="aot_eager", progress=False)
    assert "shifted_input_moment(" in opt.source
    for size in (16, 20):
        x, y = torch.randn(4, 8, size, size), torch.randint(0, 3, (4,))
        opt.step(x, y)
        patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 8 * 9)
        rows = torch.cat([patches, torch.ones(len(patches), 1)], 1)
        torch.testing.assert_close(opt.factors()["0"]["A"], rows.T @ rows / len(rows), rtol=1e-4, atol=1e-5)
    assert opt.skipped_steps == 0
