"""Command line: ``curvgraph`` (console script) and ``python -m curvgraph``.

::

    curvgraph inspect path/to/model.py:factory --input-shape 32,784 [--loss mse] [--method kfac]
    curvgraph viz     path/to/model.py:factory --input-shape 32,784 -o graph.svg   # .dot .svg .html .graphml .json
    curvgraph export  path/to/model.py:factory --input-shape 32,784 -o step.py
    curvgraph demo

``factory`` is a function of the file, called without arguments, that returns the
model. ``--input-shape`` is repeated for a model with several inputs; inputs are
standard normal (``--input-dtype int64``: zeros, e.g. token ids). ``--option key=value``
passes a hyper-parameter or option to :func:`curvgraph.compile`. Bad arguments (a
missing file or factory, a bad shape) and curvgraph errors print one line to stderr
and exit with status 2.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import sys
from typing import Any, Sequence

from .errors import CurvgraphError

LOSSES = ("cross_entropy", "mse", "bce_with_logits")


class UsageError(Exception):
    """A command-line argument that cannot be used (reported on one line, exit status 2)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="curvgraph", description="Second-order training steps compiled from FX graphs.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="print the plan: blocks, factor shapes, costs, fallback parameters")
    _model_arguments(inspect)
    viz = commands.add_parser("viz", help="draw the graph and its blocks (.dot, .svg, .html, .graphml, .json)")
    _model_arguments(viz)
    viz.add_argument("-o", "--output", required=True, help="the file to write; its suffix picks the format")
    export = commands.add_parser("export", help="write the step as a Python module that needs torch alone")
    _model_arguments(export)
    export.add_argument("-o", "--output", required=True, help="the module to write (.py)")
    export.add_argument("--backend", default="inductor", help="the exported step's default backend (default inductor)")

    demo = commands.add_parser("demo", help="train an MLP (or CNN) on MNIST-1D with K-FAC and with Adam (best of 3 learning rates)")
    demo.add_argument("--model", choices=("mlp", "cnn"), default="mlp", help="the MLP (default) or the paper's CNN")
    demo.add_argument("--steps", type=int, default=2000, help="training steps (default 2000: 50 epochs)")
    demo.add_argument("--batch-size", type=int, default=100)
    demo.add_argument("--backend", default="inductor", help="torch.compile backend, or 'eager' (default inductor)")
    demo.add_argument("--out", default="curvgraph-demo.png",
                      help="where to write the loss curves ('' to skip); the graph goes beside it as .svg and .html")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no plan and no progress bars")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from .demo import run

        run(steps=args.steps, batch_size=args.batch_size, backend=args.backend, out=args.out or None,
            seed=args.seed, progress=not args.quiet, model=args.model)
        return 0
    try:
        return _model_command(args)
    except (UsageError, CurvgraphError) as exc:
        message = " ".join(str(exc).split())  # one line
        print(message if message.startswith("curvgraph") else f"curvgraph: {message}", file=sys.stderr)
        return 2


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="FILE.py:FACTORY", help="a Python file and a function in it that returns the model")
    parser.add_argument("--input-shape", action="append", required=True, metavar="D0,D1,...",
                        help="shape of an example input, batch first (repeat for several inputs)")
    parser.add_argument("--input-dtype", default="float32", choices=("float32", "float64", "int64"),
                        help="dtype of the example inputs (int64: zeros, e.g. token ids)")
    parser.add_argument("--loss", default="cross_entropy", choices=LOSSES)
    parser.add_argument("--method", default="kfac", help="a registered method (default kfac)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an option or hyper-parameter of curvgraph.compile, e.g. --option damping=0.01")


def _model_command(args: argparse.Namespace) -> int:
    import torch

    import curvgraph

    model = load_factory(args.model)
    dtype = getattr(torch, args.input_dtype)
    shapes = [parse_shape(s) for s in args.input_shape]
    generator = torch.Generator().manual_seed(0)
    inputs = tuple(torch.zeros(s, dtype=dtype) if dtype == torch.int64 else torch.randn(s, generator=generator, dtype=dtype)
                   for s in shapes)
    options = dict(parse_option(o) for o in args.option)
    options.setdefault("backend", args.backend if args.command == "export" else "eager")
    opt = curvgraph.compile(model, inputs, loss=args.loss, method=args.method, **options)
    if args.command == "inspect":
        print(opt.plan)
    elif args.command == "viz":
        print(f"wrote {curvgraph.visualize(opt, args.output)}")
    else:
        path = opt.export(args.output)
        extra = os.path.splitext(path)[0] + ".pt"
        print(f"wrote {path}" + (f" and {extra}" if os.path.exists(extra) else ""))
    return 0


def load_factory(spec: str) -> Any:
    """The model returned by ``FACTORY()`` of ``FILE.py:FACTORY``."""
    import torch

    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise UsageError(f"curvgraph: give the model as FILE.py:FACTORY (a file and a function in it), got {spec!r}.")
    if not os.path.isfile(path):
        raise UsageError(f"curvgraph: no such file: {path!r}.")
    directory = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, directory)  # the model's file may import its neighbours
    try:
        module_name = "curvgraph_cli_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise UsageError(f"curvgraph: cannot import {path!r} as a Python file.")
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # reported on one line below
            raise UsageError(f"curvgraph: importing {path!r} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(directory)
    factory = getattr(module, name, None)
    if not callable(factory):
        defined = sorted(k for k, v in vars(module).items() if callable(v) and getattr(v, "__module__", None) == module_name)
        raise UsageError(f"curvgraph: {path!r} has no function {name!r} (it defines: {', '.join(defined) or 'none'}).")
    try:
        model = factory()
    except Exception as exc:  # reported on one line below
        raise UsageError(f"curvgraph: {name}() in {path!r} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"curvgraph: {name}() in {path!r} returned {type(model).__name__}, not an nn.Module.")
    return model


def parse_shape(text: str) -> tuple[int, ...]:
    """``"32,784"`` -> ``(32, 784)``: positive integers, batch first."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise UsageError(f"curvgraph: bad --input-shape {text!r}: give positive integers separated by commas, "
                         "batch first, e.g. --input-shape 32,784.")
    return shape


def parse_option(text: str) -> tuple[str, Any]:
    """``"damping=0.01"`` -> ``("damping", 0.01)`` (a Python literal, else the string)."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise UsageError(f"curvgraph: bad --option {text!r}: give KEY=VALUE, e.g. --option damping=0.01.")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value
