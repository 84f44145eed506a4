"""Code generation: Plan x Method -> the Python source of one training step.

The source is a self-contained module that needs torch alone:

* the math helpers the step calls, copied from the block kinds, the method, the
  fallback rule and :mod:`curvgraph.curvature` (their docstrings state the math;
  names are qualified only where two helpers share one, see :mod:`.writer`);
* ``forward``: the instrumented FX graph of the model (:mod:`curvgraph.instrument`);
* ``noise_shape(inputs)``: the model output's shape for a batch (MC Fisher noise);
* ``switches(hyper)``: the step's ``switches`` for the hyper-parameters as Python floats
  (:meth:`~curvgraph.codegen.writer.StepWriter.switch`);
* ``step(...)``: straight-line code over the model's blocks -- forward and backward
  with ``torch.func.vjp``, the Fisher's extra backward, factor statistics, batched
  preconditioner refresh, preconditioning, the parameter update and a non-finite guard
  that leaves every tensor unchanged when the step is not finite. It returns
  ``(loss, ok, degenerate)``: ``degenerate`` holds one bool per
  :class:`~curvgraph.codegen.writer.Degeneration` (:attr:`GeneratedStep.degenerations`),
  true when that block degenerated in this step (a factor of the batch that is not
  finite, a factor its method could not invert or decompose).

``step`` takes three flags: ``update_stats``, a Python bool on which ``torch.compile``
specializes (one graph with statistics, one without, as the schedule uses them),
``refresh``, whether the preconditioner refresh runs (an eager custom op, one call in the
graph, see :func:`_write_refresh`): a 0-d bool tensor when compiled, a Python bool eager, and
``switches``, a tuple of Python bools (specialized on like ``update_stats``).
"""

from __future__ import annotations

import ast
import hashlib
import re
import symtable
import textwrap
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

import sympy
import torch
from torch import Tensor
from torch.utils._sympy.printers import PythonPrinter

from .._version import __version__
from ..curvature.custom_ops import registered
from ..curvature.losses import LossSpec
from ..errors import CompileError
from ..instrument import InstrumentedForward
from ..leaf import leaf_call
from ..plan import Plan, Shape
from .writer import BlockVars, Degeneration, StateSpec, StepWriter, helper_sources


def all_finite(*tensors: Tensor) -> Tensor:
    """Whether every entry of every tensor is finite (a 0-d bool tensor): ``isfinite(t).all()`` per tensor, joined by
    ``&``. Not ``torch.stack`` of the per-tensor results and its ``all()``, which compiles to more: this form, with
    K-FAC's moving averages no longer checked, took the ResNet-style CNN's cold first period from 69.8 to 67.0-67.5 s.
    Nor a sum of ``t - t`` (exactly 0 or NaN; 65.5-66.0 s, but the LSTM's steps took 2-3% longer, and it relies on
    Inductor not folding ``t - t`` as it folds ``t * 0``)."""
    ok = torch.isfinite(tensors[0]).all()
    for t in tensors[1:]:
        ok = ok & torch.isfinite(t).all()
    return ok


def not_finite(tensor: Tensor) -> Tensor:
    """Whether some entry of ``tensor`` is not finite (a 0-d bool tensor; :func:`all_finite`'s negation)."""
    return ~all_finite(tensor)


def commit_(target: Tensor, value: Tensor, ok: Tensor) -> None:
    """Write ``value`` into ``target`` in place if ``ok``, else leave ``target`` unchanged (a selection
    against the old value; see :func:`commit_all_` for several targets outside a ``torch.cond`` branch)."""
    target.copy_(torch.where(ok, value.to(target.dtype), target))


def commit_all_(commits: tuple[tuple[Tensor, Tensor], ...], ok: Tensor) -> None:
    """Write each ``value`` of ``commits`` (``(target, value)`` pairs) into its ``target`` in place if
    ``ok`` (a 0-d bool tensor), else none of them.

    Compiled, one ``torch.cond`` whose taken branch copies: with :func:`commit_` per target, a
    compiled step holds a buffer the size of each target for its selection before copying it
    (Inductor does not select into the target in place), all of them at once when several
    targets are committed together. Eager (the refresh, and the eager step), one read of ``ok``
    on the host and a copy per target if it holds (the same values; an eager ``torch.cond`` would
    compile its branches with Dynamo on every call, and a selection per target made a new tensor)."""
    if not torch.compiler.is_compiling():
        if ok:
            for target, value in commits:
                target.copy_(value)
        return

    def write() -> Tensor:
        for target, value in commits:
            target.copy_(value.to(target.dtype))
        return ok.clone()

    def keep() -> Tensor:
        return ok.clone()

    with torch.no_grad():  # a branch may write its inputs only with gradients off
        torch.cond(ok, write, keep, ())


