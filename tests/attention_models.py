"""Small transformer models written the usual ways (for tests/test_transformer.py)."""

import math
import torch
import torch.nn.functional as F
from torch import nn

V, D, T = 11, 8, 6


class EncoderLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.pos = nn.Parameter(0.02 * torch.randn(1, T, D))
        self.layer = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(D, V)

    def forward(self, tokens):
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.head(self.layer(self.emb(tokens) + self.pos[:, : tokens.shape[1]], src_mask=mask, is_causal=True))


class DecoderSeq(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.layer = nn.TransformerDecoderLayer(D, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(D, V)

    def forward(self, tokens):
        h = self.emb(tokens)
        return self.head(self.layer(h, h))


class GPTBlock(nn.Module):
    """Fused qkv linear, F.scaled_dot_product_attention (causal), hand-written RMSNorm, pre-norm."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.norm_w = nn.Parameter(torch.ones(D))
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.proj = nn.Linear(D, D, bias=False)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))
        self.head = nn.Linear(D, V, bias=False)

    def rms(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_w

    def forward(self, tokens):
        x = self.emb(tokens)
        n, t, d = x.shape
        q, k, v = self.qkv(self.rms(x)).split(d, dim=-1)
        q, k, v = (z.view(n, t, 2, d // 2).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, t, d)
        x = x + self.proj(a)
        x = x + self.mlp(x)
        return self.head(x)


class CrossAttention(nn.Module):
    """nn.MultiheadAttention with kdim/vdim != embed_dim: separate q/k/v projection weights."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(D, 2, kdim=5, vdim=3, batch_first=True)
        self.head = nn.Linear(D, V)

    def forward(self, q, memory_k, memory_v):
        return self.head(self.attn(q, memory_k, memory_v, need_weights=False)[0])


class LinearOnlyAttention(nn.Module):
    """Attention over a float sequence built from ``nn.Linear`` layers only (curvlinops hooks them all).

    ``fused``: one qkv linear and ``F.scaled_dot_product_attention``; otherwise separate
    q/k/v linears and hand-written ``softmax(q k^T / sqrt(d)) v`` with a causal mask.
    Returns logits ``(N, V, T)`` (classes on dim 1, curvlinops' layout).
    """

    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        if fused:
            self.qkv = nn.Linear(D, 3 * D)
        else:
            self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D, bias=False)
        self.out = nn.Linear(D, D)
        self.mlp = nn.Linear(D, D)
        self.head = nn.Linear(D, V)

    def forward(self, x):
        if self.fused:
            q, k, v = self.qkv(x).chunk(3, -1)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
            scores = q @ k.transpose(-2, -1) / math.sqrt(D)
            causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
            a = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        h = x + self.out(a)
        return self.head(torch.tanh(self.mlp(h))).transpose(1, 2)
