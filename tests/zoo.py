"""A zoo of small architectures written the ways popular code bases write them (tests/test_zoo.py, benchmarks/zoo.py).

Each :class:`Case` is a model factory, a learnable synthetic task (inputs and targets of
a fixed training set, labels from a fixed random teacher so that training can lower the
loss) and the loss name. Sizes are tiny: the test trains every model for 50 steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EXAMPLES, CLASSES, VOCAB, LENGTH = 96, 5, 13, 8


@dataclass
class Case:
    """A zoo entry: ``make()`` the model, ``data(g)`` the training set ``(inputs, targets)``, the loss.

    ``inputs`` is a tuple of positional inputs or a dict of keyword inputs; ``output``
    picks the prediction from a structured return (``curvgraph.compile``'s ``output=``).
    """

    make: Callable[[], nn.Module]
    data: Callable[[torch.Generator], tuple[tuple[Tensor, ...] | dict[str, Tensor], Tensor]]
    loss: str = "cross_entropy"
    output: str | int | None = None


# ---------------------------------------------------------------------- data
def teacher_labels(x: Tensor, g: torch.Generator, classes: int = CLASSES) -> Tensor:
    """Labels of a fixed random linear teacher on the flattened inputs (a learnable task)."""
    flat = x.flatten(1).float()
    return (flat @ torch.randn(flat.shape[1], classes, generator=g)).argmax(1)


def vectors(features: int) -> Callable[[torch.Generator], tuple[tuple[Tensor, ...], Tensor]]:
    def data(g: torch.Generator):
        x = torch.randn(EXAMPLES, features, generator=g)
        return (x,), teacher_labels(x, g)
    return data


def images(channels: int, size: int) -> Callable[[torch.Generator], tuple[tuple[Tensor, ...], Tensor]]:
    def data(g: torch.Generator):
        x = torch.randn(EXAMPLES, channels, size, size, generator=g)
        return (x,), teacher_labels(F.avg_pool2d(x, 2), g)
    return data


def sequences(features: int, length: int = LENGTH, time_major: bool = False):
    def data(g: torch.Generator):
        x = torch.randn(EXAMPLES, length, features, generator=g)
        y = teacher_labels(x.mean(1), g)
        return ((x.transpose(0, 1).contiguous(),) if time_major else (x,)), y
    return data


def tokens(g: torch.Generator) -> tuple[tuple[Tensor, ...], Tensor]:
    """Next-token prediction where the next token is a fixed function of the current one."""
    x = torch.randint(0, VOCAB, (EXAMPLES, LENGTH), generator=g)
    return (x,), (3 * x + 1) % VOCAB


def token_classes(g: torch.Generator) -> tuple[tuple[Tensor, ...], Tensor]:
    x = torch.randint(0, VOCAB, (EXAMPLES, LENGTH), generator=g)
    return (x,), x[:, 0] % CLASSES


def regression(g: torch.Generator) -> tuple[tuple[Tensor, ...], Tensor]:
    x = torch.randn(EXAMPLES, 12, generator=g)
    return (x,), torch.tanh(x @ torch.randn(12, 3, generator=g))


def two_inputs(g: torch.Generator) -> tuple[tuple[Tensor, ...], Tensor]:
    image, vector = torch.randn(EXAMPLES, 2, 6, 6, generator=g), torch.randn(EXAMPLES, 7, generator=g)
    return (image, vector), teacher_labels(torch.cat([image.flatten(1), vector], 1), g)


# ---------------------------------------------------------------------- models
class ResidualMLP(nn.Module):
    def __init__(self, d: int = 16, width: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(d, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(),
                                                  nn.Linear(2 * width, width)) for _ in range(2))
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


class SkipCNN(nn.Module):
    """conv-BN-ReLU, a residual block, max and average pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x):
        h = F.max_pool2d(self.stem(x), 2)
        h = F.relu(h + self.block(h))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, reduced, 1), nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class MobileNetLike(nn.Module):
    """Depthwise-separable convolutions with squeeze-excitation and hard-swish (MobileNetV3-style)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.Hardswish())
        self.depthwise = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8),
                                       nn.Hardswish())
        self.se = SqueezeExcite(8, 4)
        self.pointwise = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Sequential(nn.Linear(16, 32), nn.Hardswish(), nn.Dropout(0.1), nn.Linear(32, CLASSES))

    def forward(self, x):
        h = self.pointwise(self.se(self.depthwise(self.stem(x))))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class UNetLike(nn.Module):
    """A U-Net step: a strided conv with InstanceNorm down, a transposed conv up, the skip concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.InstanceNorm2d(8, affine=True), nn.ReLU())
        self.up = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)
        self.fuse = nn.Conv2d(4 + 3, 8, 3, padding=1)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x):
        h = F.relu(self.fuse(torch.cat([F.relu(self.up(self.down(x))), x], 1)))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class Conv1dGroupNorm(nn.Module):
    """A 1-d CNN over sequences ``(N, C, L)`` with GroupNorm (MNIST-1D style)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.norm1 = nn.Conv1d(1, 8, 5, padding=2), nn.GroupNorm(2, 8)
        self.conv2, self.norm2 = nn.Conv1d(8, 8, 3, padding=1, stride=2), nn.GroupNorm(2, 8)
        self.head = nn.Linear(8 * 8, CLASSES)

    def forward(self, x):
        h = F.relu(self.norm1(self.conv1(x.unsqueeze(1))))
        return self.head(F.relu(self.norm2(self.conv2(h))).flatten(1))


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.head = nn.LSTM(6, 16, batch_first=True), nn.Linear(16, CLASSES)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class GRUClassifier(nn.Module):
    """Two-layer bidirectional GRU over time-major ``(T, N, F)`` inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.gru, self.head = nn.GRU(6, 8, num_layers=2, bidirectional=True), nn.Linear(16, CLASSES)

    def forward(self, x):
        _, h = self.gru(x)
        return self.head(torch.cat([h[-2], h[-1]], 1))


