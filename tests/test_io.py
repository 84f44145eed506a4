"""What the step takes and gives: lazy capture, keyword inputs, structured outputs, flattened
outputs, summed losses, and the checks on every batch.

References: the same model captured eagerly, called positionally, returning a plain
tensor, or with the mean loss (and the damping scaled by the sum's factor); the exact
GGN of the summed loss by torch.func.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

import curvgraph

N, D, C = 8, 6, 4


class ScaledMLP(nn.Module):
    """A dense block, then an elementwise learned divisor no pass matches (a fallback parameter; a scale would be a
    norm block)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, 5)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 5))
        self.head = nn.Linear(5, C)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)) / self.scale)


def batches(count: int, n: int = N, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, D, generator=g), torch.randint(0, C, (n,), generator=g)) for _ in range(count)]


def same_params(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ---------------------------------------------------------------------------- lazy capture
def test_lazy_capture_at_the_first_step_equals_capture_at_compile():
    torch.manual_seed(0)
    model = ScaledMLP()
    twin = copy.deepcopy(model)
    lazy = curvgraph.compile(model, loss="cross_entropy", backend="eager", seed=1)
    assert not lazy.captured
    assert "nothing captured yet" in str(lazy.plan) and "first step" in repr(lazy.plan)
    with pytest.raises(curvgraph.NotCapturedError, match="opt.plan.blocks needs the captured model, and nothing is"):
        lazy.plan.blocks
    for what in (lambda: lazy.source, lazy.factors, lambda: lazy.export("never.py")):
        with pytest.raises(curvgraph.NotCapturedError, match="first step"):
            what()
    data = batches(3)
    eager = curvgraph.compile(twin, data[0][0], loss="cross_entropy", backend="eager", seed=1)
    for x, y in data:
        torch.testing.assert_close(lazy.step(x, y), eager.step(x, y), rtol=0, atol=0)
    assert lazy.captured and str(lazy.plan) == str(eager.plan) and lazy.source == eager.source
    assert same_params(model, twin)


def test_param_groups_exist_before_capture_and_keep_edits_and_schedulers():
    torch.manual_seed(1)
    model = ScaledMLP()
    twin = copy.deepcopy(model)
    lazy = curvgraph.compile(model, backend="eager", lr=0.1, kl_clip=None, fallback_lr=0.01)
    curvature, fallback = lazy.param_groups
    assert [g["role"] for g in lazy.param_groups] == ["curvature", "fallback"]
    assert curvature["params"] == list(model.parameters()) and fallback["params"] == []
    fallback["lr"] = 0.03  # a user edit before the capture
    schedule = torch.optim.lr_scheduler.StepLR(lazy, step_size=1, gamma=0.5)
    x, y = batches(1)[0]
    eager = curvgraph.compile(twin, (x,), backend="eager", lr=0.1, kl_clip=None, fallback_lr=0.03)
    eager_schedule = torch.optim.lr_scheduler.StepLR(eager, step_size=1, gamma=0.5)
    for x, y in batches(3):
        lazy.step(x, y)
        eager.step(x, y)
        schedule.step()
        eager_schedule.step()
    # the same dicts, re-split: the fallback parameter moved, the edit and the schedule stayed
    assert lazy.param_groups[0] is curvature and lazy.param_groups[1] is fallback
    assert fallback["params"] == [model.scale] and not any(p is model.scale for p in curvature["params"])
    assert curvature["lr"] == pytest.approx(0.1 / 8) and fallback["lr"] == pytest.approx(0.03 / 8)
    assert same_params(model, twin)


def test_state_dict_before_capture_is_loaded_at_capture():
    data = batches(4)
    torch.manual_seed(2)
    model = ScaledMLP()
    original = curvgraph.compile(model, (data[0][0],), backend="eager", seed=3, invert_every=2)
    for x, y in data[:2]:
        original.step(x, y)
    saved_model, saved = copy.deepcopy(model.state_dict()), original.state_dict()
    for x, y in data[2:]:
        original.step(x, y)

    resumed_model = ScaledMLP()
    resumed_model.load_state_dict(saved_model)
    resumed = curvgraph.compile(resumed_model, backend="eager", seed=99, invert_every=2)
    before = resumed.state_dict()
    assert set(before) == {"method", "param_groups"}  # nothing captured: hyper-parameters only
    resumed.load_state_dict(before)  # loads (a no-op) before and after the capture alike
    resumed.load_state_dict(saved)
    assert resumed.state_dict()["step_count"] == 2  # waiting for the capture, and saved as such
    for x, y in data[2:]:
        resumed.step(x, y)
    assert same_params(resumed_model, model)
    assert torch.equal(resumed.state_dict()["generator"], original.state_dict()["generator"])


def test_state_dict_of_another_model_fails_at_capture():
    other = curvgraph.compile(nn.Sequential(nn.Linear(D, C)), batches(1)[0][0], backend="eager")
    lazy = curvgraph.compile(ScaledMLP(), backend="eager")
    saved = other.state_dict()
    saved["param_groups"][0]["lr"] = 0.25
    lazy.load_state_dict(saved)
    assert lazy.param_groups[0]["lr"] == 0.25  # hyper-parameters load at once, the state at the capture
    x, y = batches(1)[0]
    with pytest.raises(curvgraph.ConfigError, match="loaded before the capture does not fit.* nor its hyper-param"):
        lazy.step(x, y)
    assert lazy.param_groups[0]["lr"] == 1.0  # lr="auto"'s multiplier, as compiled


def test_state_dict_saved_with_another_step_size_mode_says_so():
    model = nn.Sequential(nn.Linear(D, C))
    x = batches(1)[0][0]
    fixed = curvgraph.compile(model, x, backend="eager", lr=2e-3)
    auto = curvgraph.compile(model, x, backend="eager")
    with pytest.raises(curvgraph.ConfigError, match=r"unexpected \['kfac.damping', 'kfac.damping_calibrated', .*\]\): .*lr='auto' or a fixed lr"):
        fixed.load_state_dict(auto.state_dict())


# ---------------------------------------------------------------------------- keyword inputs, structured outputs
@dataclasses.dataclass
class LMOutput:
    """A Hugging Face ``ModelOutput``-like return value."""

    logits: torch.Tensor
    hidden: torch.Tensor
    cache: tuple[torch.Tensor, ...] | None = None


class KeywordLM(nn.Module):
    """Called as ``model(input_ids=..., attention_mask=...)``; returns ``LMOutput``, a dict or a tuple."""

    def __init__(self, returns: str = "dataclass") -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 5)
        self.fc = nn.Linear(5, 7)
        self.returns = returns

    def forward(self, input_ids, attention_mask):
        hidden = self.emb(input_ids) * attention_mask[..., None]
        logits = self.fc(hidden)
        if self.returns == "dict":
            return {"hidden": hidden, "logits": logits}
        if self.returns == "tuple":
            return hidden, (hidden, hidden), logits
        if self.returns == "tensor":
            return logits
        return LMOutput(logits, hidden, (hidden,))


