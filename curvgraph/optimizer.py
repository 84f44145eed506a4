"""The optimizer object users hold: runs the generated step and keeps its state."""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from .codegen import GeneratedStep
from .curvature.losses import LossSpec
from .errors import CompileError, ConfigError, InputError, NonFiniteStepWarning
from .instrument import InstrumentedForward
from .methods.base import Method
from .methods.fallback import FallbackRule
from .plan import Plan
from .runtime import StepRunner, compiled_step, model_tensors
from .trace import InputSpec, as_input_tuple

# Inductor itself triggers this deprecation notice while compiling the step; users cannot act on it.
warnings.filterwarnings("ignore", message="`torch._prims_common.check` is deprecated", category=FutureWarning)


class CurvatureOptimizer(torch.optim.Optimizer):
    """A compiled second-order training step for one model.

    Created by :func:`curvgraph.compile`. ``step(inputs, targets)`` runs forward,
    backward, curvature statistics, preconditioning and the update of the model's own
    parameters in place, and returns the loss (a detached 0-d tensor).

    Parameter groups: ``param_groups[0]`` holds the parameters of the curvature blocks
    and the method's hyper-parameters (``lr``, ``damping``, ...); a second group holds the
    fallback parameters with the fallback rule's hyper-parameters (its ``lr`` is the
    ``fallback_lr`` of :func:`curvgraph.compile`). Both are read at every step, so
    ``torch.optim.lr_scheduler`` schedulers work, and changing a value needs no
    recompilation.

    Attributes:
        plan: the :class:`~curvgraph.Plan` the step was generated for.
        source: Python source of the generated step module.
        skipped_steps: how many steps were skipped because they were not finite.
    """

    def __init__(self, model: nn.Module, plan: Plan, forward: InstrumentedForward, generated: GeneratedStep,
                 namespace: dict[str, Any], *, method: Method, fallback: FallbackRule, loss: LossSpec, fisher: str,
                 hyper: dict[str, Any], fallback_hyper: dict[str, Any], factor_every: int, invert_every: int,
                 backend: str, inputs: list[InputSpec], output_ndim: int, constants: list[Tensor],
                 seed: int | None, progress: bool = False, batch_dims: tuple[int | None, ...] = ()) -> None:
        self.model = model
        self.plan = plan
        self.source = generated.source
        self.method = method
        self.fallback = fallback
        self.loss = loss
        self.fisher = fisher
        self.factor_every = factor_every
        self.invert_every = invert_every
        self.backend = backend
        self._forward = forward
        self._inputs = inputs
        self._batch_dims = tuple(batch_dims) or (0,) * len(inputs)
        self._output_ndim = output_ndim
        self._constants = tuple(constants)
        self._params = [model.get_parameter(forward.names[p]) for p in forward.params]
        self._frozen_names = [forward.names[p] for p in forward.frozen]
        self._buffer_names = [forward.names[b] for b in forward.buffers]

        named = dict(zip(forward.params, self._params))
        curvature = [named[p] for b in plan.blocks for p in b.placeholders]
        in_blocks = {p for b in plan.blocks for p in b.placeholders}
        fallback_params = [named[p] for p in forward.params if p not in in_blocks]
        groups = []
        if curvature:
            groups.append({"params": curvature, "role": "curvature", **hyper})
        if fallback_params:
            groups.append({"params": fallback_params, "role": "fallback", **fallback_hyper})
        if not groups:
            raise ConfigError(f"curvgraph: {plan.model_name} has no trainable parameters used by its forward pass.")
        super().__init__(groups, {})

        self._generated = generated
        self._seed = seed
        self._progress = progress and backend != "eager"
        self._compiled_variants: set[tuple[bool, bool]] = set()
        self._runner = StepRunner(
            compiled_step(namespace["step"], backend), namespace["noise_shape"],
            {key: (spec.shape, spec.init, spec.dtype or generated.factor_dtype) for key, spec in generated.state.items()},
            loss.noise if fisher == "mc" else None, factor_every, invert_every, self._params[0].device,
            generated.factor_dtype, seed, tuple(spec.symbolic_dims for spec in inputs))

    @property
    def skipped_steps(self) -> int:
        """How many steps were skipped because they were not finite."""
        return self._runner.skipped_steps

    @property
    def _state(self) -> dict[str, Tensor]:
        return self._runner.state

    # ------------------------------------------------------------------ stepping
    def step(self, inputs: Tensor | tuple[Tensor, ...], targets: Tensor) -> Tensor:  # type: ignore[override]
        """One training step on a batch; returns the batch loss (before the update).

        Args:
            inputs: the model's positional input(s): a tensor or a tuple of tensors,
                batch first, shaped like the example inputs up to symbolic sizes.
            targets: class indices (cross-entropy) or a tensor shaped like the output.

        A step whose loss, factors or update are not finite changes nothing (parameters,
        buffers, optimizer state) and emits a :class:`~curvgraph.NonFiniteStepWarning`;
        :attr:`skipped_steps` counts them.
        """
        batch = as_input_tuple(inputs, "inputs")
        self._check_batch(batch, targets)
        params, frozen, buffers = model_tensors(self.model, self._params, self._frozen_names, self._buffer_names)
        variant = self._runner.schedule()
        announce = self._progress and variant not in self._compiled_variants
        if announce:
            print(f"curvgraph: compiling the step for {self.plan.model_name} (statistics: {'yes' if variant[0] else 'no'}, "
                  f"refresh: {'yes' if variant[1] else 'no'}; one graph per combination the schedule uses) ...",
                  file=sys.stderr, flush=True)
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
        if not ok:
            warnings.warn(
                f"curvgraph: step {self._runner.step_count} skipped: the loss ({loss.item():.4g}) or the update is not "
                "finite; parameters, buffers and optimizer state are unchanged. If this repeats, check the batch "
                "for inf/nan, or lower lr / raise damping.",
                NonFiniteStepWarning,
                stacklevel=3,  # past torch.optim's step wrapper, to the caller
            )
        return loss

    def _hyper_values(self, first_statistics: bool) -> dict[str, float]:
        """The step's hyper-parameters as floats, read from ``param_groups``."""
        values: dict[str, float] = {}
        for group in self.param_groups:
            if group["role"] == "curvature":
                values.update(self.method.step_values(group, first_statistics=first_statistics))
            else:
                values.update(self.fallback.hyper(group))
        return values

    def _check_batch(self, batch: tuple[Tensor, ...], targets: Tensor) -> None:
        if len(batch) != len(self._inputs):
            raise InputError(f"curvgraph: the step was compiled for {len(self._inputs)} input(s) "
                             f"({', '.join(s.name for s in self._inputs)}), got {len(batch)}.")
        for tensor, spec in zip(batch, self._inputs):
            fixed = all(s is None or s == t for s, t in zip(spec.shape, tensor.shape))
            if tensor.dim() != len(spec.shape) or not fixed or tensor.dtype != spec.dtype:
                expected = tuple("*" if s is None else s for s in spec.shape)
                raise InputError(
                    f"curvgraph: input '{spec.name}' has shape {tuple(tensor.shape)} and dtype {tensor.dtype}; the step "
                    f"was compiled for shape {expected} ('*' = any size) and dtype {spec.dtype}. Recompile with "
                    "example inputs of the new shape if this is intended."
                )
        if not isinstance(targets, Tensor):
            raise InputError(f"curvgraph: targets must be a tensor, got {type(targets).__name__}.")
        sizes = {(i, d): int(t.shape[d]) for i, (t, d) in enumerate(zip(batch, self._batch_dims)) if d is not None}
        where = ", ".join(f"dim {d} of input '{self._inputs[i].name}'" for i, d in sizes)
        hint = (f" The batch is taken from {where}; if that is wrong, pass batch_dim= to curvgraph.compile (an int, or "
                "one per input, e.g. batch_dim=1 for time-major (T, N, F) inputs).")
        if len(set(sizes.values())) > 1:
            raise InputError(f"curvgraph: the inputs disagree on the batch size ({', '.join(map(str, sizes.values()))})."
                             + hint)
        problem = self.loss.check_targets(targets, self._output_ndim, next(iter(sizes.values())))
        if problem:
            raise InputError(f"curvgraph: bad targets: {problem}." + (hint if "examples" in problem else ""))

    # ------------------------------------------------------------------ inspection
    def factors(self) -> dict[str, dict[str, Tensor]]:
        """Block name -> ``{"A": ..., "G": ...}`` (each kind's factors, ``{"F": ...}`` for norm blocks): copies.

        ``torch.kron(G, A)`` approximates the curvature block of the batch-mean loss
        w.r.t. ``torch.cat([W, b[:, None]], 1).flatten()`` (see ``docs/conventions.md``).
        """
        return {b.name: {f: self._state[f"{b.name}.{f}"].clone() for f in b.factors} for b in self.plan.blocks}

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

        return export(self, path)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Everything needed to continue identically: state tensors, hyper-parameters, counters, RNG."""
        return {
            "method": self.method.name,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
            **self._runner.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a :meth:`state_dict` of an optimizer compiled for the same model and method."""
        if state_dict.get("method") != self.method.name:
            raise ConfigError(f"curvgraph: state_dict is for method {state_dict.get('method')!r}, this optimizer runs "
                              f"{self.method.name!r}.")
        problem = self._runner.check_state_dict(state_dict)
        if problem:
            raise ConfigError(f"curvgraph: {problem}.")
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ConfigError("curvgraph: state_dict has a different number of parameter groups.")
        self._runner.load_state_dict(state_dict)
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            group.update(saved_group)
