"""A fused q|k|v projection: one ``3d x 3d`` output factor ``G``, or three ``d x d`` factors? Accuracy and cost.

Usage::

    python benchmarks/attention_qkv.py

An ``nn.TransformerEncoderLayer`` (and any ``nn.Linear(d, 3d)`` whose output is split into
q, k and v) applies one weight ``W_qkv`` of shape ``(3d, d)``. K-FAC approximates the GGN
block of ``[W_qkv, b_qkv]`` by ``G ⊗ A`` with ``A`` the ``(d+1) x (d+1)`` input factor and
``G`` the ``3d x 3d`` covariance of the output gradients ``[g_q, g_k, g_v]``. Treating q, k
and v as three layers keeps only the diagonal ``d x d`` blocks of ``G`` (``G_split``).

Accuracy, on the char-level transformer of ``examples/char_transformer.py`` at width 16
(one layer, 2 heads, context 16, 8 sequences of the standard-library corpus), at
initialization and after 300 AdamW steps: the exact type-2 GGN block of the qkv projection
(``torch.func``), K-FAC's factors from ``curvgraph`` (type-2 Fisher, ``ema=0``), and for
both ``G`` and ``G_split``

* the relative Frobenius error ``||G ⊗ A - GGN|| / ||GGN||``;
* the damped natural-gradient direction ``(G + √λ I)^{-1} ∇ (A + √λ I)^{-1}`` against the
  exact ``(GGN + λ I)^{-1} ∇``: cosine similarity, at two dampings ``λ``.

Cost, at the benchmark width d=256 (``char-transformer-4x256`` in ``step_time.py``):
FLOPs of the refresh (Cholesky and inverse, ``d^3`` each counted at ``1/3 d^3 + d^3``) and
of the preconditioning ``G^{-1} M``, and their measured times on this machine.
"""

from __future__ import annotations

import copy
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev

import curvgraph

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from char_transformer import ALPHABET, CharTransformer, corpus, encode  # noqa: E402

BLOCK = "blocks.0.self_attn.in_proj_weight"
WEIGHT, BIAS = BLOCK, "blocks.0.self_attn.in_proj_bias"


def exact_ggn(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The type-2 GGN :math:`\frac{1}{NT}\sum_t J_t^\top (\operatorname{diag} p_t - p_t p_t^\top) J_t` of the mean
    token cross-entropy w.r.t. ``[W_qkv, b_qkv]`` (row-major vec), and the gradient of the loss there."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    theta = torch.cat([params[WEIGHT], params[BIAS][:, None]], 1)

    def logits(t: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**params, WEIGHT: t[:, :-1], BIAS: t[:, -1]}, (tokens[:, :-1],))

    out = logits(theta)
    rows = out.shape[0] * out.shape[1]
    jac = jacrev(logits)(theta).reshape(rows, out.shape[-1], theta.numel())
    p = out.reshape(rows, -1).softmax(-1)
    hj = p[:, :, None] * jac - p[:, :, None] * torch.einsum("rv,rvp->rp", p, jac)[:, None, :]
    ggn = torch.einsum("rvp,rvq->pq", jac, hj) / rows
    theta = theta.clone().requires_grad_(True)
    loss = F.cross_entropy(logits(theta).flatten(0, 1), tokens[:, 1:].flatten())
    (grad,) = torch.autograd.grad(loss, theta)
    return ggn, grad


def kfac_factors(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """curvgraph's ``(A, G)`` of the qkv block on this batch (type-2 Fisher, no averaging over steps)."""
    trial = copy.deepcopy(model)
    opt = curvgraph.compile(trial, (tokens[:, :-1],), loss="token_cross_entropy", fisher="type2", ema=0.0,
                            lr=1e-3, backend="eager", progress=False)
    opt.step(tokens[:, :-1], tokens[:, 1:])
    factors = opt.factors()[BLOCK]
    return factors["A"], factors["G"]


def compare(ggn: torch.Tensor, grad: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> dict[str, float]:
    d = g.shape[0] // 3
    g_split = torch.block_diag(*(g[i * d:(i + 1) * d, i * d:(i + 1) * d] for i in range(3)))
    norm = torch.linalg.matrix_norm(ggn)
    row = {}
    for name, out_factor in (("joint", g), ("split", g_split)):
        row[f"{name} error"] = float(torch.linalg.matrix_norm(torch.kron(out_factor, a) - ggn) / norm)
        for rel in (1e-3, 1e-1):
            damping = rel * float(ggn.diagonal().mean())
            exact = torch.linalg.solve(ggn + damping * torch.eye(len(ggn), dtype=ggn.dtype), grad.flatten())
            root = damping ** 0.5
            approx = torch.linalg.solve(out_factor + root * torch.eye(len(out_factor), dtype=ggn.dtype),
                                        grad) @ torch.linalg.inv(a + root * torch.eye(len(a), dtype=ggn.dtype))
            row[f"{name} cos λ={rel:g}"] = float(F.cosine_similarity(exact, approx.flatten(), dim=0))
    return row


def accuracy() -> None:
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    data = encode(corpus())
    model = CharTransformer(len(ALPHABET) + 1, 16, 2, 1, 16)
    starts = torch.randint(0, len(data) - 17, (8,))
    tokens = torch.stack([data[s:s + 17] for s in starts])
    adam = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for label, train_steps in (("initialization", 0), ("after 300 AdamW steps", 300)):
        for _ in range(train_steps):
            batch = torch.stack([data[s:s + 17] for s in torch.randint(0, len(data) - 17, (32,))])
            loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
            adam.zero_grad()
            loss.backward()
            adam.step()
        ggn, grad = exact_ggn(model, tokens)
        a, g = kfac_factors(model, tokens)
        row = compare(ggn, grad, a, g)
        print(f"{label}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
    torch.set_default_dtype(torch.float32)


def timed(fn, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def cost(d: int = 256) -> None:
    def spd(lead: tuple[int, ...], size: int) -> torch.Tensor:
        x = torch.randn(*lead, 4 * size, size)
        return x.mT @ x / (4 * size) + 1e-3 * torch.eye(size)

    joint, split = spd((), 3 * d), spd((3,), d)
    matrix = torch.randn(3 * d, d + 1)
    inverse_j, inverse_s = torch.linalg.inv(joint), torch.linalg.inv(split)
    refresh = {"joint": timed(lambda: torch.cholesky_inverse(torch.linalg.cholesky(joint))),
               "split": timed(lambda: torch.cholesky_inverse(torch.linalg.cholesky(split)))}
    apply = {"joint": timed(lambda: inverse_j @ matrix),
             "split": timed(lambda: (inverse_s @ matrix.reshape(3, d, d + 1)).reshape(3 * d, d + 1))}
    flops_refresh = {"joint": 4 / 3 * (3 * d) ** 3, "split": 3 * 4 / 3 * d ** 3}
    flops_apply = {"joint": 2 * (3 * d) ** 2 * (d + 1), "split": 3 * 2 * d ** 2 * (d + 1)}
    for name in ("joint", "split"):
        print(f"d={d} {name}: G refresh {flops_refresh[name] / 1e6:.1f} MFLOP, {refresh[name]:.2f} ms; "
              f"G^-1 M {flops_apply[name] / 1e6:.1f} MFLOP, {apply[name]:.2f} ms")


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message="There is a performance drop")  # vmap over sdpa's backward in jacrev
    accuracy()
    cost()
