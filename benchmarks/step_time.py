"""Per-step time of curvgraph K-FAC against Adam (compiled and eager) and singd, in one run.

Usage::

    python benchmarks/step_time.py                 # every model, JSON to benchmarks/results/
    python benchmarks/step_time.py --models mlp --iters 30

For each model the script times, in the same process and on the same batch:

* ``adam-compiled``: one ``torch.compile``'d graph doing forward, backward
  (``torch.func.grad``) and the Adam update -- the baseline every ratio refers to;
* ``adam-eager``: ``torch.optim.Adam`` with ``loss.backward()``;
* ``singd``: ``singd.optim.optimizer.SINGD`` with ``T=10`` (dense structures; its
  hooks, empirical Fisher);
* ``curvgraph``: curvgraph's compiled K-FAC step in the fixed-step mode (``lr=2e-3``,
  MC Fisher, ``factor_every=1``, ``invert_every=10``): the step the FLOP bound is for;
* ``curvgraph-T10``: equal settings to singd's ``T=10``: empirical Fisher,
  ``factor_every = invert_every = 10`` (fixed-step mode);
* ``curvgraph-auto``: the default settings, the adaptive mode (``lr="auto"``:
  quadratic-model step size and momentum, adaptive damping), otherwise as
  ``curvgraph``: its ratio to ``curvgraph`` is the adaptive mode's overhead;
* ``curvgraph-singd``: curvgraph's SINGD (``method="singd"``) with singd's settings
  above (``lr=1e-3``, ``T=10``, dense structures): the same update as ``singd``, compiled.

* ``curvgraph-<method>``: every other registered method (``ekfac``, ``kbfgs``, ``kbfgs_l``)
  at its defaults.

Subnormal numbers are flushed to zero (``torch.set_flush_denormal``), for every runner: see ``main``.

Models: an MLP 784-512-512-256-10 (batch 512), a deep narrow MLP (32 layers x 128,
batch 128) where per-layer Python overhead dominates hook-based peers, a small
ResNet-style CNN on 32x32x3 inputs (batch 128; singd preconditions only its
convolutions and the linear head and leaves the BatchNorm parameters untouched,
curvgraph gives them norm blocks), and the char-level transformer of
``examples/char_transformer.py`` (4 layers, d=256, 4 heads, context 128, batch 32,
tied embedding/head; singd preconditions its ``nn.Linear`` modules only), and an
LSTM classifier (hidden 256, sequence 40, batch 64, 32 input features; curvgraph
unrolls it, ``adam-eager`` is eager ``nn.LSTM`` + Adam). Each runner's first step
(compile included: export, code generation, ``torch.compile``) is timed separately
(``first step s``).

Next to each curvgraph time it prints the *FLOP bound*: the step's FLOPs (from the
plan's cost model: forward/backward, statistics, the MC backward, preconditioning,
amortized inversion, the update) divided by the compiled Adam step's FLOPs. A
measured ratio equal to the FLOP bound means the step runs at compiled Adam's
GFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import curvgraph

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))  # char_transformer.py

#: Methods besides K-FAC and SINGD timed at their defaults (``method=...``), where registered.
METHODS = [m for m in ("ekfac", "kbfgs", "kbfgs_l") if m in curvgraph.registry.METHODS]

class Residual(nn.Module):
    """conv-BN-ReLU-conv-BN plus the shortcut, then ReLU (a ResNet basic block). The shortcut is the input,
    or a strided 1x1 convolution and BN where the block changes the channels or the resolution."""

    def __init__(self, channels: int, out: int | None = None, stride: int = 1) -> None:
        super().__init__()
        out = out or channels
        self.body = nn.Sequential(nn.Conv2d(channels, out, 3, stride=stride, padding=1, bias=False),
                                  nn.BatchNorm2d(out), nn.ReLU(), nn.Conv2d(out, out, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(out))
        self.shortcut = (nn.Sequential(nn.Conv2d(channels, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
                         if out != channels or stride != 1 else nn.Identity())

    def forward(self, x):
        return torch.relu(self.shortcut(x) + self.body(x))


def small_resnet() -> nn.Module:
    """A ResNet-style CNN for 32x32x3 inputs: 16-32-64 channels, one residual block per stage."""
    def down(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), Residual(16),
                         *down(16, 32), Residual(32), *down(32, 64), Residual(64), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(64, 10))


def resnet18() -> nn.Module:
    """ResNet-18 for 32x32x3 inputs (He et al. 2016, the CIFAR stem: one 3x3 convolution, no pooling): stages of
    64-128-256-512 channels, two basic blocks each, the last three starting at stride 2; 11.2M parameters."""
    stages, c_in = [], 64
    for i, width in enumerate((64, 128, 256, 512)):
        stages += [Residual(c_in, width, 1 if i == 0 else 2), Residual(width)]
        c_in = width
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), *stages,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))


@dataclass(frozen=True)
class Workload:
    """A benchmark model: how to build it, one batch ``(inputs, targets)``, and its loss."""

    make: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    loss: str = "cross_entropy"

    @property
    def loss_fn(self) -> Callable:
        """The loss as a torch function of ``(output, targets)`` (for the baselines)."""
        if self.loss == "token_cross_entropy":
            return lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten())
        return F.cross_entropy


def classification(batch: int, features: tuple[int, ...]) -> Callable[[torch.Generator], tuple]:
    return lambda g: (torch.randn(batch, *features, generator=g), torch.randint(0, 10, (batch,), generator=g))


def char_transformer(context: int = 128) -> nn.Module:
    """The char-level transformer of ``examples/char_transformer.py``: 4 layers, d=256, 4 heads, ``context`` (128)."""
    from char_transformer import ALPHABET, CharTransformer

    return CharTransformer(len(ALPHABET) + 1, 256, 4, 4, context)


def char_batch(g: torch.Generator, batch: int = 32, context: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` (32) windows of ``context`` (128) characters of the example's corpus and their next characters."""
    from char_transformer import batches, corpus, encode

    return next(batches(encode(corpus()), 1, batch, context, int(torch.randint(0, 2**16, (1,), generator=g))))


