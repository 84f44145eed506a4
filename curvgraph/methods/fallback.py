r"""First-order rules for parameters no curvature pass matched.

Both follow ``torch.optim`` exactly (coupled weight decay, Adam's bias correction),
so a model with no curvature blocks trains as it would with ``torch.optim.Adam`` or
``torch.optim.SGD``:

* Adam: :math:`g \leftarrow g + \text{wd}\,p`, :math:`m \leftarrow \beta_1 m + (1-\beta_1) g`,
  :math:`v \leftarrow \beta_2 v + (1-\beta_2) g^2`,
  :math:`p \leftarrow p - \eta\, \frac{m / (1-\beta_1^t)}{\sqrt{v/(1-\beta_2^t)} + \epsilon}`;
* SGD: :math:`g \leftarrow g + \text{wd}\,p`, :math:`b \leftarrow \mu b + g`, :math:`p \leftarrow p - \eta\, b`.

Their hyper-parameters live in the optimizer's fallback parameter group; in the step
they are ``hyper["fallback_<name>"]``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from ..codegen.writer import StateSpec, StepWriter
from ..registry import register_fallback


def adam_direction(grad: Tensor, param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor,
                   beta1: Tensor, beta2: Tensor, eps: Tensor, weight_decay: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Adam's update direction (``param -= lr * direction``) and new moments, as ``torch.optim.Adam``."""
    g = grad + weight_decay * param
    m = beta1 * exp_avg + (1 - beta1) * g
    v = beta2 * exp_avg_sq + (1 - beta2) * g * g
    direction = (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + eps)
    return direction, m, v


def sgd_direction(grad: Tensor, param: Tensor, buffer: Tensor, momentum: Tensor, weight_decay: Tensor) -> Tensor:
    """SGD's heavy-ball buffer, which is also its direction (``param -= lr * buffer``)."""
    return momentum * buffer + grad + weight_decay * param


class FallbackRule(ABC):
    """A first-order rule for parameters no block kind claims.

    Subclasses set ``name``, ``defaults`` (the fallback parameter group's
    hyper-parameters) and ``state`` (per-parameter state tensors, kept in the
    parameter's dtype as ``torch.optim`` does), and write one parameter's update.
    ``curvgraph.register_fallback(MyRule())`` makes ``fallback="my_rule"`` select it.
    """

    name: str = ""
    defaults: dict[str, Any] = {}
    state: tuple[str, ...] = ()

    def state_specs(self, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, StateSpec]:
        """State tensors of one parameter."""
        return {key: StateSpec(shape, dtype=dtype) for key in self.state}

    def shared_state(self) -> dict[str, StateSpec]:
        """State shared by every fallback parameter (e.g. a step counter), by full key."""
        return {}

    @abstractmethod
    def hyper(self, group: dict) -> dict[str, float]:
        """The scalar hyper-parameters of the fallback ``group``, keyed ``fallback_<name>`` as in the step;
        ``fallback_lr`` is the one the generator applies."""

    def write_prologue(self, w: StepWriter) -> None:
        """Lines written once before the per-parameter updates."""

    @abstractmethod
    def write(self, w: StepWriter, name: str, param: str, grad: str) -> str:
        """Write the update of parameter ``name`` (variables ``param``, ``grad``); returns the direction
        variable (the parameter moves by ``-fallback_lr * direction``)."""


class Adam(FallbackRule):
    """``torch.optim.Adam`` (coupled weight decay, bias correction)."""

    name = "adam"
    defaults = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    state = ("exp_avg", "exp_avg_sq")

    def shared_state(self) -> dict[str, StateSpec]:
        return {"fallback.step": StateSpec((), dtype=torch.float32)}

    def hyper(self, group: dict) -> dict[str, float]:
        r"""As :meth:`FallbackRule.hyper`; a ``momentum`` in the group is :math:`\beta_1`. Schedulers that cycle
        the momentum (``OneCycleLR``, ``CyclicLR``) write ``momentum`` into every group, not ``betas``, because
        the optimizer's ``defaults`` hold the curvature method's ``momentum``; for ``torch.optim.Adam`` they
        cycle ``betas[0]``, and so they do here."""
        beta1, beta2 = group["betas"]
        beta1 = group.get("momentum", beta1)
        values = {"beta1": beta1, "beta2": beta2, "eps": group["eps"], "lr": group["lr"],
                  "weight_decay": group["weight_decay"]}
        return {f"fallback_{k}": float(v) for k, v in values.items()}

    def write_prologue(self, w: StepWriter) -> None:
        w.line(f"fallback_step = {w.state('fallback.step')} + 1")
        w.commit(w.state("fallback.step"), "fallback_step")

    def write(self, w: StepWriter, name: str, param: str, grad: str) -> str:
        direction = f"U_{w.ident(name)}"
        m, v = f"{direction}_m", f"{direction}_v"
        call = w.call(adam_direction, grad, param, w.state(f"{name}.exp_avg"), w.state(f"{name}.exp_avg_sq"),
                      "fallback_step", w.hyper("fallback_beta1"), w.hyper("fallback_beta2"), w.hyper("fallback_eps"),
                      w.hyper("fallback_weight_decay"))
        w.line(f"{direction}, {m}, {v} = {call}")
        w.commit(w.state(f"{name}.exp_avg"), m)
        w.commit(w.state(f"{name}.exp_avg_sq"), v)
        return direction


class SGD(FallbackRule):
    """``torch.optim.SGD`` with heavy-ball momentum (coupled weight decay)."""

    name = "sgd"
    defaults = {"lr": 1e-2, "momentum": 0.9, "weight_decay": 0.0}
    state = ("momentum_buffer",)

    def hyper(self, group: dict) -> dict[str, float]:
        values = {"momentum": group["momentum"], "lr": group["lr"], "weight_decay": group["weight_decay"]}
        return {f"fallback_{k}": float(v) for k, v in values.items()}

    def write(self, w: StepWriter, name: str, param: str, grad: str) -> str:
        direction = f"U_{w.ident(name)}"
        call = w.call(sgd_direction, grad, param, w.state(f"{name}.momentum_buffer"), w.hyper("fallback_momentum"),
                      w.hyper("fallback_weight_decay"))
        w.line(f"{direction} = {call}")
        w.commit(w.state(f"{name}.momentum_buffer"), direction)
        return direction


register_fallback(Adam())
register_fallback(SGD())
