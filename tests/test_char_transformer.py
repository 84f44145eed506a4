"""The char-level transformer example (examples/char_transformer.py), small: curvgraph's defaults
reach a lower validation loss than AdamW at the best of three learning rates after the same steps.

Seeded; one layer, width 32, context 32, batch 16, 100 steps on standard-library source.
AdamW runs at 3e-3, 1e-2 and 3e-2 (weight decay 0.01); the best validation loss counts.
"""

from __future__ import annotations

from char_transformer import run


def test_defaults_beat_the_best_adamw_on_validation_loss():
    results = run(steps=100, layers=1, width=32, heads=2, context=32, batch=16, backend="eager",
                  adam_lrs=(3e-3, 1e-2, 3e-2), verbose=False)
    best_adamw = min(v for k, v in results.items() if k.startswith("adamw"))
    assert results["curvgraph"] < best_adamw < results["initial"], results
