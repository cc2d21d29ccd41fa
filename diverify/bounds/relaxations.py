"""Sound elementwise and bilinear relaxations: the table the bound engine reads.

For a scalar function ``f`` and an interval ``[l, u]`` (arrays, elementwise):

* :func:`interval_image` returns ``lo, hi`` with ``lo <= f(x) <= hi`` for
  every real ``x`` in ``[l, u]``;
* :func:`linear_bounds` returns slopes and intercepts with
  ``ls*x + li <= f(x) <= us*x + ui`` for every real ``x`` in ``[l, u]``
  (CROWN, Zhang et al. 2018; DeepPoly, Singh et al. 2019);
* :func:`bilinear_bounds` / :func:`bilinear_interval` do the same for the
  product ``x*y`` over a box (McCormick 1976).

How every line is made sound. A slope ``s`` is only a *choice* (a tangent,
a chord, an alpha-CROWN parameter); the intercept is then the exact extremum
of ``g(x) = f(x) - s*x`` over ``[l, u]``, evaluated at points that provably
contain the extremiser for the shape of ``f``: the endpoints for the chord
side of a convex function, the tangent point for the tangent side, and
``{l, clip(a)}`` for sigmoid-shaped functions (see :func:`_s_upper`). The
functions with no such structure (the GELU family) use a grid of
``_GRID_POINTS`` points plus the interpolation remainder ``M2*h^2/8``, with
``M2`` a proven bound on ``|f''|`` per grid cell. So any alpha in [0, 1]
gives a sound bound in exact arithmetic, whatever the rounding of the slope.

Float32 rounding. Every intercept (and interval end) is pushed outward by
``REL_PAD * max|f| + LINE_PAD * (|c| + |s|*max(|l|, |u|)) + ABS_PAD`` over the
evaluated points (``max|f|`` weighted where the float32 evaluation of ``f``
loses relative accuracy, e.g. GELU's left tail). The first term, with
``REL_PAD = 2e-6`` (about 17 units in the last place), covers the elementwise
functions' float32 error (measured at most 2.5 ulp on CPU, 33 ulp for
``erfc`` in its far tail, which the weights absorb). The second covers the
rounding of the line's own arithmetic: ``c = f(t) - s*t`` and a later
float32 evaluation of ``s*x + c`` round at most four times by half an ulp of
``|c| + |s x|``; ``LINE_PAD = 4.8e-7`` (8 half-ulps) is twice that. Keeping
the two apart matters: the line's terms ``|c|`` and ``|s x|`` are far larger
than ``|f|`` where ``x`` is far from 0 (``exp`` at 5: 10x), and padding them by
17 ulp put a floor under every bound that no radius could go below.
Bounds are checked against float64 truth by ``tests/bounds/test_relaxations.py``.
In float64 (``precision="float64"`` of the engine) every padding is scaled by
float64's unit roundoff relative to float32's (``2^-29``): the same number of
ulps, checked against 50-digit ``mpmath`` values by the same test file.
Exact cases need no padding and get none (ReLU and abs on one-signed
intervals, the zero of even powers).

Domains. Where :func:`domain_ok` is False (``l > u``, a non-finite end, an
interval leaving the function's domain, or float32 overflow) every returned
array is NaN; the engine checks :func:`domain_ok` and raises a
:class:`~diverify.errors.DiverifyError` naming the operation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.special import erfc

Array = jax.Array

REL_PAD = 2e-6
LINE_PAD = 4.8e-7
ABS_PAD = 1e-30

_GRID_POINTS = 64
_BISECT_STEPS = 30

# GELU-family constants, computed once in float64 (brentq on f', xtol 1e-15):
# argmin x* and min f(x*); the minima are rounded *down* in the 8th digit.
_GELU_ERF_ARGMIN, _GELU_ERF_MIN = -0.7517915246935645, -0.16997121
_GELU_TANH_ARGMIN, _GELU_TANH_MIN = -0.7524614220710163, -0.17004076
_QUICK_GELU_ARGMIN, _QUICK_GELU_MIN = -0.751154255441289, -0.16361019

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_C = 0.044715
_QUICK_GELU_BETA = 1.702
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class LinearBounds(NamedTuple):
    """For every ``x`` in ``[l, u]``: ``lower_slope*x + lower_intercept <= f(x) <= upper_slope*x + upper_intercept``."""

    lower_slope: Array
    lower_intercept: Array
    upper_slope: Array
    upper_intercept: Array


class BilinearBounds(NamedTuple):
    """For ``x`` in ``[lx, ux]``, ``y`` in ``[ly, uy]`` (elementwise):
    ``lower_x*x + lower_y*y + lower_const <= x*y <= upper_x*x + upper_y*y + upper_const``."""

    lower_x: Array
    lower_y: Array
    lower_const: Array
    upper_x: Array
    upper_y: Array
    upper_const: Array


# --------------------------------------------------------------------------
# float32 evaluations of the functions (relative error of a few ulp, except
# where a weight says otherwise) and of their derivatives (used only to choose
# slopes and tangent points, never for soundness).


def _sigmoid(x):
    return jax.nn.sigmoid(x)


def _dsigmoid(x):
    return _sigmoid(x) * _sigmoid(-x)


def _dtanh(x):
    # sech^2 = 4 e^{-2|x|} / (1 + e^{-2|x|})^2: relatively accurate, no overflow
    e = jnp.exp(-2.0 * jnp.abs(x))
    return 4.0 * e / jnp.square(1.0 + e)


def _derf(x):
    return (2.0 / math.sqrt(math.pi)) * jnp.exp(-jnp.square(x))


def _gelu_erf(x):
    # x * Phi(x) through erfc, relatively accurate in the left tail (1 + erf cancels)
    return x * 0.5 * erfc(-x * (1.0 / math.sqrt(2.0)))


def _dgelu_erf(x):
    return 0.5 * erfc(-x * (1.0 / math.sqrt(2.0))) + x * _INV_SQRT_2PI * jnp.exp(-0.5 * jnp.square(x))


def _gelu_tanh_z(x):
    return 2.0 * _SQRT_2_OVER_PI * (x + _GELU_TANH_C * x * x * x)


def _gelu_tanh(x):
    # 0.5 x (1 + tanh(w)) = x * sigmoid(2w): no cancellation in the left tail
    return x * _sigmoid(_gelu_tanh_z(x))


def _dgelu_tanh(x):
    z = _gelu_tanh_z(x)
    dz = 2.0 * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * x * x)
    return _sigmoid(z) + x * _dsigmoid(z) * dz


def _quick_gelu(x):
    return x * _sigmoid(_QUICK_GELU_BETA * x)


def _dquick_gelu(x):
    z = _QUICK_GELU_BETA * x
    return _sigmoid(z) + z * _dsigmoid(z)


# float32 evaluation error of the GELU family relative to |f| grows in the
# left tail because the argument of erfc / sigmoid is rounded (d log Phi / dx
# ~ |x| there); measured, with margin, by test_float32_evaluation_error.
def _gelu_erf_weight(x):
    return 2.0 + jnp.square(jnp.minimum(x, 0.0))


def _gelu_tanh_weight(x):
    return 2.0 + 2.0 * jnp.abs(jnp.minimum(_gelu_tanh_z(x), 0.0))


def _quick_gelu_weight(x):
    return 2.0 + 2.0 * jnp.abs(jnp.minimum(_QUICK_GELU_BETA * x, 0.0))


# Bounds on |f''| over a grid cell whose points satisfy r <= |x| <= R.
#
# gelu_erf: f'' = phi(x) (2 - x^2), |f''| <= phi(x) (2 + x^2), which is
#   decreasing in |x| (derivative -phi(x) |x|^3), so phi(r) (2 + r^2);
#   at r = 0 this is 2 phi(0) = 0.7979, the global maximum.
# quick_gelu: f = x s(z), z = b x, f'' = b s'(z) (2 + z (1 - 2 s(z))), with
#   s' <= e^{-|z|} and |1 - 2 s| <= 1: |f''| <= b e^{-|z|} (2 + |z|), which
#   is decreasing in |z|. The global max |f''| = b/2 = 0.851 (at 0), found in
#   float64 on a 1e-4 grid over [-40, 40] (|f'''| <= 3, so the grid misses
#   at most 1.5e-4); 0.86 is used.
# gelu_tanh: f = x s(z), z = 2k (x + c x^3), f'' = 2 s'(z) z' + x (s''(z) z'^2
#   + s'(z) z''), |s''| <= s' <= e^{-|z|}, z' = 2k (1 + 3c x^2), z'' = 12 k c x:
#   |f''| <= e^{-|z(r)|} (2 z'(R) + R (z'(R)^2 + 12 k c R)). The global max
#   |f''| = k = 0.7979 (at 0) on the same float64 grid; 0.81 is used.
def _curv_gelu_erf(r, big_r):
    del big_r
    return _INV_SQRT_2PI * jnp.exp(-0.5 * jnp.square(r)) * (2.0 + jnp.square(r))


def _curv_quick_gelu(r, big_r):
    del big_r
    z = _QUICK_GELU_BETA * r
    return jnp.minimum(0.86, _QUICK_GELU_BETA * jnp.exp(-z) * (2.0 + z))


def _curv_gelu_tanh(r, big_r):
    k, c = _SQRT_2_OVER_PI, _GELU_TANH_C
    dz = 2.0 * k * (1.0 + 3.0 * c * jnp.square(big_r))
    tail = jnp.exp(-_gelu_tanh_z(r)) * (2.0 * dz + big_r * (jnp.square(dz) + 12.0 * k * c * big_r))
    return jnp.minimum(0.81, tail)


# --------------------------------------------------------------------------
# padding and small helpers


def _ulps(dtype) -> float:
    """The padding constants are written for float32; a wider float type scales
    them by its smaller unit roundoff (float64: by 2^-29)."""
    return float(jnp.finfo(dtype).eps / jnp.finfo(jnp.float32).eps)


def rel_pad(dtype) -> float:
    """``REL_PAD`` for arithmetic in ``dtype``."""
    return REL_PAD * _ulps(dtype)


def _flush_pad(dtype) -> float:
    return float(jnp.finfo(dtype).tiny)


def _pad(c, s, m, fmag):
    """Outward margin for the intercept ``c`` of a line of slope ``s`` on an
    interval within ``[-m, m]`` where ``|f|`` (weighted) is at most ``fmag``,
    for arithmetic in ``c``'s float type."""
    k = _ulps(c.dtype)
    return k * (REL_PAD * fmag + LINE_PAD * (jnp.abs(c) + jnp.abs(s) * m)) + ABS_PAD


