"""Interval bound propagation (IBP) over a :class:`~diverify.bounds.graph.Graph`.

Every value ``v`` gets an elementwise interval ``[l_v, u_v]`` with
``l_v <= v(x) <= u_v`` for every ``x`` in the input set:

* affine nodes that are monotone in each operand (sums, reshapes, gathers,
  ``sub``, ...) map the end points; the others map the centre exactly and
  the radius through ``|L|`` (:func:`diverify.bounds.ops.linear_radius`);
* unary nodes use the tight image of :mod:`diverify.bounds.relaxations`;
* products of two perturbed values use the four-corner product interval;
  ``dot_general`` of two perturbed operands uses the centre/radius form
  ``|x y - c_x c_y| <= |c_x| r_y + r_x |c_y| + r_x r_y`` summed over the
  contraction.

Sound in exact arithmetic; float32 rounding of each step is of the order of
1e-7 relative and is checked by the sampling tests.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from diverify.bounds import elementwise, relaxations
from diverify.bounds.graph import Const, Graph, Node
from diverify.bounds.ops import SIGNED, STRUCTURAL, kind, linear_radius


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class IntervalBound:
    """Elementwise bounds ``lower <= value <= upper`` (a pytree)."""

    lower: jax.Array
    upper: jax.Array

    @property
    def shape(self):
        return self.lower.shape

    @property
    def width(self) -> jax.Array:
        return self.upper - self.lower

    @property
    def center(self) -> jax.Array:
        return (self.lower + self.upper) / 2


def _center_radius(iv):
    l, u = iv
    return (l + u) / 2, (u - l) / 2


def dot_general_interval(node: Node, x, y):
    """Interval of ``dot_general(x, y)`` for two interval operands."""
    (cx, rx), (cy, ry) = _center_radius(x), _center_radius(y)
    dot = lambda a, b: node.evaluate(a, b)[0]  # noqa: E731
    c = dot(cx, cy)
    r = dot(jnp.abs(cx), ry) + dot(rx, jnp.abs(cy)) + dot(rx, ry)
    return c - r, c + r


def _monotone_interval(node: Node, ins: list):
    """Interval of a linear node that is monotone in each perturbed operand
    (:data:`~diverify.bounds.ops.STRUCTURAL`: non-decreasing; ``sub``'s second
    operand and ``neg``: non-increasing), from the operands' end points:
    ``f(l) <= f(x) <= f(u)`` with the sign-flipped operands swapped.

    Exact in exact arithmetic, and in float the ends do not pass through the
    centre/radius form, whose ``c - r`` loses a small end next to a huge
    radius: ``1 + sum_j exp(d_j)`` with ``exp(d_j)`` in ``[0, 3e35]`` gets the
    lower end 1, not ``(1.5e35 + 1) - 1.5e35 = 0`` (which made a softmax
    denominator look as if it could reach 0 on MiniLM's sixth layer).
    """
    decreasing = {"neg": (0,), "sub": (1,)}.get(node.name, ())
    lows, highs = [], []
    for i, v in enumerate(ins):
        if isinstance(v, Const):
            lows.append(v.value)
            highs.append(v.value)
        else:
            lo, hi = (v[1], v[0]) if i in decreasing else v
            lows.append(lo)
            highs.append(hi)
    return list(zip(node.evaluate(*lows), node.evaluate(*highs)))


def node_interval(node: Node, ins: list):
    """Output intervals of ``node`` given its inputs (intervals for perturbed
    inputs, :class:`Const` for the others). Returns (list of intervals, domain-ok flag)."""
    k = kind(node)
    ok = jnp.array(True)
    if k == "linear" and (node.name in STRUCTURAL or node.name in SIGNED):
        return _monotone_interval(node, ins), ok
    if k == "linear":
        bounded = [ins[i] for i in node.bounded_inputs]
        args = [v.value if isinstance(v, Const) else _center_radius(v)[0] for v in ins]
        centers = node.evaluate(*args)
        radii = linear_radius(node, [_center_radius(b)[1] for b in bounded])
        return [(c - r, c + r) for c, r in zip(centers, radii)], ok
    if k == "unary":
        (l, u) = ins[0]
        ok = jnp.all(elementwise.domain_ok(node, l, u))
        return [elementwise.interval_image(node, l, u)], ok
    if k == "product":
        (lx, ux), (ly, uy) = ins
        return [relaxations.bilinear_interval(lx, ux, ly, uy)], ok
    return [dot_general_interval(node, ins[0], ins[1])], ok


def intersect(a, b):
    """Intersection of two sound intervals of the same value. In exact arithmetic
    they overlap; when float rounding leaves them disjoint by a hair, the hull
    of the two inner ends is returned so that ``lower <= upper`` always holds.
    A NaN end (an overflow such as ``inf - inf`` in one method's arithmetic)
    stands for no information: the other interval's end is taken (both NaN
    stays NaN, which the domain checks refuse)."""
    lo, hi = jnp.fmax(a[0], b[0]), jnp.fmin(a[1], b[1])
    return jnp.minimum(lo, hi), jnp.maximum(lo, hi)


def propagate(graph: Graph, input_intervals, overrides=None):
    """Intervals of every value of ``graph`` (dict id -> (l, u)) and per-node domain flags.

    ``overrides`` (id -> (l, u)) replaces a value's interval by a tighter one
    known from elsewhere (it is intersected with the IBP interval).
    """
    env: dict = dict(zip(graph.inputs, input_intervals))
    flags = []
    for node in graph.nodes:
        ins = [v if isinstance(v, Const) else env[v] for v in node.inputs]
        outs, ok = node_interval(node, ins)
        flags.append(ok)
        for vid, iv in zip(node.outputs, outs):
            if overrides and vid in overrides:
                iv = intersect(iv, overrides[vid])
            env[vid] = iv
    return env, flags
