"""What an update rule declares so that the code generator can write its step.

A method knows nothing about FX: it sees blocks (kind, factor shapes) through
:class:`BlockVars` -- the names the generated code uses for a block's tensors -- and
writes its part of the step with a :class:`~curvgraph.codegen.StepWriter` by calling
plain torch functions (its *helpers*), which the generator copies into the source.

The step the generator writes is, for every block::

    M       = gradient matrix of the block (+ weight decay)        [generator]
    A_batch, G_batch = Kronecker factors of this batch              [generator, per kind]
    if update_stats:  method.write_statistics(...)  -> factors      [method]
    if refresh:       method.write_refresh(...)     -> preconditioner
    method.write_direction(...)   -> D, with  W <- W - lr * D        [method]
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import sympy
import torch

from ..plan import Block

if TYPE_CHECKING:
    from ..codegen import StepWriter


@dataclass(frozen=True)
class StateSpec:
    """One state tensor: its shape, how it starts (``"zeros"`` or ``"eye"``) and its
    dtype (``None``: the factor dtype, float32 or wider)."""

    shape: tuple[int, ...]
    init: str = "zeros"
    dtype: torch.dtype | None = None


@dataclass
class BlockVars:
    """Names of a block's tensors in the generated step.

    ``factors`` maps each factor name to the variable holding its current value,
    ``batch_factors`` to the variable holding this batch's estimate, ``grad`` is the
    gradient matrix (weight decay included) and ``direction`` the variable the
    method must assign: the parameter matrix moves by ``-lr * direction``.
    """

    block: Block
    id: str
    factors: dict[str, str] = field(default_factory=dict)
    batch_factors: dict[str, str] = field(default_factory=dict)

    @abstractmethod
    def state(self, key: str) -> str:
        """Expression reading the block's state entry ``key``."""
        return f"state[{self.key(key)!r}]"

    def key(self, key: str) -> str:
        """The state-dict key of the block's entry ``key``."""
        return f"{self.block.name}.{key}"

    def var(self, prefix: str) -> str:
        """A local variable name for this block."""
        return f"{prefix}_{self.id}"

    @property
    def grad(self) -> str:
        return self.var("M")

    @property
    def direction(self) -> str:
        return self.var("D")


class Method(ABC):
    """Base class of curvature update rules.

    Subclasses set ``name`` and ``defaults`` (hyper-parameters with their default
    values; each becomes a key of the optimizer's curvature parameter group and a 0-d
    tensor ``hyper[key]`` in the step). The factors a block keeps are its kind's
    (``block.factor_shapes``: ``A``, ``G`` or ``F``); the generator computes their
    batch estimates.
    """

    name: str = ""
    defaults: dict[str, float | None] = {}

    @abstractmethod
    def preconditioner(self, block: Block) -> tuple[str, ...]:
        """State entries of ``block`` that ``write_refresh`` recomputes (read from the state otherwise)."""

    @abstractmethod
    def state(self, block: Block) -> dict[str, StateSpec]:
        """State tensors of ``block`` besides the factors (which are always kept)."""

    @abstractmethod
    def write_statistics(self, w: "StepWriter", blocks: list[BlockVars]) -> None:
        """Update each block's factors from its batch factors (inside ``if update_stats:``)."""

    @abstractmethod
    def write_refresh(self, w: "StepWriter", blocks: list[BlockVars]) -> None:
        """Recompute the preconditioners from the factors (inside ``if refresh:``)."""

    @abstractmethod
    def write_direction(self, w: "StepWriter", blocks: list[BlockVars]) -> None:
        """Assign every block's ``direction`` from its gradient matrix."""

    @abstractmethod
    def cost(self, block: Block) -> dict[str, sympy.Expr]:
        """``precondition``, ``inversion`` FLOPs and ``state_bytes`` of ``block``."""