def _safe_div(num, den):
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _chord_slope(fl, fu, l, u, dmid):
    """Chord slope, or the derivative at the midpoint when ``l == u``."""
    w = u - l
    return jnp.where(w > 0, _safe_div(fu - fl, w), dmid)


def _bisect(pred, lo, hi):
    """The upper end of a bracket of the switch of a monotone ``pred`` (False on
    ``lo``'s side, True on ``hi``'s). Only a *choice* of point: soundness never
    depends on its accuracy, so no gradient flows through it."""
    lo, hi = lax.stop_gradient(lo), lax.stop_gradient(hi)

    def step(_, bracket):
        a, b = bracket
        mid = 0.5 * (a + b)
        p = pred(mid)
        return jnp.where(p, a, mid), jnp.where(p, mid, b)

    return lax.fori_loop(0, _BISECT_STEPS, step, (lo, hi))[1]


def _alpha(alpha, like, default=0.5):
    if alpha is None:
        return jnp.full_like(like, default)
    return jnp.clip(jnp.asarray(alpha, like.dtype), 0.0, 1.0)


def _negate(b: LinearBounds) -> LinearBounds:
    """Bounds of ``-h`` from bounds of ``h`` on the same interval."""
    return LinearBounds(-b.upper_slope, -b.upper_intercept, -b.lower_slope, -b.lower_intercept)


