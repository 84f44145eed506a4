r"""Losses and the output-space side of the three Fisher types.

Every supported loss is a mean over :math:`K` loss terms,
:math:`L = \frac1K \sum_k \ell_k(f_k, y_k)`, where a term is one row of the output
along its class/feature axis ``C`` (``dim 1`` for ``cross_entropy``, the last dim for
``token_cross_entropy`` -- logits ``(N, T, V)`` and targets ``(N, T)``, a language
model's layout -- and for MSE and BCE, curvlinops' convention). For MSE and BCE
:math:`\ell_k` averages over the ``C`` entries of its row, so that ``L`` equals
PyTorch's ``reduction="mean"``. Cross-entropy terms whose target is ``-100``
(PyTorch's default ``ignore_index``, the padding label of language-model data) are
not terms: they are left out of ``K``, of the loss and of every Fisher type's vectors,
so they contribute nothing to the statistics.

The curvature of :math:`L` is :math:`\frac1K \sum_k J_k^\top H_k J_k` with
:math:`H_k = \nabla^2_f \ell_k`. The Kronecker factor ``G`` needs vectors ``s`` in
output space to backpropagate, one set per Fisher type:

``type2``
    the ``C`` columns of a square root :math:`S_k S_k^\top = H_k` (exact GGN);
``mc``
    one sample with :math:`\mathbb E[s s^\top] = H_k`: the gradient of
    :math:`-\log p(\hat y \mid f)` at a label drawn from the model's predictive
    distribution, scaled like :math:`\ell_k` (a categorical draw for cross-entropy,
    :math:`\hat y \sim \mathcal N(f, I)` for MSE, a Bernoulli draw for BCE);
``empirical``
    the same NLL gradient as ``mc`` but at the true label. Each loss is a scaled
    negative log-likelihood, :math:`\ell_k = \mathrm{NLL}_k / C'` with :math:`C' = 1`
    for cross-entropy and :math:`C' = C` for MSE (a Gaussian of variance 1/2) and
    BCE, so :math:`s = \sqrt{C'}\,\nabla_f \ell_k`, which is :math:`K\sqrt{C'}` times the
    gradient of ``L`` the loss backward already computes (no extra backward). This
    matches curvlinops' ``FisherType.EMPIRICAL``.

With ``reduction="sum"`` the step's loss is :math:`s L`, with :math:`s = K` for
cross-entropy and :math:`s = KC` (``output.numel()``) for MSE and BCE, whose sum runs
over every entry. Its gradient and its curvature are :math:`s` times the mean's, so
the factors are scaled with it: ``G`` gets the scale :math:`s/K` instead of
:math:`1/K` (``mc``, ``type2``) and :math:`c/s^2 \cdot s = c/s` on the gradients of the
summed loss (``empirical``), and ``kron(G, A)`` approximates the curvature of the sum.
A step with damping :math:`\lambda` then takes the step of the mean loss with damping
:math:`\lambda / s` (for K-FAC's factored damping too, whose split follows the traces).

The functions in this module are plain torch code; the code generator copies the ones
a step needs into the step's source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..runtime import IGNORE_INDEX, counts_nothing, target_problem, target_shape

FISHER_TYPES = ("mc", "empirical", "type2")


# ---------------------------------------------------------------- cross-entropy


def cross_entropy_loss(output: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy over the targets that are not ``IGNORE_INDEX``; classes along dim 1 of ``output``."""
    return F.cross_entropy(output, target)


def cross_entropy_sum_loss(output: Tensor, target: Tensor) -> Tensor:
    """Summed cross-entropy over the targets that are not ``IGNORE_INDEX``; classes along dim 1 of ``output``."""
    return F.cross_entropy(output, target, reduction="sum")


def cross_entropy_counted(target: Tensor) -> Tensor:
    """Which loss terms count: ``target != IGNORE_INDEX`` (shaped like ``target``)."""
    return target != -100


def cross_entropy_terms(output: Tensor, target: Tensor) -> Tensor:
    """Number of loss terms ``K``: every position of every example whose target is not ignored."""
    return cross_entropy_counted(target).sum()


def cross_entropy_empirical_scale(output: Tensor, target: Tensor) -> Tensor:
    r"""Scale :math:`c = K` turning loss-gradient outer products into the empirical Fisher."""
    return cross_entropy_terms(output, target)


