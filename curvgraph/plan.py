"""The plan: which curvature blocks a model has, and what they cost.

A :class:`Plan` is what the passes produce and what the code generator consumes. It
is method independent except for the cost entries a method adds
(``precondition``, ``inversion``, ``state_bytes``).

Costs are sympy expressions in the model's symbolic input sizes (``N`` is the batch
size; other dynamic sizes are named ``<input>_<dim>``), so that the same plan answers
"what does a step cost at batch 512?" as well as "at the example inputs?".

Cost keys (FLOPs unless stated):

``forward_backward``
    the layer's share of one forward and backward pass (3 matrix products);
``statistics``
    forming the Kronecker factors of one batch;
``backward_per_sample``
    one extra backward through the layer (input gradient only), paid once per
    Monte-Carlo sample or per output dimension of the type-2 Fisher;
``precondition``
    applying the preconditioner to the gradient;
``inversion``
    one refresh of the preconditioner (inverses / eigendecompositions);
``state_bytes``
    bytes of optimizer state of the block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import sympy

Shape = tuple[int | sympy.Expr, ...]

BLOCK_KINDS = ("dense", "conv", "rnn", "attention", "norm", "embedding")
SHARING_MODES = ("expand", "reduce")


@dataclass(frozen=True)
class LayerUse:
    """One application of a block's weight in the graph.

    ``node`` computes the layer output (the node the instrumentation probes),
    ``input`` holds the layer input ``a``; shapes are symbolic. ``rows`` is the number
    of input vectors the layer applies its weight to (examples x positions).
    ``input_grad`` says whether the backward pass needs the gradient w.r.t. the input
    (it does unless the input depends on no trainable parameter, e.g. a first layer).
    """

    node: str
    input: str
    input_shape: Shape
    output_shape: Shape
    rows: sympy.Expr
    input_grad: bool = True


@dataclass
class Block:
    """A group of parameters with its own Kronecker-factored curvature block.

    Attributes:
        name: block name (the owning module's path, or the weight's name).
        kind: one of ``BLOCK_KINDS``.
        params: the model's parameter names, as in ``model.named_parameters()``,
            weight first.
        placeholders: the graph placeholders of ``params``, same order.
        uses: every application of the weight (more than one for shared weights).
        dims: sizes that define the block, e.g. ``{"in": 40, "out": 64}``.
        bias: whether the bias is folded into the block (a ones column in ``a``).
        weight_transposed: the weight is stored ``(in, out)`` (as in ``x @ W``)
            instead of PyTorch's ``(out, in)`` (dense blocks).
        sharing: ``"expand"`` or ``"reduce"`` (Eschenhagen et al. 2023) for weights
            applied at several positions or places.
        factor_shapes: shape of each factor, e.g. ``{"A": (41, 41), "G": (64, 64)}``;
            grouped convolutions have ``(groups, d, d)`` factors, norm blocks one
            per-channel factor ``{"F": (C, 2, 2)}``.
        layout: what the kind needs besides sizes (convolution geometry, the
            channel layout of a norm layer, parameter shapes).
        cost: sympy cost expressions, keys as in this module's docstring.
    """

    name: str
    kind: str
    params: tuple[str, ...]
    placeholders: tuple[str, ...]
    uses: tuple[LayerUse, ...]
    dims: dict[str, int]
    bias: bool
    weight_transposed: bool
    sharing: str
    factor_shapes: dict[str, tuple[int, ...]]
    layout: dict[str, object] = field(default_factory=dict)
    cost: dict[str, sympy.Expr] = field(default_factory=dict)

    @property
    def shared(self) -> bool:
        """Whether the weight is applied at more than one place in the graph."""
        return len(self.uses) > 1

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        """Shape of the block's parameter matrix: ``(out, in)`` per group for Kronecker
        factors ``A``, ``G``; ``(C, k)`` for a per-channel factor ``F``."""
        if "F" in self.factor_shapes:
            return self.factor_shapes["F"][:-1]
        a, g = self.factor_shapes["A"], self.factor_shapes["G"]
        return g[:-1] + a[-1:]


@dataclass
class Plan:
    """The blocks of a model, its first-order fallback parameters, and their costs.

    Attributes:
        model_name: class name of the model.
        blocks: curvature blocks in graph order.
        fallback_params: trainable parameters no pass matched; they are updated by the
            first-order fallback rule. ``fallback_reasons`` says why, per parameter.
        frozen_params: parameters with ``requires_grad=False`` (never updated).
        sizes: the value of every symbolic size at the example inputs.
        size_names: readable names of the symbolic sizes (``N`` = batch size).
    """

    model_name: str
    blocks: list[Block]
    fallback_params: tuple[str, ...]
    fallback_reasons: dict[str, str]
    frozen_params: tuple[str, ...]
    sizes: dict[sympy.Symbol, int] = field(default_factory=dict)
    size_names: dict[sympy.Symbol, str] = field(default_factory=dict)
    fallback_numel: int = 0

    def block(self, name: str) -> Block:
        """The block called ``name``."""
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(f"no block named {name!r}; blocks: {[b.name for b in self.blocks]}")

    def named(self, expr: sympy.Expr | int) -> sympy.Expr:
        """``expr`` with the symbolic sizes renamed to their readable names."""
        return sympy.sympify(expr).subs({s: sympy.Symbol(n, positive=True, integer=True) for s, n in self.size_names.items()})

    def at_example(self, expr: sympy.Expr | int, sizes: Mapping[str, int] | None = None) -> float:
        """``expr`` evaluated at the example sizes, with ``sizes`` overriding by readable name."""
        values = dict(self.sizes)
        for symbol, name in self.size_names.items():
            if sizes and name in sizes:
                values[symbol] = sizes[name]
        return float(sympy.sympify(expr).subs(values))

    def total(self, key: str) -> sympy.Expr:
        """Sum of one cost entry over all blocks."""
        return sympy.Add(*(b.cost.get(key, 0) for b in self.blocks))

    def matrix_numel(self) -> int:
        """Number of parameters in the curvature blocks."""
        return sum(math.prod(b.matrix_shape) for b in self.blocks)

    def step_flops(self, *, samples: int, factor_every: int, invert_every: int) -> dict[str, sympy.Expr]:
        """FLOPs of one optimizer step, by component, amortizing periodic work.

        ``samples`` is the number of extra backward passes per statistics step
        (1 for the MC Fisher, the output dimension for the type-2 Fisher, 0 for the
        empirical Fisher, whose statistics reuse the loss gradient's backward pass).
        ``update`` counts 8 FLOPs per parameter (momentum or Adam moments, weight decay,
        the update itself).
        """
        block_numel = self.matrix_numel()
        return {
            "forward_backward": self.total("forward_backward"),
            "statistics": self.total("statistics") / factor_every,
            "extra_backward": samples * self.total("backward_per_sample") / factor_every,
            "precondition": self.total("precondition"),
            "inversion": self.total("inversion") / invert_every,
            "update": sympy.Integer(8 * (block_numel + self.fallback_numel)),
        }

    def block_flops(self, block: Block) -> sympy.Expr:
        """Forward/backward + statistics + preconditioning FLOPs of ``block`` with readable size names."""
        keys = ("forward_backward", "statistics", "precondition")
        return sympy.expand(self.named(sympy.Add(*(block.cost.get(k, 0) for k in keys))))

    def __str__(self) -> str:
        rows = [("block", "kind", "params", "uses", "sharing", "factors", "state", "workspace", "FLOPs/step")]
        for b in self.blocks:
            factors = " ".join(f"{k}:{'x'.join(map(str, s))}" for k, s in b.factor_shapes.items())
            workspace = b.cost.get("workspace_bytes")
            rows.append(
                (
                    b.name,
                    b.kind,
                    ", ".join(b.params),
                    str(len(b.uses)),
                    b.sharing if b.kind != "norm" else "-",
                    factors,
                    _human(self.at_example(b.cost.get("state_bytes", 0)), "B"),
                    _human(self.at_example(workspace), "B") if workspace is not None else "-",
                    _human(self.at_example(self.block_flops(b).subs(self._by_name())), ""),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"curvgraph plan for {self.model_name}: {len(self.blocks)} curvature block(s)"]
        sizes = ", ".join(f"{self.size_names[s]}={v}" for s, v in self.sizes.items() if s in self.size_names)
        if sizes:
            lines[0] += f" (costs at {sizes})"
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        if self.fallback_params:
            lines.append(f"first-order fallback ({len(self.fallback_params)} parameter(s)):")
            lines.extend(f"  {p}: {self.fallback_reasons.get(p, '')}" for p in self.fallback_params)
        if self.frozen_params:
            lines.append(f"frozen (requires_grad=False): {', '.join(self.frozen_params)}")
        lines.append("FLOPs/step = forward+backward + factor statistics + preconditioning; workspace = the batch of")
        lines.append("convolution patches the statistics materialize. As expressions in the input sizes:")
        lines.extend(f"  {b.name}: {self.block_flops(b)}" for b in self.blocks)
        return "\n".join(lines)

    def _by_name(self) -> dict[sympy.Symbol, sympy.Symbol]:
        return {sympy.Symbol(n, positive=True, integer=True): s for s, n in self.size_names.items()}


def _human(value: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{prefix}{unit}"
    return f"{value:.3g}{unit}"