def _mirror_odd(b: LinearBounds) -> LinearBounds:
    """Bounds of ``f(x) = -h(-x)`` on ``[l, u]`` from bounds of ``h`` on ``[-u, -l]``."""
    return LinearBounds(b.upper_slope, -b.upper_intercept, b.lower_slope, -b.lower_intercept)


def _mirror_even(b: LinearBounds) -> LinearBounds:
    """Bounds of ``f(x) = h(-x)`` on ``[l, u]`` from bounds of ``h`` on ``[-u, -l]``."""
    return LinearBounds(-b.lower_slope, b.lower_intercept, -b.upper_slope, b.upper_intercept)


# --------------------------------------------------------------------------
# the three constructions


def _convex(f, df, l, u, t) -> LinearBounds:
    """Convex ``f`` on ``[l, u]``: the lower line is the tangent at ``t`` (any
    point of the domain: convexity makes every tangent a global
    under-estimator; rounding of the slope moves the minimiser of ``f - s x``
    but changes the minimum by at most ``2m |f'(t) - s|``, inside the
    padding); the upper line is the chord with intercept ``max(g(l), g(u))``
    (a convex ``g = f - s x`` peaks at an end, whatever the slope)."""
    m = jnp.maximum(jnp.abs(l), jnp.abs(u))
    fl, fu, ft = f(l), f(u), f(t)
    st = df(t)
    ct = ft - st * t
    ct = ct - _pad(ct, st, jnp.maximum(m, jnp.abs(t)), jnp.abs(ft))
    sc = _chord_slope(fl, fu, l, u, st)
    cc = jnp.maximum(fl - sc * l, fu - sc * u)
    cc = cc + _pad(cc, sc, m, jnp.maximum(jnp.abs(fl), jnp.abs(fu)))
    return LinearBounds(st, ct, sc, cc)


def _concave(f, df, l, u, t) -> LinearBounds:
    """Concave ``f``: the negation of :func:`_convex` for ``-f``."""
    return _negate(_convex(lambda x: -f(x), lambda x: -df(x), l, u, t))


def _tangent_point(l, u, alpha):
    return l + alpha * (u - l)


def _sqrt_lines(l, u, alpha_upper) -> LinearBounds:
    """sqrt (concave, infinite slope at 0): the tangent point is kept at least
    ``1e-6 (u - l)`` inside ``l`` and at least 1e-30 (a tangent anywhere on
    ``x > 0`` is a global over-estimator); on ``u <= 1e-30`` the lines are
    the constants ``sqrt(l)`` and ``sqrt(u)`` instead of near-vertical ones."""
    t = jnp.maximum(_tangent_point(l, u, alpha_upper), jnp.maximum(l + 1e-6 * (u - l), 1e-30))
    lines = _concave(jnp.sqrt, _dsqrt, l, u, t)
    flat = u <= 1e-30
    top, bottom = jnp.sqrt(u), jnp.sqrt(l)
    zero = jnp.zeros_like(l)
    return LinearBounds(
        jnp.where(flat, zero, lines.lower_slope),
        jnp.where(flat, bottom - (rel_pad(l.dtype) * bottom + ABS_PAD), lines.lower_intercept),
        jnp.where(flat, zero, lines.upper_slope),
        jnp.where(flat, top + (rel_pad(l.dtype) * top + ABS_PAD), lines.upper_intercept),
    )


