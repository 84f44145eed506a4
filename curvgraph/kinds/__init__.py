"""Block kinds: one package each, registered in pass order (rnn, dense, conv, norm, embedding, position, packed, tied,
bias).

Each kind owns its normalization rewrites, its matching pass, its factor structure and
statistics, its block matrix, and its cost (see :mod:`curvgraph.kinds.base`); the last
line of each kind's module registers it. Importing this package registers the
built-in kinds.
"""

from __future__ import annotations

from . import dense, rnn, conv, norm, embedding, position, packed, tied, bias  # noqa: F401 -- registration order is pass order (rnn registers itself before dense)
from .base import (BlockKind, BlockPass, block_name, has_example_rows, has_lag_moments, layer_use, matrix_shape, new_block,
                   weight_and_bias)

__all__ = ["BlockKind", "BlockPass", "block_name", "has_example_rows", "has_lag_moments", "layer_use", "matrix_shape", "new_block", "weight_and_bias"]
