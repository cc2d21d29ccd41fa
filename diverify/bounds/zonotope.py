"""Forward linear bounds: symbolic intervals, and zonotopes whose relaxation errors are fresh symbols.

This module implements two methods. ``forward`` ("forward CROWN", symbolic
intervals) carries every value as an affine function of the perturbed inputs
plus an interval slack; ``zonotope`` (DeepZ, Singh et al. 2018; DeepT,
Bonaert et al. 2021) in addition turns that slack into fresh error symbols.
Forward costs grow with the number of input coordinates, not with the output
size: the cheap method when few coordinates are perturbed (one token).

Every value ``v`` is carried forward as an affine function of *symbols* plus
an interval slack::

    v = offset + sum_b <T_b, s_b> + [slack_lo, slack_hi]

The symbol blocks ``s_b`` are the perturbed inputs (``s_b = x_i`` in its input
set) and *error blocks* (``s_b`` in ``[-1, 1]^n``, one fresh block per
relaxation). A value's error blocks are stored as the rows of one tensor
(:class:`Zonotope`), so that every node handles all of them in one operation;
two values that carry different error blocks are aligned (zero rows) before
they are combined. Affine nodes map every ``T_b`` exactly through JAX's own linear
map of the primitive; nonlinear nodes keep a middle slope and put their
remainder into the slack; a product uses ``xy = c_y x + c_x y - c_x c_y +
(x - c_x)(y - c_y)`` with interval midpoints ``c`` and ``|(x - c_x)(y - c_y)|
<= r_x r_y``. That is all ``forward`` does. ``zonotope`` differs in what
happens next: the slack of every
value of at most :data:`FRESH_LIMIT` elements becomes a fresh error block
``diag(radius)`` right away, so that the later linear layers map it with its
signs (``W diag(r)``) instead of through ``|W|``, and the residual branches,
LayerNorm's mean subtraction and the products of two values that share
an error keep their cancellations. Larger nodes (the FFN's GELU) keep their
slack through one linear map and become a fresh block at its (smaller)
output.

The number of error symbols is capped by *order reduction*: the
:data:`KEEP_SYMBOLS` error symbols that boxing would widen most (Girard's
criterion ``||g||_1 - ||g||_inf`` of the generator ``g`` over the value) are
kept as one new block and the rest are boxed (``|T_b|`` summed into the
slack, which becomes one fresh block of the value's size). The new
block is a copy: other live values that carry the old symbols no longer share
them, so a reduction in the middle of a branch loses the cancellations of the
later residual add. Reductions therefore happen at *cuts*: values after which
no other live value carries error symbols (in a transformer, the residual
sums and the LayerNorm steps between the blocks), when the value carries more
than :data:`CUT_BUDGET` error symbols. There the copy forgets nothing; only
the boxed remainder loses its correlations. :data:`SYMBOL_BUDGET` is a hard
cap (memory) that reduces anywhere. Measured on MiniLM, 2 layers, float64,
1e-6: reducing wherever a value exceeded 6144 symbols gave 3.3x the
linearised range of the output, at cuts only 1.06x, in half the time.

Slack that only elementwise nodes read stays slack (:func:`slack_carriers`): a fresh block
is made where the chain meets a node that mixes elements, and holds the errors of the whole
chain in one block (the same set: generators along one element add up). A ``reduce_sum`` reader
counts as elementwise there, since the sum of a slack is the box of its fresh block: a
LayerNorm's or GroupNorm's variance gets one symbol per token or group instead of one per
squared element.

Elements whose interval is a single point (tokens the perturbation has not
reached yet) are evaluated exactly instead of relaxed: no float32 padding
enters there.

Narrow error coefficients (``error_dtype``, the engine's ``precision="mixed"``): with float64
values, the error rows can be stored in float32 while offsets, input terms and slack stay
float64. Their rounding is bounded, not ignored: a linear node's map of rows ``g_i`` in
float32 (constants rounded to it) is within ``k eps |L| sum_i |g_i|`` of the exact one
(:func:`~diverify.bounds.ops.rounding_count`: ``k = n + 2`` for sums of ``n`` products),
an elementwise scaling within ``2 eps |s| sum_i |g_i|``; these go into the slack, which
later becomes a fresh block as a relaxation's remainder does. Sums ``sum_i |g_i|`` are
accumulated in float64, or over large values in the rows' type and padded (:func:`_mass`),
fresh radii rounded up. It halves the memory of the rows and runs their convolutions ~8x
faster on CPU (float64 convolutions are a slow path). The worst-case ``k`` is the price:
on the digits UNet at r = 1e-5 (contractions of at most 576) it costs 0.04% of the 3-step
product; through MiniLM's 1536-long FFN contractions it compounds (6 layers, 1e-5: 3.4x ->
11.6x the true range), so float64 stays the default there.

Concretising: input blocks ask their input set for ``min/max <T, x>``;
error blocks give ``+-sum |T|``. Only the values whose interval a later step
reads (:func:`intervals_read`) are concretised; the others keep their
interval-arithmetic interval (MiniLM, 2 layers, float64: same bound, 38%
less time, 14% less compilation). Sound in exact arithmetic; the relaxations'
float32 padding (:mod:`diverify.bounds.relaxations`) covers their rounding.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from diverify.bounds import elementwise
from diverify.bounds.graph import Const, Graph, Node
from diverify.bounds.interval import intersect, node_interval
from diverify.bounds.ops import kind, linear_part, linear_radius, relaxed_inputs, rounding_count
from diverify.bounds.synthetic import simplex_weights
from diverify.specs import AffineBall, Box, LpBall, linear_range

#: Nodes of at most this many elements turn their slack into fresh error symbols at once.
FRESH_LIMIT = 4096
#: Hard cap (memory): a value carrying more error symbols than this is reduced wherever it is.
SYMBOL_BUDGET = 24576
#: At a cut (no other live value carries error symbols) a value with more error symbols than this is reduced.
CUT_BUDGET = 13312
#: How many error symbols a reduction keeps (at a cut, and under the hard cap).
KEEP_SYMBOLS = 12288
#: Narrow error rows of values with more elements than this have their ``sum_i |g_i|`` summed in their own
#: type and padded (:func:`_mass`), not accumulated in float64.
FLOAT64_MASS_LIMIT = 2048
#: ... and only below this many rows (float32: the pad ``(n - 1) u`` stays under 1%).
MAX_PADDED_ROWS = 1 << 17


@dataclasses.dataclass(frozen=True)
class Zonotope:
    """``v = offset + sum_b <terms[b], s_b> + <errors, e> + [slack_lo, slack_hi]``.

    ``terms[b]`` (input blocks) has shape ``block_shape[b] + v.shape``; the error
    symbols of all the error blocks ``error_blocks`` are the rows of one tensor
    ``errors`` of shape ``(m,) + v.shape`` (block after block, each flattened), so
    that a node maps them in one operation however many relaxations they come from.
    """

    terms: dict
    offset: jax.Array
    slack_lo: jax.Array
    slack_hi: jax.Array
    has_slack: bool = True
    errors: jax.Array | None = None
    error_blocks: tuple = ()


@dataclasses.dataclass
class _Blocks:
    """The symbol blocks of one propagation: shapes, input sets for input blocks,
    its order-reduction budgets (``symbols`` kept; None: :data:`KEEP_SYMBOLS`) and whether a
    reduction has boxed symbols yet (``lossy``)."""

    shapes: dict
    sets: dict
    count: int = 0
    symbols: int | None = None
    lossy: bool = False
    error_dtype: object = None

    def new(self, shape, input_set=None) -> int:
        b = self.count
        self.count += 1
        self.shapes[b] = tuple(shape)
        if input_set is not None:
            self.sets[b] = input_set
        return b

    @property
    def keep(self) -> int:
        return KEEP_SYMBOLS if self.symbols is None else self.symbols

    @property
    def cut(self) -> int:
        return CUT_BUDGET if self.symbols is None else self.symbols + 1024

    @property
    def cap(self) -> int:
        return SYMBOL_BUDGET if self.symbols is None else 2 * self.symbols


def concretise(v: Zonotope, blocks: _Blocks):
    """Elementwise ``[min, max]`` of ``v`` over all its symbols."""
    lo, hi = v.offset + v.slack_lo, v.offset + v.slack_hi
    if v.errors is not None:
        r = _error_radius(v)
        lo, hi = lo - r, hi + r
    for b, t in v.terms.items():
        t_lo, t_hi = linear_range(blocks.sets[b], t)
        lo, hi = lo + t_lo, hi + t_hi
    return lo, hi


def _map_block(f, terms, block_shape, in_avals, dtype=None):
    """``f`` (linear, several operands) applied to every symbol of one block (absent
    operands: zeros of ``dtype``, default their own)."""
    n = len(block_shape)
    flat = [jnp.zeros((1,) + tuple(av.shape), dtype or av.dtype) if t is None else t.reshape((-1,) + t.shape[n:])
            for t, av in zip(terms, in_avals)]
    size = max(t.shape[0] for t in flat)
    flat = [jnp.broadcast_to(t, (size,) + t.shape[1:]) for t in flat]
    outs = jax.vmap(lambda *ts: f(*ts))(*flat)
    return [o.reshape(tuple(block_shape) + o.shape[1:]) for o in outs]


def _union(*forms) -> tuple:
    """The error blocks of all ``forms``, in creation order (the layout of a sum)."""
    return tuple(sorted(set().union(*(z.error_blocks for z in forms))))


def _aligned(errors, ids: tuple, layout: tuple, blocks: _Blocks):
    """Error rows laid out as ``ids`` rearranged to ``layout`` (a superset): zero rows
    for the blocks they do not carry. None stays None."""
    if errors is None or ids == layout:
        return errors
    start, pos = {}, 0
    for b in ids:
        start[b] = pos
        pos += math.prod(blocks.shapes[b])
    pieces: list = []  # [start, stop) runs of rows, None for a run of zeros of that many rows
    for b in layout:
        size = math.prod(blocks.shapes[b])
        src = start.get(b)
        if pieces and src is not None and pieces[-1][0] is not None and pieces[-1][1] == src:
            pieces[-1][1] += size
        elif pieces and src is None and pieces[-1][0] is None:
            pieces[-1][1] += size
        else:
            pieces.append([src, size if src is None else src + size])
    return jnp.concatenate([jnp.zeros((stop,) + errors.shape[1:], errors.dtype) if lo is None else errors[lo:stop]
                            for lo, stop in pieces])


def _sum_errors(parts, blocks: _Blocks):
    """``sum`` of (errors, ids) parts (None errors skipped), in the union layout."""
    parts = [(e, ids) for e, ids in parts if e is not None]
    if not parts:
        return None, ()
    layout = tuple(sorted(set().union(*(ids for _, ids in parts))))
    total = None
    for e, ids in parts:
        e = _aligned(e, ids, layout, blocks)
        total = e if total is None else total + e
    return total, layout


def _linear(node: Node, ins: list, blocks: _Blocks):
    f = linear_part(node)
    positions = node.bounded_inputs
    bounded = [ins[i] for i in positions]
    args = [v.value if isinstance(v, Const) else v.offset for v in ins]
    offsets = node.evaluate(*args)
    in_avals = [node.in_avals[p] for p in positions]
    terms = [dict() for _ in node.outputs]
    for b in sorted(set().union(*(z.terms.keys() for z in bounded))):
        mapped = _map_block(f, [z.terms.get(b) for z in bounded], blocks.shapes[b], in_avals)
        for k, m in enumerate(mapped):
            terms[k][b] = m
    layout = _union(*bounded)
    errors = [None] * len(node.outputs)
    slop = None
    if layout:
        errs = [_aligned(z.errors, z.error_blocks, layout, blocks) for z in bounded]
        rows = (sum(math.prod(blocks.shapes[b]) for b in layout),)
        narrow = any(e is not None and e.dtype != z.offset.dtype for e, z in zip(errs, bounded))
        if narrow:
            dtype = next(z.dtype for z in errs if z is not None)
            errors = _map_block(linear_part(node, dtype), errs, rows, in_avals, dtype)
            k = rounding_count(node)
            if k:
                # Of each operand's own rows (the alignment only adds zero rows): the same
                # expression as its concretisation's, which XLA computes once.
                masses = [jnp.zeros(av.shape, z.offset.dtype) if z.errors is None else _mass(z.errors)
                          for av, z in zip(in_avals, bounded)]
                rows_of = next(e for e in errs if e is not None)
                slop = [_rounding(rows_of, k, m) for m in linear_radius(node, masses)]
        else:
            errors = _map_block(f, errs, rows, in_avals)
    centers = [(z.slack_lo + z.slack_hi) / 2 for z in bounded]
    radii = [(z.slack_hi - z.slack_lo) / 2 for z in bounded]
    slack_c = f(*centers)
    slack_r = linear_radius(node, radii)
    if slop is not None:
        slack_r = [r + e for r, e in zip(slack_r, slop)]
    has = any(z.has_slack for z in bounded)
    return [Zonotope(t, o, sc - sr, sc + sr, has, e, layout)
            for t, o, sc, sr, e in zip(terms, offsets, slack_c, slack_r, errors)]


def _scale(terms, s):
    return {b: t * s for b, t in terms.items()}


def _narrow(v: Zonotope) -> bool:
    """Whether ``v``'s error coefficients are stored in a narrower float type than its values
    (``error_dtype`` of :func:`propagate`)."""
    return v.errors is not None and v.errors.dtype != v.offset.dtype


def _mass(errors):
    """An upper bound on ``sum_i |g_i|`` over the narrow error rows ``g_i`` (elementwise), in float64:
    accumulated in float64 (padded by :func:`_boxed_radius`) for values of at most
    :data:`FLOAT64_MASS_LIMIT` elements, else :func:`_padded_sum` in the rows' own type.

    Why two ways: XLA:CPU's float64-accumulating sum over float32 rows is 3-7x slower than the float32
    sum (2 cores, ``/tmp`` benchmark, 19072 rows: 0.9 against 0.3 ns an element at 2688 elements a row,
    4.6 against 0.7 ns at 10752). On the 6-layer MiniLM bound (mixed, 16384 symbols, 1e-5) the
    float64 sums over the FFN's 7 x 1536 values alone took 36 of its 76 s; with :func:`_padded_sum`
    above the limit the bound takes 51 s and is 0.12% wider. Inside the digits UNet's step (values of
    at most 3072 elements) the float32 sums made the step slower instead, 7.3 s against 6.3 s with
    every value summed in float32, so small values keep the float64 accumulation (the step: 6.0 s
    against 6.1 s with this limit).
    """
    if math.prod(errors.shape[1:]) > FLOAT64_MASS_LIMIT and errors.shape[0] < MAX_PADDED_ROWS:
        return _padded_sum(errors)
    return _boxed_radius(jnp.abs(errors), errors.shape[0], jnp.float64)


def _padded_sum(errors):
    """``sum_i |g_i|`` over the rows ``g_i``, summed in their own float type and padded, in float64.

    Whatever order XLA adds the ``n`` non-negative terms in, the computed sum ``s'`` satisfies
    ``|s' - s| <= gamma s`` with ``gamma = (n - 1) u / (1 - (n - 1) u)`` (Higham, *Accuracy and
    Stability of Numerical Algorithms*, section 4.2; ``u`` the unit roundoff), so ``s <= s' / (1 -
    gamma)``; each term or partial sum flushed to zero loses at most the smallest normal number
    (``3 n tiny`` covers them, also after the division). For float32 rows: a factor ``1 + 1.1e-3``
    at 19072 rows.
    """
    n = errors.shape[0]
    info = jnp.finfo(errors.dtype)
    u = float(info.eps) / 2
    gamma = (n - 1) * u / (1 - (n - 1) * u)
    factor = (1 + 1e-15) / (1 - gamma)  # the margin covers the float64 rounding of this factor and product
    total = jnp.sum(jnp.abs(errors), axis=0)
    return total.astype(jnp.float64) * factor + 3 * n * float(info.tiny)


def _error_radius(v: Zonotope):
    """``sum_i |g_i|`` over ``v``'s error rows: :func:`_mass` for narrow rows, the plain sum otherwise."""
    return _mass(v.errors) if _narrow(v) else jnp.sum(jnp.abs(v.errors), axis=0)


