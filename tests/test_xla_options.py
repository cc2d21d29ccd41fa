"""diverify's XLA compiler options: applied to its programs, same function, and dropped when XLA rejects them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diverify import xla_options
from diverify.bounds import compile_bounds
from diverify.specs import lp_ball


def _fused(a, b):
    return jnp.sum(jnp.tanh(a @ b) * jnp.exp(-jnp.abs(a @ b)), axis=0)


@pytest.fixture
def fresh_options(monkeypatch):
    """Forget the probed options before and after the test."""
    xla_options._accepted_cpu_options.cache_clear()
    yield monkeypatch
    xla_options._accepted_cpu_options.cache_clear()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the options are XLA:CPU options")
def test_programs_compile_without_ynnpack_fusions_and_compute_the_same(fresh_options):
    a = jax.random.normal(jax.random.key(0), (48, 32))
    b = jax.random.normal(jax.random.key(1), (32, 40))
    assert xla_options.compiler_options() == xla_options.CPU_OPTIONS
    assert xla_options.compiler_options(jnp.float64) == {}  # YNNPACK's fusions are faster on the large float64 programs
    default = jax.jit(_fused).lower(a, b).compile().as_text()
    ours = xla_options.jit(_fused).lower(a, b).compile().as_text()
    if "__ynn_fusion" not in default:
        pytest.skip("this XLA does not use YNNPACK fusions by default: nothing to turn off")
    assert "__ynn_fusion" not in ours
    np.testing.assert_allclose(xla_options.jit(_fused)(a, b), jax.jit(_fused)(a, b), rtol=1e-6, atol=1e-6)


def test_an_option_xla_does_not_know_is_dropped(fresh_options):
    fresh_options.setattr(xla_options, "CPU_OPTIONS", {"xla_cpu_no_such_option_for_diverify": ""})
    assert xla_options.compiler_options() == {}
    a = jnp.ones((4, 4))
    np.testing.assert_allclose(xla_options.jit(_fused)(a, a), _fused(a, a), rtol=1e-6)


def test_a_bound_compiled_with_the_options_is_unchanged(fresh_options):
    w = jax.random.normal(jax.random.key(2), (6, 5))

    def f(x):
        return jnp.tanh(x @ w)

    ball = lp_ball(jnp.linspace(-1.0, 1.0, 6), 0.05)
    ours = compile_bounds(f, ball, method="crown")(ball).output
    fresh_options.setattr(xla_options, "CPU_OPTIONS", {})
    xla_options._accepted_cpu_options.cache_clear()
    plain = compile_bounds(f, ball, method="crown")(ball).output
    np.testing.assert_allclose(ours.lower, plain.lower, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours.upper, plain.upper, rtol=1e-6, atol=1e-7)
