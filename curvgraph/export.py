"""Ahead-of-time step modules: :meth:`CurvatureOptimizer.export` and :func:`load_step`.

An exported module is the optimizer's generated step (``opt.source``: the
instrumented forward, the statistics, the method's math and the update) followed by

* the run-time definitions of :mod:`curvgraph.runtime` (copied with ``inspect``, the
  same code the optimizer runs its step with): state initialization, the
  statistics/refresh schedule, the Monte-Carlo noise, the ``hyper`` tensors;
* ``SPEC``: parameter names, state shapes, schedule and the hyper-parameters the
  step was exported with;
* the model's lifted constants: small ones written inline, larger ones in a
  ``<name>.pt`` file beside the module, loaded with ``torch.load(..., weights_only=True)``;
* ``load(model, *, backend=..., seed=...)``: an :class:`~curvgraph.runtime.ExportedStep`
  with ``.step(inputs, targets)``, ``.state_dict()`` and ``.load_state_dict()``.

It imports torch and the standard library only, so it runs where curvgraph is not
installed. A header comment says what it was generated for (model, inputs, plan,
method, hyper-parameters) and carries a SHA-256 of the code below the header and of
the constants file. The same model and options give a byte-identical file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import io
import math
import os
import textwrap
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from . import runtime
from ._version import __version__
from .errors import ConfigError

if TYPE_CHECKING:
    from .optimizer import CurvatureOptimizer

#: Constants with at most this many entries are written into the module; larger ones go to the ``.pt`` file.
INLINE_NUMEL = 64


def export(opt: "CurvatureOptimizer", path: str | os.PathLike) -> str:
    """Write ``opt``'s step as a standalone module at ``path`` (``.py``); returns the path written.

    Large constants go to ``path`` with the suffix ``.pt`` (only if there are any).
    """
    path = os.fspath(path)
    if "from curvgraph.leaf import" in opt.source:
        raise ConfigError("curvgraph: this step calls leaf modules (leaf_modules=), which run the live model's "
                          "modules; it cannot be exported to a standalone file.")
    if not path.endswith(".py"):
        raise ConfigError(f"curvgraph: export writes a Python module; give a path ending in .py, got {path!r}.")
    stem = os.path.splitext(os.path.basename(path))[0]
    if not stem.isidentifier():
        raise ConfigError(f"curvgraph: the exported module's name {stem!r} must be a Python identifier (it is imported).")
    forward = opt._forward
    names = dict(zip(forward.constants, opt._constants))
    large = {n: t.detach().cpu().contiguous() for n, t in names.items() if t.numel() > INLINE_NUMEL}
    stored = _saved(large) if large else b""
    body = _body(opt, names, f"{stem}.pt" if large else None)
    digest = hashlib.sha256(body.encode() + stored).hexdigest()
    text = _header(opt, digest, stem, f"{stem}.pt" if large else None) + body
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    pt_path = os.path.splitext(path)[0] + ".pt"
    if large:
        with open(pt_path, "wb") as f:
            f.write(stored)
    return path


def load_step(path: str | os.PathLike, model: nn.Module, **options: Any) -> "runtime.ExportedStep":
    """Import the exported module at ``path`` and bind its step to ``model`` (``module.load(model, **options)``).

    ``options``: ``backend`` (``"eager"`` or a ``torch.compile`` backend; default: the
    one the module was exported with) and ``seed`` (of the Monte-Carlo noise).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"curvgraph: no exported step module at {path!r}; write one with opt.export(path).")
    name = "curvgraph_step_" + hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "load", None)):
        raise ConfigError(f"curvgraph: {path!r} has no load(model) function; is it a module written by opt.export()?")
    return module.load(model, **options)


