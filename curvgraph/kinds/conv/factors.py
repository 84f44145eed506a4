r"""Kronecker factors of a convolution (KFC, Grosse & Martens 2016), any spatial rank.

A convolution with weight ``(C_out, C_in/g, k_1, ..., k_d)`` applies, at each of the
``L`` output positions, a dense layer to the input *patch* under the kernel. With the
patch ``a`` flattened in the weight's ``(c, k_1, ..., k_d)`` order, a group ``j`` of a
grouped convolution is a dense layer ``(C_out/g) x (C_in/g * K)`` on its channels'
patches, and each group gets its own Kronecker block (block-diagonal across groups,
as the exact curvature is for a single layer). With ``g = 1`` the factors are 2-D,
otherwise ``(g, ., .)``.

* **expand** (KFC; default): every position of every example is a row:
  :math:`A = \frac1{NL}\sum_{n,l} \bar a_{nl}\bar a_{nl}^\top`,
  :math:`G = c\sum_{n,l} g_{nl} g_{nl}^\top`;
* **reduce**: :math:`A = \frac1N \sum_n \bar a_n \bar a_n^\top` with patches averaged over
  positions, :math:`G = c\sum_n g_n g_n^\top` with output gradients summed over them.

The block matrix is ``[W.reshape(C_out, -1), b]`` (per group), so ``kron(G, A)`` is
about ``torch.cat([W.flatten(1), b[:, None]], 1).flatten()`` -- curvlinops' convention.

**Memory.** The patches of one batch are materialized once per statistics step
(``N * L * C_in * K`` values in the factor dtype, e.g. 75 M floats = 300 MB for a
3x3 convolution with 64 input channels on a batch of 128 32x32 images), never more:
they are reduced to ``A`` right away. Steps that do not update statistics
(``factor_every > 1``) do not build them.

**Shifted correlations** (stride 1, :func:`shifted_input_moment`). Without the patches: with
offsets ``o, o'`` of the kernel and :math:`\delta = \mathrm{dilation}\cdot(o' - o)`, the
``(o, o')`` block of :math:`\sum_{n,l} a_{nl} a_{nl}^\top` is
:math:`\sum_n \sum_{u \in B_{o,o'}} x_{n,u} x_{n,u+\delta}^\top` over a box ``B`` of input
positions (those under offset ``o`` of some output position, with ``u + delta`` inside the
input). Every box holds a common *core*; :math:`R_\delta = \sum_n\sum_u x_{n,u} x_{n,u+\delta}^\top`
over the whole input is one matrix product of the input in channels-last layout with itself
shifted by ``delta``'s row offset (zero margins after each spatial dim keep the shift inside an
image), and each block is :math:`R_\delta` less the frame cells outside its box. That is one
product per distinct ``delta`` (13 for a 3x3 kernel, against its 81 blocks) plus the thin frame,
and no ``N * L * C * K`` buffer: :func:`shifted_moment_pays` says where it is cheaper.
"""

from __future__ import annotations

import itertools
import math
import operator

import sympy
import torch
import torch.nn.functional as F
from torch import Tensor

from ...curvature.kronecker import input_moment, normalized_moment, output_moment, with_ones_column


def conv_patches(x: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[tuple[int, int], ...],
                 dilation: tuple[int, ...]) -> Tensor:
    """Input patches ``(N, L, C * K)`` of a convolution, in the weight's ``(c, k_1, ..., k_d)`` order.

    ``padding`` holds ``(before, after)`` zeros per spatial dim; ``L`` is the number of
    output positions (row-major over the spatial dims, like the output).
    """
    rank = len(kernel)
    x = F.pad(x, [p for pair in reversed(padding) for p in pair])
    for i in range(rank):
        span = (kernel[i] - 1) * dilation[i] + 1
        x = x.unfold(2 + i, span, stride[i])[..., :: dilation[i]]
    order = (0,) + tuple(range(2, 2 + rank)) + (1,) + tuple(range(2 + rank, 2 + 2 * rank))
    return x.permute(order).reshape(x.shape[0], -1, x.shape[1] * math.prod(kernel))