def cross_entropy_mc(output: Tensor, target: Tensor, noise: Tensor) -> Tensor:
    r"""``p - onehot(y_hat)`` with ``y_hat ~ softmax(output)`` drawn by Gumbel-max from uniform ``noise``; 0 at ignored terms."""
    log_p = output.detach().log_softmax(1)
    label = (log_p - torch.log(-torch.log(noise))).argmax(1)
    onehot = F.one_hot(label, output.shape[1]).movedim(-1, 1).to(log_p.dtype)
    return (log_p.exp() - onehot) * cross_entropy_counted(target).unsqueeze(1)


def cross_entropy_type2(output: Tensor, target: Tensor) -> Tensor:
    r"""Columns of :math:`S = \operatorname{diag}(\sqrt p) - p \sqrt p^\top`, stacked first: ``(C, *output.shape)``.

    Column ``c`` is :math:`\sqrt{p_c}(e_c - p)`; :math:`S S^\top = \operatorname{diag}(p) - p p^\top`. Ignored
    terms get zero columns.
    """
    p = output.detach().softmax(1) * cross_entropy_counted(target).unsqueeze(1)
    classes = output.shape[1]
    eye = torch.eye(classes, dtype=p.dtype, device=p.device)
    view = (classes, 1, classes) + (1,) * (output.dim() - 2)
    sqrt_p = p.sqrt().movedim(1, 0).unsqueeze(2)  # (C, N, 1, ...)
    return sqrt_p * (eye.reshape(view) - p.unsqueeze(0))


