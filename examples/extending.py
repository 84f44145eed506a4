"""A block kind and a method defined outside curvgraph: the complete example of ``docs/extending.md``.

    python examples/extending.py         (needs scikit-learn)

* ``Scale``: the kind ``scale`` for an elementwise scale ``y = x * s`` (``s`` a 1-D
  parameter over the last dim of ``x``) with a *diagonal* curvature block;
* ``DiagonalFisher``: the method ``diag_fisher``, an RMSprop-like rule whose
  second-moment estimate is the diagonal of the Kronecker-factored curvature,
  :math:`\\operatorname{diag}(\\otimes_i F_i)`, refreshed every ``invert_every`` steps.
"""

from __future__ import annotations

import math
from typing import Sequence

import sympy
import torch
from torch import Tensor

import curvgraph
from curvgraph.methods.base import fraction, non_negative, one_of, positive
from curvgraph.passes.graph_utils import aten, depends_on, ndim


# ------------------------------------------------------------------ the kind's math
def scale_factor(inputs: tuple[Tensor, ...], grads: tuple[Tensor, ...], batch: int, scale: Tensor,
                 dtype: torch.dtype) -> Tensor:
    r"""Diagonal curvature of ``y = x * s``: :math:`F = c \sum_n v_n \odot v_n`, :math:`v_n = \sum_p g_{np} \odot x_{np}`.

    ``inputs`` are ``(N, ..., D)``, ``grads`` ``(S*N, ..., D)``; the per-example gradients of
    every use add up (the uses share ``s``). Returns ``(D,)``.
    """
    total = 0
    for x, g in zip(inputs, grads):
        x = x.to(dtype).reshape(batch, -1, x.shape[-1])
        g = g.to(dtype).reshape(-1, batch, x.shape[1], x.shape[-1])
        total = total + (g * x).sum(2).flatten(0, 1)
    return (total * total).sum(0) * scale


class Scale(curvgraph.BlockKind):
    """``x * s`` with a trainable 1-D ``s`` that nothing else uses."""

    name = "scale"

    def find(self, traced, claims, sharing):
        params = set(traced.params)
        trainable = depends_on(traced.graph, params)
        found = {}
        for node in traced.graph.nodes:
            if node.op != "call_function" or node.target is not aten.mul.Tensor or len(node.args) != 2:
                continue
            x, s = node.args
            if not (isinstance(s, torch.fx.Node) and s.name in params and ndim(s) == 1) or claims.is_claimed(s.name):
                continue
            if not isinstance(x, torch.fx.Node) or ndim(x) < 2:
                continue
            found.setdefault(s, []).append(node)
        blocks = []
        for s, muls in found.items():
            if set(s.users) != set(muls):
                claims.reject(s.name, "the scale is also used elsewhere")
                continue
            uses = [curvgraph.layer_use([m.args[0]], [m], m.args[0].meta["val"].shape[0], trainable) for m in muls]
            blocks.append(curvgraph.new_block(traced, self, [s], uses, {"features": int(s.meta["val"].shape[0])}))
        return blocks

    def factors(self, block):
        return {"F": curvgraph.Factor((block.dims["features"],), axis=-1, diagonal=True)}

    def cost(self, block):
        elements = sympy.Add(*(sympy.Mul(*shape) for u in block.uses for shape in u.output_shapes))
        return {"forward_backward": 3 * elements, "statistics": 3 * elements, "backward_per_sample": elements}

    def write_batch_factors(self, w, b, dtype):
        acts, grads = w.pack(u.inputs[0] for u in b.uses), w.pack(u.grads[0] for u in b.uses)
        w.line(f"{b.batch_factors['F']} = {w.call(scale_factor, acts, grads, 'batch', 'scale', dtype)}")

    def write_matrix(self, w, b, tensors: Sequence[str], dtype):
        return f"{tensors[0]}.to({dtype})"

    def write_split(self, w, b, matrix):
        return w.pack([matrix])


# ------------------------------------------------------------------ the method's math
def ema(old: Tensor, new: Tensor, decay: Tensor) -> Tensor:
    """Running average (named like K-FAC's helper on purpose: the generator keeps both apart)."""
    return decay * old + (1 - decay) * new


