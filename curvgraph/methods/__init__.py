"""Update rules: curvature methods (one module each) and first-order fallbacks.

Importing this package registers the built-in methods (K-FAC, EKFAC, SINGD, K-BFGS, K-BFGS(L)) and
fallback rules (Adam, SGD); see :mod:`curvgraph.registry`.
"""

from __future__ import annotations

from .base import Hyper, Method, fraction, non_negative, one_of, optional, positive
from .ekfac import EKFAC
from .fallback import Adam, FallbackRule, SGD
from .kbfgs import KBFGS, KBFGSL
from .kfac import KFAC
from .singd import SINGD

__all__ = ["Adam", "EKFAC", "FallbackRule", "Hyper", "KBFGS", "KBFGSL", "KFAC", "Method", "SGD", "SINGD", "fraction",
           "non_negative", "one_of", "optional", "positive"]
