"""Drawings of a compiled model: :func:`visualize` writes DOT, SVG, HTML, GraphML or JSON.

The drawing is the captured (normalized) FX graph, one node per op labelled with the
op and its output shape (symbolic sizes by their readable names, ``N`` the batch), and
every curvature block as a cluster around its parameters and layer ops, filled with
its kind's colour and labelled with its kind's description, its factor shapes, its
optimizer-state memory and its FLOPs per step from the plan's cost model (at the
example sizes); a block that is a member of a group (an attention layer's projections,
:attr:`curvgraph.plan.Plan.groups`) names the group and its roles in it. Parameters no pass matched are drawn as *fallback* clusters with the
reason. Colours and descriptions belong to the block kinds
(:attr:`curvgraph.BlockKind.color`, :meth:`curvgraph.BlockKind.label`), so a kind
registered later draws without changes here.

* ``.dot``: Graphviz source; ``.svg``: rendered by Graphviz's ``dot``, which must be
  on ``PATH`` (Debian/Ubuntu: ``apt-get install graphviz``);
* ``.html``: one self-contained page (no network): the SVG, a sortable table with one
  row per block -- fallback parameters included, kind ``fallback`` -- and the
  generated step's source when an optimizer is given. ``#sort=<column>`` or
  ``#sort=<column>-desc`` in the address sorts the table on load (columns: ``index``,
  ``block``, ``kind``, ``params``, ``factors``, ``memory``, ``flops``, ``pass``, ``reason``);
* ``.graphml`` and ``.json`` (networkx node-link data, links under ``"edges"``):
  the same graph for other tools; nodes carry ``label``, ``op``, ``shape``,
  ``block`` and ``kind`` (``""`` outside blocks); the JSON's graph attributes also
  list the blocks.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sympy
import torch
from torch.fx import Node

from . import registry
from .errors import ConfigError
from .plan import Plan, human
from .trace import TracedModel

if TYPE_CHECKING:
    import networkx

    from .optimizer import CurvatureOptimizer

#: Fill colour of fallback parameters (not a block kind: no pass claimed them).
FALLBACK_COLOR = "#fcbba1"
#: Suffixes :func:`visualize` writes.
FORMATS = (".dot", ".svg", ".html", ".graphml", ".json")

DOT_MISSING = ("curvgraph: rendering {what} needs Graphviz's 'dot' program, which is not on PATH. Install Graphviz "
               "(Debian/Ubuntu: sudo apt-get install graphviz; macOS: brew install graphviz; conda: conda install "
               "graphviz), or write a .dot file and render it elsewhere.")


@dataclass
class Cluster:
    """One drawn group: a curvature block or a fallback parameter."""

    id: str
    name: str
    kind: str
    color: str
    title: str
    nodes: list[str]
    params: tuple[str, ...]
    factors: str
    memory: float | None
    flops: float | None
    found_by: str
    reason: str


def visualize(target: "CurvatureOptimizer | Plan", path: str | os.PathLike) -> str:
    """Draw the compiled model of ``target`` (an optimizer or its plan) to ``path``; returns the path.

    The format follows the suffix: ``.dot``, ``.svg``, ``.html``, ``.graphml`` or
    ``.json`` (see :mod:`curvgraph.viz`). ``.svg`` and ``.html`` need Graphviz's ``dot``.
    """
    plan, source = _plan_and_source(target)
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FORMATS:
        raise ConfigError(f"curvgraph: visualize writes {', '.join(FORMATS)} files; got {path!r}.")
    if suffix == ".dot":
        text = to_dot(plan)
    elif suffix == ".svg":
        text = to_svg(plan)
    elif suffix == ".html":
        text = to_html(plan, source)
    elif suffix == ".graphml":
        import networkx as nx

        text = "\n".join(nx.generate_graphml(to_networkx(plan))) + "\n"
    else:
        import networkx as nx

        graph = to_networkx(plan)
        graph.graph["blocks"] = [_block_record(c) for c in clusters(plan)]
        graph.graph["groups"] = [dataclasses.asdict(g) for g in plan.groups]
        text = json.dumps(nx.node_link_data(graph, edges="edges"), indent=1) + "\n"
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    return path


def _plan_and_source(target: Any) -> tuple[Plan, str | None]:
    if isinstance(target, Plan):
        plan, source = target, None
    elif isinstance(getattr(target, "plan", None), Plan):
        plan, source = target.plan, getattr(target, "source", None)
    else:
        raise ConfigError(f"curvgraph: visualize needs a CurvatureOptimizer or a Plan, got {type(target).__name__}.")
    if plan.traced is None:
        raise ConfigError("curvgraph: this plan has no captured graph (plan.traced is None); visualize the plan that "
                          "curvgraph.compile produced.")
    return plan, source


# ---------------------------------------------------------------------- the graph
def node_label(plan: Plan, node: Node) -> tuple[str, str]:
    """``(op, shape)`` of ``node``: the op (or the model's name of a parameter/input) and its output shape."""
    traced: TracedModel = plan.traced
    if node.op == "placeholder":
        names = {**traced.params, **traced.frozen, **traced.buffers}
        if node.name in names:
            what = "buffer" if node.name in traced.buffers else "frozen" if node.name in traced.frozen else "param"
            op = f"{what} {names[node.name]}"
        elif node.name in traced.constants:
            op = f"constant {node.name}"
        else:
            op = f"input {node.name}"
    elif node.op == "output":
        op = "output"
    elif node.op == "call_function":
        op = _op_name(node.target)
    else:
        op = f"{node.op} {node.target}"
    return op, _shape(plan, node.meta.get("val"))


def _op_name(target: object) -> str:
    name = getattr(target, "__name__", None) or str(target)
    if isinstance(target, torch._ops.OpOverload):
        name = target._schema.name.split("::")[-1]
    return name


def _shape(plan: Plan, value: object) -> str:
    if isinstance(value, torch.Tensor):
        dims = [str(plan.named(d)) if not isinstance(d, int) else str(d) for d in map(_size, value.shape)]
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"
    if isinstance(value, (tuple, list)):
        return " ".join(_shape(plan, v) for v in value if isinstance(v, (torch.Tensor, tuple, list)))
    return ""


def _size(d: int | torch.SymInt) -> int | sympy.Expr:
    if isinstance(d, torch.SymInt):
        expr = d.node.expr
        return int(expr) if expr.is_number else expr
    return int(d)


def drawn_nodes(plan: Plan) -> list[Node]:
    """The graph's nodes except size arithmetic (ops on symbolic sizes, such as ``sym_size``)."""
    def is_size(node: Node) -> bool:
        return node.op == "call_function" and isinstance(node.meta.get("val"), (int, torch.SymInt, torch.SymFloat))

    return [n for n in plan.traced.graph.nodes if not is_size(n)]


def drawn_edges(plan: Plan) -> list[tuple[str, str]]:
    """``(source, target)`` node names of the drawn graph's data flow."""
    drawn = {n.name for n in drawn_nodes(plan)}
    return [(a.name, n.name) for n in drawn_nodes(plan) for a in n.all_input_nodes if a.name in drawn]


def clusters(plan: Plan) -> list[Cluster]:
    """The drawn groups: every block (parameters, weight views, layer ops), then every fallback parameter."""
    traced: TracedModel = plan.traced
    nodes = drawn_nodes(plan)
    owner: dict[str, str] = {}
    result = []
    roles: dict[str, list[str]] = {}  # block -> the groups it is a member of, with its roles
    for group in plan.groups:
        for block_name in dict.fromkeys(b for m in group.members for b in m.blocks):
            members = ", ".join(m.role + (f" {m.part[0] + 1}/{m.part[1]}" if m.part else "")
                                for m in group.members if block_name in m.blocks)
            roles.setdefault(block_name, []).append(f"{group.kind} {group.name}: {members}")
    for i, block in enumerate(plan.blocks):
        derived = set(block.placeholders)  # the parameters and their views (transposes, reshapes)
        for node in nodes:
            if node.op == "call_function" and node.all_input_nodes and all(a.name in derived for a in node.all_input_nodes):
                derived.add(node.name)
        outputs = [n for u in block.uses for n in u.outputs]
        members = [n.name for n in nodes if (n.name in derived or n.name in outputs) and n.name not in owner]
        owner.update({n: block.name for n in members})
        kind = plan.kinds.get(block.kind) or registry.KINDS.get(block.kind)
        description = kind.label(block) if kind is not None else block.kind
        factors = ", ".join(f"{k} {f.label}" for k, f in block.factors.items())
        memory, flops = plan.block_state_bytes(block), plan.block_step_flops(block)
        title = "\n".join([f"{block.name}: {description}", *roles.get(block.name, []), f"factors {factors}",
                           f"state {human(memory, 'B')}, {human(flops, '')}FLOPs/step"])
        result.append(Cluster(f"cluster_{i}", block.name, block.kind, kind.color if kind is not None else "#d9d9d9",
                              title, members, block.params, factors, memory, flops, block.found_by, ""))
    params = {name: p for p, name in traced.params.items()}
    for j, name in enumerate(plan.fallback_params):
        reason = plan.fallback_reasons.get(name, "")
        members = [params[name]] if name in params and params[name] not in owner else []
        result.append(Cluster(f"cluster_fallback_{j}", name, "fallback", FALLBACK_COLOR,
                              f"first-order fallback: {name}\n{reason}", members, (name,), "", None, None, "", reason))
    return result


def to_dot(plan: Plan) -> str:
    """Graphviz source of the drawing (deterministic: same plan, same text)."""
    traced: TracedModel = plan.traced
    groups = clusters(plan)
    owner = {n: c for c in groups for n in c.nodes}
    by_name = {node.name: node for node in drawn_nodes(plan)}
    lines = [
        f"digraph {_quote(plan.model_name)} {{",
        f"  graph [rankdir=TB, fontname=Helvetica, fontsize=11, label={_quote(_plan_title(plan))}, labelloc=t];",
        '  node [shape=box, style="rounded,filled", fillcolor=white, fontname=Helvetica, fontsize=10];',
        "  edge [color=gray40, arrowsize=0.6];",
    ]
    for c in groups:
        lines.append(f"  subgraph {_quote(c.id)} {{")
        lines.append(f'    graph [label={_quote(c.title)}, style="rounded,filled", fillcolor={_quote(c.color)}, '
                     f"color=gray30, fontsize=10, labeljust=l];")
        lines.append(f"    // {c.kind} block {c.name}")
        for name in c.nodes:
            lines.append(f"    {_node_line(plan, by_name[name])}")
        lines.append("  }")
    for node in by_name.values():
        if node.name not in owner:
            lines.append(f"  {_node_line(plan, node)}")
    for source, target in drawn_edges(plan):
        lines.append(f"  {_quote(source)} -> {_quote(target)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _node_line(plan: Plan, node: Node) -> str:
    op, shape = node_label(plan, node)
    label = op + (f"\n{shape}" if shape else "")
    shape_attr = ", shape=ellipse" if node.op == "placeholder" else ""
    return f"{_quote(node.name)} [label={_quote(label)}{shape_attr}, tooltip={_quote(node.name)}];"


def _plan_title(plan: Plan) -> str:
    fallback = f", {len(plan.fallback_params)} fallback parameter(s)" if plan.fallback_params else ""
    return f"{plan.model_name}: {len(plan.blocks)} curvature block(s){fallback}"


def _quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def to_svg(plan: Plan) -> str:
    """The drawing rendered by Graphviz's ``dot`` (raises :class:`~curvgraph.ConfigError` if ``dot`` is missing)."""
    dot = shutil.which("dot")
    if dot is None:
        raise ConfigError(DOT_MISSING.format(what="SVG"))
    result = subprocess.run([dot, "-Tsvg"], input=to_dot(plan), capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise ConfigError(f"curvgraph: Graphviz's dot failed on the drawing: {result.stderr.strip()[:500]}")
    return result.stdout


def to_networkx(plan: Plan) -> "networkx.DiGraph":
    """The drawing as a ``networkx.DiGraph`` (string/number attributes only, so GraphML can hold it)."""
    import networkx as nx

    owner = {n: c for c in clusters(plan) for n in c.nodes}
    graph = nx.DiGraph(model=plan.model_name, blocks_count=len(plan.blocks), fallback_count=len(plan.fallback_params))
    for node in drawn_nodes(plan):
        op, shape = node_label(plan, node)
        group = owner.get(node.name)
        graph.add_node(node.name, label=op + (f" {shape}" if shape else ""), op=op, shape=shape,
                       block=group.name if group else "", kind=group.kind if group else "")
    graph.add_edges_from(drawn_edges(plan))
    return graph


def _block_record(c: Cluster) -> dict[str, Any]:
    return {"name": c.name, "kind": c.kind, "params": list(c.params), "factors": c.factors, "state_bytes": c.memory,
            "flops_per_step": c.flops, "found_by": c.found_by, "reason": c.reason, "nodes": list(c.nodes)}


# ---------------------------------------------------------------------- HTML
def to_html(plan: Plan, source: str | None = None) -> str:
    """One self-contained page: the SVG (if ``dot`` is installed), the block table and ``source``."""
    try:
        svg = to_svg(plan)
        svg = svg[svg.index("<svg"):]
    except ConfigError as exc:
        if shutil.which("dot") is not None:
            raise
        svg = f'<p class="note">{html.escape(str(exc))}</p>'
    rows = []
    for i, c in enumerate(clusters(plan)):
        cells = [
            (str(i), i),
            (c.name, None),
            (c.kind, None),
            (", ".join(c.params), None),
            (c.factors or "-", None),
            (human(c.memory, "B") if c.memory is not None else "-", c.memory if c.memory is not None else -1),
            (human(c.flops, "") if c.flops is not None else "-", c.flops if c.flops is not None else -1),
            (c.found_by or "-", None),
            (c.reason or "-", None),
        ]
        tds = "".join(f'<td data-value="{value}">{html.escape(text)}</td>' if value is not None
                      else f"<td>{html.escape(text)}</td>" for text, value in cells)
        rows.append(f'<tr data-kind="{html.escape(c.kind)}" data-block="{html.escape(c.name)}" '
                    f'style="--kind: {html.escape(c.color)}">{tds}</tr>')
    columns = [("index", "#", "number"), ("block", "block", "text"), ("kind", "kind", "text"),
               ("params", "parameters", "text"), ("factors", "factor shapes", "text"),
               ("memory", "memory (state)", "number"), ("flops", "FLOPs/step", "number"),
               ("pass", "claimed by pass", "text"), ("reason", "fallback reason", "text")]
    head = "".join(f'<th data-key="{key}" data-type="{kind}" title="sort">{html.escape(title)}</th>'
                   for key, title, kind in columns)
    sizes = ", ".join(f"{plan.size_names[s]}={v}" for s, v in plan.sizes.items() if s in plan.size_names)
    step = (f"<pre><code>{html.escape(source)}</code></pre>" if source is not None
            else '<p class="note">Visualize the optimizer (not its plan) to include the generated step.</p>')
    return _PAGE.format(
        title=html.escape(f"curvgraph: {plan.model_name}"),
        heading=html.escape(_plan_title(plan)),
        sizes=html.escape(f"memory and FLOPs at the example sizes ({sizes})" if sizes else "memory and FLOPs"),
        svg=svg,
        head=head,
        rows="\n".join(rows),
        step=step,
        plan=html.escape(str(plan)),
        script=_SCRIPT,
    )


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.4em; }} h2 {{ font-size: 1.15em; margin-top: 1.5em; }}
.graph {{ overflow: auto; border: 1px solid #ccc; max-height: 80vh; }}
.graph svg {{ max-width: 100%; height: auto; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }}
th {{ background: #f0f0f0; cursor: pointer; user-select: none; }}
th[aria-sort="ascending"]::after {{ content: " \\25B2"; }} th[aria-sort="descending"]::after {{ content: " \\25BC"; }}
td:nth-child(3) {{ background: var(--kind); }}
pre {{ background: #f7f7f7; padding: 1em; overflow: auto; font-size: 0.8em; }}
.note {{ color: #a33; }}
</style>
</head>
<body>
<h1>{heading}</h1>
<h2>Graph</h2>
<div class="graph">{svg}</div>
<h2>Blocks</h2>
<p>One row per block (first-order fallback parameters as kind <code>fallback</code>); {sizes}. Click a column to sort.</p>
<table id="blocks">
<thead><tr>{head}</tr></thead>
<tbody>
{rows}
</tbody>
</table>
<h2>Plan</h2>
<pre>{plan}</pre>
<h2>Generated step</h2>
{step}
<script>
{script}
</script>
</body>
</html>
"""

_SCRIPT = """(function () {
  "use strict";
  var table = document.getElementById("blocks");
  var body = table.tBodies[0];
  var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
  function value(row, column, numeric) {
    var cell = row.cells[column];
    var text = cell.hasAttribute("data-value") ? cell.getAttribute("data-value") : cell.textContent;
    return numeric ? parseFloat(text) : text.toLowerCase();
  }
  function sortBy(column, descending) {
    var numeric = headers[column].getAttribute("data-type") === "number";
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = value(a, column, numeric), y = value(b, column, numeric);
      return (x < y ? -1 : x > y ? 1 : 0) * (descending ? -1 : 1);
    });
    rows.forEach(function (row) { body.appendChild(row); });
    headers.forEach(function (th) { th.removeAttribute("aria-sort"); });
    headers[column].setAttribute("aria-sort", descending ? "descending" : "ascending");
  }
  headers.forEach(function (th, column) {
    th.addEventListener("click", function () { sortBy(column, th.getAttribute("aria-sort") === "ascending"); });
  });
  var match = /^#sort=([a-z]+)(-desc)?$/.exec(window.location.hash);
  if (match) {
    var column = headers.findIndex(function (th) { return th.getAttribute("data-key") === match[1]; });
    if (column >= 0) { sortBy(column, Boolean(match[2])); }
  }
  document.body.setAttribute("data-ready", "yes");
})();"""
