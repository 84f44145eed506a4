"""Peak memory of a training step: curvgraph against a ``torch.compile``'d AdamW step.

Usage::

    python benchmarks/peak_memory.py                          # MLP and ResNet-style CNN
    python benchmarks/peak_memory.py --models resnet-32x32x3
    python benchmarks/peak_memory.py --models resnet18-32x32x3 --whole   # and the defaults with every factor whole

Two measures, each runner in a fresh process (build the model, compile, run one full
schedule period so that every variant of the step is compiled and has run once, then
measure another period):

* **Tensors** (the allocator's view): the bytes of every tensor alive before the measured
  steps (parameters, buffers, optimizer state, the batch, graph constants; found through
  :mod:`gc`, each storage counted once), plus the highest total that the CPU allocator
  reports as allocated during the steps, relative to their start (``torch.profiler`` with
  ``profile_memory=True``, the ``Total Allocated`` of its ``[memory]`` events). This is the
  step's own peak: what a larger model scales with. The **median step** column measures each
  step of a third period on its own and gives the median: where it is below the tensor peak,
  one kind of step (the refresh, once per period) sets the peak and the others hold less.
* **Process** (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``): the resident set
  before the steps and its peak during them. It also holds the compiled code, Python's heap
  and what compilation left behind, so on a small model it mostly measures those.

For curvgraph it also reports the optimizer state the plan counts (factors, inverses,
momentum: ``state_bytes``). The issue's criterion is ``peak(curvgraph) <= peak(AdamW) +
curvgraph's factor and inverse storage + 10%``, read on the tensor peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))


def resident_kib(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of this process, KiB."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def live_tensor_bytes() -> int:
    """Bytes of the CPU storages of every tensor that :mod:`gc` can reach, each storage once."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if (not isinstance(obj, torch.Tensor) or isinstance(obj, FakeTensor) or obj.device.type != "cpu"
                    or obj.is_sparse):
                continue
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # fake, functional or other storage-less tensors
            continue
    seen.pop(0, None)
    return sum(seen.values())


def allocated_peak_bytes(steps: Callable[[], None]) -> int:
    """The highest total the CPU allocator reports as allocated while ``steps()`` runs, relative to its start
    (``torch.profiler`` memory events; 0 if the steps allocate nothing)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        steps()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max([0, *totals])


def child(model_name: str, runner: str) -> None:
    sys.path.insert(0, HERE)
    from step_time import first_period

    step, period, opt = first_period(model_name, None if runner == "adamw" else json.loads(runner))
    state_bytes = sum(opt.plan.block_state_bytes(b) for b in opt.plan.blocks) if opt is not None else 0.0
    def run_period() -> None:
        for _ in range(period):
            step()

    run_period()
    gc.collect()
    tensors = live_tensor_bytes()
    transient = allocated_peak_bytes(run_period)
    per_step = sorted(allocated_peak_bytes(step) for _ in range(period))
    before = resident_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    run_period()
    print(json.dumps({"tensors_mib": tensors / 2**20, "tensor_peak_mib": (tensors + transient) / 2**20,
                      "before_mib": before / 1024, "peak_mib": resident_kib("VmHWM") / 1024,
                      "state_mib": state_bytes / 2**20, "median_step_mib": (tensors + per_step[period // 2]) / 2**20}))


def main() -> None:
    sys.path.insert(0, HERE)
    from step_time import MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["mlp-784-512-512-256-10", "resnet-32x32x3"], choices=list(MODELS))
    parser.add_argument("--whole", action="store_true",
                        help="also the defaults with every factor whole (max_factor_dim=None; the default splits >2048)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    runners = {"adamw": "adamw", "curvgraph (defaults)": "{}",
               "curvgraph fixed lr": json.dumps({"lr": 2e-3, "momentum": 0.9})}
    if args.whole:
        runners["curvgraph, factors whole"] = json.dumps({"max_factor_dim": None})
    print(f"{'model':<24} {'runner':<22} {'tensors MiB':>11} {'tensor peak':>11} {'median step':>11} {'bound':>7} "
          f"{'RSS before':>10} {'RSS peak':>9} {'state MiB':>9}")
    for name in args.models:
        adam = None
        for label, runner in runners.items():
            result = subprocess.run([sys.executable, __file__, "--child", name, runner], capture_output=True, text=True,
                                    check=True)
            row = json.loads(result.stdout.strip().splitlines()[-1])
            adam = row if adam is None else adam
            bound = 1.1 * (adam["tensor_peak_mib"] + row["state_mib"])
            print(f"{name:<24} {label:<22} {row['tensors_mib']:>11.1f} {row['tensor_peak_mib']:>11.1f} "
                  f"{row['median_step_mib']:>11.1f} {bound:>7.1f} "
                  f"{row['before_mib']:>10.0f} {row['peak_mib']:>9.0f} {row['state_mib']:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
