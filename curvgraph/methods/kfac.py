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

The same code serves every factor structure a kind declares
(:class:`~curvgraph.plan.Factor`): each factor's inverse is applied along the
block-matrix axis it acts on (``G`` on the rows, ``A`` on the columns above), dense
factors by a matrix product and diagonal ones (stored as vectors) elementwise, and
leading dims (groups, channels) are independent blocks. A block with one factor (the
per-channel ``F`` of a norm block, which is the curvature block itself) gets plain
Tikhonov damping, :math:`V = (F + \lambda I)^{-1} M`; with ``n`` factors the damping is
split as :math:`\lambda^{1/n} t_i / (\prod_j t_j)^{1/n}` (:func:`factored_damping`).

A dense layer with fewer gradient rows ``R`` (examples x positions, over all uses) than
features, e.g. the deep autoencoder's ``1000``-wide layers at batch 100, has a gradient of
rank at most ``R``: :math:`M = \sum_r g_r \bar a_r^\top` (loss output gradients times layer
inputs), and :math:`V = \sum_r (G^{-1} g_r)(A^{-1} \bar a_r)^\top` costs
``2 R (o^2 + i^2 + o i)`` FLOPs instead of ``2 o i (o + i)`` (:func:`rows_precondition`). The
step uses it for the blocks where the plan's rows at the example inputs make it cheaper
(:meth:`KFAC.from_rows`), while weight decay (which makes ``M`` full rank) is 0.