@dataclass
class GeneratedStep:
    """The generated module source and what the optimizer needs to run it.

    ``degenerations[i]`` is what the step's ``degenerate[i]`` flag reports; ``transposes_backward``
    whether the step differentiates the model's backward pass (the adaptive step's curvature
    products, :func:`curvgraph.methods.quadratic.output_jvps`).
    """

    source: str
    state: dict[str, StateSpec] = field(default_factory=dict)
    factor_dtype: torch.dtype = torch.float32
    degenerations: list[Degeneration] = field(default_factory=list)
    transposes_backward: bool = False


#: The generated ``step``'s arguments, in order.
STEP_ARGUMENTS = ("params", "frozen", "buffers", "constants", "inputs", "targets", "state", "hyper", "noise",
                  "update_stats", "refresh", "switches")


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
             kinds: Mapping[str, "BlockKind"], method: "Method", fallback: "FallbackRule", loss: LossSpec, fisher: str,
             param_dtype: torch.dtype, batch: tuple[int, int] = (0, 0),
             autocast: tuple[str, torch.dtype] | None = None, backward_differentiable: bool = False) -> GeneratedStep:
    """Write the step module for ``plan`` with ``method`` and return its source.

    ``kinds`` maps each block's ``kind`` to the registered kind that writes its statistics
    and block matrix. ``autocast`` ``(device_type, dtype)``: every call of the model (the
    forward of the step and any extra pass a method makes) runs under
    ``torch.autocast(device_type, dtype)``, its output cast back to ``param_dtype``; the
    loss, the statistics and the update run outside it, factors in ``float32`` or wider.
    ``backward_differentiable``: the model's backward may be differentiated again
    (:attr:`~curvgraph.codegen.writer.StepWriter.backward_differentiable`).
    """
    factor_dtype = torch.promote_types(param_dtype, torch.float32)
    w = StepWriter(forward.params, loss.objective, backward_differentiable)
    probe_index, activation_index = forward.probe_index, forward.activation_index
    blocks = [BlockVars(b, w.ident(b.name), kind=kinds[b.kind]) for b in plan.blocks]
    for b in blocks:
        b.factors = {f: b.var(f) for f in b.block.factors}
        b.batch_factors = {f: b.var(f"{f}_batch") for f in b.block.factors}
        b.use_indices = [(tuple(activation_index[n] for n in u.inputs), tuple(probe_index[n] for n in u.outputs))
                         for u in b.block.uses]
        b.uses = b.uses_of("acts", "samples")
        b.gradient_uses = b.uses_of("acts", "out_grads")

    state: dict[str, StateSpec] = {}
    for b in blocks:
        method_state = method.state(b.block)
        if clash := sorted(set(method_state) & set(b.block.factors)):
            raise CompileError(f"curvgraph: method {method.name!r} names state entries {clash} of block "
                               f"{b.block.name!r} like the factors of its kind {b.block.kind!r}; the step reads both "
                               "from one state key and one variable. Rename the method's entries or the kind's factors.")
        for f in method.factors_kept(b.block):
            state[b.key(f)] = StateSpec(b.block.factor_shapes[f])
        state.update({b.key(k): spec for k, spec in method_state.items()})

    fallback_params = [p for p in forward.params if all(p not in b.block.placeholders for b in blocks)]
    param_names = forward.names
    for p in fallback_params:
        shape, dtype = forward.param_shapes[p]
        state.update({f"{param_names[p]}.{k}": s for k, s in fallback.state_specs(shape, dtype).items()})
    if fallback_params:
        state.update(fallback.shared_state())
    if blocks:
        state.update(method.global_state())

    _write_forward_backward(w, forward, dims, loss, batch, param_dtype, autocast)
    if blocks:
        _write_gradient_matrices(w, blocks, factor_dtype)
        method.write_prologue(w, blocks)
        statistics_from = len(w.commits)
        with w.indent("if update_stats:", when="update_stats"):
            _write_fisher(w, loss, fisher, factor_dtype)
            batch_flags = []
            for b in blocks:
                b.kind.write_batch_factors(w, b, factor_dtype)
                for f in method.factors_kept(b.block):  # the factors the method checks: not finite, no step
                    batch_flags.append(b.var(f"{f}_batch_bad"))
                    w.line(f"{batch_flags[-1]} = {w.call(not_finite, b.batch_factors[f])}")
                    w.flag(b.block, f"factor {f} of the batch is not finite (the layer's inputs or output gradients "
                           f"are not finite, or overflow {factor_dtype}); the step was skipped", batch_flags[-1])
            method.write_statistics(w, blocks)
            statistics = w.commits[statistics_from:]
            del w.commits[statistics_from:]
            _write_statistics_commits(w, blocks, [(target, value) for _, target, value in statistics], batch_flags)
        with w.indent("else:"):
            for b in blocks:
                for f in method.factors_kept(b.block):
                    w.line(f"{b.factors[f]} = {b.state(f)}")
            checked = [(when, value) for when, value in w.checks if when is None]
            _write_all_finite(w, "ok_stats", ["loss"] + [b.grad for b in blocks], checked)
        w.checks = []  # every value checked so far is in ok_stats
        w.require("ok_stats")
        if any(method.preconditioner(b.block) for b in blocks):
            _write_refresh(w, method, blocks)
        w.line()
        w.line("# preconditioned directions")
        method.write_direction(w, blocks)
    if fallback_params:
        w.line()
        w.line(f"# first-order fallback ({fallback.name}) for parameters no pass matched")
        fallback.write_prologue(w)
        for p in fallback_params:
            direction = fallback.write(w, param_names[p], p, f"grad_{p}")
            w.line(f"new_{p} = {p} - {w.hyper('fallback_lr')} * {direction}")
            w.check(f"new_{p}")  # not finite where the direction is not, or where it overflows with a huge lr
            w.commit(p, f"new_{p}")
    _write_updates(w, blocks)
    for i, b in enumerate(forward.buffer_updates):
        w.commit(f"buffers[{forward.buffers.index(b)}]", f"new_buffers[{i}]")
    _write_commits(w)

    source = _assemble(plan, forward, dims, method, fallback, loss, fisher, w)
    return GeneratedStep(source=source, state=state, factor_dtype=factor_dtype,
                         degenerations=[degeneration for _, degeneration, _ in w.flags],
                         transposes_backward=w.backward_differentiable and bool(blocks))


