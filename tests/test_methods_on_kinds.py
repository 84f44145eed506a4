"""Every registered method trains every built-in block kind: dense, conv (grouped, transposed), norm, embedding,
position, packed, tied and rnn blocks, in three small models, at the method's defaults.

Proves that no method rejects or mis-shapes a kind: each step is finite, every block's
parameters move, and the loss falls over a few steps on a fixed batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph

V, D, T = 11, 8, 5


class TokenModel(nn.Module):
    """Tied embedding/head, a positional table, a packed cross-attention in-projection, LayerNorm, a dense MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.pos = nn.Parameter(0.1 * torch.randn(1, T, D))
        self.in_proj = nn.Parameter(0.3 * torch.randn(3 * D, D))
        self.norm = nn.LayerNorm(D)
        self.mlp = nn.Linear(D, D)

    def forward(self, tokens):
        h = self.emb(tokens) + self.pos[:, : tokens.shape[1]]
        w_q, w_kv = self.in_proj.split([D, 2 * D])
        k, v = F.linear(torch.tanh(h), w_kv).chunk(2, -1)
        h = self.norm(h + F.scaled_dot_product_attention(F.linear(h, w_q), k, v))
        return torch.tanh(self.mlp(h)) @ self.emb.weight.T


def conv_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.ConvTranspose2d(4, 2, 2, stride=2, groups=2), nn.Flatten(), nn.Linear(2 * 8 * 8, 3))


class GRUClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.gru(x)[0][:, -1])


CASES = {
    "tokens": (TokenModel, lambda g: torch.randint(0, V, (6, T), generator=g), lambda g: torch.randint(0, V, (6, T), generator=g),
               "token_cross_entropy", {"emb": "tied", "pos": "position", "in_proj": "packed", "norm": "norm", "mlp": "dense"}),
    "conv": (conv_model, lambda g: torch.randn(6, 2, 4, 4, generator=g), lambda g: torch.randint(0, 3, (6,), generator=g),
             "cross_entropy", {"0": "conv", "1": "norm", "3": "conv", "5": "dense"}),
    "rnn": (GRUClassifier, lambda g: torch.randn(6, 4, 3, generator=g), lambda g: torch.randint(0, 3, (6,), generator=g),
            "cross_entropy", {"gru.weight_ih_l0": "rnn", "gru.weight_hh_l0": "rnn", "head": "dense"}),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method", sorted(curvgraph.registry.METHODS))
def test_method_trains_every_kind(method, case):
    make, inputs, targets, loss, kinds = CASES[case]
    torch.manual_seed(0)
    model = make()
    g = torch.Generator().manual_seed(1)
    x, y = inputs(g), targets(g)
    opt = curvgraph.compile(model, (x,), loss=loss, method=method, backend="eager")
    assert {b.name: b.kind for b in opt.plan.blocks} == kinds and opt.plan.fallback_params == ()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = [opt.step(x, y).item() for _ in range(6)]
    assert opt.skipped_steps == 0
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters()), method
    assert losses[-1] < losses[0], losses
