"""K-BFGS and K-BFGS(L) (``method="kbfgs"`` / ``"kbfgs_l"``) against independent references.

References: the paper's formulas (double damping, BFGS in product form, Hessian-action
pairs, the pre-activation pairs of the extra forward/backward) written here again with
plain torch on a hand-written forward pass of the model; eigenvalues by ``eigvalsh``;
full BFGS against the L-BFGS two-loop recursion with enough memory.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn

import curvgraph
from curvgraph.errors import CompileError

BATCH = 32
STEPS = 200


def digits() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().data / 16.0)


def autoencoder() -> nn.Module:
    """The deep autoencoder 64-32-16-32-64 (tanh), float64."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 32), nn.Tanh(),
                         nn.Linear(32, 64)).double()


def batches(data: torch.Tensor, n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [data[torch.randint(0, len(data), (BATCH,), generator=g)] for _ in range(n)]


def compile_ae(model: nn.Module, method: str, **options) -> curvgraph.CurvatureOptimizer:
    # K-BFGS uses the input factor only: the empirical Fisher spares the MC backward of the output factor
    return curvgraph.compile(model, (torch.zeros(BATCH, 64, dtype=torch.float64),), loss="bce_with_logits",
                             method=method, backend="eager", fisher="empirical", **options)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is over 10x faster than several on a shared, loaded machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


LAYERS = ["0", "2", "4", "6"]


def snapshot(opt) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in opt.state_dict()["state"].items()}


@pytest.fixture(scope="module")
def autoencoder_run():
    """200 K-BFGS steps on the digits autoencoder: the states before every step and the losses."""
    data = digits()
    model = autoencoder()
    opt = compile_ae(model, "kbfgs")
    keys = [f"{layer}.{k}" for layer in LAYERS for k in ("A", "A_inv", "G_inv", "curvature")]
    states, losses = [{k: opt._state[k].clone() for k in keys}], []
    for x in batches(data, STEPS):
        losses.append(opt.step(x, x).item())
        states.append({k: opt._state[k].clone() for k in keys})
    return opt, states, losses


