"""Time to first step, cold and warm: curvgraph against a ``torch.compile``'d AdamW train step.

Usage::

    python benchmarks/first_step.py                           # MLP and ResNet-style CNN
    python benchmarks/first_step.py --models mlp-784-512-512-256-10
    python benchmarks/first_step.py --models char-transformer-4x256 --options '{"dynamic": "batch"}'

Each measurement runs in a fresh Python process (so nothing is cached in memory) with
its own Inductor cache directory (``TORCHINDUCTOR_CACHE_DIR``):

* ``cold``: an empty cache directory;
* ``warm``: the same directory again, after the cold run filled it (what a second
  process compiling the same architecture sees).

Measured per process: for AdamW (forward, backward and update in one ``torch.compile``d
function, as in ``step_time.py``) the first two calls; for curvgraph at its defaults
``curvgraph.compile`` and the steps until every variant of the default schedule ran once
(``invert_every + 1`` steps: statistics and refresh, then statistics alone), or with the compile
options ``--options`` gives (JSON; AdamW is timed as it is). The script
also prints where the compile time went (``torch._dynamo.utils.compile_times``: Dynamo's
tracing, AOT autograd, Inductor's code generation and the C++ compiler, per phase).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

#: Compile phases reported (``torch._dynamo.utils.compile_times`` keys, nested: Inductor runs inside AOT autograd).
PHASES = {
    "torch.compile in all": ("_compile.compile_inner",),
    "Dynamo tracing": ("bytecode_tracing",),
    "AOT autograd (with Inductor)": ("create_aot_dispatcher_function",),
    "Inductor": ("compile_fx_inner",),
    "Inductor codegen": ("GraphLowering.codegen",),
    "C++ compiler": ("compile_file", "async_compile.wait"),
}


def child(model_name: str, runner: str, options: str = "{}") -> None:
    """In a fresh process: build the workload, time ``runner``'s first steps (curvgraph's compiled with ``options``,
    JSON), print one JSON line."""
    import torch

    sys.path.insert(0, HERE)
    from step_time import first_period

    start = time.perf_counter()
    step, calls, _ = first_period(model_name, None if runner == "adamw" else json.loads(options))
    for _ in range(calls):
        step()
    seconds = time.perf_counter() - start
    phases = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
    print(json.dumps({"seconds": seconds, "calls": calls, "phases": dict(zip(*phases)) if phases else {}}))


def measure(model_name: str, runner: str, cache: str, options: str = "{}") -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    result = subprocess.run([sys.executable, __file__, "--child", model_name, runner, options], env=env,
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    sys.path.insert(0, HERE)
    from step_time import MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["mlp-784-512-512-256-10", "resnet-32x32x3"],
                        choices=list(MODELS))
    parser.add_argument("--options", default="{}", help="curvgraph.compile options, JSON (default: none)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    rows = {}
    for name in args.models:
        for runner in ("adamw", "curvgraph"):
            with tempfile.TemporaryDirectory(prefix="curvgraph-first-step-") as cache:
                cold = measure(name, runner, cache, args.options)
                warm = measure(name, runner, cache, args.options)
            rows[(name, runner)] = (cold, warm)
            print(f"{name} {runner}: cold {cold['seconds']:.1f} s, warm {warm['seconds']:.1f} s ({cold['calls']} calls)",
                  flush=True)
            for label, run in (("cold", cold), ("warm", warm)):
                print(f"   {label}, seconds in: " + ", ".join(
                    f"{phase} {sum(float(run['phases'].get(k) or 0) for k in keys):.1f}" for phase, keys in PHASES.items()),
                    flush=True)
    print(f"\n{'model':<26} {'cold s':>8} {'warm s':>8} {'cold x AdamW':>13} {'warm x AdamW':>13}")
    for name in args.models:
        (adam_cold, adam_warm), (ours_cold, ours_warm) = rows[(name, "adamw")], rows[(name, "curvgraph")]
        print(f"{name + ' AdamW':<26} {adam_cold['seconds']:>8.1f} {adam_warm['seconds']:>8.1f}")
        print(f"{name + ' curvgraph':<26} {ours_cold['seconds']:>8.1f} {ours_warm['seconds']:>8.1f} "
              f"{ours_cold['seconds'] / adam_cold['seconds']:>13.2f} {ours_warm['seconds'] / adam_warm['seconds']:>13.2f}")


if __name__ == "__main__":
    main()
