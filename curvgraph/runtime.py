"""The run-time half of a generated step, shared by the optimizer and exported modules.

A generated step (:mod:`curvgraph.codegen`) is a pure function of tensors. What runs
it -- the optimizer state and how it starts, the statistics/refresh schedule
(``factor_every``, ``invert_every``), the Monte-Carlo noise and its generator, the
cache of ``hyper`` tensors, the step counters and their checkpoint -- is
:class:`StepRunner`. :class:`~curvgraph.CurvatureOptimizer` runs its step with one;
:meth:`~curvgraph.CurvatureOptimizer.export` copies this module's definitions
(:data:`EXPORTED`, with ``inspect``) into the exported file, where
:class:`ExportedStep` runs the same step with the same runner. So everything here
needs ``torch`` alone (and the standard library): no curvgraph imports.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import warnings
from typing import Any, Callable, Collection, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .inductor_passes import (PruneUnusedOutputs, RecomputeForLateReaders, _elementwise, _may_write, _recomputation,
                              _runs, _tensor_bytes, _times_true_after, prune_unused_outputs, recompute_for_late_readers)
from .passes.graph_utils import schema_args, set_schema_arg


def initial_state(shape: tuple[int, ...], init: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A state tensor as it starts: ``"zeros"``, ``"ones"``, or ``"eye"`` (identities over the last two dims)."""
    if init == "eye":
        return torch.eye(shape[-1], dtype=dtype, device=device).expand(shape).clone()
    if init == "ones":
        return torch.ones(shape, dtype=dtype, device=device)
    if init == "zeros":
        return torch.zeros(shape, dtype=dtype, device=device)
    raise ValueError(f"curvgraph: unknown state initialization {init!r}; use 'zeros', 'ones' or 'eye'.")


def convolution_double_backward(ggI: Tensor | None, ggW: Tensor | None, ggb: Tensor | None, gO: Tensor,
                                 weight: Tensor, input: Tensor, stride: Sequence[int], padding: Sequence[int],
                                 dilation: Sequence[int], transposed: bool, output_padding: Sequence[int], groups: int,
                                 output_mask: Sequence[bool]) -> tuple[Tensor | None, ...]:
    r"""``aten._convolution_double_backward`` from ``convolution`` and ``convolution_backward``, sizes kept symbolic.

    A convolution :math:`y = \mathrm{conv}(x, W) + b` is bilinear in :math:`(x, W)`, so its
    backward :math:`(g_O, x, W) \mapsto (g_x, g_W, g_b)` has the vector-Jacobian product, for
    the cotangents :math:`(gg_x, gg_W, gg_b)` of its outputs,

    * with respect to :math:`g_O`: :math:`\mathrm{conv}(gg_x, W) + \mathrm{conv}(x, gg_W) + gg_b`;
    * with respect to :math:`x`: the input gradient of :math:`\mathrm{conv}(\cdot, gg_W)` at :math:`g_O`;
    * with respect to :math:`W`: the weight gradient of :math:`\mathrm{conv}(gg_x, \cdot)` at :math:`g_O`.

    torch 2.13's C++ kernel reads its tensors' sizes as plain integers, so tracing it (the
    step's curvature products differentiate its backward pass) fixes the batch size of the
    compiled step; this one only calls ops with symbolic sizes. ``None`` where ``output_mask``
    is false (autograd reads only the outputs it asks for) or where no cotangent contributes.
    """
    args = (stride, padding, dilation, transposed, output_padding, groups)
    ggO = None
    if output_mask[0]:
        terms = [torch.ops.aten.convolution(a, b, None, *args) for a, b in ((ggI, weight), (input, ggW))
                 if a is not None and b is not None]
        if ggb is not None:
            terms.append(ggb.reshape((1, -1) + (1,) * (gO.dim() - 2)).expand_as(gO))
        ggO = sum(terms[1:], terms[0]) if terms else torch.zeros_like(gO)
    gI = gW = None
    if output_mask[1] and ggW is not None:
        gI = torch.ops.aten.convolution_backward(gO, input, ggW, None, *args, [True, False, False])[0]
    if output_mask[2] and ggI is not None:
        gW = torch.ops.aten.convolution_backward(gO, ggI, weight, None, *args, [False, True, False])[1]
    return ggO, gI, gW


def batch_norm_backward(grad_out: Tensor, input: Tensor, weight: Tensor | None, running_mean: Tensor | None,
                        running_var: Tensor | None, save_mean: Tensor | None, save_invstd: Tensor | None, train: bool,
                        eps: float, output_mask: Sequence[bool]) -> tuple[Tensor | None, ...]:
    r"""``aten.native_batch_norm_backward`` from differentiable ops, so that its derivative keeps sizes symbolic.

    With :math:`\hat x = (x - m)\,s` per channel (dim 1), :math:`n` the entries per channel,
    :math:`\gamma` the weight (1 without one) and the output gradient :math:`g`:

    * :math:`g_\beta = \sum g`, :math:`g_\gamma = \sum g \hat x` (sums over every dim but 1);
    * in training, :math:`m` and :math:`s = (v + \epsilon)^{-1/2}` come from the batch's mean and
      biased variance :math:`v`, which depend on :math:`x`:
      :math:`g_x = \gamma s\,(g - (g_\beta + \hat x g_\gamma) / n)`;
    * in evaluation, from the running statistics: :math:`g_x = \gamma s\, g`.

    torch 2.13 differentiates the op with ``batchnorm_double_backward``, a C++ function that reads
    its tensors' sizes as plain integers, so tracing the curvature products through it fixes the
    batch size of the compiled step. Written as its math, with the training statistics recomputed
    from ``input`` (``save_mean`` and ``save_invstd`` hold the same values but no derivative with
    respect to it), the op is differentiated op by op. Half-precision inputs are computed in
    float32, as by the kernel. ``None`` where ``output_mask`` is false.
    """
    dims = [d for d in range(input.dim()) if d != 1]
    per_channel = [1, -1] + [1] * (input.dim() - 2)
    dtype = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    x, g = input.to(dtype), grad_out.to(dtype)
    if train:
        variance, mean = torch.var_mean(x, dims, correction=0)
        invstd = torch.rsqrt(variance + eps)
    else:
        mean, invstd = running_mean.to(dtype), torch.rsqrt(running_var.to(dtype) + eps)
    normalized = (x - mean.reshape(per_channel)) * invstd.reshape(per_channel)
    grad_bias = g.sum(dims)
    grad_weight = (g * normalized).sum(dims)
    if train:
        count = x.numel() // x.shape[1]
        g = g - (grad_bias.reshape(per_channel) + normalized * grad_weight.reshape(per_channel)) / count
    scale = invstd if weight is None else invstd * weight.to(dtype)
    parameter_dtype = input.dtype if weight is None else weight.dtype
    return ((g * scale.reshape(per_channel)).to(input.dtype) if output_mask[0] else None,
            grad_weight.to(parameter_dtype) if output_mask[1] else None,
            grad_bias.to(parameter_dtype) if output_mask[2] else None)