class Positional(nn.Module):
    """The reference: the same model called positionally, returning the logits."""

    def __init__(self, model: KeywordLM) -> None:
        super().__init__()
        self.inner = KeywordLM("tensor")
        self.inner.load_state_dict(model.state_dict())

    def forward(self, ids, mask):
        return self.inner(input_ids=ids, attention_mask=mask)


def lm_batch(n: int = 3, t: int = 5, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(n, t, generator=g) > 0.2).float()
    return {"input_ids": torch.randint(0, 11, (n, t), generator=g), "attention_mask": mask}, torch.randint(0, 7, (n, t), generator=g)


@pytest.mark.parametrize("returns, output", [
    ("dataclass", "logits"),
    ("dict", "logits"),
    ("tuple", 2),
    ("tuple", -1),
    ("dataclass", lambda out: out.logits),
])
def test_keyword_inputs_and_structured_outputs_match_the_positional_model(returns, output):
    torch.manual_seed(3)
    model = KeywordLM(returns)
    reference = Positional(model)
    batch, targets = lm_batch()
    opt = curvgraph.compile(model, batch, loss="token_cross_entropy", output=output, backend="eager", seed=0)
    ref = curvgraph.compile(reference, (batch["input_ids"], batch["attention_mask"]), loss="token_cross_entropy",
                            backend="eager", seed=0)
    assert [s.name for s in opt._inputs] == ["input_ids", "attention_mask"]
    for seed in range(3):
        batch, targets = lm_batch(n=2 + seed, seed=seed)  # other batch sizes, keys in another order
        shuffled = {"attention_mask": batch["attention_mask"], "input_ids": batch["input_ids"]}
        torch.testing.assert_close(opt.step(shuffled, targets), ref.step((batch["input_ids"], batch["attention_mask"]), targets))
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


