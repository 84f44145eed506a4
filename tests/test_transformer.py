"""Transformers compile to one step in which every parameter has a curvature block, and train.

Models (tests/attention_models.py): ``nn.TransformerEncoderLayer`` with ``nn.Embedding``, a
learned positional table and a causal mask; a GPT-style block (fused qkv linear,
``F.scaled_dot_product_attention``, hand-written RMSNorm); ``nn.TransformerDecoderLayer``
and ``nn.MultiheadAttention(kdim, vdim)``, whose split in-projections are not matched
yet (strict xfail: these tests start passing, and must be flipped, when they are).
"""

from __future__ import annotations

import pytest
import torch

import curvgraph
from attention_models import D, T, V, CrossAttention, DecoderSeq, EncoderLM, GPTBlock


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
}
SPLIT_PROJECTIONS = pytest.mark.xfail(strict=True, reason="in-projection weights split between inputs (cross-attention, "
                                      "kdim/vdim) are not matched yet and go to the fallback")


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


@pytest.mark.parametrize("model_cls", [EncoderLM, GPTBlock, pytest.param(DecoderSeq, marks=SPLIT_PROJECTIONS),
                                       pytest.param(CrossAttention, marks=SPLIT_PROJECTIONS)],
                         ids=lambda m: m.__name__)
def test_every_parameter_is_in_a_curvature_block(compiled, model_cls):
    opt = compiled(model_cls)
    assert opt.plan.fallback_params == (), opt.plan.fallback_reasons
    if model_cls in EXPECTED:
        assert [f"{b.name}:{b.kind}" for b in opt.plan.blocks] == EXPECTED[model_cls]


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