def factor_diagonal(factors: tuple[Tensor, ...], axes: tuple[int, ...], diagonal: tuple[bool, ...]) -> Tensor:
    r""":math:`\operatorname{diag}(\otimes_i F_i)` shaped like the block matrix: each factor's diagonal along its axis."""
    rank = max(-a for a in axes)
    result = None
    for factor, axis, diag in zip(factors, axes, diagonal):
        d = factor if diag else factor.diagonal(dim1=-2, dim2=-1)
        view = d.shape[:-1] + tuple(d.shape[-1] if k == axis else 1 for k in range(-rank, 0))
        result = d.reshape(view) if result is None else result * d.reshape(view)
    return result


def diagonal_direction(grad: Tensor, second_moment: Tensor, lr: Tensor, damping: Tensor, power: float) -> Tensor:
    r""":math:`\eta M / (\hat F + \lambda)^{p}`: the block matrix moves by minus this."""
    return lr * grad / (second_moment + damping) ** power


class DiagonalFisher(curvgraph.Method):
    """RMSprop-like: divide by (a running average of) the diagonal of the factored curvature."""

    name = "diag_fisher"
    hyper = {
        "lr": curvgraph.Hyper(0.01, positive),
        "weight_decay": curvgraph.Hyper(0.0, non_negative),
        "damping": curvgraph.Hyper(1e-8, positive),
        "ema": curvgraph.Hyper(0.9, fraction),
        "power": curvgraph.Hyper(0.5, one_of(0.5, 1.0), static=True),
    }

    def step_values(self, group, first_statistics):
        values = super().step_values(group, first_statistics)
        if first_statistics:
            values["ema"] = 0.0
        return values

    def preconditioner(self, block):
        return ("second_moment",)

    def state(self, block):
        return {"second_moment": curvgraph.StateSpec(block.matrix_shape)}

    def write_statistics(self, w, blocks):
        for b in blocks:
            for f in b.factors:
                w.line(f"{b.factors[f]} = {w.call(ema, b.state(f), b.batch_factors[f], w.hyper('ema'))}")
                w.commit(b.state(f), b.factors[f], when="update_stats")
                w.check(b.factors[f], when="update_stats")

    def write_refresh(self, w, blocks):
        for b in blocks:
            specs = b.block.factors
            call = w.call(factor_diagonal, w.pack(b.factors[f] for f in specs), tuple(s.axis for s in specs.values()),
                          tuple(s.diagonal for s in specs.values()))
            w.line(f"{b.var('second_moment')} = {call}")
            w.commit(b.state("second_moment"), b.var("second_moment"), when="refresh")

    def write_direction(self, w, blocks):
        for b in blocks:
            call = w.call(diagonal_direction, b.grad, b.var("second_moment"), w.hyper("lr"), w.hyper("damping"),
                          self.options["power"])
            w.line(f"{b.direction} = {call}")
            w.check(b.direction)

    def cost(self, block):
        numel = math.prod(block.matrix_shape)
        return {"precondition": sympy.Integer(3 * numel), "inversion": sympy.Integer(0),
                "state_bytes": sympy.Integer(4 * numel)}


def main() -> None:
    """Register both, then train a model with a learned scale on scikit-learn's digits."""
    from sklearn.datasets import load_digits
    from torch import nn

    curvgraph.register_block_kind(Scale(), before="norm")  # ahead of the built-in norm kind, which takes scales too
    curvgraph.register_method(DiagonalFisher)

    class ScaledNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 128)
            self.s = nn.Parameter(torch.ones(128))  # y = x * s: the "scale" kind
            self.head = nn.Linear(128, 10)

        def forward(self, x):
            return self.head(torch.tanh(self.fc(x)) * self.s)

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    for method in ("kfac", "diag_fisher"):
        torch.manual_seed(0)
        model = ScaledNet()
        opt = curvgraph.compile(model, example_inputs=(x[:64],), method=method, backend="eager")
        if method == "kfac":
            print(opt.plan)  # fc and head: dense; s: scale, with its diagonal factor F
        for step in range(200):
            index = torch.randint(0, len(x), (64,))
            opt.step(x[index], y[index])
        with torch.no_grad():
            loss = nn.functional.cross_entropy(model(x), y).item()
        print(f"{method:>12}: training loss after 200 steps {loss:.4f}")


if __name__ == "__main__":
    main()