def test_lazy_capture_with_keyword_inputs():
    model = KeywordLM("dict")
    opt = curvgraph.compile(model, loss="token_cross_entropy", output="logits", backend="eager")
    batch, targets = lm_batch()
    opt.step(batch, targets)
    assert opt.captured and "emb" in {b.name for b in opt.plan.blocks}


def test_keyword_input_errors():
    model = KeywordLM("dict")
    batch, targets = lm_batch()
    opt = curvgraph.compile(model, batch, loss="token_cross_entropy", output="logits", backend="eager")
    with pytest.raises(curvgraph.InputError, match=r"lacks \['attention_mask'\] and has unexpected \['mask'\]"):
        opt.step({"input_ids": batch["input_ids"], "mask": batch["attention_mask"]}, targets)
    with pytest.raises(curvgraph.InputError, match=r"captured for keyword inputs \(input_ids, attention_mask\): pass a dict"):
        opt.step((batch["input_ids"], batch["attention_mask"]), targets)
    positional = curvgraph.compile(nn.Linear(D, C), batches(1)[0][0], backend="eager")
    with pytest.raises(curvgraph.InputError, match="captured for positional inputs"):
        positional.step({"input": batches(1)[0][0]}, batches(1)[0][1])
    with pytest.raises(curvgraph.ConfigError, match=r"by keyword must map names to tensors, got \{'input_ids': Tensor, "
                                                    r"'use_cache': bool\}"):
        curvgraph.compile(model, {"input_ids": batch["input_ids"], "use_cache": False}, backend="eager")


@pytest.mark.parametrize("returns, output, match", [
    ("dataclass", None, r"LMOutput \{'logits': a tensor of shape \(3, 5, 7\), 'hidden': .*output='logits'"),
    ("dict", "logit", r"output='logit' picks nothing .*KeyError.* dict \{'hidden': .*'logits': .*output='logits'"),
    ("tuple", 5, r"output=5 picks nothing .*IndexError.*a tuple of 3 \[.*output=0"),
    ("tuple", 1, r"output=1 picks a tuple of 2 \[a tensor of shape \(3, 5, 5\), .*\] from what KeywordLM returned"),
])
def test_output_errors_name_the_output_and_list_the_return_value(returns, output, match):
    batch, _ = lm_batch()
    with pytest.raises(curvgraph.ConfigError, match=match):
        curvgraph.compile(KeywordLM(returns), batch, loss="token_cross_entropy", output=output, backend="eager")


# ---------------------------------------------------------------------------- flattened (N*T, V) outputs
class TokenMLP(nn.Module):
    """Per-token logits ``(N, T, V)``, or flattened to ``(N*T, V)`` rows."""

    def __init__(self, flatten: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(D, 8)
        self.head = nn.Linear(8, C)
        self.flatten = flatten

    def forward(self, x):
        logits = self.head(torch.tanh(self.fc(x)))
        return logits.reshape(-1, logits.shape[-1]) if self.flatten else logits


class PixelConv(nn.Module):
    """Per-pixel classes: ``(N, C, H, W)``, or rearranged ``b c h w -> (b h w) c``."""

    def __init__(self, flatten: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3, padding=1)
        self.flatten = flatten

    def forward(self, x):
        y = self.conv(x)
        return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]) if self.flatten else y


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("case", ["tokens", "pixels"])
def test_flattened_rows_match_the_batched_layout(float64, case, kfac_approx):
    g = torch.Generator().manual_seed(0)
    if case == "tokens":
        make, loss = TokenMLP, "token_cross_entropy"
        data = [(torch.randn(n, 5, D, generator=g), torch.randint(0, C, (n, 5), generator=g)) for n in (3, 2)]
    else:
        make, loss = PixelConv, "cross_entropy"
        data = [(torch.randn(n, 3, 4, 5, generator=g), torch.randint(0, C, (n, 4, 5), generator=g)) for n in (3, 2)]
    torch.manual_seed(4)
    flat, batched = make(True), make(False)
    batched.load_state_dict(flat.state_dict())
    options = dict(fisher="type2", kfac_approx=kfac_approx, backend="eager", lr=0.1, kl_clip=None, damping=1e-2)
    opt_flat = curvgraph.compile(flat, (data[0][0],), loss="cross_entropy", **options)
    opt_batched = curvgraph.compile(batched, (data[0][0],), loss=loss, **options)
    for x, y in data:  # another batch size: the rows stay symbolic
        torch.testing.assert_close(opt_flat.step(x, y.reshape(-1)), opt_batched.step(x, y))
        for block, factors in opt_batched.factors().items():
            for name, value in factors.items():
                torch.testing.assert_close(opt_flat.factors()[block][name], value)
    for p, q in zip(flat.parameters(), batched.parameters()):
        torch.testing.assert_close(p, q)