def conv_input_factor(inputs: tuple[Tensor, ...], kernel: tuple[int, ...], stride: tuple[int, ...],
                      padding: tuple[tuple[int, int], ...], dilation: tuple[int, ...], groups: int, bias: bool,
                      reduce: bool, batch: int, dtype: torch.dtype, blocks: int = 1, every: int = 1,
                      shifted: bool = False) -> Tensor:
    """Input factor ``A`` of one batch: ``(d, d)``, or ``(groups, d, d)`` with ``d = C_in/groups * K + bias``;
    ``blocks = k > 1``: its ``k`` diagonal blocks ``(k, b, b)`` or ``(groups, k, b, b)``
    (:func:`curvgraph.plan.split_factor`). ``every = s > 1``: from the patches of every ``s``-th output
    position along each spatial dim only (spatial subsampling: ``s^r`` times fewer patches; the
    mean over them estimates the mean over all positions). ``shifted``: the same ``A`` from shifted
    correlations of the inputs, without patches (:func:`shifted_input_moment`; stride 1, ``expand``,
    full factors only)."""
    if shifted:
        parts = [shifted_input_moment(x, kernel, padding, dilation, groups, dtype) for x in inputs]
        moment, total = sum([m for m, _, _ in parts]), sum([t for _, t, _ in parts])
        factor = normalized_moment(moment, total, sum([n for _, _, n in parts]), bias)
        return factor[0] if groups == 1 else factor
    strided = tuple(st * every for st in stride)
    patches = [conv_patches(x.to(dtype), kernel, strided, padding, dilation) for x in inputs]
    patches = [p.reshape(batch, p.shape[1], groups, -1) for p in patches]
    if reduce:
        rows = (torch.cat(patches, 1).mean(1),)
    else:
        rows = tuple(p.reshape(-1, groups, p.shape[-1]) for p in patches)
    factor = input_moment(rows, bias, dtype, blocks)
    return factor[0] if groups == 1 else factor