class EncoderClassifier(nn.Module):
    """``nn.TransformerEncoder`` (post-norm), token embedding, learned positions, mean pooling."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.positions = nn.Parameter(0.02 * torch.randn(1, LENGTH, d))
        layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x) + self.positions[:, : x.shape[1]]).mean(1))


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding (RoFormer): rotate feature pairs ``(x1, x2)`` by position-dependent angles."""
    x1, x2 = x.chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class RopeDecoder(nn.Module):
    """Decoder-only, LLaMA-style: hand-written RMSNorm, rotary positions, separate q/k/v, SwiGLU MLP, causal softmax."""

    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(VOCAB, d)
        self.norm1, self.norm2, self.norm_out = (nn.Parameter(torch.ones(d)) for _ in range(3))
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up, self.down = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False), \
            nn.Linear(2 * d, d, bias=False)
        self.head = nn.Linear(d, VOCAB, bias=False)
        half = d // heads // 2
        angles = torch.arange(LENGTH)[:, None] / 10000 ** (torch.arange(half)[None] / half)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    @staticmethod
    def rms(x: Tensor, w: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def forward(self, x):
        h = self.embed(x)
        n, t, d = h.shape
        z = self.rms(h, self.norm1)
        q, k, v = (proj(z).view(n, t, self.heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        q, k = rotate(q, self.cos[:t], self.sin[:t]), rotate(k, self.cos[:t], self.sin[:t])
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        a = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        h = h + self.o(a.transpose(1, 2).reshape(n, t, d))
        z = self.rms(h, self.norm2)
        h = h + self.down(F.silu(self.gate(z)) * self.up(z))
        return self.head(self.rms(h, self.norm_out))


class TiedGPT(nn.Module):
    """GPT-style: learned positions, pre-norm causal encoder layer with sdpa, tied embedding and head."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.positions = nn.Parameter(0.02 * torch.randn(1, LENGTH, d))
        self.block = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True, norm_first=True,
                                                activation="gelu")
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        t = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        h = self.block(self.embed(x) + self.positions[:, :t], src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


class ViTLike(nn.Module):
    """Patch embedding by a strided convolution, a class token, learned positions, an encoder layer."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.positions = nn.Parameter(0.02 * torch.randn(1, 5, d))
        self.block = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, CLASSES)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1) + self.positions
        return self.head(self.norm(self.block(h))[:, 0])


class FrozenFeatures(nn.Module):
    """A frozen feature extractor (weights and biases with ``requires_grad=False``) under a trainable head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
        self.features.requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, CLASSES))

    def forward(self, x):
        return self.head(self.features(x))


class Standardized(nn.Module):
    """Input standardization by buffers (a mean and a scale), BatchNorm1d with running statistics, a counter buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full((16,), 0.1))
        self.register_buffer("scale", torch.full((16,), 2.0))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.net = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, CLASSES))

    def forward(self, x):
        self.calls.add_(1)
        return self.net((x - self.mean) / self.scale)


