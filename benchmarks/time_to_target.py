"""Time to a tuned Adam's training loss: curvgraph against Adam at its best of three learning rates.

Usage::

    python benchmarks/time_to_target.py                          # the whole suite
    python benchmarks/time_to_target.py --models mnist1d-mlp --configs default fixed

For every suite model, from the same initialization and on the same sequence of
minibatches, it trains

* Adam (``torch.compile``'d forward, backward and update, as in ``step_time.py``)
  with learning rates 3e-4, 1e-3 and 3e-3; the *target* is the best final training
  loss among them (the training loss on the whole training set);
* curvgraph with each configuration named by ``--configs`` (``default``: the
  defaults of ``curvgraph.compile``; others are presets in :data:`CONFIGS`, e.g. the
  other methods at their defaults);
* with ``--peers``, the ``singd`` package at its defaults with ``T=10`` and ``T=1``.

The runs are interleaved: every run takes its step ``i`` before any takes step
``i + 1``, so that the machine's speed drifting (by up to 30% here) affects all alike.

The training loss on the whole training set is evaluated every ``eval_every`` steps
(outside the timed region). Reported per run: steps to the target, wall time to the
target with and without compilation, and these as ratios to the best Adam's. Wall
time *without compilation* counts every step slower than 5x the run's median step at
the median (those are the steps that compile a variant of the step); *with
compilation* is the plain sum. "x FLOPs/step" is the plan's FLOP count of the curvgraph step
over an Adam step's (forward, backward and update; ``step_time.flop_ratio``), and "x wall at
bound" the steps ratio times it: the wall-time ratio if both steps ran at the same FLOP rate
(where both are compute-bound, about the best this step can do at this number of steps).
Loss-versus-time and loss-versus-steps plots go to
``benchmarks/results/time_to_target_<model>.png``, the figures to
``benchmarks/results/time_to_target.json``.
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
from torch import Tensor, nn

import curvgraph
from curvgraph.demo import batches

sys.path.insert(0, os.path.dirname(__file__))
from step_time import compiled_adam_step, flop_ratio, small_resnet  # noqa: E402  (step_time adds examples/ to the path)

ADAM_LRS = (3e-4, 1e-3, 3e-3)

#: curvgraph configurations by name; ``default`` is curvgraph.compile's defaults.
CONFIGS: dict[str, dict] = {
    "default": {},
    "fixed": {"lr": 2e-3, "momentum": 0.9, "kl_clip": 1e-3},
    "fixed-noclip": {"lr": 1e-3, "momentum": 0.9, "kl_clip": None},
    "auto": {"lr": "auto", "momentum": "auto"},
    "auto-empirical": {"lr": "auto", "momentum": "auto", "fisher": "empirical"},
    "auto-T5": {"lr": "auto", "momentum": "auto", "invert_every": 5},
    "damping1e-5": {"damping": 1e-5},  # the adaptive mode's initial damping (Levenberg-Marquardt from there)
    "decay0.8": {"damping_decay": 0.8},  # the Levenberg-Marquardt factor omega: the damping moves 20% per step, not 5%
    "T1": {"invert_every": 1},  # the preconditioner refreshed every step
    "stats2": {"factor_every": 2},  # factor statistics (and the Fisher's backward) every second step only
    "stats4": {"factor_every": 4},
    "reduce": {"kfac_approx": "reduce"},  # KFAC-reduce statistics for weight sharing (conv: averaged patches)
    "split64": {"max_factor_dim": 64},  # block-diagonal factors of at most 64 (what the split costs in progress)
    "split128": {"max_factor_dim": 128},
    "split256": {"max_factor_dim": 256},
    "every2": {"conv_stats_every": 2},  # conv input factors from every second position along each spatial dim
    "singd": {"method": "singd"},
    "ekfac": {"method": "ekfac"},
    "kbfgs": {"method": "kbfgs"},
    "kbfgs_l": {"method": "kbfgs_l"},
}


@dataclass
class Task:
    """A suite model: its data, loss, batch size and number of steps."""

    make: Callable[[], nn.Module]
    data: Callable[[], tuple[Tensor, Tensor]]
    loss: str
    batch: int
    steps: int
    eval_every: int


def mnist1d() -> tuple[Tensor, Tensor]:
    from curvgraph.demo import load_mnist1d

    data = load_mnist1d()
    return data.x_train, data.y_train


def digits(size: int | None = None, channels: int | None = None) -> tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 digits in [0, 1]: flat 64 features, or upsampled to ``size`` x ``size``
    (bilinear; flat if ``channels`` is None, else ``channels`` identical image channels)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    if size is not None:
        x = F.interpolate(x.reshape(-1, 1, 8, 8), size=(size, size), mode="bilinear", align_corners=False)
        x = x.flatten(1) if channels is None else x.expand(-1, channels, -1, -1).contiguous()
    return x, torch.tensor(y)


def autoencoder_data() -> tuple[Tensor, Tensor]:
    x, _ = digits(28)
    return x, x


def gelu_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(40, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 128),
                         nn.GELU(), nn.Linear(128, 10))


def mnist1d_cnn() -> nn.Module:
    from curvgraph.demo import cnn

    return cnn(0)


def autoencoder() -> nn.Module:
    """The deep autoencoder of Hinton & Salakhutdinov (2006), as in the K-FAC paper's benchmarks."""
    sizes = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 and b != 30:
            layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def layernorm_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.LayerNorm(128), nn.Linear(128, 128), nn.Tanh(),
                         nn.LayerNorm(128), nn.Linear(128, 10))


