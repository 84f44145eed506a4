"""Code generation: Plan x Method -> the Python source of one training step.

The source is a self-contained module that needs torch alone:

* the math helpers the step calls, copied from :mod:`curvgraph.curvature` and
  :mod:`curvgraph.methods` (their docstrings state the math);
* ``forward``: the instrumented FX graph of the model (:mod:`curvgraph.instrument`);
* ``noise_shape(inputs)``: the model output's shape for a batch (MC Fisher noise);
* ``step(...)``: straight-line code over the model's blocks -- forward and backward
  with ``torch.func.vjp``, the Fisher's extra backward, factor statistics, batched
  preconditioner refresh, preconditioning, the parameter update and a non-finite guard
  that leaves every tensor unchanged when the step is not finite.

``step`` takes two static flags, ``update_stats`` and ``refresh``; ``torch.compile``
specializes one graph per combination that the schedule uses.
"""

from __future__ import annotations

import contextlib
import inspect
import keyword
import re
import textwrap
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Iterator

import sympy
import torch
from torch import Tensor
from torch.utils._sympy.printers import PythonPrinter

from ._version import __version__
from .curvature import conv as conv_math
from .curvature import dense as dense_math
from .curvature import kronecker, losses
from .curvature import norm as norm_math
from .curvature.losses import LossSpec
from .errors import CompileError
from .instrument import InstrumentedForward
from .methods import kfac as kfac_module
from .methods import fallback as fallback_module
from .methods.base import BlockVars, Method, StateSpec
from .methods.fallback import FallbackRule
from .plan import Plan, Shape


def all_finite(*tensors: Tensor) -> Tensor:
    """Whether every entry of every tensor is finite (a 0-d bool tensor)."""
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


def commit_(target: Tensor, value: Tensor, ok: Tensor) -> None:
    """Write ``value`` into ``target`` in place if ``ok``, else leave ``target`` unchanged."""
    target.copy_(torch.where(ok, value.to(target.dtype), target))


_HELPER_MODULES: tuple[ModuleType, ...] = (kronecker, dense_math, conv_math, norm_math, losses, kfac_module,
                                           fallback_module)


def _helper_registry() -> dict[str, Callable]:
    registry = {"all_finite": all_finite, "commit_": commit_}
    for module in _HELPER_MODULES:
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if fn.__module__ == module.__name__ and not name.startswith("_"):
                registry[name] = fn
    return registry


class StepWriter:
    """Accumulates the body of ``step``: lines, the helpers they call, commits, finiteness checks."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.depth = 1
        self.helpers: dict[str, Callable] = {}
        self.commits: list[tuple[str | None, str, str]] = []
        self.checks: list[tuple[str | None, str]] = []
        self._when: str | None = None
        self._idents: dict[str, str] = {}

    def line(self, text: str = "") -> None:
        """Append one line at the current indentation."""
        self.lines.append(("    " * self.depth + text) if text else "")

    @contextlib.contextmanager
    def indent(self, header: str, when: str | None = None) -> Iterator[None]:
        """Write ``header`` and indent the lines written inside; ``when`` tags commits made there."""
        self.line(header)
        self.depth += 1
        previous, self._when = self._when, when if when is not None else self._when
        try:
            yield
        finally:
            self.depth -= 1
            self._when = previous

    def call(self, fn: Callable, *args: object) -> str:
        """The expression calling helper ``fn`` with ``args`` (written as Python literals or code)."""
        return f"{self.ref(fn)}({', '.join(a if isinstance(a, str) else _literal(a) for a in args)})"

    def ref(self, fn: Callable) -> str:
        """The name of helper ``fn``, registering it."""
        self.helpers[fn.__name__] = fn
        return fn.__name__

    def hyper(self, name: str) -> str:
        """The expression reading hyper-parameter ``name`` (a 0-d tensor)."""
        return f"hyper[{name!r}]"

    def state(self, key: str) -> str:
        """The expression reading state entry ``key``."""
        return f"state[{key!r}]"

    def commit(self, target: str, value: str, when: str | None = None) -> None:
        """Write ``value`` into ``target`` at the end of the step if the step is finite."""
        self.commits.append((when or self._when, target, value))

    def check(self, value: str, when: str | None = None) -> None:
        """Make the step's ``ok`` require ``value`` to be finite (a tensor expression)."""
        self.checks.append((when or self._when, value))

    def ident(self, name: str) -> str:
        """A Python identifier for ``name``, unique within this step."""
        if name not in self._idents:
            base = re.sub(r"\W", "_", name)
            ident, n = base, 1
            while ident in self._idents.values() or keyword.iskeyword(ident):
                ident, n = f"{base}_{n}", n + 1
            self._idents[name] = ident
        return self._idents[name]


