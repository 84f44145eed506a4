"""FX front end: capture a model as one functional graph of ATen ops.

``torch.export`` is the front end (plain ``symbolic_trace`` with a tracer that enters
every module fails on ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``,
``nn.BatchNorm2d`` and ``nn.LSTM``: Python control flow on traced values): it goes through every standard module down to ops such
as ``aten.linear`` and ``aten.matmul``, records each node's module path, and lifts
parameters, buffers and constants to graph inputs. The exported training graph is
then functionalized (``run_decompositions({})``), so buffer updates (BatchNorm
running statistics) become graph outputs instead of in-place mutations; this is what
lets ``torch.func`` transform the forward.

Every input dimension is exported as ``Dim.AUTO``: export keeps a dimension symbolic
(the batch size, a sequence length) unless the model pins it, so the shapes of
intermediate nodes are sympy expressions in the input sizes. The code generator
turns those into shape code, the plan into cost expressions. ``trace(..., dynamic_dims=)``
(``curvgraph.compile(..., dynamic="batch")``, :func:`batch_only_dims`) exports only the
given dims that way and fixes the others at the example's sizes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import io
import itertools
import logging
import os
import re
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import sympy
import torch
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.experimental.symbolic_shapes import optimization_hint
from torch.utils._sympy.numbers import int_oo

from . import leaf
from .errors import ConfigError, CurvgraphError, TraceError

_TORCH_DIR = os.path.dirname(torch.__file__)


@dataclass(frozen=True)
class InputSpec:
    """What a user input must look like: ``None`` marks a dimension the graph keeps symbolic."""

    name: str
    shape: tuple[int | None, ...]
    dtype: torch.dtype
    #: ``(dim, lowest, highest)`` for each symbolic dim whose size the captured graph holds for only in a range
    #: narrower than torch.export's default ``[2, oo)`` (``highest`` ``None``: no upper bound): a condition on the
    #: size in ``forward`` (``if x.shape[0] > 4:``) is recorded as such a range, and the graph is its true branch.
    size_ranges: tuple[tuple[int, int, int | None], ...] = ()
    #: Whether the example input was contiguous: the graph may then ``view`` it where ``forward`` reshapes it, so the
    #: step copies a batch of another layout to a contiguous one (:func:`curvgraph.runtime.as_captured`).
    contiguous: bool = True

    @property
    def symbolic_dims(self) -> tuple[int, ...]:
        """The dims the graph keeps symbolic."""
        return tuple(i for i, size in enumerate(self.shape) if size is None)


@dataclass
class TracedModel:
    """A model captured as a functional FX graph, with the maps back to the model.

    The graph's placeholders are, in this order: trainable parameters, frozen
    parameters (``requires_grad=False``), buffers, lifted constants, user inputs.
    Tied parameters (one ``Parameter`` under several names) share one placeholder,
    named after the parameter's first name in ``model.named_parameters()``.
    The graph returns the model output at ``output_index`` and the new value of each
    updated buffer (placeholder name -> output position) in ``buffer_updates``.
    """

    model_name: str
    graph: torch.fx.Graph
    params: dict[str, str]
    frozen: dict[str, str]
    buffers: dict[str, str]
    constants: dict[str, Tensor]
    inputs: list[InputSpec]
    output_index: int
    buffer_updates: dict[str, int]
    dims: dict[sympy.Symbol, tuple[int, int]] = field(default_factory=dict)
    #: Where the batch is: ``(input index, dim)`` of the input whose size the step calls ``batch``.
    batch: tuple[int, int] = (0, 0)
    #: The batch dim of every input (``None``: the input has no batch dim).
    batch_dims: tuple[int | None, ...] = ()
    #: Model names of the parameters in ``frozen`` that require grad but get none: every path from them to the
    #: prediction passes a ``torch.no_grad()`` region of ``forward`` or a ``detach`` (:func:`_without_gradient`).
    gradient_free: tuple[str, ...] = ()
    #: Conditions on the input sizes under which the graph holds (:func:`size_conditions`): ``(expression, guard)``
    #: pairs, the expression over ``sizes`` (each input's shape, in order), the guard as torch.export wrote it.
    size_conditions: tuple[tuple[str, str], ...] = ()

    def returned(self, index: int) -> torch.fx.Node:
        """The node at position ``index`` of the graph's output (valid across rewrites)."""
        return self.graph.output_node().args[0][index]

    @property
    def output(self) -> torch.fx.Node:
        """The node holding the model's prediction."""
        return self.returned(self.output_index)

    @property
    def batch_size(self) -> sympy.Expr:
        """The batch size: ``N``'s symbol, or an integer where the capture fixed it."""
        index, dim = self.batch
        name = self.inputs[index].name
        return symbolic_shape(next(n for n in self.graph.nodes if n.op == "placeholder" and n.name == name))[dim]

    def dim_names(self) -> dict[sympy.Symbol, str]:
        """Readable names of the symbolic sizes: ``N`` for the batch, ``<input>_<dim>`` else."""
        names = {}
        for symbol, (index, dim) in self.dims.items():
            names[symbol] = "N" if (index, dim) == self.batch else f"{self.inputs[index].name}_{dim}"
        return names

    def example_sizes(self, example_inputs: Sequence[Tensor]) -> dict[sympy.Symbol, int]:
        """The value of every symbolic size for the given inputs."""
        return {s: int(example_inputs[i].shape[d]) for s, (i, d) in self.dims.items()}


