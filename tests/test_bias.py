"""The ``bias`` kind: a trainable bias whose weight is frozen (or in another block) gets an output-side block ``G``;
so does the shift of a normalization layer whose scale is frozen.

References: the exact GGN of the bias (torch.func), and the bias corner of the dense block's
``kron(G, A)`` when the weight is trainable too.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import curvgraph
from curvgraph.registry import METHODS
from helpers import exact_ggn, make_targets, reference_copy

LOSSES = ("cross_entropy", "mse", "bce_with_logits")


def frozen_mlp() -> nn.Module:
    """Both weights frozen, both biases trainable."""
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    model[0].weight.requires_grad_(False)
    model[2].weight.requires_grad_(False)
    return model


def bias_ggn(model: nn.Module, loss: str, x: torch.Tensor, y: torch.Tensor, bias: str) -> torch.Tensor:
    """The exact GGN of the batch-mean loss w.r.t. the parameter ``bias``."""
    value = dict(model.named_parameters())[bias].detach()
    return exact_ggn(model, loss, x, y, value.clone(), lambda theta: {bias: theta})


def batch_factors(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str, **options):
    opt = curvgraph.compile(model, (x,), loss=loss, fisher="type2", ema=0.0, backend="eager", **options)
    opt.step(x, y)
    return opt.factors(), opt


def test_a_frozen_weight_leaves_its_bias_an_output_side_block():
    torch.manual_seed(0)
    opt = curvgraph.compile(frozen_mlp(), (torch.randn(8, 4),), backend="eager")
    assert opt.plan.fallback_params == ()
    assert [(b.name, b.kind, b.params) for b in opt.plan.blocks] == [("0.bias", "bias", ("0.bias",)),
                                                                      ("2.bias", "bias", ("2.bias",))]
    assert opt.plan.block("0.bias").factors == {"G": curvgraph.Factor((5, 5), axis=-1)}


@pytest.mark.parametrize("loss", LOSSES)
def test_bias_factor_is_the_exact_ggn_of_the_bias(float64, loss):
    """With one position per example, the type-2 ``G`` of a bias block is its exact GGN for the whole batch."""
    torch.manual_seed(1)
    model = frozen_mlp()
    x = torch.randn(6, 4)
    y = make_targets(loss, (6, 3))
    reference = copy.deepcopy(model)
    factors, _ = batch_factors(model, x, y, loss)
    for name in ("0.bias", "2.bias"):
        torch.testing.assert_close(factors[name]["G"], bias_ggn(reference, loss, x, y, name), rtol=1e-10, atol=1e-12)


def test_bias_factor_is_the_bias_corner_of_the_dense_block(float64):
    """Freezing the weight does not change the bias's curvature: ``G`` is the dense block's ``G`` (its ``A`` has 1 in
    the ones column's corner)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    frozen = copy.deepcopy(model)
    frozen[0].weight.requires_grad_(False)
    full, _ = batch_factors(model, x, y, "cross_entropy")
    alone, _ = batch_factors(frozen, x, y, "cross_entropy")
    assert full["0"]["A"][-1, -1] == 1
    torch.testing.assert_close(alone["0.bias"]["G"], full["0"]["G"], rtol=1e-12, atol=0)


class BiasConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3)
        self.conv.weight.requires_grad_(False)
        self.head = nn.Linear(3 * 4, 2, bias=False)
        self.head.weight.requires_grad_(False)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def test_conv_bias_factor_reduce_is_the_exact_ggn(float64):
    """A convolution's bias is shared over positions: with ``kfac_approx="reduce"`` (gradients summed over positions
    per example) ``G`` is its exact GGN; with ``expand`` (a sum of per-position terms) it is not."""
    torch.manual_seed(3)
    model = BiasConv()
    x, y = torch.randn(5, 2, 6), torch.randint(0, 2, (5,))
    exact = bias_ggn(copy.deepcopy(model), "cross_entropy", x, y, "conv.bias")
    reduce, opt = batch_factors(copy.deepcopy(model), x, y, "cross_entropy", kfac_approx="reduce")
    assert [b.kind for b in opt.plan.blocks] == ["bias"]
    torch.testing.assert_close(reduce["conv.bias"]["G"], exact, rtol=1e-10, atol=1e-12)
    expand, _ = batch_factors(model, x, y, "cross_entropy")
    assert not torch.allclose(expand["conv.bias"]["G"], exact)


