"""Soundness of the elementwise relaxations against float64 truth.

Every bound is checked with no tolerance: the float32 coefficients are cast
to float64 and ``ls*x + li <= f(x) <= us*x + ui``, ``lo <= f(x) <= hi`` must
hold exactly at every sample (ends, a dense grid, uniform points and the
special points of each function). Only the module's own padding absorbs
float32 rounding.
"""

from __future__ import annotations

import functools
import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from diverify.bounds import relaxations as R

N_INTERVALS = 16
_SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

_erf = np.vectorize(math.erf, otypes=[np.float64])
_erfc = np.vectorize(math.erfc, otypes=[np.float64])


def _logistic64(x):
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _gelu_tanh64(x):
    # 0.5 x (1 + tanh(w)) == x * logistic(2w), written without the left-tail cancellation
    return x * _logistic64(2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))


REF = {
    "exp": np.exp,
    "log": np.log,
    "sqrt": np.sqrt,
    "rsqrt": lambda x: 1.0 / np.sqrt(x),
    "reciprocal": lambda x: 1.0 / x,
    "integer_pow_-1": lambda x: 1.0 / x,
    "integer_pow_-2": lambda x: 1.0 / (x * x),
    "square": lambda x: x * x,
    "integer_pow_2": lambda x: x * x,
    "integer_pow_3": lambda x: x**3,
    "integer_pow_4": lambda x: x**4,
    "tanh": np.tanh,
    "logistic": _logistic64,
    "erf": _erf,
    "softplus": lambda x: np.logaddexp(x, 0.0),
    "gelu_erf": lambda x: x * 0.5 * _erfc(-x / math.sqrt(2.0)),
    "gelu_tanh": _gelu_tanh64,
    "quick_gelu": lambda x: x * _logistic64(1.702 * x),
    "relu": lambda x: np.maximum(x, 0.0),
    "abs": np.abs,
    "finite": lambda x: x,
}
SPECIAL = [0.0, -0.7517915246935645, -0.7524614220710163, -0.751154255441289, -1.4142135623730951, 1.4142135623730951, -2.0, 2.0]
POSITIVE = {"log", "sqrt", "rsqrt"}
ONE_SIGNED = {"reciprocal", "integer_pow_-1", "integer_pow_-2"}
GRID = {"gelu_erf", "gelu_tanh", "quick_gelu"}
LIMIT = {"exp": 80.0, "integer_pow_4": 300.0}


def test_reference_table_covers_supported():
    assert set(REF) == set(R.SUPPORTED)


@functools.cache
def _jitted(name):
    lin = jax.jit(functools.partial(R.linear_bounds, name))
    img = jax.jit(functools.partial(R.interval_image, name))
    return lin, img


def _padded(*arrays):
    """Arrays of N_INTERVALS entries (the last one repeated), so that each
    function compiles once for the whole module."""
    out = []
    for a in arrays:
        a = np.asarray(a, np.float32).reshape(-1)
        out.append(np.concatenate([a, np.repeat(a[-1:], N_INTERVALS - a.size)]))
    return out


def lin(name, l, u, alpha_lower=0.5, alpha_upper=0.5):
    """``R.linear_bounds`` through one compiled function per name."""
    n = np.asarray(l).size
    l, u, al, au = _padded(l, u, np.broadcast_to(alpha_lower, np.shape(l)), np.broadcast_to(alpha_upper, np.shape(l)))
    return R.LinearBounds(*(np.asarray(v)[:n] for v in _jitted(name)[0](l, u, al, au)))


def img(name, l, u):
    n = np.asarray(l).size
    l, u = _padded(l, u)
    return tuple(np.asarray(v)[:n] for v in _jitted(name)[1](l, u))


def _samples(l, u, rng, n_uniform=96, n_grid=129):
    """Float64 points of each ``[l_i, u_i]``: ends, a grid, uniform and special points clipped in."""
    l, u = l.astype(np.float64), u.astype(np.float64)
    frac = np.concatenate([np.linspace(0.0, 1.0, n_grid), rng.uniform(size=n_uniform)])
    pts = l[:, None] + (u - l)[:, None] * frac[None, :]
    special = np.clip(np.array(SPECIAL)[None, :], l[:, None], u[:, None])
    near_ends = np.stack([np.nextafter(l, u), np.nextafter(u, l)], axis=1)
    pts = np.concatenate([pts, special, near_ends], axis=1)
    return np.clip(pts, l[:, None], u[:, None])


