"""The vocabulary kinds and methods write the step with: :class:`StepWriter`, :class:`BlockVars`, :class:`StateSpec`.

A kind or method never writes Python text for math; it writes *calls* to plain torch
functions (helpers) with :meth:`StepWriter.call`. The writer names every helper in
the generated module: its own name (``damped_inverse``) unless another helper already
took that name, then a name qualified by its module (``my_method__damped_inverse``).
So two methods, or a method and a kind, may each have a helper called ``ema`` and
both land in one module without clashing; :func:`helper_sources` copies each helper,
and the helpers it calls, with their references renamed to match.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import keyword
import re
import textwrap
import tokenize
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import torch

from ..curvature.custom_ops import CustomOp, registered
from ..plan import Block

if TYPE_CHECKING:
    from ..kinds.base import BlockKind


@dataclass(frozen=True)
class StateSpec:
    """One state tensor: its shape, how it starts (``"zeros"``, ``"ones"`` or ``"eye"``:
    identity matrices over the last two dims), its dtype (``None``: the factor
    dtype, float32 or wider) and whether it is ``optional`` in a ``state_dict``: one saved
    before the entry existed loads, and the entry starts again from ``init`` (for
    bookkeeping whose restart moves no parameter, such as a step counter or a statistic
    that is reported)."""

    shape: tuple[int, ...]
    init: str = "zeros"
    dtype: torch.dtype | None = None
    optional: bool = False


@dataclass(frozen=True)
class Degeneration:
    """One way a block, or the step as a whole, can degenerate, reported by the step's ``degenerate`` flags.

    ``message`` says what happened and what the step did instead, for a warning and
    :meth:`curvgraph.CurvatureOptimizer.diagnostics`, e.g. ``"factor A could not be
    inverted ...; kept the previous inverse"``. ``block`` and ``kind`` are ``None`` for a
    condition of the whole step (the adaptive step's rejections in a row).
    """

    block: str | None
    kind: str | None
    message: str

    def describe(self) -> str:
        """``"block '<name>' (<kind>): <message>"``; ``message`` alone for the step as a whole."""
        return self.message if self.block is None else f"block '{self.block}' ({self.kind}): {self.message}"


@dataclass(frozen=True)
class UseVars:
    """Expressions, in the generated step, of one use's layer inputs ``a`` and of the
    backpropagated output vectors ``g`` of its outputs (statistics steps only)."""

    inputs: tuple[str, ...]
    grads: tuple[str, ...]


@dataclass
class BlockVars:
    """Names of a block's tensors in the generated step.

    ``factors`` maps each factor name to the variable holding its current value,
    ``batch_factors`` to the variable holding this batch's estimate (the kind assigns
    it), ``uses`` the layer inputs and the Fisher type's output vectors of each use
    (statistics steps only), ``gradient_uses`` the same with the loss gradients
    w.r.t. the outputs instead (every step), ``grad`` is the
    gradient matrix (weight decay included) and ``direction`` the variable the method
    must assign: the block matrix moves by ``-direction`` (the method applies its own
    step size). ``kind`` is the block's kind (e.g. ``b.kind.write_split(w, b, expr)``
    turns a block-matrix expression into parameter-shaped tensors).
    ``use_indices`` holds, per use, the positions of its layer inputs in the model's
    activations (``acts``) and of its outputs in the probes (whose cotangents are the
    output gradients); :meth:`uses_of` builds a use's :class:`UseVars` from any pass's
    tuples, e.g. those of an extra forward/backward at other parameters.
    """

    block: Block
    id: str
    kind: "BlockKind | None" = None
    factors: dict[str, str] = field(default_factory=dict)
    batch_factors: dict[str, str] = field(default_factory=dict)
    uses: list[UseVars] = field(default_factory=list)
    gradient_uses: list[UseVars] = field(default_factory=list)
    use_indices: list[tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def uses_of(self, acts: str, grads: str) -> list[UseVars]:
        """Each use's layer inputs read from the tuple expression ``acts`` (a pass's activations, ordered like the
        step's ``acts``) and output vectors from ``grads`` (ordered like ``probes``, e.g. a pass's probe cotangents)."""
        return [UseVars(tuple(f"{acts}[{i}]" for i in inputs), tuple(f"{grads}[{j}]" for j in outputs))
                for inputs, outputs in self.use_indices]

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


class StepWriter:
    """Accumulates the body of ``step``: lines, the helpers they call, commits, finiteness checks.

    Locals of the step a kind or method may read (see ``curvgraph.codegen``):
    ``batch`` (examples), ``params`` (trainable tensors), ``probes``,
    ``model(params, probes) -> (output, (new_buffers, acts))`` for an extra forward or
    ``torch.func.vjp``, ``output``, ``targets``, ``loss``, ``hyper[name]`` (0-d tensors)
    and ``state[key]``; in statistics steps also ``samples``, ``examples``, ``scale``.
    :attr:`params` names the trainable tensors (in ``params`` order) and
    :attr:`loss_fn` is the loss helper ``(output, targets) -> loss``; ``switches[i]`` is the
    Python bool of the ``i``-th :meth:`switch`. ``backprop`` (the
    step's ``torch.func.vjp`` of ``model``) may be differentiated again in its output
    vector when :attr:`backward_differentiable` is true (the capture checked that every
    op's backward has a derivative).
    """

    def __init__(self, params: list[str] | None = None, loss_fn: Callable | None = None,
                 backward_differentiable: bool = False) -> None:
        self.params = list(params or [])
        self.loss_fn = loss_fn
        self.backward_differentiable = backward_differentiable
        self.lines: list[str] = []
        self.depth = 1
        self.helpers: dict[Callable, str] = {}
        self.definitions: list[str] = []  # module-level source the step calls (after the helpers, before ``step``)
        self.commits: list[tuple[str | None, str, str]] = []
        self.checks: list[tuple[str | None, str]] = []
        self.flags: list[tuple[str | None, Degeneration, str]] = []
        self.requirements: list[str] = []
        self.switches: list[str] = []
        self._when: str | None = None
        self._idents: dict[str, str] = {}
        self._assigned: list[dict[str, str]] = [{}]  # per open indented block: expression -> variable (assign)

    def line(self, text: str = "") -> None:
        """Append one line at the current indentation."""
        self.lines.append(("    " * self.depth + text) if text else "")

    @contextlib.contextmanager
    def indent(self, header: str, when: str | None = None) -> Iterator[None]:
        """Write ``header`` and indent the lines written inside; ``when`` tags commits made there."""
        self.line(header)
        self.depth += 1
        previous, self._when = self._when, when if when is not None else self._when
        self._assigned.append({})
        try:
            yield
        finally:
            self._assigned.pop()
            self.depth -= 1
            self._when = previous

    def assign(self, target: str, expression: str) -> None:
        """Write ``target = expression``, or ``target = earlier`` where an earlier :meth:`assign` in this indented
        block or one enclosing it assigned the same ``expression`` to ``earlier``.

        For pure expressions (helper calls on the step's tensors) whose operands are not reassigned in between,
        such as a block's factor statistics: two blocks whose statistics read the same rows compute them once.
        An LSTM's or RNN's input and recurrent weights are such a pair: their outputs are summed into the gates,
        so both blocks' ``G`` comes from the same output gradients (:mod:`curvgraph.kinds.rnn`).
        """
        earlier = next((scope[expression] for scope in reversed(self._assigned) if expression in scope), None)
        self.line(f"{target} = {earlier if earlier is not None else expression}")
        if earlier is None:
            self._assigned[-1][expression] = target

    def call(self, fn: Callable, *args: object) -> str:
        """The expression calling helper ``fn`` with ``args`` (strings are code, other values literals)."""
        return f"{self.ref(fn)}({', '.join(a if isinstance(a, str) else _literal(a) for a in args)})"

    def ref(self, fn: Callable) -> str:
        """The name of helper ``fn`` in the generated module, registering it."""
        if fn not in self.helpers:
            taken = set(self.helpers.values())
            name = fn.__name__
            if name in taken:
                name = re.sub(r"\W", "_", fn.__module__.removeprefix("curvgraph.")) + "__" + fn.__name__
            base, n = name, 1
            while name in taken:
                name, n = f"{base}_{n}", n + 1
            self.helpers[fn] = name
        return self.helpers[fn]

    def hyper(self, name: str) -> str:
        """The expression reading hyper-parameter ``name`` (a 0-d tensor)."""
        return f"hyper[{name!r}]"

    def state(self, key: str) -> str:
        """The expression reading state entry ``key``."""
        return f"state[{key!r}]"

    def switch(self, condition: str) -> str:
        """A Python bool for ``if`` statements in the step: ``condition``, an expression over
        ``hyper`` holding the hyper-parameters as Python floats (e.g. ``"hyper['weight_decay'] == 0"``),
        evaluated before each step by the generated ``switches(hyper)``.

        ``torch.compile`` specializes the step on it: each value a run takes compiles its own
        graph once, which holds only the code of that branch. For a choice that changes
        rarely or never in a run; a value that may change every step belongs in ``hyper``.
        """
        if condition not in self.switches:
            self.switches.append(condition)
        return f"switches[{self.switches.index(condition)}]"

    def commit(self, target: str, value: str, when: str | None = None) -> None:
        """Write ``value`` into ``target`` at the end of the step if the step is finite."""
        self.commits.append((when or self._when, target, value))

    def check(self, value: str, when: str | None = None) -> None:
        """Make the step's ``ok`` require ``value`` to be finite (a tensor expression)."""
        self.checks.append((when or self._when, value))

    def require(self, condition: str) -> None:
        """Make the step's ``ok`` require ``condition`` (a 0-d bool tensor expression) to be true."""
        self.requirements.append(condition)

    def flag(self, block: Block | None, message: str, value: str, when: str | None = None) -> None:
        """Report that ``block`` (``None``: the step as a whole) degenerated when ``value`` (a 0-d bool tensor
        expression, evaluated at the end of the step, where ``ok`` holds whether the step is finite) is true.

        The step returns one flag per call (false in steps whose branch did not run);
        the optimizer counts them per block and warns the first time each one is
        raised. ``message`` says what failed and what the step did instead (kept the
        previous inverse, skipped the step, ...).
        """
        owner = (None, None) if block is None else (block.name, block.kind)
        self.flags.append((when or self._when, Degeneration(*owner, message), value))

    def ident(self, name: str) -> str:
        """A Python identifier for ``name``, unique within this step."""
        if name not in self._idents:
            base = re.sub(r"\W", "_", name)
            ident, n = base, 1
            while ident in self._idents.values() or keyword.iskeyword(ident):
                ident, n = f"{base}_{n}", n + 1
            self._idents[name] = ident
        return self._idents[name]

    @staticmethod
    def pack(items: Iterable[str]) -> str:
        """A tuple expression of ``items`` (``(a,)`` for one)."""
        items = list(items)
        return f"({', '.join(items)}{',' if len(items) == 1 else ''})"


def _literal(value: object) -> str:
    if isinstance(value, torch.dtype):
        return str(value)
    return repr(value)


def helper_sources(w: StepWriter) -> list[str]:
    """The source of every helper ``w`` refers to and of the helpers they call, dependencies
    first, each renamed (definition and references) to its name in the generated module."""
    ordered: list[Callable] = []

    def visit(fn: Callable) -> None:
        if fn in ordered:
            return
        for dependency in _dependencies(fn).values():
            w.ref(dependency)
            visit(dependency)
        ordered.append(fn)

    for fn in list(w.helpers):
        visit(fn)
    return [_renamed_source(fn, w.helpers) for fn in ordered]


def _dependencies(fn: Callable) -> dict[str, Callable]:
    """The Python functions and custom ops (outside torch) that ``fn`` calls by a global name: name -> helper.
    A :class:`~curvgraph.curvature.custom_ops.CustomOp` depends on its function and on the function that
    registers it."""
    if isinstance(fn, CustomOp):
        return {fn.function.__name__: fn.function, registered.__name__: registered}

    def names(code) -> set[str]:  # comprehensions and lambdas are nested code objects
        found = set(code.co_names)
        for const in code.co_consts:
            if hasattr(const, "co_names"):
                found |= names(const)
        return found

    found = {}
    for name in sorted(names(fn.__code__)):
        value = fn.__globals__.get(name)
        if isinstance(value, CustomOp) or (inspect.isfunction(value) and value is not fn
                                           and not value.__module__.startswith("torch")):
            found[name] = value
    return found


def _renamed_source(fn: Callable, names: dict[Callable, str]) -> str:
    """``fn``'s source with its own name and the global names of its dependencies replaced by ``names``; for a
    custom op, the line registering it (once per process) from its function's copy."""
    if isinstance(fn, CustomOp):
        return (f"{names[fn]} = {names[registered]}({fn.qualname!r}, {names[fn.function]}, {fn.mutates_args!r})"
                "  # a custom op")
    source = textwrap.dedent(inspect.getsource(fn)).strip() + "\n"
    renames = {name: names[dep] for name, dep in _dependencies(fn).items() if names[dep] != name}
    if names[fn] != fn.__name__:
        renames[fn.__name__] = names[fn]
    if not renames:
        return source.strip()
    lines = source.splitlines(keepends=True)
    previous = None
    edits = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NAME and token.string in renames and previous != ".":
            edits.append((token.start, token.end, renames[token.string]))
        if token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT):
            previous = token.string
    for (row, start), (_, end), new in reversed(edits):
        line = lines[row - 1]
        lines[row - 1] = line[:start] + new + line[end:]
    return "".join(lines).strip()
