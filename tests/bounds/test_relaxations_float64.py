"""The relaxations in float64 (the engine's ``precision="float64"``), against 40-digit truth.

float64 rounding is invisible to a float64 reference, so the truth here is
``mpmath`` at 40 digits, and the lines are evaluated exactly in it from their
float64 coefficients: ``ls*x + li <= f(x) <= us*x + ui`` and
``lo <= f(x) <= hi`` must hold with no tolerance, on intervals as narrow as
1e-12 (where the padding, scaled to float64's ulp, is all that separates a
sound bound from a wrong one).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest

from diverify.bounds import relaxations as R

mp = mpmath.mp.clone()
mp.dps = 40


def _logistic(x):
    return 1 / (1 + mp.exp(-x))


MP = {
    "exp": mp.exp,
    "log": mp.log,
    "sqrt": mp.sqrt,
    "rsqrt": lambda x: 1 / mp.sqrt(x),
    "reciprocal": lambda x: 1 / x,
    "integer_pow_-1": lambda x: 1 / x,
    "integer_pow_-2": lambda x: 1 / (x * x),
    "square": lambda x: x * x,
    "integer_pow_2": lambda x: x * x,
    "integer_pow_3": lambda x: x**3,
    "integer_pow_4": lambda x: x**4,
    "tanh": mp.tanh,
    "logistic": _logistic,
    "erf": mp.erf,
    "softplus": lambda x: mp.log(1 + mp.exp(x)),
    "gelu_erf": lambda x: x / 2 * mp.erfc(-x / mp.sqrt(2)),
    "gelu_tanh": lambda x: x / 2 * (1 + mp.tanh(mp.sqrt(2 / mp.pi) * (x + mp.mpf("0.044715") * x**3))),
    "quick_gelu": lambda x: x * _logistic(mp.mpf("1.702") * x),
    "relu": lambda x: max(x, mp.zero),
    "abs": abs,
    "finite": lambda x: x,
}
POSITIVE = {"log", "sqrt", "rsqrt"}
ONE_SIGNED = {"reciprocal", "integer_pow_-1", "integer_pow_-2"}


def test_reference_table_covers_supported():
    assert set(MP) == set(R.SUPPORTED)


def _points(name, rng, n):
    x = np.concatenate([rng.uniform(-12, 12, n), rng.normal(0, 1, n), [0.0, -0.7517915246935645, 1.0, -1.0]])
    if name in POSITIVE:
        x = np.abs(x) + 1e-6
    if name in ONE_SIGNED:
        x = np.where(np.abs(x) < 1e-3, 1e-3, x)
    return x


@pytest.mark.parametrize("name", sorted(R.SUPPORTED))
def test_float64_evaluation_error_within_padding_model(name):
    """The float64 padding assumes the float64 evaluation of f has relative
    error well below ``rel_pad(float64)`` (times the weight where one is declared)."""
    f, weight = R._EVAL[name]
    x = _points(name, np.random.default_rng(1), 300)
    with jax.enable_x64(True):
        got = np.asarray(jax.jit(f)(jnp.asarray(x, jnp.float64)))
        w = 1.0 if weight is None else np.asarray(weight(jnp.asarray(x, jnp.float64)))
    assert got.dtype == np.float64
    want = np.array([float(MP[name](mp.mpf(float(v)))) for v in x])
    err = np.abs(got - want)
    assert np.all(err <= 0.5 * R.rel_pad(np.float64) * w * np.abs(want) + 0.5 * R.ABS_PAD), np.max(err / np.abs(want))


@functools.cache
def _jitted(name):
    return jax.jit(functools.partial(R.linear_bounds, name)), jax.jit(functools.partial(R.interval_image, name))


@pytest.mark.parametrize("name", sorted(R.SUPPORTED))
def test_float64_lines_and_images_sound_on_narrow_intervals(name):
    rng = np.random.default_rng(7)
    centres = _points(name, rng, 6)
    widths = 10.0 ** rng.uniform(-12, -1, centres.size)
    if name == "exp":
        centres = np.minimum(centres, 60.0)
    l, u = centres - widths / 2, centres + widths / 2
    if name in POSITIVE:
        l = np.maximum(l, 1e-7)
    if name in ONE_SIGNED:
        l, u = np.where(centres > 0, np.maximum(l, 1e-4), l), np.where(centres < 0, np.minimum(u, -1e-4), u)
    lin, img = _jitted(name)
    with jax.enable_x64(True):
        b = lin(jnp.asarray(l, jnp.float64), jnp.asarray(u, jnp.float64))
        lo, hi = img(jnp.asarray(l, jnp.float64), jnp.asarray(u, jnp.float64))
    ls, li, us, ui, lo, hi = (np.asarray(v) for v in (*b, lo, hi))
    assert ls.dtype == np.float64
    for k in range(l.size):
        for t in np.linspace(0.0, 1.0, 7):
            x = mp.mpf(float(l[k])) + (mp.mpf(float(u[k])) - mp.mpf(float(l[k]))) * mp.mpf(float(t))
            fx = MP[name](x)
            assert mp.mpf(float(ls[k])) * x + mp.mpf(float(li[k])) <= fx, (name, l[k], u[k], t)
            assert fx <= mp.mpf(float(us[k])) * x + mp.mpf(float(ui[k])), (name, l[k], u[k], t)
            assert mp.mpf(float(lo[k])) <= fx <= mp.mpf(float(hi[k])), (name, l[k], u[k], t)