def wide_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(40, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def char_windows() -> tuple[Tensor, Tensor]:
    """1024 non-overlapping 64-character windows of ``examples/char_transformer.py``'s corpus and their next
    characters (the training set of the char-level transformer)."""
    from char_transformer import corpus, encode

    data = encode(corpus())[: 1024 * 64 + 1]
    return data[:-1].reshape(1024, 64), data[1:].reshape(1024, 64)


def char_transformer() -> nn.Module:
    """2 layers, d=64, 4 heads, context 64, tied embedding/head (``examples/char_transformer.py``)."""
    from char_transformer import ALPHABET, CharTransformer

    return CharTransformer(len(ALPHABET) + 1, 64, 4, 2, 64)


def mnist1d_gru() -> nn.Module:
    """``examples/mnist1d_gru.py``'s GRU classifier, hidden 32 (40 steps of one feature)."""
    from mnist1d_gru import GRUClassifier

    return GRUClassifier(32)


SUITE: dict[str, Task] = {
    "mnist1d-mlp": Task(gelu_mlp, mnist1d, "cross_entropy", 100, 1200, 40),
    "mnist1d-cnn": Task(mnist1d_cnn, mnist1d, "cross_entropy", 100, 1200, 40),
    "autoencoder": Task(autoencoder, autoencoder_data, "bce_with_logits", 100, 540, 18),
    "resnet-digits": Task(small_resnet, lambda: digits(32, 3), "cross_entropy", 64, 280, 28),
    "digits-layernorm-mlp": Task(layernorm_mlp, digits, "cross_entropy", 64, 560, 28),
    "mnist1d-wide-mlp": Task(wide_mlp, mnist1d, "cross_entropy", 500, 240, 8),
    "char-transformer": Task(char_transformer, char_windows, "token_cross_entropy", 32, 320, 16),
    "mnist1d-gru": Task(mnist1d_gru, mnist1d, "cross_entropy", 100, 400, 20),
}

LOSSES = {"cross_entropy": F.cross_entropy, "bce_with_logits": F.binary_cross_entropy_with_logits,
          "token_cross_entropy": lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten())}


