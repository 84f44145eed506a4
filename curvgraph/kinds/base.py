r"""What a block kind is: one object that owns a layer pattern from graph to update.

A :class:`BlockKind` subclass owns

* its **normalization rewrites** (``rewrites``): graph rewrites into the kind's
  canonical op, each ``(graph, trainable placeholder names) -> number rewritten``;
* its **block passes** (``passes``, by default one pass named after the kind that
  calls :meth:`BlockKind.find`): FX matching that returns :class:`~curvgraph.plan.Block`\ s
  built with :func:`new_block`;
* its **factor structure** (:meth:`BlockKind.factors`): which factors the block has,
  their shapes, the block-matrix axis each acts on, dense or diagonal; with
  :attr:`BlockKind.splits_factors` its statistics also honour block-diagonal factors
  (``max_factor_dim``);
* its **statistics** in the generated step (:meth:`BlockKind.write_batch_factors`):
  this batch's estimate of every factor from the layer inputs ``a`` and output
  gradients ``g`` of each use;
* its **block matrix** (:meth:`BlockKind.write_matrix`, :meth:`BlockKind.write_split`):
  how the parameters (or their gradients) are arranged as the matrix ``M`` the
  factors act on, and back;
* optionally its **example rows** (:meth:`BlockKind.write_example_rows`): each
  example's gradient matrix in factored form, for methods that need more than the
  factors (EKFAC's eigenvalue correction, K-BFGS's pre-activation pairs);
* its **cost** (:meth:`BlockKind.cost`): sympy FLOP counts, keys as in :mod:`curvgraph.plan`;
* its **drawing** (:attr:`BlockKind.color`, :meth:`BlockKind.label`): how
  :func:`curvgraph.visualize` fills and names its blocks (defaults: grey, the kind's
  name and dims), so a new kind draws without changes to the visualizer.

``curvgraph.register_block_kind(MyKind())`` adds it. The step-writing methods emit
calls to plain torch functions (``w.call(fn, ...)``); the code generator copies those
functions, and the functions they call, into the generated source, so they must be
self-contained apart from ``torch``, ``torch.nn.functional as F``, ``Tensor``,
``math`` and other such functions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import sympy
import torch
from torch.fx import Graph, Node

from ..errors import CompileError
from ..plan import Block, Factor, LayerUse
from ..trace import TracedModel, symbolic_shape

if TYPE_CHECKING:
    from ..codegen.writer import BlockVars, StepWriter, UseVars
    from ..passes.ledger import Claims


@dataclass(frozen=True)
class BlockPass:
    """A named block pass: ``find(traced, claims, sharing) -> blocks``; its name shows in the plan."""

    name: str
    find: Callable[[TracedModel, "Claims", str], list[Block]]


class BlockKind(ABC):
    """Base class of block kinds (see the module docstring for what a kind owns).

    Subclasses set ``name`` (the ``Block.kind`` of their blocks) and, where the kind
    normalizes spellings first, ``rewrites``.
    """

    name: str = ""
    rewrites: tuple[Callable[[Graph, set[str]], int], ...] = ()
    #: Fill colour of the kind's blocks in drawings (a Graphviz / CSS colour).
    color: str = "#d9d9d9"
    #: Whether :meth:`write_batch_factors` computes a block-diagonal factor (``Factor.blocks > 1``,
    #: :func:`curvgraph.plan.split_factor`) as its diagonal blocks; only such kinds' factors are split.
    splits_factors: bool = False
    #: Whether :meth:`write_batch_factors` honours ``block.layout["stats_every"] = s``: the input factor from
    #: every ``s``-th position along each spatial dim (``conv_stats_every``); only such kinds' blocks get it.
    subsamples_positions: bool = False
    #: Whether :meth:`write_example_rows` with the loss gradients only reshapes the layer's inputs and output
    #: gradients (nothing the size of a patch matrix or a one-hot is formed): a method may then precondition the
    #: gradient from its rows where that is cheaper (K-FAC, :func:`curvgraph.methods.kfac.rows_precondition`).
    cheap_example_rows: bool = False

    def label(self, block: Block) -> str:
        """A one-line description of ``block`` for drawings and tables: the kind and its dims by default."""
        dims = ", ".join(f"{k}={v}" for k, v in block.dims.items())
        return f"{self.name} {dims}" if dims else self.name

    def substitute(self, module: torch.nn.Module) -> torch.nn.Module | None:
        """A module to capture in place of ``module`` (same function, same Parameters), or ``None`` (the default).

        Lets a kind turn a module that export keeps opaque (``nn.LSTM`` becomes one
        ``aten.lstm`` op) into ops its pass matches; the model itself is not changed.
        """
        return None

    @property
    def passes(self) -> tuple[BlockPass, ...]:
        """The kind's block passes in the order they run: one, named after the kind, by default."""
        return (BlockPass(self.name, self.find),)

    def find(self, traced: TracedModel, claims: "Claims", sharing: str) -> list[Block]:
        """The blocks of this kind in ``traced.graph`` (build each with :func:`new_block`).

        Record why a recognized parameter is not taken with ``claims.reject``; skip
        parameters for which ``claims.is_claimed`` is true (an earlier pass owns them).
        """
        raise NotImplementedError(f"block kind {self.name!r} defines neither find() nor passes")

    @abstractmethod
    def factors(self, block: Block) -> dict[str, Factor]:
        """The factors of ``block`` (``block.dims``, ``block.bias``, ``block.layout`` are set)."""

    @abstractmethod
    def cost(self, block: Block) -> dict[str, sympy.Expr]:
        """``forward_backward``, ``statistics``, ``backward_per_sample`` FLOPs (and optional extra keys)."""

    @abstractmethod
    def write_batch_factors(self, w: "StepWriter", b: "BlockVars", dtype: torch.dtype) -> None:
        """Write the lines assigning ``b.batch_factors[name]`` for every factor.

        In scope: ``b.uses[i].inputs`` / ``b.uses[i].grads`` (expressions of each use's
        layer inputs and of the backpropagated output vectors of the Fisher type,
        ``(S*N, ...)`` with ``S`` samples stacked in front of the batch), ``batch``
        (``N``), ``examples`` (``S*N``) and ``scale`` (the Fisher type's ``c``, see
        :mod:`curvgraph.curvature.losses`). ``dtype`` is the factor dtype. Write them with
        :meth:`~curvgraph.codegen.writer.StepWriter.assign`, so that blocks whose statistics are the same
        expression (layers on one input, an LSTM's gates) compute them once.
        """

    def write_example_rows(self, w: "StepWriter", b: "BlockVars", uses: Sequence["UseVars"],
                           dtype: torch.dtype, label: str = "rows") -> dict[str, str]:
        r"""Each example's gradient matrix in factored form, from the layer inputs and output vectors of ``uses``.

        Writes the lines computing them into variables named after ``label`` (call it
        with distinct labels to keep rows of several passes apart) and returns one
        variable per factor (``block.factors``' names) of *rows*
        ``(R_f, P, *lead, d_f)``: ``P`` positions (summed over every use), ``lead`` the
        factors' leading dims and ``d_f`` the size of the factor's axis. ``R_f`` is ``N``
        for rows made of layer inputs and ``S*N`` for rows made of output vectors
        (``S`` samples stacked in front of the batch; the rows of sample ``s`` and example
        ``n`` are row ``s*N + n``). With the factors in axis order (rows first) the
        matrix of example ``n`` is

        .. math:: M_n = \sum_p r^{(1)}_{n,p} \otimes r^{(2)}_{n,p} \otimes \cdots

        (an outer product per position, e.g. :math:`\sum_p g_{n,p} \bar a_{n,p}^\top` for a
        dense block), so with the loss gradients as output vectors
        :math:`\sum_n M_n = M` is the block's gradient (see
        :func:`curvgraph.curvature.kronecker.example_matrices`). A kind without this
        method works with every method that needs only the factors.
        """
        raise CompileError(
            f"curvgraph: block kind {self.name!r} does not define write_example_rows(), which this method needs; "
            "implement it or choose a method that uses the factors only (e.g. 'kfac')."
        )

    def write_lag_moments(self, w: "StepWriter", b: "BlockVars", dtype: torch.dtype) -> dict[str, str]:
        """Optional (kinds whose uses are time steps): lines assigning this batch's lag-1 moments, one
        variable per factor name, shaped and normalized like the factors (see
        :func:`curvgraph.curvature.temporal.rnn_lag_factors`); used by temporal approximations."""
        raise CompileError(f"curvgraph: block kind {self.name!r} has no lag moments (no temporal approximation).")

    @abstractmethod
    def write_matrix(self, w: "StepWriter", b: "BlockVars", tensors: Sequence[str], dtype: torch.dtype) -> str:
        """The expression of the block matrix ``M`` built from ``tensors`` (one expression per
        placeholder, shaped like the parameters: the parameters themselves or their gradients)."""

    def write_decayed(self, w: "StepWriter", b: "BlockVars", matrix: str) -> str:
        """The part of the parameter matrix ``matrix`` that weight decay pulls toward zero: all of it
        (the default), or less where the kind keeps entries fixed (an embedding's padding row)."""
        return matrix

    @abstractmethod
    def write_split(self, w: "StepWriter", b: "BlockVars", matrix: str) -> str:
        """The expression turning the block matrix ``matrix`` back into a tuple of tensors shaped
        like the parameters, one per placeholder, in order."""


