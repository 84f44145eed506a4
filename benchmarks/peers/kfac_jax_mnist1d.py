"""kfac-jax (adaptive learning rate, momentum and damping) on the MNIST-1D MLP of ``time_to_target.py``.

Runs in its own environment (kfac-jax needs jax; curvgraph is not imported)::

    python -m venv /tmp/kfacjax && /tmp/kfacjax/bin/pip install jax==0.9.1 kfac-jax==0.0.8
    python benchmarks/time_to_target.py --models mnist1d-mlp --export-task      # data, batches, init
    python benchmarks/time_to_target.py --models mnist1d-mlp                     # Adam's target and wall time
    /tmp/kfacjax/bin/python benchmarks/peers/kfac_jax_mnist1d.py [--min-damping 1e-2]

Same data, minibatches and initial parameters as the PyTorch runs (``task_mnist1d-mlp.npz``);
the target is the best Adam's final training loss from ``time_to_target.json``. Reports
steps and wall time (jit compilation excluded: steps slower than 5x the median count at
the median, as in ``time_to_target.py``) to the target, as ratios to that Adam run, and
kfac-jax's per-step time. Writes ``benchmarks/results/kfac_jax_mnist1d.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import kfac_jax
import numpy as np

RESULTS = os.path.join(os.path.dirname(__file__), "..", "results")


def mlp(params: dict, x: jnp.ndarray) -> jnp.ndarray:
    """40-128-128-128-10 with GELU (tanh-free, erf form as torch's nn.GELU), weights ``(out, in)`` as in PyTorch."""
    h = x
    for i in range(4):
        h = h @ params[f"w{i}"].T + params[f"b{i}"]
        if i < 3:
            h = jax.nn.gelu(h, approximate=False)
    return h


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


def loss_fn(params: dict, batch: tuple) -> jnp.ndarray:
    x, y = batch
    logits = mlp(params, x)
    kfac_jax.register_softmax_cross_entropy_loss(logits, y)
    return cross_entropy(logits, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-damping", type=float, default=1e-8, help="kfac-jax's default is 1e-8")
    parser.add_argument("--initial-damping", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=None, help="default: every exported minibatch")
    args = parser.parse_args()

    task = np.load(os.path.join(RESULTS, "task_mnist1d-mlp.npz"))
    with open(os.path.join(RESULTS, "time_to_target.json")) as f:
        reference = json.load(f)["results"]["mnist1d-mlp"]
    target, best = reference["target"], reference["best_adam"]
    adam = reference["summary"][best]
    x, y = jnp.asarray(task["x"]), jnp.asarray(task["y"])
    indices = task["indices"][: args.steps]
    names = sorted({k.split(":")[1].split(".")[0] for k in task.files if k.startswith("param:")}, key=int)
    params = {}
    for i, layer in enumerate(names):
        params[f"w{i}"] = jnp.asarray(task[f"param:{layer}.weight"])
        params[f"b{i}"] = jnp.asarray(task[f"param:{layer}.bias"])

    optimizer = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss_fn), l2_reg=0.0, use_adaptive_learning_rate=True,
        use_adaptive_momentum=True, use_adaptive_damping=True, initial_damping=args.initial_damping,
        min_damping=args.min_damping, num_burnin_steps=0, multi_device=False)
    rng = jax.random.PRNGKey(0)
    first = (x[indices[0]], y[indices[0]])
    state = optimizer.init(params, rng, first)
    full_loss = jax.jit(lambda p: cross_entropy(mlp(p, x), y))

    seconds, curve, stats_log = [], [(0, float(full_loss(params)))], []
    eval_every = int(task["eval_every"])
    for i, idx in enumerate(indices):
        batch = (x[idx], y[idx])
        rng, key = jax.random.split(rng)
        start = time.perf_counter()
        params, state, stats = optimizer.step(params, state, key, batch=batch, global_step_int=i)
        jax.block_until_ready(params)
        seconds.append(time.perf_counter() - start)
        if (i + 1) % eval_every == 0 or i + 1 == len(indices):
            curve.append((i + 1, float(full_loss(params))))
            stats_log.append({k: float(stats[k]) for k in ("learning_rate", "momentum", "damping") if k in stats})
            if not np.isfinite(curve[-1][1]):
                break
    median = statistics.median(seconds)
    steady = [min(s, median) if s > 5 * median else s for s in seconds]
    reached = next((done for done, loss in curve if loss <= target), None)
    result = {"target": target, "best_adam": best, "final_loss": curve[-1][1], "median_ms": 1e3 * median,
              "steps": reached, "min_damping": args.min_damping, "curve": curve, "stats": stats_log,
              "adam_median_ms": adam["median_ms"]}
    if reached is not None:
        result.update(steps_ratio=reached / adam["steps"], wall_steady_ratio=sum(steady[:reached]) / adam["wall_steady"])
    print(f"kfac-jax adaptive (min_damping={args.min_damping:g}): final loss {result['final_loss']:.4g}, "
          f"median step {result['median_ms']:.2f} ms (Adam {adam['median_ms']:.2f} ms), target {target:.4g} "
          f"reached at step {reached} ({result.get('steps_ratio', float('nan')):.2f}x Adam's steps, "
          f"{result.get('wall_steady_ratio', float('nan')):.2f}x its wall time); last stats {stats_log[-1]}")
    suffix = "" if args.min_damping == 1e-8 else f"_min_damping_{args.min_damping:g}"
    with open(os.path.join(RESULTS, f"kfac_jax_mnist1d{suffix}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
