"""Soundness of the McCormick bounds on ``x*y`` and of the product / quotient
intervals against float64 truth, with no tolerance beyond the module's padding."""

from __future__ import annotations

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings

from diverify.bounds import relaxations as R

N = 16


@st.composite
def side(draw):
    kind = draw(st.sampled_from(["point", "tiny", "unit", "wide", "positive", "negative"]))
    c = draw(st.floats(-5.0, 5.0))
    w = {"point": 0.0, "tiny": draw(st.floats(1e-7, 1e-3)), "unit": draw(st.floats(0.0, 3.0)), "wide": draw(st.floats(3.0, 60.0))}.get(kind)
    if kind == "positive":
        lo = draw(st.floats(1e-3, 10.0))
        return lo, lo + draw(st.floats(0.0, 10.0))
    if kind == "negative":
        hi = -draw(st.floats(1e-3, 10.0))
        return hi - draw(st.floats(0.0, 10.0)), hi
    return c - w / 2, c + w / 2


boxes = st.lists(st.tuples(side(), side()), min_size=N, max_size=N)
alphas = st.lists(st.floats(0.0, 1.0), min_size=N, max_size=N)


def _unpack(bs):
    arr = np.array([[a, b, c, d] for (a, b), (c, d) in bs], np.float32)
    lx, ux, ly, uy = arr.T
    return lx, np.maximum(ux, lx), ly, np.maximum(uy, ly)


def _points(lx, ux, ly, uy, rng, n=200):
    """Float64 points of each box: the corners, edge points and uniform interior points."""
    lx, ux, ly, uy = (np.asarray(v, np.float64)[:, None] for v in (lx, ux, ly, uy))
    t = np.concatenate([[0.0, 0.0, 1.0, 1.0, 0.5, 0.0, 1.0, 0.5], rng.uniform(size=n)])
    s = np.concatenate([[0.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 1.0], rng.uniform(size=n)])
    return lx + (ux - lx) * t, ly + (uy - ly) * s


def product_violations(lx, ux, ly, uy, b: R.BilinearBounds, image=None, rng=None):
    x, y = _points(lx, ux, ly, uy, rng or np.random.default_rng(0))
    xy = x * y
    c = [np.asarray(v, np.float64)[:, None] for v in b]
    bad = (c[0] * x + c[1] * y + c[2] > xy) | (c[3] * x + c[4] * y + c[5] < xy)
    if image is not None:
        lo, hi = (np.asarray(v, np.float64)[:, None] for v in image)
        bad |= (lo > xy) | (hi < xy)
    return int(np.sum(bad))


_bounds = jax.jit(R.bilinear_bounds)
_interval = jax.jit(R.bilinear_interval)
_quotient = jax.jit(R.quotient_interval)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(boxes, st.one_of(st.just([0.5] * N), alphas), st.one_of(st.just([0.5] * N), alphas))
def test_mccormick_and_product_interval_are_sound(bs, al, au):
    lx, ux, ly, uy = _unpack(bs)
    b = _bounds(lx, ux, ly, uy, np.asarray(al, np.float32), np.asarray(au, np.float32))
    image = _interval(lx, ux, ly, uy)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in (*b, *image))
    assert product_violations(lx, ux, ly, uy, b, image) == 0


@settings(max_examples=30, deadline=None, derandomize=True)
@given(boxes)
def test_quotient_interval_is_sound_or_nan(bs):
    lx, ux, ly, uy = _unpack(bs)
    lo, hi = (np.asarray(v, np.float64) for v in _quotient(lx, ux, ly, uy))
    ok = np.asarray(R.domain_ok("reciprocal", ly, uy))
    assert not np.any(ok & (ly <= 0) & (uy >= 0))
    assert np.all(np.isnan(lo[~ok])) and np.all(np.isnan(hi[~ok]))
    assert np.all(np.isfinite(lo[ok])) and np.all(np.isfinite(hi[ok]))
    x, y = _points(lx, ux, ly, uy, np.random.default_rng(1))
    q = x[ok] / y[ok]
    assert np.all(lo[ok][:, None] <= q) and np.all(q <= hi[ok][:, None])


def test_checker_catches_a_wrong_plane():
    lx, ux, ly, uy = (np.array(v, np.float32) for v in ([-1.0, 0.5], [2.0, 3.0], [-2.0, -1.0], [1.0, 4.0]))
    good = R.bilinear_bounds(lx, ux, ly, uy)
    assert product_violations(lx, ux, ly, uy, good) == 0
    # an upper McCormick plane (uy x + lx y - lx uy) passed off as a lower one
    wrong = good._replace(lower_x=uy, lower_y=lx, lower_const=-lx * uy)
    assert product_violations(lx, ux, ly, uy, wrong) > 0
    # the product interval of the ends only (missing the mixed corners)
    assert product_violations(lx, ux, ly, uy, good, (lx * ly, ux * uy)) > 0