def eig(H: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigvalsh(H)


def test_inverse_factors_stay_positive_definite_within_double_damping_bounds(autoencoder_run):
    """Every step: H_a, H_g symmetric with eigenvalues inside the per-update bounds that double damping
    (H_g: s's/s'y <= 1/mu2, y'Hy/s'y <= max(1/mu1, lmax(H))) and LM damping (H_a) promise; and the raw
    (undamped) pairs were indefinite (s'y < 0) in some steps, so the damping was exercised."""
    opt, states, _ = autoencoder_run
    assert opt.skipped_steps == 0
    group = opt.param_groups[0]
    mu1, mu2 = group["powell"], math.sqrt(group["damping"])
    lam_a = mu2
    indefinite = 0
    for k in range(1, len(states)):
        before, after = states[k - 1], states[k]
        for layer in LAYERS:
            indefinite += int(after[f"{layer}.curvature"].item() < 0)
            for name, old in ((f"{layer}.G_inv", before[f"{layer}.G_inv"]), (f"{layer}.A_inv", None)):
                new = after[name]
                torch.testing.assert_close(new, new.T, rtol=0, atol=1e-12)
                e_new = eig(new)
                assert e_new.min() > 0, (k, name)
                if old is None:  # H_a: the Hessian-action pair y = (A + lam_A I) s
                    if k == 1:
                        continue  # its first update starts from the scalar initial H_a, not the stored one
                    old = before[name]
                    r1 = float(eig(old).max()) * (float(eig(after[f"{layer}.A"]).max()) + lam_a)
                    r2 = 1 / lam_a
                else:
                    r1, r2 = max(1 / mu1, float(eig(old).max())), 1 / mu2
                e_old = eig(old)
                upper = (math.sqrt(e_old.max()) + math.sqrt(r1 * r2)) ** 2 + r2
                lower = float(e_old.min()) / (1 + r1)
                assert e_new.max() <= upper * (1 + 1e-9), (k, name, e_new.max(), upper)
                assert e_new.min() >= lower * (1 - 1e-9), (k, name, e_new.min(), lower)
    assert indefinite > 0


def test_trains(autoencoder_run):
    _, _, losses = autoencoder_run
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.85 * first, (first, last)


# ---------------------------------------------------------------------------- the paper's formulas, again
def double_damping_reference(s, y, H, mu1, mu2):
    """Algorithm DD of the paper, written out."""
    Hy = H @ y
    if s @ y < mu1 * (y @ Hy):
        theta = (1 - mu1) * (y @ Hy) / (y @ Hy - s @ y)
        s = theta * s + (1 - theta) * Hy
    if s @ y < mu2 * (s @ s):
        theta = (1 - mu2) * (s @ s) / (s @ s - s @ y)
        y = theta * y + (1 - theta) * s
    return s, y


def bfgs_reference(H, s, y):
    """BFGS inverse update in product form: (I - rho s y')H(I - rho y s') + rho s s'."""
    rho = 1 / (s @ y)
    V = torch.eye(len(s), dtype=H.dtype) - rho * torch.outer(y, s)
    return V.T @ H @ V + rho * torch.outer(s, s)


def forward_record(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor):
    """Layer inputs, pre-activations and loss gradients w.r.t. the pre-activations, by hand."""
    inputs, pre = {}, {}
    a = x
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            inputs[name] = a
            a = a @ module.weight.T + module.bias
            pre[name] = a
        else:
            a = module(a)
    loss = nn.functional.binary_cross_entropy_with_logits(a, y)
    grads = torch.autograd.grad(loss, list(pre.values()))
    return inputs, {k: v.detach() for k, v in pre.items()}, dict(zip(pre, grads))


def block_matrix(module: nn.Linear) -> torch.Tensor:
    return torch.cat([module.weight, module.bias[:, None]], 1).detach()


def test_one_step_equals_the_papers_formulas():
    """Step 4 of a run: direction, pre-activation pairs from the extra forward/backward, double damping,
    BFGS of H_g and Hessian-action BFGS of H_a, all recomputed here from the paper's formulas."""
    data = batches(digits(), 4, seed=3)
    model = autoencoder()
    opt = compile_ae(model, "kbfgs", pair_ema=0.0)
    for x in data[:3]:
        opt.step(x, x)
    group = opt.param_groups[0]
    lr, mu, wd, lam = group["lr"], group["momentum"], group["weight_decay"], group["damping"]
    mu1, mu2, beta = group["powell"], math.sqrt(lam), group["ema"]
    before = snapshot(opt)
    old_model = copy.deepcopy(model)
    x = data[3]
    inputs, pre, grads = forward_record(old_model, x, x)
    opt.step(x, x)
    after = snapshot(opt)
    _, new_pre, new_grads = forward_record(model, x, x)
    for layer in LAYERS:
        old_module, new_module = getattr(old_model, layer), getattr(model, layer)
        P = block_matrix(old_module)
        gradient = torch.autograd.grad(
            nn.functional.binary_cross_entropy_with_logits(old_model(x), x), [old_module.weight, old_module.bias])
        M = torch.cat([gradient[0], gradient[1][:, None]], 1) + wd * P
        a_bar = torch.cat([inputs[layer], torch.ones(BATCH, 1, dtype=x.dtype)], 1)
        A = beta * before[f"{layer}.A"] + (1 - beta) * a_bar.T @ a_bar / BATCH
        torch.testing.assert_close(after[f"{layer}.A"], A)
        # the update: D = lr H_g (mu Mhat + (1 - mu) M) H_a with the previous inverse factors
        Mhat = mu * before[f"{layer}.momentum"] + (1 - mu) * M
        D = lr * before[f"{layer}.G_inv"] @ Mhat @ before[f"{layer}.A_inv"]
        torch.testing.assert_close(block_matrix(new_module), P - D)
        # the pair: change of the mean pre-activation and of the summed loss gradients (N times the mean)
        s = new_pre[layer].mean(0) - pre[layer].mean(0)
        y = new_grads[layer].sum(0) - grads[layer].sum(0)
        torch.testing.assert_close(after[f"{layer}.s"], s)
        torch.testing.assert_close(after[f"{layer}.y"], y)
        H_g = before[f"{layer}.G_inv"]
        s_dd, y_dd = double_damping_reference(s, y, H_g, mu1, mu2)
        torch.testing.assert_close(after[f"{layer}.G_inv"], bfgs_reference(H_g, s_dd, y_dd))
        # Hessian action: s_a = H_a a_bar_mean, y_a = (A + sqrt(lambda) I) s_a
        H_a = before[f"{layer}.A_inv"]
        s_a = H_a @ a_bar.mean(0)
        y_a = (A + mu2 * torch.eye(len(A), dtype=A.dtype)) @ s_a
        torch.testing.assert_close(after[f"{layer}.A_inv"], bfgs_reference(H_a, s_a, y_a))


def full_and_limited(memory: int):
    """K-BFGS and K-BFGS(L) with ``memory`` side by side for 6 steps: the optimizers and, per step, the
    largest difference between their parameters."""
    full, limited = autoencoder(), autoencoder()
    opts = compile_ae(full, "kbfgs"), compile_ae(limited, "kbfgs_l", memory=memory)
    differences = []
    for x in batches(digits(), 6, seed=5):
        for opt in opts:
            opt.step(x, x)
        differences.append(max((a - b).abs().max().item() for a, b in zip(full.parameters(), limited.parameters())))
    return opts, differences


def two_loop_reference(S: torch.Tensor, Y: torch.Tensor, count: int, v: torch.Tensor) -> torch.Tensor:
    """Nocedal's two-loop recursion (H_0 = I) over the last ``count`` rows of ``S``, ``Y`` (oldest first)."""
    pairs = list(zip(S[len(S) - count:], Y[len(Y) - count:]))
    alphas = []
    for s, y in reversed(pairs):
        alphas.append((s @ v) / (s @ y))
        v = v - alphas[-1] * y
    for (s, y), alpha in zip(pairs, reversed(alphas)):
        v = v + s * (alpha - (y @ v) / (s @ y))
    return v


def test_lbfgs_with_enough_memory_equals_bfgs():
    """K-BFGS(L) with memory >= steps: the same parameters as K-BFGS after every step, and the L-BFGS
    matrix of the stored pairs, applied in compact form and by the two-loop recursion, equals BFGS's H_g."""
    from curvgraph.methods.kbfgs import lbfgs_apply

    (opt_full, opt_limited), differences = full_and_limited(memory=8)
    assert max(differences) < 1e-11, differences
    state_full, state_limited = snapshot(opt_full), snapshot(opt_limited)
    for layer in LAYERS:
        H = state_full[f"{layer}.G_inv"]
        S, Y, R_inv, count = (state_limited[f"{layer}.{k}"] for k in ("S", "Y", "R_inv", "count"))
        assert count.item() == len(differences)
        eye = torch.eye(len(H), dtype=H.dtype)
        torch.testing.assert_close(lbfgs_apply(S, Y, R_inv, eye), H, rtol=1e-9, atol=1e-12)
        two_loop = torch.stack([two_loop_reference(S, Y, len(differences), e) for e in eye], 1)
        torch.testing.assert_close(two_loop, H, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("memory", [1, 3])
def test_lbfgs_memory_forgets(memory):
    """Control for the test above: with memory 3 (or 1) < steps the parameters differ from K-BFGS; after the
    oldest pairs were dropped, the compact form still equals the two-loop recursion over the kept pairs."""
    from curvgraph.methods.kbfgs import lbfgs_apply

    (_, opt_limited), differences = full_and_limited(memory=memory)
    assert differences[-1] > 1e-6, differences
    state = snapshot(opt_limited)
    for layer in LAYERS:
        S, Y, R_inv = (state[f"{layer}.{k}"] for k in ("S", "Y", "R_inv"))
        assert state[f"{layer}.count"].item() == memory
        eye = torch.eye(S.shape[-1], dtype=S.dtype)
        two_loop = torch.stack([two_loop_reference(S, Y, memory, e) for e in eye], 1)
        torch.testing.assert_close(lbfgs_apply(S, Y, R_inv, eye), two_loop, rtol=1e-9, atol=1e-12)


class GroupedCNN(nn.Module):
    """Grouped convolution, BatchNorm (a norm block), LayerNorm, dense head: every built-in kind."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 3 * 3, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.grouped(torch.relu(self.conv(x)))))
        return self.head(torch.tanh(self.norm(self.fc(x.flatten(1)))))


INVERSION = re.compile(r"linalg\.|cholesky|\beigh|eigvals|\bsolve|\.inverse\(|torch\.inverse|\binv\(|pinv|\bsvd|lstsq"
                       r"|\bqr\(")


@pytest.mark.parametrize("method", ["kbfgs", "kbfgs_l"])
def test_conv_and_norm_blocks_train_without_inversion(method):
    """Dense, conv (with groups) and norm blocks: no inversion or decomposition in the generated source,
    every step finite, the training loss decreases; the inverse factors stay positive definite."""
    torch.manual_seed(0)
    model = GroupedCNN().double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    options = {"memory": 4} if method == "kbfgs_l" else {}
    opt = curvgraph.compile(model, (x,), method=method, backend="eager", lr=0.1, **options)
    assert {b.kind for b in opt.plan.blocks} == {"dense", "conv", "norm"}
    assert not INVERSION.search(opt.source), INVERSION.search(opt.source)
    assert "torch.func.vjp(model, trial, probes" in opt.source  # the extra forward/backward at the new parameters
    losses = [opt.step(x, y).item() for _ in range(15)]
    assert opt.skipped_steps == 0
    assert losses[-1] < 0.7 * losses[0], losses
    state = snapshot(opt)
    for key, value in state.items():
        if key.endswith(("A_inv", "G_inv", "F_inv")):
            torch.testing.assert_close(value, value.mT, rtol=0, atol=1e-12)
            assert eig(value).min() > 0, key
    assert state["grouped.A_inv"].shape == (2, 2 * 9 + 1, 2 * 9 + 1)  # one inverse per group


def layer_outputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str]):
    """The outputs (pre-activations) of the named modules and the loss gradients w.r.t. them, by hooks."""
    outputs = {}

    def keep(name):
        def hook(module, args, output):
            output.retain_grad()
            outputs[name] = output
        return hook

    handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    nn.functional.cross_entropy(model(x), y).backward()
    for h in handles:
        h.remove()
    return {n: o.detach() for n, o in outputs.items()}, {n: o.grad for n, o in outputs.items()}


def test_convolution_pairs_are_position_means_and_sums():
    """Grouped convolution and dense blocks of a CNN: the stored pair after one step is the change of the
    pre-activations' mean over examples and positions and of the loss gradients' sum over them, per group."""
    torch.manual_seed(0)
    model = GroupedCNN().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    opt = curvgraph.compile(model, (x,), method="kbfgs", backend="eager", lr=0.1, pair_ema=0.0, fisher="empirical")
    opt.step(x, y)  # H_g is not the identity any more
    names = ["conv", "grouped", "fc"]
    pre, grads = layer_outputs(copy.deepcopy(model), x, y, names)
    opt.step(x, y)
    new_pre, new_grads = layer_outputs(copy.deepcopy(model), x, y, names)
    state = snapshot(opt)
    for name, groups in (("conv", 1), ("grouped", 2), ("fc", 1)):
        dims = [0] + list(range(2, pre[name].dim()))  # examples and positions
        s = (new_pre[name] - pre[name]).mean(dims)
        y_ = (new_grads[name] - grads[name]).sum(dims)
        shape = state[f"{name}.s"].shape
        assert shape == ((groups, s.numel() // groups) if groups > 1 else (s.numel(),))
        torch.testing.assert_close(state[f"{name}.s"], s.reshape(shape))
        torch.testing.assert_close(state[f"{name}.y"], y_.reshape(shape))


@pytest.mark.parametrize("method", ["kbfgs", "kbfgs_l"])
def test_checkpoint_resumes_identically(method):
    data = batches(digits(), 9, seed=7)
    options = {"memory": 3} if method == "kbfgs_l" else {}
    original = autoencoder()
    opt = compile_ae(original, method, **options)
    for x in data[:4]:
        opt.step(x, x)
    checkpoint = copy.deepcopy({"model": original.state_dict(), "opt": opt.state_dict()})
    losses = [opt.step(x, x).item() for x in data[4:]]
    resumed = autoencoder()
    resumed.load_state_dict(checkpoint["model"])
    opt2 = compile_ae(resumed, method, **options)
    opt2.load_state_dict(checkpoint["opt"])
    assert [opt2.step(x, x).item() for x in data[4:]] == losses
    for a, b in zip(original.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    fresh = autoencoder()
    fresh.load_state_dict(checkpoint["model"])
    assert [compile_ae(fresh, method, **options).step(x, x).item() for x in data[4:]] != losses  # the control


def test_cost_entries():
    model = autoencoder()
    opt = compile_ae(model, "kbfgs_l", memory=5)
    block = opt.plan.blocks[0]  # 64 -> 32 with bias: M is 32 x 65
    assert block.cost["inversion"] == 0
    assert block.cost["precondition"] == 2 * 32 * 65 * 65 + 8 * 5 * 32 * 65 + 5**2 * (6 * 65 + 2 * 32)
    assert block.cost["extra_forward_backward"] == block.cost["forward_backward"]
    assert block.cost["state_bytes"] > 0


def test_options_and_errors():
    with pytest.raises(curvgraph.ConfigError, match="memory"):
        compile_ae(autoencoder(), "kbfgs_l", memory=0)
    with pytest.raises(curvgraph.ConfigError, match="memory"):
        compile_ae(autoencoder(), "kbfgs", memory=3)  # K-BFGS keeps a dense H_g: no memory option


def test_bfloat16_model():
    """A bf16 model: factors and inverse factors in float32, the extra pass at bf16 parameters; it trains."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 4)).to(torch.bfloat16)
    x, y = torch.randn(10, 6, dtype=torch.bfloat16), torch.randint(0, 4, (10,))
    opt = curvgraph.compile(model, (x,), method="kbfgs", backend="eager", lr=0.1)
    losses = [opt.step(x, y).item() for _ in range(8)]
    assert opt.skipped_steps == 0 and losses[-1] < 0.9 * losses[0], losses
    assert opt.state_dict()["state"]["0.G_inv"].dtype == torch.float32


def test_kind_without_example_rows_is_a_compile_error(monkeypatch):
    """A kind that does not define example rows (here: dense with the hook removed): a clear CompileError."""
    from curvgraph.kinds.base import BlockKind
    from curvgraph.kinds.dense import Dense

    monkeypatch.setattr(Dense, "write_example_rows", BlockKind.write_example_rows)
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(CompileError, match="example rows"):
        curvgraph.compile(model, (torch.randn(4, 3),), method="kbfgs", backend="eager")


@pytest.fixture(scope="module")
def compiled_pair():
    """One small compiled step (torch.compile, inductor) and its eager twin."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]
    runs = {}
    for backend in ("inductor", "eager"):
        model = copy.deepcopy(base)
        opt = curvgraph.compile(model, (data[0][0],), method="kbfgs_l", memory=3, backend=backend,
                                fisher="empirical", invert_every=1)  # one specialization: refresh is unused
        runs[backend] = (model, [opt.step(x, y).item() for x, y in data], opt.skipped_steps)
    return runs


def test_compiled_step_matches_eager(compiled_pair):
    compiled, eager = compiled_pair["inductor"], compiled_pair["eager"]
    assert compiled[2] == eager[2] == 0
    assert compiled[1] == pytest.approx(eager[1], rel=1e-5)
    for a, b in zip(compiled[0].parameters(), eager[0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
