"""``curvgraph.compile``: wires trace -> passes -> plan -> instrument -> codegen -> optimizer."""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from . import codegen, kinds, methods, registry  # noqa: F401 -- importing kinds and methods registers the built-ins
from .curvature.losses import check_fisher, resolve_loss
from .errors import ConfigError
from .instrument import instrument
from .leaf import leaf_modules_of
from .methods.base import one_of, positive, positive_int
from .methods.quadratic import transposes_backward
from .optimizer import Captured, CurvatureOptimizer
from .passes import build_plan
from .passes.split import (DEFAULT_MAX_FACTOR_DIM, factor_dim_limit, resolve_max_factor_dim, split_factors,
                           wide_factors)
from .passes.subsample import subsample_positions
from .registry import resolve_fallback, resolve_method
from .trace import batch_only_dims, check_batch_symbolic, flatten_inputs, resolve_batch_dims, substituted, trace

#: Options of :func:`compile` that are not hyper-parameters of the method.
OPTIONS: dict[str, Any] = {
    "fisher": "mc",
    "kfac_approx": "expand",
    "max_factor_dim": "auto",
    "max_factor_memory": None,
    "conv_stats_every": 1,
    "factor_every": 1,
    "invert_every": 10,
    "fallback": "adam",
    "fallback_lr": None,
    "backend": "inductor",
    "seed": None,
    "progress": True,
    "batch_dim": None,
    "dynamic": "all",
    "output": None,
    "leaf_modules": None,
    "autocast": None,
}