def _s_upper(f, df, l, u, alpha):
    """Upper line of an S-shaped ``f`` on ``[l, u]``: ``f'`` even, increasing on
    ``x < 0`` and decreasing on ``x > 0`` (convex left of 0, concave right).

    Any slope ``s = f'(a)``, ``a >= 0``: ``g = f - s x`` decreases on
    ``(-inf, -a)``, increases on ``(-a, a)`` and decreases on ``(a, inf)``, so
    ``max_[l,u] g = max(g(l), g(clip(a, l, u)))`` exactly (rounding of ``s``
    moves ``a`` but changes ``g(a)`` only by ``2m |f'(a) - s|``). The choice of
    ``a``: the tangent points whose tangent clears ``(l, f(l))`` start at ``d``
    (``d = l`` when ``l >= 0``; on a crossing interval the root, by bisection,
    of ``f(d) + f'(d)(l - d) = f(l)``, increasing in ``d``); alpha moves ``a``
    from ``d`` to ``u``. When even the tangent at ``u`` does not clear ``l``
    (or ``u <= 0``) the chord is the best upper line: ``a`` solves
    ``f'(a) = chord slope``, again by bisection.
    """
    m = jnp.maximum(jnp.abs(l), jnp.abs(u))
    fl, fu = f(l), f(u)
    sc = _chord_slope(fl, fu, l, u, df(0.5 * (l + u)))
    a_chord = _bisect(lambda a: df(a) <= sc, jnp.zeros_like(m), m)

    def clears(d):
        return f(d) + df(d) * (l - d) >= fl

    d = jnp.where(l >= 0, l, _bisect(clears, jnp.zeros_like(l), jnp.maximum(u, 0.0)))
    tangent_ok = (l >= 0) | ((u > 0) & clears(u))
    a = jnp.where(tangent_ok, d + alpha * (u - d), a_chord)
    s = df(a)
    xa = jnp.clip(a, l, u)
    fa = f(xa)
    c = jnp.maximum(fl - s * l, fa - s * xa)
    return s, c + _pad(c, s, m, jnp.maximum(jnp.abs(fl), jnp.abs(fa)))


def _s_shaped(f, df, l, u, alpha_lower, alpha_upper) -> LinearBounds:
    """Both lines of an S-shaped ``f``: the lower one is the upper line of
    ``h(x) = -f(-x)`` (S-shaped too) on ``[-u, -l]``, mirrored."""
    su, cu = _s_upper(f, df, l, u, alpha_upper)
    sl, cl = _s_upper(lambda x: -f(-x), lambda x: df(-x), -u, -l, alpha_lower)
    return LinearBounds(sl, -cl, su, cu)


def _grid_lines(f, df, curv, weight, l, u, alpha_lower, alpha_upper) -> LinearBounds:
    """Lines for a function with no convexity structure (the GELU family).

    The slope for each side is piecewise linear in alpha through ``s_min``
    (alpha 0), the chord slope (0.5) and ``s_max`` (1), where ``s_min, s_max``
    are the extreme of ``f'(l), f'(u)`` and the chord slope. The intercepts
    are ``min / max`` of ``g = f - s x`` over ``[l, u]``: on each cell of a
    grid with spacing at most ``h``, ``g`` lies within ``M2 h^2 / 8`` of its
    linear interpolant (``g'' = f''``, ``M2 >= |f''|`` on the cell from
    ``curv``), so ``min g >= min_cells(min(g_k, g_k+1) - M2_k h^2/8)``.
    Sound in exact arithmetic given the ``M2`` bounds; the float32 grid's
    uneven spacing is covered by inflating ``h``.
    """
    n = _GRID_POINTS
    frac = jnp.linspace(0.0, 1.0, n, dtype=l.dtype)
    x = l[..., None] + (u - l)[..., None] * frac
    x = jnp.concatenate([x[..., :-1], u[..., None]], axis=-1)
    fx = f(x)
    fl, fu = fx[..., 0], fx[..., -1]
    m = jnp.maximum(jnp.abs(l), jnp.abs(u))
    h = (u - l) / (n - 1) * (1.0 + 1e-6) + 2e-6 * m
    a, b = x[..., :-1], x[..., 1:]
    lo_abs = jnp.where(a * b <= 0, 0.0, jnp.minimum(jnp.abs(a), jnp.abs(b)))
    hi_abs = jnp.maximum(jnp.abs(a), jnp.abs(b))
    rem = 1.001 * curv(lo_abs, hi_abs) * jnp.square(h)[..., None] / 8.0
    fmag = jnp.max(jnp.abs(fx) * weight(x), axis=-1)

    dl, du = df(l), df(u)
    sc = _chord_slope(fl, fu, l, u, df(0.5 * (l + u)))
    s_min = jnp.minimum(jnp.minimum(dl, du), sc)
    s_max = jnp.maximum(jnp.maximum(dl, du), sc)

    def slope(al):
        return jnp.where(al < 0.5, s_min + 2.0 * al * (sc - s_min), sc + (2.0 * al - 1.0) * (s_max - sc))

    sl, su = slope(alpha_lower), slope(alpha_upper)
    gl = fx - sl[..., None] * x
    gu = fx - su[..., None] * x
    cl = jnp.min(jnp.minimum(gl[..., :-1], gl[..., 1:]) - rem, axis=-1)
    cu = jnp.max(jnp.maximum(gu[..., :-1], gu[..., 1:]) + rem, axis=-1)
    return LinearBounds(sl, cl - _pad(cl, sl, m, fmag), su, cu + _pad(cu, su, m, fmag))


