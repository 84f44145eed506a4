"""Peak memory of a training step: curvgraph against a ``torch.compile``'d AdamW step.

Usage::

    python benchmarks/peak_memory.py                          # MLP and ResNet-style CNN
    python benchmarks/peak_memory.py --models resnet-32x32x3

On a CPU, tensors live in the process's heap, so the measure is the process's peak
resident set (Linux ``VmHWM``), which ``/proc/self/clear_refs`` resets. Each runner runs in
a fresh process: build the model, compile, run one full schedule period (every variant of
the step compiled and run once), reset the peak, run another period, and read the peak.
Reported per runner: the resident set before the measured steps (model, optimizer
state, compiled code), the peak during them, and for curvgraph the optimizer state the
plan counts (factors, inverses, momentum: ``state_bytes``). The issue's criterion is
``peak(curvgraph) <= peak(AdamW) + curvgraph's factor and inverse storage + 10%``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def resident_kib(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of this process, KiB."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def child(model_name: str, runner: str) -> None:
    sys.path.insert(0, HERE)
    from step_time import first_period

    step, period, opt = first_period(model_name, None if runner == "adamw" else json.loads(runner))
    state_bytes = sum(opt.plan.block_state_bytes(b) for b in opt.plan.blocks) if opt is not None else 0.0
    for _ in range(period):
        step()
    before = resident_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(period):
        step()
    print(json.dumps({"before_mib": before / 1024, "peak_mib": resident_kib("VmHWM") / 1024,
                      "state_mib": state_bytes / 2**20}))


def main() -> None:
    sys.path.insert(0, HERE)
    from step_time import MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["mlp-784-512-512-256-10", "resnet-32x32x3"], choices=list(MODELS))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    runners = {"adamw": "adamw", "curvgraph (defaults)": "{}",
               "curvgraph fixed lr": json.dumps({"lr": 2e-3, "momentum": 0.9})}
    print(f"{'model':<24} {'runner':<22} {'RSS before MiB':>14} {'peak MiB':>9} {'state MiB':>9} {'peak - AdamW peak':>18}")
    for name in args.models:
        adam_peak = None
        for label, runner in runners.items():
            result = subprocess.run([sys.executable, __file__, "--child", name, runner], capture_output=True, text=True,
                                    check=True)
            row = json.loads(result.stdout.strip().splitlines()[-1])
            adam_peak = row["peak_mib"] if adam_peak is None else adam_peak
            print(f"{name:<24} {label:<22} {row['before_mib']:>14.0f} {row['peak_mib']:>9.0f} {row['state_mib']:>9.1f} "
                  f"{row['peak_mib'] - adam_peak:>18.0f}", flush=True)


if __name__ == "__main__":
    main()