def _write_forward_backward(w: StepWriter, forward: InstrumentedForward, dims, loss: LossSpec,
                            batch: tuple[int, int], param_dtype: torch.dtype,
                            autocast: tuple[str, torch.dtype] | None) -> None:
    w.line(f"batch = inputs[{batch[0]}].shape[{batch[1]}]")
    if forward.probes:
        w.line("probes = (")
        for probe in forward.probes:
            w.line(f"    torch.zeros({shape_code(probe.shape, dims)}, dtype={probe.dtype}, device=inputs[0].device),  # {probe.node}")
        w.line(")")
    else:
        w.line("probes = ()")
    if forward.draws:  # once per step: every call of the model sees the same dropout masks and noise
        w.line("draws = (")
        for draw in forward.draws:
            sampler = "torch.randn" if draw.normal else "torch.rand"
            keep = "" if draw.keep_above is None else f" >= {draw.keep_above!r}"  # a dropout's keep mask
            w.line(f"    {sampler}({shape_code(draw.shape, dims)}, dtype={draw.dtype}, device=inputs[0].device){keep},"
                   f"  # {draw.node}")
        w.line(")")
    w.line()
    call = f"forward(*params, *frozen, *buffers, *constants, *probes, {'*draws, ' if forward.draws else ''}*inputs)"
    with w.indent("def model(params, probes):"):
        if autocast is None:
            w.line(f"return {call}")
        else:
            w.line(f"# mixed precision: the model under autocast, its output back in {param_dtype}")
            with w.indent(f"with torch.autocast({autocast[0]!r}, dtype={autocast[1]}):"):
                w.line(f"output, aux = {call}")
            w.line(f"return output.to({param_dtype}), aux")
    w.line()
    w.line("output, backprop, (new_buffers, acts) = torch.func.vjp(model, params, probes, has_aux=True)")
    w.line(f"d_output, loss = torch.func.grad_and_value({w.ref(loss.objective)})(output, targets)")
    w.line("grads, out_grads = backprop(d_output)")
    if forward.params:
        w.line(f"{_unpack(forward.params)} = params")
        w.line(f"{_unpack('grad_' + p for p in forward.params)} = grads")


