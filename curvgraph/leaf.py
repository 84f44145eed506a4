"""Leaf modules: submodules kept opaque in the captured graph (``leaf_modules=`` of :func:`curvgraph.compile`).

A module that ``torch.export`` cannot capture (Python control flow on tensor values,
calls it does not support) or that the passes should not see is captured as **one
call**, ``leaf_call(key, params, inputs)``, instead of its ops:

* at capture, the module is swapped for a :class:`LeafShell` (the same Parameters
  and buffers under the same names) whose forward is the custom op
  ``curvgraph::leaf``; its fake implementation gives the output's shape from the
  shapes of one eager call on the example inputs (each output size that equals an
  input size follows that input's symbolic size);
* after capture the op is retargeted to :func:`leaf_call`, a ``torch.autograd.Function``
  around the same op whose backward and forward-mode derivative are the ops
  ``curvgraph::leaf_vjp`` and ``curvgraph::leaf_jvp`` (``torch.func.vjp`` / ``jvp`` of the
  module run eagerly on the step's parameter tensors, ``torch.func.functional_call``):
  the generated step's ``torch.func`` transforms differentiate through it, so the
  leaf's parameters get exact gradients and train with the first-order fallback.

``torch.compile`` keeps the three ops opaque (``leaf_call`` is ``allow_in_graph``: AOT
autograd traces the Function with the ops' fake implementations), so a step with leaf
modules compiles as one graph with any backend; the ops run the module eagerly, with
the dispatcher as plain eager code has it (a compiled graph calls them below autograd).
Leaf modules take positional tensors and return one tensor; their buffers are read,
not updated, by the step (in training mode :func:`register` warns), which cannot be
exported to a file (it calls the live module).
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .errors import ConfigError


@dataclass
class _Leaf:
    """A registered leaf module: the module, its tensors' names, and one call's shapes."""

    module: "weakref.ref[nn.Module]"
    name: str
    tensors: tuple[str, ...]  # parameter names, then buffer names, relative to the module
    params: int  # how many of ``tensors`` are parameters
    input_shapes: tuple[tuple[int, ...], ...] = ()
    output_shape: tuple[int, ...] = ()
    output_dtype: torch.dtype = torch.float32


_LEAVES: dict[str, _Leaf] = {}


def leaf_modules_of(model: nn.Module, spec: Iterable[str | type] | None) -> dict[str, nn.Module]:
    """The submodules ``spec`` names (module paths or ``nn.Module`` subclasses), by path; outermost only.

    Raises :class:`ConfigError` for a name that is not a submodule, a type no submodule
    has, the root model, or anything else.
    """
    if spec is None:
        return {}
    if isinstance(spec, (str, type)):
        spec = [spec]
    spec = list(spec)
    names = [s for s in spec if isinstance(s, str)]
    types = tuple(s for s in spec if isinstance(s, type) and issubclass(s, nn.Module))
    if len(names) + len(types) != len(spec):
        raise ConfigError(f"curvgraph: leaf_modules must list module names (e.g. 'encoder.layer.0') or nn.Module "
                          f"subclasses, got {spec!r}.")
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules or n == ""]
    if unknown:
        raise ConfigError(f"curvgraph: leaf_modules names {unknown}, which are not submodules of "
                          f"{type(model).__name__}; its submodules are {[n for n in modules if n][:20]}.")
    leaves: dict[str, nn.Module] = {}
    for name, module in modules.items():
        if name and (name in names or isinstance(module, types)):
            if not any(name.startswith(outer + ".") for outer in leaves):
                leaves[name] = module
    missing = [t.__name__ for t in types if not any(isinstance(m, t) for m in leaves.values())]
    if missing:
        raise ConfigError(f"curvgraph: leaf_modules lists {missing}, but {type(model).__name__} has no such submodule.")
    return leaves


def register(name: str, module: nn.Module) -> str:
    """Register ``module`` (at path ``name``) as a leaf; returns its key in the captured graph."""
    for key in [k for k, leaf in _LEAVES.items() if leaf.module() is None]:
        del _LEAVES[key]
    params = tuple(n for n, _ in module.named_parameters())
    buffers = tuple(n for n, _ in module.named_buffers())
    if buffers and module.training:
        warnings.warn(f"curvgraph: leaf module '{name}' has buffers ({', '.join(buffers[:4])}"
                      f"{', ...' if len(buffers) > 4 else ''}); the step reads them but never updates them, so "
                      "running statistics (e.g. BatchNorm's) keep their current values. Leave such submodules "
                      "outside the leaf module if they should be updated.", UserWarning, stacklevel=2)
    key = f"{name}@{id(module):x}"
    _LEAVES[key] = _Leaf(weakref.ref(module), name, params + buffers, len(params))
    return key


def leaf_name(key: str) -> str:
    """The module path of the leaf with ``key``."""
    return key.rsplit("@", 1)[0]


def recording_hook(key: str) -> Callable[..., None]:
    """A forward hook (``with_kwargs=True``) recording the shapes of a call of the leaf with ``key``.

    Raises :class:`ConfigError` for a call the leaf op cannot stand for (keyword or
    non-tensor arguments, a return value that is not one tensor).
    """

    def record(module: nn.Module, inputs: tuple[Any, ...], kwargs: Mapping[str, Any], output: Any) -> None:
        leaf = _LEAVES[key]
        if kwargs or not all(isinstance(t, Tensor) for t in inputs):
            got = [type(a).__name__ for a in inputs] + [f"{k}=" for k in kwargs]
            raise ConfigError(f"curvgraph: leaf module '{leaf.name}' is called with {got}; a leaf module takes "
                              "positional tensors only. Mark a module around it as the leaf instead.")
        if not isinstance(output, Tensor):
            raise ConfigError(f"curvgraph: leaf module '{leaf.name}' returns {type(output).__name__}; a leaf module "
                              "returns one tensor. Mark a module around it as the leaf instead.")
        leaf.input_shapes = tuple(tuple(t.shape) for t in inputs)
        leaf.output_shape, leaf.output_dtype = tuple(output.shape), output.dtype

    return record


def _module(key: str) -> _Leaf:
    leaf = _LEAVES.get(key)
    if leaf is None or leaf.module() is None:
        raise RuntimeError(f"curvgraph: leaf module {leaf_name(key)!r} no longer exists; compile the model again.")
    return leaf


def _call(key: str, tensors: tuple[Tensor, ...], inputs: tuple[Tensor, ...]) -> Tensor:
    """The leaf module on ``tensors`` and ``inputs``; its buffers as copies, so that a forward that updates them in
    place (BatchNorm in training mode) changes neither the model's buffers nor a tensor ``torch.func`` transforms."""
    leaf = _module(key)
    tensors = tensors[:leaf.params] + tuple(t.clone() for t in tensors[leaf.params:])
    return functional_call(leaf.module(), dict(zip(leaf.tensors, tensors)), inputs)


