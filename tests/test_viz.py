"""curvgraph.visualize: DOT structure, SVG, the HTML page in a real browser, GraphML/JSON through networkx."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import networkx as nx
import pytest
import torch
from torch import nn

import curvgraph
from curvgraph import registry, viz
from extending import Scale

needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="Graphviz's dot is not installed here (.ci/run installs it: apt-get install graphviz)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None or shutil.which("dot") is None,
                                    reason="chromium and dot are not installed here (.ci/run installs both)")


class Net(nn.Module):
    """Every drawn group: conv, norm, dense blocks, a fallback parameter and an unused one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, groups=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 16, 5)
        self.head = nn.Linear(5, 3)
        self.gain = nn.Parameter(torch.ones(()))
        self.unused = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.head(torch.tanh(self.fc(h))) / self.gain  # a first-order fallback (a scale is a norm block)


@pytest.fixture(scope="module")
def opt():
    torch.manual_seed(0)
    return curvgraph.compile(Net(), (torch.randn(8, 3, 6, 6),), backend="eager")


def parse_dot(text: str) -> dict[str, dict]:
    """Clusters of our DOT text: id -> {label, color, nodes}; plus '' -> nodes outside clusters."""
    found, current = {"": {"nodes": []}}, ""
    for line in text.splitlines():
        if m := re.match(r'\s*subgraph "(cluster_\w+)" \{', line):
            current = m.group(1)
            found[current] = {"nodes": []}
        elif m := re.match(r'\s*graph \[label="((?:[^"\\]|\\.)*)", .*fillcolor="([^"]+)"', line):
            found[current].update(label=m.group(1).replace("\\n", "\n"), color=m.group(2))
        elif m := re.match(r'\s*"(\w+)" \[label="((?:[^"\\]|\\.)*)"', line):
            found[current]["nodes"].append((m.group(1), m.group(2).replace("\\n", "\n")))
        elif line.strip() == "}":
            current = ""
    return found


def test_dot_has_one_cluster_per_block_with_kind_colour_and_cost_labels(opt):
    plan = opt.plan
    clusters = parse_dot(viz.to_dot(plan))
    blocks = {k: v for k, v in clusters.items() if k.startswith("cluster_") and "fallback" not in k}
    assert len(blocks) == len(plan.blocks) == 4
    for block, (cid, c) in zip(plan.blocks, blocks.items()):
        kind = plan.kinds[block.kind]
        assert kind is registry.KINDS[block.kind]
        assert c["label"].startswith(f"{block.name}: {kind.label(block)}") and c["color"] == kind.color
        for name, factor in block.factors.items():
            assert f"{name} {'x'.join(map(str, factor.shape))}" in c["label"]
        assert "FLOPs/step" in c["label"] and "state " in c["label"]
        names = [n for n, _ in c["nodes"]]
        assert set(block.placeholders) <= set(names)  # its parameters
        assert {n for u in block.uses for n in u.outputs} <= set(names)  # and its layer ops
    labels = {b.name: blocks[f"cluster_{i}"]["label"] for i, b in enumerate(plan.blocks)}
    assert labels["conv"].startswith("conv: conv 3 -> 4, kernel 3x3 + bias\nfactors A 28x28, G 4x4")
    assert labels["fc"].startswith("fc: dense 64 -> 5 + bias\nfactors A 65x65, G 5x5")
    assert labels["bn"].startswith("bn: norm affine, 4 channels (scale, shift)\nfactors F 4x2x2")
    assert len({c["color"] for c in blocks.values()}) == 3  # conv, norm, dense

    fallback = [c for k, c in clusters.items() if "fallback" in k]
    assert [c["label"].split("\n")[0] for c in fallback] == ["first-order fallback: gain", "first-order fallback: unused"]
    assert "not used by the forward pass" in fallback[1]["label"]
    nodes = dict(n for c in clusters.values() for n in c["nodes"])
    assert nodes["p_fc_weight"] == "param fc.weight\n(5, 64)" and nodes["linear"] == "linear\n(N, 5)"
    assert nodes["x"] == "input x\n(N, 3, x_2, x_3)"
    assert not any(label.startswith("sym_size") for label in nodes.values())
    assert viz.to_dot(plan) == viz.to_dot(plan)


def test_a_kind_draws_itself(opt):
    class Tinted(Scale):
        color = "#123456"

        def label(self, block):
            return f"elementwise scale of {block.dims}"

    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    model.s = nn.Parameter(torch.ones(4))
    model.forward = lambda x: model[1](model[0](x)) * model.s
    for kind, color, label in ((Scale(), "#d9d9d9", "s: scale features=4\n"), (Tinted(), "#123456", "s: elementwise scale of")):
        curvgraph.register_block_kind(kind, before="norm")  # ahead of the built-in that takes scales too
        try:
            plan = curvgraph.compile(model, (torch.randn(3, 4),), loss="mse", backend="eager").plan
        finally:
            curvgraph.unregister_block_kind("scale")
        (scale,) = [c for c in parse_dot(viz.to_dot(plan)).values() if c.get("label", "").startswith("s:")]
        assert scale["color"] == color and scale["label"].startswith(label) and "F 4(diag)" in scale["label"]


