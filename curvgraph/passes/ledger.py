"""The claims ledger: which pass owns each trainable parameter, and why the others were left alone."""

from __future__ import annotations

from ..errors import PlanError
from ..plan import Block


class Claims:
    """Trainable-parameter placeholders -> the block pass that claimed them.

    The pass runner claims every block a pass returns; a second claim on a claimed
    parameter is an error that names both passes. A pass that recognizes a parameter
    but cannot take it records why with :meth:`reject`; the first reason recorded is the
    one the plan shows for a fallback parameter.
    """

    def __init__(self, params: dict[str, str]) -> None:
        self._params = params
        self._owner: dict[str, tuple[str, str]] = {}
        self.reasons: dict[str, str] = {}

    def is_claimed(self, placeholder: str) -> bool:
        """Whether a pass has claimed ``placeholder`` (passes that overlap check this to skip it)."""
        return placeholder in self._owner

    def claim(self, block: Block, pass_name: str) -> None:
        """Record ``block`` as found by ``pass_name``; raises :class:`PlanError` on a second claim."""
        for p in block.placeholders:
            if p not in self._params:
                raise PlanError(f"curvgraph: pass {pass_name!r} built block {block.name!r} on {p!r}, which is not a "
                                "trainable parameter of the graph.")
            if p in self._owner:
                first, first_block = self._owner[p]
                raise PlanError(
                    f"curvgraph: parameter {self._params[p]!r} is claimed twice: by pass {first!r} (block "
                    f"{first_block!r}) and by pass {pass_name!r} (block {block.name!r}). A later pass must skip "
                    "parameters that Claims.is_claimed reports, or the two kinds must match different patterns."
                )
        for p in block.placeholders:
            self._owner[p] = (pass_name, block.name)
        block.found_by = pass_name

    def reject(self, placeholder: str, reason: str) -> None:
        """Say why ``placeholder`` was not made into a block (kept unless a reason is recorded already)."""
        self.reasons.setdefault(placeholder, reason)