def token_cross_entropy_loss(output: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy with classes along the *last* dim of ``output`` (logits ``(N, T, V)``, targets ``(N, T)``)."""
    return cross_entropy_loss(output.movedim(-1, 1), target)


def token_cross_entropy_sum_loss(output: Tensor, target: Tensor) -> Tensor:
    """Summed cross-entropy with classes along the *last* dim of ``output``."""
    return cross_entropy_sum_loss(output.movedim(-1, 1), target)


def token_cross_entropy_terms(output: Tensor, target: Tensor) -> Tensor:
    """Number of loss terms: every token whose target is not ignored."""
    return cross_entropy_terms(output.movedim(-1, 1), target)


def token_cross_entropy_mc(output: Tensor, target: Tensor, noise: Tensor) -> Tensor:
    """:func:`cross_entropy_mc` with classes last."""
    return cross_entropy_mc(output.movedim(-1, 1), target, noise.movedim(-1, 1)).movedim(1, -1)


def token_cross_entropy_type2(output: Tensor, target: Tensor) -> Tensor:
    """:func:`cross_entropy_type2` with classes last: ``(V, *output.shape)``."""
    return cross_entropy_type2(output.movedim(-1, 1), target).movedim(2, -1)


# ---------------------------------------------------------------------- MSE
def mse_loss(output: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over all entries."""
    return F.mse_loss(output, target)


def mse_sum_loss(output: Tensor, target: Tensor) -> Tensor:
    """Summed squared error over all entries."""
    return F.mse_loss(output, target, reduction="sum")


def feature_terms(output: Tensor, target: Tensor) -> int:
    """Number of loss terms ``K`` when features are the last dim (MSE, BCE)."""
    return output.numel() // output.shape[-1] if output.dim() > 1 else output.numel()


def feature_count(output: Tensor) -> int:
    """Size ``C`` of the feature axis (the last dim; 1 for a 1-D output)."""
    return output.shape[-1] if output.dim() > 1 else 1


def feature_empirical_scale(output: Tensor, target: Tensor) -> int:
    r"""Scale :math:`c = K C = ` ``output.numel()`` (MSE, BCE) turning loss-gradient outer products into the empirical Fisher."""
    return output.numel()


def mse_mc(output: Tensor, target: Tensor, noise: Tensor) -> Tensor:
    r""":math:`\sqrt{2/C}\,\varepsilon` with standard normal ``noise``: the scaled NLL gradient of a draw from :math:`\mathcal N(f, I)`."""
    return noise * math.sqrt(2.0 / feature_count(output))


def mse_type2(output: Tensor, target: Tensor) -> Tensor:
    r"""Columns of :math:`S = \sqrt{2/C}\, I`, stacked first: ``(C, *output.shape)``."""
    c = feature_count(output)
    eye = torch.eye(c, dtype=output.dtype, device=output.device) * math.sqrt(2.0 / c)
    return eye.reshape((c,) + (1,) * (output.dim() - 1) + (c if output.dim() > 1 else 1,)).expand((c,) + output.shape)


# ---------------------------------------------------------------------- BCE
def bce_loss(output: Tensor, target: Tensor) -> Tensor:
    """Mean binary cross-entropy with logits over all entries."""
    return F.binary_cross_entropy_with_logits(output, target)


def bce_sum_loss(output: Tensor, target: Tensor) -> Tensor:
    """Summed binary cross-entropy with logits over all entries."""
    return F.binary_cross_entropy_with_logits(output, target, reduction="sum")


def bce_mc(output: Tensor, target: Tensor, noise: Tensor) -> Tensor:
    r""":math:`(\sigma(f) - \hat y)/\sqrt C` with :math:`\hat y \sim \mathrm{Bernoulli}(\sigma(f))` from uniform ``noise``."""
    prob = output.detach().sigmoid()
    return (prob - (noise < prob).to(prob.dtype)) / math.sqrt(feature_count(output))


def bce_type2(output: Tensor, target: Tensor) -> Tensor:
    r"""Columns of :math:`S = \operatorname{diag}(\sqrt{\sigma(1-\sigma)/C})`, stacked first: ``(C, *output.shape)``."""
    prob = output.detach().sigmoid()
    c = feature_count(output)
    root = (prob * (1 - prob) / c).sqrt()
    if output.dim() == 1:
        return root.unsqueeze(0)
    eye = torch.eye(c, dtype=prob.dtype, device=prob.device)
    return eye.reshape((c,) + (1,) * (output.dim() - 1) + (c,)) * root.unsqueeze(0)


@dataclass(frozen=True)
class LossSpec:
    r"""A supported loss: its functions and what its targets must look like.

    Attributes:
        name: a key of :data:`LOSSES`.
        loss: ``(output, target) -> scalar`` mean loss.
        terms: ``(output, target) -> K``, the number of loss terms (ignored targets do not count).
        empirical_scale: ``(output, target) -> c`` with :math:`G_\text{emp} = c \sum g g^\top` for
            ``g`` the output gradients of the loss backward.
        mc: ``(output, target, noise) -> s``, one Monte-Carlo output vector per term
            (the target only says which terms are ignored).
        type2: ``(output, target) -> (C, *output.shape)``, the loss Hessian's square-root columns.
        noise: ``"uniform"`` or ``"normal"``, the noise ``mc`` consumes (shaped like the output).
        class_targets: targets are class indices (the output without its class dim)
            instead of tensors shaped like the output.
        class_dim: the output's class dim (class targets only): 1, or -1 for logits
            ``(N, T, V)`` of a language model.
        sum_loss: ``(output, target) -> scalar``, the same loss with ``reduction="sum"``.
        sum_scale: ``(output, target) -> s`` with ``sum_loss = s * loss``: ``K`` for
            cross-entropy, ``output.numel()`` for MSE and BCE (they average over features too).
        reduction: ``"mean"`` (``loss`` is the step's loss) or ``"sum"`` (``sum_loss`` is;
            the curvature is scaled by ``sum_scale`` with it, see :attr:`objective`).
    """

    name: str
    loss: Callable[[Tensor, Tensor], Tensor]
    terms: Callable[[Tensor], int]
    empirical_scale: Callable[[Tensor], int]
    mc: Callable[[Tensor, Tensor], Tensor]
    type2: Callable[[Tensor], Tensor]
    noise: str
    class_targets: bool
    sum_loss: Callable[[Tensor, Tensor], Tensor]
    sum_scale: Callable[[Tensor, Tensor], Tensor | int]
    class_dim: int = 1
    reduction: str = "mean"

    @property
    def objective(self) -> Callable[[Tensor, Tensor], Tensor]:
        """The loss the step minimizes: :attr:`loss`, or :attr:`sum_loss` with ``reduction="sum"``."""
        return self.sum_loss if self.reduction == "sum" else self.loss

    @property
    def description(self) -> str:
        """The name, with the reduction when it is not the mean."""
        return self.name if self.reduction == "mean" else f"{self.name}(reduction={self.reduction!r})"

    @property
    def target_class_dim(self) -> int | None:
        """The prediction's class dim for class-index targets, ``None`` for targets shaped like the prediction."""
        return self.class_dim if self.class_targets else None

    def target_shape(self, output_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape the targets must have for a prediction of ``output_shape``."""
        return target_shape(output_shape, self.target_class_dim)

    def counts_nothing(self, targets: Tensor) -> bool:
        """Whether the batch has no loss terms (:func:`curvgraph.runtime.counts_nothing`)."""
        return counts_nothing(targets, self.target_class_dim)

    def check_targets(self, targets: Tensor, output_shape: tuple[int, ...]) -> str | None:
        """What is wrong with ``targets`` for a prediction of ``output_shape``, or ``None``
        (:func:`curvgraph.runtime.target_problem`, with a hint where targets of the wrong shape fit another loss's
        layout or are the right targets reshaped)."""
        problem = target_problem(targets, output_shape, self.target_class_dim, self.name)
        if problem and tuple(targets.shape) != self.target_shape(output_shape):
            problem += self._layout_hint(tuple(targets.shape), output_shape)
        return problem

    def _layout_hint(self, shape: tuple[int, ...], output_shape: tuple[int, ...]) -> str:
        """A hint when targets of ``shape`` fit another loss's layout or are the right targets reshaped."""
        others = {name: spec for name, spec in LOSSES.items() if spec.class_targets == self.class_targets}
        for name, spec in others.items():
            if name != self.name and len(output_shape) > 2 and spec.target_shape(output_shape) == shape:
                return (f". These targets fit loss='{name}' (classes on "
                        f"{'the last dim' if spec.class_dim == -1 else 'dim 1'} of the prediction)")
        if math.prod(shape) == math.prod(self.target_shape(output_shape)):
            return f"; if they are in the prediction's order, pass targets.reshape{self.target_shape(output_shape)}"
        return ""


LOSSES = {
    "cross_entropy": LossSpec("cross_entropy", cross_entropy_loss, cross_entropy_terms, cross_entropy_empirical_scale,
                              cross_entropy_mc, cross_entropy_type2, "uniform", True, cross_entropy_sum_loss,
                              cross_entropy_terms),
    "token_cross_entropy": LossSpec("token_cross_entropy", token_cross_entropy_loss, token_cross_entropy_terms,
                                    token_cross_entropy_terms, token_cross_entropy_mc, token_cross_entropy_type2,
                                    "uniform", True, token_cross_entropy_sum_loss, token_cross_entropy_terms,
                                    class_dim=-1),
    "mse": LossSpec("mse", mse_loss, feature_terms, feature_empirical_scale, mse_mc, mse_type2, "normal", False,
                    mse_sum_loss, feature_empirical_scale),
    "bce_with_logits": LossSpec("bce_with_logits", bce_loss, feature_terms, feature_empirical_scale, bce_mc,
                                bce_type2, "uniform", False, bce_sum_loss, feature_empirical_scale),
}

_MODULES = {nn.CrossEntropyLoss: "cross_entropy", nn.MSELoss: "mse", nn.BCEWithLogitsLoss: "bce_with_logits"}
REDUCTIONS = ("mean", "sum")


def resolve_loss(loss: object) -> LossSpec:
    """The :class:`LossSpec` for a loss name or a default-configured loss module (``reduction`` ``"mean"`` or ``"sum"``)."""
    if isinstance(loss, str):
        if loss in LOSSES:
            return LOSSES[loss]
        raise ConfigError(f"curvgraph: unsupported loss {loss!r}; use one of {sorted(LOSSES)} or an instance of "
                          "nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss.")
    name = _MODULES.get(type(loss))
    if name is None:
        raise ConfigError(f"curvgraph: unsupported loss {type(loss).__name__}; use one of {sorted(LOSSES)} or an instance "
                          "of nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss (mean or sum reduction).")
    if loss.reduction not in REDUCTIONS:
        raise ConfigError(f"curvgraph: {type(loss).__name__}(reduction={loss.reduction!r}) is not supported; the step "
                          "needs a scalar loss: use reduction='mean' or 'sum'.")
    options = {
        "weight": getattr(loss, "weight", None),
        "pos_weight": getattr(loss, "pos_weight", None),
    }
    if any(v is not None for v in options.values()) or getattr(loss, "label_smoothing", 0.0) or getattr(loss, "ignore_index", IGNORE_INDEX) != IGNORE_INDEX:
        raise ConfigError(f"curvgraph: {type(loss).__name__} with class weights, pos_weight, label smoothing or a "
                          "custom ignore_index is not supported yet; use the default-configured loss.")
    return replace(LOSSES[name], reduction=loss.reduction)


def check_fisher(fisher: str) -> str:
    """Validate the Fisher type name."""
    if fisher not in FISHER_TYPES:
        raise ConfigError(f"curvgraph: fisher must be one of {FISHER_TYPES}, got {fisher!r}.")
    return fisher