@contextlib.contextmanager
def batch_norm_backward_as_ops(enabled: bool = True) -> Iterator[None]:
    """While active (if ``enabled``), tracing differentiates batch norm's backward as :func:`batch_norm_backward`.

    :func:`batch_norm_backward` is registered as the Python kernel of
    ``aten.native_batch_norm_backward``'s ``Autograd`` key, which only the tracers' Python
    dispatcher consults: eager calls keep the C++ kernels. A step traced so keeps its batch size
    symbolic through the curvature products, but runs slower (a ResNet-style CNN's step: 1.4-1.6x,
    since Inductor fuses the backward's ops into the statistics' patch kernels), so
    :class:`StepRunner` enables it only for a step that differentiates the backward and whose
    inputs differ in shape from the first step's: the first graph stays fixed to its batch size
    and fast, and a second, symbolic graph serves every other batch size (a model with batch
    norm would otherwise compile one graph per batch size, and fail at Dynamo's recompile limit).
    """
    op, key = torch.ops.aten.native_batch_norm_backward.default, torch._C.DispatchKey.Autograd
    if not enabled or key in op.py_kernels:
        yield
        return
    op.py_impl(key)(batch_norm_backward)
    try:
        yield
    finally:
        del op.py_kernels[key]
        op._dispatch_cache.clear()


def symbolic_double_backward() -> None:
    """Trace ``aten._convolution_double_backward`` as :func:`convolution_double_backward` (once per process).

    The Python kernel is registered for the op's ``CompositeImplicitAutograd`` key, which
    only the tracers' Python dispatcher consults (as torch registers its own symbolic
    decompositions): eager calls still run the C++ kernel, and a compiled step keeps its
    batch size symbolic through the curvature products' double backward.
    """
    op = torch.ops.aten._convolution_double_backward.default
    key = torch._C.DispatchKey.CompositeImplicitAutograd
    if key not in op.py_kernels:
        op.py_impl(key)(convolution_double_backward)