# ---------------------------------------------------------------------------- reduction="sum"
SUM_CASES = {  # loss module, model output -> (targets, the sum's factor s)
    "cross_entropy": (nn.CrossEntropyLoss, lambda out, g: (torch.randint(0, C, out.shape[:1], generator=g), out.shape[0])),
    "mse": (nn.MSELoss, lambda out, g: (torch.randn(out.shape, generator=g, dtype=out.dtype), out.numel())),
    "bce_with_logits": (nn.BCEWithLogitsLoss,
                        lambda out, g: (torch.rand(out.shape, generator=g, dtype=out.dtype).round(), out.numel())),
}


@pytest.mark.parametrize("fisher", ["type2", "mc", "empirical"])
@pytest.mark.parametrize("loss", sorted(SUM_CASES))
@pytest.mark.parametrize("lr", [0.1, "auto"])
def test_sum_reduction_is_the_mean_step_with_damping_divided_by_the_scale(float64, loss, fisher, lr):
    """For K-FAC, ``(s F + lam)^-1 (s g) = (F + lam / s)^-1 g``: the summed loss's step with damping ``lam`` is the
    mean loss's with ``lam / s`` (factored damping, the adaptive step size and momentum included)."""
    module, make_targets = SUM_CASES[loss]
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, C))  # no fallback: Adam's eps is not scale-free
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g)
    y, s = make_targets(model(x), g)
    damping = 0.5
    options = dict(fisher=fisher, backend="eager", lr=lr, seed=7, **({} if lr == "auto" else {"kl_clip": None}))
    summed = curvgraph.compile(model, (x,), loss=module(reduction="sum"), damping=damping, **options)
    mean = curvgraph.compile(twin, (x,), loss=module(), damping=damping / s, **options)
    for _ in range(2):
        torch.testing.assert_close(summed.step(x, y), s * mean.step(x, y))
        for block, factors in mean.factors().items():
            torch.testing.assert_close(summed.factors()[block]["A"], factors["A"])
            torch.testing.assert_close(summed.factors()[block]["G"], s * factors["G"])
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)
    assert "loss=" + loss + "(reduction='sum')" in summed.source


@pytest.mark.parametrize("loss", ["mse", "bce_with_logits", "cross_entropy"])
def test_sum_reduction_factors_are_the_exact_ggn_of_the_sum(float64, loss):
    """One example, one layer, type-2 Fisher: ``kron(G, A)`` is the exact GGN of the summed loss."""
    module, make_targets = SUM_CASES[loss]
    torch.manual_seed(6)
    model = nn.Linear(D, C)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, D, generator=g)
    y, _ = make_targets(model(x), g)
    theta = torch.cat([model.weight, model.bias[:, None]], 1).detach().flatten()

    def output_of(t):
        matrix = t.reshape(C, D + 1)
        return functional_call(model, {"weight": matrix[:, :D], "bias": matrix[:, D]}, (x,))

    out = output_of(theta)
    jac = jacrev(output_of)(theta).reshape(out.numel(), theta.numel())
    hess = hessian(lambda o: module(reduction="sum")(o.reshape(out.shape), y))(out.flatten())
    opt = curvgraph.compile(model, (x,), loss=module(reduction="sum"), fisher="type2", ema=0.0, backend="eager")
    opt.step(x, y)  # the statistics are taken before the update
    (factors,) = opt.factors().values()
    torch.testing.assert_close(torch.kron(factors["G"], factors["A"]), jac.T @ hess @ jac)


