"""The optimizer object users hold: runs the generated step and keeps its state."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from .codegen import GeneratedStep
from .curvature.losses import LossSpec
from .errors import (CompileError, ConfigError, DegenerateBlockWarning, InputError, NonFiniteStepWarning,
                     NotCapturedError, StalledTrainingWarning)
from .instrument import InstrumentedForward
from .methods.base import Method
from .methods.fallback import FallbackRule
from .plan import Plan
from .runtime import StepRunner, batch_hint, batch_problem, compiled_step, model_tensors
from .trace import InputSpec, describe_modes, flatten_inputs, modes_of

# Inductor itself triggers this deprecation notice while compiling the step; users cannot act on it.
warnings.filterwarnings("ignore", message="`torch._prims_common.check` is deprecated", category=FutureWarning)


#: Seconds a capture runs before :func:`said_if_slow` says so on stderr.
CAPTURE_NOTICE_S = 10.0


@contextlib.contextmanager
def said_if_slow(message: str, enabled: bool) -> Iterator[None]:
    """Print ``message`` on stderr if the block is still running :data:`CAPTURE_NOTICE_S` seconds after it started,
    and then, when it ends, how long it took; nothing for a block that ends sooner, or if not ``enabled``.

    A capture usually takes a few seconds, but ``torch.export`` reasons about every symbolic
    size of the model, and a few models make that slow: a tiny Swin transformer's window
    partitions over a symbolic image height and width take it over two minutes.
    """
    if not enabled:
        yield
        return
    start, said = time.perf_counter(), threading.Event()

    def say() -> None:
        print(message, file=sys.stderr, flush=True)
        said.set()

    timer = threading.Timer(CAPTURE_NOTICE_S, say)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()  # a notice being printed now is printed whole first
        if said.is_set():
            print(f"curvgraph: captured in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


@dataclass
class Captured:
    """What capturing the model on a batch produced (see :func:`curvgraph.compile`).

    Attributes:
        plan, forward, generated: the plan, the instrumented forward and the generated step.
        namespace: the executed step module (``step``, ``noise_shape``, ...).
        inputs: the user inputs the step takes, in order.
        keys: their names when the model is called by keyword (``model(**batch)``), else ``None``.
        batch_dims: the batch dim of every input (``None``: no batch dim).
        constants: the model's lifted constants, in ``forward.constants`` order.
        size_conditions: conditions on the input sizes under which the graph holds
            (:attr:`curvgraph.trace.TracedModel.size_conditions`).
    """

    plan: Plan
    forward: InstrumentedForward
    generated: GeneratedStep
    namespace: dict[str, Any]
    inputs: list[InputSpec]
    keys: tuple[str, ...] | None
    batch_dims: tuple[int | None, ...]
    constants: list[Tensor]
    size_conditions: tuple[tuple[str, str], ...] = ()


#: The key of :meth:`CurvatureOptimizer.diagnostics` under which it reports the causes of the whole step.
STEP_DIAGNOSTICS = "(step)"
#: ``(inputs, keys) -> Captured``: captures the model on a batch (``keys`` for keyword inputs).
Capture = Callable[[tuple[Tensor, ...], "tuple[str, ...] | None"], Captured]


def not_captured(model_name: str, what: str) -> NotCapturedError:
    """The error for asking for ``what`` before ``model_name`` is captured."""
    return NotCapturedError(f"curvgraph: {what} needs the captured model, and nothing is captured yet: {model_name} "
                            "is captured at the first step(inputs, targets). Pass example_inputs to curvgraph.compile "
                            "to capture it now.")


class NotCapturedPlan:
    """``opt.plan`` before the model is captured: it prints as such, and any attribute raises
    :class:`~curvgraph.NotCapturedError`."""

    def __init__(self, model_name: str) -> None:
        self._model_name = model_name

    def __repr__(self) -> str:
        return (f"curvgraph plan for {self._model_name}: nothing captured yet (the model is captured at the first "
                "step(inputs, targets), from that batch; pass example_inputs to curvgraph.compile to capture it now)")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise not_captured(self._model_name, f"opt.plan.{name}")


class CurvatureOptimizer(torch.optim.Optimizer):
    """A compiled second-order training step for one model.

    Created by :func:`curvgraph.compile`. ``step(inputs, targets)`` runs forward,
    backward, curvature statistics, preconditioning and the update of the model's own
    parameters in place, and returns the loss (a detached 0-d tensor). Without
    ``example_inputs``, the model is captured (and the step generated) at the first
    ``step``, from that batch, as ``torch.compile(model)`` compiles at the first call;
    :attr:`captured` says whether that happened.

    Train and eval mode: each step runs the model in the modes its modules are in when it is
    called (dropout, BatchNorm, ... as in PyTorch; the parameters are updated in either
    mode). The first step in modes not seen yet captures the model again, from that batch;
    all captures share the optimizer state, and a capture whose generated step is the same
    shares its compiled graph too (see :meth:`capture`).

    Parameter groups: ``param_groups[0]`` (``"role": "curvature"``) holds the parameters
    of the curvature blocks and the method's hyper-parameters (``lr``, ``damping``, ...);
    ``param_groups[1]`` (``"role": "fallback"``) holds the fallback parameters with the
    fallback rule's hyper-parameters (its ``lr`` is the ``fallback_lr`` of
    :func:`curvgraph.compile`); either may be empty. Both exist from construction:
    before the model is captured, the curvature group holds every trainable parameter
    and the fallback group none; the capture moves the parameters no pass matched to
    the fallback group, in place, so the group dicts -- with any value you or a
    ``torch.optim.lr_scheduler`` set in them -- and their indices stay. Both are read at
    every step, so schedulers work, and changing a value needs no recompilation.

    Attributes:
        plan: the :class:`~curvgraph.Plan` the step was generated for (before the
            capture, an object that prints "nothing captured yet").
        source: Python source of the generated step module.
        skipped_steps: how many steps were skipped because they were not finite.
        dynamic: which input sizes a capture keeps symbolic (``"all"`` or ``"batch"``, the option of
            :func:`curvgraph.compile`).
    """

    def __init__(self, model: nn.Module, capture: Capture, *, method: Method, fallback: FallbackRule, loss: LossSpec,
                 fisher: str, hyper: dict[str, Any], fallback_hyper: dict[str, Any], factor_every: int,
                 invert_every: int, backend: str, seed: int | None, progress: bool = False,
                 autocast: tuple[str, torch.dtype] | None = None, dynamic: str = "all") -> None:
        self.model = model
        self.method = method
        self.fallback = fallback
        self.loss = loss
        self.fisher = fisher
        self.factor_every = factor_every
        self.invert_every = invert_every
        self.backend = backend
        self.autocast = autocast
        self.dynamic = dynamic
        self._capture_fn = capture
        self._captured: Captured | None = None  # the capture of the modes the last step (or capture) ran in
        self._captures: dict[tuple[bool, ...], Captured] = {}  # by the modules' modes (modes_of)
        self._steps: dict[str, Callable] = {}  # generated source -> its step, compiled once for all modes
        self._pending_state: dict[str, Any] | None = None
        self._seed = seed
        self._progress = progress and backend != "eager"
        self._announce_capture = progress
        self._compiled_variants: set[tuple[str, bool]] = set()  # (generated source, statistics)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ConfigError(f"curvgraph: {type(model).__name__} has no trainable parameters (requires_grad=True).")
        super().__init__([{"params": trainable, "role": "curvature", **hyper},
                          {"params": [], "role": "fallback", **fallback_hyper}], {})
        # torch.optim's convention, read by schedulers (OneCycleLR's cycle_momentum looks for "momentum"); set after
        # the groups exist, so that the fallback group does not take the method's keys as its defaults
        self.defaults = dict(hyper)
        self._groups_fixed = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """The two groups are made at construction (see the class docstring); another is a :class:`ConfigError`."""
        if getattr(self, "_groups_fixed", False):
            raise ConfigError(
                "curvgraph: a CurvatureOptimizer has its two parameter groups (curvature and fallback) for the model's "
                "trainable parameters; the step would not train a group added later. Train other parameters with a "
                "torch.optim optimizer of their own, or make them part of the model before compiling.")
        super().add_param_group(param_group)

    @property
    def captured(self) -> bool:
        """Whether the model is captured (at :func:`curvgraph.compile` with ``example_inputs``, else at the first step)."""
        return self._captured is not None

    @property
    def plan(self) -> Plan | NotCapturedPlan:
        """The :class:`~curvgraph.Plan` of the captured model (a :class:`NotCapturedPlan` before the capture); of the
        train/eval modes the last step ran in when the model was captured in several."""
        return self._captured.plan if self._captured is not None else NotCapturedPlan(type(self.model).__name__)

    @property
    def source(self) -> str:
        """Python source of the generated step module (of the modes the last step ran in)."""
        return self._require_capture("opt.source").generated.source

    def _require_capture(self, what: str) -> Captured:
        if self._captured is None:
            raise not_captured(type(self.model).__name__, what)
        return self._captured

    def capture(self, inputs: Tensor | tuple[Tensor, ...] | Mapping[str, Tensor]) -> None:
        """Capture the model on a batch of ``inputs``, in the train/eval modes its modules are in now, and generate its
        step: what the first :meth:`step` in these modes does when they are not captured yet. Raises
        :class:`~curvgraph.ConfigError` if they are.

        The first capture sorts the parameters into blocks and the fallback and creates the
        optimizer state; a capture in other modes (a graph with dropout off, BatchNorm on its
        running statistics, ...) shares them, and must find the same blocks.
        """
        modes = modes_of(self.model)
        if modes in self._captures:
            raise ConfigError(f"curvgraph: {type(self.model).__name__} is captured already in these modes "
                              f"({describe_modes(self.model)}); compile anew to capture it on other inputs.")
        batch, keys = flatten_inputs(inputs, "example_inputs")
        hint = (" torch.export reasons about every symbolic input size; if only the batch size changes from batch to "
                "batch, curvgraph.compile(..., dynamic='batch') fixes the others and captures faster."
                if self.dynamic == "all" else "")
        with said_if_slow(f"curvgraph: capturing {type(self.model).__name__} in {describe_modes(self.model)} "
                          f"(torch.export and the block passes) ...{hint}", self._announce_capture):
            captured = self._capture_fn(batch, keys)
        forward = captured.forward
        if not forward.params:
            raise ConfigError(f"curvgraph: {captured.plan.model_name} has no trainable parameters used by its forward "
                              "pass.")
        generated = captured.generated
        state = {key: (spec.shape, spec.init, spec.dtype or generated.factor_dtype) for key, spec in generated.state.items()}
        if self._captured is not None:
            self._check_same_step(captured, state)
        if generated.source not in self._steps:
            device = self.model.get_parameter(forward.names[forward.params[0]]).device
            self._steps[generated.source] = compiled_step(captured.namespace["step"], self.backend, device)
        if self._captured is None:
            self._create_state(captured, state)
        self._captures[modes] = captured
        self._use(captured)

    def _create_state(self, captured: Captured, state: dict[str, tuple[tuple[int, ...], str, torch.dtype]]) -> None:
        """Sort the parameters into the curvature and fallback groups (in place) and create the step's runner and state
        for the first capture; load a :meth:`load_state_dict` that waited for it."""
        forward, plan = captured.forward, captured.plan
        named = {p: self.model.get_parameter(forward.names[p]) for p in forward.params}
        in_blocks = {p for b in plan.blocks for p in b.placeholders}
        self.param_groups[0]["params"] = [named[p] for b in plan.blocks for p in b.placeholders]
        self.param_groups[1]["params"] = [named[p] for p in forward.params if p not in in_blocks]
        self._captured_params = {name: (p, p.requires_grad, p.dtype, p.device) for name, p in self.model.named_parameters()}
        self._state_spec = state
        self._runner = StepRunner(
            self._steps[captured.generated.source], captured.namespace["noise_shape"], captured.namespace["switches"],
            state, self.loss.noise if self.fisher == "mc" else None, self.factor_every, self.invert_every,
            named[forward.params[0]].device, captured.generated.factor_dtype, self._seed,
            optional=[key for key, spec in captured.generated.state.items() if spec.optional])
        pending, self._pending_state = self._pending_state, None
        if pending is not None:
            problem = self._runner.check_state_dict(pending)
            if problem:
                for group, before in zip(self.param_groups, pending["groups_before"]):
                    group.update(before)
                raise ConfigError(f"curvgraph: the state_dict loaded before the capture does not fit the captured step "
                                  f"({problem}); it was not loaded, nor its hyper-parameters (param_groups).")
            self._runner.load_state_dict(pending)

    def _check_same_step(self, captured: Captured, state: dict[str, tuple[tuple[int, ...], str, torch.dtype]]) -> None:
        """A :class:`~curvgraph.ConfigError` unless ``captured`` (the model in other modes) has the blocks, fallback
        parameters and state of the first capture, which it shares."""
        first = next(iter(self._captures.values())).plan

        def layout(plan: Plan) -> tuple[object, ...]:
            return tuple((b.name, b.kind, b.params) for b in plan.blocks), tuple(plan.fallback_params)

        def blocks(plan: Plan) -> list[str]:
            return [f"{b.name} ({b.kind})" for b in plan.blocks]

        if layout(captured.plan) != layout(first) or state != self._state_spec:
            raise ConfigError(
                f"curvgraph: {captured.plan.model_name} in its current modes ({describe_modes(self.model)}) captures to "
                f"other blocks or optimizer state than when it was first captured (blocks now {blocks(captured.plan)}, "
                f"then {blocks(first)}; fallback now {list(captured.plan.fallback_params)}, then "
                f"{list(first.fallback_params)}). The optimizer state is shared between train and eval modes; switch "
                "the modules back, or compile a separate optimizer for these modes."
            )

    def _use(self, captured: Captured) -> None:
        """Make ``captured`` the graph :meth:`step` runs (the state stays)."""
        forward = captured.forward
        self._captured = captured
        self._params = [self.model.get_parameter(forward.names[p]) for p in forward.params]
        self._forward = forward
        self._generated = captured.generated
        self._inputs = captured.inputs
        self._input_shapes = tuple((s.name, s.shape, s.dtype, s.size_ranges) for s in captured.inputs)
        self._constants = tuple(captured.constants)
        self._frozen_names = [forward.names[p] for p in forward.frozen]
        self._buffer_names = [forward.names[b] for b in forward.buffers]
        self._runner.use(self._steps[captured.generated.source], captured.namespace["noise_shape"],
                         captured.namespace["switches"], tuple(spec.symbolic_dims for spec in captured.inputs),
                         captured.generated.transposes_backward, tuple(spec.contiguous for spec in captured.inputs))

    @property
    def skipped_steps(self) -> int:
        """How many steps were skipped because they were not finite."""
        return self._runner.skipped_steps if self._captured is not None else 0

    def stats(self) -> dict[str, float | int]:
        """The run so far, read after the last step: ``steps`` (calls of :meth:`step` since the capture),
        ``skipped_steps`` (not finite: nothing changed, see :meth:`step`) and what the method reports of its
        own state (the method's :meth:`~curvgraph.methods.base.Method.reported` entries; K-FAC and EKFAC with
        ``lr="auto"``: the damping, rejected steps and the last step's quadratic model, listed at
        :meth:`curvgraph.methods.kfac.KFAC.reported` and explained in ``docs/getting-started.md``). Reading it
        waits for the last step to finish (one host read per value)."""
        if self._captured is None:
            return {"steps": 0, "skipped_steps": 0}
        return self._runner.stats(self.method.reported())

    @property
    def _state(self) -> dict[str, Tensor]:
        self._require_capture("the optimizer state")
        return self._runner.state

    # ------------------------------------------------------------------ stepping
    def step(self, inputs: Tensor | tuple[Tensor, ...] | Mapping[str, Tensor], targets: Tensor) -> Tensor:  # type: ignore[override]
        """One training step on a batch; returns the batch loss (before the update).

        Args:
            inputs: the model's inputs: a tensor or a tuple of tensors (positional,
                ``model(*inputs)``) or a dict of tensors (keyword, ``model(**inputs)``), as
                the example inputs were, shaped like them up to symbolic sizes (batch
                first unless ``batch_dim`` said otherwise). Without example inputs, the
                first batch is captured.
            targets: what the loss compares the prediction with: class indices
                (``cross_entropy``: the prediction's shape without dim 1;
                ``token_cross_entropy``: without its last dim) or a float tensor shaped
                like the prediction (``mse``, ``bce_with_logits``).

        Raises :class:`~curvgraph.InputError` for a batch the step does not take (wrong
        number, names, shapes, dtypes or device of the inputs or targets, an empty batch,
        class indices out of range on the CPU), before anything changes. A step whose
        loss, factors or update are not finite changes nothing (parameters, buffers,
        optimizer state; except that the factors, and a preconditioner refresh computed from them,
        are kept when the loss, gradients and factors are finite and only the update is not) and emits a
        :class:`~curvgraph.NonFiniteStepWarning`; :attr:`skipped_steps` counts them.
        """
        batch, keys = flatten_inputs(inputs, "inputs", InputError)
        if not isinstance(targets, Tensor):
            raise InputError(f"curvgraph: targets must be a tensor, got {type(targets).__name__}.")
        self._check_model()
        modes = modes_of(self.model)
        if modes not in self._captures:
            self.capture(inputs)
        elif self._captures[modes] is not self._captured:
            self._use(self._captures[modes])
        batch = self._arrange(batch, keys)
        self._check_batch(batch, targets)
        params, frozen, buffers = model_tensors(self.model, self._params, self._frozen_names, self._buffer_names)
        # the refresh is one opaque call inside the graph: no variant of its own
        variant = (self._generated.source, self._runner.schedule()[0])
        announce = self._progress and variant not in self._compiled_variants
        if announce:
            graphs_note = ("statistics in every step, the refresh one call in the graph" if self.factor_every == 1 else
                           f"statistics: {'yes' if variant[1] else 'no'}; one graph with statistics and one without, "
                           "as the schedule uses them")
            print(f"curvgraph: compiling the step for {self.plan.model_name} in {describe_modes(self.model)} "
                  f"({graphs_note}) ...", file=sys.stderr, flush=True)
            start, graphs = time.perf_counter(), torch._dynamo.utils.counters["stats"]["unique_graphs"]
        try:
            loss, ok = self._runner.run(params, frozen, buffers, self._constants, batch, targets, self._hyper_values)
        except torch._dynamo.exc.TorchDynamoException as exc:
            raise CompileError(
                f"curvgraph: torch.compile could not compile the generated step for {self.plan.model_name} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                "Pass backend='eager' to curvgraph.compile to run the same step without torch.compile."
            ) from exc
        if announce:
            self._compiled_variants.add(variant)
            compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
            what = "compiled and ran" if compiled else "ran (a graph compiled before fits; nothing compiled)"
            print(f"curvgraph: {what} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        no_terms = not ok and self.loss.counts_nothing(targets)
        if not no_terms:  # with no loss terms every factor of G is 0/0: not the blocks' fault
            self._warn_degenerate()
        if not ok:
            cause = ("every target is -100 (ignored), so the mean loss has no terms; skip such batches" if no_terms else
                     f"the loss ({loss.item():.4g}) or the update is not finite")
            warnings.warn(
                f"curvgraph: step {self._runner.step_count} skipped: {cause}; parameters, buffers and optimizer state "
                "are unchanged (but for a preconditioner refresh from finite statistics)."
                + ("" if no_terms else " If this repeats, check the batch for inf/nan, or lower lr / raise damping."),
                NonFiniteStepWarning,
                stacklevel=3,  # past torch.optim's step wrapper, to the caller
            )
        return loss

    def _warn_degenerate(self) -> None:
        """One :class:`~curvgraph.DegenerateBlockWarning` for each block and cause the last step raised for the
        first time, and one :class:`~curvgraph.StalledTrainingWarning` for each such cause of the whole step."""
        for i in self._runner.new_degenerate:
            degeneration = self._generated.degenerations[i]
            if degeneration.block is None:  # the step as a whole: its message says what to do
                category, advice = StalledTrainingWarning, ""
            else:
                category = DegenerateBlockWarning
                advice = " If it persists, raise damping or check the scale of the inputs."
            warnings.warn(
                f"curvgraph: step {self._runner.step_count}: {degeneration.describe()}. "
                f"Warned once; opt.diagnostics() counts every step.{advice}",
                category,
                stacklevel=4,  # past _warn_degenerate, step and torch.optim's step wrapper, to the caller
            )

    def _check_model(self) -> None:
        """An :class:`~curvgraph.InputError` if the model's parameters are not those of the capture (a module or
        parameter replaced or removed, a dtype or device changed, a parameter frozen or unfrozen), or an enclosing
        ``torch.autocast`` differs from compile's ``autocast``."""
        if self._captured is not None:
            self._check_parameters()
        device = next(p for group in self.param_groups for p in group["params"]).device.type
        if torch.is_autocast_enabled(device) and (device, torch.get_autocast_dtype(device)) != self.autocast:
            compiled = f"autocast={self.autocast[1]}" if self.autocast else "no autocast"
            raise InputError(
                f"curvgraph: step is called inside torch.autocast(dtype={torch.get_autocast_dtype(device)}), but the step "
                f"was compiled with {compiled}; its precision is fixed at compile. Compile inside the autocast context "
                "(or pass autocast= to curvgraph.compile), or call step outside it."
            )

    def _check_parameters(self) -> None:
        """The part of :meth:`_check_model` about the parameters: the step holds the captured ``Parameter`` objects
        and was generated for their dtypes, devices and ``requires_grad``."""
        captured = self._captured_params
        now = dict(self.model.named_parameters())
        for name in [*now, *(n for n in captured if n not in now)]:
            if name not in now or name not in captured or now[name] is not captured[name][0]:
                what = ("was removed" if name not in now else "is new" if name not in captured else
                        "is another Parameter object (its module or the parameter was replaced)")
                raise InputError(
                    f"curvgraph: parameter '{name}' {what} since the step was compiled; the step holds the parameters "
                    "it was compiled for and would train those. Compile again after changing the model's modules or "
                    "parameters (to re-initialize a layer in place, use module.reset_parameters() or write into "
                    "weight.data).")
            p, requires_grad, dtype, device = captured[name]
            if p.requires_grad != requires_grad:
                raise InputError(
                    f"curvgraph: parameter '{name}' has requires_grad={p.requires_grad} but had {requires_grad} when "
                    "the step was compiled; which parameters train (and their blocks) is fixed at compile. Compile "
                    "again after freezing or unfreezing parameters.")
            if (p.dtype, p.device) != (dtype, device):
                raise InputError(
                    f"curvgraph: parameter '{name}' is {p.dtype} on {p.device} but was {dtype} on {device} when the "
                    "step was compiled (model.to(), .double(), .half() since?); the step's precision and device are "
                    "fixed at compile. Compile again after moving or casting the model.")

    def _hyper_values(self, first_statistics: bool) -> dict[str, float]:
        """The step's hyper-parameters as floats, read from ``param_groups``."""
        values: dict[str, float] = {}
        for group in self.param_groups:
            if group["role"] == "curvature":
                values.update(self.method.step_values(group, first_statistics=first_statistics))
            else:
                values.update(self.fallback.hyper(group))
        return values

    def _arrange(self, batch: tuple[Tensor, ...], keys: tuple[str, ...] | None) -> tuple[Tensor, ...]:
        """The batch's tensors in the captured inputs' order (keyword inputs matched by name)."""
        expected = self._captured.keys
        names = ", ".join(expected or (s.name for s in self._inputs))
        if expected is None:
            if keys is not None:
                raise InputError(f"curvgraph: the step was captured for positional inputs ({names}), got a dict with keys "
                                 f"{list(keys)}; pass a tensor or a tuple, or compile with a dict of example inputs.")
            if len(batch) != len(self._inputs):
                raise InputError(f"curvgraph: the step was compiled for {len(self._inputs)} input(s) ({names}), "
                                 f"got {len(batch)}.")
            return batch
        if keys is None:
            raise InputError(f"curvgraph: the step was captured for keyword inputs ({names}): pass a dict with these "
                             "keys, as model(**inputs) takes them.")
        given = dict(zip(keys, batch))
        missing, extra = [k for k in expected if k not in given], [k for k in keys if k not in expected]
        if missing or extra:
            raise InputError(f"curvgraph: the step was captured for keyword inputs ({names}); the batch "
                             + (f"lacks {missing}" if missing else "") + (" and " if missing and extra else "")
                             + (f"has unexpected {extra}" if extra else "")
                             + ". Pass the same keys at every step (targets go in the second argument of step).")
        return tuple(given[k] for k in expected)

    def _check_batch(self, batch: tuple[Tensor, ...], targets: Tensor) -> None:
        """Raise :class:`InputError` for a batch the step cannot take; changes nothing."""
        batch_dims = self._captured.batch_dims
        fixed_sizes = (" It was captured with dynamic='batch', which fixes every size but the batch size; "
                       "dynamic='all' (the default) keeps the sizes the model does not pin symbolic."
                       if self.dynamic == "batch" else "")
        problem = batch_problem(batch, targets, self._input_shapes, batch_dims, self._runner.device, fixed_sizes,
                                self._captured.size_conditions)
        if problem:
            raise InputError(problem)
        output_shape = tuple(self._runner.noise_shape(batch))
        problem = self.loss.check_targets(targets, output_shape)
        if problem:
            other_batch = targets.dim() > 0 and output_shape and targets.shape[0] != output_shape[0]
            hint = batch_hint([s.name for s in self._inputs], batch_dims) if other_batch else ""
            raise InputError(f"curvgraph: bad targets: {problem}." + hint)

    # ------------------------------------------------------------------ inspection
    def factors(self) -> dict[str, dict[str, Tensor]]:
        """Block name -> ``{"A": ..., "G": ...}`` (the factors the method keeps, ``{"F": ...}`` for norm blocks): copies.

        ``torch.kron(G, A)`` approximates the curvature block of the loss (of the batch-mean
        loss; ``reduction="sum"``: of the sum) w.r.t.
        ``torch.cat([W, b[:, None]], 1).flatten()`` (see ``docs/conventions.md``).
        """
        return {b.name: {f: self._state[f"{b.name}.{f}"].clone() for f in self.method.factors_kept(b)}
                for b in self.plan.blocks}

    def diagnostics(self) -> dict[str, dict[str, Any]]:
        """Block name -> ``{"kind": ..., "degenerate": {cause: steps}, "last_degenerate_step": step or None}``, and
        under :data:`STEP_DIAGNOSTICS` (``"(step)"``) the same for causes of the whole step, with kind ``None``.

        A block *degenerates* in a step when its method could not invert or decompose
        one of its factors (rank-deficient, all-zero or badly scaled statistics: the step
        then keeps the previous inverse, the identity before the first success, see
        ``docs/conventions.md``) or when its statistics of the batch are not finite (the
        step is skipped). ``degenerate`` maps each cause that occurred to the number of
        steps it occurred in; steps count from 1. The first occurrence of each cause warns
        with :class:`~curvgraph.DegenerateBlockWarning` (:class:`~curvgraph.StalledTrainingWarning` for the step:
        with ``lr="auto"``, :attr:`~curvgraph.methods.kfac.KFAC.stall_rejections` steps or more rejected in a row).
        """
        report: dict[str, dict[str, Any]] = {b.name: {"kind": b.kind, "degenerate": {}, "last_degenerate_step": None}
                                             for b in self.plan.blocks}
        if any(d.block is None for d in self._generated.degenerations):
            report[STEP_DIAGNOSTICS] = {"kind": None, "degenerate": {}, "last_degenerate_step": None}
        runner = self._runner
        for degeneration, steps, last in zip(self._generated.degenerations, runner.degenerate_steps,
                                             runner.last_degenerate):
            if steps:
                entry = report[STEP_DIAGNOSTICS if degeneration.block is None else degeneration.block]
                entry["degenerate"][degeneration.message] = steps
                entry["last_degenerate_step"] = max(last, entry["last_degenerate_step"] or 0)
        return report

    # ------------------------------------------------------------------ ahead of time
    def export(self, path: str | os.PathLike) -> str:
        """Write this step as a standalone Python module that needs torch alone; returns ``path``.

        The module (see :mod:`curvgraph.export`) holds the generated step, the run-time
        code this optimizer runs it with, the model's lifted constants (large ones in a
        ``.pt`` file beside it) and the current hyper-parameters; its ``load(model)``
        (or :func:`curvgraph.load_step`) returns an object whose ``step(inputs, targets)``
        continues exactly as :meth:`step` would from a fresh state. Same model and
        options: byte-identical file.
        """
        from .export import export

        self._require_capture("export()")
        return export(self, path)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Everything needed to continue identically: state tensors, hyper-parameters, counters, RNG.

        Before the capture there is no step state yet: the dict holds the method and the
        hyper-parameters only (and the state of a :meth:`load_state_dict` waiting for the capture).
        """
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        if self._captured is None:
            return {**(self._pending_state or {}), "method": self.method.name, "param_groups": groups}
        return {"method": self.method.name, "param_groups": groups, **self._runner.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a :meth:`state_dict` of an optimizer compiled for the same model and method.

        Before the capture, the hyper-parameters are loaded at once and the step state
        when the model is captured (it is checked against the captured step then).
        """
        if state_dict.get("method") != self.method.name:
            raise ConfigError(f"curvgraph: state_dict is for method {state_dict.get('method')!r}, this optimizer runs "
                              f"{self.method.name!r}.")
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ConfigError("curvgraph: state_dict has a different number of parameter groups.")
        if "state" in state_dict:  # else: saved before its optimizer captured anything, hyper-parameters only
            if self._captured is None:  # with the groups' values to restore if the capture refuses it
                self._pending_state = {**state_dict, "groups_before": [
                    {k: v for k, v in group.items() if k != "params"} for group in self.param_groups]}
            else:
                problem = self._runner.check_state_dict(state_dict)
                if problem:
                    raise ConfigError(f"curvgraph: {problem}.")
                self._runner.load_state_dict(state_dict)
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            group.update(saved_group)