def violations(name, l, u, lines, image=None, rng=None):
    """Number of samples where a bound fails against float64 truth (0 when sound)."""
    rng = rng or np.random.default_rng(0)
    l, u = np.asarray(l, np.float32), np.asarray(u, np.float32)
    x = _samples(l, u, rng)
    with np.errstate(all="ignore"):
        fx = REF[name](x)
    ls, li, us, ui = (np.asarray(v, np.float64)[:, None] for v in lines)
    bad = (ls * x + li > fx) | (us * x + ui < fx)
    if image is not None:
        lo, hi = (np.asarray(v, np.float64)[:, None] for v in image)
        bad |= (lo > fx) | (hi < fx)
    return int(np.sum(bad))


# ---------------------------------------------------------------- intervals


@st.composite
def interval(draw, name):
    kind = draw(st.sampled_from(["point", "tiny", "small", "unit", "wide", "far"]))
    lim = LIMIT.get(name, 30.0)
    width = {
        "point": 0.0,
        "tiny": draw(st.floats(1e-7, 1e-4)),
        "small": draw(st.floats(1e-4, 0.1)),
        "unit": draw(st.floats(0.1, 3.0)),
        "wide": draw(st.floats(3.0, 40.0)),
        "far": draw(st.floats(0.0, 10.0)),
    }[kind]
    centre_lim = lim if kind == "far" else min(lim, 6.0)
    if name in POSITIVE or name in ONE_SIGNED:
        lo = draw(st.floats(1e-3, centre_lim))
        l, u = lo, lo + width
        if name == "sqrt" and draw(st.booleans()):  # the end where sqrt's slope is infinite
            l, u = 0.0, (0.0 if kind == "point" else u)
        if name in ONE_SIGNED and draw(st.booleans()):
            l, u = -u, -l
        return l, u
    c = draw(st.floats(-centre_lim, centre_lim))
    if kind == "wide" and draw(st.booleans()):
        return -min(width, lim), min(width, lim)
    l, u = c - width / 2, c + width / 2
    return max(l, -lim) if name != "exp" else l, min(u, lim)


def _batch(name):
    random_alpha = st.lists(st.floats(0.0, 1.0), min_size=N_INTERVALS, max_size=N_INTERVALS)
    alpha = st.one_of(st.just([0.5] * N_INTERVALS), random_alpha)
    return st.tuples(st.lists(interval(name), min_size=N_INTERVALS, max_size=N_INTERVALS), alpha, alpha)


def _arrays(ivs, al, au):
    l = np.array([a for a, _ in ivs], np.float32)
    u = np.array([b for _, b in ivs], np.float32)
    u = np.maximum(u, l)
    return l, u, np.asarray(al, np.float32), np.asarray(au, np.float32)


@pytest.mark.parametrize("name", sorted(R.SUPPORTED))
def test_sound_on_generated_intervals(name):
    @_SETTINGS
    @given(_batch(name))
    def check(batch):
        l, u, al, au = _arrays(*batch)
        assert bool(np.all(R.domain_ok(name, l, u))), (l, u)
        lines = lin(name, l, u, al, au)
        image = img(name, l, u)
        for v in (*lines, *image):
            assert np.all(np.isfinite(np.asarray(v)))
        assert violations(name, l, u, lines, image) == 0

    check()


@pytest.mark.parametrize("name", sorted(R.SUPPORTED))
def test_sound_at_alpha_extremes_and_fixed_cases(name):
    cases = {
        "positive": [(1e-3, 1.0), (0.5, 0.5), (2.0, 2.0 + 1e-6), (1.0, 50.0), (3.0, 7.0)],
        "general": [(-20.0, 20.0), (-3.0, -0.75), (-0.75, 0.3), (-1e-3, 1e-3), (0.0, 0.0), (-8.0, -8.0), (-5.0, 1.0), (-1.0, 6.0)],
    }
    pos = name in POSITIVE or name in ONE_SIGNED
    ivs = cases["positive"] if pos else cases["general"]
    if name in ONE_SIGNED:
        ivs = ivs + [(-b, -a) for a, b in ivs]
    if name == "sqrt":
        ivs = ivs + [(0.0, 0.0), (0.0, 1.0), (0.0, 1e-20)]
    l = np.array([a for a, _ in ivs], np.float32)
    u = np.array([b for _, b in ivs], np.float32)
    for a in (0.0, 0.25, 1.0):
        lines = lin(name, l, u, a, 1.0 - a)
        assert violations(name, l, u, lines, img(name, l, u)) == 0


# ---------------------------------------------------------------- mutations: the checker can fail