def _write_gradient_matrices(w: StepWriter, blocks: list[BlockVars], dtype: torch.dtype) -> None:
    """Each block's parameter matrix ``P`` and gradient matrix ``M = grad + weight_decay * P`` (the kind's
    decayed part of ``P``).

    Without weight decay (a :meth:`~curvgraph.codegen.writer.StepWriter.switch`) ``M`` is the gradient's matrix
    alone: the compiled step then forms ``P`` only where a method reads it (SINGD, K-BFGS), where the sum held
    the gradient's matrix, ``P`` and ``M`` at once (the MLP 784-512-512-256-10's first layer: three 1.5 MiB
    buffers at its step's memory peak)."""
    w.line()
    w.line("# block matrices of parameters and gradients (weight decay added)")
    grads = {}
    for b in blocks:
        names = list(b.block.placeholders)
        w.line(f"# {b.block.name}: {b.block.kind} block of {', '.join(b.block.params)}")
        w.line(f"{b.var('P')} = {b.kind.write_matrix(w, b, names, dtype)}")
        grads[b.block.name] = b.kind.write_matrix(w, b, [f"grad_{n}" for n in names], dtype)
    with w.indent(f"if {w.switch(w.hyper('weight_decay') + ' == 0')}:"):
        w.line("# no weight decay: M is the gradient's matrix")
        for b in blocks:
            w.line(f"{b.grad} = {grads[b.block.name]}")
    with w.indent("else:"):
        for b in blocks:
            decayed = b.kind.write_decayed(w, b, b.var("P"))
            w.line(f"{b.grad} = {grads[b.block.name]} + {w.hyper('weight_decay')} * {decayed}")


#: The Fisher types whose output vectors the step pulls back with ``torch.func.vmap(backprop)`` (:func:`_write_fisher`):
#: a vectorized backward, which the capture must be able to batch (attention in its math form).
VMAPPED_FISHERS = frozenset({"type2"})


def _write_fisher(w: StepWriter, loss: LossSpec, fisher: str, dtype: torch.dtype) -> None:
    """The Fisher type's output vectors ``samples``, its scale ``c`` (a 0-d tensor in the factor ``dtype``: the
    number of loss terms is an integer (tensor), whose reciprocal would have the *default* dtype) and ``examples``."""
    w.line(f"# output-space vectors of the {fisher} Fisher, pulled back through the model")
    one = f"torch.ones((), dtype={dtype}, device=output.device)"
    if fisher == "mc":
        w.line(f"_, samples = backprop({w.call(loss.mc, 'output', 'targets', 'noise')})")
        w.line(f"scale = {one} / {w.call(loss.terms, 'output', 'targets')}")
        w.line("examples = batch")
    elif fisher in VMAPPED_FISHERS:
        w.line(f"columns = {w.call(loss.type2, 'output', 'targets')}")
        w.line("_, samples = torch.func.vmap(backprop)(columns)")
        w.line("samples = tuple(s.flatten(0, 1) for s in samples)")
        w.line(f"scale = {one} / {w.call(loss.terms, 'output', 'targets')}")
        w.line("examples = columns.shape[0] * batch")
    else:
        w.line("samples = out_grads")
        w.line(f"scale = {one} * {w.call(loss.empirical_scale, 'output', 'targets')}")
        w.line("examples = batch")
    if loss.reduction == "sum":  # the curvature of the sum is sum_scale times the mean's; the empirical
        # Fisher's gradients (of the sum) carry sum_scale once already, their outer products twice
        w.line(f"scale = scale {'/' if fisher == 'empirical' else '*'} {w.call(loss.sum_scale, 'output', 'targets')}")