# --------------------------------------------------------------------------
# the piecewise-linear ones: exact on one-signed intervals


# XLA on CPU flushes subnormals (float32: |x| < 1.2e-38) to zero, so even the
# "exact" relu/abs lines are padded by the smallest normal number (_flush_pad).


def _relu_lines(l, u, alpha_lower) -> LinearBounds:
    """ReLU: exact on one-signed intervals; on crossing ones the lower slope is
    alpha (``alpha x <= relu(x)`` for every real x) and the upper line the chord."""
    cross = (l < 0) & (u > 0)
    adaptive = (u >= -l).astype(l.dtype)
    a = adaptive if alpha_lower is None else _alpha(alpha_lower, l)
    m = jnp.maximum(jnp.abs(l), jnp.abs(u))
    s = _safe_div(u, u - l)
    c = jnp.maximum(-s * l, u - s * u)
    c = c + _pad(c, s, m, m)
    zero, one = jnp.zeros_like(l), jnp.ones_like(l)
    pos = l >= 0
    return LinearBounds(
        jnp.where(cross, a, jnp.where(pos, one, zero)),
        zero - _flush_pad(l.dtype),
        jnp.where(cross, s, jnp.where(pos, one, zero)),
        jnp.where(cross, c, zero) + _flush_pad(l.dtype),
    )


def _finite_lines(l) -> LinearBounds:
    """``finite``: the identity on a finite interval (:func:`domain_ok` refuses any other), exact."""
    one, flush = jnp.ones_like(l), _flush_pad(l.dtype)
    return LinearBounds(one, -flush * one, one, flush * one)


def _abs_lines(l, u, alpha_lower) -> LinearBounds:
    """abs: exact on one-signed intervals; on crossing ones the lower slope is
    ``2 alpha - 1`` (``|x| >= k x`` for ``|k| <= 1``) and the upper line the chord."""
    cross = (l < 0) & (u > 0)
    adaptive = (u >= -l).astype(l.dtype)
    a = adaptive if alpha_lower is None else _alpha(alpha_lower, l)
    m = jnp.maximum(jnp.abs(l), jnp.abs(u))
    s = _safe_div(u + l, u - l)
    c = jnp.maximum(-l - s * l, u - s * u)
    c = c + _pad(c, s, m, m)
    sign = jnp.where(l >= 0, 1.0, -1.0).astype(l.dtype)
    zero = jnp.zeros_like(l)
    return LinearBounds(
        jnp.where(cross, 2.0 * a - 1.0, sign),
        zero - _flush_pad(l.dtype),
        jnp.where(cross, s, sign),
        jnp.where(cross, c, zero) + _flush_pad(l.dtype),
    )


# --------------------------------------------------------------------------
# the table


def _signed(pos_lines, l, u, alpha_lower, alpha_upper, even) -> LinearBounds:
    """A function on ``x > 0`` or ``x < 0`` (never both): ``pos_lines`` bounds it
    on positive intervals; negative ones use its mirror (``f(x) = f(-x)`` when
    ``even``, ``f(x) = -f(-x)`` otherwise). The other branch is fed a harmless
    interval so that no NaN reaches the gradient."""
    neg = u < 0
    one = jnp.ones_like(l)
    lp, up = jnp.where(neg, one, l), jnp.where(neg, one, u)
    ln, un = jnp.where(neg, -u, one), jnp.where(neg, -l, one)
    direct = pos_lines(lp, up, alpha_lower, alpha_upper)
    if even:
        mirrored = _mirror_even(pos_lines(ln, un, 1.0 - alpha_lower, 1.0 - alpha_upper))
    else:
        mirrored = _mirror_odd(pos_lines(ln, un, 1.0 - alpha_upper, 1.0 - alpha_lower))
    return LinearBounds(*(jnp.where(neg, b, a) for a, b in zip(direct, mirrored)))


def _recip(x):
    return 1.0 / x


def _drecip(x):
    return -1.0 / jnp.square(x)


def _inv_square(x):
    return 1.0 / jnp.square(x)


def _dinv_square(x):
    return -2.0 / (x * jnp.square(x))


def _rsqrt(x):
    return lax.rsqrt(x)


def _drsqrt(x):
    return -0.5 * lax.rsqrt(x) / x


def _dsqrt(x):
    return 0.5 * lax.rsqrt(x)


def _pow3_neg(x):
    return -(x * x * x)


def _dpow3_neg(x):
    return -3.0 * x * x


