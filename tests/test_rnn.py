"""Recurrent networks: unrolled forms, rnn blocks, time-independent factors, time-major inputs."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev

import curvgraph
from curvgraph.errors import InputError
from curvgraph.kinds.rnn.unrolled import unrolled_form
from helpers import assert_export_resumes, exact_ggn_block, make_targets

MODULES = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


def _flat(result, lstm: bool) -> torch.Tensor:
    out, state = result
    return torch.cat([out.flatten()] + [s.flatten() for s in (state if lstm else (state,))])


@pytest.mark.parametrize("kind", MODULES)
def test_unrolled_forms_match_the_modules(kind):
    """Outputs, final states and parameter gradients of the unrolled form equal nn.RNN/LSTM/GRU's (float32, 1e-6)."""
    torch.manual_seed(0)
    lstm = kind == "lstm"
    for layers, bi, batch_first, bias, h0 in itertools.product((1, 2), (False, True), (False, True), (False, True),
                                                              (False, True)):
        module = MODULES[kind](3, 4, num_layers=layers, bidirectional=bi, batch_first=batch_first, bias=bias)
        unrolled = unrolled_form(module)
        assert dict(unrolled.named_parameters()).keys() == dict(module.named_parameters()).keys()
        assert all(p is q for p, q in zip(unrolled.parameters(), module.parameters()))  # the same Parameters
        x = torch.randn(2, 5, 3) if batch_first else torch.randn(5, 2, 3)
        args = (x,)
        if h0:
            h = torch.randn(layers * (1 + bi), 2, 4)
            args = (x, (h, torch.randn_like(h)) if lstm else h)
        ours, theirs = _flat(unrolled(*args), lstm), _flat(module(*args), lstm)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
        weights = torch.randn_like(ours)
        g_ours = torch.autograd.grad((ours * weights).sum(), list(module.parameters()))
        g_theirs = torch.autograd.grad((theirs * weights).sum(), list(module.parameters()))
        for a, b in zip(g_ours, g_theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:LSTM with projections")
def test_unrolled_lstm_with_projection_and_cells_and_unbatched_inputs():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, num_layers=2, proj_size=2, bidirectional=True)
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(_flat(unrolled_form(lstm)(x), True), _flat(lstm(x), True), rtol=0, atol=1e-6)
    gru = nn.GRU(3, 4)
    torch.testing.assert_close(_flat(unrolled_form(gru)(x[:, 0]), False), _flat(gru(x[:, 0]), False), rtol=0, atol=1e-6)
    for cell in (nn.RNNCell(3, 4, nonlinearity="relu"), nn.LSTMCell(3, 4), nn.GRUCell(3, 4, bias=False)):
        h = torch.randn(2, 4)
        state = (h, torch.randn_like(h)) if isinstance(cell, nn.LSTMCell) else h
        ours, theirs = unrolled_form(cell)(x[0], state), cell(x[0], state)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


class Classifier(nn.Module):
    """A recurrent module over (N, T, F) or (T, N, F) inputs, a linear head on the last output."""

    def __init__(self, kind: str = "gru", features: int = 3, hidden: int = 4, classes: int = 3, h0: bool = False,
                 **options) -> None:
        super().__init__()
        self.rnn = MODULES[kind](features, hidden, **options)
        self.head = nn.Linear(hidden * (1 + self.rnn.bidirectional), classes)
        self.lstm = kind == "lstm"
        if h0:  # a fixed initial state, so that W_hh sees nonzero inputs at the first step
            shape = (self.rnn.num_layers * (1 + self.rnn.bidirectional), 1, hidden)
            self.register_buffer("h0", torch.randn(shape))

    def forward(self, x):
        args = (x,)
        if hasattr(self, "h0"):
            h = self.h0.expand(-1, x.shape[0 if self.rnn.batch_first else 1], -1).contiguous()
            args = (x, (h, torch.zeros_like(h)) if self.lstm else h)
        out, _ = self.rnn(*args)
        return self.head(out[:, -1] if self.rnn.batch_first else out[-1])


