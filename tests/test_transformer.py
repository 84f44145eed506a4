"""Transformers compile to one step in which every parameter has a curvature block, and train.

Models (tests/attention_models.py): ``nn.TransformerEncoderLayer`` with ``nn.Embedding``, a
learned positional table and a causal mask; a GPT-style block (fused qkv linear,
``F.scaled_dot_product_attention``, hand-written RMSNorm); ``nn.TransformerDecoderLayer``
and ``nn.MultiheadAttention(kdim, vdim)``, whose in-projections are split between inputs
(``packed`` blocks). The packed factors are checked against the dense factors of the
same projections written as separate ``nn.Linear`` layers (themselves checked against
curvlinops in tests/test_factors.py).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph import viz
from attention_models import D, T, V, CrossAttention, DecoderSeq, EncoderLM, GPTBlock, LinearOnlyAttention
from helpers import curvlinops_factors


def _tokens(batch: int = 4, length: int = T) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(1))


def _inputs(model_cls):
    if model_cls is CrossAttention:
        g = torch.Generator().manual_seed(2)
        return torch.randn(4, T, D, generator=g), torch.randn(4, 7, 5, generator=g), torch.randn(4, 7, 3, generator=g)
    return (_tokens(),)


EXPECTED = {
    EncoderLM: ["emb:embedding", "pos:position", "layer.self_attn.in_proj_weight:dense", "layer.self_attn.out_proj:dense",
                "layer.norm1:norm", "layer.linear1:dense", "layer.linear2:dense", "layer.norm2:norm", "head:dense"],
    GPTBlock: ["emb:embedding", "norm_w:norm", "qkv:dense", "proj:dense", "mlp.0:dense", "mlp.2:dense", "head:dense"],
    DecoderSeq: ["emb:embedding", "layer.norm1:norm", "layer.self_attn.in_proj_weight:dense",
                 "layer.self_attn.out_proj:dense", "layer.norm2:norm", "layer.multihead_attn.in_proj_weight:packed",
                 "layer.multihead_attn.out_proj:dense", "layer.norm3:norm", "layer.linear1:dense", "layer.linear2:dense",
                 "head:dense"],
    CrossAttention: ["attn.q_proj_weight:dense", "attn.in_proj_bias:packed", "attn.k_proj_weight:dense",
                     "attn.v_proj_weight:dense", "attn.out_proj:dense", "head:dense"],
}


#: The attention groups of each model: (group name or None, members as role=block(s) [part]).
GROUPS = {
    EncoderLM: [("layer.self_attn", ["q=layer.self_attn.in_proj_weight [part 1/3]", "k=layer.self_attn.in_proj_weight [part 2/3]",
                                     "v=layer.self_attn.in_proj_weight [part 3/3]", "out=layer.self_attn.out_proj"])],
    GPTBlock: [(None, ["q=qkv [part 1/3]", "k=qkv [part 2/3]", "v=qkv [part 3/3]", "out=proj"])],
    DecoderSeq: [("layer.self_attn", ["q=layer.self_attn.in_proj_weight [part 1/3]", "k=layer.self_attn.in_proj_weight [part 2/3]",
                                      "v=layer.self_attn.in_proj_weight [part 3/3]", "out=layer.self_attn.out_proj"]),
                 ("layer.multihead_attn", ["q=layer.multihead_attn.in_proj_weight",
                                           "k=layer.multihead_attn.in_proj_weight [part 1/2]",
                                           "v=layer.multihead_attn.in_proj_weight [part 2/2]",
                                           "out=layer.multihead_attn.out_proj"])],
    CrossAttention: [("attn", ["q=attn.q_proj_weight & attn.in_proj_bias", "k=attn.in_proj_bias & attn.k_proj_weight",
                               "v=attn.in_proj_bias & attn.v_proj_weight", "out=attn.out_proj"])],
}


@pytest.fixture(scope="module")
def compiled():
    """One eager-compiled optimizer per model class, shared by the tests of this module."""
    cache = {}

    def get(model_cls):
        if model_cls not in cache:
            torch.manual_seed(0)
            cache[model_cls] = curvgraph.compile(model_cls(), _inputs(model_cls), loss="token_cross_entropy",
                                                 backend="eager")
        return cache[model_cls]

    return get


@pytest.mark.parametrize("model_cls", [EncoderLM, GPTBlock, DecoderSeq, CrossAttention], ids=lambda m: m.__name__)
def test_every_parameter_is_in_a_curvature_block(compiled, model_cls):
    opt = compiled(model_cls)
    assert opt.plan.fallback_params == (), opt.plan.fallback_reasons
    if model_cls in EXPECTED:
        assert [f"{b.name}:{b.kind}" for b in opt.plan.blocks] == EXPECTED[model_cls]


@pytest.mark.parametrize("model_cls", [EncoderLM, GPTBlock, DecoderSeq, CrossAttention], ids=lambda m: m.__name__)
def test_attention_groups_name_every_projection(compiled, model_cls, tmp_path):
    """Each attention core's q, k, v and out projections are found, with the part of a fused projection each is."""
    plan = compiled(model_cls).plan
    assert len(plan.groups) == len(GROUPS[model_cls])
    for group, (name, members) in zip(plan.groups, GROUPS[model_cls]):
        assert [str(m) for m in group.members] == members
        assert name is None or group.name == name  # a core in the model's own forward has no module path
    assert all(g.kind == "attention" for g in plan.groups)
    assert "block groups" in str(plan)
    if model_cls is EncoderLM:  # drawings name the group and the roles in each member block's cluster
        assert "attention layer.self_attn: q 1/3, k 2/3, v 3/3" in viz.to_dot(plan)
        with open(curvgraph.visualize(plan, tmp_path / "plan.json")) as f:
            (group,) = json.load(f)["graph"]["groups"]
        assert group["name"] == "layer.self_attn" and [m["role"] for m in group["members"]] == ["q", "k", "v", "out"]