class _NoShimFallbackNotes(logging.Filter):
    """Drops Inductor's note that an op of a C++-wrapped graph is called through the dispatcher (the op has no C
    entry point): a note about how a working graph calls an op, which a user cannot act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is missing a c-shim implementation" not in str(record.msg)


def build_objects_side_by_side(lock_path: str, cpp_builders: Sequence[Any]) -> None:
    """Inductor's ``torch._inductor.codecache._worker_compile_cpp`` (torch 2.13), with the two compiler runs of a
    C++ wrapper built apart from its kernels side by side.

    Built apart (``cpp_wrapper_build_separate``), a graph is three builds: the wrapper's object
    file (``-O1``), the kernels' (``-O3``) and the link of the two, which Inductor passes here in
    that order and runs one after the other. The two object files need nothing of each other,
    so the wrapper's compiles in a thread (its compiler process on another core) while the
    kernels' compiles in this one, and the link follows both. On 2 cores, ResNet-style CNN
    32x32x3: wrapper 14.5 s and kernels 17.1 s, 32 s in a row. Any other list of builds (a
    precompiled header, a graph built in one run) runs in order. As in Inductor: under the
    graph's file lock, and a build whose output exists is skipped.
    """
    from torch._inductor.codecache import LOCK_TIMEOUT
    from torch.utils._filelock import FileLock

    def build(builder: Any) -> None:
        if not os.path.exists(builder.get_target_file_path()):
            builder.build()

    with FileLock(lock_path, timeout=LOCK_TIMEOUT):
        if len(cpp_builders) != 3:
            for builder in cpp_builders:
                build(builder)
            return
        wrapper, kernels, link = cpp_builders
        failures: list[BaseException] = []

        def build_wrapper() -> None:
            try:
                build(wrapper)
            except BaseException as exc:  # noqa: BLE001 - raised again in the calling thread
                failures.append(exc)

        thread = threading.Thread(target=build_wrapper, name="curvgraph-wrapper-build")
        thread.start()
        try:
            build(kernels)
        finally:
            thread.join()
        if failures:
            raise failures[0]
        build(link)


def inductor_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    """Inductor (``compile_fx``), on the CPU with its C++ wrapper (``cpp_wrapper``) built in two compiler runs
    (``cpp_wrapper_build_separate``) side by side (:func:`build_objects_side_by_side`).

    The C++ wrapper compiles the code that allocates the step's buffers and calls its kernels
    and library ops (about 150 calls per step of the MNIST-1D MLP, 10,600 lines of C++ for the
    MLP 784-512-512-256-10) instead of running it as Python, which shortens small steps (the
    MNIST-1D MLP and CNN 7-8%, the char transformer 4x256 8%). Built separately, the wrapper is
    compiled at ``-O1`` and the kernels at ``-O3``; built with the kernels in one run, all of
    it was compiled at ``-O3`` (MLP 784-512-512-256-10: 8.8 s against 1.8 + 4.7 s). Without
    the wrapper each kernel is its own compiler run. Cold compile and first schedule period,
    2 cores, fresh processes with empty caches (none, one run, two runs): MNIST-1D MLP 29.3-30.6
    -> 27.8 s, MNIST-1D CNN 31.0-33.4 -> 28.6-29.9 s, MLP 784-512-512-256-10 29.6-29.9 -> 26.6-27.6
    s; without the wrapper and with it in two runs: ResNet-style CNN 100.2 -> 82.3 s, LSTM 256
    over 40 steps 140.6 -> 140.3 s, char transformer 161.1 -> 169.5 s. The first compile on a
    machine also builds the kernels' precompiled header, once (1.2-2.7 s more). Ops without a C entry
    point (``aten.linalg_cholesky_ex`` in torch 2.13) are called through the dispatcher;
    Inductor's warning about each is dropped (:class:`_NoShimFallbackNotes`).

    On the CPU, Inductor's layout optimization is off. With it, every convolution reads its input
    in channels-last layout, and a layer input in the contiguous layout that the batch norm and
    activation kernels write gets one channels-last copy per pass that convolves it: the loss's
    backward, the sampled Fisher's backward and the curvature products each made their own, right
    after the forward, and held it until that pass ran. A ResNet-style CNN (batch 128) held three
    copies of every layer input at its peak: the defaults' tensor peak went from 228.7 to 160.5 MiB
    without them, the fixed mode's from 181.9 to 129.2 MiB, and the steps got faster (defaults
    418-467 -> 383-400 ms, fixed mode 296-328 -> 266-279 ms). On a GPU it stays on: not measured there.

    On every device, curvgraph's two post-grad passes run after Inductor's (and after any the
    user set): :class:`curvgraph.inductor_passes.PruneUnusedOutputs` (a convolution's backward in
    the sampled Fisher's pass no longer computes its weight's gradient) and
    :class:`curvgraph.inductor_passes.RecomputeForLateReaders` (a large elementwise value that a
    later pass reads again is computed again there instead of being kept).
    """
    import torch._inductor.config as inductor_config
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.custom_graph_pass import get_custom_graph_passes

    on_cpu = all(t.device.type == "cpu" for t in example_inputs if isinstance(t, Tensor))
    if on_cpu:
        inductor_ir_log = logging.getLogger("torch._inductor.ir")
        if not any(isinstance(f, _NoShimFallbackNotes) for f in inductor_ir_log.filters):
            inductor_ir_log.addFilter(_NoShimFallbackNotes())
    from torch._inductor import codecache

    inductors_builds = getattr(codecache, "_worker_compile_cpp", None)
    if on_cpu and inductors_builds is not None:
        codecache._worker_compile_cpp = build_objects_side_by_side  # looked up when the graph's module is built
    try:
        users_passes = get_custom_graph_passes(inductor_config.post_grad_custom_post_pass)
        patches = {"cpp_wrapper": on_cpu, "cpp_wrapper_build_separate": on_cpu,
                   "post_grad_custom_post_pass": [*users_passes, PruneUnusedOutputs(), RecomputeForLateReaders()]}
        if on_cpu:
            patches["layout_optimization"] = False
        return compile_fx(gm, example_inputs, config_patches=patches)
    finally:
        if inductors_builds is not None:
            codecache._worker_compile_cpp = inductors_builds


@functools.cache
def probe_vector_isa_in_background() -> threading.Thread:
    """Start Inductor's probe of the CPU's vector instruction sets in a daemon thread, once per process.

    Before it generates its first CPU kernel, Inductor compiles and loads a test program for
    each vector instruction set the CPU reports (``torch._inductor.cpu_vec_isa.pick_vec_isa``):
    with an empty cache directory about 8.5 s of C++ compiler runs on the 2-core benchmark
    machine, 1.5 s of loads with a warm one, paid in every process that compiles for the CPU,
    a ``torch.compile``d AdamW step as well. Inductor needs the answer only when it generates
    code, after Dynamo's and AOT autograd's tracing and its own lowering of the step (8-9 s for
    the MLP 784-512-512-256-10, minutes for larger steps), so the probe runs beside them: its
    compiler runs on another core. Inductor caches the answer (``functools.cache``); if it asks
    before the probe is done it probes too, and the per-program file locks and the compiled
    programs on disk keep that from compiling anything twice. A failure here is ignored:
    Inductor probes again when it needs the answer, and reports there.
    """
    from torch._inductor import codecache, cpp_builder, cpu_vec_isa  # noqa: F401 - imported here, not in the thread

    def probe() -> None:
        try:
            cpu_vec_isa.pick_vec_isa()
        except Exception:  # noqa: BLE001 - Inductor probes, and reports, again when it needs the answer
            pass

    thread = threading.Thread(target=probe, name="curvgraph-vector-isa-probe", daemon=True)
    thread.start()
    return thread


def compiled_step(fn: Callable, backend: str, device: torch.device) -> Callable:
    """``fn`` compiled with ``torch.compile`` as one graph, or ``fn`` itself for ``backend="eager"``.
    ``backend="inductor"`` is :func:`inductor_backend`; for a step on the CPU (``device``) it starts
    :func:`probe_vector_isa_in_background`, so that Inductor's probe of the CPU runs while the step is traced.

    The compiled step takes its ``refresh`` flag (the argument before the ``switches``)
    as a 0-d bool tensor, read by the refresh's custom op when it runs, so steps with and
    without a refresh run one graph (a Python bool would specialize the graph on it).

    While the step runs, the calls that ``torch.cond`` and ``torch.func`` leave in the
    captured graph are marked cacheable for Inductor's FX graph
    cache and AOT autograd's cache (``unsafe_marked_cacheable_functions``, keyed by the
    torch version), which otherwise bypass every graph that holds one: a second process
    compiling the same step then loads the compiled graph instead of tracing and
    lowering it again. Neither kind of call hides behaviour from the caches' keys: the
    branches of ``torch.cond`` are submodules of the graph module, whose code is part of
    the key, and the ``torch.func`` calls only enter and leave transform levels.
    """
    if backend == "eager":
        return fn
    import torch._inductor.config as inductor_config

    symbolic_double_backward()
    if backend == "inductor" and device.type == "cpu":
        probe_vector_isa_in_background()

    compiled = torch.compile(fn, backend=inductor_backend if backend == "inductor" else backend, fullgraph=True)
    flags = (torch.tensor(False), torch.tensor(True))  # made once: the step runs every few milliseconds
    # what the step's graph calls that torch 2.13's compile caches do not know to be safe: the
    # torch.cond higher-order op and the transform-level calls of torch.func.jvp/vmap
    calls = ["torch.ops.higher_order.cond"] + [f"torch._functorch.predispatch.{name}" for name in (
        "_add_batch_dim", "_remove_batch_dim", "_vmap_increment_nesting", "_vmap_decrement_nesting", "_make_dual",
        "_unpack_dual", "_jvp_increment_nesting", "_jvp_decrement_nesting", "_unwrap_for_grad", "_enter_dual_level",
        "_exit_dual_level")]
    cacheable = dict.fromkeys(calls, torch.__version__)

    def step(*args: Any) -> Any:
        *rest, refresh, switches = args
        saved = inductor_config.unsafe_marked_cacheable_functions
        inductor_config.unsafe_marked_cacheable_functions = {**saved, **cacheable}
        try:
            return compiled(*rest, flags[refresh], switches)
        finally:
            inductor_config.unsafe_marked_cacheable_functions = saved

    return step


def model_tensors(model: nn.Module, params: Sequence[Tensor], frozen: Sequence[str],
                  buffers: Sequence[str]) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], tuple[Tensor, ...]]:
    """The step's ``params``, ``frozen`` and ``buffers`` arguments: the trainable parameters (detached,
    sharing storage, so the step's in-place commits update the model), the frozen ones and the buffers by name."""
    return (tuple(p.detach() for p in params), tuple(model.get_parameter(n).detach() for n in frozen),
            tuple(model.get_buffer(n) for n in buffers))