``temporal="option1"`` (static) gives blocks over time steps (kinds with lag moments: the
rnn blocks) the chain-structured approximation of Martens, Ba & Johnson (2018), option 1,
instead of ``G^{-1} M A^{-1}``: see :mod:`curvgraph.curvature.temporal` (the factors are
damped by the same shifts first). Other blocks are unchanged.
"""

from __future__ import annotations

import math
from collections import defaultdict

import sympy
import torch
from torch import Tensor

from ..codegen.writer import BlockVars, StateSpec, StepWriter
from ..errors import ConfigError
from ..plan import Block
from ..curvature.kronecker import block_rows
from ..curvature.linalg import finite_entries
from ..curvature.temporal import option1_apply, option1_basis
from ..registry import KINDS, register_method
from .base import (Hyper, Method, auto_or, fraction, non_negative, one_of, optional, parameter_tuple, positive,
                   shrink_factor, write_batched)
from .quadratic import (accepted, forward_mode_jvps, levenberg_marquardt, next_batch_ratio, output_gram,
                        output_jvps, parameter_gram, quadratic_model_step)


def ema(old: Tensor, new: Tensor, decay: Tensor) -> Tensor:
    r"""Exponential moving average :math:`\beta\,\text{old} + (1-\beta)\,\text{new}`."""
    return old * decay + new * (1 - decay)


def factored_damping(factors: tuple[Tensor, ...], diagonal: tuple[bool, ...], damping: Tensor,
                     split_dims: tuple[int | None, ...] | None = None) -> tuple[Tensor, ...]:
    r"""Shifts added to each factor so that their Kronecker product is damped by about :math:`\lambda`.

    With :math:`t_i` the mean eigenvalue of factor ``i`` (trace over dimension, per
    leading index) and ``n`` factors, factor ``i`` gets
    :math:`s_i = \lambda^{1/n}\, t_i / (\prod_j t_j)^{1/n}`: for two factors ``A``, ``G``
    these are :math:`(\pi\sqrt\lambda, \sqrt\lambda/\pi)` with
    :math:`\pi = \sqrt{t_A / t_G}` (Martens & Grosse 2015, sec. 6.3); one factor gets
    :math:`\lambda` itself.

    Args:
        factors: the factors, dense ``(..., d, d)``, diagonal ``(..., d)`` or block-diagonal
            ``(..., k, b, b)``.
        diagonal: which factors are diagonal.
        damping: :math:`\lambda`, a 0-d tensor.
        split_dims: per factor, ``d`` of a block-diagonal factor (its trace is over all blocks,
            divided by ``d``, not by the zero-padded ``k b``), else ``None``; all ``None`` if omitted.

    Returns:
        One shift per factor, shaped like the factor's batch of matrices: the leading dims,
        and ``k`` after them for a block-diagonal factor (each block gets the factor's shift).
    """
    split_dims = split_dims or (None,) * len(factors)
    if len(factors) == 1 and split_dims[0] is None:
        lead = factors[0].shape[:-1] if diagonal[0] else factors[0].shape[:-2]
        return (damping.expand(lead),)
    tiny = torch.finfo(factors[0].dtype).tiny
    means = []
    for f, diag, split in zip(factors, diagonal, split_dims):
        if diag:
            means.append(f.mean(-1))
        elif split is None:
            means.append(f.diagonal(dim1=-2, dim2=-1).mean(-1))
        else:
            means.append(f.diagonal(dim1=-2, dim2=-1).sum((-2, -1)) / split)
    means = [m.clamp_min(tiny) for m in means]
    log_geometric_mean = sum(m.log() for m in means) / len(means)
    root = damping ** (1.0 / len(factors))
    shifts = [root * (m.log() - log_geometric_mean).exp() for m in means]
    return tuple(s if split is None else s[..., None].expand(f.shape[:-2])
                 for s, f, split in zip(shifts, factors, split_dims))


def damped_inverse(factor: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`(F + s I)^{-1}` by Cholesky, batched over leading dims.

    A factor whose order ``d`` is a multiple of 32 is factored and inverted as
    :math:`\operatorname{diag}(F + sI, 1)`, of order ``d + 1``, whose Cholesky factor and inverse hold those of
    :math:`F + sI` in their leading ``d x d`` block. MKL's Cholesky factorization is slower at those orders than
    at the next one (2 CPU cores, float32, ``torch.linalg.cholesky_ex``, ms at ``d`` against ``d + 1``: 128
    0.116 / 0.053, 512 1.23 / 0.63, 608 1.00 / 0.82, 1024 10.7 / 3.9, 2048 52.5 / 21.7, 3072 162 / 74, 4096
    305 / 144, 4608 306 / 201; float64 alike), and layer widths, which set a ``G`` factor's order, are mostly
    such multiples. At other orders (1000, 784, 500) it is not.

    Args:
        factor: symmetric PSD matrices ``(..., d, d)``.
        shift: damping ``s`` per matrix, shape ``(...)``.

    Returns:
        The inverses ``(..., d, d)`` and ``failed`` (shape ``...``): where the factorization failed or the
        inverse is not finite, and the inverse is not to be used (:func:`kept_where_failed`).
    """
    d = factor.shape[-1]
    order = d + 1 if d % 32 == 0 else d
    # F + sI (padded: the padding's diagonal entry 1, the rest of its row and column 0), formed in one buffer: the
    # refresh runs eagerly (curvgraph.codegen._write_refresh), where an identity and a product would each be one
    damped = torch.nn.functional.pad(factor, (0, order - d, 0, order - d))
    diagonal = damped.diagonal(dim1=-2, dim2=-1)
    diagonal[..., :d] += shift[..., None]
    diagonal[..., d:] = 1
    compiling = torch.compiler.is_compiling()
    if compiling:  # Dynamo takes no non-contiguous `out=`; Inductor plans the buffers
        chol, info = torch.linalg.cholesky_ex(damped)
    else:
        # factored and inverted in that buffer: its transpose (the same symmetric matrices) is column-major, LAPACK's
        # layout, so both write their result in place (into a row-major `out` they compute in a column-major copy,
        # and without `out` each returns a new matrix: three matrices held at once instead of one)
        chol = damped.mT
        info = torch.empty(chol.shape[:-2], dtype=torch.int32, device=chol.device)
        torch.linalg.cholesky_ex(chol, out=(chol, info))
    factored = info == 0
    # a failed factorization can leave a zero on the diagonal, which cholesky_inverse rejects: invert I there
    # (eager, only if one failed: the selection takes longer than reading `factored`)
    if compiling or not factored.all():
        chol = torch.where(factored[..., None, None], chol, torch.eye(order, dtype=chol.dtype, device=chol.device))
    inverse = torch.cholesky_inverse(chol, out=None if compiling else chol)[..., :d, :d]
    return inverse, ~(factored & finite_entries(inverse, 2))


def damped_diagonal_inverse(factor: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`1 / (f + s)` for diagonal factors ``(..., d)`` stored as vectors. Returns the inverses
    and ``failed`` (shape ``...``): the matrices (leading index) with an entry that is not positive and
    finite, whose inverse is not to be used (:func:`kept_where_failed`)."""
    damped = factor + shift[..., None]
    return 1.0 / damped, ~((damped > 0) & torch.isfinite(damped)).all(-1)


def kept_where_failed(new: Tensor, failed: Tensor, previous: Tensor, diagonal: bool) -> Tensor:
    """``new`` (inverses, eigenvalues, eigenbases) with ``previous`` kept for the matrices (leading index) where
    ``failed``; ``diagonal``: the values are vectors ``(..., d)``, else matrices ``(..., d, d)``.

    Applied per factor after a batched factorization (:func:`damped_inverse`, EKFAC's eigendecomposition)
    rather than inside it, so that the previous values are read from the state in place instead of stacked.
    Eager (the refresh runs eagerly, see :func:`curvgraph.codegen._write_refresh`), ``new`` itself where
    nothing failed: one read of ``failed`` on the host instead of a selection (40 us per ``129 x 129``
    factor on 2 CPU cores)."""
    if not torch.compiler.is_compiling() and not failed.any():
        return new
    mask = failed[..., None] if diagonal else failed[..., None, None]
    return torch.where(mask, previous, new)


def apply_inverse(matrix: Tensor, inverse: Tensor, axis: int, diagonal: bool, symmetric: bool = True,
                  split: bool = False) -> Tensor:
    r"""``matrix`` multiplied along its (negative) ``axis`` by ``inverse``: :math:`M \times_{axis} F^{-1}`.

    ``matrix`` is ``lead + (d_1, ..., d_r)``; ``inverse`` is ``lead + (d, d)`` (dense),
    ``lead + (d,)`` (diagonal) or ``lead + (k, b, b)`` (``split``: block-diagonal,
    :func:`curvgraph.plan.split_factor`, ``k b >= d``) with ``d`` the size of ``axis``. Every
    fiber ``x`` of ``matrix`` along ``axis`` becomes :math:`F^{-\top} x`: for ``r = 2`` the
    dense cases are :math:`F^{-\top} M` (``axis=-2``) and :math:`M F^{-1}` (``axis=-1``), i.e.
    :math:`F^{-1} M` and :math:`M F^{-1}` for K-FAC's symmetric inverses. ``symmetric=False``
    (EKFAC's orthogonal eigenbases :math:`Q`, rotating :math:`M` into :math:`Q_G^\top M Q_A`)
    transposes on the ``axis=-2`` shortcut, which the symmetric case skips. A block-diagonal
    inverse multiplies each fiber's consecutive slices of ``b`` by their own block (the fiber
    zero-padded to ``k b`` first, the padding dropped after).
    """
    if diagonal:
        return matrix * inverse.reshape(inverse.shape + (1,) * (-axis - 1))
    if split:
        lead, (blocks, size) = inverse.shape[:-3], inverse.shape[-3:-1]
        moved = matrix.movedim(axis, -1)
        sliced = block_rows(moved, blocks).reshape(lead + (-1, blocks, size)).transpose(-3, -2)  # lead + (k, fibers, b)
        product = (sliced @ inverse).transpose(-3, -2).reshape(moved.shape[:-1] + (blocks * size,))
        return product[..., :moved.shape[-1]].movedim(-1, axis)
    lead = inverse.shape[:-2]
    if axis == -2 and matrix.dim() == len(lead) + 2:
        return (inverse if symmetric else inverse.mT) @ matrix
    moved = matrix.movedim(axis, -1)
    product = moved.reshape(lead + (-1, inverse.shape[-1])) @ inverse
    return product.reshape(moved.shape).movedim(-1, axis)


def kfac_precondition(grad: Tensor, inverses: tuple[Tensor, ...], axes: tuple[int, ...],
                      diagonal: tuple[bool, ...], split: tuple[bool, ...] | None = None) -> Tensor:
    r""":math:`V = M \times_1 F_1^{-1} \times_2 F_2^{-1} \cdots`: the inverse of the Kronecker product of
    the factors applied to the block matrix, e.g. :math:`G^{-1} M A^{-1}`, i.e.
    :math:`(G \otimes A)^{-1} \operatorname{vec}(M)` in row-major vec order (``split``: which inverses
    are block-diagonal, see :func:`apply_inverse`)."""
    for inverse, axis, diag, blocked in zip(inverses, axes, diagonal, split or (False,) * len(inverses)):
        grad = apply_inverse(grad, inverse, axis, diag, split=blocked)
    return grad


def rows_precondition(rows: tuple[Tensor, Tensor], inverses: tuple[Tensor, Tensor], diagonal: tuple[bool, bool],
                      split: tuple[bool, bool] = (False, False)) -> Tensor:
    r""":math:`V = G^{-1} M A^{-1}` for a gradient given by its rows, :math:`M = \sum_r g_r \bar a_r^\top`.

    :math:`V = \sum_r (G^{-1} g_r)(A^{-1} \bar a_r)^\top = L^\top R`, where the ``R`` rows of
    ``L`` (``R x o``) and of ``R`` (``R x i``) are the rows preconditioned one by one: the same
    matrix as :func:`kfac_precondition` (up to rounding) in ``2 R (o^2 + i^2 + o i)`` FLOPs
    instead of ``2 o i (o + i)``, fewer when there are fewer rows than about ``2/3`` of the
    features (a wide layer at a small batch).

    Args:
        rows: the rows of each factor in axis order (rows first), ``(N, P, d_f)`` each, as
            :meth:`curvgraph.BlockKind.write_example_rows` gives them for the loss gradients.
        inverses: ``(G^{-1}, A^{-1})``, dense ``(d, d)``, diagonal ``(d,)`` or block-diagonal
            ``(k, b, b)`` (no leading dims).
        diagonal, split: which inverses are diagonal or block-diagonal (:func:`apply_inverse`).
    """
    left, right = (apply_inverse(r.reshape(-1, r.shape[-1]), inverse, -1, diag, split=blocked)
                   for r, inverse, diag, blocked in zip(rows, inverses, diagonal, split))
    return left.T @ right


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
    r"""Heavy-ball buffer :math:`B \leftarrow \mu B + \nu V` (the parameters move by :math:`-\eta B`)."""
    return momentum * buffer + scale * direction


def combine(direction: Tensor, previous: Tensor, alpha: Tensor, mu: Tensor) -> Tensor:
    r"""The update :math:`\delta = \alpha\Delta + \mu\delta_0` of one block."""
    return alpha * direction + mu * previous


def matrix_precondition_flops(block: Block) -> int:
    """FLOPs of :func:`kfac_precondition` on ``block``: ``2 numel(M) b`` per dense factor (``b`` its block size,
    ``d`` unless split), ``numel(M)`` per diagonal one."""
    numel = math.prod(block.matrix_shape)
    return sum(numel * (1 if f.diagonal else 2 * f.block_dim) for f in block.factors.values())


def rows_precondition_flops(block: Block, rows: sympy.Expr | int) -> sympy.Expr | int:
    """FLOPs of :func:`rows_precondition` on ``block`` for ``rows`` gradient rows: each factor's inverse applied to
    the rows (``2 R d b`` dense, ``R d`` diagonal) and the product of the two ``R``-row matrices (``2 R numel(M)``)."""
    applied = sum(f.dim if f.diagonal else 2 * f.dim * f.block_dim for f in block.factors.values())
    return rows * (applied + 2 * math.prod(block.matrix_shape))


class KFAC(Method):
    r"""K-FAC: Kronecker-factored natural gradient with momentum (see the module docstring).

    With ``lr="auto"`` (the default) the step size, and with ``momentum="auto"`` (the
    default with ``lr="auto"``) the momentum too, come from the quadratic model on each
    batch and the damping adapts by the Levenberg-Marquardt rule
    (:mod:`curvgraph.methods.quadratic`); ``damping`` is then the initial value,
    ``min_damping`` its floor, ``damping_decay`` the rule's factor :math:`\omega` (the
    paper's :math:`(19/20)^{T_1}` with :math:`T_1 = 1`: :math:`\rho` is measured every
    step), ``max_momentum`` bounds the chosen momentum, ``kl_clip`` is not used, and
    ``param_groups[0]["lr"]`` is 1.0, a multiplier on the model's step (so that
    ``torch.optim.lr_scheduler`` schedules still apply). With a numeric ``lr``
    the step is ``lr`` times the clipped, momentum-accumulated preconditioned gradient
    (momentum 0.9 unless given).
    """

    name = "kfac"
    splits_factors = True
    hyper = {
        "lr": Hyper("auto", auto_or(positive)),
        "momentum": Hyper("auto", auto_or(fraction)),
        "weight_decay": Hyper(0.0, non_negative),
        "damping": Hyper(1e-3, positive),
        "ema": Hyper(0.95, fraction),
        "kl_clip": Hyper(1e-3, optional(positive)),
        "min_damping": Hyper(1e-6, positive),
        "damping_decay": Hyper(19 / 20, shrink_factor),
        "max_momentum": Hyper(0.95, fraction),
        "temporal": Hyper("expand", one_of("expand", "option1"), static=True),
    }
    #: The damping's growth after a rejected step (the batch loss did not decrease); until the damping is calibrated
    #: it doubles with each further rejection in a row (:func:`~curvgraph.methods.quadratic.levenberg_marquardt`).
    reject_factor = 2.0
    #: Before calibration, a step with ``rho > 3/4`` halves the damping only where the previous step's reduction
    #: ratio on the next batch (:func:`~curvgraph.methods.quadratic.next_batch_ratio`) is above this.
    confirm_ratio = 0.5
    #: With ``lr="auto"``, this many steps rejected in a row raise the step's flag (a
    #: :class:`~curvgraph.StalledTrainingWarning`, once): the parameters have not moved for that long, and the
    #: damping has grown by ``2**stall_rejections`` or more. Healthy runs of the benchmark suite rejected up to 9
    #: in a row: the deep autoencoder mid-training, its damping doubling back up from the floor ``min_damping``
    #: to 5e-4 (tiny Hugging Face transformers reject 1-7 at the start; a small MLP started at a damping of 1e-12, 8).
    stall_rejections = 20
    #: The adaptive step's scalar state, each of shape ``(1,)``, and what :meth:`reported` calls it.
    adaptive_state = {"kfac.damping": "damping", "kfac.damping_growth": "damping_growth",
                      "kfac.damping_calibrated": "damping_calibrated", "kfac.rejected_steps": "rejected_steps",
                      "kfac.rejected_in_a_row": "rejected_in_a_row", "kfac.step_size": "step_size",
                      "kfac.momentum": "momentum", "kfac.rho": "rho", "kfac.model_change": "model_change",
                      "kfac.rho_next_batch": "rho_next_batch"}
    #: The adaptive state's entries that are not of the factor dtype.
    adaptive_dtypes = {"kfac.damping_calibrated": torch.bool, "kfac.rejected_steps": torch.int64,
                       "kfac.rejected_in_a_row": torch.int64}
    #: The momentum with a numeric ``lr`` when none is given.
    fixed_momentum = 0.9

    def __init__(self, **options) -> None:
        super().__init__(**options)
        if options.get("momentum") == "auto" and options.get("lr") != "auto":
            raise ConfigError("curvgraph: momentum='auto' needs lr='auto' (both come from the quadratic model).")
        self.adaptive = options.get("lr") == "auto"
        self.differentiates_backward = self.adaptive

    @classmethod
    def configure(cls, options: dict) -> tuple["KFAC", dict]:
        """As :meth:`Method.configure`; with a numeric ``lr`` the momentum defaults to
        :attr:`fixed_momentum` instead of ``"auto"``."""
        if options.get("lr", cls.hyper["lr"].default) != "auto" and "momentum" not in options:
            options = {**options, "momentum": cls.fixed_momentum}
        method, hyper = super().configure(options)
        if method.adaptive:
            hyper["lr"] = 1.0  # a multiplier on the quadratic model's step, for lr schedulers
        return method, hyper

    def step_values(self, group: dict, first_statistics: bool) -> dict[str, float]:
        """``kl_clip=None`` becomes ``inf`` (no clipping); the first statistics step uses ``ema=0``
        so that the factors start at the first batch's instead of at zero.

        Raises:
            ConfigError: with ``lr="auto"``, where ``group["lr"]`` (the multiplier :math:`s` on the quadratic
                model's step :math:`x^*`) is outside ``[0, 2)``: the model predicts the change
                :math:`M(s x^*) = (s^2/2 - s)\, x^{*\top} C x^*`, no decrease from :math:`s = 2` on, so every step
                would be rejected and the damping, adapted only on predicted decreases, would never move.
        """
        values = {key: math.inf if group[key] is None else float(group[key]) for key in self.hyper if key in group}
        if self.adaptive and not 0.0 <= values["lr"] < 2.0:
            raise ConfigError(
                f"curvgraph: with lr='auto', param_groups[0]['lr'] multiplies the quadratic model's step and must be in "
                f"[0, 2), got {values['lr']:g}: from 2 on the model predicts no decrease and every step would be "
                "rejected. Use 1 (the model's step) or less, e.g. from an lr scheduler, or a fixed lr=... instead.")
        if first_statistics:
            values["ema"] = 0.0
        return values

    def global_state(self) -> dict[str, StateSpec]:
        # shape (1,), not (): torch.compile (2.13) drops in-place writes to 0-d float64 CPU tensors
        if not self.adaptive:
            return {}
        # all but the damping are bookkeeping that a checkpoint from before they existed restarts (optional)
        return {key: StateSpec((1,), dtype=self.adaptive_dtypes.get(key), optional=key != "kfac.damping")
                for key in self.adaptive_state}

    def reported(self) -> dict[str, str]:
        r"""With ``lr="auto"``: the damping, the growth the next rejection applies and whether the damping is
        calibrated (:func:`~curvgraph.methods.quadratic.levenberg_marquardt`), how many steps were
        rejected (the batch loss did not decrease: the parameters stayed), in all and in a row up to the last
        step (``rejected_in_a_row``, 0 if it was taken), and the last step's quadratic model: ``step_size``
        :math:`\alpha`, ``momentum`` :math:`\mu`, its reduction ratio ``rho`` and its predicted change
        ``model_change`` :math:`M` (0 if the step was rejected), and ``rho_next_batch``, the ratio of the step
        before it measured on the last step's batch
        (:func:`~curvgraph.methods.quadratic.next_batch_ratio`; 0 if that step was rejected). All are 0
        before the first step. With a numeric ``lr``: nothing."""
        return dict(self.adaptive_state) if self.adaptive else {}

    def write_prologue(self, w: StepWriter, blocks: list[BlockVars]) -> None:
        for b in blocks:
            if self.temporal(b.block):  # the lag moments' EMAs (updated in place on statistics steps)
                for f in ("A", "G"):
                    w.line(f"{b.var(f + '_lag')} = {b.state(f + '_lag')}")
        if self.adaptive:
            w.line("# adaptive damping: the value the last step left (the initial damping before the first step)")
            stored = f"{w.state('kfac.damping')}[0]"
            w.line(f"lam = torch.where({stored} > 0, {stored}, {w.hyper('damping')})")

    def describe_options(self) -> str:
        """As :meth:`Method.describe_options`, leaving out ``temporal`` at its default (``"expand"``)."""
        shown = {k: v for k, v in self.options.items() if not (k == "temporal" and v == "expand")}
        return f"({', '.join(f'{k}={v!r}' for k, v in shown.items())})" if shown else ""

    def _damping(self, w: StepWriter) -> str:
        return "lam" if self.adaptive else w.hyper("damping")

    def temporal(self, block: Block) -> bool:
        """Whether ``block`` gets the temporal approximation (``temporal="option1"`` and a kind over time steps
        with lag moments, :func:`curvgraph.kinds.has_lag_moments`: the rnn blocks)."""
        from ..kinds.base import has_lag_moments

        kind = KINDS.get(block.kind)
        temporal = self.options.get("temporal") == "option1" and kind is not None and has_lag_moments(kind)
        if temporal and block.sharing == "reduce":
            raise ConfigError(f"curvgraph: temporal='option1' builds on the expand factors; block {block.name!r} has "
                              "kfac_approx='reduce'. Use kfac_approx='expand' (the default) or temporal='expand'.")
        return temporal

    def preconditioner(self, block: Block) -> tuple[str, ...]:
        if self.temporal(block):
            return ("left", "right", "scale")
        return tuple(f"{f}_inv" for f in block.factors)

    def state(self, block: Block) -> dict[str, StateSpec]:
        if self.temporal(block):
            a, g = block.factors["A"].shape, block.factors["G"].shape
            return {"A_lag": StateSpec(a), "G_lag": StateSpec(g), "left": StateSpec(g, "eye"),
                    "right": StateSpec(a, "eye"), "scale": StateSpec(block.matrix_shape, "ones"),
                    "momentum": StateSpec(block.matrix_shape)}
        inverses = {f"{name}_inv": StateSpec(f.shape, "ones" if f.diagonal else "eye") for name, f in block.factors.items()}
        return {**inverses, "momentum": StateSpec(block.matrix_shape)}

    def write_statistics(self, w, blocks: list[BlockVars]) -> None:
        for b in blocks:
            for f in b.factors:
                w.line(f"{b.factors[f]} = {w.call(ema, b.state(f), b.batch_factors[f], w.hyper('ema'))}")
                # not checked: the average of the state (finite: only finite values are committed) and the
                # batch factor (checked by the step: a batch factor that is not finite skips it) is finite
                w.commit(b.state(f), b.factors[f], when="update_stats")
            if self.temporal(b.block):
                lags = b.kind.write_lag_moments(w, b, f"{b.factors['A']}.dtype")  # the factors' dtype
                for f, batch in lags.items():
                    w.line(f"{b.var(f + '_lag')} = {w.call(ema, b.state(f + '_lag'), batch, w.hyper('ema'))}")
                    w.commit(b.state(f + "_lag"), b.var(f + "_lag"), when="update_stats")
                    w.check(b.var(f + "_lag"), when="update_stats")

    def write_refresh(self, w, blocks: list[BlockVars]) -> None:
        shifts: dict[tuple[str, str], str] = {}
        for b in blocks:
            names = list(b.factors)
            targets = [b.var(f"shift_{f}") for f in names]
            diagonal = tuple(b.block.factors[f].diagonal for f in names)
            split_dims = tuple(b.block.factors[f].split_dim for f in names)
            split = (split_dims,) if any(d is not None for d in split_dims) else ()  # omitted unless a factor is split
            call = w.call(factored_damping, w.pack(b.factors[f] for f in names), diagonal, self._damping(w), *split)
            w.line(f"{', '.join(targets)}, = {call}")
            shifts.update({(b.id, f): t for f, t in zip(names, targets)})
        groups: dict[tuple[tuple[int, ...], bool], list[tuple[BlockVars, str]]] = defaultdict(list)
        for b in blocks:
            if self.temporal(b.block):
                keys = self.preconditioner(b.block)
                call = w.call(option1_basis, b.factors["A"], b.factors["G"], b.var("A_lag"), b.var("G_lag"),
                              shifts[b.id, "A"], shifts[b.id, "G"], b.block.dims["steps"],
                              w.pack(b.state(k) for k in keys))
                w.line(f"{', '.join(b.var(k) for k in keys)}, {b.var('failed')} = {call}")
                for k in keys:
                    w.commit(b.state(k), b.var(k), when="refresh")
                w.flag(b.block, "the temporal (option 1) preconditioner could not be computed (a factor or the result "
                       "is not finite); kept the previous one (the identity before the first success)", b.var("failed"))
                continue
            for name, f in b.block.factors.items():
                groups[f.shape, f.diagonal].append((b, name))
        for (shape, diagonal), members in groups.items():
            inverse = damped_diagonal_inverse if diagonal else damped_inverse
            targets = [b.var(f"{f}_inv") for b, f in members]
            failed = [b.var(f"{f}_failed") for b, f in members]
            write_batched(w, inverse, [[b.factors[f], shifts[b.id, f]] for b, f in members],
                          [list(pair) for pair in zip(targets, failed)], f"factors of shape {'x'.join(map(str, shape))}",
                          math.prod(shape))
            for (b, f), target, fail in zip(members, targets, failed):
                w.line(f"{target} = {w.call(kept_where_failed, target, fail, b.state(f'{f}_inv'), diagonal)}")
                w.commit(b.state(f"{f}_inv"), target, when="refresh")
                w.flag(b.block, f"factor {f} could not be inverted at its damping shift (Cholesky failed or the inverse "
                       "is not finite); kept the previous inverse (the identity before the first success)",
                       f"{fail}.any()")

    def from_rows(self, block: Block) -> bool:
        """Whether ``block``'s direction is computed from the loss gradient's rows (:func:`rows_precondition`).

        It is where that is exact and cheaper: a kind with cheap example rows
        (:attr:`curvgraph.BlockKind.cheap_example_rows`), two factors on the rows and columns
        of the block matrix and no leading dims, not the temporal approximation, and fewer
        FLOPs at the example inputs' rows (:attr:`curvgraph.plan.Block.example_rows`) than
        the matrix products. The choice is fixed when the step is compiled (a batch of another
        size gives the same result at another cost); weight decay, which makes ``M`` full rank,
        switches the step to the matrix products while it is not 0 (a step specialized on
        ``weight_decay == 0``, :meth:`~curvgraph.codegen.writer.StepWriter.switch`).
        """
        kind = KINDS.get(block.kind)
        factors = list(block.factors.values())
        if (kind is None or not kind.cheap_example_rows or self.temporal(block) or block.example_rows is None
                or sorted(f.axis for f in factors) != [-2, -1] or any(f.lead for f in factors)):
            return False
        return rows_precondition_flops(block, block.example_rows) < matrix_precondition_flops(block)

    @staticmethod
    def _axis_order(block: Block) -> list[str]:
        """``block``'s factor names in axis order (the rows' factor first)."""
        return sorted(block.factors, key=lambda f: block.factors[f].axis)

    def _inverses(self, w: StepWriter, b: BlockVars) -> tuple[str, tuple, tuple, tuple]:
        """``b``'s inverses (variables named factor + ``_inv``) in axis order (rows first), with their axes,
        which are diagonal, and the trailing ``split`` argument of the apply functions (``()`` unless one is split)."""
        order = self._axis_order(b.block)
        factors = [b.block.factors[f] for f in order]
        split = tuple(f.split_dim is not None for f in factors)
        return (w.pack(b.var(f + "_inv") for f in order), tuple(f.axis for f in factors),
                tuple(f.diagonal for f in factors), (split,) if any(split) else ())

    def _precondition_matrix(self, w: StepWriter, b: BlockVars) -> str:
        """The call computing ``b``'s direction from its gradient matrix ``b.grad``."""
        if self.temporal(b.block):
            return w.call(option1_apply, b.grad, *(b.var(k) for k in self.preconditioner(b.block)))
        inverses, axes, diagonal, split = self._inverses(w, b)
        return w.call(kfac_precondition, b.grad, inverses, axes, diagonal, *split)

    def write_preconditioned(self, w: StepWriter, blocks: list[BlockVars]) -> None:
        """Assign every block's preconditioned gradient ``b.var('V')`` (:func:`kfac_precondition`, or
        :func:`rows_precondition` for the blocks :meth:`from_rows` picks while weight decay is 0, a
        :meth:`~curvgraph.codegen.writer.StepWriter.switch`); the rest of :meth:`write_direction` (KL
        clipping, momentum or the quadratic model) is shared by subclasses that only change this part (EKFAC)."""
        by_rows = [b for b in blocks if self.from_rows(b.block)]
        for b in blocks:
            if b not in by_rows:
                w.line(f"{b.var('V')} = {self._precondition_matrix(w, b)}")
        if not by_rows:
            return
        with w.indent(f"if {w.switch(w.hyper('weight_decay') + ' == 0')}:"):
            w.line("# layers with fewer gradient rows than features: G^-1 M A^-1 from M's rows")
            for b in by_rows:
                rows = b.kind.write_example_rows(w, b, b.gradient_uses, f"{b.grad}.dtype", "grad_rows")
                inverses, _, diagonal, split = self._inverses(w, b)
                call = w.call(rows_precondition, w.pack(rows[f] for f in self._axis_order(b.block)), inverses,
                              diagonal, *split)
                w.line(f"{b.var('V')} = {call}")
        with w.indent("else:  # weight decay makes M full rank: the matrix products"):
            for b in by_rows:
                w.line(f"{b.var('V')} = {self._precondition_matrix(w, b)}")

    def write_direction(self, w, blocks: list[BlockVars]) -> None:
        self.write_preconditioned(w, blocks)
        directions = w.pack(b.var("V") for b in blocks)
        grads = w.pack(b.grad for b in blocks)
        w.line(f"inner = {w.call(inner_product, directions, grads)}")
        w.check("inner")  # finite iff every V and M is; then so are the momentum buffers (updates: _write_updates)
        if self.adaptive:
            self._write_quadratic_model_step(w, blocks)
            return
        w.line(f"nu = {w.call(kl_clip_scale, 'inner', w.hyper('lr'), w.hyper('kl_clip'))}")
        for b in blocks:
            w.line(f"{b.var('B')} = {w.call(momentum_buffer, b.state('momentum'), b.var('V'), 'nu', w.hyper('momentum'))}")
            w.commit(b.state("momentum"), b.var("B"))
            w.line(f"{b.direction} = {w.hyper('lr')} * {b.var('B')}")

    def _write_quadratic_model_step(self, w: StepWriter, blocks: list[BlockVars]) -> None:
        """``delta = alpha * Delta + mu * delta_0`` from the quadratic model; the LM rule on rho."""
        w.line()
        w.line("# step size and momentum from the quadratic model on this batch (Martens & Grosse 2015, sec. 7)")
        w.line(f"Delta = {w.pack('-' + b.var('V') for b in blocks)}")
        previous = w.pack(b.state("momentum") for b in blocks)
        t_delta = parameter_tuple(w, blocks, "t_Delta", [f"Delta[{i}]" for i in range(len(blocks))], "torch.zeros_like({})")
        t_prev = parameter_tuple(w, blocks, "t_prev", [b.state("momentum") for b in blocks], "torch.zeros_like({})")
        w.line(f"tangents_Delta = {t_delta}")
        w.line(f"tangents_prev = {t_prev}")
        tangents = "(tangents_Delta, tangents_prev)"
        jvps = (w.call(output_jvps, "backprop", "output", tangents) if w.backward_differentiable
                else w.call(forward_mode_jvps, "model", "params", "probes", tangents))
        w.line(f"J_Delta, J_prev = {jvps}")
        shift = f"(lam + {w.hyper('weight_decay')})"
        w.line(f"ggn = {w.call(output_gram, 'output', 'targets', '(J_Delta, J_prev)', w.ref(w.loss_fn))}")
        w.line(f"norms = {w.call(parameter_gram, 'Delta', previous)}")
        w.line(f"C = ggn + {shift} * norms")
        w.line(f"linear = torch.stack([-inner, {w.call(inner_product, previous, w.pack(b.grad for b in blocks))}])")
        w.line("# the previous step's decrease as this batch sees it (0 where it was not taken)")
        curvature = f"ggn[1, 1] + {w.hyper('weight_decay')} * norms[1, 1]"
        call = w.call(next_batch_ratio, "linear[1]", curvature, f"{w.state('kfac.model_change')}[0]")
        w.line(f"rho_next_batch = {call}")
        if self.options.get("momentum") == "auto":
            low, high = "torch.zeros_like(lam)", w.hyper("max_momentum")
        else:
            low = high = w.hyper("momentum")
        w.line(f"alpha, mu, change = {w.call(quadratic_model_step, 'C', 'linear', low, high, w.hyper('lr'))}")
        for i, b in enumerate(blocks):
            w.line(f"{b.var('delta')} = {w.call(combine, f'Delta[{i}]', b.state('momentum'), 'alpha', 'mu')}")
        w.line("# Levenberg-Marquardt: the loss after the step on this batch against the model's prediction;")
        w.line("# a step that does not lower it is not taken")
        trial = parameter_tuple(w, blocks, "trial", [b.var("delta") for b in blocks], "{}", shift=True)
        w.line(f"new_loss = {w.ref(w.loss_fn)}(model({trial}, probes)[0], targets)")
        stored = f"{w.state('kfac.damping_growth')}[0]"
        w.line(f"nu = torch.where({stored} > 0, {stored}, torch.full_like(lam, {self.reject_factor}))")
        call = w.call(levenberg_marquardt, "lam", "nu", f"{w.state('kfac.damping_calibrated')}[0]", "new_loss", "loss",
                      "change", w.hyper("damping_decay"), self.reject_factor, w.hyper("min_damping"),
                      f"rho_next_batch > {self.confirm_ratio}")
        w.line(f"lam_next, nu_next, calibrated, rho = {call}")
        w.line(f"taken = {w.call(accepted, 'new_loss', 'loss')}.to({blocks[0].var('delta')}.dtype)")
        w.line(f"rejected_in_a_row = ({w.state('kfac.rejected_in_a_row')}[0] + 1) * (taken == 0)")
        w.flag(None, f"the last {self.stall_rejections} or more steps were all rejected (the batch loss after each "
               "step was not lower), so the parameters have not moved, and the damping grew with each; the quadratic "
               "model does not fit the loss. Check the loss and the scale of the inputs and targets, or start from a "
               "larger damping, or train with a fixed lr (e.g. lr=2e-3)",
               f"(rejected_in_a_row >= {self.stall_rejections}) & ok")  # ok: the step is finite
        reported = {"kfac.damping": "lam_next", "kfac.damping_growth": "nu_next", "kfac.damping_calibrated": "calibrated",
                    "kfac.rejected_steps": f"{w.state('kfac.rejected_steps')}[0] + (taken == 0)",
                    "kfac.rejected_in_a_row": "rejected_in_a_row",
                    "kfac.step_size": "alpha", "kfac.momentum": "mu",
                    "kfac.rho": "rho", "kfac.model_change": "change * taken", "kfac.rho_next_batch": "rho_next_batch"}
        for key, value in reported.items():
            w.commit(w.state(key), value)
        for b in blocks:
            w.line(f"{b.direction} = -taken * {b.var('delta')}")
            w.commit(b.state("momentum"), f"-{b.direction}")

    def cost(self, block: Block) -> dict[str, sympy.Expr]:
        """Preconditioning ``2 numel(M) d`` per dense factor (``2 numel(M) b`` when split into blocks of
        ``b``) and ``numel(M)`` per diagonal one (``2 (o^2 i + o i^2)`` for a dense block), or
        :func:`rows_precondition_flops` in the symbolic rows where :meth:`from_rows` holds, inversion
        ``d^3`` per dense factor matrix (``k b^3`` when split) and ``d`` per diagonal one, state: factors,
        inverses and momentum in float32. With ``lr="auto"``,
        ``quadratic_model``: the two curvature products ``J v`` (about two forwards each) and the trial forward,
        five forwards or ``5/3`` of the layer's forward/backward, every step."""
        numel = math.prod(block.matrix_shape)
        precondition = rows_precondition_flops(block, block.rows) if self.from_rows(block) \
            else matrix_precondition_flops(block)
        inversion = sum(math.prod(f.lead) * (f.dim if f.diagonal else f.blocks * f.block_dim**3)
                        for f in block.factors.values())
        floats = 2 * sum(math.prod(f.shape) for f in block.factors.values()) + numel
        if self.temporal(block):  # option 1: L^T M R and L (.) R^T; two inverse roots and two eigh; lags, bases, scale
            precondition *= 2
            inversion = 2 * inversion
            floats += sum(math.prod(f.shape) for f in block.factors.values()) + numel
        cost = {
            "precondition": sympy.sympify(precondition),
            "inversion": sympy.Integer(inversion),
            "state_bytes": sympy.Integer(4 * floats),
        }
        if self.adaptive:  # two curvature products J v (about two forwards each) and the trial forward
            cost["quadratic_model"] = 5 * sympy.sympify(block.cost.get("forward_backward", 0)) / 3
        return cost


register_method(KFAC)