def train_interleaved(task: Task, runners: dict[str, tuple[nn.Module, Callable[[Tensor, Tensor], object]]],
                      x: Tensor, y: Tensor, indices: list[Tensor]) -> dict[str, dict]:
    """Run every runner's ``step`` over the same minibatches, in turn step by step (so that the
    machine's speed drifting affects all alike); the whole-training-set loss every ``eval_every``
    steps, outside the timed region."""
    loss_fn = LOSSES[task.loss]
    seconds: dict[str, list[float]] = {label: [] for label in runners}
    curves: dict[str, list[tuple[int, float]]] = {label: [] for label in runners}

    def evaluate(done: int) -> None:
        with torch.no_grad():
            for label, (model, _) in runners.items():
                curves[label].append((done, float(loss_fn(model(x), y))))

    evaluate(0)
    for i, idx in enumerate(indices):
        batch = (x[idx], y[idx])
        for label, (_, step) in runners.items():
            start = time.perf_counter()
            step(*batch)
            seconds[label].append(time.perf_counter() - start)
        if (i + 1) % task.eval_every == 0 or i + 1 == len(indices):
            evaluate(i + 1)
    runs = {}
    for label in runners:
        median = statistics.median(seconds[label])
        steady = [min(s, median) if s > 5 * median else s for s in seconds[label]]
        runs[label] = {"curve": curves[label], "seconds": seconds[label], "steady_seconds": steady,
                       "final_loss": curves[label][-1][1], "median_ms": 1e3 * median}
    return runs


def time_to(run: dict, target: float) -> dict:
    """Steps and wall times (with and without compilation) at the first evaluation at or below ``target``."""
    for done, loss in run["curve"]:
        if loss <= target:
            return {"steps": done, "wall": sum(run["seconds"][:done]), "wall_steady": sum(run["steady_seconds"][:done])}
    return {"steps": None, "wall": None, "wall_steady": None}


def singd_step(model: nn.Module, loss_fn: Callable, T: int) -> Callable[[Tensor, Tensor], Tensor]:
    """The ``singd`` package's SINGD at its defaults with ``T`` (its hooks precondition ``nn.Linear``/``nn.Conv2d``)."""
    from singd.optim.optimizer import SINGD

    opt = SINGD(model, T=T, warn_unsupported=False)

    def step(x: Tensor, y: Tensor) -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def run_task(name: str, configs: list[str], peers: bool = False) -> dict:
    task = SUITE[name]
    x, y = task.data()
    indices = batches(len(x), task.batch, task.steps, seed=0)  # the same minibatches for every run
    runners: dict[str, tuple[nn.Module, Callable]] = {}
    optimizers = {}
    for lr in ADAM_LRS:
        torch.manual_seed(0)
        model = task.make()
        runners[f"adam-{lr:g}"] = (model, compiled_adam_step(model, lr, LOSSES[task.loss]))
    if peers:
        for T in (10, 1):
            torch.manual_seed(0)
            model = task.make()
            runners[f"singd-T{T}"] = (model, singd_step(model, LOSSES[task.loss], T))
    for config in configs:
        torch.manual_seed(0)
        model = task.make()
        opt = curvgraph.compile(model, (x[indices[0]],), loss=task.loss, seed=0, **CONFIGS[config])
        runners[f"curvgraph-{config}"] = (model, opt.step)
        optimizers[f"curvgraph-{config}"] = opt
    runs = train_interleaved(task, runners, x, y, indices)
    for label, run in runs.items():
        counts = ""
        if label in optimizers:
            stats = optimizers[label].stats()
            run["skipped_steps"], run["rejected_steps"] = stats["skipped_steps"], stats.get("rejected_steps")
            counts = f", skipped {stats['skipped_steps']}, rejected {stats.get('rejected_steps', '-')}"
        print(f"  {name} {label}: final loss {run['final_loss']:.4g}, median step {run['median_ms']:.2f} ms{counts}",
              flush=True)
    best = min((r for r in runs if r.startswith("adam")), key=lambda r: runs[r]["final_loss"])
    target = runs[best]["final_loss"]
    reference = time_to(runs[best], target)
    summary = {}
    for label, run in runs.items():
        reached = time_to(run, target)
        row = {**reached, "final_loss": run["final_loss"], "median_ms": run["median_ms"],
               "compile_s": sum(run["seconds"]) - sum(run["steady_seconds"])}
        if label in optimizers:
            row["flop_ratio"] = flop_ratio(optimizers[label])
        if reached["steps"] is not None:
            row["steps_ratio"] = reached["steps"] / reference["steps"]
            row["wall_ratio"] = reached["wall"] / reference["wall"]
            row["wall_steady_ratio"] = reached["wall_steady"] / reference["wall_steady"]
            if "flop_ratio" in row:
                row["wall_at_bound_ratio"] = row["steps_ratio"] * row["flop_ratio"]
        summary[label] = row
    return {"target": target, "best_adam": best, "summary": summary,
            "curves": {label: run["curve"] for label, run in runs.items()},
            "cumulative_steady": {label: _cumulative(run["steady_seconds"]) for label, run in runs.items()}}


