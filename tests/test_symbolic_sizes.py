"""The step keeps the batch size symbolic: a batch of another size runs the graph already compiled.

torch 2.13 fixes the batch size of a traced graph wherever a kernel reads its tensors' sizes
as plain integers; the step meets that in ``aten.linear`` with a bias under ``torch.func``,
and in the double backward of ``aten.embedding``, convolution and batch norm, which the
curvature products of ``lr="auto"`` differentiate (batch norm's is worked around from a
model's second graph on); the capture meets it in ``opt_einsum``'s path search for einsums
of three or more operands. The step's rewrites (:data:`curvgraph.passes.forms.STEP_REWRITES`),
the symbolic convolution double backward (:func:`curvgraph.runtime.convolution_double_backward`)
and batch norm's backward traced as ops (:func:`curvgraph.runtime.batch_norm_backward_as_ops`)
must compute what the ops they replace compute, to the second derivative: each is checked
here against the op itself.
"""

from __future__ import annotations

import copy
import itertools
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.fx import GraphModule
from torch.fx.experimental.proxy_tensor import make_fx

import curvgraph
from curvgraph.passes.forms import composite_forms, embedding_as_index, linear_as_2d
from curvgraph.runtime import batch_norm_backward_as_ops, convolution_double_backward
from curvgraph.trace import trace

aten = torch.ops.aten


def rewritten(fn, example: tuple, rewrite) -> tuple[GraphModule, GraphModule]:
    """``fn`` traced with symbolic sizes as it is, and with ``rewrite`` applied (which must rewrite one node)."""
    original = make_fx(fn, tracing_mode="symbolic", pre_dispatch=True)(*example)  # keeps composite ops
    graph = copy.deepcopy(original.graph)
    assert rewrite(graph) == 1
    graph.eliminate_dead_code()
    graph.lint()
    return original, GraphModule(original, graph)


