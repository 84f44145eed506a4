"""Ahead-of-time step modules: opt.export(path) runs with torch alone and steps exactly like the optimizer."""

from __future__ import annotations

import ast
import copy
import hashlib
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import curvgraph
from helpers import assert_export_resumes

# A model with every kind of tensor the export must carry: dense and norm blocks, a
# fallback parameter (Adam state), BatchNorm buffers, a small and a large lifted constant;
# and a layer used twice, whose factors are sums over its uses (the custom op
# curvgraph::add_gram_, which the module registers itself).
MODEL_SOURCE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.mix = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 3)
        self.gain = nn.Parameter(torch.ones(()))
        self.offsets = torch.linspace(-1, 1, 8 * 20).reshape(8, 20)  # lifted constant, 160 entries
        self.clip = torch.tensor([2.5, float("inf")])  # lifted constant, inline

    def forward(self, x):
        h = torch.tanh(self.bn(self.fc1(x)) + 1e-2 * self.offsets.sum(1))
        h = torch.minimum(h * self.clip[0], self.clip[1])
        h = self.mix(torch.tanh(self.mix(h)))
        return self.fc2(h) / self.gain  # a first-order fallback (a scale would be a norm block)


def make():
    torch.manual_seed(0)
    return Net()


def batches(steps=20, n=16):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)) for _ in range(steps)]
'''

OPTIONS = dict(backend="eager", seed=3, factor_every=2, invert_every=3)


@pytest.fixture
def netmod(tmp_path, monkeypatch):
    (tmp_path / "netdef.py").write_text(MODEL_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import netdef

    importlib.reload(netdef)
    return netdef


def compiled(netmod, **options):
    model = netmod.make()
    x, _ = netmod.batches(1)[0]
    return model, curvgraph.compile(model, (x,), loss="cross_entropy", method="kfac", **{**OPTIONS, **options})


def test_export_runs_without_curvgraph_and_matches_the_optimizer_bitwise(netmod, tmp_path):
    model, opt = compiled(netmod)
    opt.export(tmp_path / "aot_step.py")
    assert (tmp_path / "aot_step.pt").exists()  # the large constant lives beside the module
    losses = [opt.step(x, y) for x, y in netmod.batches()]
    torch.save({"losses": torch.stack(losses), "model": model.state_dict()}, tmp_path / "reference.pt")

    script = textwrap.dedent(f'''
        import sys
        sys.modules["curvgraph"] = None  # importing curvgraph now fails
        sys.path.insert(0, {str(tmp_path)!r})
        import copy, torch, netdef, aot_step
        model = netdef.make()
        trainer = aot_step.load(model)
        data = netdef.batches()
        losses = [trainer.step(x, y) for x, y in data[:10]]
        checkpoint, halfway = trainer.state_dict(), copy.deepcopy(model)
        losses += [trainer.step(x, y) for x, y in data[10:]]
        resumed = aot_step.load(halfway)
        resumed.load_state_dict(checkpoint)
        for x, y in data[10:]:
            resumed.step(x, y)
        same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), halfway.state_dict().values()))
        torch.save({{"losses": torch.stack(losses), "model": model.state_dict(), "resumed": same}},
                   {str(tmp_path / "exported.pt")!r})
    ''')
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    ours, theirs = torch.load(tmp_path / "reference.pt"), torch.load(tmp_path / "exported.pt")
    assert torch.equal(ours["losses"], theirs["losses"])
    for name, tensor in ours["model"].items():
        assert torch.equal(tensor, theirs["model"][name]), name
    assert not torch.equal(ours["model"]["fc1.weight"], netmod.make().fc1.weight.detach())  # it trained
    assert theirs["resumed"]


def test_optimizer_checkpoint_continues_in_the_exported_module(netmod, tmp_path):
    model, opt = compiled(netmod)
    data = netmod.batches(10)
    for x, y in data[:5]:
        opt.step(x, y)
    trainer = assert_export_resumes(opt, model, data[5:], tmp_path / "resume_step.py")
    other = curvgraph.compile(netmod.make(), (data[0][0],), method="kfac", **{**OPTIONS, "fallback": "sgd"})
    with pytest.raises(ValueError, match="does not match"):
        trainer.load_state_dict(other.state_dict())


def test_export_is_byte_identical_and_hashed(netmod, tmp_path):
    paths = []
    for run in ("a", "b"):
        _, opt = compiled(netmod)
        paths.append(opt.export(tmp_path / run / "step.py"))
    text = open(paths[0], "rb").read()
    assert text == open(paths[1], "rb").read()
    stored = open(tmp_path / "a" / "step.pt", "rb").read()
    assert stored == open(tmp_path / "b" / "step.pt", "rb").read()

    header, body = text.decode().split("\n\n", 1)
    digest = re.search(r"content hash: sha256 ([0-9a-f]{64})", header).group(1)
    assert hashlib.sha256(body.encode() + stored).hexdigest() == digest
    for needed in ("model: Net", "inputs: x (*, 6) float32", "method: kfac", "fisher=mc", "factor_every=2",
                   "damping=0.001", "fc1", "bn", "first-order fallback"):
        assert needed in header, needed

    _, other = compiled(netmod, damping=0.01)  # other options, another file
    assert open(other.export(tmp_path / "c" / "step.py"), "rb").read() != text


def test_exported_module_is_readable_and_imports_only_torch(netmod, tmp_path):
    _, opt = compiled(netmod)
    source = open(opt.export(tmp_path / "step.py")).read()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "contextlib", "functools", "itertools", "logging", "math", "operator", "os", "threading", "warnings",
                        "torch"}, imported
    for block in opt.plan.blocks:  # a comment at each block
        assert f"# {block.name}: {block.kind} block of {', '.join(block.params)}" in source
    assert "torch.tensor([2.5, float('inf')], dtype=torch.float32),  # c_clip" in source
    assert max(len(line) for line in source.splitlines()) < 400


def test_export_errors(netmod, tmp_path):
    _, opt = compiled(netmod)
    with pytest.raises(curvgraph.ConfigError, match=r"ending in \.py"):
        opt.export(tmp_path / "step.txt")
    with pytest.raises(curvgraph.ConfigError, match="identifier"):
        opt.export(tmp_path / "my-step.py")
    with pytest.raises(curvgraph.ConfigError, match="no exported step module"):
        curvgraph.load_step(tmp_path / "missing.py", netmod.make())


def test_exported_step_checks_its_model_inputs_and_targets_as_the_optimizer_does(netmod, tmp_path):
    model, opt = compiled(netmod)
    opt.export(tmp_path / "checked_step.py")
    x, y = netmod.batches(1)[0]
    wider = torch.nn.Sequential(torch.nn.Linear(6, 8))
    with pytest.raises(ValueError, match=r"another model \(Sequential has no parameter \[.gain., .fc1.weight."):
        curvgraph.load_step(tmp_path / "checked_step.py", wider)
    other = netmod.make()
    other.fc2 = torch.nn.Linear(8, 5)
    with pytest.raises(ValueError, match=r"has 'fc2.weight' \(5, 8\), exported for \(3, 8\)"):
        curvgraph.load_step(tmp_path / "checked_step.py", other)
    trainer = curvgraph.load_step(tmp_path / "checked_step.py", model)
    before = copy.deepcopy(model.state_dict())
    bad = [((x[:, :5], y), r"input 'x' has shape \(16, 5\)"), ((x.double(), y), "dtype torch.float64"),
           ((x, y[:8]), r"bad targets: cross_entropy needs targets of shape \(16,\)"),
           ((x, y.float()), "needs class indices"), ((x, y + 3), "class index [3-5] is out of range for 3 classes")]
    for (inputs, targets), message in bad:
        with pytest.raises(ValueError, match=message):
            trainer.step(inputs, targets)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.warns(RuntimeWarning, match="every target is -100"):
        trainer.step(x, torch.full_like(y, -100))
    trainer.step(x.t().contiguous().t(), y)  # another layout of the same batch: fine


def test_compiled_export_matches_the_compiled_optimizer(tmp_path):
    """The one compiled test here: both steps through torch.compile (inductor), within 1e-6 (one schedule
    variant, statistics and refresh every step, to compile once each; the schedule is tested above)."""
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))

    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]
    model, twin = make(), make()
    opt = curvgraph.compile(model, (data[0][0],), lr=0.002, seed=0, factor_every=1, invert_every=1)
    trainer = curvgraph.load_step(opt.export(tmp_path / "compiled_step.py"), twin)
    assert opt.backend == "inductor" and "BACKEND = 'inductor'" in open(tmp_path / "compiled_step.py").read()
    for x, y in data:
        torch.testing.assert_close(opt.step(x, y), trainer.step(x, y), atol=1e-6, rtol=0)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_exported_module_registers_the_custom_op_only_where_it_is_missing(netmod, tmp_path):
    """A module run where curvgraph already registered ``curvgraph::add_gram_`` keeps that registration
    (registering again would replace the op under steps compiled against it; torch refuses a second
    definition or kernel, so the module runs only if it registers nothing); the subprocess test above runs
    one where it is missing."""
    _, opt = compiled(netmod)
    assert any(b.name == "mix" and len(b.uses) == 2 for b in opt.plan.blocks)
    assert "registered('curvgraph::add_gram_'" in opt.source
    before = torch._C._dispatch_dump("curvgraph::add_gram_")
    with pytest.raises(RuntimeError):  # what a second registration meets
        torch.library.define("curvgraph::add_gram_", "(Tensor(a!) gram, Tensor rows) -> ()")
    for _ in range(2):
        exec(compile(opt.source, "generated", "exec"), {})
    assert torch._C._dispatch_dump("curvgraph::add_gram_") == before
    gram = torch.zeros(1, 2, 2)
    torch.ops.curvgraph.add_gram_(gram, torch.ones(3, 1, 2))
    assert torch.equal(gram, torch.full((1, 2, 2), 3.0))