@torch.compiler.assume_constant_result
def correlation_plan(spatial: tuple[int, ...], kernel: tuple[int, ...], padding: tuple[tuple[int, int], ...],
                     dilation: tuple[int, ...]) -> tuple:
    r"""What :func:`shifted_input_moment` computes for a stride-1 convolution of inputs of size ``spatial``
    (Python ints only, so that ``torch.compile`` takes the result as a constant). Returns, in order:

    * ``k``: kernel offsets, row-major over the kernel dims (the weight's order);
    * ``pairs``: ``(a, b)`` offset index pairs with :math:`\delta = \mathrm{dilation}(o_b - o_a) \ge 0`
      (lexicographic; the other blocks are their transposes);
    * ``margins``: zeros after each spatial dim (the largest ``|delta|`` along it);
    * ``row_shifts``: each distinct ``delta`` (ascending; ``0`` first) as an offset in the flattened
      positions of the input with its margins;
    * ``pair_shift``: per pair, the index of its ``delta``;
    * ``frame``: per cell size ``l``, ``(cells, positions, shifted)``: the flattened positions of those frame
      cells (``cells * l``) and the same moved by each ``delta`` (``J * cells * l``, ``delta``-major);
    * ``combos``: the number of (``delta``, frame cell) products, numbered size group by size group,
      ``delta``-major inside each;
    * ``outside``: ``(pair, combo)`` index lists: the frame cells outside each pair's box, with its ``delta``;
    * ``diagonal_outside``: ``(offset, cell)`` index lists: the frame cells outside offset ``o``'s window
      (for the bias border; cells numbered in ``frame``'s order);
    * ``cells``: the number of frame cells;
    * ``assemble``: for every ordered offset pair, row-major, its index in ``pairs`` followed by the
      transposed ``pairs``;
    * ``outputs``: the number of output positions ``L``;
    * ``frame_positions``: the number of input positions in frame cells.

    The boxes' edges cut every spatial dim into segments; the products of segments are *cells*, and the
    cell inside every box is the *core*; the other cells are the *frame* (the input's border, a few
    positions wide).
    """
    rank = len(kernel)
    offsets = list(itertools.product(*(range(k) for k in kernel)))
    outputs = [s + p[0] + p[1] - d * (k - 1) for s, k, p, d in zip(spatial, kernel, padding, dilation)]
    pairs, boxes = [], []
    for a, o in enumerate(offsets):
        for b, o2 in enumerate(offsets):
            delta = tuple(d * (q2 - q) for d, q, q2 in zip(dilation, o, o2))
            if delta >= (0,) * rank:
                starts = [d * q - p[0] for d, q, p in zip(dilation, o, padding)]
                pairs.append((a, b, delta))
                boxes.append(tuple((max(st, 0, -dl), min(st + n, s, s - dl))
                                   for st, n, s, dl in zip(starts, outputs, spatial, delta)))
    deltas = sorted({p[2] for p in pairs})
    margins = tuple(max(abs(dl[i]) for dl in deltas) for i in range(rank))
    strides = [math.prod(s + m for s, m in zip(spatial[i + 1:], margins[i + 1:])) for i in range(rank)]

    def flat(position) -> int:
        return sum(u * s for u, s in zip(position, strides))

    def inside(cell, box) -> bool:
        return all(lo <= c_lo and c_hi <= hi for (c_lo, c_hi), (lo, hi) in zip(cell, box))

    core = tuple((max(b[i][0] for b in boxes), min(b[i][1] for b in boxes)) for i in range(rank))
    cuts = [sorted({0, spatial[i]} | {min(max(e, 0), spatial[i]) for b in boxes for e in b[i]}) for i in range(rank)]
    cells = [c for c in itertools.product(*(list(zip(cut[:-1], cut[1:])) for cut in cuts)) if c != core]
    by_size: dict[int, list] = {}
    for cell in cells:
        by_size.setdefault(math.prod(hi - lo for lo, hi in cell), []).append(cell)
    groups = [by_size[n] for n in sorted(by_size)]
    ordered = [cell for group in groups for cell in group]
    shifts = [flat(delta) for delta in deltas]
    frame, combo, combos = [], {}, 0
    for group in groups:
        positions = [flat(u) for cell in group for u in itertools.product(*(range(lo, hi) for lo, hi in cell))]
        frame.append((len(group), tuple(positions), tuple(p + s for s in shifts for p in positions)))
        for j in range(len(deltas)):
            for x, cell in enumerate(group):
                combo[j, cell] = combos + j * len(group) + x
        combos += len(deltas) * len(group)
    outside = [(q, combo[deltas.index(p[2]), cell]) for q, (p, box) in enumerate(zip(pairs, boxes))
               for cell in ordered if not inside(cell, box)]
    diagonal_outside = [(p[0], x) for p, box in zip(pairs, boxes) if p[0] == p[1]
                        for x, cell in enumerate(ordered) if not inside(cell, box)]
    where = {(p[0], p[1]): q for q, p in enumerate(pairs)}
    k = len(offsets)
    assemble = tuple(where[a, b] if (a, b) in where else len(pairs) + where[b, a] for a in range(k) for b in range(k))
    return (k, len(pairs), margins, tuple(shifts), tuple(deltas.index(p[2]) for p in pairs), tuple(frame), combos,
            tuple(tuple(v) for v in zip(*outside)) or ((), ()),
            tuple(tuple(v) for v in zip(*diagonal_outside)) or ((), ()), len(ordered), assemble,
            math.prod(outputs), sum(math.prod(hi - lo for lo, hi in cell) for cell in cells))