def _literal(value: object) -> str:
    if isinstance(value, torch.dtype):
        return str(value)
    return repr(value)


@dataclass(frozen=True)
class KindCode:
    """How the step handles one block kind: batch factors, parameter matrix, and back.

    ``factors(w, b, acts, grads, dtype)`` writes the lines assigning ``b.batch_factors``
    from the layer-input and output-gradient tuple expressions; ``matrix(w, b, names,
    dtype)`` is the expression of the block matrix of the tensors ``names`` (weight,
    bias or ``None``); ``split(w, b, expr)`` the expression turning a matrix back into
    ``(weight, bias)``.
    """

    factors: Callable[..., None]
    matrix: Callable[..., str]
    split: Callable[..., str]


def _dense_factors(w: "StepWriter", b: BlockVars, acts: str, grads: str, dtype: torch.dtype) -> None:
    reduce = b.block.sharing == "reduce"
    w.line(f"{b.batch_factors['A']} = {w.call(dense_math.dense_input_factor, acts, b.block.bias, reduce, 'batch', dtype)}")
    w.line(f"{b.batch_factors['G']} = {w.call(dense_math.dense_grad_factor, grads, reduce, 'examples', 'scale', dtype)}")


def _conv_factors(w: "StepWriter", b: BlockVars, acts: str, grads: str, dtype: torch.dtype) -> None:
    layout, reduce = b.block.layout, b.block.sharing == "reduce"
    geometry = [layout[k] for k in ("kernel", "stride", "padding", "dilation", "groups")]
    w.line(f"{b.batch_factors['A']} = "
           f"{w.call(conv_math.conv_input_factor, acts, *geometry, b.block.bias, reduce, 'batch', dtype)}")
    w.line(f"{b.batch_factors['G']} = "
           f"{w.call(conv_math.conv_grad_factor, grads, layout['groups'], reduce, 'examples', 'scale', dtype)}")


def _norm_factors(w: "StepWriter", b: BlockVars, acts: str, grads: str, dtype: torch.dtype) -> None:
    call = w.call(norm_math.norm_factor, acts, grads, b.block.dims["channels"], b.block.layout["channels_first"],
                  b.block.bias, "batch", "scale", dtype)
    w.line(f"{b.batch_factors['F']} = {call}")


KIND_CODE: dict[str, KindCode] = {
    "dense": KindCode(
        _dense_factors,
        lambda w, b, names, dtype: w.call(dense_math.dense_gradient_matrix, *names, b.block.weight_transposed, dtype),
        lambda w, b, expr: w.call(dense_math.dense_split, expr, b.block.bias, b.block.weight_transposed),
    ),
    "conv": KindCode(
        _conv_factors,
        lambda w, b, names, dtype: w.call(conv_math.conv_gradient_matrix, *names, b.block.layout["groups"], dtype),
        lambda w, b, expr: w.call(conv_math.conv_split, expr, b.block.bias, b.block.layout["weight_shape"]),
    ),
    "norm": KindCode(
        _norm_factors,
        lambda w, b, names, dtype: w.call(norm_math.norm_gradient_matrix, *names, dtype),
        lambda w, b, expr: w.call(norm_math.norm_split, expr, b.block.bias, b.block.layout["shape"]),
    ),
}


@dataclass
class GeneratedStep:
    """The generated module source and what the optimizer needs to run it."""

    source: str
    state: dict[str, StateSpec] = field(default_factory=dict)
    factor_dtype: torch.dtype = torch.float32


