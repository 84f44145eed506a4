"""Command line: ``curvgraph demo`` / ``python -m curvgraph demo``."""

from __future__ import annotations

import argparse
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="curvgraph", description="Second-order training steps compiled from FX graphs.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train an MLP (or CNN) on MNIST-1D with K-FAC and with Adam (best of 3 learning rates)")
    demo.add_argument("--model", choices=("mlp", "cnn"), default="mlp", help="the MLP (default) or the paper's CNN")
    demo.add_argument("--steps", type=int, default=2000, help="training steps (default 2000: 50 epochs)")
    demo.add_argument("--batch-size", type=int, default=100)
    demo.add_argument("--backend", default="inductor", help="torch.compile backend, or 'eager' (default inductor)")
    demo.add_argument("--out", default="curvgraph-demo.png", help="where to write the loss curves ('' to skip)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no plan and no progress bars")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from .demo import run

        run(steps=args.steps, batch_size=args.batch_size, backend=args.backend, out=args.out or None,
            seed=args.seed, progress=not args.quiet, model=args.model)
    return 0
