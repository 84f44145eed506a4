"""What an update rule declares so that the code generator can write its step.

A method knows nothing about FX: it sees blocks (kind, factors) through
:class:`~curvgraph.codegen.writer.BlockVars` -- the names the generated code uses for
a block's tensors -- and writes its part of the step with a
:class:`~curvgraph.codegen.writer.StepWriter` by calling plain torch functions (its
*helpers*), which the generator copies into the source (renamed where two helpers
share a name, so methods never collide).

A method owns its hyper-parameters (:attr:`Method.hyper`: defaults and validation,
numeric ones scheduled through ``param_groups``, static ones fixing the generated
code), its state (:meth:`Method.state`), and its cost entries (:meth:`Method.cost`).
From the step it gets, per block: this batch's factors (``b.batch_factors``), each
use's layer inputs and output gradients (``b.uses``), the gradient matrix
(``b.grad``); and the step's locals, ``model(params, probes)`` among them for an
extra forward/backward (see :class:`~curvgraph.codegen.writer.StepWriter`).

The step the generator writes is, for every block::

    M       = gradient matrix of the block (+ weight decay)        [generator, per kind]
    if update_stats:  batch factors                                  [kind]
                      method.write_statistics(...)  -> factors       [method]
    refresh_(refresh, ...): method.write_refresh(...)     -> preconditioner (an eager custom op that writes
                                                            the state in place; one opaque call in the graph)
    method.write_direction(...)   -> D, with  M_param <- M_param - D          [method]
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import sympy
from torch import Tensor

from ..codegen.writer import StateSpec
from ..errors import ConfigError
from ..plan import Block

if TYPE_CHECKING:
    from ..codegen.writer import BlockVars, StepWriter


def positive(name: str, value: object) -> float:
    """A finite number > 0."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 < value < math.inf:
        raise ConfigError(f"curvgraph: {name} must be a positive finite number, got {value!r}.")
    return float(value)


def positive_int(name: str, value: object) -> int:
    """An integer >= 1."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"curvgraph: {name} must be a positive integer, got {value!r}.")
    return int(value)


def non_negative(name: str, value: object) -> float:
    """A number >= 0."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value >= 0:
        raise ConfigError(f"curvgraph: {name} must be >= 0, got {value!r}.")
    return float(value)


def fraction(name: str, value: object) -> float:
    """A number in ``[0, 1)`` (decays, momenta)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value < 1:
        raise ConfigError(f"curvgraph: {name} must be in [0, 1), got {value!r}.")
    return float(value)


def shrink_factor(name: str, value: object) -> float:
    """A number in ``(0, 1]`` (a factor that shrinks a value, or keeps it)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 < value <= 1:
        raise ConfigError(f"curvgraph: {name} must be in (0, 1], got {value!r}.")
    return float(value)


def optional(check: Callable[[str, object], Any]) -> Callable[[str, object], Any]:
    """``check``, or ``None`` (a feature that is off)."""

    def check_optional(name: str, value: object) -> Any:
        return None if value is None else check(name, value)

    check_optional.__doc__ = f"None, or {check.__doc__}"
    return check_optional


def auto_or(check: Callable[[str, object], Any]) -> Callable[[str, object], Any]:
    """``"auto"`` (the method chooses the value each step), or ``check``."""

    def check_auto(name: str, value: object) -> Any:
        return "auto" if value == "auto" else check(name, value)

    check_auto.__doc__ = f"'auto', or {check.__doc__}"
    return check_auto


def one_of(*choices: object) -> Callable[[str, object], Any]:
    """One of ``choices`` (a static option)."""

    def check_choice(name: str, value: object) -> Any:
        if value not in choices:
            raise ConfigError(f"curvgraph: {name} must be one of {list(choices)}, got {value!r}.")
        return value

    return check_choice


@dataclass(frozen=True)
class Hyper:
    """A method's hyper-parameter: its default, its validation, and when it acts.

    ``check(name, value)`` returns the validated value or raises
    :class:`~curvgraph.ConfigError`. A *numeric* value (a number, or ``None`` for a
    feature that is off) lives in the optimizer's curvature ``param_groups`` (so
    schedulers change it) and reaches the step as the 0-d tensor ``hyper[name]`` (see
    :meth:`Method.step_values`). A *static* one -- any value of a hyper-parameter
    declared ``static=True``, and any non-numeric value such as ``lr="auto"`` or a
    structure name -- fixes the generated code: it is passed to the method's
    constructor (``self.options``) and changing it needs a new :func:`curvgraph.compile`.
    """

    default: Any
    check: Callable[[str, object], Any]
    static: bool = False


