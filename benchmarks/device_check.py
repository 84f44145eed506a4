"""The default step on an accelerator: compile time, step time against a compiled Adam step, new batch sizes.

``python benchmarks/device_check.py [--device cuda] [--models mlp resnet char]``: for each model of
``step_time.py``, in one process with an empty Inductor cache, the first two calls of a
``torch.compile``d Adam step and their median step time, then ``curvgraph.compile`` at the defaults and its
first schedule period (11 steps), its median step time, and one step with a batch 8 smaller, with how many
graphs that step compiled (0: the batch size is symbolic).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import curvgraph
from step_time import MODELS, compiled_adam_step

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(step, device: torch.device, rounds: int = 5, iters: int = 10) -> float:
    """Median over ``rounds`` of the mean milliseconds per call of ``step`` over ``iters`` calls."""
    samples = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            step()
        sync(device)
        samples.append((time.perf_counter() - start) / iters * 1e3)
    return statistics.median(samples)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def check(name: str, device: torch.device) -> None:
    from torch._dynamo.utils import counters

    workload = MODELS[name]
    g = torch.Generator().manual_seed(0)
    x, y = (t.to(device) for t in workload.batch(g))
    torch.manual_seed(0)
    model = workload.make().to(device)
    adam = compiled_adam_step(model, loss=workload.loss_fn)
    adam_first = timed(lambda: [adam(x, y) for _ in range(2)], device)
    adam_ms = median_ms(lambda: adam(x, y), device)
    torch._dynamo.reset()

    torch.manual_seed(0)
    model = workload.make().to(device)
    opt = curvgraph.compile(model, (x,), loss=workload.loss, seed=0, progress=False)
    first = timed(lambda: [opt.step(x, y) for _ in range(11)], device)
    ms = median_ms(lambda: opt.step(x, y), device)
    graphs = counters["stats"]["unique_graphs"]
    smaller = timed(lambda: opt.step(x[:-8], y[:-8]), device)
    new_graphs = counters["stats"]["unique_graphs"] - graphs
    print(f"{name:24s} adam first 2 calls {adam_first:6.1f} s, {adam_ms:8.2f} ms/step | curvgraph first period "
          f"{first:6.1f} s ({first / adam_first:.2f}x), {ms:8.2f} ms/step ({ms / adam_ms:.2f}x) | batch-8: "
          f"{smaller:6.2f} s, {new_graphs} new graphs, skipped steps {opt.skipped_steps}", flush=True)
    torch._dynamo.reset()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="*", default=["mlp", "resnet", "char"])
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), flush=True)
    for name in MODELS:
        if name.split("-")[0] in args.models or name in args.models:
            try:
                check(name, device)
            except Exception as error:  # noqa: BLE001 - report and go on to the next model
                print(f"{name:24s} FAILED: {type(error).__name__}: {str(error)[:400]}", flush=True)


if __name__ == "__main__":
    main()