@pytest.mark.parametrize("fused", [True, False], ids=["fused-sdpa", "separate-softmax"])
def test_attention_group_of_linear_only_attention(fused):
    """The sdpa core and the hand-written softmax(q kᵀ / √d) v core give the same roles."""
    plan = curvgraph.compile(LinearOnlyAttention(fused), (torch.randn(2, T, D),), backend="eager").plan
    (group,) = plan.groups
    expected = (["q=qkv [part 1/3]", "k=qkv [part 2/3]", "v=qkv [part 3/3]"] if fused else ["q=q", "k=k", "v=v"]) + ["out=out"]
    assert [str(m) for m in group.members] == expected
    assert {m.layer for m in group.members} <= {n for b in plan.blocks for u in b.uses for n in u.outputs}


class DropoutAttention(LinearOnlyAttention):
    """:class:`LinearOnlyAttention` (fused) with attention dropout, ``F.scaled_dot_product_attention(dropout_p=0.2)``."""

    def __init__(self) -> None:
        super().__init__(fused=True)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=0.2 if self.training else 0.0)
        return self.head(torch.tanh(self.mlp(x + self.out(a)))).transpose(1, 2)


@pytest.mark.parametrize("model_cls,options,form", [
    (LinearOnlyAttention, {}, "math"),  # lr="auto": the quadratic model differentiates the backward again
    (LinearOnlyAttention, {"lr": 1e-2}, "fused"),
    (LinearOnlyAttention, {"method": "singd"}, "fused"),
    (LinearOnlyAttention, {"lr": 1e-2, "fisher": "type2"}, "math"),  # the type-2 Fisher vectorizes the backward
    (DropoutAttention, {"lr": 1e-2}, "math"),  # dropout: a draw of the step, applied to the math form's weights
], ids=["auto", "fixed-lr", "singd", "fixed-lr-type2", "fixed-lr-dropout"])
def test_fused_attention_stays_where_the_step_does_not_transform_its_backward(model_cls, options, form):
    """``scaled_dot_product_attention`` stays a fused call in the step unless the step differentiates or vectorizes its
    backward or the call has dropout; the attention group is found in either form, and the step trains."""
    torch.manual_seed(0)
    model = model_cls() if model_cls is DropoutAttention else model_cls(True)
    x, y = torch.randn(3, T, D), torch.randint(0, V, (3, T))
    opt = curvgraph.compile(model, (x,), backend="eager", **options)
    assert ("aten.scaled_dot_product_attention.default(" in opt.source) == (form == "fused")
    assert ("aten._scaled_dot_product_attention_math.default(" in opt.source) == (form == "math")
    (group,) = opt.plan.groups
    assert [str(m) for m in group.members] == ["q=qkv [part 1/3]", "k=qkv [part 2/3]", "v=qkv [part 3/3]", "out=out"]
    losses = [float(opt.step(x, y)) for _ in range(8)]  # lr="auto" rejects its first three here
    assert opt.skipped_steps == 0 and losses[-1] < losses[0]


