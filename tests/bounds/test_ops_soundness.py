"""Sampling soundness of every supported operation, for every method.

Each case is a small function built around one operation (with random
weights around it so the relaxation sees mixed signs); the bound of each
method must contain the function's value at interior points, corners and
attack points of the input set.
"""


import jax
import jax.numpy as jnp
import pytest

from diverify.bounds import bound
from diverify.errors import DiverifyError
from diverify.specs import lp_ball
from tests.bounds.sampling import check_sound

#: Every op under the three method families; the other methods on the ops that stress them most.
METHODS = ["ibp", "zonotope", "crown-forward", "crown"]
EXTRA_METHODS = ["forward", "crown-ibp", "crown-zonotope", "alpha-crown"]
STRESS_OPS = ["attention", "layernorm", "gelu_erf", "division"]

_k = jax.random.split(jax.random.PRNGKey(42), 8)
W = jax.random.normal(_k[0], (6, 5)) / 2
V = jax.random.normal(_k[1], (5, 4)) / 2


def _ln(x, eps=1e-5):
    mu = jnp.mean(x, -1, keepdims=True)
    xc = x - mu
    var = jnp.mean(xc * xc, -1, keepdims=True)
    return xc * jax.lax.rsqrt(var + eps)


CASES = {
    "affine": (lambda x: x @ W + 1.0, 0.0),
    "relu": (lambda x: jax.nn.relu(x @ W) @ V, 0.0),
    "tanh": (lambda x: jnp.tanh(x @ W) @ V, 0.0),
    "sigmoid": (lambda x: jax.nn.sigmoid(x @ W) @ V, 0.0),
    "exp": (lambda x: jnp.exp(x @ W) @ V, 0.0),
    "gelu_erf": (lambda x: jax.nn.gelu(x @ W, approximate=False) @ V, 0.0),
    "gelu_tanh": (lambda x: jax.nn.gelu(x @ W, approximate=True) @ V, 0.0),
    "softplus": (lambda x: jax.nn.softplus(x @ W) @ V, 0.0),
    "mish": (lambda x: jax.nn.mish(x @ W) @ V, 0.0),
    "softmax": (lambda x: jax.nn.softmax(x @ W, axis=-1) @ V, 0.0),
    "softmax_axis0": (lambda x: jax.nn.softmax(x @ W, axis=0), 0.0),
    "layernorm": (lambda x: _ln(x @ W) @ V, 0.0),
    "matmul_both_perturbed": (lambda x: (x @ W) @ (x @ W).T, 0.0),
    "attention": (lambda x: jax.nn.softmax((x @ W) @ (x @ W).T / 2.0, axis=-1) @ (x @ W), 0.0),
    "product": (lambda x: (x @ W) * jnp.tanh(x @ W), 0.0),
    "division": (lambda x: (x @ W) / (2.0 + jnp.exp(x @ W)), 0.0),
    "reciprocal": (lambda x: 1.0 / x, 3.0),
    "sqrt": (lambda x: jnp.sqrt(x) @ W, 3.0),
    "rsqrt": (lambda x: jax.lax.rsqrt(x) @ W, 3.0),
    "log": (lambda x: jnp.log(x) @ W, 3.0),
    "square": (lambda x: jnp.square(x @ W), 0.0),
    "cube": (lambda x: (x @ W) ** 3, 0.0),
    "reductions": (lambda x: jnp.concatenate([x.sum(0), x.mean(1), (x @ W).sum(0)]), 0.0),
    "reshape_transpose": (lambda x: (x.reshape(6, 3).T @ W[:6]).reshape(-1), 0.0),
    "gather_concat": (lambda x: jnp.concatenate([x[jnp.array([2, 0, 2])], x[:, ::-1]], axis=0) @ W, 0.0),
    "max_min_const": (lambda x: jnp.maximum(x @ W, 0.3) - jnp.minimum(x @ W, -0.2), 0.0),
    "max_min_const_large": (lambda x: jnp.maximum(300.0 * x @ W, -150.0) - jnp.clip(300.0 * x @ W, -300.0, 200.0), 0.0),
    "log_softmax": (lambda x: jax.nn.log_softmax(x @ W, axis=-1), 0.0),
    "logsumexp": (lambda x: jnp.concatenate([jax.nn.logsumexp(3.0 * x @ W, axis=-1), jax.nn.logsumexp(x, axis=0)]), 0.0),
    "max_reductions": (lambda x: jnp.concatenate([jnp.max(x @ W, axis=0), jnp.min(x @ W, axis=1),
                                                  jnp.maximum(x[0], x[2])]), 0.0),
}


CASE_METHODS = [(n, m) for n in sorted(CASES) for m in METHODS] + [(n, m) for n in STRESS_OPS for m in EXTRA_METHODS]


@pytest.mark.parametrize("name, method", CASE_METHODS)
def test_bound_contains_samples(name, method):
    fn, offset = CASES[name]
    x0 = jax.random.normal(jax.random.PRNGKey(len(name)), (3, 6)) * 0.5 + offset
    s = lp_ball(x0, 0.05)
    out = bound(fn, s, method=method).output
    check_sound(fn, s, out, jax.random.PRNGKey(7), n=128, attack_directions=3)