def as_captured(tensor: Tensor, contiguous: bool = True) -> Tensor:
    """``tensor``, or a contiguous copy of it where it starts at an offset into its storage (a slice
    ``x[i:i + n]`` with ``i > 0`` of a larger tensor), or where the step was captured for a ``contiguous``
    tensor and ``tensor`` is not (``channels_last``, a transpose).

    ``torch.compile`` specializes a graph on an input's storage offset: a step compiled for a
    batch at a non-zero offset guards on the offset being at least 2, so in a training loop
    that slices its batches out of one tensor the first batch of the next epoch (offset 0)
    would compile the step again. ``torch.export`` records a ``reshape`` (``nn.Flatten``, ``x.view``)
    of a contiguous example as a ``view``, which fails on a tensor of another layout. A batch
    copied to its own contiguous storage costs one pass over it, far less than the step.
    """
    if tensor.storage_offset() or (contiguous and not tensor.is_contiguous()):
        return tensor.clone(memory_format=torch.contiguous_format)
    return tensor


def batch_hint(names: Sequence[str], batch_dims: Sequence[int | None]) -> str:
    """Where the step reads the batch size (the inputs' ``names`` and ``batch_dims``), and how to change that."""
    where = ", ".join(f"dim {d} of input '{name}'" for name, d in zip(names, batch_dims) if d is not None)
    return (f" The batch is taken from {where}; if that is wrong, pass batch_dim= to curvgraph.compile (an int, or "
            "one per input, e.g. batch_dim=1 for time-major (T, N, F) inputs).")


@functools.lru_cache(maxsize=None)
def _size_condition(expression: str) -> Any:
    """``expression`` (a condition over ``sizes``, :func:`batch_problem`) compiled once."""
    return compile(expression, "<size condition>", "eval")


def batch_problem(batch: Sequence[Tensor], targets: Tensor, inputs: Sequence[tuple], batch_dims: Sequence[int | None],
                  device: torch.device, fixed_sizes: str = "",
                  size_conditions: Sequence[tuple[str, str]] = ()) -> str | None:
    """What makes ``(batch, targets)`` unfit for the step, or ``None``.

    ``inputs``: per input, ``(name, shape, dtype, size_ranges)`` as captured (``None`` in ``shape`` for a size the
    graph keeps symbolic; ``size_ranges``: ``(dim, lowest, highest)`` for each such size the graph holds only in a
    range, ``highest`` ``None`` for no upper bound); ``batch_dims``: each input's batch dim (``None``: none);
    ``fixed_sizes``: why the captured sizes are fixed, added to the message for an input that differs in one;
    ``size_conditions``: ``(expression, guard)`` pairs, each expression over ``sizes`` (the inputs' shapes) true where
    the graph holds (:func:`curvgraph.trace.size_conditions`). Checks each input's rank, fixed sizes, dtype, ranges
    and device, the conditions, the targets' device, that the inputs agree on the batch size and that it is not 0.
    The targets' shape and values are the loss's to check.
    """
    for tensor, (name, shape, dtype, size_ranges), dim in zip(batch, inputs, batch_dims):
        fixed = all(s is None or s == t for s, t in zip(shape, tensor.shape))
        if tensor.dim() != len(shape) or not fixed or tensor.dtype != dtype:
            expected = tuple("*" if s is None else s for s in shape)
            pinned = (" A size of 1 in the example inputs is pinned by torch.export: capture with a batch of 2 or "
                      "more to keep it symbolic." if dim is not None and shape[dim] == 1 else "")
            return (f"curvgraph: input '{name}' has shape {tuple(tensor.shape)} and dtype {tensor.dtype}; the step "
                    f"was compiled for shape {expected} ('*' = any size) and dtype {dtype}. Recompile with "
                    "example inputs of the new shape if this is intended." + pinned + fixed_sizes)
        for d, lowest, highest in size_ranges:
            if tensor.shape[d] < lowest or (highest is not None and tensor.shape[d] > highest):
                return (f"curvgraph: input '{name}' has size {tensor.shape[d]} in dim {d}; the step was captured "
                        f"for sizes {f'of at least {lowest}' if highest is None else f'from {lowest} to {highest}'} "
                        "there. torch.export recorded a condition on that size in the model's forward (e.g. "
                        "`if x.shape[0] > 4:`), and the captured graph holds only where the condition does. Compile "
                        "another optimizer with example inputs of this size, or write the branch without the size "
                        "(torch.cond, or a flag).")
        if tensor.device != device:
            return (f"curvgraph: input '{name}' is on {tensor.device}, the model's parameters on {device}; move the "
                    f"batch to {device}.")
    shapes = tuple(tuple(t.shape) for t in batch)
    for expression, guard in size_conditions:
        if not eval(_size_condition(expression), {"__builtins__": {}, "min": min, "max": max}, {"sizes": shapes}):
            return (f"curvgraph: the batch's input sizes {', '.join(map(str, shapes))} break a condition that "
                    f"torch.export recorded on them in the model's forward, {guard}, and the captured graph holds only "
                    "where it does (a branch on a size, e.g. `if min(height, width) <= window:`). Compile another "
                    "optimizer with example inputs of these sizes, or capture with dynamic='batch' to fix every size "
                    "but the batch size.")
    if targets.device != device:
        return f"curvgraph: targets are on {targets.device}, the model's parameters on {device}; move them to {device}."
    sizes = [int(t.shape[d]) for t, d in zip(batch, batch_dims) if d is not None]
    hint = batch_hint([entry[0] for entry in inputs], batch_dims)
    if len(set(sizes)) > 1:
        return f"curvgraph: the inputs disagree on the batch size ({', '.join(map(str, sizes))})." + hint
    if 0 in sizes:
        return "curvgraph: the batch is empty (0 examples); skip it instead of stepping on it." + hint
    return None