def batch_factors(model, x, y, loss="cross_entropy", fisher="type2", **options):
    """The factors of one batch (``ema=0``) and the optimizer."""
    opt = curvgraph.compile(model, (x,), loss=loss, fisher=fisher, ema=0.0, backend="eager", **options)
    opt.step(x, y)
    return opt.factors(), opt


def test_plan_has_one_block_per_recurrent_weight_with_gates_and_steps():
    model = Classifier("lstm", num_layers=2, bidirectional=True, batch_first=True)
    opt = curvgraph.compile(model, (torch.randn(4, 6, 3),), backend="eager")
    rnn = [b for b in opt.plan.blocks if b.kind == "rnn"]
    names = {p for b in rnn for p in b.params}
    assert names == {f"rnn.{n}" for n, _ in model.rnn.named_parameters()}  # every recurrent parameter is in an rnn block
    assert len(rnn) == 8 and not opt.plan.fallback_params
    for b in rnn:
        assert len(b.uses) == 6 and b.dims["steps"] == 6 and b.dims["gates"] == 4 and b.bias
        assert "4 gates, T=6" in opt.plan.kinds["rnn"].label(b) and opt.plan.kinds["rnn"].label(b) in str(opt.plan)
        # the input and recurrent weights' outputs are summed into the gates: one G, computed and counted once
        recurrent = b.layout["role"] == "recurrent"
        assert b.layout["summed_gates"] and ("G as the input weight's" in opt.plan.kinds["rnn"].label(b)) == recurrent
        a, g = b.factors["A"].dim, b.factors["G"].dim
        assert b.cost["statistics"] == 2 * b.rows * (a * a + (0 if recurrent else g * g))
    gru = curvgraph.compile(Classifier("gru", bias=False), (torch.randn(5, 2, 3),), backend="eager").plan
    assert [b.dims["gates"] for b in gru.blocks if b.kind == "rnn"] == [3, 3]
    assert not any(b.layout["summed_gates"] for b in gru.blocks if b.kind == "rnn")  # r * (W_hn h): G apart
    assert all(not b.bias for b in gru.blocks if b.kind == "rnn")
    plain = curvgraph.compile(Classifier("rnn"), (torch.randn(5, 2, 3),), backend="eager").plan
    assert [b.dims["gates"] for b in plain.blocks if b.kind == "rnn"] == [1, 1]


class PenalizedInputWeight(Classifier):
    """An LSTM whose input weight is also read outside the recurrence, so no rnn block takes it."""

    def forward(self, x):
        return super().forward(x) + 0.01 * self.rnn.weight_ih_l0.square().sum()


def test_a_recurrent_block_shares_g_only_with_an_input_block():
    """Where the input weight is left to the fallback, the recurrent block computes and counts its own ``G``."""
    opt = curvgraph.compile(PenalizedInputWeight("lstm", batch_first=True), (torch.randn(4, 6, 3),), backend="eager")
    assert "rnn.weight_ih_l0" in opt.plan.fallback_params
    (block,) = [b for b in opt.plan.blocks if b.kind == "rnn"]
    assert block.name == "rnn.weight_hh_l0" and not block.layout["summed_gates"]
    a, g = block.factors["A"].dim, block.factors["G"].dim
    assert block.cost["statistics"] == 2 * block.rows * (a * a + g * g)


class CellLoop(nn.Module):
    """A cell applied at every step of the user's own loop."""

    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell, self.head = cell, nn.Linear(4, 3)

    def forward(self, x):
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return self.head(state[0] if isinstance(state, tuple) else state)


