"""Building a :class:`~curvgraph.plan.Block` from what a block pass matched, and claiming its parameters."""

from __future__ import annotations

from types import ModuleType

from torch.fx import Node

from ..plan import Block, LayerUse
from ..trace import TracedModel


def block_name(weight_name: str) -> str:
    """``'fc1.weight'`` -> ``'fc1'``; a parameter not called ``weight`` names its own block."""
    return weight_name.removesuffix(".weight") if weight_name.endswith(".weight") else weight_name


def claim_block(traced: TracedModel, claimed: dict[str, str], *, kind: str, math: ModuleType, weight: Node,
                bias: Node | None, uses: tuple[LayerUse, ...], dims: dict[str, int], sharing: str,
                layout: dict[str, object] | None = None, weight_transposed: bool = False) -> Block:
    """The block of ``weight`` (and ``bias``), its factor shapes and costs from the kind's ``math``
    module (``factor_shapes(dims, bias)``, ``cost(block)``); marks its parameters as claimed."""
    placeholders = (weight.name,) + ((bias.name,) if bias is not None else ())
    block = Block(
        name=block_name(traced.params[weight.name]),
        kind=kind,
        params=tuple(traced.params[p] for p in placeholders),
        placeholders=placeholders,
        uses=uses,
        dims=dims,
        bias=bias is not None,
        weight_transposed=weight_transposed,
        sharing=sharing,
        factor_shapes=math.factor_shapes(dims, bias is not None),
        layout=layout or {},
    )
    block.cost = math.cost(block)
    for p in placeholders:
        claimed[p] = ""
    return block
