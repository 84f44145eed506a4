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

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import StateSpec


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


@dataclass(frozen=True)
class FallbackRule:
    """A first-order rule: its group hyper-parameters and per-parameter state."""

    name: str
    defaults: dict[str, object]
    state: tuple[str, ...]

    def state_specs(self, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, StateSpec]:
        """State tensors of one parameter (kept in the parameter's dtype, as ``torch.optim`` does)."""
        return {key: StateSpec(shape, dtype=dtype) for key in self.state}

    def hyper(self, group: dict) -> dict[str, float]:
        """The scalar hyper-parameters of the fallback group, keyed as in the step."""
        if self.name == "adam":
            beta1, beta2 = group["betas"]
            values = {"beta1": beta1, "beta2": beta2, "eps": group["eps"]}
        else:
            values = {"momentum": group["momentum"]}
        values.update(lr=group["lr"], weight_decay=group["weight_decay"])
        return {f"fallback_{k}": float(v) for k, v in values.items()}

    def write(self, w, name: str, param: str, grad: str) -> str:
        """Write the update of one parameter; returns the direction variable."""
        direction = f"U_{w.ident(name)}"
        if self.name == "adam":
            m, v = f"{direction}_m", f"{direction}_v"
            call = w.call(adam_direction, grad, param, w.state(f"{name}.exp_avg"), w.state(f"{name}.exp_avg_sq"), "fallback_step",
                          w.hyper("fallback_beta1"), w.hyper("fallback_beta2"), w.hyper("fallback_eps"),
                          w.hyper("fallback_weight_decay"))
            w.line(f"{direction}, {m}, {v} = {call}")
            w.commit(w.state(f"{name}.exp_avg"), m)
            w.commit(w.state(f"{name}.exp_avg_sq"), v)
        else:
            call = w.call(sgd_direction, grad, param, w.state(f"{name}.momentum_buffer"), w.hyper("fallback_momentum"),
                          w.hyper("fallback_weight_decay"))
            w.line(f"{direction} = {call}")
            w.commit(w.state(f"{name}.momentum_buffer"), direction)
        return direction


FALLBACKS = {
    "adam": FallbackRule("adam", {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
                         ("exp_avg", "exp_avg_sq")),
    "sgd": FallbackRule("sgd", {"lr": 1e-2, "momentum": 0.9, "weight_decay": 0.0}, ("momentum_buffer",)),
}


def resolve_fallback(name: str) -> FallbackRule:
    """The fallback rule called ``name``."""
    if name not in FALLBACKS:
        raise ConfigError(f"curvgraph: fallback must be one of {sorted(FALLBACKS)}, got {name!r}.")
    return FALLBACKS[name]