def resolve_batch_dims(traced: TracedModel, batch_dim: int | Sequence[int | None] | None) -> None:
    """Set ``traced.batch_dims`` and ``traced.batch`` from the ``batch_dim`` option, or infer them.

    ``batch_dim`` is an int (the same dim of every input), a tuple with one entry per
    input (``None``: that input has no batch dim), or ``None``: inferred. The inference
    takes the model output's dim 0 as the batch (curvgraph's losses need batch-first
    outputs); when that size is symbolic in one input size (``N``, or ``N - 1`` for the
    bags of ``nn.EmbeddingBag`` with ``include_last_offset``), each input's batch dim is
    the one with that symbol (e.g. dim 1 of a time-major ``(T, N, F)`` input of an unrolled RNN,
    whose ``T`` is static), and an input without it has none (the flat indices of
    ``nn.EmbeddingBag`` with ``offsets``, a mask shared by the batch). Otherwise every
    input is batch first. Raises
    :class:`ConfigError` for an invalid option or an ambiguous inference.
    """
    if batch_dim is None:
        out = symbolic_shape(traced.output)
        sizes = sympy.sympify(out[0]).free_symbols if out else set()
        symbol = next(iter(sizes)) if len(sizes) == 1 else None
        dims: list[int | None] = []
        for spec, node in zip(traced.inputs, (p for p in traced.graph.nodes if p.op == "placeholder" and p.name in
                                              {s.name for s in traced.inputs})):
            shape = symbolic_shape(node)
            hits = [d for d, e in enumerate(shape) if symbol is not None and e == symbol]
            if 0 in hits:  # batch first, the default, where it fits
                hits = [0]
            if len(hits) > 1:
                raise ConfigError(
                    f"curvgraph: cannot tell which dim of input '{spec.name}' {tuple(shape)} is the batch (dims {hits} have "
                    "the output's batch size); pass batch_dim= to curvgraph.compile (an int, or one per input).")
            dims.append(hits[0] if hits else (0 if len(shape) and symbol is None else None))
    else:
        dims = given_batch_dims([s.name for s in traced.inputs], [len(s.shape) for s in traced.inputs], batch_dim)
    first = next((i for i, d in enumerate(dims) if d is not None), None)
    if first is None:
        raise ConfigError("curvgraph: no input has a batch dim; pass batch_dim= to curvgraph.compile.")
    traced.batch_dims = tuple(dims)
    traced.batch = (first, dims[first])


def check_batch_symbolic(traced: TracedModel) -> None:
    """Raise :class:`ConfigError` if the captured graph fixed an input's batch dim (``traced.batch_dims``).

    For a capture with ``dynamic="batch"`` (:func:`batch_only_dims`): only the dims taken for the batch before
    the capture are exported symbolic, so a batch dim the graph fixed was not among them (a time-major input
    without ``batch_dim``), or the model pins it (an example batch of size 1)."""
    fixed = [(spec, d) for spec, d in zip(traced.inputs, traced.batch_dims) if d is not None and spec.shape[d] is not None]
    if fixed:
        where = ", ".join(f"dim {d} of input '{spec.name}' (size {spec.shape[d]})" for spec, d in fixed)
        raise ConfigError(
            f"curvgraph: dynamic='batch' keeps only the batch dims symbolic, but the captured graph fixed the batch, "
            f"{where}: every batch would have to have that size. Pass batch_dim= to curvgraph.compile if the batch is "
            "elsewhere (e.g. batch_dim=1 for time-major (T, N, F) inputs), capture with a batch of 2 or more "
            "(torch.export fixes a size of 1), or use dynamic='all'.")


def given_batch_dims(names: Sequence[str], ranks: Sequence[int],
                     batch_dim: int | Sequence[int | None]) -> list[int | None]:
    """Each input's batch dim from the ``batch_dim`` option (an int for every input, or one int or ``None`` per
    input; negative counts from the end), as ``0 <= d < rank``, for inputs ``names`` with ``ranks`` dims; raises
    :class:`ConfigError` for an invalid option."""
    n = len(names)
    given = (batch_dim,) * n if isinstance(batch_dim, int) else tuple(batch_dim)
    if len(given) != n or any(d is not None and (not isinstance(d, int) or isinstance(d, bool)) for d in given):
        raise ConfigError(f"curvgraph: batch_dim must be an int or a tuple of {n} ints/None (one per input), got "
                          f"{batch_dim!r}.")
    dims: list[int | None] = []
    for name, rank, d in zip(names, ranks, given):
        if d is not None and not -rank <= d < rank:
            raise ConfigError(f"curvgraph: batch_dim {d} is out of range for input '{name}' with {rank} dims.")
        dims.append(None if d is None else d % rank)
    return dims


def batch_only_dims(inputs: Sequence[Tensor], keys: Sequence[str] | None,
                    batch_dim: int | Sequence[int | None] | None) -> tuple[tuple[int, ...], ...]:
    """The dims :func:`trace` exports symbolic for ``curvgraph.compile(..., dynamic="batch")``: each input's batch dim
    as ``batch_dim`` gives it (:func:`given_batch_dims`), else dim 0 of every input that has dims."""
    if batch_dim is None:
        return tuple((0,) if t.dim() else () for t in inputs)
    names = list(keys) if keys else [f"input {i}" for i in range(len(inputs))]
    dims = given_batch_dims(names, [t.dim() for t in inputs], batch_dim)
    return tuple(() if d is None else (d,) for d in dims)


def flatten_inputs(inputs: Any, what: str,
                   error: type[CurvgraphError] = ConfigError) -> tuple[tuple[Tensor, ...], tuple[str, ...] | None]:
    """A batch as a tuple of tensors, and its keys when it is passed by keyword.

    ``inputs`` is a tensor or a non-empty tuple/list of tensors (the model's positional
    inputs: ``model(*inputs)``), or a non-empty mapping of names to tensors (its keyword
    inputs: ``model(**inputs)``, the Hugging Face convention; a ``BatchEncoding`` works).
    Returns ``(tensors, None)`` for positional inputs and ``(tensors, keys)`` in the
    mapping's order for keyword inputs. Raises ``error`` (naming ``what``) otherwise.
    """
    if isinstance(inputs, Tensor):
        return (inputs,), None
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(t, Tensor) for t in inputs):
        return tuple(inputs), None
    if isinstance(inputs, Mapping) and inputs and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in inputs.items()):
        return tuple(inputs.values()), tuple(inputs)
    if isinstance(inputs, Mapping):
        got = ", ".join(f"{k!r}: {type(v).__name__}" for k, v in inputs.items()) or "nothing"
        raise error(f"curvgraph: {what} by keyword must map names to tensors, got {{{got}}}. Bind other arguments in "
                    "the model (e.g. a wrapper module or functools.partial of its forward).")
    contents = "" if not isinstance(inputs, (tuple, list)) else " of " + (", ".join(type(t).__name__ for t in inputs) or "nothing")
    raise error(
        f"curvgraph: {what} must be a tensor, a non-empty tuple of tensors (positional inputs) or a dict of tensors "
        f"(keyword inputs, model(**batch)), got {type(inputs).__name__}{contents}. E.g. "
        "example_inputs=(torch.randn(32, 40),) or example_inputs={'input_ids': ids, 'attention_mask': mask}."
    )