class LSTMClassifier(nn.Module):
    """``nn.LSTM`` over ``(N, T, F)`` sequences and a linear head on the last hidden state."""

    def __init__(self, features: int = 32, hidden: int = 256, classes: int = 10) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


MODELS: dict[str, Workload] = {
    "mlp-784-512-512-256-10": Workload(
        lambda: nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                              nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)),
        classification(512, (784,))),
    "deep-narrow-32x128": Workload(
        lambda: nn.Sequential(nn.Linear(128, 128), *[m for _ in range(31) for m in (nn.Tanh(), nn.Linear(128, 128))],
                              nn.Tanh(), nn.Linear(128, 10)),
        classification(128, (128,))),
    "resnet-32x32x3": Workload(small_resnet, classification(128, (3, 32, 32))),
    "resnet18-32x32x3": Workload(resnet18, classification(32, (3, 32, 32))),
    "char-transformer-4x256": Workload(char_transformer, char_batch, "token_cross_entropy"),
    # the same tokens per batch over a 4x longer context: the attention weights, N x heads x T x T per layer, 4x larger
    "char-transformer-4x256-ctx512": Workload(lambda: char_transformer(512), lambda g: char_batch(g, 8, 512),
                                              "token_cross_entropy"),
    # hidden 256, sequence 40, batch 64: curvgraph unrolls the LSTM (rnn blocks with 40 uses); the
    # adam-eager row is eager nn.LSTM (cuDNN on a GPU) + torch.optim.Adam
    "lstm-256-seq40": Workload(LSTMClassifier, classification(64, (40, 32))),
}


