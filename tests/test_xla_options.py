"""diverify's XLA compiler options: applied to its programs, same function, and dropped when XLA rejects them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diverify import xla_options
from diverify.bounds import compile_bounds
from diverify.errors import DiverifyError
from diverify.specs import lp_ball


def _fused(a, b):
    return jnp.sum(jnp.tanh(a @ b) * jnp.exp(-jnp.abs(a @ b)), axis=0)


@pytest.fixture
def fresh_options(monkeypatch):
    """Forget the probed options before and after the test."""
    xla_options._accepted.cache_clear()
    yield monkeypatch
    xla_options._accepted.cache_clear()


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


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the options are XLA:CPU options")
def test_bounds_with_forward_slack_compile_without_the_fusion_emitters(fresh_options):
    assert xla_options.compiler_options(jnp.float64, forward_slack=True) == xla_options.FORWARD_CPU_OPTIONS
    assert xla_options.compiler_options(jnp.float32, forward_slack=True) == {
        **xla_options.CPU_OPTIONS, **xla_options.FORWARD_CPU_OPTIONS}
    ball = lp_ball(jnp.linspace(-1.0, 1.0, 6), 0.05)
    w = jax.random.normal(jax.random.key(4), (6, 5))
    for method, slack in [("forward", True), ("crown-forward", True), ("zonotope", False), ("crown", False)]:
        assert compile_bounds(lambda x: jnp.tanh(x @ w), ball, method=method).forward_slack == slack
    # The tests/bounds/test_random_programs.py::test_forward_slack_chains_compile_and_run_in_bounded_time
    # program is the reason; here: the same bound either way.
    ours = compile_bounds(lambda x: jnp.tanh(x @ w), ball, method="forward")(ball).output
    fresh_options.setattr(xla_options, "FORWARD_CPU_OPTIONS", {})
    plain = compile_bounds(lambda x: jnp.tanh(x @ w), ball, method="forward")(ball).output
    np.testing.assert_allclose(ours.lower, plain.lower, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours.upper, plain.upper, rtol=1e-6, atol=1e-7)


def test_an_option_xla_does_not_know_is_dropped(fresh_options):
    fresh_options.setattr(xla_options, "CPU_OPTIONS", {"xla_cpu_no_such_option_for_diverify": ""})
    fresh_options.setattr(xla_options, "FORWARD_CPU_OPTIONS", {"xla_cpu_no_such_option_either": False})
    assert xla_options.compiler_options() == {}
    assert xla_options.compiler_options(forward_slack=True) == {}
    a = jnp.ones((4, 4))
    np.testing.assert_allclose(xla_options.jit(_fused)(a, a), _fused(a, a), rtol=1e-6)


def test_a_bound_compiled_with_the_options_is_unchanged(fresh_options):
    w = jax.random.normal(jax.random.key(2), (6, 5))

    def f(x):
        return jnp.tanh(x @ w)

    ball = lp_ball(jnp.linspace(-1.0, 1.0, 6), 0.05)
    ours = compile_bounds(f, ball, method="crown")(ball).output
    fresh_options.setattr(xla_options, "CPU_OPTIONS", {})
    plain = compile_bounds(f, ball, method="crown")(ball).output
    np.testing.assert_allclose(ours.lower, plain.lower, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours.upper, plain.upper, rtol=1e-6, atol=1e-7)


def _resident_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(xla_options._malloc_trim() is None, reason="malloc_trim is glibc's")
def test_release_freed_heap_returns_freed_pages_to_the_os():
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size, count = 64 * 1024, 4096  # 256 MiB in blocks below mmap's threshold: the heap's own pages
    blocks = [libc.malloc(size) for _ in range(count)]
    fence = libc.malloc(size)  # keeps the freed blocks off the heap's top, where free() itself would trim
    try:
        for b in blocks:
            ctypes.memset(b, 1, size)
        for b in blocks:
            libc.free(b)
        held = _resident_bytes()
        assert xla_options.release_freed_heap()
        assert held - _resident_bytes() > size * count // 2
    finally:
        libc.free(fence)


def test_a_bound_compiles_once_for_call_and_timed_and_releases_the_heap_after_a_large_program(monkeypatch):
    released = []
    monkeypatch.setattr(xla_options, "release_freed_heap", lambda: released.append(1) or True)
    w = jax.random.normal(jax.random.key(3), (6, 5))
    small = compile_bounds(lambda x: jnp.tanh(x @ w), lp_ball(jnp.zeros(6), 0.1), method="crown")
    small(lp_ball(jnp.zeros(6), 0.1))
    assert released == []  # a few bytes of temporaries: the freed pages are kept for reuse
    monkeypatch.setattr(xla_options, "RELEASE_FOR_TEMP_BYTES", 0)
    bf = compile_bounds(lambda x: jnp.tanh(x @ w), lp_ball(jnp.zeros(6), 0.1), method="crown")
    ball = lp_ball(jnp.linspace(-1.0, 1.0, 6), 0.05)
    called = bf(ball).output
    assert released == [1]
    timed, _, _ = bf.timed(lp_ball(jnp.linspace(-1.0, 1.0, 6), 0.05))
    assert released == [1] and len(bf._executables) == 1  # the same executable
    np.testing.assert_array_equal(timed.output.lower, called.lower)
    bf(lp_ball(jnp.linspace(-1.0, 1.0, 6), 0.2))  # another radius: data, the same executable
    assert released == [1]
    with pytest.raises(DiverifyError, match=r"input set 0 has shape \(7,\), but the bound was compiled for shape \(6,\)"):
        bf(lp_ball(jnp.zeros(7), 0.05))  # another shape is refused before compiling
    assert released == [1]