def test_checker_catches_missing_padding(monkeypatch):
    rng = np.random.default_rng(1)
    l = rng.uniform(-5, 5, 512).astype(np.float32)
    monkeypatch.setattr(R, "REL_PAD", 0.0)
    monkeypatch.setattr(R, "LINE_PAD", 0.0)
    monkeypatch.setattr(R, "ABS_PAD", 0.0)
    for name in ("exp", "softplus"):
        unpadded = jax.jit(functools.partial(R.linear_bounds, name))(l, l)
        assert violations(name, l, l, unpadded) > 0


def test_checker_catches_wrong_tangent():
    # the classic bug: the tangent at the midpoint used as tanh's upper bound on a crossing interval
    l = np.array([-3.0, -2.0, -4.0], np.float32)
    u = np.array([1.0, 0.5, 2.0], np.float32)
    t = (l + u) / 2
    s = 1.0 - np.tanh(t) ** 2
    wrong = R.LinearBounds(s, np.tanh(t) - s * t - 1.0, s, np.tanh(t) - s * t)
    assert violations("tanh", l, u, wrong) > 0


def test_checker_catches_missing_curvature_remainder(monkeypatch):
    monkeypatch.setattr(R, "_curv_gelu_erf", lambda r, big_r: jnp.zeros_like(r))
    monkeypatch.setattr(R, "_LINES", R._lines_table())
    l = np.linspace(-20.0, -0.5, 64, dtype=np.float32)
    u = l + np.float32(9.0)
    assert violations("gelu_erf", l, u, jax.jit(functools.partial(R.linear_bounds, "gelu_erf"))(l, u)) > 0


def test_checker_catches_wrong_image():
    l = np.array([-2.0, 0.3], np.float32)
    u = np.array([1.0, 2.0], np.float32)
    lines = lin("gelu_erf", l, u)
    lo, hi = img("gelu_erf", l, u)
    # forgetting the interior minimum (min of the ends only)
    ends = np.minimum(np.asarray(R._gelu_erf(l)), np.asarray(R._gelu_erf(u)))
    assert violations("gelu_erf", l, u, lines, (ends, hi)) > 0
    assert violations("gelu_erf", l, u, lines, (lo, hi)) == 0


# ---------------------------------------------------------------- tightness


def _max_gap(name, l, u):
    b = lin(name, l, u)
    x = _samples(np.asarray(l, np.float32), np.asarray(u, np.float32), np.random.default_rng(0), 0, 65)
    ls, li, us, ui = (np.asarray(v, np.float64)[:, None] for v in b)
    return np.max((us * x + ui) - (ls * x + li), axis=1)


@pytest.mark.parametrize("name", sorted(R.SUPPORTED - {"relu", "abs"}))
def test_gap_shrinks_quadratically(name):
    centres = np.array([0.4, 1.7, 2.5] if name in POSITIVE | ONE_SIGNED else [-1.3, 0.4, 2.2], np.float32)
    gaps = []
    for w in (0.2, 0.02):
        l = centres - np.float32(w / 2)
        u = centres + np.float32(w / 2)
        gaps.append(_max_gap(name, l, u))
    # quadratic shrinkage gives a ratio of 0.01 (linear 0.1), plus the float32 padding
    f = REF[name](centres.astype(np.float64))
    slope = np.abs(lin(name, centres, centres).lower_slope)
    padding = 8.0 * R.REL_PAD * (1.0 + np.abs(f) + slope * np.abs(centres))
    assert np.all(gaps[1] <= 0.02 * gaps[0] + padding), (gaps, padding)
    # and the gap itself is of the order of the chord/tangent gap M2 w^2 / 8
    for w, gap in zip((0.2, 0.02), gaps):
        xs = np.linspace(centres - w / 2, centres + w / 2, 101).astype(np.float64)
        m2 = np.max(np.abs(_second_derivative64(name, xs, 1e-3)), axis=0)
        assert np.all(gap <= 0.3 * m2 * w * w + padding), (w, gap, m2)


@pytest.mark.parametrize("name", sorted(R.SUPPORTED))
def test_degenerate_interval_is_nearly_exact(name):
    x = np.array([0.3, 1.0, 2.5] if name in POSITIVE | ONE_SIGNED else [-2.0, -0.5, 0.0, 0.7, 3.0], np.float32)
    b = lin(name, x, x)
    lo, hi = img(name, x, x)
    f = REF[name](x.astype(np.float64))
    ls, li, us, ui = (np.asarray(v, np.float64) for v in b)
    # the float32 padding is relative to the terms of s*x + c (see the module docstring)
    scale = 1e-30 + np.abs(f) + np.maximum(np.abs(ls * x) + np.abs(li), np.abs(us * x) + np.abs(ui))
    assert np.all((us * x + ui) - (ls * x + li) <= 5.0 * R.REL_PAD * scale + 3.0 * R.ABS_PAD)
    assert np.all(np.asarray(hi, np.float64) - np.asarray(lo, np.float64) <= 5.0 * R.REL_PAD * scale + 3.0 * R.ABS_PAD)