def shape_code(shape: Shape, dims: dict[sympy.Symbol, tuple[int, int]]) -> str:
    """Python code computing ``shape`` from the step's ``inputs`` tuple."""
    printer = PythonPrinter()
    parts = []
    for d in shape:
        if isinstance(d, int):
            parts.append(str(d))
            continue
        expr = sympy.sympify(d)
        missing = expr.free_symbols - set(dims)
        if missing:
            raise CompileError(
                f"curvgraph: a layer size depends on {sorted(map(str, missing))}, which is not an input "
                "dimension; make that size static or derive it from an input's shape."
            )
        names = {s: sympy.Symbol(f"inputs[{i}].shape[{k}]") for s, (i, k) in dims.items()}
        parts.append(printer.doprint(expr.xreplace(names)))
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def generate(plan: Plan, forward: InstrumentedForward, dims: dict[sympy.Symbol, tuple[int, int]],
             method: Method, fallback: FallbackRule, loss: LossSpec, fisher: str,
             param_dtype: torch.dtype) -> GeneratedStep:
    """Write the step module for ``plan`` with ``method`` and return its source."""
    factor_dtype = torch.promote_types(param_dtype, torch.float32)
    w = StepWriter()
    probe_index = forward.probe_index
    blocks = [BlockVars(b, w.ident(b.name)) for b in plan.blocks]
    for b in blocks:
        b.factors = {f: b.var(f) for f in b.block.factor_shapes}
        b.batch_factors = {f: b.var(f"{f}_batch") for f in b.block.factor_shapes}

    state: dict[str, StateSpec] = {}
    for b in blocks:
        for f, shape in b.block.factor_shapes.items():
            state[b.key(f)] = StateSpec(shape)
        state.update({b.key(k): spec for k, spec in method.state(b.block).items()})

    fallback_params = [p for p in forward.params if all(p not in b.block.placeholders for b in blocks)]
    param_names = forward.names
    for p in fallback_params:
        shape, dtype = forward.param_shapes[p]
        state.update({f"{param_names[p]}.{k}": s for k, s in fallback.state_specs(shape, dtype).items()})
    if fallback_params and fallback.name == "adam":
        state["fallback.step"] = StateSpec((), dtype=torch.float32)

    _write_forward_backward(w, forward, dims, loss)
    if blocks:
        _write_gradient_matrices(w, blocks, factor_dtype)
        with w.indent("if update_stats:", when="update_stats"):
            _write_fisher(w, loss, fisher)
            for b in blocks:
                _write_batch_factors(w, b, probe_index, factor_dtype)
            method.write_statistics(w, blocks)
        with w.indent("else:"):
            for b in blocks:
                for f, var in b.factors.items():
                    w.line(f"{var} = {b.state(f)}")
        if any(method.preconditioner(b.block) for b in blocks):
            with w.indent("if refresh:", when="refresh"):
                method.write_refresh(w, blocks)
            with w.indent("else:"):
                for b in blocks:
                    for key in method.preconditioner(b.block):
                        w.line(f"{b.var(key)} = {b.state(key)}")
        w.line()
        w.line("# preconditioned directions")
        method.write_direction(w, blocks)
    if fallback_params:
        w.line()
        w.line(f"# first-order fallback ({fallback.name}) for parameters no pass matched")
        if fallback.name == "adam":
            w.line(f"fallback_step = {w.state('fallback.step')} + 1")
            w.commit(w.state("fallback.step"), "fallback_step")
        for p in fallback_params:
            direction = fallback.write(w, param_names[p], p, f"grad_{p}")
            w.check(direction)
            w.commit(p, f"{p} - {w.hyper('fallback_lr')} * {direction}")
    _write_updates(w, blocks)
    for i, b in enumerate(forward.buffer_updates):
        w.commit(f"buffers[{forward.buffers.index(b)}]", f"new_buffers[{i}]")
    _write_commits(w)

    source = _assemble(plan, forward, dims, method, fallback, loss, fisher, w)
    return GeneratedStep(source=source, state=state, factor_dtype=factor_dtype)


