"""Language-model losses: logits ``(N, T, V)`` with classes last, and ignored (-100) targets.

References: the same model with its logits transposed to PyTorch's classes-on-dim-1
layout (``loss="cross_entropy"``), and, for ignored targets, the same tokens with the
ignored ones removed from the batch.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import curvgraph

V, D, T, N = 7, 5, 6, 3


class TokenMLP(nn.Module):
    """Per-token model (no mixing across positions): inputs ``(N, T, D)`` -> logits ``(N, T, V)``."""

    def __init__(self, classes_last: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(D, 8)
        self.head = nn.Linear(8, V)
        self.classes_last = classes_last

    def forward(self, x):
        logits = self.head(torch.tanh(self.fc(x)))
        return logits if self.classes_last else logits.transpose(1, 2)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, T, D, generator=g, dtype=torch.float64), torch.randint(0, V, (N, T), generator=g)


def _compiled(model, x, loss, fisher):
    return curvgraph.compile(model, (x,), loss=loss, fisher=fisher, backend="eager", lr=0.05, damping=1e-2)


@pytest.mark.parametrize("fisher", ["type2", "empirical"])
def test_classes_last_matches_classes_on_dim_1(batch, fisher):
    x, y = batch
    torch.manual_seed(0)
    last = TokenMLP().double()
    dim1 = copy.deepcopy(last)
    dim1.classes_last = False
    opt_last = _compiled(last, x, "token_cross_entropy", fisher)
    opt_dim1 = _compiled(dim1, x, "cross_entropy", fisher)
    for _ in range(2):
        torch.testing.assert_close(opt_last.step(x, y), opt_dim1.step(x, y))
    for block, factors in opt_dim1.factors().items():
        for name, value in factors.items():
            torch.testing.assert_close(opt_last.factors()[block][name], value)
    for p, q in zip(last.parameters(), dim1.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("fisher", ["type2", "empirical", "mc"])
def test_ignored_targets_contribute_nothing(batch, fisher):
    x, y = batch
    ignored = torch.zeros(N, T, dtype=torch.bool)
    ignored[0, 1] = ignored[1, 4] = ignored[2, 0] = ignored[2, 5] = True
    y_masked = y.masked_fill(ignored, -100)
    torch.manual_seed(0)
    model = TokenMLP().double()
    kept = copy.deepcopy(model)
    opt = _compiled(model, x, "token_cross_entropy", fisher)
    # the kept tokens as one sequence: the same loss terms, nothing else
    x_kept, y_kept = x[~ignored][None], y[~ignored][None]
    opt_kept = _compiled(kept, x_kept, "token_cross_entropy", fisher)
    torch.manual_seed(1)
    loss = opt.step(x, y_masked)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(TokenMLP.forward(copy.deepcopy(kept), x).transpose(1, 2),
                                                                 y_masked))
    opt_kept.step(x_kept, y_kept)
    if fisher != "mc":  # G: only the kept terms, normalized by their number (mc: different noise draws)
        for block in ("fc", "head"):
            torch.testing.assert_close(opt.factors()[block]["G"], opt_kept.factors()[block]["G"])
    assert opt.skipped_steps == 0


def test_all_targets_ignored_is_a_skipped_step(batch):
    x, y = batch
    model = TokenMLP().double()
    before = [p.clone() for p in model.parameters()]
    opt = _compiled(model, x, "token_cross_entropy", "type2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(x, torch.full_like(y, -100))
    assert [w.category for w in caught] == [curvgraph.NonFiniteStepWarning]  # no degenerate blocks: G is 0/0
    assert "every target is -100 (ignored), so the mean loss has no terms" in str(caught[0].message)
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_target_layout_error_names_the_loss(batch):
    x, y = batch
    opt = _compiled(TokenMLP().double(), x, "token_cross_entropy", "type2")
    with pytest.raises(curvgraph.InputError, match=r"token_cross_entropy needs targets of shape \(3, 6\)"):
        opt.step(x, y[:, :, None])
