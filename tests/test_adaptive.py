"""K-FAC with lr='auto': the quadratic-model step against a brute-force solve with the exact GGN,
the Levenberg-Marquardt rule on scripted reduction ratios, and M(delta) <= 0."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import curvgraph
from curvgraph.methods.quadratic import accepted, levenberg_marquardt, quadratic_model_step
from helpers import exact_ggn


def mlp(activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 5), activation(), nn.Linear(5, 3))


def block_vector(model: nn.Sequential) -> torch.Tensor:
    """Both layers' ``[W, b]`` row-major, concatenated: the coordinates of the quadratic model."""
    return torch.cat([torch.cat([m.weight, m.bias[:, None]], 1).flatten() for m in (model[0], model[2])]).detach()


def unpack(theta: torch.Tensor) -> dict[str, torch.Tensor]:
    first, second = theta[:25].reshape(5, 5), theta[25:].reshape(3, 6)
    return {"0.weight": first[:, :4], "0.bias": first[:, 4], "2.weight": second[:, :5], "2.bias": second[:, 5]}


def preconditioned(model, x, y, factors, damping: float, weight_decay: float):
    """``V = (G_d kron A_d)^{-1} vec(M)`` per block (factored Tikhonov damping), and ``M``, concatenated."""
    model = copy.deepcopy(model)
    nn.functional.cross_entropy(model(x), y).backward()
    directions, grads = [], []
    for name, layer in (("0", model[0]), ("2", model[2])):
        M = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1) + weight_decay * torch.cat(
            [layer.weight, layer.bias[:, None]], 1).detach()
        A, G = factors[name]["A"], factors[name]["G"]
        pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
        kron = torch.kron(G + math.sqrt(damping) / pi * torch.eye(G.shape[0]), A + pi * math.sqrt(damping) * torch.eye(A.shape[0]))
        directions.append(torch.linalg.solve(kron, M.flatten()))
        grads.append(M.flatten())
    return torch.cat(directions), torch.cat(grads)


class RawHardsigmoid(nn.Module):
    """``aten.hardsigmoid`` called as the op: the compile-time check, which runs ``F.hardsigmoid`` in the step's form,
    sees the op's backward with no derivative (torch 2.13) and picks forward mode."""

    def forward(self, x):
        return torch.ops.aten.hardsigmoid.default(x)