def mark_dynamic(batch: Sequence[Tensor], dynamic_dims: Sequence[Sequence[int]], *others: Tensor | None) -> None:
    """Mark ``dynamic_dims`` of each input, and every dim of ``others``, as dynamic for ``torch.compile``.

    ``maybe_mark_dynamic`` is a hint: where the graph fixes a size (a class dim equal
    to a layer's width) the compiler specializes it without recompiling later.
    """
    for tensor, dims in zip(batch, dynamic_dims):
        for d in dims:
            torch._dynamo.maybe_mark_dynamic(tensor, d)
    for tensor in others:
        if tensor is not None:
            for d in range(tensor.dim()):
                torch._dynamo.maybe_mark_dynamic(tensor, d)


#: Class-index targets equal to this are ignored (PyTorch's and language-model data's padding convention).
IGNORE_INDEX = -100
#: The dtypes of class-index targets that torch's cross-entropy takes.
CLASS_INDEX_DTYPES = (torch.int64, torch.uint8)


def target_shape(output_shape: Sequence[int], class_dim: int | None) -> tuple[int, ...]:
    """The shape targets must have for a prediction of ``output_shape``: the prediction's own, or without its class
    dim ``class_dim`` for class indices."""
    if class_dim is None:
        return tuple(output_shape)
    dim = class_dim % len(output_shape)
    return tuple(output_shape[:dim]) + tuple(output_shape[dim + 1:])


def target_problem(targets: Tensor, output_shape: tuple[int, ...], class_dim: int | None, loss: str) -> str | None:
    """What is wrong with ``targets`` of loss ``loss`` for a prediction of ``output_shape``, or ``None``.

    ``class_dim``: the prediction's class dim for class-index targets, ``None`` for targets shaped like the
    prediction. Checks the dtype, the shape and, for class indices on the CPU (where it costs no device
    synchronization), that every index is a class or ``IGNORE_INDEX``.
    """
    if class_dim is not None:
        if targets.dtype not in CLASS_INDEX_DTYPES:  # torch's cross-entropy kernels take no other dtype
            integer = not (targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool)
            return (f"{loss} needs class indices of dtype torch.int64 (or torch.uint8), got dtype {targets.dtype}"
                    + (": pass targets.long()" if integer else ""))
        layout = ("the prediction without its last (class) dim" if class_dim == -1 else
                  "the prediction without its class dim 1")
    elif not targets.is_floating_point():
        return f"{loss} needs floating-point targets shaped like the prediction, got dtype {targets.dtype}"
    else:
        layout = "the prediction's shape"
    expected = target_shape(output_shape, class_dim)
    if tuple(targets.shape) != expected:
        return (f"{loss} needs targets of shape {expected} ({layout}; the prediction is {output_shape}), got "
                f"{tuple(targets.shape)}")
    if class_dim is not None and targets.device.type == "cpu" and targets.numel():
        classes = output_shape[class_dim]
        bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= classes))
        if bad.any():
            return (f"class index {int(targets[bad][0])} is out of range for {classes} classes (dim "
                    f"{class_dim % len(output_shape)} of the prediction {output_shape}; {IGNORE_INDEX} marks an "
                    "ignored target)")
    return None


def counts_nothing(targets: Tensor, class_dim: int | None) -> bool:
    """Whether a batch has no loss terms: every class-index target is ``IGNORE_INDEX`` (the mean loss is then
    ``0 / 0``). Reads the targets on the host: call it only where a step failed."""
    return class_dim is not None and targets.numel() > 0 and bool((targets == IGNORE_INDEX).all())


