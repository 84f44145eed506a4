"""Real Hugging Face models, built tiny from their configs (nothing is downloaded), driven the way users drive them.

GPT-2 (a tied embedding/head, learned positions, LayerNorm, ``Conv1D`` projections),
BERT for sequence classification (token types, a pooler) and LLaMA (rotary positions,
RMSNorm, grouped-query attention, SwiGLU) are called by keyword (``model(**batch)``)
with a padded ``attention_mask``, return a ``ModelOutput`` whose ``logits`` the loss
sees (``output="logits"``), and run with their defaults: ``sdpa`` attention and, for the
LMs, ``use_cache=True``; they are trained in train mode and then stepped in eval mode.
References: the model's own eager forward, and its training loss on the whole data set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import curvgraph
from helpers import assert_plan_covers

transformers = pytest.importorskip("transformers")

VOCAB, LENGTH, EXAMPLES, CLASSES = 50, 12, 48, 3


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def llama() -> nn.Module:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                      bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(config)


def bert() -> nn.Module:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=CLASSES)
    return transformers.BertForSequenceClassification(config)


def sequences(g: torch.Generator, n: int = EXAMPLES, length: int = LENGTH) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Arithmetic sequences mod ``VOCAB`` with a stride of 1, 2 or 3, padded at the end of some rows.

    Returns the keyword inputs (``input_ids``, ``attention_mask``, ``token_type_ids``),
    the next tokens (``-100`` on padding: ignored) and a class per row (its first token mod ``CLASSES``).
    """
    stride = torch.randint(1, CLASSES + 1, (n, 1), generator=g)
    tokens = (torch.randint(0, VOCAB, (n, 1), generator=g) + stride * torch.arange(length + 1)) % VOCAB
    mask = (torch.arange(length)[None] < torch.randint(length // 2, length + 1, (n, 1), generator=g)).long()
    mask[0] = 1  # one full row: the padding is a real mask
    inputs = {"input_ids": tokens[:, :-1], "attention_mask": mask, "token_type_ids": torch.zeros_like(mask)}
    return inputs, torch.where(mask.bool(), tokens[:, 1:], -100), tokens[:, 0] % CLASSES


#: name -> (model, input keys it takes, "lm" (next tokens, token_cross_entropy) or "classes" (cross_entropy),
#: the kind of some of its blocks)
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[str, ...], str, dict[str, str]]] = {
    "gpt2": (gpt2, ("input_ids", "attention_mask"), "lm",
             {"transformer.wte": "tied", "transformer.wpe": "embedding", "transformer.h.0.attn.c_attn": "dense",
              "transformer.h.0.ln_1": "norm"}),
    "llama": (llama, ("input_ids", "attention_mask"), "lm",
              {"model.embed_tokens": "embedding", "model.layers.0.self_attn.k_proj": "dense",
               "model.layers.0.input_layernorm": "norm", "lm_head": "dense"}),
    "bert": (bert, ("input_ids", "attention_mask", "token_type_ids"), "classes",
             {"bert.embeddings.token_type_embeddings": "embedding", "bert.pooler.dense": "dense",
              "bert.embeddings.LayerNorm": "norm", "classifier": "dense"}),
}


def case_data(name: str, g: torch.Generator, n: int = EXAMPLES, length: int = LENGTH) -> tuple[dict[str, Tensor], Tensor]:
    """The inputs ``name`` takes and its targets."""
    _, keys, task, _ = CASES[name]
    inputs, next_tokens, classes = sequences(g, n, length)
    return {k: inputs[k] for k in keys}, next_tokens if task == "lm" else classes


def options(name: str) -> dict[str, str]:
    return {"loss": "token_cross_entropy" if CASES[name][2] == "lm" else "cross_entropy", "output": "logits"}


def model_loss(model: nn.Module, inputs: dict[str, Tensor], targets: Tensor) -> Tensor:
    """The loss of the model's own eager forward (no gradients)."""
    with torch.no_grad():
        logits = model(**inputs).logits
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=-100)


@dataclass
class Trained:
    """A model trained for 12 steps in train mode (the default) by an optimizer that captured it at the first step."""

    model: nn.Module
    opt: curvgraph.CurvatureOptimizer
    initial: float  # the training loss (whole data set, eval mode) before and after
    final: float


@pytest.fixture(scope="module", params=list(CASES))
def trained(request) -> tuple[str, Trained]:
    name = request.param
    torch.manual_seed(0)
    model = CASES[name][0]()
    inputs, targets = case_data(name, torch.Generator().manual_seed(1))
    opt = curvgraph.compile(model, backend="eager", seed=0, lr=1e-2, damping=1e-2, **options(name))
    assert not opt.captured

    def training_loss() -> float:
        model.eval()
        value = model_loss(model, inputs, targets).item()
        model.train()
        return value

    initial = training_loss()
    for i in range(12):
        rows = slice(16 * (i % 3), 16 * (i % 3 + 1))
        opt.step({k: v[rows] for k, v in inputs.items()}, targets[rows])
    assert opt.captured and model.training
    return name, Trained(model, opt, initial, training_loss())


def test_model_captures_at_the_first_step_covers_every_parameter_and_trains(trained):
    name, run = trained
    assert_plan_covers(run.opt.plan, run.model)
    assert not run.opt.plan.fallback_params  # every parameter of these models has a curvature block
    kinds = CASES[name][3]
    assert {b.name: b.kind for b in run.opt.plan.blocks if b.name in kinds} == kinds
    assert run.final < 0.6 * run.initial