@pytest.mark.parametrize("seed, interior, activation, products", [
    (11, True, nn.Tanh, "output_jvps("), (0, False, nn.Tanh, "output_jvps("),
    # hardsigmoid's backward has no derivative in torch 2.13; the step writes it as hardtanh, whose has
    (11, False, nn.Hardsigmoid, "output_jvps("),
    # where the check does not see the op in that form: forward mode instead of the transposed backward
    (11, False, RawHardsigmoid, "forward_mode_jvps("),
])
def test_step_size_and_momentum_solve_the_quadratic_model_with_the_exact_ggn(float64, seed, interior, activation,
                                                                             products):
    """Seed 11: the joint optimum has 0 < mu < max_momentum; seed 0: its mu < 0 is clipped to 0. The curvature
    products ``J v`` come from the transposed backward pass, or from forward mode where the backward cannot be
    differentiated."""
    torch.manual_seed(seed)
    model = mlp(activation)
    batches = [(torch.randn(7, 4), torch.randint(0, 3, (7,))) for _ in range(2)]
    wd, max_momentum = 0.01, 0.9
    opt = curvgraph.compile(model, (batches[0][0],), lr="auto", momentum="auto", fisher="type2", ema=0.0,
                            invert_every=1, weight_decay=wd, max_momentum=max_momentum, damping=0.1, backend="eager")
    assert f"J_Delta, J_prev = {products}" in opt.source
    theta0 = block_vector(model)
    first = copy.deepcopy(model)
    opt.step(*batches[0])
    opt_first_rho = opt.stats()["rho"]
    theta1 = block_vector(model)
    previous = theta1 - theta0
    assert previous.norm() > 0  # the first step was taken
    # the first step's model change: no momentum yet, so the one-dimensional solve along Delta
    V0, M0 = preconditioned(first, *batches[0], opt.factors(), 0.1, wd)
    C0 = exact_ggn(first, "cross_entropy", *batches[0], theta0, unpack) + (0.1 + wd) * torch.eye(theta0.numel())
    first_change = -0.5 * (V0 @ M0) ** 2 / (V0 @ C0 @ V0)
    assert opt.stats()["model_change"] == pytest.approx(first_change.item(), rel=1e-6)
    damping = opt._state["kfac.damping"][0].item()
    before = copy.deepcopy(model)
    x, y = batches[1]
    opt.step(x, y)
    V, M = preconditioned(before, x, y, opt.factors(), damping, wd)
    Delta = -V
    G = exact_ggn(before, "cross_entropy", x, y, theta1, unpack)
    C = G + (damping + wd) * torch.eye(theta1.numel())
    basis = torch.stack([Delta, previous], 1)
    gram, linear = basis.T @ C @ basis, basis.T @ M
    alpha, mu = -torch.linalg.solve(gram, linear)
    clipped = min(max(mu.item(), 0.0), max_momentum)
    assert (clipped == mu.item()) == interior
    if not interior:  # the constrained optimum: the best alpha for the clipped momentum
        alpha, mu = -(linear[0] + clipped * gram[0, 1]) / gram[0, 0], torch.tensor(clipped)
    delta = alpha * Delta + mu * previous
    change = 0.5 * delta @ C @ delta + M @ delta
    assert change < 0
    new_loss = nn.functional.cross_entropy(torch.func.functional_call(before, unpack(theta1 + delta), (x,)), y)
    old_loss = nn.functional.cross_entropy(before(x), y)
    assert new_loss < old_loss  # so the step is taken
    torch.testing.assert_close(block_vector(model) - theta1, delta)
    rho = ((new_loss - old_loss) / change).item()
    # the first step's decrease as the second batch sees it: its slope and GGN curvature along the step
    curvature = previous @ G @ previous + wd * previous @ previous  # the regularized loss's, as M's
    rho_next_batch = ((M @ previous - 0.5 * curvature) / first_change).item()
    calibrated = 0.25 <= opt_first_rho <= 0.75
    halve = not calibrated and rho > 0.75 and rho_next_batch > 0.5
    expected = damping * (0.5 if halve else 0.95) if rho > 0.75 else damping / 0.95 if rho < 0.25 else damping
    stats = opt.stats()
    assert stats["rho_next_batch"] == pytest.approx(rho_next_batch, rel=1e-6)
    assert stats["model_change"] == pytest.approx(change.item(), rel=1e-6)
    assert stats["damping"] == pytest.approx(expected, rel=1e-9)
    assert (stats["step_size"], stats["momentum"], stats["rho"]) == pytest.approx((alpha.item(), mu.item(), rho),
                                                                                    rel=1e-6)
    assert (stats["steps"], stats["rejected_steps"], stats["skipped_steps"], stats["damping_growth"]) == (2, 0, 0, 2)
    assert stats["damping_calibrated"] == (calibrated or 0.25 <= rho <= 0.75)


@pytest.mark.parametrize("confirmed", [False, True])
@pytest.mark.parametrize("calibrated", [False, True])
@pytest.mark.parametrize("rho, factor", [(0.9, 0.95), (0.76, 0.95), (0.75, 1.0), (0.5, 1.0), (0.25, 1.0),
                                         (0.24, 1 / 0.95), (-3.0, 1 / 0.95)])
def test_damping_follows_the_levenberg_marquardt_rule(rho, factor, calibrated, confirmed):
    damping, growth, change = torch.tensor(0.01), torch.tensor(8.0), torch.tensor(-2.0)
    loss = torch.tensor(5.0)
    new_loss = loss + rho * change
    updated, next_growth, now_calibrated, _ = levenberg_marquardt(
        damping, growth, torch.tensor(calibrated), new_loss, loss, change, torch.tensor(0.95), 2.0, torch.tensor(1e-6),
        torch.tensor(confirmed))
    if rho < 0:  # the loss went up: rejected; the damping grows by the growth, which doubles until calibrated
        assert not accepted(new_loss, loss)
        assert (updated.item(), next_growth.item()) == pytest.approx((0.08, 2.0 if calibrated else 16.0))
    else:  # taken: the paper's rule, halving instead of 0.95 before calibration where the next batch confirmed
        if rho > 0.75 and confirmed and not calibrated:
            factor = 0.5
        assert accepted(new_loss, loss) and (updated.item(), next_growth.item()) == pytest.approx((0.01 * factor, 2.0))
    assert now_calibrated.item() == (calibrated or 0.25 <= rho <= 0.75)