def describe_inputs(inputs: Sequence[Tensor], keys: Sequence[str] | None = None) -> str:
    """``(8, 30) torch.float32, ...``, or ``input_ids=(8, 16) torch.int64, ...`` for keyword inputs."""
    names = [f"{k}=" for k in keys] if keys else [""] * len(inputs)
    return ", ".join(f"{n}{tuple(t.shape)} {t.dtype}" for n, t in zip(names, inputs))


def symbolic_shape(node: torch.fx.Node) -> tuple[int | sympy.Expr, ...]:
    """The shape of ``node``'s value: ints, or sympy expressions in the input sizes."""
    value = node.meta.get("val")
    if not isinstance(value, Tensor):
        raise TraceError(f"curvgraph: graph node '{node.name}' has no tensor shape recorded.")
    return tuple(size(d) for d in value.shape)


def size(d: int | torch.SymInt) -> int | sympy.Expr:
    """A dimension as an int if export fixed it, else its sympy expression."""
    if isinstance(d, torch.SymInt):
        expr = d.node.expr
        return int(expr) if expr.is_number else expr
    return int(d)


def module_path(node: torch.fx.Node) -> str:
    """The path of the innermost module that produced ``node`` ('' for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.removeprefix("L['self'].").removeprefix("L__self__")


#: Which part of the model's return value is the prediction the loss sees: a key or
#: attribute name (``"logits"``), an index, or a callable applied to the return value.
OutputSelector = str | int | Callable[[Any], Tensor] | None


def select_output(returned: Any, output: Any, model_name: str) -> Tensor:
    """The prediction in ``returned`` (what the model's forward returned), picked by ``output``.

    ``output`` is ``None`` (the model returns the prediction tensor itself), a key of a
    returned mapping or an attribute name (a Hugging Face ``ModelOutput``, a dataclass,
    a named tuple), an int index into a returned tuple/list (or into a mapping's
    values), or a callable ``returned -> Tensor``. Raises :class:`ConfigError` that
    names ``output`` and lists what the model returned when it does not pick a tensor.
    """
    try:
        if output is None:
            picked = returned
        elif callable(output):
            picked = output(returned)
        elif isinstance(output, int) and not isinstance(output, bool):
            picked = (list(returned.values()) if isinstance(returned, Mapping) else returned)[output]
        elif isinstance(output, str):
            picked = returned[output] if isinstance(returned, Mapping) else getattr(returned, output)
        else:
            raise ConfigError(f"curvgraph: output must be a key or attribute name, an int index or a callable, got "
                              f"{output!r}.")
    except (KeyError, AttributeError, IndexError, TypeError) as exc:
        raise ConfigError(f"curvgraph: output={output!r} picks nothing from what {model_name} returned "
                          f"({type(exc).__name__}: {exc}); it returned {describe_value(returned)}.{_output_hint(returned)}"
                          ) from exc
    if not isinstance(picked, Tensor):
        what = (f"{model_name} returned {describe_value(picked)}" if output is None else
                f"output={output!r} picks {describe_value(picked)} from what {model_name} returned, "
                f"{describe_value(returned)}")
        raise ConfigError(f"curvgraph: the loss needs one prediction tensor, but {what}.{_output_hint(returned)}")
    return picked


def _output_hint(returned: Any) -> str:
    """Which ``output=`` would pick a tensor from ``returned``."""
    if isinstance(returned, Mapping) or dataclasses.is_dataclass(returned) or _is_named_tuple(returned):
        names = [n for n, v in _fields(returned) if isinstance(v, Tensor)]
        if names:
            best = "logits" if "logits" in names else names[0]
            return (f" Pick the prediction with curvgraph.compile(..., output={best!r}) (a key/attribute name, an index "
                    "or a callable).")
    if isinstance(returned, (tuple, list)) and any(isinstance(v, Tensor) for v in returned):
        first = next(i for i, v in enumerate(returned) if isinstance(v, Tensor))
        return f" Pick the prediction with curvgraph.compile(..., output={first}) (an index, a key/attribute name or a callable)."
    return " Pass output= to curvgraph.compile: a key/attribute name, an index or a callable that returns the prediction."


def _is_named_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(value, "_fields")


def _fields(value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        return list(value.items())
    if _is_named_tuple(value):
        return list(zip(value._fields, value))
    return [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]


def describe_value(value: Any, depth: int = 0) -> str:
    """A short description of a (possibly nested) return value: types, keys and tensor shapes."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(_hint(d) for d in value.shape)}"
    if depth > 1:
        return type(value).__name__
    if isinstance(value, Mapping) or dataclasses.is_dataclass(value) or _is_named_tuple(value):
        items = ", ".join(f"{n!r}: {describe_value(v, depth + 1)}" for n, v in _fields(value))
        return f"{type(value).__name__} {{{items}}}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} [{', '.join(describe_value(v, depth + 1) for v in value)}]"
    if value is None or isinstance(value, (int, float, str, bool)):
        return f"{type(value).__name__} {value!r}"
    return type(value).__name__


def _hint(d: int | torch.SymInt) -> int | str:
    """A size as the example's int (a symbolic size's hint during export)."""
    if isinstance(d, torch.SymInt):
        hint = d.node.hint
        return int(hint) if hint is not None else str(d)
    return int(d)


@contextlib.contextmanager
def _picking_output(model: nn.Module, output: Any) -> Iterator[None]:
    """Make ``model.forward`` return the prediction :func:`select_output` picks, for the duration of the block."""
    forward = model.forward
    own = "forward" in model.__dict__

    @functools.wraps(forward)
    def picked(*args: Any, **kwargs: Any) -> Tensor:
        return select_output(forward(*args, **kwargs), output, type(model).__name__)

    model.forward = picked
    try:
        yield
    finally:
        if own:
            model.forward = forward
        else:
            del model.forward


#: ``module -> replacement or None``: a module to capture in place of one of the model's submodules.
Substitute = Callable[[nn.Module], "nn.Module | None"]


def trace(model: nn.Module, example_inputs: tuple[Tensor, ...], substitute: Substitute | None = None, *,
          keys: Sequence[str] | None = None, output: OutputSelector = None,
          leaves: Mapping[str, nn.Module] | None = None,
          dynamic_dims: Sequence[Sequence[int]] | None = None) -> TracedModel:
    """Capture ``model`` called on ``example_inputs`` as a :class:`TracedModel`.

    The model is called as ``model(*example_inputs)``, or ``model(**dict(zip(keys,
    example_inputs)))`` when ``keys`` names keyword inputs; the graph's user inputs are
    in that order. ``output`` picks the prediction from what the model returns (see
    :func:`select_output`). The model is exported in the mode each of its modules is in
    (``module.training``): the generated step runs it in that mode (see :func:`modes_of`).
    ``substitute`` (from the block kinds, see
    :meth:`curvgraph.kinds.base.BlockKind.substitute`) may return, for a submodule,
    a module computing the same function on the **same** Parameters (e.g. a recurrent
    module unrolled over time); it is captured in the submodule's place, and the model
    is restored afterwards. ``leaves`` (path -> submodule, see :mod:`curvgraph.leaf`)
    are captured as one opaque call each. ``dynamic_dims`` (one tuple per input) are the dims exported
    symbolic where the model allows, the others fixed at the example's sizes; ``None``: every dim (see
    the module docstring). Raises :class:`TraceError` naming the module
    and source line when the model cannot be captured, and :class:`ConfigError` when
    the model fails on the example inputs or ``output`` picks no tensor.
    """
    keys = tuple(keys) if keys else None
    shells = {id(module): leaf.LeafShell(module, leaf.register(name, module)) for name, module in (leaves or {}).items()}
    inside = {id(m) for module in (leaves or {}).values() for m in module.modules()}

    def replace(module: nn.Module) -> nn.Module | None:
        if id(module) in shells:
            return shells[id(module)]
        return None if id(module) in inside or substitute is None else substitute(module)

    modes = {module: module.training for module in model.modules()}
    try:
        if shells:
            _record_leaf_calls(model, example_inputs, keys, [s.key for s in shells.values()], list(leaves.values()))
        with substituted(model, replace), _picking_output(model, output):
            program = _export(model, example_inputs, keys, dynamic_dims)
    finally:
        for module, training in modes.items():
            module.training = training
    leaf.retarget(program.graph_module.graph)
    _einsum_paths(program.graph_module.graph)
    traced = _from_program(model, program, example_inputs)
    sources = _guard_sources(model, keys, len(example_inputs))
    traced.size_conditions = size_conditions(getattr(program, "_guards_code", ()), sources, traced.inputs)
    return traced


#: A size in a guard of torch.export (Dynamo's source syntax): ``L['x'].size()[2]``, ``L['args'][0].size()[1]``.
_GUARD_SIZE = re.compile(r"(L\['\w+'\](?:\[\d+\])?)\.size\(\)\[(\d+)\]")


def _guard_sources(model: nn.Module, keys: tuple[str, ...] | None, n: int) -> dict[str, int]:
    """Dynamo's source for each of the ``n`` user inputs of ``model.forward`` (``L['x']``, ``L['args'][0]``, by
    keyword ``L['input_ids']``) -> the input's index."""
    if keys:
        return {f"L['{key}']": i for i, key in enumerate(keys)}
    sources: dict[str, int] = {}
    for parameter in inspect.signature(model.forward).parameters.values():
        if parameter.kind == parameter.VAR_POSITIONAL:
            sources.update({f"L['{parameter.name}'][{k}]": len(sources) + k for k in range(n - len(sources))})
            break
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD) and len(sources) < n:
            sources[f"L['{parameter.name}']"] = len(sources)
    return sources


