"""Errors and warnings raised by curvgraph.

Every stage of the pipeline raises a :class:`CurvgraphError` that names the model
node or module involved and says what to do, instead of letting a bare FX, export
or dynamo traceback reach the user.
"""

from __future__ import annotations


class CurvgraphError(Exception):
    """Base class of every error curvgraph raises on purpose."""


class ConfigError(CurvgraphError, ValueError):
    """An argument of :func:`curvgraph.compile` or of the optimizer is invalid."""


class TraceError(CurvgraphError):
    """The model could not be captured as one FX graph."""


class InputError(CurvgraphError, ValueError):
    """A batch passed to ``step`` does not match what the step was compiled for."""


class NotCapturedError(CurvgraphError, RuntimeError):
    """Something that needs the captured model (the plan, the generated source, the factors) was asked for
    before it was captured: without ``example_inputs``, that happens at the first ``step``."""


class PlanError(CurvgraphError):
    """The block passes produced an inconsistent plan (e.g. two passes claimed one parameter)."""


class CompileError(CurvgraphError):
    """``torch.compile`` could not capture the generated step as one graph."""


class NonFiniteStepWarning(RuntimeWarning):
    """A step produced a non-finite loss or update and was skipped."""


class StalledTrainingWarning(RuntimeWarning):
    """The steps stopped moving the parameters: with ``lr="auto"``, many steps in a row were rejected (the batch
    loss after the quadratic model's step was not lower)."""


class DegenerateBlockWarning(RuntimeWarning):
    """A curvature block degenerated in a step (a factor that could not be inverted, statistics that are not
    finite); the message names the block and what the step did instead. Warned once per block and cause;
    :meth:`curvgraph.CurvatureOptimizer.diagnostics` counts every occurrence."""