def _rounding(errors, k: int, magnitude):
    """The rounding bound ``k eps magnitude`` of narrow error rows (``magnitude``: ``|L| sum_i
    |g_i|`` of the operation), plus ``k tiny`` per row for results that underflow (flushed to
    zero: an absolute error up to the smallest normal number)."""
    info = jnp.finfo(errors.dtype)
    return k * float(info.eps) * magnitude + k * errors.shape[0] * float(info.tiny)


def _scaled_errors(errors, scale, terms: int):
    """``errors * scale`` (broadcast) in the errors' float type, and an elementwise bound
    ``terms eps |scale| sum_i |g_i|`` on what rounding ``scale`` and the products (and
    ``terms - 2`` later additions) lose. ``scale`` keeps its own type when it matches."""
    if errors.dtype == scale.dtype:
        return errors * scale, None
    return errors * scale.astype(errors.dtype), _rounding(errors, terms, jnp.abs(scale) * _mass(errors))


def _round_up(x, dtype):
    """``x >= 0`` as ``dtype``, rounded up; a positive ``x`` to at least the smallest normal
    number (a subnormal would be flushed to zero)."""
    y = x.astype(dtype)
    y = jnp.where(y.astype(x.dtype) < x, jnp.nextafter(y, jnp.asarray(jnp.inf, dtype)), y)
    return jnp.where(x > 0, jnp.maximum(y, jnp.finfo(dtype).tiny), y)


