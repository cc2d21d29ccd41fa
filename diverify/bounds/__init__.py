"""Bound propagation over JAX programs (jaxprs): IBP, forward and backward
linear relaxations (CROWN) and optimised slopes (alpha-CROWN).

Public API::

    from diverify import bounds
    from diverify.specs import lp_ball

    out = bounds.crown(fn, lp_ball(x, 1e-3))            # IntervalBound(s) like fn's output
    res = bounds.bound(fn, lp_ball(x, 1e-3), method="alpha-CROWN", spec=C)
    res.output.lower, res.output.upper, res.intermediates
"""

from diverify.bounds.api import METHODS, BoundFunction, BoundResult, bound, canonical_method, compile_bounds, crown, ibp
from diverify.bounds.interval import IntervalBound

__all__ = [
    "METHODS",
    "BoundFunction",
    "BoundResult",
    "IntervalBound",
    "bound",
    "canonical_method",
    "compile_bounds",
    "crown",
    "ibp",
]