def time_per_step(step: Callable[[], object], warmup: int, iters: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean seconds per step over ``iters`` steps, after ``warmup`` steps."""
    return interleaved({"step": step}, warmup, iters, repeats)["step"]


def interleaved(steps: dict[str, Callable[[], object]], warmup: int, iters: int, repeats: int) -> dict[str, float]:
    """Seconds per step of each runner: median over ``repeats`` rounds that time every runner in turn.

    Interleaving makes the ratios robust to the machine's speed drifting during the run.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(iters):
                step()
            samples[name].append((time.perf_counter() - start) / iters)
    return {name: statistics.median(s) for name, s in samples.items()}


def adam_compiled(model: nn.Module, x, y, loss: Callable = F.cross_entropy) -> Callable[[], object]:
    """Forward, backward and Adam (lr 1e-3) in one torch.compile'd graph (:func:`compiled_adam_step`)."""
    step = compiled_adam_step(model, loss=loss)
    return lambda: step(x, y)


def first_period(model_name: str, options: dict | None) -> tuple[Callable[[], object], int, curvgraph.CurvatureOptimizer | None]:
    """A fresh model of workload ``model_name`` (seed 0) and its step on one fixed batch, ``step()``: a compiled AdamW
    step for ``options=None``, else curvgraph compiled with ``options``. Also the number of calls that runs every
    variant of the step once (AdamW: 2; curvgraph: one schedule period, ``invert_every + 1``) and the optimizer."""
    workload = MODELS[model_name]
    torch.manual_seed(0)
    model = workload.make()
    x, y = workload.batch(torch.Generator().manual_seed(0))
    if options is None:
        adam = compiled_adam_step(model, 1e-3, workload.loss_fn)
        return (lambda: adam(x, y)), 2, None
    opt = curvgraph.compile(model, (x,), loss=workload.loss, progress=False, **options)
    return (lambda: opt.step(x, y)), opt._runner.invert_every + 1, opt


def compiled_adam_step(model: nn.Module, lr: float = 1e-3, loss: Callable = F.cross_entropy) -> Callable:
    """``step(x, y) -> loss``: forward, backward and ``torch.optim.Adam``'s update of ``model``'s own
    parameters in one ``torch.compile``'d graph (buffers, e.g. BatchNorm statistics, updated in place).

    Dynamo cannot compile ``nn.LSTM``/``nn.GRU``/``nn.RNN``; such modules run as their unrolled
    forms (the same function and Parameters, :func:`curvgraph.kinds.rnn.unrolled.unrolled_copy`)."""
    from curvgraph.kinds.rnn.unrolled import unrolled_copy

    model = unrolled_copy(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    exp_avg = {n: torch.zeros_like(p) for n, p in params.items()}
    exp_avg_sq = {n: torch.zeros_like(p) for n, p in params.items()}
    count = torch.zeros(())

    def loss_of(p, b, x, y):
        return loss(functional_call(model, {**p, **b}, (x,)), y)

    @torch.compile(fullgraph=True)
    def step(x, y):
        grads, value = torch.func.grad_and_value(loss_of)(params, buffers, x, y)
        count.add_(1)
        for n, g in grads.items():
            exp_avg[n].lerp_(g, 0.1)
            exp_avg_sq[n].mul_(0.999).addcmul_(g, g, value=0.001)
            denom = (exp_avg_sq[n] / (1 - 0.999**count)).sqrt_().add_(1e-8)
            params[n].addcdiv_(exp_avg[n], denom, value=-lr / (1 - 0.9**count))
        return value

    return step


def adam_eager(model: nn.Module, x, y, loss: Callable = F.cross_entropy) -> Callable[[], object]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        loss(model(x), y).backward()
        opt.step()

    return step


def singd_step(model: nn.Module, x, y, loss: Callable = F.cross_entropy) -> Callable[[], object]:
    from singd.optim.optimizer import SINGD

    opt = SINGD(model, lr=1e-3, T=10, warn_unsupported=False)

    def step():
        opt.zero_grad(set_to_none=True)
        loss(model(x), y).backward()
        opt.step()

    return step


def curvgraph_step(model: nn.Module, x, y, loss: str = "cross_entropy",
                   **options) -> tuple[Callable[[], object], curvgraph.CurvatureOptimizer]:
    opt = curvgraph.compile(model, (x,), loss=loss, **options)
    return (lambda: opt.step(x, y)), opt


def flop_ratio(opt: curvgraph.CurvatureOptimizer) -> float:
    """FLOPs of the curvgraph step (its own Fisher type and schedule) over FLOPs of an Adam step (forward/backward
    + 10 per parameter)."""
    plan = opt.plan
    samples = {"mc": 1, "empirical": 0}.get(opt.fisher, 1)  # type-2: one per output dim (not used here)
    flops = plan.step_flops(samples=samples, factor_every=opt.factor_every, invert_every=opt.invert_every)
    total = plan.at_example(sum(flops.values()))
    adam = plan.at_example(flops["forward_backward"]) + 10 * plan.at_example(flops["update"]) / 8
    return total / adam


def run_model(name: str, warmup: int, iters: int, repeats: int, peers: bool, only: set[str] | None = None) -> dict:
    """Time every runner (or those in ``only``; ``adam-compiled`` always, the baseline) on model ``name``."""
    work = MODELS[name]
    x, y = work.batch(torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    make, loss = work.make, work.loss_fn

    def wanted(label: str) -> bool:
        return only is None or label in only or label == "adam-compiled"

    runners = {"adam-compiled": adam_compiled(make(), x, y, loss)}
    if wanted("adam-eager"):
        runners["adam-eager"] = adam_eager(make(), x, y, loss)
    if peers and wanted("singd"):
        runners["singd"] = singd_step(make(), x, y, loss)

    def ours(label: str, **options) -> None:
        if wanted(label):
            runners[label], opt = curvgraph_step(make(), x, y, work.loss, **options)
            bounds[label] = flop_ratio(opt)

    bounds: dict[str, float] = {}
    ours("curvgraph", lr=2e-3, invert_every=10)
    ours("curvgraph-T10", lr=2e-3, fisher="empirical", factor_every=10, invert_every=10)
    ours("curvgraph-auto")
    ours("curvgraph-auto-whole", max_factor_dim=None)  # every factor whole (the default splits those wider than 2048)
    ours("curvgraph-whole", lr=2e-3, invert_every=10, max_factor_dim=None)
    ours("curvgraph-auto-split512", max_factor_dim=512)  # block-diagonal factors of at most 512 (ResNet-18's 4608s)
    ours("curvgraph-auto-split256", max_factor_dim=256)
    ours("curvgraph-split256", lr=2e-3, invert_every=10, max_factor_dim=256)
    ours("curvgraph-auto-every2", conv_stats_every=2)  # conv input factors from every second position per dim
    ours("curvgraph-auto-split256-every2", max_factor_dim=256, conv_stats_every=2)
    ours("curvgraph-split256-every2", lr=2e-3, invert_every=10, max_factor_dim=256, conv_stats_every=2)
    ours("curvgraph-singd", method="singd", lr=1e-3, T=10)
    for method in METHODS:
        ours(f"curvgraph-{method}", method=method)
    ours("curvgraph-ekfac-whole", method="ekfac", max_factor_dim=None)  # EKFAC before it split factors wider than 2048

    print(f"{name} (batch {len(x)}): compiling and warming up ...", flush=True)
    first = {}
    for label, step in runners.items():  # time to first step: compile (export, codegen, torch.compile) + one step
        start = time.perf_counter()
        step()
        first[label] = time.perf_counter() - start
    seconds = interleaved(runners, warmup, iters, repeats)
    rows = {label: {"ms_per_step": 1e3 * s, "flop_bound_ratio": bounds.get(label), "first_step_s": first[label]}
            for label, s in seconds.items()}
    for label, row in rows.items():
        print(f"  {label:<15} {row['ms_per_step']:9.2f} ms/step", flush=True)
    base = rows["adam-compiled"]["ms_per_step"]
    for row in rows.values():
        row["ratio_to_adam_compiled"] = row["ms_per_step"] / base
    return {"batch": len(x), "rows": rows}


def table(results: dict) -> str:
    lines = []
    header = (f"{'model':<24} {'step':<15} {'ms/step':>9} {'x Adam(compiled)':>17} {'FLOP bound':>11} {'measured/bound':>15}"
              f" {'first step s':>13}")
    lines += [header, "-" * len(header)]
    for name, result in results.items():
        for label, row in result["rows"].items():
            bound = row["flop_bound_ratio"]
            extra = f"{bound:>11.2f} {row['ratio_to_adam_compiled'] / bound:>15.2f}" if bound else f"{'':>11} {'':>15}"
            lines.append(f"{name:<24} {label:<15} {row['ms_per_step']:>9.2f} {row['ratio_to_adam_compiled']:>17.2f} {extra}"
                         f" {row.get('first_step_s', float('nan')):>13.1f}")
        rows = result["rows"]
        for ours, theirs in (("curvgraph-T10", "singd"), ("curvgraph-singd", "singd"), ("curvgraph-auto", "curvgraph")):
            if ours in rows and theirs in rows:
                lines.append(f"{'':<24} {ours} / {theirs} = {rows[ours]['ms_per_step'] / rows[theirs]['ms_per_step']:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS),
                        choices=list(MODELS) + ["mlp", "deep", "resnet", "char", "lstm"])
    parser.add_argument("--warmup", type=int, default=12, help="steps before timing (compiles every variant)")
    parser.add_argument("--iters", type=int, default=20, help="steps per timing (a multiple of 10: whole T=10 cycles)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-peers", action="store_true", help="skip singd")
    parser.add_argument("--runners", nargs="*", default=None,
                        help="time only these runners (labels as in the table; adam-compiled is always timed)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "step_time.json"))
    args = parser.parse_args()
    names = [n for n in MODELS if n in args.models or n.split("-")[0] in args.models]
    # Every runner repeats one batch, and a second-order step fits it within a few steps: the softmax's
    # probabilities of the other classes, the loss's gradient and the sampled Fisher's vectors then fall below
    # float32's smallest normal number, and CPU arithmetic on subnormal numbers is many times slower (the MLP
    # 784-512-512-256-10's fixed-mode step went from 27 to 300 ms between its 5th and 10th repetition). What is
    # measured here is the arithmetic of a step, so subnormal results are flushed to zero for every runner alike.
    torch.set_flush_denormal(True)

    only = set(args.runners) if args.runners is not None else None
    results = {}
    for n in names:
        # every model's compiled Adam step shares one code object: without a reset, Dynamo's recompile limit (8)
        # ended a run of all five benchmark models at the fifth (the LSTM's integer inputs)
        torch._dynamo.reset()
        results[n] = run_model(n, args.warmup, args.iters, args.repeats, not args.no_peers, only)
    print()
    print(table(results))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "processor": platform.processor(), "curvgraph": curvgraph.__version__}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