def _write_refresh(w: StepWriter, method: "Method", blocks: list[BlockVars]) -> None:
    """The preconditioner refresh as one call of a custom op that runs it eagerly and writes the state in place.

    The method's :meth:`~curvgraph.methods.base.Method.write_refresh` lines go into a module-level
    function, ``refresh_preconditioner(refresh, values, entries, outcome)``, registered as the op
    ``curvgraph::refresh_<digest of its source>`` (:func:`refresh_definition`). When ``refresh`` is true
    it recomputes the preconditioners from the factors and commits them into the state entries in place,
    if ``ok_stats`` (the loss, the gradient matrices and the statistics are finite: the condition the
    statistics were committed under, see :func:`_write_statistics_commits`), anything checked since and
    the refresh's own checks are finite; it writes the refresh's degenerate flags and whether it failed
    those checks into ``outcome`` (all false when it does not run). ``values`` holds the step's tensors
    that the refresh reads, ``entries`` the state entries it reads or writes (:func:`refresh_inputs`).
    After the call the step reads each block's preconditioner entries (and every other value the
    refresh committed) from the state, so a step without a refresh copies nothing. Run eagerly, the body
    deletes each temporary after its last use (:func:`_freed_when_dead`) and, when the refresh has no
    checks of its own, commits each value where it is made (:func:`_commit_where_made`): it holds about
    what the compiled branch held, not every new preconditioner at once.

    Compiled, the op is one opaque call: Inductor compiles nothing of the refresh, a few
    factorizations of small matrices and the elementwise work around them, whose graph (a
    ``torch.cond`` branch until the twenty-ninth session) took 11-15% of a ResNet-style CNN's cold
    compile. A 0-d bool tensor ``refresh`` keeps steps with and without a refresh in one compiled
    graph; they call the op (about 15 us), which returns at once. The eager step passes a Python
    bool and calls it only to refresh.

    A refresh that failed its checks makes the step's ``ok`` false (the step changes
    nothing). A refresh whose inputs and checks are finite is kept, with the statistics it was
    computed from, even if the step is then skipped for a value computed after it (an update
    that overflows).
    """
    w.line("# preconditioner refresh: one custom op (refresh_, run eagerly) that writes the state in place")
    entries: dict[str, str] = {}  # the name the step reads after the refresh -> the state entry holding it
    for b in blocks:
        entries.update({b.var(key): b.state(key) for key in method.preconditioner(b.block)})
    checked_before = list(w.checks)
    start = len(w.lines)
    with w.indent("def refreshed():", when="refresh"):  # the body's lines, moved into refresh_preconditioner below
        method.write_refresh(w, blocks)
        commits = [(target, value) for when, target, value in w.commits if when == "refresh"]
        for target, value in commits:
            if entries.get(value, target) != target:
                raise CompileError(f"curvgraph: {method.name}'s refresh commits {value} to {target}, but {value} "
                                   f"is held in {entries[value]}.")
            if value.isidentifier():
                entries[value] = target
        uncommitted = set(entries) - {value for _, value in commits}
        if uncommitted:
            raise CompileError(f"curvgraph: {method.name}'s refresh recomputes {sorted(uncommitted)} without "
                               "committing them to the state.")
        own = [(None, value) for when, value in w.checks if when == "refresh"]
        written = len(w.lines)
        _write_all_finite(w, "ok_refresh", [], checked_before + own, given="ok_stats")
        if own:  # all or nothing once the refresh's own checks are known
            _write_commit_all(w, commits, "ok_refresh")
        else:
            _commit_where_made(w.lines, start + 1, written, commits, w.ref(commit_all_))
        flags = [i for i, (when, _, _) in enumerate(w.flags) if when == "refresh"]
        w.line(f"outcome.copy_(torch.stack([{''.join(w.flags[i][2] + ', ' for i in flags)}~ok_refresh]))")
    body, w.lines[start:] = _freed_when_dead(w.lines[start + 1:]), []
    w.commits = [commit for commit in w.commits if commit[0] != "refresh"]
    w.checks = [check for check in w.checks if check[0] != "refresh"]
    for k, i in enumerate(flags):
        w.flags[i] = (None, w.flags[i][1], f"refresh_outcome[{k}]")
    values, keys = refresh_inputs(w.lines, body)
    w.definitions.append(refresh_definition(body, values, keys, w.ref(registered)))
    w.line(f"refresh_outcome = torch.zeros({len(flags) + 1}, dtype=torch.bool, device=loss.device)")
    # eager (a Python bool), a step without a refresh makes no call; compiled, a tensor that the op reads
    with w.indent("if refresh is not False:"), w.indent("with torch.no_grad():"):
        w.line(f"refresh_(torch.as_tensor(refresh), [{', '.join(values)}], "
               f"[{', '.join(w.state(key) for key in keys)}], refresh_outcome)")
    w.require(f"~refresh_outcome[{len(flags)}]")
    for name, target in entries.items():
        w.line(f"{name} = {target}")


def _assigned_names(line: str, indent: str) -> list[str]:
    """The names a generated line at ``indent`` assigns (``a = ...``, ``a, b, = ...``); none for other lines."""
    target = re.match(rf"{indent}([\w, ]+?) = ", line)
    return [name for name in target.group(1).replace(" ", "").split(",") if name] if target else []


def _commit_where_made(lines: list[str], start: int, written: int, commits: list[tuple[str, str]],
                       commit_all: str) -> None:
    """Move the refresh's condition (``lines[written:]``, computed from values known before the refresh) to the
    start of its body (``lines[start:written]``), and commit each ``(state entry, value)`` of ``commits`` right
    after the body's statement that last assigns the value (at the end where that statement is nested), with
    ``commit_all`` (the name of :func:`commit_all_` in the generated module).

    The eager refresh then holds one new preconditioner at a time, not all of them until a commit at the end
    (the MLP 784-512-512-256-10's refresh step: 4 MiB more at its peak)."""
    condition, lines[written:] = lines[written:], []
    indent = re.match(r" *", lines[start]).group()
    last: dict[str, int] = {}
    for i in range(start, written):
        depth = re.match(r" *", lines[i]).group()
        for name in _assigned_names(lines[i], depth):
            last[name] = i if depth == indent else -1
    at_end = []
    for target, value in reversed(commits):
        line = f"{indent}{commit_all}((({target}, {value}),), ok_refresh)"
        if last.get(value, -1) >= 0:
            lines.insert(last[value] + 1, line)
        else:
            at_end.insert(0, line)
    lines.extend(at_end)
    lines[start:start] = condition


