"""Float64 bounds with float32 error coefficients: the rounding is bounded, the bound stays
sound and within rounding of the all-float64 one."""

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