def has_example_rows(kind: BlockKind, block: Block) -> bool:
    """Whether ``block`` has example rows: its ``kind`` defines :meth:`BlockKind.write_example_rows` and its positions
    belong to examples it can tell (:attr:`~curvgraph.plan.Block.per_example`). Methods that need them check at
    compile time."""
    return type(kind).write_example_rows is not BlockKind.write_example_rows and block.per_example


def has_lag_moments(kind: BlockKind) -> bool:
    """Whether ``kind`` defines :meth:`BlockKind.write_lag_moments` (blocks over time steps)."""
    return type(kind).write_lag_moments is not BlockKind.write_lag_moments


def block_name(weight_name: str) -> str:
    """``'fc1.weight'`` -> ``'fc1'``; a parameter not called ``weight`` names its own block."""
    return weight_name.removesuffix(".weight") if weight_name.endswith(".weight") else weight_name


def layer_use(inputs: Sequence[Node], outputs: Sequence[Node], rows: sympy.Expr, trainable: set[Node]) -> LayerUse:
    """A :class:`~curvgraph.plan.LayerUse` of the FX nodes ``inputs`` -> ``outputs``.

    ``trainable`` is the set of nodes that depend on a trainable parameter
    (:func:`curvgraph.passes.graph_utils.depends_on`): a use whose inputs are all outside
    it needs no input gradient.
    """
    return LayerUse(
        outputs=tuple(n.name for n in outputs),
        inputs=tuple(n.name for n in inputs),
        output_shapes=tuple(symbolic_shape(n) for n in outputs),
        input_shapes=tuple(symbolic_shape(n) for n in inputs),
        rows=rows,
        input_grad=any(n in trainable for n in inputs),
    )


