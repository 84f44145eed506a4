"""Curvature math every kind shares, on tensors only: Kronecker-factor moments, Fisher types per loss.

Nothing here knows about FX or about update rules; the code generator copies the
functions a step needs into the step's source. Each kind's own factor math lives
with the kind (:mod:`curvgraph.kinds`).
"""