def _lines_table() -> dict[str, Callable]:
    def convex(f, df):
        return lambda l, u, al, au: _convex(f, df, l, u, _tangent_point(l, u, al))

    def concave(f, df):
        return lambda l, u, al, au: _concave(f, df, l, u, _tangent_point(l, u, au))

    def s_shaped(f, df):
        return lambda l, u, al, au: _s_shaped(f, df, l, u, al, au)

    def grid(f, df, curv, weight):
        return lambda l, u, al, au: _grid_lines(f, df, curv, weight, l, u, al, au)

    square = convex(jnp.square, lambda x: 2.0 * x)
    recip_pos = convex(_recip, _drecip)
    inv_square_pos = convex(_inv_square, _dinv_square)

    def pow3(l, u, al, au):
        # x^3 = -S(x) with S(x) = -x^3 S-shaped (S' = -3x^2 is even and peaks at 0)
        return _negate(_s_shaped(_pow3_neg, _dpow3_neg, l, u, au, al))

    def reciprocal(l, u, al, au):
        return _signed(recip_pos, l, u, al, au, even=False)

    return {
        "exp": convex(jnp.exp, jnp.exp),
        "softplus": convex(jax.nn.softplus, _sigmoid),
        "square": square,
        "integer_pow_2": square,
        "integer_pow_4": convex(lambda x: jnp.square(jnp.square(x)), lambda x: 4.0 * x * jnp.square(x)),
        "rsqrt": convex(_rsqrt, _drsqrt),
        "log": concave(jnp.log, _recip),
        "sqrt": lambda l, u, al, au: _sqrt_lines(l, u, au),
        "tanh": s_shaped(jnp.tanh, _dtanh),
        "logistic": s_shaped(_sigmoid, _dsigmoid),
        "erf": s_shaped(lax.erf, _derf),
        "integer_pow_3": pow3,
        "reciprocal": reciprocal,
        "integer_pow_-1": reciprocal,
        "integer_pow_-2": lambda l, u, al, au: _signed(inv_square_pos, l, u, al, au, even=True),
        "gelu_erf": grid(_gelu_erf, _dgelu_erf, _curv_gelu_erf, _gelu_erf_weight),
        "gelu_tanh": grid(_gelu_tanh, _dgelu_tanh, _curv_gelu_tanh, _gelu_tanh_weight),
        "quick_gelu": grid(_quick_gelu, _dquick_gelu, _curv_quick_gelu, _quick_gelu_weight),
        "relu": lambda l, u, al, au: _relu_lines(l, u, al),
        "abs": lambda l, u, al, au: _abs_lines(l, u, al),
        "finite": lambda l, u, al, au: _finite_lines(l),
    }


_LINES = _lines_table()

# float32 evaluation (with its error weight) for the interval images
_EVAL: dict[str, tuple[Callable, Callable | None]] = {
    "exp": (jnp.exp, None),
    "softplus": (jax.nn.softplus, None),
    "square": (jnp.square, None),
    "integer_pow_2": (jnp.square, None),
    "integer_pow_3": (lambda x: x * x * x, None),
    "integer_pow_4": (lambda x: jnp.square(jnp.square(x)), None),
    "rsqrt": (_rsqrt, None),
    "log": (jnp.log, None),
    "sqrt": (jnp.sqrt, None),
    "tanh": (jnp.tanh, None),
    "logistic": (_sigmoid, None),
    "erf": (lax.erf, None),
    "reciprocal": (_recip, None),
    "integer_pow_-1": (_recip, None),
    "integer_pow_-2": (_inv_square, None),
    "gelu_erf": (_gelu_erf, _gelu_erf_weight),
    "gelu_tanh": (_gelu_tanh, _gelu_tanh_weight),
    "quick_gelu": (_quick_gelu, _quick_gelu_weight),
    "relu": (jax.nn.relu, None),
    "abs": (jnp.abs, None),
    "finite": (lambda x: x, None),
}

_INCREASING = frozenset({"exp", "softplus", "integer_pow_3", "log", "sqrt", "tanh", "logistic", "erf", "finite"})
_DECREASING = frozenset({"rsqrt", "reciprocal", "integer_pow_-1"})
_EVEN_MIN_AT_ZERO = frozenset({"square", "integer_pow_2", "integer_pow_4", "abs"})
_EXACT = frozenset({"relu", "abs", "finite"})
_UNIMODAL_MIN = {
    "gelu_erf": (_GELU_ERF_ARGMIN, _GELU_ERF_MIN),
    "gelu_tanh": (_GELU_TANH_ARGMIN, _GELU_TANH_MIN),
    "quick_gelu": (_QUICK_GELU_ARGMIN, _QUICK_GELU_MIN),
}

SUPPORTED: frozenset[str] = frozenset(_LINES)