def derivatives(module: GraphModule, inputs: tuple, wrt: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    """The output, its vector-Jacobian product with the inputs ``wrt`` for a random cotangent ``u``, and the
    product of the transposed map ``u -> J^T u`` with a random ``v`` (what the step's curvature products compute)."""
    g = torch.Generator().manual_seed(seed)
    output = module(*inputs)

    def pullback(u):
        def f(*args):
            full = list(inputs)
            for i, a in zip(wrt, args):
                full[i] = a
            return module(*full)
        _, vjp = torch.func.vjp(f, *(inputs[i] for i in wrt))
        return vjp(u)

    grads = pullback(torch.randn(output.shape, generator=g, dtype=output.dtype))
    v = tuple(torch.randn(gr.shape, generator=g, dtype=gr.dtype) for gr in grads)
    _, transposed = torch.func.vjp(pullback, torch.zeros_like(output))
    return [output, *grads, *transposed(v)]


def assert_same_derivatives(fn, inputs: tuple, wrt: tuple[int, ...], rewrite) -> None:
    original, new = rewritten(fn, inputs, rewrite)
    for got, expected in zip(derivatives(new, inputs, wrt), derivatives(original, inputs, wrt), strict=True):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("shape", [(4, 5, 3), (2, 4, 5, 3), (3,)])
def test_linear_with_bias_on_an_input_not_2d(shape):
    inputs = tuple(torch.randn(*s, dtype=torch.float64) for s in (shape, (6, 3), (6,)))
    assert_same_derivatives(lambda x, w, b: aten.linear.default(x, w, b), inputs, (0, 1, 2), linear_as_2d)


def test_linear_rewrite_keeps_the_autocast_dtype():
    """Under autocast the bias is cast with the rest, as in ``aten.linear``: the output stays bfloat16."""
    inputs = (torch.randn(4, 5, 3), torch.randn(6, 3), torch.randn(6))
    original, new = rewritten(lambda x, w, b: aten.linear.default(x, w, b), inputs, linear_as_2d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = original(*inputs), new(*inputs)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("padding_idx", [-1, 2])
def test_embedding_as_index(padding_idx):
    """Same lookups and derivatives; the padding row gets no gradient, as from ``aten.embedding``."""
    weight, indices = torch.randn(5, 3, dtype=torch.float64), torch.tensor([[0, 2, 4], [2, 1, 2]])
    fn = lambda w, i: aten.embedding.default(w, i, padding_idx)  # noqa: E731
    assert_same_derivatives(fn, (weight, indices), (0,), embedding_as_index)
    _, new = rewritten(fn, (weight, indices), embedding_as_index)
    grad = torch.func.grad(lambda w: new(w, indices).sum())(weight)
    assert bool((grad[2] == 0).all()) == (padding_idx == 2)


# (dims, stride, padding, dilation, transposed, output_padding, groups, in channels, out channels)
CONVOLUTIONS = [
    (2, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, 3, 4),
    (2, [2, 2], [1, 0], [1, 2], False, [0, 0], 2, 4, 6),
    (1, [2], [2], [1], False, [0], 1, 2, 5),
    (2, [2, 2], [1, 1], [1, 1], True, [1, 0], 1, 3, 4),
    (3, [1, 1, 1], [0, 0, 0], [1, 1, 1], False, [0, 0, 0], 3, 3, 3),
    (2, [1, 1], [1, 1], [1, 1], False, [0, 0], 4, 4, 4),
]


@pytest.mark.parametrize("case", CONVOLUTIONS)
def test_convolution_double_backward_matches_the_kernel(case):
    """Every output the mask asks for, for every combination of the cotangents present."""
    dims, stride, padding, dilation, transposed, output_padding, groups, cin, cout = case
    args = (stride, padding, dilation, transposed, output_padding, groups)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, cin, *[7] * dims, generator=g, dtype=torch.float64)
    w = torch.randn(*((cin, cout // groups) if transposed else (cout, cin // groups)), *[3] * dims, generator=g,
                    dtype=torch.float64)
    gO = torch.randn_like(aten.convolution(x, w, None, *args))
    cotangents = (torch.randn_like(x), torch.randn_like(w), torch.randn(gO.shape[1], generator=g, dtype=torch.float64))
    for present in itertools.product([True, False], repeat=3):
        given = [t if p else None for t, p in zip(cotangents, present)]
        for mask in ([True, True, True], [True, False, False], [False, True, True]):
            expected = aten._convolution_double_backward(*given, gO, w, x, *args, mask)
            got = convolution_double_backward(*given, gO, w, x, *args, mask)
            for e, r, wanted in zip(expected, got, mask):
                if wanted and e is not None:
                    torch.testing.assert_close(r, e)


sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))


def test_char_transformer_runs_any_batch_and_length_in_one_graph():
    """A tied embedding, ``nn.TransformerEncoderLayer`` (3-d linears with biases) and the default mode, whose
    curvature products differentiate the backward: batches of other sizes and shorter sequences compile nothing."""
    from torch._dynamo.utils import counters

    from char_transformer import CharTransformer

    torch.manual_seed(0)
    model = CharTransformer(20, 16, 2, 1, 12)
    g = torch.Generator().manual_seed(0)

    def batch(n: int, t: int = 12):
        tokens = torch.randint(0, 20, (n, t + 1), generator=g)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    x, y = batch(8)
    opt = curvgraph.compile(model, (x,), loss="token_cross_entropy", backend="aot_eager", seed=0, progress=False)
    assert "output_jvps(" in opt.source
    opt.step((x,), y)
    graphs = counters["stats"]["unique_graphs"]
    for n, t in ((5, 12), (11, 12), (3, 7)):
        x, y = batch(n, t)
        assert torch.isfinite(opt.step((x,), y))
    assert counters["stats"]["unique_graphs"] == graphs
    assert opt.skipped_steps == 0


def test_dynamic_batch_fixes_every_size_but_the_batch():
    """``dynamic="batch"`` exports only the batch dim symbolic: the step takes batches of any size and computes what
    the default capture (every size the model does not pin symbolic) computes, and a batch of another sequence length
    is refused with an error that names the option, where the default capture takes it."""
    from char_transformer import CharTransformer

    torch.manual_seed(0)
    model = CharTransformer(20, 16, 2, 1, 12)
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)

    def batch(n: int, t: int = 12):
        tokens = torch.randint(0, 20, (n, t + 1), generator=g)
        return (tokens[:, :-1].contiguous(),), tokens[:, 1:].contiguous()

    options = dict(loss="token_cross_entropy", backend="eager", seed=0, progress=False)
    fixed = curvgraph.compile(model, batch(8)[0], dynamic="batch", **options)
    default = curvgraph.compile(twin, batch(8)[0], **options)
    assert [s.shape for s in fixed._inputs] == [(None, 12)]
    assert [s.shape for s in default._inputs] == [(None, None)]
    for n in (8, 5, 11):
        x, y = batch(n)
        torch.testing.assert_close(fixed.step(x, y), default.step(x, y))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)
    x, y = batch(3, 7)
    with pytest.raises(curvgraph.InputError, match=r"compiled for shape \('\*', 12\).*dynamic='batch'"):
        fixed.step(x, y)
    assert torch.isfinite(default.step(x, y))


