r"""K-FAC (Martens & Grosse 2015) with factored Tikhonov damping and KL clipping.

Per block with gradient matrix :math:`M = \nabla_{\bar W} L` (weight decay added) and
Kronecker factors ``A``, ``G`` (exponential moving averages of the batch factors):

.. math::
    \pi &= \sqrt{\frac{\operatorname{tr}(A)/\dim A}{\operatorname{tr}(G)/\dim G}}, \\
    V &= (G + \tfrac{\sqrt\lambda}{\pi} I)^{-1}\, M\, (A + \pi\sqrt\lambda\, I)^{-1}
    \qquad\text{(factored Tikhonov damping, Martens \& Grosse 2015, sec. 6.3)}, \\
    \nu &= \min\Big(1, \sqrt{\kappa \,/\, \big(\eta^2 \textstyle\sum_{\text{blocks}} \langle V, M\rangle\big)}\Big)
    \qquad\text{(KL clipping, Ba et al. 2017)}, \\
    D &\leftarrow \mu D + \nu V, \qquad \bar W \leftarrow \bar W - \eta D .

The two inverses are recomputed every ``invert_every`` steps (``refresh``), batched
over all factors of equal shape with one Cholesky factorization each; in between, the
factors keep updating and the stale inverses are used. Grouped convolutions carry a
leading group dim on ``A``, ``G`` and ``M``; every formula applies per group.

Norm blocks have one per-channel factor ``F`` (``(C, k, k)``, see
:mod:`curvgraph.curvature.norm`), which is the curvature block itself, not a Kronecker
factor: :math:`V_c = (F_c + \lambda I)^{-1} M_c`.
"""

from __future__ import annotations

import math
from collections import defaultdict

import sympy
import torch
from torch import Tensor

from ..plan import Block
from .base import BlockVars, Method, StateSpec


def ema(old: Tensor, new: Tensor, decay: Tensor) -> Tensor:
    r"""Exponential moving average :math:`\beta\,\text{old} + (1-\beta)\,\text{new}`."""
    return old * decay + new * (1 - decay)


def factored_damping(A: Tensor, G: Tensor, damping: Tensor) -> tuple[Tensor, Tensor]:
    r"""Shifts :math:`(\pi\sqrt\lambda, \sqrt\lambda/\pi)` added to ``A`` and ``G``.

    :math:`\pi^2` is the ratio of the factors' average eigenvalues, so the damping
    :math:`\lambda` is split between them in proportion to their scales.
    """
    tiny = torch.finfo(A.dtype).tiny
    mean_a = A.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(tiny)
    pi = (mean_a / G.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(tiny)).sqrt()
    root = damping.sqrt()
    return pi * root, root / pi


def damped_inverse(factor: Tensor, shift: Tensor, previous: Tensor) -> Tensor:
    r""":math:`(F + s I)^{-1}` by Cholesky, batched over leading dims; keeps ``previous`` where it fails.

    Args:
        factor: symmetric PSD matrices ``(..., d, d)``.
        shift: damping ``s`` per matrix, shape ``(...)``.
        previous: the inverses to keep where the factorization fails or is not finite.
    """
    eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
    chol, info = torch.linalg.cholesky_ex(factor + shift[..., None, None] * eye)
    inverse = torch.cholesky_inverse(chol)
    good = (info == 0) & torch.isfinite(inverse).all(-1).all(-1)
    return torch.where(good[..., None, None], inverse, previous)


def kfac_precondition(grad: Tensor, A_inv: Tensor, G_inv: Tensor) -> Tensor:
    r""":math:`V = G^{-1} M A^{-1}`, i.e. :math:`(G \otimes A)^{-1} \operatorname{vec}(M)` in row-major vec order."""
    return G_inv @ grad @ A_inv


def channel_precondition(grad: Tensor, F_inv: Tensor) -> Tensor:
    r""":math:`V_c = F_c^{-1} M_c` for every channel: ``grad`` ``(C, k)``, ``F_inv`` ``(C, k, k)``."""
    return (F_inv @ grad[..., None])[..., 0]


def inner_product(directions: tuple[Tensor, ...], grads: tuple[Tensor, ...]) -> Tensor:
    r""":math:`\sum_{\text{blocks}} \langle V, M\rangle`.

    It is finite exactly when every ``V`` and ``M`` is (up to overflow), so the step
    checks this one scalar instead of every direction.
    """
    return sum((v * g).sum() for v, g in zip(directions, grads))


def kl_clip_scale(inner: Tensor, lr: Tensor, kl_clip: Tensor) -> Tensor:
    r""":math:`\nu = \min(1, \sqrt{\kappa / (\eta^2 \sum \langle V, M\rangle)})`; ``kl_clip = inf`` disables it."""
    return torch.clamp((kl_clip / (lr * lr * inner.abs())).sqrt(), max=1.0)


def momentum_buffer(buffer: Tensor, direction: Tensor, scale: Tensor, momentum: Tensor) -> Tensor:
    r"""Heavy-ball buffer :math:`\mu D + \nu V`."""
    return momentum * buffer + scale * direction