class TwoInputs(nn.Module):
    """An image branch and a vector branch fused by concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.vec = nn.Linear(7, 8)
        self.head = nn.Linear(4 * 9 + 8, CLASSES)

    def forward(self, image, vector):
        a = F.avg_pool2d(F.relu(self.conv(image)), 2).flatten(1)
        return self.head(torch.cat([a, torch.tanh(self.vec(vector))], 1))


class EinsumModel(nn.Module):
    """Parameters used only through ``torch.einsum``: a dense layer in einsum form and a bilinear form."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(24, 16) / 4)
        self.bilinear = nn.Parameter(torch.randn(CLASSES, 8, 8) / 8)
        self.w2 = nn.Parameter(torch.randn(8, 24) / 5)

    def forward(self, x):
        h = torch.tanh(torch.einsum("ni,oi->no", x, self.w1))
        z = torch.einsum("ni,oi->no", h, self.w2)
        return torch.einsum("ni,cij,nj->nc", z, self.bilinear, z)


class RegressionLayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 32), nn.SiLU(), nn.LayerNorm(32), nn.Linear(32, 3))

    def forward(self, x):
        return self.net(x)


def keyword_tokens(g: torch.Generator) -> tuple[dict[str, Tensor], Tensor]:
    """Hugging Face style: ``input_ids`` and an ``attention_mask`` with padding at the end of some rows."""
    (x,), y = tokens(g)
    mask = (torch.arange(LENGTH)[None] < torch.randint(LENGTH // 2, LENGTH + 1, (EXAMPLES, 1), generator=g)).long()
    return {"input_ids": x, "attention_mask": mask}, torch.where(mask.bool(), y, -100)


@dataclass
class CausalLMOutput:
    """A stand-in for a Hugging Face ``ModelOutput``: logits and the attention layers' key/value caches."""

    logits: Tensor
    past_key_values: tuple[Tensor, ...]


class KeywordLM(nn.Module):
    """``model(input_ids=..., attention_mask=...)`` returning a structured output, as Hugging Face models do."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        t = input_ids.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=h.device).triu(1)
        a, _ = self.attn(h, h, h, attn_mask=causal, key_padding_mask=attention_mask == 0, need_weights=False)
        h = self.norm(h + a)
        return CausalLMOutput(self.head(h), (h.detach(),))


class TupleOutput(nn.Module):
    """Returns ``(logits, features)``; the prediction is item 0."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Sequential(nn.Linear(16, 32), nn.Tanh()), nn.Linear(32, CLASSES)

    def forward(self, x):
        features = self.body(x)
        return self.head(features), features


class DictOutput(nn.Module):
    """Returns ``{"logits": ..., "aux": ...}``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 6, 3), nn.Linear(6, CLASSES)

    def forward(self, x):
        h = F.relu(self.conv(x)).mean((2, 3))
        return {"logits": self.head(h), "aux": h.norm(dim=1)}


ZOO: dict[str, Case] = {
    "residual-mlp": Case(ResidualMLP, vectors(16)),
    "skip-cnn": Case(SkipCNN, images(3, 8)),
    "mobilenet-like": Case(MobileNetLike, images(3, 8)),
    "unet-like": Case(UNetLike, images(3, 8)),
    "conv1d-groupnorm": Case(Conv1dGroupNorm, vectors(16)),
    "lstm": Case(LSTMClassifier, sequences(6)),
    "gru-bidirectional-time-major": Case(GRUClassifier, sequences(6, time_major=True)),
    "transformer-encoder": Case(EncoderClassifier, token_classes),
    "rope-rmsnorm-decoder": Case(RopeDecoder, tokens, "token_cross_entropy"),
    "tied-gpt": Case(TiedGPT, tokens, "token_cross_entropy"),
    "vit-like": Case(ViTLike, images(3, 8)),
    "frozen-features": Case(FrozenFeatures, vectors(16)),
    "buffers-batchnorm": Case(Standardized, vectors(16)),
    "two-inputs": Case(TwoInputs, two_inputs),
    "einsum": Case(EinsumModel, vectors(16)),
    "regression-layernorm": Case(RegressionLayerNorm, regression, "mse"),
    "keyword-inputs-structured-output": Case(KeywordLM, keyword_tokens, "token_cross_entropy", output="logits"),
    "tuple-output": Case(TupleOutput, vectors(16), output=0),
    "dict-output": Case(DictOutput, images(3, 8), output="logits"),
}