@pytest.mark.parametrize("p", [2.0, 1.0])
@pytest.mark.parametrize("method", ["ibp", "forward", "zonotope", "crown"])
def test_lp_balls_on_one_row(p, method):
    fn = CASES["attention"][0]
    x0 = jax.random.normal(jax.random.PRNGKey(3), (3, 6)) * 0.5
    mask = jnp.array([0.0, 1.0, 0.0])[:, None]
    s = lp_ball(x0, 0.05, p=p, mask=mask)
    out = bound(fn, s, method=method).output
    check_sound(fn, s, out, jax.random.PRNGKey(1), n=128, attack_directions=3)


@pytest.mark.parametrize("method", ["ibp", "zonotope"])
def test_a_small_end_next_to_a_huge_radius_is_kept(method):
    """``1 / (1 + sum exp(x))`` with ``exp(x)`` up to ~1e34: the denominator's lower end is
    1 exactly (sums and shifts map their end points); through the centre/radius form it came
    out as ``(1.6e34 + 1) - 1.6e34 = 0`` and the reciprocal was refused."""
    s = lp_ball(jnp.array([[0.0, 40.0, 20.0]]), 40.0)
    fn = lambda x: 1.0 / (1.0 + jnp.sum(jnp.exp(x), axis=-1))  # noqa: E731
    res = bound(fn, s, method=method)
    assert float(res.intermediates[next(k for k in res.intermediates if k.endswith(":add"))].lower.min()) >= 1.0
    check_sound(fn, s, res.output, jax.random.PRNGKey(7))
    assert float(res.output.upper.max()) <= 1.0 + 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_clamps_with_huge_constants_keep_the_value_in_float32(method):
    """``max(x, -1e9)``, ``min(x, 1e9)`` and a clip to +-1e8 are ``x`` itself for ordinary ``x``. As
    ``c + relu(x - c)`` the bound computed ``-1e9 + (x + 1e9)`` in float32 and came out as [0, 0]
    for ``x = 0.3``; as ``x + relu(c - x)`` it is ``x``'s own interval."""
    x0 = jnp.array([0.3, -0.7, 1.1])
    fns = [lambda x: jnp.maximum(x, -1e9), lambda x: jnp.minimum(x, 1e9), lambda x: jnp.clip(x, -1e8, 1e8)]
    for fn in fns:
        out = bound(fn, lp_ball(x0, 1e-3), method=method).output
        assert jnp.allclose(out.lower, x0 - 1e-3, atol=1e-6) and jnp.allclose(out.upper, x0 + 1e-3, atol=1e-6)


@pytest.mark.parametrize("method", ["ibp", "zonotope", "crown"])
def test_a_finite_guard_is_the_identity_on_finite_values_and_refused_on_an_overflow(method):
    """``where(isfinite(y), y, 0)`` (logsumexp's guard of its shift) is bounded as ``y`` where ``y``'s
    interval is finite (then every point's ``y`` is finite and the guard returns it), and refused
    where it is not: a bound that took the guard for the identity would miss the 0 at overflowing points."""
    x0 = jnp.array([0.3, -0.7, 1.1])
    out = bound(lambda x: jnp.where(jnp.isfinite(x), x, 0.0), lp_ball(x0, 1e-3), method=method).output
    assert jnp.allclose(out.lower, x0 - 1e-3, atol=1e-6) and jnp.allclose(out.upper, x0 + 1e-3, atol=1e-6)
    def overflow(x):  # 1e38 x overflows float32 (to inf, guarded to 0) for x >= 3.41
        y = x * 1e38
        return jnp.where(jnp.isfinite(y), y, 0.0) * 1e-38
    with pytest.raises(DiverifyError, match="cannot bound 'finite'"):
        bound(overflow, lp_ball(jnp.array([1.0, 4.0]), 0.5), method=method)


def test_offset_free_is_claimed_only_where_the_offset_is_zero():
    """CROWN skips the bias pass of affine nodes whose ``f(0)`` :func:`~diverify.bounds.ops.offset_free`
    knows to be 0. It must never claim that of a node with a constant part (a bias ``add``, a constant
    piece of a concatenation, a ``sub`` of a constant), and it claims it of products with weights, of
    structural nodes and of constants that are all zeros."""
    import numpy as np

    from diverify.bounds.graph import trace
    from diverify.bounds.ops import kind, linear_offset, offset_free

    def f(x):
        h = x @ W  # dot_general with weights
        h = jnp.concatenate([h, jnp.zeros(1), jnp.ones(1)])  # one constant piece that is not 0
        h = jnp.concatenate([h, jnp.zeros(2)]).reshape(3, 3) * 2.0  # only zeros added
        h = h + jnp.arange(3.0) - 0.5  # bias add, sub of a constant
        return jnp.sum(h, axis=0) + x[:3]  # reduce, add of two perturbed values

    graph = trace(f, [jnp.ones(6)], [True])
    claimed, kept = set(), set()
    for node in graph.nodes:
        if kind(node) != "linear":
            continue
        zero = all(not np.any(np.asarray(o)) for o in linear_offset(node))
        if offset_free(node):
            assert zero, node.name
            claimed.add(node.name)
        else:
            kept.add(node.name)
    assert {"dot_general", "reshape", "mul", "reduce_sum"} <= claimed
    assert {"concatenate", "add", "sub"} <= kept