def _unary(node: Node, x: Zonotope, bounds, r):
    """``r``: the node's lines on ``bounds``."""
    l, u = bounds
    s = (r.lower_slope + r.upper_slope) / 2
    dl, dh = r.lower_slope - s, r.upper_slope - s
    lo = jnp.minimum(dl * l, dl * u) + r.lower_intercept
    hi = jnp.maximum(dh * l, dh * u) + r.upper_intercept
    sl = jnp.minimum(s * x.slack_lo, s * x.slack_hi)
    sh = jnp.maximum(s * x.slack_lo, s * x.slack_hi)
    # A point interval is evaluated, not relaxed: exact up to f's own rounding.
    point = l == u
    exact = node.evaluate(jnp.where(point, l, 0.0))[0]
    keep = jnp.where(point, 0.0, s)
    zero = jnp.zeros_like(l)
    errors, slop = (None, None) if x.errors is None else _scaled_errors(x.errors, keep, 2)
    if slop is not None:
        lo, hi = lo - slop, hi + slop
    return Zonotope(_scale(x.terms, keep), jnp.where(point, exact, s * x.offset),
                    jnp.where(point, zero, sl + lo), jnp.where(point, zero, sh + hi),
                    errors=errors, error_blocks=x.error_blocks)


def _lift(t, block_shape, shape):
    """Broadcast a term ``block_shape + v_shape`` to ``block_shape + shape``."""
    n = len(block_shape)
    v_shape = t.shape[n:]
    t = t.reshape(tuple(block_shape) + (1,) * (len(shape) - len(v_shape)) + v_shape)
    return jnp.broadcast_to(t, tuple(block_shape) + tuple(shape))