#: The dispatcher's thread-local key sets of plain eager code (taken at import).
_EAGER_DISPATCH = (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())
_AUTOCAST_KEYS = [key for name, key in torch._C.DispatchKey.__members__.items() if name.startswith("Autocast")]


def _eager() -> Any:
    """A context in which the dispatcher is as in plain eager code, autocast as it is now: a compiled step calls the
    leaf ops below autograd and ``torch.func``, where the module's own differentiation (``torch.func.vjp``/``jvp``)
    would record nothing."""
    include, exclude = _EAGER_DISPATCH
    now = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOCAST_KEYS:
        exclude = exclude.add(key) if now.has(key) else exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(include, exclude)


@torch.library.custom_op("curvgraph::leaf", mutates_args=())
def leaf_op(key: str, tensors: list[Tensor], inputs: list[Tensor]) -> Tensor:
    """The leaf module ``key`` on its ``tensors`` (parameters, then buffers) and ``inputs``: the op export captures."""
    with _eager():
        return _call(key, tuple(tensors), tuple(inputs)).clone()


@leaf_op.register_fake
def _leaf_fake(key: str, tensors: list[Tensor], inputs: list[Tensor]) -> Tensor:
    """The output of the recorded shape; a size equal to an input size of the recorded call follows that input."""
    leaf = _module(key)
    shape = []
    for k, size in enumerate(leaf.output_shape):
        matches = sorted(((i, d) for i, s in enumerate(leaf.input_shapes) for d, n in enumerate(s) if n == size),
                         key=lambda match: match[1] != k)  # the same dim first
        shape.append(inputs[matches[0][0]].shape[matches[0][1]] if matches else size)
    return inputs[0].new_empty(shape, dtype=leaf.output_dtype)