def _saved(tensors: dict[str, Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()


def _header(opt: "CurvatureOptimizer", digest: str, stem: str, pt_name: str | None) -> str:
    plan = opt.plan
    params = ", ".join(f"{n} {tuple(p.shape)} {str(p.dtype).removeprefix('torch.')}"
                       for n, p in zip((opt._forward.names[p] for p in opt._forward.params), opt._params))
    inputs = ", ".join(f"{s.name} ({', '.join('*' if d is None else str(d) for d in s.shape)}) "
                       f"{str(s.dtype).removeprefix('torch.')}" for s in opt._inputs)
    hyper = opt._hyper_values(False)
    lines = [
        f"curvgraph {__version__}: ahead-of-time training step for {plan.model_name}.",
        "Written by CurvatureOptimizer.export(); regenerate it rather than editing it.",
        f"content hash: sha256 {digest} (of the code below this header"
        + (f" and of {pt_name})" if pt_name else ")"),
        "",
        f"model: {plan.model_name}; trainable parameters: {params or 'none'}",
        f"inputs: {inputs} ('*' = any size)",
        f"method: {opt.method.name}{opt.method.describe_options()}, fisher={opt.fisher}, loss={opt.loss.description}, "
        f"fallback={opt.fallback.name}",
        f"schedule: factor_every={opt.factor_every}, invert_every={opt.invert_every}; backend={opt.backend}, "
        f"seed={opt._seed}",
        "hyper-parameters: " + ", ".join(f"{k}={_number(v)}" for k, v in hyper.items()),
        "",
        *str(plan).splitlines(),
        "",
        "Use, with torch alone:",
        f"    import {stem}; trainer = {stem}.load(model); loss = trainer.step(inputs, targets)",
        "or curvgraph.load_step(path, model). Needs only torch: curvgraph need not be installed.",
    ]
    return "\n".join(("# " + line).rstrip() for line in lines) + "\n\n"


def _body(opt: "CurvatureOptimizer", constants: dict[str, Tensor], pt_name: str | None) -> str:
    source = opt.source
    imports = ("contextlib", "functools", "logging", "math", "os", "threading", "warnings")
    source = source.replace("\nimport math\n", "".join(f"\nimport {name}" for name in imports) + "\n", 1)
    anchor = "\nfrom torch import Tensor\n"  # the run time's Inductor pass (runtime.PruneUnusedOutputs) needs these
    assert anchor in source, "the generated step's imports changed: update export._body"
    source = source.replace(anchor, anchor + "from torch._inductor.custom_graph_pass import CustomGraphPass, "
                            "get_hash_for_files\n", 1)
    run_time = ["\n".join(f"{name} = {_literal(getattr(runtime, name))}" for name in runtime.EXPORTED_CONSTANTS)]
    run_time += [textwrap.dedent(inspect.getsource(obj)).strip() for obj in runtime.EXPORTED]
    run_time[0] = _section("run time: the code CurvatureOptimizer runs the step with (curvgraph.runtime)", run_time[0])
    parts = [
        source.rstrip(),
        *run_time,
        _section("what the step was exported with", _spec(opt)),
        _section("the model's lifted constants", _constants(constants, pt_name)),
        _section("entry point", _LOAD),
    ]
    return "\n\n\n".join(parts) + "\n"


def _section(title: str, code: str) -> str:
    return f"# {'-' * 76}\n# {title}\n\n{code}"


def _spec(opt: "CurvatureOptimizer") -> str:
    forward, generated = opt._forward, opt._generated
    hyper = opt._hyper_values(False)
    first = {k: v for k, v in opt._hyper_values(True).items() if hyper.get(k) != v}
    state = {key: (spec.shape, spec.init, spec.dtype or generated.factor_dtype) for key, spec in generated.state.items()}
    entries = [
        ("method", _literal(opt.method.name), "the update rule's name (checked by load_state_dict)"),
        ("params", _literal(tuple(forward.names[p] for p in forward.params)), "trainable, in forward()'s order"),
        ("param_shapes", _literal(tuple(tuple(p.shape) for p in opt._params)), None),
        ("frozen", _literal(tuple(forward.names[p] for p in forward.frozen)), "requires_grad=False, or no gradient"),
        ("buffers", _literal(tuple(forward.names[b] for b in forward.buffers)), None),
        ("inputs", str(len(forward.inputs)), "number of input tensors"),
        ("input_shapes", _literal(opt._input_shapes),
         "per input: name, shape (None: any size), dtype, (dim, lowest, highest) of sizes held in a range"),
        ("batch_dims", _literal(opt._captured.batch_dims), "per input, its batch dim (None: none)"),
        ("size_conditions", _literal(opt._captured.size_conditions),
         "(expression over the inputs' shapes, torch.export's guard): where the captured graph holds"),
        ("contiguous", _literal(tuple(i.contiguous for i in opt._inputs)), "per input, captured contiguous"),
        ("loss", _literal(opt.loss.name), None),
        ("class_dim", _literal(opt.loss.target_class_dim),
         "the prediction's class dim for class-index targets, None for targets shaped like it"),
        ("keys", _literal(opt._captured.keys), "their names for keyword inputs (a dict: model(**inputs)), else None"),
        ("dynamic_dims", _literal(tuple(spec.symbolic_dims for spec in opt._inputs)),
         "per input, the dims the graph keeps symbolic (marked dynamic for torch.compile)"),
        ("transposes_backward", _literal(generated.transposes_backward),
         "whether the step differentiates the model's backward pass (curvature products)"),
        ("state", _mapping(state, 8), "key: (shape, initialization, dtype)"),
        ("optional_state", _literal(tuple(key for key, spec in generated.state.items() if spec.optional)),
         "entries a state_dict may lack (saved before they existed): they start again"),
        ("reported", _literal(tuple(opt.method.reported().items())), "state entries stats() shows: (full key, name)"),
        ("noise", _literal(opt.loss.noise if opt.fisher == "mc" else None), "Monte-Carlo Fisher noise"),
        ("factor_every", str(opt.factor_every), None),
        ("invert_every", str(opt.invert_every), None),
        ("factor_dtype", _literal(generated.factor_dtype), None),
        ("hyper", _mapping(hyper, 8), "the step's hyper-parameters"),
        ("first_statistics", _mapping(first, 8), "overrides until the first statistics step succeeded"),
        ("degenerations", _lines(tuple(d.describe() for d in generated.degenerations), 8),
         "what each of the step's degenerate flags reports (warned once each)"),
    ]
    lines = ["SPEC = {"]
    for key, value, comment in entries:
        if comment:
            lines.append(f"    # {comment}")
        lines.append(f"    {key!r}: {value},")
    lines.append("}")
    lines.append(f"BACKEND = {opt.backend!r}")
    lines.append(f"SEED = {opt._seed!r}")
    return "\n".join(lines)


def _constants(constants: dict[str, Tensor], pt_name: str | None) -> str:
    lines = ["def constants():", '    """The lifted constants in ``forward``\'s order (on the CPU)."""']
    if pt_name:
        lines.append(f"    here = os.path.dirname(os.path.abspath(__file__))")
        lines.append(f"    stored = torch.load(os.path.join(here, {pt_name!r}), weights_only=True)")
    lines.append("    return (")
    for name, tensor in constants.items():
        if tensor.numel() > INLINE_NUMEL:
            lines.append(f"        stored[{name!r}],")
        else:
            lines.append(f"        {_tensor_literal(tensor)},  # {name}")
    lines.append("    )")
    return "\n".join(lines)


def _tensor_literal(tensor: Tensor) -> str:
    """Code that rebuilds ``tensor`` exactly (every value round-trips through its Python repr)."""
    values = _literal(tensor.detach().cpu().tolist())
    return f"torch.tensor({values}, dtype={tensor.dtype})"


def _number(value: object) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return f"float({str(value)!r})"
    return repr(value)


def _literal(value: object) -> str:
    """Python source for ``value``: numbers (non-finite floats too), strings, dtypes, tuples, lists."""
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, (float, int, str, bool)) or value is None:
        return _number(value)
    if isinstance(value, tuple):
        return "(" + ", ".join(map(_literal, value)) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, list):
        return "[" + ", ".join(map(_literal, value)) + "]"
    raise TypeError(f"no literal for {type(value).__name__}")


def _lines(values: tuple[object, ...], indent: int) -> str:
    """A tuple literal with one item per line."""
    if not values:
        return "()"
    pad = " " * indent
    return "(\n" + "".join(f"{pad}{_literal(v)},\n" for v in values) + " " * (indent - 4) + ")"


def _mapping(values: dict[str, object], indent: int) -> str:
    if not values:
        return "{}"
    pad = " " * indent
    return "{\n" + "".join(f"{pad}{k!r}: {_literal(v)},\n" for k, v in values.items()) + " " * (indent - 4) + "}"


_LOAD = '''def load(model, *, backend=BACKEND, seed=SEED):
    """The training step bound to ``model`` (updated in place): ``.step(inputs, targets)``,
    ``.state_dict()``, ``.load_state_dict()``.

    ``backend``: ``"eager"``, or the ``torch.compile`` backend the step is compiled with;
    ``seed``: seed of the Monte-Carlo noise generator (``None``: from ``torch.initial_seed()``).
    """
    return ExportedStep(model, step=step, noise_shape=noise_shape, switches=switches, spec=SPEC,
                        constants=constants(), backend=backend, seed=seed)'''