def compile(  # noqa: A001 -- the public name, like torch.compile
    model: nn.Module,
    example_inputs: Tensor | tuple[Tensor, ...] | Mapping[str, Tensor] | None = None,
    loss: str | nn.Module = "cross_entropy",
    method: str = "kfac",
    **options: Any,
) -> CurvatureOptimizer:
    r"""Compile ``model`` into a second-order training step.

    The model is captured as one FX graph (``torch.export``), its dense layers are
    found by pattern-matching passes, the graph is instrumented so that one forward and
    backward also yield every block's Kronecker-factor statistics, and a step for this
    architecture is generated and compiled with ``torch.compile``.

    Without ``example_inputs`` (``curvgraph.compile(model, loss=...)``) nothing is captured
    yet: as with ``torch.compile(model)``, the capture happens at the first
    ``opt.step(inputs, targets)``, from that batch. ``opt.param_groups`` exist from the
    start (``[0]``: curvature, holding every trainable parameter until the capture moves
    the unmatched ones to ``[1]``: fallback, in place), so schedulers and edits made
    before the first step apply; ``opt.plan`` prints "nothing captured yet";
    ``opt.load_state_dict`` loads the hyper-parameters at once and the step state at the
    capture (see :class:`~curvgraph.CurvatureOptimizer`). The model is captured in the
    train/eval modes its modules are in then, and again at the first step in other modes.

    Args:
        model: the model; its own parameters are updated in place by ``step``.
        example_inputs: a batch of the model's inputs: a tensor or a tuple (positional,
            ``model(*inputs)``), or a dict of tensors (keyword, ``model(**inputs)``, the
            Hugging Face convention; ``step`` then takes dicts with the same keys), batch
            first unless ``batch_dim`` says otherwise. Sizes the model does not pin
            (batch size, sequence length) stay symbolic: later batches may differ in
            them (``dynamic="batch"``: only the batch size). ``None``: captured at the first ``step``.
        loss: ``"cross_entropy"`` (classes on dim 1 of the prediction: ``(N, C)``,
            ``(N, C, d1, ...)``, or flattened rows ``(N*T, C)`` with targets ``(N*T,)``),
            ``"token_cross_entropy"`` (classes last: logits ``(N, T, V)``, targets
            ``(N, T)``), ``"mse"``, ``"bce_with_logits"`` or an instance of
            ``nn.CrossEntropyLoss``/``nn.MSELoss``/``nn.BCEWithLogitsLoss`` with
            ``reduction="mean"`` or ``"sum"``. The factors approximate the curvature of
            this loss: with ``"sum"`` it is ``K`` times the mean's (``numel`` for MSE and
            BCE), so a step with ``damping=d`` is the mean loss's step with ``d / K``
            (``docs/conventions.md``).
        method: the update rule, a registered method's name: ``"kfac"`` or ``"singd"`` (options in
            ``docs/methods.md``; see ``curvgraph.register_method`` to add one).
        **options: hyper-parameters of the method and compile options:

            * ``lr`` (``"auto"``: step size and momentum from the quadratic model each
              step, with Levenberg-Marquardt damping; a number for a fixed step size),
              ``momentum`` (``"auto"``; 0.9 with a numeric ``lr``), ``weight_decay`` (0),
              ``damping`` (1e-3, factored Tikhonov; the initial value with ``lr="auto"``),
              ``ema`` (0.95; factor decay, ``0`` keeps only the last batch), ``kl_clip``
              (1e-3, with a numeric ``lr`` only; ``None`` disables),
              ``temporal`` (``"expand"``; ``"option1"``: the chain-structured
              approximation of Martens, Ba & Johnson 2018 for rnn blocks): K-FAC's,
              see :mod:`curvgraph.methods.kfac` and ``docs/getting-started.md`` for
              why these defaults;
            * ``fisher``: ``"mc"`` (one label sampled from the model's predictive
              distribution; the default unless the method names another, e.g.
              SINGD's ``"empirical"``), ``"empirical"`` or ``"type2"`` (exact GGN);
            * ``kfac_approx``: ``"expand"`` or ``"reduce"`` for weight sharing;
            * ``max_factor_dim``: split every dense or conv factor wider than this into
              diagonal blocks of at most this size, which cuts its memory, statistics and
              refresh (see :mod:`curvgraph.passes.split`); K-FAC and EKFAC. ``"auto"``, the default:
              2048 for K-FAC and EKFAC (``DEFAULT_MAX_FACTOR_DIM``), no split for the other methods
              (a warning names their factors wider than that); ``None``: never split;
            * ``max_factor_memory``: a budget in bytes for the curvature state (factors,
              inverses, momentum; the plan's ``state`` column): the largest ``max_factor_dim``
              that fits it is chosen (the smaller of the two if both are given);
            * ``conv_stats_every``: compute each convolution's input factor ``A`` from every
              ``s``-th output position along each spatial dim only (1, the default: all;
              spatial subsampling, ``s^r`` times fewer patches; see :mod:`curvgraph.passes.subsample`);
            * ``factor_every`` (1), ``invert_every`` (10): statistics and inversion
              periods in steps;
            * ``fallback``: ``"adam"`` or ``"sgd"`` (or a registered rule's name) for
              parameters no pass matched;
              ``fallback_lr`` (Adam 1e-3, SGD 1e-2);
            * ``backend``: a ``torch.compile`` backend (``"inductor"``) or ``"eager"``
              to run the generated step without compiling it;
            * ``seed``: seed of the optimizer's own generator for MC sampling;
            * ``progress``: say on stderr when ``torch.compile`` compiles a variant of the step
              (statistics or not, refresh or not) and how long it took, and when a capture
              (``torch.export``) is still running after 10 s (default ``True``);
            * ``batch_dim``: where the batch is in the inputs: an int, or one int (or
              ``None``) per input, e.g. ``batch_dim=1`` for time-major ``(T, N, F)``
              inputs of ``nn.LSTM``; by default inferred from the graph (the input dim
              whose size is the output's dim 0), else 0. The output is batch first;
              its leading dim may also be batch x positions (flattened rows ``(N*T, V)``);
            * ``dynamic``: which input sizes stay symbolic: ``"all"`` (the default: every size
              the model does not pin, such as the batch size and a sequence length) or ``"batch"``
              (only each input's batch dim, ``batch_dim``'s or else dim 0; every other size is fixed
              at the example's, and a batch that differs there is refused with an ``InputError``).
              Capture and compiler then reason about fewer symbols: a model that reshapes by
              symbolic sizes gets its first step much sooner (a tiny Swin transformer's window
              partitions: capture and first schedule period 101 s, against more than 25 minutes
              with ``"all"``; ``docs/benchmarks.md``);
            * ``output``: which part of what the model returns is the prediction the
              loss sees: a key or attribute name (``"logits"`` of a Hugging Face
              ``ModelOutput`` or a dict), an int index (a tuple with caches), or a
              callable applied to the return value; needed when it is not a tensor;
            * ``leaf_modules``: submodules to keep opaque (module names such as
              ``"encoder.layer.0"``, or ``nn.Module`` subclasses): each is captured as
              one call that runs it eagerly inside the step, e.g. for Python control flow
              that ``torch.export`` cannot trace; their parameters train with the
              fallback on exact gradients; the compiled step calls them as opaque ops (see
              :mod:`curvgraph.leaf`);
            * ``autocast``: ``torch.bfloat16`` or ``torch.float16`` to run the model's forward
              (and backward) under ``torch.autocast`` on the parameters' device, as mixed-precision
              PyTorch training does; factors, inverses and updates stay in float32 (or the
              parameters' dtype if wider). By default the autocast dtype of an enclosing
              ``with torch.autocast(...)`` around ``compile``, else none. ``step`` then ignores any
              enclosing autocast and rejects one of another dtype.

    Returns:
        A :class:`~curvgraph.CurvatureOptimizer`.

    Raises:
        ConfigError: an invalid argument, the model fails on ``example_inputs``, or
            ``output`` picks no tensor from what it returns (the message lists it).
        TraceError: the model cannot be captured as one graph (the message names the
            module and source line, and offers ``leaf_modules``).

    Without ``example_inputs``, the same errors come from the first ``step``.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"curvgraph: model must be an nn.Module, got {type(model).__name__}.")
    if example_inputs is not None:
        flatten_inputs(example_inputs, "example_inputs")  # checked before the other arguments
    loss_spec = resolve_loss(loss)
    method_class = resolve_method(method)
    unknown = set(options) - set(OPTIONS) - set(method_class.hyper)
    if unknown:
        raise ConfigError(f"curvgraph: unknown option(s) {sorted(unknown)} for method {method_class.name!r}; valid: "
                          f"{sorted(set(OPTIONS) | set(method_class.hyper))}.")
    rule, hyper = method_class.configure({k: v for k, v in options.items() if k in method_class.hyper})
    fixed = rule.compile_options()
    for key, value in fixed.items():
        if key in options and options[key] != value:
            raise ConfigError(f"curvgraph: method {method_class.name!r} sets {key}={value!r} from its "
                              f"hyper-parameters; got {key}={options[key]!r}. Leave {key} out.")
    defaults = {**OPTIONS, "fisher": method_class.default_fisher or OPTIONS["fisher"]}
    settings = {**defaults, **{k: v for k, v in options.items() if k in OPTIONS}, **fixed}
    fisher = check_fisher(settings["fisher"])
    for key in ("factor_every", "invert_every"):
        if not isinstance(settings[key], int) or isinstance(settings[key], bool) or settings[key] < 1:
            raise ConfigError(f"curvgraph: {key} must be a positive integer, got {settings[key]!r}.")
    fallback = resolve_fallback(settings["fallback"])
    fallback_hyper = dict(fallback.defaults)
    if settings["fallback_lr"] is not None:
        fallback_hyper["lr"] = positive("fallback_lr", settings["fallback_lr"])
    backend = settings["backend"]
    if not isinstance(backend, str):
        raise ConfigError(f"curvgraph: backend must be a string ('inductor', 'eager', ...), got {backend!r}.")

    if not (settings["max_factor_dim"] is None or isinstance(settings["max_factor_dim"], str)
            and settings["max_factor_dim"] == "auto"):
        try:
            positive_int("max_factor_dim", settings["max_factor_dim"])
        except ConfigError as exc:
            raise ConfigError(f"{exc} Or 'auto' (the default: {DEFAULT_MAX_FACTOR_DIM} for K-FAC and EKFAC), or "
                              "None (no split).") from None
    if settings["max_factor_memory"] is not None:
        positive("max_factor_memory", settings["max_factor_memory"])
    positive_int("conv_stats_every", settings["conv_stats_every"])
    one_of("all", "batch")("dynamic", settings["dynamic"])
    leaves = leaf_modules_of(model, settings["leaf_modules"])
    device = next(iter(model.parameters()), torch.empty(0)).device
    autocast = resolve_autocast(settings["autocast"], device.type)
    block_kinds = dict(registry.KINDS)
    inside_leaves = {id(m) for module in leaves.values() for m in module.modules()}

    def substitute(module: nn.Module) -> nn.Module | None:
        """The block kinds' replacement of ``module`` for capture (:meth:`BlockKind.substitute`), outside leaves."""
        if id(module) in inside_leaves:
            return None
        return next((r for k in block_kinds.values() if (r := k.substitute(module)) is not None), None)

    def dynamic_dims(inputs: tuple[Tensor, ...], keys: tuple[str, ...] | None) -> tuple[tuple[int, ...], ...] | None:
        """The dims captured symbolic (:func:`trace`'s ``dynamic_dims``): ``None`` (every dim) unless ``dynamic="batch"``."""
        return batch_only_dims(inputs, keys, settings["batch_dim"]) if settings["dynamic"] == "batch" else None

    def capture(inputs: tuple[Tensor, ...], keys: tuple[str, ...] | None) -> Captured:
        with torch.autocast(device.type, enabled=False):  # the graph in the parameters' dtypes; the step adds autocast
            traced = trace(model, inputs, substitute, keys=keys, output=settings["output"], leaves=leaves,
                           dynamic_dims=dynamic_dims(inputs, keys))
        resolve_batch_dims(traced, settings["batch_dim"])
        if settings["dynamic"] == "batch":
            check_batch_symbolic(traced)
        plan = build_plan(traced, block_kinds.values(), settings["kfac_approx"], traced.example_sizes(inputs),
                          transformed_backward=rule.differentiates_backward or fisher in codegen.VMAPPED_FISHERS)
        if settings["conv_stats_every"] > 1:
            subsample_positions(plan, settings["conv_stats_every"])
        max_dim = factor_dim_limit(plan, rule, resolve_max_factor_dim(settings["max_factor_dim"], rule),
                                   settings["max_factor_memory"])
        if max_dim is not None:
            split_factors(plan, max_dim, rule)
        elif settings["max_factor_dim"] == "auto" and (wide := wide_factors(plan)):
            warnings.warn(f"curvgraph: method {rule.name!r} keeps every factor whole, including {len(wide)} wider than "
                          f"{DEFAULT_MAX_FACTOR_DIM}: {'; '.join(wide[:4])}{'; ...' if len(wide) > 4 else ''}. Each "
                          "costs d^2 floats of state or more and d^3 FLOPs per refresh (the plan's state and "
                          "FLOPs/refresh columns). method='kfac' and 'ekfac' split factors wider than "
                          f"{DEFAULT_MAX_FACTOR_DIM} into diagonal blocks by default (max_factor_dim).", stacklevel=4)
        for block in plan.blocks:
            block.cost.update(rule.cost(block))
        forward = instrument(traced, plan)
        param_dtype = next((p.dtype for p in model.parameters() if p.requires_grad), torch.float32)
        args, kwargs = (inputs, {}) if keys is None else ((), dict(zip(keys, inputs)))
        with substituted(model, substitute):  # the model as captured
            transposable = rule.differentiates_backward and transposes_backward(model, args, kwargs, settings["output"])
        generated = codegen.generate(plan, forward, traced.dims, block_kinds, rule, fallback, loss_spec, fisher,
                                     param_dtype, batch=traced.batch, autocast=autocast,
                                     backward_differentiable=transposable)
        return Captured(plan, forward, generated, codegen.load(generated), traced.inputs, keys, traced.batch_dims,
                        [traced.constants[c] for c in forward.constants], traced.size_conditions)

    opt = CurvatureOptimizer(
        model, capture, method=rule, fallback=fallback, loss=loss_spec, fisher=fisher, hyper=hyper,
        fallback_hyper=fallback_hyper, factor_every=settings["factor_every"], invert_every=settings["invert_every"],
        backend=backend, seed=settings["seed"], progress=settings["progress"], autocast=autocast,
        dynamic=settings["dynamic"],
    )
    if example_inputs is not None:
        opt.capture(example_inputs)
    return opt


def resolve_autocast(value: object, device_type: str) -> tuple[str, torch.dtype] | None:
    """``(device_type, dtype)`` for the ``autocast`` option: ``value``, or the enclosing ``torch.autocast``'s dtype
    on ``device_type`` when ``value`` is ``None`` and one is active; ``None`` for no autocast."""
    if value is None:
        if not torch.is_autocast_enabled(device_type):
            return None
        value = torch.get_autocast_dtype(device_type)
    if value not in (torch.bfloat16, torch.float16):
        raise ConfigError(f"curvgraph: autocast must be torch.bfloat16, torch.float16 or None, got {value!r}.")
    return device_type, value