@pytest.mark.parametrize("cell", [nn.RNNCell, nn.LSTMCell, nn.GRUCell])
def test_a_cell_in_a_user_loop_is_one_block_per_weight_with_T_uses(cell):
    torch.manual_seed(0)
    model = CellLoop(cell(3, 4))
    x, y = torch.randn(4, 5, 3), torch.randint(0, 3, (4,))
    opt = curvgraph.compile(model, (x,), backend="eager")
    blocks = {b.name: b for b in opt.plan.blocks if b.kind == "rnn"}
    assert set(blocks) == {"cell.weight_ih", "cell.weight_hh"}
    assert all(len(b.uses) == 5 and b.dims["gates"] == {nn.RNNCell: 1, nn.LSTMCell: 4, nn.GRUCell: 3}[cell]
               for b in blocks.values())
    before = opt.step(x, y)
    for _ in range(5):
        loss = opt.step(x, y)
    assert loss < before


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("kind", MODULES)
def test_type2_factors_are_the_exact_ggn_for_one_step_and_one_example(float64, kind, loss):
    """With T = 1 and one example each rnn block's kron(G, A) is its exact GGN block (nn's own module as reference)."""
    torch.manual_seed(0)
    model = Classifier(kind, h0=True, batch_first=True)
    x = torch.randn(1, 1, 3)
    y = make_targets(loss, (1, 3))
    reference = copy.deepcopy(model)
    factors, opt = batch_factors(model, x, y, loss=loss)
    for b in opt.plan.blocks:
        if b.kind != "rnn":
            continue
        exact = exact_ggn_block(reference, loss, x, y, b.params[0], b.params[1])
        torch.testing.assert_close(torch.kron(factors[b.name]["G"], factors[b.name]["A"]), exact, rtol=1e-9, atol=1e-12)


def gru_cell(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor):
    """A GRU step from the two terms ``gi = W_ih x_t + b_ih``, ``gh = W_hh h_{t-1} + b_hh``: the new ``h`` twice
    (output and state)."""
    (ir, iz, i_n), (hr, hz, h_n) = gi.chunk(3, -1), gh.chunk(3, -1)
    r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
    h = (1 - z) * torch.tanh(i_n + r * h_n) + z * h
    return h, h


