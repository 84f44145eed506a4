"""Curvature math on tensors only: Kronecker factors per block kind, Fisher types per loss.

Nothing here knows about FX or about update rules; the code generator copies the
functions a step needs into the step's source.
"""
