"""Exact expected bounds on tiny layers, worked out by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diverify.bounds import bound, crown, ibp
from diverify.bounds.interval import IntervalBound
from diverify.specs import Box, lp_ball

W = jnp.array([[1.0, -2.0], [3.0, 0.5]])


@pytest.mark.parametrize("method", ["ibp", "forward", "crown-ibp", "crown", "alpha-crown"])
def test_affine_layer_is_exact(method):
    # y = W x + b over x in [-1, 1]^2: y_i in b_i -+ sum_j |W_ij|
    fn = lambda x: W @ x + jnp.array([1.0, -1.0])  # noqa: E731
    out = bound(fn, Box(-jnp.ones(2), jnp.ones(2)), method=method).output
    np.testing.assert_allclose(out.lower, [1 - 3, -1 - 3.5], rtol=1e-6)
    np.testing.assert_allclose(out.upper, [1 + 3, -1 + 3.5], rtol=1e-6)


def test_crown_is_exact_on_a_linear_function_where_ibp_is_not():
    # f(x) = x1 - x1 = 0: IBP sees two independent intervals, CROWN cancels them.
    fn = lambda x: x[0] - x[0] + x[1]  # noqa: E731
    s = Box(jnp.array([-1.0, 2.0]), jnp.array([1.0, 3.0]))
    i = ibp(fn, s)
    c = crown(fn, s)
    np.testing.assert_allclose([i.lower, i.upper], [0.0, 5.0])
    np.testing.assert_allclose([c.lower, c.upper], [2.0, 3.0], atol=1e-6)


def test_relu_on_one_signed_intervals_is_exact():
    fn = lambda x: jax.nn.relu(x)  # noqa: E731
    s = Box(jnp.array([1.0, -3.0]), jnp.array([2.0, -1.0]))
    for method in ("ibp", "crown"):
        out = bound(fn, s, method=method).output
        np.testing.assert_allclose(out.lower, [1.0, 0.0], atol=1e-6)
        np.testing.assert_allclose(out.upper, [2.0, 0.0], atol=1e-6)


def test_spec_bounds_a_margin():
    fn = lambda x: W @ x  # noqa: E731
    c = jnp.array([[1.0, -1.0]])  # y0 - y1 = -2 x0 - 2.5 x1 over the unit box: [-4.5, 4.5]
    out = crown(fn, Box(-jnp.ones(2), jnp.ones(2)), spec=c)
    np.testing.assert_allclose(out.lower, [-4.5], rtol=1e-6)
    np.testing.assert_allclose(out.upper, [4.5], rtol=1e-6)


def test_l2_ball_concretisation_is_hoelder():
    # <a, x> over ||x - c||_2 <= eps: <a, c> -+ eps ||a||_2
    a = jnp.array([3.0, 4.0])
    out = crown(lambda x: a @ x, lp_ball(jnp.array([1.0, 1.0]), 0.5, p=2))
    np.testing.assert_allclose([out.lower, out.upper], [7 - 2.5, 7 + 2.5], rtol=1e-6)


def test_ibp_of_softmax_is_the_tight_interval():
    x = jnp.array([0.0, 1.0, -1.0])
    eps = 0.2
    out = ibp(lambda x: jax.nn.softmax(x), lp_ball(x, eps))
    lo, hi = np.asarray(x) - eps, np.asarray(x) + eps
    for i in range(3):
        others_hi = sum(np.exp(hi[j]) for j in range(3) if j != i)
        others_lo = sum(np.exp(lo[j]) for j in range(3) if j != i)
        assert out.lower[i] == pytest.approx(np.exp(lo[i]) / (np.exp(lo[i]) + others_hi), rel=1e-4)
        assert out.upper[i] == pytest.approx(np.exp(hi[i]) / (np.exp(hi[i]) + others_lo), rel=1e-4)


def test_output_pytree_is_mirrored():
    out = ibp(lambda x: {"a": x * 2.0, "b": (x + 1.0, x.sum())}, Box(jnp.zeros(2), jnp.ones(2)))
    assert isinstance(out["a"], IntervalBound) and isinstance(out["b"][1], IntervalBound)
    np.testing.assert_allclose(out["b"][1].upper, 2.0)
