r"""The chain-structured temporal approximation of Martens, Ba & Johnson (2018), "option 1".

Selected with ``curvgraph.compile(..., temporal="option1")`` (K-FAC): rnn blocks then keep
EMAs of the lag-1 moments besides ``A`` and ``G`` (:func:`rnn_lag_factors`), a refresh
computes the preconditioner's bases (:func:`option1_basis`) and every step applies it
(:func:`option1_apply`); other blocks are unchanged. The default, ``"expand"``, is the
time-independent approximation.

Model. For one sequence, the gradient of a recurrent block is :math:`\sum_t w_t` with
:math:`w_t = \operatorname{vec}(g_t \bar a_t^\top)` (row-major; ``kron(G, A)`` order).
Its Fisher is :math:`F = \sum_{t,s} \mathbb E[w_t w_s^\top]`. Assume

1. *temporal homogeneity*: :math:`V_d = \mathbb E[w_t w_{t+d}^\top]` depends on ``d`` only;
2. *Kronecker independence* (K-FAC's): :math:`V_d = G_d \otimes A_d` with
   :math:`A_d = \mathbb E[\bar a_t \bar a_{t+d}^\top]`, :math:`G_d = \mathbb E[g_t g_{t+d}^\top]`;
3. *a linear-Gaussian chain*: :math:`w_{t+1} = \Psi w_t + \epsilon_t`, so
   :math:`V_d = \Psi^d V_0` for ``d >= 0`` with :math:`\Psi = V_1 V_0^{-1}`;
4. *option 1*: :math:`V_1` is symmetric (its symmetric part is used).

Then with :math:`\hat\Psi = V_0^{-1/2} V_1 V_0^{-1/2}` (symmetric, eigenvalues in (-1, 1) for a
stationary chain), :math:`\Psi^d V_0 = V_0^{1/2}\hat\Psi^d V_0^{1/2}` and

.. math::
    F = \sum_{t,s=1}^{T} V_{|t-s|} = V_0^{1/2}\,\zeta_T(\hat\Psi)\,V_0^{1/2}, \qquad
    \zeta_T(x) = T + 2\sum_{d=1}^{T-1}(T-d)x^d = \frac{T(1+x)}{1-x} - \frac{2x(1-x^T)}{(1-x)^2}.

:math:`\hat\Psi = \hat\Psi_G \otimes \hat\Psi_A` with
:math:`\hat\Psi_A = A_0^{-1/2} A_1 A_0^{-1/2} = U_A \operatorname{diag}(\psi_A) U_A^\top` (and the
same for ``G``), so with :math:`K = G_0^{-1/2} \otimes A_0^{-1/2}`:

.. math::
    F^{-1}\operatorname{vec}(M) = \operatorname{vec}\Big(G_0^{-1/2} U_G
    \big[(U_G^\top G_0^{-1/2} M A_0^{-1/2} U_A) \oslash \zeta_T(\psi_G \psi_A^\top)\big]
    U_A^\top A_0^{-1/2}\Big).

In curvgraph's normalization (:mod:`curvgraph.kinds.dense.factors`) the expand factors
satisfy :math:`G \otimes A = T\, V_0`, so :math:`F = (G\otimes A)^{1/2}\,\zeta_T(\hat\Psi)/T\,(G\otimes A)^{1/2}`:
with no correlation between steps (:math:`\hat\Psi = 0`, :math:`\zeta_T = T`) it is the
expand approximation. :math:`\zeta_T(x)` grows from ``T`` at ``x = 0`` to :math:`T^2` as
``x -> 1`` (perfectly correlated steps); eigenvalues are clamped to
:math:`|\psi| \le 1 - \epsilon`.

Cost per block and refresh, besides K-FAC's: the lag-1 statistics (as much as the
factors again, ``2 N (T-1) (d_A^2 + d_G^2)``), two symmetric square roots and two
eigendecompositions (:math:`O(d_A^3 + d_G^3)`); per step two more matrix products
each side and an elementwise scaling.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .linalg import finite_entries, stable_eigh


def lag_moments(steps: tuple[Tensor, ...], bias: bool, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    r"""``(M_0, M_1)``: :math:`M_0 = \operatorname{mean}_{n,t} \bar x_{n,t}\bar x_{n,t}^\top`,
    :math:`M_1 = \operatorname{mean}_{n,t<T} \bar x_{n,t}\bar x_{n,t+1}^\top`.

    Args:
        steps: ``T`` tensors ``(R, d)`` in time order (layer inputs, or output vectors of
            one use each); ``R`` rows (examples, or samples x examples).
        bias: append a ones column (:math:`\bar x = [x, 1]`).
        dtype: the moments' dtype.
    """
    x = torch.stack([s.to(dtype) for s in steps])  # (T, R, d)
    if bias:
        x = torch.cat([x, torch.ones_like(x[..., :1])], -1)
    m0 = torch.einsum("tri,trj->ij", x, x) / (x.shape[0] * x.shape[1])
    if x.shape[0] < 2:
        return m0, torch.zeros_like(m0)
    m1 = torch.einsum("tri,trj->ij", x[:-1], x[1:]) / ((x.shape[0] - 1) * x.shape[1])
    return m0, m1


def zeta(x: Tensor, steps: int) -> Tensor:
    r""":math:`\zeta_T(x) = T(1+x)/(1-x) - 2x(1-x^T)/(1-x)^2` elementwise (``|x| < 1``): the sum
    :math:`\sum_{t,s=1}^{T} x^{|t-s|}`."""
    return steps * (1 + x) / (1 - x) - 2 * x * (1 - x**steps) / (1 - x) ** 2


def _sym_power(m: Tensor, power: float) -> Tensor:
    """``m ** power`` for a symmetric positive definite ``m`` by its eigendecomposition."""
    values, vectors, _ = stable_eigh(m)
    return (vectors * values.clamp_min(torch.finfo(m.dtype).tiny) ** power) @ vectors.T


def option1_precondition(grad: Tensor, a0: Tensor, a1: Tensor, g0: Tensor, g1: Tensor, steps: int,
                         eps: float = 1e-3) -> Tensor:
    r""":math:`F^{-1}\operatorname{vec}(M)` of option 1 (see the module docstring), as a matrix like ``grad``.

    Args:
        grad: the block's gradient matrix ``M`` ``(out, in + bias)``.
        a0, g0: :math:`V_0`'s factors (positive definite; damp them before), with
            :math:`V_0 = G_0 \otimes A_0` the per-step moment of one sequence.
        a1, g1: the lag-1 moments in the same normalization (their symmetric parts are used).
        steps: the sequence length ``T``.
        eps: eigenvalues of :math:`\hat\Psi_A, \hat\Psi_G` are clamped to ``[-(1 - eps), 1 - eps]``.
    """
    return option1_apply(grad, *chain_basis(a0, a1, g0, g1, steps, eps))


def chain_basis(a0: Tensor, a1: Tensor, g0: Tensor, g1: Tensor, steps: int, eps: float = 1e-3
                ) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(L, R, S)`` with :math:`F^{-1}\operatorname{vec}(M) = \operatorname{vec}(L ((L^\top M R) \odot S) R^\top)`:
    :math:`L = G_0^{-1/2} U_G`, :math:`R = A_0^{-1/2} U_A`, :math:`S = 1/\zeta_T(\psi_G \psi_A^\top)`
    (arguments as in :func:`option1_precondition`)."""
    a_isqrt, g_isqrt = _sym_power(a0, -0.5), _sym_power(g0, -0.5)
    psi_a, u_a, _ = stable_eigh(a_isqrt @ (0.5 * (a1 + a1.T)) @ a_isqrt)
    psi_g, u_g, _ = stable_eigh(g_isqrt @ (0.5 * (g1 + g1.T)) @ g_isqrt)
    psi_a, psi_g = psi_a.clamp(-1 + eps, 1 - eps), psi_g.clamp(-1 + eps, 1 - eps)
    return g_isqrt @ u_g, a_isqrt @ u_a, 1.0 / zeta(torch.outer(psi_g, psi_a), steps)