# The float32-safe domain of each function as (lowest allowed l, highest
# allowed u, whether 0 must be excluded); ends chosen so that f and f' (the
# tangent slopes) stay finite in float32: exp(88) = 1.7e38, rsqrt'(1e-24) = 5e35.
_DOMAIN = {
    "exp": (-math.inf, 88.0, False),
    "log": (1e-30, math.inf, False),
    "sqrt": (0.0, math.inf, False),
    "rsqrt": (1e-24, math.inf, False),
    "reciprocal": (-math.inf, math.inf, True),
    "integer_pow_-1": (-math.inf, math.inf, True),
    "integer_pow_-2": (-math.inf, math.inf, True),
}
_MAX_ABS = {
    "square": 1e18, "integer_pow_2": 1e18, "integer_pow_3": 1e12, "integer_pow_4": 1e9,
    "gelu_erf": 1e6, "gelu_tanh": 1e6, "quick_gelu": 1e6,
}
# below these |x| the derivative (the tangent slope) overflows float32
_MIN_ABS = {"reciprocal": 1e-18, "integer_pow_-1": 1e-18, "integer_pow_-2": 1e-12}


def _check_name(name: str) -> None:
    if name not in SUPPORTED:
        raise KeyError(f"no relaxation for {name!r}; supported: {', '.join(sorted(SUPPORTED))}")


def _as_float(l, u):
    l = jnp.asarray(l)
    dtype = jnp.promote_types(l.dtype, jnp.float32)
    l = l.astype(dtype)
    return l, jnp.asarray(u, dtype)


def domain_ok(name: str, l, u) -> Array:
    """Elementwise: the relaxations of ``name`` are defined and finite on ``[l, u]``
    (``l <= u``, both finite, inside the domain, no float32 overflow)."""
    _check_name(name)
    l, u = _as_float(l, u)
    ok = jnp.isfinite(l) & jnp.isfinite(u) & (l <= u)
    lo_end, hi_end, excl_zero = _DOMAIN.get(name, (-math.inf, math.inf, False))
    ok = ok & (l >= lo_end) & (u <= hi_end)
    if excl_zero:
        tiny = _MIN_ABS[name]
        ok = ok & ((l >= tiny) | (u <= -tiny))
    if name in _MAX_ABS:
        ok = ok & (jnp.maximum(jnp.abs(l), jnp.abs(u)) <= _MAX_ABS[name])
    return ok


def _safe_inputs(name, l, u):
    """Where the domain fails, replace the interval by one inside it (the
    result there is overwritten with NaN) so that no NaN or Inf reaches the
    arithmetic or its gradient."""
    ok = domain_ok(name, l, u)
    inside = jnp.asarray(1.0, l.dtype)
    return ok, jnp.where(ok, l, inside), jnp.where(ok, u, inside)


def interval_image(name: str, l, u) -> tuple[Array, Array]:
    """Tight sound interval of ``f([l, u])`` elementwise, for ``f`` = ``name``.

    Monotone functions: the images of the ends; even powers and abs: 0 when
    the interval contains 0; the GELU family: its global minimum (a float64
    constant rounded down) when the interval contains the argmin. Padded
    outward by ``REL_PAD * |f| * weight + ABS_PAD`` (none for relu, abs and
    the exact 0). NaN where :func:`domain_ok` is False.
    """
    _check_name(name)
    l, u = _as_float(l, u)
    ok, l, u = _safe_inputs(name, l, u)
    f, weight = _EVAL[name]
    fl, fu = f(l), f(u)
    if name in _INCREASING:
        lo, hi = fl, fu
    elif name in _DECREASING:
        lo, hi = fu, fl
    else:
        lo, hi = jnp.minimum(fl, fu), jnp.maximum(fl, fu)
    wl = 1.0 if weight is None else weight(l)
    wu = 1.0 if weight is None else weight(u)
    wmax = jnp.maximum(wl, wu)
    if name not in _EXACT:
        lo = lo - (rel_pad(l.dtype) * jnp.abs(lo) * wmax + ABS_PAD)
        hi = hi + (rel_pad(l.dtype) * jnp.abs(hi) * wmax + ABS_PAD)
    else:
        lo, hi = lo - _flush_pad(l.dtype), hi + _flush_pad(l.dtype)
    if name in _EVEN_MIN_AT_ZERO:
        lo = jnp.where((l <= 0) & (u >= 0), 0.0, lo)
    if name in _UNIMODAL_MIN:
        argmin, fmin = _UNIMODAL_MIN[name]
        lo = jnp.where((l <= argmin) & (u >= argmin), jnp.minimum(lo, fmin), lo)
    nan = jnp.asarray(jnp.nan, l.dtype)
    return jnp.where(ok, lo, nan), jnp.where(ok, hi, nan)


