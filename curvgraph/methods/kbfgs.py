r"""K-BFGS and K-BFGS(L) (Goldfarb, Ren & Bahamou 2020): Kronecker-factored quasi-Newton, no inversion.

Per block with gradient matrix :math:`M` (weight decay added; curvgraph's layout, e.g.
:math:`[W, b]` of shape ``(out, in + 1)`` for a dense layer, per group for a grouped
convolution) the method keeps two inverse factors, *never* formed by inverting a matrix:

* :math:`H_a \approx (A + \lambda_A I)^{-1}` (input side, the factor on axis -1) by
  **Hessian-action BFGS**: with :math:`\bar a` the mean layer input of the batch (the mean
  of the kind's input rows, ones column included) and :math:`A` the exponential moving
  average (decay ``ema``) of the kind's input factor,

  .. math:: s_a = H_a \bar a, \qquad y_a = A s_a + \lambda_A s_a, \qquad H_a \leftarrow \mathrm{BFGS}(H_a, s_a, y_a);

* :math:`H_g` (output side, the factor on axis -2) by **damped BFGS** (``kbfgs``) or
  **L-BFGS** with ``memory`` pairs and :math:`H_0 = I` (``kbfgs_l``) on pairs built from the
  change of the layer's pre-activations :math:`h` and of the loss gradients
  :math:`g = \partial L / \partial h` on the *same* batch, before and after the parameter
  update (an extra forward/backward at the new parameters, part of the generated step):

  .. math:: s_g = \operatorname{mean}_r h_r^{+} - \operatorname{mean}_r h_r, \qquad
            y_g = \textstyle\sum_r g_r^{+} - \sum_r g_r ,

  ``r`` over the block's rows (examples, times positions for a convolution or a shared
  weight). The loss is the batch *mean*, so the step's output gradients carry
  :math:`1/N`; summing them over the rows is the paper's rescaling by ``N`` (its
  :math:`y` is the mean of the per-example gradients :math:`N g`), and over positions it
  is the gradient w.r.t. a shift common to every position, matching the scale of the
  kind's ``G`` (a sum over positions). For a two-factor block the mean pre-activation is
  linear in the inputs: :math:`\operatorname{mean}_r h_r = M \operatorname{mean}_r \bar a_r`
  (the kind's example rows: output = block matrix times input row). As in the authors'
  code, the pairs are averaged over steps (decay ``pair_ema``; 0 uses each step's pair
  alone), then **double damped** (Powell's damping on :math:`H`, then Levenberg-Marquardt
  damping, :func:`double_damping`) so that

  .. math:: \tilde s^\top \tilde y \ge \mu_2\, \tilde s^\top \tilde s, \qquad
            \tilde y^\top H \tilde y \le \max(1/\mu_1, \lambda_{\max}(H))\, \tilde s^\top \tilde y ,

  with :math:`\mu_1` = ``powell`` and :math:`\mu_2 = \lambda_A = \sqrt{\lambda}`
  (:math:`\lambda` = ``damping``, the paper's choice for both). These two ratio bounds keep
  :math:`H_g` symmetric positive definite and bound each update's eigenvalues:
  :math:`\lambda_{\min}(H^{+}) \ge \lambda_{\min}(H) / (1 + r_1)` and
  :math:`\lambda_{\max}(H^{+}) \le (\sqrt{\lambda_{\max}(H)} + \sqrt{r_1 r_2})^2 + r_2` with
  :math:`r_1 = \tilde y^\top H \tilde y / \tilde s^\top \tilde y`,
  :math:`r_2 = \tilde s^\top \tilde s / \tilde s^\top \tilde y \le 1/\mu_2`
  (from :math:`H^{+} = V^\top H V + \rho \tilde s \tilde s^\top`, :math:`V = I - \rho \tilde y \tilde s^\top`,
  and :math:`(H^{+})^{-1} \preceq H^{-1} + \tilde y \tilde y^\top / \tilde s^\top \tilde y`).
  The Hessian-action pair of :math:`H_a` needs no damping:
  :math:`s_a^\top y_a \ge \lambda_A s_a^\top s_a`.

The update (the paper's defaults: ``lr`` 0.3, ``momentum`` 0.9 on the gradient,
``damping`` :math:`\lambda` = 0.3, ``weight_decay`` 1e-5, ``ema`` 0.9):

.. math::
    \hat M \leftarrow \mu \hat M + (1-\mu) M, \qquad
    D = \eta\, H_g \hat M H_a, \qquad \bar W \leftarrow \bar W - D ,

with the inverse factors *before* this step's update; the pairs then use the new
parameters. :math:`H_g` starts at :math:`I`; :math:`H_a` starts at the scalar
:math:`I / (\operatorname{tr}(A)/d + \lambda_A)` on the first statistics step (the authors
start from :math:`(A+\lambda_A I)^{-1}`, an inversion). The inverse factors, the pairs and
the extra forward/backward are updated in statistics steps (``factor_every``; every step
by default, as in the paper); ``invert_every`` plays no role.
In the extra pass, parameters in no block (the first-order fallback's) keep their values
from before the step. The generator still accumulates every factor a kind declares, so
the output factor ``G`` is kept in the state though K-BFGS never reads it;
``fisher="empirical"`` spares the Fisher's extra backward that ``G`` would need.

**Blocks.** Dense and convolution blocks (groups as a leading dim) get the above. A block
with one factor (the per-channel ``F`` of a norm block, shape ``(C, k, k)``, which is the
curvature block itself) gets Hessian-action BFGS on ``F``:
:math:`H_F \approx (F + \lambda_A I)^{-1}` per channel with the action vector the mean of
the kind's example rows (the channel's mean per-example gradient), and
:math:`D = \eta \hat M H_F`; it needs no extra pass. A kind without example rows is a
:class:`~curvgraph.CompileError`. A
diagonal factor on the output side (axis -2: the token frequencies of an embedding, tied or
positional block) is inverted elementwise, :math:`(A + \lambda_A)^{-1}` (a reciprocal, not a
matrix inversion), and the dense factor on axis -1 gets Hessian-action BFGS as above; such a
block needs no pair and no extra pass. Another factor layout is a
:class:`~curvgraph.CompileError`.

**Degenerate blocks.** An update whose pair has :math:`s^\top y \le 0` (after the damping:
a zero pair, e.g. a saturated layer whose outputs do not change, or a zero action vector)
or whose result is not finite is skipped: the inverse factor keeps its previous value, per
leading index, and the step reports the block degenerate
(:meth:`curvgraph.CurvatureOptimizer.diagnostics`). A pair that is not finite (an extra
forward/backward that overflowed) is not averaged in either.
"""

