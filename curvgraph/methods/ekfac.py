r"""EKFAC (George et al. 2018): K-FAC's Kronecker eigenbasis with a re-estimated diagonal scaling.

K-FAC approximates a block's curvature by :math:`G \otimes A = (Q_G \otimes Q_A)
(\Lambda_G \otimes \Lambda_A) (Q_G \otimes Q_A)^\top`. EKFAC keeps the eigenbasis
:math:`Q_G \otimes Q_A` and replaces the Kronecker product of eigenvalues by the
diagonal of the curvature in that basis, estimated from each example's gradient
matrix :math:`M_n`:

.. math::
    S = c \sum_n \big(Q_G^\top M_n Q_A\big)^{\odot 2}, \qquad
    V = Q_G \Big[\big(Q_G^\top M Q_A\big) \oslash (S + \lambda)\Big] Q_A^\top ,

with :math:`c` the Fisher type's scale (the same sum over the same output vectors as
the factors, so :math:`S` is the diagonal, in the eigenbasis, of the very Fisher/GGN
the factors approximate, and :math:`\|F - (Q_G\otimes Q_A) \operatorname{diag}(S)
(Q_G\otimes Q_A)^\top\|_F \le \|F - G\otimes A\|_F` on the batch). The damping
:math:`\lambda` is added to the scaling (George et al. 2018, Algorithm 1; curvlinops'
convention), not factored as in K-FAC.

Schedule. The factors are K-FAC's (the same statistics and moving averages, every
``factor_every`` steps). Their eigenbases are refreshed every ``invert_every`` steps
by ``torch.linalg.eigh``, batched over all factors of the same shape (diagonal factors
have the identity basis and need none). The scaling is re-estimated on every
statistics step *after* the refresh, so a step that does both rotates by the new
bases, and kept as a moving average with the factors' ``ema`` (``ema = 0`` on the first
statistics step). The average runs on across refreshes (as in the paper's Algorithm 1):
after a refresh its older terms were measured in the previous basis and fade at the
rate ``ema`` (a refresh on a step without statistics, when ``factor_every`` does not
divide ``invert_every``, uses the previous scaling in the new basis until the next
statistics step).

Generic over factor structures: a block's factors each act on one axis of its block
matrix (leading dims are independent blocks); the rotation is applied along every
axis by that factor's basis (:func:`curvgraph.methods.kfac.apply_inverse`), and the
per-example matrices come from the kind's *example rows*
(:meth:`curvgraph.BlockKind.write_example_rows`): one row per factor and position,
:math:`M_n = \sum_p \otimes_f r_{f,n,p}`. Rotating the rows instead of the matrices,

* one position per example (``P = 1``: dense layers on ``(N, in)`` inputs, norm
  blocks): :math:`S = c \sum_n \otimes_f (Q_f^\top r_{f,n})^{\odot 2}`, a matmul of
  squared rotated rows; no per-example matrix is formed;
* several positions (``P > 1``: convolutions, dense layers over sequences, shared
  weights): the rotated per-example matrices :math:`\tilde M_n` must be summed over
  positions before squaring, which materializes ``S*N`` matrices of the block's size
  (``S*N * numel(M)`` floats in the factor dtype, ``S`` the Fisher's samples per example:
  1 for MC/empirical, the number of classes for type-2) once per statistics step.

Block-diagonal factors (``max_factor_dim``, :func:`curvgraph.plan.split_factor`): the
eigenbasis of a factor split into ``k`` blocks of ``b`` is the blocks' eigenbases
``(..., k, b, b)``, from the same batched ``eigh``. The rotation into it zero-pads the
axis to ``k b`` and keeps that length (:func:`into_eigenbasis`): the padded block has ``b``
eigen-coordinates, and where its real rows are positive definite the padding's own
(eigenvalue 0) carry nothing, so cutting the axis back to ``d`` after the rotation back
gives EKFAC of the ``d x d`` block-diagonal factor. The scaling is ``k b`` long on that axis.

A block without example rows (``curvgraph.kinds.has_example_rows`` is false: its kind defines none, or its
positions have no batch dim, as the flat lookup of ``nn.EmbeddingBag`` with ``offsets``)
gets the Kronecker product of its factors' eigenvalues as its scaling: K-FAC's
curvature in its eigenbasis, damped by :math:`\lambda` on the product of the
eigenvalues (for a single factor exactly K-FAC's rule). Everything after the
preconditioned gradient :math:`V` -- KL clipping and momentum with a numeric ``lr``,
or the quadratic model and Levenberg-Marquardt damping with ``lr="auto"`` (the
default) -- is K-FAC's (:class:`~curvgraph.methods.kfac.KFAC`).
"""