@needs_dot
def test_svg_is_rendered_by_graphviz(opt, tmp_path):
    svg = open(curvgraph.visualize(opt, tmp_path / "g.svg")).read()
    assert svg.lstrip().startswith("<?xml") and "</svg>" in svg
    assert len(re.findall(r'<g id="clust\d+" class="cluster">', svg)) == len(opt.plan.blocks) + 2
    assert "conv: conv 3 -> 4, kernel 3x3 + bias" in html.unescape(svg)


def test_missing_dot_says_how_to_get_it(opt, tmp_path, monkeypatch):
    monkeypatch.setattr(viz.shutil, "which", lambda name: None)
    with pytest.raises(curvgraph.ConfigError, match="apt-get install graphviz"):
        curvgraph.visualize(opt, tmp_path / "g.svg")
    page = open(curvgraph.visualize(opt, tmp_path / "g.html")).read()  # the page still works, with a note
    assert "apt-get install graphviz" in page and page.count("<tr data-kind") == 6


def run_chromium(url: str) -> tuple[str, list[str]]:
    """The DOM after load and the console messages of a headless chromium."""
    result = subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr",
                             "--v=0", "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, [line for line in result.stderr.splitlines() if ":CONSOLE" in line]


@needs_chromium
def test_html_page_in_a_real_browser(opt, tmp_path):
    page = curvgraph.visualize(opt, tmp_path / "plan.html")
    text = open(page).read()
    assert not re.search(r'(src|href)="(https?:)?//', text)  # self-contained
    dom, console = run_chromium(f"file://{page}#sort=flops-desc")
    assert console == []
    assert 'data-ready="yes"' in dom  # the page's script ran to its end
    rows = re.findall(r'<tr data-kind="(\w+)" data-block="([\w.]+)"', dom)
    plan = opt.plan
    assert sorted(b for k, b in rows if k != "fallback") == sorted(b.name for b in plan.blocks)
    assert [b for k, b in rows if k == "fallback"] == list(plan.fallback_params)
    flops = [plan.block_step_flops(plan.block(b)) for k, b in rows if k != "fallback"]
    assert flops == sorted(flops, reverse=True)  # sorted in the browser by the address's #sort=flops-desc
    assert "<svg" in dom and "def step(params" in dom

    (tmp_path / "broken.html").write_text("<html><body><script>undefinedFunction();</script></body></html>")
    _, console = run_chromium(f"file://{tmp_path / 'broken.html'}")  # the console check sees errors
    assert any("Uncaught ReferenceError" in line for line in console)


def test_graphml_and_json_round_trip_through_networkx(opt, tmp_path):
    graph = viz.to_networkx(opt.plan)
    assert graph.nodes["linear"]["kind"] == "dense" and graph.nodes["linear"]["block"] == "fc"
    assert graph.nodes["p_gain"]["kind"] == "fallback" and graph.has_edge("x", "conv2d")
    read = nx.read_graphml(curvgraph.visualize(opt, tmp_path / "g.graphml"))
    assert dict(read.nodes(data=True)) == dict(graph.nodes(data=True)) and set(read.edges) == set(graph.edges)
    assert {k: read.graph[k] for k in graph.graph} == graph.graph == {"model": "Net", "blocks_count": 4, "fallback_count": 2}
    with open(curvgraph.visualize(opt.plan, tmp_path / "g.json")) as f:
        data = json.load(f)
    loaded = nx.node_link_graph(data, edges="edges")
    assert set(loaded.edges) == set(graph.edges) and dict(loaded.nodes(data=True)) == dict(graph.nodes(data=True))
    blocks = loaded.graph["blocks"]
    assert [b["name"] for b in blocks] == [b.name for b in opt.plan.blocks] + ["gain", "unused"]
    assert blocks[0]["factors"] == "A 28x28, G 4x4" and blocks[0]["flops_per_step"] > 0


def test_visualize_errors(opt, tmp_path):
    with pytest.raises(curvgraph.ConfigError, match=r"\.dot, \.svg, \.html"):
        curvgraph.visualize(opt, tmp_path / "g.png")
    with pytest.raises(curvgraph.ConfigError, match="CurvatureOptimizer or a Plan"):
        curvgraph.visualize(object(), tmp_path / "g.dot")