# ---------------------------------------------------------------------------- checks on every batch
def test_token_logits_with_cross_entropy_name_the_layout_before_compiling():
    x = torch.randn(2, 5, D)
    opt = curvgraph.compile(TokenMLP(False), (x,), loss="cross_entropy")  # inductor: the check comes first
    with pytest.raises(curvgraph.InputError, match=r"cross_entropy needs targets of shape \(2, 4\) \(the prediction "
                                                   r"without its class dim 1; the prediction is \(2, 5, 4\)\), got \(2, 5\)"
                                                   r".*fit loss='token_cross_entropy'"):
        opt.step(x, torch.randint(0, C, (2, 5)))
    flat = curvgraph.compile(TokenMLP(True), (x,), loss="cross_entropy", backend="eager")
    with pytest.raises(curvgraph.InputError, match=r"needs targets of shape \(10,\).*got \(2, 5\); if they are in the "
                                                   r"prediction's order, pass targets.reshape\(10,\)"):
        flat.step(x, torch.randint(0, C, (2, 5)))


def test_rejected_batches_change_nothing():
    torch.manual_seed(7)
    model = ScaledMLP()
    (x, y), (x2, y2) = batches(2)
    opt = curvgraph.compile(model, (x,), backend="eager", lr=0.05)
    opt.step(x, y)
    params, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    bad = {
        r"input 'x' has shape \(8, 5\)": (x[:, :5], y),
        r"and dtype torch.float64; the step was compiled for shape \('\*', 6\) \(.*\) and dtype torch.float32": (x.double(), y),
        r"input 'x' is on meta, the model's parameters on cpu": (x.to("meta"), y),
        r"compiled for 1 input\(s\) \(x\), got 2": ((x, x), y),
        "targets must be a tensor": (x, y.tolist()),
        r"cross_entropy needs class indices of dtype torch.int64 \(or torch.uint8\), got dtype torch.float32\.$":
            (x, y.float()),
        r"got dtype torch.int32: pass targets.long\(\)": (x, y.int()),  # torch's cross-entropy takes no int32
        r"class index 4 is out of range for 4 classes": (x, torch.where(y == 0, 4, y)),
        r"class index -3 is out of range": (x, torch.where(y == 0, -3, y)),
        r"needs targets of shape \(8,\) .* got \(5,\)\. The batch is taken from dim 0 of input 'x'": (x, y[:5]),
        r"targets are on meta": (x, y.to("meta")),
        r"the batch is empty": (x[:0], y[:0]),
    }
    for match, (inputs, targets) in bad.items():
        with pytest.raises(curvgraph.InputError, match=match):
            opt.step(inputs, targets)
    for key, value in model.state_dict().items():
        assert torch.equal(value, params[key]), key
    after = opt.state_dict()
    assert after["step_count"] == 1 and torch.equal(after["generator"], state["generator"])
    for key, value in after["state"].items():
        assert torch.equal(value, state["state"][key]), key
    opt.step(x2[:3], y2[:3])  # a smaller batch than the example's: the batch size is symbolic
    opt.step(x, torch.where(y == 0, -100, y))  # ignored targets are in range
    opt.step(x, y.to(torch.uint8))  # the other dtype torch's cross-entropy takes


def test_exported_step_takes_keyword_inputs_like_the_optimizer(tmp_path):
    torch.manual_seed(8)
    model = KeywordLM("dict")
    twin = copy.deepcopy(model)
    batch, targets = lm_batch()
    opt = curvgraph.compile(model, batch, loss="token_cross_entropy", output="logits", backend="eager", seed=2)
    exported = curvgraph.load_step(opt.export(tmp_path / "keyword_step.py"), twin, seed=2)
    for seed in range(2):
        batch, targets = lm_batch(seed=seed)
        torch.testing.assert_close(exported.step(dict(reversed(batch.items())), targets), opt.step(batch, targets),
                                   rtol=0, atol=0)
    assert same_params(model, twin)
    with pytest.raises(ValueError, match=r"takes a dict with keys \['input_ids', 'attention_mask'\]"):
        exported.step((batch["input_ids"], batch["attention_mask"]), targets)


