"""Forward linear bound propagation ("forward CROWN" / symbolic intervals).

Every value ``v`` is carried forward as an affine function of the perturbed
inputs plus an interval slack::

    v = sum_i <A_v^i, x_i> + b_v + d_v,        d_v in [dl_v, du_v]

Affine nodes map ``A`` and ``b`` exactly (JAX's own linear map of the
primitive, ``vmap``-ed over the input coordinates) and the slack through
``|L|``. A unary node with relaxation ``ls x + li <= y <= us x + ui`` on its
input interval keeps the middle slope ``s = (ls + us) / 2`` and moves the
rest, ``y - s x in [min((ls - s) x) + li, max((us - s) x) + ui]``, into the
slack. A product uses ``xy = c_y x + c_x y - c_x c_y + (x - c_x)(y - c_y)``
with interval midpoints ``c`` and ``|(x - c_x)(y - c_y)| <= r_x r_y``.

Concretising ``v`` asks each input set for ``min/max <A_v^i, x_i>``. The
cost grows with the number of input coordinates, not with the output size,
which makes this the cheap method when few coordinates are perturbed (one
token) and the source of intermediate bounds for the backward pass
(``crown-forward``). Sound in exact arithmetic.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from diverify.bounds import elementwise
from diverify.bounds.graph import Const, Graph, Node
from diverify.bounds.interval import intersect, node_interval
from diverify.bounds.ops import kind, linear_part, linear_radius


@dataclasses.dataclass(frozen=True)
class Affine:
    """``v = sum_i <coeffs[i], x_i> + offset + [slack_lo, slack_hi]``; coeffs[i]
    has shape ``input_i.shape + v.shape`` (None when v does not depend on x_i)."""

    coeffs: tuple
    offset: jax.Array
    slack_lo: jax.Array
    slack_hi: jax.Array


def _scale_interval(s, lo, hi):
    return jnp.minimum(s * lo, s * hi), jnp.maximum(s * lo, s * hi)


def concretise(v: Affine, input_sets):
    """Elementwise ``[min, max]`` of ``v`` over the input sets."""
    lo, hi = v.offset + v.slack_lo, v.offset + v.slack_hi
    for coeff, s in zip(v.coeffs, input_sets):
        if coeff is None:
            continue
        n = len(s.center.shape)
        rows = jnp.moveaxis(coeff.reshape(s.center.shape + (-1,)), -1, 0)
        shape = coeff.shape[n:]
        lo = lo + s.minimize_linear(rows).reshape(shape)
        hi = hi - s.minimize_linear(-rows).reshape(shape)
    return lo, hi


def _linear_forward(node: Node, ins: list, in_shapes):
    f = linear_part(node)
    positions = node.bounded_inputs
    bounded = [ins[i] for i in positions]
    args = [v.value if isinstance(v, Const) else v.offset for v in ins]
    offsets = node.evaluate(*args)

    coeffs = []
    for k in range(len(node.outputs)):
        per_input = []
        for i, shape in enumerate(in_shapes):
            terms = [b.coeffs[i] for b in bounded]
            if all(t is None for t in terms):
                per_input.append(None)
                continue
            n = len(shape)
            flat = [jnp.zeros((1,) + node.in_avals[p].shape) if t is None else t.reshape((-1,) + t.shape[n:])
                    for t, p in zip(terms, positions)]
            size = max(t.shape[0] for t in flat)
            flat = [jnp.broadcast_to(t, (size,) + t.shape[1:]) for t in flat]
            mapped = jax.vmap(lambda *ts: f(*ts)[k])(*flat)
            per_input.append(mapped.reshape(tuple(shape) + mapped.shape[1:]))
        coeffs.append(tuple(per_input))
    centers = [(b.slack_lo + b.slack_hi) / 2 for b in bounded]
    radii = [(b.slack_hi - b.slack_lo) / 2 for b in bounded]
    slack_c = f(*centers)
    slack_r = linear_radius(node, radii)
    return [Affine(c, o, sc - sr, sc + sr) for c, o, sc, sr in zip(coeffs, offsets, slack_c, slack_r)]


def _scale_coeffs(coeffs, s):
    return tuple(None if c is None else c * s for c in coeffs)


def _add_coeffs(a, b):
    return tuple(x if y is None else y if x is None else x + y for x, y in zip(a, b))


def _unary_forward(node: Node, x: Affine, bounds, alpha=None):
    l, u = bounds
    r = elementwise.linear_bounds(node, l, u)
    s = (r.lower_slope + r.upper_slope) / 2
    dl, dh = r.lower_slope - s, r.upper_slope - s
    lo = jnp.minimum(dl * l, dl * u) + r.lower_intercept
    hi = jnp.maximum(dh * l, dh * u) + r.upper_intercept
    sl, sh = _scale_interval(s, x.slack_lo, x.slack_hi)
    return Affine(_scale_coeffs(x.coeffs, s), s * x.offset, sl + lo, sh + hi)


def _lift(coeffs, in_shapes, shape):
    """Broadcast coefficient tensors ``input_shape + v_shape`` to ``input_shape + shape``."""
    out = []
    for c, ins in zip(coeffs, in_shapes):
        if c is None:
            out.append(None)
            continue
        v_shape = c.shape[len(ins):]
        c = c.reshape(tuple(ins) + (1,) * (len(shape) - len(v_shape)) + v_shape)
        out.append(jnp.broadcast_to(c, tuple(ins) + tuple(shape)))
    return tuple(out)


def _product_forward(node: Node, x: Affine, y: Affine, bx, by, in_shapes):
    shape = node.out_avals[0].shape
    cx, rx = (bx[0] + bx[1]) / 2, (bx[1] - bx[0]) / 2
    cy, ry = (by[0] + by[1]) / 2, (by[1] - by[0]) / 2
    coeffs = _add_coeffs(_scale_coeffs(_lift(x.coeffs, in_shapes, shape), cy),
                         _scale_coeffs(_lift(y.coeffs, in_shapes, shape), cx))
    offset = cy * x.offset + cx * y.offset - cx * cy
    xl, xh = _scale_interval(cy, x.slack_lo, x.slack_hi)
    yl, yh = _scale_interval(cx, y.slack_lo, y.slack_hi)
    rr = rx * ry
    return Affine(coeffs, jnp.broadcast_to(offset, shape), xl + yl - rr, xh + yh + rr)


def _dot_forward(node: Node, x: Affine, y: Affine, bx, by, in_shapes):
    dot = lambda a, b: node.evaluate(a, b)[0]  # noqa: E731
    cx, rx = (bx[0] + bx[1]) / 2, (bx[1] - bx[0]) / 2
    cy, ry = (by[0] + by[1]) / 2, (by[1] - by[0]) / 2
    coeffs = []
    for i, shape in enumerate(in_shapes):
        n = len(shape)
        terms = []
        if x.coeffs[i] is not None:
            t = x.coeffs[i].reshape((-1,) + x.coeffs[i].shape[n:])
            terms.append(jax.vmap(lambda a: dot(a, cy))(t))
        if y.coeffs[i] is not None:
            t = y.coeffs[i].reshape((-1,) + y.coeffs[i].shape[n:])
            terms.append(jax.vmap(lambda b: dot(cx, b))(t))
        coeffs.append(None if not terms else sum(terms).reshape(tuple(shape) + node.out_avals[0].shape))
    offset = dot(x.offset, cy) + dot(cx, y.offset) - dot(cx, cy)
    sxc, sxr = (x.slack_lo + x.slack_hi) / 2, (x.slack_hi - x.slack_lo) / 2
    syc, syr = (y.slack_lo + y.slack_hi) / 2, (y.slack_hi - y.slack_lo) / 2
    c = dot(sxc, cy) + dot(cx, syc)
    r = dot(sxr, jnp.abs(cy)) + dot(jnp.abs(cx), syr) + dot(rx, ry)
    return Affine(tuple(coeffs), offset, c - r, c + r)


def propagate(graph: Graph, input_sets):
    """Forward linear bounds of every value: returns (intervals id -> (l, u), domain flags, affine forms)."""
    in_shapes = [tuple(s.center.shape) for s in input_sets]
    forms: dict = {}
    env: dict = {}
    for i, (vid, s) in enumerate(zip(graph.inputs, input_sets)):
        eye = jnp.eye(s.center.size, dtype=jnp.float32).reshape(in_shapes[i] + in_shapes[i])
        coeffs = tuple(eye if j == i else None for j in range(len(input_sets)))
        zero = jnp.zeros(in_shapes[i], jnp.float32)
        forms[vid] = Affine(coeffs, zero, zero, zero)
        env[vid] = s.interval()
    flags = []
    for node in graph.nodes:
        ins_iv = [v if isinstance(v, Const) else env[v] for v in node.inputs]
        outs_iv, ok = node_interval(node, ins_iv)
        k = kind(node)
        if k == "linear":
            ins = [v if isinstance(v, Const) else forms[v] for v in node.inputs]
            outs = _linear_forward(node, ins, in_shapes)
        elif k == "unary":
            (x,) = node.inputs
            outs = [_unary_forward(node, forms[x], env[x])]
            ok = jnp.all(elementwise.domain_ok(node, *env[x]))
        elif k == "product":
            x, y = node.inputs
            outs = [_product_forward(node, forms[x], forms[y], env[x], env[y], in_shapes)]
        else:
            x, y = node.inputs
            outs = [_dot_forward(node, forms[x], forms[y], env[x], env[y], in_shapes)]
        flags.append(ok)
        for vid, form, iv in zip(node.outputs, outs, outs_iv):
            lo, hi = concretise(form, input_sets)
            forms[vid] = form
            env[vid] = intersect((lo, hi), iv)
    return env, flags, forms