def linear_bounds(name: str, l, u, alpha_lower=None, alpha_upper=None) -> LinearBounds:
    """Sound linear lower and upper bounds of ``f`` = ``name`` on ``[l, u]`` (elementwise).

    ``alpha_lower`` / ``alpha_upper`` (arrays in [0, 1], clipped; ``None`` means
    0.5, or CROWN's adaptive choice for relu/abs) pick among sound lines, for
    alpha-CROWN (Xu et al. 2021); any value is sound and gradients flow:

    * convex (exp, softplus, square, integer_pow_4, rsqrt, reciprocal and
      integer_pow_-2 on x > 0): ``alpha_lower`` is the tangent point
      ``l + alpha (u - l)``; the upper line is the chord (the best there is);
    * concave (log, sqrt, reciprocal on x < 0): the same with the sides swapped;
    * S-shaped (tanh, logistic, erf; integer_pow_3 mirrored): alpha moves the
      tangent point from the first one whose tangent is sound to the far end;
    * relu / abs on crossing intervals: the lower slope ``alpha`` / ``2 alpha - 1``;
    * finite (the identity where the interval is finite; refused elsewhere): exact;
    * GELU family: the slope, from the smallest (0) through the chord (0.5)
      to the largest (1) of the end derivatives.

    Every intercept is padded for float32 (see the module docstring). NaN
    where :func:`domain_ok` is False.
    """
    _check_name(name)
    l, u = _as_float(l, u)
    ok, l, u = _safe_inputs(name, l, u)
    if name in ("relu", "abs"):
        al = None if alpha_lower is None else _alpha(alpha_lower, l)
    else:
        al = _alpha(alpha_lower, l)
    au = _alpha(alpha_upper, l)
    lines = _LINES[name](l, u, al, au)
    nan = jnp.asarray(jnp.nan, l.dtype)
    return LinearBounds(*(jnp.where(ok, v, nan) for v in lines))


# --------------------------------------------------------------------------
# products of two bounded quantities


def _vertices(lx, ux, ly, uy):
    xs = jnp.stack([lx, lx, ux, ux])
    ys = jnp.stack([ly, uy, ly, uy])
    return xs, ys


def bilinear_interval(lx, ux, ly, uy) -> tuple[Array, Array]:
    """Sound interval of ``x*y`` over the box (min / max of the four corner
    products, padded by ``REL_PAD`` of the largest corner plus ``ABS_PAD``).

    The corners are reduced by chains of elementwise ``minimum`` / ``maximum``, not
    stacked and reduced over a new axis: XLA:CPU fused such a stack into a
    concatenate whose every slot re-evaluated the producers of ``lx .. uy`` (the
    zonotope's interval arithmetic, deep elementwise chains), half of a digits-UNet
    reach step (``benchmarks/RESULTS.md``, stop 32). Minima and maxima are exact, so
    the values are the same.
    """
    lx, ux, ly, uy = _broadcast(lx, ux, ly, uy)
    p = [lx * ly, lx * uy, ux * ly, ux * uy]
    pad = rel_pad(p[0].dtype) * functools.reduce(jnp.maximum, [jnp.abs(q) for q in p]) + ABS_PAD
    return functools.reduce(jnp.minimum, p) - pad, functools.reduce(jnp.maximum, p) + pad


def bilinear_bounds(lx, ux, ly, uy, alpha_lower=None, alpha_upper=None) -> BilinearBounds:
    """Linear lower and upper bounds of ``x*y`` over ``[lx, ux] x [ly, uy]``.

    The slopes convex-combine the two McCormick planes of each side:
    lower ``alpha (ly x + lx y - lx ly) + (1 - alpha)(uy x + ux y - ux uy)``,
    upper ``alpha (uy x + lx y - lx uy) + (1 - alpha)(ly x + ux y - ux ly)``
    (``None`` = 0.5). The constant is then recomputed as the exact min / max of
    ``x y - a x - b y`` over the box, which is bilinear and so attains it at a
    corner: sound for any slopes, tight for the McCormick ones (their planes
    touch ``x y`` at three corners). Padded by ``REL_PAD`` of the largest
    corner term plus ``ABS_PAD``.
    """
    lx, ux, ly, uy = _broadcast(lx, ux, ly, uy)
    al = _alpha(alpha_lower, lx)
    au = _alpha(alpha_upper, lx)
    a_l = al * ly + (1.0 - al) * uy
    b_l = al * lx + (1.0 - al) * ux
    a_u = au * uy + (1.0 - au) * ly
    b_u = au * lx + (1.0 - au) * ux
    xs, ys = _vertices(lx, ux, ly, uy)
    p = xs * ys

    def const(a, b, lower):
        r = p - a * xs - b * ys
        scale = jnp.max(jnp.abs(p) + jnp.abs(a * xs) + jnp.abs(b * ys), axis=0)
        pad = rel_pad(p.dtype) * scale + ABS_PAD
        return jnp.min(r, axis=0) - pad if lower else jnp.max(r, axis=0) + pad

    return BilinearBounds(a_l, b_l, const(a_l, b_l, True), a_u, b_u, const(a_u, b_u, False))


def quotient_interval(lx, ux, ly, uy) -> tuple[Array, Array]:
    """Sound interval of ``x / y`` over the box, via ``x * (1/y)``; NaN where
    ``[ly, uy]`` contains 0 (``domain_ok("reciprocal", ly, uy)`` is False)."""
    lx, ux, ly, uy = _broadcast(lx, ux, ly, uy)
    rl, ru = interval_image("reciprocal", ly, uy)
    return bilinear_interval(lx, ux, rl, ru)


def _broadcast(*arrays):
    arrays = [jnp.asarray(a) for a in arrays]
    dtype = jnp.promote_types(jnp.result_type(*arrays), jnp.float32)
    return jnp.broadcast_arrays(*(a.astype(dtype) for a in arrays))