from __future__ import annotations

import math
from collections import defaultdict

import sympy
import torch
from torch import Tensor

from ..codegen.writer import BlockVars, StateSpec, StepWriter
from ..curvature.kronecker import example_matrices
from ..curvature.linalg import stable_eigh
from ..kinds.base import has_example_rows
from ..plan import Block
from ..registry import KINDS, register_method
from .base import write_batched
from .kfac import KFAC, apply_inverse, ema, kept_where_failed

#: FLOPs of one symmetric eigendecomposition with eigenvectors, per ``d^3`` (Golub & Van Loan's
#: tridiagonal QR estimate, about 9 d^3; divide-and-conquer is usually cheaper).
EIGH_FLOPS = 9


def eigenbasis(factor: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Eigenvalues ``(..., d)`` (ascending, clamped at 0) and orthonormal eigenvectors ``(..., d, d)`` (columns)
    of the symmetric PSD ``factor`` ``(..., d, d)``, :math:`F = Q \operatorname{diag}(\lambda) Q^\top`,
    batched over leading dims, and ``failed`` (shape ``...``): the matrices whose factor or result is not
    finite, whose values and basis are not to be used (:func:`~curvgraph.methods.kfac.kept_where_failed`;
    :func:`~curvgraph.curvature.linalg.stable_eigh` never raises)."""
    values, vectors, good = stable_eigh(factor)
    return values.clamp_min(0), vectors, ~good


def padded_axis(matrix: Tensor, axis: int, size: int) -> Tensor:
    """``matrix`` with its (negative) ``axis`` zero-padded at the end to ``size``."""
    pad = [0, 0] * (-axis - 1) + [0, size - matrix.shape[axis]]
    return torch.nn.functional.pad(matrix, pad)


def into_eigenbasis(matrix: Tensor, basis: Tensor, axis: int, split: bool) -> Tensor:
    r"""Every fiber ``x`` of ``matrix`` along its (negative) ``axis`` as :math:`Q^\top x`.

    ``basis`` :math:`Q` is ``lead + (d, d)``, or ``lead + (k, b, b)`` (``split``: the eigenbases
    of a block-diagonal factor's blocks, :func:`curvgraph.plan.split_factor`); then the fiber is
    zero-padded to ``k b`` first and keeps that length: the padded block's eigen-coordinates
    are as many as its rows (where the factor's real rows are positive definite, the padding's
    own eigenvectors, of eigenvalue 0, carry nothing). :func:`out_of_eigenbasis` inverts it."""
    if split:
        matrix = padded_axis(matrix, axis, basis.shape[-3] * basis.shape[-1])
    return apply_inverse(matrix, basis, axis, False, False, split)


def out_of_eigenbasis(matrix: Tensor, basis: Tensor, axis: int, split_dim: int | None) -> Tensor:
    r"""Every fiber ``y`` of ``matrix`` along ``axis`` as :math:`Q y`, the inverse of :func:`into_eigenbasis`;
    for a block-diagonal basis (``split_dim`` = ``d``) the fiber is cut back from ``k b`` to ``d``."""
    matrix = apply_inverse(matrix, basis.mT, axis, False, False, split_dim is not None)
    return matrix if split_dim is None else matrix.narrow(axis, 0, split_dim)


def rotate_rows(rows: Tensor, basis: Tensor | None, split: bool = False) -> Tensor:
    r"""Example rows ``(R, P, *lead, d)`` in the eigenbasis: :math:`Q^\top r` for each row, ``basis`` ``lead + (d, d)``
    or ``lead + (k, b, b)`` (``split``: rows of length ``k b`` come out, :func:`into_eigenbasis`), ``None``: a
    diagonal factor, the identity basis."""
    if basis is None:
        return rows
    lead = basis.dim() - (3 if split else 2)
    flat = rows.flatten(0, 1).movedim(0, lead)  # (*lead, R*P, d): one batched matmul per leading index
    rotated = into_eigenbasis(flat, basis, -1, split)
    return rotated.movedim(lead, 0).reshape(rows.shape[:-1] + rotated.shape[-1:])


def eigenbasis_scaling(rows: tuple[Tensor, ...], bases: tuple[Tensor | None, ...], batch: int,
                       scale: Tensor, split_dims: tuple[int | None, ...] | None = None) -> Tensor:
    r"""The diagonal of the Fisher in the Kronecker eigenbasis: :math:`S = c \sum_n \tilde M_n^{\odot 2}`.

    Args:
        rows: a block's example rows in axis order (rows first), each ``(R_f, P, *lead, d_f)``
            with ``R_f`` = ``N`` or ``S*N`` (:meth:`curvgraph.BlockKind.write_example_rows`).
        bases: each factor's eigenbasis ``lead + (d_f, d_f)``, or ``None`` (diagonal factor).
        batch: ``N``.
        scale: the Fisher type's :math:`c`.
        split_dims: per basis, ``d`` of a block-diagonal one (:func:`rotate_rows`; its axis of the
            result is ``k b`` long, the zero-padded length), else ``None``.

    Returns:
        ``lead + (d_1, ..., d_k)``. With ``P = 1`` it is a contraction of the squared rotated rows
        over examples (:math:`c \sum_n \otimes_f (Q_f^\top r_{f,n})^{\odot 2}`, no per-example
        matrix); with ``P > 1`` the rotated per-example matrices
        :math:`\tilde M_n = \sum_p \otimes_f Q_f^\top r_{f,n,p}` are formed (``S*N`` of them).
    """
    split_dims = split_dims or (None,) * len(bases)
    rotated = tuple(rotate_rows(r, q, d is not None) for r, q, d in zip(rows, bases, split_dims))
    if rotated[0].shape[1] != 1:
        return example_matrices(rotated, batch).square().sum(0) * scale
    samples = max(r.shape[0] for r in rotated) // batch
    lead = "abcdefgh"[: rotated[0].dim() - 3]
    letters = "ijkl"[: len(rotated)]
    squared = [(r[:, 0] * r[:, 0]).reshape((-1, batch) + r.shape[2:]) for r in rotated]
    squared = [s.expand((samples,) + s.shape[1:]) for s in squared]
    terms = ",".join(f"sn{lead}{x}" for x in letters)
    return torch.einsum(f"{terms}->{lead}{letters}", *squared) * scale


def kronecker_eigenvalues(values: tuple[Tensor, ...], axes: tuple[int, ...]) -> Tensor:
    r"""K-FAC's curvature in its eigenbasis: :math:`S_{\dots, i_1, \dots, i_r} = \prod_f \lambda_{f, i_f}` (per
    leading index), from each factor's eigenvalues ``lead + (d_f,)`` on its (negative) ``axis``."""
    rank = max(-a for a in axes)
    total = None
    for v, axis in zip(values, axes):
        shape = v.shape[:-1] + (1,) * (rank + axis) + v.shape[-1:] + (1,) * (-axis - 1)
        total = v.reshape(shape) if total is None else total * v.reshape(shape)
    return total


def ekfac_precondition(grad: Tensor, bases: tuple[Tensor | None, ...], axes: tuple[int, ...], scaling: Tensor,
                       damping: Tensor, split_dims: tuple[int | None, ...] | None = None) -> Tensor:
    r""":math:`V = \tilde V \times_1 Q_1 \times_2 Q_2 \cdots` with :math:`\tilde V = (M \times_1 Q_1^\top \cdots)
    \oslash (S + \lambda)`: for a dense block :math:`Q_G [(Q_G^\top M Q_A) / (S + \lambda)] Q_A^\top`
    (``None`` bases are identities). ``split_dims``: per basis, ``d`` of a block-diagonal one
    (:func:`into_eigenbasis`; ``scaling`` is ``k b`` long on its axis), else ``None``."""
    split_dims = split_dims or (None,) * len(bases)
    for basis, axis, d in zip(bases, axes, split_dims):
        if basis is not None:
            grad = into_eigenbasis(grad, basis, axis, d is not None)  # every fiber x -> Q^T x
    grad = grad / (scaling + damping)
    for basis, axis, d in zip(bases, axes, split_dims):
        if basis is not None:
            grad = out_of_eigenbasis(grad, basis, axis, d)  # x -> Q x
    return grad


class EKFAC(KFAC):
    """EKFAC: K-FAC's factors and eigenbases, with the diagonal scaling re-estimated from per-example
    gradients (see the module docstring). Hyper-parameters and modes are K-FAC's; ``damping`` is added
    to the scaling."""

    name = "ekfac"
    splits_factors = True  # a block-diagonal factor's eigenbasis is its blocks' (into_eigenbasis)

    def preconditioner(self, block: Block) -> tuple[str, ...]:
        values = tuple(f"{name}_eigenvalues" for name in block.factors)
        return values + tuple(f"{name}_basis" for name, f in block.factors.items() if not f.diagonal)

    def state(self, block: Block) -> dict[str, StateSpec]:
        """Per factor its eigenvalues (a diagonal factor's own entries at the refresh) and, for a dense one, its
        eigenbasis; the scaling (a block-matrix-shaped average) and the momentum."""
        state = {}
        for name, f in block.factors.items():
            state[f"{name}_eigenvalues"] = StateSpec(f.shape if f.diagonal else f.shape[:-1], "ones")
            if not f.diagonal:
                state[f"{name}_basis"] = StateSpec(f.shape, "eye")
        return {**state, "scaling": StateSpec(self._scaling_shape(block)), "momentum": StateSpec(block.matrix_shape)}

    @staticmethod
    def _scaling_shape(block: Block) -> tuple[int, ...]:
        """The block matrix's shape in the eigenbasis: a block-diagonal factor's axis ``k b`` long
        (:func:`into_eigenbasis`)."""
        shape = list(block.matrix_shape)
        for f in block.factors.values():
            if f.split_dim is not None:
                shape[f.axis] = f.blocks * f.block_dim
        return tuple(shape)

    def _split_dims(self, block: Block) -> tuple:
        """The trailing ``split_dims`` argument of :func:`eigenbasis_scaling` and :func:`ekfac_precondition` (``()``
        unless a factor is split)."""
        dims = tuple(block.factors[f].split_dim for f in self._axis_order(block))
        return (dims,) if any(d is not None for d in dims) else ()

    def write_refresh(self, w: StepWriter, blocks: list[BlockVars]) -> None:
        groups: dict[tuple[int, ...], list[tuple[BlockVars, str]]] = defaultdict(list)
        for b in blocks:
            for name, f in b.block.factors.items():
                if f.diagonal:
                    w.line(f"{b.var(name + '_eigenvalues')} = {b.factors[name]}")
                    w.commit(b.state(f"{name}_eigenvalues"), b.var(f"{name}_eigenvalues"), when="refresh")
                else:
                    groups[f.shape].append((b, name))
        for shape, members in groups.items():
            values = [b.var(f"{f}_eigenvalues") for b, f in members]
            bases = [b.var(f"{f}_basis") for b, f in members]
            failed = [b.var(f"{f}_failed") for b, f in members]
            write_batched(w, eigenbasis, [[b.factors[f]] for b, f in members],
                          [list(triple) for triple in zip(values, bases, failed)],
                          f"factors of shape {'x'.join(map(str, shape))}", math.prod(shape))
            for (b, f), value, basis, fail in zip(members, values, bases, failed):
                # the previous values and basis where the decomposition failed, read from the state in place
                w.line(f"{value} = {w.call(kept_where_failed, value, fail, b.state(f'{f}_eigenvalues'), True)}")
                w.line(f"{basis} = {w.call(kept_where_failed, basis, fail, b.state(f'{f}_basis'), False)}")
                w.commit(b.state(f"{f}_eigenvalues"), value, when="refresh")
                w.commit(b.state(f"{f}_basis"), basis, when="refresh")
                w.flag(b.block, f"factor {f} could not be decomposed (not finite, or eigh failed); kept the previous "
                       "eigenbasis and eigenvalues (the identity and ones before the first success)", f"{fail}.any()")

    def write_preconditioned(self, w: StepWriter, blocks: list[BlockVars]) -> None:
        """The scaling (statistics steps: after the refresh, so in this step's bases), then :math:`V`."""
        order = {b.id: self._axis_order(b.block) for b in blocks}

        def bases(b: BlockVars) -> str:
            return w.pack("None" if b.block.factors[f].diagonal else b.var(f"{f}_basis") for f in order[b.id])

        corrected = [b for b in blocks if has_example_rows(b.kind, b.block)]
        with_rows = {b.id for b in corrected}
        if corrected:
            with w.indent("if update_stats:", when="update_stats"):
                w.line("# EKFAC scaling: the Fisher's diagonal in the eigenbasis, from each example's rotated gradient")
                for b in corrected:
                    rows = b.kind.write_example_rows(w, b, b.uses, f"{b.grad}.dtype", "ekfac_rows")
                    batch_scaling = w.call(eigenbasis_scaling, w.pack(rows[f] for f in order[b.id]), bases(b), "batch",
                                           "scale", *self._split_dims(b.block))
                    w.line(f"{b.var('S')} = {w.call(ema, b.state('scaling'), batch_scaling, w.hyper('ema'))}")
                    w.commit(b.state("scaling"), b.var("S"))
                    w.check(b.var("S"))
            with w.indent("else:"):
                for b in corrected:
                    w.line(f"{b.var('S')} = {b.state('scaling')}")
        for b in blocks:
            axes = tuple(b.block.factors[f].axis for f in order[b.id])
            if b.id not in with_rows:
                why = f"kind {b.block.kind!r}" if b.block.per_example else "its positions have no batch dim, so it"
                w.line(f"# {b.block.name}: {why} has no example rows; K-FAC's eigenvalues as scaling")
                values = w.pack(b.var(f"{f}_eigenvalues") + (".flatten(-2)" if b.block.factors[f].split_dim else "")
                                for f in order[b.id])  # a block-diagonal factor's: k b long, as the scaling's axis
                w.line(f"{b.var('S')} = {w.call(kronecker_eigenvalues, values, axes)}")
            call = w.call(ekfac_precondition, b.grad, bases(b), axes, b.var("S"), self._damping(w),
                          *self._split_dims(b.block))
            w.line(f"{b.var('V')} = {call}")

    def cost(self, block: Block) -> dict[str, sympy.Expr]:
        r"""``inversion``: one ``eigh`` per dense factor matrix, :data:`EIGH_FLOPS` ``d^3`` each (``k b^3`` when
        split into ``k`` blocks of ``b``); ``precondition``: two rotations (``2 numel(M) d`` per dense factor
        each, ``2 numel(M) b`` when split) and the division;
        ``statistics``: the kind's factor statistics plus the scaling (per sample of the Fisher:
        rotating the ``R`` rows, ``2 R d^2`` per dense factor (``2 R k b^2`` when split), and squaring/summing
        the rotated per-example products, about ``4 R numel(M)``, ``R`` the rows over all uses);
        ``state_bytes``: factors, eigenvalues, eigenbases, scaling and momentum in float32."""
        numel = math.prod(block.matrix_shape)
        dense = [f for f in block.factors.values() if not f.diagonal]
        precondition = 2 * sum(2 * numel * f.block_dim for f in dense) + 2 * numel
        inversion = sum(EIGH_FLOPS * math.prod(f.lead) * f.blocks * f.block_dim**3 for f in dense)
        floats = sum(math.prod(f.shape) + math.prod(f.shape if f.diagonal else f.shape[:-1])  # factor, eigenvalues
                     for f in block.factors.values())
        floats += sum(math.prod(f.shape) for f in dense) + numel + math.prod(self._scaling_shape(block))
        cost = {
            "precondition": sympy.Integer(precondition),
            "inversion": sympy.Integer(inversion),
            "state_bytes": sympy.Integer(4 * floats),
        }
        kind = KINDS.get(block.kind)
        if kind is not None and has_example_rows(kind, block):
            rows = block.rows
            lead = math.prod(next(iter(block.factors.values())).lead)
            scaling = rows * lead * (sum(2 * f.blocks * f.block_dim**2 for f in dense) + 4 * numel // lead)
            cost["statistics"] = kind.cost(block).get("statistics", 0) + scaling
        return cost


register_method(EKFAC)
