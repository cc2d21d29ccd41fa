"""Tracing, inlining and recognition of high-level ops."""

import jax
import jax.numpy as jnp
import pytest

from diverify.bounds import bound
from diverify.bounds.graph import trace
from diverify.errors import DiverifyError, UnsupportedPrimitiveError
from diverify.specs import lp_ball


def names(fn, *shapes):
    g = trace(fn, [jnp.ones(s) for s in shapes], [True] * len(shapes))
    return [n.name for n in g.nodes]


def test_gelu_is_one_node_however_it_is_written():
    assert names(lambda x: jax.nn.gelu(x, approximate=False), (2, 3)) == ["gelu_erf"]
    assert names(lambda x: jax.nn.gelu(x, approximate=True), (2, 3)) == ["gelu_tanh"]
    # A user's own erf GELU, written the textbook way, traces to the same graph.
    own = lambda x: 0.5 * x * jax.lax.erfc(-x * 0.7071067811865476)  # noqa: E731
    assert names(own, (4,)) == ["gelu_erf"]
    assert names(lambda x: x * jax.nn.sigmoid(1.702 * x), (4,)) == ["quick_gelu"]
    assert names(jax.nn.silu, (4,)) == ["silu"]


def test_softplus_is_one_node_and_the_activations_built_on_it_follow():
    # jax.nn.softplus is logaddexp(x, 0): a max, an abs, exp, log1p and a NaN test (`ne`), none of
    # which is boundable alone; recognised, it is the convex softplus relaxation.
    assert names(jax.nn.softplus, (2, 3)) == ["softplus"]
    assert names(jax.nn.mish, (4,)) == ["softplus", "tanh", "mul"]
    assert "softplus" in names(jax.nn.log_sigmoid, (4,))


def test_a_maximum_of_perturbed_values_becomes_pairwise_relus():
    ops = names(lambda x: jnp.max(x, axis=1), (2, 5))  # 5 -> 3 -> 2 -> 1: three levels of pairs
    assert "reduce_max" not in ops and ops.count("relu") == 3
    assert names(lambda x: jnp.maximum(x[0], x[1]), (2, 3)).count("relu") == 1
    assert "reduce_min" not in names(lambda x: jnp.min(x), (2, 3))
    # log_softmax's max(reduce_max(x), -inf) (the reduction's initial value) is the identity
    assert "max" not in names(lambda x: jax.nn.log_softmax(x), (2, 3))


def test_logsumexp_guards_its_shift_with_finite_and_drops_its_unused_sign():
    # jax.nn.logsumexp: where(isfinite(m), m, 0) around its shift m, and a `sign` of the sum that it
    # computes and does not return. The guard becomes `finite`; is_finite and sign are dead.
    ops = names(lambda x: jax.nn.logsumexp(x, axis=-1), (2, 3))
    assert "finite" in ops and not {"is_finite", "select_n", "sign"} & set(ops)
    # a result nobody reads is not bounded, so an unsupported one is no error
    assert names(lambda x: (jnp.sign(x), x * 2.0)[1], (3,)) == ["mul"]


def test_softmax_becomes_pairwise_form_with_no_max():
    ops = names(lambda x: jax.nn.softmax(x, axis=-1), (2, 3))
    assert "reduce_max" not in ops and "exp" in ops and "reciprocal" in ops
    # hand-written softmax without max subtraction is recognised too
    own = lambda x: jnp.exp(x) / jnp.sum(jnp.exp(x), axis=1, keepdims=True)  # noqa: E731
    assert names(own, (2, 3)) == ops


def test_softmax_recognition_respects_axes():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 3))
    for axis in (0, 1):
        fn = lambda x, a=axis: jax.nn.softmax(x, axis=a)  # noqa: E731
        g = trace(fn, [x], [True])
        assert "reduce_max" not in [n.name for n in g.nodes]
        r = bound(fn, lp_ball(x, 0.0), method="ibp").output
        assert jnp.allclose(r.lower, fn(x), atol=1e-5) and jnp.allclose(r.upper, fn(x), atol=1e-5)


def test_subjaxprs_are_inlined():
    @jax.jit
    def inner(x):
        return jax.nn.relu(x) * 2.0

    assert names(lambda x: inner(x) + 1.0, (3,)) == ["relu", "mul", "add"]


def test_constants_are_folded():
    w = jnp.ones((3, 3))
    assert names(lambda x: x @ (w * 2.0 + jnp.eye(3)), (2, 3)) == ["dot_general"]


def test_products_are_recorded_at_full_precision():
    """A GPU's default float32 product is TF32 (~1e-3 relative error): the graph raises every
    default or reduced precision to HIGHEST, and keeps an explicit dot algorithm."""
    w = jax.random.normal(jax.random.PRNGKey(0), (3, 4))
    k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 2, 5))
    highest = (jax.lax.Precision.HIGHEST,) * 2

    def fn(x, y):
        h = x @ w + jnp.dot(x, w, precision=jax.lax.Precision.DEFAULT)
        h = h + jnp.einsum("ij,jk->ik", x, w, precision="high") + x @ y
        img = jax.lax.conv_general_dilated(h.reshape(1, 2, 2, 2), k, (1, 1), "SAME",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return img.sum() + jnp.dot(x, w, precision=jax.lax.DotAlgorithmPreset.F32_F32_F32).sum()

    g = trace(fn, [jnp.ones((2, 3)), jnp.ones((3, 4))], [True, True])
    products = [n for n in g.nodes if n.name in ("dot_general", "conv_general_dilated")]
    assert len(products) == 6
    assert [n.params["precision"] == highest for n in products] == [True] * 5 + [False]
    assert products[-1].params["precision"] == jax.lax.DotAlgorithmPreset.F32_F32_F32


def test_unsupported_primitive_names_it_and_the_user_line():
    with pytest.raises(UnsupportedPrimitiveError, match=r"'floor'.*test_graph.py"):
        bound(lambda x: jnp.floor(x), lp_ball(jnp.ones(3), 0.1))
    with pytest.raises(UnsupportedPrimitiveError, match="sort"):
        bound(lambda x: jnp.sort(x), lp_ball(jnp.ones(3), 0.1))


def test_domain_violation_is_an_error_not_a_bound():
    with pytest.raises(DiverifyError, match="rsqrt"):
        bound(lambda x: jax.lax.rsqrt(x), lp_ball(jnp.full(3, 0.5), 1.0), method="ibp")
