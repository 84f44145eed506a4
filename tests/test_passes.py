"""Normalization passes on their own: each rewrite keeps the graph's numerics."""

from __future__ import annotations

import string

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from curvgraph.passes import normalize
from curvgraph.passes.graph_utils import aten
from curvgraph.kinds.dense.forms import parse_linear_einsum
from curvgraph.trace import trace


@settings(max_examples=60, deadline=None)
@given(
    lead=st.lists(st.sampled_from(string.ascii_lowercase[:6]), min_size=1, max_size=3, unique=True),
    contracted=st.sampled_from("xyz"),
    free=st.sampled_from("uvw"),
    weight_first=st.booleans(),
    in_out=st.booleans(),
    corrupt=st.sampled_from(["none", "swap_output", "contract_lead"]),
)
def test_parse_linear_einsum_agrees_with_torch(lead, contracted, free, weight_first, in_out, corrupt):
    """Whatever the parser accepts computes a linear layer; the well-formed equations are accepted."""
    x_sub = "".join(lead) + contracted
    w_sub = contracted + free if in_out else free + contracted
    out = "".join(lead) + free
    if corrupt == "swap_output" and len(out) > 1:
        out = out[-1] + out[:-1]
    if corrupt == "contract_lead":
        w_sub = (lead[0] + free) if in_out else (free + lead[0])
    equation = f"{w_sub},{x_sub}->{out}" if weight_first else f"{x_sub},{w_sub}->{out}"
    parsed = parse_linear_einsum(equation)
    if corrupt == "none":
        assert parsed is not None
    if parsed is None:
        return
    x_index, w_index, weight_in_out = parsed
    sizes = {c: 2 + i for i, c in enumerate("abcdefxyzuvw")}
    operands = [torch.randn([sizes[c] for c in term]) for term in equation.split("->")[0].split(",")]
    weight = operands[w_index].T if weight_in_out else operands[w_index]
    torch.testing.assert_close(torch.einsum(equation, *operands), F.linear(operands[x_index], weight))


@pytest.mark.parametrize("equation", ["bi,oi->bo", "...i,oi->...o", "bti,io->bto", "oi,bi->bo"])
def test_parse_linear_einsum_accepts(equation):
    assert parse_linear_einsum(equation) is not None


@pytest.mark.parametrize("equation", ["bi,oi->io", "bi,bi->b", "bi,oi,oj->bj", "ii,oi->o", "bi,oij->boj"])
def test_parse_linear_einsum_rejects(equation):
    assert parse_linear_einsum(equation) is None


class Spellings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.ParameterList([nn.Parameter(torch.randn(4, 4) / 2) for _ in range(5)])
        self.b = nn.Parameter(torch.randn(4))

    def forward(self, x):
        x = torch.tanh(x @ self.w[0].T + self.b)
        x = torch.tanh(x @ self.w[1])
        x = torch.tanh(torch.addmm(self.b, x, self.w[2].t()))
        x = torch.tanh(torch.einsum("bi,oi->bo", x, self.w[3]))
        return torch.mm(x, self.w[4].permute(1, 0))


def test_normalize_rewrites_every_spelling_to_linear_and_keeps_numerics():
    model = Spellings()
    x = torch.randn(3, 4)
    traced = trace(model, (x,))
    before = torch.fx.GraphModule(torch.nn.Module(), _copy(traced.graph))
    counts = normalize(traced.graph, set(traced.params))
    after = torch.fx.GraphModule(torch.nn.Module(), traced.graph)
    targets = {n.target for n in traced.graph.nodes if n.op == "call_function"}
    assert not targets & {aten.matmul.default, aten.mm.default, aten.addmm.default, aten.einsum.default}
    assert sum(n.target == aten.linear.default for n in traced.graph.nodes) == 5
    assert counts["fold_bias"] == 2 and counts["matmul_to_linear"] == 4 and counts["einsum_to_linear"] == 1
    args = [dict(model.named_parameters())[traced.params[p]] for p in traced.params] + [x]
    torch.testing.assert_close(after(*args)[-1], before(*args)[-1])
    torch.testing.assert_close(after(*args)[-1], model(x))


def test_bias_is_not_folded_when_the_matmul_has_other_users():
    class TwoUsers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.W = nn.Parameter(torch.randn(3, 3))
            self.b = nn.Parameter(torch.randn(3))

        def forward(self, x):
            y = x @ self.W.T
            return (y + self.b) * y

    traced = trace(TwoUsers(), (torch.randn(2, 3),))
    normalize(traced.graph, set(traced.params))
    (linear,) = [n for n in traced.graph.nodes if n.target == aten.linear.default]
    assert len(linear.args) == 2


def _copy(graph: torch.fx.Graph) -> torch.fx.Graph:
    new = torch.fx.Graph()
    output = new.graph_copy(graph, {})
    new.output(output)
    return new