class DirectMHA(nn.Module):
    """``nn.MultiheadAttention`` called directly, so with ``need_weights=True``: its core is
    ``softmax(bmm(q * d**-0.5, kᵀ)) v``, or with a mask ``softmax(baddbmm(mask, q * d**-0.5, kᵀ)) v``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, D)
        self.mha = nn.MultiheadAttention(D, 2, batch_first=True)
        self.head = nn.Linear(D, 3)

    def forward(self, x, key_padding_mask=None):
        h = self.inp(x)
        a, _ = self.mha(h, h, h, key_padding_mask=key_padding_mask)
        return self.head(a.mean(1))


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "key-padding-mask"])
def test_attention_group_of_multihead_attention_returning_its_weights(masked):
    x = torch.randn(4, T, 5)
    mask = torch.zeros(4, T, dtype=torch.bool)
    mask[:, T - 2:] = True
    plan = curvgraph.compile(DirectMHA(), (x, mask) if masked else (x,), backend="eager").plan
    (group,) = plan.groups
    assert group.name == "mha"
    assert [str(m) for m in group.members] == [f"{role}=mha.in_proj_weight [part {i}/3]" for i, role in
                                               enumerate("qkv", 1)] + ["out=mha.out_proj"]


@pytest.mark.parametrize("model_cls", [EncoderLM, GPTBlock, DecoderSeq, CrossAttention], ids=lambda m: m.__name__)
def test_defaults_train_a_transformer(compiled, model_cls):
    inputs = _inputs(model_cls)
    targets = torch.randint(0, V, inputs[0].shape[:2], generator=torch.Generator().manual_seed(3))
    opt = compiled(model_cls)
    losses = [opt.step(inputs, targets).item() for _ in range(15)]
    assert opt.skipped_steps == 0
    assert max(losses) <= losses[0] * 1.001 and losses[-1] < 0.6 * losses[0], losses


def test_shorter_sequence_and_batch_work(compiled):
    opt = compiled(EncoderLM)
    short = _tokens(batch=3, length=T - 2)
    loss = opt.step(short, torch.randint(0, V, short.shape))
    assert torch.isfinite(loss) and opt.skipped_steps == 0


class BoolMaskAttention(nn.Module):
    """``F.scaled_dot_product_attention`` with a boolean mask (``True``: attend), causal and key padding, the way
    Hugging Face models build it from an ``attention_mask``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.qkv, self.head = nn.Embedding(V, D), nn.Linear(D, 3 * D), nn.Linear(D, V)

    def forward(self, tokens, attention_mask):
        x = self.emb(tokens)
        n, t, d = x.shape
        q, k, v = (z.view(n, t, 2, d // 2).transpose(1, 2) for z in self.qkv(x).split(d, -1))
        mask = torch.ones(t, t, dtype=torch.bool).tril() & attention_mask.bool()[:, None, None, :]
        return self.head(x + F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(n, t, d))


@pytest.mark.parametrize("lr", ["auto", 1e-2], ids=["math-form", "fused"])
def test_a_boolean_attention_mask_masks_in_the_step(lr):
    """The step's loss is the model's: a boolean mask excludes the keys it marks ``False`` (its math form, with
    ``lr="auto"``, adds ``-inf`` there, as the fused op does, not the mask's 0/1 values)."""
    torch.manual_seed(0)
    model = BoolMaskAttention()
    tokens = _tokens()
    padding = (torch.arange(T) < torch.tensor([[T], [T - 3], [2], [T - 1]])).long()
    targets = torch.randint(0, V, tokens.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = F.cross_entropy(model(tokens, padding).flatten(0, 1), targets.flatten())
    opt = curvgraph.compile(model, (tokens, padding), loss="token_cross_entropy", lr=lr, backend="eager")
    assert ("aten.scaled_dot_product_attention.default(" in opt.source) == (lr != "auto")
    torch.testing.assert_close(opt.step((tokens, padding), targets), expected)


class BiasedAttention(nn.Module):
    """``F.scaled_dot_product_attention`` with a learned additive mask (BEiT's and Swin's relative position bias, one
    ``T x T`` table per head) and the output viewed back as Hugging Face models do:
    ``.transpose(1, 2).contiguous().view(N, T, D)``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.qkv, self.head = nn.Embedding(V, D), nn.Linear(D, 3 * D), nn.Linear(D, V)
        self.bias = nn.Parameter(0.1 * torch.randn(2, T, T))

    def forward(self, tokens):
        x = self.emb(tokens)
        n, t, d = x.shape
        q, k, v = (z.view(n, t, 2, d // 2).transpose(1, 2) for z in self.qkv(x).split(d, -1))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias[:, :t, :t].unsqueeze(0))
        return self.head(x + a.transpose(1, 2).contiguous().view(n, t, d))


@pytest.mark.parametrize("lr", ["auto", 1e-2], ids=["math-form", "fused"])
def test_attention_with_a_learned_mask_steps_as_the_model(lr):
    """A mask computed from a parameter requires a gradient in the step but not at the capture, and torch's CPU
    dispatch then picks the math kernel, whose output is laid out unlike the flash kernel's that the captured
    ``view`` fitted: the step's loss is the model's, with the fused call kept (a fixed ``lr``) too, and it trains."""
    torch.manual_seed(0)
    model = BiasedAttention()
    tokens = _tokens()
    targets = torch.randint(0, V, tokens.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
    opt = curvgraph.compile(model, (tokens,), loss="token_cross_entropy", lr=lr, backend="eager", seed=0)
    assert ("aten.scaled_dot_product_attention.default(" in opt.source) == (lr != "auto")
    losses = [opt.step(tokens, targets) for _ in range(3)]
    torch.testing.assert_close(losses[0], expected)
    assert losses[-1] < losses[0]


class PackedCross(nn.Module):
    """Cross-attention with one packed ``(3D, D)`` in-projection split ``[q; kv]`` between the query and the memory."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(0.3 * torch.randn(3 * D, D))
        self.b = nn.Parameter(0.1 * torch.randn(3 * D))
        self.head = nn.Linear(D, V)

    def forward(self, x, memory):
        w_q, w_kv = self.w.split([D, 2 * D])
        b_q, b_kv = self.b.split([D, 2 * D])
        k, v = F.linear(memory, w_kv, b_kv).chunk(2, -1)
        return self.head(F.scaled_dot_product_attention(F.linear(x, w_q, b_q), k, v))


class SeparateCross(nn.Module):
    """The same function with the pieces as separate ``nn.Linear`` layers."""

    def __init__(self, packed: PackedCross) -> None:
        super().__init__()
        self.q, self.kv, self.head = nn.Linear(D, D), nn.Linear(D, 2 * D), copy.deepcopy(packed.head)
        with torch.no_grad():
            self.q.weight.copy_(packed.w[:D]), self.q.bias.copy_(packed.b[:D])
            self.kv.weight.copy_(packed.w[D:]), self.kv.bias.copy_(packed.b[D:])

    def forward(self, x, memory):
        k, v = self.kv(memory).chunk(2, -1)
        return self.head(F.scaled_dot_product_attention(self.q(x), k, v))


def test_packed_factors_are_the_pieces_dense_factors(float64):
    torch.manual_seed(0)
    packed = PackedCross()
    separate = SeparateCross(packed)
    x, memory = torch.randn(3, T, D), torch.randn(3, T + 1, D)
    y = torch.randint(0, V, (3, T))
    factors = {}
    for model in (packed, separate):
        opt = curvgraph.compile(model, (x, memory), loss="token_cross_entropy", fisher="type2", backend="eager")
        opt.step((x, memory), y)
        factors[type(model)] = opt.factors()
    ours, dense = factors[PackedCross]["w"], factors[SeparateCross]
    assert ours["A"].shape == (3, D + 1, D + 1) and ours["G"].shape == (3, D, D)
    for j, (block, rows) in enumerate([("q", slice(0, D)), ("kv", slice(0, D)), ("kv", slice(D, 2 * D))]):
        torch.testing.assert_close(ours["A"][j], dense[block]["A"])
        torch.testing.assert_close(ours["G"][j], dense[block]["G"][rows, rows])


@pytest.mark.parametrize("fused,fisher,kfac_approx,lr", [  # every value of each option, in five runs; the fused
    # call stays in the step with a fixed lr and the empirical Fisher (test_fused_attention_stays_...)
    (True, "type2", "expand", "auto"), (True, "empirical", "reduce", "auto"), (False, "type2", "reduce", "auto"),
    (False, "empirical", "expand", "auto"), (True, "empirical", "expand", 1e-2)])
def test_attention_projection_factors_match_curvlinops(float64, fused, fisher, kfac_approx, lr):
    torch.manual_seed(4)
    model = LinearOnlyAttention(fused)
    x, y = torch.randn(3, T, D), torch.randint(0, V, (3, T))
    A_ref, G_ref = curvlinops_factors(copy.deepcopy(model), "cross_entropy", x, y, fisher, kfac_approx=kfac_approx)
    opt = curvgraph.compile(model, (x,), fisher=fisher, kfac_approx=kfac_approx, ema=0.0, lr=lr, backend="eager")
    assert opt.plan.fallback_params == ()
    opt.step(x, y)
    factors = opt.factors()
    names = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    assert sorted(factors) == sorted(names)
    assert sorted(A_ref) == sorted(names)  # curvlinops keys the factors by module path, as curvgraph names blocks
    for name in names:
        torch.testing.assert_close(factors[name]["A"], A_ref[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(factors[name]["G"], G_ref[name], rtol=1e-10, atol=1e-12)
