"""The torch.compile'd step: one graph with statistics and one without (the refresh one opaque call in each),
identical to the eager step."""

from __future__ import annotations

import ast
import copy

import pytest
import torch
from torch import nn

import curvgraph

SCHEDULE = dict(factor_every=2, invert_every=3)  # steps 0..6 use all four (stats, refresh) variants
FIXED = dict(lr=0.002, weight_decay=1e-3, **SCHEDULE)  # the fixed-step mode


def make_model() -> nn.Module:
    """Every block kind: conv, norm (BatchNorm with running statistics, LayerNorm), dense. The first dense layer
    is wider than the batch: K-FAC preconditions its gradient from the rows (adaptive runs, no weight decay) or
    as a matrix (fixed runs, with weight decay), the two values of a switch the step is specialized on."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.BatchNorm1d(4), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 6, 32), nn.LayerNorm(32), nn.Linear(32, 4))


def data():
    g = torch.Generator().manual_seed(1)
    sizes = [10] * 7 + [5]  # a smaller last batch: the batch size is symbolic
    return [(torch.randn(n, 2, 6, generator=g), torch.randint(0, 4, (n,), generator=g)) for n in sizes]


def train_both(**options):
    """The same training run with the compiled and the eager step."""
    results = {}
    for backend in ("inductor", "eager"):
        model = make_model()
        shadow = copy.deepcopy(model[1])  # plain PyTorch BatchNorm fed the same layer inputs
        opt = curvgraph.compile(model, (torch.randn(10, 2, 6),), seed=0, backend=backend, **options)
        losses = []
        for x, y in data():
            with torch.no_grad():
                shadow(model[0](x))
            losses.append(opt.step(x, y).item())
        results[backend] = (model, opt, losses, shadow)
    return results


@pytest.fixture(scope="module")
def runs():
    """The fixed-step mode over all four schedule variants (compiled once for the module)."""
    return train_both(**FIXED)


@pytest.fixture(scope="module")
def adaptive_runs():
    """The default (adaptive) mode in float64: its large early steps amplify float32 rounding, which
    would hide a real difference between the compiled and the eager step behind the tolerance."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return train_both()
    finally:
        torch.set_default_dtype(previous)


def test_plan_has_every_block_kind(runs):
    _, opt, _, _ = runs["inductor"]
    assert [b.kind for b in opt.plan.blocks] == ["conv", "norm", "dense", "norm", "dense"]
    assert [opt.method.from_rows(b) for b in opt.plan.blocks] == [False, False, True, False, False]