def shifted_input_moment(x: Tensor, kernel: tuple[int, ...], padding: tuple[tuple[int, int], ...],
                         dilation: tuple[int, ...], groups: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, int]:
    r"""``(moment, total, count)`` of the patches of one stride-1 use, without the patches:
    :math:`\sum_{n,l} a_{nl} a_{nl}^\top` ``(g, d, d)``, :math:`\sum_{n,l} a_{nl}` ``(g, d)`` and ``N L``
    (``d = C/g * K``, the weight's ``(c, k_1, ..., k_r)`` order), as :func:`conv_patches` would give them.

    ``x`` is ``(N, C, *spatial)``. See the module docstring for the math and :func:`correlation_plan` for
    the bookkeeping. The spatial sizes are read as ints: under ``torch.compile`` this fixes them (a guard:
    another image size compiles the step again; the batch size stays symbolic). Cost: one product
    ``(c, N P') x (N P', c)`` per distinct shift (``P'`` the positions with margins), and
    ``(c, N l) x (N l, c)`` per shift and frame cell of ``l`` positions.
    """
    spatial = tuple([operator.index(s) for s in x.shape[2:]])  # under torch.compile: fixed (int() stays symbolic)
    (k, npairs, margins, row_shifts, pair_shift, frame, combos, outside, diagonal_outside, ncells, assemble,
     outputs, _) = correlation_plan(spatial, kernel, padding, dilation)
    n, c = x.shape[0], x.shape[1] // groups
    per_image = math.prod([s + m for s, m in zip(spatial, margins)])
    padded = F.pad(x.to(dtype), [v for m in reversed(margins) for v in (0, m)])
    images = padded.reshape(n, groups, c, per_image).permute(1, 0, 3, 2).contiguous()  # (g, N, P', c)
    rows = images.reshape(groups, n * per_image, c)
    length = n * per_image
    # every pair of positions delta apart; a position whose partner is in a margin meets a zero
    shifted = torch.stack([rows[:, max(0, -s):length - max(0, s)].transpose(1, 2)
                           @ rows[:, max(0, s):length + min(0, s)] for s in row_shifts], 1)  # (g, J, c, c)
    values, totals = shifted[:, list(pair_shift)], rows.sum(1)[:, None].expand(groups, k, c)
    if ncells and outside[0]:
        products, sums = [], []
        for cells, at, moved in frame:  # a moved position before the image counts from its end: a margin
            mine = images[:, :, list(at)].reshape(groups, n, cells, -1, c)
            partner = images[:, :, list(moved)].reshape(groups, n, -1, cells, mine.shape[3], c)
            products.append(torch.einsum("gnxla,gnjxlb->gjxab", mine, partner).reshape(groups, -1, c, c))
            sums.append(mine.sum((1, 3)))
        outside_pair = torch.zeros(npairs, combos, dtype=dtype, device=x.device)
        outside_pair[list(outside[0]), list(outside[1])] = 1
        values = values - torch.einsum("qm,gmab->gqab", outside_pair, torch.cat(products, 1))
        if diagonal_outside[0]:
            outside_window = torch.zeros(k, ncells, dtype=dtype, device=x.device)
            outside_window[list(diagonal_outside[0]), list(diagonal_outside[1])] = 1
            totals = totals - torch.einsum("ox,gxc->goc", outside_window, torch.cat(sums, 1))
    blocks = torch.cat([values, values.transpose(-1, -2)], 1)[:, list(assemble)].reshape(groups, k, k, c, c)
    moment = blocks.permute(0, 3, 1, 4, 2).reshape(groups, c * k, c * k)
    return moment, totals.permute(0, 2, 1).reshape(groups, c * k), n * outputs


def shifted_moment_pays(spatial: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...],
                        padding: tuple[tuple[int, int], ...], dilation: tuple[int, ...], channels: int,
                        batch: int) -> bool:
    """Whether :func:`shifted_input_moment` is the cheaper way to ``A`` for inputs ``(batch, groups * channels,
    *spatial)``: stride 1, a kernel of more than one position, at least 8 channels per group (below that the
    patches are small and the products too narrow to be fast), a frame of at most half the positions, and
    neither the shifted frame positions nor the frame's products larger than the patches.

    Measured (2-core CPU, compiled, 3x3 "same"): 128 x 16 x 32 x 32 inputs 44 -> 20 ms, 32 x 128 x 16 x 16
    73 -> 37 ms; 32 x 256 x 8 x 8 59 -> 96 ms and 128 x 3 x 32 x 32 4 -> 10 ms (excluded here).
    """
    if any(s != 1 for s in stride) or math.prod(kernel) == 1 or channels < 8:
        return False
    (k, _, _, row_shifts, _, _, _, _, _, cells, _, outputs,
     frame_positions) = correlation_plan(tuple(spatial), tuple(kernel), tuple(padding), tuple(dilation))
    patches = outputs * k
    return (2 * frame_positions <= math.prod(spatial) and len(row_shifts) * frame_positions <= patches
            and len(row_shifts) * cells * channels <= batch * patches)