class SizeBranch(nn.Module):
    """A branch on the batch size in ``forward``: torch.export keeps the size symbolic, in the branch's range."""

    def __init__(self):
        super().__init__()
        self.a, self.extra, self.b = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if x.shape[0] > 4:
            h = h + torch.relu(self.extra(h))
        return self.b(h)


def test_a_batch_outside_the_size_range_the_capture_recorded_is_rejected():
    torch.manual_seed(9)
    model = SizeBranch()
    x, y = torch.randn(12, 6), torch.randint(0, 4, (12,))
    opt = curvgraph.compile(model, (x,), backend="eager")
    params = copy.deepcopy(model.state_dict())
    with pytest.raises(curvgraph.InputError, match=r"input 'x' has size 3 in dim 0; the step was captured for sizes "
                                                   r"of at least 5 there\. .* \(e\.g\. `if x\.shape\[0\] > 4:`\)"):
        opt.step(x[:3], y[:3])  # eager skips the branch here; the captured graph would take it
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        expected = F.cross_entropy(model(x[:5]), y[:5])
    assert torch.allclose(opt.step(x[:5], y[:5]), expected)  # inside the range: the graph is the model


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_a_batch_in_another_memory_layout_steps_like_the_contiguous_batch(layout):
    """The capture records ``nn.Flatten`` of a contiguous example as a ``view``; a batch of another layout is copied
    to a contiguous one first, and steps exactly as the contiguous batch does."""
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 4, (8,))
    other = (x.contiguous(memory_format=torch.channels_last) if layout == "channels_last"
             else x.transpose(2, 3).contiguous().transpose(2, 3))
    assert torch.equal(other, x) and not other.is_contiguous()
    results = []
    for batch in (x, other):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 4))
        opt = curvgraph.compile(model, (x,), backend="eager", seed=0)
        losses = [opt.step(batch, y) for _ in range(2)]
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
    assert all(torch.equal(a, b) for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]))


class ElementwiseAffine(nn.Module):
    """``x * exp(w) + b`` with ``(features,)`` parameters: no block kind claims them (``x * w`` would be a norm
    block), so both train by the fallback."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(features)), nn.Parameter(torch.randn(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w.exp() + self.b


def test_a_scheduler_cycling_the_momentum_cycles_the_fallback_adams_beta1_as_torch_adams():
    """``OneCycleLR`` writes ``momentum`` into every group (``opt.defaults`` has the curvature method's), and cycles
    ``betas[0]`` of ``torch.optim.Adam``: the fallback's parameters follow torch's Adam under the same schedule."""
    torch.manual_seed(0)
    model = ElementwiseAffine(3)
    reference = copy.deepcopy(model)
    data = [(torch.randn(8, 3), torch.randint(0, 3, (8,))) for _ in range(5)]
    opt = curvgraph.compile(model, (data[0][0],), backend="eager", lr=1e-2)
    assert sorted(opt.plan.fallback_params) == ["b", "w"]
    adam = torch.optim.Adam(reference.parameters(), lr=1e-3)
    schedules = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=len(data)) for o in (opt, adam)]
    for x, y in data:
        opt.step(x, y)
        adam.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        adam.step()
        for schedule in schedules:
            schedule.step()
    assert opt.param_groups[1]["momentum"] == adam.param_groups[0]["betas"][0] != 0.9
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, dict(reference.named_parameters())[name], rtol=1e-6, atol=1e-7)


def test_schedulers_that_cycle_the_momentum_drive_the_fixed_step_and_groups_cannot_be_added():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt = curvgraph.compile(model, (x,), backend="eager", lr=1e-2)
    assert opt.defaults["momentum"] == 0.9 and "damping" not in opt.param_groups[1]
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=4)
    momenta = []
    for _ in range(3):
        opt.step(x, y)
        schedule.step()
        momenta.append(opt.param_groups[0]["momentum"])
    assert len(set(momenta)) == 3 and max(momenta) <= 0.95, momenta
    with pytest.raises(curvgraph.ConfigError, match="two parameter groups"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
