"""Independent references for the tests: exact curvature with torch.func, curvlinops' KFAC."""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

import curvgraph

LOSS_MODULES = {
    "cross_entropy": nn.CrossEntropyLoss,
    "mse": nn.MSELoss,
    "bce_with_logits": nn.BCEWithLogitsLoss,
}


def make_targets(loss: str, output_shape: tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
    """Random targets for ``loss`` and a model output of ``output_shape``."""
    if loss == "cross_entropy":
        shape = (output_shape[0],) + tuple(output_shape[2:])
        return torch.randint(0, output_shape[1], shape, generator=generator)
    if loss == "mse":
        return torch.randn(output_shape, generator=generator, dtype=torch.get_default_dtype())
    return torch.rand(output_shape, generator=generator, dtype=torch.get_default_dtype()).round()


def block_matrix(weight: Tensor, bias: Tensor | None) -> Tensor:
    """``[W, b]`` flattened row-major: the vec order of curvgraph's ``kron(G, A)``."""
    matrix = weight if bias is None else torch.cat([weight, bias[:, None]], 1)
    return matrix.flatten()


def exact_ggn(model: nn.Module, loss: str, x: Tensor, y: Tensor, theta: Tensor,
              unpack: Callable[[Tensor], dict[str, Tensor]]) -> Tensor:
    r"""Exact GGN :math:`\frac1K\sum_k J_k^\top H_k J_k` of the mean loss w.r.t. coordinates ``theta``, by torch.func.

    ``unpack(theta)`` returns the parameters (by name) that ``theta`` stands for.
    """
    params = {n: p.detach() for n, p in model.named_parameters()}
    loss_fn = LOSS_MODULES[loss]()

    def output_of(t: Tensor) -> Tensor:
        return functional_call(model, {**params, **unpack(t)}, (x,))

    output = output_of(theta)
    jac = jacrev(output_of)(theta).reshape(output.numel(), theta.numel())
    hess = hessian(lambda o: loss_fn(o.reshape(output.shape), y))(output.flatten())
    return jac.T @ hess @ jac


def exact_ggn_block(model: nn.Module, loss: str, x: Tensor, y: Tensor, weight: str, bias: str | None,
                    transposed: bool = False) -> Tensor:
    """Exact GGN of a dense block in the coordinates ``[W, b]`` row-major, ``W`` in ``(out, in)``
    layout (``transposed``: the parameter is stored ``(in, out)``)."""
    params = dict(model.named_parameters())
    w = params[weight].detach().T if transposed else params[weight].detach()

    def unpack(theta: Tensor) -> dict[str, Tensor]:
        matrix = theta.reshape(w.shape[0], -1)
        new = {weight: matrix[:, : w.shape[1]].T if transposed else matrix[:, : w.shape[1]]}
        if bias is not None:
            new[bias] = matrix[:, -1]
        return new

    return exact_ggn(model, loss, x, y, block_matrix(w, params[bias].detach() if bias else None), unpack)


def curvlinops_factors(model: nn.Module, loss: str, x: Tensor, y: Tensor, fisher: str,
                       kfac_approx: str = "expand") -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(A, G)`` by module name from ``curvlinops.KFACLinearOperator`` (the test oracle)."""
    from curvlinops import KFACLinearOperator

    fisher_type = {"type2": "type-2", "empirical": "empirical", "mc": "mc"}[fisher]
    model = copy.deepcopy(model)
    kfac = KFACLinearOperator(
        model, LOSS_MODULES[loss](), list(model.parameters()), [(x, y)], fisher_type=fisher_type,
        kfac_approx=kfac_approx, separate_weight_and_bias=False, check_deterministic=False,
    )
    kfac.compute_kronecker_factors()
    return kfac._input_covariances, kfac._gradient_covariances


def assert_plan_covers(plan, model: nn.Module) -> None:
    """Every trainable parameter of ``model`` is in exactly one curvature block or in the fallback with a reason, and
    every frozen one is listed as frozen."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    in_blocks = [p for b in plan.blocks for p in b.params]
    assert len(in_blocks) == len(set(in_blocks)) and set(in_blocks) | set(plan.fallback_params) == trainable
    assert not set(in_blocks) & set(plan.fallback_params)
    assert all(plan.fallback_reasons.get(p) for p in plan.fallback_params)
    assert set(plan.frozen_params) == frozen


def assert_export_resumes(opt, model: nn.Module, batches, path):
    """``opt``'s exported step, loaded on a copy of ``model`` with ``opt``'s state, continues bitwise as ``opt`` does:
    the same losses on ``batches``, the same model state and the same ``stats()`` after them. Returns the exported
    step."""
    twin = copy.deepcopy(model)
    trainer = curvgraph.load_step(opt.export(path), twin)
    trainer.load_state_dict(opt.state_dict())
    for x, y in batches:
        assert torch.equal(opt.step(x, y), trainer.step(x, y))
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name
    assert trainer.stats() == opt.stats() and opt.stats()["steps"] >= len(batches)
    return trainer


def reference_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for ``torch.func`` references: its BatchNorms use the same batch statistics but update no
    running buffers (a buffer update inside ``torch.func`` is not allowed)."""
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.track_running_stats = False
    return reference