def test_mccormick_planes_are_recovered_at_alpha_extremes():
    lx, ux, ly, uy = (np.array(v, np.float32) for v in ([-1.0, 0.5], [2.0, 3.0], [-2.0, -1.0], [1.0, 4.0]))
    one, zero = np.ones(2, np.float32), np.zeros(2, np.float32)
    b1 = R.bilinear_bounds(lx, ux, ly, uy, one, one)
    np.testing.assert_array_equal(b1.lower_x, ly)
    np.testing.assert_array_equal(b1.lower_y, lx)
    np.testing.assert_allclose(b1.lower_const, -lx * ly, atol=1e-4)
    np.testing.assert_array_equal(b1.upper_x, uy)
    np.testing.assert_array_equal(b1.upper_y, lx)
    np.testing.assert_allclose(b1.upper_const, -lx * uy, atol=1e-4)
    b0 = R.bilinear_bounds(lx, ux, ly, uy, zero, zero)
    np.testing.assert_allclose(b0.lower_const, -ux * uy, atol=1e-4)
    np.testing.assert_allclose(b0.upper_const, -ux * ly, atol=1e-4)
    # the lower plane touches x*y at the corner (lx, ly): tight up to the padding
    at = np.float64(b1.lower_x[0]) * lx[0] + np.float64(b1.lower_y[0]) * ly[0] + np.float64(b1.lower_const[0])
    assert 0.0 <= np.float64(lx[0]) * ly[0] - at <= 1e-4


def test_degenerate_box_is_nearly_exact():
    lx = ux = np.array([1.5, -2.0, 0.0], np.float32)
    ly = uy = np.array([-3.0, 0.25, 7.0], np.float32)
    lo, hi = R.bilinear_interval(lx, ux, ly, uy)
    np.testing.assert_allclose(lo, lx * ly, rtol=1e-5, atol=1e-29)
    np.testing.assert_allclose(hi, lx * ly, rtol=1e-5, atol=1e-29)
    b = R.bilinear_bounds(lx, ux, ly, uy)
    low = b.lower_x * lx + b.lower_y * ly + b.lower_const
    up = b.upper_x * lx + b.upper_y * ly + b.upper_const
    assert np.all(np.asarray(up) - np.asarray(low) <= 1e-4)


def test_broadcasting_vmap_and_alpha_gradients():
    lx, ux = jnp.array([-1.0, 0.5, 2.0]), jnp.array([2.0, 3.0, 2.0])
    ly, uy = jnp.float32(-1.0), jnp.float32(4.0)
    b = R.bilinear_bounds(lx, ux, ly, uy)
    assert all(v.shape == (3,) for v in b)
    mapped = jax.vmap(R.bilinear_bounds, in_axes=(0, 0, None, None))(lx, ux, ly, uy)
    for d, m in zip(b, mapped):
        np.testing.assert_allclose(np.asarray(d), np.asarray(m), rtol=1e-6)

    def objective(al, au):
        c = R.bilinear_bounds(lx, ux, ly, uy, al, au)
        return jnp.sum(c.lower_x * lx + c.lower_y * ly + c.lower_const) - jnp.sum(c.upper_x * ux + c.upper_y * uy + c.upper_const)

    grads = jax.jit(jax.grad(objective, argnums=(0, 1)))(jnp.full(3, 0.3), jnp.full(3, 0.7))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    assert any(np.any(np.asarray(g) != 0) for g in grads)


def test_quotient_of_positive_box():
    lo, hi = R.quotient_interval(np.float32(1.0), np.float32(2.0), np.float32(4.0), np.float32(8.0))
    assert float(lo) <= 0.125 and 0.125 - float(lo) < 1e-5
    assert float(hi) >= 0.5 and float(hi) - 0.5 < 1e-5


def test_product_interval_reduces_its_corners_without_stacking_them():
    """The four corner products are reduced elementwise. Stacked and reduced over a new
    axis, XLA:CPU fused the stack into a concatenate that re-evaluated the operands'
    producers once per slot, half of a UNet reach step. The interval stays sound and tight."""

    def chain(x):  # a deep elementwise producer of the interval ends, as in the zonotope's arithmetic
        for _ in range(6):
            x = jnp.nextafter(x * 1.5 + jnp.sin(x), jnp.inf)
        return x

    def product(lx, ux, ly, uy):
        return R.bilinear_interval(chain(lx), chain(ux), chain(ly), chain(uy))

    args = [jnp.linspace(a, a + 1.0, 64) for a in (-2.0, -1.0, 0.5, 1.0)]
    hlo = jax.jit(product).lower(*args).compile().as_text()
    assert "concatenate" not in hlo
    lo, hi = product(*args)
    ends = [np.asarray(chain(a)) for a in args]
    corners = [ends[0] * ends[2], ends[0] * ends[3], ends[1] * ends[2], ends[1] * ends[3]]
    low, high = np.min(corners, axis=0), np.max(corners, axis=0)
    slack = 1e-5 * np.max(np.abs(corners), axis=0) + 1e-30
    assert np.all(np.asarray(lo) <= low) and np.all(np.asarray(hi) >= high)
    assert np.all(np.asarray(lo) >= low - slack) and np.all(np.asarray(hi) <= high + slack)
