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
``curvature_update``
    a method's per-statistics-step update of its preconditioner (K-BFGS's BFGS updates);
``extra_forward_backward``
    a method's extra pass per statistics step (K-BFGS's forward/backward at the new
    parameters);
``quadratic_model``
    a method's extra passes every step (the adaptive K-FAC step's curvature products
    and trial forward);
``state_bytes``
    bytes of optimizer state of the block.

:data:`COST_PERIODS` says how often each FLOP entry is paid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

import sympy

if TYPE_CHECKING:
    from .kinds.base import BlockKind
    from .trace import TracedModel

Shape = tuple[int | sympy.Expr, ...]

#: How often each FLOP cost entry is paid: every step, every statistics step (``factor_every``) or every
#: refresh (``invert_every``). ``backward_per_sample`` is paid per Fisher sample in statistics steps.
COST_PERIODS: dict[str, str] = {
    "forward_backward": "step",
    "statistics": "statistics",
    "precondition": "step",
    "inversion": "refresh",
    "curvature_update": "statistics",
    "extra_forward_backward": "statistics",
    "quadratic_model": "step",
}

SHARING_MODES = ("expand", "reduce")

#: The printed plan suggests thinning out the factor statistics when they cost more than this many times the
#: forward and backward pass: on the time-to-target suite every model above it reached the target sooner with
#: ``factor_every=2`` (``docs/benchmarks.md``, "How often to update the statistics"), two of three below it did not.
STATISTICS_HINT_RATIO = 1.2


@dataclass(frozen=True)
class LayerUse:
    """One application of a block's parameters in the graph.

    ``outputs`` are the nodes computing the layer outputs (the nodes the
    instrumentation probes, so that the backward pass yields their gradients ``g``);
    ``inputs`` are the nodes holding the layer inputs ``a``. A dense or convolution
    use has one of each; a kind whose layer reads several inputs or writes several
    outputs (a recurrent cell, an attention head) lists them all. Shapes are
    symbolic. ``rows`` is the number of input vectors the layer applies its weight to
    (examples x positions). ``input_grad`` says whether the backward pass needs the
    gradient w.r.t. the inputs (it does unless they depend on no trainable
    parameter, e.g. a first layer).
    """

    outputs: tuple[str, ...]
    inputs: tuple[str, ...]
    output_shapes: tuple[Shape, ...]
    input_shapes: tuple[Shape, ...]
    rows: sympy.Expr
    input_grad: bool = True


@dataclass(frozen=True)
class Factor:
    r"""One factor of a block's curvature approximation.

    A block's parameters are arranged as one *block matrix* ``M`` of shape
    ``Block.matrix_shape = lead + (d_1, ..., d_r)`` (e.g. ``(out, in + 1)`` for a dense
    layer with bias). Each factor acts on one of the ``r`` matrix axes (``axis``,
    counted from the end, e.g. ``-1`` for the columns), and the curvature of
    :math:`\operatorname{vec}_\text{row}(M)` is approximated by the Kronecker product of
    the factors in axis order, independently for every index of the leading dims
    (block-diagonal across groups or channels): ``kron(G, A)`` for ``G`` on axis
    ``-2`` and ``A`` on axis ``-1``.

    A dense factor may be **block-diagonal** (:func:`split_factor`): its ``d x d`` matrix
    is approximated by ``k`` diagonal blocks of ``b = ceil(d / k)`` rows each (the axis
    cut into consecutive slices, the last one zero-padded to ``b``), which the generated
    step computes, inverts and applies without ever forming the ``d x d`` matrix.

    Attributes:
        shape: the stored shape: ``lead + (d, d)`` for a dense factor,
            ``lead + (d,)`` for a diagonal one (stored as a vector),
            ``lead + (k, b, b)`` for a block-diagonal one.
        axis: the axis of ``M`` the factor acts on (negative).
        diagonal: the factor is a diagonal matrix.
        split_dim: ``d`` of a block-diagonal factor (``None`` for the others, whose ``d``
            is the last stored dim).
    """

    shape: tuple[int, ...]
    axis: int
    diagonal: bool = False
    split_dim: int | None = None

    @property
    def dim(self) -> int:
        """Size ``d`` of the matrix axis the factor acts on."""
        return self.shape[-1] if self.split_dim is None else self.split_dim

    @property
    def blocks(self) -> int:
        """The number ``k`` of diagonal blocks (1 unless split)."""
        return 1 if self.split_dim is None else self.shape[-3]

    @property
    def block_dim(self) -> int:
        """Size ``b`` of each diagonal block (``d`` unless split; 1 for a diagonal factor)."""
        return 1 if self.diagonal else self.shape[-1]

    @property
    def label(self) -> str:
        """The stored shape for tables and drawings: ``64x64``, ``64(diag)``, ``9x512x512(split 4608)``."""
        structure = "(diag)" if self.diagonal else "" if self.split_dim is None else f"(split {self.split_dim})"
        return "x".join(map(str, self.shape)) + structure

    @property
    def lead(self) -> tuple[int, ...]:
        """The leading (block-diagonal) dims: groups, channels, or ``()``."""
        if self.diagonal:
            return self.shape[:-1]
        return self.shape[:-2] if self.split_dim is None else self.shape[:-3]