def test_damping_over_a_scripted_sequence_of_ratios():
    """The paper's rule on taken steps; before the first taken step with 1/4 <= rho <= 3/4, rejections in a row
    multiply the damping by 2, 4, 8 (Nielsen's rule), a taken step in between starting the growth again at 2, and a
    taken step with rho > 3/4 halves it where the next batch confirmed the previous step; afterwards every rejection
    doubles it and rho > 3/4 multiplies it by 0.95, confirmed or not."""
    damping, growth, calibrated = torch.tensor(1e-3), torch.tensor(2.0), torch.tensor(False)
    loss, change = torch.tensor(1.0), torch.tensor(-0.1)
    script = [(float("nan"), False), (-2.0, False), (-1.0, False), (0.1, False), (-1.0, False), (float("inf"), True),
              (0.9, False), (0.9, True), (1.2, True), (0.9, False), (0.5, True), (0.9, True), (0.1, True), (0.1, False),
              (-1.0, True), (-1.0, False), (-1.0, False)]
    history = []
    for rho, confirmed in script:
        damping, growth, calibrated, _ = levenberg_marquardt(damping, growth, calibrated, loss + rho * change, loss, change,
                                                          torch.tensor(0.95), 2.0, torch.tensor(1e-5),
                                                          torch.tensor(confirmed))
        history.append(damping.item())
    expected, value, nu, done = [], 1e-3, 2.0, False
    for rho, confirmed in script:
        if math.isfinite(rho) and rho >= 0:  # else the loss went up, or is not finite: rejected
            shrink = 0.5 if confirmed and not done else 0.95
            value, nu = max(value * shrink if rho > 0.75 else value / 0.95 if rho < 0.25 else value, 1e-5), 2.0
            done = done or 0.25 <= rho <= 0.75
        else:
            value, nu = value * nu, 2.0 if done else 2 * nu
        expected.append(value)
    assert history == pytest.approx(expected)
    growths = [b / a for a, b in zip(history, history[1:])]
    assert growths[:5] == pytest.approx([4.0, 8.0, 1 / 0.95, 2.0, 4.0])  # rejections in a row, before calibration
    assert growths[5:10] == pytest.approx([0.95, 0.5, 0.5, 0.95, 1.0])  # rho > 3/4 halves where confirmed; 0.5 calibrates
    assert growths[10:] == pytest.approx([0.95, 1 / 0.95, 1 / 0.95, 2.0, 2.0, 2.0])  # after it
    assert calibrated.item()
    floor, _, _, _ = levenberg_marquardt(torch.tensor(8.2e-4), growth, calibrated, loss + 0.9 * change, loss, change,
                                      torch.tensor(0.95), 2.0, torch.tensor(8e-4), torch.tensor(False))
    assert floor.item() == pytest.approx(8e-4)  # 0.95 * 8.2e-4 is below the floor