def _cumulative(values: list[float]) -> list[float]:
    total, out = 0.0, [0.0]
    for v in values:
        total += v
        out.append(total)
    return out


def plot(name: str, result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_steps) = plt.subplots(1, 2, figsize=(11, 4))
    for label, curve in result["curves"].items():
        steps, losses = zip(*curve)
        times = [result["cumulative_steady"][label][s] for s in steps]
        style = "--" if label.startswith("adam") else "-"
        by_time.plot(times, losses, style, label=label)
        by_steps.plot(steps, losses, style, label=label)
    for ax, xlabel in ((by_time, "wall time, compilation excluded (s)"), (by_steps, "steps")):
        ax.axhline(result["target"], color="gray", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss (whole training set)")
    by_steps.legend(fontsize=8)
    fig.suptitle(f"{name}: target = best Adam's final loss ({result['best_adam']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(results: dict) -> str:
    header = (f"{'model':<22} {'run':<26} {'final loss':>10} {'steps':>6} {'x steps':>8} {'x wall':>7} "
              f"{'x wall (no compile)':>20} {'x FLOPs/step':>12} {'x wall at bound':>15}")
    lines = [header, "-" * len(header)]
    for name, result in results.items():
        for label, row in result["summary"].items():
            ratio = (lambda k: f"{row[k]:.2f}" if k in row else "-")
            lines.append(f"{name:<22} {label:<26} {row['final_loss']:>10.4g} {str(row['steps'] or '-'):>6} "
                         f"{ratio('steps_ratio'):>8} {ratio('wall_ratio'):>7} {ratio('wall_steady_ratio'):>20} "
                         f"{ratio('flop_ratio'):>12} {ratio('wall_at_bound_ratio'):>15}")
    return "\n".join(lines)


def export_task(name: str, path: str) -> None:
    """Write ``name``'s data, minibatch indices and initial parameters (seed 0) to ``path`` (``.npz``) for peers
    that run outside PyTorch (``benchmarks/peers/``)."""
    import numpy as np

    task = SUITE[name]
    x, y = task.data()
    indices = batches(len(x), task.batch, task.steps, seed=0)
    torch.manual_seed(0)
    params = {f"param:{k}": v.detach().numpy() for k, v in task.make().named_parameters()}
    np.savez(path, x=x.numpy(), y=y.numpy(), indices=torch.stack(indices).numpy(), eval_every=task.eval_every, **params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(SUITE), choices=list(SUITE))
    parser.add_argument("--configs", nargs="*", default=["default"], choices=list(CONFIGS))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--peers", action="store_true", help="also the singd package (T=10 and T=1, its defaults)")
    parser.add_argument("--export-task", action="store_true",
                        help="only write each model's data, batches and initial parameters to <out>/task_<model>.npz")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.export_task:
        for name in args.models:
            export_task(name, os.path.join(args.out, f"task_{name}.npz"))
        return
    meta = {"torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}
    results = {}
    for name in args.models:
        print(f"{name}:", flush=True)
        # every model's Adam steps share one code object: without a reset, Dynamo's recompile limit (8)
        # ended a run of the whole suite at its sixth model
        torch._dynamo.reset()
        results[name] = run_task(name, args.configs, args.peers)
        plot(name, results[name], os.path.join(args.out, f"time_to_target_{name}.png"))
        print(table({name: results[name]}), flush=True)
        with open(os.path.join(args.out, "time_to_target.json"), "w") as f:  # after every model: a run may stop
            json.dump({"meta": meta, "results": {n: {k: v for k, v in r.items() if k != "cumulative_steady"}
                                                 for n, r in results.items()}}, f, indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
