"""A causal character-level transformer on Python's own standard library, K-FAC against AdamW.

    python examples/char_transformer.py                 # 2 layers, d=64, context 64, 400 steps
    python examples/char_transformer.py --layers 4 --width 256 --heads 4 --context 128 --steps 2000

The text is the source of a fixed list of standard-library modules (every Python install
has it), read with ``inspect``; the first 90% is the training split, the rest the
validation split. The model is GPT-style: token embedding tied to the output head, a
learned positional table, pre-norm ``nn.TransformerEncoderLayer`` blocks with a causal
mask, a final LayerNorm; the loss is ``token_cross_entropy`` on logits ``(N, T, V)``.

curvgraph runs at its defaults (``lr="auto"``: step size, momentum and damping from the
quadratic model); AdamW (weight decay 0.01) runs at each of three learning rates and
the best validation loss counts. Both see the same batches from the same
initialization.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import math
import time

import torch
from torch import nn

#: Standard-library modules whose source is the corpus (fixed, so the text is the same on every install).
MODULES = ("argparse", "textwrap", "json.decoder", "json.encoder", "string", "shlex", "fractions", "calendar",
           "difflib", "heapq", "bisect", "functools", "dataclasses", "enum", "pprint", "configparser")
#: The characters modelled; anything else maps to the last id.
ALPHABET = "".join(chr(c) for c in range(32, 127)) + "\n"


def corpus() -> str:
    """The concatenated source of :data:`MODULES`."""
    return "\n".join(inspect.getsource(importlib.import_module(name)) for name in MODULES)


def encode(text: str) -> torch.Tensor:
    """Character ids (``len(ALPHABET)`` for characters outside it)."""
    index = {c: i for i, c in enumerate(ALPHABET)}
    return torch.tensor([index.get(c, len(ALPHABET)) for c in text], dtype=torch.long)


class CharTransformer(nn.Module):
    """GPT-style: tied token embedding / head, learned positions, pre-norm causal encoder layers."""

    def __init__(self, vocab: int, width: int, heads: int, layers: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(0.02 * torch.randn(1, context, width))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight
        nn.init.normal_(self.embed.weight, std=0.02)  # GPT-2's initialization of the tied table

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        mask = torch.full((length, length), float("-inf")).triu(1)
        h = self.embed(tokens) + self.positions[:, :length]
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


def batches(data: torch.Tensor, steps: int, batch: int, context: int, seed: int):
    """``steps`` random windows ``(inputs, next-character targets)`` of ``batch x context``."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, len(data) - context - 1, (batch,), generator=g)
        window = torch.stack([data[s:s + context + 1] for s in start.tolist()])
        yield window[:, :-1], window[:, 1:]


@torch.no_grad()
def validation_loss(model: nn.Module, data: torch.Tensor, context: int, windows: int = 64) -> float:
    """Mean next-character cross-entropy over ``windows`` evenly spaced validation windows."""
    starts = torch.linspace(0, len(data) - context - 2, windows).long().tolist()
    window = torch.stack([data[s:s + context + 1] for s in starts])
    logits = model(window[:, :-1])
    return nn.functional.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten()).item()


def train_adamw(model: nn.Module, lr: float, train, steps: int, batch: int, context: int, seed: int) -> float:
    """Train ``model`` with AdamW at ``lr``; returns the seconds spent."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    start = time.perf_counter()
    for x, y in batches(train, steps, batch, context, seed):
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def run(steps: int = 400, layers: int = 2, width: int = 64, heads: int = 4, context: int = 64, batch: int = 32,
        backend: str = "inductor", seed: int = 0, adam_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2),
        verbose: bool = True) -> dict[str, float]:
    """Train with curvgraph (defaults) and with AdamW at each of ``adam_lrs``; return the validation losses."""
    import curvgraph

    data = encode(corpus())
    split = int(0.9 * len(data))
    train, valid = data[:split], data[split:]
    vocab = len(ALPHABET) + 1
    torch.manual_seed(seed)
    initial = CharTransformer(vocab, width, heads, layers, context)
    results = {"initial": validation_loss(initial, valid, context)}

    model = copy.deepcopy(initial)
    x0, _ = next(batches(train, 1, batch, context, seed))
    start = time.perf_counter()
    opt = curvgraph.compile(model, (x0,), loss="token_cross_entropy", backend=backend)
    step_time = 0.0
    for i, (x, y) in enumerate(batches(train, steps, batch, context, seed)):
        tick = time.perf_counter()
        opt.step(x, y)
        if i > 0:
            step_time += time.perf_counter() - tick
    results["curvgraph"] = validation_loss(model, valid, context)
    if verbose:
        print(opt.plan)
        print(f"curvgraph K-FAC (defaults): validation loss {results['curvgraph']:.4f} after {steps} steps "
              f"({time.perf_counter() - start:.1f} s with compile, {step_time / max(steps - 1, 1) * 1e3:.1f} ms/step)")
    for lr in adam_lrs:
        adam_model = copy.deepcopy(initial)
        seconds = train_adamw(adam_model, lr, train, steps, batch, context, seed)
        results[f"adamw-{lr:g}"] = validation_loss(adam_model, valid, context)
        if verbose:
            print(f"AdamW lr={lr:g}: validation loss {results[f'adamw-{lr:g}']:.4f} ({seconds / steps * 1e3:.1f} ms/step, eager)")
    best = min((v, k) for k, v in results.items() if k.startswith("adamw"))
    if verbose:
        print(f"best AdamW ({best[1]}): {best[0]:.4f}; curvgraph: {results['curvgraph']:.4f} "
              f"({'lower' if results['curvgraph'] < best[0] else 'not lower'}); initial {results['initial']:.4f} "
              f"(uniform would be {math.log(vocab):.4f})")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run(args.steps, args.layers, args.width, args.heads, args.context, args.batch, args.backend, args.seed)


if __name__ == "__main__":
    main()