def test_in_eval_mode_the_step_loss_is_the_models_loss_with_padding_and_new_sizes(trained):
    """After ``model.eval()`` (no dropout: deterministic) the step's loss, before its update, is the model's own: the
    graph captured in eval mode is the model, attention mask and positions included, for batches of other sizes and
    sequence lengths too."""
    name, run = trained
    run.model.eval()
    g = torch.Generator().manual_seed(2)
    for batch, y in [case_data(name, g, n=4), case_data(name, g, n=3, length=9), case_data(name, g, n=5)]:
        expected = model_loss(run.model, batch, y)
        torch.testing.assert_close(run.opt.step(batch, y), expected, rtol=1e-5, atol=1e-6)


def test_a_model_output_without_output_names_the_logits():
    torch.manual_seed(0)
    inputs, targets = case_data("llama", torch.Generator().manual_seed(3), n=4)
    with pytest.raises(curvgraph.ConfigError, match=r"CausalLMOutputWithPast \{'logits'.*output='logits'"):
        curvgraph.compile(llama(), inputs, loss="token_cross_entropy", backend="eager")


def beit() -> nn.Module:
    config = transformers.BeitConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, use_relative_position_bias=True,
                                     num_labels=CLASSES)
    return transformers.BeitForImageClassification(config)


def poolformer() -> nn.Module:
    config = transformers.PoolFormerConfig(hidden_sizes=[8, 16], depths=[1, 1], num_encoder_blocks=2,
                                           patch_sizes=[7, 3], strides=[4, 2], padding=[2, 1], pool_size=3,
                                           mlp_ratio=2.0, num_labels=CLASSES)
    return transformers.PoolFormerForImageClassification(config)


def swin() -> nn.Module:
    config = transformers.SwinConfig(image_size=16, patch_size=2, embed_dim=16, depths=[2, 1], num_heads=[2, 2],
                                     window_size=4, drop_path_rate=0.0, num_labels=CLASSES)
    return transformers.SwinForImageClassification(config)


def swinv2() -> nn.Module:
    config = transformers.Swinv2Config(image_size=16, patch_size=2, embed_dim=16, depths=[2, 1], num_heads=[2, 2],
                                       window_size=4, drop_path_rate=0.0, num_labels=CLASSES)
    return transformers.Swinv2ForImageClassification(config)


#: name -> (model, the parameters the plan leaves to the fallback, a block that must be found and its kind, options)
IMAGE_CASES = {
    # the relative position bias table is looked up by a constant index and added to the attention scores: no pass
    # matches it; the mask it makes requires a gradient in the step, so the fused attention call runs its math
    # kernel there, whose output layout differs from the capture's
    "beit": (beit, ("beit.layers.0.relative_position_bias.relative_position_bias_table",),
             ("beit.layers.0.lambda_1", "norm"), {}),
    # layer scales applied as w.unsqueeze(-1).unsqueeze(-1) * x
    "poolformer": (poolformer, (), ("poolformer.encoder.block.0.0.layer_scale_1", "norm"), {}),
    # (shifted) window partitions: with every size symbolic, torch.export takes minutes over their reshapes; the bias
    # tables are indexed as table[index] (embedding blocks), their mask learned as BEiT's
    "swin": (swin, (), ("swin.encoder.layers.0.blocks.1.attention.relative_position_bias.relative_position_bias_table",
                        "embedding"), {"dynamic": "batch"}),
    # the logit scales (clamp(...).exp() times the scores) fall back; with the image size fixed every norm is a block,
    # where with it symbolic the size of the norm after the first window attention is a floor/Mod expression
    "swinv2": (swinv2, tuple(f"swinv2.encoder.layers.{i}.blocks.{j}.attention.self.logit_scale"
                             for i, j in ((0, 0), (0, 1), (1, 0))),
               ("swinv2.encoder.layers.0.blocks.0.layernorm_before", "norm"), {"dynamic": "batch"}),
}


@pytest.mark.parametrize("name", IMAGE_CASES)
def test_image_models_train_with_a_fixed_lr(name):
    """BEiT, PoolFormer, Swin and Swin V2 (tiny, from their configs; the Swins captured with only the batch size
    symbolic) train at a fixed ``lr``, where the step keeps the fused attention call: the step's first loss is the
    model's, and the loss on the batch falls."""
    make, fallback, (block, kind), options = IMAGE_CASES[name]
    torch.manual_seed(0)
    model = make()
    g = torch.Generator().manual_seed(1)
    pixels, labels = {"pixel_values": torch.randn(6, 3, 16, 16, generator=g)}, torch.randint(0, CLASSES, (6,), generator=g)
    with torch.no_grad():
        expected = F.cross_entropy(model(**pixels).logits, labels)  # train mode: no dropout in these configs
    opt = curvgraph.compile(model, loss="cross_entropy", output="logits", lr=1e-2, damping=1e-2, backend="eager", seed=0,
                            **options)
    losses = [opt.step(pixels, labels) for _ in range(4)]
    torch.testing.assert_close(losses[0], expected)
    assert losses[-1] < 0.9 * losses[0]
    assert opt.plan.fallback_params == fallback and opt.plan.block(block).kind == kind
