"""Spatial subsampling of KFC's input factor (``conv_stats_every``) against ``F.unfold`` patches at the strided
output positions."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.errors import ConfigError


def strided_input_factor(conv: nn.Conv2d, x: torch.Tensor, every: int) -> torch.Tensor:
    """``A`` over the output positions ``(i, j)`` with ``i % every == j % every == 0``, patches by ``F.unfold``."""
    patches = F.unfold(x, conv.kernel_size, padding=conv.padding, stride=conv.stride)  # (N, C K, L)
    h = (x.shape[2] + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
    w = (x.shape[3] + 2 * conv.padding[1] - conv.kernel_size[1]) // conv.stride[1] + 1
    keep = ((torch.arange(h)[:, None] % every == 0) & (torch.arange(w)[None, :] % every == 0)).flatten()
    rows = patches[:, :, keep].transpose(1, 2).reshape(-1, patches.shape[1])
    rows = torch.cat([rows, torch.ones(rows.shape[0], 1)], 1)
    return rows.T @ rows / rows.shape[0]


@pytest.mark.parametrize("stride", [1, 2])
def test_input_factor_from_every_sth_position(float64, stride):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=stride, padding=1), nn.Tanh(), nn.Flatten(), nn.LazyLinear(5))
    x, y = torch.randn(6, 3, 9, 9), torch.randint(0, 5, (6,))
    model(x)  # materialize the lazy layer
    opts = {every: curvgraph.compile(copy.deepcopy(model), (x,), fisher="type2", lr=0.1, backend="eager",
                                     progress=False, conv_stats_every=every) for every in (1, 2)}
    for opt in opts.values():
        opt.step(x, y)
    factors = {every: opt.factors()["0"] for every, opt in opts.items()}
    torch.testing.assert_close(factors[2]["A"], strided_input_factor(model[0], x, 2))
    torch.testing.assert_close(factors[1]["A"], strided_input_factor(model[0], x, 1))
    assert not torch.allclose(factors[1]["A"], factors[2]["A"])
    torch.testing.assert_close(factors[2]["G"], factors[1]["G"])  # G keeps every position
    workspace = {every: opt.plan.at_example(opt.plan.blocks[0].cost["workspace_bytes"]) for every, opt in opts.items()}
    assert workspace[2] == pytest.approx(workspace[1] / 4)


def test_conv_stats_every_must_be_a_positive_integer():
    with pytest.raises(ConfigError, match="conv_stats_every must be a positive integer"):
        curvgraph.compile(nn.Conv2d(1, 1, 3), (torch.randn(1, 1, 5, 5),), backend="eager", conv_stats_every=0)
