"""Update rules: curvature methods (one module each) and first-order fallbacks."""

from __future__ import annotations

from ..errors import ConfigError
from .base import BlockVars, Method, StateSpec
from .fallback import FALLBACKS, FallbackRule, resolve_fallback
from .kfac import KFAC

METHODS: dict[str, type[Method]] = {"kfac": KFAC}


def resolve_method(name: str) -> Method:
    """A fresh instance of the method called ``name``."""
    if name not in METHODS:
        raise ConfigError(f"curvgraph: method must be one of {sorted(METHODS)}, got {name!r}.")
    return METHODS[name]()


__all__ = ["BlockVars", "FALLBACKS", "FallbackRule", "KFAC", "METHODS", "Method", "StateSpec", "resolve_fallback", "resolve_method"]