def test_damping_decay_sets_the_rules_factor_and_stats_count_the_rejected_steps():
    """Each taken step multiplies the damping by ``damping_decay`` (rho > 3/4; or 1/2 before calibration), 1 or its
    reciprocal (rho < 1/4), and
    each rejected step (the parameters stay) by the growth ``stats()`` showed before it; both directions occur; a new
    value set between steps applies from the next step on; ``rejected_steps`` counts the steps that left the
    parameters where they were."""
    torch.manual_seed(1)
    model = mlp()
    opt = curvgraph.compile(model, (torch.randn(16, 4) * 5,), damping=1e-6, min_damping=1e-12, damping_decay=0.6,
                            invert_every=1, backend="eager", seed=0)
    ratios, rejected = {}, 0
    for decay, steps in ((0.6, 20), (0.3, 10)):
        opt.param_groups[0]["damping_decay"] = decay
        ratios[decay] = []
        for _ in range(steps):
            stats = opt.stats()
            before, growth = stats.get("damping") or 1e-6, stats.get("damping_growth") or 2.0
            params = [p.detach().clone() for p in model.parameters()]
            opt.step(torch.randn(16, 4) * 5, torch.randint(0, 3, (16,)))
            stayed = all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
            rejected += stayed
            ratio = opt.stats()["damping"] / before
            ratios[decay].append(ratio)
            halving = () if stats.get("damping_calibrated", False) else (0.5,)  # confirmed by the next batch
            allowed = (growth,) if stayed else (decay, 1.0, 1 / decay) + halving
            assert any(ratio == pytest.approx(a, rel=1e-5) for a in allowed), (decay, ratio, allowed)
    for decay, seen in ratios.items():
        assert any(r == pytest.approx(decay, rel=1e-5) for r in seen), (decay, seen)
    assert any(r == pytest.approx(1 / d, rel=1e-5) for d, seen in ratios.items() for r in seen), ratios
    assert rejected > 0 and opt.stats()["rejected_steps"] == rejected


def test_zero_predicted_change_leaves_the_damping():
    damping = torch.tensor(0.3)
    kept, growth, calibrated, _ = levenberg_marquardt(damping, torch.tensor(4.0), torch.tensor(False), torch.tensor(1.0),
                                                   torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.95), 2.0,
                                                   torch.tensor(1e-6), torch.tensor(True))
    assert (kept.item(), growth.item(), calibrated.item()) == (pytest.approx(0.3), pytest.approx(4.0), False)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-3, 3), min_size=6, max_size=6), st.floats(-3, 3), st.floats(-3, 3),
       st.floats(0, 0.99), st.floats(0, 0.99))
def test_quadratic_model_never_increases_and_is_optimal(entries, b0, b1, a, c):
    factor = torch.tensor(entries, dtype=torch.float64).reshape(2, 3)
    gram = factor @ factor.T + 1e-3 * torch.eye(2, dtype=torch.float64)
    linear = torch.tensor([b0, b1], dtype=torch.float64)
    low, high = torch.tensor(0.0, dtype=torch.float64), torch.tensor(max(a, c), dtype=torch.float64)
    one = torch.tensor(1.0, dtype=torch.float64)
    alpha, mu, change = quadratic_model_step(gram, linear, low, high, one)
    assert change <= 1e-12
    assert low <= mu <= high
    x = torch.stack([alpha, mu])
    torch.testing.assert_close(change, 0.5 * x @ gram @ x + linear @ x)
    # brute force: the best alpha for each momentum on a grid over the interval
    grid = torch.linspace(0, float(high), 401, dtype=torch.float64)
    best_alpha = -(linear[0] + grid * gram[0, 1]) / gram[0, 0]
    values = 0.5 * (best_alpha**2 * gram[0, 0] + 2 * best_alpha * grid * gram[0, 1] + grid**2 * gram[1, 1]) \
        + best_alpha * linear[0] + grid * linear[1]
    assert change <= values.min() + 1e-9


def test_first_step_without_momentum_is_the_one_dimensional_solve():
    gram = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    alpha, mu, change = quadratic_model_step(gram, torch.tensor([-1.0, 0.0]), torch.tensor(0.0), torch.tensor(0.9),
                                             torch.tensor(1.0))
    assert alpha.item() == pytest.approx(0.5) and mu.item() == 0.0 and change.item() == pytest.approx(-0.25)


def test_auto_momentum_needs_auto_lr():
    with pytest.raises(curvgraph.ConfigError, match="momentum='auto' needs lr='auto'"):
        curvgraph.compile(mlp(), (torch.randn(3, 4),), lr=0.01, momentum="auto", backend="eager")
    with pytest.raises(curvgraph.ConfigError, match="lr must be a positive finite number"):
        curvgraph.compile(mlp(), (torch.randn(3, 4),), lr="fast", backend="eager")