def _write_forward_backward(w: StepWriter, forward: InstrumentedForward, dims, loss: LossSpec) -> None:
    w.line("batch = inputs[0].shape[0]")
    if forward.probes:
        w.line("probes = (")
        for probe in forward.probes:
            w.line(f"    torch.zeros({shape_code(probe.shape, dims)}, dtype={probe.dtype}, device=inputs[0].device),  # {probe.node}")
        w.line(")")
    else:
        w.line("probes = ()")
    w.line()
    with w.indent("def model(params, probes):"):
        w.line("return forward(*params, *frozen, *buffers, *constants, *probes, *inputs)")
    w.line()
    w.line("output, backprop, (new_buffers, acts) = torch.func.vjp(model, params, probes, has_aux=True)")
    w.line(f"d_output, loss = torch.func.grad_and_value({w.ref(loss.loss)})(output, targets)")
    w.line("grads, out_grads = backprop(d_output)")
    if forward.params:
        w.line(f"{_unpack(forward.params)} = params")
        w.line(f"{_unpack('grad_' + p for p in forward.params)} = grads")


def _write_gradient_matrices(w: StepWriter, blocks: list[BlockVars], dtype: torch.dtype) -> None:
    w.line()
    w.line("# block matrices of parameters and gradients (weight decay added)")
    for b in blocks:
        code = KIND_CODE[b.block.kind]
        names = list(b.block.placeholders) + [None] * (2 - len(b.block.placeholders))
        grads = [f"grad_{n}" if n else None for n in names]
        w.line(f"{b.var('P')} = {code.matrix(w, b, names, dtype)}")
        w.line(f"{b.grad} = {code.matrix(w, b, grads, dtype)} + {w.hyper('weight_decay')} * {b.var('P')}")


def _write_fisher(w: StepWriter, loss: LossSpec, fisher: str) -> None:
    w.line(f"# output-space vectors of the {fisher} Fisher, pulled back through the model")
    if fisher == "mc":
        w.line(f"_, samples = backprop({w.call(loss.mc, 'output', 'noise')})")
        w.line(f"scale = 1.0 / {w.call(loss.terms, 'output')}")
        w.line("examples = batch")
    elif fisher == "type2":
        w.line(f"columns = {w.call(loss.type2, 'output')}")
        w.line("_, samples = torch.func.vmap(backprop)(columns)")
        w.line("samples = tuple(s.flatten(0, 1) for s in samples)")
        w.line(f"scale = 1.0 / {w.call(loss.terms, 'output')}")
        w.line("examples = columns.shape[0] * batch")
    else:
        w.line("samples = out_grads")
        w.line(f"scale = float({w.call(loss.empirical_scale, 'output')})")
        w.line("examples = batch")


def _write_batch_factors(w: StepWriter, b: BlockVars, probe_index: dict[str, int], dtype: torch.dtype) -> None:
    indices = [probe_index[u.node] for u in b.block.uses]
    acts = "(" + "".join(f"acts[{i}], " for i in indices) + ")"
    grads = "(" + "".join(f"samples[{i}], " for i in indices) + ")"
    KIND_CODE[b.block.kind].factors(w, b, acts, grads, dtype)


def _write_updates(w: StepWriter, blocks: list[BlockVars]) -> None:
    for b in blocks:
        weight = b.block.placeholders[0]
        bias = b.block.placeholders[1] if b.block.bias else None
        new_w, new_b = b.var("W_new"), b.var("b_new")
        split = KIND_CODE[b.block.kind].split(w, b, f"{b.var('P')} - {w.hyper('lr')} * {b.direction}")
        w.line(f"{new_w}, {new_b} = {split}")
        w.commit(weight, new_w)
        if bias:
            w.commit(bias, new_b)


def _write_commits(w: StepWriter) -> None:
    w.line()
    w.line("# commit: every tensor changes only if the whole step is finite (the checks below imply it)")
    always = list(dict.fromkeys(["loss"] + [v for when, v in w.checks if when is None]))
    w.line(f"ok = {w.call(all_finite, *always)}")
    for flag in ("update_stats", "refresh"):
        values = list(dict.fromkeys(v for when, v in w.checks if when == flag))
        if values:
            with w.indent(f"if {flag}:"):
                w.line(f"ok = ok & {w.call(all_finite, *values)}")
    for flag in (None, "update_stats", "refresh"):
        commits = [(t, v) for when, t, v in w.commits if when == flag]
        if not commits:
            continue
        if flag is None:
            for target, value in commits:
                w.line(f"{w.call(commit_, target, value, 'ok')}")
        else:
            with w.indent(f"if {flag}:"):
                for target, value in commits:
                    w.line(f"{w.call(commit_, target, value, 'ok')}")
    w.line("return loss.detach(), ok")


