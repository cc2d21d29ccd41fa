"""Elementwise nonlinear nodes: which relaxation of :mod:`diverify.bounds.relaxations` bounds them.

A unary node computes ``f(x) = b * g(a * x)`` for a tabulated function ``g``
and constants ``a, b > 0`` (SiLU is quick-GELU rescaled:
``silu(x) = 1.702 * quick_gelu(x / 1.702)``); sound bounds for ``g`` on
``[a*l, a*u]`` map to sound bounds for ``f`` on ``[l, u]``.
"""

from __future__ import annotations

from diverify.bounds import relaxations

_DIRECT = frozenset({
    "exp", "log", "tanh", "logistic", "erf", "sqrt", "rsqrt", "abs", "relu", "reciprocal",
    "square", "gelu_erf", "gelu_tanh", "quick_gelu", "softplus", "finite",
})
_SCALED = {"silu": ("quick_gelu", 1.0 / 1.702, 1.702)}


def _table(node) -> tuple[str, float, float] | None:
    if node.name in _DIRECT:
        return node.name, 1.0, 1.0
    if node.name in _SCALED:
        return _SCALED[node.name]
    if node.name == "integer_pow":
        y = int(node.params["y"])
        name = {1: None, 2: "square", -1: "reciprocal"}.get(y, f"integer_pow_{y}")
        if name in relaxations.SUPPORTED:
            return name, 1.0, 1.0
    return None


def is_unary(node) -> bool:
    entry = _table(node)
    return entry is not None and entry[0] in relaxations.SUPPORTED


def domain_ok(node, l, u):
    name, a, _ = _table(node)
    return relaxations.domain_ok(name, a * l, a * u)


def interval_image(node, l, u):
    """Sound elementwise interval of the node's output for inputs in ``[l, u]``."""
    name, a, b = _table(node)
    lo, hi = relaxations.interval_image(name, a * l, a * u)
    return b * lo, b * hi


def linear_bounds(node, l, u, alpha_lower=None, alpha_upper=None) -> relaxations.LinearBounds:
    """Sound elementwise linear lower/upper bounds of the node on ``[l, u]``."""
    name, a, b = _table(node)
    r = relaxations.linear_bounds(name, a * l, a * u, alpha_lower, alpha_upper)
    return relaxations.LinearBounds(
        lower_slope=b * a * r.lower_slope,
        lower_intercept=b * r.lower_intercept,
        upper_slope=b * a * r.upper_slope,
        upper_intercept=b * r.upper_intercept,
    )