class TimeMajorLSTM(nn.Module):
    """``nn.LSTM`` on ``(T, N, F)`` inputs, classified from the last step's output."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0][-1])


def test_dynamic_batch_takes_the_batch_dim_option():
    """With ``dynamic="batch"`` the batch dim must be known before the capture: dim 0 unless ``batch_dim`` says
    otherwise. A time-major input without it would fix the batch, which is refused, naming ``batch_dim``."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 3, 4), torch.randint(0, 3, (3,))
    with pytest.raises(curvgraph.ConfigError, match=r"fixed the batch, dim 0 of input 'x' \(size 6\).*batch_dim=1"):
        curvgraph.compile(TimeMajorLSTM(), (x,), backend="eager", dynamic="batch")
    opt = curvgraph.compile(TimeMajorLSTM(), (x,), backend="eager", dynamic="batch", batch_dim=1, progress=False)
    assert [s.shape for s in opt._inputs] == [(6, None, 4)]
    assert torch.isfinite(opt.step(torch.randn(6, 5, 4), torch.randint(0, 3, (5,))))


class SizeBranch(nn.Module):
    """Pools by the mean where the image has at most 15 pixels on a side, by the max elsewhere: a branch on sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        small = min(x.shape[2] // 8, x.shape[3] // 8) <= 1
        return self.head(x.mean((2, 3)) if small else x.amax((2, 3)))


def test_a_branch_on_symbolic_sizes_is_checked_before_the_step(tmp_path):
    """torch.export records a branch of ``forward`` on symbolic sizes as a guard on them (here not a range of any one
    size, which it records as such), and the captured graph is the branch taken. The step (and the module
    ``export`` writes) refuses a batch that breaks the guard and changes nothing, where it used to compute the other
    branch's loss with the captured branch; batches that keep it run."""
    torch.manual_seed(0)
    model = SizeBranch()
    opt = curvgraph.compile(model, (torch.randn(4, 3, 8, 8),), backend="eager", progress=False)
    trainer = curvgraph.load_step(opt.export(tmp_path / "step.py"), copy.deepcopy(model))
    assert opt._inputs[0].shape == (None, 3, None, None) and opt._inputs[0].size_ranges == ()
    y = torch.randint(0, 2, (4,))
    x = torch.randn(4, 3, 12, 9)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(x), y)
    torch.testing.assert_close(opt.step(x, y), expected)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(curvgraph.InputError, match=r"sizes \(4, 3, 16, 32\) break a condition .*min\(x\.size\(\).* <= 1"):
        opt.step(torch.randn(4, 3, 16, 32), y)
    with pytest.raises(ValueError, match=r"break a condition .*min\(x\.size\(\).* <= 1"):
        trainer.step(torch.randn(4, 3, 16, 32), y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_conv_default_mode_runs_any_batch_in_one_graph():
    """Convolutions and group norm under the default mode (curvature products through their double backward).

    Batch norm is not here: torch 2.13's double backward of batch norm fixes the batch size of the first graph.
    Written out as its reductions in the step, or with only its backward traced as ops, batch norm keeps the batch
    size symbolic, but Inductor fuses it into the convolution statistics' patch kernels of a ResNet-style CNN and
    the step takes 1.4-1.6x as long; so only a second graph, for every other batch size, is traced that way
    (``test_batch_norm_default_mode_compiles_one_graph_for_every_other_batch_size``)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
    g = torch.Generator().manual_seed(0)

    def batch(n: int):
        return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)

    x, y = batch(10)
    opt = curvgraph.compile(model, (x,), backend="aot_eager", seed=0, progress=False)
    assert "output_jvps(" in opt.source  # the curvature products differentiate the backward
    opt.step(x, y)
    graphs = counters["stats"]["unique_graphs"]
    for n in (7, 13, 4):  # below 16: at 16 torch's CPU convolution picks another backend, a guard of its own
        assert torch.isfinite(opt.step(*batch(n)))
    assert counters["stats"]["unique_graphs"] == graphs
    assert opt.skipped_steps == 0


class Bilinear(nn.Module):
    """A three-operand einsum on the batch, as in the zoo's einsum model: ``torch.einsum`` picks its
    contraction path with ``opt_einsum`` from the operands' sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 4)
        self.form = nn.Parameter(torch.randn(3, 4, 4) / 4)

    def forward(self, x):
        z = self.embed(x)
        return torch.einsum("ni,cij,nj->nc", z, self.form, z)


def einsum_paths(model: nn.Module, x: torch.Tensor) -> list:
    """The ``path`` of each einsum of more than two operands in the captured graph."""
    return [node.kwargs.get("path") for node in trace(model, (x,)).graph.find_nodes(
        op="call_function", target=aten.einsum.default) if len(node.args[1]) > 2]


@pytest.mark.skipif(not torch.backends.opt_einsum.is_available(), reason="opt_einsum's path search pins the batch")
def test_three_operand_einsum_keeps_the_batch_symbolic_and_torch_s_path(monkeypatch):
    """Captured with opt_einsum's size-reading path search, the batch size was pinned and a batch of another size
    rejected with an InputError; now it runs the compiled graph, contracting in the order torch.einsum picks."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = Bilinear()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)
    opt = curvgraph.compile(model, x, backend="aot_eager", seed=0, progress=False)
    z = model.embed(x)
    eager_path = torch.backends.opt_einsum.get_opt_einsum().contract_path(
        "ni,cij,nj->nc", z, model.form, z, optimize=torch.backends.opt_einsum.strategy)[0]
    assert einsum_paths(model, x) == [list(itertools.chain.from_iterable(eager_path))]
    assert torch.isfinite(opt.step(x, y))
    graphs = counters["stats"]["unique_graphs"]
    for n in (7, 13, 3):
        assert torch.isfinite(opt.step(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)))
    assert counters["stats"]["unique_graphs"] == graphs
    monkeypatch.setattr(torch.backends.opt_einsum, "enabled", False)  # the user's setting: left to right, as eagerly
    assert einsum_paths(model, x) == [None]


def second_derivatives(fn, inputs: tuple, u: torch.Tensor, vs: tuple) -> tuple:
    """The gradient of :math:`\\langle J^\\top u, v\\rangle` with respect to the inputs and ``u``: every second
    derivative of ``fn`` that the op's double backward computes (reverse over reverse)."""
    def inner(*args):
        _, vjp = torch.func.vjp(fn, *args[:-1])
        return sum((a * v).sum() for a, v in zip(vjp(args[-1]), vs))
    return torch.func.grad(inner, argnums=tuple(range(len(inputs) + 1)))(*inputs, u)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape, affine", [((7, 3), True), ((5, 3, 4), False), ((4, 3, 5, 2), True)])
def test_batch_norm_backward_as_ops_matches_the_kernel(train, shape, affine):
    """Traced with :func:`batch_norm_backward_as_ops`, batch norm has the C++ kernels' values, first derivatives
    and every second derivative (the Python dispatcher, which tracers enable, is enabled here eagerly)."""
    from torch._dispatch.python import enable_python_dispatcher

    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    w, b, mean = (torch.randn(shape[1], generator=g, dtype=torch.float64) for _ in range(3))
    var = torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5

    def fn(x, w, b):
        return torch.nn.functional.batch_norm(x, mean.clone(), var.clone(), w if affine else None,
                                              b if affine else None, training=train, eps=1e-3)

    inputs = (x, w, b)
    u = torch.randn(shape, generator=g, dtype=torch.float64)
    vs = tuple(torch.randn(t.shape, generator=g, dtype=torch.float64) for t in inputs)
    expected = derivatives(fn, inputs, (0, 1, 2)), second_derivatives(fn, inputs, u, vs)
    with enable_python_dispatcher(), batch_norm_backward_as_ops():
        got = derivatives(fn, inputs, (0, 1, 2)), second_derivatives(fn, inputs, u, vs)
    for got_part, expected_part in zip(got, expected):
        for r, e in zip(got_part, expected_part, strict=True):
            torch.testing.assert_close(r, e)
    assert torch._C.DispatchKey.Autograd not in aten.native_batch_norm_backward.default.py_kernels


def batch_norm_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def traced_batch_norm_backward(monkeypatch) -> list:
    """A list that gets an entry each time :func:`curvgraph.runtime.batch_norm_backward` is traced or run."""
    import curvgraph.runtime as runtime

    calls: list = []
    original = runtime.batch_norm_backward
    monkeypatch.setattr(runtime, "batch_norm_backward", lambda *args: calls.append(1) or original(*args))
    return calls


def test_batch_norm_default_mode_compiles_one_graph_for_every_other_batch_size(monkeypatch):
    """Batch norm's double backward in torch 2.13 fixes the batch size: the first graph keeps it fixed (and fast),
    one more graph, with batch norm's backward traced as ops, serves every other size."""
    from torch._dynamo.utils import counters

    traced = traced_batch_norm_backward(monkeypatch)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)
    opt = curvgraph.compile(batch_norm_net(), x, backend="aot_eager", seed=0, progress=False)
    assert "output_jvps(" in opt.source
    opt.step(x, y)
    assert not traced
    graphs = counters["stats"]["unique_graphs"]
    for n in (7, 9, 12, 5, 11):
        assert torch.isfinite(opt.step(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)))
    assert counters["stats"]["unique_graphs"] == graphs + 1
    assert traced
    assert opt.skipped_steps == 0


