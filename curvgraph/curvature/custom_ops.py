"""Step helpers that run as custom ops (:func:`torch.library.custom_op`), registered once per process.

Inductor writes a custom op's mutation in place into an intermediate that nothing else reads
(:func:`curvgraph.curvature.kronecker.add_gram_`: a running sum of matrix products), where an
out-of-place op gets a new buffer beside its input. A :class:`CustomOp` is such a helper: its
function and how the op is registered. curvgraph registers it on import; a generated module
copies the function and :func:`registered` and registers the op itself, so that it runs with
torch alone. Both register only where the process does not have the op yet: registering it
again would replace it, and a step compiled against the replaced op would call a freed kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def registered(qualname: str, function: Callable, mutates_args: tuple[str, ...]) -> Callable:
    """The custom op ``qualname`` (``"namespace::name"``), registered from ``function`` (which writes into its
    arguments ``mutates_args`` and returns ``None``) unless this process has it already.

    Its schema is inferred from ``function``'s annotations; ``function`` is its kernel on every device
    (``CompositeExplicitAutograd``), and tracing (fake tensors) runs no kernel, as the op returns nothing.
    Registered with :func:`torch.library.define` and :func:`torch.library.impl` rather than
    :func:`torch.library.custom_op`, whose autograd and version-counter wrappers cost about 40 us more per
    call (55 against 14 us for an op of 100 tensors, eager, 2 CPU cores): a compiled step calls the op from
    its C++ code once per use."""
    namespace, name = qualname.split("::")
    if not hasattr(getattr(torch.ops, namespace), name):
        torch.library.define(qualname, torch.library.infer_schema(function, mutates_args=mutates_args))
        torch.library.impl(qualname, "CompositeExplicitAutograd", function)
        torch.library.register_fake(qualname, _returns_nothing)
    return getattr(getattr(torch.ops, namespace), name)


def _returns_nothing(*args: object) -> None:
    """The fake (tracing) kernel of an op from :func:`registered`: it writes into its arguments and returns nothing."""


@dataclass(frozen=True)
class CustomOp:
    """``function`` as the custom op ``qualname``, registered when made (:func:`registered`); calling it calls
    the op. The code generator writes it into a generated module as ``function``'s source and one line,
    ``<name> = registered(qualname, function, mutates_args)``."""

    qualname: str
    function: Callable
    mutates_args: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "op", registered(self.qualname, self.function, self.mutates_args))

    @property
    def __name__(self) -> str:
        """The op's name without its namespace: its name in a generated module."""
        return self.qualname.split("::")[1]

    def __call__(self, *args: torch.Tensor) -> None:
        return self.op(*args)