def conv_grad_factor(grads: tuple[Tensor, ...], groups: int, reduce: bool, examples: int, scale: Tensor,
                     dtype: torch.dtype, blocks: int = 1) -> Tensor:
    """Output-gradient factor ``G``: ``(o, o)`` or ``(groups, o, o)`` with ``o = C_out/groups``
    (``blocks = k > 1``: its ``k`` diagonal blocks, as for :func:`conv_input_factor`).

    ``grads`` are ``(S*N, C_out, *spatial)`` output gradients of each use.
    """
    per_example = [g.to(dtype).movedim(1, -1).reshape(examples, -1, groups, g.shape[1] // groups) for g in grads]
    if reduce:
        rows = (sum(g.sum(1) for g in per_example),)
    else:
        rows = tuple(g.reshape(-1, groups, g.shape[-1]) for g in per_example)
    factor = output_moment(rows, scale, dtype, blocks)
    return factor[0] if groups == 1 else factor


def conv_example_rows(inputs: tuple[Tensor, ...], grads: tuple[Tensor, ...], kernel: tuple[int, ...],
                      stride: tuple[int, ...], padding: tuple[tuple[int, int], ...], dilation: tuple[int, ...],
                      groups: int, bias: bool, batch: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    r"""Example rows ``(G rows, A rows)``: per group, :math:`M_n = \sum_l g_{n,l} \bar a_{n,l}^\top` over output positions.

    ``inputs`` are each use's ``(N, C_in, *spatial)`` inputs, ``grads`` its
    ``(S*N, C_out, *spatial_out)`` output vectors. Returns ``(S*N, L, o)`` and
    ``(N, L, d)``, or ``(S*N, L, groups, o)`` and ``(N, L, groups, d)`` for grouped
    convolutions (``d = C_in/groups * K + bias``, ``L`` the positions of all uses).
    """
    patches = [conv_patches(x.to(dtype), kernel, stride, padding, dilation) for x in inputs]
    a = with_ones_column(torch.cat([p.reshape(batch, p.shape[1], groups, -1) for p in patches], 1), bias)
    g = torch.cat([y.to(dtype).movedim(1, -1).reshape(y.shape[0], -1, groups, y.shape[1] // groups) for y in grads], 1)
    return (g[:, :, 0], a[:, :, 0]) if groups == 1 else (g, a)


def direct_inputs(inputs: tuple[Tensor, ...], stride: tuple[int, ...]) -> tuple[Tensor, ...]:
    r"""The inputs of the direct convolution that equals a transposed one of ``stride``: ``s - 1`` zeros
    between neighbouring elements along each spatial dim, ``(N, C, (L - 1) s + 1, ...)``.

    A transposed convolution (the adjoint of a convolution of the same geometry) of ``x`` with
    weight ``W`` of shape ``(C_in, C_out/g, k...)`` is the stride-1 convolution of these
    zero-inserted inputs, padded by :math:`d (k - 1) - p` before and that plus ``output_padding``
    after, with dilation ``d`` and the weight :func:`direct_weight`.
    """
    if all(st == 1 for st in stride):
        return inputs
    direct = []
    for x in inputs:
        inserted = x.new_zeros(*x.shape[:2], *((n - 1) * st + 1 for n, st in zip(x.shape[2:], stride)))
        inserted[(slice(None), slice(None), *(slice(None, None, st) for st in stride))] = x
        direct.append(inserted)
    return tuple(direct)


def direct_weight(weight: Tensor, groups: int) -> Tensor:
    """The weight ``(C_out, C_in/g, k...)`` of the direct convolution that equals a transposed one with
    ``weight`` of shape ``(C_in, C_out/g, k...)`` (:func:`direct_inputs`): per group, input and output
    channels swapped and the kernel flipped along every spatial dim."""
    c_in, c_out_group, *kernel = weight.shape
    spatial = tuple(range(3, 3 + len(kernel)))
    per_group = weight.reshape(groups, c_in // groups, c_out_group, *kernel).transpose(1, 2).flip(spatial)
    return per_group.reshape(groups * c_out_group, c_in // groups, *kernel)


def transposed_weight(direct: Tensor, groups: int) -> Tensor:
    """Inverse of :func:`direct_weight`: the transposed convolution's ``(C_in, C_out/g, k...)`` weight."""
    c_out, c_in_group, *kernel = direct.shape
    spatial = tuple(range(3, 3 + len(kernel)))
    per_group = direct.reshape(groups, c_out // groups, c_in_group, *kernel).flip(spatial).transpose(1, 2)
    return per_group.reshape(groups * c_in_group, c_out // groups, *kernel)


def transposed_parts(parts: tuple[Tensor, ...], groups: int) -> tuple[Tensor, ...]:
    """:func:`conv_split`'s ``(weight, bias...)`` of the direct convolution, the weight made the transposed one's."""
    return (transposed_weight(parts[0], groups),) + tuple(parts[1:])


def conv_gradient_matrix(weight: Tensor, bias: Tensor | None, groups: int, dtype: torch.dtype) -> Tensor:
    """``[W.reshape(C_out, -1), b]`` per group: ``(C_out, d)`` or ``(groups, C_out/groups, d)``."""
    out = weight.shape[0]
    matrix = weight.reshape(groups, out // groups, -1)
    if bias is not None:
        matrix = torch.cat([matrix, bias.reshape(groups, out // groups, 1)], 2)
    matrix = matrix.to(dtype)
    return matrix[0] if groups == 1 else matrix


def conv_split(matrix: Tensor, bias: bool, weight_shape: tuple[int, ...]) -> tuple[Tensor, ...]:
    """Inverse of :func:`conv_gradient_matrix`: ``(W-shaped tensor,)`` or ``(W-shaped, b-shaped)``."""
    rows = matrix.reshape(weight_shape[0], -1)
    weight = (rows[:, :-1] if bias else rows).reshape(weight_shape)
    return (weight,) + ((rows[:, -1],) if bias else ())


def shifted_statistics(block) -> bool:
    """Whether ``block``'s input factor comes from shifted correlations (:func:`shifted_input_moment`): an
    ``expand`` block with full (unsplit, not diagonal) factors and no spatial subsampling, where
    :func:`shifted_moment_pays` holds for every use's input at the example inputs."""
    layout, a = block.layout, block.factors["A"]
    if block.sharing == "reduce" or layout.get("stats_every", 1) > 1 or a.blocks > 1 or a.diagonal:
        return False
    geometry = [layout[k] for k in ("kernel", "stride", "padding", "dilation")]
    return all(shifted_moment_pays(shape[2:], *geometry, layout["weight_shape"][1], shape[0])
               for shape in layout.get("example_inputs", ()))


def cost(block) -> dict[str, sympy.Expr]:
    """FLOPs of a convolution block in the symbolic sizes; ``R`` = examples x output positions.

    Per group a dense layer on ``R`` rows: forward/backward ``(4 + 2) R in out`` (no input
    gradient for a first layer), statistics ``2 R (in+1)^2 + 2 R out^2`` (``2 R d b`` for a
    factor split into blocks of ``b``), an extra
    backward ``2 R in out``; ``workspace_bytes`` is the batch of patches the statistics
    materialize (4 bytes per float). With ``layout["stats_every"] = s`` (spatial subsampling) ``A``'s
    rows and the patches are about ``R / s^r``. With shifted correlations (:func:`shifted_statistics`)
    ``A`` costs ``2 (R / L) c^2 J (P' + F)`` per use and group (``c`` input channels per group, ``J``
    shifts, ``P'`` input positions with margins, ``F`` frame positions, all at the example inputs' image
    size; ``R / L`` examples) and the workspace is the input with margins and the frame positions, shifted.
    """
    groups = block.dims["groups"]
    rows = block.rows
    grad_rows = sympy.Add(*(u.rows for u in block.uses if u.input_grad))
    n_in, n_out = block.dims["in"], block.dims["out"]
    a, g = block.factors["A"], block.factors["G"]
    a_rows = rows / block.layout.get("stats_every", 1) ** len(block.layout["kernel"])  # spatial subsampling of A
    a_flops, workspace = a_rows * a.dim * a.block_dim, a_rows * n_in
    if shifted_statistics(block):
        layout, channels = block.layout, block.layout["weight_shape"][1]
        a_flops, workspace = sympy.Integer(0), sympy.Integer(0)
        for use, shape in zip(block.uses, layout["example_inputs"]):
            (_, _, margins, row_shifts, _, _, _, _, _, _, _, outputs,
             frame) = correlation_plan(shape[2:], *(layout[k] for k in ("kernel", "padding", "dilation")))
            padded, shifts = math.prod(s + m for s, m in zip(shape[2:], margins)), len(row_shifts)
            examples = use.rows / outputs
            a_flops += examples * channels ** 2 * shifts * (padded + frame)
            workspace += examples * channels * (padded + (shifts + 1) * frame)
    return {
        "forward_backward": groups * (4 * rows + 2 * grad_rows) * n_in * n_out,
        "statistics": groups * 2 * (a_flops + rows * g.dim * g.block_dim),
        "backward_per_sample": groups * 2 * grad_rows * n_in * n_out,
        "workspace_bytes": 4 * groups * workspace,
    }