def test_batch_norm_fixed_mode_keeps_torch_s_backward_for_other_batch_sizes(monkeypatch):
    """A fixed step size takes the backward once, and torch's batch-norm backward keeps sizes symbolic: the first
    graph serves every batch size and never traces the slower ops of :func:`batch_norm_backward` (the adaptive step
    traces them in its one graph for other sizes: above)."""
    from torch._dynamo.utils import counters

    traced = traced_batch_norm_backward(monkeypatch)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)
    opt = curvgraph.compile(batch_norm_net(), x, lr=2e-3, backend="aot_eager", seed=0, progress=False)
    opt.step(x, y)
    graphs = counters["stats"]["unique_graphs"]
    for n in (7, 9, 5):
        assert torch.isfinite(opt.step(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)))
    assert counters["stats"]["unique_graphs"] == graphs
    assert not traced


@pytest.mark.parametrize("transposes_backward", [False, True])
def test_the_runner_traces_batch_norm_s_backward_as_ops_only_for_a_step_that_differentiates_it(transposes_backward):
    """The runner registers :func:`batch_norm_backward` for batch norm's backward only while a step that
    differentiates the backward runs on a batch shaped unlike the first: a step that takes the backward once keeps
    torch's kernel (whose sizes are symbolic) in every graph it compiles, e.g. for a CPU convolution's small batch."""
    from curvgraph.runtime import StepRunner

    op, key = aten.native_batch_norm_backward.default, torch._C.DispatchKey.Autograd
    registered = []

    def step(*args):
        registered.append(key in op.py_kernels)
        return torch.zeros(()), torch.tensor(True), torch.zeros(0, dtype=torch.bool)

    runner = StepRunner(step, lambda batch: (batch[0].shape[0], 3), lambda values: (), {}, None, 1, 1,
                        torch.device("cpu"), torch.float32, 0, ((0,),), transposes_backward=transposes_backward)
    for n in (12, 12, 7, 12, 5):
        runner.run((), (), (), (), (torch.zeros(n, 6),), torch.zeros(n, dtype=torch.long), lambda first: {})
    assert registered == [False, False, transposes_backward, False, transposes_backward]
    assert key not in op.py_kernels