class Method(ABC):
    """Base class of curvature update rules.

    Subclasses set ``name`` and ``hyper`` (see :class:`Hyper`) and implement the
    ``write_*`` methods, :meth:`state`, :meth:`preconditioner` and :meth:`cost`. The
    factors a block keeps are its kind's (``block.factors``); the generator has the
    kind compute their batch estimates and keeps the factors themselves in the state.
    ``curvgraph.register_method(MyMethod)`` makes ``method="my_method"`` select it.
    """

    name: str = ""
    hyper: dict[str, Hyper] = {}
    #: The Fisher type used when ``compile`` gets no ``fisher=`` (``None``: compile's default, ``"mc"``).
    default_fisher: str | None = None
    #: Whether the method handles block-diagonal factors (``Factor.blocks > 1``, ``max_factor_dim``).
    splits_factors: bool = False
    #: Whether the step differentiates the model's backward pass again (the adaptive K-FAC step's curvature
    #: products, :func:`curvgraph.methods.quadratic.output_jvps`): the capture then checks that it can be
    #: (:attr:`curvgraph.codegen.writer.StepWriter.backward_differentiable`).
    differentiates_backward: bool = False

    def __init__(self, **options: Any) -> None:
        """``options``: the validated static hyper-parameters."""
        self.options = options

    @classmethod
    def configure(cls, options: dict[str, Any]) -> tuple["Method", dict[str, Any]]:
        """Validate ``options`` (a subset of :attr:`hyper`, defaults fill the rest).

        Returns the method instance (holding the static options) and the numeric
        hyper-parameters for the optimizer's parameter group.
        """
        values = {key: spec.check(key, options.get(key, spec.default)) for key, spec in cls.hyper.items()}
        static = {key: v for key, v in values.items() if cls.hyper[key].static or not _numeric(v)}
        return cls(**static), {key: v for key, v in values.items() if key not in static}

    def step_values(self, group: dict[str, Any], first_statistics: bool) -> dict[str, float]:
        """The numeric hyper-parameters of the curvature ``group`` as floats for the step's ``hyper``.

        ``first_statistics`` is true until the first statistics step succeeded (a method
        may then, e.g., ignore its running averages).
        """
        return {key: float(group[key]) for key in self.hyper if key in group and key not in self.options}

    def compile_options(self) -> dict[str, Any]:
        """Compile options that the static hyper-parameters fix, e.g. ``{"factor_every": T}`` for a method
        whose update follows its own period; ``compile`` rejects a different value for them."""
        return {}

    def describe_options(self) -> str:
        """The static options as ``"(key=value, ...)"`` for the generated module's header ("" if none)."""
        return f"({', '.join(f'{k}={v!r}' for k, v in self.options.items())})" if self.options else ""

    def global_state(self) -> dict[str, StateSpec]:
        """State tensors of the method itself (not of one block), by full key, e.g. an adaptive damping."""
        return {}

    def reported(self) -> dict[str, str]:
        """The entries of :meth:`global_state` that ``stats()`` shows after each step (of the optimizer and of an
        exported step): full key -> the name it shows the value under (e.g. an adaptive damping); none by default."""
        return {}

    def write_prologue(self, w: "StepWriter", blocks: list["BlockVars"]) -> None:
        """Lines written before the statistics, every step (e.g. reading an adaptive damping)."""

    @abstractmethod
    def preconditioner(self, block: Block) -> tuple[str, ...]:
        """State entries of ``block`` that ``write_refresh`` recomputes (read from the state otherwise)."""

    def factors_kept(self, block: Block) -> tuple[str, ...]:
        """The factors of ``block`` the method reads, kept in the state and averaged in ``write_statistics``
        (all of them by default; a method that maintains a side by other means leaves it out)."""
        return tuple(block.factors)

    @abstractmethod
    def state(self, block: Block) -> dict[str, StateSpec]:
        """State tensors of ``block`` besides the factors of :meth:`factors_kept` (which are always kept)."""

    @abstractmethod
    def write_statistics(self, w: "StepWriter", blocks: list["BlockVars"]) -> None:
        """Update each block's factors from its batch factors (inside ``if update_stats:``).

        Its commits are written right after it (:func:`curvgraph.codegen._write_statistics_commits`),
        if the loss, the gradient matrices and every value checked so far are finite, and the step
        then reads each committed variable from its state entry: a statistic is not held to the end
        of the step, and is kept when the step is skipped for a value computed later. The batch
        factors of :meth:`factors_kept` are checked by the step (a factor that is not finite skips
        it and is reported): check (``w.check``) only the values that finite batch factors and a
        finite state could still make non-finite (a moving average, K-FAC's or K-BFGS's, cannot be).
        """

    @abstractmethod
    def write_refresh(self, w: "StepWriter", blocks: list["BlockVars"]) -> None:
        """Recompute the preconditioners from the factors, every ``invert_every`` steps.

        The lines go into the body of a module-level function that runs eagerly as a custom op, one
        opaque call in a compiled step (:func:`curvgraph.codegen._write_refresh`); it may read the
        step's tensors, ``hyper`` and ``state`` entries. The refresh must commit every
        :meth:`preconditioner` entry ``b.var(key)`` to ``b.state(key)``; its commits are
        written into the state in place inside that function (if its checks and the step's
        checks so far pass), and after the call the step reads the preconditioner entries
        and every other committed variable from the state, in steps with or without a
        refresh; its other locals stay in the function.
        """

    @abstractmethod
    def write_direction(self, w: "StepWriter", blocks: list["BlockVars"]) -> None:
        """Assign every block's ``direction`` from its gradient matrix."""

    @abstractmethod
    def cost(self, block: Block) -> dict[str, sympy.Expr]:
        """``precondition``, ``inversion`` FLOPs and ``state_bytes`` of ``block``."""


