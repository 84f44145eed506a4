"""Plans: which blocks the passes find, which parameters fall back, and what the plan prints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from models import FunctionalMLP, SequenceMLP, SharedMLP


def plan_of(model, *inputs, **options):
    return curvgraph.compile(model, inputs, backend="eager", **options).plan


def test_module_mlp_plan():
    model = nn.Sequential(nn.Linear(40, 64), nn.Tanh(), nn.Linear(64, 10))
    plan = plan_of(model, torch.randn(32, 40))
    assert [(b.name, b.kind, b.params) for b in plan.blocks] == [
        ("0", "dense", ("0.weight", "0.bias")),
        ("2", "dense", ("2.weight", "2.bias")),
    ]
    assert plan.blocks[0].factor_shapes == {"A": (41, 41), "G": (64, 64)}
    assert plan.blocks[1].factor_shapes == {"A": (65, 65), "G": (10, 10)}
    assert plan.fallback_params == ()
    assert isinstance(plan.blocks[0], curvgraph.Block) and isinstance(plan, curvgraph.Plan)


def test_functional_plan_folds_biases_and_records_layout():
    plan = plan_of(FunctionalMLP(), torch.randn(8, 5))
    blocks = {b.name: b for b in plan.blocks}
    assert sorted(blocks) == ["W1", "W2", "W3", "W4"]
    assert blocks["W1"].params == ("W1", "b1") and blocks["W1"].bias
    assert blocks["W2"].params == ("W2",) and blocks["W2"].layout["transposed"]
    assert blocks["W2"].dims == {"in": 6, "out": 7}
    assert blocks["W3"].params == ("W3", "b3")
    assert blocks["W4"].params == ("W4",) and not blocks["W4"].layout["transposed"]
    assert plan.fallback_params == ()


class AllSpellings(nn.Module):
    """The same weight shape through every dense spelling the issue names."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        for name in ("a", "b", "c", "d", "e", "f"):
            self.register_parameter(name, nn.Parameter(torch.randn(4, 4)))
        self.bias = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        x = self.lin(x)
        x = F.linear(x, self.a)
        x = x @ self.b.T + self.bias
        x = x @ self.c
        x = torch.addmm(torch.zeros(4), x, self.d.t())
        x = torch.einsum("nj,kj->nk", x, self.e)
        return torch.mm(x, self.f.transpose(0, 1))


def test_every_spelling_is_a_dense_block():
    plan = plan_of(AllSpellings(), torch.randn(3, 4))
    assert sorted(b.name for b in plan.blocks) == ["a", "b", "c", "d", "e", "f", "lin"]
    assert plan.block("b").params == ("b", "bias")
    assert plan.block("c").layout["transposed"] and not plan.block("f").layout["transposed"]
    assert plan.fallback_params == ()


def test_shared_weight_is_one_block_with_two_uses():
    plan = plan_of(SharedMLP(), torch.randn(4, 2, 5))
    shared = plan.block("shared")
    assert shared.shared and len(shared.uses) == 2
    assert shared.params == ("shared.weight", "shared.bias")
    assert not plan.block("head").shared


def test_positions_are_weight_sharing_with_symbolic_rows():
    plan = plan_of(SequenceMLP(), torch.randn(4, 6, 5))
    (use,) = plan.block("embed").uses
    rows = plan.named(use.rows)
    assert {str(s) for s in rows.free_symbols} == {"N", "x_1"}
    assert plan.at_example(use.rows) == 24
    assert plan.at_example(use.rows, {"N": 10}) == 60


class WithFallbacks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 6)
        self.scale = nn.Parameter(torch.ones(6))
        self.out = nn.Linear(6, 3)
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)

    def forward(self, ids):
        h = self.norm(self.embed(ids).mean(1))
        h = torch.tanh(self.fc(h)) / self.scale
        return self.out(self.frozen(h) + self.fc.weight.sum())