@torch.library.custom_op("curvgraph::leaf_vjp", mutates_args=())
def leaf_vjp(key: str, tensors: list[Tensor], inputs: list[Tensor], grad: Tensor) -> list[Tensor]:
    """The gradients of the leaf's output (with output gradient ``grad``) w.r.t. its floating-point parameters
    (the first of its ``tensors``) and its floating-point ``inputs``, in that order (:func:`_differentiated`)."""
    with _eager():
        call, primals = _differentiable(key, tensors, inputs)
        _, pull = torch.func.vjp(call, *primals)
        tensor_grads, input_grads = pull(grad)
        return [g.clone() for g in (*tensor_grads, *input_grads)]


@leaf_vjp.register_fake
def _leaf_vjp_fake(key: str, tensors: list[Tensor], inputs: list[Tensor], grad: Tensor) -> list[Tensor]:
    everything = (*tensors, *inputs)
    return [torch.empty_like(everything[i]) for i in _differentiated(key, everything)]


@torch.library.custom_op("curvgraph::leaf_jvp", mutates_args=())
def leaf_jvp(key: str, tensors: list[Tensor], inputs: list[Tensor], tangents: list[Tensor]) -> Tensor:
    """The forward-mode derivative of the leaf's output along ``tangents`` (of its floating-point parameters,
    then of its floating-point ``inputs``: :func:`_differentiated`)."""
    with _eager():
        call, primals = _differentiable(key, tensors, inputs)
        count = len(primals[0])
        return torch.func.jvp(call, primals, (tuple(tangents[:count]), tuple(tangents[count:])))[1].clone()


@leaf_jvp.register_fake
def _leaf_jvp_fake(key: str, tensors: list[Tensor], inputs: list[Tensor], tangents: list[Tensor]) -> Tensor:
    return _leaf_fake(key, tensors, inputs)


def _one_call_per_element(op: Callable[..., Any]) -> Callable[..., Any]:
    """A ``torch.vmap`` rule for the leaf op ``op``: one call per batch element, stacked (the module is a black box;
    e.g. the exact GGN pulls one output direction at a time back through it)."""

    def select(arg: Any, dim: Any, index: int) -> Any:
        if isinstance(arg, list):
            return [select(a, d, index) for a, d in zip(arg, dim)]
        return arg if dim is None else arg.select(dim, index)

    def rule(info: Any, in_dims: tuple[Any, ...], *args: Any) -> tuple[Any, Any]:
        results = [op(*(select(a, d, b) for a, d in zip(args, in_dims))) for b in range(info.batch_size)]
        if isinstance(results[0], Tensor):
            return torch.stack(results), 0
        return [torch.stack(r) for r in zip(*results)], [0] * len(results[0])

    return rule


for _op in (leaf_op, leaf_vjp, leaf_jvp):
    _op.register_vmap(_one_call_per_element(_op))


