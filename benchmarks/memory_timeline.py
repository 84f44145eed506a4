"""Where a compiled step's memory peak is: the buffers alive at Inductor's estimated peak, and which lines made them.

Usage::

    python benchmarks/memory_timeline.py --models resnet-32x32x3              # curvgraph at its defaults
    python benchmarks/memory_timeline.py --models resnet-32x32x3 --runner adamw
    python benchmarks/memory_timeline.py --models mlp-784-512-512-256-10 --runner '{"lr": 2e-3}'

``peak_memory.py`` measures how high a step's memory goes; this script says what is alive there.
Inductor orders each graph's kernels to lower its peak (``torch._inductor.memory.reorder_for_peak_memory``,
on by default) and estimates, for the order it picks, the bytes alive after each kernel. The script
wraps that function (torch 2.13's signature), takes the order it returns, and prints for every graph
compiled (the step, AdamW's step):

* the number of scheduled nodes, the estimated peak and the node where it falls;
* every buffer alive there of at least ``--min-mib``: its size, the nodes that allocate and free it, and
  the lines of the generated step that made it and that read it last, from the stack traces of the FX nodes
  the kernel came from: ``L<n>`` is line ``n`` of ``opt.source`` where the trace enters it (a line of the
  step function), ``f:<n>`` the line of the helper ``f`` where it leaves it. A compiled AdamW step has no
  generated source; its buffers show ``-``.

The estimate counts the graph's own buffers (not its inputs: parameters, state, the batch), sizes
at the example's batch size. On the ResNet-style CNN it is within 3% of what ``peak_memory.py`` measures
above the tensors alive before the step (146.3 against 150.4 MiB at the defaults).

Each model compiles in a fresh process with an empty Inductor cache of its own (a cached graph is
not scheduled again, so it would print nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
STEP_FILE = "<curvgraph-generated-step>"


def generated_lines(scheduler_node) -> str:
    """The generated step's lines that the FX nodes behind ``scheduler_node`` come from, e.g. ``L465 ema:131``."""
    nodes = list(getattr(scheduler_node, "snodes", None) or [scheduler_node])
    step_lines, helper_lines = set(), set()
    for node in nodes:
        for origin in getattr(node.node, "origins", None) or ():
            frames = re.findall(rf'File "{re.escape(STEP_FILE)}", line (\d+), in (\w+)', origin.meta.get("stack_trace") or "")
            if frames:
                step_lines.add(int(frames[0][0]))
                if frames[-1][1] != "step":
                    helper_lines.add(f"{frames[-1][1]}:{frames[-1][0]}")
    shown = [f"L{n}" for n in sorted(step_lines)[:4]] + sorted(helper_lines)[:3]
    return " ".join(shown) + (" ..." if len(step_lines) > 4 or len(helper_lines) > 3 else "") or "-"


def install_report(min_mib: float) -> None:
    """Wrap Inductor's ``reorder_for_peak_memory`` so that each graph's chosen order is reported as it is made."""
    import torch._inductor.memory as memory

    reorder = memory.reorder_for_peak_memory
    graphs = [0]

    def reported(nodes, name_to_buf, name_to_fused_node, graph_inputs, graph_outputs, *args, **kwargs):
        order = reorder(nodes, name_to_buf, name_to_fused_node, graph_inputs, graph_outputs, *args, **kwargs)
        graphs[0] += 1
        freeable = memory.get_freeable_input_buf(order, graph_inputs)
        buffers, _, last_use = memory.compute_memory_timeline(order, freeable, graph_outputs)
        peak, curve = memory.peak_memory_from_buf_info_list(buffers, len(order))
        at = max(range(len(curve)), key=curve.__getitem__) if curve else 0
        print(f"\ngraph {graphs[0]}: {len(order)} nodes, estimated peak {peak / 2**20:.1f} MiB at node {at} "
              f"({generated_lines(order[at]) if order else '-'})")
        alive = [b for b in buffers if b.start_step <= at and (b.end_step >= at or b.end_step == -1)]

        def size(b) -> int:  # a buffer written in place of another allocates nothing and frees the storage
            return max(b.size_alloc, b.size_free)

        shown = sorted((b for b in alive if size(b) >= min_mib * 2**20), key=lambda b: (-size(b), b.start_step))
        for b in shown:
            maker = getattr(b.buffer, "defining_op", None)
            reader = last_use.get(b.buffer)
            print(f"  {size(b) / 2**20:8.2f} MiB  nodes {b.start_step:>4}-{b.end_step:<4}  made by "
                  f"{generated_lines(maker) if maker is not None else 'an input'}  |  last read by "
                  f"{generated_lines(reader) if reader is not None else 'the graph output'}")
        rest = curve[at] - sum(size(b) for b in shown)
        print(f"  {rest / 2**20:8.2f} MiB  the rest ({len(alive) - len(shown)} smaller buffers)", flush=True)
        return order

    memory.reorder_for_peak_memory = reported


def child(model_name: str, runner: str, min_mib: float) -> None:
    sys.path.insert(0, HERE)
    install_report(min_mib)
    from step_time import first_period

    step, period, _ = first_period(model_name, None if runner == "adamw" else json.loads(runner))
    for _ in range(period):
        step()


def main() -> None:
    sys.path.insert(0, HERE)
    from step_time import MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["resnet-32x32x3"], choices=list(MODELS))
    parser.add_argument("--runner", default="{}",
                        help="'adamw', or curvgraph.compile's options as JSON (default '{}': the defaults)")
    parser.add_argument("--min-mib", type=float, default=0.5, help="smallest buffer listed (MiB)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], float(args.child[2]))
        return
    for name in args.models:
        print(f"== {name}, {args.runner}", flush=True)
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            subprocess.run([sys.executable, __file__, "--child", name, args.runner, str(args.min_mib)], env=env,
                           check=True)


if __name__ == "__main__":
    main()