from __future__ import annotations

import math

import sympy
import torch
from torch import Tensor

from ..codegen.writer import BlockVars, StateSpec, StepWriter
from ..errors import CompileError, ConfigError
from ..kinds.base import has_example_rows
from ..plan import Block
from ..registry import register_method
from .base import Hyper, Method, fraction, non_negative, parameter_tuple, positive, positive_int
from .kfac import apply_inverse, damped_diagonal_inverse, ema, inner_product, kept_where_failed


def initial_inverse(factor: Tensor, shift: Tensor, stored: Tensor, first: Tensor) -> Tensor:
    r"""The stored inverse factor, or on the first statistics step :math:`I / (\operatorname{tr}(F)/d + \lambda)`.

    ``factor`` and ``stored`` are ``(..., d, d)``; ``shift`` :math:`\lambda` and ``first`` (1 on the
    first statistics step, else 0) are 0-d. A scalar multiple of the identity: no inversion.
    """
    scale = factor.diagonal(dim1=-2, dim2=-1).mean(-1) + shift
    eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
    return torch.where(first > 0, eye / scale[..., None, None], stored)


def bfgs_inverse_update(H: Tensor, s: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    r"""The BFGS update of an inverse Hessian approximation, batched over leading dims.

    .. math:: H^{+} = (I - \rho s y^\top) H (I - \rho y s^\top) + \rho s s^\top
              = H + (\rho^2 y^\top H y + \rho) s s^\top - \rho (s (Hy)^\top + (Hy) s^\top),
              \quad \rho = 1 / s^\top y .

    ``H`` is ``(..., d, d)`` symmetric, ``s`` and ``y`` are ``(..., d)``. Where
    :math:`s^\top y` is not positive (a zero pair) or the result is not finite, ``H`` is
    kept. The result is symmetrized against rounding. Returns it and ``skipped`` ``(...)``:
    where ``H`` was kept.
    """
    sy = (s * y).sum(-1)
    good = sy > 0
    rho = torch.where(good, 1.0 / torch.where(good, sy, torch.ones_like(sy)), torch.zeros_like(sy))
    Hy = matvec(H, y)
    yHy = (y * Hy).sum(-1)
    outer_ss = s[..., :, None] * s[..., None, :]
    cross = s[..., :, None] * Hy[..., None, :]
    new = H + (rho * rho * yHy + rho)[..., None, None] * outer_ss - rho[..., None, None] * (cross + cross.mT)
    new = (new + new.mT) / 2
    keep = good & torch.isfinite(new).all(-1).all(-1)
    return torch.where(keep[..., None, None], new, H), ~keep


def hessian_action_update(H: Tensor, factor: Tensor, shift: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
    r"""Hessian-action BFGS towards :math:`(F + \lambda I)^{-1}`: :math:`s = H u`, :math:`y = F s + \lambda s`.

    ``H`` and ``factor`` are ``(..., d, d)``, ``action`` :math:`u` is ``(..., d)`` (the mean
    layer input, or the mean example row), ``shift`` :math:`\lambda` is 0-d. Returns
    :func:`bfgs_inverse_update` ``(H, s, y)`` (the new ``H`` and where it was kept);
    :math:`s^\top y \ge \lambda s^\top s > 0` unless :math:`u = 0`.
    """
    s = matvec(H, action)
    y = matvec(factor, s) + shift * s
    return bfgs_inverse_update(H, s, y)


def double_damping(s: Tensor, y: Tensor, Hy: Tensor, powell: Tensor, lm: Tensor) -> tuple[Tensor, Tensor]:
    r"""The paper's double damping DD of a curvature pair for an inverse approximation :math:`H`.

    Powell's damping on :math:`H` (with :math:`\mu_1` = ``powell``), then Levenberg-Marquardt
    damping (:math:`\mu_2` = ``lm``):

    .. math::
        \theta_1 &= \tfrac{(1-\mu_1)\, y^\top H y}{y^\top H y - s^\top y} \text{ if } s^\top y < \mu_1 y^\top H y
                    \text{ else } 1, \qquad \tilde s = \theta_1 s + (1-\theta_1) H y, \\
        \theta_2 &= \tfrac{(1-\mu_2)\, \tilde s^\top \tilde s}{\tilde s^\top \tilde s - \tilde s^\top y}
                    \text{ if } \tilde s^\top y < \mu_2 \tilde s^\top \tilde s \text{ else } 1, \qquad
        \tilde y = \theta_2 y + (1-\theta_2) \tilde s ,

    so that :math:`\tilde s^\top y \ge \mu_1 y^\top H y` after the first step and
    :math:`\tilde s^\top \tilde y \ge \mu_2 \tilde s^\top \tilde s` after the second.
    ``s``, ``y`` and ``Hy`` (:math:`H y`) are ``(..., d)``; ``powell``, ``lm`` are 0-d.
    """
    sy = (s * y).sum(-1, keepdim=True)
    yHy = (y * Hy).sum(-1, keepdim=True)
    damp = sy < powell * yHy
    gap = torch.where(damp, yHy - sy, torch.ones_like(sy))
    theta = torch.where(damp, (1 - powell) * yHy / gap, torch.ones_like(sy))
    s = theta * s + (1 - theta) * Hy
    sy = (s * y).sum(-1, keepdim=True)
    ss = (s * s).sum(-1, keepdim=True)
    damp = sy < lm * ss
    gap = torch.where(damp, ss - sy, torch.ones_like(ss))
    theta = torch.where(damp, (1 - lm) * ss / gap, torch.ones_like(ss))
    return s, theta * y + (1 - theta) * s


def matvec(H: Tensor, v: Tensor) -> Tensor:
    """:math:`H v` for matrices ``(..., d, d)`` and vectors ``(..., d)``, batched over leading dims."""
    return (H @ v[..., None])[..., 0]


def row_mean(rows: Tensor) -> Tensor:
    """The mean over examples and positions of example rows ``(R, P, *lead, d)``: ``(*lead, d)``."""
    return rows.mean((0, 1))


def preactivation_pair(matrix: Tensor, new_matrix: Tensor, inputs: Tensor, new_inputs: Tensor, grads: Tensor,
                       new_grads: Tensor) -> tuple[Tensor, Tensor]:
    r"""The output-side pair :math:`s = M^{+} \bar a^{+} - M \bar a`, :math:`y = \sum_r g^{+}_r - \sum_r g_r`.

    ``matrix``/``new_matrix`` are the block matrices ``(*lead, o, d)`` before and after the
    update, ``inputs``/``new_inputs`` the input rows ``(N, P, *lead, d)`` of the two passes
    (:math:`\bar a` is their mean over examples and positions, so :math:`M \bar a` is the mean
    pre-activation), ``grads``/``new_grads`` the rows ``(N, P, *lead, o)`` of the loss
    gradients w.r.t. the pre-activations (of the batch-mean loss). Returns ``(s, y)``, ``(*lead, o)`` each.
    """
    before = matvec(matrix, row_mean(inputs))
    after = matvec(new_matrix, row_mean(new_inputs))
    return after - before, new_grads.sum((0, 1)) - grads.sum((0, 1))


def finite_pair(s: Tensor, y: Tensor, previous_s: Tensor, previous_y: Tensor) -> tuple[Tensor, Tensor]:
    """The averaged pair ``(s, y)``, ``(*lead, o)`` each, with the ``previous`` one kept for every leading index where
    either is not finite: a pair from an extra forward/backward that overflowed is not averaged in."""
    good = (torch.isfinite(s) & torch.isfinite(y)).all(-1, keepdim=True)
    return torch.where(good, s, previous_s), torch.where(good, y, previous_y)


def curvature(s: Tensor, y: Tensor) -> Tensor:
    r""":math:`s^\top y` per leading index, shape ``(*lead, 1)`` (a diagnostic: negative for an indefinite pair)."""
    return (s * y).sum(-1, keepdim=True)


def lbfgs_apply(S: Tensor, Y: Tensor, R_inv: Tensor, V: Tensor) -> Tensor:
    r"""The L-BFGS inverse :math:`H` (:math:`H_0 = I`) applied to the columns of ``V``, in compact form.

    With the pairs as the rows of ``S``, ``Y`` (``(..., m, o)``, oldest first),
    :math:`D = \operatorname{diag}(s_i^\top y_i)` and :math:`R^{-1}` (``R_inv``, ``(..., m, m)``) the
    inverse of the upper triangle :math:`R_{ij} = s_i^\top y_j` (:math:`i \le j`), kept up to date by
    :func:`lbfgs_append` without any inversion (Byrd, Nocedal & Schnabel 1994):

    .. math:: H V = V + S^\top R^{-\top}\big((D + Y Y^\top) P - Y V\big) - Y^\top P,
              \qquad P = R^{-1} S V .

    Unused slots hold zeros in ``S``, ``Y`` and ``R_inv`` and contribute nothing. This equals the
    two-loop recursion, i.e. :func:`bfgs_inverse_update` applied from :math:`I` with the stored
    pairs in order, with matrix products only. ``V`` is ``(..., o, k)``; returns the same shape.
    """
    P = R_inv @ (S @ V)
    D = (S * Y).sum(-1)
    inner = D[..., None] * P + Y @ (Y.mT @ P) - Y @ V
    return V + S.mT @ (R_inv.mT @ inner) - Y.mT @ P


def lbfgs_append(S: Tensor, Y: Tensor, R_inv: Tensor, count: Tensor, s: Tensor,
                 y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""Append the pair ``(s, y)`` (``(..., o)``) to the memory, dropping the oldest slot.

    ``S``, ``Y`` are ``(..., m, o)``, ``R_inv`` ``(..., m, m)``, ``count`` ``(..., 1)`` (valid pairs, at
    most ``m``). The inverse triangle follows from block elimination with one scalar division: with
    :math:`R_\circ^{-1}` the trailing ``m-1`` block of ``R_inv`` (the inverse of the kept pairs' triangle),
    :math:`b_i = s_i^\top y` over the kept pairs and :math:`c = 1 / s^\top y`,

    .. math:: R_{+}^{-1} = \begin{pmatrix} R_\circ^{-1} & -c R_\circ^{-1} b \\ 0 & c \end{pmatrix}.

    A pair with :math:`s^\top y \le 0` or not finite is not stored (as :func:`bfgs_inverse_update` skips it).
    Returns the new ``S``, ``Y``, ``R_inv``, ``count`` and ``skipped`` (``(..., 1)``: where the pair was not stored).
    """
    sy = (s * y).sum(-1, keepdim=True)
    good = (sy > 0) & torch.isfinite(sy)
    kept_S, kept_R = S[..., 1:, :], R_inv[..., 1:, 1:]
    c = (1.0 / torch.where(good, sy, torch.ones_like(sy)))[..., None]
    column = -c * (kept_R @ (kept_S @ y[..., None]))
    top = torch.cat([kept_R, column], -1)
    bottom = torch.cat([top.new_zeros((*top.shape[:-2], 1, top.shape[-1] - 1)), c], -1)
    new_R = torch.cat([top, bottom], -2)
    new_S = torch.cat([kept_S, s[..., None, :]], -2)
    new_Y = torch.cat([Y[..., 1:, :], y[..., None, :]], -2)
    count = torch.where(good, (count + 1).clamp_max(S.shape[-2]), count)
    keep = good[..., None]
    return torch.where(keep, new_S, S), torch.where(keep, new_Y, Y), torch.where(keep, new_R, R_inv), count, ~good


class KBFGS(Method):
    """K-BFGS: BFGS inverse factors per block, no matrix inversion (see the module docstring).

    Hyper-parameters: ``lr`` (0.3), ``momentum`` (0.9, on the gradient), ``weight_decay``
    (1e-5), ``damping`` :math:`\\lambda` (0.3; :math:`\\lambda_A = \\mu_2 = \\sqrt\\lambda`),
    ``powell`` :math:`\\mu_1` (0.2), ``ema`` (0.9, the input factor's decay), ``pair_ema``
    (0.9, the output-side pairs' decay).
    """

    name = "kbfgs"
    hyper = {
        "lr": Hyper(0.3, positive),
        "momentum": Hyper(0.9, fraction),
        "weight_decay": Hyper(1e-5, non_negative),
        "damping": Hyper(0.3, positive),
        "powell": Hyper(0.2, fraction),
        "ema": Hyper(0.9, fraction),
        "pair_ema": Hyper(0.9, fraction),
    }

    def step_values(self, group: dict, first_statistics: bool) -> dict[str, float]:
        """As :meth:`Method.step_values`, plus ``first`` (1.0 until the first statistics step succeeded),
        which starts ``H_a`` and starts the input factor at the first batch's (``ema = 0``)."""
        values = super().step_values(group, first_statistics)
        values["first"] = float(first_statistics)
        if first_statistics:
            values["ema"] = 0.0
        return values

    # ------------------------------------------------------------------ structure
    @staticmethod
    def sides(block: Block) -> tuple[str | None, str]:
        """``(output-side factor or None, input-side factor)`` of ``block``; a CompileError for other layouts."""
        factors = block.factors
        by_axis = {f.axis: name for name, f in factors.items()}
        if set(by_axis) == {-2, -1} and not factors[by_axis[-1]].diagonal:
            return by_axis[-2], by_axis[-1]
        if len(factors) == 1 and set(by_axis) == {-1} and not factors[by_axis[-1]].diagonal:
            return None, by_axis[-1]
        raise CompileError(
            f"curvgraph: K-BFGS handles blocks with a dense factor on axis -1 and at most one more on axis -2 "
            f"(dense, conv, norm, embedding); block {block.name!r} ({block.kind}) has {dict(factors)}. "
            "Use method='kfac' for it."
        )

    @staticmethod
    def paired(block: Block) -> bool:
        """Whether the output side is a dense factor kept by (L-)BFGS on pre-activation pairs (else: none, or a
        diagonal factor inverted elementwise)."""
        out, _ = KBFGS.sides(block)
        return out is not None and not block.factors[out].diagonal

    def _output_state(self, block: Block, factor: str) -> dict[str, StateSpec]:
        return {f"{factor}_inv": StateSpec(block.factors[factor].shape, "eye")}

    def factors_kept(self, block: Block) -> tuple[str, ...]:
        """The input-side factor, and a diagonal output-side one (inverted elementwise); a dense output side is
        kept by BFGS on pre-activation pairs, not from its factor."""
        out, inp = self.sides(block)
        return (inp,) if self.paired(block) or out is None else (out, inp)

    def preconditioner(self, block: Block) -> tuple[str, ...]:
        return ()

    def state(self, block: Block) -> dict[str, StateSpec]:
        out, inp = self.sides(block)
        spec = block.factors[inp]
        state = {f"{inp}_inv": StateSpec(spec.shape, "eye"), "momentum": StateSpec(block.matrix_shape)}
        if self.paired(block):
            vector = block.factors[out].lead + (block.factors[out].dim,)
            state.update(self._output_state(block, out))
            state.update({"s": StateSpec(vector), "y": StateSpec(vector),
                          "curvature": StateSpec(block.factors[out].lead + (1,))})
        return state

    # ------------------------------------------------------------------ the step
    def write_statistics(self, w: StepWriter, blocks: list[BlockVars]) -> None:
        for b in blocks:
            if not has_example_rows(b.kind, b.block):
                reason = ("its positions have no batch dim (a lookup of flat indices, e.g. nn.EmbeddingBag with "
                          "offsets: pass the bags as the rows of a 2-D index tensor instead)" if not b.block.per_example
                          else f"its kind {b.kind.name!r} does not define write_example_rows() (implement it)")
                raise CompileError(
                    f"curvgraph: K-BFGS needs each block's example rows; block {b.block.name!r} has none: {reason}. "
                    "Or use method='kfac'.")
            for f in self.factors_kept(b.block):
                # not checked: the average of a finite state and a batch factor the step checks is finite
                w.line(f"{b.factors[f]} = {w.call(ema, b.state(f), b.batch_factors[f], w.hyper('ema'))}")
                w.commit(b.state(f), b.factors[f], when="update_stats")

    def write_refresh(self, w: StepWriter, blocks: list[BlockVars]) -> None:
        """Nothing: the inverse factors are updated with the pairs, in statistics steps."""

    def _write_output_apply(self, w: StepWriter, b: BlockVars, out: str, matrix: str) -> str:
        """The expression of :math:`H_g` applied along axis -2 of ``matrix``."""
        return w.call(apply_inverse, matrix, b.state(f"{out}_inv"), -2, False)

    def _write_output_update(self, w: StepWriter, b: BlockVars, out: str, s: str, y: str) -> None:
        """Double damping and the BFGS update of :math:`H_g` from the pair ``(s, y)``; commits it."""
        H = b.state(f"{out}_inv")
        w.line(f"{b.var('Hy')} = {w.call(matvec, H, y)}")
        damped = w.call(double_damping, s, y, b.var("Hy"), w.hyper("powell"), "lam_A")
        w.line(f"{b.var('s_dd')}, {b.var('y_dd')} = {damped}")
        target, skipped = b.var(f"{out}_inv_new"), b.var(f"{out}_skipped")
        w.line(f"{target}, {skipped} = {w.call(bfgs_inverse_update, H, b.var('s_dd'), b.var('y_dd'))}")
        w.check(target)
        w.commit(H, target)
        w.flag(b.block, f"the BFGS update of {out}_inv was skipped: the damped pre-activation pair is zero or not "
               "finite (the layer's outputs did not change, or the extra forward/backward at the updated parameters "
               f"is not finite); kept the previous {out}_inv (and, where the pair is not finite, the previous pair "
               "average)", f"{skipped}.any()")

    def write_direction(self, w: StepWriter, blocks: list[BlockVars]) -> None:
        w.line(f"lam_A = {w.hyper('damping')}.sqrt()  # lambda_A = mu_2 = sqrt(damping)")
        for b in blocks:
            out, inp = self.sides(b.block)
            w.line(f"{b.var('Ha')} = "
                   f"{w.call(initial_inverse, b.factors[inp], 'lam_A', b.state(f'{inp}_inv'), w.hyper('first'))}")
            w.line(f"{b.var('Mbar')} = {w.call(ema, b.state('momentum'), b.grad, w.hyper('momentum'))}")
            w.commit(b.state("momentum"), b.var("Mbar"))
            V = w.call(apply_inverse, b.var("Mbar"), b.var("Ha"), -1, False)
            if self.paired(b.block):
                V = self._write_output_apply(w, b, out, V)
            elif out is not None:  # a diagonal output-side factor: its damped reciprocal, elementwise
                reciprocal, failed = b.var(f"{out}_reciprocal"), b.var(f"{out}_failed")
                w.line(f"{reciprocal}, {failed} = {w.call(damped_diagonal_inverse, b.factors[out], 'lam_A')}")
                kept = w.call(kept_where_failed, reciprocal, failed, f"torch.ones_like({b.factors[out]})", True)
                w.line(f"{reciprocal} = {kept}")
                w.flag(b.block, f"factor {out} could not be inverted at its damping (an entry is not positive and "
                       "finite); used ones (no preconditioning) on that side", f"{failed}.any()")
                V = w.call(apply_inverse, V, reciprocal, -2, True)
            w.line(f"{b.var('V')} = {V}")
            w.line(f"{b.direction} = {w.hyper('lr')} * {b.var('V')}")
        directions = w.pack(b.var("V") for b in blocks)
        w.line(f"inner = {w.call(inner_product, directions, w.pack(b.grad for b in blocks))}")
        w.check("inner")  # finite iff every V is
        with w.indent("if update_stats:", when="update_stats"):
            self._write_curvature_updates(w, blocks)

    def _write_curvature_updates(self, w: StepWriter, blocks: list[BlockVars]) -> None:
        w.line("# K-BFGS: the inverse factors from this batch (the step above used the previous ones)")
        rows = {b.id: b.kind.write_example_rows(w, b, b.gradient_uses, f"{b.grad}.dtype", "rows") for b in blocks}
        paired = [b for b in blocks if self.paired(b.block)]
        if paired:
            w.line("# the extra forward/backward at the updated parameters, on the same batch")
            trial = parameter_tuple(w, blocks, "trial", [f"-{b.direction}" for b in blocks], "{}", shift=True)
            w.line(f"trial = {trial}")
            w.line("output_new, backprop_new, (_, acts_new) = torch.func.vjp(model, trial, probes, has_aux=True)")
            w.line(f"_, out_grads_new = backprop_new(torch.func.grad({w.ref(w.loss_fn)})(output_new, targets))")
        for b in blocks:
            out, inp = self.sides(b.block)
            old = rows[b.id]
            if self.paired(b.block):
                new = b.kind.write_example_rows(w, b, b.uses_of("acts_new", "out_grads_new"), f"{b.grad}.dtype",
                                                "rows_new")
                pair = w.call(preactivation_pair, b.var("P"), f"{b.var('P')} - {b.direction}", old[inp], new[inp],
                              old[out], new[out])
                w.line(f"{b.var('s_raw')}, {b.var('y_raw')} = {pair}")
                for key in ("s", "y"):
                    w.line(f"{b.var(key)} = {w.call(ema, b.state(key), b.var(key + '_raw'), w.hyper('pair_ema'))}")
                kept = [b.var("s_kept"), b.var("y_kept")]
                w.line(f"{', '.join(kept)} = {w.call(finite_pair, b.var('s'), b.var('y'), b.state('s'), b.state('y'))}")
                for key, value in zip(("s", "y"), kept):
                    w.commit(b.state(key), value)
                w.commit(b.state("curvature"), w.call(curvature, *kept))
                self._write_output_update(w, b, out, b.var("s"), b.var("y"))
            target, skipped = b.var(f"{inp}_inv_new"), b.var(f"{inp}_skipped")
            action = w.call(row_mean, old[inp])
            call = w.call(hessian_action_update, b.var("Ha"), b.factors[inp], "lam_A", action)
            w.line(f"{target}, {skipped} = {call}")
            w.check(target)
            w.commit(b.state(f"{inp}_inv"), target)
            w.flag(b.block, f"the Hessian-action BFGS update of {inp}_inv was skipped: s'y is not positive (the "
                   f"action, the mean {inp} row, is zero: e.g. all-zero inputs to a layer without bias) or the update "
                   f"is not finite; kept the previous {inp}_inv", f"{skipped}.any()")

    # ------------------------------------------------------------------ cost
    def _output_cost(self, block: Block, out: str) -> tuple[int, int, int]:
        """``(precondition, update, floats)`` of the output side: a dense ``H_g`` (BFGS)."""
        spec = block.factors[out]
        numel = math.prod(block.matrix_shape)
        leads = math.prod(spec.lead)
        return 2 * numel * spec.dim, leads * (10 * spec.dim**2 + 20 * spec.dim), math.prod(spec.shape)

    def cost(self, block: Block) -> dict[str, sympy.Expr]:
        """FLOPs and bytes (float32) of one step.

        ``precondition``: :math:`\\hat M H_a` (``2 numel(M) d_a``) and :math:`H_g \\cdot`
        (``2 numel(M) d_g``; K-BFGS(L), the compact form over ``m`` pairs:
        ``8 m numel(M) + m^2 (6 d_a + 2 d_g)`` per leading index). ``inversion``: 0 (nothing
        is inverted; there is no refresh).
        ``curvature_update`` (every statistics step): the Hessian-action BFGS update of
        ``H_a`` (about ``14 d_a^2`` per matrix: two matrix-vector products and the rank-two
        update) and the damped update of ``H_g`` (about ``10 d_g^2``; K-BFGS(L): the damping's
        ``H y`` and the new column of ``R^{-1}``, about ``2 m^2 d_g``). ``extra_forward_backward``: the second forward/backward at the
        updated parameters, the block's own ``forward_backward`` (blocks with an output
        side; norm blocks need none). ``state_bytes``: the factors kept (:meth:`factors_kept`),
        inverse factors (or pairs), momentum, averaged pair.
        """
        out, inp = self.sides(block)
        numel = math.prod(block.matrix_shape)
        spec = block.factors[inp]
        precondition = 2 * numel * spec.dim
        update = math.prod(spec.lead) * (14 * spec.dim**2)
        floats = sum(math.prod(block.factors[f].shape) for f in self.factors_kept(block)) + math.prod(spec.shape) + numel
        extra = sympy.Integer(0)
        if self.paired(block):
            p, u, f = self._output_cost(block, out)
            precondition, update = precondition + p, update + u
            floats += f + 3 * math.prod(block.factors[out].lead) * block.factors[out].dim
            extra = sympy.sympify(block.cost.get("forward_backward", 0))
        elif out is not None:  # a diagonal output side: a reciprocal and an elementwise product
            precondition += numel + block.factors[out].dim
        return {
            "precondition": sympy.Integer(precondition),
            "inversion": sympy.Integer(0),
            "curvature_update": sympy.Integer(update),
            "extra_forward_backward": extra,
            "state_bytes": sympy.Integer(4 * floats),
        }


class KBFGSL(KBFGS):
    """K-BFGS(L): as :class:`KBFGS`, with :math:`H_g` the L-BFGS matrix of the last ``memory`` (100) damped pairs
    (:math:`H_0 = I`), stored as fixed-size tensors ``S``, ``Y`` ``(*lead, memory, o)``, the inverse triangle
    ``R_inv`` ``(*lead, memory, memory)`` of the compact form (:func:`lbfgs_apply`) and a ``count``."""

    name = "kbfgs_l"
    hyper = {**KBFGS.hyper, "memory": Hyper(100, positive_int, static=True)}

    def _output_state(self, block: Block, factor: str) -> dict[str, StateSpec]:
        spec = block.factors[factor]
        memory = spec.lead + (self.options["memory"], spec.dim)
        triangle = spec.lead + (self.options["memory"],) * 2
        return {"S": StateSpec(memory), "Y": StateSpec(memory), "R_inv": StateSpec(triangle),
                "count": StateSpec(spec.lead + (1,))}

    def _write_output_apply(self, w: StepWriter, b: BlockVars, out: str, matrix: str) -> str:
        return w.call(lbfgs_apply, b.state("S"), b.state("Y"), b.state("R_inv"), matrix)

    def _write_output_update(self, w: StepWriter, b: BlockVars, out: str, s: str, y: str) -> None:
        Hy = w.call(lbfgs_apply, b.state("S"), b.state("Y"), b.state("R_inv"), f"{y}[..., None]")
        w.line(f"{b.var('Hy')} = {Hy}[..., 0]")
        damped = w.call(double_damping, s, y, b.var("Hy"), w.hyper("powell"), "lam_A")
        w.line(f"{b.var('s_dd')}, {b.var('y_dd')} = {damped}")
        keys = ("S", "Y", "R_inv", "count")
        names, skipped = [b.var(f"{k}_new") for k in keys], b.var("pair_skipped")
        call = w.call(lbfgs_append, *(b.state(k) for k in keys), b.var("s_dd"), b.var("y_dd"))
        w.line(f"{', '.join(names)}, {skipped} = {call}")
        for name in names[:3]:
            w.check(name)
        for key, name in zip(keys, names):
            w.commit(b.state(key), name)
        w.flag(b.block, "the damped pre-activation pair was not stored: it is zero or not finite (the layer's outputs "
               "did not change, or the extra forward/backward at the updated parameters is not finite); kept the "
               "previous pairs (and, where the pair is not finite, the previous pair average)", f"{skipped}.any()")

    def _output_cost(self, block: Block, out: str) -> tuple[int, int, int]:
        spec = block.factors[out]
        memory = self.options["memory"]
        numel = math.prod(block.matrix_shape)
        leads = math.prod(spec.lead)
        columns = numel // (leads * spec.dim)
        apply = 8 * memory * numel + leads * memory**2 * (6 * columns + 2 * spec.dim)
        update = leads * (2 * memory**2 * spec.dim + 10 * memory * spec.dim + 2 * memory**2)  # H y, the new column
        return apply, update, leads * (2 * memory * spec.dim + memory**2 + 1)


register_method(KBFGS)
register_method(KBFGSL)
