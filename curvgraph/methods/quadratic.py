r"""Step size, momentum and damping from the quadratic model (Martens & Grosse 2015, sec. 6-7).

With the preconditioned descent direction :math:`\Delta = -\tilde F^{-1}\nabla h` and the
previous update :math:`\delta_0`, the update is :math:`\delta = \alpha\Delta + \mu\delta_0`
with :math:`(\alpha, \mu)` minimizing the quadratic model of the mini-batch loss

.. math::
    M(\delta) = \tfrac12 \delta^\top C \delta + \nabla h^\top \delta, \qquad
    C = G + (\lambda + \eta) I,

where :math:`G` is the exact GGN of the batch-mean loss on the current batch (never
formed: :math:`u^\top G v = (J u)^\top H (J v)` with :math:`J` the model's Jacobian
and :math:`H` the loss Hessian w.r.t. the output), :math:`\lambda` the damping and
:math:`\eta` the weight decay. With :math:`C_{ij}` the Gram matrix of
:math:`(\Delta, \delta_0)` under :math:`C` and :math:`b = (\nabla h^\top\Delta,
\nabla h^\top\delta_0)`, the minimizer is :math:`-C^{-1} b` (:func:`quadratic_model_step`).

The damping follows the Levenberg-Marquardt rule on the reduction ratio
:math:`\rho = (h(\theta + \delta) - h(\theta)) / M(\delta)` measured on the same batch:
:math:`\lambda \leftarrow \omega\lambda` if :math:`\rho > 3/4`, :math:`\lambda/\omega` if
:math:`\rho < 1/4` (:func:`levenberg_marquardt`; :math:`\omega` is K-FAC's ``damping_decay``). A step
that does not lower the batch loss is not taken and doubles the damping; until the damping is calibrated
(a step with :math:`1/4 \le \rho \le 3/4`), rejections in a row grow it by 2, 4, 8, ... (Nielsen's rule),
and a step with :math:`\rho > 3/4` halves it where the previous step's decrease held on this batch
(:func:`next_batch_ratio`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from ..errors import ConfigError
from ..passes.forms import COMPOSITES
from ..trace import autograd_functions_inlined, select_output


def output_jvps(backprop: Callable, output: Tensor, tangents: tuple[tuple[Tensor, ...], ...]) -> tuple[Tensor, ...]:
    r""":math:`J v` for each parameter-space direction ``v`` in ``tangents``, by transposing the backward pass.

    ``backprop`` is the step's vector-Jacobian product of the model (``torch.func.vjp`` over the
    parameters and the probes): :math:`u \mapsto J^\top u` on its parameter part, a linear map
    of the output-space vector ``u`` (shaped like ``output``). The vector-Jacobian product of a
    linear map applies its transpose, so ``vjp(u -> J^T u)`` at any ``u`` maps ``v`` to
    :math:`J v`. Each product reuses the activations the forward saved: per layer the tangent
    of its input and of its weight (two forwards' worth of products), where forward mode
    (``torch.func.jvp``) would run the model again as well. The point ``u = 0`` at which the
    map is differentiated is never used, and the compiled step drops its computation.
    """
    _, transposed = torch.func.vjp(lambda u: backprop(u)[0], torch.zeros_like(output))
    return tuple(transposed(t)[0] for t in tangents)


def forward_mode_jvps(model: Callable, params: tuple[Tensor, ...], probes: tuple[Tensor, ...],
                      tangents: tuple[tuple[Tensor, ...], ...]) -> tuple[Tensor, ...]:
    r""":math:`J v` for each direction in ``tangents`` by forward mode (``torch.func.jvp``, one pass each, the model
    run again in each): what :func:`output_jvps` replaces, for models with an op whose backward has no derivative
    (``aten.hardsigmoid`` called as the op, in torch 2.13). A pass vectorized over the directions with ``vmap``
    fails to compile for convolutions with a symbolic batch size in torch 2.13."""
    return tuple(torch.func.jvp(lambda p: model(p, probes)[0], (params,), (t,))[1] for t in tangents)


def transposes_backward(model: torch.nn.Module, args: tuple, kwargs: dict, output: object = None) -> bool:
    r"""How the step computes its curvature products :math:`J v`: ``True`` by differentiating the model's backward
    pass in its output vector (:func:`output_jvps`), ``False`` by forward mode (:func:`forward_mode_jvps`).

    One eager forward of the prediction (picked by ``output``, :func:`curvgraph.trace.select_output`),
    backward and transposed backward on the example inputs, attention in its math form and the
    ``torch.nn.functional`` functions of :data:`curvgraph.passes.forms.COMPOSITES` in the form the
    step writes them in, each ``torch.autograd.Function`` as its ``forward``'s ops (as captured), on copies of the model's buffers and with the random number generators restored, so
    nothing about the model or the random streams changes. Where that fails, e.g. where an op's
    backward has no derivative ("derivative for aten::hardsigmoid_backward is not implemented", for
    the op called other than through ``F.hardsigmoid``), one forward-mode pass is tried the same way.

    Raises:
        ConfigError: where neither works (``torch.cdist`` has neither in torch 2.13): the
            quadratic model of ``lr="auto"`` cannot be evaluated, a fixed step size can.
    """
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def prediction(p: dict[str, Tensor]) -> Tensor:
        copies = {name: b.clone() for name, b in buffers.items()}  # made inside: a train-mode forward updates them
        returned = torch.func.functional_call(model, {**p, **copies}, args, kwargs)
        return select_output(returned, output, type(model).__name__)

    devices = [p.device for p in params.values() if p.device.type == "cuda"]
    zeros = {name: torch.zeros_like(p) for name, p in params.items()}
    # attention in its math form, as the attention pass rewrites it in the step (the fused kernels' backward
    # has no derivative)
    with (torch.random.fork_rng(devices=devices), sdpa_kernel(SDPBackend.MATH), _AsTheStepWritesThem(),
          autograd_functions_inlined()):
        try:
            predicted, backprop = torch.func.vjp(prediction, params)
            output_jvps(backprop, predicted, (zeros,))
            return True
        except Exception:  # noqa: BLE001 - any failure: forward mode, as before this check existed
            pass
        try:
            forward_mode_jvps(lambda p, probes: (prediction(p),), params, (), (zeros,))
            return False
        except Exception as exc:  # noqa: BLE001 - translated: neither way works
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(
                f"curvgraph: lr='auto' evaluates a quadratic model with curvature products J v, taken from "
                f"{type(model).__name__}'s backward pass differentiated once more or by forward mode "
                f"(torch.func.jvp), and torch {torch.__version__} can do neither for it: {reason} Use a fixed "
                "step size instead, e.g. lr=2e-3.") from exc


class _AsTheStepWritesThem(TorchFunctionMode):
    """Calls of the ``torch.nn.functional`` functions of :data:`curvgraph.passes.forms.COMPOSITES` run as their
    composites, as the step writes them."""

    composites = {functional: composite for _, functional, composite in COMPOSITES}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        composite = self.composites.get(func)
        return composite(args[0]) if composite is not None else func(*args, **(kwargs or {}))


def output_gram(output: Tensor, targets: Tensor, directions: tuple[Tensor, ...], loss: Callable) -> Tensor:
    r""":math:`[u_i^\top H u_j]_{ij}` with :math:`H = \nabla^2_f L(f, y)` at ``output``: the GGN Gram
    matrix of the parameter directions whose output-space images are ``directions``."""
    _, hessian_product = torch.func.vjp(torch.func.grad(lambda f: loss(f, targets)), output)
    # reverse over reverse (H is symmetric): forward over reverse hits an in-place write to a
    # ZeroTensor in mse_loss's derivative in torch 2.13
    products = [hessian_product(u)[0] for u in directions]
    return torch.stack([torch.stack([(u * p).sum() for p in products]) for u in directions])


def parameter_gram(first: tuple[Tensor, ...], second: tuple[Tensor, ...]) -> Tensor:
    r""":math:`[\langle u_i, u_j\rangle]` for the two directions given block by block."""
    aa = sum((x * x).sum() for x in first)
    ab = sum((x * y).sum() for x, y in zip(first, second))
    bb = sum((y * y).sum() for y in second)
    return torch.stack([torch.stack([aa, ab]), torch.stack([ab, bb])])


def quadratic_model_step(gram: Tensor, linear: Tensor, mu_low: Tensor, mu_high: Tensor,
                         scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Minimize :math:`M(\alpha, \mu) = \frac12 x^\top C x + b^\top x`, :math:`x = (\alpha, \mu)`,
    with :math:`\mu` restricted to ``[mu_low, mu_high]``, then scale the minimizer by ``scale``
    (1 takes the model's step; a learning-rate schedule in ``param_groups`` shrinks it).

    The unconstrained minimizer is :math:`-C^{-1} b`; its :math:`\mu` is clipped into the
    interval (0 when :math:`\delta_0 = 0` makes :math:`C` singular) and :math:`\alpha` is then
    the best for that :math:`\mu`, :math:`\alpha = -(b_0 + \mu C_{01}) / C_{00}`. Since
    :math:`\min_\alpha M(\alpha, \mu)` is convex in :math:`\mu`, the clipped point never
    increases the model above its value at :math:`\mu = 0` or at the interval's ends:
    with ``mu_low = 0``, :math:`M \le 0`.

    Returns:
        ``(alpha, mu, M)`` at the scaled point, 0-d tensors.
    """
    c00 = gram[0, 0].clamp_min(torch.finfo(gram.dtype).tiny)
    c01, c11 = gram[0, 1], gram[1, 1]
    b0, b1 = linear[0], linear[1]
    det = c00 * c11 - c01 * c01
    joint = (c11 > 0) & (det > 1e-10 * c00 * c11)
    mu = torch.where(joint, (c01 * b0 - c00 * b1) / torch.where(joint, det, torch.ones_like(det)), torch.zeros_like(det))
    mu = torch.minimum(torch.maximum(mu, mu_low), mu_high)
    alpha = -(b0 + mu * c01) / c00
    alpha, mu = scale * alpha, scale * mu
    change = 0.5 * (alpha * alpha * c00 + 2 * alpha * mu * c01 + mu * mu * c11) + alpha * b0 + mu * b1
    return alpha, mu, change


def accepted(new_loss: Tensor, loss: Tensor) -> Tensor:
    r"""Whether a proposed step is taken: the batch loss after it is finite and no larger than before.

    A rejected step leaves the parameters where they are and restarts the momentum
    (:math:`\delta = 0`); the damping then grows (:func:`levenberg_marquardt`).
    """
    return torch.isfinite(new_loss) & (new_loss <= loss)


def reduction_ratio(new_loss: Tensor, loss: Tensor, change: Tensor) -> Tensor:
    r""":math:`\rho = (h_\text{new} - h) / M`: the loss's change over the quadratic model's prediction
    :math:`M < 0` (1 where the step does what the model says; negative where the loss went up); 0-d,
    :math:`-(h_\text{new} - h)` where the model predicts no decrease (:math:`M \ge 0`)."""
    return (new_loss - loss) / torch.where(change < 0, change, -torch.ones_like(change))


def next_batch_ratio(slope: Tensor, curvature: Tensor, previous_change: Tensor) -> Tensor:
    r"""The previous step's reduction ratio measured on the current batch, which did not choose it; 0-d.

    :math:`\rho` is measured on the batch the step :math:`\delta_0` was fitted to, so it cannot see how
    much of the decrease was fitting that batch's noise: on the MNIST-1D MLP and GRU of
    ``docs/benchmarks.md`` it is near 1 while the training set's loss falls by a tenth of :math:`M` or
    rises. The current batch, at :math:`\theta_1 = \theta_0 + \delta_0`, gives an estimate free of that
    bias from quantities the quadratic model computes anyway: expanding its loss :math:`h'` backwards,
    :math:`h'(\theta_1) - h'(\theta_0) \approx \nabla h'^\top\delta_0 - \tfrac12 \delta_0^\top G'
    \delta_0`, with ``slope`` :math:`= \nabla h'^\top\delta_0` (the model's :math:`b_1`) and
    ``curvature`` :math:`= \delta_0^\top G'\delta_0` (:math:`C_{11}` without the damping; :math:`h'` and
    :math:`G'` include the weight decay :math:`\tfrac\eta2 \|\theta\|^2` as :math:`b` and :math:`C` do), so

    .. math::
        \rho' = \frac{\nabla h'^\top\delta_0 - \tfrac12 \delta_0^\top G'\delta_0}{M_0},

    with :math:`M_0` the previous step's predicted change (``previous_change``; 0 where it was not
    taken, and then :math:`\rho' = 0`). :math:`\rho' \approx \rho` where the step generalizes, and
    near 0 or negative where it only fit its batch. One batch makes it noisy; it is used only to
    confirm a decrease of the starting damping (:func:`levenberg_marquardt`).
    """
    taken = previous_change < 0
    return torch.where(taken, (slope - 0.5 * curvature) / torch.where(taken, previous_change,
                                                                      -torch.ones_like(previous_change)),
                       torch.zeros_like(previous_change))


def levenberg_marquardt(damping: Tensor, growth: Tensor, calibrated: Tensor, new_loss: Tensor, loss: Tensor,
                        change: Tensor, omega: Tensor, reject_factor: float, min_damping: Tensor,
                        confirmed: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""The damping after a step, the growth the next rejection applies, whether the damping is calibrated, and
    the step's reduction ratio :math:`\rho` (:func:`reduction_ratio`).

    An :func:`accepted` step follows the paper's rule on :math:`\rho = (h_\text{new} - h) / M`:
    :math:`\lambda\omega` if :math:`\rho > 3/4`, :math:`\lambda/\omega` if :math:`\rho < 1/4`. A rejected
    step multiplies the damping by the growth :math:`\nu`, ``reject_factor`` (2) after an accepted step.

    The starting damping is a guess made before the model was seen, and it can be orders of magnitude
    off either way: tiny transformers at batch 8 need 100-1000 times the default, the deep autoencoder a
    hundredth of it. Until a step is accepted with :math:`1/4 \le \rho \le 3/4` (the damping is
    *calibrated*: the quadratic model held and was not too cautious), the damping moves geometrically:

    * each rejection in a row also doubles :math:`\nu` (Nielsen 1999, IMM-REP-1999-05; Madsen, Nielsen
      & Tingleff 2004, sec. 3.2), so that :math:`k` rejections in a row grow the damping by
      :math:`2^{k(k+1)/2}` (2, 8, 64, 1024) instead of :math:`2^k`;
    * an accepted step with :math:`\rho > 3/4` divides it by ``reject_factor`` instead of
      :math:`\omega`, where ``confirmed``: the previous step's decrease held on this step's batch
      (:func:`next_batch_ratio`). :math:`\rho` alone cannot tell a cautious model from one that fits
      each batch's noise, and halving on :math:`\rho` alone took the MNIST-1D GRU's damping to the floor
      in 9 steps, after which it generalized worse (``docs/benchmarks.md``).

    Afterwards :math:`\nu` stays 2 and the decrease :math:`\omega`: growing faster there overshoots after a
    run of rejections mid-training (the MNIST-1D GRU of ``docs/benchmarks.md``). The damping never goes
    below ``min_damping``. A step the model predicts no decrease for (:math:`M = 0`) changes nothing.

    Args:
        damping: :math:`\lambda`, 0-d.
        growth: :math:`\nu`, 0-d.
        calibrated: 0-d bool.
        confirmed: 0-d bool, whether the previous step's decrease held on this batch.

    Returns:
        ``(damping, growth, calibrated)`` for the next step and :math:`\rho`, 0-d tensors.
    """
    rho = reduction_ratio(new_loss, loss, change)
    shrink = torch.where(calibrated | ~confirmed, omega, torch.full_like(omega, 1 / reject_factor))
    updated = torch.where(rho > 0.75, damping * shrink, torch.where(rho < 0.25, damping / omega, damping))
    taken = accepted(new_loss, loss)
    updated = torch.where(taken, updated, damping * growth)
    first = torch.full_like(growth, reject_factor)
    next_growth = torch.where(taken | calibrated, first, 2 * growth)
    predicted = change < 0
    return (torch.where(predicted, updated, damping).clamp_min(min_damping),
            torch.where(predicted, next_growth, growth),
            calibrated | (predicted & taken & (rho >= 0.25) & (rho <= 0.75)), rho)
