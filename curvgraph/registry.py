"""The open registries: block kinds, curvature methods and first-order fallback rules.

Generic code (the pass runner, the code generator, :func:`curvgraph.compile`) never
names a concrete kind or method; it asks these registries. The built-in kinds and
methods register themselves the same way a user's do::

    curvgraph.register_block_kind(MyKind())     # an instance of curvgraph.BlockKind
    curvgraph.register_method(MyMethod)         # a subclass of curvgraph.Method
    curvgraph.register_fallback(MyRule())       # an instance of curvgraph.FallbackRule

Block kinds run their passes in registration order (the built-ins first: dense,
conv, norm), so a kind registered later sees the parameters earlier kinds claimed.
See ``docs/extending.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .kinds.base import BlockKind
    from .methods.base import Method
    from .methods.fallback import FallbackRule

KINDS: dict[str, "BlockKind"] = {}
METHODS: dict[str, type["Method"]] = {}
FALLBACKS: dict[str, "FallbackRule"] = {}


def _register(table: dict, what: str, name: object, entry: object, replace: bool) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"curvgraph: a {what} needs a name that is a Python identifier, got {name!r}.")
    if name in table and table[name] is not entry and not replace:
        raise ConfigError(f"curvgraph: a {what} called {name!r} is registered already; pass replace=True to replace it "
                          f"or choose another name.")
    table[name] = entry


def register_block_kind(kind: "BlockKind", *, replace: bool = False, before: str | None = None) -> "BlockKind":
    """Add a block kind; its passes run after those of the kinds registered before it.

    Args:
        kind: an instance of a :class:`curvgraph.BlockKind` subclass.
        replace: replace a registered kind of the same name (keeping its place in the
            pass order) instead of raising.
        before: the name of a registered kind whose passes this kind's passes must
            precede (e.g. a kind that claims some linear layers before the dense pass
            takes them all); by default the new kind's passes run last.

    Returns:
        ``kind``.
    """
    from .kinds.base import BlockKind

    if not isinstance(kind, BlockKind):
        raise ConfigError(f"curvgraph: register_block_kind needs a curvgraph.BlockKind instance, got {kind!r}.")
    if before is not None and (before not in KINDS or before == kind.name):
        raise ConfigError(f"curvgraph: register_block_kind(before={before!r}): no other block kind of that name is "
                          f"registered; registered: {sorted(KINDS)}.")
    _register(KINDS, "block kind", kind.name, kind, replace)
    if before is not None:
        order = list(KINDS)
        order.remove(kind.name)
        order.insert(order.index(before), kind.name)
        entries = dict(KINDS)
        KINDS.clear()
        KINDS.update((name, entries[name]) for name in order)
    return kind


def unregister_block_kind(name: str) -> None:
    """Remove the block kind called ``name`` (its blocks fall back to first order)."""
    _pop(KINDS, "block kind", name)


def register_method(method: type["Method"], *, replace: bool = False) -> type["Method"]:
    """Add a curvature method; ``curvgraph.compile(..., method=method.name)`` selects it.

    Args:
        method: a subclass of :class:`curvgraph.Method` (usable as a class decorator).
        replace: replace a registered method of the same name instead of raising.
    """
    from .methods.base import Method

    if not (isinstance(method, type) and issubclass(method, Method)):
        raise ConfigError(f"curvgraph: register_method needs a subclass of curvgraph.Method, got {method!r}.")
    if "weight_decay" not in method.hyper or method.hyper["weight_decay"].static:
        raise ConfigError(f"curvgraph: method {method.name!r} must declare the numeric hyper-parameter 'weight_decay': "
                          "the generated step adds it to the gradient matrix.")
    _register(METHODS, "method", method.name, method, replace)
    return method


def unregister_method(name: str) -> None:
    """Remove the method called ``name``."""
    _pop(METHODS, "method", name)


def register_fallback(rule: "FallbackRule", *, replace: bool = False) -> "FallbackRule":
    """Add a first-order rule for parameters no block kind claims (``fallback=rule.name``)."""
    from .methods.fallback import FallbackRule

    if not isinstance(rule, FallbackRule):
        raise ConfigError(f"curvgraph: register_fallback needs a curvgraph.FallbackRule instance, got {rule!r}.")
    _register(FALLBACKS, "fallback rule", rule.name, rule, replace)
    return rule


def resolve_method(name: object) -> type["Method"]:
    """The method class registered as ``name``."""
    if not isinstance(name, str):
        raise ConfigError(f"curvgraph: method must be a string such as 'kfac', got {type(name).__name__}.")
    if name not in METHODS:
        raise ConfigError(f"curvgraph: method must be one of {sorted(METHODS)}, got {name!r}.")
    return METHODS[name]


def resolve_fallback(name: object) -> "FallbackRule":
    """The fallback rule registered as ``name``."""
    if name not in FALLBACKS:
        raise ConfigError(f"curvgraph: fallback must be one of {sorted(FALLBACKS)}, got {name!r}.")
    return FALLBACKS[name]


def _pop(table: dict, what: str, name: str) -> None:
    if name not in table:
        raise ConfigError(f"curvgraph: no {what} called {name!r} is registered; registered: {sorted(table)}.")
    del table[name]
