"""curvgraph: compile any PyTorch model into a fast second-order training step.

>>> opt = curvgraph.compile(model, example_inputs=(x,), loss="cross_entropy", method="kfac")
>>> loss = opt.step(x, y)

``curvgraph.visualize(opt, "model.html")`` draws the compiled model (also ``.svg``,
``.dot``, ``.graphml``, ``.json``); ``opt.export("step.py")`` writes the step as a
module that needs torch alone, and ``curvgraph.load_step("step.py", model)`` runs it.

Block kinds and methods are plug-ins: :func:`register_block_kind`,
:func:`register_method` and :func:`register_fallback` add them from outside the
package (``docs/extending.md``). See also ``docs/getting-started.md`` and
``docs/conventions.md``.
"""

from . import kinds, methods  # noqa: F401 -- registers the built-in kinds, methods and fallbacks
from ._version import __version__
from .api import compile
from .codegen.writer import BlockVars, StateSpec, StepWriter, UseVars
from .errors import (
    CompileError,
    ConfigError,
    CurvgraphError,
    DegenerateBlockWarning,
    InputError,
    NotCapturedError,
    NonFiniteStepWarning,
    PlanError,
    StalledTrainingWarning,
    TraceError,
)
from .kinds.base import BlockKind, BlockPass, layer_use, new_block
from .methods.base import Hyper, Method
from .methods.fallback import FallbackRule
from .export import load_step
from .optimizer import CurvatureOptimizer
from .passes.ledger import Claims
from .plan import Block, Factor, LayerUse, Plan
from .registry import (
    register_block_kind,
    register_fallback,
    register_method,
    unregister_block_kind,
    unregister_method,
)
from .viz import visualize

__all__ = [
    "Block",
    "BlockKind",
    "BlockPass",
    "BlockVars",
    "Claims",
    "CompileError",
    "ConfigError",
    "CurvatureOptimizer",
    "CurvgraphError",
    "DegenerateBlockWarning",
    "Factor",
    "FallbackRule",
    "Hyper",
    "InputError",
    "NotCapturedError",
    "LayerUse",
    "Method",
    "NonFiniteStepWarning",
    "Plan",
    "PlanError",
    "StalledTrainingWarning",
    "StateSpec",
    "StepWriter",
    "TraceError",
    "UseVars",
    "__version__",
    "compile",
    "layer_use",
    "load_step",
    "new_block",
    "register_block_kind",
    "register_fallback",
    "register_method",
    "unregister_block_kind",
    "unregister_method",
    "visualize",
]