class _LeafVjp(torch.autograd.Function):
    r""":func:`leaf_vjp`, differentiable in the output gradient ``grad``: the vector-Jacobian product is linear in it,
    :math:`J^\top g`, so its own vector-Jacobian product maps ``w`` (one tensor per differentiated parameter and input)
    to :math:`J w`, :func:`leaf_jvp`. That is what the adaptive step's curvature products take
    (:func:`curvgraph.methods.quadratic.output_jvps`); derivatives in the parameters and inputs (second
    derivatives of the module) are not provided."""

    generate_vmap_rule = True

    @staticmethod
    def forward(key: str, count: int, grad: Tensor, *saved: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        return tuple(leaf_vjp(key, list(saved[:count]), list(saved[count:]), grad))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        ctx.key, ctx.count = inputs[0], inputs[1]
        ctx.save_for_backward(*inputs[3:])

    @staticmethod
    def backward(ctx: Any, *cotangents: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        saved = ctx.saved_tensors
        differentiated = [saved[i] for i in _differentiated(ctx.key, saved)]
        tangents = [torch.zeros_like(t) if c is None else c for c, t in zip(cotangents, differentiated)]
        directional = leaf_jvp(ctx.key, list(saved[:ctx.count]), list(saved[ctx.count:]), tangents)
        return (None, None, directional, *([None] * len(saved)))


class _LeafCall(torch.autograd.Function):
    """The leaf op, differentiable under ``torch.func`` transforms: its backward is :func:`leaf_vjp` (itself
    differentiable in the output gradient, :class:`_LeafVjp`) and its
    forward-mode derivative :func:`leaf_jvp` (floating-point parameters and inputs are differentiated; buffers
    and integer inputs are not)."""

    @staticmethod
    def forward(key: str, *tensors: Tensor) -> Tensor:  # type: ignore[override]
        count = len(_module(key).tensors)
        return leaf_op(key, list(tensors[:count]), list(tensors[count:]))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.key = inputs[0]
        ctx.save_for_backward(*inputs[1:])
        ctx.save_for_forward(*inputs[1:])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        count = len(_module(ctx.key).tensors)
        saved = ctx.saved_tensors
        grads: list[Tensor | None] = [None] * len(saved)
        for i, g in zip(_differentiated(ctx.key, saved), _LeafVjp.apply(ctx.key, count, grad, *saved)):
            grads[i] = g
        return (None, *grads)

    @staticmethod
    def jvp(ctx: Any, _key: None, *tangents: Tensor | None) -> Tensor:  # type: ignore[override]
        count = len(_module(ctx.key).tensors)
        saved = ctx.saved_tensors
        zero = [torch.zeros_like(t) if d is None else d for d, t in zip(tangents, saved)]
        return leaf_jvp(ctx.key, list(saved[:count]), list(saved[count:]),
                        [zero[i] for i in _differentiated(ctx.key, saved)])


def _differentiated(key: str, tensors: Sequence[Tensor]) -> list[int]:
    """The positions in ``tensors`` (the leaf's parameters, its buffers, then its inputs) that the leaf ops
    differentiate: the floating-point parameters and inputs."""
    leaf = _module(key)
    buffers = range(leaf.params, len(leaf.tensors))
    return [i for i, t in enumerate(tensors) if t.is_floating_point() and i not in buffers]


def _differentiable(key: str, tensors: Sequence[Tensor], inputs: Sequence[Tensor]
                    ) -> tuple[Callable[..., Tensor], tuple[tuple[Tensor, ...], ...]]:
    """``(call, primals)``: the leaf as a function of its floating-point parameters and inputs, and their values
    (:func:`_differentiated`); buffers and integer inputs are held fixed."""
    count = len(tensors)
    positions = _differentiated(key, (*tensors, *inputs))
    float_tensors, float_inputs = [i for i in positions if i < count], [i - count for i in positions if i >= count]

    def call(differentiable_tensors: tuple[Tensor, ...], differentiable_inputs: tuple[Tensor, ...]) -> Tensor:
        return _call(key, _with(tensors, float_tensors, differentiable_tensors),
                     _with(inputs, float_inputs, differentiable_inputs))

    return call, (tuple(tensors[i] for i in float_tensors), tuple(inputs[i] for i in float_inputs))


def _with(values: Sequence[Tensor], positions: Sequence[int], replacements: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """``values`` with the entries at ``positions`` replaced by ``replacements``."""
    full = list(values)
    for i, t in zip(positions, replacements):
        full[i] = t
    return tuple(full)


@torch._dynamo.allow_in_graph
def leaf_call(key: str, tensors: list[Tensor], inputs: list[Tensor]) -> Tensor:
    """What the generated step calls for a leaf module: :class:`_LeafCall` (the op captured at trace time), one
    opaque call in a compiled step."""
    return _LeafCall.apply(key, *tensors, *inputs)


def is_leaf_call(node: torch.fx.Node) -> bool:
    """Whether ``node`` calls a leaf module (after :func:`retarget`)."""
    return node.op == "call_function" and node.target is leaf_call


def retarget(graph: torch.fx.Graph) -> None:
    """Make the graph's ``curvgraph::leaf`` ops call :func:`leaf_call` (differentiable under ``torch.func``)."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.curvgraph.leaf.default:
            node.target = leaf_call


class LeafShell(nn.Module):
    """Captured in place of a leaf module: the same Parameters, buffers and submodules (shared), one op as forward."""

    def __init__(self, module: nn.Module, key: str) -> None:
        super().__init__()
        self._parameters, self._buffers, self._modules = module._parameters, module._buffers, module._modules
        self.key = key

    def forward(self, *inputs: Tensor) -> Tensor:
        leaf = _module(self.key)
        tensors = [self.get_parameter(n) for n in leaf.tensors[:leaf.params]]
        tensors += [self.get_buffer(n) for n in leaf.tensors[leaf.params:]]
        return leaf_op(self.key, tensors, list(inputs))