class TiedHeadWithBias(nn.Module):
    """A tied embedding/head whose head has its own bias."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 7)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.emb(tokens)))


def test_a_tied_heads_bias_gets_its_own_block():
    torch.manual_seed(4)
    x = torch.randint(0, 7, (3, 5))
    opt = curvgraph.compile(TiedHeadWithBias(), (x,), loss="token_cross_entropy", backend="eager")
    assert {b.name: b.kind for b in opt.plan.blocks} == {"emb": "tied", "head.bias": "bias"}
    assert opt.plan.fallback_params == ()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_bias_blocks(method):
    torch.manual_seed(5)
    model = frozen_mlp()
    frozen = [model[0].weight.clone(), model[2].weight.clone()]
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt = curvgraph.compile(model, (x,), method=method, backend="eager")
    losses = [opt.step(x, y).item() for _ in range(8)]
    assert losses[-1] < losses[0], losses
    assert torch.equal(model[0].weight, frozen[0]) and torch.equal(model[2].weight, frozen[1])


def frozen_scale(norm: nn.Module) -> nn.Module:
    norm.weight.requires_grad_(False)
    return norm


class HandRMSNormWithBias(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * w + b`` written by hand."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(features))
        self.bias = nn.Parameter(0.1 * torch.randn(features))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight + self.bias


#: Models whose norm layer ``1`` has a frozen scale and a trainable shift, with an input shape and the shift's size.
FROZEN_SCALE_NORMS = {
    "layernorm": (lambda: nn.Sequential(nn.Linear(4, 5), frozen_scale(nn.LayerNorm(5)), nn.Tanh(), nn.Linear(5, 3)),
                  (6, 4), 5),
    "layernorm-sequence": (lambda: nn.Sequential(nn.Linear(4, 5), frozen_scale(nn.LayerNorm(5)), nn.Tanh(),
                                                 nn.Flatten(), nn.Linear(15, 3)), (6, 3, 4), 5),
    "layernorm-2d": (lambda: nn.Sequential(nn.Conv1d(2, 3, 3), frozen_scale(nn.LayerNorm([3, 5])), nn.Tanh(),
                                           nn.Flatten(), nn.Linear(15, 3)), (6, 2, 7), 15),
    "batchnorm": (lambda: nn.Sequential(nn.Conv1d(2, 3, 3), frozen_scale(nn.BatchNorm1d(3)), nn.Tanh(), nn.Flatten(),
                                        nn.Linear(15, 3)), (6, 2, 7), 3),
    "groupnorm": (lambda: nn.Sequential(nn.Conv2d(2, 4, 2), frozen_scale(nn.GroupNorm(2, 4)), nn.ReLU(), nn.Flatten(),
                                        nn.Linear(36, 3)), (6, 2, 4, 4), 4),
    "rmsnorm-handwritten": (lambda: nn.Sequential(nn.Linear(4, 5), frozen_scale(HandRMSNormWithBias(5)), nn.Tanh(),
                                                  nn.Linear(5, 3)), (6, 4), 5),
}


def test_a_frozen_norm_scale_leaves_its_shift_a_bias_block():
    """The shift is a ``bias`` block (one factor ``G``), the scale is listed frozen, nothing falls back; the
    BatchNorm's running statistics still follow PyTorch's."""
    torch.manual_seed(6)
    model = FROZEN_SCALE_NORMS["batchnorm"][0]()
    x = torch.randn(4, 2, 7)
    opt = curvgraph.compile(model, (x,), backend="eager")
    shadow = copy.deepcopy(model[1])
    with torch.no_grad():
        shadow(model[0](x))
    opt.step(x, torch.randint(0, 3, (4,)))
    torch.testing.assert_close(model[1].running_mean, shadow.running_mean)
    torch.testing.assert_close(model[1].running_var, shadow.running_var)
    plan = opt.plan
    assert [(b.name, b.kind, b.params) for b in plan.blocks] == [("0", "conv", ("0.weight", "0.bias")),
                                                                 ("1.bias", "bias", ("1.bias",)),
                                                                 ("4", "dense", ("4.weight", "4.bias"))]
    assert plan.block("1.bias").factors == {"G": curvgraph.Factor((3, 3), axis=-1)}
    assert plan.fallback_params == () and plan.frozen_params == ("1.weight",)
    assert "bias 3 (output side only)" in str(plan)


@pytest.mark.parametrize("loss", ("cross_entropy", "mse"))
@pytest.mark.parametrize("case", FROZEN_SCALE_NORMS)
def test_norm_shift_factor_is_the_exact_ggn_of_the_shift(float64, case, loss):
    """With ``kfac_approx="reduce"`` (one position per example where there are no others) the type-2 ``G`` of the
    shift is its exact GGN, cross-channel terms included."""
    torch.manual_seed(7)
    make, shape, size = FROZEN_SCALE_NORMS[case]
    model = make()
    x = torch.randn(shape)
    y = make_targets(loss, (shape[0], 3))
    reference = reference_copy(model)
    factors, opt = batch_factors(model, x, y, loss, kfac_approx="reduce")
    assert opt.plan.block("1.bias").kind == "bias" and opt.plan.fallback_params == ()
    assert factors["1.bias"]["G"].shape == (size, size)
    exact = exact_ggn(reference, loss, x, y, reference[1].bias.detach().flatten(),
                      lambda theta: {"1.bias": theta.reshape(reference[1].bias.shape)})
    torch.testing.assert_close(factors["1.bias"]["G"], exact, rtol=1e-10, atol=1e-12)


def test_a_multi_dim_shift_moves_by_the_damped_solve(float64):
    """K-FAC's step on a LayerNorm shift over two dims: ``-lr (G + damping I)^{-1} g`` on the flattened shift,
    reshaped back; the frozen scale does not move."""
    torch.manual_seed(8)
    model = FROZEN_SCALE_NORMS["layernorm-2d"][0]()
    x, y = torch.randn(6, 2, 7), torch.randint(0, 3, (6,))
    before = copy.deepcopy(model)
    lr, damping = 0.5, 0.03
    opt = curvgraph.compile(model, (x,), fisher="type2", ema=0.0, momentum=0.0, kl_clip=None, lr=lr, damping=damping,
                            backend="eager")
    opt.step(x, y)
    nn.functional.cross_entropy(before(x), y).backward()
    G = opt.factors()["1.bias"]["G"]
    expected = torch.linalg.solve(G + damping * torch.eye(15), before[1].bias.grad.flatten()).reshape(3, 5)
    torch.testing.assert_close((model[1].bias - before[1].bias).detach(), -lr * expected)
    assert torch.equal(model[1].weight, before[1].weight)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_a_norm_shift(method):
    """A shift over two dims (LayerNorm over ``(3, 5)``), its scale frozen, trains with every method."""
    torch.manual_seed(9)
    model = FROZEN_SCALE_NORMS["layernorm-2d"][0]()
    scale, shift = model[1].weight.clone(), model[1].bias.clone()
    x, y = torch.randn(16, 2, 7), torch.randint(0, 3, (16,))
    opt = curvgraph.compile(model, (x,), method=method, backend="eager")
    losses = [opt.step(x, y).item() for _ in range(8)]
    assert losses[-1] < losses[0], losses
    assert opt.skipped_steps == 0 and not torch.equal(model[1].bias, shift)
    assert torch.equal(model[1].weight, scale)