def size_conditions(guards: Sequence[str], sources: Mapping[str, int],
                    inputs: Sequence[InputSpec]) -> tuple[tuple[str, str], ...]:
    """The conditions on the input sizes that torch.export's ``guards`` (Python source over Dynamo's ``L[...]``
    sources; ``sources`` maps those of the user inputs to their index) state on the ``inputs``' symbolic sizes, as
    ``(expression, guard)``: the expression over ``sizes[i][d]`` (size ``d`` of input ``i``).

    A branch of ``forward`` on sizes that export keeps symbolic (``if min(h, w) <= window:``) is such a guard: the
    captured graph is the branch taken, valid only where the guard holds, which ``torch.export``'s own module
    checks before it runs but the graph does not. Kept: guards whose every term is a size of a user input, with
    arithmetic, comparisons, ``min`` and ``max``, on at least one symbolic size (a guard that is also a range of
    one size, :attr:`InputSpec.size_ranges`, is kept too: it holds wherever the range does); left out: the rest
    (a guard on a fixed size holds for every batch the step takes)."""
    conditions = []
    for guard in guards:
        used: set[tuple[int, int]] = set()

        def indexed(match: re.Match) -> str:
            i, d = sources.get(match.group(1)), int(match.group(2))
            if i is None:
                return match.group(0)
            used.add((i, d))
            return f"sizes[{i}][{d}]"

        expression = _GUARD_SIZE.sub(indexed, guard)
        try:
            names = set(compile(expression, "<size condition>", "eval").co_names)
        except SyntaxError:
            continue
        if names <= {"sizes", "min", "max"} and "sizes" in names and any(
                d < len(inputs[i].shape) and inputs[i].shape[d] is None for i, d in used):
            conditions.append((expression, re.sub(r"L\['(\w+)'\]", r"\1", guard)))
    return tuple(conditions)