def option1_basis(a: Tensor, g: Tensor, a_lag: Tensor, g_lag: Tensor, shift_a: Tensor, shift_g: Tensor,
                  steps: int, previous: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""The step's refresh: :func:`chain_basis` for curvgraph's expand factors ``A``, ``G`` (:math:`G \otimes A = T V_0`)
    damped by ``shift_a``/``shift_g`` (K-FAC's factored Tikhonov shifts), and their lag-1 moments in the same
    normalization: :math:`V_0 = (G + s_G I)/T \otimes (A + s_A I)`, :math:`V_1 = G_{lag}/T \otimes A_{lag}`.
    Returns ``(L, R, S, failed)``: ``previous`` and ``failed`` true if an input or the result is not finite
    (the decompositions never raise: :func:`~curvgraph.curvature.linalg.stable_eigh`)."""
    eye_a = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    eye_g = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    new = chain_basis(a + shift_a * eye_a, a_lag, (g + shift_g * eye_g) / steps, g_lag / steps, steps)
    good = torch.stack([finite_entries(t, t.dim()) for t in new + (a, g, a_lag, g_lag)]).all()
    return tuple(torch.where(good, n, p) for n, p in zip(new, previous)) + (~good,)  # type: ignore[return-value]


def option1_apply(grad: Tensor, left: Tensor, right: Tensor, scale: Tensor) -> Tensor:
    r""":math:`L\,((L^\top M R) \odot S)\,R^\top`: option 1's inverse applied to the block matrix ``grad``."""
    return left @ ((left.T @ grad @ right) * scale) @ right.T


def rnn_lag_factors(inputs: tuple[Tensor, ...], grads: tuple[Tensor, ...], bias: bool, examples: int,
                    scale: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    r"""This batch's lag-1 moments ``(A_lag, G_lag)`` of an rnn block in the normalization of its expand
    factors (:mod:`curvgraph.kinds.dense.factors`): :math:`A_{lag} = M_1(\bar a)` and
    :math:`G_{lag} = c\,R\,T\,M_1(g)` (so that :math:`G = c\,R\,T\,M_0(g)`), ``R = examples`` rows per step.

    ``inputs``/``grads``: the block's uses (one per step) in graph order, which is time order (reversed for a
    ``_reverse`` weight; the symmetric part option 1 uses is the same).
    """
    a_lag = lag_moments(inputs, bias, dtype)[1]
    g_rows = tuple(g.reshape(-1, g.shape[-1]) for g in grads)
    g_lag = lag_moments(g_rows, False, dtype)[1] * scale * examples * len(grads)
    return a_lag, g_lag
