"""The command line: inspect and a bad argument through a real process (``python -m curvgraph``), viz, export
and every bad argument through ``main``: one line on stderr, exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from curvgraph.cli import main

MODEL = '''
import torch
from torch import nn


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 4))


def two_inputs():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(5, 4)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    return Pair()


def not_a_model():
    return 42
'''


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(MODEL)
    return path


def curvgraph_process(*args: str, cwd=None) -> subprocess.CompletedProcess:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "curvgraph", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd)


def test_inspect_prints_the_plan(model_file):
    result = curvgraph_process("inspect", f"{model_file}:mlp", "--input-shape", "32,12", "--loss", "mse",
                               "--option", "damping=0.01")
    assert result.returncode == 0, result.stderr
    assert "curvgraph plan for Sequential: 2 curvature block(s) (costs at N=32)" in result.stdout
    assert "A:13x13 G:8x8" in result.stdout and "A:9x9 G:4x4" in result.stdout


def test_viz_and_export_write_their_files(model_file, tmp_path, capsys):
    assert main(["viz", f"{model_file}:mlp", "--input-shape", "32,12", "-o", str(tmp_path / "g.dot")]) == 0
    dot = (tmp_path / "g.dot").read_text()
    assert dot.count('subgraph "cluster_') == 2 and "dense 12 -> 8 + bias" in dot

    step = tmp_path / "out" / "cli_step.py"
    assert main(["export", f"{model_file}:mlp", "--input-shape", "32,12", "-o", str(step), "--backend", "eager",
                 "--loss", "mse"]) == 0
    assert f"wrote {step}" in capsys.readouterr().out
    source = step.read_text()
    assert "# method: kfac(lr='auto', momentum='auto'), fisher=mc, loss=mse" in source and "BACKEND = 'eager'" in source
    compile(source, str(step), "exec")


def test_missing_factory_exits_2_with_one_line(model_file):
    result = curvgraph_process("inspect", f"{model_file}:cnn", "--input-shape", "32,12")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == f"curvgraph: '{model_file}' has no function 'cnn' (it defines: mlp, not_a_model, two_inputs)."


@pytest.mark.parametrize("args, message", [
    (["missing.py:mlp", "--input-shape", "32,12"], "no such file: 'missing.py'"),
    (["{file}", "--input-shape", "32,12"], "give the model as FILE.py:FACTORY"),
    (["{file}:mlp", "--input-shape", "32,x"], "bad --input-shape '32,x'"),
    (["{file}:mlp", "--input-shape", "0,12"], "bad --input-shape '0,12'"),
    (["{file}:not_a_model", "--input-shape", "32,12"], "returned int, not an nn.Module"),
    (["{file}:mlp", "--input-shape", "32,12", "--option", "dampin=1"], "unknown option(s) ['dampin']"),
    (["{file}:mlp", "--input-shape", "32,5"], "Sequential failed on the inputs it was captured from"),
])
def test_bad_arguments_exit_2_with_one_line(model_file, capsys, args, message):
    assert main(["inspect", *(a.format(file=model_file) for a in args)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err and captured.err.count("\n") == 1


def test_several_inputs(model_file, capsys):
    assert main(["inspect", f"{model_file}:two_inputs", "--input-shape", "8,3", "--input-shape", "8,5"]) == 0
    assert "2 curvature block(s)" in capsys.readouterr().out
