"""Update rules: curvature methods (one module each) and first-order fallbacks.

Importing this package registers the built-in method (K-FAC) and fallback rules
(Adam, SGD); see :mod:`curvgraph.registry`.
"""

from __future__ import annotations

from .base import Hyper, Method, fraction, non_negative, one_of, optional, positive
from .fallback import Adam, FallbackRule, SGD
from .kfac import KFAC

__all__ = ["Adam", "FallbackRule", "Hyper", "KFAC", "Method", "SGD", "fraction", "non_negative", "one_of", "optional",
           "positive"]