def parameter_tuple(w: StepWriter, blocks: list[BlockVars], label: str, matrices: list[str], other: str,
                    shift: bool = False) -> str:
    """Split each block's ``matrices`` entry into parameter-shaped tensors (variables ``<label>_<param>``)
    and return the tuple over every trainable parameter in ``params`` order, ``other`` (formatted with
    the parameter) for parameters in no block; with ``shift``, each piece added to its parameter
    (:func:`shifted_like`).

    Methods use it to call the step's ``model(params, probes)`` at other parameters (an extra
    forward or forward/backward, a trial step), e.g. with ``matrices = [-D for each block]``,
    ``shift=True`` and ``other = "{}"`` (parameters outside every block keep their current value):
    the parameters ``p - D_p``, without a copy of the parameters as block matrices."""
    by_param: dict[str, str] = {}
    for b, matrix in zip(blocks, matrices):
        names = [f"{label}_{p}" for p in b.block.placeholders]
        split = b.kind.write_split(w, b, matrix)
        pieces = w.call(shifted_like if shift else cast_like, split, w.pack(b.block.placeholders))
        w.line(f"{', '.join(names)}, = {pieces}")
        by_param.update(zip(b.block.placeholders, names))
    return w.pack(by_param.get(p, other.format(p)) for p in w.params)


def cast_like(tensors: tuple[Tensor, ...], like: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Each of ``tensors`` in the dtype of the matching tensor of ``like``: parameter-shaped pieces of a block matrix
    (kept in the factor dtype, wider than bf16/fp16 parameters) back in their parameters' dtypes."""
    return tuple(t.to(p.dtype) for t, p in zip(tensors, like))


def shifted_like(steps: tuple[Tensor, ...], params: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """``p + s`` for each parameter ``p`` of ``params`` and its piece ``s`` of ``steps``, summed in the wider of
    their dtypes (the factor dtype for bf16/fp16 parameters) and returned in the parameter's dtype."""
    return tuple((p + s).to(p.dtype) for s, p in zip(steps, params))


def _numeric(value: object) -> bool:
    return value is None or (isinstance(value, numbers.Real) and not isinstance(value, bool))


#: The most elements :func:`write_batched` stacks into one call (256 KiB of float32). A refresh holds a group's
#: stack, its damped copy, Cholesky factor and inverse at once, so larger groups are cut into several calls:
#: with 33 ``129 x 129`` factors of a 32-layer MLP of width 128 stacked whole, its refresh step held 3.2 MiB more
#: than its other steps (a third of its optimizer state), in calls of 15 (a budget of ``2**18``) 2.6 MiB more at
#: the defaults, in calls of 3 (this budget) 0.5 MiB; an LSTM's two ``1024 x 1024`` ``G`` factors stacked added
#: 4 MiB to its adaptive step's peak. On the CPU a batched factorization loops over its matrices (LAPACK), so a
#: stack saves only per-call overhead: Cholesky and inverse of 33 such ``129 x 129`` factors took 7.8-8.2 ms in
#: one call and 7.2-7.9 ms in calls of one or 15, and of eight ``1025 x 1025`` factors 167-193 ms in one call
#: against 144-166 ms one at a time (2 cores).
MAX_STACKED_NUMEL = 2**16


def write_batched(w: "StepWriter", fn: Callable, inputs: list[list[str]], outputs: list[list[str]], what: str,
                  member_numel: int = 1) -> None:
    """Write ``outputs[i] = fn(*inputs[i])`` for every member ``i`` as *one* call over the stacked inputs.

    For factors of one shape (``what`` names them in a comment) a single batched
    factorization (Cholesky, ``eigh``) replaces one per factor. ``fn`` returns one tensor
    or a tuple of ``len(outputs[i])`` tensors with the members along dim 0. With
    ``member_numel`` (the elements of one member's largest input) the members are cut into
    consecutive calls of at most :data:`MAX_STACKED_NUMEL` elements each (at least one member).
    """
    per_call = max(1, MAX_STACKED_NUMEL // member_numel)
    if len(inputs) > per_call:
        for start in range(0, len(inputs), per_call):
            write_batched(w, fn, inputs[start:start + per_call], outputs[start:start + per_call], what)
        return
    arity = len(outputs[0])
    if len(inputs) == 1:
        w.line(f"{', '.join(outputs[0])} = {w.call(fn, *inputs[0])}")
        return
    w.line(f"# {len(inputs)} {what}: one batched call")
    stacked = [f"torch.stack([{', '.join(column)}])" for column in zip(*inputs)]
    results = [f"{outputs[0][k]}_all" for k in range(arity)]
    w.line(f"{', '.join(results)} = {w.call(fn, *stacked)}")
    for k, result in enumerate(results):
        w.line(f"{', '.join(out[k] for out in outputs)} = {result}.unbind(0)")