def test_the_recompile_limit_is_a_curvgraph_error_and_changes_nothing():
    """Past Dynamo's recompile limit the step says what needs new graphs and what to do, and the model is intact."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)
    model = batch_norm_net()
    opt = curvgraph.compile(model, x, backend="aot_eager", seed=0, progress=False)
    with torch._dynamo.config.patch(recompile_limit=1):
        opt.step(x, y)
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(RuntimeError, match=r"curvgraph: the step was compiled 1 times.*\[\(7, 6\)\].*drop_last"):
            opt.step(x[:7], y[:7])
    for p, saved in zip(model.parameters(), before):
        assert torch.equal(p, saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_hardsigmoid_composite_form(dtype):
    """The kernel's values bit for bit (half inputs computed in float32, as by the kernel) and its derivative; and a
    derivative of that derivative, which ``aten.hardsigmoid_backward`` lacks in torch 2.13: the transposed backward
    ``u -> J^T u`` differentiated gives ``J v``, here ``v / 6`` where ``-3 < x < 3`` and 0 elsewhere."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(200, generator=g) * 4, torch.tensor([-3.0, 3.0, 0.0])]).to(dtype)
    original, new = rewritten(lambda x: aten.hardsigmoid.default(x), (x,), composite_forms)
    assert torch.equal(new(x), original(x)) and new(x).dtype == dtype
    u, v = torch.randn(x.shape, generator=g).to(dtype), torch.randn(x.shape, generator=g).to(dtype)
    torch.testing.assert_close(torch.func.vjp(new, x)[1](u), torch.func.vjp(original, x)[1](u))
    _, transposed = torch.func.vjp(lambda u: torch.func.vjp(new, x)[1](u)[0], torch.zeros_like(x))
    inside = (x > -3) & (x < 3)
    torch.testing.assert_close(transposed(v)[0], torch.where(inside, v / 6, torch.zeros_like(v)))
    with pytest.raises(RuntimeError, match="hardsigmoid_backward"):  # what the rewrite is for
        torch.func.vjp(lambda u: torch.func.vjp(original, x)[1](u)[0], torch.zeros_like(x))[1](v)