class KFAC(Method):
    """K-FAC: Kronecker-factored natural gradient with momentum (see the module docstring)."""

    name = "kfac"
    defaults = {
        "lr": 0.002,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "damping": 1e-3,
        "ema": 0.95,
        "kl_clip": 1e-3,
    }

    def preconditioner(self, block: Block) -> tuple[str, ...]:
        return tuple(f"{f}_inv" for f in block.factor_shapes)

    def state(self, block: Block) -> dict[str, StateSpec]:
        inverses = {f"{f}_inv": StateSpec(shape, "eye") for f, shape in block.factor_shapes.items()}
        return {**inverses, "momentum": StateSpec(block.matrix_shape)}

    def write_statistics(self, w, blocks: list[BlockVars]) -> None:
        for b in blocks:
            for f in b.factors:
                w.line(f"{b.factors[f]} = {w.call(ema, b.state(f), b.batch_factors[f], w.hyper('ema'))}")
                w.commit(b.state(f), b.factors[f], when="update_stats")
                w.check(b.factors[f], when="update_stats")

    def write_refresh(self, w, blocks: list[BlockVars]) -> None:
        shifts: dict[tuple[str, str], str] = {}
        for b in blocks:
            if "F" in b.factors:  # the curvature block itself: plain Tikhonov damping per channel
                shifts[b.id, "F"] = f"{w.hyper('damping')}.expand({b.block.factor_shapes['F'][0]})"
                continue
            shift_a, shift_g = b.var("shift_A"), b.var("shift_G")
            w.line(f"{shift_a}, {shift_g} = {w.call(factored_damping, b.factors['A'], b.factors['G'], w.hyper('damping'))}")
            shifts[b.id, "A"], shifts[b.id, "G"] = shift_a, shift_g
        groups: dict[tuple[int, ...], list[tuple[BlockVars, str]]] = defaultdict(list)
        for b in blocks:
            for f in b.factors:
                groups[b.block.factor_shapes[f]].append((b, f))
        for shape, members in groups.items():
            targets = [b.var(f"{f}_inv") for b, f in members]
            factors = [b.factors[f] for b, f in members]
            shift = [shifts[b.id, f] for b, f in members]
            previous = [b.state(f"{f}_inv") for b, f in members]
            if len(members) == 1:
                w.line(f"{targets[0]} = {w.call(damped_inverse, factors[0], shift[0], previous[0])}")
            else:
                w.line(f"# {len(members)} factors of shape {'x'.join(map(str, shape))}: one batched Cholesky")
                call = w.call(damped_inverse, _stack(factors), _stack(shift), _stack(previous))
                w.line(f"{', '.join(targets)} = {call}.unbind(0)")
            for (b, f), target in zip(members, targets):
                w.commit(b.state(f"{f}_inv"), target, when="refresh")

    def write_direction(self, w, blocks: list[BlockVars]) -> None:
        for b in blocks:
            if "F" in b.factors:
                w.line(f"{b.var('V')} = {w.call(channel_precondition, b.grad, b.var('F_inv'))}")
            else:
                w.line(f"{b.var('V')} = {w.call(kfac_precondition, b.grad, b.var('A_inv'), b.var('G_inv'))}")
        directions = _tuple(b.var("V") for b in blocks)
        grads = _tuple(b.grad for b in blocks)
        w.line(f"inner = {w.call(inner_product, directions, grads)}")
        w.check("inner")  # finite iff every V and M is; then so are the momentum buffers and updates
        w.line(f"nu = {w.call(kl_clip_scale, 'inner', w.hyper('lr'), w.hyper('kl_clip'))}")
        for b in blocks:
            w.line(f"{b.direction} = {w.call(momentum_buffer, b.state('momentum'), b.var('V'), 'nu', w.hyper('momentum'))}")
            w.commit(b.state("momentum"), b.direction)

    def cost(self, block: Block) -> dict[str, sympy.Expr]:
        """Preconditioning ``2 (o^2 i + o i^2)`` per group (``2 C k^2`` per-channel), inversion
        ``d^3`` per factor matrix, state: factors, inverses and momentum in float32."""
        shapes = block.factor_shapes
        if "F" in shapes:
            channels, k, _ = shapes["F"]
            precondition = 2 * channels * k * k
        else:
            lead = math.prod(shapes["A"][:-2])
            d_a, d_g = shapes["A"][-1], shapes["G"][-1]
            precondition = lead * (2 * d_g * d_g * d_a + 2 * d_g * d_a * d_a)
        inversion = sum(math.prod(s[:-2]) * s[-1] ** 3 for s in shapes.values())
        floats = 2 * sum(math.prod(s) for s in shapes.values()) + math.prod(block.matrix_shape)
        return {
            "precondition": sympy.Integer(precondition),
            "inversion": sympy.Integer(inversion),
            "state_bytes": sympy.Integer(4 * floats),
        }


def _stack(names: list[str]) -> str:
    return f"torch.stack([{', '.join(names)}])"


def _tuple(names) -> str:
    names = list(names)
    return f"({', '.join(names)}{',' if len(names) == 1 else ''})"
