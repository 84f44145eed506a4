"""Update rules: curvature methods (one module each) and first-order fallbacks.

Importing this package registers the built-in methods (K-FAC, EKFAC) and fallback rules
(Adam, SGD); see :mod:`curvgraph.registry`.
"""

from __future__ import annotations

from .base import Hyper, Method, fraction, non_negative, one_of, optional, positive
from .fallback import Adam, FallbackRule, SGD
from .kfac import KFAC
from .ekfac import EKFAC

__all__ = ["Adam", "EKFAC", "FallbackRule", "Hyper", "KFAC", "Method", "SGD", "fraction", "non_negative", "one_of", "optional",
           "positive"]