def positions_per_example(traced: TracedModel, uses: Sequence[LayerUse]) -> bool:
    """Whether every tensor of ``uses`` has a dim that is a multiple of the batch size ``N`` (``(N, T, d)``,
    ``(T, N, d)``, ``(N*T, d)``), so that its positions can be grouped by example (example rows, KFAC-reduce).

    ``False`` for flat positions that join their examples only in the model's own reduction, e.g. the ``T``
    indices of ``nn.EmbeddingBag`` with ``offsets`` (``(T,)``) and the layers applied to their rows before it, or
    for rows that are not the batch's (``N - 1`` bags where ``N`` is the length of ``offsets`` with
    ``include_last_offset``). ``True`` where the batch size is fixed (nothing to tell it by): the kinds' reshape
    to ``(N, -1, d)`` then checks the sizes at run time.
    """
    batch = traced.batch_size
    if not isinstance(batch, sympy.Symbol):
        return True
    shapes = [shape for u in uses for shape in (*u.input_shapes, *u.output_shapes)]
    return all(any(sympy.div(sympy.sympify(size), batch)[1] == 0 for size in shape) for shape in shapes)


def new_block(traced: TracedModel, kind: BlockKind, params: Sequence[Node], uses: Sequence[LayerUse],
              dims: dict[str, int], *, bias: bool = False, sharing: str | None = None,
              layout: dict[str, object] | None = None, per_example: bool = True) -> Block:
    """The block of ``kind`` over the parameter placeholders ``params`` (weight first),
    with its factors, block-matrix shape and cost filled in from ``kind``."""
    placeholders = tuple(p.name for p in params)
    block = Block(
        name=block_name(traced.params[placeholders[0]]),
        kind=kind.name,
        params=tuple(traced.params[p] for p in placeholders),
        placeholders=placeholders,
        uses=tuple(uses),
        dims=dims,
        bias=bias,
        sharing=sharing,
        layout=layout or {},
        per_example=per_example,
    )
    block.factors = kind.factors(block)
    block.matrix_shape = matrix_shape(block.factors)
    block.cost = kind.cost(block)
    return block


def matrix_shape(factors: dict[str, Factor]) -> tuple[int, ...]:
    """``lead + (d_1, ..., d_r)``: the block-matrix shape that ``factors`` act on, one per axis."""
    specs = list(factors.values())
    leads = {f.lead for f in specs}
    if len(leads) != 1:
        raise ValueError(f"factors {factors} have different leading dims")
    rank = max(-f.axis for f in specs)
    sizes: list[int | None] = [None] * rank
    for f in specs:
        if sizes[f.axis] is not None:
            raise ValueError(f"two factors act on axis {f.axis}: {factors}")
        sizes[f.axis] = f.dim
    if None in sizes:
        raise ValueError(f"factors {factors} leave a block-matrix axis without a factor")
    return leads.pop() + tuple(sizes)


def split_blocks(block: Block) -> dict[str, tuple[int, ...]]:
    """Per factor, the trailing ``blocks`` argument of a statistics function that honours split factors:
    ``(k,)`` for a factor split into ``k`` diagonal blocks, ``()`` otherwise (the generated call keeps its default)."""
    return {name: (f.blocks,) if f.blocks > 1 else () for name, f in block.factors.items()}


def weight_and_bias(b: "BlockVars", tensors: Sequence[str]) -> tuple[str, str | None]:
    """``(weight, bias or None)`` of a block whose placeholders are a weight and an optional bias."""
    return tensors[0], (tensors[1] if b.block.bias else None)