def test_a_schedule_scales_the_adaptive_step():
    torch.manual_seed(3)
    model = mlp()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt = curvgraph.compile(model, (x,), backend="eager")
    assert opt.param_groups[0]["lr"] == 1.0 and opt.method.adaptive
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.0 if epoch == 0 else 1.0)
    before = copy.deepcopy(model.state_dict())
    opt.step(x, y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    schedule.step()
    opt.step(x, y)
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_multiplier_of_two_or_more_is_refused():
    """``param_groups[0]["lr"] = s`` scales the model's step ``x*``: the predicted change ``(s^2/2 - s) x*^T C x*``
    is 0 at ``s = 2`` (a decrease below it), so from 2 on every step would be rejected with the damping unchanged.
    The step refuses such a multiplier before it runs, and takes one below 2."""
    gram, linear = torch.tensor([[2.0, 0.5], [0.5, 1.0]]), torch.tensor([-1.0, 0.3])
    *_, change = quadratic_model_step(gram, linear, torch.tensor(0.0), torch.tensor(0.9), torch.tensor(2.0))
    assert change.item() == pytest.approx(0.0, abs=1e-7)
    torch.manual_seed(3)
    model = mlp()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt = curvgraph.compile(model, (x,), backend="eager")
    before = copy.deepcopy(model.state_dict())
    for bad in (2.0, -0.5):
        opt.param_groups[0]["lr"] = bad
        with pytest.raises(curvgraph.ConfigError, match=r"param_groups\[0\]\['lr'\] multiplies .* must be in \[0, 2\)"):
            opt.step(x, y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    opt.param_groups[0]["lr"] = 1.5
    opt.step(x, y)
    assert opt.stats()["steps"] == 1


def test_scaled_step_scales_the_model_change():
    gram, linear = torch.tensor([[2.0, 0.5], [0.5, 1.0]]), torch.tensor([-1.0, 0.3])
    low, high = torch.tensor(0.0), torch.tensor(0.9)
    alpha, mu, _ = quadratic_model_step(gram, linear, low, high, torch.tensor(1.0))
    half_alpha, half_mu, change = quadratic_model_step(gram, linear, low, high, torch.tensor(0.5))
    torch.testing.assert_close((half_alpha, half_mu), (alpha / 2, mu / 2))
    x = torch.stack([half_alpha, half_mu])
    torch.testing.assert_close(change, 0.5 * x @ gram @ x + linear @ x)


def test_a_run_of_rejected_steps_warns_once_and_is_counted(monkeypatch):
    """``stats()["rejected_in_a_row"]`` is the length of the run of rejected steps (the parameters stayed) up to the
    last step, 0 after a taken one; the step in which a run reaches ``KFAC.stall_rejections`` warns one
    :class:`curvgraph.StalledTrainingWarning`, and ``diagnostics()`` counts every step at or past it. A starting
    damping far too small makes the run: each rejection grows it (Nielsen's rule) until a step is taken."""
    from curvgraph.methods.kfac import KFAC

    monkeypatch.setattr(KFAC, "stall_rejections", 3)
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(32, 4) * 3, torch.randint(0, 3, (32,))
    opt = curvgraph.compile(model, (x,), damping=1e-12, min_damping=1e-14, backend="eager", seed=0)
    run, runs, stalled = 0, [], []
    with pytest.warns(curvgraph.StalledTrainingWarning) as caught:
        for step in range(1, 13):
            params = [p.detach().clone() for p in model.parameters()]
            opt.step(x, y)
            run = run + 1 if all(torch.equal(a, p) for a, p in zip(params, model.parameters())) else 0
            runs.append(run)
            assert opt.stats()["rejected_in_a_row"] == run
            if run >= 3:
                stalled.append(step)
    assert max(runs) >= 3 and runs[-1] == 0, runs  # the run happened, and ended
    stalls = [w for w in caught if issubclass(w.category, curvgraph.StalledTrainingWarning)]
    assert len(stalls) == 1
    assert f"step {stalled[0]}: the last 3 or more steps were all rejected" in str(stalls[0].message)
    report = opt.diagnostics()["(step)"]
    assert report["kind"] is None and list(report["degenerate"].values()) == [len(stalled)]
    assert report["last_degenerate_step"] == stalled[-1]