def test_unmatched_parameters_fall_back_with_a_reason():
    plan = plan_of(WithFallbacks(), torch.randint(0, 10, (4, 3)))
    # fc.weight has a foreign use (the sum); its bias is left a block of its own (output side only)
    assert [(b.name, b.kind) for b in plan.blocks] == [("embed", "embedding"), ("norm", "norm"), ("fc.bias", "bias"),
                                                      ("out", "dense")]
    assert set(plan.fallback_params) == {"fc.weight", "scale"}
    assert "sum" in plan.fallback_reasons["fc.weight"]
    assert set(plan.frozen_params) == {"frozen.weight", "frozen.bias"}
    text = str(plan)
    for name in ("out", "embed.weight", "norm.bias", "F:6x2x2", "frozen.weight", "first-order fallback"):
        assert name in text


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.decode = nn.Linear(4, 10, bias=False)
        self.decode.weight = self.embed.weight

    def forward(self, ids):
        return self.decode(self.embed(ids).mean(1))


def test_tied_weight_is_one_parameter_under_its_first_name():
    plan = plan_of(Tied(), torch.randint(0, 10, (4, 3)))
    assert [(b.name, b.kind, b.params, len(b.uses)) for b in plan.blocks] == [("embed", "tied", ("embed.weight",), 2)]
    assert plan.fallback_params == ()


def test_plan_prints_factor_shapes_and_costs():
    model = nn.Sequential(nn.Linear(40, 64), nn.Tanh(), nn.Linear(64, 10))
    text = str(plan_of(model, torch.randn(32, 40)))
    assert "A:41x41" in text and "G:64x64" in text and "N=32" in text


def test_plan_totals_the_step_and_points_at_dominant_statistics():
    # 40-64-10 at N=32, by hand: forward+backward 4*32*40*64 (first layer: no input gradient) + 6*32*64*10
    # = 450560; statistics 2*32*(41^2 + 64^2) + 2*32*(65^2 + 10^2) = 646528, 1.43x: above the hint's 1.2
    narrow = str(plan_of(nn.Sequential(nn.Linear(40, 64), nn.Tanh(), nn.Linear(64, 10)), torch.randn(32, 40)))
    assert "forward+backward 451k FLOPs, factor statistics 647k per statistics step (1.43x)" in narrow
    assert "factor_every=2" in narrow and "conv_stats_every" not in narrow
    # 64-64-64: forward+backward (4 + 6)*32*64*64 = 1310720, statistics 2*2*32*(65^2 + 64^2) = 1065088 (0.81x)
    square = str(plan_of(nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64)), torch.randn(32, 64)))
    assert "(0.81x)" in square and "factor_every=2" not in square
    # a convolution with few channels: its patches' factor dwarfs the layer; the hint names spatial subsampling too
    conv = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3))
    text = str(plan_of(conv, torch.randn(8, 4, 8, 8)))
    assert "factor_every=2 (a second compiled graph) or conv_stats_every=2" in text


def test_cost_model_counts_the_layer_flops():
    plan = plan_of(nn.Sequential(nn.Linear(40, 64), nn.Tanh(), nn.Linear(64, 8)), torch.randn(32, 40))
    first, second = plan.blocks
    assert not first.uses[0].input_grad and second.uses[0].input_grad  # the data needs no gradient
    assert plan.at_example(first.cost["forward_backward"]) == 4 * 32 * 40 * 64
    assert plan.at_example(second.cost["forward_backward"]) == 6 * 32 * 64 * 8
    assert plan.at_example(first.cost["backward_per_sample"]) == 0
    assert plan.at_example(first.cost["statistics"]) == 2 * 32 * (41**2 + 64**2)
    assert plan.at_example(second.cost["forward_backward"], {"N": 512}) == 6 * 512 * 64 * 8
    flops = plan.step_flops(samples=1, factor_every=1, invert_every=10)
    assert plan.at_example(flops["inversion"]) == pytest.approx((41**3 + 64**3 + 65**3 + 8**3) / 10)


def test_kfac_approx_is_validated():
    with pytest.raises(curvgraph.ConfigError, match="kfac_approx"):
        plan_of(nn.Linear(3, 2), torch.randn(2, 3), kfac_approx="mean")