def modes_of(model: nn.Module) -> tuple[bool, ...]:
    """``training`` of every module of ``model``, in ``model.modules()`` order: what the captured graph depends on.

    Dropout, BatchNorm and any module that branches on ``self.training`` are captured
    in the mode they are in, so a step runs the graph captured in these modes
    (:meth:`curvgraph.CurvatureOptimizer.step` captures the model again in modes it has not
    seen). Modes that do not change the graph give the same generated step, compiled once.
    """
    return tuple(module.training for module in model.modules())


def describe_modes(model: nn.Module) -> str:
    """``"train mode"``, ``"eval mode"``, or which modules are in which mode when they differ (for messages)."""
    modes = {name: module.training for name, module in model.named_modules()}
    if len(set(modes.values())) == 1:
        return "train mode" if model.training else "eval mode"
    odd = [name or "<model>" for name, training in modes.items() if training != model.training]
    listed = ", ".join(f"'{name}'" for name in odd[:3]) + (f" and {len(odd) - 3} more" if len(odd) > 3 else "")
    return f"{'train' if model.training else 'eval'} mode, {listed} in {'eval' if model.training else 'train'} mode"


def _record_leaf_calls(model: nn.Module, inputs: tuple[Tensor, ...], keys: tuple[str, ...] | None,
                       leaf_keys: Sequence[str], modules: Sequence[nn.Module]) -> None:
    """Call ``model`` once eagerly to record its leaf modules' shapes; buffers and the RNG are restored."""
    hooks = [m.register_forward_hook(leaf.recording_hook(key), with_kwargs=True) for key, m in zip(leaf_keys, modules)]
    buffers = [(b, b.clone()) for b in model.buffers()]
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            arguments = _arguments(inputs, keys, dynamic=False)
            model(*arguments["args"], **arguments.get("kwargs", {}))
    except CurvgraphError:
        raise
    except Exception as exc:  # translated, never swallowed
        raise _translate_export_error(model, inputs, keys, exc) from exc
    finally:
        for hook in hooks:
            hook.remove()
        for buffer, saved in buffers:
            buffer.copy_(saved)


@contextlib.contextmanager
def substituted(model: nn.Module, substitute: Substitute | None) -> Iterator[None]:
    """Swap every submodule ``m`` with ``substitute(m)`` (when not ``None``) for the duration of the block."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    replacements: dict[int, nn.Module | None] = {}
    if substitute is not None:
        for parent in list(model.modules()):
            for name, child in list(parent._modules.items()):
                if child is None:
                    continue
                if id(child) not in replacements:
                    replacements[id(child)] = substitute(child)
                if replacements[id(child)] is not None:
                    swapped.append((parent, name, child))
    try:
        for parent, name, child in swapped:
            parent._modules[name] = replacements[id(child)]
        yield
    finally:
        for parent, name, child in swapped:
            parent._modules[name] = child


@contextlib.contextmanager
def _function_apply(apply: Callable[..., Any]) -> Iterator[None]:
    """``torch.autograd.Function.apply`` is ``apply(original, cls, *args, **kwargs)`` in the block (``original``:
    the unbound ``Function.apply``)."""
    function = torch.autograd.Function
    original = function.__dict__["apply"]
    function.apply = classmethod(lambda cls, *args, **kwargs: apply(original.__func__, cls, *args, **kwargs))
    try:
        yield
    finally:
        function.apply = original


def _recording_autograd_functions(applied: list[type]) -> contextlib.AbstractContextManager[None]:
    """Append to ``applied`` each ``torch.autograd.Function`` subclass whose ``apply`` is called in the block.

    ``torch.export`` captures what such a function's ``forward`` computes and drops its ``backward``; the step
    differentiates the captured ops (see :func:`_warn_autograd_functions`)."""

    def record(original: Callable[..., Any], cls: type, *args: Any, **kwargs: Any) -> Any:
        applied.append(cls)
        return original(cls, *args, **kwargs)

    return _function_apply(record)


def autograd_functions_inlined() -> contextlib.AbstractContextManager[None]:
    """In the block, each ``torch.autograd.Function`` runs its ``forward`` as plain ops, as the captured graph
    holds it: an eager check of the model as captured (``torch.func`` rejects a function without
    ``setup_context``, which the captured graph no longer contains)."""

    def inline(original: Callable[..., Any], cls: type, *args: Any, **kwargs: Any) -> Any:
        if torch.autograd.function._is_setup_context_defined(cls.setup_context):
            return cls.forward(*args, **kwargs)
        return cls.forward(torch.autograd.function.FunctionCtx(), *args, **kwargs)

    return _function_apply(inline)


def _warn_autograd_functions(model: nn.Module, applied: list[type]) -> None:
    """A warning naming the ``torch.autograd.Function`` classes ``model``'s forward called, if any."""
    names = sorted({f"{cls.__module__}.{cls.__qualname__}" for cls in applied})
    if names:
        warnings.warn(
            f"curvgraph: {type(model).__name__}'s forward calls torch.autograd.Function {', '.join(names)}. "
            "torch.export captures what its forward computes, and the step differentiates those ops, not its own "
            "backward. Where the backward is not the derivative of the forward (a straight-through estimator, "
            "gradient reversal or clipping), the step's gradients differ from eager PyTorch's: keep the module "
            "that calls it opaque with curvgraph.compile(..., leaf_modules=[...]) (the function's forward and "
            "setup_context written as separate staticmethods, as torch.func requires).", UserWarning, stacklevel=2)