def split_factor(factor: Factor, max_dim: int) -> Factor:
    """``factor`` as ``ceil(d / max_dim)`` diagonal blocks of (nearly) equal size at most ``max_dim``;
    ``factor`` itself if it is diagonal, already split, or ``d <= max_dim``."""
    if factor.diagonal or factor.split_dim is not None or factor.dim <= max_dim:
        return factor
    blocks = -(-factor.dim // max_dim)
    size = -(-factor.dim // blocks)
    return Factor(factor.lead + (blocks, size, size), factor.axis, split_dim=factor.dim)


@dataclass
class Block:
    """A group of parameters with its own factored curvature block.

    Attributes:
        name: block name (the owning module's path, or the weight's name).
        kind: the name of the registered block kind that found it (``"dense"``, ...).
        params: the model's parameter names, as in ``model.named_parameters()``,
            weight first.
        placeholders: the graph placeholders of ``params``, same order.
        uses: every application of the parameters (more than one for shared weights).
        dims: sizes that define the block, e.g. ``{"in": 40, "out": 64}``.
        bias: whether a bias is folded into the block matrix (a ones column in ``a``).
        sharing: ``"expand"`` or ``"reduce"`` (Eschenhagen et al. 2023) for weights
            applied at several positions or places; ``None`` for kinds whose
            curvature does not approximate weight sharing (norm blocks).
        factors: the block's factors by name (see :class:`Factor`), e.g. ``A`` and
            ``G`` of a dense block, or one per-channel ``F`` of a norm block.
        matrix_shape: shape of the block matrix ``M`` the factors act on.
        layout: what the kind needs besides sizes (convolution geometry, the
            channel layout of a norm layer, whether a weight is stored transposed).
        cost: sympy cost expressions, keys as in this module's docstring.
        found_by: the name of the pass that claimed the block.
        example_rows: the rows of all uses (``sum(u.rows for u in uses)``) at the example
            inputs, where known: methods choose between equal computations by it.
        per_example: whether the block can group its positions by example (each of its
            tensors has a dim that is a multiple of the batch size,
            :func:`curvgraph.kinds.base.positions_per_example`). ``False`` for a lookup of flat
            indices (``nn.EmbeddingBag`` with ``offsets``) and the layers over its rows, whose
            positions join their examples only in the model's own reduction: such a block has
            no example rows (:func:`curvgraph.kinds.has_example_rows`).
    """

    name: str
    kind: str
    params: tuple[str, ...]
    placeholders: tuple[str, ...]
    uses: tuple[LayerUse, ...]
    dims: dict[str, int]
    bias: bool = False
    sharing: str | None = None
    factors: dict[str, Factor] = field(default_factory=dict)
    matrix_shape: tuple[int, ...] = ()
    layout: dict[str, object] = field(default_factory=dict)
    cost: dict[str, sympy.Expr] = field(default_factory=dict)
    found_by: str = ""
    example_rows: int | None = None
    per_example: bool = True

    @property
    def rows(self) -> sympy.Expr:
        """The rows of all uses, symbolic: the input vectors the parameters are applied to."""
        return sympy.Add(*(u.rows for u in self.uses))

    @property
    def shared(self) -> bool:
        """Whether the weight is applied at more than one place in the graph."""
        return len(self.uses) > 1

    @property
    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The stored shape of each factor, e.g. ``{"A": (41, 41), "G": (64, 64)}``."""
        return {name: factor.shape for name, factor in self.factors.items()}


@dataclass(frozen=True)
class GroupMember:
    """One member of a :class:`BlockGroup`: a layer of the group and the curvature blocks of its parameters.

    Attributes:
        role: the member's role in the group, e.g. ``"q"``, ``"k"``, ``"v"``, ``"out"``.
        layer: the graph node of the member's layer (a use's output node).
        blocks: the blocks whose parameters the layer applies (usually one; a separate
            weight and a packed bias give two).
        part: ``(index, count)`` when the member is one of ``count`` equal parts of its
            layer's output (a fused q|k|v projection), else ``None``.
    """

    role: str
    layer: str
    blocks: tuple[str, ...]
    part: tuple[int, int] | None = None

    def __str__(self) -> str:
        part = f" [part {self.part[0] + 1}/{self.part[1]}]" if self.part is not None else ""
        return f"{self.role}={' & '.join(self.blocks)}{part}"


@dataclass(frozen=True)
class BlockGroup:
    """Blocks that form one larger layer, e.g. the projections of an attention layer (:mod:`curvgraph.passes.attention`).

    A group is descriptive: its members keep their own blocks' curvature (block-diagonal
    across members); the plan lists it so that the layer's structure is visible.

    Attributes:
        kind: what the group is, e.g. ``"attention"``.
        name: the module path of the layer's core (or the core node's name).
        core: the graph node of the core (e.g. the attention op).
        members: the members in role order.
    """

    kind: str
    name: str
    core: str
    members: tuple[GroupMember, ...]

    def __str__(self) -> str:
        return f"{self.kind} {self.name}: " + ", ".join(map(str, self.members))


@dataclass
class Plan:
    """The blocks of a model, its first-order fallback parameters, and their costs.

    Attributes:
        model_name: class name of the model.
        blocks: curvature blocks in graph order.
        fallback_params: trainable parameters no pass matched; they are updated by the
            first-order fallback rule. ``fallback_reasons`` says why, per parameter.
        frozen_params: parameters with ``requires_grad=False``, and those that get no gradient
            (``traced.gradient_free``): never updated.
        sizes: the value of every symbolic size at the example inputs.
        size_names: readable names of the symbolic sizes (``N`` = batch size).
        fallback_numel: number of entries of the fallback parameters.
        matches: block pass name -> number of blocks it claimed, in the order the
            passes ran (each block's ``found_by`` names its pass).
        groups: blocks that form larger layers (attention layers' projections).
        rewrites: normalization pass name -> number of nodes it rewrote.
        traced: the captured model whose (normalized) graph the blocks refer to, for
            drawings (:func:`curvgraph.visualize`); ``None`` for a plan built by hand.
        kinds: the block kinds the plan was built with, by name (their drawing hooks
            draw the blocks even after a kind is unregistered).
    """

    model_name: str
    blocks: list[Block]
    fallback_params: tuple[str, ...]
    fallback_reasons: dict[str, str]
    frozen_params: tuple[str, ...]
    sizes: dict[sympy.Symbol, int] = field(default_factory=dict)
    size_names: dict[sympy.Symbol, str] = field(default_factory=dict)
    fallback_numel: int = 0
    matches: dict[str, int] = field(default_factory=dict)
    groups: list[BlockGroup] = field(default_factory=list)
    rewrites: dict[str, int] = field(default_factory=dict)
    traced: "TracedModel | None" = field(default=None, repr=False, compare=False)
    kinds: dict[str, "BlockKind"] = field(default_factory=dict, repr=False, compare=False)

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
        """FLOPs of one optimizer step, by component (:data:`COST_PERIODS`), amortizing periodic work.

        ``samples`` is the number of extra backward passes per statistics step
        (1 for the MC Fisher, the output dimension for the type-2 Fisher, 0 for the
        empirical Fisher, whose statistics reuse the loss gradient's backward pass).
        ``update`` counts 8 FLOPs per parameter (momentum or Adam moments, weight decay,
        the update itself).
        """
        block_numel = self.matrix_numel()
        divisor = {"step": 1, "statistics": factor_every, "refresh": invert_every}
        flops = {key: self.total(key) / divisor[period] for key, period in COST_PERIODS.items()
                 if key in ("forward_backward", "statistics", "precondition", "inversion")
                 or any(key in b.cost for b in self.blocks)}
        flops["extra_backward"] = samples * self.total("backward_per_sample") / factor_every
        flops["update"] = sympy.Integer(8 * (block_numel + self.fallback_numel))
        return flops

    def block_flops(self, block: Block) -> sympy.Expr:
        """Forward/backward + statistics + preconditioning FLOPs of ``block`` with readable size names."""
        keys = ("forward_backward", "statistics", "precondition")
        return sympy.expand(self.named(sympy.Add(*(block.cost.get(k, 0) for k in keys))))

    def block_state_bytes(self, block: Block) -> float:
        """Bytes of optimizer state of ``block`` (the method's ``state_bytes``) at the example sizes."""
        return self.at_example(block.cost.get("state_bytes", 0))

    def block_step_flops(self, block: Block) -> float:
        """:meth:`block_flops` at the example sizes."""
        return self.at_example(self.block_flops(block).subs(self._by_name()))

    def __str__(self) -> str:
        rows = [("block", "kind", "layer", "pass", "params", "uses", "sharing", "factors", "state", "workspace",
                 "FLOPs/step", "FLOPs/refresh")]
        for b in self.blocks:
            kind = (self.kinds or {}).get(b.kind)
            factors = " ".join(f"{k}:{f.label}" for k, f in b.factors.items())
            workspace = b.cost.get("workspace_bytes")
            rows.append(
                (
                    b.name,
                    b.kind,
                    kind.label(b) if kind is not None else "-",
                    b.found_by,
                    ", ".join(b.params),
                    str(len(b.uses)),
                    b.sharing or "-",
                    factors,
                    human(self.block_state_bytes(b), "B"),
                    human(self.at_example(workspace), "B") if workspace is not None else "-",
                    human(self.block_step_flops(b), ""),
                    human(self.at_example(b.cost["inversion"]), "") if "inversion" in b.cost else "-",
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
        gradient_free = self.traced.gradient_free if self.traced is not None else ()
        if requires_no_grad := [p for p in self.frozen_params if p not in gradient_free]:
            lines.append(f"frozen (requires_grad=False): {', '.join(requires_no_grad)}")
        if gradient_free:
            lines.append(f"frozen (no gradient: used only under torch.no_grad() or through .detach() in forward): {', '.join(gradient_free)}")
        if self.groups:
            lines.append(f"block groups ({len(self.groups)}):")
            lines.extend(f"  {g}" for g in self.groups)
        if self.matches:
            lines.append("block passes (matches): " + ", ".join(f"{n} {c}" for n, c in self.matches.items()))
        if any(self.rewrites.values()):
            lines.append("normalization rewrites: " + ", ".join(f"{n} {c}" for n, c in self.rewrites.items() if c))
        lines.extend(self._step_totals())
        lines.append("FLOPs/step = forward+backward + factor statistics + preconditioning; FLOPs/refresh = one")
        lines.append("refresh of the preconditioner (every invert_every steps); workspace = what the")
        lines.append("statistics materialize (e.g. convolution patches). As expressions in the input sizes:")
        lines.extend(f"  {b.name}: {self.block_flops(b)}" for b in self.blocks)
        return "\n".join(lines)

    def _step_totals(self) -> list[str]:
        """The lines that total FLOPs/step by component at the example sizes, as multiples of the forward and
        backward pass, and where the factor statistics cost more than :data:`STATISTICS_HINT_RATIO` times it, the
        options that update them less often (``factor_every``) or from fewer positions (``conv_stats_every``, for
        kinds that subsample positions)."""
        forward_backward = self.at_example(self.total("forward_backward"))
        if forward_backward <= 0:
            return []
        statistics, precondition = (self.at_example(self.total(key)) for key in ("statistics", "precondition"))
        lines = [f"totals at these sizes: forward+backward {human(forward_backward, '')} FLOPs, factor statistics "
                 f"{human(statistics, '')} per statistics step ({statistics / forward_backward:.2f}x), "
                 f"preconditioning {human(precondition, '')} ({precondition / forward_backward:.2f}x)"]
        if statistics > STATISTICS_HINT_RATIO * forward_backward:
            kinds = self.kinds or {}
            positions = any(getattr(kinds.get(b.kind), "subsamples_positions", False) for b in self.blocks)
            options = "factor_every=2 (a second compiled graph)" + (" or conv_stats_every=2" if positions else "")
            lines.append(f"  the statistics cost more than {STATISTICS_HINT_RATIO}x the forward and backward: "
                         f"{options} makes them cheaper for a little progress per step (docs/benchmarks.md, 'How often "
                         "to update the statistics')")
        return lines

    def _by_name(self) -> dict[sympy.Symbol, sympy.Symbol]:
        return {sympy.Symbol(n, positive=True, integer=True): s for s, n in self.size_names.items()}


def human(value: float, unit: str) -> str:
    """``value`` with a k/M/G/T prefix and 3 significant digits, e.g. ``human(12500, "B") == "12.5kB"``."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{prefix}{unit}"
    return f"{value:.3g}{unit}"
