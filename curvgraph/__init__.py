"""curvgraph: compile any PyTorch model into a fast second-order training step.

>>> opt = curvgraph.compile(model, example_inputs=(x,), loss="cross_entropy", method="kfac")
>>> loss = opt.step(x, y)

See ``docs/getting-started.md`` and ``docs/conventions.md``.
"""

from ._version import __version__
from .api import compile
from .errors import (
    CompileError,
    ConfigError,
    CurvgraphError,
    InputError,
    NonFiniteStepWarning,
    TraceError,
)
from .optimizer import CurvatureOptimizer
from .plan import Block, LayerUse, Plan

__all__ = [
    "Block",
    "CompileError",
    "ConfigError",
    "CurvatureOptimizer",
    "CurvgraphError",
    "InputError",
    "LayerUse",
    "NonFiniteStepWarning",
    "Plan",
    "TraceError",
    "__version__",
    "compile",
]