def _freed_when_dead(body: list[str]) -> list[str]:
    """``body`` (straight-line code, one indentation level; deeper lines belong to the statement above them) with
    ``del`` statements after the last statement that reads each local assigned at that level: run eagerly, the
    refresh then frees each temporary (a damped factor, a group's stacked inverses) as soon as it is dead, as a
    compiled graph does, instead of holding every one until it returns."""
    indent = re.match(r" *", body[0]).group()
    statements: list[list[str]] = []
    for line in body:
        if line.startswith(indent) and not line[len(indent)].isspace() or not statements:
            statements.append([line])
        else:
            statements[-1].append(line)
    assigned = {name for statement in statements for name in _assigned_names(statement[0], indent)}
    last: dict[str, int] = {}
    for i, statement in enumerate(statements):
        for name in set(re.findall(r"\b[A-Za-z_]\w*\b", "\n".join(statement))) & assigned:
            last[name] = i
    freed = []
    for i, statement in enumerate(statements):
        freed.extend(statement)
        dead = sorted(name for name, at in last.items() if at == i)
        if dead and i < len(statements) - 1:
            freed.append(f"{indent}del {', '.join(dead)}")
    return freed


def refresh_inputs(step_lines: list[str], body: list[str]) -> tuple[list[str], list[str]]:
    """What the refresh ``body`` (its lines, indented one level below the step's) reads from the step: the
    names of the step's locals and ``hyper`` entries it uses, and the keys of the ``state`` entries it reads or
    writes; found with :mod:`symtable` on the step's lines so far (``step_lines``) and the body as a nested
    function, and with :mod:`ast` for the entries (``state['key']``)."""
    source = "\n".join([f"def step({', '.join(STEP_ARGUMENTS)}):", *step_lines, "    def refreshed():", *body])
    step_table = symtable.symtable(source, "<step>", "exec").get_children()[0]
    nested = next(child for child in step_table.get_children() if child.get_name() == "refreshed")
    names = [name for name in nested.get_frees() if name not in ("state", "hyper")]
    tree = ast.parse(textwrap.dedent("\n".join(body)))
    read = {ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Name) and node.value.id in ("state", "hyper")}
    keys = sorted({ast.literal_eval(e[len("state["):-1]) for e in read if e.startswith("state[")})
    return sorted(names) + sorted(e for e in read if e.startswith("hyper[")), keys


def refresh_definition(body: list[str], values: list[str], keys: list[str], registered_name: str) -> str:
    """The module-level source of ``refresh_preconditioner`` (see :func:`_write_refresh`) and of the line
    registering it as the custom op ``refresh_``."""
    unpacked = [f"hyper_{i}" if v.startswith("hyper[") else v for i, v in enumerate(values)]
    hyper = {v: u for v, u in zip(values, unpacked) if v.startswith("hyper[")}
    lines = [
        "def refresh_preconditioner(refresh: Tensor, values: list[Tensor], entries: list[Tensor], outcome: Tensor"
        ") -> None:",
        '    """The preconditioner refresh, run eagerly as the custom op ``refresh_`` (one opaque call in a',
        "    compiled step): if ``refresh``, recompute the preconditioners from ``values`` (the step's tensors it",
        "    reads), commit them into ``entries`` (the state entries it reads or writes) in place if finite, and",
        '    write its degenerate flags and whether it failed into ``outcome``."""',
        f"    {_unpack(unpacked)} = values" if unpacked else "    del values",
        f"    state = dict(zip({tuple(keys)!r}, entries))",
        "    if not refresh:",
        "        return",
    ]
    text = "\n".join(line[4:] if line.startswith("    ") else line for line in body)
    for expression, name in hyper.items():
        text = text.replace(expression, name)
    lines.append(text)
    source = "\n".join(lines)
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    return (f"{source}\n\n\nrefresh_ = {registered_name}('curvgraph::refresh_{digest}', refresh_preconditioner, "
            "('entries', 'outcome'))")


