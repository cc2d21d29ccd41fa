"""Float64 bounds with float32 error coefficients: the rounding is bounded, the bound stays
sound and within rounding of the all-float64 one."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diverify.bounds import compile_bounds, zonotope
from diverify.bounds.graph import trace
from diverify.bounds.ops import kind, linear_part, linear_radius, rounding_count
from diverify.models.layers import layer_norm
from diverify.specs import Box
from tests.bounds.sampling import check_sound

def _conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))


CASES = {
    "dot_general": (lambda x, w: x @ w, (6, 300), (300, 40)),
    "conv_general_dilated": (_conv, (2, 16, 8, 8), (24, 16, 3, 3)),
    "reduce_sum": (lambda x, w: jnp.sum(x * 1.0, axis=1) + 0 * w[0, 0], (6, 500), (1, 1)),
    "mul": (lambda x, w: x * w, (6, 40), (6, 40)),
    "cumsum": (lambda x, w: jnp.cumsum(x, axis=1) + 0 * w[0, 0], (6, 300), (1, 1)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rounding_count_bounds_the_float32_map_of_float64_coefficients(name):
    """For rows ``g`` with heavy cancellation (large entries of both signs), the float32
    evaluation of a linear node (constants rounded to float32) stays within
    ``rounding_count * eps32 * |L| sum_i |g_i|`` of the float64 map, elementwise, and that bound
    is not vacuous (within 10^4 of the observed error)."""
    fn, xshape, wshape = CASES[name]
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        w = jnp.asarray(rng.normal(size=wshape) * 10 ** rng.uniform(-3, 3, size=wshape))
        graph = trace(lambda x: fn(x, w), [jnp.zeros(xshape, jnp.float64)], [True])
        (node,) = [n for n in graph.nodes if n.name == name]
        assert kind(node) == "linear"
        rows = rng.normal(size=(64,) + xshape) * 10 ** rng.uniform(-4, 4, size=(64,) + xshape)
        rows = jnp.asarray(rows, jnp.float32).astype(jnp.float64)  # exactly representable in both
        exact = jax.vmap(lambda g: linear_part(node)(g)[0])(rows)
        narrow = jax.vmap(lambda g: linear_part(node, jnp.float32)(g)[0])(rows.astype(jnp.float32))
        assert narrow.dtype == jnp.float32
        err = jnp.sum(jnp.abs(narrow.astype(jnp.float64) - exact), axis=0)
        mass = jnp.sum(jnp.abs(rows), axis=0)
        bound = rounding_count(node) * float(jnp.finfo(jnp.float32).eps) * linear_radius(node, [mass])[0]
        assert bool(jnp.all(err <= bound)), float(jnp.max(err / bound))
        assert float(jnp.max(err)) > 0 and float(jnp.max(bound)) < 1e4 * float(jnp.max(err))


def test_padded_sum_bounds_the_exact_sum_of_absolute_rows_whatever_the_summation_order():
    """``zonotope._padded_sum`` (the float32 sum of ``|g_i|``, padded) is at least the exact sum
    (``math.fsum`` of the float32 values) and at most 0.2% above it, in columns built to defeat a
    float32 sum: a large row before or after 16383 rows of half its ulp (a sequential sum rounds each
    of them away), magnitudes spanning 10^-38 to 10^30, subnormal rows (flushed to zero), zeros."""
    n = 16384
    rng = np.random.default_rng(3)
    cols = np.zeros((n, 5), np.float32)
    cols[:, 0] = cols[:, 1] = 2.0 ** -25
    cols[0, 0] = cols[-1, 1] = 1.0
    cols[:, 2] = rng.normal(size=n) * 10.0 ** rng.uniform(-38, 30, size=n)
    cols[:, 3] = np.float32(1e-42)
    exact = np.array([math.fsum(np.abs(cols[:, j]).astype(np.float64)) for j in range(cols.shape[1])])
    with jax.enable_x64(True):
        bound = np.asarray(jax.jit(zonotope._padded_sum)(jnp.asarray(cols.reshape(n, 1, 5))), np.float64).reshape(-1)
    assert np.all(bound >= exact), (bound, exact)
    tiny = float(np.finfo(np.float32).tiny)
    assert np.all(bound <= exact * 1.002 + 3 * n * tiny), (bound, exact)
    assert bound[4] <= 3 * n * tiny


def test_mass_sums_large_values_in_their_own_type_and_small_ones_in_float64():
    """Values of more than ``FLOAT64_MASS_LIMIT`` elements take the padded float32 sum, smaller ones
    the float64 accumulation; both bound the exact sum."""
    rng = np.random.default_rng(4)
    wide = rng.normal(size=(300, zonotope.FLOAT64_MASS_LIMIT + 1)).astype(np.float32)
    narrow = wide[:, :zonotope.FLOAT64_MASS_LIMIT]
    with jax.enable_x64(True):
        for rows in (wide, narrow):
            got = np.asarray(zonotope._mass(jnp.asarray(rows)))
            exact = np.array([math.fsum(np.abs(c).astype(np.float64)) for c in rows.T])
            assert got.dtype == np.float64 and np.all(got >= exact)
        padded = np.asarray(zonotope._padded_sum(jnp.asarray(wide)))
        np.testing.assert_array_equal(np.asarray(zonotope._mass(jnp.asarray(wide))), padded)
        assert not np.array_equal(np.asarray(zonotope._mass(jnp.asarray(narrow))), padded[:-1])


def test_exact_moves_count_no_rounding():
    with jax.enable_x64(True):
        graph = trace(lambda x: jnp.transpose(x.reshape(3, 4))[1:], [jnp.zeros(12, jnp.float64)], [True])
    assert [rounding_count(n) for n in graph.nodes] == [0] * len(graph.nodes)


def _stack(x, weights):
    """Residual GELU layers with LayerNorm and a softmax mix: every zonotope rule on the way."""
    d = x.shape[-1]
    ones, zeros = jnp.ones(d), jnp.zeros(d)
    for w in weights:
        att = jax.nn.softmax(x @ x.T / np.sqrt(d), axis=-1)
        x = layer_norm(x + att @ x + jax.nn.gelu(x @ w, approximate=False), ones, zeros, 1e-5)
    return jnp.mean(x, axis=0)


def test_narrow_error_coefficients_are_sound_and_lose_only_rounding():
    """The same float64 zonotope with float32 (``precision="mixed"``) and with float64 error
    coefficients: both sound at sampled, corner and attack points; the mixed one within 1e-4
    of the width of the other, and its error coefficients really float32."""
    weights = [jax.random.normal(jax.random.PRNGKey(k), (12, 12)) * 0.4 for k in range(3)]
    fn = lambda x: _stack(x, weights)  # noqa: E731
    x0 = jax.random.normal(jax.random.PRNGKey(7), (5, 12))
    ball = Box(x0 - 0.02, x0 + 0.02)
    widths = {}
    for precision in ("float64", "mixed"):
        out = compile_bounds(fn, ball, method="zonotope", precision=precision)(ball).output
        check_sound(fn, ball, out, jax.random.PRNGKey(8), n=128, attack_directions=4)
        widths[precision] = np.asarray(out.upper - out.lower, np.float64)
    assert np.all(widths["mixed"] >= widths["float64"] * (1 - 1e-6))
    np.testing.assert_allclose(widths["mixed"], widths["float64"], rtol=1e-4)
    with jax.enable_x64(True):
        graph = trace(fn, [jnp.asarray(x0, jnp.float64)], [True])
        ball64 = Box(jnp.asarray(x0, jnp.float64) - 0.02, jnp.asarray(x0, jnp.float64) + 0.02)
        _, _, forms, _ = zonotope.propagate(graph, [ball64], output_forms=True, error_dtype=jnp.float32)
    assert forms[0].errors.dtype == jnp.float32 and forms[0].offset.dtype == jnp.float64


def test_padded_float32_sums_everywhere_stay_sound(monkeypatch):
    """With every value's ``sum_i |g_i|`` summed in float32 and padded (``FLOAT64_MASS_LIMIT = 0``;
    by default only values of more than 2048 elements, which this small stack lacks), the mixed
    bound stays sound at sampled, corner and attack points and within 3e-4 of the float64 one (the
    pad ``(n - 1) u`` of each sum compounds through the three layers)."""
    weights = [jax.random.normal(jax.random.PRNGKey(k), (12, 12)) * 0.4 for k in range(3)]
    fn = lambda x: _stack(x, weights)  # noqa: E731
    x0 = jax.random.normal(jax.random.PRNGKey(7), (5, 12))
    ball = Box(x0 - 0.02, x0 + 0.02)
    exact = compile_bounds(fn, ball, method="zonotope", precision="float64")(ball).output
    monkeypatch.setattr(zonotope, "FLOAT64_MASS_LIMIT", 0)
    padded = compile_bounds(fn, ball, method="zonotope", precision="mixed")(ball).output
    check_sound(fn, ball, padded, jax.random.PRNGKey(9), n=128, attack_directions=4)
    w_exact = np.asarray(exact.upper - exact.lower, np.float64)
    w_padded = np.asarray(padded.upper - padded.lower, np.float64)
    assert np.all(w_padded >= w_exact * (1 - 1e-6))
    np.testing.assert_allclose(w_padded, w_exact, rtol=3e-4)
    assert np.max(w_padded / w_exact) > 1 + 1e-6  # the padded sums were taken