@pytest.mark.parametrize("fixture", ("runs", "adaptive_runs"))
def test_compiled_step_matches_eager(request, fixture):
    results = request.getfixturevalue(fixture)
    compiled_model, compiled, compiled_losses, _ = results["inductor"]
    eager_model, eager, eager_losses, _ = results["eager"]
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    for (name, a), b in zip(compiled_model.state_dict().items(), eager_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    for block, factors in compiled.factors().items():
        for f, value in factors.items():
            torch.testing.assert_close(value, eager.factors()[block][f], rtol=1e-4, atol=1e-6)
    stats, eager_stats = compiled.stats(), eager.stats()
    assert stats.keys() == eager_stats.keys()
    assert stats == pytest.approx(eager_stats, rel=1e-4, abs=1e-4)  # the adaptive step's damping, rejections, alpha, ...
    assert (stats["steps"], len(stats) > 2) == (len(data()), fixture == "adaptive_runs")


def test_weight_decay_switch_compiles_each_branch_once(float64):
    """Changing ``weight_decay`` between zero and non-zero mid-run takes the compiled step to the other branch
    (rows or matrix products) as the eager step does, compiling it once: returning to zero reuses the first graph."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 3))
    x, y = torch.randn(8, 24), torch.randint(0, 3, (8,))
    models, opts = {}, {}
    for backend in ("inductor", "eager"):
        models[backend] = copy.deepcopy(model)
        opts[backend] = curvgraph.compile(models[backend], (x,), lr=0.05, kl_clip=None, factor_every=1,
                                          invert_every=1, seed=0, backend=backend, progress=False)
    assert opts["inductor"].method.from_rows(opts["inductor"].plan.blocks[0])
    graphs = counters["stats"]["unique_graphs"]
    for weight_decay in (0.0, 0.1, 0.0, 0.1):
        for opt in opts.values():
            opt.param_groups[0]["weight_decay"] = weight_decay
            for _ in range(2):
                opt.step(x, y)
        for a, b in zip(models["inductor"].parameters(), models["eager"].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert counters["stats"]["unique_graphs"] == graphs + 2


def test_batches_sliced_from_one_tensor_compile_once():
    """Batches sliced out of one tensor start at different storage offsets (0 for the first slice of an epoch,
    which comes last here, after a step compiled at another offset); the step is compiled once for all of them."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    opt = curvgraph.compile(model, (x[:8],), factor_every=1, seed=0, progress=False)
    graphs = counters["stats"]["unique_graphs"]
    for start in (8, 16, 24, 32, 0):
        opt.step(x[start:start + 8], y[start:start + 8])
    assert counters["stats"]["unique_graphs"] == graphs + 1


@pytest.mark.parametrize("backend", ("inductor", "eager"))
def test_batchnorm_running_statistics_follow_pytorch(runs, backend):
    model, _, _, shadow = runs[backend]
    assert model[1].num_batches_tracked.item() == shadow.num_batches_tracked.item() == len(data())
    torch.testing.assert_close(model[1].running_mean, shadow.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, shadow.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fixture", ("runs", "adaptive_runs"))
def test_generated_source_needs_torch_alone(request, fixture):
    _, opt, _, _ = request.getfixturevalue(fixture)["inductor"]
    tree = ast.parse(opt.source)
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"torch", "itertools", "math", "operator", "__future__"}  # torch and the standard library
    namespace: dict = {}
    exec(compile(opt.source, "generated", "exec"), namespace)
    assert callable(namespace["step"]) and callable(namespace["forward"])


def test_a_new_batch_size_compiles_nothing(runs):
    """Batch sizes are marked dynamic up front: after the schedule's variants are compiled, batches of sizes
    never seen run the same graphs. (Runs last: it steps the shared optimizer on.)"""
    from torch._dynamo.utils import counters

    model, opt, _, _ = runs["inductor"]
    before = counters["stats"]["unique_graphs"]
    g = torch.Generator().manual_seed(2)
    for n in (7, 13, 3):  # steps 8, 9, 10: with statistics, without (and a refresh), with
        opt.step(torch.randn(n, 2, 6, generator=g), torch.randint(0, 4, (n,), generator=g))
    assert counters["stats"]["unique_graphs"] == before
    assert opt.skipped_steps == 0


def test_the_refresh_is_one_opaque_call_not_a_graph():
    """All four (statistics, refresh) combinations of a schedule compile two graphs, not four; in each, the refresh
    is one call of its custom op (run eagerly): AOT autograd's graphs hold none of its factorizations, and the
    refreshes still happen (the inverses change at refresh steps only)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.registry import register_backend
    from torch._dynamo.utils import counters

    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, _):
        graphs.append(gm)
        return gm.forward

    name = f"curvgraph_graph_record_{id(record):x}"
    register_backend(name=name)(lambda gm, inputs: aot_autograd(fw_compiler=record)(gm, inputs))
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = curvgraph.compile(model, (torch.randn(5, 3),), backend=name, progress=False, **FIXED)
    before = counters["stats"]["unique_graphs"]
    schedule, changed = [], []
    for _ in range(7):
        schedule.append(opt._runner.schedule())
        inverse = opt._state["0.A_inv"].clone()
        opt.step(torch.randn(5, 3), torch.randint(0, 2, (5,)))
        changed.append(not torch.equal(inverse, opt._state["0.A_inv"]))
    assert set(schedule) == {(True, True), (True, False), (False, True), (False, False)}
    assert changed == [refresh for _, refresh in schedule]
    assert counters["stats"]["unique_graphs"] - before == 2 and len(graphs) == 2
    for gm in graphs:
        ops = [str(n.args[0] if "auto_functionalized" in str(n.target) else n.target)  # a mutating op, functionalized
               for n in gm.graph.nodes if n.op == "call_function"]
        assert sum("curvgraph.refresh_" in op for op in ops) == 1, ops
        assert not [op for op in ops if "cholesky" in op]
    assert opt.skipped_steps == 0


def test_compiling_a_variant_is_announced_once(capsys):
    """The first step of each schedule variant says on stderr that it compiles, and how long it took."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = curvgraph.compile(model, (torch.randn(5, 3),), backend="aot_eager", lr=0.01, invert_every=1)
    opt.step(torch.randn(5, 3), torch.randint(0, 2, (5,)))
    err = capsys.readouterr().err
    assert ("curvgraph: compiling the step for Sequential in train mode (statistics in every step, the refresh "
            "one call in the graph)") in err
    assert "compiled and ran in" in err
    opt.step(torch.randn(6, 3), torch.randint(0, 2, (6,)))
    assert "compiling" not in capsys.readouterr().err
    skipping = curvgraph.compile(model, (torch.randn(5, 3),), backend="aot_eager", lr=0.01, factor_every=2)
    skipping.step(torch.randn(5, 3), torch.randint(0, 2, (5,)))
    assert "(statistics: yes; one graph with statistics and one without" in capsys.readouterr().err
    quiet = curvgraph.compile(model, (torch.randn(5, 3),), backend="aot_eager", progress=False)
    quiet.step(torch.randn(5, 3), torch.randint(0, 2, (5,)))
    assert "compiling" not in capsys.readouterr().err


def test_a_slow_capture_is_announced(capsys, monkeypatch):
    """A capture still running ``CAPTURE_NOTICE_S`` seconds after it started says so on stderr, and then how long it
    took; a quick one, or one with ``progress=False``, says nothing (any backend: the capture is not compiled)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    curvgraph.compile(model, (torch.randn(5, 3),), backend="eager")
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(curvgraph.optimizer, "CAPTURE_NOTICE_S", 0.0)
    curvgraph.compile(model, (torch.randn(5, 3),), backend="eager", progress=False)
    assert capsys.readouterr().err == ""
    curvgraph.compile(model, (torch.randn(5, 3),), backend="eager")
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("curvgraph: capturing Sequential in train mode (torch.export and the block passes) ... ")
    assert "dynamic='batch'" in err[0]  # the option that makes a slow export fast, where it applies
    assert err[1].startswith("curvgraph: captured in ") and len(err) == 2
    curvgraph.compile(model, (torch.randn(5, 3),), backend="eager", dynamic="batch")
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "curvgraph: capturing Sequential in train mode (torch.export and the block passes) ..."


def test_a_second_compile_loads_the_cached_graphs(adaptive_runs):
    """Warm start: compiling the same step again (as a new process would, after ``torch._dynamo.reset()``) loads
    its graph from AOT autograd's cache, which torch 2.13 bypasses for graphs with a ``torch.cond`` or
    ``torch.func.jvp`` unless the step marks them cacheable, and the loaded step trains the same as the compiled
    one. Two graphs, although the default schedule has statistics in every step: the smaller last batch of
    :func:`data` compiles the step again, as the double backward of batch norm (which the curvature products
    differentiate) fixes the batch size of the first graph in torch 2.13; the second one serves every other batch
    size (see test_symbolic_sizes.py)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    before = dict(counters["aot_autograd"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # as adaptive_runs, whose graphs the cache holds
    try:
        model = make_model()
        opt = curvgraph.compile(model, (torch.randn(10, 2, 6),), seed=0, progress=False)
        losses = [opt.step(x, y).item() for x, y in data()]
    finally:
        torch.set_default_dtype(previous)
    hits = counters["aot_autograd"]["autograd_cache_hit"] - before.get("autograd_cache_hit", 0)
    bypasses = counters["aot_autograd"]["autograd_cache_bypass"] - before.get("autograd_cache_bypass", 0)
    assert (hits, bypasses) == (2, 0)
    assert losses == adaptive_runs["inductor"][2]


def test_the_cache_key_holds_the_branches():
    """Marking ``torch.cond`` cacheable is safe: two steps that differ only inside a branch are two cache entries,
    and each computes its own branch."""
    from torch._dynamo.utils import counters

    from curvgraph.runtime import compiled_step

    def doubled(x, refresh, switches):
        return torch.cond(refresh, lambda: x * 2, lambda: x + 1, ())

    def tripled(x, refresh, switches):
        return torch.cond(refresh, lambda: x * 3, lambda: x + 1, ())

    x = torch.arange(4.0)
    for fn, factor in ((doubled, 2), (tripled, 3), (doubled, 2)):
        torch._dynamo.reset()
        hits = counters["aot_autograd"]["autograd_cache_hit"]
        torch.testing.assert_close(compiled_step(fn, "inductor", x.device)(x, True, ()), x * factor, rtol=0, atol=0)
    assert counters["aot_autograd"]["autograd_cache_hit"] == hits + 1  # the second `doubled` is loaded


def cache_refusals(model: nn.Module, inputs: tuple, targets: torch.Tensor, **options) -> list[str]:
    """What torch 2.13's compile caches would refuse in the compiled step of ``model``: the calls AOT autograd's
    cache does not know to be safe (in Dynamo's graph) and the higher-order ops the FX graph cache does not store
    (in AOT autograd's graph, e.g. ``with_effects`` around the error check of ``torch.linalg.cholesky``). Traces
    with Dynamo and AOT autograd only (no Inductor): a backend that checks each graph and runs it as it is."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.registry import register_backend
    from torch._functorch._aot_autograd import autograd_cache

    refusals: list[str] = []

    def nodes(gm: torch.fx.GraphModule):
        return [n for m in gm.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes]

    def after_aot(gm: torch.fx.GraphModule, _):
        refusals.extend(f"FX graph cache: {n.target.name()}" for n in nodes(gm)
                        if isinstance(n.target, torch._ops.HigherOrderOperator) and not n.target.cacheable())
        return gm.forward

    def backend(gm: torch.fx.GraphModule, example_inputs):
        for n in nodes(gm):
            try:
                autograd_cache.check_node_safe(n)
            except autograd_cache.BypassAOTAutogradCache as e:
                refusals.append(f"AOT autograd cache: {e}")
        return aot_autograd(fw_compiler=after_aot)(gm, example_inputs)

    name = f"curvgraph_cache_check_{id(backend):x}"  # a backend is a registered name (curvgraph takes strings)
    register_backend(name=name)(backend)
    opt = curvgraph.compile(model, inputs, backend=name, progress=False, **options)
    opt.step(*inputs, targets)
    return refusals


class TinyTiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(11, 4), nn.Linear(4, 4)

    def forward(self, tokens):
        return torch.tanh(self.fc(self.emb(tokens))) @ self.emb.weight.T


@pytest.mark.parametrize("case", ["kfac", "ekfac", "tied"])
def test_nothing_in_the_step_keeps_it_out_of_the_compile_caches(case):
    """Every warm start loads the step only if neither cache refuses any of its graphs: the adaptive K-FAC step
    (``torch.cond``, ``torch.func.jvp``), EKFAC's eigendecompositions, the tied kind's nearest Kronecker product."""
    torch.manual_seed(0)
    if case == "tied":
        model, inputs, targets = TinyTiedLM(), (torch.randint(0, 11, (3, 5)),), torch.randint(0, 11, (3, 5))
        options = dict(loss="token_cross_entropy")
    else:
        model, inputs, targets = make_model(), (torch.randn(10, 2, 6),), torch.randint(0, 4, (10,))
        options = dict(method=case)
    assert cache_refusals(model, inputs, targets, invert_every=1, **options) == []


def test_the_inductor_backend_wraps_cpu_graphs_in_cpp_built_separately(monkeypatch):
    """``runtime.inductor_backend`` compiles a CPU graph with Inductor's C++ wrapper, built apart from the kernels,
    and without Inductor's layout optimization (the channels-last copies of convolution inputs), and one with inputs
    elsewhere without either, both with curvgraph's post-grad passes after any the user set (``inductor_passes``);
    Inductor's note about ops without a C shim is dropped then, its other records are kept."""
    import logging

    import torch._inductor.compile_fx as compile_fx_module

    from curvgraph.runtime import inductor_backend

    from torch._inductor import codecache

    from curvgraph.inductor_passes import PruneUnusedOutputs, RecomputeForLateReaders
    from curvgraph.runtime import build_objects_side_by_side

    patches, builds = [], []

    def compile_fx(gm, inputs, config_patches):
        patches.append(config_patches)
        builds.append(codecache._worker_compile_cpp)

    monkeypatch.setattr(compile_fx_module, "compile_fx", compile_fx)
    users_pass = object()
    inductors_builds = codecache._worker_compile_cpp
    gm = torch.fx.symbolic_trace(lambda x: torch.cos(torch.sin(x) + 1))
    with torch._inductor.config.patch(post_grad_custom_post_pass=users_pass):  # monkeypatch would delete the key
        for inputs in ((torch.zeros(2),), (torch.zeros(2, device="meta"),)):
            inductor_backend(gm, inputs)
    passes = [p.pop("post_grad_custom_post_pass") for p in patches]
    assert [[p if p is users_pass else type(p) for p in on_device] for on_device in passes] == \
        [[users_pass, PruneUnusedOutputs, RecomputeForLateReaders]] * 2  # on every device
    assert patches == [{"cpp_wrapper": True, "cpp_wrapper_build_separate": True, "layout_optimization": False},
                       {"cpp_wrapper": False, "cpp_wrapper_build_separate": False}]
    assert builds == [build_objects_side_by_side, inductors_builds]  # while the CPU graph compiles, and only then
    assert codecache._worker_compile_cpp is inductors_builds
    log = logging.getLogger("torch._inductor.ir")

    def passes(message):
        record = log.makeRecord(log.name, logging.WARNING, __file__, 0, message, (), None)
        return all(f.filter(record) for f in log.filters)

    assert not passes("%s is missing a c-shim implementation, using proxy executor as fallback")
    assert passes("something else")


def test_a_cpu_step_probes_the_vector_instruction_sets_in_another_thread(monkeypatch):
    """``runtime.compiled_step`` starts Inductor's probe of the CPU's vector instruction sets in a background thread,
    once per process, for an Inductor step on the CPU, and not for the eager backend or a step on another device."""
    import threading

    import torch._inductor.cpu_vec_isa as cpu_vec_isa

    from curvgraph.runtime import compiled_step, probe_vector_isa_in_background

    probed_in = []
    monkeypatch.setattr(cpu_vec_isa, "pick_vec_isa", lambda: probed_in.append(threading.current_thread()))
    probe_vector_isa_in_background.cache_clear()
    try:
        for backend, device in (("eager", "cpu"), ("inductor", "meta")):
            compiled_step(lambda x: x, backend, torch.device(device))
            assert probe_vector_isa_in_background.cache_info().currsize == 0, (backend, device)
        for _ in range(2):
            compiled_step(lambda x: x, "inductor", torch.device("cpu"))
        probe_vector_isa_in_background().join(timeout=60)
        assert len(probed_in) == 1 and probed_in[0] is not threading.main_thread()
    finally:
        probe_vector_isa_in_background.cache_clear()


class _Build:
    """A stand-in for Inductor's ``CppBuilder``: ``build`` sleeps and logs when it started and ended."""

    def __init__(self, name, log, seconds=0.3, exists=False, fails=False):
        self.name, self.log, self.seconds, self.exists, self.fails = name, log, seconds, exists, fails

    def get_target_file_path(self):
        return __file__ if self.exists else f"/nonexistent/{self.name}.o"

    def build(self):
        import time

        self.log.append((self.name, "start", time.perf_counter()))
        time.sleep(self.seconds)
        self.log.append((self.name, "end", time.perf_counter()))
        if self.fails:
            raise RuntimeError(f"{self.name} failed")


def test_the_wrapper_and_the_kernels_are_compiled_side_by_side_and_then_linked(tmp_path):
    """``runtime.build_objects_side_by_side`` runs the first two of three builds (the wrapper's and the kernels'
    object files) at once and the third (the link) after both; other lists in order; a build whose output exists
    is skipped; a failed build is raised and nothing is linked."""
    from curvgraph.runtime import build_objects_side_by_side

    lock = str(tmp_path / "graph.lock")
    log = []
    build_objects_side_by_side(lock, [_Build("wrapper", log), _Build("kernels", log), _Build("link", log, 0.01)])
    when = {(name, edge): t for name, edge, t in log}
    assert when["wrapper", "start"] < when["kernels", "end"] and when["kernels", "start"] < when["wrapper", "end"]
    assert when["link", "start"] >= max(when["wrapper", "end"], when["kernels", "end"])

    log.clear()
    build_objects_side_by_side(lock, [_Build("header", log, 0.05), _Build("other", log, 0.05)])
    assert [(name, edge) for name, edge, _ in log] == [("header", "start"), ("header", "end"), ("other", "start"),
                                                         ("other", "end")]
    log.clear()
    build_objects_side_by_side(lock, [_Build("wrapper", log, exists=True), _Build("kernels", log, 0.01),
                                      _Build("link", log, 0.01)])
    assert [name for name, edge, _ in log if edge == "start"] == ["kernels", "link"]
    for failing in ("wrapper", "kernels"):
        log.clear()
        builds = [_Build(name, log, fails=name == failing) for name in ("wrapper", "kernels")]
        with pytest.raises(RuntimeError, match=f"{failing} failed"):
            build_objects_side_by_side(lock, [*builds, _Build("link", log, 0.01)])
        assert "link" not in {name for name, _, _ in log}


def test_the_compiled_finiteness_check_sees_every_non_finite_value():
    """``all_finite`` and ``not_finite``, compiled and eager, see ``inf``, ``-inf`` and ``nan`` in any one of the
    tensors, and no false alarm on finite values whose sum would overflow."""
    from curvgraph.codegen import all_finite, not_finite

    compiled = torch.compile(lambda a, b: (all_finite(a, b), not_finite(b)), fullgraph=True)
    for bad in (None, float("inf"), -float("inf"), float("nan")):
        for which in (0, 1):
            a, b = torch.randn(7, 5), torch.full((33,), 3e38)
            if bad is not None:
                (a, b)[which][which + 2] = bad
            expected = bad is None
            assert [bool(v) for v in compiled(a, b)] == [expected, which == 1 and not expected]
            assert [bool(v) for v in (all_finite(a, b), not_finite(b))] == [expected, which == 1 and not expected]