def _write_updates(w: StepWriter, blocks: list[BlockVars]) -> None:
    """The new parameters of every block, ``p - D_p`` for each parameter ``p`` and its piece ``D_p`` of the block's
    direction ``D``, each checked: a finite direction still overflows with a learning rate near the float limit
    (or one set to ``inf`` by a schedule), and a parameter is never written a non-finite value. The difference is
    taken in the wider dtype (``D`` is in the factor dtype, float32 for bf16/fp16 parameters) and cast to the
    parameter's before the check, so that what is checked is what is written: a float16 parameter overflows
    above 65504, where its float32 value would still be finite.

    Written per parameter, not as ``P - D`` split afterwards, so that the parameters' block matrix ``P`` (a copy
    of them) is not held from the gradient matrices to the end of the step."""
    for b in blocks:
        pieces = [f"D_{p}" for p in b.block.placeholders]
        w.line(f"# {b.block.name}: the new {', '.join(b.block.params)}")
        w.line(f"{_unpack(pieces)} = {b.kind.write_split(w, b, b.direction)}")
        for p, piece in zip(b.block.placeholders, pieces):
            w.line(f"new_{p} = ({p} - {piece}).to({p}.dtype)")
            w.check(f"new_{p}")
            w.commit(p, f"new_{p}")


def _write_statistics_commits(w: StepWriter, blocks: list[BlockVars], commits: list[tuple[str, str]],
                              batch_flags: list[str]) -> None:
    """Commit what the statistics computed (``commits``: ``(state entry, value)``) right after them, in
    one :func:`commit_all_`, if ``ok_stats``: the loss, the gradient matrices and every value checked so
    far (the new factors) are finite, and no flag of ``batch_flags`` (the batch factors' own checks, each
    also a degenerate flag) is raised. The new factors' checks imply those flags; made a condition of the
    commit, they are computed before it, where the batch factors are made (needed only for the step's
    ``degenerate`` output, Inductor put them at its end and held every batch factor, the LSTM's 4 MiB
    ``G``, through the step). Each value is then read back from its state entry, so this batch's
    factors are not held to the end of the step (the refresh, which commits under the same condition,
    and the direction read them from the state). ``ok_stats`` is also a requirement of the step's ``ok``:
    statistics that are not finite skip the step. The exception this makes to "a skipped step
    changes nothing" is the refresh's: finite statistics are kept when the step is skipped for a
    value computed after them (an update that overflows), together with the refresh computed from
    them."""
    checked = [(None, value) for _, value in w.checks]  # inside the statistics branch: every check applies
    _write_all_finite(w, "ok_stats", ["loss"] + [b.grad for b in blocks], checked,
                      given=" & ".join(f"~{flag}" for flag in batch_flags) or None)
    _write_commit_all(w, commits, "ok_stats")
    for target, value in commits:
        if value.isidentifier():
            w.line(f"{value} = {target}")


def _write_commits(w: StepWriter) -> None:
    w.line()
    w.line("# commit: every tensor changes only if the whole step is finite (the checks below imply it; the statistics "
           "and the refresh committed above, under ok_stats)")
    _write_all_finite(w, "ok", ["loss"], w.checks)
    for condition in w.requirements:  # the refresh's outcome (its checks ran in its branch, see _write_refresh)
        w.line(f"ok = ok & {condition}")
    for target, value in [(t, v) for when, t, v in w.commits if when is None]:
        w.line(f"{w.call(commit_, target, value, 'ok')}")
    stats_commits = [(t, v) for when, t, v in w.commits if when == "update_stats"]
    if stats_commits:
        with w.indent("if update_stats:"):
            for target, value in stats_commits:
                w.line(f"{w.call(commit_, target, value, 'ok')}")
    _write_degenerate(w)
    w.line("return loss.detach(), ok, degenerate")


def _write_commit_all(w: StepWriter, commits: list[tuple[str, str]], condition: str) -> None:
    """Write each ``(state entry, value)`` of ``commits`` in place if ``condition`` (:func:`commit_all_`)."""
    w.line(f"{w.ref(commit_all_)}((")
    for target, value in commits:
        w.line(f"    ({target}, {value}),")
    w.line(f"), {condition})")


def _write_all_finite(w: StepWriter, name: str, values: list[str], checks: list[tuple[str | None, str]],
                      given: str | None = None) -> None:
    """``name`` = whether ``values`` and the checked values are finite (and the 0-d bool ``given`` is true);
    a check tagged ``update_stats`` counts in statistics steps only (its value exists only there)."""
    always = list(dict.fromkeys(values + [value for when, value in checks if when is None]))
    terms = ([given] if given else []) + ([w.call(all_finite, *always)] if always else [])
    w.line(f"{name} = {' & '.join(terms)}")
    statistics = list(dict.fromkeys(value for when, value in checks if when == "update_stats"))
    if statistics:
        with w.indent("if update_stats:"):
            w.line(f"{name} = {name} & {w.call(all_finite, *statistics)}")


