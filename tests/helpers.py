"""Independent references for the tests: exact curvature with torch.func, curvlinops' KFAC."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

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


def exact_ggn_block(model: nn.Module, loss: str, x: Tensor, y: Tensor, weight: str, bias: str | None,
                    transposed: bool = False) -> Tensor:
    r"""Exact GGN :math:`\frac1K\sum_k J_k^\top H_k J_k` of the mean loss w.r.t. one block, by torch.func.

    The block's coordinates are ``[W, b]`` row-major with ``W`` in ``(out, in)``
    layout (``transposed``: the parameter is stored ``(in, out)``).
    """
    params = {n: p.detach() for n, p in model.named_parameters()}
    loss_fn = LOSS_MODULES[loss]()
    w = params[weight].T if transposed else params[weight]
    out_features = w.shape[0]

    def output_of(theta: Tensor) -> Tensor:
        matrix = theta.reshape(out_features, -1)
        new = dict(params)
        new_w = matrix[:, : w.shape[1]]
        new[weight] = new_w.T if transposed else new_w
        if bias is not None:
            new[bias] = matrix[:, -1]
        return functional_call(model, new, (x,))

    theta = block_matrix(w, params[bias] if bias else None)
    output = output_of(theta)
    jac = jacrev(output_of)(theta).reshape(output.numel(), theta.numel())
    hess = hessian(lambda o: loss_fn(o.reshape(output.shape), y))(output.flatten())
    return jac.T @ hess @ jac


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