def _unpack(names) -> str:
    names = list(names)
    return ", ".join(names) + ("," if len(names) == 1 else "")


def _assemble(plan: Plan, forward: InstrumentedForward, dims, method: Method, fallback: FallbackRule,
              loss: LossSpec, fisher: str, w: StepWriter) -> str:
    registry = _helper_registry()
    helpers = _with_dependencies(w.helpers, registry)
    header = [
        f'"""Training step generated by curvgraph {__version__} for {plan.model_name}.',
        "",
        f"method={method.name}, fisher={fisher}, loss={loss.name}, fallback={fallback.name}",
        f"blocks: {', '.join(f'{b.name} ({b.kind} {b.dims})' for b in plan.blocks) or 'none'}",
        f"fallback parameters: {', '.join(plan.fallback_params) or 'none'}",
        "",
        "Runs with torch alone. step(...) returns (loss, ok); ok is False when the step was",
        "not finite and nothing was changed.",
        '"""',
        "",
        "from __future__ import annotations",
        "",
        "import math",
        "",
        "import torch",
        "import torch.nn.functional as F",
        "from torch import Tensor",
    ]
    header += _global_imports(forward.globals, forward.source)
    parts = ["\n".join(header)]
    for fn in helpers:
        parts.append(textwrap.dedent(inspect.getsource(fn)).strip())
    parts.append(forward.source.strip())
    noise_body = f"    return {shape_code(forward.output_shape, dims)}"
    parts.append(f'def noise_shape(inputs):\n    """Shape of the model output for ``inputs``."""\n{noise_body}')
    signature = ("def step(params, frozen, buffers, constants, inputs, targets, state, hyper, noise,\n"
                 "         update_stats: bool, refresh: bool):")
    doc = (
        '    """Forward, backward, curvature statistics, preconditioning and update, in place.\n\n'
        "    params/frozen/buffers/constants: the model's tensors in ``forward``'s order;\n"
        "    inputs/targets: the batch; state: optimizer state by key; hyper: 0-d tensors;\n"
        "    noise: standard uniform/normal noise shaped like the output (MC Fisher) or None.\n"
        '    """'
    )
    parts.append("\n".join([signature, doc] + w.lines))
    return "\n\n\n".join(parts) + "\n"


def _with_dependencies(used: dict[str, Callable], registry: dict[str, Callable]) -> list[Callable]:
    """``used`` plus the registry helpers they call, dependencies first, each once."""
    ordered: dict[str, Callable] = {}

    def names(code) -> set[str]:  # comprehensions and lambdas are nested code objects
        found = set(code.co_names)
        for const in code.co_consts:
            if hasattr(const, "co_names"):
                found |= names(const)
        return found

    def visit(fn: Callable) -> None:
        if fn.__name__ in ordered:
            return
        for name in sorted(names(fn.__code__)):
            if name in registry and name != fn.__name__:
                visit(registry[name])
        ordered[fn.__name__] = fn

    for fn in used.values():
        visit(fn)
    return list(ordered.values())


_KNOWN_GLOBALS = {
    "inf": "from math import inf",
    "nan": "from math import nan",
    "device": "from torch import device",
    "NoneType": "NoneType = type(None)",
}


def _global_imports(globals_: dict[str, object], source: str) -> list[str]:
    lines = []
    for name in sorted(globals_):
        if not re.search(rf"\b{re.escape(name)}\b", source):
            continue
        if name not in _KNOWN_GLOBALS:
            raise CompileError(f"curvgraph: the captured graph refers to {name!r}, which the generated module cannot import.")
        lines.append(_KNOWN_GLOBALS[name])
    return lines


def load(generated: GeneratedStep) -> dict[str, object]:
    """Execute the generated source; returns its namespace (``step``, ``forward``, ...)."""
    namespace: dict[str, object] = {"__name__": "curvgraph_generated_step"}
    code = compile(generated.source, "<curvgraph-generated-step>", "exec")
    exec(code, namespace)  # the source is ours: generated above from the plan
    return namespace