def lstm_cell(gi: torch.Tensor, gh: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
    """An LSTM step from the two terms, as :func:`gru_cell`: the new ``h`` and the state ``(h, c)``."""
    i, f, g, o = (gi + gh).chunk(4, -1)
    c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, (h, c)


def reference_loop(model: Classifier, x: torch.Tensor, probes: dict[str, torch.Tensor]):
    """An independent loop of ``model``'s GRU or LSTM (batch first, one layer) with zero probes added to every
    step's ``W_ih x_t + b_ih`` and ``W_hh h_{t-1} + b_hh`` apart, so that each weight's ``G`` comes from its own
    term; returns the logits and the layer inputs per weight."""
    p = dict(model.rnn.named_parameters())
    h = torch.zeros(x.shape[0], model.rnn.hidden_size, dtype=x.dtype)
    cell, state = (lstm_cell, (h, torch.zeros_like(h))) if model.lstm else (gru_cell, h)
    inputs = {"weight_ih_l0": [], "weight_hh_l0": []}
    for t in range(x.shape[1]):
        inputs["weight_ih_l0"].append(x[:, t])
        inputs["weight_hh_l0"].append(h)
        gi = x[:, t] @ p["weight_ih_l0"].T + p["bias_ih_l0"] + probes["weight_ih_l0"][t]
        gh = h @ p["weight_hh_l0"].T + p["bias_hh_l0"] + probes["weight_hh_l0"][t]
        h, state = cell(gi, gh, state)
    return model.head(h), inputs


@pytest.mark.parametrize("kind, gates", [("gru", 3), ("lstm", 4)])
@pytest.mark.parametrize("fisher", ["type2", "empirical"])
def test_time_independent_factors_equal_a_brute_force_sum_over_time(float64, fisher, kind, gates):
    r"""``A = mean_{n,t} ā ā^T``, ``G = (1/N) Σ_{n,t} J_{nt}^T H_n J_{nt}`` (type-2) or
    ``(1/N) Σ_{n,t} (J_{nt}^T ∇ℓ_n)(J_{nt}^T ∇ℓ_n)^T`` (empirical), by a plain loop over time. The LSTM's
    recurrent block reads its output gradients at the gates' sum, shared with the input block (one ``G``
    computed for both); the reference takes each weight's from its own term."""
    torch.manual_seed(0)
    model = Classifier(kind, batch_first=True)
    n, steps, width = 3, 4, 4 * gates
    x, y = torch.randn(n, steps, 3), torch.randint(0, 3, (n,))
    reference = copy.deepcopy(model)
    factors, opt = batch_factors(model, x, y, fisher=fisher)
    shared = {b.name: b.layout["summed_gates"] for b in opt.plan.blocks if b.kind == "rnn"}
    assert shared == {"rnn.weight_ih_l0": kind == "lstm", "rnn.weight_hh_l0": kind == "lstm"}
    assert ("G_batch_rnn_weight_hh_l0 = G_batch_rnn_weight_ih_l0" in opt.source) == (kind == "lstm")
    zeros = {k: torch.zeros(steps, n, width) for k in ("weight_ih_l0", "weight_hh_l0")}
    with torch.no_grad():
        logits, inputs = reference_loop(reference, x, zeros)
        torch.testing.assert_close(logits, Classifier.forward(reference, x))
    probs = logits.softmax(-1)
    for weight, acts in inputs.items():
        jac = jacrev(lambda q: reference_loop(reference, x, {**zeros, weight: q})[0])(zeros[weight])  # (N, C, T, N, 4h)
        g_ref = torch.zeros(width, width)
        for i in range(n):
            hess = torch.diag(probs[i]) - torch.outer(probs[i], probs[i])
            grad = probs[i] - F.one_hot(y[i], 3)
            for t in range(steps):
                j = jac[i, :, t, i]  # (C, 12)
                g_ref += (j.T @ hess @ j if fisher == "type2" else torch.outer(j.T @ grad, j.T @ grad)) / n
        a = torch.cat([torch.stack(acts).reshape(-1, acts[0].shape[-1]), torch.ones(n * steps, 1)], 1)
        a_ref = a.T @ a / (n * steps)
        torch.testing.assert_close(factors[f"rnn.{weight}"]["A"], a_ref)
        torch.testing.assert_close(factors[f"rnn.{weight}"]["G"], g_ref)


def test_time_major_inputs_batch_dim_is_inferred_and_can_be_set():
    torch.manual_seed(0)
    model = Classifier("lstm")  # batch_first=False: inputs (T, N, F)
    x, y = torch.randn(11, 16, 3), torch.randint(0, 3, (16,))
    opt = curvgraph.compile(model, (x,), backend="eager")
    assert "batch = inputs[0].shape[1]" in opt.source and "N=16" in str(opt.plan)
    first = opt.step(x, y)
    opt.step(torch.randn(11, 7, 3), y[:7])  # another batch size
    with pytest.raises(InputError, match="batch_dim"):
        opt.step(x, y[:5])
    with pytest.raises(InputError, match=r"compiled for shape \(11, '\*', 3\)"):
        opt.step(torch.randn(12, 16, 3), y)  # another sequence length: recompile
    same = Classifier("lstm")
    same.load_state_dict(copy.deepcopy(opt.model.state_dict()))
    explicit = curvgraph.compile(same, (x,), backend="eager", batch_dim=1)
    assert "batch = inputs[0].shape[1]" in explicit.source
    assert first.item() > 0
    with pytest.raises(curvgraph.ConfigError, match="batch_dim"):
        curvgraph.compile(Classifier("lstm"), (x,), backend="eager", batch_dim=(1, 0))


def test_time_major_and_batch_first_give_the_same_step(float64):
    """The same model on the same data laid out (T, N, F) or (N, T, F): equal factors."""
    torch.manual_seed(0)
    first = Classifier("lstm", batch_first=True, num_layers=2)
    second = Classifier("lstm", batch_first=False, num_layers=2)
    second.load_state_dict(first.state_dict())
    x, y = torch.randn(5, 4, 3), torch.randint(0, 3, (5,))
    f1, _ = batch_factors(first, x, y)
    f2, _ = batch_factors(second, x.transpose(0, 1).contiguous(), y)
    for name in f1:
        for k in f1[name]:
            torch.testing.assert_close(f1[name][k], f2[name][k])


def test_gru_on_mnist1d_beats_adam_in_test_accuracy():
    """The example's GRU classifier (hidden 32) after 150 steps of 64: curvgraph's defaults reach a higher test
    accuracy than Adam at the better of two learning rates, same initialization and batches, on the mean over seeds
    0-2. One seed is not enough: a single factor of 2 in the damping at step 6 moves seed 1's accuracy from 0.81 to
    0.61, and seed 0 ended at 0.10 with the rule before the next-batch check (``docs/benchmarks.md``)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "examples" / "mnist1d_gru.py"
    spec = importlib.util.spec_from_file_location("mnist1d_gru", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a fixed reduction order: the 150-step trajectories are sensitive to rounding
    try:
        runs = [example.compare(150, batch=64, hidden=32, seed=seed, backend="eager", adam_lrs=(1e-2, 3e-2))
                for seed in range(3)]
    finally:
        torch.set_num_threads(threads)
    adam = sum(max(v for k, v in r.items() if k.startswith("adam")) for r in runs) / len(runs)
    curvgraph_mean = sum(r["curvgraph"] for r in runs) / len(runs)
    assert all(r["skipped"] == 0 for r in runs)
    assert curvgraph_mean > adam + 0.05, runs


def test_unrolled_copy_shares_parameters_and_computes_the_same():
    from curvgraph.kinds.rnn.unrolled import UnrolledRNN, unrolled_copy

    torch.manual_seed(0)
    model = Classifier("lstm", num_layers=2)
    twin = unrolled_copy(model)
    assert isinstance(twin.rnn, UnrolledRNN) and isinstance(model.rnn, nn.LSTM)
    assert all(p is q for p, q in zip(twin.parameters(), model.parameters()))
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=1e-6)


def test_lag_moments_are_the_plain_loop_sums(float64):
    from curvgraph.curvature.temporal import lag_moments

    torch.manual_seed(0)
    steps = tuple(torch.randn(3, 4) for _ in range(5))
    m0, m1 = lag_moments(steps, True, torch.float64)
    bar = [torch.cat([s, torch.ones(3, 1)], 1) for s in steps]
    r0 = sum(torch.outer(b[n], b[n]) for b in bar for n in range(3)) / 15
    r1 = sum(torch.outer(bar[t][n], bar[t + 1][n]) for t in range(4) for n in range(3)) / 12
    torch.testing.assert_close(m0, r0)
    torch.testing.assert_close(m1, r1)


def test_option1_inverse_is_the_inverse_of_the_summed_chain_covariance(float64):
    r"""Option 1 in closed form (eigenbases, zeta) against its definition built densely: V_0 = G_0 ⊗ A_0,
    Ψ = V_1 V_0^{-1} with V_1 = sym(G_1) ⊗ sym(A_1), F = Σ_{t,s} V_{|t-s|}, V_d = Ψ^d V_0; solve F x = vec(M)."""
    from curvgraph.curvature.temporal import option1_precondition

    torch.manual_seed(0)

    def spd(d):
        q = torch.randn(d, d)
        return q @ q.T + d * torch.eye(d)

    def lag(m0, scale):  # a lag-1 moment whose whitened form has eigenvalues in (-1, 1)
        c = torch.linalg.cholesky(m0)
        s = torch.randn(m0.shape)
        s = (s + s.T) / 2
        s = scale * s / torch.linalg.matrix_norm(s, 2)
        return c @ s @ c.T + 0.01 * torch.randn(m0.shape)  # plus an antisymmetric-ish part option 1 drops

    a0, g0 = spd(4), spd(3)
    a1, g1 = lag(a0, 0.7), lag(g0, 0.5)
    steps = 6
    grad = torch.randn(3, 4)
    v0 = torch.kron(g0, a0)
    v1 = torch.kron((g1 + g1.T) / 2, (a1 + a1.T) / 2)
    psi = v1 @ torch.linalg.inv(v0)
    fisher = torch.zeros(12, 12)
    for t in range(steps):
        for s in range(steps):
            v = torch.linalg.matrix_power(psi, abs(t - s)) @ v0
            fisher += v if s >= t else v.T
    reference = torch.linalg.solve(fisher, grad.flatten()).reshape(3, 4)
    torch.testing.assert_close(option1_precondition(grad, a0, a1, g0, g1, steps), reference)
    # no correlation between steps: the time-independent (expand) K-FAC inverse of T V_0
    expand = torch.linalg.inv(g0) @ grad @ torch.linalg.inv(a0) / steps
    zero = torch.zeros(4, 4), torch.zeros(3, 3)
    torch.testing.assert_close(option1_precondition(grad, a0, zero[0], g0, zero[1], steps), expand)


def test_register_block_kind_before_puts_its_passes_first():
    from curvgraph import registry

    class Probe(curvgraph.BlockKind):
        name = "probe_kind"

        def find(self, traced, claims, sharing):
            return []

        factors = cost = write_batch_factors = write_matrix = write_split = None

    assert list(registry.KINDS)[:2] == ["rnn", "dense"]
    try:
        curvgraph.register_block_kind(Probe(), before="dense")
        assert list(registry.KINDS)[:3] == ["rnn", "probe_kind", "dense"]
        with pytest.raises(curvgraph.ConfigError, match="no other block kind"):
            curvgraph.register_block_kind(Probe(), replace=True, before="nonexistent")
    finally:
        curvgraph.unregister_block_kind("probe_kind")
    assert "probe_kind" not in registry.KINDS


def test_singd_runs_on_rnn_blocks():
    torch.manual_seed(0)
    model = Classifier("gru", batch_first=True)
    x, y = torch.randn(8, 4, 3), torch.randint(0, 3, (8,))
    opt = curvgraph.compile(model, (x,), method="singd", backend="eager")
    assert {b.kind for b in opt.plan.blocks} == {"rnn", "dense"}
    losses = [opt.step(x, y).item() for _ in range(10)]
    assert losses[-1] < losses[0]


def test_option1_in_the_step_uses_brute_force_lag_moments_and_its_formula(float64):
    r"""``temporal="option1"``: the lag-1 states equal a plain loop over time (``A_lag = mean x̄_t x̄_{t+1}^T``,
    ``G_lag = T/(T-1) (1/N) Σ_{n,t} J_{nt}^T H_n J_{n,t+1}``, type-2), and the first update is
    ``-lr · option1_precondition(M, A + s_A I, A_lag, (G + s_G I)/T, G_lag/T, T)`` with K-FAC's damping shifts."""
    from curvgraph.curvature.temporal import option1_precondition
    from curvgraph.methods.kfac import factored_damping

    torch.manual_seed(0)
    model = Classifier("gru", batch_first=True)
    n, steps, lr, damping = 3, 4, 0.1, 1e-2
    x, y = torch.randn(n, steps, 3), torch.randint(0, 3, (n,))
    reference = copy.deepcopy(model)
    opt = curvgraph.compile(model, (x,), fisher="type2", temporal="option1", lr=lr, momentum=0.0, kl_clip=None,
                            damping=damping, invert_every=1, backend="eager")
    assert "option1_apply" in opt.source and "kfac(temporal='option1')" in opt.source.replace('"', "'")
    opt.step(x, y)
    state, factors = opt._state, opt.factors()
    zeros = {k: torch.zeros(steps, n, 12) for k in ("weight_ih_l0", "weight_hh_l0")}
    with torch.no_grad():
        logits, inputs = reference_loop(reference, x, zeros)
    probs = logits.softmax(-1)
    loss = F.cross_entropy(Classifier.forward(reference, x), y)
    grads = dict(zip((k for k, _ in reference.named_parameters()),
                     torch.autograd.grad(loss, list(reference.parameters()))))
    for weight, acts in inputs.items():
        name = f"rnn.{weight}"
        jac = jacrev(lambda q: reference_loop(reference, x, {**zeros, weight: q})[0])(zeros[weight])
        g_lag = torch.zeros(12, 12)
        for i in range(n):
            hess = torch.diag(probs[i]) - torch.outer(probs[i], probs[i])
            for t in range(steps - 1):
                g_lag += jac[i, :, t, i].T @ hess @ jac[i, :, t + 1, i] * steps / ((steps - 1) * n)
        bar = [torch.cat([a, torch.ones(n, 1)], 1) for a in acts]
        a_lag = sum(bar[t].T @ bar[t + 1] for t in range(steps - 1)) / ((steps - 1) * n)
        torch.testing.assert_close(state[f"{name}.A_lag"], a_lag)
        torch.testing.assert_close(state[f"{name}.G_lag"], g_lag)
        a, g = factors[name]["A"], factors[name]["G"]
        shift_a, shift_g = factored_damping((a, g), (False, False), torch.tensor(damping))
        grad = torch.cat([grads[name], grads[name.replace("weight", "bias")][:, None]], 1)
        direction = option1_precondition(grad, a + shift_a * torch.eye(4 if "ih" in weight else 5), a_lag,
                                         (g + shift_g * torch.eye(12)) / steps, g_lag / steps, steps)
        new = torch.cat([model.get_parameter(name), model.get_parameter(name.replace("weight", "bias"))[:, None]], 1)
        old = torch.cat([reference.get_parameter(name), reference.get_parameter(name.replace("weight", "bias"))[:, None]],
                        1)
        torch.testing.assert_close(new.detach(), old.detach() - lr * direction)


def test_temporal_checkpoint_and_exported_step_continue_identically(tmp_path):
    """A time-major LSTM with temporal='option1': state_dict round trip and the exported module resume bitwise."""
    torch.manual_seed(0)
    model = Classifier("lstm")
    batches = [(torch.randn(4, 6, 3), torch.randint(0, 3, (6,))) for _ in range(6)]
    opt = curvgraph.compile(model, (batches[0][0],), backend="eager", temporal="option1", invert_every=2, seed=0)
    for x, y in batches[:3]:
        opt.step(x, y)
    assert_export_resumes(opt, model, batches[3:], tmp_path / "rnn_step.py")


@pytest.mark.filterwarnings("ignore:LSTM with projections")
def test_lstm_projection_is_an_rnn_block_too():
    model = Classifier("lstm", hidden=6, num_layers=2, proj_size=4)
    model.head = nn.Linear(4, 3)
    opt = curvgraph.compile(model, (torch.randn(4, 5, 3),), backend="eager")
    roles = {b.name: (b.layout["role"], b.dims["gates"], b.dims["steps"]) for b in opt.plan.blocks if b.kind == "rnn"}
    assert roles["rnn.weight_hr_l0"] == ("projection", 1, 4) and roles["rnn.weight_hh_l1"] == ("recurrent", 4, 4)
    assert len(roles) == 6 and not opt.plan.fallback_params


def test_temporal_needs_expand_factors():
    with pytest.raises(curvgraph.ConfigError, match="kfac_approx='expand'"):
        curvgraph.compile(Classifier("rnn"), (torch.randn(4, 2, 3),), backend="eager", temporal="option1",
                          kfac_approx="reduce")