def _add_terms(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, t in b.items():
        out[k] = out[k] + t if k in out else t
    return out


def _product(node: Node, x: Zonotope, y: Zonotope, bx, by, blocks: _Blocks):
    """``xy = c_y x + c_x y - c_x c_y + (x - c_x)(y - c_y)``, ``|(x - c_x)(y - c_y)| <= r_x r_y``."""
    shape = node.out_avals[0].shape
    cx, rx = (bx[0] + bx[1]) / 2, (bx[1] - bx[0]) / 2
    cy, ry = (by[0] + by[1]) / 2, (by[1] - by[0]) / 2
    tx = {b: _lift(t, blocks.shapes[b], shape) * cy for b, t in x.terms.items()}
    ty = {b: _lift(t, blocks.shapes[b], shape) * cx for b, t in y.terms.items()}
    ex, sx = (None, None) if x.errors is None else _scaled_errors(_lift(x.errors, x.errors.shape[:1], shape), cy, 3)
    ey, sy = (None, None) if y.errors is None else _scaled_errors(_lift(y.errors, y.errors.shape[:1], shape), cx, 3)
    errors, layout = _sum_errors([(ex, x.error_blocks), (ey, y.error_blocks)], blocks)
    offset = jnp.broadcast_to(cy * x.offset + cx * y.offset - cx * cy, shape)
    xl, xh = jnp.minimum(cy * x.slack_lo, cy * x.slack_hi), jnp.maximum(cy * x.slack_lo, cy * x.slack_hi)
    yl, yh = jnp.minimum(cx * y.slack_lo, cx * y.slack_hi), jnp.maximum(cx * y.slack_lo, cx * y.slack_hi)
    rr = rx * ry
    for slop in (sx, sy):
        if slop is not None:
            rr = rr + slop
    return Zonotope(_add_terms(tx, ty), offset, jnp.broadcast_to(xl + yl - rr, shape),
                    jnp.broadcast_to(xh + yh + rr, shape), errors=errors, error_blocks=layout)


def _dot(node: Node, x: Zonotope, y: Zonotope, bx, by, blocks: _Blocks):
    """``dot(x, y)`` around the interval centres, the second-order term in the slack."""
    dot = lambda a, b: node.evaluate(a, b)[0]  # noqa: E731
    cx, rx = (bx[0] + bx[1]) / 2, (bx[1] - bx[0]) / 2
    cy, ry = (by[0] + by[1]) / 2, (by[1] - by[0]) / 2
    terms: dict = {}
    for b, t in x.terms.items():
        n = len(blocks.shapes[b])
        m = jax.vmap(lambda a: dot(a, cy))(t.reshape((-1,) + t.shape[n:]))
        terms = _add_terms(terms, {b: m.reshape(blocks.shapes[b] + m.shape[1:])})
    for b, t in y.terms.items():
        n = len(blocks.shapes[b])
        m = jax.vmap(lambda c: dot(cx, c))(t.reshape((-1,) + t.shape[n:]))
        terms = _add_terms(terms, {b: m.reshape(blocks.shapes[b] + m.shape[1:])})
    ex = None if x.errors is None else _dot_errors(node, x.errors, Const(cy), 0)
    ey = None if y.errors is None else _dot_errors(node, y.errors, Const(cx), 1)
    errors, layout = _sum_errors([(ex, x.error_blocks), (ey, y.error_blocks)], blocks)
    offset = dot(x.offset, cy) + dot(cx, y.offset) - dot(cx, cy)
    sxc, sxr = (x.slack_lo + x.slack_hi) / 2, (x.slack_hi - x.slack_lo) / 2
    syc, syr = (y.slack_lo + y.slack_hi) / 2, (y.slack_hi - y.slack_lo) / 2
    c = dot(sxc, cy) + dot(cx, syc)
    r = dot(sxr, jnp.abs(cy)) + dot(jnp.abs(cx), syr) + dot(rx, ry)
    if errors is not None and errors.dtype != offset.dtype:
        # The narrow maps' rounding (rounding_count) and that of their sum.
        mx = jnp.zeros_like(cx) if x.errors is None else _mass(x.errors)
        my = jnp.zeros_like(cy) if y.errors is None else _mass(y.errors)
        r = r + _rounding(errors, rounding_count(node) + 1, dot(mx, jnp.abs(cy)) + dot(jnp.abs(cx), my))
    return Zonotope(terms, offset, c - r, c + r, errors=errors, error_blocks=layout)


def _dot_errors(node: Node, errors, other: Const, position: int):
    """The error rows of operand ``position`` of a two-operand ``dot_general`` mapped with the
    other operand fixed at ``other``: in the rows' own float type (the caller bounds the rounding
    when that is narrower than ``other``'s)."""
    inputs = list(node.inputs)
    inputs[1 - position] = other
    fixed = dataclasses.replace(node, inputs=tuple(inputs))
    f = linear_part(fixed, errors.dtype if errors.dtype != other.value.dtype else None)
    return jax.vmap(lambda e: f(e)[0])(errors)


def _error_symbols(v: Zonotope) -> int:
    return 0 if v.errors is None else v.errors.shape[0]


def _boxed_radius(abs_rows, count: int, dtype=None):
    """``sum`` over the rows ``|g|`` of the generators being boxed, accumulated in ``dtype``
    (default theirs; float64 for float32 rows of float64 values, whose padding would otherwise
    cost ``count`` float32 units: 0.15% at 12288 symbols), padded by ``count`` units of rounding
    (a worst-case serial sum of that many terms)."""
    dtype = dtype or abs_rows.dtype
    return jnp.sum(abs_rows, axis=0, dtype=dtype) * (1.0 + count * float(jnp.finfo(dtype).eps))


def _reduce_errors(errors, lo, hi, shape, blocks: _Blocks):
    """Order reduction: keep the :data:`KEEP_SYMBOLS` error symbols (rows of
    ``errors``) that boxing would widen most as one new block and box the rest
    into ``[lo, hi]``; returns (kept rows, their block ids, lo, hi).

    Boxing a generator ``g`` adds ``|g|`` to the box, whose fresh block then
    stands for ``g`` without its correlations across elements; a generator on
    one element (``||g||_1 = ||g||_inf``, such as the previous reduction's box
    before a linear map mixes it) loses nothing. So the kept symbols are those
    with the largest ``||g||_1 - ||g||_inf`` (Girard's criterion), not the
    largest ``||g||_1``: MiniLM, float64, zonotope, 3 layers, width / true
    range 1.97x -> 1.66x at 1e-6 and 12.5x -> 9.17x at 1e-5; 6 layers,
    crown-zonotope, 1e-6: mean width 3.2e7 -> 0.32 (15x the true range with
    6144 symbols kept instead of 4096, 1.94x with 7168). At 1e-5 the full
    model needs more: vacuous (3e10x) with 9216 kept, 22x with 12288.

    Sound: for ``e`` in ``[-1, 1]^n``, ``sum_i g_i e_i`` lies in the kept part
    (now with fresh copies of the kept symbols, which can only forget
    correlations with other values) plus ``+-sum_dropped |g_i|``. (Boxing the
    rest in the frame of its principal directions instead was measured worse:
    MiniLM, 2 layers, 1e-6: 2.5x instead of 1.06x.) The boxed sums are padded
    by ``n`` units of rounding (a worst-case serial sum).
    """
    n = math.prod(shape)
    errs = errors.reshape((-1, n))
    keep = min(blocks.keep, errs.shape[0])
    size = jnp.abs(errs)
    order = jnp.argsort(jnp.max(size, axis=1) - jnp.sum(size, axis=1))
    kept, ids = None, ()
    if keep:
        kept, ids = errs[order[:keep]].reshape((keep,) + tuple(shape)), (blocks.new((keep,)),)
    if keep == errs.shape[0]:
        return kept, ids, lo, hi
    blocks.lossy = True
    r = _boxed_radius(size[order[keep:]], errs.shape[0], lo.dtype).reshape(shape)
    return kept, ids, lo - r, hi + r


def _fresh(v: Zonotope, blocks: _Blocks, budget: int | None = None) -> Zonotope:
    """Reduce the error symbols when over ``budget`` (default: the hard cap, :data:`SYMBOL_BUDGET`),
    then turn the slack into a fresh block."""
    shape = tuple(v.offset.shape)
    n = math.prod(shape)
    errors, ids, lo, hi = v.errors, v.error_blocks, v.slack_lo, v.slack_hi
    if _error_symbols(v) > (blocks.cap if budget is None else budget):
        errors, ids, lo, hi = _reduce_errors(errors, lo, hi, shape, blocks)
    if n > FRESH_LIMIT:
        return Zonotope(v.terms, v.offset, lo, hi, True, errors, ids)
    b = blocks.new(shape)
    radius = (hi - lo) / 2
    dtype = blocks.error_dtype or radius.dtype
    coef = radius if dtype == radius.dtype else _round_up(radius, dtype)
    # A scatter, not ``eye * coef``: XLA:CPU would fuse coef's whole computation into every
    # element of the n x n block (the UNet's last step: 45 s instead of 0.1 s). Scattered into
    # the rows after the old ones, in place: no n x n block of its own to copy.
    m = 0 if errors is None else errors.shape[0]
    rows = jnp.zeros((m + n, n), dtype) if errors is None else jnp.concatenate(
        [errors.reshape(m, n), jnp.zeros((n, n), errors.dtype)])
    errors = rows.at[m + jnp.arange(n), jnp.arange(n)].set(coef.reshape(-1)).reshape((m + n,) + shape)
    zero = jnp.zeros(shape, radius.dtype)
    return Zonotope(v.terms, v.offset + (lo + hi) / 2, zero, zero, False, errors, ids + (b,))


def _on_simplex(v: Zonotope, axis: int, bounds, blocks: _Blocks) -> Zonotope:
    """Use ``sum_axis y = 1`` (a softmax's output): ``y -> y - w (sum_axis y - 1)``.

    The map is the identity on every ``y`` that sums to one, so it is sound for
    any weights ``w`` (with ``sum_axis w = 1`` the form sums to one too); applied to the affine form it
    makes the relaxations' errors of one softmax row cancel exactly in the
    sum, so that a later ``softmax @ V`` sees them against ``V - sum_j w_j V_j``
    instead of ``V``. ``w`` is the middle of the interval, renormalised.
    """
    if v.has_slack:
        v = _fresh(v, blocks)
        if v.has_slack:
            return v
    w = simplex_weights(bounds, axis)
    rank = w.ndim

    def project(t):
        ax = axis + t.ndim - rank
        return t - w * jnp.sum(t, axis=ax, keepdims=True)

    terms = {b: project(t) for b, t in v.terms.items()}
    offset = v.offset - w * (jnp.sum(v.offset, axis=axis, keepdims=True) - 1.0)
    if v.errors is None or not _narrow(v):
        errors = None if v.errors is None else project(v.errors)
        return dataclasses.replace(v, terms=terms, offset=offset, errors=errors)
    # Narrow error rows: w rounded to their type, the rounding of the row sums, the
    # products and the difference bounded in the slack (a sum of n terms: n + 3 units).
    # Their slack (rounding bounds, not a relaxation's) is projected too: the centre
    # exactly, the radius r through |I - w 1^T| <= r + w sum r.
    errors = v.errors - w.astype(v.errors.dtype) * jnp.sum(v.errors, axis=axis + 1, keepdims=True)
    mass = _mass(v.errors)
    n = v.offset.shape[axis]
    centre, radius = (v.slack_lo + v.slack_hi) / 2, (v.slack_hi - v.slack_lo) / 2
    centre = project(centre)
    radius = (radius + w * jnp.sum(radius, axis=axis, keepdims=True)
              + _rounding(v.errors, n + 3, mass + w * jnp.sum(mass, axis=axis, keepdims=True)))
    return dataclasses.replace(v, terms=terms, offset=offset, errors=errors,
                               slack_lo=centre - radius, slack_hi=centre + radius)


def _input_form(s, dtype, blocks: _Blocks) -> Zonotope:
    """The form of a graph input ``x`` in the set ``s``: ``x`` itself, one symbol per element
    (``offset 0``, identity terms); for an :class:`~diverify.specs.LpBall` with a ``support``,
    ``x = center + E delta_S`` with symbols for the support's slices only (``E`` puts them in
    place; the other slices of ``delta`` are 0 by the set's definition) and ``delta_S`` in the
    l_p ball of those slices: the same set with fewer input symbols."""
    shape = tuple(s.center.shape)
    zero = jnp.zeros(shape, dtype)
    if isinstance(s, LpBall) and s.support is not None:
        support = np.asarray(s.support)
        slices, width = math.prod(shape[:-1]), shape[-1]
        mask = jnp.broadcast_to(s.active_mask, jnp.broadcast_shapes(jnp.shape(s.active_mask), shape[:-1] + (1,)))
        part = LpBall(jnp.zeros((len(support), width), dtype), s.eps, mask.reshape(slices, -1)[support], s.p)
        b = blocks.new((len(support), width), part)
        eye = jnp.eye(slices * width, dtype=dtype).reshape(slices, width, slices * width)[support]
        return Zonotope({b: eye.reshape((len(support), width) + shape)}, jnp.asarray(s.center, dtype), zero, zero,
                        False)
    b = blocks.new(shape, s)
    return Zonotope({b: jnp.eye(s.center.size, dtype=dtype).reshape(shape + shape)}, zero, zero, zero, False)


def _last_uses(graph: Graph) -> dict:
    """Value id -> index of the last node that reads it (``len(nodes)`` for outputs)."""
    last = {}
    for idx, node in enumerate(graph.nodes):
        for v in node.inputs:
            if not isinstance(v, Const):
                last[v] = idx
    for v in graph.outputs:
        if not isinstance(v, Const):
            last[v] = len(graph.nodes)
    return last


def intervals_read(graph: Graph) -> set:
    """The values whose interval some step reads: the inputs of relaxed nodes
    (unary, product, dot) and of ``simplex`` nodes, and the graph's outputs.
    The others keep their interval-arithmetic interval; concretising their
    forms (a pass over every symbol) would change no relaxation."""
    simplex = {v for node in graph.nodes if node.name == "simplex" for v in node.inputs if not isinstance(v, Const)}
    return relaxed_inputs(graph) | simplex | {v for v in graph.outputs if not isinstance(v, Const)}


#: Linear primitives that send each element of an operand to one element of the output (no
#: mixing, no copies) when that operand has the output's size.
ELEMENTWISE_LINEAR = frozenset({"add", "sub", "neg", "mul", "div", "convert_element_type", "reshape", "squeeze",
                                "expand_dims", "transpose"})
#: At most this many values with slack in a row carry it (:func:`slack_carriers`).
CARRY_CHAIN = 4


def slack_carriers(graph: Graph) -> set:
    """The values whose interval slack the zonotope leaves as slack instead of a fresh block.

    A fresh block ``diag(r)`` and the slack ``[-r, r]`` are the same set; they differ in what later
    nodes make of them. A value read by exactly one node that maps each of its elements to one
    element of the output (a unary nonlinearity, an elementwise sum, difference or product with
    another value, a scaling, a reshape or transpose; not a broadcast, which would copy a symbol)
    passes the slack on as the slack of that element, scaled by the node's coefficient or slope:
    as a fresh block it would have become a generator along the same element, and two generators
    along one element ``a e_1 + b e_2`` with ``e_i`` in ``[-1, 1]`` are exactly one of radius
    ``|a| + |b|`` (no other value carries the first: the value has no other reader). So the
    next fresh block, where the chain meets a node that mixes elements, holds both: the same
    set with one block of rows fewer (tiny-bert: each pairwise softmax's clip and ``exp``
    blocks, 2 x 2048 rows, become none, the sum over keys takes their slack; the UNet: the
    GroupNorm product's block and the SiLU's after it become one). The order reductions then
    meet fewer rows, so a bound that reaches them can move either way (stop 27: MiniLM, 6 layers,
    1e-5, 3.44x -> 3.09x the true range; the digits UNet's 50-step reach 1.034x -> 1.077x).

    At most :data:`CARRY_CHAIN` values in a row carry their slack (:func:`propagate` counts only
    values that have slack, so a chain starts at the first relaxation, not at the first
    elementwise node): each carried node's slack and lines are elementwise expressions of the
    previous one's, and XLA:CPU fuses a long chain of them into the next fresh block's
    computation, where it is evaluated far more often than once (the digits UNet's last 12 nodes,
    the DDIM update's clip: 45 s a step instead of 0.1 s). Measured (2 CPU cores): chains of 4
    counting every value: tiny-bert 0.33 -> 0.155 s, the UNet's step 6.2 -> 5.7 s; of 6: 0.11 s and
    7.4 s; unbounded: 0.105 s and 53 s. Counting only values with slack (stop 28), the pairwise
    softmax's ``exp`` passes its slack to the sum over keys (its chain used to start at the
    slack-free differences): tiny-bert 0.165 -> 0.115 s with 6800 instead of 10384 error symbols at
    the output and the same width; the UNet's step unchanged (5.7 s).
    """
    readers: dict = {}
    for idx, node in enumerate(graph.nodes):
        for pos, v in enumerate(node.inputs):
            if not isinstance(v, Const):
                readers.setdefault(v, []).append((idx, pos))
    outputs = {v for v in graph.outputs if not isinstance(v, Const)}
    carriers = set()
    for v, uses in readers.items():
        if v in outputs or len(uses) != 1:
            continue
        idx, pos = uses[0]
        node = graph.nodes[idx]
        k = kind(node)
        same = math.prod(node.in_avals[pos].shape) == math.prod(node.out_avals[0].shape) and len(node.outputs) == 1
        if (k == "unary" or (k == "product" and same) or node.name == "reduce_sum"
                or (k == "linear" and node.name in ELEMENTWISE_LINEAR and same)):
            carriers.add(v)
    return carriers


def propagate(graph: Graph, input_sets, fresh_errors: bool = True, refine=None, output_forms: bool = False,
              lines=None, symbols: int | None = None, error_dtype=None, refine_early: bool = False):
    """Bounds of every value: returns (intervals id -> (l, u), domain flags).

    ``fresh_errors=True`` is the zonotope method; ``False`` keeps every
    relaxation's error in the interval slack (the forward method).
    ``refine(vid, producer_index, env)``, when given, returns a second sound
    interval of value ``vid`` (or None), intersected with the zonotope's; it is
    called from the first node with ``refine_early``, else once an order reduction
    has boxed error symbols. The gate saves compilation where CROWN's relaxations
    add little (tiny-bert, float32, zonotope: compile 6.7 s instead of 12.6 s, bound
    0.075 s instead of 0.10 s, 1.2% wider at 1e-3), but before any reduction they
    can still beat the zonotope's own at a large radius (MiniLM, 1 layer, float32,
    1e-3: 69x the true range gated, 21x early; 6 layers, float64, 1e-5: 3.51x /
    3.43x in the same time).
    ``output_forms=True`` also returns the forms of the graph's outputs (None for
    a constant output) and their symbol blocks: (env, flags, forms, blocks).
    ``lines(node, env)``, when given, returns a unary node's lines (default
    :func:`diverify.bounds.elementwise.linear_bounds` on its input's interval;
    :func:`diverify.bounds.backward.forward_forms` shares them with ``refine``'s
    passes). ``symbols``: the error symbols
    a reduction keeps (cut budget ``symbols + 1024``, hard cap ``2 symbols``);
    None takes :data:`KEEP_SYMBOLS`, :data:`CUT_BUDGET` and :data:`SYMBOL_BUDGET`.
    ``error_dtype``: the float type of the error coefficients (None: the values' own); see
    "Narrow error coefficients" in the module docstring.
    """
    blocks = _Blocks({}, {}, symbols=symbols, error_dtype=error_dtype)
    read = intervals_read(graph)
    carriers = slack_carriers(graph) if fresh_errors else set()
    chain: dict = {}  # value -> how many values in a row up to it carry their slack
    forms: dict = {}
    env: dict = {}
    last_use = _last_uses(graph)
    live = set(graph.inputs)
    for vid, s in zip(graph.inputs, input_sets):
        forms[vid] = _input_form(s, graph.avals[vid].dtype, blocks)
        env[vid] = s.interval()
    flags = []
    for idx, node in enumerate(graph.nodes):
        ins_iv = [v if isinstance(v, Const) else env[v] for v in node.inputs]
        outs_iv, ok = node_interval(node, ins_iv)
        k = kind(node)
        if k == "linear":
            ins = [v if isinstance(v, Const) else forms[v] for v in node.inputs]
            outs = _linear(node, ins, blocks)
            if node.name == "simplex" and fresh_errors:
                outs = [_on_simplex(outs[0], node.params["axis"], env[node.inputs[0]], blocks)]
        elif k == "unary":
            (x,) = node.inputs
            r = elementwise.linear_bounds(node, *env[x]) if lines is None else lines(node, env)
            outs = [_unary(node, forms[x], env[x], r)]
            ok = jnp.all(elementwise.domain_ok(node, *env[x]))
        elif k == "product":
            x, y = node.inputs
            outs = [_product(node, forms[x], forms[y], env[x], env[y], blocks)]
        else:
            x, y = node.inputs
            outs = [_dot(node, forms[x], forms[y], env[x], env[y], blocks)]
        flags.append(ok)
        for v in node.inputs:
            if not isinstance(v, Const) and last_use[v] == idx:
                live.discard(v)
                forms.pop(v, None)
        live.update(vid for vid in node.outputs if last_use.get(vid, -1) > idx)
        depth = 1 + max((chain.get(v, 0) for v in node.inputs if not isinstance(v, Const)), default=0)
        for vid, form, iv in zip(node.outputs, outs, outs_iv):
            # A cut: every other live value carries input symbols only.
            quiet = {w for w in live if w in forms and not _error_symbols(forms[w])}
            cut = fresh_errors and live <= {vid} | quiet
            carry = vid in carriers and depth <= CARRY_CHAIN
            if cut and _error_symbols(form) > blocks.cut:
                form = _fresh(form, blocks, blocks.cut)
            elif fresh_errors and ((form.has_slack and not carry) or _error_symbols(form) > blocks.cap):
                form = _fresh(form, blocks)
            if form.has_slack:
                chain[vid] = depth
            forms[vid] = form
            if vid not in read:  # no relaxation reads it; an overflow (NaN) means unbounded
                env[vid] = (jnp.where(jnp.isnan(iv[0]), -jnp.inf, iv[0]), jnp.where(jnp.isnan(iv[1]), jnp.inf, iv[1]))
                continue
            env[vid] = intersect(concretise(form, blocks), iv)
            better = None if refine is None or not (blocks.lossy or refine_early) else refine(vid, idx, env)
            if better is not None:
                env[vid] = intersect(env[vid], better)
    if output_forms:
        return env, flags, [None if isinstance(v, Const) else forms[v] for v in graph.outputs], blocks
    return env, flags


def l2_parts(v: Zonotope, blocks: _Blocks):
    """``v`` as ``centre + sum_b M_b u_b + e`` with ``||u_b||_2 <= 1`` and ``|e| <= halfwidth``
    (elementwise): returns (centre, halfwidth, [M_b]) with ``M_b`` of shape (v.size, n_b).

    Each input block whose set is one l2 ball (:class:`~diverify.specs.LpBall`, p = 2, a single
    unmasked ball) gives ``M_b = eps T_b^T`` and its centre's image; an
    :class:`~diverify.specs.AffineBall` ``c + G u + [-h, h]`` gives ``M_b = T_b^T G``, its centre's
    image and ``|T_b^T| h`` (plus the rounding of those products); a :class:`~diverify.specs.Box`
    input block, the error blocks and the slack are boxed (exact for a one-point box). Then, for
    any point ``ref``, ``||v - ref||_2 <= sum_b ||M_b||_2 + || |centre - ref| + halfwidth ||_2``: the
    l2 geometry of the ball is kept, where the box around ``v`` would cost up to sqrt(v.size) in
    its corner. Other input sets are a ValueError.
    """
    shape = tuple(v.offset.shape)
    n = math.prod(shape)
    centre = (v.offset + (v.slack_lo + v.slack_hi) / 2).reshape(-1)
    half = ((v.slack_hi - v.slack_lo) / 2).reshape(-1)
    if v.errors is not None:
        half = half + _error_radius(v).reshape(-1)
    mats = []
    for b, t in v.terms.items():
        rows = t.reshape((-1, n))
        s = blocks.sets[b]
        if isinstance(s, LpBall) and float(s.p) == 2.0 and math.prod(s.center.shape[:-1]) == 1:
            centre = centre + jnp.matmul(s.center.reshape(-1), rows, precision=jax.lax.Precision.HIGHEST)
            mats.append(jnp.transpose(rows * (s.active_mask.reshape(-1, 1) * s.eps)))
        elif isinstance(s, Box):
            mid, rad = ((s.upper + s.lower) / 2).reshape(-1), ((s.upper - s.lower) / 2).reshape(-1)
            centre = centre + jnp.matmul(mid, rows, precision=jax.lax.Precision.HIGHEST)
            half = half + jnp.matmul(rad, jnp.abs(rows), precision=jax.lax.Precision.HIGHEST)
        elif isinstance(s, AffineBall):
            gens = s.generators.reshape(s.generators.shape[0], -1)
            centre = centre + jnp.matmul(s.center.reshape(-1), rows, precision=jax.lax.Precision.HIGHEST)
            mats.append(jnp.transpose(jnp.matmul(gens, rows, precision=jax.lax.Precision.HIGHEST)))
            # |T^T| h, padded by a bound of the three products' rounding (sums of rows.shape[0] terms,
            # 2 ulp each, summed over u's coordinates for M): the set centre + M u + [-half, half]
            # then holds the exact image also when M is carried on as the next set's generators.
            spread = jnp.abs(s.center.reshape(-1)) + jnp.sum(jnp.abs(gens), axis=0) + s.half.reshape(-1)
            gamma = (rows.shape[0] + 2) * float(jnp.finfo(rows.dtype).eps)
            half = half + jnp.matmul(s.half.reshape(-1) + gamma * spread, jnp.abs(rows),
                                     precision=jax.lax.Precision.HIGHEST)
        else:
            raise ValueError(f"l2_parts needs l2-ball, affine-ball or box input sets, got {type(s).__name__}")
    return centre, half, mats