class StepRunner:
    """Runs a generated ``step`` function: its state, schedule, noise and hyper tensors.

    Args:
        step: the generated ``step(params, frozen, buffers, constants, inputs, targets,
            state, hyper, noise, update_stats, refresh, switches) -> (loss, ok, degenerate)``,
            compiled or not.
        noise_shape: the generated ``noise_shape(inputs)`` (the model output's shape).
        switches: the generated ``switches(hyper)`` (the step's Python bools for the
            hyper-parameters' values).
        state: state key -> ``(shape, init, dtype)`` (see :func:`initial_state`).
        noise: ``"uniform"`` or ``"normal"``: the Monte-Carlo Fisher's noise
            (drawn in statistics steps only); ``None`` for the other Fisher types.
        factor_every, invert_every: statistics and refresh periods in steps.
        device, factor_dtype: where the state lives and the dtype of the hyper tensors and noise.
        seed: seed of the runner's own generator (``None``: from ``torch.initial_seed()``).
        dynamic_dims: per input, the dims the captured graph keeps symbolic (batch,
            sequence length, ...). They, and every dim of the targets and the noise, are
            marked dynamic for ``torch.compile`` before each call, so that a batch of a
            new size runs the graphs already compiled instead of compiling new ones.
        transposes_backward: whether ``step`` differentiates the model's backward pass (the
            adaptive step's curvature products): then a step whose inputs differ in shape from
            the first step's traces batch norm's backward as ops
            (:func:`batch_norm_backward_as_ops`), which keeps their sizes symbolic through that
            derivative. A step that takes the backward only once keeps torch's kernel, whose
            sizes are symbolic already.
        contiguous: per input, whether the step was captured for a contiguous tensor: a batch
            of another layout is then copied to a contiguous one (:func:`as_captured`). Empty:
            every input.

    The schedule: statistics every ``factor_every`` steps and until a statistics step
    succeeded; a refresh every ``invert_every`` steps and until one succeeded, but
    never before any statistics exist. A step that is not finite (``ok`` false)
    changes nothing but the step counter and :attr:`skipped_steps`.

    Degenerate blocks: the step's ``degenerate`` flags (one per way a block can
    degenerate, in the generator's order) are counted in :attr:`degenerate_steps`;
    :attr:`last_degenerate` holds the step number (1-based) each flag was last raised at and
    :attr:`new_degenerate` the flags the last step raised for the first time (to warn once).
    """

    def __init__(self, step: Callable, noise_shape: Callable, switches: Callable,
                 state: Mapping[str, tuple[tuple[int, ...], str, torch.dtype]], noise: str | None, factor_every: int,
                 invert_every: int, device: torch.device, factor_dtype: torch.dtype, seed: int | None,
                 dynamic_dims: Sequence[Sequence[int]] = (), transposes_backward: bool = True,
                 contiguous: Sequence[bool] = (), optional: Collection[str] = ()) -> None:
        self.use(step, noise_shape, switches, dynamic_dims, transposes_backward, contiguous)
        self.noise = noise
        self.factor_every = factor_every
        self.invert_every = invert_every
        self.device = device
        self.factor_dtype = factor_dtype
        self.state = {key: initial_state(shape, init, dtype, device) for key, (shape, init, dtype) in state.items()}
        self.state_spec = dict(state)
        self.optional = frozenset(optional)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed if seed is not None else int(torch.initial_seed()) % (2**63))
        self.step_count = 0
        self.skipped_steps = 0
        self.factors_ready = False
        self.refreshed = False
        self.degenerate_steps: list[int] = []
        self.last_degenerate: list[int | None] = []
        self.new_degenerate: list[int] = []
        self._hyper_values: dict[str, float] = {}
        self._hyper_tensors: dict[str, Tensor] = {}
        self._first_shapes: tuple[torch.Size, ...] | None = None

    def use(self, step: Callable, noise_shape: Callable, switches: Callable,
            dynamic_dims: Sequence[Sequence[int]] = (), transposes_backward: bool = True,
            contiguous: Sequence[bool] = ()) -> None:
        """Run ``step`` (with its ``noise_shape``, ``switches``, its inputs' ``dynamic_dims``, whether it
        ``transposes_backward`` and which inputs it was captured ``contiguous``) from now on:
        another graph of the same step, such as the model captured in other train/eval modes. The state, schedule,
        counters and generator stay: the two graphs must take the same state."""
        self.step_fn = step
        self.noise_shape = noise_shape
        self.switches = switches
        self.dynamic_dims = tuple(tuple(d) for d in dynamic_dims)
        self.transposes_backward = transposes_backward
        self.contiguous = tuple(contiguous)

    def schedule(self) -> tuple[bool, bool]:
        """``(update_stats, refresh)`` for the next step."""
        update_stats = self.step_count % self.factor_every == 0 or not self.factors_ready
        refresh = (self.step_count % self.invert_every == 0 or not self.refreshed) and (
            update_stats or self.factors_ready)
        return update_stats, refresh

    def hyper(self, values: Mapping[str, float]) -> dict[str, Tensor]:
        """The step's ``hyper`` 0-d tensors for ``values``, rebuilt only when a value changed."""
        if values != self._hyper_values:
            self._hyper_values = dict(values)
            self._hyper_tensors = {k: torch.tensor(v, dtype=self.factor_dtype, device=self.device)
                                   for k, v in values.items()}
        return self._hyper_tensors

    def sample_noise(self, batch: Sequence[Tensor]) -> Tensor:
        """Standard uniform or normal noise shaped like the model output for ``batch``."""
        shape = self.noise_shape(batch)
        if self.noise == "normal":
            return torch.randn(shape, generator=self.generator, device=self.device, dtype=self.factor_dtype)
        return torch.rand(shape, generator=self.generator, device=self.device, dtype=self.factor_dtype)

    def run(self, params: Sequence[Tensor], frozen: Sequence[Tensor], buffers: Sequence[Tensor],
            constants: Sequence[Tensor], batch: tuple[Tensor, ...], targets: Tensor,
            hyper_values: Callable[[bool], Mapping[str, float]]) -> tuple[Tensor, bool]:
        """One step; returns ``(loss, ok)``.

        ``hyper_values(first_statistics)`` gives the hyper-parameters as floats;
        ``first_statistics`` is true until a statistics step succeeded.
        """
        update_stats, refresh = self.schedule()
        batch = tuple(as_captured(t, c) for t, c in zip(batch, self.contiguous or (True,) * len(batch)))
        targets = as_captured(targets)
        noise = self.sample_noise(batch) if self.noise is not None and update_stats else None
        mark_dynamic(batch, self.dynamic_dims, targets, noise)
        values = hyper_values(not self.factors_ready)
        hyper, switches = self.hyper(values), self.switches(values)
        shapes = tuple(t.shape for t in batch)
        self._first_shapes = self._first_shapes or shapes
        # the step sets its own precision (compile's autocast)
        with torch.autocast(self.device.type, enabled=False), batch_norm_backward_as_ops(
                self.transposes_backward and shapes != self._first_shapes):
            try:
                loss, ok, degenerate = self.step_fn(tuple(params), tuple(frozen), tuple(buffers), tuple(constants),
                                                    batch, targets, self.state, hyper, noise, update_stats, refresh,
                                                    switches)
            except torch._dynamo.exc.FailOnRecompileLimitHit as exc:
                raise RuntimeError(
                    f"curvgraph: the step was compiled {torch._dynamo.config.recompile_limit} times "
                    f"(torch._dynamo.config.recompile_limit), and inputs of shapes {[tuple(s) for s in shapes]} "
                    "need another graph; nothing was changed. A graph is compiled for each combination of what the "
                    "model fixes in the step: shapes (batch sizes below 16 on CPU convolutions; every batch size of "
                    "a model whose backward has no derivative), dtypes, train/eval modes. Feed "
                    "fewer distinct shapes (e.g. drop_last=True, or pad to a few sizes) or raise "
                    "torch._dynamo.config.recompile_limit.") from exc
        self.step_count += 1
        self._record_degenerate(degenerate)
        ok = bool(ok)
        if ok:
            self.factors_ready |= update_stats
            self.refreshed |= refresh
        else:
            self.skipped_steps += 1
        return loss, ok

    def _record_degenerate(self, degenerate: Tensor) -> None:
        flags = degenerate.tolist()
        if len(self.degenerate_steps) != len(flags):
            self.degenerate_steps, self.last_degenerate = [0] * len(flags), [None] * len(flags)
        self.new_degenerate = [i for i, raised in enumerate(flags) if raised and not self.degenerate_steps[i]]
        for i, raised in enumerate(flags):
            if raised:
                self.degenerate_steps[i] += 1
                self.last_degenerate[i] = self.step_count

    def stats(self, reported: Mapping[str, str]) -> dict[str, float | int]:
        """``steps`` and ``skipped_steps`` so far, and the ``reported`` state entries (full key -> name) as numbers:
        one host read each, which waits for the last step."""
        values = {name: self.state[key].item() for key, name in reported.items()}
        return {"steps": self.step_count, "skipped_steps": self.skipped_steps, **values}

    def state_dict(self) -> dict[str, Any]:
        """The state tensors (copies), counters and the generator state."""
        return {
            "state": {k: v.clone() for k, v in self.state.items()},
            "step_count": self.step_count,
            "skipped_steps": self.skipped_steps,
            "factors_ready": self.factors_ready,
            "refreshed": self.refreshed,
            "generator": self.generator.get_state(),
            "degenerate_steps": list(self.degenerate_steps),
            "last_degenerate": list(self.last_degenerate),
        }

    def check_state_dict(self, state_dict: Mapping[str, Any]) -> str | None:
        """Why ``state_dict`` does not fit this runner's state (``None`` if it does): other entries or shapes, or an
        entry with a non-finite value, which no step writes (loaded, every later step would be skipped)."""
        saved = state_dict["state"]
        missing, extra = sorted(set(self.state) - set(saved) - self.optional), sorted(set(saved) - set(self.state))
        if missing or extra:
            return (f"state_dict does not match this step's state (missing {missing[:5]}, unexpected {extra[:5]}): it "
                    "was saved for another model or plan, or with options that keep other state (lr='auto' or a "
                    "fixed lr, momentum, the method's options); compile with the model and options it was saved with")
        for key, tensor in saved.items():
            if tensor.shape != self.state[key].shape:
                return (f"state '{key}' has shape {tuple(tensor.shape)} in the state_dict, "
                        f"{tuple(self.state[key].shape)} here: was it saved for another model, or with factors split "
                        "differently (max_factor_dim, max_factor_memory, whose default 'auto' splits K-FAC's and "
                        "EKFAC's widest factors)? Compile with the options it was saved with")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return (f"state '{key}' holds non-finite values in the state_dict. A step commits its state only "
                        "when every value is finite, so the state_dict was changed after it was saved; load an "
                        "earlier checkpoint, or leave the optimizer's state out to start it afresh")
        return None

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict` (check it first with :meth:`check_state_dict`); the optional entries it lacks
        (it was saved before they existed) start again from their initial values."""
        for key, tensor in state_dict["state"].items():
            self.state[key].copy_(tensor)
        for key in self.optional - set(state_dict["state"]):
            shape, init, dtype = self.state_spec[key]
            self.state[key].copy_(initial_state(shape, init, dtype, self.device))
        self.step_count = state_dict["step_count"]
        self.skipped_steps = state_dict["skipped_steps"]
        self.factors_ready = state_dict["factors_ready"]
        self.refreshed = state_dict["refreshed"]
        self.generator.set_state(state_dict["generator"])
        self.degenerate_steps = list(state_dict.get("degenerate_steps", []))
        self.last_degenerate = list(state_dict.get("last_degenerate", []))
        self.new_degenerate = []


class ExportedStep:
    """The training step of an exported module, bound to one model (what its ``load(model)`` returns).

    ``step(inputs, targets)`` updates the model's parameters (and buffers) in place and
    returns the loss, exactly as :meth:`curvgraph.CurvatureOptimizer.step` does for the
    hyper-parameters the module was exported with (:attr:`hyper`; change a value
    there to schedule it). ``state_dict()`` / ``load_state_dict()`` checkpoint it; a
    :class:`~curvgraph.CurvatureOptimizer`'s ``state_dict()`` for the same model and
    method loads too (its ``param_groups`` are not read).
    """

    def __init__(self, model: nn.Module, *, step: Callable, noise_shape: Callable, switches: Callable,
                 spec: Mapping[str, Any], constants: Sequence[Tensor], backend: str, seed: int | None) -> None:
        self.model = model
        self.method = spec["method"]
        self.hyper = dict(spec["hyper"])
        self.first_statistics = dict(spec["first_statistics"])
        names = dict(model.named_parameters())
        missing = [n for n in spec["params"] if n not in names]
        mismatched = [f"'{n}' {tuple(names[n].shape)}, exported for {shape}"
                      for n, shape in zip(spec["params"], spec["param_shapes"]) if n in names and names[n].shape != shape]
        if missing or mismatched:
            raise ValueError(f"curvgraph: this step was exported for another model ({type(model).__name__} "
                             + (f"has no parameter {missing}" if missing else f"has {'; '.join(mismatched)}")
                             + "); load it with the model it was exported from, or export again from this one.")
        self._params = [names[n] for n in spec["params"]]
        self._frozen_names = list(spec["frozen"])
        self._buffer_names = list(spec["buffers"])
        self.n_inputs = spec["inputs"]
        self.input_shapes = spec["input_shapes"]
        self.batch_dims = spec["batch_dims"]
        self.size_conditions = tuple(spec.get("size_conditions", ()))
        self.loss, self.class_dim = spec["loss"], spec["class_dim"]
        self.keys = spec["keys"]
        self.degenerations = tuple(spec.get("degenerations", ()))
        self.reported = dict(spec.get("reported", ()))
        device = self._params[0].device
        self.constants = tuple(c.to(device) for c in constants)
        self.runner = StepRunner(compiled_step(step, backend, device), noise_shape, switches, spec["state"],
                                 spec["noise"], spec["factor_every"], spec["invert_every"], device,
                                 spec["factor_dtype"], seed, spec["dynamic_dims"],
                                 spec["transposes_backward"], spec["contiguous"], spec.get("optional_state", ()))

    def _hyper_values(self, first_statistics: bool) -> dict[str, float]:
        return {**self.hyper, **self.first_statistics} if first_statistics else self.hyper

    def step(self, inputs: Tensor | tuple[Tensor, ...] | Mapping[str, Tensor], targets: Tensor) -> Tensor:
        """One training step on a batch (a dict with the same keys if the model takes keyword inputs);
        returns the batch loss (before the update)."""
        if (self.keys is None) == hasattr(inputs, "keys"):  # a mapping (this file imports torch alone)
            raise ValueError(f"this step takes {'a dict with keys ' + str(list(self.keys)) if self.keys else 'tensors'}"
                             f", got {type(inputs).__name__}")
        if self.keys is not None:
            missing = [k for k in self.keys if k not in inputs]
            if missing:
                raise ValueError(f"this step takes a dict with keys {list(self.keys)}; {missing} missing")
            inputs = tuple(inputs[k] for k in self.keys)
        batch = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
        if len(batch) != self.n_inputs:
            raise ValueError(f"this step takes {self.n_inputs} input tensor(s), got {len(batch)}")
        problem = batch_problem(batch, targets, self.input_shapes, self.batch_dims, self.runner.device,
                                size_conditions=self.size_conditions)
        if problem is None:
            output_shape = tuple(self.runner.noise_shape(batch))
            problem = target_problem(targets, output_shape, self.class_dim, self.loss)
            problem = problem and f"curvgraph: bad targets: {problem}."
        if problem:
            raise ValueError(problem)
        params, frozen, buffers = model_tensors(self.model, self._params, self._frozen_names, self._buffer_names)
        loss, ok = self.runner.run(params, frozen, buffers, self.constants, batch, targets, self._hyper_values)
        no_terms = not ok and counts_nothing(targets, self.class_dim)
        if not no_terms:  # with no loss terms every factor of G is 0/0: not the blocks' fault
            for i in self.runner.new_degenerate:
                warnings.warn(f"step {self.runner.step_count}: {self.degenerations[i]}", RuntimeWarning, stacklevel=2)
        if not ok:
            cause = ("every target is -100 (ignored), so the mean loss has no terms; skip such batches" if no_terms else
                     f"the loss ({loss.item():.4g}) or the update is not finite")
            warnings.warn(f"step {self.runner.step_count} skipped: {cause}; parameters, buffers and optimizer state "
                          "are unchanged.", RuntimeWarning, stacklevel=2)
        return loss

    @property
    def skipped_steps(self) -> int:
        """How many steps were skipped because they were not finite."""
        return self.runner.skipped_steps

    def stats(self) -> dict[str, float | int]:
        """As :meth:`curvgraph.CurvatureOptimizer.stats`: ``steps``, ``skipped_steps`` and what the method reports
        (with ``lr="auto"``: the damping, rejected steps, the last step's ``rho``, ...)."""
        return self.runner.stats(self.reported)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically: state tensors, hyper-parameters, counters, RNG."""
        return {"method": self.method, "hyper": dict(self.hyper), **self.runner.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict` (or a ``CurvatureOptimizer``'s) saved for the same model and method."""
        if state_dict.get("method") != self.method:
            raise ValueError(f"state_dict is for method {state_dict.get('method')!r}, this step runs {self.method!r}")
        problem = self.runner.check_state_dict(state_dict)
        if problem:
            raise ValueError(problem)
        self.runner.load_state_dict(state_dict)
        self.hyper.update(state_dict.get("hyper", {}))


#: The constants an exported module defines as here (by name), before :data:`EXPORTED`.
EXPORTED_CONSTANTS = ("IGNORE_INDEX", "CLASS_INDEX_DTYPES")
#: What an exported module copies from here, in order.
EXPORTED = (initial_state, convolution_double_backward, batch_norm_backward, batch_norm_backward_as_ops,
            symbolic_double_backward, _NoShimFallbackNotes, build_objects_side_by_side, schema_args,
            set_schema_arg, prune_unused_outputs, PruneUnusedOutputs, recompute_for_late_readers, _elementwise,
            _tensor_bytes, _runs, _recomputation, _may_write, _times_true_after, RecomputeForLateReaders,
            inductor_backend,
            probe_vector_isa_in_background, compiled_step, model_tensors, as_captured, batch_hint, _size_condition,
            batch_problem, target_shape, target_problem, counts_nothing, mark_dynamic, StepRunner, ExportedStep)