def test_relu_and_abs_exact_on_one_signed_intervals():
    # exact up to the smallest normal float32 (padding against subnormal flushing)
    TINY = float(np.finfo(np.float32).tiny)
    l = np.array([0.0, 1.0, -3.0, -2.0], np.float32)
    u = np.array([2.0, 1.0, -1.0, 0.0], np.float32)
    for alpha in (0.0, 0.7):
        r = lin("relu", l, u, alpha, alpha)
        np.testing.assert_allclose(np.stack(r), [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], rtol=0, atol=TINY)
        a = lin("abs", l, u, alpha, alpha)
        np.testing.assert_allclose(np.stack(a), [[1, 1, -1, -1], [0, 0, 0, 0], [1, 1, -1, -1], [0, 0, 0, 0]], rtol=0, atol=TINY)
    np.testing.assert_allclose(np.stack(img("relu", l, u)), [[0, 1, 0, 0], [2, 1, 0, 0]], rtol=0, atol=TINY)
    np.testing.assert_allclose(np.stack(img("abs", l, u)), [[0, 1, 1, 0], [2, 1, 3, 2]], rtol=0, atol=TINY)
    # CROWN's adaptive default on crossing intervals: slope 1 when u >= -l, else 0 (abs: +1 / -1)
    lc, uc = np.array([-1.0, -3.0], np.float32), np.array([3.0, 1.0], np.float32)
    np.testing.assert_array_equal(R.linear_bounds("relu", lc, uc).lower_slope, [1.0, 0.0])
    np.testing.assert_array_equal(R.linear_bounds("abs", lc, uc).lower_slope, [1.0, -1.0])


def test_monotone_images_are_tight():
    l = np.array([-2.0, 0.5, -0.1], np.float32)
    u = np.array([-1.0, 3.0, 4.0], np.float32)
    for name in ("exp", "tanh", "logistic", "erf", "softplus", "integer_pow_3"):
        lo, hi = img(name, l, u)
        f = REF[name]
        scale = 1e-5 * (1.0 + np.abs(f(u.astype(np.float64))))
        np.testing.assert_array_less(f(l.astype(np.float64)) - np.asarray(lo, np.float64), scale)
        np.testing.assert_array_less(np.asarray(hi, np.float64) - f(u.astype(np.float64)), scale)


# ---------------------------------------------------------------- constants and curvature bounds


def _bisect64(g, a, b, steps=200):
    for _ in range(steps):
        m = 0.5 * (a + b)
        a, b = (m, b) if g(m) < 0 else (a, m)
    return 0.5 * (a + b)


def test_gelu_minima_constants():
    h = 1e-6
    for name, (argmin, fmin) in R._UNIMODAL_MIN.items():
        f = REF[name]
        d = lambda x: float((f(np.array([x + h])) - f(np.array([x - h])))[0] / (2 * h))  # noqa: E731
        x_star = _bisect64(d, -3.0, -0.1, 60)
        assert abs(x_star - argmin) < 1e-6
        true_min = float(f(np.array([argmin]))[0])
        assert fmin <= true_min <= fmin + 1e-7
        lo, _ = img(name, [-3.0], [1.0])
        assert float(lo[0]) <= true_min


def _second_derivative64(name, x, h=1e-4):
    f = REF[name]
    return (f(x + h) - 2 * f(x) + f(x - h)) / (h * h)


@pytest.mark.parametrize("name", sorted(GRID))
def test_curvature_bounds_dominate_second_derivative(name):
    curv = {"gelu_erf": R._curv_gelu_erf, "gelu_tanh": R._curv_gelu_tanh, "quick_gelu": R._curv_quick_gelu}[name]
    rng = np.random.default_rng(3)
    for _ in range(40):
        a = rng.uniform(-12, 12)
        b = a + rng.uniform(0, 1.5)
        x = np.linspace(a, b, 400)
        fpp = np.max(np.abs(_second_derivative64(name, x)))
        r = 0.0 if a * b <= 0 else min(abs(a), abs(b))
        bound = float(curv(jnp.float32(r), jnp.float32(max(abs(a), abs(b)))))
        assert fpp <= bound + 1e-5, (a, b, fpp, bound)