def _write_degenerate(w: StepWriter) -> None:
    """``degenerate``: one bool per flag, false where the flag's branch did not run in this step."""
    w.line()
    w.line("# degenerate blocks (see GeneratedStep.degenerations), reported whether or not the step was taken")
    no = "torch.zeros((), dtype=torch.bool, device=loss.device)"
    flags = [value if when is None else f"({value} if {when} else {no})" for when, _, value in w.flags]
    if not flags:
        w.line("degenerate = torch.zeros(0, dtype=torch.bool, device=loss.device)")
        return
    w.line("degenerate = torch.stack([")
    for (_, degeneration, _), flag in zip(w.flags, flags):
        w.line(f"    {flag},  # {degeneration.block or 'the step'}: {degeneration.message.split(';')[0]}")
    w.line("])")


def _unpack(names) -> str:
    names = list(names)
    return ", ".join(names) + ("," if len(names) == 1 else "")


def _assemble(plan: Plan, forward: InstrumentedForward, dims, method: "Method", fallback: "FallbackRule",
              loss: LossSpec, fisher: str, w: StepWriter) -> str:
    header = [
        f'"""Training step generated by curvgraph {__version__} for {plan.model_name}.',
        "",
        f"method={method.name}{method.describe_options()}, fisher={fisher}, loss={loss.description}, "
        f"fallback={fallback.name}",
        f"blocks: {', '.join(f'{b.name} ({b.kind} {b.dims})' for b in plan.blocks) or 'none'}",
        f"fallback parameters: {', '.join(plan.fallback_params) or 'none'}",
        "",
        "Runs with torch alone. step(...) returns (loss, ok, degenerate); ok is False when the",
        "step was not finite and nothing was changed; degenerate flags the blocks that degenerated.",
        '"""',
        "",
        "from __future__ import annotations",
        "",
        "import itertools",
        "import math",
        "import operator",
        "",
        "import torch",
        "import torch.nn.functional as F",
        "from torch import Tensor",
    ]
    header += _global_imports(forward.globals, forward.source)
    parts = ["\n".join(header)]
    parts.extend(helper_sources(w))
    parts.extend(w.definitions)
    parts.append(forward.source.strip())
    noise_body = f"    return {shape_code(forward.output_shape, dims)}"
    parts.append(f'def noise_shape(inputs):\n    """Shape of the model output for ``inputs``."""\n{noise_body}')
    parts.append(f'def switches(hyper):\n    """The step\'s ``switches`` for ``hyper`` (Python floats by name)."""\n'
                 f'    return {w.pack(w.switches)}')
    signature = (f"def step({', '.join(STEP_ARGUMENTS[:-3])},\n"
                 "         update_stats: bool, refresh: bool | Tensor, switches: tuple[bool, ...]):")
    doc = (
        '    """Forward, backward, curvature statistics, preconditioning and update, in place.\n\n'
        "    params/frozen/buffers/constants: the model's tensors in ``forward``'s order;\n"
        "    inputs/targets: the batch; state: optimizer state by key; hyper: 0-d tensors;\n"
        "    noise: standard uniform/normal noise shaped like the output (MC Fisher) or None;\n"
        "    update_stats/refresh: this step's schedule; switches: ``switches`` of the hyper-parameters.\n"
        '    """'
    )
    parts.append("\n".join([signature, doc] + w.lines))
    return "\n\n\n".join(parts) + "\n"


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
        if globals_[name] is leaf_call:  # a leaf module: the step calls the live module (not exportable)
            lines.append(f"from curvgraph.leaf import leaf_call as {name}")
        elif name in _KNOWN_GLOBALS:
            lines.append(_KNOWN_GLOBALS[name])
        else:
            raise CompileError(f"curvgraph: the captured graph refers to {name!r}, which the generated module cannot import.")
    return lines


def load(generated: GeneratedStep) -> dict[str, object]:
    """Execute the generated source; returns its namespace (``step``, ``forward``, ...)."""
    namespace: dict[str, object] = {"__name__": "curvgraph_generated_step"}
    code = compile(generated.source, "<curvgraph-generated-step>", "exec")
    exec(code, namespace)  # the source is ours: generated above from the plan
    return namespace


if TYPE_CHECKING:
    from ..kinds.base import BlockKind
    from ..methods.base import Method
    from ..methods.fallback import FallbackRule
