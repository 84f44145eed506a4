"""The main job runs end to end: MNIST-1D generated locally, both optimizers, table and PNG."""

from __future__ import annotations

import os
import shutil

from curvgraph.cli import main
from curvgraph.demo import load_mnist1d


def test_mnist1d_is_generated_locally():
    data = load_mnist1d()
    assert data.x_train.shape == (4000, 40) and data.x_test.shape == (1000, 40)
    assert set(data.y_train.unique().tolist()) == set(range(10))
    assert abs(data.x_train.mean().item()) < 1e-4


def test_demo_command_writes_table_and_plot(tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert main(["demo", "--steps", "60", "--backend", "eager", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "curvgraph K-FAC" in printed and "test acc" in printed
    assert all(f"Adam {lr}" in printed for lr in ("0.0003", "0.001", "0.003")) and printed.count("(best)") == 1
    assert "best of 3 learning rates" in printed
    assert out.exists() and os.path.getsize(out) > 10_000
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "curves.html").read_text()  # the graph beside the loss curves
    assert page.count('<tr data-kind="dense"') == 3 and "def step(" in page
    if shutil.which("dot"):
        assert (tmp_path / "curves.svg").read_text().rstrip().endswith("</svg>") and "<svg" in page