@pytest.mark.parametrize("name", sorted(R.SUPPORTED))
def test_float32_evaluation_error_within_padding_model(name):
    """The padding assumes the float32 evaluation of f has relative error
    well below REL_PAD (times the weight where one is declared)."""
    f32, weight = R._EVAL[name]
    x = np.concatenate([np.linspace(-30, 30, 20001), np.geomspace(1e-6, 30, 2001), -np.geomspace(1e-6, 30, 2001)])
    if name in POSITIVE:
        x = np.abs(x) + 1e-6
    if name in ONE_SIGNED:
        x = np.where(np.abs(x) < 1e-3, 1e-3, x)
    if name == "exp":
        x = x[x < 80]
    x = x.astype(np.float32)
    got = np.asarray(jax.jit(f32)(x), np.float64)
    with np.errstate(all="ignore"):
        want = REF[name](x.astype(np.float64))
    w = 1.0 if weight is None else np.asarray(weight(x), np.float64)
    err = np.abs(got - want)
    assert np.all(err <= 0.5 * R.REL_PAD * w * np.abs(want) + 0.5 * R.ABS_PAD)


# ---------------------------------------------------------------- domains


def test_domain_errors_give_nan_never_finite_bounds():
    cases = {
        "log": ([-1.0, 0.0, 1.0], [1.0, 1.0, 2.0]),
        "rsqrt": ([-1.0, 0.0, 1.0], [1.0, 1.0, 2.0]),
        "sqrt": ([-1.0, 0.0, 1.0], [1.0, 1.0, 2.0]),
        "reciprocal": ([-1.0, 0.0, 1.0], [1.0, 1.0, 2.0]),
        "integer_pow_-2": ([-1.0, -1.0, -2.0], [1.0, 0.0, -1.0]),
        "exp": ([0.0, 0.0, 0.0], [100.0, 1.0, 10.0]),
        "tanh": ([1.0, np.nan, 0.0], [0.0, 1.0, np.inf]),
    }
    expected_ok = {
        "log": [False, False, True],
        "rsqrt": [False, False, True],
        "sqrt": [False, True, True],
        "reciprocal": [False, False, True],
        "integer_pow_-2": [False, False, True],
        "exp": [False, True, True],
        "tanh": [False, False, False],
    }
    for name, (l, u) in cases.items():
        l, u = np.array(l, np.float32), np.array(u, np.float32)
        ok = np.asarray(R.domain_ok(name, l, u))
        np.testing.assert_array_equal(ok, expected_ok[name], err_msg=name)
        for v in (*lin(name, l, u), *img(name, l, u)):
            v = np.asarray(v)
            assert np.all(np.isnan(v[~ok])), name
            assert np.all(np.isfinite(v[ok])), name


def test_unknown_name_is_refused():
    with pytest.raises(KeyError, match="no relaxation"):
        R.linear_bounds("sinh", 0.0, 1.0)


# ---------------------------------------------------------------- jit, vmap, gradients


def _interval_for(name):
    if name in POSITIVE | ONE_SIGNED:
        return np.array([0.5, 1.0, 2.0, 0.7], np.float32), np.array([2.0, 1.0, 5.0, 0.7], np.float32)
    return np.array([-3.0, -0.5, 0.2, 1.0], np.float32), np.array([2.0, -0.5, 4.0, 1.0], np.float32)


@pytest.mark.parametrize("name", ["exp", "sqrt", "tanh", "integer_pow_3", "reciprocal", "gelu_erf", "relu"])
def test_vmap_matches_and_alpha_gradients_finite(name):
    """One family each: convex, clamped concave, S-shaped, mirrored S, sign-split, grid, piecewise."""
    l, u = _interval_for(name)

    def objective(al, au):
        b = R.linear_bounds(name, l, u, al, au)
        return jnp.sum(b.lower_slope * l + b.lower_intercept) - jnp.sum(b.upper_slope * u + b.upper_intercept)

    @jax.jit
    def run(a):
        mapped = jax.vmap(lambda x, y, p, q: R.linear_bounds(name, x, y, p, q))(l, u, a, 1.0 - a)
        return mapped, R.linear_bounds(name, l, u, a, 1.0 - a), jax.grad(objective, argnums=(0, 1))(a, 1.0 - a)

    for a in (0.0, 0.5, 1.0):
        mapped, direct, grads = run(jnp.full(4, a, jnp.float32))
        for d, m in zip(direct, mapped):
            np.testing.assert_allclose(np.asarray(d), np.asarray(m), rtol=1e-6, atol=1e-6)
        assert all(np.all(np.isfinite(np.asarray(g))) for g in grads), (name, a)
        if a == 0.5 and name != "relu":  # relu's alpha only acts on crossing intervals
            assert any(np.any(np.asarray(g) != 0) for g in grads), name