def _export(model: nn.Module, example_inputs: tuple[Tensor, ...], keys: tuple[str, ...] | None,
            dims: Sequence[Sequence[int]] | None) -> ExportedProgram:
    inputs = tuple(t.detach() for t in example_inputs)
    applied: list[type] = []
    try:
        with _quiet_export(), _without_einsum_path_search():
            with _recording_autograd_functions(applied):
                program = torch.export.export(model, **_arguments(inputs, keys, dynamic=True, dims=dims))
            _detach_no_grad_regions(program)
            program = program.run_decompositions(DECOMPOSITIONS)
        _warn_autograd_functions(model, applied)
        return program
    except CurvgraphError:  # ours, raised from the model's call (e.g. the output selection): already worded
        raise
    except Exception as exc:  # translated below, never swallowed
        failure = exc
    raise _translate_export_error(model, example_inputs, keys, _with_static_sizes(model, inputs, keys, failure)) from failure


def _instance_norm(input: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                   running_var: Tensor | None, use_input_stats: bool, momentum: float, eps: float,
                   cudnn_enabled: bool) -> Tensor:
    r"""``aten.instance_norm`` as ops whose effects the captured graph shows.

    The op itself updates ``running_mean``/``running_var`` in place inside one opaque call, so
    functionalization does not see the update and every pass of the model in one step (the
    adaptive step's trial forward, its curvature products) would update them again. Written out:

    * with batch statistics (training, or no running statistics): ``group_norm`` with one group
      per channel, which normalizes each ``(n, c)`` slice over its spatial elements exactly as
      instance norm does, and which the norm pass matches; the running statistics, where tracked,
      become :math:`r \leftarrow (1 - m)\, r + m \operatorname{mean}_n s_{nc}` for the slices'
      means and unbiased variances :math:`s_{nc}` (what the op computes through ``batch_norm`` on
      the ``(1, N C, ...)`` view), as in-place updates that functionalization turns into outputs;
    * with running statistics (eval mode): ``batch_norm`` without training, as the op computes it.
    """
    if not use_input_stats:
        return torch.ops.aten._native_batch_norm_legit_no_training.default(
            input, weight, bias, running_mean, running_var, momentum, eps)[0]
    if running_mean is not None and running_var is not None:
        var, mean = torch.var_mean(input.detach(), list(range(2, input.dim())), correction=1)
        running_mean.mul_(1 - momentum).add_(momentum * mean.mean(0))
        running_var.mul_(1 - momentum).add_(momentum * var.mean(0))
    return torch.ops.aten.group_norm.default(input, input.shape[1], weight, bias, eps, cudnn_enabled)


#: What the captured graph is decomposed with beyond functionalization: ops whose own kernels hide an effect.
DECOMPOSITIONS = {torch.ops.aten.instance_norm.default: _instance_norm}


def _detach_no_grad_regions(program: ExportedProgram) -> int:
    """Detach every value a ``torch.no_grad()`` region of the model's ``forward`` returns; returns how many.

    ``torch.export`` records such a region as ``wrap_with_set_grad_enabled(False, region, *args)``, and
    ``run_decompositions`` inlines it as ordinary ops: the step, which differentiates the captured graph,
    would then pass gradients through it and train parameters that eager PyTorch gives no gradient
    (a target network, a gate evaluated without grad). A ``detach`` on each value the region returns keeps
    eager's semantics: no gradient flows through the region. A value the model returns as its output is
    left as it is (nothing differentiates it)."""
    graph = program.graph_module.graph
    count = 0
    for node in list(graph.find_nodes(op="call_function", target=torch.ops.higher_order.wrap_with_set_grad_enabled)):
        if node.args[0] is not False:
            continue
        for user in list(node.users):
            readers = [r for r in user.users if r.op != "output"]
            if not readers:
                continue
            with graph.inserting_after(user):
                detached = graph.call_function(torch.ops.aten.detach.default, (user,))
            detached.meta.update(user.meta)
            for reader in readers:
                reader.replace_input_with(user, detached)
            count += 1
    if count:
        program.graph_module.recompile()
    return count


@contextlib.contextmanager
def _without_einsum_path_search() -> Iterator[None]:
    """``torch.backends.opt_einsum.enabled = False`` while the model is captured (see :func:`_einsum_paths`).

    Set and restored directly: ``torch.backends.opt_einsum.flags`` fails on exit where the user
    had disabled it already (it restores a strategy along with ``enabled=False``)."""
    enabled = torch.backends.opt_einsum.enabled
    torch.backends.opt_einsum.enabled = False
    try:
        yield
    finally:
        torch.backends.opt_einsum.enabled = enabled


def _einsum_paths(graph: torch.fx.Graph) -> None:
    """Give each einsum of three or more operands the contraction order ``torch.einsum`` picks at the example sizes.

    The model is captured with ``torch.backends.opt_einsum`` off: its path search reads the
    operands' sizes as integers, which pins the batch size of the captured graph (a batch of
    another size would be rejected). Here the path is chosen as ``torch.einsum`` chooses it
    eagerly (``opt_einsum.contract_path`` with ``torch.backends.opt_einsum.strategy``), from the
    example inputs' sizes, and kept for every size. Without ``opt_einsum`` installed, or with
    ``torch.backends.opt_einsum.enabled = False``, an einsum contracts left to right, as in eager.
    """
    if not (torch.backends.opt_einsum.enabled and torch.backends.opt_einsum.is_available()):
        return
    contract_path = torch.backends.opt_einsum.get_opt_einsum().contract_path
    for node in graph.find_nodes(op="call_function", target=torch.ops.aten.einsum.default):
        equation, operands = node.args[:2]
        if len(operands) > 2 and node.kwargs.get("path") is None:
            shapes = [tuple(optimization_hint(size) for size in operand.meta["val"].shape) for operand in operands]
            pairs = contract_path(equation, *shapes, shapes=True, optimize=torch.backends.opt_einsum.strategy)[0]
            node.kwargs = {**node.kwargs, "path": list(itertools.chain.from_iterable(pairs))}


