r"""SINGD: structured inverse-free natural gradient descent (Lin et al. 2024, arXiv:2312.05705).

SINGD keeps, per block, two structured matrices ``K`` (input side, acting on the
columns of the block matrix ``M``, where K-FAC has ``A``) and ``C`` (output side, on
the rows, where K-FAC has ``G``), with :math:`K K^\top \approx A^{-1}` and
:math:`C C^\top \approx G^{-1}`, and updates them without any inversion or
decomposition. Every ``T`` steps, from this batch's factors ``A``, ``G``
(:math:`\Pi` the structure's projection of a symmetric matrix, :math:`\alpha_1`
``alpha1``, :math:`\beta_1` ``lr_cov``, :math:`\lambda` ``damping``,
:math:`d_K, d_C` the sizes, :math:`\bar{\operatorname{tr}}(X) = \operatorname{tr}(X)/d`):

.. math::
    H_K &= \Pi(K^\top A K), \quad H_C = \Pi(C^\top G C), \quad
    \Pi(K^\top K),\ \Pi(C^\top C) \\
    m_K &\leftarrow \alpha_1 m_K + s\,\big(\bar{\operatorname{tr}}(H_C)\, H_K
          + \lambda\,\bar{\operatorname{tr}}(\Pi(C^\top C))\,\Pi(K^\top K) - I\big), \\
    m_C &\leftarrow \alpha_1 m_C + s\,\big(\bar{\operatorname{tr}}(H_K)\, H_C
          + \lambda\,\bar{\operatorname{tr}}(\Pi(K^\top K))\,\Pi(C^\top C) - I\big), \\
    K &\leftarrow K - \beta_1 K m_K, \qquad C \leftarrow C - \beta_1 C m_C ,

with :math:`s = 1/2` (:math:`(1-\alpha_1)/2` and :math:`\beta_1` divided by
:math:`\max(1, \max_{ij}|m_{ij}|)` with ``normalize_lr_cov``). ``kfac_like=True``
(IKFAC) replaces the four trace couplings by 1 and forces :math:`\alpha_1 = 0`.
Every step, with the current ``K``, ``C`` (updated first on the ``T``-th steps),

.. math::
    V = C C^\top M K K^\top, \qquad
    B \leftarrow \mu B + V + \gamma W, \qquad W \leftarrow W - \eta B

(weight decay :math:`\gamma` added *after* preconditioning, as in the ``singd``
package; :math:`\mu` ``momentum``, :math:`\eta` ``lr``). This is the update of
``singd.optim.optimizer.SINGD`` with the same hyper-parameter names and defaults.

**Statistics.** ``singd`` uses the empirical Fisher: ``A`` the second moment of the
layer inputs (bias column included, averaged over the rows) and ``G`` the second
moment of the loss gradients w.r.t. the layer outputs times the number of loss
terms. These are curvgraph's batch factors with ``fisher="empirical"``, which is
therefore SINGD's default (``docs/conventions.md``: ``G = K C' Σ g gᵀ``; for
cross-entropy ``C' = 1`` and ``K`` is the number of loss terms, ``N`` for an
``(N, classes)`` output: singd's ``loss_average="batch"``, or ``"batch+sequence"`` for
sequence outputs). For ``mse`` and ``bce_with_logits`` curvgraph's empirical ``G`` is
``C`` (output features) times singd's, which uses the loss gradient unscaled; the runs
then differ. ``T`` is the statistics *and* preconditioner period:
``factor_every = invert_every = T``.

**Structures** (``structures=(K's, C's)``), each a :class:`Structure`: a compact
storage layout (one flat vector per matrix and leading index) and the few operations
SINGD needs (identity, :math:`\Pi(K^\top X K)`, :math:`\Pi(K^\top K)`, group product,
``K @ V`` / ``Kᵀ @ V``):

* ``dense``: ``d*d`` entries;
* ``diagonal``: ``d`` entries, every operation elementwise;
* ``block_diagonal`` (``block<b>diagonal``, default ``b = 30`` as singd's
  ``block30diagonal``): ``d // b`` dense ``b x b`` blocks and one last
  ``(d mod b)`` block, every operation blockwise;
* ``lower_triangular`` / ``upper_triangular``: stored as the full ``d x d`` matrix
  with the other triangle zero (masked storage, products done densely);
  :math:`\Pi(X) = \operatorname{tril}(X) + \operatorname{triu}(X, 1)^\top` (the
  diagonal once, the strict lower triangle of a symmetric matrix twice);
* ``hierarchical`` (``hierarchical<k1>_<k2>``, default ``15_15`` as singd's
  ``hierarchical15_15``): the blocks ``A`` (``k1 x k1``), ``B`` (``k1 x (d-k1)``), the
  diagonal ``C``, ``D`` and ``E`` (``k2 x k2``) of the paper, stored compactly;
  ``K @ V`` uses the structure, the updates go through the dense ``d x d`` matrix.

``K`` and ``C`` are stored as their difference from the identity (``K - I``), so
that every state tensor starts at zero; the update itself is computed on ``K``.

**Block kinds.** Dense and conv blocks have ``A`` (axis -1) and ``G`` (axis -2);
grouped convolutions have a leading group dim and get one ``K``, ``C`` per group, as
``singd`` does for the layer written as one convolution per group (``singd`` given a
grouped ``Conv2d`` averages the input channels over groups and shares one
preconditioner instead). A block
with one factor -- the per-channel ``F`` of a norm block on axis -1 -- gets one-sided
SINGD: its ``K`` (``structures[0]``) with the missing side taken as the 1x1 identity
(``H_C = C^T C = 1``), i.e. :math:`m_K \leftarrow \alpha_1 m_K + s(\Pi(K^\top F K)
+ \lambda \Pi(K^\top K) - I)`, :math:`V = M K K^\top` per channel. The generated
source says which rule every block gets.

No matrix is inverted or decomposed anywhere in the step. Where an update of ``K`` (or ``C``)
or of its momentum is not finite (per matrix: per group or channel), both keep their
previous values, the step goes on with them and reports the block degenerate
(:meth:`curvgraph.CurvatureOptimizer.diagnostics`).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import sympy
import torch
from torch import Tensor

from ..codegen.writer import BlockVars, StateSpec, StepWriter
from ..errors import CompileError, ConfigError
from ..plan import Block
from ..registry import register_method
from .base import Hyper, Method, fraction, non_negative, positive


# ------------------------------------------------------------------ dense structure
def dense_identity(like: Tensor, d: int, spec: tuple) -> Tensor:
    """The identity in dense storage: ``eye(d)`` flattened, ``(d*d,)``, dtype/device of ``like``."""
    return torch.eye(d, dtype=like.dtype, device=like.device).flatten()


def dense_matrix(flat: Tensor, d: int, spec: tuple) -> Tensor:
    """``(..., d*d)`` dense storage as the ``(..., d, d)`` matrix."""
    return flat.unflatten(-1, (d, d))


def dense_inner(flat: Tensor, x: Tensor | None, d: int, spec: tuple) -> Tensor:
    r""":math:`K^\top X K` (no projection needed) for ``K`` stored densely and symmetric ``X`` ``(..., d, d)``;
    :math:`K^\top K` if ``x`` is None."""
    k = dense_matrix(flat, d, spec)
    return (k.mT @ k if x is None else k.mT @ x @ k).flatten(-2)


def dense_product(left: Tensor, right: Tensor, d: int, spec: tuple) -> Tensor:
    """The product ``L @ R`` of two dense-stored matrices, dense-stored."""
    return (dense_matrix(left, d, spec) @ dense_matrix(right, d, spec)).flatten(-2)


def dense_apply(flat: Tensor, v: Tensor, transpose: bool, d: int, spec: tuple) -> Tensor:
    """``K @ V`` (or ``K.T @ V`` if ``transpose``) for ``V`` of shape ``(..., d, n)``."""
    k = dense_matrix(flat, d, spec)
    return (k.mT if transpose else k) @ v


# --------------------------------------------------------------- diagonal structure
def diagonal_identity(like: Tensor, d: int, spec: tuple) -> Tensor:
    """The identity in diagonal storage: ``ones(d)``."""
    return torch.ones(d, dtype=like.dtype, device=like.device)


def diagonal_matrix(flat: Tensor, d: int, spec: tuple) -> Tensor:
    """``(..., d)`` diagonal storage as the ``(..., d, d)`` matrix."""
    return torch.diag_embed(flat)


def diagonal_inner(flat: Tensor, x: Tensor | None, d: int, spec: tuple) -> Tensor:
    r""":math:`\operatorname{diag}(K^\top X K) = k^2 \odot \operatorname{diag}(X)` for diagonal ``K = diag(k)``
    (:math:`k^2` if ``x`` is None; ``x`` a matrix ``(..., d, d)`` or a diagonal factor stored as ``(..., d)``)."""
    if x is None:
        return flat * flat
    return flat * flat * (x if x.dim() == flat.dim() else x.diagonal(dim1=-2, dim2=-1))


def diagonal_product(left: Tensor, right: Tensor, d: int, spec: tuple) -> Tensor:
    """``diag(l) @ diag(r) = diag(l * r)``."""
    return left * right


def diagonal_apply(flat: Tensor, v: Tensor, transpose: bool, d: int, spec: tuple) -> Tensor:
    """``diag(k) @ V`` (its own transpose) for ``V`` of shape ``(..., d, n)``."""
    return flat[..., :, None] * v


# --------------------------------------------------------- block-diagonal structure
def block_diagonal_parts(flat: Tensor, d: int, spec: tuple) -> tuple[Tensor, Tensor]:
    """Block-diagonal storage ``(..., n*b*b + r*r)`` as ``(blocks (..., n, b, b), last (..., r, r))``,
    ``b = spec[0]``, ``n, r = divmod(d, b)``: ``n`` blocks of size ``b`` and one last block of size ``r``."""
    b = spec[0]
    n, r = divmod(d, b)
    blocks, last = flat.split([n * b * b, r * r], -1)
    return blocks.unflatten(-1, (n, b, b)), last.unflatten(-1, (r, r))


def block_diagonal_flat(blocks: Tensor, last: Tensor) -> Tensor:
    """Inverse of :func:`block_diagonal_parts`."""
    return torch.cat([blocks.flatten(-3), last.flatten(-2)], -1)


def block_diagonal_of(x: Tensor, d: int, spec: tuple) -> tuple[Tensor, Tensor]:
    """The diagonal blocks ``(..., n, b, b)`` and the last block ``(..., r, r)`` of a dense ``(..., d, d)`` matrix."""
    b = spec[0]
    n = d // b
    top = x[..., : n * b, : n * b].unflatten(-1, (n, b)).unflatten(-3, (n, b))  # (..., n, b, n, b)
    return top.diagonal(dim1=-4, dim2=-2).movedim(-1, -3), x[..., n * b:, n * b:]


def block_diagonal_identity(like: Tensor, d: int, spec: tuple) -> Tensor:
    """The identity in block-diagonal storage."""
    b = spec[0]
    n, r = divmod(d, b)
    eye = torch.eye(b, dtype=like.dtype, device=like.device)
    return block_diagonal_flat(eye.expand(n, b, b), torch.eye(r, dtype=like.dtype, device=like.device))


def block_diagonal_matrix(flat: Tensor, d: int, spec: tuple) -> Tensor:
    """Block-diagonal storage as the dense ``(..., d, d)`` matrix."""
    blocks, last = block_diagonal_parts(flat, d, spec)
    n, b, r = blocks.shape[-3], blocks.shape[-1], last.shape[-1]
    eye = torch.eye(n, dtype=flat.dtype, device=flat.device)
    top = (blocks[..., :, :, None, :] * eye[:, None, :, None]).flatten(-2).flatten(-3, -2)  # (..., n*b, n*b)
    zeros = torch.zeros(flat.shape[:-1] + (n * b, r), dtype=flat.dtype, device=flat.device)
    return torch.cat([torch.cat([top, zeros], -1), torch.cat([zeros.mT, last], -1)], -2)


def block_diagonal_inner(flat: Tensor, x: Tensor | None, d: int, spec: tuple) -> Tensor:
    r"""The diagonal blocks of :math:`K^\top X K`: :math:`K_i^\top X_{ii} K_i` per block (:math:`K_i^\top K_i`
    if ``x`` is None)."""
    kb, kl = block_diagonal_parts(flat, d, spec)
    if x is None:
        return block_diagonal_flat(kb.mT @ kb, kl.mT @ kl)
    xb, xl = block_diagonal_of(x, d, spec)
    return block_diagonal_flat(kb.mT @ xb @ kb, kl.mT @ xl @ kl)


def block_diagonal_product(left: Tensor, right: Tensor, d: int, spec: tuple) -> Tensor:
    """``L @ R`` blockwise."""
    lb, ll = block_diagonal_parts(left, d, spec)
    rb, rl = block_diagonal_parts(right, d, spec)
    return block_diagonal_flat(lb @ rb, ll @ rl)


def block_diagonal_apply(flat: Tensor, v: Tensor, transpose: bool, d: int, spec: tuple) -> Tensor:
    """``K @ V`` (or ``K.T @ V``) blockwise for ``V`` of shape ``(..., d, n)``."""
    kb, kl = block_diagonal_parts(flat, d, spec)
    if transpose:
        kb, kl = kb.mT, kl.mT
    rows = kb.shape[-3] * kb.shape[-1]
    top = (kb @ v[..., :rows, :].unflatten(-2, (kb.shape[-3], kb.shape[-1]))).flatten(-3, -2)
    return torch.cat([top, kl @ v[..., rows:, :]], -2)


# ------------------------------------------------------------- triangular structure
def triangular_project(x: Tensor, d: int, spec: tuple) -> Tensor:
    r""":math:`\Pi(X) = \operatorname{tril}(X) + \operatorname{triu}(X,1)^\top` (``spec = (True,)``, lower) or
    :math:`\operatorname{triu}(X) + \operatorname{tril}(X,-1)^\top` (upper), flattened ``(..., d*d)``.

    For symmetric ``X`` this keeps the diagonal and doubles the other triangle; a matrix
    already triangular is returned unchanged.
    """
    if spec[0]:
        return (torch.tril(x) + torch.triu(x, 1).mT).flatten(-2)
    return (torch.triu(x) + torch.tril(x, -1).mT).flatten(-2)


def triangular_inner(flat: Tensor, x: Tensor | None, d: int, spec: tuple) -> Tensor:
    r""":math:`\Pi(K^\top X K)` for triangular ``K`` (stored as the full masked matrix);
    :math:`\Pi(K^\top K)` if ``x`` is None."""
    k = dense_matrix(flat, d, spec)
    return triangular_project(k.mT @ k if x is None else k.mT @ x @ k, d, spec)


# ----------------------------------------------------------- hierarchical structure
def hierarchical_sizes(d: int, spec: tuple) -> tuple[int, int, int]:
    """``(k1, m, k2)``: the sizes of the dense top-left block, the diagonal middle and the dense bottom-right
    block of a ``d x d`` hierarchical matrix with ``spec = (max_k1, max_k2)`` (top-left filled first)."""
    k1 = min(spec[0], d)
    k2 = min(spec[1], d - k1)
    return k1, d - k1 - k2, k2


def hierarchical_parts(flat: Tensor, d: int, spec: tuple) -> tuple[Tensor, ...]:
    r"""Hierarchical storage as ``(A, B, c, D, E)`` of the matrix
    :math:`\begin{pmatrix} A & B_1 & B_2 \\ 0 & \operatorname{diag}(c) & 0 \\ 0 & D & E\end{pmatrix}`
    with ``A`` ``(k1, k1)``, ``B = [B_1, B_2]`` ``(k1, d - k1)``, ``c`` ``(m,)``, ``D`` ``(k2, m)``,
    ``E`` ``(k2, k2)``."""
    k1, m, k2 = hierarchical_sizes(d, spec)
    a, b, c, low, e = flat.split([k1 * k1, k1 * (d - k1), m, k2 * m, k2 * k2], -1)
    return (a.unflatten(-1, (k1, k1)), b.unflatten(-1, (k1, d - k1)), c, low.unflatten(-1, (k2, m)),
            e.unflatten(-1, (k2, k2)))


def hierarchical_project(x: Tensor, d: int, spec: tuple) -> Tensor:
    r""":math:`\Pi(X)` onto the hierarchical structure, flattened: ``A = X_{11}``, ``B = X_{1,2:} + X_{2:,1}^\top``,
    ``c = diag(X_{22})``, ``D = X_{32} + X_{23}^\top``, ``E = X_{33}`` (blocks by the sizes ``k1, m, k2``).

    For symmetric ``X`` the off-diagonal blocks count twice; a hierarchical matrix is returned unchanged.
    """
    k1, m, k2 = hierarchical_sizes(d, spec)
    s = k1 + m
    parts = [x[..., :k1, :k1], x[..., :k1, k1:] + x[..., k1:, :k1].mT, x[..., k1:s, k1:s].diagonal(dim1=-2, dim2=-1),
             x[..., s:, k1:s] + x[..., k1:s, s:].mT, x[..., s:, s:]]
    return torch.cat([p.flatten(-2) if p.dim() == x.dim() else p for p in parts], -1)


def hierarchical_identity(like: Tensor, d: int, spec: tuple) -> Tensor:
    """The identity in hierarchical storage."""
    return hierarchical_project(torch.eye(d, dtype=like.dtype, device=like.device), d, spec)


def hierarchical_matrix(flat: Tensor, d: int, spec: tuple) -> Tensor:
    """Hierarchical storage as the dense ``(..., d, d)`` matrix."""
    a, b, c, low, e = hierarchical_parts(flat, d, spec)
    k1, m, k2 = hierarchical_sizes(d, spec)
    lead = flat.shape[:-1]

    def zeros(rows: int, cols: int) -> Tensor:
        return torch.zeros(lead + (rows, cols), dtype=flat.dtype, device=flat.device)

    middle = torch.cat([zeros(m, k1), torch.diag_embed(c), zeros(m, k2)], -1)
    bottom = torch.cat([zeros(k2, k1), low, e], -1)
    return torch.cat([torch.cat([a, b], -1), middle, bottom], -2)


def hierarchical_inner(flat: Tensor, x: Tensor | None, d: int, spec: tuple) -> Tensor:
    r""":math:`\Pi(K^\top X K)` (:math:`\Pi(K^\top K)` if ``x`` is None) through the dense matrix of ``K``."""
    k = hierarchical_matrix(flat, d, spec)
    return hierarchical_project(k.mT @ k if x is None else k.mT @ x @ k, d, spec)


def hierarchical_product(left: Tensor, right: Tensor, d: int, spec: tuple) -> Tensor:
    """``L @ R`` (hierarchical matrices form a group under multiplication), through the dense matrices."""
    return hierarchical_project(hierarchical_matrix(left, d, spec) @ hierarchical_matrix(right, d, spec), d, spec)


def hierarchical_apply(flat: Tensor, v: Tensor, transpose: bool, d: int, spec: tuple) -> Tensor:
    """``K @ V`` (or ``K.T @ V``) using the structure, for ``V`` of shape ``(..., d, n)``."""
    a, b, c, low, e = hierarchical_parts(flat, d, spec)
    k1, m, k2 = hierarchical_sizes(d, spec)
    top, middle, bottom = v.split([k1, m, k2], -2)
    b_mid, b_end = b.split([m, k2], -1)
    if transpose:
        rows = [a.mT @ top, b_mid.mT @ top + c[..., :, None] * middle + low.mT @ bottom, b_end.mT @ top + e.mT @ bottom]
    else:
        rows = [a @ top + b_mid @ middle + b_end @ bottom, c[..., :, None] * middle, low @ middle + e @ bottom]
    return torch.cat(rows, -2)


# -------------------------------------------------------------------- structures
@dataclass(frozen=True)
class Structure:
    """A structure of SINGD's ``K`` / ``C``: its compact storage and the operations SINGD needs.

    A matrix of size ``d`` is stored as one flat vector of ``size(d)`` entries per
    leading index; the identity's storage marks the diagonal entries (each stored once,
    so ``tr(X) = <x, identity>``). The functions are helpers copied into the generated
    step; each takes ``d`` and the static ``spec`` last.

    Attributes:
        name: the structure's name (with its parameters, e.g. ``block30diagonal``).
        spec: static parameters (block size, hierarchical sizes), passed to every function.
        size: ``d -> number of stored entries``.
        identity: ``(like, d, spec) -> I`` in storage.
        inner: ``(K, X, d, spec) -> Π(Kᵀ X K)`` for symmetric dense ``X`` ``(..., d, d)``, ``Π(Kᵀ K)`` for
            ``X = None`` (singd's ``from_inner``).
        product: ``(L, R, d, spec) -> L R`` (the structure is a matrix group).
        apply: ``(K, V, transpose, d, spec) -> K V`` or ``Kᵀ V`` for ``V`` ``(..., d, n)``.
        matrix: ``(K, d, spec) -> (..., d, d)`` dense matrix (for inspection and tests).
        apply_flops: ``d -> FLOPs per column`` of ``K V``.
        update_flops: ``d -> FLOPs`` of one update of ``K`` (``Π(Kᵀ X K)``, ``Π(Kᵀ K)``, ``K m``).
    """

    name: str
    spec: tuple
    size: Callable[[int], int]
    identity: Callable
    inner: Callable
    product: Callable
    apply: Callable
    matrix: Callable
    apply_flops: Callable[[int], int]
    update_flops: Callable[[int], int]


def _dense() -> Structure:
    return Structure("dense", (), lambda d: d * d, dense_identity, dense_inner, dense_product, dense_apply,
                     dense_matrix, lambda d: 2 * d * d,
                     lambda d: 8 * d**3)


def _diagonal() -> Structure:
    return Structure("diagonal", (), lambda d: d, diagonal_identity, diagonal_inner, diagonal_product,
                     diagonal_apply, diagonal_matrix, lambda d: d, lambda d: 5 * d)


def _block_diagonal(b: int) -> Structure:
    return Structure(f"block{b}diagonal", (b,), lambda d: (d // b) * b * b + (d % b) ** 2, block_diagonal_identity,
                     block_diagonal_inner, block_diagonal_product, block_diagonal_apply,
                     block_diagonal_matrix, lambda d: 2 * d * min(b, d),
                     lambda d: 8 * d * min(b, d) ** 2)


def _triangular(lower: bool) -> Structure:
    return Structure("lower_triangular" if lower else "upper_triangular", (lower,), lambda d: d * d, dense_identity,
                     triangular_inner, dense_product, dense_apply, dense_matrix, lambda d: d * (d + 1),
                     lambda d: 8 * d**3)


def _hierarchical(k1: int, k2: int) -> Structure:
    def size(d: int) -> int:
        a, m, e = hierarchical_sizes(d, (k1, k2))
        return a * a + a * (d - a) + m + e * m + e * e

    return Structure(f"hierarchical{k1}_{k2}", (k1, k2), size, hierarchical_identity, hierarchical_inner,
                     hierarchical_product, hierarchical_apply, hierarchical_matrix,
                     lambda d: 2 * size(d), lambda d: 8 * d**3)


#: Structure names: curvgraph's and the ``singd`` package's (``SINGD.SUPPORTED_STRUCTURES``).
STRUCTURES: dict[str, Callable[[], Structure]] = {
    "dense": _dense,
    "diagonal": _diagonal,
    "block_diagonal": lambda: _block_diagonal(30),
    "lower_triangular": lambda: _triangular(True),
    "upper_triangular": lambda: _triangular(False),
    "hierarchical": lambda: _hierarchical(15, 15),
}
#: Parametrized spellings (as singd names its classes): ``block<b>diagonal``, ``hierarchical<k1>_<k2>``.
PATTERNS: list[tuple[str, Callable[..., Structure]]] = [
    (r"block(\d+)diagonal", lambda b: _block_diagonal(int(b))),
    (r"hierarchical(\d+)_(\d+)", lambda k1, k2: _hierarchical(int(k1), int(k2))),
]


def structure(name: str) -> Structure:
    """The :class:`Structure` called ``name`` (see :data:`STRUCTURES` and :data:`PATTERNS`)."""
    if name in STRUCTURES:
        return STRUCTURES[name]()
    for pattern, make in PATTERNS:
        match = re.fullmatch(pattern, name)
        if match and all(int(g) > 0 for g in match.groups()):
            return make(*match.groups())
    raise ConfigError(f"curvgraph: unknown SINGD structure {name!r}; use one of {sorted(STRUCTURES)}, "
                      "'block<b>diagonal' or 'hierarchical<k1>_<k2>' (singd's Toeplitz structures are not supported).")


# ------------------------------------------------------------- the SINGD update
def identity_plus(offset: Tensor, identity: Tensor) -> Tensor:
    """``K = (K - I) + I``: the matrix from its stored difference to the identity."""
    return offset + identity


def mean_trace(flat: Tensor, identity: Tensor) -> Tensor:
    r""":math:`\operatorname{tr}(X)/d` per leading index, from the storage ``flat`` and the identity's storage."""
    return (flat * identity).sum(-1) / identity.sum(-1)


def singd_couplings(h_k: Tensor, gram_k: Tensor, eye_k: Tensor, h_c: Tensor, gram_c: Tensor, eye_c: Tensor,
                    kfac_like: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""The coefficients of :math:`H` and of :math:`\lambda \Pi(K^\top K)` in the two momenta:
    :math:`(\bar{tr}(H_C), \bar{tr}(\Pi(C^\top C)), \bar{tr}(H_K), \bar{tr}(\Pi(K^\top K)))` for ``m_K`` and ``m_C``,
    or all ones with ``kfac_like`` (IKFAC). Shapes: the leading dims."""
    if kfac_like:
        one = torch.ones_like(mean_trace(h_k, eye_k))
        return one, one, one, one
    return mean_trace(h_c, eye_c), mean_trace(gram_c, eye_c), mean_trace(h_k, eye_k), mean_trace(gram_k, eye_k)


def singd_momentum(h: Tensor, gram: Tensor, identity: Tensor, coupling: Tensor, damping_coupling: Tensor,
                   previous: Tensor, damping: Tensor, alpha1: Tensor, normalize: bool) -> Tensor:
    r""":math:`m \leftarrow \alpha_1 m + s\,(c\,H + \lambda c'\,\Pi(K^\top K) - I)` in storage, with
    :math:`s = 1/2`, or :math:`(1-\alpha_1)/2` when ``lr_cov`` is normalized."""
    scale = 0.5 * (1 - alpha1) if normalize else 0.5
    step = coupling.to(h.dtype)[..., None] * h + (damping * damping_coupling).to(h.dtype)[..., None] * gram - identity
    return step * scale + alpha1 * previous


def singd_descent(k: Tensor, k_m: Tensor, m: Tensor, lr_cov: Tensor, normalize: bool) -> Tensor:
    r""":math:`K - \beta_1 K m`, with :math:`\beta_1` divided by :math:`\max(1, \max_{ij} |m_{ij}|)` per matrix
    when ``normalize`` (normalized gradient descent on the factor)."""
    beta = lr_cov / m.abs().amax(-1).clamp_min(1.0) if normalize else lr_cov.expand(m.shape[:-1])
    return k - beta.to(m.dtype)[..., None] * k_m


def finite_or_previous(k: Tensor, m: Tensor, previous_k: Tensor, previous_m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""The updated ``K - I`` and ``m_K`` (storage ``(..., size)``), except for every matrix (leading index) where
    either is not finite: there both keep their ``previous`` values. Returns them and ``failed`` ``(...)``, where they
    were kept.

    The update :math:`K - \beta_1 K m_K` overflows where :math:`K^\top A K` does (inputs of a huge scale, a ``K``
    grown large) or where ``m_K`` already is not finite.
    """
    good = torch.isfinite(k).all(-1) & torch.isfinite(m).all(-1)
    return torch.where(good[..., None], k, previous_k), torch.where(good[..., None], m, previous_m), ~good


def factor_matrix(factor: Tensor, dtype: torch.dtype) -> Tensor:
    """A kind's factor in ``dtype``: a dense ``(..., d, d)`` matrix, or a diagonal factor's vector ``(..., d)`` as
    stored (its side always has the diagonal structure, which reads the vector; a ``V x V`` matrix is never formed)."""
    return factor.to(dtype)


def columns_along(matrix: Tensor, axis: int, lead: int) -> Tensor:
    """``matrix`` as ``(lead..., d, n)``: its (negative) ``axis`` as rows, the other matrix axes as columns."""
    moved = matrix.movedim(axis, -1)
    return moved.reshape(moved.shape[:lead] + (-1, moved.shape[-1])).mT


def columns_back(columns: Tensor, like: Tensor, axis: int) -> Tensor:
    """Inverse of :func:`columns_along` for a matrix shaped like ``like``."""
    return columns.mT.reshape(like.movedim(axis, -1).shape).movedim(-1, axis)


def singd_buffer(buffer: Tensor, natural: Tensor, param: Tensor, weight_decay: Tensor, momentum: Tensor) -> Tensor:
    r"""Heavy-ball buffer :math:`B \leftarrow \mu B + (V + \gamma W)`; the parameters move by :math:`-\eta B`."""
    return momentum * buffer + (natural + weight_decay * param)


# ------------------------------------------------------------------ option checks
def check_structures(name: str, value: object) -> tuple[str, str]:
    """A pair ``(K's structure, C's structure)`` of structure names (or one name for both)."""
    pair = (value, value) if isinstance(value, str) else value
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
        raise ConfigError(f"curvgraph: {name} must be a pair of structure names (K, C), e.g. ('dense', 'diagonal'), "
                          f"got {value!r}.")
    for s in pair:
        structure(s)
    return tuple(pair)


def check_dtypes(name: str, value: object) -> tuple[torch.dtype | None, torch.dtype | None]:
    """A dtype for both preconditioner matrices, ``None`` (curvgraph's factor dtype), or a pair ``(K's, C's)``."""
    pair = value if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(v is None or (isinstance(v, torch.dtype) and v.is_floating_point) for v in pair):
        raise ConfigError(f"curvgraph: {name} must be None, a floating dtype (e.g. torch.bfloat16) or a pair of "
                          f"them (K's, C's), got {value!r}.")
    return tuple(pair)


def check_period(name: str, value: object) -> int:
    """A positive integer (a period in steps)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"curvgraph: {name} must be a positive integer (steps), got {value!r}.")
    return value


def check_lr_cov(name: str, value: object) -> float:
    """A positive number (singd also takes a callable of the step; here schedule ``param_groups[0]["lr_cov"]``)."""
    if callable(value):
        raise ConfigError(f"curvgraph: {name} must be a number; to schedule it, set "
                          f"opt.param_groups[0]['{name}'] before a step (schedulers may change it too).")
    return positive(name, value)


def check_flag(name: str, value: object) -> bool:
    """``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ConfigError(f"curvgraph: {name} must be True or False, got {value!r}.")
    return value


@dataclass(frozen=True)
class _Side:
    """One preconditioner factor of a block: the kind's factor it replaces and its structure."""

    factor: str      # the kind's factor name ("A", "G", "F")
    key: str         # state prefix: "K" (axis -1) or "C" (axis -2)
    axis: int
    dim: int
    lead: tuple[int, ...]
    diagonal: bool   # the kind's factor is stored as a vector
    structure: Structure
    dtype: torch.dtype | None


class SINGD(Method):
    """SINGD (see the module docstring): ``curvgraph.compile(model, x, method="singd", lr=..., structures=...)``.

    The hyper-parameters are ``singd.optim.optimizer.SINGD``'s, with its defaults.
    ``T`` fixes the statistics and preconditioner period (``factor_every`` and
    ``invert_every``); ``fisher`` defaults to ``"empirical"``, the statistics singd
    uses. ``init_grad_scale`` is accepted for compatibility and has no effect (the
    generated step does not use a ``GradScaler``); ``lr_cov`` must be a number
    (schedule ``opt.param_groups[0]["lr_cov"]`` instead of passing a callable).
    """

    name = "singd"
    default_fisher = "empirical"
    hyper = {
        "lr": Hyper(0.001, positive),
        "momentum": Hyper(0.9, fraction),
        "damping": Hyper(0.001, positive),
        "alpha1": Hyper(0.5, fraction),
        "weight_decay": Hyper(0.0, non_negative),
        "T": Hyper(10, check_period, static=True),
        "lr_cov": Hyper(1e-2, check_lr_cov),
        "structures": Hyper(("dense", "dense"), check_structures, static=True),
        "kfac_like": Hyper(False, check_flag, static=True),
        "preconditioner_dtype": Hyper((None, None), check_dtypes, static=True),
        "init_grad_scale": Hyper(1.0, positive),
        "normalize_lr_cov": Hyper(False, check_flag, static=True),
    }

    @classmethod
    def configure(cls, options: dict) -> tuple["SINGD", dict]:
        """As :meth:`Method.configure`; ``kfac_like=True`` sets ``alpha1`` to 0 (with a warning if it was not),
        as ``singd`` does."""
        method, hyper = super().configure(options)
        if method.options["kfac_like"] and hyper["alpha1"] != 0.0:
            warnings.warn(f"curvgraph: SINGD with kfac_like=True ignores the Riemannian momentum alpha1="
                          f"{hyper['alpha1']}; using alpha1=0.", UserWarning, stacklevel=3)
            hyper["alpha1"] = 0.0
        return method, hyper

    def compile_options(self) -> dict[str, Any]:
        """``T`` is the period of both the statistics and the preconditioner update."""
        return {"factor_every": self.options["T"], "invert_every": self.options["T"]}

    def step_values(self, group: dict, first_statistics: bool) -> dict[str, float]:
        """The step adds ``weight_decay`` after preconditioning (``decoupled_weight_decay``), so the generator's
        gradient matrix gets none."""
        values = super().step_values(group, first_statistics)
        values["decoupled_weight_decay"] = values["weight_decay"]
        values["weight_decay"] = 0.0
        return values

    # ---------------------------------------------------------------- plan
    def _sides(self, block: Block) -> list[_Side]:
        structures, dtypes = self.options["structures"], self.options["preconditioner_dtype"]
        sides = []
        for name, f in block.factors.items():
            if f.axis not in (-1, -2):
                raise CompileError(f"curvgraph: SINGD handles factors on the last two axes of a block matrix; "
                                   f"block {block.name} ({block.kind}) has factor {name} on axis {f.axis}. "
                                   "Use method='kfac'.")
            index = 0 if f.axis == -1 else 1
            # a diagonal curvature factor (an embedding's token frequencies) gets a diagonal preconditioner factor
            chosen = structure("diagonal") if f.diagonal else structure(structures[index])
            sides.append(_Side(name, "KC"[index], f.axis, f.dim, f.lead, f.diagonal, chosen, dtypes[index]))
        if len({s.axis for s in sides}) != len(sides):
            raise CompileError(f"curvgraph: block {block.name} ({block.kind}) has two factors on one axis; SINGD needs "
                               "at most one per axis. Use method='kfac'.")
        return sorted(sides, key=lambda s: s.key != "K")  # K first: V = C C^T (M K K^T), singd's order

    def preconditioner(self, block: Block) -> tuple[str, ...]:
        return tuple(k for s in self._sides(block) for k in (s.key, f"m_{s.key}"))

    def state(self, block: Block) -> dict[str, StateSpec]:
        specs = {}
        for s in self._sides(block):
            shape = s.lead + (s.structure.size(s.dim),)
            specs[s.key] = StateSpec(shape, "zeros", s.dtype)  # K - I
            specs[f"m_{s.key}"] = StateSpec(shape, "zeros", s.dtype)
        return {**specs, "momentum": StateSpec(block.matrix_shape)}

    # ---------------------------------------------------------------- step
    def write_statistics(self, w: StepWriter, blocks: list[BlockVars]) -> None:
        w.line("# SINGD uses this batch's factors directly (no running average); they are kept for inspection")
        for b in blocks:
            for f in b.factors:
                w.line(f"{b.factors[f]} = {b.batch_factors[f]}")
                w.commit(b.state(f), b.factors[f], when="update_stats")  # the batch factor: checked by the step

    def write_refresh(self, w: StepWriter, blocks: list[BlockVars]) -> None:
        normalize = self.options["normalize_lr_cov"]
        for b in blocks:
            sides = self._sides(b.block)
            w.line(f"# {b.block.name} ({b.block.kind}): {self._rule(sides)}")
            terms = {}
            for s in sides:
                st = s.structure
                k, eye = b.var(f"{s.key}_full"), b.var(f"eye_{s.key}")
                w.line(f"{eye} = {w.call(st.identity, b.state(s.key), s.dim, st.spec)}")
                w.line(f"{k} = {w.call(identity_plus, b.state(s.key), eye)}")
                x = w.call(factor_matrix, b.factors[s.factor], f"{k}.dtype")
                w.line(f"{b.var('H_' + s.key)} = {w.call(st.inner, k, x, s.dim, st.spec)}")
                w.line(f"{b.var('gram_' + s.key)} = {w.call(st.inner, k, None, s.dim, st.spec)}")
                terms[s.key] = (b.var("H_" + s.key), b.var("gram_" + s.key), eye)
            if len(sides) == 2:
                couplings = [b.var(n) for n in ("cH_K", "cI_K", "cH_C", "cI_C")]
                call = w.call(singd_couplings, *terms["K"], *terms["C"], self.options["kfac_like"])
                w.line(f"{', '.join(couplings)} = {call}")
                coupling = {"K": couplings[:2], "C": couplings[2:]}
            else:
                one = f"torch.ones_like({w.call(mean_trace, *terms[sides[0].key][::2])})"
                coupling = {sides[0].key: [one, one]}
            for s in sides:
                st = s.structure
                h, gram, eye = terms[s.key]
                m, k = b.var(f"m_{s.key}"), b.var(f"{s.key}_full")
                call = w.call(singd_momentum, h, gram, eye, *coupling[s.key], b.state(f"m_{s.key}"),
                              w.hyper("damping"), w.hyper("alpha1"), normalize)
                w.line(f"{m} = {call}")
                product = w.call(st.product, k, m, s.dim, st.spec)
                descent = w.call(singd_descent, k, product, m, w.hyper("lr_cov"), normalize)
                keys, failed = (s.key, f"m_{s.key}"), b.var(f"{s.key}_failed")
                kept = w.call(finite_or_previous, f"{descent} - {eye}", m, *(b.state(key) for key in keys))
                w.line(f"{b.var(s.key)}, {m}, {failed} = {kept}")
                w.flag(b.block, f"preconditioner factor {s.key} (on {s.factor}) or its momentum m_{s.key} is not "
                       f"finite after the update (it overflows, or m_{s.key} was not finite); kept the previous "
                       f"{s.key} and m_{s.key}", f"{failed}.any()")
                for key in keys:
                    w.commit(b.state(key), b.var(key), when="refresh")

    def write_direction(self, w: StepWriter, blocks: list[BlockVars]) -> None:
        for b in blocks:
            v = b.var("V")
            w.line(f"{v} = {b.grad}")
            for s in self._sides(b.block):
                st = s.structure
                k = b.var(f"{s.key}_now")
                eye = w.call(st.identity, b.var(s.key), s.dim, st.spec)
                w.line(f"{k} = {w.call(identity_plus, b.var(s.key), eye)}")
                columns = b.var("columns")
                w.line(f"{columns} = {w.call(columns_along, v, s.axis, len(s.lead))}.to({k}.dtype)")
                inner = w.call(st.apply, k, columns, True, s.dim, st.spec)
                w.line(f"{columns} = {w.call(st.apply, k, inner, False, s.dim, st.spec)}")
                w.line(f"{v} = {w.call(columns_back, columns, v, s.axis)}.to({b.grad}.dtype)")
            call = w.call(singd_buffer, b.state("momentum"), v, b.var("P"), w.hyper("decoupled_weight_decay"),
                          w.hyper("momentum"))
            w.line(f"{b.var('B')} = {call}")
            w.check(b.var("B"))
            w.commit(b.state("momentum"), b.var("B"))
            w.line(f"{b.direction} = {w.hyper('lr')} * {b.var('B')}")

    @staticmethod
    def _rule(sides: list[_Side]) -> str:
        described = ", ".join(f"{s.key} on {s.factor} ({s.structure.name}, d={s.dim}"
                              f"{', per ' + 'x'.join(map(str, s.lead)) if s.lead else ''})" for s in sides)
        if len(sides) == 1:
            return f"one-sided SINGD, the other side the 1x1 identity: {described}"
        return f"SINGD {described}"

    def cost(self, block: Block) -> dict[str, sympy.Expr]:
        """Preconditioning: two structured products per side and column (``K Kᵀ``); the factor update
        (``inversion``, every ``T`` steps, no inversion involved): about ``8 d^3`` per side computed through
        dense matrices, ``8 d b^2`` block-diagonal, ``5 d`` diagonal; state: ``K``, ``C``, their momenta (in
        their dtype), the kinds' factors and the momentum buffer (float32)."""
        numel = math.prod(block.matrix_shape)
        precondition = update = state = 0
        for s in self._sides(block):
            count, columns = math.prod(s.lead), numel // max(1, math.prod(s.lead) * s.dim)
            precondition += count * 2 * s.structure.apply_flops(s.dim) * columns
            update += count * s.structure.update_flops(s.dim)
            itemsize = torch.empty((), dtype=s.dtype or torch.float32).element_size()
            state += 2 * count * s.structure.size(s.dim) * itemsize
        state += 4 * (numel + sum(math.prod(f.shape) for f in block.factors.values()))
        return {"precondition": sympy.Integer(precondition), "inversion": sympy.Integer(update),
                "state_bytes": sympy.Integer(state)}


register_method(SINGD)