def _arguments(inputs: tuple[Tensor, ...], keys: tuple[str, ...] | None, dynamic: bool,
               dims: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
    """The ``args``/``kwargs`` (and, if ``dynamic``, ``dynamic_shapes``: ``Dim.AUTO`` for the ``dims`` of each input,
    every dim if ``None``) of ``torch.export.export``."""
    dims = [range(t.dim()) for t in inputs] if dims is None else dims
    shapes = tuple({d: Dim.AUTO for d in ds} for ds in dims)
    if keys is None:
        arguments: dict[str, Any] = {"args": inputs}
    else:
        arguments, shapes = {"args": (), "kwargs": dict(zip(keys, inputs))}, dict(zip(keys, shapes))
    return {**arguments, "dynamic_shapes": shapes} if dynamic else arguments


def _with_static_sizes(model: nn.Module, inputs: tuple[Tensor, ...], keys: tuple[str, ...] | None,
                       exc: Exception) -> Exception:
    """The same failure with concrete sizes in its message (a static export), if it fails the same way.

    The inputs are cloned: export remembers the symbolic sizes it gave a tensor object.
    """
    try:
        with _quiet_export():
            torch.export.export(model, **_arguments(tuple(t.clone() for t in inputs), keys, dynamic=False))
    except Exception as static_exc:  # only used to word the error
        if type(static_exc) is type(exc):
            return static_exc
    return exc


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence what export prints on failure (partial graphs, guard logs); we re-raise."""
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("torch")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


_UNTRACEABLE = ("data-dependent", "Dynamic control flow", "Unsupported", "GuardOnDataDependent")


def _translate_export_error(model: nn.Module, example_inputs: tuple[Tensor, ...], keys: tuple[str, ...] | None,
                            exc: Exception) -> Exception:
    module_name, where = _locate(model, exc)
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    names = type(exc).__name__ + " " + " ".join(c.__name__ for c in type(exc).__mro__)
    if module_name is not None:
        kind = type(model if module_name == "<root>" else model.get_submodule(module_name)).__name__
        location = f"module '{module_name}' ({kind})"
    else:
        location = f"model {type(model).__name__}"
    if where:
        location += f" at {where}"
    leaf_hint = ("" if module_name in (None, "<root>") else
                 f" Or keep the module opaque: curvgraph.compile(..., leaf_modules=['{module_name}']) "
                 "runs it eagerly inside the step and trains its parameters with the "
                 "first-order fallback.")
    if _raised_in_numpy(exc):
        return TraceError(
            f"curvgraph could not capture {type(model).__name__} as one graph: {location}: "
            f"{type(exc).__name__} in numpy: {reason}\n"
            "The forward computes with numpy on sizes or values that torch.export keeps symbolic (the batch size, "
            "the sequence length), which numpy holds as Python objects. Compute it with torch ops, or switch it "
            "off for training if the model allows (e.g. a Hugging Face model's SpecAugment masking, "
            "mask_time_prob=0)." + leaf_hint
        )
    if any(key in names or key in str(exc)[:2000] for key in _UNTRACEABLE):
        return TraceError(
            f"curvgraph could not capture {type(model).__name__} as one graph: {location}: {reason}\n"
            "Python control flow that depends on tensor values (or a call torch.export does not support) cannot be "
            "traced. Rewrite it with tensor ops (torch.where, masking) or torch.cond, or move it out of forward()."
            + leaf_hint
        )
    return ConfigError(
        f"curvgraph: {type(model).__name__} failed on the inputs it was captured from (compile's example_inputs, or "
        f"the first batch given to step) [{describe_inputs(example_inputs, keys)}] in {location}: {type(exc).__name__}: {reason}\n"
        "Check that they are the model's inputs (positional: a tuple; keyword: a dict) with the shapes and "
        "dtypes it expects (a batch of real data works)."
    )


def _raised_in_numpy(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by numpy's own code (its traceback's innermost frame is in the numpy package)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and f"{os.sep}numpy{os.sep}" in frames[-1].filename


def _locate(model: nn.Module, exc: BaseException) -> tuple[str | None, str]:
    """The innermost model module on ``exc``'s traceback, and the innermost line of user
    code (not torch, not curvgraph) at or above that module's frame."""
    module_names = {id(m): (n or "<root>") for n, m in model.named_modules()}
    module_name, where, candidate = None, "", ""
    tb = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if not filename.startswith((_TORCH_DIR, os.path.dirname(__file__), "<")):
            summary = traceback.extract_tb(tb, limit=1)[0]
            candidate = f"{summary.filename}:{summary.lineno}: {(summary.line or '').strip()}"
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in module_names:
            module_name, where = module_names[id(owner)], candidate
        tb = tb.tb_next
    return module_name, where


def _from_program(model: nn.Module, program: ExportedProgram, example_inputs: tuple[Tensor, ...]) -> TracedModel:
    graph = program.graph_module.graph
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    param_names = _first_names(model.named_parameters(remove_duplicate=False))
    buffer_names = _first_names(model.named_buffers(remove_duplicate=False))

    params: dict[str, str] = {}
    frozen: dict[str, str] = {}
    buffers: dict[str, str] = {}
    constants: dict[str, Tensor] = {}
    inputs: list[InputSpec] = []
    kept: dict[int, torch.fx.Node] = {}
    for spec in program.graph_signature.input_specs:
        node = placeholders[spec.arg.name]
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            tensor = model.get_parameter(spec.target) if spec.kind == InputKind.PARAMETER else model.get_buffer(spec.target)
            if id(tensor) in kept:  # a tied parameter: one placeholder for all its names
                node.replace_all_uses_with(kept[id(tensor)])
                graph.erase_node(node)
                continue
            kept[id(tensor)] = node
            if spec.kind == InputKind.BUFFER:
                buffers[node.name] = buffer_names[id(tensor)]
            elif tensor.requires_grad:
                params[node.name] = param_names[id(tensor)]
            else:
                frozen[node.name] = param_names[id(tensor)]
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            constants[node.name] = program.constants[spec.target]
        elif spec.kind == InputKind.USER_INPUT:
            value = node.meta["val"]
            shape = tuple(d if isinstance(d, int) else None for d in map(size, value.shape))
            example = example_inputs[len(inputs)]
            inputs.append(InputSpec(node.name, shape, value.dtype, _recorded_ranges(program, value),
                                    example.is_contiguous()))
        else:
            raise TraceError(
                f"curvgraph: {type(model).__name__} has a graph input of kind {spec.kind.name} "
                f"('{spec.arg.name}'), which curvgraph does not support yet."
            )

    outputs = list(graph.output_node().args[0])
    buffer_updates: dict[str, int] = {}
    user_outputs = []
    output_index = -1
    by_target = {v: k for k, v in program.graph_signature.inputs_to_buffers.items()}
    for position, (spec, node) in enumerate(zip(program.graph_signature.output_specs, outputs)):
        if spec.kind == OutputKind.BUFFER_MUTATION:
            placeholder = by_target[spec.target]
            if placeholder not in buffers:  # a tied buffer, merged above
                placeholder = next(p for p, n in buffers.items() if n == buffer_names[id(model.get_buffer(spec.target))])
            buffer_updates[placeholder] = position
        elif spec.kind == OutputKind.USER_OUTPUT:
            user_outputs.append(node)
            output_index = position
        elif spec.kind == OutputKind.PARAMETER_MUTATION:
            owner = spec.target.rpartition(".")[0]
            raise TraceError(
                f"curvgraph: {type(model).__name__}'s forward writes into its parameter '{spec.target}' in place "
                f"(node '{node}'; e.g. nn.Embedding(max_norm=...) renormalizes the rows it looks up), and the step "
                "owns the parameters. Remove the in-place write (for max_norm: renormalize outside forward), or pass "
                f"leaf_modules=[{owner!r}] to run that module as one opaque call (its parameters then take the "
                "first-order fallback)."
            )
        else:
            raise TraceError(
                f"curvgraph: {type(model).__name__} produces a graph output of kind {spec.kind.name} "
                f"('{node}'); curvgraph supports models that return one tensor and update buffers only."
            )
    if len(user_outputs) != 1 or not isinstance(user_outputs[0].meta.get("val"), Tensor):  # select_output returns one
        raise TraceError(f"curvgraph: the captured graph of {type(model).__name__} has {len(user_outputs)} outputs "
                         "instead of the one prediction tensor; please report this model.")
    if not user_outputs[0].meta["val"].is_floating_point():
        raise ConfigError(f"curvgraph: the prediction of {type(model).__name__} is a {user_outputs[0].meta['val'].dtype} "
                          "tensor; the loss needs float predictions (pick another with output=).")

    gradient_free = _without_gradient(user_outputs[0], {p: placeholders[p] for p in params})
    for placeholder in gradient_free:
        frozen[placeholder] = params.pop(placeholder)

    dims: dict[sympy.Symbol, tuple[int, int]] = {}
    for index, spec in enumerate(inputs):
        for d, expr in enumerate(map(size, placeholders[spec.name].meta["val"].shape)):
            if isinstance(expr, sympy.Symbol):
                dims.setdefault(expr, (index, d))

    traced = TracedModel(
        model_name=type(model).__name__,
        graph=graph,
        params=params,
        frozen=frozen,
        buffers=buffers,
        constants=constants,
        inputs=inputs,
        output_index=output_index,
        buffer_updates=buffer_updates,
        dims=dims,
        gradient_free=tuple(frozen[p] for p in gradient_free),
    )
    _check_no_attributes(traced)
    return traced


def _without_gradient(prediction: torch.fx.Node, params: dict[str, torch.fx.Node]) -> list[str]:
    """The names of the placeholders ``params`` (name -> node) that some node reads but from which no path reaches
    ``prediction`` other than through a ``detach`` (:func:`_detach_no_grad_regions` puts one after each
    ``torch.no_grad()`` region): eager PyTorch gives them no gradient, and a step must not move them (a weight
    decay would)."""
    reached, pending = set(), [prediction]
    while pending:
        node = pending.pop()
        if node in reached:
            continue
        reached.add(node)
        if node.target is not torch.ops.aten.detach.default:
            pending.extend(node.all_input_nodes)
    return [name for name, node in params.items() if node.users and node not in reached]


def _recorded_ranges(program: ExportedProgram, value: Tensor) -> tuple[tuple[int, int, int | None], ...]:
    """:attr:`InputSpec.size_ranges` of an input whose example value (a fake tensor of the program) is ``value``."""
    ranges = []
    for d, expr in enumerate(map(size, value.shape)):
        if not isinstance(expr, sympy.Symbol) or expr not in program.range_constraints:
            continue
        recorded = program.range_constraints[expr]
        lowest, highest = int(recorded.lower), None if recorded.upper == int_oo else int(recorded.upper)
        if lowest > 2 or highest is not None:
            ranges.append((d, lowest, highest))
    return tuple(ranges)


def _first_names(named: Iterator[tuple[str, Tensor]]) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, tensor in named:
        names.setdefault(id(tensor), name)
    return names


def _check_no_attributes(traced: TracedModel) -> None:
    for node in traced.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            raise TraceError(
                f"curvgraph: the captured graph of {traced.model_name} keeps a submodule or attribute "
                f"('{node.target}', from module '{module_path(node)}'), e.g. a higher-order op such as "
                "torch.cond; curvgraph needs a flat graph of ops. Express the computation without it."
            )
